// Internal: the grouped mixed-input GEMM (int4/int8 weights x float16/bfloat16
// tokens, float32 accumulation on the tensor cores) with fused epilogues.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/act8.h"
#include "cuda/layout.h"
#include "qmoe/config.h"
#include "qmoe/tensor.h"

namespace qmoe::cuda {

/// A self-routed FC1 (GemmProblem::route_logits) keeps the order keys of up to
/// this many experts in its token buffer.
constexpr int kSelfRouteMaxExperts = 4096;

/// Small calls on the decode kernel: FC2's blocks also do the final combine
/// (GemmProblem::combine) up to this many tokens per pass.
constexpr int kFusedCombineTokens = 16;

/// FC2's 64-row blocks over the hidden size (its rows padded to layout.h's kRowAlign).
inline std::int64_t fused_combine_row_blocks(std::int64_t hidden) {
  return (hidden + kRowAlign - 1) / kRowAlign * (kRowAlign / 64);
}

/// FC2's combine, done by the last of FC2's blocks to store its partials for a
/// (token, 64-row block): out[t][h] = sum over j in order of topk_weight[t k + j] x
/// (bias[topk_expert] + the partials of position pos_of[t k + j], splits in order),
/// the arithmetic of route.cu's combine kernels (same bits). `arrivals` counts the
/// blocks per (token, row block), zeroed by the routing kernel of the call.
struct FusedCombine {
  void* out = nullptr;  ///< null: no fused combine
  int* arrivals = nullptr;
  int row_blocks = 0;  ///< arrivals per token
  const int* token_of = nullptr;
  const int* pos_of = nullptr;
  const int* topk_expert = nullptr;
  const float* topk_weight = nullptr;
  const float* bias = nullptr;  ///< FC2 bias rows (bias_stride apart), or null
  std::int64_t bias_stride = 0;
  int k = 0;
  std::int64_t hidden = 0;
};

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
  /// accuracy_level 4 (wgmma only): x holds int8 codes of act8.h (x_stride bytes per row)
  /// and row r's blocks are act_meta[r * meta_stride ...]; null = x in the token dtype.
  const Act8Meta* act_meta = nullptr;
  std::int64_t meta_stride = 0;
  // The per-call plan (device).
  const int* offsets = nullptr;  ///< [E + 1] first position of each expert
  const MTile* tiles = nullptr;  ///< [capacity]
  const int* num_tiles = nullptr;
  /// Only m-tiles of slots [slot_begin, slot_end) (host experts streamed to the GPU run
  /// in a launch of their own, with weights from a staging buffer).
  int slot_begin = 0, slot_end = 1 << 30;
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
  /// Decode FC1 of a one-token call only (moe.cu decides): the router logits of the
  /// token, route_experts of them in route_dtype. Each block then picks the expert of
  /// its m-tile itself (tile y: the y-th lowest of the k experts routing picks,
  /// gemm_decode.cu) and reads the input row directly, instead of waiting for the
  /// routing kernel's plan: FC1 streams its weights while routing runs beside it.
  const void* route_logits = nullptr;
  DType route_dtype = DType::f32;
  int route_experts = 0, route_k = 0;
  /// Decode FC2 of a small call (moe.cu decides): the combine in its last blocks.
  FusedCombine combine;
};

/// A GEMM kernel's block geometry: token rows per m-tile (the planner's bm)
/// and output (weight) rows per block (the grid's row dimension). Defined here
/// once: the kernels static_assert their shapes against it and launch with it,
/// and the kernel table (gemm_table.h) and the workspace sizing read it.
struct GemmGeometry {
  int tile_tokens;
  int block_rows;
};
/// The decode kernel (gemm_decode.cu), mt = 1 or 2: 4 warps of one 16-row tile.
constexpr GemmGeometry decode_geometry(int mt) { return {8 * mt, 64}; }
/// The mma.sync kernel (gemm.cu), mt = 4 or 8: 4 warps of 1 (mt 4) or 2 (mt 8) 16-row tiles.
constexpr GemmGeometry mma_geometry(int mt) { return {8 * mt, mt >= 8 ? 128 : 64}; }
/// The sm_90a wgmma kernel (gemm_wgmma.cu): 128 tokens = the N of one
/// m64n128k16 instruction (a warpgroup holds 2 x 64 accumulators per thread for
/// its two 64-row weight tiles, what 255 registers allow); 256 rows = 2
/// warpgroups x 2 x m64. padded_rows is only a multiple of kRowAlign (128): the
/// last row block may hold 128 rows, its second warpgroup then computes a
/// duplicate and stores nothing. wgmma_geometry(64): the same block on m64n64k16,
/// for m-tiles of up to 64 tokens (half the tensor work of a 128-token tile).
constexpr GemmGeometry wgmma_geometry(int tokens) { return {tokens, 256}; }
inline constexpr GemmGeometry kWgmmaGeometry = wgmma_geometry(128);
/// The smallest m-tile of any kernel (the plan's tile list is sized by it).
inline constexpr int kMinTileTokens = decode_geometry(1).tile_tokens;

/// The launch functions of the kernel table (gemm_table.cu): each runs the GEMM
/// over `tile_capacity` m-tiles of its geometry (tiles past *num_tiles exit).
/// Host functions; no sync, no allocation (graph-capturable).
/// The weight-streaming decode kernel (gemm_decode.cu), mt = 1 or 2.
void launch_gemm_decode(const GemmProblem& p, DType dtype, int mt, std::int64_t tile_capacity, cudaStream_t stream);
/// The mma.sync prefill kernel (gemm.cu), mt = 4 or 8.
void launch_gemm_mma(const GemmProblem& p, DType dtype, int mt, std::int64_t tile_capacity, cudaStream_t stream);

}  // namespace qmoe::cuda
