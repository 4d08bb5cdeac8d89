#include "synth.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "shapes_json.h"

namespace qmoe::tools {

void fill_normal(std::vector<float>& v, std::mt19937_64& rng, float stddev) {
  std::normal_distribution<float> d(0.f, stddev);
  for (auto& x : v) x = d(rng);
}

namespace {

// splitmix64: decorrelated seeds for the independent streams of one layer.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Quantizes E experts of [N, K] and concatenates them. Every expert draws from
// its own stream (seeded by the layer seed, the matrix and the expert), so the
// experts are drawn and quantized in parallel, each with one [N, K] float
// buffer, and the result does not depend on the thread count.
QuantizedWeights quantize_experts(std::int64_t e, std::int64_t n, std::int64_t k, const QuantizeOptions& q,
                                  std::uint64_t seed, int matrix, double& err2, double& ref2,
                                  const std::function<void()>& per_expert) {
  std::vector<QuantizedWeights> parts(static_cast<std::size_t>(e));
  std::vector<double> perr2(static_cast<std::size_t>(e)), pref2(static_cast<std::size_t>(e));
  // Threads: the machine's, but at most ~4 GiB of float buffers at once.
  const double buffer = static_cast<double>(n) * static_cast<double>(k) * 4;
  const std::int64_t by_memory = std::max<std::int64_t>(1, static_cast<std::int64_t>(4.0 * (1ull << 30) / buffer));
  const std::int64_t nthreads =
      std::min({static_cast<std::int64_t>(std::max(1u, std::thread::hardware_concurrency())), by_memory, e});
  std::atomic<std::int64_t> next{0};
  std::mutex mu;
  std::exception_ptr error;
  auto work = [&] {
    try {
      std::vector<float> w(static_cast<std::size_t>(n * k));
      for (std::int64_t i; (i = next.fetch_add(1)) < e;) {
        std::mt19937_64 rng(mix(seed ^ mix(static_cast<std::uint64_t>(matrix) << 40 ^ static_cast<std::uint64_t>(i))));
        fill_normal(w, rng, 1.0f / std::sqrt(static_cast<float>(k)));
        parts[i] = quantize(view_f32(w.data(), {1, n, k}), q);
        double r2 = 0;
        for (float v : w) r2 += static_cast<double>(v) * v;
        perr2[i] = parts[i].rel_l2_error * parts[i].rel_l2_error * r2, pref2[i] = r2;
        std::lock_guard<std::mutex> lk(mu);
        if (per_expert) per_expert();
      }
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu);
      if (!error) error = std::current_exception();
      next.store(e);
    }
  };
  std::vector<std::thread> pool;
  for (std::int64_t t = 1; t < nthreads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);

  QuantizedWeights all = std::move(parts[0]);
  all.weights.reserve(all.weights.size() * static_cast<std::size_t>(e));
  all.scales.reserve(all.scales.size() * static_cast<std::size_t>(e));
  all.zero_points.reserve(all.zero_points.size() * static_cast<std::size_t>(e));
  for (std::int64_t i = 1; i < e; ++i) {
    const QuantizedWeights& one = parts[i];
    all.weights.insert(all.weights.end(), one.weights.begin(), one.weights.end());
    all.scales.insert(all.scales.end(), one.scales.begin(), one.scales.end());
    all.zero_points.insert(all.zero_points.end(), one.zero_points.begin(), one.zero_points.end());
    all.max_abs_error = std::max(all.max_abs_error, one.max_abs_error);
    parts[i] = {};  // release as we go
  }
  for (std::int64_t i = 0; i < e; ++i) err2 += perr2[i], ref2 += pref2[i];  // in expert order
  all.experts = e;
  return all;
}

}  // namespace

SynthLayer synth_layer(std::int64_t experts, std::int64_t hidden, std::int64_t inter, const MoeAttributes& attrs,
                       const SynthOptions& opt) {
  SynthLayer s;
  s.attrs = attrs;
  std::mt19937_64 rng(opt.seed);
  const bool swiglu = attrs.activation == Activation::swiglu;
  const std::int64_t n1 = swiglu && attrs.swiglu_fusion != 0 ? 2 * inter : inter;
  const QuantizeOptions q{attrs.expert_weight_bits, attrs.block_size, opt.symmetric};
  double err2 = 0, ref2 = 0;
  std::int64_t done = 0;
  const std::int64_t total = experts * (swiglu && attrs.swiglu_fusion == 0 ? 3 : 2);
  auto tick = [&] {
    ++done;
    if (opt.progress) opt.progress(done, total);
  };
  s.fc1 = quantize_experts(experts, n1, hidden, q, opt.seed, 1, err2, ref2, tick);
  s.fc2 = quantize_experts(experts, hidden, inter, q, opt.seed, 2, err2, ref2, tick);
  if (swiglu && attrs.swiglu_fusion == 0)
    s.fc3 = quantize_experts(experts, inter, hidden, q, opt.seed, 3, err2, ref2, tick);
  s.quant_rel_l2 = ref2 > 0 ? std::sqrt(err2 / ref2) : 0;
  if (opt.bias) {
    s.b1.resize(static_cast<std::size_t>(experts * n1));
    s.b2.resize(static_cast<std::size_t>(experts * hidden));
    fill_normal(s.b1, rng, 0.1f);
    fill_normal(s.b2, rng, 0.1f);
    if (swiglu && attrs.swiglu_fusion == 0) {
      s.b3.resize(static_cast<std::size_t>(experts * inter));
      fill_normal(s.b3, rng, 0.1f);
    }
  }
  s.shape = validate(s.views(), attrs);
  return s;
}

ExpertWeights SynthLayer::views() const {
  ExpertWeights w;
  const std::int64_t e = fc1.experts;
  w.fc1_weights = fc1.weights_view();
  w.fc1_scales = fc1.scales_view();
  w.fc1_zero_points = fc1.zero_points_view();
  w.fc2_weights = fc2.weights_view();
  w.fc2_scales = fc2.scales_view();
  w.fc2_zero_points = fc2.zero_points_view();
  if (!fc3.weights.empty()) {
    w.fc3_weights = fc3.weights_view();
    w.fc3_scales = fc3.scales_view();
    w.fc3_zero_points = fc3.zero_points_view();
  }
  if (!b1.empty()) w.fc1_bias = view_f32(b1.data(), {e, fc1.rows});
  if (!b2.empty()) w.fc2_bias = view_f32(b2.data(), {e, fc2.rows});
  if (!b3.empty()) w.fc3_bias = view_f32(b3.data(), {e, fc3.rows});
  return w;
}

std::size_t SynthLayer::raw_bytes() const {
  std::size_t n = 0;
  for (const auto* q : {&fc1, &fc2, &fc3}) n += q->weights.size() + q->scales.size() * 4 + q->zero_points.size();
  return n + (b1.size() + b2.size() + b3.size()) * 4;
}

std::vector<ModelShape> model_shapes(int bits, int block_size) {
  // tools/shapes.json, built in (see shapes_json.h.in): swiglu, fusion 1, normalized routing.
  const nlohmann::ordered_json table = nlohmann::ordered_json::parse(kShapesJson);  // in the file's order
  auto num = [](const nlohmann::ordered_json& v) {
    return v.is_string() && v.get<std::string>() == "inf" ? std::numeric_limits<float>::infinity() : v.get<float>();
  };
  std::vector<ModelShape> out;
  for (const auto& [name, m] : table.items()) {
    if (name.rfind('_', 0) == 0) continue;  // "_comment"
    MoeAttributes a;
    a.k = m.at("k").get<int>();
    a.activation = Activation::swiglu;
    a.swiglu_fusion = 1;
    a.activation_alpha = num(m.at("activation_alpha"));
    a.activation_beta = num(m.at("activation_beta"));
    a.swiglu_limit = num(m.at("swiglu_limit"));
    a.expert_weight_bits = bits;
    a.block_size = block_size >= 0 ? block_size : m.at("block_size").get<int>();
    a.normalize_routing_weights = 1;
    out.push_back({name, m.at("hidden").get<std::int64_t>(), m.at("inter").get<std::int64_t>(),
                   m.at("experts").get<std::int64_t>(), a});
  }
  return out;
}

ModelShape model_shape(const std::string& name, int bits, int block_size) {
  std::string names;
  for (auto& m : model_shapes(bits, block_size)) {
    if (m.name == name) return m;
    names += (names.empty() ? "" : ", ") + m.name;
  }
  throw Error("model: expected one of " + names + ", got \"" + name + "\"");
}

}  // namespace qmoe::tools
