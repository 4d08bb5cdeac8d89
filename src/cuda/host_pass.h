// Internal: the host side of a CUDA Layer with host experts (LayerOptions::host_experts):
// the pass the CUDA runtime runs as a host function while the GPU experts run, and the
// measured crossover from which the host experts run on the GPU instead.
#pragma once

#include <cuda_runtime.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
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

struct HostPass;

/// Eager host passes without CUDA host functions (LayerOptions::cuda_host_polling).
/// A host function starts when the CUDA runtime's callback thread gets to it, and
/// the stream waiting on its completion resumes when the runtime notices it; here
/// the handoffs are polled on both sides instead: a worker thread of the Layer
/// polls an event recorded after the rows' gather and runs the pass, then stores
/// the pass's number into a word of mapped host memory that a one-thread kernel on
/// the call's stream polls before the host rows are scattered back. Calls being
/// captured keep host functions (a replay has no host call to post its pass).
class HostPoller {
 public:
  HostPoller(HostPass& pass, int device);
  ~HostPoller();  // runs the passes still queued (their gathers complete), then joins
  HostPoller(const HostPoller&) = delete;
  HostPoller& operator=(const HostPoller&) = delete;
  /// After the gather of the pass's rows (HostPass::rows) is enqueued on `stream`:
  /// queues the pass and returns the number that done_word() will hold once it is done.
  std::uint32_t post(cudaStream_t stream);
  /// The mapped word the passes' numbers are stored into (release), 0 at first.
  const std::uint32_t* done_word() const { return word_.get<std::uint32_t>(); }

 private:
  struct Job {
    std::uint32_t seq;
    cudaEvent_t gathered;
    HostRows rows;
  };
  void loop();
  HostPass& pass_;
  int device_;
  PinnedBuffer word_;
  std::uint32_t seq_ = 0;  // the last posted (the posting thread holds the arena's mutex)
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;             // queued and running, in order
  std::vector<cudaEvent_t> events_;  // every event made (destroyed last)
  std::vector<cudaEvent_t> free_;    // those not in a queued job
  bool stop_ = false;
  std::thread thread_;
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
  std::unique_ptr<HostPoller> poller;  // the eager context's, with LayerOptions::cuda_host_polling

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
  void run_pass() noexcept { run_rows(rows); }
  void run_rows(const HostRows& r) noexcept;
  /// The pass's result rows as NaN, `why` recorded in `errors`.
  void fail_rows(const HostRows& r, const char* why) noexcept;
};

/// LayerOptions::kMeasureCrossover: the smallest tokens per pass T (at most `chunk`) at
/// which the CPU experts take longer than copying their GPU-layout weights (`bytes` of
/// pinned memory at `packed`) to the device; 0 = never (or the copy does not fit the
/// GPU). Measured once per process for a given configuration (`key`).
std::int64_t measure_crossover(const detail::HostExperts& cpu, const std::vector<int>& host_experts, const void* packed,
                               std::size_t bytes, std::int64_t E, int k, std::int64_t H, std::int64_t chunk,
                               const std::string& key);

}  // namespace qmoe::cuda
