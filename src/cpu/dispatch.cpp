// Chooses the CPU kernel table once per process.
#include <cstdlib>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <string>

#include "core/check.h"
#include "cpu/kernels.h"
#include "cpu/quant_act.h"
#include "qmoe/layer.h"

namespace qmoe::cpu {

const char* isa_name(Isa isa) noexcept {
  switch (isa) {
    case Isa::scalar:
      return "scalar";
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    case Isa::avx512vnni:
      return "avx512vnni";
    case Isa::amx:
      return "amx";
  }
  return "?";
}

namespace {

// Each table binds one kernel set per arithmetic (kernels.h; designated initializers: a
// missing field is a compile-time warning, never a null call).
constexpr KernelConfig kAmx{.isa = Isa::amx,
                            .name = "amx",
                            .f32 = kF32Avx512,
                            .qd8 = {kQd8Avx512Vnni, quantize_rows__avx512},
                            .peak_fma = peak_f32_fma__avx512,
                            .bf16 = kBf16Amx};
constexpr KernelConfig kAvx512Vnni{.isa = Isa::avx512vnni,
                                   .name = "avx512vnni",
                                   .f32 = kF32Avx512,
                                   .qd8 = {kQd8Avx512Vnni, quantize_rows__avx512},
                                   .peak_fma = peak_f32_fma__avx512};
constexpr KernelConfig kAvx512{.isa = Isa::avx512,
                               .name = "avx512",
                               .f32 = kF32Avx512,
                               .qd8 = {kQd8Avx2, quantize_rows__avx512},
                               .peak_fma = peak_f32_fma__avx512};
constexpr KernelConfig kAvx2{.isa = Isa::avx2,
                             .name = "avx2",
                             .f32 = kF32Avx2,
                             .qd8 = {kQd8Avx2, quantize_rows},
                             .peak_fma = peak_f32_fma__avx2};
constexpr KernelConfig kScalar{.isa = Isa::scalar,
                               .name = "scalar",
                               .f32 = kF32Vec128,
                               .qd8 = {kQd8Scalar, quantize_rows},
                               .peak_fma = peak_f32_fma__vec128};

// Tables in order of preference; the first the CPU supports wins.
constexpr const KernelConfig* kTables[] = {&kAmx, &kAvx512Vnni, &kAvx512, &kAvx2, &kScalar};

#if defined(__x86_64__)
// AMX needs the CPU (CPUID.7.0:EDX bits 22 AMX-BF16, 24 AMX-TILE), the AVX-512
// BF16 conversions, and the kernel's permission to use the large tile state
// (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)), asked once per process.
bool amx_usable() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    __cpuid_count(7, 1, a, b, c, d);
    if (!((a >> 5) & 1u)) return false;  // AVX512_BF16
#if defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}
#endif

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::scalar:
      return true;
    // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::avx512vnni:
      return cpu_supports(Isa::avx512) && __builtin_cpu_supports("avx512vnni");
    case Isa::amx:
      return cpu_supports(Isa::avx512vnni) && amx_usable();
  }
  return false;
#else
  return isa == Isa::scalar;
#endif
}

}  // namespace

std::vector<const KernelConfig*> supported_kernel_configs() {
  std::vector<const KernelConfig*> out;
  for (const KernelConfig* k : kTables)
    if (cpu_supports(k->isa)) out.push_back(k);
  return out;
}

const KernelConfig& kernel_config_named(const std::string& name, const char* what) {
  if (name.empty()) {
    for (const KernelConfig* k : kTables)
      if (cpu_supports(k->isa)) return *k;
    return kScalar;
  }
  std::string names;
  for (const KernelConfig* k : kTables) {
    if (name == k->name) {
      if (!cpu_supports(k->isa)) detail::fail(what, ": \"", name, "\" is not supported by this CPU");
      return *k;
    }
    names += std::string(names.empty() ? "" : ", ") + k->name;
  }
  detail::fail(what, ": expected one of ", names, ", got \"", name, "\"");
}

const KernelConfig& kernel_config() {
  static const KernelConfig& chosen = kernel_config_named(with_environment({}).cpu_kernels, "QMOE_CPU_ISA");
  return chosen;
}

}  // namespace qmoe::cpu
