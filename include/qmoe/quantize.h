// qmoe/quantize.h — float expert matrices -> raw QMoE layout (no GPU needed).
#pragma once

#include <cstdint>
#include <vector>

#include "qmoe/tensor.h"

namespace qmoe {

/// How to quantize.
struct QuantizeOptions {
  int bits = 4;           ///< 4 or 8
  int block_size = 0;     ///< 0 = one scale per row; else a power of two >= 16 dividing K
  bool symmetric = true;  ///< true: scale = absmax/(2^(bits-1)-1), stored q + 2^(bits-1), no zero points;
                          ///< false: scale = (max-min)/(2^bits-1) with zero points
};

/// The result, in ONNX Runtime's layout (see weights.h), owning its buffers.
struct QuantizedWeights {
  std::int64_t experts = 0, rows = 0, cols = 0;  ///< E, N, K of the float input
  int bits = 4, block_size = 0;
  std::vector<std::uint8_t> weights;      ///< [E, N, K/pack]
  std::vector<float> scales;              ///< [E, N] or [E, N, K/block]
  std::vector<std::uint8_t> zero_points;  ///< empty when symmetric
  double max_abs_error = 0;               ///< max |dequantized - original|
  double rel_l2_error = 0;                ///< ||dequantized - original|| / ||original||

  TensorView weights_view() const;
  TensorView scales_view() const;
  TensorView zero_points_view() const;  ///< absent when symmetric
};

/// Quantizes w: float32/float16/bfloat16 [E, N, K] (N outputs, K inputs).
/// Throws qmoe::Error for bad shapes, options or non-finite values.
QuantizedWeights quantize(const TensorView& w, const QuantizeOptions& options);

/// Dequantizes one raw matrix (scalar, the oracle used by the reference):
/// returns [E, N, K] float64. scales/zero_points as in weights.h.
std::vector<double> dequantize(const TensorView& weights, const TensorView& scales, const TensorView& zero_points,
                               int bits, int block_size, std::int64_t cols);

}  // namespace qmoe
