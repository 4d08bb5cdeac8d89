// int8 activations (dynamically quantized per 16 columns) x 8-bit weights, tiles of 16 rows,
// 2 tokens per pass. AVX2 + FMA (iops_avx2.h).
#include "cpu/kernels/igemm_driver.h"
#include "cpu/kernels/iops_avx2.h"

namespace qmoe::cpu {

void gemm_qd8_q8_2x16__avx2(const PackGeometry& g, const std::uint8_t* tile, const QuantRows& x, std::int64_t ntok,
                            float* y, std::int64_t ldy) {
  idriver::gemm<IOpsAvx2<8>, 8>(g, tile, x, ntok, y, ldy);
}

}  // namespace qmoe::cpu
