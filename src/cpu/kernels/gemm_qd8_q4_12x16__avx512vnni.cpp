// int8 activations (dynamically quantized per 16 columns) x 4-bit weights, tiles of 16 rows,
// 12 tokens per decode (IOpsAvx512Vnni::kTokens). AVX-512 VNNI (vpdpbusd).
#include "cpu/kernels/igemm_driver.h"
#include "cpu/kernels/iops_avx512vnni.h"

namespace qmoe::cpu {

void gemm_qd8_q4_12x16__avx512vnni(const PackGeometry& g, const std::uint8_t* tile, const QuantRows& x,
                                   std::int64_t ntok, float* y, std::int64_t ldy) {
  idriver::gemm<IOpsAvx512Vnni, 4>(g, tile, x, ntok, y, ldy);
}

}  // namespace qmoe::cpu
