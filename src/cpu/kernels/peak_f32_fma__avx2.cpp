// The float32 FMA ceiling with this ISA's vectors: 12 independent chains.
#include "cpu/kernels.h"
#include "cpu/kernels/ops_avx2.h"

namespace qmoe::cpu {

double peak_f32_fma__avx2(std::int64_t iterations, float seed) {
  using V = OpsAvx2::V;
  constexpr int kChains = 12;  // enough to cover FMA latency x ports; few enough for 16 AVX2 registers
  V acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = OpsAvx2::splat(seed + static_cast<float>(i));
  const V a = OpsAvx2::splat(0.999999f), b = OpsAvx2::splat(1e-7f);
  for (std::int64_t it = 0; it < iterations; ++it)
    for (int i = 0; i < kChains; ++i) acc[i] = OpsAvx2::fma(acc[i], a, b);
  V sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = OpsAvx2::add(sum, acc[i]);
  float out[64];
  OpsAvx2::store(out, sum);
  volatile float keep = out[0];
  (void)keep;
  return 2.0 * kChains * static_cast<double>(sizeof(V) / sizeof(float)) * static_cast<double>(iterations);
}

}  // namespace qmoe::cpu
