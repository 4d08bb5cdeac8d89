// The grouped mixed-input GEMM: for each (expert, token tile) of the per-call
// plan and each tile of output rows, out^T = W x^T on the tensor cores
// (mma.sync m16n8k16, float32 accumulation), with the int4/int8 weights
// dequantized in registers from the fragment-ordered layout of layout.h.
//
// This kernel serves 32 and 64 token columns per tile (17..31 tokens per
// expert on sm_90a, where wgmma takes over from 32; every prefill size elsewhere;
// the kernel table of gemm_table.cu chooses):
// each lane's 16-byte weight loads are issued D slabs ahead of their use, and
// at 64 columns each warp covers 32 rows, so each dequantized weight fragment
// feeds 8 MMAs. Decode (up to 16 columns) runs gemm_decode.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "cuda/gemm.h"
#include "cuda/mma_common.cuh"

namespace qmoe::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// SK: how scales change along K (mma_common.cuh).
template <int MT, int SK>
struct Shape {
  static constexpr int BM = 8 * MT;                    // token columns per block
  static constexpr int WR = MT >= 8 ? 2 : 1;           // 16-row tiles per warp
  static constexpr int BN = kWarps * 16 * WR;          // output rows per block
  static constexpr int KC = MT >= 8 ? 256 : 512;       // K columns per shared-memory chunk
  static constexpr int LDS = KC + 8;                   // row stride: B fragment loads hit 32 distinct banks
  static constexpr int D = WR == 1 && SK < 2 ? 4 : 2;  // slabs of weights loaded ahead
  static constexpr int kSmemBytes = 2 * BM * LDS * 2;
  static constexpr bool kBlockAcc = MT <= 4;  // block scales on float32 per-block accumulators
  static_assert(BM == mma_geometry(MT).tile_tokens && BN == mma_geometry(MT).block_rows,
                "gemm.h's mma_geometry is this kernel's block");
};

template <class T, int BITS, int MT, int SK>
__global__ void __launch_bounds__(kThreads, 1) gemm_kernel(const GemmProblem p) {
  using S = Shape<MT, SK>;
  constexpr int SC = BITS == 4 ? 64 : 32;  // columns per slab
  constexpr int STEPS = SC / 16;           // k16 steps per slab
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);

  pdl_wait(), pdl_launch_dependents();  // the plan and the tokens come from the kernels before (common.cuh)
  TileWork tw;
  if (!tile_work(p, S::BM, tw)) return;
  const int e = tw.e, pos0 = tw.pos0, rows_here = tw.rows_here;
  const std::int64_t k_begin = tw.k_begin, k_end = tw.k_end;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, c = lane % 4;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) * S::BN + warp * 16 * S::WR;
  const int nchunks = static_cast<int>((k_end - k_begin + S::KC - 1) / S::KC);

  const std::int64_t slabs_total = p.g.slabs();
  const uint4* codes = reinterpret_cast<const uint4*>(p.codes + e * p.g.code_bytes_per_expert());
  const unsigned* rel =
      p.rel_scales ? reinterpret_cast<const unsigned*>(p.rel_scales) + e * p.g.rel_scale_words_per_expert() : nullptr;
  const unsigned short* zp =
      p.zero_points ? reinterpret_cast<const unsigned short*>(p.zero_points) + e * p.g.zp_pairs_per_expert() : nullptr;

  // Tokens of this tile -> rows of x, loaded K chunk by K chunk into shared
  // memory (double-buffered). Columns past K are zero (they meet zero
  // weights; garbage there could be NaN); rows past the tile's tokens are
  // left as they are: they only reach output columns that are never stored.
  auto load_chunk = [&](int buf, std::int64_t kc0) {
    T* dst = xs + buf * S::BM * S::LDS;
    const T* x = static_cast<const T*>(p.x);
    const std::int64_t kvalid = p.g.cols;
    if (p.x_vec16) {
      constexpr int VPR = S::KC / 8;
      for (int v = static_cast<int>(threadIdx.x); v < S::BM * VPR; v += kThreads) {
        const int m = v / VPR, col = v % VPR * 8;
        if (m >= rows_here) continue;
        const std::int64_t kk = kc0 + col;
        const std::int64_t row = p.gather ? p.gather[pos0 + m] : pos0 + m;
        const bool in = kk < kvalid;
        cp_async16(dst + m * S::LDS + col, x + row * p.x_stride + (in ? kk : 0), in ? 16 : 0);
      }
    } else {
      for (int v = static_cast<int>(threadIdx.x); v < S::BM * S::KC; v += kThreads) {
        const int m = v / S::KC, col = v % S::KC;
        if (m >= rows_here) continue;
        const std::int64_t kk = kc0 + col;
        const std::int64_t row = p.gather ? p.gather[pos0 + m] : pos0 + m;
        dst[m * S::LDS + col] = kk < kvalid ? x[row * p.x_stride + kk] : from_float<T>(0.f);
      }
    }
  };

  float acc[S::WR][MT][4] = {};

  // Block-wise scales. Decode tiles (S::kBlockAcc) feed the tensor cores the
  // exact integers q - z and apply each block's scale to a float32 per-block
  // accumulator when the block ends: 4 FMAs per block instead of one half2
  // multiply per register per k16 step, and no float16/bfloat16 rounding of
  // the scaled weights. Prefill tiles (more accumulators than registers for a
  // second set) scale the dequantized weights instead.
  // (block-wise weights always carry relative scales; row-wise never do)
  constexpr bool block_acc = S::kBlockAcc && SK != 0;
  constexpr bool hmul_scaled = !S::kBlockAcc && SK != 0;
  float blk[block_acc ? S::WR : 1][block_acc ? MT : 1][4] = {};
  float bscale[S::WR][2];
  const std::int64_t bs = p.g.block_size;
  const std::int64_t nb = p.g.blocks();
  // block_size is a power of two: a shift, not a 64-bit division (a long subroutine on the GPU).
  const int bshift = bs ? __ffsll(bs) - 1 : 0;

  // Per row tile: the lane's first code word and first scale / zero-point word.
  const uint4* wbase[S::WR];
  const unsigned* relbase[S::WR];
  const unsigned short* zpbase[S::WR];
  BlockConsts<T, BITS> bc[S::WR];
#pragma unroll
  for (int r = 0; r < S::WR; ++r) {
    const std::int64_t tile = row0 / 16 + r;
    wbase[r] = codes + tile * slabs_total * 32 + lane;
    relbase[r] = rel ? rel + tile * nb * 8 + g : nullptr;
    zpbase[r] = zp ? zp + tile * nb * 8 + g : nullptr;
    // Row-wise: one set of constants per row tile (zero points only).
    bc[r].set(zp && !bs ? zpbase[r][0] : 0u, zp != nullptr, 0u, false);
    bscale[r][0] = bscale[r][1] = 1.f;
  }
  // Scale blocks narrower than a slab (16 or 32 columns at 4 bits, 16 at 8)
  // change every k16 step or two; wider ones once per slab at most.
  constexpr bool per_step = SK == 2;

  struct Group {
    uint4 wv[S::D][S::WR];
    unsigned relw[S::D][per_step ? STEPS : 1][S::WR], zpw[S::D][per_step ? STEPS : 1][S::WR];
  };
  // Codes (and their scale words) are loaded together: a load in the
  // dependent path would stall every block.
  auto load_group = [&](Group& gr, std::int64_t kc0, int slab0, int s0, int nslabs) {
#pragma unroll
    for (int d = 0; d < S::D; ++d) {
#pragma unroll
      for (int r = 0; r < S::WR; ++r) {
        if (s0 + d >= nslabs) continue;
        gr.wv[d][r] = load_stream(wbase[r] + (slab0 + s0 + d) * 32);
        if constexpr (SK != 0) {
#pragma unroll
          for (int j = 0; j < (per_step ? STEPS : 1); ++j) {
            const int at = static_cast<int>((kc0 + (s0 + d) * SC + 16 * j) >> bshift) * 8;
            if (rel) gr.relw[d][j][r] = __ldg(relbase[r] + at);
            if (zp) gr.zpw[d][j][r] = __ldg(zpbase[r] + at);
          }
        }
      }
    }
  };
  // acc += blk * scale of the block just finished; blk = 0.
  auto flush = [&] {
    if constexpr (block_acc) {
#pragma unroll
      for (int r = 0; r < S::WR; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            acc[r][m][i] = fmaf(blk[r][m][i], bscale[r][i >> 1], acc[r][m][i]);
            blk[r][m][i] = 0.f;
          }
    }
  };
  bool first = true;  // the first k16 step of this block's K range may start mid scale-block
  auto compute_group = [&](const Group& gr, const T* xb, std::int64_t kc0, int s0, int nslabs) {
#pragma unroll
    for (int d = 0; d < S::D; ++d) {
      if (s0 + d >= nslabs) break;
      const int kl = (s0 + d) * SC;
#pragma unroll
      for (int j = 0; j < STEPS; ++j) {
        if (SK != 0 && (j == 0 || per_step)) {
          const bool boundary = ((kc0 + kl + 16 * j) & (bs - 1)) == 0;
          if (boundary || first) {
            if (block_acc && !first) flush();
              // (select values, not an index: a run-time index would put the arrays in local memory)
#pragma unroll
            for (int r = 0; r < S::WR; ++r) {
              const unsigned zw = zp ? gr.zpw[d][per_step ? j : 0][r] : 0u;
              const unsigned rw = rel ? gr.relw[d][per_step ? j : 0][r] : 0u;
              bc[r].set(zw, zp != nullptr, rw, hmul_scaled);
              if constexpr (block_acc) {
                bscale[r][0] = __half2float(__ushort_as_half(static_cast<unsigned short>(rw & 0xffff)));
                bscale[r][1] = __half2float(__ushort_as_half(static_cast<unsigned short>(rw >> 16)));
              }
            }
          }
        }
        first = false;
        unsigned b[MT][2];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const T* xr = xb + (m * 8 + g) * S::LDS + kl + 16 * j + 2 * c;
          b[m][0] = *reinterpret_cast<const unsigned*>(xr);
          b[m][1] = *reinterpret_cast<const unsigned*>(xr + 8);
        }
#pragma unroll
        for (int r = 0; r < S::WR; ++r) {
          unsigned a[4];
          dequant<T, BITS>(gr.wv[d][r], j, bc[r], hmul_scaled, a);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if constexpr (block_acc)
              mma16816<T>(blk[r][m], a, b[m][0], b[m][1]);
            else
              mma16816<T>(acc[r][m], a, b[m][0], b[m][1]);
          }
        }
      }
    }
  };

  load_chunk(0, k_begin);
  cp_async_commit();
  for (int ch = 0; ch < nchunks; ++ch) {
    const std::int64_t kc0 = k_begin + static_cast<std::int64_t>(ch) * S::KC;
    if (ch + 1 < nchunks) load_chunk((ch + 1) & 1, kc0 + S::KC);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* xb = xs + (ch & 1) * S::BM * S::LDS;
    const int nslabs = static_cast<int>((k_end - kc0 < S::KC ? k_end - kc0 : std::int64_t{S::KC}) / SC);
    const int slab0 = static_cast<int>(kc0 / SC);
    // Slab groups: the codes (and their scale words) of group i + 1 are in
    // flight while group i is computed (two register sets, used alternately).
    Group ga, gb;
    load_group(ga, kc0, slab0, 0, nslabs);
    for (int s0 = 0; s0 < nslabs; s0 += 2 * S::D) {
      if (s0 + S::D < nslabs) load_group(gb, kc0, slab0, s0 + S::D, nslabs);
      compute_group(ga, xb, kc0, s0, nslabs);
      if (s0 + S::D >= nslabs) break;
      if (s0 + 2 * S::D < nslabs) load_group(ga, kc0, slab0, s0 + 2 * S::D, nslabs);
      compute_group(gb, xb, kc0, s0 + S::D, nslabs);
    }
    __syncthreads();
  }
  if constexpr (block_acc) flush();

    // Epilogue: each warp's 16-row tiles, MT groups of 8 token columns.
#pragma unroll
  for (int r = 0; r < S::WR; ++r) store_tile<T, MT>(p, &acc[r][0][0], e, row0 / 16 + r, pos0, rows_here, g, c);
}

template <class T, int BITS, int MT, int SK>
void launch_one(const GemmProblem& p, std::int64_t tile_capacity, cudaStream_t stream) {
  using S = Shape<MT, SK>;
  opt_in_smem<gemm_kernel<T, BITS, MT, SK>>(S::kSmemBytes);
  const dim3 grid(static_cast<unsigned>(p.g.padded_rows / S::BN), static_cast<unsigned>(tile_capacity),
                  static_cast<unsigned>(p.fc1 ? 1 : p.splits));
  launch_kernel(gemm_kernel<T, BITS, MT, SK>, grid, dim3(kThreads), S::kSmemBytes, stream, p.pdl, p);
}

}  // namespace

void launch_gemm_mma(const GemmProblem& p, DType dtype, int mt, std::int64_t tile_capacity, cudaStream_t stream) {
  if (tile_capacity <= 0) return;
  dispatch_mma(p, dtype, [&](auto t, auto bits, auto sk) {
    using T = typename decltype(t)::type;
    if (mt == 4) return launch_one<T, decltype(bits)::value, 4, decltype(sk)::value>(p, tile_capacity, stream);
    return launch_one<T, decltype(bits)::value, 8, decltype(sk)::value>(p, tile_capacity, stream);
  });
}

}  // namespace qmoe::cuda
