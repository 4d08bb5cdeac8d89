// `qmoe bench`'s input sets: Gaussian inputs and router logits whose routing
// spreads consecutive calls over different experts.
#include "bench_inputs.h"

#include <algorithm>
#include <climits>
#include <numeric>

#include "synth.h"

namespace qmoe::cli {

namespace {

std::int64_t overlap(const std::vector<char>& a, const std::vector<char>& b) {
  std::int64_t n = 0;
  for (std::size_t i = 0; i < a.size(); ++i) n += a[i] & b[i];
  return n;
}

// N(0, stddev) values, never exactly zero.
void fill_nonzero(std::vector<float>& v, std::mt19937_64& rng, float stddev) {
  tools::fill_normal(v, rng, stddev);
  for (auto& x : v)
    if (x == 0.f) x = 1e-3f;
}

}  // namespace

std::int64_t route_mask(const std::vector<float>& logits, std::int64_t t, std::int64_t e, int k,
                        std::vector<char>& used) {
  used.assign(static_cast<std::size_t>(e), 0);
  std::vector<int> idx(static_cast<std::size_t>(e));
  for (std::int64_t i = 0; i < t; ++i) {
    const float* l = &logits[static_cast<std::size_t>(i * e)];
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [&](int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    for (int j = 0; j < k; ++j) used[static_cast<std::size_t>(idx[static_cast<std::size_t>(j)])] = 1;
  }
  return std::count(used.begin(), used.end(), 1);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Draws the input sets of one T. Why: a decode call (T = 1) touches k experts,
// often less than the last-level cache, so timing one input over and over
// measures cache bandwidth, and in a real model the other layers run between
// two calls of this one and evict it. So the sets are drawn until the experts
// they touch together exceed `target` bytes (4x the LLC), or cover every expert,
// or number `max_sets`, and each set is the one of up to 32 draws that shares
// the fewest experts with the set before it (and the last also with the first,
// since the cycle wraps): consecutive calls read different experts.
void rotate(Sample& s, std::int64_t h, std::int64_t e, int k, double bytes_per_expert, double target,
            std::size_t max_sets, std::mt19937_64& rng) {
  const std::int64_t t = s.tokens;
  const double set_bytes = 4.0 * static_cast<double>(t * (h + e));
  // Inputs of one T stay below 512 MiB however small the target makes R.
  max_sets = std::max<std::size_t>(1, std::min(max_sets, static_cast<std::size_t>((512.0 * (1 << 20)) / set_bytes)));
  std::vector<char> all(static_cast<std::size_t>(e), 0);
  auto draw = [&](const std::vector<const InputSet*>& avoid) {
    InputSet best;
    std::int64_t best_overlap = INT64_MAX;
    for (int attempt = 0; attempt < 32 && best_overlap > 0; ++attempt) {
      InputSet c;
      c.x.resize(static_cast<std::size_t>(t * h));
      c.logits.resize(static_cast<std::size_t>(t * e));
      fill_nonzero(c.x, rng, 1.0f);
      fill_nonzero(c.logits, rng, 1.5f);
      c.touched = route_mask(c.logits, t, e, k, c.used);
      std::int64_t ov = 0;
      for (const InputSet* a : avoid) ov += overlap(c.used, a->used);
      const bool last = avoid.empty() || c.touched == e;  // nothing to avoid, or nothing can be avoided
      if (ov < best_overlap) best_overlap = ov, best = std::move(c);
      if (last) break;
    }
    return best;
  };
  while (true) {
    std::vector<const InputSet*> avoid;
    if (!s.sets.empty()) avoid.push_back(&s.sets.back());
    InputSet next = draw(avoid);
    for (std::size_t i = 0; i < all.size(); ++i) all[i] |= next.used[i];
    s.sets.push_back(std::move(next));
    const std::int64_t u = std::count(all.begin(), all.end(), 1);
    if (static_cast<double>(u) * bytes_per_expert >= target || u == e || s.sets.size() >= max_sets) break;
  }
  if (s.sets.size() > 2) {  // the cycle wraps: redraw the last set avoiding the first one as well
    const std::vector<const InputSet*> avoid{&s.sets[s.sets.size() - 2], &s.sets.front()};
    InputSet last = draw(avoid);
    const std::int64_t old_ov =
        overlap(s.sets.back().used, s.sets[s.sets.size() - 2].used) + overlap(s.sets.back().used, s.sets.front().used);
    const std::int64_t new_ov =
        overlap(last.used, s.sets[s.sets.size() - 2].used) + overlap(last.used, s.sets.front().used);
    if (new_ov < old_ov) s.sets.back() = std::move(last);
  }
  std::fill(all.begin(), all.end(), 0);
  double sum = 0;
  for (const InputSet& x : s.sets) {
    sum += static_cast<double>(x.touched);
    for (std::size_t i = 0; i < all.size(); ++i) all[i] |= x.used[i];
  }
  s.touched_mean = sum / static_cast<double>(s.sets.size());
  s.union_experts = static_cast<double>(std::count(all.begin(), all.end(), 1));
}

}  // namespace qmoe::cli
