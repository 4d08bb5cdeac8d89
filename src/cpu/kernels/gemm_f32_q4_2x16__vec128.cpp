// float32 activations x 4-bit weights, tiles of 16 rows, 2 tokens per decode. Portable
// 128-bit vector extensions (SSE2 on x86-64, NEON on arm64; no ISA flags).
#include "cpu/kernels/gemm_driver.h"
#include "cpu/kernels/ops_vec128.h"

namespace qmoe::cpu {

void gemm_f32_q4_2x16__vec128(const PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles, const float* x,
                              std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy, float* scratch) {
  driver::gemm<OpsVec128, 4, kF32Vec128.reuse_from>(g, tile, ntiles, x, ldx, ntok, y, ldy, scratch);
}

}  // namespace qmoe::cpu
