// qmoe/layer.h — a prepacked, immutable QMoE layer and the float64 reference.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "qmoe/config.h"
#include "qmoe/tensor.h"
#include "qmoe/weights.h"

namespace qmoe {

namespace detail {
struct LayerBuilder;
}

/// Where a Layer runs.
enum class Backend {
  cpu,   ///< the CPU kernels (always built)
  cuda,  ///< an NVIDIA GPU (built when CMake finds nvcc; see cuda_available())
};

/// True when this build has the CUDA backend and a CUDA device is present.
bool cuda_available() noexcept;

/// CUDA: which GEMM kernel serves many tokens per expert (prefill).
enum class CudaGemm {
  automatic,  ///< wgmma from 32 tokens per expert on sm_90a builds on compute capability 9.0, else mma.sync
  mma,        ///< mma.sync (sm_80 and newer) whatever the token count
  wgmma,      ///< the sm_90a wgmma kernel whatever the token count (needs compute capability 9.0)
};

/// How a Layer is built.
struct LayerOptions {
  Backend backend = Backend::cpu;
  /// Threads used by forward(): 1..1024, or 0 = all hardware threads (for the
  /// host experts of a CUDA Layer: all but one, left to the thread that drives
  /// the GPU).
  int threads = 0;
  /// The minimum accuracy of the expert GEMMs, with ONNX Runtime's meaning:
  /// 0 or 1 = float32 activations and accumulation (weights dequantized in
  /// registers; exact to float32 rounding); 4 = activations quantized to int8
  /// at run time per block of 16 columns, exact int32 dot products, float32
  /// scaling (relative L2 error ~1e-2 against float64; gpt-oss-20b measured 9e-3);
  /// 3 = bfloat16 activations and weights (dequantized to bf16 tiles) on CPUs
  /// with AMX (relative L2 error ~0.3%), float32 elsewhere; 2 runs in float32.
  /// CUDA computes in the token dtype (float32 accumulation) at every level,
  /// except 4 on sm_90a for row-wise weights or blocks of >= 128 columns: passes
  /// that run the wgmma kernel quantize each GEMM's input to int8 per 128 columns
  /// and multiply on the int8 tensor cores (relative L2 ~1.6e-2 on the
  /// reference shapes, bench/README.md). kernel_name() says when.
  int accuracy_level = 0;
  /// CUDA: the device ordinal the Layer lives on (0 = the first GPU).
  int device = 0;
  /// CUDA: tokens one pass on the GPU handles; the working memory (shared by
  /// every Layer on the device, see workspace_bytes()) is sized for it at
  /// creation. forward() splits larger inputs into passes of this many tokens.
  std::int64_t max_tokens = 4096;
  /// CUDA: experts (ids 0..E-1) kept in host memory and run on the CPU kernels
  /// (`threads`, `accuracy_level`, `cpu_kernels` apply to them) while the other
  /// experts run on the GPU: for models whose experts do not fit the GPU. A call
  /// routes on the GPU, copies the rows routed to host experts to the host, runs
  /// them beside the GPU experts, copies the results back and combines on the
  /// GPU. Empty = every expert on the GPU. Results are the same run to run.
  std::vector<int> host_experts{};
  /// CUDA with host_experts: from this many tokens per pass, the host experts'
  /// weights (kept in host memory in the GPU's layout too: a second, pinned copy)
  /// are copied to the GPU over PCIe and computed there instead of on the CPU,
  /// which is faster for large batches. 0 = never (no second copy);
  /// kMeasureCrossover (the default) = the smallest token count at which the CPU
  /// experts take longer than the copy, measured when the Layer is made (once
  /// per process for a given shape, placement size, device and CPU setting; 0
  /// when the CPU is faster up to max_tokens or the copy does not fit the GPU).
  /// The copy goes to a per-device buffer shared by the Layers (one Layer's host
  /// experts). host_experts_gpu_from() tells the value in effect.
  std::int64_t host_experts_gpu_from = kMeasureCrossover;
  static constexpr std::int64_t kMeasureCrossover = -1;

  // Overrides for diagnosis and tuning. A field left at its default is filled
  // from the environment variable named beside it (see with_environment()).

  /// CPU: the kernel table by name: "scalar", "avx2", "avx512", "avx512vnni"
  /// or "amx"; empty = the best table this CPU runs. (QMOE_CPU_ISA)
  std::string cpu_kernels{};
  /// CUDA: the prefill GEMM. (QMOE_CUDA_GEMM=auto|mma|wgmma)
  CudaGemm cuda_gemm = CudaGemm::automatic;
  /// CUDA: launch FC1, FC2 and the combine as programmatic dependent launches
  /// on compute capability 9.0 and newer; off gives the same bits. (QMOE_CUDA_PDL=0|1)
  bool cuda_pdl = true;
  /// CUDA: fewer kernels for small calls, with all experts on the GPU: a one-token
  /// call's FC1 picks its token's experts itself and runs beside the routing kernel
  /// (with cuda_pdl), and up to 16 tokens per pass the FC2 kernel does the final
  /// combine. Off gives the same bits. (QMOE_CUDA_FUSE=0|1)
  bool cuda_fuse = false;
  /// CUDA with host_experts: eager calls hand the routed rows to the CPU experts and
  /// their results back by polling (a Layer thread polls an event, a one-thread
  /// kernel polls a word of mapped memory) instead of CUDA host functions; calls
  /// captured into graphs keep host functions. The same bits. (QMOE_CUDA_HOST_POLLING=0|1)
  bool cuda_host_polling = false;
  /// CPU: print the time of each phase of every forward() to stderr. (QMOE_PROFILE=1)
  bool profile = false;
};

/// `options` with each override field that holds its default filled from its
/// environment variable (QMOE_CPU_ISA, QMOE_CUDA_GEMM, QMOE_CUDA_PDL,
/// QMOE_CUDA_FUSE, QMOE_CUDA_HOST_POLLING, QMOE_PROFILE), when set and non-empty. Every Layer is built with the options
/// this returns. Throws qmoe::Error naming the variable when a value is not one
/// of those documented.
LayerOptions with_environment(LayerOptions options);

/// A QMoE layer. Construction validates the raw weights and prepacks them into
/// the backend's own layout, expert by expert; it keeps no reference to (and no
/// copy of) the raw weights, which the caller may free afterwards.
/// A Layer is immutable: forward() is const and may run from many threads at once.
class Layer {
 public:
  Layer(const ExpertWeights& weights, const MoeAttributes& attrs, const LayerOptions& options = {});
  ~Layer();
  Layer(Layer&&) noexcept;
  Layer& operator=(Layer&&) noexcept;
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  /// out = QMoE(input, router_probs). input: [T, H] or [B, S, H] (float32,
  /// float16 or bfloat16); router_probs: [T, E] logits of the same dtype; out:
  /// same shape and dtype as input. T = 0 is allowed. Throws qmoe::Error on any
  /// contract violation, before touching `out`.
  void forward(const TensorView& input, const TensorView& router_probs, const MutableTensorView& out) const;
  /// As above; experts are chosen by router_probs and mixed by router_weights [T, E].
  void forward(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
               const MutableTensorView& out) const;

  /// CUDA backend: the views hold device pointers on the Layer's device
  /// (float16 or bfloat16); the work is enqueued on `stream` (a cudaStream_t;
  /// null = the legacy default stream) and the call returns without waiting.
  /// No host synchronisation and no allocation: a CUDA graph can capture it.
  /// (forward() on the CUDA backend takes host or device pointers and waits.)
  /// CPU backend: `stream` must be null and the call is forward().
  void forward_async(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                     const MutableTensorView& out, void* stream) const;

  // Accessors; like forward(), they throw qmoe::Error on a moved-from Layer.

  /// The attributes the Layer was built with.
  const MoeAttributes& attributes() const;
  /// Sizes derived from the weights.
  const MoeShape& shape() const;
  /// Bytes held by the prepacked weights (all experts, scales and biases included).
  std::size_t packed_bytes() const;
  /// Threads forward() uses: the CPU backend's, a CUDA Layer's host experts', else 0.
  int threads() const;
  /// The backend the Layer runs on.
  Backend backend() const;
  /// CUDA: device memory the Layer itself holds (packed weights, scales,
  /// biases); 0 on the CPU backend.
  std::size_t device_bytes() const;
  /// CUDA: bytes of the per-device working memory this Layer uses (shared with
  /// the other Layers on the device that fit in it); 0 on the CPU backend.
  std::size_t workspace_bytes() const;
  /// A short description of the kernels chosen, e.g. "cpu/scalar nr=16".
  const char* kernel_name() const;
  /// CUDA with host_experts: tokens per pass from which the host experts run on
  /// the GPU (LayerOptions::host_experts_gpu_from, measured when asked); 0 = never.
  std::int64_t host_experts_gpu_from() const;

  struct Impl;

 private:
  friend struct detail::LayerBuilder;
  /// As the public constructor; `release(p, n)`, when given, is told (from any
  /// thread) that the packer has finished reading raw bytes [p, p + n).
  Layer(const ExpertWeights& weights, const MoeAttributes& attrs, const LayerOptions& options,
        const std::function<void(const void*, std::size_t)>* release);
  const Impl& impl() const;
  std::unique_ptr<Impl> impl_;
};

/// The oracle: a plain float64 forward straight from the raw weights
/// (dequantize, route, FC1, activation, FC2, mix), following the operator
/// contract literally. Returns [T, H] float64 values, T = input rows.
/// router_weights may be an absent view. Validates like Layer and forward().
std::vector<double> reference_forward(const ExpertWeights& weights, const MoeAttributes& attrs, const TensorView& input,
                                      const TensorView& router_probs, const TensorView& router_weights = {});

}  // namespace qmoe
