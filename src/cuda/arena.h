// Internal: the CUDA backend's memory plumbing: one allocation carved into
// aligned pieces, and the per-device working memory (arena) that the Layers of
// a device share, carved into one pass's workspace.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>

#include "cuda/act8.h"
#include "cuda/common.cuh"
#include "cuda/route.h"

namespace qmoe::cuda {

inline constexpr std::size_t kCarveAlign = 256;
inline std::size_t align_up(std::size_t x) { return (x + kCarveAlign - 1) / kCarveAlign * kCarveAlign; }

// Carves consecutive aligned pieces out of one allocation (or just sums
// their sizes when base is null).
struct Carver {
  char* base;
  std::size_t used = 0;
  template <class T>
  T* take(std::int64_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += align_up(sizeof(T) * static_cast<std::size_t>(std::max<std::int64_t>(count, 0)));
    return p;
  }
};

/// Page-locked host memory mapped into the device's address space (unified
/// addressing: the same pointer on both sides), released on destruction.
/// Kernels read and write it over PCIe; the host reads what a kernel wrote
/// once the kernel has completed.
struct MappedHostMemory {
  static cudaError_t allocate(void** p, std::size_t n) {
    return cudaHostAlloc(p, n, cudaHostAllocMapped | cudaHostAllocPortable);
  }
  static void release(void* p) { cudaFreeHost(p); }
};
using PinnedBuffer = CudaBuffer<MappedHostMemory>;

// Working memory shared by every Layer of a device that fits in it: a model's
// layers run one after another, so one workspace serves them all (a Layer
// holds only its packed weights). Calls that share an arena are serialized:
// on the host by the mutex, on the device by stream order or by an event
// when the stream changes between calls.
struct Arena {
  DeviceBuffer buf;
  PinnedBuffer host;     // the rows of host experts (LayerOptions::host_experts), both ways
  DeviceBuffer staging;  // host experts' weights copied for a call (LayerOptions::host_experts_gpu_from)
  std::mutex mu;
  cudaEvent_t done = nullptr;
  cudaStream_t last = nullptr;
  bool has_last = false;
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    if (done) cudaEventDestroy(done);
  }
};

/// The arena of `device`, grown (replaced) when a Layer needs more than it holds
/// (`bytes` of device memory, `host_bytes` of mapped host memory, `staging_bytes` of
/// device memory for host experts' weights).
std::shared_ptr<Arena> acquire_arena(int device, std::size_t bytes, std::size_t host_bytes = 0,
                                     std::size_t staging_bytes = 0);

/// One pass's working memory: the plan and the intermediate activations.
struct Workspace {
  RouteBuffers rb;
  void* act = nullptr;  // FC1 output / FC2 input, [chunk * k][a_stride] tokens' dtype
  float* y2 = nullptr;  // FC2 partials, [chunk * k][H] per split, splits * pairs <= chunk * k
  // accuracy_level 4 (act8.h), else null: the input rows [tokens][q1] and the FC1 output
  // rows [tokens * k][q2] as int8 codes, with their per-block scales and code sums.
  std::int8_t* xq = nullptr;
  Act8Meta* xmeta = nullptr;
  std::int8_t* aq = nullptr;
  Act8Meta* ameta = nullptr;
};

/// The host side of a pass with host experts, in the arena's mapped host memory.
struct HostRows {
  int* offsets = nullptr;  // [E + 1] the plan's offsets (slot order: GPU slots, then host experts)
  int* token = nullptr;    // [rows] the token of each host row, in plan order
  float* x = nullptr;      // [rows][H] their inputs, float32
  float* y = nullptr;      // [rows][H] their FC2 outputs + bias, float32 (written by the host)
};
/// Carves HostRows for up to `rows` host rows out of `c`.
HostRows carve_host_rows(Carver& c, std::int64_t rows, std::int64_t E, std::int64_t H);

/// Carves a pass of up to `tokens` tokens (k experts each, E experts, hidden H,
/// FC1 output rows of `a_stride` elements) out of `c`.
/// `tokens` per pass; `y2_tokens` of FC2 partials (tokens x K splits: at most
/// min(16 x tokens, the Layer's pass size), see fc2_k_split).
Workspace carve_workspace(Carver& c, std::int64_t tokens, std::int64_t y2_tokens, int k, std::int64_t E, std::int64_t H,
                          std::int64_t a_stride);

}  // namespace qmoe::cuda
