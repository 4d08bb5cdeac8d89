// Shared helpers for the C++ tests.
#pragma once

#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/moe.h"
#include "qmoe/qmoe.h"
#include "synth.h"

namespace qmoe::test {

/// Random inputs of a layer: x [T, H] and router logits [T, E].
struct Inputs {
  std::vector<float> x, logits, mix;
};

inline Inputs random_inputs(std::int64_t t, std::int64_t h, std::int64_t e, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Inputs in;
  in.x.resize(static_cast<std::size_t>(t * h));
  in.logits.resize(static_cast<std::size_t>(t * e));
  in.mix.resize(static_cast<std::size_t>(t * e));
  tools::fill_normal(in.x, rng, 1.0f);
  tools::fill_normal(in.logits, rng, 1.5f);
  std::uniform_real_distribution<float> u(0.05f, 1.0f);
  for (auto& m : in.mix) m = u(rng);
  return in;
}

/// max |a - ref| / max |ref|.
inline double rel_max_error(const std::vector<float>& a, const std::vector<double>& ref) {
  double d = 0, m = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    d = std::max(d, std::fabs(static_cast<double>(a[i]) - ref[i]));
    if (std::isnan(a[i])) d = INFINITY;
    m = std::max(m, std::fabs(ref[i]));
  }
  return m > 0 ? d / m : d;
}

/// ||a - ref|| / ||ref|| (infinite when a holds NaN).
inline double rel_l2(const std::vector<float>& a, const std::vector<double>& ref) {
  double d = 0, r = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = a[i] - ref[i];
    d += e * e, r += ref[i] * ref[i];
  }
  return std::isnan(d) ? INFINITY : std::sqrt(d / r);
}

/// A layer configuration for the reduced-precision sweeps: weights, activation
/// (swiglu with gpt-oss constants), k and the shape; routing normalized like ONNX Runtime.
struct Case {
  int bits, block;
  bool sym;
  Activation act;
  int fusion, k;
  std::int64_t h, in, e, t;

  MoeAttributes attrs() const {
    MoeAttributes a;
    a.k = k;
    a.activation = act;
    a.swiglu_fusion = fusion;
    a.expert_weight_bits = bits;
    a.block_size = block;
    a.normalize_routing_weights = 1;
    if (act == Activation::swiglu) a.activation_alpha = 1.702f, a.activation_beta = 1.f, a.swiglu_limit = 7.f;
    return a;
  }
  tools::SynthLayer layer() const {
    tools::SynthOptions so;
    so.symmetric = sym;
    return tools::synth_layer(e, h, in, attrs(), so);
  }
};

/// A Case's layer, seeded random inputs and their float64 reference output.
struct Problem {
  Case c;
  MoeAttributes a;
  tools::SynthLayer s;
  Inputs x;
  TensorView xv, lv;
  std::vector<double> ref;

  Problem(const Case& cs, std::uint64_t seed)
      : c(cs),
        a(cs.attrs()),
        s(cs.layer()),
        x(random_inputs(cs.t, cs.h, cs.e, seed)),
        xv(view_f32(x.x.data(), {cs.t, cs.h})),
        lv(view_f32(x.logits.data(), {cs.t, cs.e})),
        ref(reference_forward(s.views(), a, xv, lv)) {}

  /// The CPU engine's output with kernel table kc, `threads` threads and accuracy_level `level`.
  std::vector<float> cpu_output(const cpu::KernelConfig* kc, int threads, int level) const {
    const cpu::CpuMoe moe(s.views(), a, s.shape, threads, level, cpu::CpuMoe::kDefaultChunkBytes, kc);
    std::vector<float> out(static_cast<std::size_t>(c.t * c.h), NAN);
    moe.forward(xv, lv, TensorView{}, output_f32(out.data(), {c.t, c.h}), c.t);
    return out;
  }
};

/// Suites parameterized by kernel table: one instance per table this CPU runs, named by the
/// table (e.g. .../avx512vnni), so a failure names it and --gtest_filter='*/avx2' picks one.
class PerTable : public ::testing::TestWithParam<const cpu::KernelConfig*> {};
inline std::string table_name(const ::testing::TestParamInfo<const cpu::KernelConfig*>& p) {
  std::string n = p.param->name;
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
}
#define QMOE_PER_TABLE_SUITE(Suite) \
  class Suite : public PerTable {}; \
  INSTANTIATE_TEST_SUITE_P(Tables, Suite, ::testing::ValuesIn(cpu::supported_kernel_configs()), table_name)

}  // namespace qmoe::test
