// Internal: driver primitives for AVX-512 (F + BW + VL + DQ). Included only by *__avx512.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace qmoe::cpu {

struct OpsAvx512 {
  typedef __m512 V;
  struct Z {
    __m128i b;   // 16 zero points as bytes (4-bit: subtracted as int8)
    __m512i d;   // as int32 (8-bit)
  };
  static constexpr int NV = 1;              // one zmm = the 16 rows of a column
  static constexpr int kDirectTokens = 4;   // 4 tokens x (even, odd) = 8 independent FMA chains
  static constexpr int kReuseTokens = 12;   // 12 accumulators + weight + broadcast, of 32 zmm
  static constexpr int kReuseFrom = 8;

  static V zero() { return _mm512_setzero_ps(); }
  static V splat(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }

  static Z zeros(const std::uint8_t* z16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(z16));
    return {b, _mm512_cvtepu8_epi32(b)};
  }
  static void decode4(const std::uint8_t* q16, const Z& z, V* even, V* odd) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q16));
    const __m128i m = _mm_set1_epi8(0x0f);
    even[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(q, m), z.b)));
    odd[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m), z.b)));
  }
  static void decode8(const std::uint8_t* q16, const Z& z, V* w) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q16));
    w[0] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(q), z.d));
  }
};

}  // namespace qmoe::cpu
