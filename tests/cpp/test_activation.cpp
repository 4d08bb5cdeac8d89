// Activations against closed-form values.
#include <gtest/gtest.h>

#include <cmath>

#include "core/activation.h"

namespace qmoe::detail {
namespace {

TEST(Activation, ElementWise) {
  EXPECT_EQ(activate<double>(Activation::relu, -1.5), 0.0);
  EXPECT_EQ(activate<double>(Activation::relu, 2.5), 2.5);
  EXPECT_EQ(activate<double>(Activation::identity, -3.25), -3.25);
  EXPECT_NEAR(activate<double>(Activation::silu, 1.0), 1.0 / (1.0 + std::exp(-1.0)), 1e-15);
  EXPECT_NEAR(activate<double>(Activation::silu, -2.0), -2.0 / (1.0 + std::exp(2.0)), 1e-15);
  // gelu, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  EXPECT_NEAR(activate<double>(Activation::gelu, 1.0), 0.8411919906082768, 1e-12);
  EXPECT_NEAR(activate<double>(Activation::gelu, -0.5), -0.15428599017485606, 1e-12);
  EXPECT_NEAR(activate<float>(Activation::gelu, 1.0f), 0.841192f, 1e-6f);
}

TEST(Activation, SwigluWithGptOssConstants) {
  const double a = 1.702, b = 1.0, lim = 7.0;
  auto expect = [&](double g, double l) {
    const double gg = std::min(g, lim), ll = std::max(-lim, std::min(l, lim));
    return gg / (1 + std::exp(-a * gg)) * (ll + b);
  };
  EXPECT_NEAR(swiglu<double>(0.5, -0.25, a, b, lim), expect(0.5, -0.25), 1e-15);
  EXPECT_NEAR(swiglu<double>(9.0, 8.0, a, b, lim), 7.0 / (1 + std::exp(-a * 7.0)) * 8.0, 1e-12);  // both clamped
  EXPECT_NEAR(swiglu<double>(-9.0, -8.0, a, b, lim), -9.0 / (1 + std::exp(a * 9.0)) * -6.0,
              1e-12);  // gate not clamped below
  // Plain SwiGLU: alpha 1, beta 0, no limit -> silu(g) * l.
  const double inf = INFINITY;
  EXPECT_NEAR(swiglu<double>(2.0, 3.0, 1.0, 0.0, inf), 2.0 / (1 + std::exp(-2.0)) * 3.0, 1e-15);
  EXPECT_TRUE(std::isnan(swiglu<double>(NAN, 1.0, 1.0, 0.0, inf)));
}

TEST(Activation, FastExpOfNanAndInfinities) {
  // NaN must stay NaN without reaching the float -> int conversion (undefined
  // behaviour, which UBSan stopped on when the fuzzer fed a file with NaN scales).
  EXPECT_TRUE(std::isnan(fast_exp(NAN)));
  EXPECT_TRUE(std::isnan(fast_activate(Activation::silu, NAN)));
  EXPECT_TRUE(std::isnan(fast_activate(Activation::gelu, NAN)));
  EXPECT_EQ(fast_exp(-INFINITY), fast_exp(-87.3f));  // clamped to the float range
  EXPECT_GT(fast_exp(INFINITY), 1e38f);
}

TEST(Activation, FastExpAgainstLibm) {
  double worst = 0;
  for (float x = -87.f; x <= 88.f; x += 0.0137f) {
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(fast_exp(x) - want) / want);
  }
  EXPECT_LE(worst, 4e-7);
  EXPECT_EQ(fast_exp(0.f), 1.f);
  EXPECT_TRUE(std::isnan(fast_exp(NAN)));
  EXPECT_GT(fast_exp(1000.f), 1e38f);  // clamped to the float range, finite
  EXPECT_LT(fast_exp(-1000.f), 1e-37f);
  // The epilogue forms agree with the reference formulas to float32 rounding.
  for (float h = -9.f; h <= 9.f; h += 0.01f) {
    for (auto a : {Activation::relu, Activation::gelu, Activation::silu, Activation::identity})
      ASSERT_NEAR(fast_activate(a, h), activate<double>(a, h), 2e-6 * (1 + std::fabs(h))) << activation_name(a) << h;
    ASSERT_NEAR(fast_swiglu(h, 0.5f * h, 1.702f, 1.f, 7.f), swiglu<double>(h, 0.5 * h, 1.702, 1.0, 7.0),
                4e-6 * (1 + h * h));
  }
  EXPECT_TRUE(std::isnan(fast_activate(Activation::relu, NAN)));
  EXPECT_TRUE(std::isnan(fast_swiglu(NAN, 1.f, 1.f, 0.f, INFINITY)));
}

}  // namespace
}  // namespace qmoe::detail
