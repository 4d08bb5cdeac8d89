// Internal: the FC1 epilogue (bias + activation) of one row tile, for every
// token routed to the expert.
#pragma once

#include <cstdint>

#include "qmoe/config.h"

namespace qmoe::cpu {

struct Fc1Epilogue {
  Activation kind = Activation::identity;  ///< swiglu: the tile's rows are interleaved gate/up pairs
  float alpha = 1.f, beta = 0.f, limit = 0.f;  ///< swiglu constants (MoeAttributes)
};

/// For rows r < rows: dst[r * ldd + q] = activation(y[r * ldy + ...] + bias[...]) for the
/// first `valid` outputs q of a tile of `nr` (16) rows: nr / 2 outputs when gated (swiglu of
/// rows 2q, 2q + 1), nr otherwise. Compiled for the best vector ISA the CPU has
/// (function multiversioning); the formulas are those of core/activation.h's fast_*.
void fc1_epilogue(const Fc1Epilogue& p, const float* y, std::int64_t ldy, std::int64_t rows, const float* bias,
                  float* dst, std::int64_t ldd, int valid);

}  // namespace qmoe::cpu
