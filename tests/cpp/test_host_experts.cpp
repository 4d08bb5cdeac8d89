// The CPU side of a CUDA Layer with host experts (LayerOptions::host_experts):
// a CpuMoe packed on an expert subset, run on rows already grouped by expert
// (HostExperts::run). Checked bit for bit against a whole-layer CpuMoe with
// k = 1 whose one-hot logits send the same rows to the same experts (its output
// is 0 + 1 * (y + bias2): exactly the host rows' y + bias2), and against the
// float64 reference; and the front's validation of host_experts.
#include <gtest/gtest.h>

#include <numeric>
#include <thread>

#include "cpu/moe.h"
#include "helpers.h"
#include "layer/backend.h"

namespace qmoe::test {
namespace {

struct HostCase {
  Activation act;
  int bits, block, level;
  std::vector<std::int64_t> counts;  // rows per host expert (in `experts` order)
  std::int64_t pass_rows = 0;        // > 0: CpuMoe's chunk budget set to this many rows (k = 1)
};

// k = 1: every row goes to one expert, with routing weight 1.
MoeAttributes one_expert_attrs(Activation act, int bits, int block) {
  MoeAttributes a;
  a.k = 1;
  a.activation = act;
  a.swiglu_fusion = act == Activation::swiglu ? 1 : 0;
  a.expert_weight_bits = bits;
  a.block_size = block;
  a.normalize_routing_weights = 1;
  return a;
}

void check(const HostCase& hc) {
  const std::int64_t e_all = 6, h = 64, in = 96;
  const std::vector<int> experts = {1, 2, 5};
  const MoeAttributes a = one_expert_attrs(hc.act, hc.bits, hc.block);
  tools::SynthOptions so;
  so.symmetric = false;  // zero points
  const tools::SynthLayer s = tools::synth_layer(e_all, h, in, a, so);
  const std::int64_t rows = std::accumulate(hc.counts.begin(), hc.counts.end(), std::int64_t{0});
  Inputs x = random_inputs(rows, h, e_all, 7);
  // One-hot logits: row r goes to the host expert of its group.
  std::vector<float> logits(static_cast<std::size_t>(rows * e_all), -30.f);
  std::int64_t r = 0;
  for (std::size_t i = 0; i < experts.size(); ++i)
    for (std::int64_t j = 0; j < hc.counts[i]; ++j, ++r) logits[r * e_all + experts[i]] = 30.f;

  std::vector<float> y(static_cast<std::size_t>(rows * h), NAN);
  const std::int64_t chunk = hc.pass_rows ? hc.pass_rows * (h + in) * 4 : cpu::CpuMoe::kDefaultChunkBytes;
  if (hc.pass_rows) {
    const cpu::CpuMoe part(s.views(), a, s.shape, 2, hc.level, chunk, nullptr, nullptr, false, &experts);
    part.run_rows(x.x.data(), hc.counts.data(), rows, y.data());
  } else {
    LayerOptions o;
    o.threads = 2;
    o.accuracy_level = hc.level;
    const auto host = detail::make_cpu_host_experts(s.views(), a, s.shape, o, experts, nullptr);
    host->run(x.x.data(), hc.counts.data(), rows, y.data());
  }

  const cpu::CpuMoe whole(s.views(), a, s.shape, 2, hc.level, chunk);
  std::vector<float> want(static_cast<std::size_t>(rows * h), NAN);
  whole.forward(view_f32(x.x.data(), {rows, h}), view_f32(logits.data(), {rows, e_all}), TensorView{},
                output_f32(want.data(), {rows, h}), rows);
  for (std::int64_t i = 0; i < rows * h; ++i) ASSERT_EQ(y[i], want[i]) << "element " << i << " (row " << i / h << ")";

  const std::vector<double> ref =
      reference_forward(s.views(), a, view_f32(x.x.data(), {rows, h}), view_f32(logits.data(), {rows, e_all}));
  EXPECT_LT(rel_l2(y, ref), hc.level == 4 ? 3e-2 : 1e-5);
}

TEST(HostExperts, SameBitsAsTheWholeLayer) {
  check({Activation::swiglu, 4, 32, 0, {3, 0, 5}});
  check({Activation::silu, 8, 0, 0, {1, 40, 2}});  // one expert past the reuse threshold
  check({Activation::swiglu, 4, 16, 4, {9, 2, 17}});
}

TEST(HostExperts, PassesSplitLargeExpertsTheSameWay) {
  // More rows than one pass holds: passes of 128 rows split expert 1's 300 into
  // 128 + 128 + 44, and the last pass takes the 44 with the other experts' rows,
  // as the whole layer's chunks of 128 tokens do with these rows.
  check({Activation::swiglu, 4, 32, 0, {300, 1, 2}, 128});
  check({Activation::relu, 8, 16, 4, {300, 1, 2}, 128});
}

TEST(HostExperts, StaleWorkspacesDoNotLeak) {
  // A CUDA call runs passes of different sizes on the same workspaces: the
  // results of a pass must not depend on what an earlier pass left there.
  const MoeAttributes a = one_expert_attrs(Activation::swiglu, 4, 32);
  const std::int64_t h = 128, in = 64;
  const tools::SynthLayer s = tools::synth_layer(8, h, in, a);
  const std::vector<int> experts = {0, 2, 4, 6};
  for (int level : {0, 4}) {
    LayerOptions o;
    o.threads = 2;
    o.accuracy_level = level;
    const auto host = detail::make_cpu_host_experts(s.views(), a, s.shape, o, experts, nullptr);
    auto run = [&](const std::vector<std::int64_t>& counts, std::uint64_t seed) {
      const std::int64_t rows = std::accumulate(counts.begin(), counts.end(), std::int64_t{0});
      const Inputs x = random_inputs(rows, h, 8, seed);
      std::vector<float> y(static_cast<std::size_t>(rows * h), NAN);
      host->run(x.x.data(), counts.data(), rows, y.data());
      return y;
    };
    const std::vector<float> first = run({37, 5, 70, 1}, 11);
    run({300, 200, 100, 90}, 12);
    run({3, 0, 1, 2}, 13);
    const std::vector<float> again = run({37, 5, 70, 1}, 11);
    for (std::size_t i = 0; i < first.size(); ++i)
      ASSERT_EQ(first[i], again[i]) << "level " << level << " element " << i;
  }
}

TEST(HostExperts, DefaultThreadsLeaveACoreToTheGpuThread) {
  // threads = 0: every hardware thread but one (the thread that drives the GPU
  // keeps a core); an explicit count is kept as given.
  const MoeAttributes a = one_expert_attrs(Activation::relu, 4, 0);
  const tools::SynthLayer s = tools::synth_layer(4, 64, 32, a);
  const unsigned hw = std::thread::hardware_concurrency();
  LayerOptions o;
  EXPECT_EQ(detail::make_cpu_host_experts(s.views(), a, s.shape, o, {1, 3}, nullptr)->threads(),
            hw > 1 ? static_cast<int>(hw) - 1 : 1);
  o.threads = 3;
  EXPECT_EQ(detail::make_cpu_host_experts(s.views(), a, s.shape, o, {1, 3}, nullptr)->threads(), 3);
}

// Building a Layer with `o` throws an Error whose message holds `what`.
void expect_refused(const tools::SynthLayer& s, const MoeAttributes& a, const LayerOptions& o,
                    const std::string& what) {
  try {
    const Layer l(s.views(), a, o);
    ADD_FAILURE() << "built a layer; expected an error with \"" << what << "\"";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
}

TEST(HostExperts, FrontValidatesTheList) {
  MoeAttributes a;
  a.k = 1;
  const tools::SynthLayer s = tools::synth_layer(4, 32, 16, a);
  LayerOptions o;
  o.host_experts = {1};
  expect_refused(s, a, o, "host_experts: only for the CUDA backend");
  o.host_experts = {};
  o.host_experts_gpu_from = 16;
  expect_refused(s, a, o, "host_experts_gpu_from: only for a CUDA layer");
  o.backend = Backend::cuda;
  expect_refused(s, a, o, "host_experts_gpu_from: only with host_experts");
  o.host_experts_gpu_from = -2;  // -1 = kMeasureCrossover
  o.host_experts = {1};
  expect_refused(s, a, o, "host_experts_gpu_from: expected tokens >= 0");
  o.host_experts_gpu_from = 0;
  for (const std::vector<int>& bad : {std::vector<int>{4}, std::vector<int>{-1}, std::vector<int>{2, 2}}) {
    o.host_experts = bad;
    expect_refused(s, a, o,
                   bad[0] == 2 ? "host_experts: expert 2 is named twice" : "host_experts: expected expert ids 0..3");
  }
}

}  // namespace
}  // namespace qmoe::test
