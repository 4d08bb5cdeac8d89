// The README's C++ quick start, compiled and run by the test suite so it stays true.
#include <qmoe/qmoe.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const std::int64_t E = 8, H = 256, I = 128, T = 16;
  std::mt19937_64 rng(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto randn = [&](std::int64_t n, float s) {
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = s * normal(rng);
    return v;
  };
  const auto w1 = randn(E * 2 * I * H, 0.1f), w2 = randn(E * H * I, 0.1f);
  const auto x = randn(T * H, 1.f), logits = randn(T * E, 1.f);
  std::vector<float> y(static_cast<std::size_t>(T * H));

  qmoe::MoeAttributes attrs;  // ONNX Runtime's attribute names and defaults
  attrs.k = 4;
  attrs.activation = qmoe::Activation::swiglu;
  attrs.swiglu_fusion = 1;
  attrs.activation_alpha = 1.702f, attrs.activation_beta = 1.0f, attrs.swiglu_limit = 7.0f;

  try {
    auto q1 = qmoe::quantize(qmoe::view_f32(w1.data(), {E, 2 * I, H}), {/*bits=*/4, /*block_size=*/0, true});
    auto q2 = qmoe::quantize(qmoe::view_f32(w2.data(), {E, H, I}), {4, 0, true});
    qmoe::ExpertWeights w;  // non-owning views, ONNX Runtime layout
    w.fc1_weights = q1.weights_view(), w.fc1_scales = q1.scales_view();
    w.fc2_weights = q2.weights_view(), w.fc2_scales = q2.scales_view();

    const qmoe::Layer layer(w, attrs, {qmoe::Backend::cpu, /*threads=*/0, /*accuracy_level=*/0});  // prepacks
    layer.forward(qmoe::view_f32(x.data(), {T, H}), qmoe::view_f32(logits.data(), {T, E}),
                  qmoe::output_f32(y.data(), {T, H}));
    const std::vector<double> ref =
        qmoe::reference_forward(w, attrs, qmoe::view_f32(x.data(), {T, H}), qmoe::view_f32(logits.data(), {T, E}));
    double err = 0, mx = 0;
    for (std::size_t i = 0; i < ref.size(); ++i)
      err = std::fmax(err, std::fabs(y[i] - ref[i])), mx = std::fmax(mx, std::fabs(ref[i]));
    std::printf("kernel %s, packed %zu bytes, max|y - ref| / max|ref| = %.2e\n", layer.kernel_name(),
                layer.packed_bytes(), err / mx);
    return err / mx <= 1e-5 ? 0 : 1;
  } catch (const qmoe::Error& e) {
    std::fprintf(stderr, "qmoe: %s\n", e.what());
    return 1;
  }
}
