// Internal: the activations of the contract, for float and double.
#pragma once

#include <algorithm>
#include <cmath>

#include "qmoe/config.h"

namespace qmoe::detail {

/// Element-wise activations (not swiglu). gelu is the tanh approximation.
template <typename T>
inline T activate(Activation a, T h) {
  switch (a) {
    case Activation::relu: return h < T(0) ? T(0) : h;  // NaN stays NaN: never a silent 0
    case Activation::gelu: {
      const T c = T(0.7978845608028654);  // sqrt(2/pi)
      return T(0.5) * h * (T(1) + std::tanh(c * (h + T(0.044715) * h * h * h)));
    }
    case Activation::silu: return h / (T(1) + std::exp(-h));
    case Activation::identity: return h;
    case Activation::swiglu: break;
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
