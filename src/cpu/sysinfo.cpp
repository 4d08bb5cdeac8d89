// Measured machine ceilings (qmoe/sysinfo.h).
#include "qmoe/sysinfo.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "core/check.h"
#include "cpu/kernels.h"

namespace qmoe {

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Runs fn(t) on `threads` threads started together; returns the wall time.
template <class F>
double timed_parallel(int threads, F&& fn) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      fn(t);
    });
  while (ready.load() < threads) std::this_thread::yield();
  const double t0 = now_s();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  return now_s() - t0;
}

}  // namespace

double measure_read_bandwidth(int threads, std::size_t bytes) {
  detail::require(threads >= 1 && threads <= 1024, "threads: expected 1..1024, got ", threads);
  detail::require(bytes >= (std::size_t{1} << 20), "bytes: expected at least 1 MiB, got ", bytes);
  const std::size_t n = bytes / sizeof(std::uint64_t);
  std::vector<std::uint64_t> buf(n);
  for (std::size_t i = 0; i < n; i += 512) buf[i] = i;  // touch every page
  std::vector<std::uint64_t> sink(static_cast<std::size_t>(threads) * 8);
  double best = 0;
  for (int pass = 0; pass < 4; ++pass) {
    const double dt = timed_parallel(threads, [&](int t) {
      const std::size_t a = n * static_cast<std::size_t>(t) / static_cast<std::size_t>(threads);
      const std::size_t b = n * static_cast<std::size_t>(t + 1) / static_cast<std::size_t>(threads);
      std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // integer sums vectorize without reassociation flags
      std::size_t i = a;
      for (; i + 4 <= b; i += 4) s0 += buf[i], s1 += buf[i + 1], s2 += buf[i + 2], s3 += buf[i + 3];
      for (; i < b; ++i) s0 += buf[i];
      sink[static_cast<std::size_t>(t) * 8] = s0 + s1 + s2 + s3;
    });
    if (pass > 0) best = std::max(best, static_cast<double>(n * sizeof(std::uint64_t)) / dt);  // pass 0 warms up
  }
  volatile std::uint64_t keep = sink[0];
  (void)keep;
  return best;
}

double measure_peak_flops(int threads, double seconds) {
  detail::require(threads >= 1 && threads <= 1024, "threads: expected 1..1024, got ", threads);
  const cpu::KernelConfig& kc = cpu::kernel_config();
  // Calibrate on one thread, then run every thread for about `seconds`.
  std::int64_t iters = 1 << 16;
  for (;;) {
    const double t0 = now_s();
    kc.peak_fma(iters, 1.f);
    if (now_s() - t0 > 0.02 || iters > (std::int64_t{1} << 40)) break;
    iters *= 4;
  }
  const double t0 = now_s();
  kc.peak_fma(iters, 1.f);
  const double per = now_s() - t0;
  const std::int64_t run =
      std::max<std::int64_t>(1, static_cast<std::int64_t>(static_cast<double>(iters) * seconds / per));
  std::vector<double> flops(static_cast<std::size_t>(threads));
  const double dt = timed_parallel(threads, [&](int t) { flops[t] = kc.peak_fma(run, 1.f + static_cast<float>(t)); });
  double total = 0;
  for (double f : flops) total += f;
  return total / dt;
}

const char* cpu_kernel_isa() { return cpu::kernel_config().name; }

}  // namespace qmoe
