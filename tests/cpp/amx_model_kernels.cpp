// The AMX kernel's driver compiled against a software model of the tile
// registers (amx_model.h). This file holds kernel code only (compiled with
// AVX-512 flags, no static initialization), so a CPU without AVX-512 never
// executes any of it unless amx_model_usable() said yes.
#include <immintrin.h>

#include <cstring>

#include "amx_model.h"
#include "cpu/kernels.h"
#include "cpu/kernels/ops_avx512.h"

namespace qmoe::test::tile_model {

// Eight tiles of 16 rows x 64 bytes, per thread (the hardware's are thread state too).
struct Tiles {
  alignas(64) std::uint8_t t[8][16][64];
};
inline thread_local Tiles regs;

inline void load(int d, const void* base, long stride) {
  for (int r = 0; r < 16; ++r) std::memcpy(regs.t[d][r], static_cast<const char*>(base) + r * stride, 64);
}
inline void store(int d, void* base, long stride) {
  for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(base) + r * stride, regs.t[d][r], 64);
}
inline void zero(int d) { std::memset(regs.t[d], 0, sizeof regs.t[d]); }
inline float bf16(const std::uint8_t* p) {
  std::uint16_t h;
  std::memcpy(&h, p, 2);
  const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// C[m][n] += sum over k of A[m][2k] B[k][2n] + A[m][2k+1] B[k][2n+1] (TDPBF16PS; float
// accumulation in k order: the hardware's order is its own, the tests allow for that).
inline void dpbf16ps(int c, int a, int b) {
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc;
      std::memcpy(&acc, &regs.t[c][m][4 * n], 4);
      for (int k = 0; k < 16; ++k) {
        acc += bf16(&regs.t[a][m][4 * k]) * bf16(&regs.t[b][k][4 * n]);
        acc += bf16(&regs.t[a][m][4 * k + 2]) * bf16(&regs.t[b][k][4 * n + 2]);
      }
      std::memcpy(&regs.t[c][m][4 * n], &acc, 4);
    }
}

}  // namespace qmoe::test::tile_model

// The tile intrinsics the driver uses, redirected to the model. The driver's
// namespace is renamed so its templates are not the library's real-AMX
// instantiations (one definition rule).
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_loadconfig
#define _tile_loadd(d, base, stride) ::qmoe::test::tile_model::load(d, base, stride)
#define _tile_stored(d, base, stride) ::qmoe::test::tile_model::store(d, base, stride)
#define _tile_zero(d) ::qmoe::test::tile_model::zero(d)
#define _tile_dpbf16ps(c, a, b) ::qmoe::test::tile_model::dpbf16ps(c, a, b)
#define _tile_loadconfig(cfg) ((void)(cfg))
#define amx amx_tile_model
#include "cpu/kernels/amx_bf16_driver.h"
#undef amx

namespace qmoe::test {

void gemm_bf16_q4_model(const cpu::PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles,
                        const std::uint16_t* x, std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy,
                        void* scratch) {
  cpu::amx_tile_model::gemm<4>(g, tile, ntiles, x, ldx, ntok, y, ldy, scratch);
}
void gemm_bf16_q8_model(const cpu::PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles,
                        const std::uint16_t* x, std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy,
                        void* scratch) {
  cpu::amx_tile_model::gemm<8>(g, tile, ntiles, x, ldx, ntok, y, ldy, scratch);
}

}  // namespace qmoe::test
