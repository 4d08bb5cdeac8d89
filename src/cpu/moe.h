// Internal: the CPU backend of a Layer.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/packed.h"
#include "cpu/thread_pool.h"
#include "layer/backend.h"
#include "qmoe/layer.h"

namespace qmoe::cpu {

class CpuMoe final : public detail::LayerBackend {
 public:
  /// Bytes of per-chunk working memory (gathered inputs + FC1 outputs) that
  /// bound how many tokens one pass handles.
  static constexpr std::int64_t kDefaultChunkBytes = std::int64_t{64} << 20;

  /// accuracy_level 4: int8 activations (quant_act.h); 3: bf16 activations and
  /// weights on AMX where the table has it (else float32); anything else: float32.
  /// `kernels` = null: the process-wide table (kernel_config()).
  /// `release(p, n)`, when given, is told that packing has finished reading
  /// raw bytes [p, p + n) (called from the packing threads, in pieces of about
  /// a MiB), so a memory-mapped source can drop those pages as it goes.
  /// `profile`: print the time of each phase of every call to stderr.
  CpuMoe(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s, int threads, int accuracy_level = 0,
         std::int64_t chunk_bytes = kDefaultChunkBytes, const KernelConfig* kernels = nullptr,
         const detail::ReleaseFn* release = nullptr, bool profile = false);

  void forward(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
               const MutableTensorView& out, std::int64_t tokens) const override;

  std::size_t packed_bytes() const override;
  int threads() const override { return pool_->size(); }
  const std::string& name() const override { return name_; }
  const PackedMatrix& fc1() const { return fc1_; }
  const PackedMatrix& fc2() const { return fc2_; }

 private:
  // Per-call working memory, kept between calls: fresh multi-megabyte buffers
  // every call cost page faults that dominated prefill (notably under gVisor).
  // Concurrent calls each take their own Workspace from the free list.
  struct Workspace;
  struct WorkspaceDeleter {
    void operator()(Workspace* w) const noexcept;
  };
  using WorkspacePtr = std::unique_ptr<Workspace, WorkspaceDeleter>;
  WorkspacePtr acquire() const;
  void release(WorkspacePtr w) const;
  void run_chunk(Workspace& ws, const float* x, const float* logits, const float* mix, std::int64_t t0, std::int64_t t1,
                 float* out) const;

  MoeAttributes attrs_;
  MoeShape shape_;
  const KernelConfig* kc_;
  bool gated_;  // swiglu: FC1 tiles hold interleaved gate/up rows
  bool int8_;   // accuracy_level 4
  bool bf16_;   // accuracy_level 3 on a table with AMX-BF16 kernels
  bool profile_;
  std::int64_t chunk_bytes_;
  PackedMatrix fc1_, fc2_;
  std::vector<float> bias1_, bias2_;  // per expert, in packed row order, padded to whole tiles
  std::unique_ptr<ThreadPool> pool_;
  std::string name_;
  mutable std::mutex ws_mutex_;
  mutable std::vector<WorkspacePtr> ws_free_;
};

}  // namespace qmoe::cpu
