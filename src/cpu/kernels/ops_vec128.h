// Internal: driver primitives for the portable path. GCC/Clang vector
// extensions: portable source, and the compiler emits whatever 16-byte vector
// instructions the baseline ISA has (SSE2 on x86-64, NEON on arm64).
// Included only by the *__vec128.cpp kernels.
#pragma once

#include <cstdint>
#include <cstring>

namespace qmoe::cpu {

struct OpsVec128 {
  typedef float V __attribute__((vector_size(16)));
  typedef unsigned U __attribute__((vector_size(16)));
  struct Z {
    V z[4];  // 2^23 + zero point, per row
  };
  struct Q {
    U q[4];  // rows 0-3, 4-7, 8-11, 12-15
  };
  static constexpr int NV = 4;             // 4 x 4 floats = the 16 rows of a column
  static constexpr int kDirectTokens = 2;  // decode once, use for 2 tokens
  static constexpr int kReuseTokens = 2;   // 2 tokens x 4 accumulators fit the 16 xmm registers
  static constexpr int kReuseTiles = 1;    // no registers to spare for a second tile
  static constexpr int kDirectTiles = 1;
  template <int BITS>
  static constexpr bool kLut = false;  // no table lookup: column() only

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

  static Z zeros(const std::uint8_t* z16) {
    Z z;
    for (int j = 0; j < 4; ++j)
      z.z[j] =
          V{8388608.f + z16[4 * j], 8388608.f + z16[4 * j + 1], 8388608.f + z16[4 * j + 2], 8388608.f + z16[4 * j + 3]};
    return z;
  }
  static Q group(const std::uint8_t* p64) {
    Q q;
    std::memcpy(q.q, p64, sizeof q.q);
    return q;
  }
  template <int BITS, int J>
  static void column(const Q& q, const Z& z, V* w) {
    constexpr unsigned mask = (1u << BITS) - 1;
    for (int j = 0; j < NV; ++j) {
      const U bits = ((q.q[j] >> (BITS * J)) & mask) | 0x4B000000u;  // 2^23 + code, as float bits
      w[j] = (V)bits - z.z[j];
    }
  }
};

}  // namespace qmoe::cpu
