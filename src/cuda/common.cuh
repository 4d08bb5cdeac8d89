// Internal: CUDA helpers shared by the backend's translation units.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "core/check.h"

namespace qmoe::cuda {

/// Throws qmoe::Error naming the call and CUDA's message when `e` is an error.
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) detail::fail("CUDA: ", what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}
#define QMOE_CUDA_CHECK(call) ::qmoe::cuda::check((call), #call)

/// Makes `device` current for the lifetime of the guard and restores the
/// caller's device afterwards (a library must not change it behind its back).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    QMOE_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) QMOE_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int cur = prev_;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

/// A device allocation released on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
    if (bytes) QMOE_CUDA_CHECK(cudaMalloc(&p_, bytes));
  }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr, o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (p_) cudaFree(p_);
      p_ = o.p_, bytes_ = o.bytes_, o.p_ = nullptr, o.bytes_ = 0;
    }
    return *this;
  }
  template <class T = void>
  T* get() const {
    return static_cast<T*>(p_);
  }
  std::size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Raises `kernel`'s dynamic shared-memory limit to `bytes` on the current
/// device, once per (kernel, device): the attribute is per device. The kernel
/// is a template argument so each kernel has its own flags.
template <auto kernel>
void opt_in_smem(int bytes) {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  int dev = 0;
  QMOE_CUDA_CHECK(cudaGetDevice(&dev));
  auto set = [&] {
    QMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  };
  if (dev >= 0 && dev < kMaxDevices)
    std::call_once(once[dev], set);
  else
    set();
}

inline std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }
inline std::int64_t ceil_div(std::int64_t x, std::int64_t m) { return (x + m - 1) / m; }

}  // namespace qmoe::cuda
