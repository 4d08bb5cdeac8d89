// Internal: the interface every backend implements, and the factories the Layer
// front (layer.cpp, the only code that picks a backend) calls. A backend's
// sources define its factory; nothing else includes a backend's headers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "qmoe/layer.h"

namespace qmoe::detail {

/// Told (from any thread) that the packer has finished reading raw bytes
/// [p, p + n), so a memory-mapped source can drop those pages as it goes.
using ReleaseFn = std::function<void(const void*, std::size_t)>;

/// A built layer on one backend. Construction (in the factory) validates what
/// is backend-specific and prepacks the weights; the front has already
/// validated the weights, attributes and options against the contract.
class LayerBackend {
 public:
  virtual ~LayerBackend() = default;

  /// out = QMoE(...) for `tokens` >= 1 rows; the views are validated by the front.
  virtual void forward(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                       const MutableTensorView& out, std::int64_t tokens) const = 0;
  /// As forward(), enqueued on `stream` where the backend has streams; a
  /// backend without them takes only a null stream and runs forward().
  virtual void forward_async(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                             const MutableTensorView& out, std::int64_t tokens, void* stream) const;

  /// Bytes of the prepacked weights.
  virtual std::size_t packed_bytes() const = 0;
  /// Threads forward() uses (0 where the backend has no host threads).
  virtual int threads() const { return 0; }
  /// Device memory the layer holds, and its share of the per-device working memory.
  virtual std::size_t device_bytes() const { return 0; }
  virtual std::size_t workspace_bytes() const { return 0; }
  /// CUDA with host experts: tokens per pass from which they run on the GPU; 0 = never.
  virtual std::int64_t host_experts_gpu_from() const { return 0; }
  /// A short description of the kernels chosen.
  virtual const std::string& name() const = 0;
};

/// Experts a CUDA Layer keeps in host memory and runs with the CPU kernels
/// (LayerOptions::host_experts), behind this interface so that the CUDA backend
/// includes no CPU header.
class HostExperts {
 public:
  virtual ~HostExperts() = default;
  /// y[r] = FC2(act(FC1(x[r]))) + fc2 bias of row r's expert, float32 rows [rows, H]: counts[i]
  /// rows of the i-th host expert (LayerOptions::host_experts order), then the (i+1)-th's.
  /// May run from any thread, and from several at once.
  virtual void run(const float* x, const std::int64_t* counts, std::int64_t rows, float* y) const = 0;
  /// Told that a run() is coming soon (the GPU work before it is enqueued): the
  /// CPU threads can stop sleeping. Returns at once.
  virtual void prepare() const {}
  virtual std::size_t packed_bytes() const = 0;
  virtual int threads() const = 0;
  virtual const std::string& name() const = 0;
};

/// The factories, one per backend (each defined in its backend's sources;
/// cuda_stub.cpp stands in for CUDA when the build has no nvcc). `options`
/// went through with_environment().
std::unique_ptr<LayerBackend> make_cpu_backend(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s,
                                               const LayerOptions& options, const ReleaseFn* release);
/// The CPU side of a CUDA Layer with host experts: packs only `experts` (ascending ids).
std::unique_ptr<HostExperts> make_cpu_host_experts(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s,
                                                   const LayerOptions& options, const std::vector<int>& experts,
                                                   const ReleaseFn* release);
using HostExpertsFactory = std::function<std::unique_ptr<HostExperts>()>;
/// `host_experts` builds the CPU side of options.host_experts (ascending, validated); the
/// backend calls it once its own checks pass (not at all when the list is empty).
std::unique_ptr<LayerBackend> make_cuda_backend(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s,
                                                const LayerOptions& options, const ReleaseFn* release,
                                                const HostExpertsFactory* host_experts = nullptr);
/// True when the CUDA backend is built and a device is present.
bool cuda_backend_available() noexcept;

}  // namespace qmoe::detail
