// Internal: the FC1 epilogue (bias + activation) of one row tile, for every
// token routed to the expert.
#pragma once

#include <cstdint>

#include "qmoe/config.h"

namespace qmoe::cpu {

struct Fc1Epilogue {
  Activation kind = Activation::identity;      ///< swiglu: the tile's rows are interleaved gate/up pairs
  float alpha = 1.f, beta = 0.f, limit = 0.f;  ///< swiglu constants (MoeAttributes)
};

/// Where fc1_epilogue writes output q of row r: float32 rows, f32[r * ld + q]; or, when bf16 is
/// set, the FC2 input of the AMX path, already in its A-tile order (GemmTileBf16Fn in kernels.h)
/// and rounded by to_bf16 (the table's conversion, which every AMX input goes through):
/// bf16[r / 16 * 16 * ld + r % 16 * 32 + q], ld = K padded to a multiple of 32, bf16 at the
/// tile's first output within row 0's 32-column K step (the tile's outputs never cross one).
struct Fc1Dst {
  float* f32 = nullptr;
  std::uint16_t* bf16 = nullptr;
  std::int64_t ld = 0;
  void (*to_bf16)(const float* src, std::uint16_t* dst, std::int64_t n) = nullptr;
};

/// For rows r < rows: output q of row r = activation(y[r * ldy + ...] + bias[...]) for the first
/// `valid` outputs q of a tile of `nr` (16) rows: nr / 2 outputs when gated (swiglu of rows
/// 2q, 2q + 1), nr otherwise, written to dst. Compiled for the best vector ISA the CPU has
/// (function multiversioning); the formulas are those of core/activation.h's fast_*.
void fc1_epilogue(const Fc1Epilogue& p, const float* y, std::int64_t ldy, std::int64_t rows, const float* bias,
                  const Fc1Dst& dst, int valid);

}  // namespace qmoe::cpu
