#include "cpu/plan.h"

#include <algorithm>
#include <utility>

#include "core/routing.h"

namespace qmoe::cpu {

Plan make_plan(ThreadPool& pool, const float* logits, const float* mix, std::int64_t t0, std::int64_t t1, int experts,
               int k, bool normalize) {
  const std::int64_t e_count = experts, nt = t1 - t0, nrows = nt * k;
  Plan p;
  p.t0 = t0, p.tokens = nt, p.rows = nrows, p.k = k;
  p.chosen.resize(static_cast<std::size_t>(nrows));
  std::vector<double> wts(static_cast<std::size_t>(nrows));
  {
    const std::int64_t per = 16, items = (nt + per - 1) / per;
    pool.parallel_for(items, [&](std::int64_t item, int) {
      for (std::int64_t i = item * per; i < std::min(nt, (item + 1) * per); ++i)
        detail::route_token(logits + (t0 + i) * e_count, mix ? mix + (t0 + i) * e_count : nullptr, experts, k,
                            normalize, &p.chosen[i * k], &wts[i * k]);
    });
  }
  p.count.assign(static_cast<std::size_t>(e_count), 0);
  p.offset.assign(static_cast<std::size_t>(e_count + 1), 0);
  for (int e : p.chosen) ++p.count[e];
  for (std::int64_t e = 0; e < e_count; ++e) p.offset[e + 1] = p.offset[e] + p.count[e];
  p.row_token.resize(static_cast<std::size_t>(nrows));
  p.slot_pos.resize(static_cast<std::size_t>(nrows));
  p.row_weight.resize(static_cast<std::size_t>(nrows));
  {
    std::vector<std::int64_t> fill(p.offset.begin(), p.offset.end() - 1);
    for (std::int64_t i = 0; i < nt; ++i)
      for (int j = 0; j < k; ++j) {
        const std::int64_t pos = fill[p.chosen[i * k + j]]++;
        p.row_token[pos] = t0 + i;
        p.slot_pos[i * k + j] = pos;
        p.row_weight[pos] = static_cast<float>(wts[i * k + j]);
      }
  }
  for (std::int64_t e = 0; e < e_count; ++e)
    if (p.count[e]) p.active.push_back(static_cast<int>(e)), p.max_count = std::max(p.max_count, p.count[e]);
  p.row_expert.resize(static_cast<std::size_t>(nrows));
  for (int e : p.active) std::fill(p.row_expert.begin() + p.offset[e], p.row_expert.begin() + p.offset[e + 1], e);
  return p;
}

Plan plan_rows(const std::int64_t* counts, int experts, std::int64_t rows) {
  Plan p;
  p.tokens = rows, p.rows = rows, p.k = 1;
  p.count.assign(counts, counts + experts);
  p.offset.assign(static_cast<std::size_t>(experts) + 1, 0);
  for (int e = 0; e < experts; ++e) p.offset[e + 1] = p.offset[e] + p.count[e];
  p.chosen.resize(static_cast<std::size_t>(rows));
  p.row_expert.resize(static_cast<std::size_t>(rows));
  for (int e = 0; e < experts; ++e) {
    std::fill(p.chosen.begin() + p.offset[e], p.chosen.begin() + p.offset[e + 1], e);
    std::fill(p.row_expert.begin() + p.offset[e], p.row_expert.begin() + p.offset[e + 1], e);
    if (p.count[e]) p.active.push_back(e), p.max_count = std::max(p.max_count, p.count[e]);
  }
  p.slot_pos.resize(static_cast<std::size_t>(rows));
  p.row_token.resize(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) p.slot_pos[r] = r, p.row_token[r] = r;
  p.row_weight.assign(static_cast<std::size_t>(rows), 1.f);
  return p;
}

void combine(ThreadPool& pool, const Plan& plan, const float* y2, const float* bias2, std::int64_t ld,
             std::int64_t hidden, float* out) {
  const std::int64_t nt = plan.tokens, h = hidden;
  const int k = plan.k;
  const std::int64_t per = 16, items = (nt + per - 1) / per;
  pool.parallel_for(items, [&](std::int64_t item, int) {
    std::vector<std::pair<int, std::int64_t>> slots(static_cast<std::size_t>(k));  // (expert, plan row)
    for (std::int64_t i = item * per; i < std::min(nt, (item + 1) * per); ++i) {
      for (int j = 0; j < k; ++j) slots[j] = {plan.chosen[i * k + j], plan.slot_pos[i * k + j]};
      std::sort(slots.begin(), slots.end());  // the experts of a token are distinct
      float* dst = out + (plan.t0 + i) * h;   // every token of the chunk is written here, whole
      for (std::size_t j = 0; j < slots.size(); ++j) {
        const auto [e, pos] = slots[j];
        const float* yr = y2 + pos * ld;
        const float* b2 = bias2 + e * ld;
        const float wgt = plan.row_weight[pos];
        if (j == 0)
          for (std::int64_t q = 0; q < h; ++q) dst[q] = 0.f + wgt * (yr[q] + b2[q]);
        else
          for (std::int64_t q = 0; q < h; ++q) dst[q] += wgt * (yr[q] + b2[q]);
      }
    }
  });
}

}  // namespace qmoe::cpu
