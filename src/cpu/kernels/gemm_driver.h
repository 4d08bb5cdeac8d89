// Internal: the tile-kernel driver, written once against a small set of
// per-ISA primitives ("Ops"). Each ISA's translation unit includes this with
// its own Ops and its own compiler flags, so the loop structure is shared and
// only the instructions differ.
//
// A tile is NR = 16 rows (see packed.h). Two regimes, chosen by the number of
// tokens routed to the expert:
//  * few tokens (decode): codes are decoded in registers and used at once for
//    up to Ops::kDirectTokens tokens; the integer offset (code - zero) is
//    multiplied into per-block partial sums and the row scale is applied once
//    per block. Separate partial sums for even and odd columns keep two FMA
//    chains per vector in flight.
//  * many tokens (prefill): a chunk of the tile is dequantized once into
//    scratch (scale * (code - zero), as float weights) and reused for every
//    token, Ops::kReuseTokens tokens per register block, so decoding costs
//    O(weights), not O(weights * tokens).
//
// Ops must provide (NV vectors V cover the 16 rows of one column):
//   V zero(); V splat(float); V load(const float*); void store(float*, V);
//   V fma(V a, V b, V c) = a * b + c; V add(V, V); V mul(V, V);
//   Z zeros(const uint8_t* z16)            -- the 16 zero points of a block
//   void decode4(const uint8_t* q16, Z, V* even, V* odd)   -- float(code - zero), 4-bit
//   void decode8(const uint8_t* q16, Z, V* w)              -- float(code - zero), 8-bit
//
// ODR caution: this header is compiled with different -m flags per ISA, so it
// must not emit any non-template inline function or std:: template that the
// linker could merge across ISAs (a baseline caller could then run AVX-512
// code). Everything here is a template on Ops, and only data members of
// PackGeometry are read (its member functions are inline and shared).
#pragma once

#include <cstdint>

#include "cpu/kernels.h"

namespace qmoe::cpu::driver {

constexpr int NR = 16;
constexpr std::int64_t kChunk = 256;  // columns dequantized at once in the prefill regime

template <class Ops>
struct Block {
  typename Ops::V scale[Ops::NV];
  typename Ops::Z zero;
  const std::uint8_t* codes;
};

// Layout arithmetic of packed.h, from PackGeometry's data members only.
template <class Ops>
inline std::int64_t block_bytes(const PackGeometry& g) {
  return NR * 5 + g.block_len * NR * g.bits / 8;
}
template <class Ops>
inline std::int64_t blocks(const PackGeometry& g) {
  return g.cols / g.block_len;
}

template <class Ops>
inline Block<Ops> block_at(const PackGeometry& g, const std::uint8_t* tile, std::int64_t b) {
  const std::uint8_t* p = tile + b * block_bytes<Ops>(g);
  Block<Ops> v;
  const float* s = reinterpret_cast<const float*>(p);  // 16-byte aligned: blocks are multiples of 16 bytes
  for (int j = 0; j < Ops::NV; ++j) v.scale[j] = Ops::load(s + j * (NR / Ops::NV));
  v.zero = Ops::zeros(p + NR * 4);
  v.codes = p + NR * 5;
  return v;
}

template <class Ops, int BITS, int M>
void direct(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, float* y,
            std::int64_t ldy) {
  using V = typename Ops::V;
  constexpr int NV = Ops::NV;
  V acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = Ops::zero();
  const std::int64_t bl = g.block_len;
  for (std::int64_t b = 0; b < blocks<Ops>(g); ++b) {
    const Block<Ops> v = block_at<Ops>(g, tile, b);
    V even[M][NV], odd[M][NV];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NV; ++j) even[m][j] = Ops::zero(), odd[m][j] = Ops::zero();
    const float* xb = x + b * bl;
    if constexpr (BITS == 4) {
      for (std::int64_t c2 = 0; c2 < bl / 2; ++c2) {
        V w0[NV], w1[NV];
        Ops::decode4(v.codes + c2 * NR, v.zero, w0, w1);
        for (int m = 0; m < M; ++m) {
          const V x0 = Ops::splat(xb[m * ldx + 2 * c2]), x1 = Ops::splat(xb[m * ldx + 2 * c2 + 1]);
          for (int j = 0; j < NV; ++j) even[m][j] = Ops::fma(w0[j], x0, even[m][j]);
          for (int j = 0; j < NV; ++j) odd[m][j] = Ops::fma(w1[j], x1, odd[m][j]);
        }
      }
    } else {
      std::int64_t c = 0;
      for (; c + 2 <= bl; c += 2) {
        V w0[NV], w1[NV];
        Ops::decode8(v.codes + c * NR, v.zero, w0);
        Ops::decode8(v.codes + (c + 1) * NR, v.zero, w1);
        for (int m = 0; m < M; ++m) {
          const V x0 = Ops::splat(xb[m * ldx + c]), x1 = Ops::splat(xb[m * ldx + c + 1]);
          for (int j = 0; j < NV; ++j) even[m][j] = Ops::fma(w0[j], x0, even[m][j]);
          for (int j = 0; j < NV; ++j) odd[m][j] = Ops::fma(w1[j], x1, odd[m][j]);
        }
      }
      for (; c < bl; ++c) {  // odd row-wise K at 8 bits
        V w0[NV];
        Ops::decode8(v.codes + c * NR, v.zero, w0);
        for (int m = 0; m < M; ++m) {
          const V x0 = Ops::splat(xb[m * ldx + c]);
          for (int j = 0; j < NV; ++j) even[m][j] = Ops::fma(w0[j], x0, even[m][j]);
        }
      }
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NV; ++j) acc[m][j] = Ops::fma(v.scale[j], Ops::add(even[m][j], odd[m][j]), acc[m][j]);
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

template <class Ops, int M>
void chunk_tail(const float* w, std::int64_t n, const float* x, std::int64_t ldx, std::int64_t ntok, float* y,
                std::int64_t ldy) {
  if constexpr (M > 1) {
    if (ntok == M) return chunk_tokens<Ops, M>(w, n, x, ldx, y, ldy);
    return chunk_tail<Ops, M - 1>(w, n, x, ldx, ntok, y, ldy);
  } else {
    chunk_tokens<Ops, 1>(w, n, x, ldx, y, ldy);
  }
}

template <class Ops, int BITS>
void reuse(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, std::int64_t ntok,
           float* y, std::int64_t ldy, float* w) {
  using V = typename Ops::V;
  constexpr int NV = Ops::NV, MT = Ops::kReuseTokens;
  for (std::int64_t t = 0; t < ntok; ++t)
    for (int r = 0; r < NR; ++r) y[t * ldy + r] = 0.f;
  const std::int64_t bl = g.block_len;
  for (std::int64_t b = 0; b < blocks<Ops>(g); ++b) {
    const Block<Ops> v = block_at<Ops>(g, tile, b);
    for (std::int64_t c0 = 0; c0 < bl; c0 += kChunk) {
      const std::int64_t n = bl - c0 < kChunk ? bl - c0 : kChunk;
      if constexpr (BITS == 4) {
        for (std::int64_t c2 = c0 / 2; c2 < (c0 + n) / 2; ++c2) {
          V w0[NV], w1[NV];
          Ops::decode4(v.codes + c2 * NR, v.zero, w0, w1);
          float* dst = w + (2 * c2 - c0) * NR;
          for (int j = 0; j < NV; ++j) Ops::store(dst + j * (NR / NV), Ops::mul(v.scale[j], w0[j]));
          for (int j = 0; j < NV; ++j) Ops::store(dst + NR + j * (NR / NV), Ops::mul(v.scale[j], w1[j]));
        }
      } else {
        for (std::int64_t c = c0; c < c0 + n; ++c) {
          V w0[NV];
          Ops::decode8(v.codes + c * NR, v.zero, w0);
          for (int j = 0; j < NV; ++j) Ops::store(w + (c - c0) * NR + j * (NR / NV), Ops::mul(v.scale[j], w0[j]));
        }
      }
      const float* xc = x + b * bl + c0;
      std::int64_t t = 0;
      for (; t + MT <= ntok; t += MT) chunk_tokens<Ops, MT>(w, n, xc + t * ldx, ldx, y + t * ldy, ldy);
      if (t < ntok) chunk_tail<Ops, MT - 1>(w, n, xc + t * ldx, ldx, ntok - t, y + t * ldy, ldy);
    }
  }
}

template <class Ops, int BITS, int M>
void direct_tail(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, std::int64_t ntok,
                 float* y, std::int64_t ldy) {
  if constexpr (M > 1) {
    if (ntok == M) return direct<Ops, BITS, M>(g, tile, x, ldx, y, ldy);
    return direct_tail<Ops, BITS, M - 1>(g, tile, x, ldx, ntok, y, ldy);
  } else {
    direct<Ops, BITS, 1>(g, tile, x, ldx, y, ldy);
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
  if (t < ntok) direct_tail<Ops, BITS, MD - 1>(g, tile, x + t * ldx, ldx, ntok - t, y + t * ldy, ldy);
}

}  // namespace qmoe::cpu::driver
