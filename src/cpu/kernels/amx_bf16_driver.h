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
// The common case gets a cheaper decode: 4-bit, one scale per row (row-wise)
// and every zero point 8 (symmetric quantization). Then a B element is
// code - 8, an integer that bf16 holds exactly, looked up from a 32-entry word
// table (vpermw reads the low 5 bits of each word, so the table is two copies of
// the 16 values and no mask is needed): per B row two shifts, a word blend and
// the lookup, against ~10 float ops per row in the general decode. The row
// scale then multiplies the float32 results once, after all of K (more exact,
// too: the scale is not rounded to bf16 with the weight).
//
// Tile registers: 0..5 = C (one per 16-token block), 6 = A, 7 = B.
// Activations come in A-tile order ("blocked"): for each block of 16 tokens, K
// steps of 32 columns, each one 1 KiB A tile (16 rows x 32 bf16, zero-padded
// rows and columns): block b, step s at x + b * 16 * kp + s * 512, kp = padded K
// (a multiple of 32). Every A load is then one contiguous KiB, and a pass over K
// reads one sequential stream per token block. (Plain rows, 5.6 KiB apart for
// gpt-oss, made every A load touch 16 pages and 16 prefetch streams.) Only the
// valid rows of C are stored.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/kernels.h"
#include "cpu/kernels/ops_avx512.h"

namespace qmoe::cpu::amx {

constexpr int NR = kTileRows;
static_assert(NR == 16, "a weight tile's 16 rows are the 16 columns of a B tile and of a C tile");
constexpr int kMaxTokenBlocks = 6;

// Why B tiles are decoded two K steps ahead of their use: a tile load of bytes
// the core has just stored waits until those stores are written to L1, which
// happens only after they retire, in order, behind the long tile products of
// the step before; decoding step k and loading it at once therefore chained
// decode -> store -> retire -> load -> multiply every step. Two steps ahead,
// the stores have long been written when their load comes. Measured on the
// Xeon (gpt-oss-20b, T = 512, level 3): 1 thread 380 -> 155 ms, 16 threads
// 18.9-20.8 -> 17.9-19.0 ms; one step ahead 20.4, three 21.9-22.1 (the slot
// written then is the one loaded the step before).
constexpr int kDecodeAhead = 2;
constexpr int kBSlots = 4;  // K steps of B tiles in the ring (kBf16ScratchBytes in kernels.h)
static_assert(kBSlots * 2 * 1024 <= kBf16ScratchBytes);

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
  static constexpr std::int64_t G = TileLayout::kGroupCols<BITS>;  // columns per code group

  TileDecoder(const PackGeometry& g, const std::uint8_t* tile)
      : tile_(tile),
        pb_(TileLayout::padded_block<BITS>(g.block_len)),
        nb_(g.cols / g.block_len),
        block_bytes_(TileLayout::block_bytes<BITS>(g.block_len)) {
    load_block();
  }

  // Writes the next 16 B rows (32 columns) to b (1 KiB).
  void step(std::uint16_t* b) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                                6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int c = 0; c < 32; c += static_cast<int>(G)) {
      __m512 w[G];
      if (blk_ < nb_) {
        const OpsAvx512::Q q = OpsAvx512::group(codes_ + grp_ * 64);
        [&]<int... J>(std::integer_sequence<int, J...>) {
          ((OpsAvx512::column<BITS, J>(q, zero_, &w[J]), w[J] = _mm512_mul_ps(w[J], scale_)), ...);
        }
        (std::make_integer_sequence<int, static_cast<int>(G)>{});
        if (++grp_ == pb_ / G) {
          grp_ = 0;
          if (++blk_ < nb_) load_block();
        }
      } else {
        for (auto& v : w) v = _mm512_setzero_ps();
      }
      for (int j = 0; j < static_cast<int>(G); j += 2)
        _mm512_storeu_si512(
            b + (c + j) * NR,
            _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(w[j + 1], w[j]))));
    }
  }

 private:
  void load_block() {
    const std::uint8_t* p = tile_ + blk_ * block_bytes_;
    scale_ = _mm512_loadu_ps(reinterpret_cast<const float*>(p + TileLayout::kScalesOffset));
    zero_ = OpsAvx512::zeros(p + TileLayout::kZerosOffset);
    codes_ = p + TileLayout::kCodesOffset;
  }

  const std::uint8_t* tile_;
  std::int64_t pb_, nb_, block_bytes_, blk_ = 0, grp_ = 0;
  __m512 scale_;
  OpsAvx512::Z zero_;
  const std::uint8_t* codes_ = nullptr;
};

// The symmetric row-wise 4-bit decoder: B row kk, lane n = [code(n, 2kk) - 8, code(n, 2kk + 1) - 8] as bf16.
class SymmetricQ4Decoder {
 public:
  static constexpr std::int64_t G = TileLayout::kGroupCols<4>;  // columns per code group

  // True when the tile can use it: 4-bit, row-wise, all 16 zero points 8.
  static bool applies(const PackGeometry& g, const std::uint8_t* tile) {
    if (g.bits != 4 || g.block_len != g.cols) return false;
    const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + TileLayout::kZerosOffset));
    return _mm_movemask_epi8(_mm_cmpeq_epi8(z, _mm_set1_epi8(8))) == 0xffff;
  }

  SymmetricQ4Decoder(const PackGeometry& g, const std::uint8_t* tile)
      : codes_(tile + TileLayout::kCodesOffset), groups_((g.block_len + G - 1) / G) {}

  void step(std::uint16_t* b) {
    // bf16 of v - 8 for v = 0..15, twice: bf16(n) for small integers n is the float's top half.
    const __m512i table = _mm512_set_epi16(
        0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,  //
        static_cast<short>(0xBF80), static_cast<short>(0xC000), static_cast<short>(0xC040), static_cast<short>(0xC080),
        static_cast<short>(0xC0A0), static_cast<short>(0xC0C0), static_cast<short>(0xC0E0),
        static_cast<short>(0xC100),                                      //
        0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,  //
        static_cast<short>(0xBF80), static_cast<short>(0xC000), static_cast<short>(0xC040), static_cast<short>(0xC080),
        static_cast<short>(0xC0A0), static_cast<short>(0xC0C0), static_cast<short>(0xC0E0), static_cast<short>(0xC100));
    constexpr __mmask32 kHigh = 0xAAAAAAAAu;  // odd words: the high half of each lane
    for (int c = 0; c < 32; c += static_cast<int>(G), b += 4 * NR * 2) {
      if (grp_ >= groups_) {
        for (int i = 0; i < 4; ++i) _mm512_storeu_si512(b + i * NR * 2, _mm512_setzero_si512());
        continue;
      }
      const __m512i q = _mm512_loadu_si512(codes_ + 64 * grp_++);
      // Byte i of a lane holds columns 8g + 2i (low nibble) and 8g + 2i + 1 (high nibble):
      // the low nibble goes to bits 0..3 of the lane, the high nibble to bits 16..19.
      _mm512_storeu_si512(b,
                          _mm512_permutexvar_epi16(_mm512_mask_blend_epi16(kHigh, q, _mm512_slli_epi32(q, 12)), table));
      _mm512_storeu_si512(b + NR * 2,
                          _mm512_permutexvar_epi16(
                              _mm512_mask_blend_epi16(kHigh, _mm512_srli_epi32(q, 8), _mm512_slli_epi32(q, 4)), table));
      _mm512_storeu_si512(
          b + 2 * NR * 2,
          _mm512_permutexvar_epi16(_mm512_mask_blend_epi16(kHigh, _mm512_srli_epi32(q, 16), _mm512_srli_epi32(q, 4)),
                                   table));
      _mm512_storeu_si512(
          b + 3 * NR * 2,
          _mm512_permutexvar_epi16(_mm512_mask_blend_epi16(kHigh, _mm512_srli_epi32(q, 24), _mm512_srli_epi32(q, 12)),
                                   table));
    }
  }

 private:
  const std::uint8_t* codes_;
  std::int64_t groups_, grp_ = 0;
};

template <class Decoder>
void gemm_with(const Decoder& fresh, const std::uint16_t* x, std::int64_t ldx, std::int64_t ntok, float* y,
               std::int64_t ldy, void* scratch) {
  const std::int64_t kp = ldx;  // padded K (a multiple of 32)
  // B tiles are decoded kDecodeAhead K steps before their tile load, into a
  // ring of kBSlots 1 KiB buffers that stays in L1 (see kDecodeAhead).
  auto* b = static_cast<std::uint16_t*>(scratch);
  alignas(64) float ctmp[16 * 16];
  for (std::int64_t t0 = 0; t0 < ntok; t0 += 16 * kMaxTokenBlocks) {
    const int blocks = static_cast<int>(ntok - t0 >= 16 * kMaxTokenBlocks ? kMaxTokenBlocks : (ntok - t0 + 15) / 16);
    Decoder dec = fresh;
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
    const std::int64_t nsteps = kp / 32;
    std::int64_t decoded = 0;
    auto decode = [&] { dec.step(b + (decoded++ % kBSlots) * 512); };
    while (decoded < std::min<std::int64_t>(kDecodeAhead, nsteps)) decode();
    for (std::int64_t k = 0; k < kp; k += 32) {
      if (decoded < nsteps) decode();
      _tile_loadd(7, b + ((k / 32) % kBSlots) * 512, 64);
#define QMOE_AMX_DOT(i)                                     \
  do {                                                      \
    _tile_loadd(6, x + (t0 + 16 * (i)) * ldx + k * 16, 64); \
    _tile_dpbf16ps(i, 6, 7);                                \
  } while (0)
      QMOE_AMX_FOR_BLOCKS(QMOE_AMX_DOT);
    }
#define QMOE_AMX_STORE(i)                                                                          \
  do {                                                                                             \
    const std::int64_t tb = t0 + 16 * (i), valid = ntok - tb < 16 ? ntok - tb : 16;                \
    if (valid == 16 && ldy == NR) {                                                                \
      _tile_stored(i, y + tb * ldy, 64);                                                           \
    } else {                                                                                       \
      _tile_stored(i, ctmp, 64);                                                                   \
      for (std::int64_t r = 0; r < valid; ++r) std::memcpy(y + (tb + r) * ldy, ctmp + 16 * r, 64); \
    }                                                                                              \
  } while (0)
    QMOE_AMX_FOR_BLOCKS(QMOE_AMX_STORE);
#undef QMOE_AMX_STORE
#undef QMOE_AMX_DOT
#undef QMOE_AMX_ZERO
#undef QMOE_AMX_FOR_BLOCKS
  }
}

// Two consecutive weight tiles (32 rows) at once: per K step both B tiles are
// decoded and each A tile (16 tokens) feeds two products, halving the
// activation traffic per product, which is what bounds the single-tile loop
// (A tiles stream from L2: ~1 KiB per 16-cycle product). Tile registers:
// C 0..3 = (token block 0, tile 0), (0, 1), (1, 0), (1, 1); A 4, 5; B 6, 7.
// y rows hold 32 floats (tile 0's rows, then tile 1's).
template <class Decoder>
void gemm_pair_with(const Decoder& fresh0, const Decoder& fresh1, const std::uint16_t* x, std::int64_t ldx,
                    std::int64_t ntok, float* y, std::int64_t ldy, void* scratch) {
  const std::int64_t kp = ldx;  // padded K (a multiple of 32)
  // Per K step two B tiles (2 KiB), decoded kDecodeAhead steps before their
  // tile loads into a ring of kBSlots steps (8 KiB of scratch). The same
  // reasoning as the single-tile loop; not yet timed on the Xeon (> 96 tokens
  // per expert: T = 4096 at gpt-oss shape).
  auto* b = static_cast<std::uint16_t*>(scratch);
  alignas(64) float ctmp[16 * 16];
  const int ldy_bytes = static_cast<int>(ldy * 4);
  for (std::int64_t t0 = 0; t0 < ntok; t0 += 32) {
    const bool two = ntok - t0 > 16;
    Decoder d0 = fresh0, d1 = fresh1;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const std::uint16_t* x0 = x + t0 * ldx;
    const std::uint16_t* x1 = x0 + 16 * ldx;
    const std::int64_t nsteps = kp / 32;
    std::int64_t decoded = 0;
    auto decode = [&] {
      std::uint16_t* bd = b + (decoded++ % kBSlots) * 1024;
      d0.step(bd);
      d1.step(bd + 512);
    };
    while (decoded < std::min<std::int64_t>(kDecodeAhead, nsteps)) decode();
    for (std::int64_t k = 0; k < kp; k += 32) {
      if (decoded < nsteps) decode();
      const std::uint16_t* bk = b + ((k / 32) % kBSlots) * 1024;
      _tile_loadd(6, bk, 64);
      _tile_loadd(7, bk + 512, 64);
      _tile_loadd(4, x0 + k * 16, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (two) {
        _tile_loadd(5, x1 + k * 16, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
#define QMOE_AMX_STORE2(i, block, col)                                                                     \
  do {                                                                                                     \
    const std::int64_t tb = t0 + 16 * (block), valid = ntok - tb < 16 ? ntok - tb : 16;                    \
    if (valid == 16) {                                                                                     \
      _tile_stored(i, y + tb * ldy + (col), ldy_bytes);                                                    \
    } else {                                                                                               \
      _tile_stored(i, ctmp, 64);                                                                           \
      for (std::int64_t r = 0; r < valid; ++r) std::memcpy(y + (tb + r) * ldy + (col), ctmp + 16 * r, 64); \
    }                                                                                                      \
  } while (0)
    QMOE_AMX_STORE2(0, 0, 0);
    QMOE_AMX_STORE2(1, 0, 16);
    if (two) {
      QMOE_AMX_STORE2(2, 1, 0);
      QMOE_AMX_STORE2(3, 1, 16);
    }
#undef QMOE_AMX_STORE2
  }
}

// y[t * ldy + 16 * j + r] = W_j x_t for the `ntiles` (1 or 2) consecutive tiles j at `tile`.
template <int BITS>
void gemm(const PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles, const std::uint16_t* x,
          std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy, void* scratch) {
  configure<0>();
  // B tiles on 64-byte boundaries (the caller's scratch has the slack): one cache line per tile row.
  scratch = static_cast<std::uint8_t*>(scratch) + (64 - reinterpret_cast<std::uintptr_t>(scratch) % 64) % 64;
  const std::int64_t tile_bytes = g.cols / g.block_len * TileLayout::block_bytes<BITS>(g.block_len);
  const std::uint8_t* tile1 = tile + tile_bytes;
  // Up to 16 * kMaxTokenBlocks tokens, one tile at a time decodes each B tile once for all
  // of them, which measured faster than pairs (whose 32-token passes decode every
  // 32 tokens): 64 tokens per expert 19-20 ms vs 21-22 ms, 512 tokens 205-225 ms vs
  // 168-192 ms (gpt-oss-20b T = 512 and 4096, 16 threads).
  if (ntiles == 2 && ntok <= 16 * kMaxTokenBlocks) {
    gemm<BITS>(g, tile, 1, x, ldx, ntok, y, ldy, scratch);
    gemm<BITS>(g, tile1, 1, x, ldx, ntok, y + 16, ldy, scratch);
    return;
  }
  bool symmetric = BITS == 4 && SymmetricQ4Decoder::applies(g, tile);
  if (ntiles == 2) symmetric = symmetric && SymmetricQ4Decoder::applies(g, tile1);
  if (symmetric) {
    if (ntiles == 2)
      gemm_pair_with(SymmetricQ4Decoder(g, tile), SymmetricQ4Decoder(g, tile1), x, ldx, ntok, y, ldy, scratch);
    else
      gemm_with(SymmetricQ4Decoder(g, tile), x, ldx, ntok, y, ldy, scratch);
    // The row scales, once, on the float32 results.
    for (std::int64_t j = 0; j < ntiles; ++j) {
      const __m512 scale =
          _mm512_loadu_ps(reinterpret_cast<const float*>(tile + j * tile_bytes + TileLayout::kScalesOffset));
      for (std::int64_t t = 0; t < ntok; ++t)
        _mm512_storeu_ps(y + t * ldy + 16 * j, _mm512_mul_ps(scale, _mm512_loadu_ps(y + t * ldy + 16 * j)));
    }
  } else if (ntiles == 2) {
    gemm_pair_with(TileDecoder<BITS>(g, tile), TileDecoder<BITS>(g, tile1), x, ldx, ntok, y, ldy, scratch);
  } else {
    gemm_with(TileDecoder<BITS>(g, tile), x, ldx, ntok, y, ldy, scratch);
  }
}

}  // namespace qmoe::cpu::amx
