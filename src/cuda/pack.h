// Internal: the GPU packer (raw ONNX Runtime layout -> layout.h), one expert at a time.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/layout.h"
#include "qmoe/tensor.h"

namespace qmoe::cuda {

/// One expert's raw tensors, already on the device (a staging copy).
struct RawExpert {
  const std::uint8_t* codes = nullptr;  ///< [rows][cols / pack]
  const void* scales = nullptr;         ///< [rows][blocks] (row-wise: [rows])
  DType scale_dtype = DType::f32;
  const std::uint8_t* zero_points = nullptr;  ///< the expert's raw slice, or null
  const void* bias = nullptr;                 ///< [rows], or null
  DType bias_dtype = DType::f32;
};

/// Device pointers of a packed matrix (all experts); see layout.h.
struct PackedGpu {
  GpuPackTag* tag = nullptr;            ///< make_tag(g, E), first in the allocation
  std::uint8_t* codes = nullptr;        ///< [E][code_bytes_per_expert]
  std::uint16_t* rel_scales = nullptr;  ///< float16 bits, [E][tiles][blocks][8][2] (block-wise only)
  std::uint8_t* zero_points = nullptr;  ///< [E][tiles][blocks][8][2] (with zero points only)
  float* row_scales = nullptr;          ///< [E][padded_rows]
  float* bias = nullptr;                ///< [E][padded_rows] (zeros when absent)
};

/// Packs expert `e`. `a` holds the rows of FC1 (or FC2); for gated FC1 with
/// swiglu_fusion 0, `b` holds FC3's (the up projection), else null. `inter` is I.
void pack_expert(const GpuGeometry& g, int swiglu_fusion, std::int64_t inter, const RawExpert& a, const RawExpert* b,
                 std::int64_t e, const PackedGpu& dst, cudaStream_t stream);

/// The tag of a matrix of geometry g packed for E experts.
GpuPackTag make_tag(const GpuGeometry& g, std::int64_t E);

/// Throws qmoe::Error naming `what` (the raw tensor the matrix came from) when t
/// is not make_tag(g, E): not qmoe CUDA data, another format version, or packed
/// for other weights (bits, block size, zero points, gating, experts, shape).
void check_tag(const GpuPackTag& t, const GpuGeometry& g, std::int64_t E, const char* what);

}  // namespace qmoe::cuda
