// Routing (softmax, top-k, renormalize, router_weights), the per-call plan
// (tokens grouped by expert, the GEMM's m-tile list) and the final combine.
// Everything stays on the device: no host synchronisation, so a CUDA graph can
// capture a whole forward.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "core/check.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"
#include "cuda/route.h"
#include "cuda/topk.cuh"

namespace qmoe::cuda {

namespace {

constexpr int kRouteWarps = 4;
// The one-block route + plan + scatter: up to this many tokens, and experts
// whose keys (32 warps) and counts fit the default 48 KB of shared memory.
constexpr int kFusedRouteTokens = 128;
constexpr int kFusedRouteExperts = 256;
constexpr int kFusedRouteK = 32;

// One warp per token; its keys live in shared memory. Semantics follow
// core/routing.cpp: experts are ranked by logit (NaN ranks as -inf), ties go
// to the lower index; the softmax runs over all E logits; a +inf maximum
// splits the mass evenly over the +inf logits; any NaN logit makes the
// weights NaN (never a silent answer).
// `keys` holds E floats and `sel` 2 k words of the warp's shared memory. The k picks
// are made one after the other (each an arg-max over the warp), their weights and the
// stores then by k lanes at once: no global memory access inside the serial part.
__device__ void route_token(const void* logits, const void* mix, DType dt, std::int64_t t, int E, int k, bool normalize,
                            float* keys, int* sel, int* counts, const RouteBuffers& b) {
  int* sel_e = sel;
  float* sel_w = reinterpret_cast<float*>(sel + k);
  const int lane = static_cast<int>(threadIdx.x) % 32;
  float mx = -INFINITY;
  bool has_nan = false;
  for (int e = lane; e < E; e += 32) {
    const float v = load_act(logits, dt, t * E + e);
    has_nan |= v != v;
    keys[e] = v != v ? -INFINITY : v;
    mx = v > mx ? v : mx;
  }
  for (int o = 16; o; o >>= 1) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    has_nan |= __shfl_xor_sync(0xffffffffu, has_nan ? 1 : 0, o) != 0;
  }
  const bool inf_max = isinf(mx) && mx > 0;
  float z = 0.f;
  if (!mix) {
    for (int e = lane; e < E; e += 32) z += inf_max ? (keys[e] == mx ? 1.f : 0.f) : __expf(keys[e] - mx);
    for (int o = 16; o; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
  }
  // The keys as unsigned integers in the same order (a lane rewrites only its own
  // experts e = lane + 32 i, and only it reads them from here on); taken = 0, below
  // every key, -inf included.
  unsigned* ukeys = reinterpret_cast<unsigned*>(keys);
  for (int e = lane; e < E; e += 32) ukeys[e] = order_key(keys[e]);
  pick_top_k(ukeys, E, k, [&](int j, int pick, unsigned m) {
    sel_e[j] = pick;
    if (!mix) {
      const float v = key_value(m);
      const float num = inf_max ? (v == mx ? 1.f : 0.f) : __expf(v - mx);
      sel_w[j] = has_nan ? NAN : num / z;
    }
  });
  __syncwarp();
  if (mix) {
    for (int j = lane; j < k; j += 32) sel_w[j] = load_act(mix, dt, t * E + sel_e[j]);
    __syncwarp();
  }
  float wsum = 0.f;
  if (normalize)
    for (int j = 0; j < k; ++j) wsum += sel_w[j];  // in j order, as the CPU
  for (int j = lane; j < k; j += 32) {
    const int e = sel_e[j], s = b.slot_of ? b.slot_of[e] : e;
    b.topk_expert[t * k + j] = s;
    b.topk_weight[t * k + j] = normalize ? sel_w[j] / wsum : sel_w[j];
    b.slot[t * k + j] = atomicAdd(&counts[s], 1);
  }
  __syncwarp();
}

__global__ void route_kernel(const void* logits, const void* mix, DType dt, std::int64_t tokens, int E, int k,
                             bool normalize, RouteBuffers b) {
  extern __shared__ float keys_all[];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= tokens) return;
  int* sel = reinterpret_cast<int*>(keys_all + kRouteWarps * E) + warp * 2 * k;
  route_token(logits, mix, dt, t, E, k, normalize, keys_all + warp * E, sel, b.counts, b);
}

// One block: exclusive offsets of the counts, and the m-tile list.
__device__ void plan_block(int E, int bm, const int* counts, const RouteBuffers& b) {
  __shared__ int s_cnt[32], s_til[32];
  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int per = (E + nthreads - 1) / nthreads;
  const int e0 = tid * per, e1 = min(E, e0 + per);
  const int tiled = b.slot_of ? b.gpu_slots : E;  // slots that get m-tiles
  int cnt = 0, til = 0;
  for (int e = e0; e < e1; ++e) cnt += counts[e], til += e < tiled ? (counts[e] + bm - 1) / bm : 0;
  // Block-wide exclusive scan of (cnt, til).
  const int lane = tid % 32, warp = tid / 32;
  int ic = cnt, it = til;
  for (int o = 1; o < 32; o <<= 1) {
    const int uc = __shfl_up_sync(0xffffffffu, ic, o), ut = __shfl_up_sync(0xffffffffu, it, o);
    if (lane >= o) ic += uc, it += ut;
  }
  if (lane == 31) s_cnt[warp] = ic, s_til[warp] = it;
  __syncthreads();
  if (warp == 0) {
    const int nw = nthreads / 32;
    int vc = lane < nw ? s_cnt[lane] : 0, vt = lane < nw ? s_til[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int uc = __shfl_up_sync(0xffffffffu, vc, o), ut = __shfl_up_sync(0xffffffffu, vt, o);
      if (lane >= o) vc += uc, vt += ut;
    }
    if (lane < nw) s_cnt[lane] = vc, s_til[lane] = vt;
  }
  __syncthreads();
  int off = ic - cnt + (warp ? s_cnt[warp - 1] : 0);
  int toff = it - til + (warp ? s_til[warp - 1] : 0);
  for (int e = e0; e < e1; ++e) {
    const int c = counts[e];
    b.offsets[e] = off;
    if (e < tiled)
      for (int m0 = 0; m0 < c; m0 += bm) b.tiles[toff++] = MTile{e, m0};
    off += c;
  }
  if (tid == nthreads - 1) {
    b.offsets[E] = off;
    *b.num_tiles = toff;
  }
}

__global__ void plan_kernel(int E, int bm, RouteBuffers b) { plan_block(E, bm, b.counts, b); }

// Pair i = (token, j): its position in the expert-grouped order, both ways.
__device__ __forceinline__ void scatter_pair(std::int64_t i, int k, const RouteBuffers& b) {
  const int pos = b.offsets[b.topk_expert[i]] + b.slot[i];
  b.token_of[pos] = static_cast<int>(i / k);
  b.pos_of[i] = pos;
}

// With QMOE_ROUTE_EARLY_TRIGGER=1 (a build-time knob, off until measured on a
// GPU: scripts/device_ab.sh) the plan's last kernel lets the GEMM after it, a
// programmatic dependent launch, be scheduled first thing. That kernel's
// pdl_wait() still waits for this whole grid and its writes (griddepcontrol.wait),
// so only its launch latency would be hidden; this kernel is launched plainly, so
// everything before it on the stream has finished (common.cuh's rule holds).
// A self-routed FC1 (GemmProblem::route_logits) always gets the early start: it
// runs beside the routing kernel and waits for it only halfway through.
#ifndef QMOE_ROUTE_EARLY_TRIGGER
#define QMOE_ROUTE_EARLY_TRIGGER 0
#endif
__device__ __forceinline__ void plan_done_soon(bool early) {
  if (QMOE_ROUTE_EARLY_TRIGGER != 0 || early) pdl_launch_dependents();
}

__global__ void scatter_kernel(std::int64_t pairs, int k, RouteBuffers b) {
  plan_done_soon(false);
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < pairs) scatter_pair(i, k, b);
}

// Small calls: route, plan and scatter in one block, one launch instead of
// four (at T = 1 the separate launches cost more than their work). The
// counts live in shared memory, so no memset either.
__global__ void route_plan_kernel(const void* logits, const void* mix, DType dt, int tokens, int E, int k,
                                  bool normalize, int bm, RouteBuffers b, bool early) {
  plan_done_soon(early);
  extern __shared__ float smem_f[];
  int* counts = reinterpret_cast<int*>(smem_f);
  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int warps = nthreads / 32, warp = tid / 32;
  float* keys = smem_f + E;
  int* sel = reinterpret_cast<int*>(keys + warps * E) + warp * 2 * k;
  for (int e = tid; e < E; e += nthreads) counts[e] = 0;
  for (int i = tid; i < b.arrivals_count; i += nthreads) b.arrivals[i] = 0;
  __syncthreads();
  for (int t = warp; t < tokens; t += warps)
    route_token(logits, mix, dt, t, E, k, normalize, keys + warp * E, sel, counts, b);
  __syncthreads();
  plan_block(E, bm, counts, b);
  __syncthreads();
  for (int i = tid; i < tokens * k; i += nthreads) scatter_pair(i, k, b);
}

// Block p: position p of the plan, if a host row.
__global__ void gather_host_rows_kernel(const void* x, DType dt, std::int64_t H, int experts, RouteBuffers b,
                                        int* host_offsets, int* host_token, float* host_x) {
  const int p = static_cast<int>(blockIdx.x), tid = static_cast<int>(threadIdx.x);
  if (p == 0)
    for (int e = tid; e <= experts; e += static_cast<int>(blockDim.x)) host_offsets[e] = b.offsets[e];
  const int p0 = b.offsets[b.gpu_slots];
  if (p < p0) return;
  const int t = b.token_of[p];
  if (tid == 0) host_token[p - p0] = t;
  float* dst = host_x + static_cast<std::int64_t>(p - p0) * H;
  for (std::int64_t h = tid; h < H; h += blockDim.x) dst[h] = load_act(x, dt, t * H + h);
}

__global__ void scatter_host_rows_kernel(const float* host_y, std::int64_t H, RouteBuffers b, float* y2, int splits,
                                         std::int64_t split_stride) {
  const int p = static_cast<int>(blockIdx.x);
  const int p0 = b.offsets[b.gpu_slots];
  if (p < p0) return;
  const float* src = host_y + static_cast<std::int64_t>(p - p0) * H;
  for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    y2[p * H + h] = src[h];
    for (int s = 1; s < splits; ++s) y2[s * split_stride + p * H + h] = 0.f;
  }
}

// The call's stream waits here for the host pass numbered `seq` (HostPoller): one
// thread polls the mapped word (uncached reads over the bus) until it reaches seq
// (wrapping compare). The host stores the word after the result rows, so the
// scatter launched after this kernel reads complete rows.
__global__ void wait_host_kernel(const unsigned* word, unsigned seq) {
  const volatile unsigned* w = word;
  while (static_cast<int>(*w - seq) < 0) __nanosleep(256);
}

// V consecutive float32 columns (V = 4: one 16-byte load), and V outputs in the
// token dtype (V = 4: one 8-byte store).
template <int V>
__device__ __forceinline__ void load_cols(const float* p, float (&v)[V]) {
  if constexpr (V == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    v[0] = *p;
  }
}
template <class T, int V>
__device__ __forceinline__ void store_cols(T* out, const float (&acc)[V]) {
  T o[V];
#pragma unroll
  for (int v = 0; v < V; ++v) o[v] = from_float<T>(acc[v]);
  if constexpr (V == 4)
    *reinterpret_cast<uint2*>(out) = *reinterpret_cast<const uint2*>(o);
  else
    *out = o[0];
}

// Columns h0..h0 + V of pair pj's expert output: its FC2 bias (if any) plus its K-split
// partials, added in split order (both combine kernels, so both give the same bits).
template <int V>
__device__ __forceinline__ void expert_cols(const float* y2, int splits, std::int64_t split_stride, const float* bias2,
                                            std::int64_t bias_stride, std::int64_t H, std::int64_t h0, std::int64_t pj,
                                            const RouteBuffers& b, float (&y)[V]) {
  const std::int64_t pos = b.pos_of[pj];
  float part[V];
#pragma unroll
  for (int v = 0; v < V; ++v) y[v] = 0.f;
  if (bias2) load_cols<V>(bias2 + b.topk_expert[pj] * bias_stride + h0, y);
  for (int s = 0; s < splits; ++s) {
    load_cols<V>(y2 + s * split_stride + pos * H + h0, part);
#pragma unroll
    for (int v = 0; v < V; ++v) y[v] += part[v];
  }
}

// Thread (t, y, x) sums columns h0..h0 + V of token t, h0 = V (y * blockDim + x):
// V = 4 loads each partial row as 16 bytes (1.4 -> ~2.5 TB/s of partials at
// T = 4096; the per-element arithmetic and its order are those of V = 1).
template <class T, int V>
__global__ void combine_kernel(const float* y2, int splits, std::int64_t split_stride, const float* bias2,
                               std::int64_t bias_stride, int k, std::int64_t H, T* out, RouteBuffers b) {
  pdl_wait();  // FC2's partials (common.cuh)
  const std::int64_t t = blockIdx.x;
  const std::int64_t h0 = (static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (h0 >= H) return;
  float acc[V] = {};
  for (int j = 0; j < k; ++j) {
    const std::int64_t pj = t * k + j;
    float y[V];
    expert_cols<V>(y2, splits, split_stride, bias2, bias_stride, H, h0, pj, b, y);
    const float w = b.topk_weight[pj];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = __fmaf_rn(w, y[v], acc[v]);
  }
  store_cols<T, V>(out + t * H + h0, acc);
}

// Few tokens: the same sums with the k experts' rows summed by k threads at once.
// Block (32, k): thread (g, j) sums the partials of expert j for columns h0..h0 + V,
// h0 = V (32 blockIdx.y + g), into shared memory; thread (g, 0) then mixes them in j
// order with the arithmetic of combine_kernel (same bits). At T = 1 the one-thread-
// per-column kernel has H / 4 threads in 1-2 blocks, each reading k x splits partials
// one after the other; here k times the threads, on k times the SMs.
template <class T, int V>
__global__ void combine_few_kernel(const float* y2, int splits, std::int64_t split_stride, const float* bias2,
                                   std::int64_t bias_stride, int k, std::int64_t H, T* out, RouteBuffers b) {
  pdl_wait();                    // FC2's partials (common.cuh)
  extern __shared__ float ys[];  // [k][32][V]
  const int g = static_cast<int>(threadIdx.x), j = static_cast<int>(threadIdx.y);
  const std::int64_t t = blockIdx.x;
  const std::int64_t h0 = (static_cast<std::int64_t>(blockIdx.y) * 32 + g) * V;
  const std::int64_t pj = t * k + j;
  if (h0 < H) {
    float y[V];
    expert_cols<V>(y2, splits, split_stride, bias2, bias_stride, H, h0, pj, b, y);
#pragma unroll
    for (int v = 0; v < V; ++v) ys[(j * 32 + g) * V + v] = y[v];
  }
  __syncthreads();
  if (j != 0 || h0 >= H) return;
  float acc[V] = {};
  for (int i = 0; i < k; ++i) {
    const float w = b.topk_weight[t * k + i];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = __fmaf_rn(w, ys[(i * 32 + g) * V + v], acc[v]);
  }
  store_cols<T, V>(out + t * H + h0, acc);
}

// combine_few_kernel up to this many tokens (and k <= 32).
constexpr std::int64_t kFewCombineTokens = 32;

}  // namespace

bool route_plan_one_block(std::int64_t tokens, int experts, int k) {
  return tokens <= kFusedRouteTokens && experts <= kFusedRouteExperts && k <= kFusedRouteK;
}

void launch_route_plan(const void* logits, const void* mix, DType dtype, std::int64_t tokens, int experts, int k,
                       bool normalize, int bm, const RouteBuffers& b, bool early_start, cudaStream_t stream) {
  const std::int64_t pairs = tokens * k;
  detail::require(b.arrivals_count == 0 || route_plan_one_block(tokens, experts, k),
                  "internal: fused-combine counters need the one-block routing path");
  if (route_plan_one_block(tokens, experts, k)) {
    // A warp per token up to 32 tokens (few warps for few tokens: the block's barriers
    // then wait for fewer), 4 warps at least for the plan's scan.
    const int warps = static_cast<int>(std::clamp<std::int64_t>(tokens, 4, 32));
    const std::size_t smem = sizeof(float) * static_cast<std::size_t>(experts * (1 + warps) + warps * 2 * k);
    route_plan_kernel<<<1, 32 * warps, smem, stream>>>(logits, mix, dtype, static_cast<int>(tokens), experts, k,
                                                       normalize, bm, b, early_start);
    QMOE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  QMOE_CUDA_CHECK(cudaMemsetAsync(b.counts, 0, sizeof(int) * static_cast<std::size_t>(experts), stream));
  const std::size_t smem = sizeof(float) * static_cast<std::size_t>(experts + 2 * k) * kRouteWarps;
  if (smem > 48 * 1024)  // past the default dynamic shared-memory limit (E + 2 k > 3072)
    QMOE_CUDA_CHECK(
        cudaFuncSetAttribute(route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  route_kernel<<<static_cast<unsigned>(ceil_div(tokens, kRouteWarps)), 32 * kRouteWarps, smem, stream>>>(
      logits, mix, dtype, tokens, experts, k, normalize, b);
  QMOE_CUDA_CHECK(cudaGetLastError());
  plan_kernel<<<1, 1024, 0, stream>>>(experts, bm, b);
  QMOE_CUDA_CHECK(cudaGetLastError());
  scatter_kernel<<<static_cast<unsigned>(ceil_div(pairs, 256)), 256, 0, stream>>>(pairs, k, b);
  QMOE_CUDA_CHECK(cudaGetLastError());
}

void launch_gather_host_rows(const void* x, DType dtype, std::int64_t hidden, std::int64_t pairs, int experts,
                             const RouteBuffers& b, int* host_offsets, int* host_token, float* host_x,
                             cudaStream_t stream) {
  gather_host_rows_kernel<<<static_cast<unsigned>(pairs), 256, 0, stream>>>(x, dtype, hidden, experts, b, host_offsets,
                                                                            host_token, host_x);
  QMOE_CUDA_CHECK(cudaGetLastError());
}

void launch_wait_host(const std::uint32_t* word, std::uint32_t seq, cudaStream_t stream) {
  wait_host_kernel<<<1, 1, 0, stream>>>(word, seq);
  QMOE_CUDA_CHECK(cudaGetLastError());
}

void launch_scatter_host_rows(const float* host_y, std::int64_t hidden, std::int64_t pairs, const RouteBuffers& b,
                              float* y2, int splits, std::int64_t split_stride, cudaStream_t stream) {
  scatter_host_rows_kernel<<<static_cast<unsigned>(pairs), 256, 0, stream>>>(host_y, hidden, b, y2, splits,
                                                                             split_stride);
  QMOE_CUDA_CHECK(cudaGetLastError());
}

void launch_combine(const float* y2, int splits, std::int64_t split_stride, const float* bias2,
                    std::int64_t bias_stride, std::int64_t tokens, int k, std::int64_t hidden, void* out, DType dtype,
                    const RouteBuffers& b, bool pdl, cudaStream_t stream) {
  // 16-byte partial rows and 8-byte output groups need H % 4 == 0 and an 8-byte aligned
  // output (the workspace and the packed biases are 256-byte aligned, bias rows padded).
  const bool vec = hidden % 4 == 0 && reinterpret_cast<std::uintptr_t>(out) % 8 == 0 && bias_stride % 4 == 0;
  const std::int64_t groups = vec ? hidden / 4 : hidden;
  const bool few = tokens <= kFewCombineTokens && k <= 32;
  const unsigned threads = groups >= 256 ? 256 : static_cast<unsigned>(round_up(groups, 32));
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(ceil_div(groups, few ? 32 : threads)));
  auto go = [&](auto t, auto v) {
    using T = typename decltype(t)::type;
    constexpr int V = decltype(v)::value;
    if (few)
      launch_kernel(combine_few_kernel<T, V>, grid, dim3(32, static_cast<unsigned>(k)),
                    sizeof(float) * 32 * V * static_cast<std::size_t>(k), stream, pdl, y2, splits, split_stride, bias2,
                    bias_stride, k, hidden, static_cast<T*>(out), b);
    else
      launch_kernel(combine_kernel<T, V>, grid, dim3(threads), 0, stream, pdl, y2, splits, split_stride, bias2,
                    bias_stride, k, hidden, static_cast<T*>(out), b);
  };
  auto by_dtype = [&](auto v) { dtype == DType::f16 ? go(TypeC<__half>{}, v) : go(TypeC<__nv_bfloat16>{}, v); };
  vec ? by_dtype(IntC<4>{}) : by_dtype(IntC<1>{});
}

}  // namespace qmoe::cuda
