// Internal: the CPU backend of a Layer.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/packed.h"
#include "cpu/path.h"
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
  const PackedMatrix& fc1() const { return layer_.fc1; }
  const PackedMatrix& fc2() const { return layer_.fc2; }

 private:
  // Concurrent calls each take their own Workspace (path.h) from the free list.
  using WorkspacePtr = std::unique_ptr<Workspace>;
  WorkspacePtr acquire() const;
  void release(WorkspacePtr w) const;
  // One chunk of tokens: plan -> gather -> FC1 -> FC2 (path_) -> combine.
  void run_chunk(Workspace& ws, const float* x, const float* logits, const float* mix, std::int64_t t0, std::int64_t t1,
                 float* out) const;

  MoeAttributes attrs_;
  MoeShape shape_;
  const KernelConfig* kc_;
  bool profile_;
  std::int64_t chunk_bytes_;
  PackedLayer layer_;
  std::unique_ptr<ExpertPath> path_;  // the arithmetic of accuracy_level on this table
  std::unique_ptr<ThreadPool> pool_;
  std::string name_;
  mutable std::mutex ws_mutex_;
  mutable std::vector<WorkspacePtr> ws_free_;
};

}  // namespace qmoe::cpu
