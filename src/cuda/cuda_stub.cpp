// The CUDA backend's stand-in for builds without nvcc: every entry point says so.
#include "core/check.h"
#include "cuda/cuda_moe.h"

namespace qmoe::cuda {

namespace {
[[noreturn]] void unavailable() {
  detail::fail("backend: this build of qmoe has no CUDA backend (configure with nvcc present, -DQMOE_CUDA=ON)");
}
}  // namespace

struct CudaMoe::State {};

bool available() noexcept { return false; }
CudaMoe::CudaMoe(const ExpertWeights&, const MoeAttributes&, const MoeShape&, const LayerOptions&,
                 const std::function<void(const void*, std::size_t)>*) {
  unavailable();
}
CudaMoe::~CudaMoe() = default;
void CudaMoe::forward(const TensorView&, const TensorView&, const TensorView&, const MutableTensorView&,
                      std::int64_t) const {
  unavailable();
}
void CudaMoe::forward_async(const TensorView&, const TensorView&, const TensorView&, const MutableTensorView&,
                            std::int64_t, void*) const {
  unavailable();
}
std::size_t CudaMoe::packed_bytes() const { return 0; }
std::size_t CudaMoe::device_bytes() const { return 0; }
std::size_t CudaMoe::workspace_bytes() const { return 0; }
const std::string& CudaMoe::name() const {
  static const std::string n = "cuda (not built)";
  return n;
}

}  // namespace qmoe::cuda
