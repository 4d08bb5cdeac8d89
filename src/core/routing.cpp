#include "core/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace qmoe::detail {

void route_token(const float* logits, const float* mix, int num_experts, int k, bool normalize, int* experts,
                 double* weights) {
  // Small E (<= 256): a partial sort of indices is simple and fast enough.
  thread_local std::vector<int> order;
  order.resize(static_cast<std::size_t>(num_experts));
  std::iota(order.begin(), order.end(), 0);
  auto key = [&](int e) {
    const float v = logits[e];
    return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
  };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
    const float ka = key(a), kb = key(b);
    return ka > kb || (ka == kb && a < b);
  });
  double sum = 0;
  if (mix) {
    for (int j = 0; j < k; ++j) weights[j] = mix[order[j]];
  } else {
    double mx = -std::numeric_limits<double>::infinity();
    bool has_nan = false;
    for (int e = 0; e < num_experts; ++e) {
      has_nan |= std::isnan(logits[e]);
      mx = std::max(mx, static_cast<double>(logits[e]));
    }
    // exp(l - max): with a +inf logit, inf - inf would be NaN; the limit is an
    // even split over the +inf logits (and 0 elsewhere), which is what we use.
    const bool inf_max = std::isinf(mx) && mx > 0;
    auto numer = [&](int e) {
      const double l = logits[e];
      return inf_max ? (l == mx ? 1.0 : 0.0) : std::exp(l - mx);
    };
    double z = 0;
    for (int e = 0; e < num_experts; ++e) z += numer(e);
    for (int j = 0; j < k; ++j) weights[j] = has_nan ? std::numeric_limits<double>::quiet_NaN() : numer(order[j]) / z;
  }
  for (int j = 0; j < k; ++j) {
    experts[j] = order[j];
    sum += weights[j];
  }
  if (normalize)
    for (int j = 0; j < k; ++j) weights[j] /= sum;
}

}  // namespace qmoe::detail
