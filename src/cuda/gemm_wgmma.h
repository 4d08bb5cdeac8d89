// Internal: the Hopper (sm_90a) prefill GEMM: the grouped mixed-input GEMM of
// gemm.h (same GemmProblem, same results) on wgmma.mma_async with the
// dequantized weights as the register A operand and the tokens in shared
// memory, for m-tiles of many tokens per expert.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm.h"

namespace qmoe::cuda {

/// True when this build contains the sm_90a kernel and the device's compute
/// capability (major * 10 + minor) is 90. Queries the kernel image of the
/// current device (call it with that device current).
bool wgmma_available(int cc);

/// wgmma_available, and the int8-token kernels (GemmProblem::act_meta) are in the build
/// with the register split they need.
bool wgmma_act8_available(int cc);

/// Same contract as the launch functions of gemm.h, for m-tiles of `tokens`
/// (64 or 128: wgmma_geometry) tokens.
void launch_gemm_wgmma(const GemmProblem& p, DType dtype, int tokens, std::int64_t tile_capacity, cudaStream_t stream);

}  // namespace qmoe::cuda
