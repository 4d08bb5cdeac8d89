// qmoe/weights.h — expert weights in the portable ONNX Runtime QMoE layout.
#pragma once

#include <cstdint>

#include "qmoe/config.h"
#include "qmoe/tensor.h"

namespace qmoe {

/// Raw (unprepacked) expert weights, exactly as ONNX Runtime's QMoE inputs 2..13
/// hold them. All views are non-owning; absent optional tensors are default views.
///
/// With pack = 8 / bits, E experts, hidden size H, intermediate size I and
/// N1 = 2I for swiglu with swiglu_fusion 1 or 2, else I:
///   fc1_weights  uint8 [E, N1, H/pack]   element c of a row in byte c/pack,
///                                          even element in the low nibble (4-bit)
///   fc1_scales   float [E, N1] or [E, N1, 1] (row-wise), [E, N1, H/block] (block-wise)
///   fc1_bias     float [E, N1]             optional
///   fc2_weights  uint8 [E, H, I/pack]
///   fc2_scales   float [E, H] or [E, H, I/block]
///   fc2_bias     float [E, H]              optional
///   fc3_*        like fc1 with N = I       only for swiglu with swiglu_fusion 0
///   fc*_zero_points uint8, optional: row-wise [E, ceil(N/pack)] packed across rows;
///                block-wise [E, N, ceil(blocks/pack)] packed along the blocks.
/// Scales and biases may be float32, float16 or bfloat16.
struct ExpertWeights {
  TensorView fc1_weights, fc1_scales, fc1_bias;
  TensorView fc2_weights, fc2_scales, fc2_bias;
  TensorView fc3_weights, fc3_scales, fc3_bias;
  TensorView fc1_zero_points, fc2_zero_points, fc3_zero_points;
};

/// Calls f(name, view) for each of the 12 tensors, with ONNX Runtime's input
/// names ("fc1_experts_weights", "fc1_scales", ..., "fc3_zero_points"), in
/// input order. W is ExpertWeights or const ExpertWeights.
template <class W, class F>
void for_each_tensor(W& w, F&& f) {
  f("fc1_experts_weights", w.fc1_weights), f("fc1_scales", w.fc1_scales), f("fc1_experts_bias", w.fc1_bias);
  f("fc2_experts_weights", w.fc2_weights), f("fc2_scales", w.fc2_scales), f("fc2_experts_bias", w.fc2_bias);
  f("fc3_experts_weights", w.fc3_weights), f("fc3_scales", w.fc3_scales), f("fc3_experts_bias", w.fc3_bias);
  f("fc1_zero_points", w.fc1_zero_points), f("fc2_zero_points", w.fc2_zero_points);
  f("fc3_zero_points", w.fc3_zero_points);
}

/// Sizes derived from validated weights.
struct MoeShape {
  std::int64_t num_experts = 0;  ///< E
  std::int64_t hidden = 0;       ///< H
  std::int64_t inter = 0;        ///< I (per expert)
  std::int64_t fc1_rows = 0;     ///< N1: 2I for fused swiglu, else I
};

/// Checks every weight tensor against the attributes (shapes, dtypes, which
/// optional tensors are allowed, attribute ranges, block_size divisibility,
/// zero-point shapes) and returns the derived sizes. Throws qmoe::Error naming
/// the tensor or attribute, the expected and the actual value.
MoeShape validate(const ExpertWeights& w, const MoeAttributes& attrs);

}  // namespace qmoe
