// Internal: a Layer's weights packed on the GPU (layout.h), built from the raw
// ONNX Runtime layout in host memory one expert at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/pack.h"
#include "layer/backend.h"

namespace qmoe::cuda {

struct PackedLayer {
  GpuGeometry g1, g2;   ///< FC1 (gate and up rows interleaved for swiglu) and FC2
  DeviceBuffer packed;  ///< one allocation holding p1 and p2
  std::size_t bytes = 0;
  PackedGpu p1, p2;
  bool has_bias2 = false;
};

/// Validated raw weights (host memory) -> packed on the current device: each
/// expert's raw tensors are copied to a staging buffer and packed there
/// (`release(p, n)`, when given, is told as soon as raw bytes [p, p + n) have
/// been copied). The tags are written last and read back: a Layer holds
/// complete data of its own geometry or throws.
/// `p`'s arrays moved from an allocation at `from` to a copy of it at `to`.
PackedGpu rebase(const PackedGpu& p, std::uintptr_t from, void* to);
/// `p`'s arrays as if they started `slots` experts earlier: slot `slots` of the
/// result is slot 0 of `p` (a GEMM over slots [slots, ...) then reads `p`).
PackedGpu shift_slots(const PackedGpu& p, const GpuGeometry& g, std::int64_t slots);

/// `experts`, when given: pack only these experts, slot i holding expert experts[i].
PackedLayer prepack_layer(const ExpertWeights& w, const MoeAttributes& a, const MoeShape& s,
                          const detail::ReleaseFn* release, const std::vector<int>* experts = nullptr);

}  // namespace qmoe::cuda
