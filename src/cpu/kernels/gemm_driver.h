// Internal: the tile-kernel driver, written once against a small set of
// per-ISA primitives ("Ops"). Each ISA's translation unit includes this with
// its own Ops and its own compiler flags, so the loop structure is shared and
// only the instructions differ.
//
// A tile is NR = 16 rows in "row lanes" (see packed.h): one 64-byte group holds
// the next 8 (4-bit) or 4 (8-bit) codes of every row, row r in 32-bit lane r.
// Two regimes, chosen by the number of tokens routed to the expert:
//  * few tokens (decode): each column is extracted in registers (shift, mask,
//    and the float "magic number" trick: (code | 0x4B000000) as float is
//    2^23 + code, minus 2^23 + zero gives code - zero exactly, with no
//    int->float conversion) and used at once for up to Ops::kDirectTokens
//    tokens; the row scale is applied once per block. Even and odd columns
//    accumulate separately, keeping two FMA chains per vector in flight.
//  * many tokens (prefill): a chunk of the tile is dequantized once into
//    scratch (scale * (code - zero), as float weights) and reused for every
//    token, Ops::kReuseTokens tokens per register block, so decoding costs
//    O(weights), not O(weights * tokens).
//
// Ops must provide (NV vectors V cover the 16 rows of one column):
//   V zero(); V splat(float); V load(const float*); void store(float*, V);
//   V fma(V a, V b, V c) = a * b + c; V add(V, V); V mul(V, V);
//   Z zeros(const uint8_t* z16)               -- a block's 16 zero points
//   Q group(const uint8_t* p64)               -- one 64-byte group of codes
//   template <int BITS, int J> void column(const Q&, const Z&, V* w)
//                                             -- float(code - zero) of column J of the group
//
// ODR caution: this header is compiled with different -m flags per ISA, so it
// must not emit any non-template inline function or std:: template that the
// linker could merge across ISAs (a baseline caller could then run AVX-512
// code). Everything here is a template on Ops, and only data members of
// PackGeometry are read (its member functions are inline and shared).
#pragma once

#include <cstdint>
#include <utility>

#include "cpu/kernels.h"

namespace qmoe::cpu::driver {

constexpr int NR = 16;
constexpr std::int64_t kChunk = 256;  // columns dequantized at once in the prefill regime (a multiple of 8)

// Layout arithmetic of packed.h, from PackGeometry's data members only.
template <int BITS>
constexpr std::int64_t kGroupCols = 32 / BITS;
template <int BITS>
inline std::int64_t padded_block(const PackGeometry& g) {
  return (g.block_len + kGroupCols<BITS> - 1) / kGroupCols<BITS> * kGroupCols<BITS>;
}
template <int BITS>
inline std::int64_t block_bytes(const PackGeometry& g) {
  return NR * 5 + padded_block<BITS>(g) * NR * BITS / 8;
}

template <class Ops>
struct Block {
  typename Ops::V scale[Ops::NV];
  typename Ops::Z zero;
  const std::uint8_t* codes;
};

template <class Ops, int BITS>
inline Block<Ops> block_at(const PackGeometry& g, const std::uint8_t* tile, std::int64_t b) {
  const std::uint8_t* p = tile + b * block_bytes<BITS>(g);
  Block<Ops> v;
  const float* s = reinterpret_cast<const float*>(p);  // 16-byte aligned: blocks are multiples of 16 bytes
  for (int j = 0; j < Ops::NV; ++j) v.scale[j] = Ops::load(s + j * (NR / Ops::NV));
  v.zero = Ops::zeros(p + NR * 4);
  v.codes = p + NR * 5;
  return v;
}

// Calls f(std::integral_constant<int, M>) for the M in [1, N] equal to n (1 <= n <= N):
// a run-time token count turned into a compile-time register-block size.
template <int N, class F>
inline void with_count(std::int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n == N) return f(std::integral_constant<int, N>{});
    return with_count<N - 1>(n, f);
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Calls f(std::integral_constant<int, J>) for J = 0 .. N-1, unrolled.
template <int N, class F>
inline void unroll(F&& f) {
  [&]<int... J>(std::integer_sequence<int, J...>) { (f(std::integral_constant<int, J>{}), ...); }
  (std::make_integer_sequence<int, N>{});
}

template <class Ops, int BITS, int M>
void direct(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, float* y,
            std::int64_t ldy) {
  using V = typename Ops::V;
  constexpr int NV = Ops::NV;
  constexpr int G = static_cast<int>(kGroupCols<BITS>);
  V acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = Ops::zero();
  const std::int64_t pb = padded_block<BITS>(g), nb = g.cols / g.block_len;
  for (std::int64_t b = 0; b < nb; ++b) {
    const Block<Ops> v = block_at<Ops, BITS>(g, tile, b);
    V part[2][M][NV];
    for (int p = 0; p < 2; ++p)
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < NV; ++j) part[p][m][j] = Ops::zero();
    for (std::int64_t grp = 0; grp < pb / G; ++grp) {
      const typename Ops::Q q = Ops::group(v.codes + grp * 64);
      const float* xg = x + b * pb + grp * G;
      unroll<G>([&](auto J) {
        V w[NV];
        Ops::template column<BITS, J>(q, v.zero, w);
        for (int m = 0; m < M; ++m) {
          const V xv = Ops::splat(xg[m * ldx + J]);
          for (int j = 0; j < NV; ++j) part[J % 2][m][j] = Ops::fma(w[j], xv, part[J % 2][m][j]);
        }
      });
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NV; ++j) acc[m][j] = Ops::fma(v.scale[j], Ops::add(part[0][m][j], part[1][m][j]), acc[m][j]);
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) Ops::store(y + m * ldy + j * (NR / NV), acc[m][j]);
}

// y[m] += W_chunk x[m] for M tokens; W_chunk is n columns of NR floats.
template <class Ops, int M>
void chunk_tokens(const float* w, std::int64_t n, const float* x, std::int64_t ldx, float* y, std::int64_t ldy) {
  using V = typename Ops::V;
  constexpr int NV = Ops::NV;
  V acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = Ops::load(y + m * ldy + j * (NR / NV));
  for (std::int64_t c = 0; c < n; ++c) {
    V wc[NV];
    for (int j = 0; j < NV; ++j) wc[j] = Ops::load(w + c * NR + j * (NR / NV));
    for (int m = 0; m < M; ++m) {
      const V xv = Ops::splat(x[m * ldx + c]);
      for (int j = 0; j < NV; ++j) acc[m][j] = Ops::fma(wc[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) Ops::store(y + m * ldy + j * (NR / NV), acc[m][j]);
}

template <class Ops, int BITS>
void reuse(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, std::int64_t ntok,
           float* y, std::int64_t ldy, float* w) {
  using V = typename Ops::V;
  constexpr int NV = Ops::NV, MT = Ops::kReuseTokens;
  constexpr int G = static_cast<int>(kGroupCols<BITS>);
  for (std::int64_t t = 0; t < ntok; ++t)
    for (int r = 0; r < NR; ++r) y[t * ldy + r] = 0.f;
  const std::int64_t pb = padded_block<BITS>(g), nb = g.cols / g.block_len;
  for (std::int64_t b = 0; b < nb; ++b) {
    const Block<Ops> v = block_at<Ops, BITS>(g, tile, b);
    for (std::int64_t c0 = 0; c0 < pb; c0 += kChunk) {
      const std::int64_t n = pb - c0 < kChunk ? pb - c0 : kChunk;  // a multiple of G
      for (std::int64_t grp = c0 / G; grp < (c0 + n) / G; ++grp) {
        const typename Ops::Q q = Ops::group(v.codes + grp * 64);
        float* dst = w + (grp * G - c0) * NR;
        unroll<G>([&](auto J) {
          V wj[NV];
          Ops::template column<BITS, J>(q, v.zero, wj);
          for (int j = 0; j < NV; ++j) Ops::store(dst + J * NR + j * (NR / NV), Ops::mul(v.scale[j], wj[j]));
        });
      }
      const float* xc = x + b * pb + c0;
      std::int64_t t = 0;
      for (; t + MT <= ntok; t += MT) chunk_tokens<Ops, MT>(w, n, xc + t * ldx, ldx, y + t * ldy, ldy);
      if (t < ntok)
        with_count<MT - 1>(ntok - t, [&](auto M) { chunk_tokens<Ops, M>(w, n, xc + t * ldx, ldx, y + t * ldy, ldy); });
    }
  }
}

template <class Ops, int BITS>
void gemm(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, std::int64_t ntok,
          float* y, std::int64_t ldy, float* scratch) {
  constexpr int MD = Ops::kDirectTokens;
  if (ntok >= Ops::kReuseFrom) {
    reuse<Ops, BITS>(g, tile, x, ldx, ntok, y, ldy, scratch);
    return;
  }
  std::int64_t t = 0;
  for (; t + MD <= ntok; t += MD) direct<Ops, BITS, MD>(g, tile, x + t * ldx, ldx, y + t * ldy, ldy);
  // The remainder in one pass too: every token of the expert shares one decode of the tile.
  if (t < ntok)
    with_count<MD - 1>(ntok - t, [&](auto M) { direct<Ops, BITS, M>(g, tile, x + t * ldx, ldx, y + t * ldy, ldy); });
}

}  // namespace qmoe::cpu::driver
