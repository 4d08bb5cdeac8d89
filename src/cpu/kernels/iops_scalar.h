// Internal: int8-activation primitives in plain C++ (any CPU). Integer sums
// are exact and the float steps use fused multiply-add like the SIMD versions,
// so every ISA's accuracy_level-4 result has the same bits.
// Included only by the *__scalar.cpp int8 kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace qmoe::cpu {

struct IOpsScalar {
  struct I {
    std::int32_t v[16];
  };
  struct F {
    float v[16];
  };
  struct IZ {
    float z[16];
  };
  static constexpr int NV = 1;
  static constexpr int kTokens = 4;

  static I izero() { return I{}; }
  static F fzero() { return F{}; }
  template <int BITS>
  static void split(const std::uint8_t* p64, I (*parts)[1]) {
    // parts[0]: the low 4 bits of each byte (4-bit) or the bytes (8-bit); parts[1]: high nibbles.
    for (int r = 0; r < 16; ++r) {
      std::uint32_t w;
      std::memcpy(&w, p64 + 4 * r, 4);
      if (BITS == 4) {
        parts[0][0].v[r] = static_cast<std::int32_t>(w & 0x0f0f0f0fu);
        parts[1][0].v[r] = static_cast<std::int32_t>((w >> 4) & 0x0f0f0f0fu);
      } else {
        parts[0][0].v[r] = static_cast<std::int32_t>(w);
      }
    }
  }
  static I dot(I acc, const I& codes, const std::int8_t* xb) {
    for (int r = 0; r < 16; ++r) {
      const auto w = static_cast<std::uint32_t>(codes.v[r]);
      for (int i = 0; i < 4; ++i) acc.v[r] += static_cast<std::int32_t>((w >> (8 * i)) & 0xffu) * xb[i];
    }
    return acc;
  }
  static IZ zeros(const std::uint8_t* z16) {
    IZ z;
    for (int r = 0; r < 16; ++r) z.z[r] = z16[r];
    return z;
  }
  static F sub_zero(F f, const IZ& z, int, float zsum) {
    for (int r = 0; r < 16; ++r) f.v[r] = std::fma(-z.z[r], zsum, f.v[r]);
    return f;
  }
  static F scale_add(const I& acc, float s, F f) {
    for (int r = 0; r < 16; ++r) f.v[r] = std::fma(static_cast<float>(acc.v[r]), s, f.v[r]);
    return f;
  }
  static F load(const float* p) {
    F f;
    std::memcpy(f.v, p, sizeof f.v);
    return f;
  }
  static void store(float* p, const F& f) { std::memcpy(p, f.v, sizeof f.v); }
  static F fma(const F& a, const F& b, F c) {
    for (int r = 0; r < 16; ++r) c.v[r] = std::fma(a.v[r], b.v[r], c.v[r]);
    return c;
  }
};

}  // namespace qmoe::cpu
