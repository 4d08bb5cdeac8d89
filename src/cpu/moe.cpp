// The CPU MoE driver: packing at construction, then per call route -> plan -> gather ->
// FC1 (+bias, activation) -> FC2 -> combine (+bias, routing weight), a chunk of tokens at a
// time. The plan and the combine are plan.h's; gather, FC1 and FC2 are the layer's ExpertPath
// (path.h: float32, int8 activations or bf16 on AMX, chosen once here).
//
// Determinism: every output element is produced by exactly one work item, and the combine
// adds the experts of a token in ascending expert order, so the bits of the result do not
// depend on the thread count or on scheduling.
#include "cpu/moe.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "core/check.h"
#include "cpu/pack.h"
#include "cpu/plan.h"
#include "quant/raw.h"

namespace qmoe::cpu {

namespace {

int resolve_threads(int threads) {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? static_cast<int>(hw) : 1;
}

}  // namespace

CpuMoe::CpuMoe(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s, int threads, int accuracy_level,
               std::int64_t chunk_bytes, const KernelConfig* kernels, const detail::ReleaseFn* release, bool profile,
               const std::vector<int>* experts)
    : attrs_(a),
      shape_(s),
      subset_(experts != nullptr),
      kc_(kernels ? kernels : &kernel_config()),
      profile_(profile),
      chunk_bytes_(chunk_bytes),
      path_(make_expert_path(*kc_, a.expert_weight_bits, accuracy_level)) {
  using detail::RawMatrix;
  const int bits = a.expert_weight_bits, bs = a.block_size;
  const std::int64_t h = s.hidden, in = s.inter;
  // Slot e holds expert source(e): all experts, or the given subset in its order.
  const std::int64_t e_count = experts ? static_cast<std::int64_t>(experts->size()) : s.num_experts;
  auto source_expert = [&](std::int64_t e) -> std::int64_t { return experts ? (*experts)[e] : e; };
  slots_ = e_count;
  const bool gated = a.activation == Activation::swiglu;  // FC1 tiles hold interleaved gate/up rows
  const RawMatrix fc1(w.fc1_weights, w.fc1_scales, w.fc1_zero_points, bits, bs, s.fc1_rows, h);
  const RawMatrix fc2(w.fc2_weights, w.fc2_scales, w.fc2_zero_points, bits, bs, h, in);
  RawMatrix fc3;
  if (gated && a.swiglu_fusion == 0) fc3 = RawMatrix(w.fc3_weights, w.fc3_scales, w.fc3_zero_points, bits, bs, in, h);

  // Packed FC1 row p: for swiglu, gate i at 2i and up i at 2i+1 whatever the fusion.
  auto fc1_source = [&](std::int64_t p) -> RowSource {
    if (!gated) return {&fc1, p};
    const std::int64_t i = p / 2;
    const bool up = p % 2 == 1;
    switch (a.swiglu_fusion) {
      case 1:
        return {&fc1, p};
      case 2:
        return {&fc1, up ? in + i : i};
      default:
        return up ? RowSource{&fc3, i} : RowSource{&fc1, i};
    }
  };
  constexpr int nr = kTileRows;
  const PackGeometry g1{bits, gated ? 2 * in : in, h, bs ? bs : h};
  const PackGeometry g2{bits, h, in, bs ? bs : in};
  layer_.fc1 = PackedMatrix(g1, kc_->isa, e_count);
  layer_.fc2 = PackedMatrix(g2, kc_->isa, e_count);
  pool_ = std::make_unique<ThreadPool>(resolve_threads(threads));
  // Stream expert by expert (in parallel over experts): nothing but the packed
  // form is kept, so the caller can release the raw weights right after.
  // With `release`, the raw rows a run of tiles read are handed back right
  // after it is packed (weights, scales and block-wise zero points are row
  // major, so the rows of one source form one byte range per tensor).
  auto release_rows = [&](const RawMatrix& m, std::int64_t e, std::int64_t r0, std::int64_t r1) {
    if (r1 <= r0) return;
    const std::int64_t row = e * m.rows + r0, n = r1 - r0;
    const std::int64_t wb = m.cols * m.bits / 8, sb = m.blocks() * static_cast<std::int64_t>(dtype_size(m.scale_dtype));
    (*release)(m.weights + row * wb, static_cast<std::size_t>(n * wb));
    (*release)(static_cast<const std::uint8_t*>(m.scales) + row * sb, static_cast<std::size_t>(n * sb));
    if (m.zero_points && bs) {
      const std::int64_t zb = (m.blocks() * bits + 7) / 8;
      (*release)(m.zero_points + row * zb, static_cast<std::size_t>(n * zb));
    }
  };
  // Packed rows [p0, p1) of a matrix read raw rows [p0, p1) of one source, or for
  // swiglu (gate at even, up at odd packed rows) half as many rows of two.
  auto release_packed = [&](std::int64_t e, std::int64_t p0, std::int64_t p1, auto&& source, bool gated) {
    for (int parity = 0; parity < (gated ? 2 : 1); ++parity) {
      std::int64_t q0 = p0, q1 = p1 - 1;
      if (gated) {
        if (q0 % 2 != parity) ++q0;
        if (q1 % 2 != parity) --q1;
      }
      if (q1 < q0) continue;
      const RowSource a = source(q0), b = source(q1);
      release_rows(*a.src, e, a.row, b.row + 1);
    }
  };
  // Work items of at most kPackChunkTiles tiles of one expert's FC1 or FC2, so
  // that every thread has work even with few experts (mixtral has 8).
  auto src2 = [&](std::int64_t p) { return RowSource{&fc2, p}; };
  const std::int64_t chunks1 = (g1.tiles() + kPackChunkTiles - 1) / kPackChunkTiles;
  const std::int64_t chunks2 = (g2.tiles() + kPackChunkTiles - 1) / kPackChunkTiles;
  pool_->parallel_for(e_count * (chunks1 + chunks2), [&](std::int64_t item, int) {
    const std::int64_t slot = item / (chunks1 + chunks2), c = item % (chunks1 + chunks2);
    const std::int64_t e = source_expert(slot);
    const bool first = c < chunks1;
    const PackGeometry& g = first ? g1 : g2;
    const std::int64_t t0 = (first ? c : c - chunks1) * kPackChunkTiles;
    const std::int64_t t1 = std::min(t0 + kPackChunkTiles, g.tiles());
    auto progress = [&](std::int64_t a0, std::int64_t a1) {
      if (!release) return;
      if (first)
        release_packed(e, a0 * nr, std::min(a1 * nr, g1.rows), fc1_source, gated);
      else
        release_packed(e, a0 * nr, std::min(a1 * nr, g2.rows), src2, false);
    };
    if (first)
      pack_tiles(g1, e, fc1_source, layer_.fc1.expert(slot), t0, t1, progress);
    else
      pack_tiles(g2, e, src2, layer_.fc2.expert(slot), t0, t1, progress);
  });

  // Biases in packed row order (FC3's bias becomes the "up" rows' bias).
  const std::int64_t pad1 = g1.tiles() * nr, pad2 = g2.tiles() * nr;
  std::vector<float>& bias1 = layer_.bias1;
  std::vector<float>& bias2 = layer_.bias2;
  bias1.assign(static_cast<std::size_t>(e_count * pad1), 0.f);
  bias2.assign(static_cast<std::size_t>(e_count * pad2), 0.f);
  for (std::int64_t slot = 0; slot < e_count; ++slot) {
    const std::int64_t e = source_expert(slot);
    for (std::int64_t p = 0; p < g1.rows; ++p) {
      const RowSource src = fc1_source(p);
      const TensorView& b = src.src == &fc3 ? w.fc3_bias : w.fc1_bias;
      if (b.present()) bias1[slot * pad1 + p] = detail::load_float(b.data, b.dtype, e * src.src->rows + src.row);
    }
    if (w.fc2_bias.present())
      for (std::int64_t p = 0; p < h; ++p)
        bias2[slot * pad2 + p] = detail::load_float(w.fc2_bias.data, w.fc2_bias.dtype, e * h + p);
  }
  layer_.epilogue = {a.activation, a.activation_alpha, a.activation_beta, a.swiglu_limit};
  layer_.gated = gated;
  layer_.hidden = h, layer_.inter = in;
  name_ = std::string("cpu/") + kc_->name + " nr=" + std::to_string(nr) + path_->label();
}

std::size_t CpuMoe::packed_bytes() const {
  return layer_.fc1.bytes() + layer_.fc2.bytes() + (layer_.bias1.size() + layer_.bias2.size()) * sizeof(float);
}

// With LayerOptions::profile (QMOE_PROFILE=1), the time of each phase of every
// call goes to stderr (for tuning); off, a clock costs nothing.
struct PhaseClock {
  explicit PhaseClock(bool enabled)
      : on(enabled), t(on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{}) {}
  bool on;
  std::chrono::steady_clock::time_point t;
  std::string line;
  void mark(const char* what) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    line +=
        std::string(what) + " " + std::to_string(std::chrono::duration<double, std::milli>(now - t).count()) + " ms  ";
    t = now;
  }
  ~PhaseClock() {
    if (on && !line.empty()) std::fprintf(stderr, "qmoe profile: %s\n", line.c_str());
  }
};

CpuMoe::WorkspacePtr CpuMoe::acquire() const {
  {
    std::lock_guard<std::mutex> lk(ws_mutex_);
    if (!ws_free_.empty()) {
      WorkspacePtr w = std::move(ws_free_.back());
      ws_free_.pop_back();
      return w;
    }
  }
  return std::make_unique<Workspace>();
}

void CpuMoe::release(WorkspacePtr w) const {
  std::lock_guard<std::mutex> lk(ws_mutex_);
  ws_free_.push_back(std::move(w));
}

void CpuMoe::forward(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                     const MutableTensorView& out, std::int64_t t) const {
  detail::require(!subset_, "CpuMoe: a layer built on an expert subset serves run_rows() only");
  const std::int64_t h = shape_.hidden;
  PhaseClock total{profile_};
  const Lease lease{this, acquire()};
  Workspace& ws = *lease.w;
  // float32 views of the inputs (converted at the edge when float16/bfloat16).
  auto as_f32 = [](const TensorView& v, std::vector<float>& buf) -> const float* {
    if (v.dtype == DType::f32) return static_cast<const float*>(v.data);
    float* dst = grow(buf, v.numel());
    detail::to_f32(v.data, v.dtype, v.numel(), dst);
    return dst;
  };
  const float* x = as_f32(input, ws.xbuf);
  const float* logits = as_f32(router_probs, ws.lbuf);
  const float* mix = router_weights.present() ? as_f32(router_weights, ws.mbuf) : nullptr;
  float* o = out.dtype == DType::f32 ? static_cast<float*>(out.data) : grow(ws.obuf, t * h);
  // Tokens in chunks so the gathered inputs and FC1 activations stay within a fixed budget.
  const std::int64_t per_token = attrs_.k * (shape_.inter + shape_.hidden) * static_cast<std::int64_t>(sizeof(float));
  const std::int64_t chunk = std::max<std::int64_t>(1, chunk_bytes_ / per_token);
  for (std::int64_t t0 = 0; t0 < t; t0 += chunk) {
    const std::int64_t t1 = std::min(t, t0 + chunk);
    run_chunk(ws, x, logits, mix, t0, t1, o);
  }
  if (out.dtype != DType::f32) detail::from_f32(o, t * h, out.dtype, out.data);
  total.mark("forward");
}

void CpuMoe::run_chunk(Workspace& ws, const float* x, const float* logits, const float* mix, std::int64_t t0,
                       std::int64_t t1, float* out) const {
  PhaseClock clock{profile_};
  const Plan plan = make_plan(*pool_, logits, mix, t0, t1, static_cast<int>(shape_.num_experts), attrs_.k,
                              attrs_.normalize_routing_weights != 0);
  const float* y2 = run_experts(ws, plan, x, clock);
  combine(*pool_, plan, y2, layer_.bias2.data(), layer_.fc2.geometry().tiles() * kTileRows, shape_.hidden, out);
  clock.mark("combine");
}

const float* CpuMoe::run_experts(Workspace& ws, const Plan& plan, const float* x, PhaseClock& clock) const {
  const PackGeometry& g1 = layer_.fc1.geometry();
  const PackGeometry& g2 = layer_.fc2.geometry();
  Chunk c{.plan = plan, .layer = layer_, .pool = *pool_, .ws = ws, .kc = *kc_};
  // Kernels read whole code groups: activation rows are zero-padded to the packed width.
  c.hp = g1.padded_cols(), c.ip = g2.padded_cols();
  c.pad1 = g1.tiles() * kTileRows, c.pad2 = g2.tiles() * kTileRows;
  c.xg = grow(ws.xg, plan.rows * c.hp);
  c.act = grow(ws.act, plan.rows * c.ip);
  path_->gather(c, x);
  // Per-thread scratch: the float kernels', then the outputs of an FC1 call, then the path's own.
  const auto nthreads = static_cast<std::size_t>(pool_->size());
  if (ws.scratch.size() < nthreads) ws.scratch.resize(nthreads);
  c.ybuf_floats = plan.max_count * kTileRows * kFc1Tiles;
  c.scratch_need = kc_->f32.scratch_floats + c.ybuf_floats + path_->path_scratch_floats();
  clock.mark("route+plan+gather");
  path_->fc1_inputs(c);
  clock.mark("fc1-inputs");
  path_->fc1(c);
  clock.mark("fc1");
  path_->fc2_inputs(c);
  c.y2 = grow(ws.y2, plan.rows * c.pad2);
  clock.mark("fc2-inputs");
  path_->fc2(c);
  clock.mark("fc2");
  return c.y2;
}

void CpuMoe::run_rows(const float* x, const std::int64_t* counts, std::int64_t rows, float* y) const {
  const std::int64_t slots = slots_, h = shape_.hidden;
  const std::int64_t pad2 = layer_.fc2.geometry().tiles() * kTileRows;
  PhaseClock total{profile_};
  const Lease lease{this, acquire()};
  // Passes of whole experts up to the chunk budget; an expert with more rows
  // than that alone, in pieces of exactly `limit` rows and a last one (so a
  // row's pass depends only on its index among its expert's rows).
  const std::int64_t per_row = (shape_.inter + shape_.hidden) * static_cast<std::int64_t>(sizeof(float));
  const std::int64_t limit = std::max<std::int64_t>(1, chunk_bytes_ / per_row);
  std::vector<std::int64_t> pass_counts(static_cast<std::size_t>(slots));
  std::int64_t r0 = 0;
  std::int64_t e = 0, done_in_e = 0;  // the next row: expert e, its row done_in_e
  while (r0 < rows) {
    std::fill(pass_counts.begin(), pass_counts.end(), 0);
    std::int64_t n = 0;
    while (e < slots) {
      const std::int64_t left = counts[e] - done_in_e;
      if (left == 0) {
        ++e, done_in_e = 0;
        continue;
      }
      if (n > 0 && n + left > limit) break;  // the next expert starts the next pass
      const std::int64_t take = std::min(left, limit - n);
      pass_counts[e] = take, n += take, done_in_e += take;
      if (done_in_e < counts[e]) break;  // a large expert: its next piece is the next pass
    }
    detail::require(n > 0 && r0 + n <= rows, "host experts: counts do not add up to ", rows, " rows");
    const Plan plan = plan_rows(pass_counts.data(), static_cast<int>(slots), n);
    const float* y2 = run_experts(*lease.w, plan, x + r0 * h, total);
    const float* b2 = layer_.bias2.data();
    pool_->parallel_for(n, [&](std::int64_t r, int) {
      const float* yr = y2 + r * pad2;
      const float* br = b2 + plan.row_expert[r] * pad2;
      float* dst = y + (r0 + r) * h;
      for (std::int64_t q = 0; q < h; ++q) dst[q] = yr[q] + br[q];
    });
    r0 += n;
  }
  detail::require(r0 == rows, "host experts: counts do not add up to ", rows, " rows");
  total.mark("host-experts");
}

}  // namespace qmoe::cpu

namespace qmoe::detail {

std::unique_ptr<LayerBackend> make_cpu_backend(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s,
                                               const LayerOptions& o, const ReleaseFn* release) {
  const cpu::KernelConfig& kc = cpu::kernel_config_named(o.cpu_kernels, "cpu_kernels (QMOE_CPU_ISA)");
  return std::make_unique<cpu::CpuMoe>(w, a, s, o.threads, o.accuracy_level, cpu::CpuMoe::kDefaultChunkBytes, &kc,
                                       release, o.profile);
}

namespace {

// The host experts' threads: as asked, or by default every hardware thread but
// one. The thread that drives the GPU stays busy during a call (it spins while
// it waits for the device, CUDA's default with fewer contexts than cores), and a
// pool with as many threads as cores then shares one with it: a parallel region
// waits for its preempted worker. Measured on the 2-core VM with one spinning
// process beside the CPU layer (gpt-oss-shaped, T = 1): 2 threads 3.45 ms,
// 1 thread 2.80 ms (2.36 ms with 2 threads and nothing beside).
int host_threads(int threads) { return threads > 0 ? threads : std::max(1, cpu::resolve_threads(0) - 1); }

class CpuHostExperts final : public HostExperts {
 public:
  CpuHostExperts(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s, const LayerOptions& o,
                 const std::vector<int>& experts, const ReleaseFn* release)
      : moe_(w, a, s, host_threads(o.threads), o.accuracy_level, cpu::CpuMoe::kDefaultChunkBytes,
             &cpu::kernel_config_named(o.cpu_kernels, "cpu_kernels (QMOE_CPU_ISA)"), release, o.profile, &experts) {}
  void run(const float* x, const std::int64_t* counts, std::int64_t rows, float* y) const override {
    moe_.run_rows(x, counts, rows, y);
  }
  void prepare() const override { moe_.wake_threads(); }
  std::size_t packed_bytes() const override { return moe_.packed_bytes(); }
  int threads() const override { return moe_.threads(); }
  const std::string& name() const override { return moe_.name(); }

 private:
  cpu::CpuMoe moe_;
};

}  // namespace

std::unique_ptr<HostExperts> make_cpu_host_experts(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s,
                                                   const LayerOptions& o, const std::vector<int>& experts,
                                                   const ReleaseFn* release) {
  return std::make_unique<CpuHostExperts>(w, a, s, o, experts, release);
}

}  // namespace qmoe::detail
