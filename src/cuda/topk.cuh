// Internal: the expert selection of routing (core/routing.cpp's semantics), one
// warp per token, shared by the routing kernels (route.cu) and by the decode
// FC1 that routes its one token itself (gemm_decode.cu), so both pick the same
// experts. Experts are ranked by logit, NaN as -inf, ties to the lower index.
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

// The k picks over the order keys ukeys[0, E) (0 = taken, below every key), one
// after the other, each an arg-max over the warp: each lane's best (its lowest
// expert among equal keys), then the warp's largest key and, among the lanes
// holding it, the lowest expert. Lane e % 32 owns key e (reads and clears only
// its own). on_pick(j, expert, key) runs on lane 0 for pick j.
template <class OnPick>
__device__ __forceinline__ void pick_top_k(unsigned* ukeys, int E, int k, OnPick&& on_pick) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (int j = 0; j < k; ++j) {
    unsigned best = 0, bi = 0xffffffffu;
    for (int e = lane; e < E; e += 32) {
      const unsigned u = ukeys[e];
      if (u > best) best = u, bi = static_cast<unsigned>(e);
    }
    const unsigned m = __reduce_max_sync(0xffffffffu, best);
    const unsigned pick = __reduce_min_sync(0xffffffffu, best == m ? bi : 0xffffffffu);
    if (static_cast<unsigned>(lane) == pick % 32) ukeys[pick] = 0u;
    if (lane == 0) on_pick(j, static_cast<int>(pick), m);
  }
}

}  // namespace qmoe::cuda
