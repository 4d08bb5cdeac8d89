// The CUDA kernel table (gemm_table.h) and the choices made from it.
#include <algorithm>
#include <limits>

#include "core/check.h"
#include "cuda/common.cuh"
#include "cuda/gemm_table.h"
#include "cuda/gemm_wgmma.h"

namespace qmoe::cuda {

namespace {

constexpr double kAny = std::numeric_limits<double>::infinity();  // the last rows serve any count

void launch_wgmma(const GemmProblem& p, DType dtype, int mt, std::int64_t tile_capacity, cudaStream_t stream) {
  launch_gemm_wgmma(p, dtype, 8 * mt, tile_capacity, stream);
}

// Rows by average tokens per expert. The decode and mma.sync bounds: token
// tiles of 8, 16, 32 and 64 columns, each the narrowest that holds twice the
// average. An expert's weights are streamed once per m-tile, and the counts
// spread around the average (roughly Poisson): with tiles of the average, about
// 40% of the experts at 8 tokens each need a second tile (qwen3 T = 128 would
// read ~1.4x its weights); with twice the average almost none do, for twice the
// tensor work, which the weight-bound regime absorbs.
// wgmma from 32 tokens per expert: below, mma.sync's narrower token tiles waste
// less. Measured on the H200 with the warp-specialized wgmma kernel (layer ms,
// mma.sync vs wgmma): 16 tokens per expert (gpt-oss T = 128) 0.30 vs 0.47; 32
// (mixtral T = 128) 0.94 vs 0.77, (gpt-oss T = 256) 0.487 vs 0.476; 64: wgmma
// 1.6-1.8x faster. K-split targets for decode (the ring kernel of
// gemm_decode.cu), measured on the H200 (mixtral layer, eager): 8 blocks per SM
// -> T = 1 88.5 us, T = 16 276 us; 6 -> 89.4, 273; 3 -> 89.9, 292. wgmma with
// the same rule: 64-token tiles up to 32 tokens per expert (half the tensor work
// of a 128-token tile, the weights dequantized once per m-tile either way), 128 above.
// The decode FC2 K-split target in blocks per SM, a build-time knob for measuring
// it on short-K shapes (qwen3's FC2: K = 768; scripts/device_ab.sh).
#ifndef QMOE_DECODE_FC2_BLOCKS_PER_SM
#define QMOE_DECODE_FC2_BLOCKS_PER_SM 8
#endif
constexpr int kDecodeSplitTarget = QMOE_DECODE_FC2_BLOCKS_PER_SM;
static_assert(kDecodeSplitTarget >= 1, "QMOE_DECODE_FC2_BLOCKS_PER_SM: at least 1");
constexpr GemmVariant kDecode1{"decode", 1, decode_geometry(1), 4, 0, 80, 0, kDecodeSplitTarget, launch_gemm_decode};
constexpr GemmVariant kDecode2{"decode", 2, decode_geometry(2), 8, 0, 80, 0, kDecodeSplitTarget, launch_gemm_decode};
constexpr GemmVariant kMma4{"mma.sync", 4, mma_geometry(4), 16, 0, 80, 0, 2, launch_gemm_mma};
constexpr GemmVariant kMma8{"mma.sync", 8, mma_geometry(8), kAny, 0, 80, 0, 2, launch_gemm_mma};
constexpr GemmVariant kWgmma64{"wgmma", 8, wgmma_geometry(64), 32, 32, 90, 90, 1, launch_wgmma};
constexpr GemmVariant kWgmma{"wgmma", 16, kWgmmaGeometry, kAny, 32, 90, 90, 1, launch_wgmma};
// accuracy_level 4: int8 tokens on the int8 tensor cores, 64-token tiles (the int32
// sums of a stage sit beside the float32 ones), wherever wgmma runs.
constexpr GemmVariant kWgmmaInt8{"wgmma.int8", 8, wgmma_geometry(64), kAny, 32, 90, 90, 1, launch_wgmma, true};
constexpr const GemmVariant* kByTokens[] = {&kDecode1, &kDecode2, &kMma4, &kMma8};

static_assert(kWgmma.geometry.tile_tokens == 8 * kWgmma.mt && kWgmma64.geometry.tile_tokens == 8 * kWgmma64.mt,
              "mt is the tile height / 8");
static_assert(kMinTileTokens <= kDecode1.geometry.tile_tokens && kMinTileTokens <= kMma4.geometry.tile_tokens &&
                  kMinTileTokens <= kWgmma.geometry.tile_tokens,
              "the plan's tile list is sized by the smallest m-tile");

}  // namespace

double wgmma_threshold(CudaGemm gemm, int cc) {
  const bool have = cc >= kWgmma.min_cc && cc == kWgmma.exactly_cc && wgmma_available(cc);
  switch (gemm) {
    case CudaGemm::automatic:
      return have ? kWgmma.min_avg_tokens : kNoWgmma;
    case CudaGemm::mma:
      return kNoWgmma;
    case CudaGemm::wgmma:
      detail::require(have,
                      "cuda_gemm (QMOE_CUDA_GEMM): \"wgmma\" needs an sm_90a build on a compute capability 9.0 "
                      "device, got ",
                      cc / 10, ".", cc % 10);
      return 0;
  }
  detail::fail("cuda_gemm: expected CudaGemm::automatic, mma or wgmma, got ", static_cast<int>(gemm));
}

const GemmVariant& pick_gemm(double avg, double wgmma_from, bool int8_tokens) {
  if (avg >= wgmma_from && int8_tokens) return kWgmmaInt8;
  if (avg >= wgmma_from) return avg <= kWgmma64.max_avg_tokens ? kWgmma64 : kWgmma;
  for (const GemmVariant* v : kByTokens)
    if (avg <= v->max_avg_tokens) return *v;
  return kMma8;
}

KSplit fc2_k_split(const GemmVariant& v, const GpuGeometry& g2, std::int64_t pairs, std::int64_t experts, int sms,
                   std::int64_t chunk, std::int64_t tokens) {
  const std::int64_t kp2 = g2.padded_cols, bm = v.geometry.tile_tokens;
  const std::int64_t blocks = ceil_div(g2.padded_rows, static_cast<std::int64_t>(v.geometry.block_rows)) *
                              std::max(std::min<std::int64_t>(pairs, experts), ceil_div(pairs, bm));
  std::int64_t splits = std::max<std::int64_t>(1, ceil_div(v.blocks_per_sm * std::int64_t{sms}, blocks));
  const std::int64_t align = v.int8_tokens ? kAct8Block : kKAlign;
  splits = std::min({splits, ceil_div(kp2, align), std::max<std::int64_t>(1, chunk / tokens), std::int64_t{16}});
  const std::int64_t split_cols = round_up(ceil_div(kp2, splits), align);
  return {static_cast<int>(ceil_div(kp2, split_cols)), split_cols};
}

}  // namespace qmoe::cuda
