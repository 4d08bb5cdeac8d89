// Internal: int8-activation primitives for AVX-512 VNNI (vpdpbusd).
// Included only by *__avx512vnni.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace qmoe::cpu {

struct IOpsAvx512Vnni {
  typedef __m512i I;
  typedef __m512 F;
  typedef __m512 IZ;
  static constexpr int NV = 1;
  static constexpr int kTokens = 8;  // 8 x (int, block, total) accumulators + codes, of 32 zmm

  static I izero() { return _mm512_setzero_si512(); }
  static F fzero() { return _mm512_setzero_ps(); }
  template <int BITS>
  static void split(const std::uint8_t* p64, I (*parts)[1]) {
    const __m512i q = _mm512_loadu_si512(p64);
    if constexpr (BITS == 4) {
      const __m512i m = _mm512_set1_epi8(0x0f);
      parts[0][0] = _mm512_and_si512(q, m);
      parts[1][0] = _mm512_and_si512(_mm512_srli_epi32(q, 4), m);
    } else {
      parts[0][0] = q;
    }
  }
  // The 4 activations are broadcast straight from memory (an embedded {1to16}
  // operand), not through a general register: no shuffle-port work per product.
  static I dot(I acc, const I& codes, const std::int8_t* x4) {
    std::int32_t v;
    std::memcpy(&v, x4, 4);
    return _mm512_dpbusd_epi32(acc, codes, _mm512_set1_epi32(v));
  }
  static IZ zeros(const std::uint8_t* z16) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z16))));
  }
  static F sub_zero(const F& f, const IZ& z, int, float zsum) { return _mm512_fnmadd_ps(z, _mm512_set1_ps(zsum), f); }
  static F scale_add(const I& acc, float s, F f) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(s), f); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, const F& f) { _mm512_storeu_ps(p, f); }
  static F fma(const F& a, const F& b, const F& c) { return _mm512_fmadd_ps(a, b, c); }
};

}  // namespace qmoe::cpu
