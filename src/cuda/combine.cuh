// Internal: one output element of the MoE combine, shared by the combine
// kernel (route.cu) and the decode GEMM's fused tail (gemm_decode.cu), so both
// add the same terms in the same order (the result's bits do not depend on
// which of the two ran).
#pragma once

#include <cstdint>

#include "cuda/convert.cuh"

namespace qmoe::cuda {

/// out[t, h] = sum over j (in j order) of w_j * (bias2[e_j, h] + sum over splits s of
/// y2[s][pos(t, j), h]). y2 is read through L2 (__ldcg): in the fused tail it was
/// written by other blocks of the same launch.
template <class T>
__device__ __forceinline__ T combine_element(const float* y2, int splits, std::int64_t split_stride,
                                             const float* bias2, std::int64_t bias_stride, int k, std::int64_t H,
                                             const int* pos_of, const int* topk_expert, const float* topk_weight,
                                             std::int64_t t, std::int64_t h) {
  float acc = 0.f;
  for (int j = 0; j < k; ++j) {
    const std::int64_t pj = t * k + j;
    const std::int64_t pos = pos_of[pj];
    float y = bias2 ? bias2[topk_expert[pj] * bias_stride + h] : 0.f;
    for (int s = 0; s < splits; ++s) y += __ldcg(y2 + s * split_stride + pos * H + h);
    acc += topk_weight[pj] * y;
  }
  return from_float<T>(acc);
}

}  // namespace qmoe::cuda
