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

struct PhaseClock;
struct Plan;

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
  /// `experts`, when given: pack only these experts (slot i holds expert
  /// experts[i]); such a layer serves run_rows(), not forward().
  CpuMoe(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s, int threads, int accuracy_level = 0,
         std::int64_t chunk_bytes = kDefaultChunkBytes, const KernelConfig* kernels = nullptr,
         const detail::ReleaseFn* release = nullptr, bool profile = false, const std::vector<int>* experts = nullptr);

  void forward(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
               const MutableTensorView& out, std::int64_t tokens) const override;

  /// y[r] = FC2(act(FC1(x[r]))) + bias2 for `rows` float32 rows [rows, H] grouped by slot:
  /// counts[i] rows of slot i, then slot i + 1's (HostExperts::run). Thread-safe like forward().
  void run_rows(const float* x, const std::int64_t* counts, std::int64_t rows, float* y) const;

  /// Wakes the thread pool ahead of a call (ThreadPool::wake).
  void wake_threads() const { pool_->wake(); }

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
  struct Lease {  // a call's workspace, returned on every exit path
    const CpuMoe* self;
    WorkspacePtr w;
    ~Lease() { self->release(std::move(w)); }
  };
  // One chunk of tokens: plan -> gather -> FC1 -> FC2 (path_) -> combine.
  void run_chunk(Workspace& ws, const float* x, const float* logits, const float* mix, std::int64_t t0, std::int64_t t1,
                 float* out) const;
  // A plan's rows through gather -> FC1 -> FC2 (path_); returns the FC2 outputs (rows of
  // FC2's tiles * NR floats, bias not added).
  const float* run_experts(Workspace& ws, const Plan& plan, const float* x, PhaseClock& clock) const;

  MoeAttributes attrs_;
  MoeShape shape_;
  bool subset_ = false;     // built on an expert subset: run_rows() only
  std::int64_t slots_ = 0;  // experts packed
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
