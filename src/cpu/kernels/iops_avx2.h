// Internal: int8-activation primitives for AVX2 (igemm_driver.h's IOps), 16
// rows in two 8-lane vectors. AVX2 has no u8 x s8 -> s32 dot product: 4-bit
// codes (at most 15) go through vpmaddubsw, whose pair sums (at most 2 * 15 *
// 127) cannot saturate, then vpmaddwd by ones; 8-bit codes (up to 255, where
// vpmaddubsw would saturate) are widened to 16 bits and multiplied by vpmaddwd.
// Both are exact, and the float steps are the fused operations of
// iops_scalar.h, so the bits are those of every other table.
// Included only by *__avx2.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace qmoe::cpu {

template <int BITS>
struct IOpsAvx2 {
  typedef __m256i I;
  typedef __m256 F;
  struct IZ {
    __m256 z[2];
  };
  static constexpr int NV = 2;
  // 2 tokens x 2 vectors of int and of float accumulators, the split codes and
  // the broadcast activations fit the 16 ymm registers.
  static constexpr int kTokens = 2;

  static I izero() { return _mm256_setzero_si256(); }
  static F fzero() { return _mm256_setzero_ps(); }
  template <int B>
  static void split(const std::uint8_t* p64, I (*parts)[NV]) {
    static_assert(B == BITS, "one bit width per instantiation");
    for (int j = 0; j < NV; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p64 + 32 * j));
      if constexpr (BITS == 4) {
        const __m256i mask = _mm256_set1_epi8(0x0f);
        parts[0][j] = _mm256_and_si256(w, mask);
        parts[1][j] = _mm256_and_si256(_mm256_srli_epi32(w, 4), mask);
      } else {
        parts[0][j] = w;
      }
    }
  }
  // acc += the 4 byte products of each lane's codes with the activations x4[0..4).
  static I dot(I acc, const I& codes, const std::int8_t* x4) {
    std::int32_t xw;
    std::memcpy(&xw, x4, 4);
    if constexpr (BITS == 4) {
      const __m256i pairs = _mm256_maddubs_epi16(codes, _mm256_set1_epi32(xw));
      return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    } else {
      // Codes of bytes 0 and 2 (even) and 1 and 3 (odd) as 16-bit lanes; the
      // activations as sign-extended 16-bit pairs (x0, x2) and (x1, x3).
      const __m256i lo = _mm256_set1_epi32(0x00ff00ff);
      const __m256i even = _mm256_and_si256(codes, lo), odd = _mm256_and_si256(_mm256_srli_epi32(codes, 8), lo);
      const auto x = [&](int i) { return static_cast<std::uint32_t>(static_cast<std::uint16_t>(x4[i])); };
      const __m256i xe = _mm256_set1_epi32(static_cast<std::int32_t>(x(0) | x(2) << 16));
      const __m256i xo = _mm256_set1_epi32(static_cast<std::int32_t>(x(1) | x(3) << 16));
      return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(even, xe), _mm256_madd_epi16(odd, xo)));
    }
  }
  static IZ zeros(const std::uint8_t* z16) {
    IZ z;
    for (int j = 0; j < NV; ++j) {
      std::int64_t b;
      std::memcpy(&b, z16 + 8 * j, 8);
      z.z[j] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(b)));
    }
    return z;
  }
  static F sub_zero(F f, const IZ& z, int j, float zsum) { return _mm256_fnmadd_ps(z.z[j], _mm256_set1_ps(zsum), f); }
  static F scale_add(const I& acc, float s, F f) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s), f);
  }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, const F& f) { _mm256_storeu_ps(p, f); }
  static F fma(const F& a, const F& b, F c) { return _mm256_fmadd_ps(a, b, c); }
};

}  // namespace qmoe::cpu
