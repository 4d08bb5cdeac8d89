// Internal: the Hopper (sm_90a) prefill GEMM: the grouped mixed-input GEMM of
// gemm.h (same GemmProblem, same results) on wgmma.mma_async with the
// dequantized weights as the register A operand and the tokens in shared
// memory, for m-tiles of many tokens per expert.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm.h"

namespace qmoe::cuda {

/// Token rows per m-tile of the wgmma kernel: the planner's bm when this
/// kernel is used. 128 = the wgmma N of one m64n128k16 instruction: a warpgroup
/// holds 2 x 64 accumulators per thread for its two 64-row weight tiles, which
/// is what 255 registers allow (256 tokens would need 256 accumulators).
inline constexpr int kWgmmaTileTokens = 128;

/// Output (weight) rows per block: 2 warpgroups x 2 x m64. The FC2 K-split
/// heuristic needs it. padded_rows is only a multiple of kRowAlign (128): the
/// last row block of a matrix may hold 128 rows, its second warpgroup then
/// computes a duplicate and stores nothing.
inline constexpr int kWgmmaBlockRows = 256;

/// True when this build contains the sm_90a kernel and the device's compute
/// capability (major * 10 + minor) is 90. Queries the kernel image of the
/// current device (call it with that device current).
bool wgmma_available(int cc);

/// Same contract as launch_gemm (gemm.h) for m-tiles of kWgmmaTileTokens
/// tokens. Host function; no sync, no allocation (graph-capturable).
void launch_gemm_wgmma(const GemmProblem& p, DType dtype, std::int64_t tile_capacity, cudaStream_t stream);

}  // namespace qmoe::cuda
