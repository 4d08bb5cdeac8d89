// Internal: top-k routing of one token (softmax top-k, ties to the lower index; README "Supported features").
#pragma once

#include <cstdint>

namespace qmoe::detail {

/// Chooses k of E experts for one token and their mixing weights.
///   logits          E router logits (router_probs row)
///   mix             E mixing values (router_weights row) or null: mix by softmax(logits)
///   experts/weights k outputs, in rank order (largest first; ties: lower index first)
/// Selection compares logits directly (softmax is monotonic, so this is exact);
/// a NaN logit ranks last. Weights are softmax(logits)[chosen] (float64), or
/// mix[chosen], divided by their sum when `normalize`.
void route_token(const float* logits, const float* mix, int num_experts, int k, bool normalize, int* experts,
                 double* weights);

}  // namespace qmoe::detail
