// The GPU packer: raw ONNX Runtime layout -> the fragment-ordered layout of
// layout.h, one expert per call, entirely on the device.
#include <cuda_fp16.h>

#include <cstring>

#include "cuda/common.cuh"
#include "cuda/pack.h"

namespace qmoe::cuda {

namespace {

struct PackArgs {
  GpuGeometry g;
  int fusion;
  std::int64_t inter;
  RawExpert a, b;
  bool has_b;
  std::int64_t raw_blocks;  // scale blocks per raw row (1 when row-wise)
  PackedGpu dst;
  std::int64_t e;
};

__device__ float load_any(const void* p, DType t, std::int64_t i) {
  switch (t) {
    case DType::f16:
      return __half2float(__ushort_as_half(static_cast<const unsigned short*>(p)[i]));
    case DType::bf16:
      return __uint_as_float(static_cast<unsigned>(static_cast<const unsigned short*>(p)[i]) << 16);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// Packed row p -> (source, raw row), or row -1 for padding.
struct RowSource {
  const RawExpert* src;
  std::int64_t row;
};
__device__ RowSource source_row(const PackArgs& a, std::int64_t p) {
  if (!a.g.gated) return {&a.a, p < a.g.rows ? p : -1};
  const std::int64_t i = p / 16 * 8 + (p % 16 & 7);
  const bool up = p % 16 >= 8;
  if (i >= a.inter) return {&a.a, -1};
  switch (a.fusion) {
    case 1:
      return {&a.a, 2 * i + (up ? 1 : 0)};
    case 2:
      return {&a.a, i + (up ? a.inter : 0)};
    default:
      return {up ? &a.b : &a.a, i};
  }
}

// Zero point of raw row `row`, scale block `blk` (blk may lie past the last
// real block: padding, default zero point).
__device__ int zero_point(const PackArgs& a, const RawExpert& src, std::int64_t row, std::int64_t blk) {
  const int def = a.g.bits == 4 ? 8 : 128;
  if (row < 0 || !src.zero_points || blk >= a.raw_blocks) return def;
  if (a.g.block_size == 0) {  // [ceil(N / pack)] packed across rows
    if (a.g.bits == 8) return src.zero_points[row];
    const int byte = src.zero_points[row / 2];
    return row % 2 ? byte >> 4 : byte & 15;
  }
  if (a.g.bits == 8) return src.zero_points[row * a.raw_blocks + blk];
  const std::int64_t per_row = (a.raw_blocks + 1) / 2;
  const int byte = src.zero_points[row * per_row + blk / 2];
  return blk % 2 ? byte >> 4 : byte & 15;
}

__device__ int raw_code(const PackArgs& a, const RowSource& s, std::int64_t k) {
  const std::int64_t blk = a.g.block_size ? k / a.g.block_size : 0;
  if (s.row < 0 || k >= a.g.cols) return zero_point(a, *s.src, s.row, a.g.block_size ? blk : 0);
  if (a.g.bits == 8) return s.src->codes[s.row * a.g.cols + k];
  const int byte = s.src->codes[s.row * (a.g.cols / 2) + k / 2];
  return k % 2 ? byte >> 4 : byte & 15;
}

// One thread per (row tile, slab, lane): the lane's 16 bytes.
__global__ void pack_codes_kernel(PackArgs a) {
  const std::int64_t id = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x;
  const std::int64_t slabs = a.g.slabs();
  if (id >= a.g.tiles() * slabs * 32) return;
  const int lane = static_cast<int>(id % 32);
  const std::int64_t slab = id / 32 % slabs, tile = id / 32 / slabs;
  const int g = lane / 4, c = lane % 4;
  const RowSource rows[2] = {source_row(a, tile * 16 + g), source_row(a, tile * 16 + g + 8)};
  unsigned words[4];
  if (a.g.bits == 4) {
    for (int j = 0; j < 4; ++j) {
      const std::int64_t kb = slab * 64 + 16 * j;
      unsigned w = 0;
      for (int r = 0; r < 4; ++r) {
        const RowSource& s = rows[r & 1];
        const std::int64_t k = kb + 2 * c + ((r & 2) ? 8 : 0);
        w |= static_cast<unsigned>(raw_code(a, s, k)) << (4 * r);
        w |= static_cast<unsigned>(raw_code(a, s, k + 1)) << (16 + 4 * r);
      }
      words[j] = w;
    }
  } else {
    for (int j = 0; j < 2; ++j) {
      const std::int64_t kb = slab * 32 + 16 * j;
      for (int half = 0; half < 2; ++half) {
        unsigned w = 0;
        for (int rr = 0; rr < 2; ++rr) {
          const int r = 2 * half + rr;
          const RowSource& s = rows[r & 1];
          const std::int64_t k = kb + 2 * c + ((r & 2) ? 8 : 0);
          w |= static_cast<unsigned>(raw_code(a, s, k)) << (16 * rr);
          w |= static_cast<unsigned>(raw_code(a, s, k + 1)) << (16 * rr + 8);
        }
        words[2 * j + half] = w;
      }
    }
  }
  uint4* dst = reinterpret_cast<uint4*>(a.dst.codes + a.e * a.g.code_bytes_per_expert());
  dst[id] = make_uint4(words[0], words[1], words[2], words[3]);
}

// One thread per packed row: row scale, bias, relative scales, zero points.
__global__ void pack_rows_kernel(PackArgs a) {
  const std::int64_t p = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x;
  if (p >= a.g.padded_rows) return;
  const RowSource s = source_row(a, p);
  float rowmax = 0.f, row_scale = 0.f, bias = 0.f;
  if (s.row >= 0) {
    for (std::int64_t b = 0; b < a.raw_blocks; ++b)
      rowmax = fmaxf(rowmax, fabsf(load_any(s.src->scales, s.src->scale_dtype, s.row * a.raw_blocks + b)));
    row_scale = a.g.block_size ? rowmax : load_any(s.src->scales, s.src->scale_dtype, s.row);
    if (s.src->bias) bias = load_any(s.src->bias, s.src->bias_dtype, s.row);
  }
  const std::int64_t rowoff = a.e * a.g.padded_rows + p;
  a.dst.row_scales[rowoff] = row_scale;
  a.dst.bias[rowoff] = bias;
  const std::int64_t tile = p / 16;
  const int slot = static_cast<int>(p % 16 & 7) * 2 + static_cast<int>(p % 16 >= 8);
  const std::int64_t nb = a.g.blocks();
  for (std::int64_t b = 0; b < nb; ++b) {
    const std::int64_t at = ((tile * nb + b) * 8) * 2 + slot;
    if (a.g.block_size) {
      float rel = 0.f;
      if (s.row >= 0 && b < a.raw_blocks && rowmax > 0.f)
        rel = load_any(s.src->scales, s.src->scale_dtype, s.row * a.raw_blocks + b) / rowmax;
      a.dst.rel_scales[a.e * a.g.rel_scale_words_per_expert() * 2 + at] = __half_as_ushort(__float2half_rn(rel));
    }
    if (a.g.zero_points)
      a.dst.zero_points[a.e * a.g.zp_pairs_per_expert() * 2 + at] =
          static_cast<std::uint8_t>(zero_point(a, *s.src, s.row, b));
  }
}

}  // namespace

void pack_expert(const GpuGeometry& g, int swiglu_fusion, std::int64_t inter, const RawExpert& a, const RawExpert* b,
                 std::int64_t e, const PackedGpu& dst, cudaStream_t stream) {
  PackArgs args{};
  args.g = g;
  args.fusion = swiglu_fusion;
  args.inter = inter;
  args.a = a;
  args.has_b = b != nullptr;
  if (b) args.b = *b;
  args.raw_blocks = g.block_size ? g.cols / g.block_size : 1;
  args.dst = dst;
  args.e = e;
  const std::int64_t lanes = g.tiles() * g.slabs() * 32;
  pack_codes_kernel<<<static_cast<unsigned>(ceil_div(lanes, 256)), 256, 0, stream>>>(args);
  QMOE_CUDA_CHECK(cudaGetLastError());
  pack_rows_kernel<<<static_cast<unsigned>(ceil_div(g.padded_rows, 128)), 128, 0, stream>>>(args);
  QMOE_CUDA_CHECK(cudaGetLastError());
}

GpuPackTag make_tag(const GpuGeometry& g, std::int64_t E) {
  GpuPackTag t{};
  std::memcpy(t.magic, GpuPackTag::kMagic, sizeof t.magic);
  t.version = GpuPackTag::kVersion;
  t.bits = static_cast<std::uint32_t>(g.bits);
  t.block_size = g.block_size;
  t.gated = g.gated ? 1 : 0;
  t.zero_points = g.zero_points ? 1 : 0;
  t.experts = E;
  t.rows = g.rows, t.cols = g.cols, t.padded_rows = g.padded_rows, t.padded_cols = g.padded_cols;
  return t;
}

void check_tag(const GpuPackTag& t, const GpuGeometry& g, std::int64_t E, const char* what) {
  if (std::memcmp(t.magic, GpuPackTag::kMagic, sizeof t.magic) != 0)
    detail::fail(what, ": the packed data on the device is not qmoe CUDA data (no tag)");
  if (t.version != GpuPackTag::kVersion)
    detail::fail(what, ": packed format version ", t.version, ", this build reads version ", GpuPackTag::kVersion);
  const GpuPackTag want = make_tag(g, E);
  auto same = [&](const char* field, std::int64_t got, std::int64_t expected) {
    if (got != expected)
      detail::fail(what, ": packed data on the device has ", field, " ", got, ", this Layer expects ", expected);
  };
  same("bits", t.bits, want.bits);
  same("block_size", t.block_size, want.block_size);
  same("zero points (0/1)", t.zero_points, want.zero_points);
  same("gated (0/1)", t.gated, want.gated);
  same("experts", t.experts, want.experts);
  same("rows", t.rows, want.rows);
  same("cols", t.cols, want.cols);
  same("padded rows", t.padded_rows, want.padded_rows);
  same("padded cols", t.padded_cols, want.padded_cols);
}

}  // namespace qmoe::cuda
