// Chooses the CPU kernel table once per process.
#include <cstdlib>
#include <string>

#include "core/check.h"
#include "cpu/kernels.h"

namespace qmoe::cpu {

const char* isa_name(Isa isa) noexcept {
  switch (isa) {
    case Isa::scalar: return "scalar";
  }
  return "?";
}


namespace {

constexpr KernelConfig kScalar{Isa::scalar, "scalar", 16, gemm_f32_q4_4x16__scalar, gemm_f32_q8_4x16__scalar,
                              256 * 16 /* one chunk of 256 columns x 16 rows */};

// Tables in order of preference; the first the CPU supports wins.
constexpr const KernelConfig* kTables[] = {&kScalar};

const KernelConfig& choose() {
  const char* forced = std::getenv("QMOE_CPU_ISA");
  if (forced && *forced) {
    for (const KernelConfig* k : kTables)
      if (std::string(forced) == k->name) return *k;
    std::string names;
    for (const KernelConfig* k : kTables) names += std::string(names.empty() ? "" : ", ") + k->name;
    detail::fail("QMOE_CPU_ISA: expected one of the paths this build and CPU support (", names, "), got \"", forced,
                 "\"");
  }
  return *kTables[0];
}

}  // namespace

const KernelConfig& kernel_config() {
  static const KernelConfig& chosen = choose();
  return chosen;
}

}  // namespace qmoe::cpu
