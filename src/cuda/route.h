// Internal: routing, the per-call expert plan, and the final combine, on the GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm.h"
#include "qmoe/tensor.h"

namespace qmoe::cuda {

struct RouteBuffers {
  int* topk_expert = nullptr;    ///< [T * k]
  float* topk_weight = nullptr;  ///< [T * k]
  int* slot = nullptr;           ///< [T * k] rank of the pair within its expert
  int* counts = nullptr;         ///< [E] (zeroed by launch_route_plan; unused by the one-block path)
  int* offsets = nullptr;        ///< [E + 1]
  MTile* tiles = nullptr;        ///< [capacity]
  int* num_tiles = nullptr;      ///< [1]
  int* token_of = nullptr;       ///< [T * k] position -> token
  int* pos_of = nullptr;         ///< [T * k] (token, j) -> position
};

/// softmax + top-k (+ renormalize, router_weights) for T tokens, then the plan:
/// exclusive offsets per expert, the m-tile list with tiles of `bm` tokens, and
/// the position of every (token, j) pair. One launch for small calls.
void launch_route_plan(const void* logits, const void* mix, DType dtype, std::int64_t tokens, int experts, int k,
                       bool normalize, int bm, const RouteBuffers& b, cudaStream_t stream);
/// out[t] = sum_j w_j (bias2[e_j] + sum_s y2[s][pos(t, j)]), in j order; out in `dtype`.
/// `pdl`: launched as a programmatic dependent of the FC2 GEMM (common.cuh).
void launch_combine(const float* y2, int splits, std::int64_t split_stride, const float* bias2,
                    std::int64_t bias_stride, std::int64_t tokens, int k, std::int64_t hidden, void* out, DType dtype,
                    const RouteBuffers& b, bool pdl, cudaStream_t stream);

}  // namespace qmoe::cuda
