// Internal: raw ONNX Runtime layout -> CPU packed layout (see packed.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/check.h"
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
/// after tiles [t0, t1) are written (about every kProgressBytes of raw weights
/// read, and at the end), so a caller can drop raw memory the packer will not
/// read again: with many threads packing at once, what they hold mapped stays
/// near threads x kProgressBytes.
template <typename SourceFn, typename ProgressFn>
void pack_tiles(const PackGeometry& g, std::int64_t e, SourceFn&& source, std::uint8_t* dst, std::int64_t t_begin,
                std::int64_t t_end, ProgressFn&& progress);
/// All tiles of expert e.
template <typename SourceFn>
void pack_expert(const PackGeometry& g, std::int64_t e, SourceFn&& source, std::uint8_t* dst) {
  pack_tiles(g, e, source, dst, 0, g.tiles(), [](std::int64_t, std::int64_t) {});
}

inline constexpr std::int64_t kProgressBytes = std::int64_t{1} << 20;
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
  constexpr int nr = kTileRows;
  const bool whole_groups = g.block_len % g.group_cols() == 0;
  std::vector<std::uint8_t> codes(whole_groups ? 0 : static_cast<std::size_t>(nr * g.cols));
  std::vector<const std::uint8_t*> rows(static_cast<std::size_t>(nr));
  std::vector<int> zeros(static_cast<std::size_t>(nr));
  std::vector<float> scales(static_cast<std::size_t>(nr));
  // Whole-group blocks: a tile's scales (all blocks, float32) and zero points
  // gathered once per row, so the block loop only indexes arrays.
  const std::int64_t nb = g.blocks();
  std::vector<float> tile_scales(whole_groups ? static_cast<std::size_t>(nr * nb) : 0);
  std::vector<int> tile_zeros(whole_groups ? static_cast<std::size_t>(nr * nb) : 0);
  std::vector<const std::uint8_t*> row_base(static_cast<std::size_t>(nr));
  std::int64_t done = t_begin;
  const std::int64_t tile_raw_bytes = std::max<std::int64_t>(1, nr * g.cols * g.bits / 8);
  const std::int64_t progress_tiles = std::max<std::int64_t>(1, kProgressBytes / tile_raw_bytes);
  dst += t_begin * g.tile_bytes();
  for (std::int64_t t = t_begin; t < t_end; ++t) {
    RowSource src[nr];
    for (int r = 0; r < nr; ++r) {
      const std::int64_t p = t * nr + r;
      src[r] = p < g.rows ? source(p) : RowSource{};
      const detail::RawMatrix* m = src[r].src;
      if (whole_groups) {
        float* ts = tile_scales.data() + r * nb;
        int* tz = tile_zeros.data() + r * nb;
        if (!m) {
          row_base[r] = nullptr;
          std::fill(ts, ts + nb, 0.f);
          std::fill(tz, tz + nb, 0);
          continue;
        }
        const std::int64_t row = e * m->rows + src[r].row;
        row_base[r] = m->weights + row * m->cols * m->bits / 8;
        const std::size_t esize = dtype_size(m->scale_dtype);
        detail::to_f32(static_cast<const std::uint8_t*>(m->scales) + static_cast<std::size_t>(row * nb) * esize,
                       m->scale_dtype, nb, ts);
        if (m->zero_points)
          for (std::int64_t b = 0; b < nb; ++b) tz[b] = m->zero(e, src[r].row, b);
        else
          std::fill(tz, tz + nb, 1 << (m->bits - 1));
        continue;
      }
      std::uint8_t* rc = codes.data() + static_cast<std::size_t>(r) * g.cols;
      if (m)
        raw_row_codes(*m, e, src[r].row, rc);
      else
        std::fill(rc, rc + g.cols, std::uint8_t{0});
      rows[r] = rc;
    }
    const std::int64_t block_row_bytes = g.block_len * g.bits / 8;
    for (std::int64_t b = 0; b < nb; ++b) {
      if (whole_groups) {
        for (int r = 0; r < nr; ++r) {
          zeros[r] = tile_zeros[static_cast<std::size_t>(r * nb + b)];
          scales[r] = tile_scales[static_cast<std::size_t>(r * nb + b)];
          rows[r] = row_base[r] ? row_base[r] + b * block_row_bytes : nullptr;
        }
        pack_block_bytes(g, rows.data(), zeros.data(), scales.data(), dst);
      } else {
        for (int r = 0; r < nr; ++r) {
          zeros[r] = src[r].src ? src[r].src->zero(e, src[r].row, b) : 0;
          scales[r] = src[r].src ? src[r].src->scale(e, src[r].row, b) : 0.f;
        }
        pack_block(g, rows.data(), zeros.data(), scales.data(), b * g.block_len, dst);
      }
      dst += g.block_bytes();
    }
    if (t + 1 - done >= progress_tiles || t + 1 == t_end) {
      progress(done, t + 1);
      done = t + 1;
    }
  }
}

}  // namespace qmoe::cpu
