// The CUDA backend: prepack at creation (on the GPU, expert by expert), and a
// forward pass that is a fixed sequence of kernels on the caller's stream:
// route -> plan -> FC1 (+bias, activation) -> FC2 (K-split partials) ->
// combine (+bias, routing weight, un-permute, sum over experts and splits).
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/cuda_moe.h"
#include "cuda/gemm.h"
#include "cuda/gemm_wgmma.h"
#include "cuda/pack.h"
#include "cuda/route.h"

namespace qmoe::cuda {

namespace {

constexpr std::size_t kAlign = 256;
std::size_t align_up(std::size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Working memory shared by every Layer of a device that fits in it: a model's
// layers run one after another, so one workspace serves them all (a Layer
// holds only its packed weights). Calls that share an arena are serialized:
// on the host by the mutex, on the device by stream order or by an event
// when the stream changes between calls.
struct Arena {
  DeviceBuffer buf;
  std::mutex mu;
  cudaEvent_t done = nullptr;
  cudaStream_t last = nullptr;
  bool has_last = false;
  ~Arena() {
    if (done) cudaEventDestroy(done);
  }
};

std::shared_ptr<Arena> acquire_arena(int device, std::size_t bytes) {
  static std::mutex mu;
  static std::map<int, std::weak_ptr<Arena>> registry;
  std::lock_guard<std::mutex> lk(mu);
  std::shared_ptr<Arena> cur = registry[device].lock();
  if (cur && cur->buf.bytes() >= bytes) return cur;
  auto a = std::make_shared<Arena>();
  a->buf = DeviceBuffer(std::max(bytes, cur ? cur->buf.bytes() : std::size_t{0}));
  QMOE_CUDA_CHECK(cudaEventCreateWithFlags(&a->done, cudaEventDisableTiming));
  registry[device] = a;
  return a;
}

// Carves consecutive aligned pieces out of one allocation (or just sums
// their sizes when base is null).
struct Carver {
  char* base;
  std::size_t used = 0;
  template <class T>
  T* take(std::int64_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += align_up(sizeof(T) * static_cast<std::size_t>(std::max<std::int64_t>(count, 0)));
    return p;
  }
};

struct Workspace {
  RouteBuffers rb;
  void* act = nullptr;  // FC1 output / FC2 input, [chunk * k][a_stride] tokens' dtype
  float* y2 = nullptr;  // FC2 partials, [chunk * k][H] per split, splits * pairs <= chunk * k
};

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

constexpr double kNever = std::numeric_limits<double>::infinity();

// Which GEMM serves prefill (many tokens per expert): the average tokens per
// expert from which the wgmma kernel runs (infinity: never).
static double pick_gemm_regime(CudaGemm gemm, int cc) {
  // Below it, mma.sync's narrower token tiles waste less. Measured on the H200
  // with the warp-specialized wgmma kernel (layer ms, mma.sync vs wgmma): 16
  // tokens per expert (gpt-oss T = 128) 0.30 vs 0.47; 32 (mixtral T = 128)
  // 0.94 vs 0.77, (gpt-oss T = 256) 0.487 vs 0.476; 64: wgmma 1.6-1.8x faster.
  constexpr double kWgmmaFrom = 32;
  const bool have = wgmma_available(cc);
  switch (gemm) {
    case CudaGemm::automatic:
      return have ? kWgmmaFrom : kNever;
    case CudaGemm::mma:
      return kNever;
    case CudaGemm::wgmma:
      detail::require(have,
                      "cuda_gemm (QMOE_CUDA_GEMM): \"wgmma\" needs an sm_90a build on a compute capability 9.0 "
                      "device, got ",
                      cc / 10, ".", cc % 10);
      return 0;
  }
  detail::fail("cuda_gemm: expected CudaGemm::automatic, mma or wgmma, got ", static_cast<int>(gemm));
}

// Programmatic dependent launches (LayerOptions::cuda_pdl, compute capability
// 9.0 and newer): FC1, FC2 and combine each start while the kernel before them
// ends, so each one's launch and prologue (FC2: filling its weight ring)
// overlap that tail. Off is for diagnosis: the results are the same bits.
static bool pick_pdl(bool on, int cc) { return on && cc >= 90; }

struct CudaMoe::State {
  MoeAttributes attrs;
  MoeShape shape;
  int device = 0;
  int sms = 132;
  // Average tokens per expert from which the wgmma (sm_90a) prefill kernel
  // runs instead of mma.sync; infinity when it is unavailable or turned off.
  double wgmma_from = kNever;
  bool pdl = false;        // programmatic dependent launches (pick_pdl)
  std::int64_t chunk = 0;  // tokens per pass
  GpuGeometry g1, g2;
  DeviceBuffer packed;
  std::size_t packed_bytes = 0;
  PackedGpu p1, p2;
  bool has_bias2 = false;
  std::int64_t a_stride = 0;  // FC1 output row stride = g2.padded_cols
  std::size_t ws_bytes = 0;
  std::shared_ptr<Arena> arena;
  std::string name;

  Workspace carve(Carver& c) const {
    Workspace w;
    const std::int64_t pairs = chunk * attrs.k, E = shape.num_experts;
    w.rb.topk_expert = c.take<int>(pairs);
    w.rb.topk_weight = c.take<float>(pairs);
    w.rb.slot = c.take<int>(pairs);
    w.rb.counts = c.take<int>(E);
    w.rb.offsets = c.take<int>(E + 1);
    w.rb.tiles = c.take<MTile>(ceil_div(pairs, 8) + E);
    w.rb.num_tiles = c.take<int>(1);
    w.rb.token_of = c.take<int>(pairs);
    w.rb.pos_of = c.take<int>(pairs);
    w.act = c.take<std::uint16_t>(pairs * a_stride);
    w.y2 = c.take<float>(pairs * shape.hidden);
    return w;
  }
};

namespace {

GpuGeometry geometry(int bits, int block_size, bool gated, bool zp, std::int64_t rows, std::int64_t cols,
                     std::int64_t inter) {
  GpuGeometry g;
  g.bits = bits;
  g.block_size = block_size;
  g.gated = gated;
  g.zero_points = zp;
  g.rows = rows;
  g.cols = cols;
  g.padded_rows = round_up(gated ? ceil_div(inter, 8) * 16 : rows, kRowAlign);
  g.padded_cols = round_up(cols, kKAlign);
  return g;
}

PackedGpu carve_packed(Carver& c, const GpuGeometry& g, std::int64_t E) {
  PackedGpu p;
  p.tag = c.take<GpuPackTag>(1);
  p.codes = c.take<std::uint8_t>(E * g.code_bytes_per_expert());
  p.rel_scales = g.block_size ? c.take<std::uint16_t>(E * g.rel_scale_words_per_expert() * 2) : nullptr;
  p.zero_points = g.zero_points ? c.take<std::uint8_t>(E * g.zp_pairs_per_expert() * 2) : nullptr;
  p.row_scales = c.take<float>(E * g.padded_rows);
  p.bias = c.take<float>(E * g.padded_rows);
  return p;
}

// One expert's slice of a raw tensor (experts are the outermost dimension).
const std::uint8_t* slice(const TensorView& v, std::int64_t e, std::int64_t E) {
  return static_cast<const std::uint8_t*>(v.data) + v.nbytes() / static_cast<std::size_t>(E) * e;
}
std::size_t slice_bytes(const TensorView& v, std::int64_t E) {
  return v.present() ? v.nbytes() / static_cast<std::size_t>(E) : 0;
}

}  // namespace

CudaMoe::CudaMoe(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s, const LayerOptions& o,
                 const detail::ReleaseFn* release)
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
  st.wgmma_from = pick_gemm_regime(o.cuda_gemm, prop.major * 10 + prop.minor);
  st.pdl = pick_pdl(o.cuda_pdl, prop.major * 10 + prop.minor);

  const std::int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  // The GEMMs index K columns and slabs with 32-bit integers.
  constexpr std::int64_t kMaxDim = std::int64_t{1} << 30;
  detail::require(H < kMaxDim && I < kMaxDim,
                  "fc1_experts_weights: the CUDA backend takes hidden and inter sizes "
                  "below 2^30, got hidden ",
                  H, ", inter ", I);
  const bool gated = a.activation == Activation::swiglu;
  const bool zp1 = w.fc1_zero_points.present() || w.fc3_zero_points.present();
  st.g1 = geometry(a.expert_weight_bits, a.block_size, gated, zp1, s.fc1_rows, H, I);
  if (gated) st.g1.rows = 2 * I;
  st.g2 = geometry(a.expert_weight_bits, a.block_size, false, w.fc2_zero_points.present(), H, I, I);
  st.a_stride = st.g2.padded_cols;
  st.has_bias2 = w.fc2_bias.present();

  // The packed weights: one allocation, sized by a dry run of the carver.
  Carver sizing{nullptr};
  carve_packed(sizing, st.g1, E);
  carve_packed(sizing, st.g2, E);
  st.packed = DeviceBuffer(sizing.used);
  st.packed_bytes = sizing.used;
  Carver c{st.packed.get<char>()};
  st.p1 = carve_packed(c, st.g1, E);
  st.p2 = carve_packed(c, st.g2, E);

  // Stage one expert's raw tensors at a time and pack it on the device.
  const TensorView* raw[] = {&w.fc1_weights, &w.fc1_scales, &w.fc1_zero_points, &w.fc1_bias,
                             &w.fc3_weights, &w.fc3_scales, &w.fc3_zero_points, &w.fc3_bias,
                             &w.fc2_weights, &w.fc2_scales, &w.fc2_zero_points, &w.fc2_bias};
  std::size_t stage_bytes = 0;
  for (const TensorView* v : raw) stage_bytes += align_up(slice_bytes(*v, E));
  DeviceBuffer stage(stage_bytes);
  cudaStream_t stream = nullptr;
  QMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  try {
    for (std::int64_t e = 0; e < E; ++e) {
      const void* dev[12] = {};
      std::size_t off = 0;
      for (int i = 0; i < 12; ++i) {
        const std::size_t n = slice_bytes(*raw[i], E);
        if (n) {
          char* dst = stage.get<char>() + off;
          QMOE_CUDA_CHECK(cudaMemcpyAsync(dst, slice(*raw[i], e, E), n, cudaMemcpyHostToDevice, stream));
          // From pageable memory the call returns once the bytes are staged
          // (the DMA may still run from CUDA's own pinned buffer), so the
          // source is no longer needed.
          if (release) (*release)(slice(*raw[i], e, E), n);
          dev[i] = dst;
        }
        off += align_up(n);
      }
      auto raw_expert = [&](int base, const TensorView& scales, const TensorView& bias) {
        RawExpert r;
        r.codes = static_cast<const std::uint8_t*>(dev[base]);
        r.scales = dev[base + 1];
        r.scale_dtype = scales.dtype;
        r.zero_points = static_cast<const std::uint8_t*>(dev[base + 2]);
        r.bias = dev[base + 3];
        r.bias_dtype = bias.present() ? bias.dtype : DType::f32;
        return r;
      };
      const RawExpert fc1 = raw_expert(0, w.fc1_scales, w.fc1_bias);
      const RawExpert fc3 = raw_expert(4, w.fc3_scales, w.fc3_bias);
      const RawExpert fc2 = raw_expert(8, w.fc2_scales, w.fc2_bias);
      const bool use_fc3 = gated && a.swiglu_fusion == 0;
      pack_expert(st.g1, a.swiglu_fusion, I, fc1, use_fc3 ? &fc3 : nullptr, e, st.p1, stream);
      pack_expert(st.g2, 0, I, fc2, nullptr, e, st.p2, stream);
    }
    // The tags, written last and read back: the packed matrices are complete and are what
    // this Layer's kernels will read.
    const GpuPackTag tags[2] = {make_tag(st.g1, E), make_tag(st.g2, E)};
    QMOE_CUDA_CHECK(cudaMemcpyAsync(st.p1.tag, &tags[0], sizeof tags[0], cudaMemcpyHostToDevice, stream));
    QMOE_CUDA_CHECK(cudaMemcpyAsync(st.p2.tag, &tags[1], sizeof tags[1], cudaMemcpyHostToDevice, stream));
    GpuPackTag back[2];
    QMOE_CUDA_CHECK(cudaMemcpyAsync(&back[0], st.p1.tag, sizeof back[0], cudaMemcpyDeviceToHost, stream));
    QMOE_CUDA_CHECK(cudaMemcpyAsync(&back[1], st.p2.tag, sizeof back[1], cudaMemcpyDeviceToHost, stream));
    QMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    check_tag(back[0], st.g1, E, "fc1_experts_weights");
    check_tag(back[1], st.g2, E, "fc2_experts_weights");
  } catch (...) {
    cudaStreamDestroy(stream);
    throw;
  }
  QMOE_CUDA_CHECK(cudaStreamDestroy(stream));

  // Tokens per pass: at most max_tokens, and few enough that the GEMM grid's
  // tile dimension (<= 65535) holds the worst-case m-tile count.
  const std::int64_t grid_limit = std::max<std::int64_t>(1, (60000 - E) * 8 / a.k);
  st.chunk = std::min<std::int64_t>(o.max_tokens, grid_limit);
  Carver ws_size{nullptr};
  st.carve(ws_size);
  st.ws_bytes = ws_size.used;
  st.arena = acquire_arena(o.device, st.ws_bytes);

  st.name = std::string("cuda/") + prop.name + " sm" + std::to_string(prop.major * 10 + prop.minor) + " int" +
            std::to_string(a.expert_weight_bits) + (st.wgmma_from < kNever ? " mma.sync+wgmma" : " mma.sync");
}

CudaMoe::~CudaMoe() = default;

std::size_t CudaMoe::packed_bytes() const { return s_->packed_bytes; }
std::size_t CudaMoe::device_bytes() const { return s_->packed.bytes(); }
std::size_t CudaMoe::workspace_bytes() const { return s_->arena ? s_->arena->buf.bytes() : 0; }
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

  Carver carver{arena.buf.get<char>()};
  const Workspace ws = st.carve(carver);
  const MoeAttributes& a = st.attrs;
  const std::int64_t E = st.shape.num_experts, H = st.shape.hidden, k = a.k;
  const DType dt = input.dtype;
  const std::size_t es = dtype_bytes(dt);
  for (std::int64_t t0 = 0; t0 < tokens; t0 += st.chunk) {
    const std::int64_t tc = std::min(st.chunk, tokens - t0), pairs = tc * k;
    const void* x = static_cast<const char*>(input.data) + t0 * H * es;
    const void* logits = static_cast<const char*>(router_probs.data) + t0 * E * es;
    const void* mix = router_weights.present() ? static_cast<const char*>(router_weights.data) + t0 * E * es : nullptr;
    void* y = static_cast<char*>(out.data) + t0 * H * es;

    const double avg = static_cast<double>(pairs) / static_cast<double>(E);
    const bool wg = avg >= st.wgmma_from;
    const int mt = pick_mt(avg);
    const int bm = wg ? kWgmmaTileTokens : 8 * mt, bn = wg ? kWgmmaBlockRows : mt >= 8 ? 128 : 64;
    auto gemm = [&](const GemmProblem& p, std::int64_t cap) {
      if (wg)
        launch_gemm_wgmma(p, dt, cap, stream);
      else
        launch_gemm(p, dt, mt, cap, stream);
    };
    launch_route_plan(logits, mix, dt, tc, static_cast<int>(E), a.k, a.normalize_routing_weights != 0, bm, ws.rb,
                      stream);
    // Grid bound on the plan's m-tiles: each expert's last tile may be partial
    // (+ E), and no tile is empty (<= pairs; at T = 1 that spares the GEMMs
    // thousands of blocks that would only exit).
    const std::int64_t capacity = std::min(ceil_div(pairs, bm) + E, pairs);

    GemmProblem p1;
    p1.g = st.g1;
    p1.codes = st.p1.codes, p1.rel_scales = st.p1.rel_scales, p1.zero_points = st.p1.zero_points;
    p1.row_scales = st.p1.row_scales, p1.bias = st.p1.bias;
    p1.x = x, p1.x_stride = H, p1.gather = ws.rb.token_of;
    p1.x_vec16 = H % 8 == 0 && reinterpret_cast<std::uintptr_t>(x) % 16 == 0;
    p1.offsets = ws.rb.offsets, p1.tiles = ws.rb.tiles, p1.num_tiles = ws.rb.num_tiles;
    p1.fc1 = true, p1.out = ws.act, p1.out_stride = st.a_stride;
    p1.act = a.activation, p1.alpha = a.activation_alpha, p1.beta = a.activation_beta, p1.limit = a.swiglu_limit;
    p1.inter = st.shape.inter;
    p1.pdl = st.pdl;
    gemm(p1, capacity);

    // FC2: split K when the row tiles and the experts hit cannot fill the GPU.
    const std::int64_t kp2 = st.g2.padded_cols;
    const std::int64_t blocks =
        ceil_div(st.g2.padded_rows, bn) * std::max(std::min<std::int64_t>(pairs, E), ceil_div(pairs, bm));
    // Blocks per SM to aim for. Decode (the ring kernel of gemm_decode.cu),
    // measured on the H200 (mixtral layer, eager): 8 -> T = 1 88.5 us, T = 16
    // 276 us; 6 -> 89.4, 273; 3 -> 89.9, 292.
    const int per_sm = wg ? 1 : mt <= 2 ? 8 : 2;
    std::int64_t splits = std::max<std::int64_t>(1, ceil_div(per_sm * st.sms, blocks));
    splits = std::min({splits, kp2 / kKAlign, std::max<std::int64_t>(1, st.chunk / tc), std::int64_t{16}});
    const std::int64_t split_cols = round_up(ceil_div(kp2, splits), kKAlign);
    splits = ceil_div(kp2, split_cols);
    GemmProblem p2 = p1;
    p2.g = st.g2;
    p2.codes = st.p2.codes, p2.rel_scales = st.p2.rel_scales, p2.zero_points = st.p2.zero_points;
    p2.row_scales = st.p2.row_scales, p2.bias = nullptr;
    p2.x = ws.act, p2.x_stride = st.a_stride, p2.gather = nullptr;
    p2.x_vec16 = st.shape.inter % 8 == 0;
    p2.fc1 = false, p2.out = ws.y2, p2.out_stride = H;
    p2.splits = static_cast<int>(splits), p2.split_cols = split_cols, p2.split_stride = pairs * H;
    gemm(p2, capacity);

    launch_combine(ws.y2, static_cast<int>(splits), pairs * H, st.has_bias2 ? st.p2.bias : nullptr, st.g2.padded_rows,
                   tc, a.k, H, y, dt, ws.rb, st.pdl, stream);
  }
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
  forward_async(x, lg, rw, y, tokens, nullptr);
  if (out_host) QMOE_CUDA_CHECK(cudaMemcpy(out.data, y.data, out.view().nbytes(), cudaMemcpyDeviceToHost));
  QMOE_CUDA_CHECK(cudaDeviceSynchronize());
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
                                                const LayerOptions& o, const ReleaseFn* release) {
  return std::make_unique<cuda::CudaMoe>(w, a, s, o, release);
}

}  // namespace qmoe::detail
