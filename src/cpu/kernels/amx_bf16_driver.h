// Internal: the AMX-BF16 prefill kernel (accuracy_level 3), included only by
// the *__amx.cpp translation units (compiled with AMX + AVX-512 BF16 flags).
//
// Why this shape: AMX multiplies a 16 x 32 bf16 tile of activations (16
// tokens) by a 32 x 16 bf16 tile of weights into a 16 x 16 float32 tile, ~16x
// the multiply-adds of an AVX-512 FMA per cycle. The int4/int8 weights of a
// 16-row tile are decoded K step by K step into bf16 "B" tiles (scale * (code -
// zero), rounded to bf16; the scale folded in, so no per-block epilogue), each
// used at once by up to kMaxTokenBlocks x 16 tokens whose C tiles stay in tile
// registers across all of K. (Decoding the whole tile first and multiplying
// after was slower: the 90 KiB of B tiles fell out of L1.)
//
// Tile registers: 0..5 = C (one per 16-token block), 6 = A, 7 = B.
// Activations are bf16 rows with a stride of ldx elements, zero-padded to a
// multiple of 32 columns, with at least 16 readable rows past the last token
// (the caller pads), so every A load is whole; only valid C rows are stored.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/kernels.h"
#include "cpu/kernels/ops_avx512.h"

namespace qmoe::cpu::amx {

constexpr int NR = 16;
constexpr int kMaxTokenBlocks = 6;

struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

// Configures the 8 tiles once per thread (tile configuration is thread state).
template <int Dummy>
inline void configure() {
  static thread_local bool done = false;
  if (done) return;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  done = true;
}

// Decodes a weight tile into bf16 B tiles 32 columns (one K step) at a time:
// B row kk, lane n = [W(n, k + 2kk), W(n, k + 2kk + 1)], W = scale * (code - zero)
// rounded to bf16. Walks the blocks and 64-byte code groups of packed.h in
// order; columns past the padded K are zero.
template <int BITS>
class TileDecoder {
 public:
  static constexpr std::int64_t G = 32 / BITS;  // columns per code group

  TileDecoder(const PackGeometry& g, const std::uint8_t* tile)
      : tile_(tile),
        pb_((g.block_len + G - 1) / G * G),
        nb_(g.cols / g.block_len),
        block_bytes_(NR * 5 + pb_ * NR * BITS / 8) {
    load_block();
  }

  // Writes the next 16 B rows (32 columns) to b (1 KiB).
  void step(std::uint16_t* b) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int c = 0; c < 32; c += static_cast<int>(G)) {
      __m512 w[G];
      if (blk_ < nb_) {
        const OpsAvx512::Q q = OpsAvx512::group(codes_ + grp_ * 64);
        [&]<int... J>(std::integer_sequence<int, J...>) {
          ((OpsAvx512::column<BITS, J>(q, zero_, &w[J]), w[J] = _mm512_mul_ps(w[J], scale_)), ...);
        }(std::make_integer_sequence<int, static_cast<int>(G)>{});
        if (++grp_ == pb_ / G) {
          grp_ = 0;
          if (++blk_ < nb_) load_block();
        }
      } else {
        for (auto& v : w) v = _mm512_setzero_ps();
      }
      for (int j = 0; j < static_cast<int>(G); j += 2)
        _mm512_storeu_si512(b + (c + j) * NR, _mm512_permutexvar_epi16(
                                                  interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(w[j + 1], w[j]))));
    }
  }

 private:
  void load_block() {
    const std::uint8_t* p = tile_ + blk_ * block_bytes_;
    scale_ = _mm512_loadu_ps(reinterpret_cast<const float*>(p));
    zero_ = OpsAvx512::zeros(p + NR * 4);
    codes_ = p + NR * 5;
  }

  const std::uint8_t* tile_;
  std::int64_t pb_, nb_, block_bytes_, blk_ = 0, grp_ = 0;
  __m512 scale_;
  OpsAvx512::Z zero_;
  const std::uint8_t* codes_ = nullptr;
};

template <int BITS>
void gemm(const PackGeometry& g, const std::uint8_t* tile, const std::uint16_t* x, std::int64_t ldx,
          std::int64_t ntok, float* y, std::int64_t ldy, void* scratch) {
  configure<0>();
  const std::int64_t kp = ldx;  // padded K (a multiple of 32)
  // Two 1 KiB B buffers: the next K step is decoded (vector units) while the
  // tile unit still multiplies the previous one; both stay in L1.
  auto* b = static_cast<std::uint16_t*>(scratch);
  alignas(64) float ctmp[16 * 16];
  for (std::int64_t t0 = 0; t0 < ntok; t0 += 16 * kMaxTokenBlocks) {
    const int blocks = static_cast<int>(ntok - t0 >= 16 * kMaxTokenBlocks ? kMaxTokenBlocks : (ntok - t0 + 15) / 16);
    TileDecoder<BITS> dec(g, tile);
    // Tile register numbers must be immediates: unrolled by hand over the token blocks.
#define QMOE_AMX_FOR_BLOCKS(OP) \
  do {                          \
    if (blocks > 0) OP(0);      \
    if (blocks > 1) OP(1);      \
    if (blocks > 2) OP(2);      \
    if (blocks > 3) OP(3);      \
    if (blocks > 4) OP(4);      \
    if (blocks > 5) OP(5);      \
  } while (0)
#define QMOE_AMX_ZERO(i) _tile_zero(i)
    QMOE_AMX_FOR_BLOCKS(QMOE_AMX_ZERO);
    for (std::int64_t k = 0; k < kp; k += 32) {
      std::uint16_t* bk = b + ((k / 32) & 1) * 512;
      dec.step(bk);
      _tile_loadd(7, bk, 64);
#define QMOE_AMX_DOT(i)                                                        \
  do {                                                                         \
    _tile_loadd(6, x + (t0 + 16 * (i)) * ldx + k, static_cast<int>(ldx * 2)); \
    _tile_dpbf16ps(i, 6, 7);                                                   \
  } while (0)
      QMOE_AMX_FOR_BLOCKS(QMOE_AMX_DOT);
    }
#define QMOE_AMX_STORE(i)                                                                           \
  do {                                                                                              \
    const std::int64_t tb = t0 + 16 * (i), valid = ntok - tb < 16 ? ntok - tb : 16;                 \
    if (valid == 16 && ldy == NR) {                                                                 \
      _tile_stored(i, y + tb * ldy, 64);                                                            \
    } else {                                                                                        \
      _tile_stored(i, ctmp, 64);                                                                    \
      for (std::int64_t r = 0; r < valid; ++r) std::memcpy(y + (tb + r) * ldy, ctmp + 16 * r, 64); \
    }                                                                                               \
  } while (0)
    QMOE_AMX_FOR_BLOCKS(QMOE_AMX_STORE);
#undef QMOE_AMX_STORE
#undef QMOE_AMX_DOT
#undef QMOE_AMX_ZERO
#undef QMOE_AMX_FOR_BLOCKS
  }
}

}  // namespace qmoe::cpu::amx
