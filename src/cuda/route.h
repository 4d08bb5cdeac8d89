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
  // Host experts (LayerOptions::host_experts): experts are planned by slot,
  // slot_of[e] (device, [E]): the GPU experts first (0..gpu_slots-1), then the
  // host experts, so the host rows are the last positions of the plan. Only
  // GPU slots get m-tiles. topk_expert holds slots. Null: slot = expert, all on the GPU.
  const int* slot_of = nullptr;
  int gpu_slots = 0;
  // FC2's fused combine (GemmProblem::combine): arrivals_count counters, zeroed by the
  // one-block routing kernel (route_plan_one_block) at its start.
  int* arrivals = nullptr;
  int arrivals_count = 0;
};

/// Whether launch_route_plan takes its one-block path for this call.
bool route_plan_one_block(std::int64_t tokens, int experts, int k);

/// softmax + top-k (+ renormalize, router_weights) for T tokens, then the plan:
/// exclusive offsets per expert, the m-tile list with tiles of `bm` tokens, and
/// the position of every (token, j) pair. One launch for small calls; with
/// `early_start` that launch lets the programmatic dependent launch after it start
/// at once (a self-routed FC1, GemmProblem::route_logits).
void launch_route_plan(const void* logits, const void* mix, DType dtype, std::int64_t tokens, int experts, int k,
                       bool normalize, int bm, const RouteBuffers& b, bool early_start, cudaStream_t stream);
/// Host experts: copies the plan's offsets, and the token and float32 input of
/// each host row (positions offsets[gpu_slots].. pairs - 1), to mapped host memory.
void launch_gather_host_rows(const void* x, DType dtype, std::int64_t hidden, std::int64_t pairs, int experts,
                             const RouteBuffers& b, int* host_offsets, int* host_token, float* host_x,
                             cudaStream_t stream);
/// Host experts without host functions: the stream waits until the mapped `word`
/// reaches `seq` (HostPoller::done_word), polled by a one-thread kernel.
void launch_wait_host(const std::uint32_t* word, std::uint32_t seq, cudaStream_t stream);
/// Host experts: y2 split 0 of each host row = its host result (mapped host
/// memory, FC2 + bias), the other splits 0.
void launch_scatter_host_rows(const float* host_y, std::int64_t hidden, std::int64_t pairs, const RouteBuffers& b,
                              float* y2, int splits, std::int64_t split_stride, cudaStream_t stream);
/// out[t] = sum_j w_j (bias2[e_j] + sum_s y2[s][pos(t, j)]), in j order; out in `dtype`.
/// `pdl`: launched as a programmatic dependent of the FC2 GEMM (common.cuh).
void launch_combine(const float* y2, int splits, std::int64_t split_stride, const float* bias2,
                    std::int64_t bias_stride, std::int64_t tokens, int k, std::int64_t hidden, void* out, DType dtype,
                    const RouteBuffers& b, bool pdl, cudaStream_t stream);

}  // namespace qmoe::cuda
