// Internal: driver primitives for AVX-512 (F + BW + VL + DQ). Included only by *__avx512.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace qmoe::cpu {

struct OpsAvx512 {
  typedef __m512 V;
  struct Z {
    __m512 z;    // 2^23 + zero point, per row
    __m512 lut;  // float(i - zero of row 0) for i = 0..15
    bool uniform;
  };
  struct Q {
    __m512i q;
  };
  static constexpr int NV = 1;              // one zmm = the 16 rows of a column
  static constexpr int kDirectTokens = 4;   // 4 tokens x (even, odd) = 8 independent FMA chains
  static constexpr int kDirectTiles = 1;    // one sequential weight stream: decode is bandwidth-bound, and
                                            // two tiles' streams at once measured slower (T=1) than one
  static constexpr int kReuseTokens = 12;   // 12 tokens x 2 tiles = 24 accumulators + 2 weights, of 32 zmm:
  static constexpr int kReuseTiles = 2;     // 14 loads (2 weights, 12 broadcasts) per 24 FMAs
  static constexpr int kReuseFrom = 32;     // direct keeps up with reuse to ~48 tokens (measured)
  template <int BITS>
  static constexpr bool kLut = BITS == 4;

  static V zero() { return _mm512_setzero_ps(); }
  static V splat(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }

  static Z zeros(const std::uint8_t* z16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(z16));
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return {_mm512_castsi512_ps(_mm512_or_si512(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(0x4B000000))),
            _mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(z16[0]))),
            _mm_cmpeq_epi8_mask(b, _mm_broadcastb_epi8(b)) == 0xFFFF};
  }
  static bool uniform(const Z& z) { return z.uniform; }
  static Q group(const std::uint8_t* p64) { return {_mm512_loadu_si512(p64)}; }
  template <int BITS, int J>
  static void column(const Q& q, const Z& z, V* w) {
    // (lane >> shift) & mask | 2^23 in one ternary-logic op: imm 0xEA = (A & B) | C.
    const __m512i c = _mm512_ternarylogic_epi32(_mm512_srli_epi32(q.q, BITS * J), _mm512_set1_epi32((1 << BITS) - 1),
                                                _mm512_set1_epi32(0x4B000000), 0xEA);
    w[0] = _mm512_sub_ps(_mm512_castsi512_ps(c), z.z);
  }
  // 4-bit: vpermps reads only the low 4 bits of each 32-bit index, so no mask is needed.
  template <int J>
  static void column_lut(const Q& q, const Z& z, V* w) {
    w[0] = _mm512_permutexvar_ps(J == 0 ? q.q : _mm512_srli_epi32(q.q, 4 * J), z.lut);
  }
};

}  // namespace qmoe::cpu
