// Internal: the float32 FMA ceiling probe, written once against a kernel table's
// primitives ("Ops", see gemm_driver.h): 12 independent FMA chains, enough to cover
// FMA latency x ports, few enough for 16 AVX2 registers. Included by the
// peak_f32_fma__<isa>.cpp files, each with its own Ops and flags (a template on Ops,
// so nothing merges across ISAs).
#pragma once

#include <cstdint>

namespace qmoe::cpu::driver {

/// Runs `iterations` rounds of the chains; returns the flops done.
template <class Ops>
double peak_fma(std::int64_t iterations, float seed) {
  using V = typename Ops::V;
  constexpr int kChains = 12;
  V acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = Ops::splat(seed + static_cast<float>(i));
  const V a = Ops::splat(0.999999f), b = Ops::splat(1e-7f);
  for (std::int64_t it = 0; it < iterations; ++it)
    for (int i = 0; i < kChains; ++i) acc[i] = Ops::fma(acc[i], a, b);
  V sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = Ops::add(sum, acc[i]);
  float out[64];
  Ops::store(out, sum);
  volatile float keep = out[0];
  (void)keep;
  return 2.0 * kChains * (static_cast<double>(sizeof(V)) / static_cast<double>(sizeof(float))) *
         static_cast<double>(iterations);
}

}  // namespace qmoe::cpu::driver
