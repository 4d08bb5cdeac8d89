// Internal: the CPU kernel table. One table is chosen once per process from
// the CPU's features; it binds each kernel to its ISA and tile shape, so the
// packer and the kernel that reads its layout can never disagree.
#pragma once

#include <cstdint>

#include "cpu/packed.h"

namespace qmoe::cpu {

/// y[t * ldy + r] = sum_c W[r][c] * x[t * ldx + c] for the NR rows r of one
/// tile and tokens t in [0, ntok). W is the dequantized tile: scale * (code - zero).
/// `scratch` holds at least KernelConfig::scratch_floats floats, private to the caller.
using GemmTileFn = void (*)(const PackGeometry& g, const std::uint8_t* tile, const float* x, std::int64_t ldx,
                            std::int64_t ntok, float* y, std::int64_t ldy, float* scratch);

struct KernelConfig {
  Isa isa;
  const char* name;      ///< e.g. "scalar"
  int nr;                ///< rows per tile: the packer's NR
  GemmTileFn gemm_q4;    ///< 4-bit tiles
  GemmTileFn gemm_q8;    ///< 8-bit tiles
  std::int64_t scratch_floats;  ///< scratch a GemmTileFn call needs
};

/// The table for this CPU, chosen once; QMOE_CPU_ISA=scalar forces a path
/// (an unknown or unavailable name is an Error).
const KernelConfig& kernel_config();

// Kernels (one ISA per translation unit; the file name is the function name).
void gemm_f32_q4_4x16__scalar(const PackGeometry&, const std::uint8_t*, const float*, std::int64_t, std::int64_t,
                              float*, std::int64_t, float*);
void gemm_f32_q8_4x16__scalar(const PackGeometry&, const std::uint8_t*, const float*, std::int64_t, std::int64_t,
                              float*, std::int64_t, float*);

}  // namespace qmoe::cpu
