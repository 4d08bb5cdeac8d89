#include "cpu/pack.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>

#include "core/check.h"

namespace qmoe::cpu {

void PackedMatrix::Free::operator()(std::uint8_t* p) const noexcept { std::free(p); }

PackedMatrix::PackedMatrix(const PackGeometry& g, Isa isa, std::int64_t experts) : geom_(g) {
  size_ = kHeaderBytes + static_cast<std::size_t>(experts * g.expert_bytes());
  // Large matrices on 2 MiB boundaries, marked for transparent huge pages:
  // prepacking then takes one page fault per 2 MiB instead of per 4 KiB, and
  // the kernels' weight streams miss the TLB less.
  constexpr std::size_t kHuge = std::size_t{2} << 20;
  const std::size_t align = size_ >= 2 * kHuge ? kHuge : 64;
  const std::size_t alloc = (size_ + align - 1) / align * align;
  data_.reset(static_cast<std::uint8_t*>(std::aligned_alloc(align, alloc)));
  if (!data_) detail::fail("prepack: out of memory allocating ", alloc, " bytes of packed weights");
#ifdef MADV_HUGEPAGE
  if (align == kHuge) ::madvise(data_.get(), alloc, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  std::memset(data_.get(), 0, kHeaderBytes);
  write_tag(data_.get(), g, isa, experts);
}

void write_tag(std::uint8_t* dst, const PackGeometry& g, Isa isa, std::int64_t experts) {
  PackTag t{};
  std::memcpy(t.magic, PackTag::kMagic, sizeof t.magic);
  t.version = PackTag::kVersion;
  t.backend = PackTag::kBackendCpu;
  t.isa = isa;
  t.nr = static_cast<std::uint32_t>(kTileRows);
  t.bits = static_cast<std::uint32_t>(g.bits);
  t.block_len = static_cast<std::uint32_t>(g.block_len);
  t.experts = experts;
  t.rows = g.rows;
  t.cols = g.cols;
  t.expert_stride = static_cast<std::uint64_t>(g.expert_bytes());
  std::memcpy(dst, &t, sizeof t);
}

void check_tag(const std::uint8_t* bytes, std::size_t size, const char* what, Isa isa, int nr, int bits,
               std::int64_t block_len, std::int64_t experts, std::int64_t rows, std::int64_t cols) {
  using detail::fail;
  if (bytes == nullptr || size < sizeof(PackTag)) fail(what, ": packed data too short for a tag (", size, " bytes)");
  PackTag t;
  std::memcpy(&t, bytes, sizeof t);
  if (std::memcmp(t.magic, PackTag::kMagic, sizeof t.magic) != 0)
    fail(what, ": not qmoe packed data (bad magic); refusing to read it as weights");
  if (t.version != PackTag::kVersion)
    fail(what, ": packed format version ", t.version, ", this build reads version ", PackTag::kVersion);
  if (t.backend != PackTag::kBackendCpu) fail(what, ": packed for backend ", t.backend, ", expected the CPU backend");
  if (t.isa != isa) fail(what, ": packed for ISA ", isa_name(t.isa), ", expected ", isa_name(isa));
  if (static_cast<int>(t.nr) != nr || static_cast<int>(t.bits) != bits ||
      static_cast<std::int64_t>(t.block_len) != block_len)
    fail(what, ": packed with tile ", t.nr, " rows, ", t.bits, " bits, block ", t.block_len, "; expected ", nr,
         " rows, ", bits, " bits, block ", block_len);
  if (t.experts != experts || t.rows != rows || t.cols != cols)
    fail(what, ": packed shape [", t.experts, ", ", t.rows, ", ", t.cols, "], expected [", experts, ", ", rows, ", ",
         cols, "]");
  PackGeometry g{bits, rows, cols, block_len};
  if (t.expert_stride != static_cast<std::uint64_t>(g.expert_bytes()) ||
      size < PackedMatrix::kHeaderBytes + static_cast<std::size_t>(experts * g.expert_bytes()))
    fail(what, ": packed data is truncated or its expert stride is wrong (", size, " bytes)");
}

void raw_row_codes(const detail::RawMatrix& m, std::int64_t e, std::int64_t row, std::uint8_t* out) {
  const std::int64_t row_bytes = m.cols * m.bits / 8;
  const std::uint8_t* src = m.weights + (e * m.rows + row) * row_bytes;
  if (m.bits == 8) {
    std::memcpy(out, src, static_cast<std::size_t>(m.cols));
    return;
  }
  for (std::int64_t i = 0; i < row_bytes; ++i) {
    out[2 * i] = src[i] & 0x0f;
    out[2 * i + 1] = src[i] >> 4;
  }
}

void pack_block(const PackGeometry& g, const std::uint8_t* const* row_codes, const int* zeros, const float* scales,
                std::int64_t col0, std::uint8_t* dst) {
  constexpr int nr = kTileRows;
  std::memcpy(dst + TileLayout::kScalesOffset, scales, static_cast<std::size_t>(nr) * 4);
  for (int r = 0; r < nr; ++r) dst[TileLayout::kZerosOffset + r] = static_cast<std::uint8_t>(zeros[r]);
  std::uint8_t* codes = dst + TileLayout::kCodesOffset;
  const std::int64_t gc = g.group_cols(), groups = g.padded_block() / gc;
  for (std::int64_t grp = 0; grp < groups; ++grp)
    for (int r = 0; r < nr; ++r) {
      // Code of column c of this block for row r; padding columns repeat the zero point.
      auto code = [&](std::int64_t c) { return c < g.block_len ? row_codes[r][col0 + c] : zeros[r]; };
      std::uint8_t* lane = codes + (grp * nr + r) * 4;
      for (int i = 0; i < 4; ++i) {
        if (g.bits == 8) {
          lane[i] = static_cast<std::uint8_t>(code(grp * 4 + i));
        } else {
          const std::int64_t c = grp * 8 + 2 * i;
          lane[i] = static_cast<std::uint8_t>(code(c) | (code(c + 1) << 4));
        }
      }
    }
}

void pack_block_bytes(const PackGeometry& g, const std::uint8_t* const* row_bytes, const int* zeros,
                      const float* scales, std::uint8_t* dst) {
  constexpr int nr = kTileRows;
  std::memcpy(dst + TileLayout::kScalesOffset, scales, static_cast<std::size_t>(nr) * 4);
  for (int r = 0; r < nr; ++r) dst[TileLayout::kZerosOffset + r] = static_cast<std::uint8_t>(zeros[r]);
  std::uint8_t* lane = dst + TileLayout::kCodesOffset;
  const std::int64_t groups = g.block_len / g.group_cols();
  for (std::int64_t grp = 0; grp < groups; ++grp)
    for (int r = 0; r < nr; ++r, lane += 4) {
      if (row_bytes[r])
        std::memcpy(lane, row_bytes[r] + 4 * grp, 4);
      else
        std::memset(lane, 0, 4);
    }
}

}  // namespace qmoe::cpu
