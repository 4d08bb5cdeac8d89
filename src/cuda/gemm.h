// Internal: the grouped mixed-input GEMM (int4/int8 weights x float16/bfloat16
// tokens, float32 accumulation on the tensor cores) with fused epilogues.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/layout.h"
#include "qmoe/config.h"
#include "qmoe/tensor.h"

namespace qmoe::cuda {

/// A (expert, first row) pair of the per-call tile list built by the planner.
struct MTile {
  int expert, m0;
};

struct GemmProblem {
  // Packed weights (layout.h), all experts.
  GpuGeometry g;
  const std::uint8_t* codes = nullptr;
  const std::uint16_t* rel_scales = nullptr;
  const std::uint8_t* zero_points = nullptr;
  const float* row_scales = nullptr;
  const float* bias = nullptr;  ///< FC1 only
  // Activations: row r of token slot p is x + row(p) * x_stride, with
  // row(p) = gather[p] (FC1: the input token) or p (FC2: the FC1 output).
  const void* x = nullptr;
  std::int64_t x_stride = 0;  ///< elements
  const int* gather = nullptr;
  bool x_vec16 = false;  ///< rows 16-byte aligned and K a multiple of 8: cp.async path
  // The per-call plan (device).
  const int* offsets = nullptr;  ///< [E + 1] first position of each expert
  const MTile* tiles = nullptr;  ///< [capacity]
  const int* num_tiles = nullptr;
  // Output.
  bool fc1 = true;  ///< true: bias + activation, store in the token dtype; false: float32 partials
  void* out = nullptr;
  std::int64_t out_stride = 0;    ///< elements per output row
  std::int64_t split_stride = 0;  ///< FC2: elements between the partials of two K splits
  int splits = 1;                 ///< FC2: K splits (grid z)
  std::int64_t split_cols = 0;    ///< FC2: K columns per split (multiple of kKAlign)
  // FC1 epilogue.
  Activation act = Activation::identity;
  float alpha = 1.f, beta = 0.f, limit = 0.f;
  std::int64_t inter = 0;  ///< I: columns of the FC1 output
  // Launch.
  bool pdl = false;  ///< as a programmatic dependent launch (common.cuh launch_kernel)
};

/// Token tile height (BM = 8 * mt) the heuristic picks for `avg` tokens per expert.
int pick_mt(double avg_tokens_per_expert);

/// Launches the GEMM over `tile_capacity` m-tiles (tiles past *num_tiles exit).
/// mt <= 2 (decode) runs the weight-streaming kernel of gemm_decode.cu.
void launch_gemm(const GemmProblem& p, DType dtype, int mt, std::int64_t tile_capacity, cudaStream_t stream);

/// The decode kernel (gemm_decode.cu) for mt = 1 or 2.
void launch_gemm_decode(const GemmProblem& p, DType dtype, int mt, std::int64_t tile_capacity, cudaStream_t stream);

}  // namespace qmoe::cuda
