// float32 activations x 8-bit weights, tiles of 16 rows, 4 tokens per decode. AVX-512 F/BW/VL.
#include "cpu/kernels/gemm_driver.h"
#include "cpu/kernels/ops_avx512.h"

namespace qmoe::cpu {

void gemm_f32_q8_4x16__avx512(const PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles, const float* x,
                              std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy, float* scratch) {
  driver::gemm<OpsAvx512, 8, kF32Avx512.reuse_from>(g, tile, ntiles, x, ldx, ntok, y, ldy, scratch);
}

}  // namespace qmoe::cpu
