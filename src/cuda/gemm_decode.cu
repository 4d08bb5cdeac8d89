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
// each lane copies its own 16 bytes of the next R - 1 slabs (and, where a
// scale block starts, its scale words) with cp.async into a per-warp ring of
// R stages, so (R - 1) x 512 B per warp are in flight whatever the register
// budget. A lane reads back only what it copied itself, so the ring needs no
// warp or block barrier. Measured on the H200 (ncu, mixtral T = 1): the
// long-scoreboard stalls of the register version (1.7 cycles per
// instruction) fall to 0.2-0.5; FC1 60 -> 48 us.
//
// Tried and dropped (slower on the H200, same run): folding the zero point
// out of the dequantization (magic + q into the tensor cores, minus
// (magic + z) * sum(x) per block from per-slab token sums; 4 fewer
// instructions per k16 step, +3 us per mixtral layer: the sums put work
// before the chunk barrier), and the largest shared-memory carveout (5
// instead of 4 blocks per SM: no change).
//
// Tokens (the B operand, a few rows) are staged through shared memory in K
// chunks, double-buffered, loaded with plain 16-byte loads into registers one
// chunk ahead (cp.async there would interleave with the ring's commit groups),
// with one block barrier per chunk.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "cuda/gemm.h"
#include "cuda/mma_common.cuh"
#include "cuda/topk.cuh"

namespace qmoe::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// The ring's copies and waits carry "memory" clobbers: with no barrier in the
// loop, they alone keep the compiler from moving the shared-memory reads of a
// stage across the wait that makes it valid, or across the copy that refills it.
__device__ __forceinline__ void ring_copy16(unsigned smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(gmem) : "memory");
}
__device__ __forceinline__ void ring_copy4(unsigned smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem), "l"(gmem) : "memory");
}
__device__ __forceinline__ void ring_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void ring_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// The ring's depth for 8-token tiles (MT = 1), where a one-token call has few
// warps per SM and each must keep more of its weights in flight, and for
// 16-token tiles (MT = 2, the mid-batch calls); build-time knobs for measuring
// them (scripts/device_ab.sh).
#ifndef QMOE_DECODE_RING_MT1
#define QMOE_DECODE_RING_MT1 8
#endif
#ifndef QMOE_DECODE_RING_MT2
#define QMOE_DECODE_RING_MT2 8
#endif

// SK: how scales change along K (mma_common.cuh); the ring holds one scale word
// per slab for SK = 1 and one per k16 step for SK = 2.
template <int BITS, int SK, int MT>
struct Ring {
  static constexpr int SC = BITS == 4 ? 64 : 32;               // columns per slab
  static constexpr int STEPS = SC / 16;                        // k16 steps per slab
  static constexpr int W = SK == 0 ? 0 : SK == 1 ? 1 : STEPS;  // scale words per lane and slab, per kind
  // Stages (slabs) per warp, a power of two: 8 keeps ~3.5 KiB per warp and, at
  // 4-5 blocks of 4 warps per SM, 60-70 KiB per SM in flight (measured: the
  // kernel then no longer waits on memory).
  static constexpr int R = MT == 1 ? QMOE_DECODE_RING_MT1 : QMOE_DECODE_RING_MT2;
  static_assert(R >= 2 && (R & (R - 1)) == 0, "the ring's depth is a power of two");
  // A stage: the lanes' 16-byte code words, then W relative-scale words and W
  // zero-point words per lane.
  static constexpr int kCodeBytes = 32 * 16;
  static constexpr int kStageBytes = kCodeBytes + 2 * W * 32 * 4;
  static constexpr int kSmemBytes = kWarps * R * kStageBytes;
};

// Token rows of a tile in shared memory: BM rows of KC columns per chunk.
template <int MT>
struct XTile {
  static constexpr int BM = 8 * MT;
  static constexpr int KC = 512 / MT;  // K columns per chunk: BM * KC / 8 = 4 16-byte loads per thread
  static constexpr int LDS = KC + 8;   // row stride: the B fragment loads hit 32 distinct banks
  static constexpr int VPR = KC / 8;   // 16-byte vectors per row
  static constexpr int NV = BM * VPR / kThreads;
  static constexpr int kBytes = 2 * BM * LDS * 2;
};

// A self-routed FC1's m-tile (GemmProblem::route_logits; one token, so one row):
// warp 0 picks the token's k experts as the routing kernel does (topk.cuh; the
// order keys in `scratch`, E words of the token buffer, unused until then), and
// tile y is the y-th lowest of them, at position y of the expert-grouped order
// (the plan's, with one row per expert). The routing weights are not needed here.
__device__ bool self_routed_tile(const GemmProblem& p, unsigned* scratch, TileWork& w) {
  __shared__ int picks[32], expert;
  const int y = static_cast<int>(blockIdx.y), E = p.route_experts, k = p.route_k;
  if (y >= k) return false;
  if (threadIdx.x < 32) {
    const int lane = static_cast<int>(threadIdx.x);
    for (int e = lane; e < E; e += 32) {
      const float v = load_act(p.route_logits, p.route_dtype, e);
      scratch[e] = order_key(v != v ? -INFINITY : v);
    }
    pick_top_k(scratch, E, k, [&](int j, int pick, unsigned) { picks[j] = pick; });
    __syncwarp();
    if (lane < k) {
      const int mine = picks[lane];
      int rank = 0;
      for (int j = 0; j < k; ++j) rank += picks[j] < mine ? 1 : 0;
      if (rank == y) expert = mine;
    }
  }
  __syncthreads();  // the keys' words are free again: the token buffer is written after this
  w.e = expert;
  w.pos0 = y;
  w.rows_here = 1;
  split_k_range(p, w.k_begin, w.k_end);
  return true;
}

// FC2 with a fused combine (GemmProblem::combine): after storing its partials,
// the block counts itself in for each token of its m-tile at its 64-row block;
// the last block of a (token, row block), of k experts x K splits, mixes that
// token's 64 outputs, with combine_few_kernel's arithmetic (route.cu: same
// bits): the k experts' columns (bias, then the splits in order) into `ys`
// (k x 64 floats of the block's shared memory, free by then) by all threads at
// once, then each column's k terms in order. The counting is the
// threadfence-reduction pattern: every thread fences its stores before the
// block's arrival; the last block fences and reads the other blocks' partials
// past L1 (__ldcg).
template <class T, int BM>
__device__ void combine_when_last(const GemmProblem& p, int pos0, int rows_here, float* ys) {
  const FusedCombine& f = p.combine;
  __shared__ int done[BM], ndone, pos[32], slot[32];  // (k <= 32: the one-block routing path)
  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  __threadfence();
  if (tid == 0) ndone = 0;
  __syncthreads();
  const int rb = static_cast<int>(blockIdx.x);
  if (tid < rows_here) {
    const int t = f.token_of[pos0 + tid];
    if (atomicAdd(&f.arrivals[t * f.row_blocks + rb], 1) == f.k * p.splits - 1) done[atomicAdd(&ndone, 1)] = t;
  }
  __syncthreads();
  const int n = ndone;
  if (n == 0) return;
  __threadfence();
  const std::int64_t H = f.hidden, h0 = static_cast<std::int64_t>(rb) * 64;
  const float* y2 = static_cast<const float*>(p.out);
  for (int d = 0; d < n; ++d) {
    const std::int64_t t = done[d];
    if (tid < f.k) pos[tid] = f.pos_of[t * f.k + tid], slot[tid] = f.topk_expert[t * f.k + tid];
    __syncthreads();
#pragma unroll 4
    for (int i = tid; i < f.k * 64; i += nthreads) {
      const int j = i / 64;
      const std::int64_t h = h0 + i % 64;
      if (h >= H) continue;
      float y = f.bias ? f.bias[slot[j] * f.bias_stride + h] : 0.f;
      for (int s = 0; s < p.splits; ++s) y += __ldcg(y2 + s * p.split_stride + pos[j] * H + h);
      ys[i] = y;
    }
    __syncthreads();
    if (tid < 64 && h0 + tid < H) {
      float acc = 0.f;
      for (int j = 0; j < f.k; ++j) acc = __fmaf_rn(f.topk_weight[t * f.k + j], ys[j * 64 + tid], acc);
      static_cast<T*>(f.out)[t * H + h0 + tid] = from_float<T>(acc);
    }
    __syncthreads();  // pos, slot and ys are rewritten for the next token
  }
}

// ZP: the weights carry zero points (a template parameter: the symmetric case,
// the common one, then spends no instruction on them).
template <class T, int BITS, int MT, int SK, bool ZP>
__global__ void __launch_bounds__(kThreads, 5) decode_kernel(const GemmProblem p) {
  using RG = Ring<BITS, SK, MT>;
  using XT = XTile<MT>;
  constexpr int SC = RG::SC, STEPS = RG::STEPS, R = RG::R, W = RG::W;
  constexpr int SPC = XT::KC / SC;  // slabs per chunk
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);

  // FC1 reads the plan and the tokens the kernels before it write: it waits
  // for them first. FC2's plan and weights were ready before FC1 started, so
  // FC2 fills its weight ring while FC1 finishes and waits only before it
  // reads FC1's outputs (pdl_wait below). A self-routed FC1 (one token,
  // GemmProblem::route_logits) needs nothing of the routing kernel beside it
  // and waits for it halfway through K (wait_at below), before it lets FC2,
  // which reads the plan, start.
  const bool self_routed = MT == 1 && p.fc1 && p.route_logits != nullptr;
  TileWork tw;
  if (self_routed) {
    if (!self_routed_tile(p, reinterpret_cast<unsigned*>(smem_raw), tw)) return;
  } else {
    if (p.fc1) pdl_wait(), pdl_launch_dependents();
    if (!tile_work(p, XT::BM, tw)) return;
  }
  const int e = tw.e, pos0 = tw.pos0, rows_here = tw.rows_here;
  const std::int64_t k_begin = tw.k_begin, k_end = tw.k_end;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, c = lane % 4;
  const std::int64_t tile = static_cast<std::int64_t>(blockIdx.x) * kWarps + warp;
  const int ns = static_cast<int>((k_end - k_begin) / SC);  // k ranges are whole 64-column groups

  const std::int64_t nb = p.g.blocks();
  const int bshift = p.g.block_size ? __ffsll(p.g.block_size) - 1 : 0;  // block_size is a power of two
  const int bmask = p.g.block_size ? static_cast<int>(p.g.block_size) - 1 : 0;
  const uint4* wsrc = reinterpret_cast<const uint4*>(p.codes + e * p.g.code_bytes_per_expert()) +
                      (tile * p.g.slabs() + k_begin / SC) * 32 + lane;
  const unsigned* relsrc = p.rel_scales ? reinterpret_cast<const unsigned*>(p.rel_scales) +
                                              e * p.g.rel_scale_words_per_expert() + tile * nb * 8 + g
                                        : nullptr;
  // Zero points are pairs of bytes (rows g, g + 8) per lane: copied as the
  // aligned 32-bit word that holds the pair, the half picked on use.
  const unsigned short* zpsrc = ZP ? reinterpret_cast<const unsigned short*>(p.zero_points) +
                                         e * p.g.zp_pairs_per_expert() + tile * nb * 8 + (g & ~1)
                                   : nullptr;
  const int zshift = (g & 1) * 16;
  const int kb = static_cast<int>(k_begin);  // K < 2^30 (CudaMoe refuses larger shapes)
  unsigned char* ring = smem_raw + XT::kBytes + warp * R * RG::kStageBytes;

  // Slab i of this block's K range into stage i % R (an empty group past the
  // end keeps the count of committed groups uniform for cp.async.wait_group).
  // Addresses are 32-bit offsets from per-lane bases: the loop must stay a few
  // instructions around its tensor-core work.
  constexpr bool has_rel = SK != 0, has_zp = ZP;  // block-wise weights always carry relative scales
  const unsigned ring_s = static_cast<unsigned>(__cvta_generic_to_shared(ring)) + lane * 16;
  auto issue = [&](int i) {
    if (i < ns) {
      const unsigned st = ring_s + (i & (R - 1)) * RG::kStageBytes;
      ring_copy16(st, wsrc + i * 32);
      if constexpr (W > 0) {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const int k = kb + i * SC + 16 * j;
          if ((k & bmask) != 0 && i != 0) continue;  // read only where a block starts (step below)
          const int at = (k >> bshift) * 8;
          // (st - lane * 12: this lane's word slot, lane * 4 past the stage's scale area)
          if (has_rel) ring_copy4(st - lane * 12 + RG::kCodeBytes + j * 128, relsrc + at);
          if (has_zp) ring_copy4(st - lane * 12 + RG::kCodeBytes + (W + j) * 128, zpsrc + at);
        }
      }
    }
    ring_commit();
  };

  // Token chunks: vector v of the chunk is (row v / VPR, columns 8 (v % VPR)..+8).
  const T* x = static_cast<const T*>(p.x);
  const std::int64_t cols = p.g.cols;
  uint4 xv[XT::NV];
  auto load_x = [&](std::int64_t k0) {
#pragma unroll
    for (int u = 0; u < XT::NV; ++u) {
      const int v = static_cast<int>(threadIdx.x) + u * kThreads, m = v / XT::VPR, col = v % XT::VPR * 8;
      xv[u] = make_uint4(0, 0, 0, 0);
      if (m >= rows_here) continue;  // rows past the tile's tokens reach only columns never stored
      const std::int64_t kk = k0 + col;
      const T* row = x + static_cast<std::int64_t>(p.gather ? p.gather[pos0 + m] : pos0 + m) * p.x_stride;
      if (p.x_vec16 && kk + 8 <= cols) {
        xv[u] = __ldg(reinterpret_cast<const uint4*>(row + kk));
      } else {  // the ragged end of K, or rows not 16-byte aligned: element by element, zeros past K
        T t[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) t[q] = kk + q < cols ? row[kk + q] : from_float<T>(0.f);
        __builtin_memcpy(&xv[u], t, 16);
      }
    }
  };
  auto store_x = [&](int buf) {
#pragma unroll
    for (int u = 0; u < XT::NV; ++u) {
      const int v = static_cast<int>(threadIdx.x) + u * kThreads, m = v / XT::VPR, col = v % XT::VPR * 8;
      *reinterpret_cast<uint4*>(xs + (buf * XT::BM + m) * XT::LDS + col) = xv[u];
    }
  };

  float acc[MT][4] = {};
  constexpr bool block_acc = SK != 0;  // block scales on float32 per-block accumulators (gemm.cu)
  float blk[block_acc ? MT : 1][4] = {};
  float bscale[2] = {1.f, 1.f};
  BlockConsts<T, BITS> bc;
  if constexpr (SK == 0) {  // row-wise: one set of constants for the whole row tile
    const unsigned zw = ZP ? (__ldg(reinterpret_cast<const unsigned*>(zpsrc)) >> zshift) & 0xffffu : 0u;
    bc.set(zw, ZP, 0u, false);
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

  // Slab i (local slab sl of the chunk in buffer xb).
  auto step = [&](int i, const T* xb, int sl) {
    issue(i + R - 1);
    ring_wait<R - 1>();  // groups 0..i have landed (this lane's copies)
    const unsigned char* st = ring + (i & (R - 1)) * RG::kStageBytes;
    const uint4 v = *reinterpret_cast<const uint4*>(st + lane * 16);
    const int kabs = kb + i * SC;
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
      if constexpr (SK != 0) {
        if (j == 0 || SK == 2) {
          if (((kabs + 16 * j) & bmask) == 0 || first) {
            if (!first) flush();
            const int w = SK == 2 ? j : 0;
            const unsigned rw =
                has_rel ? *reinterpret_cast<const unsigned*>(st + RG::kCodeBytes + (w * 32 + lane) * 4) : 0u;
            const unsigned zw =
                has_zp
                    ? (*reinterpret_cast<const unsigned*>(st + RG::kCodeBytes + ((W + w) * 32 + lane) * 4) >> zshift) &
                          0xffffu
                    : 0u;
            bc.set(zw, has_zp, rw, false);
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
        const T* xr = xb + (m * 8 + g) * XT::LDS + sl * SC + 16 * j + 2 * c;
        const unsigned b0 = *reinterpret_cast<const unsigned*>(xr), b1 = *reinterpret_cast<const unsigned*>(xr + 8);
        if constexpr (block_acc)
          mma16816<T>(blk[m], a, b0, b1);
        else
          mma16816<T>(acc[m], a, b0, b1);
      }
    }
  };

#pragma unroll
  for (int i = 0; i < R - 1; ++i) issue(i);
  if (!p.fc1) pdl_wait(), pdl_launch_dependents();
  load_x(k_begin);
  store_x(0);
  __syncthreads();
  const int nchunks = (ns + SPC - 1) / SPC;
  const int wait_at = self_routed ? nchunks / 2 : -1;
  for (int ch = 0; ch < nchunks; ++ch) {
    if (ch == wait_at) pdl_wait(), pdl_launch_dependents();
    if (ch + 1 < nchunks) load_x(k_begin + static_cast<std::int64_t>(ch + 1) * XT::KC);
    const T* xb = xs + (ch & 1) * XT::BM * XT::LDS;
    const int i0 = ch * SPC, n = min(SPC, ns - i0);
    for (int sl = 0; sl < n; ++sl) step(i0 + sl, xb, sl);
    if (ch + 1 < nchunks) {
      store_x((ch + 1) & 1);  // that buffer's chunk (ch - 1) was done before this chunk's barrier
      __syncthreads();
    }
  }
  ring_wait<0>();                                               // no copy may outlive the block
  if (wait_at >= nchunks) pdl_wait(), pdl_launch_dependents();  // (no chunk: never, K > 0)
  flush();
  store_tile<T, MT>(p, &acc[0][0], e, tile, pos0, rows_here, g, c);
  if (!p.fc1 && p.combine.out) combine_when_last<T, XT::BM>(p, pos0, rows_here, reinterpret_cast<float*>(smem_raw));
}

static_assert(4 * kSelfRouteMaxExperts <= XTile<1>::kBytes, "a self-routed FC1's keys fit the token buffer");
static_assert(4 * 32 * 64 <= XTile<1>::kBytes, "a fused combine's k <= 32 columns of 64 fit the token buffer");

template <class T, int BITS, int MT, int SK, bool ZP>
void launch_one(const GemmProblem& p, std::int64_t tile_capacity, cudaStream_t stream) {
  const int smem = XTile<MT>::kBytes + Ring<BITS, SK, MT>::kSmemBytes;
  opt_in_smem<decode_kernel<T, BITS, MT, SK, ZP>>(smem);
  static_assert(XTile<MT>::BM == decode_geometry(MT).tile_tokens && 16 * kWarps == decode_geometry(MT).block_rows,
                "gemm.h's decode_geometry is this kernel's block");
  const dim3 grid(static_cast<unsigned>(p.g.padded_rows / decode_geometry(MT).block_rows),
                  static_cast<unsigned>(tile_capacity), static_cast<unsigned>(p.fc1 ? 1 : p.splits));
  launch_kernel(decode_kernel<T, BITS, MT, SK, ZP>, grid, dim3(kThreads), smem, stream, p.pdl, p);
}

}  // namespace

void launch_gemm_decode(const GemmProblem& p, DType dtype, int mt, std::int64_t tile_capacity, cudaStream_t stream) {
  if (tile_capacity <= 0) return;
  const bool zp = p.zero_points != nullptr;
  dispatch_mma(p, dtype, [&](auto t, auto bits, auto sk) {
    using T = typename decltype(t)::type;
    constexpr int B = decltype(bits)::value, SK = decltype(sk)::value;
    if (mt == 1)
      return zp ? launch_one<T, B, 1, SK, true>(p, tile_capacity, stream)
                : launch_one<T, B, 1, SK, false>(p, tile_capacity, stream);
    return zp ? launch_one<T, B, 2, SK, true>(p, tile_capacity, stream)
              : launch_one<T, B, 2, SK, false>(p, tile_capacity, stream);
  });
}

}  // namespace qmoe::cuda
