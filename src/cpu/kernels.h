// Internal: the CPU kernel table. One table is chosen once per process from
// the CPU's features; it binds each kernel to its ISA, and beside the kernels
// the token counts at which the engine switches between them. Every kernel
// reads the one packed layout (packed.h, TileLayout).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/packed.h"

namespace qmoe::cpu {

/// y[t * ldy + r] = sum_c W[r][c] * x[t * ldx + c] for the ntiles * NR rows r of
/// ntiles consecutive tiles of one expert (the first at `tile`, the next tile_bytes()
/// further on) and tokens t in [0, ntok). W is the dequantized tiles: scale * (code - zero).
/// `scratch` holds at least F32Kernels::scratch_floats floats, private to the caller.
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

/// A tile kernel and its name: the function's, and its file's (kernels/<name>.cpp).
template <class Fn>
struct TileKernel {
  Fn fn = nullptr;
  const char* name = nullptr;
};
/// A table entry naming its kernel: .q4 = QMOE_TILE_KERNEL(gemm_f32_q4_4x16__avx512).
#define QMOE_TILE_KERNEL(f) \
  { &(f), #f }

/// One arithmetic's kernels for 4- and 8-bit weights.
template <class Fn>
struct PerBits {
  TileKernel<Fn> q4, q8;
  const TileKernel<Fn>& operator()(int bits) const { return bits == 4 ? q4 : q8; }
};

/// float32 activations (accuracy_level 0-2, and 3 without AMX). A kernel runs an expert's
/// tokens in the direct (decode) regime below reuse_from tokens, in the reuse (prefill) regime
/// from it on (gemm_driver.h); the kernel files compile that threshold in from their set below.
struct F32Kernels {
  PerBits<GemmTileFn> gemm;
  std::int64_t reuse_from;      ///< tokens per expert from which the kernels dequantize and reuse
  std::int64_t scratch_floats;  ///< scratch a call needs
};

/// int8 activations (accuracy_level 4), and the quantizer of the activation rows they read.
struct Qd8Kernels {
  PerBits<GemmTileI8Fn> gemm;
  QuantizeRowsFn quantize_rows;
};

/// bf16 activations and weights on AMX (accuracy_level 3): experts with at least `from`
/// tokens (fewer take the float32 kernels: a mostly empty tile product costs more than it
/// saves), and the float32 -> bf16 row conversion of their inputs.
struct Bf16Kernels {
  PerBits<GemmTileBf16Fn> gemm;
  std::int64_t from = 0;
  void (*to_bf16)(const float* src, std::uint16_t* dst, std::int64_t n) = nullptr;
};

struct KernelConfig {
  Isa isa;
  const char* name;  ///< e.g. "scalar"
  F32Kernels f32;
  Qd8Kernels qd8;
  /// Runs `iterations` rounds of independent FMA chains; returns the flops done (the ceiling probe).
  double (*peak_fma)(std::int64_t iterations, float seed);
  Bf16Kernels bf16 = {};  ///< empty where the CPU has no AMX
  bool has_bf16() const { return bf16.gemm.q4.fn != nullptr; }
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
QMOE_IGEMM_TILE_FN(gemm_qd8_q4_2x16__avx2);
QMOE_IGEMM_TILE_FN(gemm_qd8_q8_2x16__avx2);
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

// The kernel sets the tables (dispatch.cpp) are made of: per arithmetic and ISA, the kernels
// and beside them the token counts (per expert) that choose between kernels or regimes. The
// float32 kernel files compile their reuse_from in from here (gemm_driver.h), so each
// threshold has this one definition.
inline constexpr std::int64_t kF32Scratch = 256 * 32;  ///< one dequantized chunk: 256 columns x 32 rows (two tiles)
inline constexpr F32Kernels kF32Avx512{
    .gemm = {QMOE_TILE_KERNEL(gemm_f32_q4_4x16__avx512), QMOE_TILE_KERNEL(gemm_f32_q8_4x16__avx512)},
    .reuse_from = 32,  // conservative: direct measured as fast as reuse up to ~48 tokens
    .scratch_floats = kF32Scratch};
inline constexpr F32Kernels kF32Avx2{
    .gemm = {QMOE_TILE_KERNEL(gemm_f32_q4_2x16__avx2), QMOE_TILE_KERNEL(gemm_f32_q8_2x16__avx2)},
    .reuse_from = 4,
    .scratch_floats = kF32Scratch};
inline constexpr F32Kernels kF32Vec128{
    .gemm = {QMOE_TILE_KERNEL(gemm_f32_q4_2x16__vec128), QMOE_TILE_KERNEL(gemm_f32_q8_2x16__vec128)},
    .reuse_from = 4,
    .scratch_floats = kF32Scratch};
inline constexpr PerBits<GemmTileI8Fn> kQd8Avx512Vnni{QMOE_TILE_KERNEL(gemm_qd8_q4_12x16__avx512vnni),
                                                      QMOE_TILE_KERNEL(gemm_qd8_q8_12x16__avx512vnni)};
inline constexpr PerBits<GemmTileI8Fn> kQd8Avx2{QMOE_TILE_KERNEL(gemm_qd8_q4_2x16__avx2),
                                                QMOE_TILE_KERNEL(gemm_qd8_q8_2x16__avx2)};
inline constexpr PerBits<GemmTileI8Fn> kQd8Scalar{QMOE_TILE_KERNEL(gemm_qd8_q4_4x16__scalar),
                                                  QMOE_TILE_KERNEL(gemm_qd8_q8_4x16__scalar)};
inline constexpr Bf16Kernels kBf16Amx{
    .gemm = {QMOE_TILE_KERNEL(gemm_bf16_q4_16x16__amx), QMOE_TILE_KERNEL(gemm_bf16_q8_16x16__amx)},
    .from = 16,  // one whole 16-token A tile
    .to_bf16 = convert_f32_bf16__avx512bf16};

}  // namespace qmoe::cpu
