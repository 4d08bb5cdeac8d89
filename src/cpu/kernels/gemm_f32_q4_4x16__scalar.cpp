// float32 activations x 4-bit weights, tiles of 16 rows, up to 4 tokens per decode. Portable C++.
#include "cpu/kernels/gemm_scalar.h"

namespace qmoe::cpu {

void gemm_f32_q4_4x16__scalar(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx,
                              std::int64_t ntok, float* y, std::int64_t ldy, float* scratch) {
  scalar::gemm<4>(g, tile, x, ldx, ntok, y, ldy, scratch);
}

}  // namespace qmoe::cpu
