// bf16 activations x 8-bit weights (decoded to bf16 tiles once per call), 16 tokens x 16 rows
// per tile product. AMX-BF16.
#include "cpu/kernels/amx_bf16_driver.h"

namespace qmoe::cpu {

void gemm_bf16_q8_16x16__amx(const PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles,
                             const std::uint16_t* x, std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy,
                             void* scratch) {
  amx::gemm<8>(g, tile, ntiles, x, ldx, ntok, y, ldy, scratch);
}

}  // namespace qmoe::cpu
