// The float32 FMA ceiling with this ISA's vectors (peak_driver.h).
#include "cpu/kernels.h"
#include "cpu/kernels/ops_scalar.h"
#include "cpu/kernels/peak_driver.h"

namespace qmoe::cpu {

double peak_f32_fma__scalar(std::int64_t iterations, float seed) {
  return driver::peak_fma<OpsScalar>(iterations, seed);
}

}  // namespace qmoe::cpu
