// Internal: one token's routing as a device function (softmax, top-k,
// renormalisation, router_weights), shared by the routing kernels (route.cu)
// and the decode GEMM, whose blocks route a one-token call themselves
// (gemm_decode.cu): both compute the same picks and the same float32 weights.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "qmoe/tensor.h"

namespace qmoe::cuda {

__device__ __forceinline__ float load_act(const void* p, DType t, std::int64_t i) {
  switch (t) {
    case DType::f16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::bf16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// A float as an unsigned integer of the same order (-0 as +0, so that they tie), and back.
__device__ __forceinline__ unsigned order_key(float v) {
  const unsigned u = __float_as_uint(v == 0.f ? 0.f : v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Token t's k picks, by one warp: sel_e[j] the j-th expert chosen, sel_w[j] its
// weight as the combine uses it (renormalised when `normalize`). Semantics follow
// core/routing.cpp: experts are ranked by logit (NaN ranks as -inf), ties go to
// the lower index; the softmax runs over all E logits; a +inf maximum splits the
// mass evenly over the +inf logits; any NaN logit makes the weights NaN (never a
// silent answer). `keys` is E floats of the warp's shared memory. The k picks are
// made one after the other, each an arg-max over the warp (two warp reductions);
// no global memory is touched inside the serial part. On return sel_e and sel_w
// are visible to the whole warp.
__device__ inline void pick_topk(const void* logits, const void* mix, DType dt, std::int64_t t, int E, int k,
                                 bool normalize, float* keys, int* sel_e, float* sel_w) {
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
  for (int j = 0; j < k; ++j) {
    // Arg-max over the experts not yet taken: each lane's best (its lowest expert
    // among equal keys), then the warp's largest key and, among the lanes holding it,
    // the lowest expert.
    unsigned best = 0, bi = 0xffffffffu;
    for (int e = lane; e < E; e += 32) {
      const unsigned u = ukeys[e];
      if (u > best) best = u, bi = static_cast<unsigned>(e);
    }
    const unsigned m = __reduce_max_sync(0xffffffffu, best);
    const unsigned pick = __reduce_min_sync(0xffffffffu, best == m ? bi : 0xffffffffu);
    if (static_cast<unsigned>(lane) == pick % 32) ukeys[pick] = 0u;
    if (lane == 0) {
      sel_e[j] = static_cast<int>(pick);
      if (!mix) {
        const float v = key_value(m);
        const float num = inf_max ? (v == mx ? 1.f : 0.f) : __expf(v - mx);
        sel_w[j] = has_nan ? NAN : num / z;
      }
    }
  }
  __syncwarp();
  if (mix) {
    for (int j = lane; j < k; j += 32) sel_w[j] = load_act(mix, dt, t * E + sel_e[j]);
    __syncwarp();
  }
  if (normalize) {
    float wsum = 0.f;
    for (int j = 0; j < k; ++j) wsum += sel_w[j];  // in j order, as the CPU
    __syncwarp();
    for (int j = lane; j < k; j += 32) sel_w[j] = sel_w[j] / wsum;
    __syncwarp();
  }
}

}  // namespace qmoe::cuda
