// Quantizer: hand-checked packing, round-trip error bounds, reported errors.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "qmoe/qmoe.h"
#include "synth.h"

namespace qmoe {
namespace {

TEST(Quantize, PacksEvenElementInLowNibbleSymmetric) {
  // One row of 16: absmax 7 -> scale 1, codes q + 8.
  std::vector<float> w = {0, 1, -1, 7, -7, 2, 3, -3, 0, 0, 0, 0, 0, 0, 0, 5};
  const auto q = quantize(view_f32(w.data(), {1, 1, 16}), {4, 0, true});
  ASSERT_EQ(q.weights.size(), 8u);
  EXPECT_EQ(q.scales[0], 1.0f);
  EXPECT_EQ(q.weights[0], 8 | (9 << 4));   // 0 -> 8, 1 -> 9
  EXPECT_EQ(q.weights[1], 7 | (15 << 4));  // -1 -> 7, 7 -> 15
  EXPECT_EQ(q.weights[2], 1 | (10 << 4));  // -7 -> 1, 2 -> 10
  EXPECT_EQ(q.weights[7], 8 | (13 << 4));  // 0 -> 8, 5 -> 13
  EXPECT_TRUE(q.zero_points.empty());
  EXPECT_EQ(q.max_abs_error, 0.0);
}

TEST(Quantize, AsymmetricZeroPointsPackAcrossRows) {
  // Three rows, row-wise, 4-bit: zero points [E, ceil(3/2)] = 2 bytes, row 0 in the low nibble.
  std::vector<float> w = {0, 15, 0, 15, -15, 0, -15, 0, -5, 10, -5, 10};
  const auto q = quantize(view_f32(w.data(), {1, 3, 4}), {4, 0, false});
  ASSERT_EQ(q.zero_points.size(), 2u);
  // Row 0: [0, 15] -> scale 1, zp 0. Row 1: [-15, 0] -> scale 1, zp 15. Row 2: [-5, 10] -> zp 5.
  EXPECT_EQ(q.scales[0], 1.0f);
  EXPECT_EQ(q.zero_points[0], 0 | (15 << 4));
  EXPECT_EQ(q.zero_points[1], 5);
  EXPECT_EQ(q.max_abs_error, 0.0);
  const auto d = dequantize(q.weights_view(), q.scales_view(), q.zero_points_view(), 4, 0, 4);
  for (std::size_t i = 0; i < w.size(); ++i) EXPECT_EQ(d[i], w[i]) << i;
}

class RoundTrip : public ::testing::TestWithParam<std::tuple<int, int, bool>> {};

TEST_P(RoundTrip, ErrorWithinHalfAStepAndReportedExactly) {
  const auto [bits, block, sym] = GetParam();
  const std::int64_t e = 3, n = 5, k = 256;
  std::vector<float> w(static_cast<std::size_t>(e * n * k));
  std::mt19937_64 rng(bits * 1000 + block);
  tools::fill_normal(w, rng, 0.7f);
  const auto q = quantize(view_f32(w.data(), {e, n, k}), {bits, block, sym});
  const auto d = dequantize(q.weights_view(), q.scales_view(), q.zero_points_view(), bits, block, k);
  const std::int64_t bl = block ? block : k;
  double err2 = 0, ref2 = 0, emax = 0;
  for (std::int64_t i = 0; i < e * n * k; ++i) {
    const std::int64_t row = i / k, b = (i % k) / bl;
    const double step = q.scales[static_cast<std::size_t>(row * (k / bl) + b)];
    const double err = std::fabs(d[i] - w[i]);
    ASSERT_LE(err, 0.5 * step * (1 + 1e-6) + 1e-7) << "element " << i;
    err2 += err * err, ref2 += static_cast<double>(w[i]) * w[i], emax = std::max(emax, err);
  }
  EXPECT_NEAR(q.max_abs_error, emax, 1e-6);
  EXPECT_NEAR(q.rel_l2_error, std::sqrt(err2 / ref2), 1e-6);
  EXPECT_GT(q.rel_l2_error, 0.0);
  EXPECT_LT(q.rel_l2_error, bits == 4 ? 0.2 : 0.02);
}

INSTANTIATE_TEST_SUITE_P(All, RoundTrip,
                         ::testing::Combine(::testing::Values(4, 8), ::testing::Values(0, 16, 32, 64, 128, 256),
                                            ::testing::Bool()));

TEST(Quantize, Float16AndBFloat16InputsMatchFloat32) {
  std::vector<float> w(2 * 4 * 32);
  std::mt19937_64 rng(3);
  tools::fill_normal(w, rng, 1.0f);
  std::vector<std::uint16_t> h(w.size()), b(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) {
    h[i] = f32_to_f16(w[i]), b[i] = f32_to_bf16(w[i]);
    w[i] = f16_to_f32(h[i]);  // the float32 run sees exactly the float16 values
  }
  const auto q32 = quantize(view_f32(w.data(), {2, 4, 32}), {4, 16, false});
  const auto q16 = quantize(TensorView(h.data(), DType::f16, {2, 4, 32}), {4, 16, false});
  EXPECT_EQ(q32.weights, q16.weights);
  EXPECT_EQ(q32.scales, q16.scales);
  EXPECT_EQ(q32.zero_points, q16.zero_points);
  const auto qb = quantize(TensorView(b.data(), DType::bf16, {2, 4, 32}), {8, 0, true});
  EXPECT_LT(qb.rel_l2_error, 0.01);
}

TEST(Quantize, RejectsBadInput) {
  std::vector<float> w(64, 1.0f);
  EXPECT_THROW(quantize(view_f32(w.data(), {1, 2, 32}), {3, 0, true}), Error);    // bits
  EXPECT_THROW(quantize(view_f32(w.data(), {1, 2, 32}), {4, 24, true}), Error);   // block not a power of two
  EXPECT_THROW(quantize(view_f32(w.data(), {1, 1, 64}), {4, 128, true}), Error);  // block does not divide K
  EXPECT_THROW(quantize(view_f32(w.data(), {2, 32}), {4, 0, true}), Error);       // rank
  EXPECT_THROW(quantize(view_f32(w.data(), {1, 1, 63}), {4, 0, true}), Error);    // odd K at 4 bits
  w[5] = NAN;
  try {
    quantize(view_f32(w.data(), {1, 2, 32}), {4, 0, true});
    FAIL() << "NaN accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace qmoe
