// Internal: int8 activations for the CUDA backend's accuracy_level 4 (the GPU
// counterpart of the CPU's int8 path): the quantized rows the int8 wgmma GEMM
// (gemm_wgmma.cu, A8) reads, their order, and the quantizer that writes them.
//
// A row of K activations becomes Kq = round_up(K, kAct8Block) int8 codes and one
// (scale, code sum) pair per block of kAct8Block columns: scale = amax / 127 in
// float32 (1 for an all-zero block), code = the nearest integer to x / scale
// (ties to even) in -127..127, x = scale * code. Columns past K are 0. A block
// with a NaN or an infinity gets a NaN scale, so its rows come out NaN (never a
// silent number). The code sum serves the weights' zero points: the GEMM multiplies
// the raw unsigned weight codes q and subtracts z * sum per block.
//
// Why the codes are permuted. The weights stay in the layout of layout.h, whose
// 16-byte lane reads hold the bfloat16 mma fragment order: lane (g, c) of a k16
// step holds columns 2c, 2c + 1, 2c + 8, 2c + 9 of rows g and g + 8. The int8
// wgmma / mma.m16n8k32 A fragment wants columns 4c..4c+3 of each 16-column half.
// K is a reduction, so instead of moving weight bytes the activations are
// stored with the same column order the weight registers come out in: within
// each 16-column group, column k sits at act8_slot(bits, k & 15). At 4 bits a
// lane's code word w of a k16 step gives rows g and g + 8 as w & 0x0f0f0f0f and
// (w >> 4) & 0x0f0f0f0f, bytes = columns 2c, 2c+8, 2c+1, 2c+9; at 8 bits two
// code words of a k16 step give them by one byte permute each, bytes = columns
// 2c, 2c+1, 2c+8, 2c+9.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/layout.h"
#include "qmoe/tensor.h"

namespace qmoe::cuda {

/// Columns per activation scale (one wgmma pipeline stage of int8 tokens).
inline constexpr int kAct8Block = 128;

/// A block's scale and the sum of its codes.
struct Act8Meta {
  float scale;
  int sum;
};

/// Whether weights of geometry g can meet int8 tokens: row-wise, or scale blocks of whole
/// activation blocks (block sizes are powers of two).
QMOE_HD inline bool act8_fits(const GpuGeometry& g) { return g.block_size == 0 || g.block_size >= kAct8Block; }

/// Where column kk (0..15) of a 16-column group is stored, for weights of `bits`.
QMOE_HD inline int act8_slot(int bits, int kk) {
  const int c = (kk & 7) >> 1;
  const int b = bits == 4 ? (((kk >> 3) & 1) | ((kk & 1) << 1)) : ((kk & 1) | (((kk >> 3) & 1) << 1));
  return 4 * c + b;
}

/// __byte_perm (bytes of y:x picked by the selector's nibbles), also on the host for tests.
QMOE_HD inline unsigned act8_byte_perm(unsigned x, unsigned y, unsigned sel) {
#ifdef __CUDA_ARCH__
  return __byte_perm(x, y, sel);
#else
  const std::uint64_t v = (std::uint64_t{y} << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
#endif
}

/// The int8 mma A fragment (a0, a2: row g; a1, a3: row g + 8; a0, a1: columns 4c..4c+3 of
/// the k32 step in act8_slot order, a2, a3: the next 16) of one k32 step from a lane's
/// layout.h code words of it: at 4 bits the two words of its two k16 steps (w[0], w[1]),
/// at 8 bits the four (w[0..3]). The bytes are the raw unsigned codes.
template <int BITS>
QMOE_HD inline void act8_a_fragment(const unsigned (&w)[4], unsigned (&a)[4]) {
  if constexpr (BITS == 4) {
    a[0] = w[0] & 0x0f0f0f0fu, a[1] = (w[0] >> 4) & 0x0f0f0f0fu;
    a[2] = w[1] & 0x0f0f0f0fu, a[3] = (w[1] >> 4) & 0x0f0f0f0fu;
  } else {
    a[0] = act8_byte_perm(w[0], w[1], 0x5410), a[1] = act8_byte_perm(w[0], w[1], 0x7632);
    a[2] = act8_byte_perm(w[2], w[3], 0x5410), a[3] = act8_byte_perm(w[2], w[3], 0x7632);
  }
}

/// Quantizes `rows` rows of `cols` activations (the token dtype, row r at x + r * x_stride
/// elements) into q (rows x q_cols int8, q_cols = round_up(cols, kAct8Block)) and meta
/// (rows x q_cols / kAct8Block) for weights of `bits`. `pdl`: launched as a dependent
/// (common.cuh launch_kernel).
void launch_quantize_act8(const void* x, DType dtype, std::int64_t rows, std::int64_t cols, std::int64_t x_stride,
                          int bits, std::int8_t* q, Act8Meta* meta, bool pdl, cudaStream_t stream);

}  // namespace qmoe::cuda
