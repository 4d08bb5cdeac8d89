// Google Benchmark of the CPU tile-kernel path through the public API: one
// Layer::forward of gpt-oss-20b-sized experts (H = I = 2880, swiglu fusion 1,
// biases), with 8 experts instead of 32 so that setting up is quick.
//
//   bench_kernels                                  # all cases
//   bench_kernels --benchmark_filter='q4/T:1/'     # one case
//   QMOE_BENCH_THREADS=2 bench_kernels             # thread count of the "all" cases
//
// Reported: bytes_per_second = raw quantized bytes (codes, scales, biases) of
// the distinct experts each call touches; items_per_second = tokens.
// The weights (8 experts ~ 100 MB at 4-bit) exceed the last-level cache, and
// the calls cycle through 8 inputs with different routing, so consecutive
// calls do not find their experts still cached.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "synth.h"

namespace {

constexpr std::int64_t kHidden = 2880, kInter = 2880, kExperts = 8;
constexpr int kTopK = 4, kInputs = 8;

int all_threads() {
  if (const char* s = std::getenv("QMOE_BENCH_THREADS")) {
    const int n = std::atoi(s);
    if (n > 0) return n;
  }
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

qmoe::MoeAttributes attributes(int bits) {
  qmoe::MoeAttributes a;  // gpt-oss-20b's
  a.k = kTopK;
  a.activation = qmoe::Activation::swiglu;
  a.swiglu_fusion = 1;
  a.activation_alpha = 1.702f;
  a.activation_beta = 1.0f;
  a.swiglu_limit = 7.0f;
  a.normalize_routing_weights = 1;
  a.expert_weight_bits = bits;
  return a;
}

struct Built {
  std::unique_ptr<qmoe::Layer> layer;
  double bytes_per_expert = 0;
};

// One Layer per (bits, threads), built on first use; the raw weights are freed
// right after packing, as an application would.
const Built& layer_for(int bits, int threads) {
  static std::map<std::pair<int, int>, Built> cache;
  auto it = cache.find({bits, threads});
  if (it != cache.end()) return it->second;
  qmoe::tools::SynthOptions so;
  so.seed = 42;
  const auto raw = qmoe::tools::synth_layer(kExperts, kHidden, kInter, attributes(bits), so);
  qmoe::LayerOptions lo;
  lo.threads = threads;
  Built b;
  b.layer = std::make_unique<qmoe::Layer>(raw.views(), raw.attrs, lo);
  b.bytes_per_expert = static_cast<double>(raw.raw_bytes()) / kExperts;
  return cache.emplace(std::make_pair(bits, threads), std::move(b)).first->second;
}

struct Inputs {
  std::vector<std::vector<float>> x, logits;
  std::vector<std::int64_t> touched;  // distinct experts per input
};

Inputs make_inputs(std::int64_t t) {
  Inputs in;
  std::mt19937_64 rng(7 + static_cast<std::uint64_t>(t));
  for (int i = 0; i < kInputs; ++i) {
    std::vector<float> x(static_cast<std::size_t>(t * kHidden)), l(static_cast<std::size_t>(t * kExperts));
    qmoe::tools::fill_normal(x, rng, 1.0f);
    qmoe::tools::fill_normal(l, rng, 1.5f);
    std::vector<char> used(kExperts, 0);
    std::vector<int> idx(kExperts);
    for (std::int64_t r = 0; r < t; ++r) {
      const float* lr = &l[static_cast<std::size_t>(r * kExperts)];
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + kTopK, idx.end(),
                        [&](int a, int b) { return lr[a] > lr[b] || (lr[a] == lr[b] && a < b); });
      for (int j = 0; j < kTopK; ++j) used[static_cast<std::size_t>(idx[static_cast<std::size_t>(j)])] = 1;
    }
    in.touched.push_back(std::count(used.begin(), used.end(), 1));
    in.x.push_back(std::move(x));
    in.logits.push_back(std::move(l));
  }
  return in;
}

// Args: bits, tokens, threads (0 = all_threads()).
void BM_Forward(benchmark::State& state) {
  const int bits = static_cast<int>(state.range(0));
  const std::int64_t t = state.range(1);
  const int threads = state.range(2) ? static_cast<int>(state.range(2)) : all_threads();
  const Built& b = layer_for(bits, threads);
  const Inputs in = make_inputs(t);
  std::vector<float> out(static_cast<std::size_t>(t * kHidden));
  double bytes = 0;
  std::int64_t i = 0;
  for (auto _ : state) {
    const int j = static_cast<int>(i++ % kInputs);
    b.layer->forward(qmoe::view_f32(in.x[j].data(), {t, kHidden}), qmoe::view_f32(in.logits[j].data(), {t, kExperts}),
                     qmoe::output_f32(out.data(), {t, kHidden}));
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    bytes += b.bytes_per_expert * static_cast<double>(in.touched[j]);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.SetItemsProcessed(state.iterations() * t);
  state.SetLabel(std::string(b.layer->kernel_name()) + " threads=" + std::to_string(b.layer->threads()));
}

void Cases(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"q", "T", "threads"});
  for (int bits : {4, 8})
    for (int t : {1, 16})
      for (int th : {1, 0}) bm->Args({bits, t, th});
}

BENCHMARK(BM_Forward)->Apply(Cases)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
