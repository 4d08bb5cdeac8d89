// Internal: driver primitives for the portable path. GCC/Clang vector
// extensions: portable source, and the compiler emits whatever 16-byte vector
// instructions the baseline ISA has (SSE2 on x86-64, NEON on arm64).
// Included only by the *__scalar.cpp kernels.
#pragma once

#include <cstdint>
#include <cstring>

namespace qmoe::cpu {

struct OpsScalar {
  typedef float V __attribute__((vector_size(16)));
  typedef unsigned char B __attribute__((vector_size(16)));
  typedef unsigned short H __attribute__((vector_size(16)));
  typedef int I __attribute__((vector_size(16)));
  struct Z {
    V z[4];
  };
  static constexpr int NV = 4;             // 4 x 4 floats = the 16 rows of a column
  static constexpr int kDirectTokens = 2;  // decode once, use for 2 tokens
  static constexpr int kReuseTokens = 2;   // 2 tokens x 4 accumulators fit the 16 xmm registers
  static constexpr int kReuseFrom = 4;     // dequantize-and-reuse from this many tokens on

  static V zero() { return V{}; }
  static V splat(float x) { return V{x, x, x, x}; }
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V mul(V a, V b) { return a * b; }

  // 16 bytes -> four V. Zero-extension is spelled as interleaving with zero
  // (u8 -> u16 -> u32) so it maps to unpack instructions; a direct
  // convertvector from bytes compiled to one scalar conversion per byte.
  static void widen(B q, V* out) {
    const B z8 = {};
    const H z16 = {};
    const H lo = (H)__builtin_shufflevector(q, z8, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const H hi = (H)__builtin_shufflevector(q, z8, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    out[0] = __builtin_convertvector((I)__builtin_shufflevector(lo, z16, 0, 8, 1, 9, 2, 10, 3, 11), V);
    out[1] = __builtin_convertvector((I)__builtin_shufflevector(lo, z16, 4, 12, 5, 13, 6, 14, 7, 15), V);
    out[2] = __builtin_convertvector((I)__builtin_shufflevector(hi, z16, 0, 8, 1, 9, 2, 10, 3, 11), V);
    out[3] = __builtin_convertvector((I)__builtin_shufflevector(hi, z16, 4, 12, 5, 13, 6, 14, 7, 15), V);
  }
  static B load16(const std::uint8_t* p) {
    B b;
    std::memcpy(&b, p, sizeof b);
    return b;
  }
  static Z zeros(const std::uint8_t* z16) {
    Z z;
    widen(load16(z16), z.z);
    return z;
  }
  static void decode4(const std::uint8_t* q16, const Z& z, V* even, V* odd) {
    const B q = load16(q16);
    widen(q & 0x0f, even);
    widen(q >> 4, odd);
    for (int j = 0; j < NV; ++j) even[j] -= z.z[j], odd[j] -= z.z[j];
  }
  static void decode8(const std::uint8_t* q16, const Z& z, V* w) {
    widen(load16(q16), w);
    for (int j = 0; j < NV; ++j) w[j] -= z.z[j];
  }
};

}  // namespace qmoe::cpu
