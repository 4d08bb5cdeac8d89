// Internal: the activations of the contract, for float and double.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#include "qmoe/config.h"

namespace qmoe::detail {

/// Element-wise activations (not swiglu). gelu is the tanh approximation.
template <typename T>
inline T activate(Activation a, T h) {
  switch (a) {
    case Activation::relu:
      return h < T(0) ? T(0) : h;  // NaN stays NaN: never a silent 0
    case Activation::gelu: {
      const T c = T(0.7978845608028654);  // sqrt(2/pi)
      return T(0.5) * h * (T(1) + std::tanh(c * (h + T(0.044715) * h * h * h)));
    }
    case Activation::silu:
      return h / (T(1) + std::exp(-h));
    case Activation::identity:
      return h;
    case Activation::swiglu:
      break;
  }
  return h;
}

/// swiglu of one gate/up pair: G = min(g, limit), L = clamp(l, -limit, limit),
/// G * sigmoid(alpha * G) * (L + beta).
template <typename T>
inline T swiglu(T g, T l, T alpha, T beta, T limit) {
  const T gg = std::min(g, limit);
  const T ll = std::clamp(l, -limit, limit);
  return gg / (T(1) + std::exp(-alpha * gg)) * (ll + beta);
}

}  // namespace qmoe::detail

namespace qmoe::detail {

/// exp(x) in float32 without a library call, so loops over it vectorize:
/// x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact product),
/// e^r by a degree-7 Taylor/Horner polynomial (relative error < 2e-7 on that
/// range), times 2^n built in the exponent bits. Inputs are clamped to
/// [-87.3, 88.7] (the float range); NaN stays NaN.
inline float fast_exp(float x) {
  // Written so that NaN fails both tests and becomes -87.3 (the int conversion
  // below is undefined for NaN); the last line returns the NaN.
  const float xc = x >= -87.3f ? (x <= 88.7f ? x : 88.7f) : -87.3f;
  // Round to nearest (even) by adding and subtracting 1.5 * 2^23 (|v| <= 128): the same
  // result as nearbyint, without a libm call, so loops over it vectorize on any target.
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  // 2^n for n in [-126, 128): split so that both factors are normal floats.
  const int ni = static_cast<int>(n);
  const int n1 = ni / 2, n2 = ni - n1;
  const float s1 = std::bit_cast<float>(static_cast<std::uint32_t>((n1 + 127) << 23));
  const float s2 = std::bit_cast<float>(static_cast<std::uint32_t>((n2 + 127) << 23));
  const float y = p * s1 * s2;
  return x != x ? x : y;
}

/// The float32 activations of the CPU kernels' epilogues: the same formulas as
/// activate / swiglu, with fast_exp.
inline float fast_activate(Activation a, float h) {
  switch (a) {
    case Activation::relu:
      return h < 0.f ? 0.f : h;
    case Activation::gelu: {
      const float u = 0.7978845608028654f * (h + 0.044715f * h * h * h);
      const float t = 1.f - 2.f / (fast_exp(2.f * u) + 1.f);  // tanh(u)
      return 0.5f * h * (1.f + t);
    }
    case Activation::silu:
      return h / (1.f + fast_exp(-h));
    case Activation::identity:
      return h;
    case Activation::swiglu:
      break;
  }
  return h;
}

inline float fast_swiglu(float g, float l, float alpha, float beta, float limit) {
  const float gg = g > limit ? limit : g;
  const float ll = l > limit ? limit : (l < -limit ? -limit : l);
  return gg / (1.f + fast_exp(-alpha * gg)) * (ll + beta);
}

}  // namespace qmoe::detail
