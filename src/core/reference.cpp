// The float64 reference forward: the operator contract (README, "Supported features"), literally.
// Slow on purpose and simple on purpose: it is the oracle for every backend.
#include <vector>

#include "core/activation.h"
#include "core/check.h"
#include "core/routing.h"
#include "core/validate.h"
#include "qmoe/layer.h"
#include "quant/raw.h"

namespace qmoe {

std::vector<double> reference_forward(const ExpertWeights& w, const MoeAttributes& a, const TensorView& input,
                                      const TensorView& router_probs, const TensorView& router_weights) {
  using namespace detail;
  const MoeShape s = validate(w, a);
  const std::int64_t t = validate_call(s, input, router_probs, router_weights, nullptr);
  const std::int64_t h = s.hidden, in = s.inter, e_count = s.num_experts;
  const int bits = a.expert_weight_bits, bs = a.block_size;
  const RawMatrix fc1(w.fc1_weights, w.fc1_scales, w.fc1_zero_points, bits, bs, s.fc1_rows, h);
  const RawMatrix fc2(w.fc2_weights, w.fc2_scales, w.fc2_zero_points, bits, bs, h, in);
  RawMatrix fc3;
  const bool separate_up = a.activation == Activation::swiglu && a.swiglu_fusion == 0;
  if (separate_up) fc3 = RawMatrix(w.fc3_weights, w.fc3_scales, w.fc3_zero_points, bits, bs, in, h);

  // Route every token.
  std::vector<int> chosen(static_cast<std::size_t>(t * a.k));
  std::vector<double> mixw(static_cast<std::size_t>(t * a.k));
  std::vector<float> lg(static_cast<std::size_t>(e_count)), mx(static_cast<std::size_t>(e_count));
  for (std::int64_t i = 0; i < t; ++i) {
    for (std::int64_t e = 0; e < e_count; ++e)
      lg[e] = load_float(router_probs.data, router_probs.dtype, i * e_count + e);
    if (router_weights.present())
      for (std::int64_t e = 0; e < e_count; ++e)
        mx[e] = load_float(router_weights.data, router_weights.dtype, i * e_count + e);
    route_token(lg.data(), router_weights.present() ? mx.data() : nullptr, static_cast<int>(e_count), a.k,
                a.normalize_routing_weights != 0, &chosen[i * a.k], &mixw[i * a.k]);
  }

  auto bias = [](const TensorView& b, std::int64_t index) {
    return b.present() ? static_cast<double>(load_float(b.data, b.dtype, index)) : 0.0;
  };
  std::vector<double> out(static_cast<std::size_t>(t * h), 0.0);
  std::vector<double> w1, w2, w3, x(static_cast<std::size_t>(h)), hid, act(static_cast<std::size_t>(in)), up;
  // Expert by expert so only one expert's dequantized matrices are alive at a time.
  for (std::int64_t e = 0; e < e_count; ++e) {
    bool used = false;
    for (std::size_t i = 0; i < chosen.size() && !used; ++i) used = chosen[i] == e;
    if (!used) continue;
    w1.resize(static_cast<std::size_t>(s.fc1_rows * h));
    w2.resize(static_cast<std::size_t>(h * in));
    dequantize_expert(fc1, e, w1.data());
    dequantize_expert(fc2, e, w2.data());
    if (separate_up) {
      w3.resize(static_cast<std::size_t>(in * h));
      dequantize_expert(fc3, e, w3.data());
    }
    for (std::int64_t i = 0; i < t; ++i)
      for (int j = 0; j < a.k; ++j) {
        if (chosen[i * a.k + j] != e) continue;
        for (std::int64_t c = 0; c < h; ++c) x[c] = load_float(input.data, input.dtype, i * h + c);
        auto matvec = [&](const std::vector<double>& m, std::int64_t rows, std::int64_t cols, const double* v,
                          const TensorView& b, std::vector<double>& y) {
          y.assign(static_cast<std::size_t>(rows), 0.0);
          for (std::int64_t r = 0; r < rows; ++r) {
            double acc = 0;
            for (std::int64_t c = 0; c < cols; ++c) acc += m[r * cols + c] * v[c];
            y[r] = acc + bias(b, e * rows + r);
          }
        };
        matvec(w1, s.fc1_rows, h, x.data(), w.fc1_bias, hid);
        if (a.activation == Activation::swiglu) {
          if (separate_up) matvec(w3, in, h, x.data(), w.fc3_bias, up);
          for (std::int64_t r = 0; r < in; ++r) {
            double g, l;
            if (a.swiglu_fusion == 1)
              g = hid[2 * r], l = hid[2 * r + 1];
            else if (a.swiglu_fusion == 2)
              g = hid[r], l = hid[in + r];
            else
              g = hid[r], l = up[r];
            act[r] = swiglu<double>(g, l, a.activation_alpha, a.activation_beta, a.swiglu_limit);
          }
        } else {
          for (std::int64_t r = 0; r < in; ++r) act[r] = activate<double>(a.activation, hid[r]);
        }
        std::vector<double> y;
        matvec(w2, h, in, act.data(), w.fc2_bias, y);
        const double wt = mixw[i * a.k + j];
        for (std::int64_t c = 0; c < h; ++c) out[i * h + c] += wt * y[c];
      }
  }
  return out;
}

}  // namespace qmoe
