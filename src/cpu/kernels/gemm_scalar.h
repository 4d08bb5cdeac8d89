// Internal: the portable tile kernel, written so that compilers vectorize the
// loops over the NR = 16 rows of a tile. Included by exactly one translation
// unit per bit width (gemm_f32_q{4,8}_4x16__scalar.cpp).
//
// Two regimes, chosen by the number of tokens routed to the expert:
//  * few tokens (decode): codes are decoded in registers and used at once for
//    up to 4 tokens; per block the integer-offset products are summed and the
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

constexpr int NR = 16;
constexpr int MT = 4;                   // tokens sharing one decode
constexpr std::int64_t kChunk = 256;    // columns dequantized at once in the prefill regime
constexpr std::int64_t kReuseTokens = 8;

struct BlockView {
  float scale[NR];
  float zero[NR];
  const std::uint8_t* codes;
};

inline BlockView block_at(const PackGeometry& g, const std::uint8_t* tile, std::int64_t b) {
  const std::uint8_t* p = tile + b * g.block_bytes();
  BlockView v;
  std::memcpy(v.scale, p, sizeof v.scale);
  for (int r = 0; r < NR; ++r) v.zero[r] = static_cast<float>(p[NR * 4 + r]);
  v.codes = p + NR * 5;
  return v;
}

// Codes of column c (relative to the block) of the NR rows, minus zero.
template <int BITS>
inline void decode_column(const std::uint8_t* codes, std::int64_t c, const float* zero, float* out) {
  if constexpr (BITS == 4) {
    const std::uint8_t* q = codes + (c / 2) * NR;
    const int shift = (c % 2) * 4;
    for (int r = 0; r < NR; ++r) out[r] = static_cast<float>((q[r] >> shift) & 0x0f) - zero[r];
  } else {
    const std::uint8_t* q = codes + c * NR;
    for (int r = 0; r < NR; ++r) out[r] = static_cast<float>(q[r]) - zero[r];
  }
}

template <int BITS, int M>
void direct(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, float* y,
            std::int64_t ldy) {
  float acc[M][NR] = {};
  const std::int64_t bl = g.block_len;
  for (std::int64_t b = 0; b < g.blocks(); ++b) {
    const BlockView v = block_at(g, tile, b);
    float part[M][NR] = {};
    const float* xb = x + b * bl;
    if constexpr (BITS == 4) {
      for (std::int64_t c2 = 0; c2 < bl / 2; ++c2) {
        const std::uint8_t* q = v.codes + c2 * NR;
        float lo[NR], hi[NR];
        for (int r = 0; r < NR; ++r) {
          lo[r] = static_cast<float>(q[r] & 0x0f) - v.zero[r];
          hi[r] = static_cast<float>(q[r] >> 4) - v.zero[r];
        }
        for (int m = 0; m < M; ++m) {
          const float x0 = xb[m * ldx + 2 * c2], x1 = xb[m * ldx + 2 * c2 + 1];
          for (int r = 0; r < NR; ++r) part[m][r] += lo[r] * x0 + hi[r] * x1;
        }
      }
    } else {
      for (std::int64_t c = 0; c < bl; ++c) {
        float w[NR];
        decode_column<8>(v.codes, c, v.zero, w);
        for (int m = 0; m < M; ++m) {
          const float x0 = xb[m * ldx + c];
          for (int r = 0; r < NR; ++r) part[m][r] += w[r] * x0;
        }
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < NR; ++r) acc[m][r] += v.scale[r] * part[m][r];
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = acc[m][r];
}

template <int M>
void chunk_tokens(const float* w, std::int64_t n, const float* x, std::int64_t ldx, float* y, std::int64_t ldy) {
  float acc[M][NR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = y[m * ldy + r];
  for (std::int64_t c = 0; c < n; ++c)
    for (int m = 0; m < M; ++m) {
      const float xv = x[m * ldx + c];
      for (int r = 0; r < NR; ++r) acc[m][r] += w[c * NR + r] * xv;
    }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = acc[m][r];
}

template <int BITS>
void reuse(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx, std::int64_t ntok,
           float* y, std::int64_t ldy, float* w) {
  for (std::int64_t t = 0; t < ntok; ++t) std::fill(y + t * ldy, y + t * ldy + NR, 0.f);
  const std::int64_t bl = g.block_len;
  for (std::int64_t b = 0; b < g.blocks(); ++b) {
    const BlockView v = block_at(g, tile, b);
    for (std::int64_t c0 = 0; c0 < bl; c0 += kChunk) {
      const std::int64_t n = std::min(kChunk, bl - c0);
      for (std::int64_t c = 0; c < n; ++c) {
        float q[NR];
        decode_column<BITS>(v.codes, c0 + c, v.zero, q);
        for (int r = 0; r < NR; ++r) w[c * NR + r] = v.scale[r] * q[r];
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
  for (; t + 4 <= ntok; t += 4) direct<BITS, 4>(g, tile, x + t * ldx, ldx, y + t * ldy, ldy);
  switch (ntok - t) {
    case 3: direct<BITS, 3>(g, tile, x + t * ldx, ldx, y + t * ldy, ldy); break;
    case 2: direct<BITS, 2>(g, tile, x + t * ldx, ldx, y + t * ldy, ldy); break;
    case 1: direct<BITS, 1>(g, tile, x + t * ldx, ldx, y + t * ldy, ldy); break;
    default: break;
  }
}

}  // namespace qmoe::cpu::scalar
