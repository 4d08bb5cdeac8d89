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
  if (o.cuda_pdl) {
    const std::string p = env("QMOE_CUDA_PDL");
    detail::require(p.empty() || p == "0" || p == "1", "QMOE_CUDA_PDL: expected 0 or 1, got \"", p, "\"");
    o.cuda_pdl = p != "0";
  }
  if (o.cuda_fuse == LayerOptions{}.cuda_fuse) {
    const std::string f = env("QMOE_CUDA_FUSE");
    detail::require(f.empty() || f == "0" || f == "1", "QMOE_CUDA_FUSE: expected 0 or 1, got \"", f, "\"");
    if (!f.empty()) o.cuda_fuse = f == "1";
  }
  if (!o.profile) o.profile = env("QMOE_PROFILE") == "1";
  return o;
}

}  // namespace qmoe
