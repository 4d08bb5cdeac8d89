// Internal: the CPU packed weight layout and its tag.
//
// Why this layout: the kernels compute NR = 16 output rows at once, walking K.
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

/// Rows of one packed tile: the NR of every CPU kernel table (the one definition).
inline constexpr int kTileRows = 16;

/// Layout arithmetic shared by the packer, the kernels and the tests.
struct PackGeometry {
  int nr = kTileRows, bits = 4;
  std::int64_t rows = 0, cols = 0, block_len = 0;

  std::int64_t tiles() const { return (rows + nr - 1) / nr; }
  std::int64_t blocks() const { return cols / block_len; }
  /// Columns per 4-byte group: 8 at 4 bits, 4 at 8 bits.
  std::int64_t group_cols() const { return 32 / bits; }
  /// block_len rounded up to whole groups.
  std::int64_t padded_block() const { return (block_len + group_cols() - 1) / group_cols() * group_cols(); }
  /// Columns the kernels read from each activation row (zero-padded by the caller).
  std::int64_t padded_cols() const { return blocks() * padded_block(); }
  std::int64_t code_bytes() const { return padded_block() * nr * bits / 8; }
  std::int64_t block_bytes() const { return nr * 4 + nr + code_bytes(); }
  std::int64_t tile_bytes() const { return blocks() * block_bytes(); }
  std::int64_t expert_bytes() const { return tiles() * tile_bytes(); }
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
