// Internal: raw ONNX Runtime layout -> CPU packed layout (see packed.h).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/packed.h"
#include "quant/raw.h"

namespace qmoe::cpu {

/// Where packed row p of a matrix comes from: row `row` of raw matrix `src`
/// (null = padding). FC1 of swiglu interleaves gate and up rows this way, so a
/// tile always holds matching gate/up pairs whatever swiglu_fusion was.
struct RowSource {
  const detail::RawMatrix* src = nullptr;
  std::int64_t row = 0;
};

/// Packs the tiles [t_begin, t_end) (rows [t_begin * nr, t_end * nr)) of
/// expert e into `dst`, the start of the expert's packed data
/// (g.expert_bytes() bytes; the range's tiles are written in place).
/// `source(p)` maps packed row p to its raw row. `progress(t0, t1)` is called
/// after tiles [t0, t1) are written (every kProgressTiles tiles and at the end),
/// so a caller can drop raw memory the packer will not read again.
template <typename SourceFn, typename ProgressFn>
void pack_tiles(const PackGeometry& g, std::int64_t e, SourceFn&& source, std::uint8_t* dst, std::int64_t t_begin,
                std::int64_t t_end, ProgressFn&& progress);
/// All tiles of expert e.
template <typename SourceFn>
void pack_expert(const PackGeometry& g, std::int64_t e, SourceFn&& source, std::uint8_t* dst) {
  pack_tiles(g, e, source, dst, 0, g.tiles(), [](std::int64_t, std::int64_t) {});
}

inline constexpr std::int64_t kProgressTiles = 64;
/// Tiles one prepack work item packs (items are spread over the threads).
inline constexpr std::int64_t kPackChunkTiles = 64;

/// Writes the tag of a packed matrix.
void write_tag(std::uint8_t* dst, const PackGeometry& g, Isa isa, std::int64_t experts);

/// Decodes the codes of one raw row into out[0..cols).
void raw_row_codes(const detail::RawMatrix& m, std::int64_t e, std::int64_t row, std::uint8_t* out);

/// Packs one tile-block of NR rows given their codes / zeros / scales.
void pack_block(const PackGeometry& g, const std::uint8_t* const* row_codes, const int* zeros, const float* scales,
                std::int64_t col0, std::uint8_t* dst);

/// The same for blocks of whole 4-byte groups (block_len % group_cols() == 0):
/// a lane's 4 bytes are the raw row's bytes, copied as they are. row_bytes[r]
/// points at row r's raw bytes of this block (null = a padding row).
void pack_block_bytes(const PackGeometry& g, const std::uint8_t* const* row_bytes, const int* zeros,
                      const float* scales, std::uint8_t* dst);

template <typename SourceFn, typename ProgressFn>
void pack_tiles(const PackGeometry& g, std::int64_t e, SourceFn&& source, std::uint8_t* dst, std::int64_t t_begin,
                std::int64_t t_end, ProgressFn&& progress) {
  const int nr = g.nr;
  const bool whole_groups = g.block_len % g.group_cols() == 0;
  std::vector<std::uint8_t> codes(whole_groups ? 0 : static_cast<std::size_t>(nr * g.cols));
  std::vector<const std::uint8_t*> rows(static_cast<std::size_t>(nr));
  std::vector<int> zeros(static_cast<std::size_t>(nr));
  std::vector<float> scales(static_cast<std::size_t>(nr));
  std::int64_t done = t_begin;
  dst += t_begin * g.tile_bytes();
  for (std::int64_t t = t_begin; t < t_end; ++t) {
    RowSource src[64];
    for (int r = 0; r < nr; ++r) {
      const std::int64_t p = t * nr + r;
      src[r] = p < g.rows ? source(p) : RowSource{};
      if (whole_groups) continue;
      std::uint8_t* rc = codes.data() + static_cast<std::size_t>(r) * g.cols;
      if (src[r].src)
        raw_row_codes(*src[r].src, e, src[r].row, rc);
      else
        std::fill(rc, rc + g.cols, std::uint8_t{0});
      rows[r] = rc;
    }
    for (std::int64_t b = 0; b < g.blocks(); ++b) {
      for (int r = 0; r < nr; ++r) {
        zeros[r] = src[r].src ? src[r].src->zero(e, src[r].row, b) : 0;
        scales[r] = src[r].src ? src[r].src->scale(e, src[r].row, b) : 0.f;
      }
      if (whole_groups) {
        for (int r = 0; r < nr; ++r) {
          const detail::RawMatrix* m = src[r].src;
          rows[r] = m ? m->weights + ((e * m->rows + src[r].row) * m->cols + b * g.block_len) * m->bits / 8 : nullptr;
        }
        pack_block_bytes(g, rows.data(), zeros.data(), scales.data(), dst);
      } else {
        pack_block(g, rows.data(), zeros.data(), scales.data(), b * g.block_len, dst);
      }
      dst += g.block_bytes();
    }
    if (t + 1 - done >= kProgressTiles || t + 1 == t_end) {
      progress(done, t + 1);
      done = t + 1;
    }
  }
}

}  // namespace qmoe::cpu
