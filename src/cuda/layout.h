// Internal: the CUDA packed weight layout, shared by the GPU packer
// (pack.cu), the grouped GEMM (gemm.cu) and the driver (moe.cu).
//
// Why this layout: the GEMM computes out^T = W x^T with mma.sync m16n8k16,
// weights as the A operand (16 output rows x 16 k) and tokens as B (8 per
// mma). One 16-byte load per lane of a warp must deliver the lane's A
// fragments for a whole "slab" (16 rows x 64 k at 4 bits, 16 x 32 at 8 bits),
// so the codes are stored in fragment order:
//
//   codes  = [expert][row tile (16 rows)][slab][lane 0..31][16 bytes]
//   lane l (g = l/4, c = l%4), word j (one k16 step at 4 bits, half of one at 8):
//     fragment register r = 0..3 holds (row, k) pairs (g, 2c..2c+1), (g+8, 2c..),
//     (g, 2c+8..), (g+8, 2c+8..) of the k16 step.
//     4-bit: word j = k16 step j; register r's pair is the nibbles at bits
//            [4r, 4r+4) (first k) and [16+4r, 16+4r+4) (second k), so a
//            shift and one lop3 with 0x000f000f | magic make a half2/bf16x2.
//     8-bit: words 2j, 2j+1 = k16 step j; bytes in register order (r0 lo, r0 hi,
//            r1 lo, r1 hi | r2 lo, r2 hi, r3 lo, r3 hi).
//
// Scales: a row scale in float32 per packed row (applied in the epilogue,
// exactly), and for block-wise weights a relative scale s/rowmax in float16
// per (row, block): the tensor cores see (q - z) * rel, which stays within
// [-255, 255] whatever the magnitude of the scales (no float16 underflow).
// Row-wise weights carry no relative scale: the tensor cores see the exact
// integers q - z. Relative scales and zero points are stored per (row tile,
// block) as 8 pairs (row g, row g+8) so a lane reads one word.
//
// Gated (swiglu) FC1: packed row tile t holds gate rows i = 8t..8t+7 in its
// rows 0..7 and the matching up rows in rows 8..15, so one lane's accumulators
// (rows g and g+8) hold a gate/up pair: the activation needs no shuffles. All
// three swiglu_fusion variants are packed into this one order.
//
// Rows are padded to whole GEMM tiles (kRowAlign) and K to whole 64-column
// groups with zero scales and zero-point codes: padding contributes exactly 0.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define QMOE_HD __host__ __device__
#else
#define QMOE_HD
#endif

namespace qmoe::cuda {

/// Rows per packed tile and the padding granularity of N and K.
inline constexpr int kTileRows = 16;
inline constexpr int kRowAlign = 128;
inline constexpr int kKAlign = 64;

/// The tag at the start of every packed matrix on the device (pack.h make_tag /
/// check_tag): what the bytes after it are, so packed data from another format,
/// version or shape is refused by name instead of read.
struct GpuPackTag {
  static constexpr char kMagic[8] = {'Q', 'M', 'O', 'E', 'C', 'U', 'D', 'A'};
  static constexpr std::uint32_t kVersion = 1;
  char magic[8];
  std::uint32_t version;
  std::uint32_t bits;
  std::int32_t block_size;  ///< 0 = row-wise
  std::uint32_t gated;
  std::uint32_t zero_points;
  std::uint32_t reserved;
  std::int64_t experts, rows, cols, padded_rows, padded_cols;
};

/// Sizes of one packed matrix (all experts).
struct GpuGeometry {
  int bits = 4;
  int block_size = 0;  ///< 0 = row-wise
  bool gated = false;  ///< FC1 of swiglu: rows are 2 * inter (gate + up)
  bool zero_points = false;
  std::int64_t rows = 0;         ///< logical output rows N (2I when gated)
  std::int64_t cols = 0;         ///< K
  std::int64_t padded_rows = 0;  ///< multiple of kRowAlign
  std::int64_t padded_cols = 0;  ///< multiple of kKAlign

  QMOE_HD int slab_cols() const { return bits == 4 ? 64 : 32; }
  QMOE_HD std::int64_t tiles() const { return padded_rows / kTileRows; }
  QMOE_HD std::int64_t slabs() const { return padded_cols / slab_cols(); }
  /// Scale blocks per row (1 when row-wise: no relative scales are stored).
  QMOE_HD std::int64_t blocks() const { return block_size ? (padded_cols + block_size - 1) / block_size : 1; }
  QMOE_HD std::int64_t code_bytes_per_expert() const { return tiles() * slabs() * 512; }
  QMOE_HD std::int64_t rel_scale_words_per_expert() const { return block_size ? tiles() * blocks() * 8 : 0; }
  QMOE_HD std::int64_t zp_pairs_per_expert() const { return zero_points ? tiles() * blocks() * 8 : 0; }
};

}  // namespace qmoe::cuda
