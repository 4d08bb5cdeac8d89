// Internal: a small fixed thread pool with dynamic work distribution.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace qmoe::cpu {

/// `threads - 1` workers plus the calling thread run each job. Items are handed
/// out one at a time from an atomic counter (dynamic scheduling), so uneven
/// items still keep every thread busy. Jobs from different callers that need
/// the workers are serialized by a mutex (single-item jobs run on the caller); a job must not submit another job to the same pool
/// (nothing in qmoe does), which rules out nested-parallelism deadlock.
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

 private:
  void worker(int index);
  void run_items(int index);

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex job_mutex_;  // one job at a time
  std::mutex m_;
  std::condition_variable wake_, done_;
  const std::function<void(std::int64_t, int)>* fn_ = nullptr;
  std::int64_t n_ = 0;
  std::atomic<std::int64_t> next_{0};
  std::uint64_t generation_ = 0;
  int active_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace qmoe::cpu
