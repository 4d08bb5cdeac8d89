// Internal: the CUDA backend of a Layer, behind a plain C++ interface so that
// its header compiles without nvcc. Builds without CUDA compile cuda_stub.cpp
// instead of the .cu sources (its factory says the backend is not built).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "layer/backend.h"
#include "qmoe/layer.h"

namespace qmoe::cuda {

class CudaMoe final : public detail::LayerBackend {
 public:
  /// Validated raw weights (host memory) -> packed on `options.device`, one
  /// expert's tensors at a time copied to the device and packed there.
  /// `release(p, n)`, when given, is told that raw bytes [p, p + n) have been
  /// copied (so a memory-mapped source can drop them).
  /// options.host_experts (ascending): those experts are built by `host_experts`
  /// and run on the host (HostPass in moe.cu).
  CudaMoe(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s, const LayerOptions& options,
          const detail::ReleaseFn* release = nullptr, const detail::HostExpertsFactory* host_experts = nullptr);
  ~CudaMoe() override;
  CudaMoe(const CudaMoe&) = delete;
  CudaMoe& operator=(const CudaMoe&) = delete;

  /// Views on host or device memory; waits for the result.
  void forward(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
               const MutableTensorView& out, std::int64_t tokens) const override;
  /// Views on device memory; enqueued on `stream`, no host synchronisation.
  void forward_async(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                     const MutableTensorView& out, std::int64_t tokens, void* stream) const override;

  std::size_t packed_bytes() const override;
  int threads() const override;
  std::size_t device_bytes() const override;
  std::size_t workspace_bytes() const override;
  std::int64_t host_experts_gpu_from() const override;
  const std::string& name() const override;

  struct State;

 private:
  std::unique_ptr<State> s_;
};

}  // namespace qmoe::cuda
