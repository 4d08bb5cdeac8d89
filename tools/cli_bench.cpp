// `qmoe bench` (alias `qmoe demo`): synthesizes a quantized MoE layer of a
// reference shape, prepacks it, frees the raw weights, and measures forward()
// latency, throughput, weight bandwidth and error against the float64 reference.
//
// Order of work, chosen so the memory figures are honest:
//   1. synthesize the raw (ONNX Runtime layout) weights, expert by expert;
//   2. draw every input, and compute the float64 reference on the sample
//      tokens of every T while the raw weights are alive (the reference reads
//      them; its temporaries are freed before step 3);
//   3. RSS before Layer creation -> create the Layer -> RSS -> free the raw
//      weights -> RSS. Nothing else is allocated in between, so the first
//      difference is what the Layer holds and the second is what freeing the
//      raw weights gives back.
//   4. time forward() per T on the Layer alone, cycling through R input sets
//      with different routing so that a decode call reads its experts from
//      DRAM, not from the cache the previous call left warm (see rotate()).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <thread>

#include "bench_inputs.h"
#include "cli_commands.h"
#include "cli_util.h"
#include "synth.h"

namespace qmoe::cli {

namespace {

constexpr const char* kBenchHelp = R"(usage: qmoe bench [options]      (alias: qmoe demo)

Synthesizes a quantized MoE layer of a reference shape (Gaussian weights,
quantized expert by expert), prepacks it into a qmoe Layer, frees the raw
weights and times Layer::forward for each token count.

options:
  --model NAME       gpt-oss-20b (default), qwen3-30b-a3b, mixtral-8x7b, deepseek-v3
  --bits N           4 (default) or 8
  --block N          quantization block size: 0 = one scale per row; else a power
                     of two >= 16 dividing H and I (default: the model's; row-wise
                     for gpt-oss-20b)
  --zero-points      asymmetric quantization with zero points (default: symmetric)
  --threads N        forward() threads (default: all hardware threads)
  --accuracy-level N 0 (default) or 1: float32 activations; 4: int8 activations;
                     3: bfloat16 on CPUs with AMX, else float32; 2: float32
                     (ONNX Runtime's meaning)
  --tokens LIST      token counts T, comma-separated (default 1,16,512)
  --ref-tokens N     tokens per T checked against the float64 reference (default 4;
                     0 = skip the check)
  --seed S           random seed (default 1)
  --min-time SEC     time each T for at least SEC seconds and 5 runs (default 1)
  --max-time SEC     but stop timing a T after SEC seconds (default 10)
  --no-ceilings      skip measuring the machine's ceilings (read bandwidth of a
                     1 GiB buffer and float32 FMA peak, with the same threads;
                     a few seconds). Alias: --no-bandwidth
  --json FILE        also write the results as JSON to FILE
  --file FILE        run a layer stored in a qmoe file instead of a synthetic one
                     (its shape, bits, block and attributes come from the file;
                     --model, --bits, --block and --zero-points do not apply):
                     reports the load speed (from the page cache: the file is read
                     once before) and the peak RSS growth while prepacking
  --layer NAME       with --file: the layer to run (default: the file's first)
  --write-file FILE  synthesize the layer, write it to FILE as a qmoe file, free
                     it, then run it from FILE as with --file
  --help             this text

Inputs are N(0,1); router logits are N(0,1.5^2). For each T the tool draws R
input sets with different routing and cycles through them call by call, R large
enough that the experts the R sets touch together exceed 4x the last-level cache
(consecutive sets avoid each other's experts where possible; R <= 64), so that
small-T timings measure reads from DRAM, not from the cache.

Columns: "sets" is R; "experts" the mean number of distinct experts one call
touches. "weight GB/s" counts the bytes of the raw quantized weights (codes,
scales, zero points, biases) of the distinct experts a call touches, divided by
that call's time (median over the calls); "BW%" is that against the measured
read bandwidth. GFLOP/s counts 2 flops per weight per routed (token, expert)
pair over the median time; "peak%" is that against the measured FMA peak. A "*"
after the median marks a T during whose timing other processes (or the
hypervisor) kept more than 0.2 cores busy: on a shared machine, time it again.
)";

struct Timing {
  std::int64_t runs = 0;
  double median_s = 0, min_s = 0, warmup_s = 0;
  double median_gbps = 0;   // median over the calls of (that call's touched bytes / its time)
  Competition competition;  // what other processes used while the calls were timed
  double max_rel = NAN, rel_l2 = NAN;
};

// What loading a stored layer cost.
struct LoadFigures {
  double seconds = 0, gbps = 0;
  std::uint64_t bytes = 0;  // the layer's stored (raw) bytes
  std::size_t rss_before = 0, peak = 0;
  std::int64_t peak_growth = 0;  // peak RSS during the load - RSS before
  bool peak_reset = false;
};

// Builds `layer` from the file, after reading the file into the page cache
// (unmapped), with the RSS peak reset right before: the peak growth is what
// prepacking from the map costs in memory, the speed what it costs in time.
LoadFigures load_from_file(const File& f, const std::string& name, int threads, int accuracy_level,
                           std::optional<Layer>& layer) {
  LoadFigures r;
  {
    Progress p("reading the file into the page cache", true);
    read_into_page_cache(f.path());
    p.finish();
  }
  release_free_memory();
  r.rss_before = rss_bytes();
  r.peak_reset = reset_peak_rss();
  LayerOptions lo;
  lo.threads = threads;
  lo.accuracy_level = accuracy_level;
  Progress p("prepacking from the file", true);
  layer.emplace(f.load(name, lo));
  r.seconds = p.elapsed();
  p.finish();
  r.peak = peak_rss_bytes();
  r.bytes = f.layer(name).weight_bytes;
  r.gbps = static_cast<double>(r.bytes) / r.seconds / 1e9;
  r.peak_growth = static_cast<std::int64_t>(r.peak) - static_cast<std::int64_t>(r.rss_before);
  return r;
}

}  // namespace

int run_bench(const std::vector<std::string>& argv) {
  const Args args("bench", argv,
                  {{"--help", false},
                   {"--model", true},
                   {"--bits", true},
                   {"--block", true},
                   {"--zero-points", false},
                   {"--threads", true},
                   {"--accuracy-level", true},
                   {"--tokens", true},
                   {"--ref-tokens", true},
                   {"--seed", true},
                   {"--min-time", true},
                   {"--max-time", true},
                   {"--no-ceilings", false},
                   {"--no-bandwidth", false},
                   {"--json", true},
                   {"--file", true},
                   {"--layer", true},
                   {"--write-file", true}});
  if (args.flag("--help")) {
    std::fputs(kBenchHelp, stdout);
    return 0;
  }
  // ---- arguments (every check before any work)
  const std::optional<std::string> file_arg = args.value("--file"), layer_arg = args.value("--layer"),
                                   write_arg = args.value("--write-file");
  if (file_arg && write_arg) throw args.error("--file and --write-file exclude each other");
  if (layer_arg && !file_arg) throw args.error("--layer needs --file");
  if (file_arg &&
      (args.value("--model") || args.value("--bits") || args.value("--block") || args.flag("--zero-points")))
    throw args.error(
        "--file: the shape and quantization come from the file (drop --model, --bits, --block, "
        "--zero-points)");
  // A stored layer: opened (and validated) before any work.
  std::optional<File> file;
  std::string layer_name;
  if (file_arg) {
    file.emplace(File::open(*file_arg));
    if (file->layers().empty()) throw Error(*file_arg + ": the file holds no layer");
    layer_name = layer_arg.value_or(file->layers().front().name);
    (void)file->layer(layer_name);  // throws, listing the layers, when absent
  }
  const std::string model = file ? *file_arg + ":" + layer_name : args.value("--model").value_or("gpt-oss-20b");
  std::string names;
  bool known = false;
  for (const auto& m : tools::model_shapes(4, -1)) {
    known |= m.name == model;
    names += (names.empty() ? "" : ", ") + m.name;
  }
  if (!known && !file) throw args.error("--model: expected one of " + names + ", got '" + model + "'");
  const int bits =
      file ? file->layer(layer_name).attributes.expert_weight_bits : static_cast<int>(args.integer("--bits", 4, 0, 64));
  if (bits != 4 && bits != 8) throw args.error("--bits: expected 4 or 8, got " + std::to_string(bits));
  const int block_arg = static_cast<int>(args.integer("--block", -1, 0, 1 << 20));
  tools::ModelShape m;
  if (file) {
    const FileLayer& fl = file->layer(layer_name);
    m = tools::ModelShape{model, fl.shape.hidden, fl.shape.inter, fl.shape.num_experts, fl.attributes};
  } else {
    m = tools::model_shape(model, bits, block_arg);
  }
  const int block = m.attrs.block_size;
  if (block != 0 && !file) {
    if (block < 16 || (block & (block - 1)) != 0)
      throw args.error("--block: expected 0 or a power of two >= 16, got " + std::to_string(block));
    if (m.hidden % block != 0 || m.inter % block != 0)
      throw args.error(fmt("--block: %d must divide both H = %lld and I = %lld of %s", block,
                           static_cast<long long>(m.hidden), static_cast<long long>(m.inter), model.c_str()));
  }
  bool zero_points = args.flag("--zero-points");
  if (file)
    for (const FileTensor& t : file->layer(layer_name).tensors)
      zero_points |= t.name.size() > 12 && t.name.compare(t.name.size() - 12, 12, "_zero_points") == 0;
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const int threads = static_cast<int>(args.integer("--threads", hw, 1, 4096));
  const int accuracy_level = static_cast<int>(args.integer("--accuracy-level", 0, 0, 4));
  const std::vector<std::int64_t> token_counts = args.integer_list("--tokens", {1, 16, 512}, 1, 1 << 20);
  const std::int64_t ref_tokens = args.integer("--ref-tokens", 4, 0, 4096);
  const auto seed = static_cast<std::uint64_t>(args.integer("--seed", 1, 0, INT64_MAX));
  const double min_time = args.real("--min-time", 1.0), max_time = args.real("--max-time", 10.0);
  const bool skip_ceilings = args.flag("--no-ceilings") || args.flag("--no-bandwidth");
  const std::optional<std::string> json_path = args.value("--json");
  if (json_path && json_path->empty()) throw args.error("--json: expected a file name");
  std::ofstream json_file;
  if (json_path) {  // open now: a path that cannot be written fails before minutes of work
    json_file.open(*json_path);
    if (!json_file) throw args.error("--json: cannot write '" + *json_path + "'");
  }
  constexpr std::int64_t kMinRuns = 5;

  const std::int64_t h = m.hidden, in = m.inter, e = m.experts;
  const int k = m.attrs.k;
  std::printf("qmoe bench: %s  H=%lld I=%lld E=%lld k=%d  %d-bit %s%s, float32\n", model.c_str(),
              static_cast<long long>(h), static_cast<long long>(in), static_cast<long long>(e), k, bits,
              block ? fmt("block %d", block).c_str() : "row-wise", zero_points ? " with zero points" : " symmetric");
  std::printf("  attributes: %s\n", describe(m.attrs).c_str());
  const double load0 = load_average();
  std::printf("  machine: %u hardware threads, load average %.2f%s\n", hw, load0,
              load0 > 0.5 ? " (other processes have been running: timings may be noisy)" : "");
  const std::string cpu = cpu_model();
  if (!cpu.empty()) std::printf("  cpu: %s; kernels: %s\n", cpu.c_str(), cpu_kernel_isa());
  // The ceilings, measured with the threads forward() uses: the read bandwidth
  // bounds "weight GB/s" at small T, the FMA peak bounds GFLOP/s at large T.
  double bandwidth = 0, peak = 0;  // after the timings: the higher of two measurements
  if (!skip_ceilings) {
    std::fflush(stdout);  // the header first, then the progress line on stderr
    Progress p("measuring the read bandwidth and the FMA peak", true);
    bandwidth = measure_read_bandwidth(threads);
    peak = measure_peak_flops(threads);
    p.finish();
    std::printf(
        "  ceilings (%d threads): read bandwidth %.1f GB/s (1 GiB buffer), float32 FMA peak %.1f GFLOP/s (%s)\n",
        threads, bandwidth / 1e9, peak / 1e9, cpu_kernel_isa());
  }
  const std::size_t llc_sys = llc_bytes();
  const std::size_t llc = llc_sys ? llc_sys : std::size_t{64} << 20;
  const double rotate_target = 4.0 * static_cast<double>(llc);
  constexpr std::size_t kMaxSets = 64;
  std::printf("  last-level cache: %s%s; input sets per T rotate over > %s of experts (4x LLC, R <= %zu)\n",
              human_bytes(static_cast<double>(llc)).c_str(), llc_sys ? "" : " (not reported: assumed)",
              human_bytes(rotate_target).c_str(), kMaxSets);
  std::fflush(stdout);

  // ---- 1. raw weights
  tools::SynthOptions so;
  so.symmetric = !zero_points;
  so.seed = seed;
  tools::SynthLayer raw;
  if (!file) {
    Progress p(fmt("synthesizing + quantizing %lld experts", static_cast<long long>(e)));
    so.progress = [&](std::int64_t d, std::int64_t t) { p.update(d, t); };
    raw = tools::synth_layer(e, h, in, m.attrs, so);
    p.finish(fmt("weight quantization rel. L2 error %.3g", raw.quant_rel_l2));
  }
  if (write_arg) {  // store it, free it, and run it from the file
    {
      Progress p("writing " + *write_arg, true);
      save_file(*write_arg,
                {{"synthetic." + model, raw.views(), m.attrs, {}, {{"source", "qmoe bench --write-file"}}}});
      p.finish();
    }
    raw = tools::SynthLayer{};
    release_free_memory();
    file.emplace(File::open(*write_arg));
    layer_name = file->layers().front().name;
  }
  const std::size_t raw_bytes = file ? file->layer(layer_name).weight_bytes : raw.raw_bytes();
  const std::int64_t fc1_rows = file ? file->layer(layer_name).shape.fc1_rows : raw.shape.fc1_rows;
  // Multiply-adds per routed (token, expert) pair: FC1 (+ FC3) and FC2.
  const bool separate_up = m.attrs.activation == Activation::swiglu && m.attrs.swiglu_fusion == 0;
  const double macs_per_row = static_cast<double>(fc1_rows * h + h * in + (separate_up ? in * h : 0));
  const double bytes_per_expert = static_cast<double>(raw_bytes) / static_cast<double>(e);

  // ---- 2. inputs (R rotating sets per T) and the float64 reference on sample rows
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 12345);
  std::vector<Sample> samples;
  std::vector<float> ref_x, ref_l;
  for (std::int64_t t : token_counts) {
    Sample s;
    s.tokens = t;
    rotate(s, h, e, k, bytes_per_expert, rotate_target, kMaxSets, rng);
    // Sample rows spread over T, and over the sets in turn.
    const std::int64_t n = std::min(ref_tokens, t * static_cast<std::int64_t>(s.sets.size()));
    for (std::int64_t j = 0; j < n; ++j) {
      const std::size_t set = static_cast<std::size_t>(j) % s.sets.size();
      const std::int64_t row = n == 1 ? 0 : (j * (t - 1) / (n - 1));
      s.rows.emplace_back(set, row);
    }
    s.ref_offset = static_cast<std::int64_t>(ref_x.size()) / h;
    for (const auto& [set, r] : s.rows) {
      const InputSet& is = s.sets[set];
      ref_x.insert(ref_x.end(), is.x.begin() + r * h, is.x.begin() + (r + 1) * h);
      ref_l.insert(ref_l.end(), is.logits.begin() + r * e, is.logits.begin() + (r + 1) * e);
    }
    samples.push_back(std::move(s));
  }
  std::vector<double> ref;
  const std::int64_t ref_rows = static_cast<std::int64_t>(ref_x.size()) / h;
  auto compute_reference = [&](const ExpertWeights& w) {
    if (ref_rows == 0) return;
    Progress p(fmt("float64 reference on %lld sample tokens", static_cast<long long>(ref_rows)), true);
    ref = reference_forward(w, m.attrs, view_f32(ref_x.data(), {ref_rows, h}), view_f32(ref_l.data(), {ref_rows, e}));
    p.finish();
  };

  // ---- 3. Layer creation and memory
  std::optional<Layer> layer;
  std::optional<LoadFigures> lf;
  std::size_t rss_before = 0, rss_after_layer = 0, rss_after_free = 0;
  double pack_s = 0;
  if (file) {
    lf = load_from_file(*file, layer_name, threads, accuracy_level, layer);
    pack_s = lf->seconds;
    // The reference reads the stored weights through the map (after the load
    // figures, so its page reads do not count in them).
    compute_reference(file->weights(layer_name));
  } else {
    compute_reference(raw.views());
    release_free_memory();
    rss_before = rss_bytes();
    {
      Progress p("prepacking into a qmoe Layer", true);
      LayerOptions lo;
      lo.threads = threads;
      lo.accuracy_level = accuracy_level;
      layer.emplace(raw.views(), m.attrs, lo);
      pack_s = p.elapsed();
      p.finish();
    }
    rss_after_layer = rss_bytes();
    raw = tools::SynthLayer{};  // frees every raw buffer; the Layer must not need them
    release_free_memory();
    rss_after_free = rss_bytes();
  }
  const std::size_t packed = layer->packed_bytes();
  const double growth = static_cast<double>(rss_after_layer) - static_cast<double>(rss_before);
  const double drop = static_cast<double>(rss_after_layer) - static_cast<double>(rss_after_free);
  const bool no_copy = drop >= 0.9 * static_cast<double>(raw_bytes);

  std::printf("  kernel: %s   threads: %d   prepack: %.2f s\n", layer->kernel_name(), layer->threads(), pack_s);
  if (lf) {
    std::printf("load from %s (layer %s, %s file):\n", file->path().c_str(), layer_name.c_str(),
                human_bytes(static_cast<double>(file->size_bytes())).c_str());
    std::printf("  stored weights %s prepacked in %.3f s = %.2f GB/s (from the page cache, %d threads)\n",
                human_bytes(static_cast<double>(lf->bytes)).c_str(), lf->seconds, lf->gbps, threads);
    std::printf("  peak RSS growth while loading %s = packed %s %s%s\n",
                human_delta(static_cast<double>(lf->peak_growth)).c_str(),
                human_bytes(static_cast<double>(packed)).c_str(),
                human_delta(static_cast<double>(lf->peak_growth) - static_cast<double>(packed)).c_str(),
                lf->peak_reset ? "" : " (the peak could not be reset: it is the process's)");
  } else {
    std::printf("memory:\n");
    std::printf("  raw quantized weights          %11s  (ORT layout: codes, scales, zero points, biases)\n",
                human_bytes(static_cast<double>(raw_bytes)).c_str());
    std::printf("  packed weights (Layer)         %11s  (%.3f x raw)\n",
                human_bytes(static_cast<double>(packed)).c_str(),
                static_cast<double>(packed) / static_cast<double>(raw_bytes));
    std::printf("  RSS before Layer creation      %11s  (raw weights alive)\n",
                human_bytes(static_cast<double>(rss_before)).c_str());
    std::printf("  RSS after Layer creation       %11s  (%s = %.2f x packed size)\n",
                human_bytes(static_cast<double>(rss_after_layer)).c_str(), human_delta(growth).c_str(),
                growth / static_cast<double>(packed));
    std::printf("  RSS after freeing raw weights  %11s  (%s = %.2f x raw size: %s)\n",
                human_bytes(static_cast<double>(rss_after_free)).c_str(), human_delta(-drop).c_str(),
                drop / static_cast<double>(raw_bytes),
                no_copy ? "no copy of the raw weights kept" : "WARNING: less memory returned than the raw weights");
  }
  std::fflush(stdout);

  // ---- 4. timing, call by call through the input sets
  std::vector<Timing> timings;
  for (const Sample& s : samples) {
    const std::int64_t t = s.tokens;
    const std::size_t nsets = s.sets.size();
    std::vector<float> out(static_cast<std::size_t>(t * h));
    const MutableTensorView ov = output_f32(out.data(), {t, h});
    auto call = [&](std::size_t set) {
      const InputSet& is = s.sets[set];
      layer->forward(view_f32(is.x.data(), {t, h}), view_f32(is.logits.data(), {t, e}), ov);
    };
    Timing tm;
    Progress p(fmt("timing T=%lld (%zu input sets)", static_cast<long long>(t), nsets), true);
    // Warm-up: each set once; its output is checked against the reference on the sample rows.
    double max_d = 0, max_r = 0, d2 = 0, r2 = 0;
    for (std::size_t set = 0; set < nsets; ++set) {
      const double t0 = now_s();
      call(set);
      if (set == 0) tm.warmup_s = now_s() - t0;
      for (std::size_t j = 0; j < s.rows.size(); ++j) {
        if (s.rows[j].first != set) continue;
        for (std::int64_t c = 0; c < h; ++c) {
          const double q = out[static_cast<std::size_t>(s.rows[j].second * h + c)];
          const double r = ref[static_cast<std::size_t>((s.ref_offset + static_cast<std::int64_t>(j)) * h + c)];
          max_d = std::max(max_d, std::fabs(q - r)), max_r = std::max(max_r, std::fabs(r));
          d2 += (q - r) * (q - r), r2 += r * r;
        }
      }
    }
    if (!s.rows.empty()) tm.max_rel = max_d / max_r, tm.rel_l2 = std::sqrt(d2 / r2);
    std::vector<double> times, gbps;
    const CpuSnapshot snap = cpu_snapshot();
    const double t0 = now_s();
    for (std::size_t i = 0;; ++i) {
      const std::size_t set = i % nsets;
      const double a = now_s();
      call(set);
      const double dt = now_s() - a;
      times.push_back(dt);
      gbps.push_back(bytes_per_expert * static_cast<double>(s.sets[set].touched) / dt / 1e9);
      const double el = now_s() - t0;
      if ((static_cast<std::int64_t>(times.size()) >= kMinRuns && el >= min_time) || el >= max_time) break;
    }
    tm.competition = cpu_competition(snap, cpu_snapshot());
    tm.runs = static_cast<std::int64_t>(times.size());
    tm.median_s = median(times);
    tm.min_s = *std::min_element(times.begin(), times.end());
    tm.median_gbps = median(gbps);
    p.finish(fmt("%lld runs, median %.3f ms", static_cast<long long>(tm.runs), 1e3 * tm.median_s));
    timings.push_back(tm);
  }

  // ---- 5. results
  auto gflops_of = [&](const Sample& s, const Timing& tm) {
    return 2 * macs_per_row * static_cast<double>(s.tokens * k) / tm.median_s / 1e9;
  };
  auto pct = [](double v, double ceiling) { return ceiling > 0 ? fmt("%.0f", 100 * v / ceiling) : std::string("-"); };
  // Measure the ceilings again and keep the higher values: on a shared machine a
  // measurement can only come out low, and a low ceiling would flatter BW% and peak%.
  double bandwidth2 = 0, peak2 = 0;
  if (!skip_ceilings) {
    Progress p("measuring the ceilings again", true);
    bandwidth2 = measure_read_bandwidth(threads);
    peak2 = measure_peak_flops(threads);
    p.finish();
    std::printf(
        "\nceilings: read bandwidth %.1f GB/s, FMA peak %.1f GFLOP/s (%d threads; the higher of two "
        "measurements: %.1f, %.1f GB/s; %.1f, %.1f GFLOP/s)\n",
        std::max(bandwidth, bandwidth2) / 1e9, std::max(peak, peak2) / 1e9, threads, bandwidth / 1e9, bandwidth2 / 1e9,
        peak / 1e9, peak2 / 1e9);
  }
  const double bandwidth1 = bandwidth, peak1 = peak;
  bandwidth = std::max(bandwidth, bandwidth2), peak = std::max(peak, peak2);
  std::printf("\n%6s %4s %5s %10s %10s %10s %11s %12s %4s %9s %5s %16s %9s\n", "T", "sets", "runs", "median ms",
              "min ms", "tokens/s", "experts", "weight GB/s", "BW%", "GFLOP/s", "peak%", "max|d|/max|ref|", "rel L2");
  for (std::size_t i = 0; i < samples.size(); ++i) {
    const Sample& s = samples[i];
    const Timing& tm = timings[i];
    const double gflops = gflops_of(s, tm);
    const bool busy = tm.competition.other_cores + tm.competition.steal_cores > 0.2;
    std::printf("%6lld %4zu %5lld %9.3f%c %10.3f %10.1f %6.1f/%-4lld %12.2f %4s %9.1f %5s %16s %9s\n",
                static_cast<long long>(s.tokens), s.sets.size(), static_cast<long long>(tm.runs), 1e3 * tm.median_s,
                busy ? '*' : ' ', 1e3 * tm.min_s, static_cast<double>(s.tokens) / tm.median_s, s.touched_mean,
                static_cast<long long>(e), tm.median_gbps, pct(tm.median_gbps * 1e9, bandwidth).c_str(), gflops,
                pct(gflops * 1e9, peak).c_str(), std::isnan(tm.max_rel) ? "-" : fmt("%.2e", tm.max_rel).c_str(),
                std::isnan(tm.rel_l2) ? "-" : fmt("%.2e", tm.rel_l2).c_str());
  }
  std::printf(
      "(sets: input sets cycled call by call; experts: distinct experts per call, mean over the sets; weight\n"
      " GB/s: a call's touched expert bytes / its time, median over the calls)\n");
  if (ref_tokens > 0)
    std::printf("(error: qmoe float32 vs the float64 reference on up to %lld sampled token(s) per T)\n",
                static_cast<long long>(ref_tokens));
  else
    std::printf("(no reference check: --ref-tokens 0)\n");
  const double load1 = load_average();
  double worst = 0;
  for (const Timing& tm : timings) worst = std::max(worst, tm.competition.other_cores + tm.competition.steal_cores);
  if (worst > 0.2)
    std::printf(
        "*: other processes (or the hypervisor) kept more than 0.2 cores busy while that T was timed "
        "(up to %.2f): the figures are noisy\n",
        worst);

  if (json_path) {
    Json j;
    j.begin_object();
    j.field("tool", "qmoe bench").field("version", QMOE_CLI_VERSION).field("model", model);
    j.begin_object("shape").field("hidden", h).field("inter", in).field("experts", e).field("k", k).end_object();
    j.field("attributes", describe(m.attrs)).field("bits", bits).field("block_size", block);
    j.field("zero_points", zero_points).field("dtype", "float32").field("seed", static_cast<std::int64_t>(seed));
    j.begin_object("machine")
        .field("hardware_threads", static_cast<std::int64_t>(hw))
        .field("load_average_start", load0)
        .field("load_average_end", load1)
        .field("cpu_model", cpu)
        .field("cpu_kernel_isa", cpu_kernel_isa())
        .field("llc_bytes", llc)
        .field("llc_reported", llc_sys != 0)
        .field("read_bandwidth_gbps", bandwidth / 1e9)
        .field("fma_peak_gflops", peak / 1e9)
        .field("read_bandwidth_gbps_measured_before", bandwidth1 / 1e9)
        .field("read_bandwidth_gbps_measured_after", bandwidth2 / 1e9)
        .field("fma_peak_gflops_measured_before", peak1 / 1e9)
        .field("fma_peak_gflops_measured_after", peak2 / 1e9)
        .field("ceilings_threads", threads)
        .end_object();
    j.field("rotation_target_bytes", rotate_target);
    j.field("kernel", layer->kernel_name()).field("threads", layer->threads()).field("prepack_s", pack_s);
    j.field("accuracy_level", static_cast<std::int64_t>(accuracy_level));
    j.begin_object("memory")
        .field("raw_bytes", raw_bytes)
        .field("packed_bytes", packed)
        .field("rss_before_layer", rss_before)
        .field("rss_after_layer", rss_after_layer)
        .field("rss_after_free_raw", rss_after_free)
        .field("rss_growth_over_packed", growth / static_cast<double>(packed))
        .field("rss_drop_over_raw", drop / static_cast<double>(raw_bytes))
        .field("no_copy_of_raw_kept", no_copy)
        .end_object();
    if (lf) {
      j.begin_object("load")
          .field("file", file->path())
          .field("layer", layer_name)
          .field("file_bytes", static_cast<std::size_t>(file->size_bytes()))
          .field("stored_bytes", static_cast<std::size_t>(lf->bytes))
          .field("seconds", lf->seconds)
          .field("gbps", lf->gbps)
          .field("rss_before", lf->rss_before)
          .field("peak_rss", lf->peak)
          .field("peak_rss_growth", lf->peak_growth)
          .field("peak_growth_minus_packed", lf->peak_growth - static_cast<std::int64_t>(packed))
          .field("peak_was_reset", lf->peak_reset)
          .end_object();
    }
    j.begin_array("results");
    for (std::size_t i = 0; i < samples.size(); ++i) {
      const Sample& s = samples[i];
      const Timing& tm = timings[i];
      const double touched_bytes = bytes_per_expert * s.touched_mean;
      const double gflops = gflops_of(s, tm);
      j.begin_object()
          .field("tokens", s.tokens)
          .field("input_sets", s.sets.size())
          .field("runs", tm.runs)
          .field("warmup_ms", 1e3 * tm.warmup_s)
          .field("median_ms", 1e3 * tm.median_s)
          .field("min_ms", 1e3 * tm.min_s)
          .field("tokens_per_s", static_cast<double>(s.tokens) / tm.median_s)
          .field("experts_touched_mean", s.touched_mean)
          .field("experts_touched_all_sets", s.union_experts)
          .field("weight_bytes_per_call_mean", touched_bytes)
          .field("weight_gbps", tm.median_gbps)
          .field("bandwidth_fraction", bandwidth > 0 ? tm.median_gbps * 1e9 / bandwidth : NAN)
          .field("gflops", gflops)
          .field("peak_fraction", peak > 0 ? gflops * 1e9 / peak : NAN)
          .field("other_processes_cores", tm.competition.other_cores)
          .field("steal_cores", tm.competition.steal_cores)
          .field("ref_tokens", static_cast<std::int64_t>(s.rows.size()))
          .field("max_abs_err_over_max_ref", tm.max_rel)
          .field("rel_l2_err", tm.rel_l2)
          .end_object();
    }
    j.end_array().end_object();
    json_file << j.str();
    json_file.close();
    if (!json_file) throw Error("--json: could not write '" + *json_path + "'");
    std::printf("wrote %s\n", json_path->c_str());
  }
  return 0;
}

}  // namespace qmoe::cli
