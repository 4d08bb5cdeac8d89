// The CPU MoE driver: route -> plan -> FC1 (+bias, activation) -> FC2 (+bias,
// routing weight, scatter-add).
//
// Work is cut into (expert x row-tile) items handed out dynamically, so one
// decode token that touches only k experts still spreads over every thread.
// Determinism: every output element is produced by exactly one item, and an
// FC2 item adds the experts of a token in ascending expert order, so the bits
// of the result do not depend on the thread count or on scheduling.
#include "cpu/moe.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "core/check.h"
#include "core/routing.h"
#include "cpu/epilogue.h"
#include "cpu/pack.h"
#include "cpu/quant_act.h"
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
               std::int64_t chunk_bytes, const KernelConfig* kernels, const detail::ReleaseFn* release, bool profile)
    : attrs_(a),
      shape_(s),
      kc_(kernels ? kernels : &kernel_config()),
      gated_(a.activation == Activation::swiglu),
      int8_(accuracy_level == 4),
      bf16_(accuracy_level == 3 && kc_->has_bf16()),
      profile_(profile),
      chunk_bytes_(chunk_bytes) {
  using detail::RawMatrix;
  const int bits = a.expert_weight_bits, bs = a.block_size;
  const std::int64_t h = s.hidden, in = s.inter, e_count = s.num_experts;
  const RawMatrix fc1(w.fc1_weights, w.fc1_scales, w.fc1_zero_points, bits, bs, s.fc1_rows, h);
  const RawMatrix fc2(w.fc2_weights, w.fc2_scales, w.fc2_zero_points, bits, bs, h, in);
  RawMatrix fc3;
  if (gated_ && a.swiglu_fusion == 0) fc3 = RawMatrix(w.fc3_weights, w.fc3_scales, w.fc3_zero_points, bits, bs, in, h);

  // Packed FC1 row p: for swiglu, gate i at 2i and up i at 2i+1 whatever the fusion.
  auto fc1_source = [&](std::int64_t p) -> RowSource {
    if (!gated_) return {&fc1, p};
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
  const PackGeometry g1{bits, gated_ ? 2 * in : in, h, bs ? bs : h};
  const PackGeometry g2{bits, h, in, bs ? bs : in};
  fc1_ = PackedMatrix(g1, kc_->isa, e_count);
  fc2_ = PackedMatrix(g2, kc_->isa, e_count);
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
    const std::int64_t e = item / (chunks1 + chunks2), c = item % (chunks1 + chunks2);
    const bool first = c < chunks1;
    const PackGeometry& g = first ? g1 : g2;
    const std::int64_t t0 = (first ? c : c - chunks1) * kPackChunkTiles;
    const std::int64_t t1 = std::min(t0 + kPackChunkTiles, g.tiles());
    auto progress = [&](std::int64_t a0, std::int64_t a1) {
      if (!release) return;
      if (first)
        release_packed(e, a0 * nr, std::min(a1 * nr, g1.rows), fc1_source, gated_);
      else
        release_packed(e, a0 * nr, std::min(a1 * nr, g2.rows), src2, false);
    };
    if (first)
      pack_tiles(g1, e, fc1_source, fc1_.expert(e), t0, t1, progress);
    else
      pack_tiles(g2, e, src2, fc2_.expert(e), t0, t1, progress);
  });

  // Biases in packed row order (FC3's bias becomes the "up" rows' bias).
  const std::int64_t pad1 = g1.tiles() * nr, pad2 = g2.tiles() * nr;
  bias1_.assign(static_cast<std::size_t>(e_count * pad1), 0.f);
  bias2_.assign(static_cast<std::size_t>(e_count * pad2), 0.f);
  for (std::int64_t e = 0; e < e_count; ++e) {
    for (std::int64_t p = 0; p < g1.rows; ++p) {
      const RowSource src = fc1_source(p);
      const TensorView& b = src.src == &fc3 ? w.fc3_bias : w.fc1_bias;
      if (b.present()) bias1_[e * pad1 + p] = detail::load_float(b.data, b.dtype, e * src.src->rows + src.row);
    }
    if (w.fc2_bias.present())
      for (std::int64_t p = 0; p < h; ++p)
        bias2_[e * pad2 + p] = detail::load_float(w.fc2_bias.data, w.fc2_bias.dtype, e * h + p);
  }
  name_ = std::string("cpu/") + kc_->name + " nr=" + std::to_string(nr) + (int8_ ? " int8-activations" : "") +
          (bf16_ ? " bf16-amx" : "");
}

std::size_t CpuMoe::packed_bytes() const {
  return fc1_.bytes() + fc2_.bytes() + (bias1_.size() + bias2_.size()) * sizeof(float);
}

struct CpuMoe::Workspace {
  std::vector<float> xbuf, lbuf, mbuf, obuf;  // float32 copies of half-precision inputs / output
  std::vector<float> xg, act, y2;             // gathered FC1 inputs, FC1 outputs (both off the AMX path), FC2 outputs
  std::vector<std::uint16_t> xb1, xb2;        // bf16 FC1 and FC2 inputs (AMX path), blocked
  QuantRowsBuffer qbuf;                       // int8 activations (accuracy_level 4)
  std::vector<std::vector<float>> scratch;    // per thread: kernel scratch + tile outputs
};

namespace {
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
}  // namespace

void CpuMoe::WorkspaceDeleter::operator()(Workspace* w) const noexcept { delete w; }

CpuMoe::WorkspacePtr CpuMoe::acquire() const {
  {
    std::lock_guard<std::mutex> lk(ws_mutex_);
    if (!ws_free_.empty()) {
      WorkspacePtr w = std::move(ws_free_.back());
      ws_free_.pop_back();
      return w;
    }
  }
  return WorkspacePtr(new Workspace);
}

void CpuMoe::release(WorkspacePtr w) const {
  std::lock_guard<std::mutex> lk(ws_mutex_);
  ws_free_.push_back(std::move(w));
}

// Grows v to hold n elements from a 64-byte boundary and returns that start; contents
// are unspecified (callers write what they read). Vector storage is only 16-byte
// aligned, and rows that straddle cache lines cost kernels (AMX tile rows, 64-byte
// vector stores) twice the L1 accesses.
template <class T>
static T* grow(std::vector<T>& v, std::int64_t n) {
  constexpr std::int64_t kSlack = 64 / sizeof(T);
  if (v.size() < static_cast<std::size_t>(n + kSlack)) v.resize(static_cast<std::size_t>(n + kSlack));
  const std::uintptr_t skip = (64 - reinterpret_cast<std::uintptr_t>(v.data()) % 64) % 64;  // to 64 bytes
  return reinterpret_cast<T*>(reinterpret_cast<std::uint8_t*>(v.data()) + skip);
}

void CpuMoe::forward(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                     const MutableTensorView& out, std::int64_t t) const {
  const std::int64_t h = shape_.hidden;
  PhaseClock total{profile_};
  struct Lease {  // returns the workspace on every exit path
    const CpuMoe* self;
    WorkspacePtr w;
    ~Lease() { self->release(std::move(w)); }
  } lease{this, acquire()};
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
  const std::int64_t h = shape_.hidden, in = shape_.inter, e_count = shape_.num_experts;
  const int k = attrs_.k;
  const std::int64_t nt = t1 - t0, nrows = nt * k;

  PhaseClock clock{profile_};
  // Route (in parallel over tokens: serially, a 512-token prefill spent ~0.2 ms here on a
  // 4.3 GHz core while the other threads waited), then plan: the (token, slot) rows of each
  // expert, contiguous and in token order.
  std::vector<int> chosen(static_cast<std::size_t>(nrows));
  std::vector<double> wts(static_cast<std::size_t>(nrows));
  {
    const std::int64_t per = 16, items = (nt + per - 1) / per;
    pool_->parallel_for(items, [&](std::int64_t item, int) {
      for (std::int64_t i = item * per; i < std::min(nt, (item + 1) * per); ++i)
        detail::route_token(logits + (t0 + i) * e_count, mix ? mix + (t0 + i) * e_count : nullptr,
                            static_cast<int>(e_count), k, attrs_.normalize_routing_weights != 0, &chosen[i * k],
                            &wts[i * k]);
    });
  }
  std::vector<std::int64_t> count(static_cast<std::size_t>(e_count), 0),
      offset(static_cast<std::size_t>(e_count + 1), 0);
  for (int e : chosen) ++count[e];
  for (std::int64_t e = 0; e < e_count; ++e) offset[e + 1] = offset[e] + count[e];
  std::vector<std::int64_t> row_token(static_cast<std::size_t>(nrows)), slot_pos(static_cast<std::size_t>(nrows));
  std::vector<float> row_weight(static_cast<std::size_t>(nrows));
  {
    std::vector<std::int64_t> fill(offset.begin(), offset.end() - 1);
    for (std::int64_t i = 0; i < nt; ++i)
      for (int j = 0; j < k; ++j) {
        const std::int64_t pos = fill[chosen[i * k + j]]++;
        row_token[pos] = t0 + i;
        slot_pos[i * k + j] = pos;
        row_weight[pos] = static_cast<float>(wts[i * k + j]);
      }
  }
  std::vector<int> active;
  std::int64_t max_count = 0;
  for (std::int64_t e = 0; e < e_count; ++e)
    if (count[e]) active.push_back(static_cast<int>(e)), max_count = std::max(max_count, count[e]);

  const int nthreads = pool_->size();
  constexpr int nr = kTileRows;
  const PackGeometry& g1 = fc1_.geometry();
  const PackGeometry& g2 = fc2_.geometry();
  // Kernels read whole code groups: activation rows are zero-padded to the packed width.
  const std::int64_t hp = g1.padded_cols(), ip = g2.padded_cols();

  // accuracy_level 3 with AMX: the FC1 and FC2 input rows in bf16, in A-tile order (kernels.h):
  // per expert, blocks of 16 rows (zero-padded) of K steps of 16 x 32 bf16, kp = K padded to
  // a multiple of 32 (zeros); expert e's blocks start at row boff[e]. FC1's come from the
  // gather below, FC2's straight from the FC1 epilogue (two buffers: FC1 still reads its
  // inputs while epilogues write FC2's). Experts with fewer than the table's bf16.from tokens
  // take the float32 path.
  const std::int64_t kp1 = (hp + 31) / 32 * 32, kp2 = (ip + 31) / 32 * 32;
  auto use_bf16 = [&](int e) { return bf16_ && count[e] >= kc_->bf16.from; };
  std::vector<int> row_expert(static_cast<std::size_t>(nrows));
  for (int e : active) std::fill(row_expert.begin() + offset[e], row_expert.begin() + offset[e + 1], e);
  std::vector<std::int64_t> boff(static_cast<std::size_t>(e_count + 1), 0);
  for (std::int64_t e = 0; e < e_count; ++e)
    boff[e + 1] = boff[e] + (use_bf16(static_cast<int>(e)) ? (count[e] + 15) / 16 * 16 : 0);
  // Row i of expert e in a blocked buffer b of kp columns; its column c is at row + c / 32 * 512 + c % 32.
  auto blocked_row = [&](std::uint16_t* b, std::int64_t kp, int e, std::int64_t i) {
    return b + (boff[e] + i / 16 * 16) * kp + i % 16 * 32;
  };
  // Zeroes columns [c0, c1) of a blocked row.
  auto zero_bf16 = [](std::uint16_t* row, std::int64_t c0, std::int64_t c1) {
    for (std::int64_t c = c0; c < c1; c = c / 32 * 32 + 32)
      std::fill(row + c / 32 * 512 + c % 32, row + c / 32 * 512 + std::min<std::int64_t>(32, c1 - c / 32 * 32),
                std::uint16_t{0});
  };
  // Writes n floats as bf16 into columns [0, n) of a blocked row (columns up to the next
  // multiple of 32 become zeros), converted by the table's to_bf16 a stack buffer at a time.
  auto put_bf16 = [&](const float* src, std::int64_t n, std::uint16_t* row) {
    constexpr std::int64_t kSpan = 512;
    alignas(64) std::uint16_t tmp[kSpan];
    for (std::int64_t c0 = 0; c0 < n; c0 += kSpan) {
      const std::int64_t len = std::min(kSpan, n - c0), steps = (len + 31) / 32;
      kc_->bf16.to_bf16(src + c0, tmp, len);
      std::fill(tmp + len, tmp + steps * 32, std::uint16_t{0});
      for (std::int64_t s = 0; s < steps; ++s) std::memcpy(row + (c0 / 32 + s) * 512, tmp + s * 32, 64);
    }
  };
  // Gather the tokens of each expert into contiguous rows (in parallel), zeroing the padding
  // columns of the FC1 and FC2 input rows (the kernels read whole code groups). Rows of
  // experts on the AMX path go straight to bf16 (the FC1 input rows of the other paths are
  // float32); there the last row of an expert also zeroes the padding rows of its last block.
  float* xg = grow(ws.xg, nrows * hp);
  float* act = grow(ws.act, nrows * ip);
  std::uint16_t* xb1 = bf16_ ? grow(ws.xb1, boff[e_count] * kp1) : nullptr;
  std::uint16_t* xb2 = bf16_ ? grow(ws.xb2, boff[e_count] * kp2) : nullptr;
  {
    const std::int64_t per = 32, items = (nrows + per - 1) / per;
    pool_->parallel_for(items, [&](std::int64_t item, int) {
      for (std::int64_t r = item * per; r < std::min(nrows, (item + 1) * per); ++r) {
        const int e = row_expert[r];
        if (use_bf16(e)) {
          const std::int64_t i = r - offset[e];
          std::uint16_t* row1 = blocked_row(xb1, kp1, e, i);
          put_bf16(x + row_token[r] * h, h, row1);
          zero_bf16(row1, h, kp1);
          zero_bf16(blocked_row(xb2, kp2, e, i), in, kp2);  // the FC1 epilogue writes columns [0, in)
          if (i == count[e] - 1)
            for (std::int64_t p = count[e]; p < boff[e + 1] - boff[e]; ++p) {
              zero_bf16(blocked_row(xb1, kp1, e, p), 0, kp1);
              zero_bf16(blocked_row(xb2, kp2, e, p), 0, kp2);
            }
        } else {
          std::memcpy(xg + r * hp, x + row_token[r] * h, static_cast<std::size_t>(h) * 4);
          std::fill(xg + r * hp + h, xg + (r + 1) * hp, 0.f);
          std::fill(act + r * ip + in, act + (r + 1) * ip, 0.f);
        }
      }
    });
  }
  const int bits = attrs_.expert_weight_bits;
  const GemmTileFn gemm = kc_->f32.gemm(bits).fn;
  const GemmTileI8Fn igemm = kc_->qd8.gemm(bits).fn;
  const GemmTileBf16Fn bgemm = kc_->bf16.gemm(bits).fn;
  // accuracy_level 4: activation rows quantized to int8 once per call, in parallel over rows.
  QuantRowsBuffer& qbuf = ws.qbuf;
  auto quantize_all = [&](const float* rows, std::int64_t ld, const PackGeometry& g) {
    resize_for(qbuf, nrows, g);
    const std::int64_t per = 16, items = (nrows + per - 1) / per;
    pool_->parallel_for(items, [&](std::int64_t i, int) {
      kc_->qd8.quantize_rows(rows, ld, i * per, std::min(nrows, (i + 1) * per), g, qbuf);
    });
  };
  auto rows_of = [&](const QuantRows& q, std::int64_t first) {
    return QuantRows{q.q + first * q.ldq, q.scale + first * q.lds, q.zsum + first * q.ldz, q.ldq, q.lds, q.ldz};
  };
  const std::int64_t bf16_scratch = bf16_ ? kBf16ScratchBytes / 4 + 16 : 0;  // B tiles (+ slack to align), in floats
  if (ws.scratch.size() < static_cast<std::size_t>(nthreads)) ws.scratch.resize(static_cast<std::size_t>(nthreads));
  // Kernels take runs of consecutive tiles (so they can work on several at once): FC1 calls
  // cover up to kFc1Tiles tiles, whose outputs (rows of kFc1Tiles * nr floats) follow the
  // kernel scratch, then the bf16 B tiles.
  constexpr std::int64_t kFc1Tiles = 4;
  const std::int64_t ybuf_floats = max_count * nr * kFc1Tiles;
  const std::int64_t scratch_need = kc_->f32.scratch_floats + ybuf_floats + bf16_scratch;
  auto thread_scratch = [&](int tid) -> float* { return grow(ws.scratch[tid], scratch_need); };

  clock.mark("route+plan+gather");
  // Work items are (expert x run of consecutive row tiles), so that each item streams one
  // contiguous run of an expert's weights (short runs that hop between experts leave the
  // hardware prefetchers cold) and one decode token still spreads over every thread.
  // for_each_run calls
  // fn(e, tile, n, tid) for every kernel call of every item, in parallel. Calls take up to
  // `cap` tiles on the float path, pairs on AMX and one tile on the int8 path.
  const std::int64_t target_items = 8 * static_cast<std::int64_t>(nthreads);
  auto for_each_run = [&](std::int64_t tiles, std::int64_t cap, auto&& fn) {
    const std::int64_t per = std::max<std::int64_t>(1, static_cast<std::int64_t>(active.size()) * tiles / target_items);
    const std::int64_t groups = (tiles + per - 1) / per;
    pool_->parallel_for(static_cast<std::int64_t>(active.size()) * groups, [&](std::int64_t item, int tid) {
      const int e = active[item / groups];
      const std::int64_t end = std::min(tiles, (item % groups + 1) * per);
      for (std::int64_t tile = (item % groups) * per, n = 0; tile < end; tile += n) {
        n = std::min(end - tile, use_bf16(e) ? std::min<std::int64_t>(cap, 2) : int8_ ? 1 : cap);
        fn(e, tile, n, tid);
      }
    });
  };
  // One kernel call: y = W x for tiles [tile, tile + n) of expert e of m, whose inputs are
  // the blocked bf16 rows xb (kp columns), the int8 rows q or the float32 rows xf (ldf).
  auto run_kernel = [&](const PackedMatrix& m, int e, std::int64_t tile, std::int64_t n, const std::uint16_t* xb,
                        std::int64_t kp, const QuantRows& q, const float* xf, std::int64_t ldf, float* y,
                        std::int64_t ldy, int tid) {
    float* scr = thread_scratch(tid);
    if (use_bf16(e))
      bgemm(m.geometry(), m.tile(e, tile), n, xb + boff[e] * kp, kp, count[e], y, ldy,
            scr + kc_->f32.scratch_floats + ybuf_floats);
    else if (int8_)
      igemm(m.geometry(), m.tile(e, tile), rows_of(q, offset[e]), count[e], y, ldy);
    else
      gemm(m.geometry(), m.tile(e, tile), n, xf + offset[e] * ldf, ldf, count[e], y, ldy, scr);
  };

  // FC1 + bias + activation -> the FC2 inputs: act[row][0..I), or xb2 on the AMX path.
  const std::int64_t pad1 = g1.tiles() * nr;
  QuantRows q1;
  if (int8_) quantize_all(xg, hp, g1), q1 = qbuf.view(g1);
  const Fc1Epilogue epi{attrs_.activation, attrs_.activation_alpha, attrs_.activation_beta, attrs_.swiglu_limit};
  clock.mark("fc1-inputs");
  for_each_run(g1.tiles(), kFc1Tiles, [&](int e, std::int64_t tile, std::int64_t n, int tid) {
    float* y = thread_scratch(tid) + kc_->f32.scratch_floats;  // outputs of up to kFc1Tiles tiles
    const std::int64_t ldy = kFc1Tiles * nr;
    run_kernel(fc1_, e, tile, n, xb1, kp1, q1, xg, hp, y, ldy, tid);
    // Epilogue per tile: bias + activation into the FC2 input rows (outs divides 32, so a
    // tile's outputs lie within one K step of the blocked layout).
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int64_t outs = gated_ ? nr / 2 : nr, first = (tile + j) * outs;
      const Fc1Dst dst = use_bf16(e) ? Fc1Dst{.bf16 = blocked_row(xb2, kp2, e, 0) + first / 32 * 512 + first % 32,
                                              .ld = kp2,
                                              .to_bf16 = kc_->bf16.to_bf16}
                                     : Fc1Dst{.f32 = act + offset[e] * ip + first, .ld = ip};
      fc1_epilogue(epi, y + j * nr, ldy, count[e], &bias1_[e * pad1 + (tile + j) * nr], dst,
                   static_cast<int>(std::min<std::int64_t>(outs, in - first)));
    }
  });

  clock.mark("fc1");
  // FC2 + bias -> y2[row][0..H), written straight into place; the float kernel takes an
  // item's whole run of tiles at once.
  const std::int64_t pad2 = g2.tiles() * nr;
  QuantRows q2;
  if (int8_) quantize_all(act, ip, g2), q2 = qbuf.view(g2);
  float* y2 = grow(ws.y2, nrows * pad2);
  clock.mark("fc2-inputs");
  for_each_run(g2.tiles(), g2.tiles(), [&](int e, std::int64_t tile, std::int64_t n, int tid) {
    run_kernel(fc2_, e, tile, n, xb2, kp2, q2, act, ip, y2 + offset[e] * pad2 + tile * nr, pad2, tid);
  });
  clock.mark("fc2");
  // out[token] = sum over its experts, in ascending expert order, of weight * (y2 + bias):
  // every output element has one fixed order of additions, whatever the threads.
  {
    const std::int64_t per = 16, items = (nt + per - 1) / per;
    pool_->parallel_for(items, [&](std::int64_t item, int) {
      std::vector<std::pair<int, std::int64_t>> slots(static_cast<std::size_t>(k));  // (expert, plan row)
      for (std::int64_t i = item * per; i < std::min(nt, (item + 1) * per); ++i) {
        for (int j = 0; j < k; ++j) slots[j] = {chosen[i * k + j], slot_pos[i * k + j]};
        std::sort(slots.begin(), slots.end());  // the experts of a token are distinct
        float* dst = out + (t0 + i) * h;        // every token of the chunk is written here, whole
        for (std::size_t j = 0; j < slots.size(); ++j) {
          const auto [e, pos] = slots[j];
          const float* yr = y2 + pos * pad2;
          const float* b2 = &bias2_[e * pad2];
          const float wgt = row_weight[pos];
          if (j == 0)
            for (std::int64_t q = 0; q < h; ++q) dst[q] = 0.f + wgt * (yr[q] + b2[q]);
          else
            for (std::int64_t q = 0; q < h; ++q) dst[q] += wgt * (yr[q] + b2[q]);
        }
      }
    });
  }
  clock.mark("combine");
}

}  // namespace qmoe::cpu

namespace qmoe::detail {

std::unique_ptr<LayerBackend> make_cpu_backend(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s,
                                               const LayerOptions& o, const ReleaseFn* release) {
  const cpu::KernelConfig& kc = cpu::kernel_config_named(o.cpu_kernels, "cpu_kernels (QMOE_CPU_ISA)");
  return std::make_unique<cpu::CpuMoe>(w, a, s, o.threads, o.accuracy_level, cpu::CpuMoe::kDefaultChunkBytes, &kc,
                                       release, o.profile);
}

}  // namespace qmoe::detail
