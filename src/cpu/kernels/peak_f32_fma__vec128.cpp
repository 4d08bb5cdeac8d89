// The float32 FMA ceiling with this ISA's vectors (peak_driver.h).
#include "cpu/kernels.h"
#include "cpu/kernels/ops_vec128.h"
#include "cpu/kernels/peak_driver.h"

namespace qmoe::cpu {

double peak_f32_fma__vec128(std::int64_t iterations, float seed) {
  return driver::peak_fma<OpsVec128>(iterations, seed);
}

}  // namespace qmoe::cpu
