// Internal: the CUDA backend of a Layer, behind a plain C++ interface so that
// the rest of the library builds without nvcc (cuda_stub.cpp stands in when
// QMOE_CUDA is off).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "qmoe/layer.h"

namespace qmoe::cuda {

/// True when the CUDA backend is built and a device is present.
bool available() noexcept;

class CudaMoe {
 public:
  /// Validated raw weights (host memory) -> packed on `options.device`, one
  /// expert's tensors at a time copied to the device and packed there.
  /// `release(p, n)`, when given, is told that raw bytes [p, p + n) have been
  /// copied (so a memory-mapped source can drop them).
  CudaMoe(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s, const LayerOptions& options,
          const std::function<void(const void*, std::size_t)>* release = nullptr);
  ~CudaMoe();
  CudaMoe(const CudaMoe&) = delete;
  CudaMoe& operator=(const CudaMoe&) = delete;

  /// Views on host or device memory; waits for the result.
  void forward(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
               const MutableTensorView& out, std::int64_t tokens) const;
  /// Views on device memory; enqueued on `stream`, no host synchronisation.
  void forward_async(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                     const MutableTensorView& out, std::int64_t tokens, void* stream) const;

  std::size_t packed_bytes() const;
  std::size_t device_bytes() const;
  std::size_t workspace_bytes() const;
  const std::string& name() const;

  struct State;

 private:
  std::unique_ptr<State> s_;
};

}  // namespace qmoe::cuda
