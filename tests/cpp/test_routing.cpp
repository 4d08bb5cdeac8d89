// Routing against hand-computed softmax / top-k.
#include <gtest/gtest.h>

#include <cmath>

#include "core/routing.h"

namespace qmoe::detail {
namespace {

TEST(Routing, TopKOfSoftmaxInRankOrder) {
  const float lg[4] = {0.5f, 2.0f, -1.0f, 1.0f};
  int ex[2];
  double w[2];
  route_token(lg, nullptr, 4, 2, false, ex, w);
  EXPECT_EQ(ex[0], 1);
  EXPECT_EQ(ex[1], 3);
  const double z = std::exp(0.5) + std::exp(2.0) + std::exp(-1.0) + std::exp(1.0);
  EXPECT_NEAR(w[0], std::exp(2.0) / z, 1e-15);
  EXPECT_NEAR(w[1], std::exp(1.0) / z, 1e-15);
  route_token(lg, nullptr, 4, 2, true, ex, w);
  EXPECT_NEAR(w[0], std::exp(2.0) / (std::exp(2.0) + std::exp(1.0)), 1e-15);
  EXPECT_NEAR(w[0] + w[1], 1.0, 1e-15);
}

TEST(Routing, TiesGoToTheLowerIndex) {
  const float lg[5] = {1.0f, 3.0f, 3.0f, 1.0f, 3.0f};
  int ex[4];
  double w[4];
  route_token(lg, nullptr, 5, 4, false, ex, w);
  EXPECT_EQ(ex[0], 1);
  EXPECT_EQ(ex[1], 2);
  EXPECT_EQ(ex[2], 4);
  EXPECT_EQ(ex[3], 0);
  EXPECT_EQ(w[0], w[1]);
}

TEST(Routing, KEqualsEChoosesEveryExpert) {
  const float lg[3] = {0.f, -1.f, 1.f};
  int ex[3];
  double w[3];
  route_token(lg, nullptr, 3, 3, false, ex, w);
  EXPECT_EQ(ex[0], 2);
  EXPECT_EQ(ex[1], 0);
  EXPECT_EQ(ex[2], 1);
  EXPECT_NEAR(w[0] + w[1] + w[2], 1.0, 1e-15);
}

TEST(Routing, RouterWeightsMixWhileLogitsChoose) {
  const float lg[4] = {0.f, 5.f, 4.f, -2.f};
  const float mix[4] = {0.9f, 0.1f, 0.3f, 0.8f};
  int ex[2];
  double w[2];
  route_token(lg, mix, 4, 2, false, ex, w);
  EXPECT_EQ(ex[0], 1);
  EXPECT_EQ(ex[1], 2);
  EXPECT_NEAR(w[0], 0.1, 1e-7);
  EXPECT_NEAR(w[1], 0.3, 1e-7);
  route_token(lg, mix, 4, 2, true, ex, w);
  EXPECT_NEAR(w[0], 0.25, 1e-7);
  EXPECT_NEAR(w[1], 0.75, 1e-7);
}

TEST(Routing, NaNLogitRanksLastAndPoisonsWeights) {
  const float lg[3] = {NAN, 1.f, 0.f};
  int ex[2];
  double w[2];
  route_token(lg, nullptr, 3, 2, false, ex, w);
  EXPECT_EQ(ex[0], 1);
  EXPECT_EQ(ex[1], 2);
  EXPECT_TRUE(std::isnan(w[0]));  // never a silent answer from a NaN router
}

TEST(Routing, InfiniteLogitsTakeTheWholeWeight) {
  const float lg[4] = {INFINITY, 1.f, INFINITY, -INFINITY};
  int ex[3];
  double w[3];
  route_token(lg, nullptr, 4, 3, false, ex, w);
  EXPECT_EQ(ex[0], 0);
  EXPECT_EQ(ex[1], 2);
  EXPECT_EQ(ex[2], 1);
  EXPECT_EQ(w[0], 0.5);
  EXPECT_EQ(w[1], 0.5);
  EXPECT_EQ(w[2], 0.0);
}

}  // namespace
}  // namespace qmoe::detail
