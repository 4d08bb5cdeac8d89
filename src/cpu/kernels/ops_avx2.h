// Internal: driver primitives for AVX2 + FMA. Included only by *__avx2.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace qmoe::cpu {

struct OpsAvx2 {
  typedef __m256 V;
  struct Z {
    __m128i b;   // 16 zero points as bytes (4-bit: subtracted as int8)
    __m256i h;   // the same as int16 (8-bit codes minus zero need 9 bits)
  };
  static constexpr int NV = 2;             // 2 x 8 floats = the 16 rows of a column
  static constexpr int kDirectTokens = 2;  // 2 tokens x (even, odd) x 2 vectors = 8 accumulators
  static constexpr int kReuseTokens = 6;   // 6 x 2 accumulators + 2 weights + 1 broadcast <= 16 ymm
  static constexpr int kReuseFrom = 4;

  static V zero() { return _mm256_setzero_ps(); }
  static V splat(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }

  static Z zeros(const std::uint8_t* z16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(z16));
    return {b, _mm256_cvtepu8_epi16(b)};
  }
  // int8 lanes (code - zero in [-15, 15]) -> 2 x 8 floats.
  static void widen_i8(__m128i d, V* out) {
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(d));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(d, 8)));
  }
  static void decode4(const std::uint8_t* q16, const Z& z, V* even, V* odd) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q16));
    const __m128i m = _mm_set1_epi8(0x0f);
    widen_i8(_mm_sub_epi8(_mm_and_si128(q, m), z.b), even);
    widen_i8(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m), z.b), odd);
  }
  static void decode8(const std::uint8_t* q16, const Z& z, V* w) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q16));
    const __m256i d = _mm256_sub_epi16(_mm256_cvtepu8_epi16(q), z.h);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(d)));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(d, 1)));
  }
};

}  // namespace qmoe::cpu
