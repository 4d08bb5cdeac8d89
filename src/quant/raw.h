// Internal: element access to raw (ONNX Runtime layout) quantized matrices.
// Written from the operator contract alone; it is the decoder the float64
// reference uses and the oracle the packers are tested against.
#pragma once

#include <cstdint>

#include "qmoe/tensor.h"

namespace qmoe::detail {

/// One raw matrix [E, N, K] of the contract (weights + scales + optional zero points).
struct RawMatrix {
  const std::uint8_t* weights = nullptr;  ///< [E, N, K/pack]
  const void* scales = nullptr;           ///< [E, N] or [E, N, K/block]
  DType scale_dtype = DType::f32;
  const std::uint8_t* zero_points = nullptr;  ///< optional
  int bits = 4, block_size = 0;
  std::int64_t experts = 0, rows = 0, cols = 0;

  RawMatrix() = default;
  RawMatrix(const TensorView& w, const TensorView& s, const TensorView& z, int bits, int block_size, std::int64_t rows,
            std::int64_t cols);

  std::int64_t pack() const { return 8 / bits; }
  std::int64_t blocks() const { return block_size ? cols / block_size : 1; }
  std::int64_t block_len() const { return block_size ? block_size : cols; }
  /// Unsigned code of element (n, c) of expert e.
  int code(std::int64_t e, std::int64_t n, std::int64_t c) const;
  /// Zero point of row n, block b (2^(bits-1) when absent).
  int zero(std::int64_t e, std::int64_t n, std::int64_t b) const;
  /// Scale of row n, block b.
  float scale(std::int64_t e, std::int64_t n, std::int64_t b) const;
  /// scale * (code - zero) in float64.
  double value(std::int64_t e, std::int64_t n, std::int64_t c) const;
};

/// Dequantizes expert e into out[N*K] (float64).
void dequantize_expert(const RawMatrix& m, std::int64_t e, double* out);

}  // namespace qmoe::detail
