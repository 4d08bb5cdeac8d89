#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>

#include "core/relax.h"
#include "cuda/host_pass.h"

namespace qmoe::cuda {

void HostErrors::record(const char* what) noexcept {
  std::lock_guard<std::mutex> lk(mu);
  if (first.empty()) first = what;
}

void HostErrors::rethrow(const std::string& experts) {
  std::lock_guard<std::mutex> lk(mu);
  if (first.empty()) return;
  const std::string e = std::move(first);
  first.clear();
  detail::fail("host experts (", experts, "): ", e);
}

HostPass::~HostPass() {
  poller.reset();  // its queued passes use this context
  if (forked) cudaEventDestroy(forked);
  if (joined) cudaEventDestroy(joined);
  if (side) cudaStreamDestroy(side);
}

void HostPass::open_streams() {
  QMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  QMOE_CUDA_CHECK(cudaEventCreateWithFlags(&forked, cudaEventDisableTiming));
  QMOE_CUDA_CHECK(cudaEventCreateWithFlags(&joined, cudaEventDisableTiming));
}

std::unique_ptr<HostPass> HostPass::for_capture(std::size_t row_bytes) const {
  auto p = std::make_unique<HostPass>();
  p->experts = experts, p->errors = errors;
  p->gpu_slots = gpu_slots, p->slots = slots, p->hidden = hidden;
  // Pinned memory and a stream are not stream-ordered work: this thread makes them
  // under the relaxed capture mode, then returns to the caller's.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  QMOE_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  try {
    p->own_rows = PinnedBuffer(row_bytes);
    p->open_streams();
  } catch (...) {
    cudaThreadExchangeStreamCaptureMode(&mode);
    throw;
  }
  QMOE_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  return p;
}

void HostPass::run_rows(const HostRows& rows) noexcept {
  const int* off = rows.offsets;
  const std::int64_t p0 = off[gpu_slots], n = off[slots] - p0, H = hidden;
  if (n <= 0) return;
  try {
    counts.resize(static_cast<std::size_t>(slots - gpu_slots));
    order.resize(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), std::int64_t{0});
    for (int e = gpu_slots; e < slots; ++e) {
      counts[e - gpu_slots] = off[e + 1] - off[e];
      std::sort(order.begin() + (off[e] - p0), order.begin() + (off[e + 1] - p0),
                [&](std::int64_t a, std::int64_t b) { return rows.token[a] < rows.token[b]; });
    }
    x.resize(static_cast<std::size_t>(n * H));
    y.resize(static_cast<std::size_t>(n * H));
    for (std::int64_t r = 0; r < n; ++r) std::copy_n(rows.x + order[r] * H, H, x.data() + r * H);
    experts->run(x.data(), counts.data(), n, y.data());
    for (std::int64_t r = 0; r < n; ++r) std::copy_n(y.data() + r * H, H, rows.y + order[r] * H);
    return;
  } catch (const std::exception& ex) {
    fail_rows(rows, ex.what());
  } catch (...) {
    fail_rows(rows, "unknown error");
  }
}

void HostPass::fail_rows(const HostRows& rows, const char* why) noexcept {
  errors->record(why);
  const std::int64_t n = rows.offsets[slots] - rows.offsets[gpu_slots];
  if (n > 0) std::fill(rows.y, rows.y + n * hidden, std::numeric_limits<float>::quiet_NaN());
}

HostPoller::HostPoller(HostPass& pass, int device) : pass_(pass), device_(device), word_(64) {
  *word_.get<std::uint32_t>() = 0;
  thread_ = std::thread([this] { loop(); });
}

HostPoller::~HostPoller() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

std::uint32_t HostPoller::post(cudaStream_t stream) {
  cudaEvent_t ev = nullptr;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!free_.empty()) ev = free_.back(), free_.pop_back();
  }
  if (!ev) {
    QMOE_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    std::lock_guard<std::mutex> lk(mu_);
    events_.push_back(ev);
  }
  if (const cudaError_t r = cudaEventRecord(ev, stream); r != cudaSuccess) {
    std::lock_guard<std::mutex> lk(mu_);
    free_.push_back(ev);
    QMOE_CUDA_CHECK(r);
  }
  std::uint32_t seq = 0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    seq = ++seq_;
    jobs_.push_back(Job{seq, ev, pass_.rows});
  }
  cv_.notify_one();
  return seq;
}

void HostPoller::loop() {
  cudaSetDevice(device_);  // (the events know their device; this thread's CUDA calls stay on it)
  volatile std::uint32_t* done = word_.get<std::uint32_t>();
  for (;;) {
    Job j{};
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, with every queued pass run
      j = jobs_.front();
    }
    // The rows are in host memory once the gather's event completes: polled, with
    // the pool's own pause-then-yield rhythm (the CPU threads were woken by the call).
    cudaError_t r;
    for (int spins = 0; (r = cudaEventQuery(j.gathered)) == cudaErrorNotReady; ++spins) {
      if (spins > 4096) std::this_thread::yield();
      for (int i = 0; i < 8; ++i) detail::cpu_relax();  // (a query takes the runtime's locks: not back to back)
    }
    if (r == cudaSuccess)
      pass_.run_rows(j.rows);
    else  // the device failed: the stream will not get to the result rows either
      pass_.fail_rows(j.rows, cudaGetErrorString(r));
    std::atomic_thread_fence(std::memory_order_release);  // the result rows before the word
    *done = j.seq;
    std::lock_guard<std::mutex> lk(mu_);
    jobs_.pop_front();
    free_.push_back(j.gathered);
  }
}

namespace {

// Rows per host expert of T tokens routed uniformly at random (k distinct experts of E
// per token; a fixed generator, so the measurement sees the same rows every time).
std::vector<std::int64_t> uniform_routing_rows(std::int64_t t, int k, std::int64_t E,
                                               const std::vector<int>& host_experts) {
  std::vector<int> host_index(static_cast<std::size_t>(E), -1);
  for (std::size_t i = 0; i < host_experts.size(); ++i) host_index[host_experts[i]] = static_cast<int>(i);
  std::vector<std::int64_t> counts(host_experts.size(), 0);
  std::uint64_t s = 0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(t + 1);
  auto next = [&] {  // splitmix64
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  std::vector<int> pick(static_cast<std::size_t>(E));
  for (std::int64_t tok = 0; tok < t; ++tok) {
    std::iota(pick.begin(), pick.end(), 0);
    for (int j = 0; j < k && j < E; ++j) {  // partial Fisher-Yates: k distinct experts
      const std::size_t r = static_cast<std::size_t>(j) + next() % static_cast<std::uint64_t>(E - j);
      std::swap(pick[j], pick[r]);
      if (host_index[pick[j]] >= 0) ++counts[host_index[pick[j]]];
    }
  }
  return counts;
}

}  // namespace

std::int64_t measure_crossover(const detail::HostExperts& cpu, const std::vector<int>& host_experts, const void* packed,
                               std::size_t bytes, std::int64_t E, int k, std::int64_t H, std::int64_t chunk,
                               const std::string& key) {
  static std::mutex mu;
  static std::map<std::string, std::int64_t> known;
  std::lock_guard<std::mutex> lk(mu);
  if (auto it = known.find(key); it != known.end()) return it->second;
  // The copy as a call makes it: pinned host memory to the device, timed after a warm-up.
  double copy_ms = 0;
  struct Timing {  // released on every path out
    cudaStream_t s = nullptr;
    cudaEvent_t ev[2] = {nullptr, nullptr};
    ~Timing() {
      if (s) cudaStreamSynchronize(s), cudaStreamDestroy(s);
      for (cudaEvent_t e : ev)
        if (e) cudaEventDestroy(e);
    }
  };
  try {
    DeviceBuffer to(bytes);
    Timing tm;
    QMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&tm.s, cudaStreamNonBlocking));
    for (cudaEvent_t& e : tm.ev) QMOE_CUDA_CHECK(cudaEventCreate(&e));
    QMOE_CUDA_CHECK(cudaMemcpyAsync(to.get(), packed, bytes, cudaMemcpyHostToDevice, tm.s));
    QMOE_CUDA_CHECK(cudaEventRecord(tm.ev[0], tm.s));
    QMOE_CUDA_CHECK(cudaMemcpyAsync(to.get(), packed, bytes, cudaMemcpyHostToDevice, tm.s));
    QMOE_CUDA_CHECK(cudaEventRecord(tm.ev[1], tm.s));
    QMOE_CUDA_CHECK(cudaEventSynchronize(tm.ev[1]));
    float ms = 0;
    QMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, tm.ev[0], tm.ev[1]));
    copy_ms = ms;
  } catch (const Error&) {  // no room on the device for the copy: the CPU it is
    cudaGetLastError();
    return known[key] = 0;
  }
  // The CPU experts on the rows uniform routing gives T tokens, best of two runs.
  std::vector<float> x, y;
  auto cpu_ms = [&](std::int64_t t) {
    const std::vector<std::int64_t> counts = uniform_routing_rows(t, k, E, host_experts);
    const std::int64_t n = std::accumulate(counts.begin(), counts.end(), std::int64_t{0});
    if (n == 0) return 0.0;
    x.assign(static_cast<std::size_t>(n * H), 0.5f);
    y.resize(x.size());
    double best = std::numeric_limits<double>::infinity();
    for (int r = 0; r < 2; ++r) {  // the first also warms the caches and the threads
      const auto t0 = std::chrono::steady_clock::now();
      cpu.run(x.data(), counts.data(), n, y.data());
      best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  // Doubling T until the CPU is slower, then bisecting to within an eighth.
  std::int64_t hi = 1;
  while (cpu_ms(hi) < copy_ms) {
    if (hi >= chunk) return known[key] = 0;
    hi = std::min(hi * 2, chunk);
  }
  std::int64_t lo = hi / 2;  // 0, or a T at which the CPU is faster
  while (lo > 0 && hi - lo > std::max<std::int64_t>(1, lo / 8)) {
    const std::int64_t mid = (lo + hi) / 2;
    (cpu_ms(mid) >= copy_ms ? hi : lo) = mid;
  }
  return known[key] = hi;
}

}  // namespace qmoe::cuda
