// Google Benchmark of the CPU engine, at two levels:
//
//  * BM_Tile: one tile kernel of one kernel table on one thread, over whole
//    experts of gpt-oss-20b's FC1 (5760 x 2880, 4- or 8-bit row-wise), cycling
//    through 16 experts (~130 MB at 4 bits, past the last-level cache) so that
//    few-token calls stream their weights from DRAM. Reported per call: weight
//    GB/s and GFLOP/s, and both against this machine's single-thread ceilings
//    measured at start-up (read bandwidth of a 1 GiB buffer, float32 FMA peak):
//    counters BW% and peak%. Kernels: f32 (accuracy_level 0), qd8 (int8
//    activations, level 4) and bf16 (AMX, level 3), for every table the CPU runs.
//  * BM_Forward: one Layer::forward of gpt-oss-20b-sized experts (H = I = 2880,
//    swiglu fusion 1, biases) with 8 experts, through the public API.
//
//   bench_kernels                                        # all cases
//   bench_kernels --benchmark_filter='BM_Tile/avx512/'   # one table
//   QMOE_BENCH_THREADS=2 bench_kernels                   # thread count of the "all" forward cases
//
// BM_Forward reports bytes_per_second = raw quantized bytes (codes, scales,
// biases) of the distinct experts each call touches; items_per_second = tokens.
// Its weights (8 experts ~ 100 MB at 4-bit) exceed the last-level cache, and
// the calls cycle through 8 inputs with different routing, so consecutive
// calls do not find their experts still cached.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "bench_inputs.h"
#include "cpu/kernels.h"
#include "cpu/moe.h"
#include "cpu/quant_act.h"
#include "qmoe/sysinfo.h"
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
    std::vector<char> used;
    in.touched.push_back(qmoe::cli::route_mask(l, t, kExperts, kTopK, used));
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

// ---- per-kernel benchmarks

constexpr std::int64_t kTileExperts = 16, kFc1Rows = 2 * kInter;  // gpt-oss FC1: gate and up rows

struct Ceilings {
  double read_gbs = 0, peak_gflops = 0;
};

const Ceilings& ceilings() {
  static const Ceilings c{qmoe::measure_read_bandwidth(1) / 1e9, qmoe::measure_peak_flops(1) / 1e9};
  return c;
}

// The packed FC1 of kTileExperts experts (one CpuMoe per bits: the packed layout is the
// same for every table, NR = 16), built on first use.
const qmoe::cpu::CpuMoe& packed_for(int bits) {
  static std::map<int, std::unique_ptr<qmoe::cpu::CpuMoe>> cache;
  auto& slot = cache[bits];
  if (!slot) {
    qmoe::tools::SynthOptions so;
    so.seed = 5;
    so.bias = false;
    const auto raw = qmoe::tools::synth_layer(kTileExperts, kHidden, kInter, attributes(bits), so);
    slot = std::make_unique<qmoe::cpu::CpuMoe>(raw.views(), raw.attrs,
                                               qmoe::MoeShape{kTileExperts, kHidden, kInter, kFc1Rows}, 1);
  }
  return *slot;
}

enum Kind { kF32 = 0, kQd8 = 1, kBf16 = 2 };
const char* const kKindNames[] = {"f32", "qd8", "bf16"};

// Args: table index (supported_kernel_configs order), kind, bits, tokens.
void BM_Tile(benchmark::State& state) {
  const auto tables = qmoe::cpu::supported_kernel_configs();
  const auto& kc = *tables[static_cast<std::size_t>(state.range(0))];
  const auto kind = static_cast<Kind>(state.range(1));
  const int bits = static_cast<int>(state.range(2));
  const std::int64_t ntok = state.range(3);
  const auto& m = packed_for(bits).fc1();
  const qmoe::cpu::PackGeometry& g = m.geometry();
  const std::int64_t kp = g.padded_cols(), kb = (kp + 31) / 32 * 32, tiles = g.tiles();
  std::vector<float> x(static_cast<std::size_t>(ntok * kp), 0.f);
  std::mt19937_64 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (std::int64_t t = 0; t < ntok; ++t)
    for (std::int64_t c = 0; c < g.cols; ++c) x[static_cast<std::size_t>(t * kp + c)] = nd(rng);
  std::vector<float> y(static_cast<std::size_t>(ntok * 32));
  std::vector<float> scratch(static_cast<std::size_t>(kc.f32.scratch_floats + qmoe::cpu::kBf16ScratchBytes / 4 + 16));
  qmoe::cpu::QuantRowsBuffer qb;
  std::vector<std::uint16_t> xb;
  if (kind == kQd8) {
    qmoe::cpu::resize_for(qb, ntok, g);
    kc.qd8.quantize_rows(x.data(), kp, 0, ntok, g, qb);
  }
  if (kind == kBf16) {  // A-tile order (kernels.h): blocks of 16 rows, K steps of 16 x 32
    xb.assign(static_cast<std::size_t>((ntok + 15) / 16 * 16 * kb), 0);
    std::vector<std::uint16_t> row(static_cast<std::size_t>(kb), 0);
    for (std::int64_t t = 0; t < ntok; ++t) {
      kc.bf16.to_bf16(x.data() + t * kp, row.data(), kp);
      for (std::int64_t s0 = 0; s0 < kb; s0 += 32)
        std::copy_n(row.data() + s0, 32, xb.data() + t / 16 * 16 * kb + s0 * 16 + t % 16 * 32);
    }
  }
  const qmoe::cpu::QuantRows qr = qb.view(g);
  const auto& f32 = kc.f32.gemm(bits);
  const auto& qd8 = kc.qd8.gemm(bits);
  const auto& bf16 = kc.bf16.gemm(bits);
  const char* kernel = kind == kF32 ? f32.name : kind == kQd8 ? qd8.name : bf16.name;
  std::int64_t e = 0;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    for (std::int64_t t = 0; t < tiles; t += 2) {
      const std::int64_t n = std::min<std::int64_t>(2, tiles - t);
      const std::uint8_t* tile = m.tile(e, t);
      switch (kind) {
        case kF32:
          f32.fn(g, tile, n, x.data(), kp, ntok, y.data(), 32, scratch.data());
          break;
        case kQd8:
          for (std::int64_t j = 0; j < n; ++j) qd8.fn(g, m.tile(e, t + j), qr, ntok, y.data() + 16 * j, 32);
          break;
        case kBf16:
          bf16.fn(g, tile, n, xb.data(), kb, ntok, y.data(), 32, scratch.data());
          break;
      }
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    e = (e + 1) % kTileExperts;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double calls = static_cast<double>(state.iterations());
  const double gbs = calls * static_cast<double>(g.expert_bytes()) / seconds / 1e9;
  const double gflops = calls * 2.0 * static_cast<double>(g.rows * g.cols * ntok) / seconds / 1e9;
  const Ceilings& c = ceilings();
  state.counters["GB/s"] = gbs;
  state.counters["GFLOP/s"] = gflops;
  state.counters["BW%"] = 100 * gbs / c.read_gbs;
  state.counters["peak%"] = 100 * gflops / c.peak_gflops;
  state.SetLabel(std::string(kc.name) + " " + kKindNames[kind] + " q" + std::to_string(bits) +
                 " T=" + std::to_string(ntok) + " " + kernel +
                 " (ceilings 1 thread: " + std::to_string(c.read_gbs).substr(0, 5) + " GB/s, " +
                 std::to_string(c.peak_gflops).substr(0, 6) + " GFLOP/s)");
}

// Registered at start-up for every table this CPU runs (names: BM_Tile/<table>/<kind>/q<bits>/T:<n>).
const bool kTilesRegistered = [] {
  const auto tables = qmoe::cpu::supported_kernel_configs();
  for (std::size_t i = 0; i < tables.size(); ++i)
    for (int kind : {kF32, kQd8, kBf16}) {
      if (kind == kBf16 && !tables[i]->has_bf16()) continue;
      for (int bits : {4, 8})
        for (int t : {1, 4, 16, 64}) {
          const std::string name = std::string("BM_Tile/") + tables[i]->name + "/" + kKindNames[kind] + "/q" +
                                   std::to_string(bits) + "/T:" + std::to_string(t);
          benchmark::RegisterBenchmark(name.c_str(), BM_Tile)
              ->Args({static_cast<std::int64_t>(i), kind, bits, t})
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime();
        }
    }
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
