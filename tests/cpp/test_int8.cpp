// accuracy_level 4 (int8 activations): error bound against the float64
// reference on every kernel table, and the same bits from every table (the
// integer dot products are exact and the float steps are the same fused
// operations, so the VNNI kernels must agree with the plain C++ ones exactly).
#include <gtest/gtest.h>

#include <cstring>

#include "cpu/kernels.h"
#include "cpu/moe.h"
#include "helpers.h"

namespace qmoe::test {
namespace {

// Relative L2 error of one case (the same on every table); the caller bounds the mean too.
double check(const Case& c) {
  const Problem p(c, 21);
  std::vector<float> first;
  double worst = 0;
  for (const cpu::KernelConfig* kc : cpu::supported_kernel_configs()) {
    const std::vector<float> out = p.cpu_output(kc, 2, 4);
    const double err = rel_l2(out, p.ref);
    // A single small case (one token, k = 1, H = 256) scatters around the mean:
    // bound each case at 1.5e-2 and the mean over cases at 1e-2.
    EXPECT_LE(err, 1.5e-2) << kc->name << " bits=" << c.bits << " block=" << c.block << " T=" << c.t;
    worst = err;
    EXPECT_GT(err, 0.0) << "int8 activations cannot be exact";
    if (first.empty())
      first = out;
    else
      EXPECT_EQ(std::memcmp(first.data(), out.data(), out.size() * 4), 0)
          << kc->name << " differs from " << cpu::supported_kernel_configs()[0]->name;
  }
  return worst;
}

TEST(Int8Activations, ErrorBoundAndSameBitsOnEveryTable) {
  int n = 0;
  double sum = 0;
  for (int bits : {4, 8})
    for (int block : {0, 16, 32, 128})
      for (bool sym : {true, false}) {
        const Activation act = n % 3 == 0 ? Activation::swiglu : n % 3 == 1 ? Activation::gelu : Activation::relu;
        const std::int64_t t = std::int64_t{1} + (n * 7) % 23;
        sum += check({bits, block, sym, act, act == Activation::swiglu ? 1 + n % 2 : 0, 1 + n % 4, 256, 128, 6, t});
        ++n;
      }
  EXPECT_LE(sum / n, 1e-2);
}

TEST(Int8Activations, RowwisePaddingAndManyTokens) {
  check({4, 0, false, Activation::silu, 0, 2, 40, 24, 3, 37});   // K = 40, 24: groups of 8, partial act blocks
  check({8, 0, true, Activation::swiglu, 0, 3, 36, 20, 4, 50});  // fc3 path, 8-bit groups of 4
}

TEST(Int8Activations, NonFiniteInputPropagates) {
  MoeAttributes a;
  a.k = 2;
  const auto s = tools::synth_layer(3, 64, 32, a);
  const cpu::CpuMoe moe(s.views(), a, s.shape, 1, 4);
  auto x = random_inputs(2, 64, 3, 5);
  x.x[10] = INFINITY;
  std::vector<float> out(128);
  moe.forward(view_f32(x.x.data(), {2, 64}), view_f32(x.logits.data(), {2, 3}), TensorView{},
              output_f32(out.data(), {2, 64}), 2);
  EXPECT_TRUE(std::isnan(out[0]));   // token 0 saw the inf
  EXPECT_TRUE(std::isfinite(out[64]));  // token 1 did not
}

}  // namespace
}  // namespace qmoe::test
