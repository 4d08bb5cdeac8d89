// Internal: dynamic int8 quantization of activation rows (accuracy_level 4).
//
// Each row is cut into activation blocks of at most kActBlock = 16 columns that
// never cross a weight block: within weight block b (padded_block columns),
// block a covers columns [16a, min(16a + 16, padded_block)). Per activation
// block: scale = max|x| / 127, q = round-half-even(clamp(x * (127 / max|x|), -127, 127)).
// Per weight block the row also gets zsum = sum over its activation blocks of
// scale * sum(q) (fused, in block order), so the kernels take the weight zero
// point off once per weight block:
//   sum_a scale_a * sum (code - zero) q = sum_a scale_a * sum code q - zero * zsum.
// (The float subtraction rounds at 1e-7 relative; the int8 rounding it sits
// next to is 1e-3 to 1e-2, so the cheaper form costs nothing measurable.)
// A block with a non-finite activation gets scale NaN and zero codes, so every
// output it feeds is NaN, never a silent finite number.
//
// Why per 16 columns: the rounding error of an activation is at most scale/2,
// and a short block has a smaller max than a whole row, so the relative error
// of a dot product stays well under 1% even for heavy-tailed activations.
//
// For 4-bit weights each group of 8 columns is stored as [c0 c2 c4 c6 | c1 c3 c5 c7]:
// the low nibbles of a weight lane are the even columns and the high nibbles the
// odd ones, so one 32-bit broadcast of q feeds each half of a lane's dot product.
//
// quantize_rows is the portable version; kernels/quantize_rows__avx512.cpp gives
// the same bits (KernelConfig::quantize_rows picks one per table).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/packed.h"

namespace qmoe::cpu {

/// Quantized activation rows, as the int8 kernels read them.
struct QuantRows {
  const std::int8_t* q = nullptr;  ///< [rows][ldq] codes (ldq = padded_cols)
  const float* scale = nullptr;    ///< [rows][lds] per activation block
  const float* zsum = nullptr;     ///< [rows][ldz] per weight block: sum_a scale_a * sum(q in a)
  std::int64_t ldq = 0, lds = 0, ldz = 0;
};

/// Columns per activation block (a multiple of both code groups, 8 and 4).
constexpr std::int64_t kActBlock = 16;

/// Activation blocks per weight block and per row for a packed geometry.
inline std::int64_t act_blocks_per_block(const PackGeometry& g) {
  return (g.padded_block() + kActBlock - 1) / kActBlock;
}
inline std::int64_t act_blocks_per_row(const PackGeometry& g) { return g.blocks() * act_blocks_per_block(g); }

/// Owns the storage of QuantRows.
struct QuantRowsBuffer {
  std::vector<std::int8_t> q;
  std::vector<float> scale;
  std::vector<float> zsum;
  QuantRows view(const PackGeometry& g) const {
    return {q.data(), scale.data(), zsum.data(), g.padded_cols(), act_blocks_per_row(g), g.blocks()};
  }
};

/// Quantizes rows [r0, r1) of x (row stride ldx floats, padded_cols columns,
/// zero-padded past the logical width) into `out`, which must be sized for all
/// rows (resize_for). Rows are independent, so callers may split rows across threads.
void quantize_rows(const float* x, std::int64_t ldx, std::int64_t r0, std::int64_t r1, const PackGeometry& g,
                   QuantRowsBuffer& out);
void resize_for(QuantRowsBuffer& b, std::int64_t rows, const PackGeometry& g);

}  // namespace qmoe::cpu
