// Internal: a small fixed thread pool with dynamic work distribution.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace qmoe::cpu {

/// `threads - 1` workers plus the calling thread run each job. Items are handed
/// out one at a time from an atomic counter (dynamic scheduling), so uneven
/// items still keep every thread busy. Jobs from different callers that need
/// the workers are serialized by a mutex (single-item jobs run on the caller); a job must not submit another job to the
/// same pool (nothing in qmoe does), which rules out nested-parallelism deadlock.
///
/// Why it spins: one forward call runs ~5 parallel regions back to back, and a
/// condition-variable wake-up per region (futex wake, scheduler, cache-cold
/// worker) cost more than a decode call's whole gather or combine. So between
/// jobs a worker polls the job word for a short window (kWorkerSpin in
/// thread_pool.cpp, with pause / yield) before it sleeps on the condition
/// variable, and the caller polls for completion the same way (kCallerSpin). Nobody polls longer than the window: an
/// idle pool sleeps.
///
/// Why workers "join" a job instead of being counted in advance: the caller
/// waits only for the workers that actually took part. A worker that wakes late
/// (asleep past the window, or descheduled on a busy machine) finds the job
/// closed and skips it, so a late wake-up delays nobody.
class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return threads_; }

  /// Calls fn(item, thread_index) for item in [0, n); thread_index < size().
  /// Returns when every item is done. The first exception thrown by fn is
  /// rethrown here (remaining items are skipped).
  void parallel_for(std::int64_t n, const std::function<void(std::int64_t, int)>& fn);

  /// Wakes sleeping workers to poll for a job for a while (kWakeSpin in the
  /// .cpp): for a caller that knows a job is coming soon (a CUDA layer's host
  /// experts, when it enqueues the GPU work that precedes them), so the job
  /// does not wait for the workers' wake-up. Returns at once.
  void wake();

 private:
  void worker(int index);
  void run_items(int index);
  void post(std::uint64_t state);
  void wait_for_workers();

  // The job word: bits [0, kGenShift - 1) count the workers inside the current
  // job, bit kClosedBit says the job takes no more workers, the bits above are
  // the job's generation.
  static constexpr int kClosedBit = 24;
  static constexpr int kGenShift = 25;
  static constexpr std::uint64_t kActiveMask = (std::uint64_t{1} << kClosedBit) - 1;
  static constexpr std::uint64_t kClosed = std::uint64_t{1} << kClosedBit;
  static std::uint64_t generation(std::uint64_t s) { return s >> kGenShift; }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex job_mutex_;  // one job at a time
  // Written by the caller before the job word is published, read by joined workers.
  const std::function<void(std::int64_t, int)>* fn_ = nullptr;
  std::int64_t n_ = 0;
  std::exception_ptr error_;  // guarded by m_
  alignas(64) std::atomic<std::uint64_t> state_{0};
  alignas(64) std::atomic<std::int64_t> next_{0};
  alignas(64) std::atomic<int> sleepers_{0};  // workers in (or entering) wake_.wait
  std::atomic<bool> caller_sleeping_{false};  // the caller is in (or entering) done_.wait
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> wakes_{0};  // wake() calls
  std::mutex m_;
  std::condition_variable wake_, done_;
};

}  // namespace qmoe::cpu
