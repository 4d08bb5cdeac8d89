// Internal to `qmoe bench`: the input sets a token count is timed with, drawn
// so that consecutive calls route to different experts (see rotate()).
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace qmoe::cli {

// One input set of a T: the inputs and which experts their routing touches.
struct InputSet {
  std::vector<float> x, logits;  // [T, H], [T, E]
  std::vector<char> used;        // [E]: 1 when some token routes to the expert
  std::int64_t touched = 0;      // distinct experts routed to
};

struct Sample {
  std::int64_t tokens;                                     // T
  std::vector<InputSet> sets;                              // R sets, used in turn call by call
  double touched_mean = 0;                                 // mean distinct experts per call (over the sets)
  double union_experts = 0;                                // distinct experts of all sets together
  std::vector<std::pair<std::size_t, std::int64_t>> rows;  // (set, row) checked against the reference
  std::int64_t ref_offset = 0;                             // first row of this T in the reference batch
};

/// Marks in `used` the experts in the top-k of each of the t rows of `logits`
/// ([t, e]; ties: the lower index, as the contract's routing); returns how many
/// distinct experts that is.
std::int64_t route_mask(const std::vector<float>& logits, std::int64_t t, std::int64_t e, int k,
                        std::vector<char>& used);

/// The median of v (the mean of the two middle values for an even count).
double median(std::vector<double> v);

/// Draws the input sets of one T until the experts they touch together exceed
/// `target` bytes, cover every expert, or number `max_sets` (see bench_inputs.cpp).
void rotate(Sample& s, std::int64_t h, std::int64_t e, int k, double bytes_per_expert, double target,
            std::size_t max_sets, std::mt19937_64& rng);

}  // namespace qmoe::cli
