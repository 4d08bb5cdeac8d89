// Internal: the first and last steps of a CPU chunk, the same for every arithmetic:
// route + plan (which expert rows each token feeds) and combine (each token's output
// from its experts' rows).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/thread_pool.h"

namespace qmoe::cpu {

/// The routing of one chunk of tokens [t0, t0 + tokens): its k (token, slot) pairs become
/// `rows` plan rows, the rows of each expert contiguous and in token order.
struct Plan {
  std::int64_t t0 = 0, tokens = 0, rows = 0;
  int k = 0;
  std::vector<int> chosen;              // [token][slot]: the expert
  std::vector<std::int64_t> slot_pos;   // [token][slot]: the plan row
  std::vector<std::int64_t> count;      // [expert]: its rows
  std::vector<std::int64_t> offset;     // [expert + 1]: its first row (offset[E] = rows)
  std::vector<std::int64_t> row_token;  // [row]: the token (absolute index)
  std::vector<int> row_expert;          // [row]: the expert
  std::vector<float> row_weight;        // [row]: the routing weight
  std::vector<int> active;              // experts with rows, ascending
  std::int64_t max_count = 0;           // the most rows of one expert
};

/// Routes tokens [t0, t1) (detail::route_token, in parallel over tokens: serially a 512-token
/// prefill spent ~0.2 ms here on a 4.3 GHz core while the other threads waited) and plans
/// them (serially). logits and mix (null: none) are [T, experts] rows.
Plan make_plan(ThreadPool& pool, const float* logits, const float* mix, std::int64_t t0, std::int64_t t1, int experts,
               int k, bool normalize);

/// The plan of `rows` rows already grouped by expert (counts[e] rows of expert e, then
/// e + 1's; `experts` entries): row r is its own token (k = 1, weight 1).
Plan plan_rows(const std::int64_t* counts, int experts, std::int64_t rows);

/// out[token] = sum over its experts, in ascending expert order, of
/// weight * (y2[plan row] + bias2[expert]), for every token of the plan (rows of y2 and
/// bias2 `ld` floats apart, `hidden` of them used): every output element has one fixed order
/// of additions, whatever the threads. In parallel over tokens; writes each token's row whole.
void combine(ThreadPool& pool, const Plan& plan, const float* y2, const float* bias2, std::int64_t ld,
             std::int64_t hidden, float* out);

}  // namespace qmoe::cpu
