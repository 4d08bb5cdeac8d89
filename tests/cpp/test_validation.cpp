// Every contract violation gives a qmoe::Error naming the tensor or attribute,
// before any work is done; none crashes.
#include <gtest/gtest.h>

#include <functional>

#include "helpers.h"

namespace qmoe::test {
namespace {

constexpr std::int64_t E = 4, H = 64, I = 32, T = 3;

struct Fixture {
  MoeAttributes a;
  tools::SynthLayer s;
  Fixture(Activation act = Activation::swiglu, int fusion = 1, int block = 32, bool zp = true) {
    a.k = 2;
    a.activation = act;
    a.swiglu_fusion = fusion;
    a.block_size = block;
    tools::SynthOptions so;
    so.symmetric = !zp;
    s = tools::synth_layer(E, H, I, a, so);
  }
};

// Expects fn to throw qmoe::Error whose message contains every needle.
void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> needles) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one mentioning " << *needles.begin();
  } catch (const Error& e) {
    for (const char* n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "message: " << e.what() << "\nmissing: " << n;
  }
}

void build(const ExpertWeights& w, const MoeAttributes& a, LayerOptions o = {}) { Layer l(w, a, o); }

TEST(Validation, WeightsAndAttributes) {
  Fixture f;
  const ExpertWeights good = f.s.views();
  EXPECT_NO_THROW(build(good, f.a));
  int cases = 0;
  auto bad_w = [&](const std::function<void(ExpertWeights&)>& mutate, std::initializer_list<const char*> needles) {
    ExpertWeights w = good;
    mutate(w);
    expect_error([&] { build(w, f.a); }, needles);
    ++cases;
  };
  auto bad_a = [&](const std::function<void(MoeAttributes&)>& mutate, std::initializer_list<const char*> needles) {
    MoeAttributes a = f.a;
    mutate(a);
    expect_error([&] { build(good, a); }, needles);
    ++cases;
  };
  bad_w([](ExpertWeights& w) { w.fc1_weights = {}; }, {"fc1_experts_weights", "absent"});
  bad_w([](ExpertWeights& w) { w.fc1_weights.shape = {E, 2 * I, H}; }, {"fc1_experts_weights", "[4, 64, 32]"});
  bad_w([](ExpertWeights& w) { w.fc1_weights.dtype = DType::f32; }, {"fc1_experts_weights", "uint8"});
  bad_w([](ExpertWeights& w) { w.fc2_weights.shape = {E, H}; }, {"fc2_experts_weights", "rank 3"});
  bad_w([](ExpertWeights& w) { w.fc1_scales = {}; }, {"fc1_scales", "absent"});
  bad_w([](ExpertWeights& w) { w.fc1_scales.shape = {E, 2 * I}; }, {"fc1_scales", "[4, 64, 2]"});
  bad_w([](ExpertWeights& w) { w.fc2_scales.dtype = DType::u8; }, {"fc2_scales", "float32"});
  bad_w([](ExpertWeights& w) { w.fc1_bias.shape = {E, I}; }, {"fc1_experts_bias", "[4, 64]"});
  bad_w([](ExpertWeights& w) { w.fc2_bias.shape = {E + 1, H}; }, {"fc2_experts_bias", "[4, 64]"});
  bad_w([](ExpertWeights& w) { w.fc1_zero_points.shape = {E, 2 * I, 2}; }, {"fc1_zero_points", "[4, 64, 1]"});
  bad_w([](ExpertWeights& w) { w.fc2_zero_points.dtype = DType::f16; }, {"fc2_zero_points", "uint8"});
  bad_w([&](ExpertWeights& w) { w.fc3_weights = good.fc2_weights; }, {"fc3_experts_weights", "must be absent"});
  bad_w([](ExpertWeights& w) { w.fc1_weights.shape[0] = E + 1; },
        {"fc2_experts_weights", "[5, 64, 16]"});  // E disagrees
  bad_w([](ExpertWeights& w) { w.fc2_weights.data = nullptr; }, {"fc2_experts_weights", "null"});
  bad_w([](ExpertWeights& w) { w.fc2_bias.shape = {}; }, {"fc2_experts_bias", "0-d"});  // a scalar is not "absent"
  bad_a([](MoeAttributes& a) { a.k = E + 1; }, {"k", "1..num_experts"});
  bad_a([](MoeAttributes& a) { a.k = 0; }, {"k", ">= 1"});
  bad_a([](MoeAttributes& a) { a.expert_weight_bits = 2; }, {"expert_weight_bits", "4 or 8"});
  bad_a([](MoeAttributes& a) { a.block_size = 48; }, {"block_size", "power of two"});
  bad_a([](MoeAttributes& a) { a.block_size = 8; }, {"block_size", ">= 16"});
  bad_a([](MoeAttributes& a) { a.block_size = 64; }, {"block_size", "does not divide inter_size"});
  bad_a([](MoeAttributes& a) { a.use_sparse_mixer = 1; }, {"use_sparse_mixer", "not supported"});
  bad_a([](MoeAttributes& a) { a.swiglu_fusion = 3; }, {"swiglu_fusion", "0, 1 or 2"});
  bad_a([](MoeAttributes& a) { a.normalize_routing_weights = 2; }, {"normalize_routing_weights"});
  bad_a([](MoeAttributes& a) { a.swiglu_limit = -1.f; }, {"swiglu_limit", "positive"});
  bad_a([](MoeAttributes& a) { a.activation_alpha = NAN; }, {"activation_alpha", "finite"});
  bad_a([](MoeAttributes& a) { a.activation = Activation::relu; },
        {"swiglu_fusion", "unless activation_type is swiglu"});
  expect_error([&] { build(good, f.a, {Backend::cpu, -1, 0}); }, {"threads"});
  expect_error([&] { build(good, f.a, {Backend::cpu, 100000, 0}); }, {"threads", "0..1024"});
  expect_error([&] { build(good, f.a, {Backend::cpu, 1, 7}); }, {"accuracy_level", "0..4"});
  expect_error([] { parse_activation("swish"); }, {"activation_type", "swish"});
  cases += 4;
  EXPECT_GE(cases, 30);
}

TEST(Validation, RelayeredActivationNeedsMatchingFc1Rows) {
  Fixture f;
  MoeAttributes a = f.a;
  a.activation = Activation::relu;
  a.swiglu_fusion = 0;
  expect_error([&] { build(f.s.views(), a); }, {"fc1_experts_weights", "[4, 32, 32]", "[4, 64, 32]"});
}

TEST(Validation, SeparateUpProjectionRequiredForFusion0) {
  Fixture f(Activation::swiglu, 0);
  ExpertWeights w = f.s.views();
  EXPECT_NO_THROW(build(w, f.a));
  w.fc3_weights = {};
  expect_error([&] { build(w, f.a); }, {"fc3_experts_weights", "required"});
  w = f.s.views();
  w.fc3_scales.shape = {E, I};
  expect_error([&] { build(w, f.a); }, {"fc3_scales"});
}

TEST(Validation, RowwiseZeroPointsArePackedAcrossRows) {
  Fixture f(Activation::relu, 0, 0);
  ExpertWeights w = f.s.views();
  EXPECT_NO_THROW(build(w, f.a));
  w.fc2_zero_points.shape = {E, H};  // 4-bit row-wise: [E, ceil(H/2)]
  expect_error([&] { build(w, f.a); }, {"fc2_zero_points", "[4, 32]", "[4, 64]"});
}

TEST(Validation, ForwardInputs) {
  Fixture f;
  const Layer layer(f.s.views(), f.a, {Backend::cpu, 2, 0});
  const auto in = random_inputs(T, H, E, 1);
  std::vector<float> out(static_cast<std::size_t>(T * H));
  std::vector<std::uint16_t> half(static_cast<std::size_t>(T * H));
  const TensorView x = view_f32(in.x.data(), {T, H}), lg = view_f32(in.logits.data(), {T, E});
  const MutableTensorView o = output_f32(out.data(), {T, H});
  EXPECT_NO_THROW(layer.forward(x, lg, o));
  expect_error([&] { layer.forward(TensorView{}, lg, o); }, {"input", "absent"});
  expect_error([&] { layer.forward(view_f32(in.x.data(), {T, H / 2}), lg, o); }, {"input", "hidden_size 64"});
  expect_error([&] { layer.forward(view_f32(in.x.data(), {T * H}), lg, o); }, {"input", "rank"});
  expect_error([&] { layer.forward(TensorView(in.x.data(), DType::u8, {T, H}), lg, o); }, {"input", "uint8"});
  expect_error([&] { layer.forward(x, view_f32(in.logits.data(), {T, E - 1}), o); }, {"router_probs", "[3, 4]"});
  expect_error([&] { layer.forward(x, view_f32(in.logits.data(), {T - 1, E}), o); }, {"router_probs", "[3, 4]"});
  expect_error([&] { layer.forward(x, TensorView(half.data(), DType::f16, {T, E}), o); }, {"router_probs", "float16"});
  expect_error([&] { layer.forward(x, lg, view_f32(in.mix.data(), {T, E + 1}), o); }, {"router_weights", "[3, 4]"});
  expect_error([&] { layer.forward(x, lg, output_f32(out.data(), {T, H - 1})); }, {"output", "[3, 64]"});
  expect_error(
      [&] {
        layer.forward(x, lg, MutableTensorView(half.data(), DType::f16, {T, H}));
      },
      {"output", "float16"});
  expect_error([&] { layer.forward(x, lg, output_f32(nullptr, {T, H})); }, {"output", "null"});
  expect_error([&] { layer.forward(TensorView(nullptr, DType::f32, {T, H}), lg, o); }, {"input", "null"});
  expect_error([&] { layer.forward(x, lg, TensorView(in.mix.data(), DType::f32, {}), o); }, {"router_weights", "0-d"});
  // A refused call leaves the output untouched.
  std::vector<float> keep(out.size(), 42.f);
  expect_error(
      [&] {
        layer.forward(x, view_f32(in.logits.data(), {T, E - 1}), output_f32(keep.data(), {T, H}));
      },
      {"router_probs"});
  for (float v : keep) ASSERT_EQ(v, 42.f);
}

TEST(Validation, MovedFromLayerRefusesUse) {
  Fixture f;
  Layer a(f.s.views(), f.a, {Backend::cpu, 1, 0});
  Layer b = std::move(a);
  EXPECT_EQ(b.shape().hidden, H);
  expect_error([&] { (void)a.shape(); }, {"moved"});  // NOLINT(bugprone-use-after-move): that is the test
}

TEST(Validation, ReferenceValidatesLikeTheLayer) {
  Fixture f;
  const auto in = random_inputs(T, H, E, 1);
  MoeAttributes a = f.a;
  a.k = 9;
  expect_error(
      [&] {
        reference_forward(f.s.views(), a, view_f32(in.x.data(), {T, H}), view_f32(in.logits.data(), {T, E}));
      },
      {"k"});
  expect_error(
      [&] {
        reference_forward(f.s.views(), f.a, view_f32(in.x.data(), {T, H}), view_f32(in.logits.data(), {E, T}));
      },
      {"router_probs"});
}

}  // namespace
}  // namespace qmoe::test
