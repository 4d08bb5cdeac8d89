// int8 activations (dynamically quantized per 16 columns) x 4-bit weights, tiles of 16 rows,
// 4 tokens per decode. Plain C++.
#include "cpu/kernels/igemm_driver.h"
#include "cpu/kernels/iops_scalar.h"

namespace qmoe::cpu {

void gemm_qd8_q4_4x16__scalar(const PackGeometry& g, const std::uint8_t* tile, const QuantRows& x, std::int64_t ntok,
                              float* y, std::int64_t ldy) {
  idriver::gemm<IOpsScalar, 4>(g, tile, x, ntok, y, ldy);
}

}  // namespace qmoe::cpu
