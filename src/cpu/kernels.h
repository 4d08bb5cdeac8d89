// Internal: the CPU kernel table. One table is chosen once per process from
// the CPU's features; it binds each kernel to its ISA and tile shape, so the
// packer and the kernel that reads its layout can never disagree.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/packed.h"

namespace qmoe::cpu {

/// y[t * ldy + r] = sum_c W[r][c] * x[t * ldx + c] for the ntiles * NR rows r of
/// ntiles consecutive tiles of one expert (the first at `tile`, the next tile_bytes()
/// further on) and tokens t in [0, ntok). W is the dequantized tiles: scale * (code - zero).
/// `scratch` holds at least KernelConfig::scratch_floats floats, private to the caller.
using GemmTileFn = void (*)(const PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles, const float* x,
                            std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy, float* scratch);

struct QuantRows;

/// The int8-activation (accuracy_level 4) variant: y[t * ldy + r] = sum_c W[r][c] * xhat[t][c]
/// where xhat is the dequantized int8 activation rows (quant_act.h).
using GemmTileI8Fn = void (*)(const PackGeometry& g, const std::uint8_t* tile, const QuantRows& x, std::int64_t ntok,
                              float* y, std::int64_t ldy);

struct QuantRowsBuffer;

/// Quantizes activation rows [r0, r1) for the int8 kernels (quant_act.h, quantize_rows);
/// every variant gives the same bits.
using QuantizeRowsFn = void (*)(const float* x, std::int64_t ldx, std::int64_t r0, std::int64_t r1,
                                const PackGeometry& g, QuantRowsBuffer& out);

/// The bf16-activation (accuracy_level 3, AMX) variant, for `ntiles` (1 or 2) consecutive
/// tiles like GemmTileFn. x holds the ntok activation rows in A-tile order (see
/// amx_bf16_driver.h): blocks of 16 rows (the last zero-padded), each block K steps of
/// 16 x 32 bf16, block b step s at x + b * 16 * ldx + s * 512, ldx = K padded to a
/// multiple of 32 (zeros). scratch holds at least kBf16ScratchBytes.
constexpr std::int64_t kBf16ScratchBytes = 8192;  ///< the decoded B tiles: 4 K steps of 2 tiles x 1 KiB
using GemmTileBf16Fn = void (*)(const PackGeometry& g, const std::uint8_t* tile, std::int64_t ntiles,
                                const std::uint16_t* x, std::int64_t ldx, std::int64_t ntok, float* y, std::int64_t ldy,
                                void* scratch);

struct KernelConfig {
  Isa isa;
  const char* name;              ///< e.g. "scalar"
  GemmTileFn gemm_q4;            ///< 4-bit tiles
  GemmTileFn gemm_q8;            ///< 8-bit tiles
  std::int64_t scratch_floats;   ///< scratch a GemmTileFn call needs
  GemmTileI8Fn igemm_q4;         ///< 4-bit tiles, int8 activations
  GemmTileI8Fn igemm_q8;         ///< 8-bit tiles, int8 activations
  QuantizeRowsFn quantize_rows;  ///< activation rows -> int8 for igemm_q4 / igemm_q8
  /// Runs `iterations` rounds of independent FMA chains; returns the flops done (the ceiling probe).
  double (*peak_fma)(std::int64_t iterations, float seed);
  /// AMX-BF16 tiles (null where the CPU has no AMX) and the float32 -> bf16 row conversion.
  GemmTileBf16Fn bgemm_q4 = nullptr;
  GemmTileBf16Fn bgemm_q8 = nullptr;
  void (*to_bf16)(const float* src, std::uint16_t* dst, std::int64_t n) = nullptr;
};

/// The table named `name` (scalar, avx2, avx512, avx512vnni, amx); empty = the
/// best this CPU supports. A name that is unknown or that this CPU cannot run is
/// an Error naming `what` (the option or variable the name came from).
const KernelConfig& kernel_config_named(const std::string& name, const char* what = "cpu_kernels");

/// The table a Layer built with default options uses in this process (QMOE_CPU_ISA
/// applies, through with_environment()), chosen once.
const KernelConfig& kernel_config();

/// Every table this CPU can run, best first (the test suite runs them all).
std::vector<const KernelConfig*> supported_kernel_configs();

// Kernels (one ISA per translation unit; the file name is the function name).
#define QMOE_GEMM_TILE_FN(name)                                                                                       \
  void name(const PackGeometry&, const std::uint8_t*, std::int64_t, const float*, std::int64_t, std::int64_t, float*, \
            std::int64_t, float*)
QMOE_GEMM_TILE_FN(gemm_f32_q4_2x16__vec128);
QMOE_GEMM_TILE_FN(gemm_f32_q8_2x16__vec128);
QMOE_GEMM_TILE_FN(gemm_f32_q4_2x16__avx2);
QMOE_GEMM_TILE_FN(gemm_f32_q8_2x16__avx2);
QMOE_GEMM_TILE_FN(gemm_f32_q4_4x16__avx512);
QMOE_GEMM_TILE_FN(gemm_f32_q8_4x16__avx512);
#undef QMOE_GEMM_TILE_FN
#define QMOE_IGEMM_TILE_FN(name) \
  void name(const PackGeometry&, const std::uint8_t*, const QuantRows&, std::int64_t, float*, std::int64_t)
QMOE_IGEMM_TILE_FN(gemm_qd8_q4_4x16__scalar);
QMOE_IGEMM_TILE_FN(gemm_qd8_q8_4x16__scalar);
QMOE_IGEMM_TILE_FN(gemm_qd8_q4_12x16__avx512vnni);
QMOE_IGEMM_TILE_FN(gemm_qd8_q8_12x16__avx512vnni);
#undef QMOE_IGEMM_TILE_FN
void quantize_rows__avx512(const float*, std::int64_t, std::int64_t, std::int64_t, const PackGeometry&,
                           QuantRowsBuffer&);
void gemm_bf16_q4_16x16__amx(const PackGeometry&, const std::uint8_t*, std::int64_t, const std::uint16_t*, std::int64_t,
                             std::int64_t, float*, std::int64_t, void*);
void gemm_bf16_q8_16x16__amx(const PackGeometry&, const std::uint8_t*, std::int64_t, const std::uint16_t*, std::int64_t,
                             std::int64_t, float*, std::int64_t, void*);
void convert_f32_bf16__avx512bf16(const float*, std::uint16_t*, std::int64_t);
double peak_f32_fma__vec128(std::int64_t, float);
double peak_f32_fma__avx2(std::int64_t, float);
double peak_f32_fma__avx512(std::int64_t, float);

}  // namespace qmoe::cpu
