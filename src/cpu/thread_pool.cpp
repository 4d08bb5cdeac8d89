#include "cpu/thread_pool.h"

#include <chrono>
#include <system_error>

#include "core/check.h"
#include "core/relax.h"

namespace qmoe::cpu {

namespace {

// How long a worker polls for the next job, and the caller for the end of its
// job, before sleeping. Long enough to cover the serial bits between the
// parallel regions of one forward call (routing, planning: microseconds), short
// enough that an idle pool stops burning CPU at once and that a machine with
// more threads than cores loses little (the poll also yields).
constexpr auto kWorkerSpin = std::chrono::microseconds(50);
constexpr auto kCallerSpin = std::chrono::microseconds(100);
// How long workers woken by wake() poll for the job announced.
constexpr auto kWakeSpin = std::chrono::microseconds(500);

using detail::cpu_relax;

// Polls ready() for at most `window`: a few pauses first (the common case: the
// job arrives within a microsecond), then pauses with a yield every few, so a
// thread that shares its core with another runnable thread gives the core up.
// Returns ready()'s last answer.
template <class Ready>
bool spin_until(Ready&& ready, std::chrono::microseconds window) {
  for (int i = 0; i < 64; ++i) {
    if (ready()) return true;
    cpu_relax();
  }
  const auto deadline = std::chrono::steady_clock::now() + window;
  for (;;) {
    for (int i = 0; i < 16; ++i) {
      if (ready()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= deadline) return ready();
    std::this_thread::yield();
  }
}

}  // namespace

ThreadPool::ThreadPool(int threads) : threads_(threads < 1 ? 1 : threads) {
  try {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, i] { worker(i); });
  } catch (const std::system_error& e) {
    stop_.store(true);
    { std::lock_guard<std::mutex> lk(m_); }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    detail::fail("threads: could not start ", threads_, " threads (", e.what(), ")");
  }
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  { std::lock_guard<std::mutex> lk(m_); }  // a worker between its predicate check and its wait sees stop_ or the notify
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_items(int index) {
  for (;;) {
    const std::int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n_) break;
    try {
      (*fn_)(i, index);
    } catch (...) {
      std::lock_guard<std::mutex> lk(m_);
      if (!error_) error_ = std::current_exception();
      next_.store(n_, std::memory_order_relaxed);  // skip the rest
    }
  }
}

// Publishes a new job word. The seq_cst store and the seq_cst load of sleepers_
// pair with a sleeping worker's seq_cst increment of sleepers_ and its seq_cst
// load of state_ (in the wait predicate): at least one of the two sees the
// other, so a worker either sees the job before it sleeps or is notified.
void ThreadPool::post(std::uint64_t state) {
  state_.store(state, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    { std::lock_guard<std::mutex> lk(m_); }
    wake_.notify_all();
  }
}

// Like post(), for wake(): the increment of wakes_ pairs with a sleeping
// worker's increment of sleepers_ and its load of wakes_ in the wait predicate.
void ThreadPool::wake() {
  wakes_.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    { std::lock_guard<std::mutex> lk(m_); }
    wake_.notify_all();
  }
}

void ThreadPool::worker(int index) {
  std::uint64_t seen = 0;  // generation of the last job this worker looked at
  std::uint64_t woken = wakes_.load(std::memory_order_relaxed);
  auto window = kWorkerSpin;
  for (;;) {
    auto fresh = [&](std::memory_order mo) { return stop_.load(mo) || generation(state_.load(mo)) != seen; };
    auto woke = [&](std::memory_order mo) { return wakes_.load(mo) != woken; };
    if (!spin_until([&] { return fresh(std::memory_order_acquire) || woke(std::memory_order_relaxed); }, window)) {
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      {
        std::unique_lock<std::mutex> lk(m_);
        wake_.wait(lk, [&] { return fresh(std::memory_order_seq_cst) || woke(std::memory_order_seq_cst); });
      }
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
    }
    window = kWorkerSpin;
    if (!fresh(std::memory_order_acquire)) {  // wake() was called: poll for the job it announced
      woken = wakes_.load(std::memory_order_relaxed);
      window = kWakeSpin;
      continue;
    }
    if (stop_.load(std::memory_order_acquire)) return;
    // Join the newest job unless the caller has closed it already (then it needs no help).
    std::uint64_t s = state_.load(std::memory_order_acquire);
    seen = generation(s);
    bool joined = false;
    while (!(s & kClosed) && generation(s) == seen)
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_seq_cst, std::memory_order_acquire)) {
        joined = true;
        break;
      }
    if (!joined) continue;
    run_items(index);
    // Leave; the last to leave a closed job wakes the caller if it sleeps (same pairing as post()).
    const std::uint64_t prev = state_.fetch_sub(1, std::memory_order_seq_cst);
    if ((prev & kClosed) && (prev & kActiveMask) == 1 && caller_sleeping_.load(std::memory_order_seq_cst)) {
      { std::lock_guard<std::mutex> lk(m_); }
      done_.notify_one();
    }
  }
}

// Closes the job (no worker joins it any more) and waits for the joined ones to leave.
void ThreadPool::wait_for_workers() {
  const std::uint64_t s = state_.fetch_or(kClosed, std::memory_order_seq_cst);
  if ((s & kActiveMask) == 0) return;
  auto done = [&](std::memory_order mo) { return (state_.load(mo) & kActiveMask) == 0; };
  if (spin_until([&] { return done(std::memory_order_acquire); }, kCallerSpin)) return;
  caller_sleeping_.store(true, std::memory_order_seq_cst);
  {
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [&] { return done(std::memory_order_seq_cst); });
  }
  caller_sleeping_.store(false, std::memory_order_relaxed);
}

void ThreadPool::parallel_for(std::int64_t n, const std::function<void(std::int64_t, int)>& fn) {
  if (n <= 0) return;
  if (threads_ == 1 || n == 1) {  // no workers involved: concurrent callers need not wait for each other
    for (std::int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  std::lock_guard<std::mutex> job(job_mutex_);
  // No worker is inside a job here (the previous caller saw the count at zero after
  // closing it), so the job's fields can be written plainly; post() publishes them.
  fn_ = &fn;
  n_ = n;
  next_.store(0, std::memory_order_relaxed);
  error_ = nullptr;
  post((generation(state_.load(std::memory_order_relaxed)) + 1) << kGenShift);
  run_items(0);
  wait_for_workers();
  fn_ = nullptr;
  std::exception_ptr err = std::move(error_);
  error_ = nullptr;
  if (err) std::rethrow_exception(err);
}

}  // namespace qmoe::cpu
