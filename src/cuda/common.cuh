// Internal: CUDA helpers shared by the backend's translation units.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <type_traits>
#include <utility>

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

/// A CUDA allocation released on destruction; `Kind` says how (DeviceMemory:
/// cudaMalloc; MappedHostMemory, arena.h: page-locked host memory mapped into
/// the device's address space).
template <class Kind>
class CudaBuffer {
 public:
  CudaBuffer() = default;
  explicit CudaBuffer(std::size_t bytes) : bytes_(bytes) {
    if (bytes) QMOE_CUDA_CHECK(Kind::allocate(&p_, bytes));
  }
  ~CudaBuffer() {
    if (p_) Kind::release(p_);
  }
  CudaBuffer(CudaBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr, o.bytes_ = 0; }
  CudaBuffer& operator=(CudaBuffer&& o) noexcept {
    if (this != &o) {
      if (p_) Kind::release(p_);
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

struct DeviceMemory {
  static cudaError_t allocate(void** p, std::size_t n) { return cudaMalloc(p, n); }
  static void release(void* p) { cudaFree(p); }
};
/// A device allocation released on destruction.
using DeviceBuffer = CudaBuffer<DeviceMemory>;

/// Raises `kernel`'s dynamic shared-memory limit to `bytes` on the current
/// device, once per (kernel, device): the attribute is per device. The kernel
/// is a template argument so each kernel has its own flags.
template <auto kernel>
void opt_in_smem(int bytes) {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  int dev = 0;
  QMOE_CUDA_CHECK(cudaGetDevice(&dev));
  auto set = [&] { QMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)); };
  if (dev >= 0 && dev < kMaxDevices)
    std::call_once(once[dev], set);
  else
    set();
}

/// Launches kernel<<<grid, block, smem, stream>>>(args...); with `pdl` as a
/// programmatic dependent launch (Hopper+): the kernel may start while its
/// predecessor on the stream is still running, and must call pdl_wait() before
/// it touches anything the predecessor writes (see pdl_wait below).
template <class... KArgs, class... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream, bool pdl,
                   Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  QMOE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(std::forward<Args>(args))...));
}

#ifdef __CUDACC__
// Programmatic dependent launch, device side. The forward pass's kernels after
// the first (FC1, FC2, combine) are launched with `pdl` on devices that have
// it, so a kernel's launch and its prologue overlap the tail of the one before.
// The rule that keeps this correct: a kernel calls pdl_wait() before it reads
// what its predecessor writes (or writes what it reads), and calls
// pdl_launch_dependents() only after its own pdl_wait(), so that when a kernel
// starts, the kernel two back on the stream has finished. Both are no-ops on
// older targets and in kernels launched without `pdl`.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#endif

/// Compile-time values for the host-side kernel dispatch (a generic lambda
/// receives them and instantiates the kernel they name).
template <int V>
using IntC = std::integral_constant<int, V>;
template <class T>
struct TypeC {
  using type = T;
};

inline std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }
inline std::int64_t ceil_div(std::int64_t x, std::int64_t m) { return (x + m - 1) / m; }

}  // namespace qmoe::cuda
