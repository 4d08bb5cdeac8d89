// The decode GEMM: up to 16 tokens per expert tile, where a layer's time is
// the time to stream its active expert weights once. Same math and layout as
// gemm.cu (mma.sync m16n8k16, weights as the A operand dequantized in
// registers, float32 accumulation, block scales on float32 per-block sums),
// different data movement:
//
// Why a shared-memory ring per warp: at the bandwidth limit an H200 SM must
// keep ~30-40 KiB of loads in flight (Little's law: ~4 TB/s x ~1 us / 132
// SMs). Weights loaded into registers a few slabs ahead (gemm.cu) cap that at
// 16 B x slabs-ahead per lane, and more slabs ahead cost registers, hence
// warps: the kernel stalled on memory with the issue slots half idle. Here
// each lane copies its own 16 bytes of the next R - 1 slabs (and the slab's
// scale words) with cp.async into a per-warp ring of R stages, so R x 512 B
// per warp (8 KiB at R = 16, 128 KiB per SM) are in flight whatever the
// register budget. A lane reads back only what it copied itself, so no warp
// or block barrier is needed anywhere in the main loop.
//
// Tokens (the B operand, a few rows) are read straight from global memory
// (L1-resident after the first warp of an SM touched them), one slab ahead,
// instead of being staged through shared memory: no chunk loop, no
// __syncthreads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "cuda/gemm.h"
#include "cuda/mma_common.cuh"

namespace qmoe::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// The ring's copies and waits carry "memory" clobbers: with no barrier in the
// loop, they alone keep the compiler from moving the shared-memory reads of a
// stage across the wait that makes it valid, or across the copy that refills it.
__device__ __forceinline__ void ring_copy16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void ring_copy4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void ring_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void ring_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// SK, how scales change along K (as in gemm.cu): 0 = row-wise, 1 = blocks of
// a slab or more (one scale word per slab), 2 = narrower blocks (one per k16 step).
template <int BITS, int SK>
struct Ring {
  static constexpr int SC = BITS == 4 ? 64 : 32;  // columns per slab
  static constexpr int STEPS = SC / 16;           // k16 steps per slab
  static constexpr int W = SK == 0 ? 0 : SK == 1 ? 1 : STEPS;  // scale words per lane and slab, per kind
  static constexpr int R = SK == 2 ? 8 : 16;  // stages (slabs) per warp; a power of two
  // A stage: the lanes' 16-byte code words, then W relative-scale words and W
  // zero-point words per lane.
  static constexpr int kCodeBytes = 32 * 16;
  static constexpr int kStageBytes = kCodeBytes + 2 * W * 32 * 4;
  static constexpr int kSmemBytes = kWarps * R * kStageBytes;
};

// Two consecutive elements of a token row (column kk and kk + 1) as one B
// register; columns at or past `cols` are zero (padding meets zero weights,
// but garbage there could be NaN).
template <class T>
__device__ __forceinline__ unsigned load_pair(const T* row, std::int64_t kk, std::int64_t cols, bool vec) {
  if (!row || kk >= cols) return 0u;
  if (vec && kk + 1 < cols) return __ldg(reinterpret_cast<const unsigned*>(row + kk));
  const unsigned short lo = __ldg(reinterpret_cast<const unsigned short*>(row + kk));
  const unsigned short hi = kk + 1 < cols ? __ldg(reinterpret_cast<const unsigned short*>(row + kk + 1)) : 0;
  return lo | static_cast<unsigned>(hi) << 16;
}

template <class T, int BITS, int MT, int SK>
__global__ void __launch_bounds__(kThreads, 4) decode_kernel(const GemmProblem p) {
  using RG = Ring<BITS, SK>;
  constexpr int SC = RG::SC, STEPS = RG::STEPS, R = RG::R, W = RG::W;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  if (static_cast<int>(blockIdx.y) >= *p.num_tiles) return;
  const MTile mt = p.tiles[blockIdx.y];
  const int e = mt.expert;
  const int pos0 = p.offsets[e] + mt.m0;
  const int rows_here = min(8 * MT, p.offsets[e + 1] - pos0);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, c = lane % 4;
  const std::int64_t tile = static_cast<std::int64_t>(blockIdx.x) * kWarps + warp;

  const std::int64_t kp = p.g.padded_cols;
  const std::int64_t k_begin = p.fc1 ? 0 : static_cast<std::int64_t>(blockIdx.z) * p.split_cols;
  const std::int64_t k_end = p.fc1 ? kp : (kp < k_begin + p.split_cols ? kp : k_begin + p.split_cols);
  const int ns = static_cast<int>((k_end - k_begin) / SC);  // k ranges are whole 64-column groups

  const std::int64_t nb = p.g.blocks();
  const std::int64_t bs = p.g.block_size;
  const int bshift = bs ? __ffsll(bs) - 1 : 0;  // block_size is a power of two
  const uint4* wsrc = reinterpret_cast<const uint4*>(p.codes + e * p.g.code_bytes_per_expert()) +
                      (tile * p.g.slabs() + k_begin / SC) * 32 + lane;
  const unsigned* relsrc = p.rel_scales ? reinterpret_cast<const unsigned*>(p.rel_scales) +
                                              e * p.g.rel_scale_words_per_expert() + tile * nb * 8 + g
                                        : nullptr;
  // Zero points are pairs of bytes (rows g, g + 8) per lane: copied as the
  // aligned 32-bit word that holds the pair, the half picked on use.
  const unsigned short* zpsrc = p.zero_points ? reinterpret_cast<const unsigned short*>(p.zero_points) +
                                                    e * p.g.zp_pairs_per_expert() + tile * nb * 8 + (g & ~1)
                                              : nullptr;
  const int zshift = (g & 1) * 16;
  unsigned char* ring = smem_raw + warp * R * RG::kStageBytes;

  // Slab i of this block's K range into stage i % R (an empty group past the
  // end keeps the count of committed groups uniform for cp.async.wait_group).
  auto issue = [&](int i) {
    if (i < ns) {
      unsigned char* st = ring + (i & (R - 1)) * RG::kStageBytes;
      ring_copy16(st + lane * 16, wsrc + static_cast<std::int64_t>(i) * 32);
      if constexpr (W > 0) {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const std::int64_t blk = (k_begin + static_cast<std::int64_t>(i) * SC + 16 * j) >> bshift;
          if (relsrc) ring_copy4(st + RG::kCodeBytes + (j * 32 + lane) * 4, relsrc + blk * 8);
          if (zpsrc) ring_copy4(st + RG::kCodeBytes + ((W + j) * 32 + lane) * 4, zpsrc + blk * 8);
        }
      }
    }
    ring_commit();
  };

  // The token rows of this tile (column n = 8m + g of the MMA), null past the tile's tokens.
  const T* xrow[MT];
  {
    const T* x = static_cast<const T*>(p.x);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int n = 8 * m + g;
      xrow[m] = n < rows_here ? x + static_cast<std::int64_t>(p.gather ? p.gather[pos0 + n] : pos0 + n) * p.x_stride
                              : nullptr;
    }
  }
  struct XFrag {
    unsigned b[MT][STEPS][2];
  };
  const std::int64_t cols = p.g.cols;
  const bool vec = p.x_vec16;
  auto load_x = [&](XFrag& f, int i) {
    const std::int64_t k0 = k_begin + static_cast<std::int64_t>(i) * SC + 2 * c;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < STEPS; ++j) {
        f.b[m][j][0] = load_pair(xrow[m], k0 + 16 * j, cols, vec);
        f.b[m][j][1] = load_pair(xrow[m], k0 + 16 * j + 8, cols, vec);
      }
  };

  float acc[MT][4] = {};
  constexpr bool block_acc = SK != 0;  // block scales on float32 per-block accumulators (gemm.cu)
  float blk[block_acc ? MT : 1][4] = {};
  float bscale[2] = {1.f, 1.f};
  BlockConsts<T, BITS> bc;
  if constexpr (SK == 0) {  // row-wise: one set of constants for the whole row tile
    const unsigned zw = zpsrc ? (__ldg(reinterpret_cast<const unsigned*>(zpsrc)) >> zshift) & 0xffffu : 0u;
    bc.set(zw, zpsrc != nullptr, 0u, false);
  }
  auto flush = [&] {
    if constexpr (block_acc) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[m][i] = fmaf(blk[m][i], bscale[i >> 1], acc[m][i]);
          blk[m][i] = 0.f;
        }
    }
  };
  bool first = true;  // the K range may start inside a scale block

  auto step = [&](int i, const XFrag& xf, XFrag& next) {
    issue(i + R - 1);
    ring_wait<R - 1>();  // groups 0..i have landed (this lane's copies)
    if (i + 1 < ns) load_x(next, i + 1);
    const unsigned char* st = ring + (i & (R - 1)) * RG::kStageBytes;
    const uint4 v = *reinterpret_cast<const uint4*>(st + lane * 16);
    const std::int64_t kabs = k_begin + static_cast<std::int64_t>(i) * SC;
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
      if constexpr (SK != 0) {
        if (j == 0 || SK == 2) {
          const bool boundary = ((kabs + 16 * j) & (bs - 1)) == 0;
          if (boundary || first) {
            if (!first) flush();
            const int w = SK == 2 ? j : 0;
            const unsigned rw = relsrc ? *reinterpret_cast<const unsigned*>(st + RG::kCodeBytes + (w * 32 + lane) * 4) : 0u;
            const unsigned zw =
                zpsrc ? (*reinterpret_cast<const unsigned*>(st + RG::kCodeBytes + ((W + w) * 32 + lane) * 4) >> zshift) &
                            0xffffu
                      : 0u;
            bc.set(zw, zpsrc != nullptr, rw, false);
            bscale[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(rw & 0xffff)));
            bscale[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(rw >> 16)));
          }
        }
      }
      first = false;
      unsigned a[4];
      dequant<T, BITS>(v, j, bc, false, a);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if constexpr (block_acc)
          mma16816<T>(blk[m], a, xf.b[m][j][0], xf.b[m][j][1]);
        else
          mma16816<T>(acc[m], a, xf.b[m][j][0], xf.b[m][j][1]);
      }
    }
  };

#pragma unroll
  for (int i = 0; i < R - 1; ++i) issue(i);
  XFrag xa, xb;
  load_x(xa, 0);
  for (int i = 0; i < ns; i += 2) {
    step(i, xa, xb);
    if (i + 1 >= ns) break;
    step(i + 1, xb, xa);
  }
  ring_wait<0>();  // no copy may outlive the block
  flush();
  store_tile<T, MT>(p, &acc[0][0], e, tile, pos0, rows_here, g, c);
}

template <class T, int BITS, int MT, int SK>
void launch_one(const GemmProblem& p, std::int64_t tile_capacity, cudaStream_t stream) {
  using RG = Ring<BITS, SK>;
  opt_in_smem<decode_kernel<T, BITS, MT, SK>>(RG::kSmemBytes);
  const dim3 grid(static_cast<unsigned>(p.g.padded_rows / (16 * kWarps)), static_cast<unsigned>(tile_capacity),
                  static_cast<unsigned>(p.fc1 ? 1 : p.splits));
  decode_kernel<T, BITS, MT, SK><<<grid, kThreads, RG::kSmemBytes, stream>>>(p);
  QMOE_CUDA_CHECK(cudaGetLastError());
}

template <class T, int BITS, int SK>
void launch_sk(const GemmProblem& p, int mt, std::int64_t cap, cudaStream_t s) {
  if (mt == 1) return launch_one<T, BITS, 1, SK>(p, cap, s);
  return launch_one<T, BITS, 2, SK>(p, cap, s);
}

template <class T, int BITS>
void launch_bits(const GemmProblem& p, int mt, std::int64_t cap, cudaStream_t s) {
  if (p.g.block_size == 0) return launch_sk<T, BITS, 0>(p, mt, cap, s);
  if (p.g.block_size >= p.g.slab_cols()) return launch_sk<T, BITS, 1>(p, mt, cap, s);
  return launch_sk<T, BITS, 2>(p, mt, cap, s);
}

}  // namespace

void launch_gemm_decode(const GemmProblem& p, DType dtype, int mt, std::int64_t tile_capacity, cudaStream_t stream) {
  if (tile_capacity <= 0) return;
  const bool b4 = p.g.bits == 4;
  if (dtype == DType::f16) return b4 ? launch_bits<__half, 4>(p, mt, tile_capacity, stream)
                                     : launch_bits<__half, 8>(p, mt, tile_capacity, stream);
  return b4 ? launch_bits<__nv_bfloat16, 4>(p, mt, tile_capacity, stream)
            : launch_bits<__nv_bfloat16, 8>(p, mt, tile_capacity, stream);
}

}  // namespace qmoe::cuda
