// The int8 activation quantizer of accuracy_level 4 (act8.h): one warp per
// (row, block of 128 columns), 4 columns per lane.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>

#include "cuda/act8.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"

namespace qmoe::cuda {

namespace {

constexpr int kWarps = 4;  // warps (blocks of columns) per thread block

template <class T>
__global__ void __launch_bounds__(32 * kWarps)
    quantize_act8_kernel(const T* __restrict__ x, std::int64_t rows, std::int64_t cols, std::int64_t x_stride, int bits,
                         std::int8_t* __restrict__ q, Act8Meta* __restrict__ meta, std::int64_t nblk) {
  pdl_wait(), pdl_launch_dependents();  // the rows come from the kernel before
  const std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= rows * nblk) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const std::int64_t r = item / nblk, blk = item % nblk;
  const std::int64_t k0 = blk * kAct8Block + 4 * lane;
  const T* xr = x + r * x_stride;
  float v[4];
  float amax = 0.f;
  bool bad = false;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[j] = k0 + j < cols ? to_float(xr[k0 + j]) : 0.f;
    bad |= !isfinite(v[j]);
    amax = fmaxf(amax, fabsf(v[j]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  bad = __any_sync(0xffffffffu, bad);
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  int sum = 0;
  std::int8_t* qr = q + r * nblk * kAct8Block + blk * kAct8Block;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = bad ? 0 : max(-127, min(127, __float2int_rn(__fdiv_rn(v[j], scale))));
    sum += c;
    const int kk = 4 * lane + j;  // column within the block; its 16-column group keeps its place
    qr[(kk & ~15) + act8_slot(bits, kk & 15)] = static_cast<std::int8_t>(c);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) meta[r * nblk + blk] = Act8Meta{bad ? __int_as_float(0x7fffffff) : scale, sum};
}

}  // namespace

void launch_quantize_act8(const void* x, DType dtype, std::int64_t rows, std::int64_t cols, std::int64_t x_stride,
                          int bits, std::int8_t* q, Act8Meta* meta, bool pdl, cudaStream_t stream) {
  if (rows <= 0) return;
  const std::int64_t nblk = ceil_div(cols, kAct8Block);
  const std::int64_t blocks = ceil_div(rows * nblk, kWarps);
  detail::require(blocks <= INT_MAX, "int8 activations: ", rows, " rows of ", cols, " columns are too many");
  const dim3 grid(static_cast<unsigned>(blocks)), block(32 * kWarps);
  if (dtype == DType::f16) {
    launch_kernel(quantize_act8_kernel<__half>, grid, block, 0, stream, pdl, static_cast<const __half*>(x), rows, cols,
                  x_stride, bits, q, meta, nblk);
  } else {
    launch_kernel(quantize_act8_kernel<__nv_bfloat16>, grid, block, 0, stream, pdl,
                  static_cast<const __nv_bfloat16*>(x), rows, cols, x_stride, bits, q, meta, nblk);
  }
}

}  // namespace qmoe::cuda
