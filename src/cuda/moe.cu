// The CUDA backend: prepack at creation (on the GPU, expert by expert), and a
// forward pass that is a fixed sequence of kernels on the caller's stream:
// route -> plan -> FC1 (+bias, activation) -> FC2 (K-split partials) ->
// combine (+bias, routing weight, un-permute, sum over experts and splits).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "cuda/act8.h"
#include "cuda/arena.h"
#include "cuda/common.cuh"
#include "cuda/cuda_moe.h"
#include "cuda/gemm_table.h"
#include "cuda/gemm_wgmma.h"
#include "cuda/host_pass.h"
#include "cuda/prepack.h"
#include "cuda/route.h"

namespace qmoe::cuda {

namespace {

std::size_t dtype_bytes(DType t) { return t == DType::f32 ? 4 : t == DType::u8 ? 1 : 2; }

bool on_device(const void* p, int device) {
  if (!p) return false;
  cudaPointerAttributes at{};
  if (cudaPointerGetAttributes(&at, p) != cudaSuccess) {
    cudaGetLastError();  // clear
    return false;
  }
  return (at.type == cudaMemoryTypeDevice || at.type == cudaMemoryTypeManaged) && at.device == device;
}

}  // namespace

// Programmatic dependent launches (LayerOptions::cuda_pdl, compute capability
// 9.0 and newer): FC1, FC2 and combine each start while the kernel before them
// ends, so each one's launch and prologue (FC2: filling its weight ring)
// overlap that tail. Off is for diagnosis: the results are the same bits.
static bool pick_pdl(bool on, int cc) { return on && cc >= 90; }

// Tokens per pass of a Layer with host experts (the mapped host rows hold one pass).
constexpr std::int64_t kHostPassTokens = 1024;

struct CudaMoe::State {
  MoeAttributes attrs;
  MoeShape shape;
  int device = 0;
  int sms = 132;
  // Average tokens per expert from which the wgmma (sm_90a) prefill kernel
  // runs instead of mma.sync; infinity when it is unavailable or turned off.
  double wgmma_from = kNoWgmma;
  bool pdl = false;   // programmatic dependent launches (pick_pdl)
  bool fuse = false;  // small calls' fusions (LayerOptions::cuda_fuse)
  // accuracy_level 4 with the int8-token wgmma kernel available and weights it takes
  // (act8_fits): passes that run wgmma quantize their GEMM inputs to int8 (act8.h).
  bool int8_tokens = false;
  std::int64_t q1 = 0, q2 = 0;  // int8 row lengths: H and I rounded up to kAct8Block
  std::int64_t chunk = 0;       // tokens per pass
  PackedLayer w;
  std::int64_t a_stride = 0;  // FC1 output row stride = g2.padded_cols
  std::size_t ws_bytes = 0;
  std::shared_ptr<Arena> arena;
  std::string name;
  // Host experts (LayerOptions::host_experts); null when every expert is on the GPU.
  // `host` is the eager calls' pass context; a call being captured gets one of its own,
  // kept (in `captured`) while the Layer lives, for the graph's replays.
  std::unique_ptr<detail::HostExperts> host_experts;
  mutable HostErrors host_errors;
  std::unique_ptr<HostPass> host;
  mutable std::mutex captured_mu;
  mutable std::vector<std::unique_ptr<HostPass>> captured;
  DeviceBuffer slot_of;       // [E] expert -> slot
  DeviceBuffer combine_bias;  // [E][padded rows of FC2] by slot: GPU slots' FC2 bias, host slots 0
  std::size_t host_bytes = 0;
  // Host experts computed on the GPU from host_experts_gpu_from tokens per pass: their
  // weights in the GPU layout in host memory (the allocation prepack made, copied whole
  // to the arena's staging for a call), where its arrays were (host_base), and every
  // slot's FC2 bias for the combine.
  std::int64_t gpu_from = 0;
  PinnedBuffer host_packed;
  std::uintptr_t host_base = 0;
  PackedGpu host_p1, host_p2;
  DeviceBuffer all_bias;

  // The working memory of passes of at most `tokens` (<= chunk) tokens.
  Workspace carve(Carver& c, std::int64_t tokens) const {
    const std::int64_t y2_tokens = std::min(16 * tokens, chunk);  // fc2_k_split: splits <= 16 and <= chunk / tokens
    Workspace ws = carve_workspace(c, tokens, y2_tokens, attrs.k, shape.num_experts, shape.hidden, a_stride);
    if (int8_tokens) {
      ws.xq = c.take<std::int8_t>(tokens * q1);
      ws.xmeta = c.take<Act8Meta>(tokens * (q1 / kAct8Block));
      ws.aq = c.take<std::int8_t>(tokens * attrs.k * q2);
      ws.ameta = c.take<Act8Meta>(tokens * attrs.k * (q2 / kAct8Block));
    }
    if (host) {
      ws.rb.slot_of = slot_of.get<int>();
      ws.rb.gpu_slots = host->gpu_slots;
    }
    return ws;
  }
  std::int64_t host_rows() const { return chunk * std::min<std::int64_t>(attrs.k, host->slots - host->gpu_slots); }
};

CudaMoe::CudaMoe(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s, const LayerOptions& o,
                 const detail::ReleaseFn* release, const detail::HostExpertsFactory* host_experts)
    : s_(std::make_unique<State>()) {
  State& st = *s_;
  st.attrs = a;
  st.shape = s;
  st.device = o.device;
  int count = 0;
  QMOE_CUDA_CHECK(cudaGetDeviceCount(&count));
  detail::require(o.device < count, "device: expected a CUDA device ordinal 0..", count - 1, ", got ", o.device);
  DeviceGuard guard(o.device);
  cudaDeviceProp prop{};
  QMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, o.device));
  detail::require(prop.major >= 8, "device: the CUDA backend needs compute capability 8.0 or newer, device ", o.device,
                  " (", prop.name, ") has ", prop.major, ".", prop.minor);
  st.sms = prop.multiProcessorCount;
  st.wgmma_from = wgmma_threshold(o.cuda_gemm, prop.major * 10 + prop.minor);
  st.pdl = pick_pdl(o.cuda_pdl, prop.major * 10 + prop.minor);
  st.fuse = o.cuda_fuse;

  const std::int64_t E = s.num_experts;
  // Host experts: the CPU side is built first (its packer reads the host experts'
  // raw bytes); slots are the GPU experts in ascending order, then the host experts.
  std::vector<int> gpu_experts;
  if (!o.host_experts.empty()) {
    detail::require(host_experts != nullptr, "host_experts: no CPU side was given");
    auto hp = std::make_unique<HostPass>();
    st.host_experts = (*host_experts)();
    hp->experts = st.host_experts.get();
    hp->errors = &st.host_errors;
    std::vector<int> slot_of(static_cast<std::size_t>(E), -1);
    for (std::size_t i = 0; i < o.host_experts.size(); ++i) slot_of[o.host_experts[i]] = 1;
    for (int e = 0; e < E; ++e)
      if (slot_of[e] < 0) gpu_experts.push_back(e);
    int next = 0;
    for (int e : gpu_experts) slot_of[e] = next++;
    for (int e : o.host_experts) slot_of[e] = next++;
    hp->gpu_slots = static_cast<int>(gpu_experts.size());
    hp->slots = static_cast<int>(E);
    hp->hidden = s.hidden;
    st.slot_of = DeviceBuffer(sizeof(int) * slot_of.size());
    QMOE_CUDA_CHECK(cudaMemcpy(st.slot_of.get(), slot_of.data(), sizeof(int) * slot_of.size(), cudaMemcpyHostToDevice));
    hp->open_streams();
    if (o.cuda_host_polling) hp->poller = std::make_unique<HostPoller>(*hp, o.device);
    st.host = std::move(hp);
  }
  st.w = prepack_layer(w, a, s, release, st.host ? &gpu_experts : nullptr);
  st.a_stride = st.w.g2.padded_cols;
  st.int8_tokens = o.accuracy_level == 4 && st.wgmma_from < kNoWgmma &&
                   wgmma_act8_available(prop.major * 10 + prop.minor) && act8_fits(st.w.g1) && act8_fits(st.w.g2);
  st.q1 = round_up(s.hidden, kAct8Block), st.q2 = round_up(s.inter, kAct8Block);
  if (st.host && st.w.has_bias2) {
    // The host results include their bias: the combine adds 0 for host slots.
    const std::size_t row = sizeof(float) * static_cast<std::size_t>(st.w.g2.padded_rows);
    st.combine_bias = DeviceBuffer(row * static_cast<std::size_t>(E));
    QMOE_CUDA_CHECK(cudaMemset(st.combine_bias.get(), 0, row * static_cast<std::size_t>(E)));
    if (!gpu_experts.empty())
      QMOE_CUDA_CHECK(
          cudaMemcpy(st.combine_bias.get(), st.w.p2.bias, row * gpu_experts.size(), cudaMemcpyDeviceToDevice));
  }

  // Tokens per pass: at most max_tokens, and few enough that the GEMM grid's
  // tile dimension (<= 65535) holds the worst-case m-tile count. With host
  // experts, at most kHostPassTokens (the mapped host rows are sized by it).
  const std::int64_t grid_limit = std::max<std::int64_t>(1, (60000 - E) * kMinTileTokens / a.k);
  st.chunk = std::min<std::int64_t>(o.max_tokens, grid_limit);
  if (st.host) st.chunk = std::min(st.chunk, kHostPassTokens);

  if (st.host && o.host_experts_gpu_from != 0) {
    // The host experts packed for the GPU once (on the device, then kept in host memory).
    PackedLayer hl = prepack_layer(w, a, s, release, &o.host_experts);
    const bool measure = o.host_experts_gpu_from == LayerOptions::kMeasureCrossover;
    try {
      st.host_packed = PinnedBuffer(hl.packed.bytes());
    } catch (const Error&) {  // no room for a second copy in host memory: measured, that means never
      if (!measure) throw;
      cudaGetLastError();
    }
    if (st.host_packed.get()) {
      QMOE_CUDA_CHECK(cudaMemcpy(st.host_packed.get(), hl.packed.get(), hl.packed.bytes(), cudaMemcpyDeviceToHost));
      st.host_base = reinterpret_cast<std::uintptr_t>(hl.packed.get());
      st.host_p1 = hl.p1, st.host_p2 = hl.p2;
      if (st.w.has_bias2) {
        const std::size_t row = sizeof(float) * static_cast<std::size_t>(st.w.g2.padded_rows);
        const std::size_t ng = gpu_experts.size(), nh = o.host_experts.size();
        st.all_bias = DeviceBuffer(row * static_cast<std::size_t>(E));
        if (ng) QMOE_CUDA_CHECK(cudaMemcpy(st.all_bias.get(), st.w.p2.bias, row * ng, cudaMemcpyDeviceToDevice));
        QMOE_CUDA_CHECK(cudaMemcpy(st.all_bias.get<char>() + row * ng, hl.p2.bias, row * nh, cudaMemcpyDeviceToDevice));
      }
      st.gpu_from = o.host_experts_gpu_from;
    }
    if (measure && st.host_packed.get()) {
      const std::int64_t nh = static_cast<std::int64_t>(o.host_experts.size());
      const std::string key = st.host->experts->name() + " t" + std::to_string(st.host->experts->threads()) + " d" +
                              std::to_string(o.device) + " E" + std::to_string(E) + " H" + std::to_string(s.hidden) +
                              " k" + std::to_string(a.k) + " nh" + std::to_string(nh) + " b" +
                              std::to_string(hl.packed.bytes()) + " c" + std::to_string(st.chunk);
      hl.packed = DeviceBuffer();  // room for the copy being timed
      st.gpu_from = measure_crossover(*st.host->experts, o.host_experts, st.host_packed.get(), st.host_packed.bytes(),
                                      E, a.k, s.hidden, st.chunk, key);
    }
    if (st.gpu_from == 0) {  // the CPU always: no second copy kept
      st.host_packed = PinnedBuffer();
      st.all_bias = DeviceBuffer();
    }
  }

  Carver ws_size{nullptr};
  st.carve(ws_size, st.chunk);
  st.ws_bytes = ws_size.used;
  if (st.host) {
    Carver hs{nullptr};
    carve_host_rows(hs, st.host_rows(), E, s.hidden);
    st.host_bytes = hs.used;
  }
  st.arena = acquire_arena(o.device, st.ws_bytes, st.host_bytes, st.host_packed.bytes());

  st.name = std::string("cuda/") + prop.name + " sm" + std::to_string(prop.major * 10 + prop.minor) + " int" +
            std::to_string(a.expert_weight_bits) + (st.wgmma_from < kNoWgmma ? " mma.sync+wgmma" : " mma.sync") +
            (st.int8_tokens ? " (int8 tokens on wgmma)" : "");
  if (st.host)
    st.name += " + " + std::to_string(E - st.host->gpu_slots) + "/" + std::to_string(E) + " experts on " +
               st.host->experts->name() +
               (st.gpu_from > 0 ? " (on the GPU from " + std::to_string(st.gpu_from) + " tokens)" : "");
}

CudaMoe::~CudaMoe() = default;

std::size_t CudaMoe::packed_bytes() const { return s_->w.bytes + (s_->host ? s_->host->experts->packed_bytes() : 0); }
int CudaMoe::threads() const { return s_->host ? s_->host->experts->threads() : 0; }
std::size_t CudaMoe::device_bytes() const { return s_->w.packed.bytes(); }
std::size_t CudaMoe::workspace_bytes() const {
  return s_->arena ? s_->arena->buf.bytes() + s_->arena->staging.bytes() : 0;
}
std::int64_t CudaMoe::host_experts_gpu_from() const { return s_->gpu_from; }
const std::string& CudaMoe::name() const { return s_->name; }

namespace {

void require_gpu_dtype(const TensorView& v, const char* name) {
  if (v.present() && v.dtype != DType::f16 && v.dtype != DType::bf16)
    detail::fail(name, ": the CUDA backend takes float16 or bfloat16 activations, got ", dtype_name(v.dtype));
}

void require_on_device(const void* p, const char* name, int device) {
  detail::require(on_device(p, device), name, ": expected memory on CUDA device ", device,
                  " (forward_async takes device pointers; forward() also takes host memory)");
}

}  // namespace

void CudaMoe::forward_async(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                            const MutableTensorView& out, std::int64_t tokens, void* stream_ptr) const {
  const State& st = *s_;
  require_gpu_dtype(input, "input");
  require_on_device(input.data, "input", st.device);
  require_on_device(router_probs.data, "router_probs", st.device);
  if (router_weights.present()) require_on_device(router_weights.data, "router_weights", st.device);
  require_on_device(out.data, "output", st.device);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  DeviceGuard guard(st.device);
  Arena& arena = *st.arena;
  std::lock_guard<std::mutex> lk(arena.mu);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  QMOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  if (!capturing && arena.has_last && arena.last != stream) QMOE_CUDA_CHECK(cudaStreamWaitEvent(stream, arena.done, 0));

  // Host experts on the GPU for this call (LayerOptions::host_experts_gpu_from): their
  // weights go to the staging buffer on the side stream while routing and the GPU
  // experts' FC1 run; the staging is free once this stream has reached this call.
  const std::int64_t pass_tokens = std::min(tokens, st.chunk);
  const bool host_on_gpu = st.host && st.gpu_from > 0 && pass_tokens >= st.gpu_from;
  // Otherwise their rows go to the CPU: every pass uses the same mapped host rows.
  const bool host_on_cpu = st.host && !host_on_gpu;

  // The call's device memory (workspace, then the staged host experts): the arena's for an
  // eager call. A call being captured gets memory of its own, allocated in the graph
  // (cudaMallocAsync while capturing: a memory node, freed at the call's end) and sized for
  // its tokens, so a replay can run beside eager calls and other graphs (the driver keeps
  // graphs that share physical memory apart).
  char* ws_base = arena.buf.get<char>();
  char* stg = arena.staging.get<char>();
  void* graph_mem = nullptr;
  if (capturing) {
    Carver sizing{nullptr};
    st.carve(sizing, pass_tokens);
    const std::size_t staging_bytes = host_on_gpu ? st.host_packed.bytes() : 0;
    QMOE_CUDA_CHECK(cudaMallocAsync(&graph_mem, sizing.used + staging_bytes, stream));
    ws_base = static_cast<char*>(graph_mem);
    stg = ws_base + sizing.used;  // 256-byte aligned: the carver rounds every piece up
  }
  Carver carver{ws_base};
  const Workspace ws = st.carve(carver, capturing ? pass_tokens : st.chunk);
  const MoeAttributes& a = st.attrs;
  const std::int64_t E = st.shape.num_experts, H = st.shape.hidden, k = a.k;
  const DType dt = input.dtype;
  const std::size_t es = dtype_bytes(dt);
  // A call being captured has a host context (side stream, mapped rows) of its own.
  HostPass* hp = st.host.get();
  if (hp && capturing) {
    auto own = hp->for_capture(host_on_cpu ? st.host_bytes : 0);
    std::lock_guard<std::mutex> clk(st.captured_mu);
    st.captured.push_back(std::move(own));
    hp = st.captured.back().get();
  }
  PackedGpu staged1, staged2;
  if (host_on_gpu) {
    hp->on_side(stream, [&](cudaStream_t side) {
      QMOE_CUDA_CHECK(cudaMemcpyAsync(stg, st.host_packed.get(), st.host_packed.bytes(), cudaMemcpyHostToDevice, side));
    });
    staged1 = shift_slots(rebase(st.host_p1, st.host_base, stg), st.w.g1, hp->gpu_slots);
    staged2 = shift_slots(rebase(st.host_p2, st.host_base, stg), st.w.g2, hp->gpu_slots);
  }
  // Eager host passes polled instead of host functions (HostPoller).
  const bool polling = host_on_cpu && !capturing && hp->poller;
  std::uint32_t host_seq = 0;
  HostRows hr;
  if (host_on_cpu) {
    Carver hc{capturing ? hp->own_rows.get<char>() : arena.host.get<char>()};
    hr = carve_host_rows(hc, st.host_rows(), E, H);
    hp->rows = hr;
  }
  for (std::int64_t t0 = 0; t0 < tokens; t0 += st.chunk) {
    const std::int64_t tc = std::min(st.chunk, tokens - t0), pairs = tc * k;
    const void* x = static_cast<const char*>(input.data) + t0 * H * es;
    const void* logits = static_cast<const char*>(router_probs.data) + t0 * E * es;
    const void* mix = router_weights.present() ? static_cast<const char*>(router_weights.data) + t0 * E * es : nullptr;
    void* y = static_cast<char*>(out.data) + t0 * H * es;

    const double avg = static_cast<double>(pairs) / static_cast<double>(E);
    const GemmVariant& v = pick_gemm(avg, st.wgmma_from, st.int8_tokens);
    const int bm = v.geometry.tile_tokens;
    auto gemm = [&](const GemmProblem& p, std::int64_t cap) { v.launch(p, dt, v.mt, cap, stream); };
    RouteBuffers plan_rb = ws.rb;
    if (host_on_gpu) plan_rb.gpu_slots = static_cast<int>(E);  // m-tiles for every slot
    // LayerOptions::cuda_fuse applies to the decode kernel with every expert on the GPU:
    // up to kFusedCombineTokens, FC2 does the combine; at one token, FC1 routes the
    // token itself and runs beside the routing kernel (GemmProblem::route_logits).
    const bool fusable = st.fuse && !hp && v.launch == launch_gemm_decode;
    const bool fuse_combine =
        fusable && tc <= kFusedCombineTokens && route_plan_one_block(tc, static_cast<int>(E), a.k);
    const std::int64_t row_blocks = fused_combine_row_blocks(H);
    if (fuse_combine) plan_rb.arrivals_count = static_cast<int>(tc * row_blocks);
    const bool self_route = fusable && tc == 1 && st.pdl && v.mt == 1 && E <= kSelfRouteMaxExperts && k <= 32;
    launch_route_plan(logits, mix, dt, tc, static_cast<int>(E), a.k, a.normalize_routing_weights != 0, bm, plan_rb,
                      self_route, stream);
    if (host_on_cpu) {
      // Host rows out to mapped memory, then the CPU kernels on the side stream
      // while the GPU experts run here.
      launch_gather_host_rows(x, dt, H, pairs, static_cast<int>(E), ws.rb, hr.offsets, hr.token, hr.x, stream);
      if (polling)
        host_seq = hp->poller->post(stream);
      else
        hp->on_side(stream, [&](cudaStream_t side) { QMOE_CUDA_CHECK(cudaLaunchHostFunc(side, &HostPass::run, hp)); });
      if (!capturing) hp->experts->prepare();  // the CPU threads poll from now on, not when the rows arrive
    }
    // Grid bound on the plan's m-tiles: each expert's last tile may be partial
    // (+ E), and no tile is empty (<= pairs; at T = 1 that spares the GEMMs
    // thousands of blocks that would only exit).
    const std::int64_t capacity = std::min(ceil_div(pairs, bm) + E, pairs);

    const bool gpu_experts = !hp || hp->gpu_slots > 0;
    // The host experts' launch of a GEMM on the GPU: slots [gpu_slots, E), weights staged.
    auto host_gemm = [&](GemmProblem p, const PackedGpu& w, std::int64_t cap) {
      if (!host_on_gpu) return;
      if (t0 == 0) hp->join(stream);  // the weights are there
      p.codes = w.codes, p.rel_scales = w.rel_scales, p.zero_points = w.zero_points, p.row_scales = w.row_scales;
      if (p.fc1) p.bias = w.bias;
      p.slot_begin = hp->gpu_slots, p.slot_end = static_cast<int>(E);
      gemm(p, cap);
    };
    GemmProblem p1;
    p1.g = st.w.g1;
    p1.codes = st.w.p1.codes, p1.rel_scales = st.w.p1.rel_scales, p1.zero_points = st.w.p1.zero_points;
    p1.row_scales = st.w.p1.row_scales, p1.bias = st.w.p1.bias;
    p1.x = x, p1.x_stride = H, p1.gather = ws.rb.token_of;
    p1.x_vec16 = H % 8 == 0 && reinterpret_cast<std::uintptr_t>(x) % 16 == 0;
    p1.offsets = ws.rb.offsets, p1.tiles = ws.rb.tiles, p1.num_tiles = ws.rb.num_tiles;
    p1.fc1 = true, p1.out = ws.act, p1.out_stride = st.a_stride;
    p1.act = a.activation, p1.alpha = a.activation_alpha, p1.beta = a.activation_beta, p1.limit = a.swiglu_limit;
    p1.inter = st.shape.inter;
    p1.pdl = st.pdl;
    if (host_on_gpu) p1.slot_end = hp->gpu_slots;
    if (self_route) {  // the input row itself for every m-tile
      p1.route_logits = logits, p1.route_dtype = dt, p1.route_experts = static_cast<int>(E), p1.route_k = a.k;
      p1.gather = nullptr, p1.x_stride = 0;
    }
    if (v.int8_tokens) {  // accuracy_level 4: the input rows as int8 codes
      launch_quantize_act8(x, dt, tc, H, H, st.w.g1.bits, ws.xq, ws.xmeta, st.pdl, stream);
      p1.x = ws.xq, p1.x_stride = st.q1, p1.x_vec16 = true;
      p1.act_meta = ws.xmeta, p1.meta_stride = st.q1 / kAct8Block;
    }
    if (gpu_experts) gemm(p1, capacity);
    host_gemm(p1, staged1, capacity);

    // FC2: split K when the row tiles and the experts hit cannot fill the GPU.
    const KSplit split = fc2_k_split(v, st.w.g2, pairs, E, st.sms, st.chunk, tc);
    GemmProblem p2 = p1;
    p2.g = st.w.g2;
    p2.codes = st.w.p2.codes, p2.rel_scales = st.w.p2.rel_scales, p2.zero_points = st.w.p2.zero_points;
    p2.row_scales = st.w.p2.row_scales, p2.bias = nullptr;
    p2.x = ws.act, p2.x_stride = st.a_stride, p2.gather = nullptr;
    p2.route_logits = nullptr;  // FC2 reads the plan
    p2.x_vec16 = st.shape.inter % 8 == 0;
    if (v.int8_tokens) {  // FC1's output rows as int8 codes
      launch_quantize_act8(ws.act, dt, pairs, st.shape.inter, st.a_stride, st.w.g2.bits, ws.aq, ws.ameta, st.pdl,
                           stream);
      p2.x = ws.aq, p2.x_stride = st.q2, p2.x_vec16 = true;
      p2.act_meta = ws.ameta, p2.meta_stride = st.q2 / kAct8Block;
    }
    p2.fc1 = false, p2.out = ws.y2, p2.out_stride = H;
    p2.splits = split.splits, p2.split_cols = split.split_cols, p2.split_stride = pairs * H;
    const float* bias2 = !st.w.has_bias2 ? nullptr
                         : host_on_gpu   ? st.all_bias.get<float>()
                         : hp            ? st.combine_bias.get<float>()
                                         : st.w.p2.bias;
    if (fuse_combine)
      p2.combine = FusedCombine{y,
                                ws.rb.arrivals,
                                static_cast<int>(row_blocks),
                                ws.rb.token_of,
                                ws.rb.pos_of,
                                ws.rb.topk_expert,
                                ws.rb.topk_weight,
                                bias2,
                                st.w.g2.padded_rows,
                                a.k,
                                H};
    if (gpu_experts) gemm(p2, capacity);
    host_gemm(p2, staged2, capacity);
    if (fuse_combine) continue;  // FC2's last blocks wrote this pass's output
    if (host_on_cpu) {
      if (polling)
        launch_wait_host(hp->poller->done_word(), host_seq, stream);
      else
        hp->join(stream);
      launch_scatter_host_rows(hr.y, H, pairs, ws.rb, ws.y2, split.splits, pairs * H, stream);
    }
    launch_combine(ws.y2, split.splits, pairs * H, bias2, st.w.g2.padded_rows, tc, a.k, H, y, dt, ws.rb,
                   st.pdl && !host_on_cpu, stream);
  }
  if (graph_mem) QMOE_CUDA_CHECK(cudaFreeAsync(graph_mem, stream));
  if (!capturing) {
    QMOE_CUDA_CHECK(cudaEventRecord(arena.done, stream));
    arena.last = stream;
    arena.has_last = true;
  }
}

void CudaMoe::forward(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                      const MutableTensorView& out, std::int64_t tokens) const {
  const State& st = *s_;
  require_gpu_dtype(input, "input");
  DeviceGuard guard(st.device);
  // Host tensors are copied to the device (and the output back); device
  // tensors are used in place.
  std::vector<DeviceBuffer> temps;
  auto stage_in = [&](const TensorView& v) -> TensorView {
    if (!v.present() || on_device(v.data, st.device)) return v;
    temps.emplace_back(v.nbytes());
    QMOE_CUDA_CHECK(cudaMemcpy(temps.back().get(), v.data, v.nbytes(), cudaMemcpyHostToDevice));
    return TensorView(temps.back().get(), v.dtype, v.shape);
  };
  const TensorView x = stage_in(input), lg = stage_in(router_probs), rw = stage_in(router_weights);
  MutableTensorView y = out;
  const bool out_host = !on_device(out.data, st.device);
  if (out_host) {
    temps.emplace_back(out.view().nbytes());
    y.data = temps.back().get();
  }
  if (st.host) st.host_errors.rethrow(st.host->experts->name());  // a failure of an earlier forward_async
  forward_async(x, lg, rw, y, tokens, nullptr);
  if (out_host) QMOE_CUDA_CHECK(cudaMemcpy(out.data, y.data, out.view().nbytes(), cudaMemcpyDeviceToHost));
  QMOE_CUDA_CHECK(cudaDeviceSynchronize());
  if (st.host) st.host_errors.rethrow(st.host->experts->name());
}

}  // namespace qmoe::cuda

namespace qmoe::detail {

bool cuda_backend_available() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

std::unique_ptr<LayerBackend> make_cuda_backend(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s,
                                                const LayerOptions& o, const ReleaseFn* release,
                                                const HostExpertsFactory* host_experts) {
  return std::make_unique<cuda::CudaMoe>(w, a, s, o, release, host_experts);
}

}  // namespace qmoe::detail
