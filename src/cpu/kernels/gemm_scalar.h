// Internal: the portable tile kernel, written so that compilers vectorize the
// loops over the NR = 16 rows of a tile. Included by exactly one translation
// unit per bit width (gemm_f32_q{4,8}_4x16__scalar.cpp).
//
// Two regimes, chosen by the number of tokens routed to the expert:
//  * few tokens (decode): codes are decoded in registers and used at once for
//    up to 2 tokens; per block the integer-offset products are summed and the
//    row scale is applied once at the end of the block.
//  * many tokens (prefill): a chunk of the tile is dequantized once into
//    scratch (scale * (code - zero), as a float weight) and reused for every
//    token, so decoding costs O(weights), not O(weights * tokens).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/kernels.h"

namespace qmoe::cpu::scalar {

// GCC/Clang vector extensions: portable source, and the compiler emits
// whatever 16-byte vector instructions the baseline ISA has (SSE2 on x86-64,
// NEON on arm64). Plain loops over the 16 rows vectorized badly (GCC picked
// the K loop and shuffled), so the 4-wide structure is spelled out.
typedef float v4f __attribute__((vector_size(16)));
typedef unsigned char v16u8 __attribute__((vector_size(16)));
typedef unsigned char v4u8 __attribute__((vector_size(4)));

constexpr int NR = 16;
constexpr int NV = NR / 4;               // v4f per tile column
constexpr int MT = 2;                    // tokens sharing one decode / one pass over a chunk
constexpr std::int64_t kChunk = 256;     // columns dequantized at once in the prefill regime
constexpr std::int64_t kReuseTokens = 4; // from this many tokens on, dequantize once and reuse

inline v4f load4(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(float* p, v4f v) { std::memcpy(p, &v, sizeof v); }
inline v4f splat(float x) { return v4f{x, x, x, x}; }

struct BlockView {
  v4f scale[NV];
  v4f zero[NV];
  const std::uint8_t* codes;
};

inline BlockView block_at(const PackGeometry& g, const std::uint8_t* tile, std::int64_t b) {
  const std::uint8_t* p = tile + b * g.block_bytes();
  BlockView v;
  std::memcpy(v.scale, p, sizeof v.scale);
  for (int j = 0; j < NV; ++j) {
    v4u8 z;
    std::memcpy(&z, p + NR * 4 + 4 * j, 4);
    v.zero[j] = __builtin_convertvector(z, v4f);
  }
  v.codes = p + NR * 5;
  return v;
}

// 16 bytes -> four v4f. Zero-extension is spelled as interleaving with zero
// (u8 -> u16 -> u32) so it maps to unpack instructions; a direct
// convertvector from bytes compiled to one scalar conversion per byte.
typedef unsigned short v8u16 __attribute__((vector_size(16)));
typedef int v4i __attribute__((vector_size(16)));
inline void widen(v16u8 q, v4f* out) {
  const v16u8 z8 = {};
  const v8u16 z16 = {};
  const v8u16 lo = (v8u16)__builtin_shufflevector(q, z8, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const v8u16 hi = (v8u16)__builtin_shufflevector(q, z8, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  out[0] = __builtin_convertvector((v4i)__builtin_shufflevector(lo, z16, 0, 8, 1, 9, 2, 10, 3, 11), v4f);
  out[1] = __builtin_convertvector((v4i)__builtin_shufflevector(lo, z16, 4, 12, 5, 13, 6, 14, 7, 15), v4f);
  out[2] = __builtin_convertvector((v4i)__builtin_shufflevector(hi, z16, 0, 8, 1, 9, 2, 10, 3, 11), v4f);
  out[3] = __builtin_convertvector((v4i)__builtin_shufflevector(hi, z16, 4, 12, 5, 13, 6, 14, 7, 15), v4f);
}

// Codes of packed position c2 (4-bit: columns 2*c2 and 2*c2+1; 8-bit: column c2), minus zero.
template <int BITS>
inline void decode(const std::uint8_t* codes, std::int64_t c2, const v4f* zero, v4f* w0, v4f* w1) {
  v16u8 q;
  std::memcpy(&q, codes + c2 * NR, sizeof q);
  if constexpr (BITS == 4) {
    widen(q & 0x0f, w0);
    widen(q >> 4, w1);
    for (int j = 0; j < NV; ++j) w0[j] -= zero[j], w1[j] -= zero[j];
  } else {
    widen(q, w0);
    for (int j = 0; j < NV; ++j) w0[j] -= zero[j];
  }
}

template <int BITS, int M>
void direct(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, float* y,
            std::int64_t ldy) {
  v4f acc[M][NV] = {};
  const std::int64_t bl = g.block_len;
  constexpr int per = BITS == 4 ? 2 : 1;  // columns per code position
  for (std::int64_t b = 0; b < g.blocks(); ++b) {
    const BlockView v = block_at(g, tile, b);
    v4f part[M][NV] = {};
    const float* xb = x + b * bl;
    for (std::int64_t c2 = 0; c2 < bl / per; ++c2) {
      v4f w0[NV], w1[NV];
      decode<BITS>(v.codes, c2, v.zero, w0, w1);
      for (int m = 0; m < M; ++m) {
        const v4f x0 = splat(xb[m * ldx + per * c2]);
        for (int j = 0; j < NV; ++j) part[m][j] += w0[j] * x0;
        if constexpr (BITS == 4) {
          const v4f x1 = splat(xb[m * ldx + 2 * c2 + 1]);
          for (int j = 0; j < NV; ++j) part[m][j] += w1[j] * x1;
        }
      }
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NV; ++j) acc[m][j] += v.scale[j] * part[m][j];
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) store4(y + m * ldy + 4 * j, acc[m][j]);
}

// y[m] += W_chunk x[m] for M tokens; W_chunk is n columns of NR floats.
template <int M>
void chunk_tokens(const float* w, std::int64_t n, const float* x, std::int64_t ldx, float* y, std::int64_t ldy) {
  v4f acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = load4(y + m * ldy + 4 * j);
  for (std::int64_t c = 0; c < n; ++c) {
    v4f wc[NV];
    for (int j = 0; j < NV; ++j) wc[j] = load4(w + c * NR + 4 * j);
    for (int m = 0; m < M; ++m) {
      const v4f xv = splat(x[m * ldx + c]);
      for (int j = 0; j < NV; ++j) acc[m][j] += wc[j] * xv;
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) store4(y + m * ldy + 4 * j, acc[m][j]);
}

template <int BITS>
void reuse(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, std::int64_t ntok,
           float* y, std::int64_t ldy, float* w) {
  for (std::int64_t t = 0; t < ntok; ++t) std::fill(y + t * ldy, y + t * ldy + NR, 0.f);
  const std::int64_t bl = g.block_len;
  constexpr int per = BITS == 4 ? 2 : 1;
  for (std::int64_t b = 0; b < g.blocks(); ++b) {
    const BlockView v = block_at(g, tile, b);
    for (std::int64_t c0 = 0; c0 < bl; c0 += kChunk) {
      const std::int64_t n = std::min(kChunk, bl - c0);
      for (std::int64_t c2 = c0 / per; c2 < (c0 + n) / per; ++c2) {
        v4f w0[NV], w1[NV];
        decode<BITS>(v.codes, c2, v.zero, w0, w1);
        float* dst = w + (c2 * per - c0) * NR;
        for (int j = 0; j < NV; ++j) store4(dst + 4 * j, v.scale[j] * w0[j]);
        if constexpr (BITS == 4)
          for (int j = 0; j < NV; ++j) store4(dst + NR + 4 * j, v.scale[j] * w1[j]);
      }
      const float* xc = x + b * bl + c0;
      std::int64_t t = 0;
      for (; t + MT <= ntok; t += MT) chunk_tokens<MT>(w, n, xc + t * ldx, ldx, y + t * ldy, ldy);
      for (; t < ntok; ++t) chunk_tokens<1>(w, n, xc + t * ldx, ldx, y + t * ldy, ldy);
    }
  }
}

template <int BITS>
void gemm(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, std::int64_t ntok,
          float* y, std::int64_t ldy, float* scratch) {
  if (ntok >= kReuseTokens) {
    reuse<BITS>(g, tile, x, ldx, ntok, y, ldy, scratch);
    return;
  }
  std::int64_t t = 0;
  for (; t + MT <= ntok; t += MT) direct<BITS, MT>(g, tile, x + t * ldx, ldx, y + t * ldy, ldy);
  if (t < ntok) direct<BITS, 1>(g, tile, x + t * ldx, ldx, y + t * ldy, ldy);
}

}  // namespace qmoe::cpu::scalar
