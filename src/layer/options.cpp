// The one place environment variables are read: with_environment() fills the
// LayerOptions override fields that hold their defaults.
#include <cstdlib>
#include <string>

#include "core/check.h"
#include "qmoe/layer.h"

namespace qmoe {

namespace {

// The value of environment variable `name`; empty when unset.
std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// A boolean override: `field` still at its default `dflt` takes variable `name`
// when it is set, "0" or "1" (anything else is refused by name).
void fill_bool(bool& field, bool dflt, const char* name) {
  if (field != dflt) return;
  const std::string v = env(name);
  detail::require(v.empty() || v == "0" || v == "1", name, ": expected 0 or 1, got \"", v, "\"");
  if (!v.empty()) field = v == "1";
}

}  // namespace

LayerOptions with_environment(LayerOptions o) {
  if (o.cpu_kernels.empty()) o.cpu_kernels = env("QMOE_CPU_ISA");
  if (o.cuda_gemm == CudaGemm::automatic) {
    const std::string g = env("QMOE_CUDA_GEMM");
    if (g == "mma") {
      o.cuda_gemm = CudaGemm::mma;
    } else if (g == "wgmma") {
      o.cuda_gemm = CudaGemm::wgmma;
    } else {
      detail::require(g.empty() || g == "auto", "QMOE_CUDA_GEMM: expected one of auto, mma, wgmma, got \"", g, "\"");
    }
  }
  const LayerOptions defaults;
  fill_bool(o.cuda_pdl, defaults.cuda_pdl, "QMOE_CUDA_PDL");
  fill_bool(o.cuda_fuse, defaults.cuda_fuse, "QMOE_CUDA_FUSE");
  fill_bool(o.cuda_host_polling, defaults.cuda_host_polling, "QMOE_CUDA_HOST_POLLING");
  if (!o.profile) o.profile = env("QMOE_PROFILE") == "1";
  return o;
}

}  // namespace qmoe
