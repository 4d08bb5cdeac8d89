// float32 activations x 8-bit weights, tiles of 16 rows, 2 tokens per decode. AVX2 + FMA.
#include "cpu/kernels/gemm_driver.h"
#include "cpu/kernels/ops_avx2.h"

namespace qmoe::cpu {

void gemm_f32_q8_2x16__avx2(const PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles, const float* x,
                            std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy, float* scratch) {
  driver::gemm<OpsAvx2, 8, kF32Avx2.reuse_from>(g, tile, ntiles, x, ldx, ntok, y, ldy, scratch);
}

}  // namespace qmoe::cpu
