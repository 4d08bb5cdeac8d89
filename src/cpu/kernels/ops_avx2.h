// Internal: driver primitives for AVX2 + FMA. Included only by *__avx2.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace qmoe::cpu {

struct OpsAvx2 {
  typedef __m256 V;
  struct Z {
    __m256 z[2];  // 2^23 + zero point, rows 0-7 and 8-15
  };
  struct Q {
    __m256i q[2];
  };
  static constexpr int NV = 2;             // 2 x 8 floats = the 16 rows of a column
  static constexpr int kDirectTokens = 2;  // 2 tokens x (even, odd) x 2 vectors = 8 accumulators
  static constexpr int kReuseTokens = 6;   // 6 x 2 accumulators + 2 weights + 1 broadcast <= 16 ymm
  static constexpr int kReuseTiles = 1;    // no registers to spare for a second tile
  static constexpr int kDirectTiles = 1;
  template <int BITS>
  static constexpr bool kLut = false;  // no table lookup: column() only

  static V zero() { return _mm256_setzero_ps(); }
  static V splat(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }

  static Z zeros(const std::uint8_t* z16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(z16));
    const __m256i magic = _mm256_set1_epi32(0x4B000000);
    return {{_mm256_castsi256_ps(_mm256_or_si256(_mm256_cvtepu8_epi32(b), magic)),
             _mm256_castsi256_ps(_mm256_or_si256(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), magic))}};
  }
  static Q group(const std::uint8_t* p64) {
    return {{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p64)),
             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p64 + 32))}};
  }
  template <int BITS, int J>
  static void column(const Q& q, const Z& z, V* w) {
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1), magic = _mm256_set1_epi32(0x4B000000);
    for (int j = 0; j < 2; ++j) {
      const __m256i c = _mm256_and_si256(_mm256_srli_epi32(q.q[j], BITS * J), mask);
      w[j] = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(c, magic)), z.z[j]);
    }
  }
};

}  // namespace qmoe::cpu
