// Internal: validation of attributes, weights and per-call inputs.
#pragma once

#include <cstdint>

#include "qmoe/config.h"
#include "qmoe/tensor.h"
#include "qmoe/weights.h"

namespace qmoe::detail {

/// Attribute ranges alone (no tensors).
void validate_attributes(const MoeAttributes& a);

/// Per-call inputs; returns the token count T (rows of the flattened input).
/// `out` may be null (reference forward has no output view).
std::int64_t validate_call(const MoeShape& s, const TensorView& input, const TensorView& router_probs,
                           const TensorView& router_weights, const MutableTensorView* out);

/// Number of quantization blocks along K (1 for row-wise).
inline std::int64_t blocks_per_row(std::int64_t k, int block_size) { return block_size ? k / block_size : 1; }

}  // namespace qmoe::detail
