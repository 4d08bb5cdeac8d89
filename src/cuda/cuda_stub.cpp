// The CUDA backend's stand-in for builds without nvcc: the factory says so.
#include "core/check.h"
#include "layer/backend.h"

namespace qmoe::detail {

bool cuda_backend_available() noexcept { return false; }

std::unique_ptr<LayerBackend> make_cuda_backend(const ExpertWeights&, const MoeAttributes&, const MoeShape&,
                                                const LayerOptions&, const ReleaseFn*, const HostExpertsFactory*) {
  fail("backend: this build of qmoe has no CUDA backend (configure with nvcc present, -DQMOE_CUDA=ON)");
}

}  // namespace qmoe::detail
