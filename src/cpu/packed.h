// Internal: the CPU packed weight layout and its tag.
//
// Why this layout: the kernels compute NR = 16 output rows at once (TileLayout::kRows), walking K.
// A tile stores, for each K-block, the 16 scales, the 16 zero points and then
// the codes in "row lanes": for each group of 4 code bytes along K, the 16
// rows' 4 bytes sit next to each other, so one 64-byte load (one zmm, two ymm)
// puts row r's next 8 (4-bit) or 4 (8-bit) codes in 32-bit lane r. A column is
// then extracted with a shift and a mask per lane (no byte shuffles), and the
// same lanes feed int8 dot-product instructions directly (4 bytes per lane).
// Scales sit next to the weights they scale; a tile is one sequential stream.
//
//   matrix  = header | expert 0 | expert 1 | ...            (expert_stride bytes each)
//   expert  = tile 0 | tile 1 | ... (rows padded to NR with zero scale)
//   tile    = block 0 | block 1 | ...                       (block_len columns each)
//   block   = float scale[16] | uint8 zero[16] | codes[groups][16 rows][4 bytes]
//   codes of group g, row r, byte i = byte 4g + i of the row's raw ONNX Runtime
//     bytes within the block: 4-bit: column 8g + 2i in the low nibble, 8g + 2i + 1
//     in the high nibble; 8-bit: column 4g + i.
//   A block whose length is not a multiple of the group (8 columns at 4 bits,
//   4 at 8 bits; only row-wise K can be) is padded with codes equal to the
//   row's zero point: exactly zero weights. Callers pad activations with zeros
//   to padded_cols() columns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace qmoe::cpu {

/// Instruction sets a packed layout can be made for.
enum class Isa : std::uint32_t { scalar = 1, avx2 = 2, avx512 = 3, avx512vnni = 4, amx = 5 };
const char* isa_name(Isa isa) noexcept;

/// The header every packed matrix starts with.
struct PackTag {
  static constexpr char kMagic[8] = {'Q', 'M', 'O', 'E', 'P', 'A', 'C', 'K'};
  static constexpr std::uint32_t kVersion = 2;
  static constexpr std::uint32_t kBackendCpu = 1;

  char magic[8];
  std::uint32_t version;
  std::uint32_t backend;
  Isa isa;
  std::uint32_t nr;         ///< rows per tile
  std::uint32_t bits;       ///< 4 or 8
  std::uint32_t block_len;  ///< columns per scale block (K when row-wise)
  std::int64_t experts;
  std::int64_t rows;            ///< logical rows (before padding to NR)
  std::int64_t cols;            ///< K
  std::uint64_t expert_stride;  ///< bytes per expert
};

/// The packed tile layout (the picture above): the one definition of its geometry, used by
/// the packer, every kernel driver, the FC1 epilogue, CpuMoe and the tests. Its functions
/// (and PackGeometry's) are constexpr and always inlined: the kernels' translation units,
/// compiled with ISA flags, call them too, and an out-of-line copy emitted there could be
/// merged by the linker with baseline code's (the ODR caution in kernels/gemm_driver.h).
struct TileLayout {
  static constexpr int kRows = 16;                           ///< NR: rows per tile, of every kernel table
  static constexpr int kLaneBytes = 4;                       ///< one row's bytes in a code group
  static constexpr int kGroupBytes = kRows * kLaneBytes;     ///< a code group: one 64-byte load
  static constexpr int kScalesOffset = 0;                    ///< a block starts with float scale[kRows],
  static constexpr int kZerosOffset = kRows * 4;             ///< then uint8 zero[kRows],
  static constexpr int kCodesOffset = kZerosOffset + kRows;  ///< then its code groups

  /// Columns per code group: 8 at 4 bits, 4 at 8 bits.
  template <int BITS>
  static constexpr std::int64_t kGroupCols = kLaneBytes * 8 / BITS;
  /// A block's columns rounded up to whole groups (padded with codes equal to the zero point).
  template <int BITS>
  [[gnu::always_inline]] static constexpr std::int64_t padded_block(std::int64_t block_len) {
    return (block_len + kGroupCols<BITS> - 1) / kGroupCols<BITS> * kGroupCols<BITS>;
  }
  /// scales | zero points | codes; a tile is cols / block_len blocks, back to back.
  template <int BITS>
  [[gnu::always_inline]] static constexpr std::int64_t block_bytes(std::int64_t block_len) {
    return kCodesOffset + padded_block<BITS>(block_len) * kRows * BITS / 8;
  }

  // The same for a bit width known at run time (4 or 8), as PackGeometry has it (spelled
  // apart so that each form compiles as it always has; static_asserts below keep them equal).
  [[gnu::always_inline]] static constexpr std::int64_t group_cols(int bits) { return kLaneBytes * 8 / bits; }
  [[gnu::always_inline]] static constexpr std::int64_t padded_block(int bits, std::int64_t block_len) {
    return (block_len + group_cols(bits) - 1) / group_cols(bits) * group_cols(bits);
  }
  [[gnu::always_inline]] static constexpr std::int64_t block_bytes(int bits, std::int64_t block_len) {
    return kCodesOffset + padded_block(bits, block_len) * kRows * bits / 8;
  }
  [[gnu::always_inline]] static constexpr std::int64_t tile_bytes(int bits, std::int64_t cols, std::int64_t block_len) {
    return cols / block_len * block_bytes(bits, block_len);
  }

  /// Whether the two forms agree for every block length up to n (checked at compile time).
  static constexpr bool forms_agree(std::int64_t n) {
    for (std::int64_t len = 1; len <= n; ++len)
      if (padded_block<4>(len) != padded_block(4, len) || padded_block<8>(len) != padded_block(8, len) ||
          block_bytes<4>(len) != block_bytes(4, len) || block_bytes<8>(len) != block_bytes(8, len) ||
          kGroupCols<4> != group_cols(4) || kGroupCols<8> != group_cols(8))
        return false;
    return true;
  }
};

static_assert(TileLayout::kGroupBytes == 64, "a code group is one 64-byte load: one zmm, two ymm, four xmm");
static_assert(TileLayout::kRows == 16,
              "row r of a code group is 32-bit lane r of one 512-bit vector; an AMX tile has 16 rows");
static_assert(TileLayout::kCodesOffset % 16 == 0 && TileLayout::block_bytes<4>(1) % 16 == 0 &&
                  TileLayout::block_bytes<8>(1) % 16 == 0,
              "every block a multiple of 16 bytes: each block's scales and codes stay 16-byte aligned");
static_assert(TileLayout::block_bytes<4>(32) == 16 * 4 + 16 + 32 * 16 / 2 &&
                  TileLayout::block_bytes(8, 6) == 16 * 4 + 16 + 8 * 16 && TileLayout::padded_block(4, 13) == 16,
              "block = scales | zero points | codes, padded to whole groups");
static_assert(TileLayout::forms_agree(1024), "the compile-time and run-time forms are one geometry");
static_assert(TileLayout::kRows % 2 == 0, "swiglu: a tile holds whole (gate, up) row pairs");
static_assert(32 % TileLayout::kRows == 0 && 32 % (TileLayout::kRows / 2) == 0,
              "a tile's FC1 outputs lie within one 32-column K step of the AMX path's blocked rows");

/// Rows of one packed tile: the NR of every kernel table.
inline constexpr int kTileRows = TileLayout::kRows;

/// The layout arithmetic of one packed matrix (runtime bits and shape).
struct PackGeometry {
  int bits = 4;
  std::int64_t rows = 0, cols = 0, block_len = 0;

  [[gnu::always_inline]] constexpr std::int64_t tiles() const { return (rows + kTileRows - 1) / kTileRows; }
  [[gnu::always_inline]] constexpr std::int64_t blocks() const { return cols / block_len; }
  /// Columns per 4-byte group: 8 at 4 bits, 4 at 8 bits.
  [[gnu::always_inline]] constexpr std::int64_t group_cols() const { return TileLayout::group_cols(bits); }
  /// block_len rounded up to whole groups.
  [[gnu::always_inline]] constexpr std::int64_t padded_block() const {
    return TileLayout::padded_block(bits, block_len);
  }
  /// Columns the kernels read from each activation row (zero-padded by the caller).
  [[gnu::always_inline]] constexpr std::int64_t padded_cols() const { return blocks() * padded_block(); }
  [[gnu::always_inline]] constexpr std::int64_t block_bytes() const { return TileLayout::block_bytes(bits, block_len); }
  [[gnu::always_inline]] constexpr std::int64_t tile_bytes() const {
    return TileLayout::tile_bytes(bits, cols, block_len);
  }
  [[gnu::always_inline]] constexpr std::int64_t expert_bytes() const { return tiles() * tile_bytes(); }
};

/// A packed matrix: tag + expert data in one 64-byte aligned allocation.
class PackedMatrix {
 public:
  PackedMatrix() = default;
  PackedMatrix(const PackGeometry& g, Isa isa, std::int64_t experts);

  const PackTag& tag() const { return *reinterpret_cast<const PackTag*>(data_.get()); }
  const PackGeometry& geometry() const { return geom_; }
  std::uint8_t* expert(std::int64_t e) { return data_.get() + kHeaderBytes + e * geom_.expert_bytes(); }
  const std::uint8_t* expert(std::int64_t e) const { return data_.get() + kHeaderBytes + e * geom_.expert_bytes(); }
  const std::uint8_t* tile(std::int64_t e, std::int64_t t) const { return expert(e) + t * geom_.tile_bytes(); }
  std::size_t bytes() const { return size_; }
  const std::uint8_t* raw() const { return data_.get(); }

  static constexpr std::size_t kHeaderBytes = 128;  // tag padded so expert data stays 64-byte aligned

 private:
  struct Free {
    void operator()(std::uint8_t* p) const noexcept;
  };
  std::unique_ptr<std::uint8_t[], Free> data_;
  std::size_t size_ = 0;
  PackGeometry geom_;
};

/// Checks that `bytes` (at least `size` long) start with a CPU tag that
/// matches what the caller expects; throws qmoe::Error naming `what` otherwise.
void check_tag(const std::uint8_t* bytes, std::size_t size, const char* what, Isa isa, int nr, int bits,
               std::int64_t block_len, std::int64_t experts, std::int64_t rows, std::int64_t cols);

static_assert(sizeof(PackTag) <= PackedMatrix::kHeaderBytes);

}  // namespace qmoe::cpu
