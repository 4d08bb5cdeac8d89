// Internal: the host side of a CUDA Layer with host experts (LayerOptions::host_experts):
// the pass the CUDA runtime runs as a host function while the GPU experts run, and the
// measured crossover from which the host experts run on the GPU instead.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/arena.h"
#include "layer/backend.h"

namespace qmoe::cuda {

/// The first failure of a host pass, reported by the Layer's next forward().
struct HostErrors {
  std::mutex mu;
  std::string first;
  void record(const char* what) noexcept;
  /// Throws the recorded failure (and forgets it), naming `experts`.
  void rethrow(const std::string& experts);
};

/// One context of host passes: the rows in mapped host memory (the arena's for eager
/// calls; a CUDA graph's own for a captured call, so replays may run beside eager calls),
/// a side stream and its fork/join events, and the pass's scratch. Passes of one context
/// are serialized (eager calls by the arena, a graph's by its own order).
struct HostPass {
  const detail::HostExperts* experts = nullptr;  // the Layer's
  HostErrors* errors = nullptr;                  // the Layer's
  int gpu_slots = 0, slots = 0;
  std::int64_t hidden = 0;
  HostRows rows;
  PinnedBuffer own_rows;  // a captured call's mapped host memory
  cudaStream_t side = nullptr;
  cudaEvent_t forked = nullptr, joined = nullptr;  // main stream -> side stream -> main stream
  std::vector<std::int64_t> order, counts;
  std::vector<float> x, y;

  HostPass() = default;
  HostPass(const HostPass&) = delete;
  HostPass& operator=(const HostPass&) = delete;
  ~HostPass();
  /// Creates the side stream and the events.
  void open_streams();
  /// A context like this one for a call being captured on this thread, with `row_bytes`
  /// of mapped host memory of its own (made under a relaxed capture mode).
  std::unique_ptr<HostPass> for_capture(std::size_t row_bytes) const;

  static void CUDART_CB run(void* self) { static_cast<HostPass*>(self)->run_pass(); }

  // Work for the side stream once `main` has reached this point (the host pass, or the
  // copy of the host experts' weights); join() makes `main` wait for it.
  template <class Enqueue>
  void on_side(cudaStream_t main, Enqueue&& enqueue) {
    QMOE_CUDA_CHECK(cudaEventRecord(forked, main));
    QMOE_CUDA_CHECK(cudaStreamWaitEvent(side, forked, 0));
    enqueue(side);
    QMOE_CUDA_CHECK(cudaEventRecord(joined, side));
  }
  void join(cudaStream_t main) const { QMOE_CUDA_CHECK(cudaStreamWaitEvent(main, joined, 0)); }

  /// The rows of each host expert in token order (the plan's order within an expert
  /// comes from atomics) through the CPU kernels, the results back to their positions.
  /// Never a silent answer: on failure the rows become NaN and `errors` records why.
  void run_pass() noexcept;
};

/// LayerOptions::kMeasureCrossover: the smallest tokens per pass T (at most `chunk`) at
/// which the CPU experts take longer than copying their GPU-layout weights (`bytes` of
/// pinned memory at `packed`) to the device; 0 = never (or the copy does not fit the
/// GPU). Measured once per process for a given configuration (`key`).
std::int64_t measure_crossover(const detail::HostExperts& cpu, const std::vector<int>& host_experts, const void* packed,
                               std::size_t bytes, std::int64_t E, int k, std::int64_t H, std::int64_t chunk,
                               const std::string& key);

}  // namespace qmoe::cuda
