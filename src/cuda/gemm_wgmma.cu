// The prefill grouped GEMM for Hopper (sm_90a): out^T = W x^T per (expert,
// m-tile of 128 tokens) and row block, on wgmma.mma_async m64n128k16 with the
// A operand (weights) in registers and B (tokens) in shared memory. Same
// GemmProblem contract and epilogues as gemm_kernel (gemm.cu).
//
// Why this shape. Weights are 0.5 (int4) or 1 (int8) byte per element and
// tokens 2, so a block covers many weight rows: 256 rows (two warpgroups, each
// two m64 tiles: 2 x 64 float accumulators per thread) x 128 tokens (the wgmma
// N). A token byte brought into shared memory then feeds 256 rows and a weight
// byte 128 tokens. One block per SM: the two consumer warpgroups (dequantize,
// wgmma, epilogue; 208 registers each thread) and one producer warpgroup that
// only issues the cp.async copies (88 registers), split by setmaxnreg. Taking
// the copies' address arithmetic off the consumers cut their stage loop from
// ~400 to ~225 instructions per warp (mixtral T = 4096: 7.40 -> 6.70 ms).
//
// Why the A operand comes from registers. wgmma's register A fragment of warp
// w (rows 16w..16w+15 of the m64 tile) is the mma.m16n8k16 A fragment, which is
// what layout.h stores per 16-row tile: a warp's 16-byte lane read of a slab
// gives, after dequant() (mma_common.cuh, unchanged: relative scales are
// multiplied into A per k16 step), the A registers of 4 (int4) or 2 (int8) k16
// steps. The dequantization of step s+1 runs while the wgmmas of step s run
// (two A register sets; wgmma.wait_group 1 before overwriting one).
//
// Pipeline. K advances in stages of 64 columns (one 128-byte row of tokens per
// token = one 128B swizzle atom row): tokens (gathered rows, 16 KB), the codes
// of the block's 16 row tiles (8 or 16 KB) and their scale-block words are
// copied global -> shared with cp.async, kStages deep, so every load is in
// flight kStages - 2 stages ahead; one 384-thread named barrier per stage. Tokens are
// stored in the canonical K-major 128B-swizzle layout of the wgmma matrix
// descriptor: token n, 16-byte chunk q at n * 128 + ((q ^ (n % 8)) * 16) in a
// 1024-byte aligned 16 KB tile (8-row groups 1024 bytes apart = SBO).
//
// Grid. 1-D, tile fastest: block b -> (group of 8 m-tiles, row block, tile in
// group) = (b / 8 / row_blocks, b / 8 % row_blocks, b % 8), K split = z (FC2).
// Blocks running together share one group's tokens and each weight row block
// is read from DRAM once per group of 8 m-tiles (8 blocks read it together).
//
// Token tiles of 64 (N = 64: m64n64k16, 64 accumulators per thread) serve 17-32
// tokens per expert: the weights are dequantized once per m-tile either way, the
// tensor work halves. That variant needs fewer registers than the block's
// allocation and skips the setmaxnreg split.
//
// Determinism: an output value depends only on its own token's column; the K
// order is fixed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/gemm_wgmma.h"
#include "cuda/mma_common.cuh"

// The kernel body exists only in the sm_90a device pass (wgmma is an
// architecture-specific feature); elsewhere the kernel is an empty stub and
// wgmma_available() says so.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QMOE_WGMMA_BODY 1
#else
#define QMOE_WGMMA_BODY 0
#endif

namespace qmoe::cuda {

namespace {

constexpr int kConsumers = 256;  // two warpgroups: dequantize + wgmma + epilogue
constexpr int kProducers = 128;  // one warpgroup: the cp.async copies
constexpr int kThreads = kConsumers + kProducers;
// setmaxnreg split. The block starts with kLaunchRegs per thread (the
// __launch_bounds__ cap, which the kernel reaches); setmaxnreg.inc draws only
// on what this block's own .dec released, so the consumers' increase must fit
// in the producers' decrease, or the consumers wait forever.
constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;  // 168
constexpr int kProducerRegs = 88, kConsumerRegs = 208;
static_assert(kConsumers * (kConsumerRegs - kLaunchRegs) <= kProducers * (kLaunchRegs - kProducerRegs),
              "the consumers' setmaxnreg.inc must fit in what the producers release");
constexpr int kRows = kWgmmaGeometry.block_rows;  // weight rows per block
constexpr int kTiles = kRows / kTileRows;         // 16-row tiles of layout.h per block
constexpr int kGroup = 8;                         // m-tiles per L2 group (grid order)
constexpr int kMaxScaleBlocks = 4;                // scale blocks per stage (block size 16)
static_assert(kRows == 256 && wgmma_geometry(64).block_rows == kRows, "the kernel is written for 256 rows");

// N: token columns per block (the wgmma N), 64 or 128. A8: int8 tokens (act8.h).
template <int BITS, int N, bool A8>
struct WShape {
  static constexpr int kKC = A8 ? kAct8Block : 64;            // K columns per stage: 128 bytes per token
  static constexpr int kSlabs = kKC / (BITS == 4 ? 64 : 32);  // layout.h slabs per stage
  static constexpr int kStages = BITS == 4 ? 6 : 5;
  static constexpr int kXBytes = N * 128;                          // tokens, 128B-swizzled
  static constexpr int kWBytes = kTiles * kSlabs * 512;            // codes, [tile][slab][lane][16 B]
  static constexpr int kRelBytes = kTiles * kMaxScaleBlocks * 32;  // [tile][block][g] u32
  static constexpr int kZpBytes = kTiles * kMaxScaleBlocks * 16;   // [tile][block][g] u8 pair
  static constexpr int kMetaBytes = A8 ? N * 8 : 0;                // [token] Act8Meta of the stage's block
  static constexpr int kStageBytes = kXBytes + kWBytes + kRelBytes + kZpBytes + kMetaBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + room to align to 1024
  static_assert(kKC * (A8 ? 1 : 2) == 128, "a stage is one 128-byte swizzle row per token");
  static_assert(kXBytes % 1024 == 0, "token stages must stay 1024-byte aligned (128B swizzle atoms)");
  static_assert(kSmemBytes <= 227 * 1024, "over the sm_90 shared memory per block");
};

#if QMOE_WGMMA_BODY

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// cp.async writes shared memory through the generic proxy, wgmma reads it
// through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Keeps the compiler from moving accesses of an accumulator across this point
// (the wgmma asm statements "write" them at issue; they are final only after
// wgmma.wait_group).
__device__ __forceinline__ void touch(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Register reallocation between the warpgroups (per warp, all its threads).
template <int N>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}
// Named barriers (0 is __syncthreads, unused here): the per-stage barrier of
// all threads, and one among the producers.
enum Barrier : int { kStageBarrier = 1, kProducerBarrier = 2 };
template <int ID, int COUNT>
__device__ __forceinline__ void bar_sync() {
  asm volatile("bar.sync %0, %1;" ::"n"(ID), "n"(COUNT) : "memory");
}
__device__ __forceinline__ void stage_barrier() { bar_sync<kStageBarrier, kThreads>(); }

// Matrix descriptor of a K-major, 128B-swizzled B tile at shared address
// `saddr` (1024-byte aligned, so the base offset is 0): start address >> 4 in
// bits 0-13, leading byte offset unused for swizzled K-major layouts (1),
// stride byte offset 1024 >> 4 (8 rows of 128 bytes) in bits 32-45, swizzle
// mode 1 (128B) in bits 62-63.
__device__ __forceinline__ std::uint64_t b_desc(unsigned saddr) {
  return static_cast<std::uint64_t>((saddr & 0x3FFFFu) >> 4) | (std::uint64_t{1} << 16) |
         (std::uint64_t{1024 >> 4} << 32) | (std::uint64_t{1} << 62);
}

#define QMOE_D8(b)                                                                                            \
  "+f"(d[(b) + 0]), "+f"(d[(b) + 1]), "+f"(d[(b) + 2]), "+f"(d[(b) + 3]), "+f"(d[(b) + 4]), "+f"(d[(b) + 5]), \
      "+f"(d[(b) + 6]), "+f"(d[(b) + 7])
#define QMOE_WGMMA_M64N128K16_RS(TY)                                                                              \
  asm volatile(                                                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                                \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY                                                    \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "    \
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, " \
      "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}," \
      " {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                                              \
      : QMOE_D8(0), QMOE_D8(8), QMOE_D8(16), QMOE_D8(24), QMOE_D8(32), QMOE_D8(40), QMOE_D8(48), QMOE_D8(56)      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
#define QMOE_WGMMA_M64N64K16_RS(TY)                                                                            \
  asm volatile(                                                                                                \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                             \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY                                                  \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31},"                                                     \
      " {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                                           \
      : QMOE_D8(0), QMOE_D8(8), QMOE_D8(16), QMOE_D8(24)                                                       \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))

// D[64 x N] += A[64 x 16] (registers, mma.m16n8k16 A fragment per warp) x
// B[16 x N] (shared memory, descriptor), N = 64 or 128. Thread (warp w, g, c) holds
// d[4i + t] = D[16w + g][8i + 2c + t], d[4i + 2 + t] = D[16w + g + 8][8i + 2c + t].
template <class T, int N>
__device__ __forceinline__ void wgmma_m64(float (&d)[N / 2], const unsigned (&a)[4], std::uint64_t desc) {
  static_assert(N == 64 || N == 128);
  if constexpr (N == 128) {
    if constexpr (std::is_same_v<T, __half>) {
      QMOE_WGMMA_M64N128K16_RS("f16");
    } else {
      QMOE_WGMMA_M64N128K16_RS("bf16");
    }
  } else {
    if constexpr (std::is_same_v<T, __half>) {
      QMOE_WGMMA_M64N64K16_RS("f16");
    } else {
      QMOE_WGMMA_M64N64K16_RS("bf16");
    }
  }
}
#undef QMOE_WGMMA_M64N128K16_RS
#undef QMOE_WGMMA_M64N64K16_RS
#undef QMOE_D8

#define QMOE_I8(b)                                                                                            \
  "+r"(d[(b) + 0]), "+r"(d[(b) + 1]), "+r"(d[(b) + 2]), "+r"(d[(b) + 3]), "+r"(d[(b) + 4]), "+r"(d[(b) + 5]), \
      "+r"(d[(b) + 6]), "+r"(d[(b) + 7])
// D[64 x 64] (int32) = (accumulate ? D : 0) + A[64 x 32] x B[32 x 64]: A = unsigned
// weight codes in registers (per warp the mma.m16n8k32 A fragment: lane (g, c) holds
// rows g (a0, a2) and g + 8 (a1, a3), columns 4c..4c+3 (a0, a1) and 16 + 4c.. (a2, a3)),
// B = int8 tokens in shared memory (descriptor). D in wgmma_m64's layout.
__device__ __forceinline__ void wgmma_m64n64_u8s8(int (&d)[32], const unsigned (&a)[4], std::uint64_t desc,
                                                  int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.u8.s8"
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31},"
      " {%32, %33, %34, %35}, %36, p;\n}\n"
      : QMOE_I8(0), QMOE_I8(8), QMOE_I8(16), QMOE_I8(24)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}
#undef QMOE_I8
__device__ __forceinline__ void touch(int& r) { asm volatile("" : "+r"(r)::"memory"); }

// The A fragment of k32 step t (0..3) of a 128-column stage from the lane's codes of
// that stage in shared memory (`w`: its kSlabs 16-byte slab reads): at 4 bits slab t / 2
// words 2(t % 2) and 2(t % 2) + 1, at 8 bits slab t (act8.h act8_a_fragment).
template <int BITS>
__device__ __forceinline__ void codes_u8(const unsigned char* w, int lane, int t, unsigned (&a)[4]) {
  unsigned v[4];
  if constexpr (BITS == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(w + ((t >> 1) * 32 + lane) * 16 + (t & 1) * 8);
    v[0] = u.x, v[1] = u.y, v[2] = v[3] = 0;
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(w + (t * 32 + lane) * 16);
    v[0] = u.x, v[1] = u.y, v[2] = u.z, v[3] = u.w;
  }
  act8_a_fragment<BITS>(v, a);
}

__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(s), "l"(gmem));
}

#endif  // QMOE_WGMMA_BODY

// A8: the tokens are int8 codes of act8.h (p.act_meta), the weights enter as their raw
// unsigned codes, and each 128-column stage's int32 sums are turned into float32 per
// (row, token): (sum - z * code sum) * relative scale * token scale.
template <class T, int BITS, int N, bool A8>
__global__ void __launch_bounds__(kThreads, 1) gemm_wgmma_kernel(const GemmProblem p, int row_blocks) {
#if QMOE_WGMMA_BODY
  constexpr int kTok = N;
  // The 64-token bfloat16 variant fits the launch allocation; A8 holds int32 sums beside the float32 ones.
  constexpr bool kSplitRegs = N == 128 || A8;
  using S = WShape<BITS, N, A8>;
  using XT = std::conditional_t<A8, std::int8_t, T>;  // the token rows' element
  constexpr int SC = BITS == 4 ? 64 : 32;             // columns per slab
  constexpr int kKC = S::kKC;
  constexpr int kKCShift = A8 ? 7 : 6;
  static_assert(1 << kKCShift == kKC);
  constexpr int kStages = S::kStages;
  // Element offset of each token's row in x; -1 past the tile's tokens. (Its
  // static size also tells the host that this body was compiled.)
  __shared__ long long s_row[kTok];
  // A8: the token's first Act8Meta in p.act_meta.
  __shared__ long long s_meta[A8 ? kTok : 1];
  extern __shared__ unsigned char smem_raw[];

  pdl_wait(), pdl_launch_dependents();  // the plan and the tokens come from the kernels before (common.cuh)
  const unsigned bx = blockIdx.x;
  const unsigned rest = bx / kGroup;
  const int rb = static_cast<int>(rest % static_cast<unsigned>(row_blocks));
  const int tile = static_cast<int>(rest / static_cast<unsigned>(row_blocks)) * kGroup + static_cast<int>(bx % kGroup);
  if (tile >= *p.num_tiles) return;
  const MTile mt = p.tiles[tile];
  if (mt.expert < p.slot_begin || mt.expert >= p.slot_end) return;
  const int e = mt.expert;
  const int pos0 = p.offsets[e] + mt.m0;
  const int rows_here = min(kTok, p.offsets[e + 1] - pos0);

  const int tid = static_cast<int>(threadIdx.x);
  const int wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32;

  // Shared memory: [stage] tokens | [stage] codes | [stage] rel words | [stage] zp pairs | [stage] meta.
  const unsigned raw_s = static_cast<unsigned>(__cvta_generic_to_shared(smem_raw));
  const unsigned base_s = (raw_s + 1023u) & ~1023u;
  unsigned char* const base = smem_raw + (base_s - raw_s);
  unsigned char* const xs0 = base;
  unsigned char* const ws0 = xs0 + kStages * S::kXBytes;
  unsigned char* const rs0 = ws0 + kStages * S::kWBytes;
  unsigned char* const zs0 = rs0 + kStages * S::kRelBytes;
  unsigned char* const ms0 = zs0 + kStages * S::kZpBytes;

  std::int64_t k_begin, k_end;
  split_k_range(p, k_begin, k_end);
  // A8: K ranges start on a 128-column block (fc2_k_split) and a last stage past the
  // 64-aligned end reads zero tokens (the rows hold round_up(K, 128) codes) and zero codes.
  const int nchunks = k_end > k_begin ? static_cast<int>((k_end - k_begin + kKC - 1) >> kKCShift) : 0;

  // Row tiles of this block; when the matrix ends after the first 128 rows,
  // the second warpgroup re-reads the first half (valid memory) and stores nothing.
  const std::int64_t tiles_total = p.g.tiles();
  const std::int64_t rt0 = static_cast<std::int64_t>(rb) * kTiles;
  const bool full = rt0 + kTiles <= tiles_total;
  auto tile_of = [&](int tl) { return rt0 + (full ? tl : (tl & 7)); };

  const unsigned char* const zp = p.zero_points ? p.zero_points + e * p.g.zp_pairs_per_expert() * 2 : nullptr;
  const unsigned char* const rel =
      p.rel_scales ? reinterpret_cast<const unsigned char*>(p.rel_scales) + e * p.g.rel_scale_words_per_expert() * 4
                   : nullptr;
  const int bs = p.g.block_size;
  const std::int64_t nb = p.g.blocks();
  const int bshift = bs ? __ffs(bs) - 1 : 0;  // block_size is a power of two

  if (wg == 2) {
    // ---- Producer warpgroup: the copies of stage ch + kStages - 2 while the
    // consumers compute stage ch; one stage_barrier() per stage.
    if constexpr (kSplitRegs) regs_dec<kProducerRegs>();
    const int ptid = tid - kConsumers;
    if (ptid < kTok) {
      long long off = -1;
      if (ptid < rows_here) {
        const long long row = p.gather ? p.gather[pos0 + ptid] : pos0 + ptid;
        off = row * p.x_stride;
        if constexpr (A8) s_meta[ptid] = row * p.meta_stride;
      }
      s_row[ptid] = off;
    }
    bar_sync<kProducerBarrier, kProducers>();  // s_row, among the producers

    const std::int64_t slabs_total = p.g.slabs();
    const unsigned char* const codes = p.codes + e * p.g.code_bytes_per_expert();
    // Scale blocks per stage: 1 for blocks of a stage or more, else kKC / bs.
    const int nbc_shift = bs && bs < kKC ? kKCShift - bshift : 0;
    const XT* const x = static_cast<const XT*>(p.x);
    // A8 rows hold whole 128-column blocks (zeros past K).
    const std::int64_t kvalid = A8 ? std::int64_t{1} << 62 : p.g.cols;

    // Stage `cc` of the K loop -> shared memory stage cc % kStages, as one cp.async group.
    auto issue = [&](int cc) {
      if (cc < nchunks) {
        const int st = cc % kStages;
        const std::int64_t k0 = k_begin + static_cast<std::int64_t>(cc) * kKC;
        unsigned char* const xs = xs0 + st * S::kXBytes;
        if (A8 || p.x_vec16) {
          // Thread -> 16-byte chunk q = ptid % 8 of tokens ptid / 8 + 16 i (same n % 8).
          const int q = ptid & 7, n0 = ptid >> 3;
          const int swz = (q ^ (n0 & 7)) << 4;
          const std::int64_t kk = k0 + (16 / static_cast<int>(sizeof(XT))) * q;
          const bool in = kk < kvalid;
#pragma unroll
          for (int i = 0; i < kTok / 16; ++i) {
            const int n = n0 + 16 * i;
            const long long off = s_row[n];
            if (off < 0) continue;
            cp_async16(xs + n * 128 + swz, x + off + (in ? kk : 0), in ? 16 : 0);
          }
        } else if constexpr (!A8) {
          for (int v = ptid; v < kTok * kKC; v += kProducers) {
            const int n = v / kKC, kc = v % kKC;
            const long long off = s_row[n];
            if (off < 0) continue;
            const std::int64_t kk = k0 + kc;
            const T val = kk < kvalid ? x[off + kk] : from_float<T>(0.f);
            *reinterpret_cast<T*>(xs + n * 128 + ((((kc >> 3) ^ (n & 7)) << 4) | ((kc & 7) * 2))) = val;
          }
        }
        // Codes: per row tile, kSlabs slabs of 512 bytes, contiguous in global memory
        // (A8: zeros for the slabs of a last stage past the padded K).
        unsigned char* const ws = ws0 + st * S::kWBytes;
        const std::int64_t slab0 = k0 / SC;
#pragma unroll 8
        for (int i = 0; i < kTiles * S::kSlabs * 32 / kProducers; ++i) {
          const int v = ptid + kProducers * i;
          const int tl = v / (S::kSlabs * 32), within = v % (S::kSlabs * 32);
          const bool in = !A8 || slab0 + within / 32 < slabs_total;
          cp_async16(ws + v * 16, codes + ((tile_of(tl) * slabs_total + (in ? slab0 : 0)) * 32 + within) * 16,
                     in ? 16 : 0);
        }
        if constexpr (A8) {  // each token's scale and code sum of this block
          if (ptid < kTok && s_row[ptid] >= 0)
            cp_async8(ms0 + st * S::kMetaBytes + ptid * 8, p.act_meta + s_meta[ptid] + (k0 >> kKCShift));
        }
        if (bs) {
          // Scale-block words of the stage's blocks (consecutive blocks of a tile are contiguous).
          const std::int64_t blk0 = k0 >> bshift;
          const int nbc = 1 << nbc_shift;
          if (rel && ptid < kTiles * 2 * nbc) {  // relative scales: 32 bytes per (tile, block)
            const int tl = ptid >> (1 + nbc_shift), w = ptid & (2 * nbc - 1);
            cp_async16(rs0 + st * S::kRelBytes + tl * (kMaxScaleBlocks * 32) + w * 16,
                       rel + ((tile_of(tl) * nb + blk0) * 8) * 4 + w * 16, 16);
          }
          if (zp && ptid < kTiles * nbc) {  // zero points: 16 bytes per (tile, block)
            const int tl = ptid >> nbc_shift, bl = ptid & (nbc - 1);
            cp_async16(zs0 + st * S::kZpBytes + (tl * kMaxScaleBlocks + bl) * 16,
                       zp + ((tile_of(tl) * nb + blk0 + bl) * 8) * 2, 16);
          }
        }
      }
      cp_async_commit();
    };

#pragma unroll 1
    for (int cc = 0; cc < kStages - 2; ++cc) issue(cc);
#pragma unroll 1
    for (int ch = 0; ch < nchunks; ++ch) {
      cp_async_wait<kStages - 3>();  // this thread's copies of stage ch have landed
      fence_proxy_async();           // cp.async wrote through the generic proxy, wgmma reads through the async one
      stage_barrier();               // everyone's copies of stage ch landed; stage ch - 2 is no longer read
      issue(ch + kStages - 2);
    }
    cp_async_wait<0>();
    return;
  }

  // ---- Consumer warpgroups 0 and 1.
  if constexpr (kSplitRegs) regs_inc<kConsumerRegs>();
  const int g = lane / 4, c = lane % 4;
  if constexpr (A8) {
    // Scale blocks are whole stages or more (the host picks A8 only then): one zero
    // point and relative scale per row and stage, 8 / 128 and 1 when not stored.
    int tl_a[2];
#pragma unroll
    for (int m = 0; m < 2; ++m) tl_a[m] = wg * 8 + m * 4 + warp;
    float acc[2][kTok / 2];
    int isum[2][kTok / 2];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int i = 0; i < kTok / 2; ++i) acc[m][i] = 0.f, isum[m][i] = 0;
    const int z_default = BITS == 4 ? 8 : 128;
    int zr[2][2];
    float rs[2][2];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      zr[m][0] = zr[m][1] = z_default, rs[m][0] = rs[m][1] = 1.f;
      if (!bs && zp) {
        const unsigned zw = reinterpret_cast<const unsigned short*>(zp)[tile_of(tl_a[m]) * nb * 8 + g];
        zr[m][0] = static_cast<int>(zw & 0xff), zr[m][1] = static_cast<int>(zw >> 8);
      }
    }
    unsigned afr[2][2][4];  // [step parity][m64 tile][register]
    int st = 0;
#pragma unroll 1
    for (int ch = 0; ch < nchunks; ++ch) {
      stage_barrier();  // stage ch is in shared memory
      const unsigned char* const ws = ws0 + st * S::kWBytes;
      const std::uint64_t desc = b_desc(base_s + st * S::kXBytes);
      if (bs) {
        const unsigned* const rsw = reinterpret_cast<const unsigned*>(rs0 + st * S::kRelBytes);
        const unsigned short* const zsw = reinterpret_cast<const unsigned short*>(zs0 + st * S::kZpBytes);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const int at = tl_a[m] * kMaxScaleBlocks * 8 + g;
          if (rel) {
            const unsigned rw = rsw[at];
            rs[m][0] = __half2float(__ushort_as_half(static_cast<unsigned short>(rw & 0xffff)));
            rs[m][1] = __half2float(__ushort_as_half(static_cast<unsigned short>(rw >> 16)));
          }
          if (zp) zr[m][0] = static_cast<int>(zsw[at] & 0xff), zr[m][1] = static_cast<int>(zsw[at] >> 8);
        }
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) {  // k32 steps of the stage
        wgmma_wait<1>();             // the wgmmas of step t - 2 (the last readers of afr[t & 1]) are done
#pragma unroll
        for (int m = 0; m < 2; ++m) codes_u8<BITS>(ws + tl_a[m] * S::kSlabs * 512, lane, t, afr[t & 1][m]);
        wgmma_fence();
        // +32 bytes (2 in descriptor units) per k32 step inside the 128-byte swizzled rows.
        wgmma_m64n64_u8s8(isum[0], afr[t & 1][0], desc + 2 * t, t);
        wgmma_m64n64_u8s8(isum[1], afr[t & 1][1], desc + 2 * t, t);
        wgmma_commit();
      }
      wgmma_wait<0>();
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int i = 0; i < kTok / 2; ++i) touch(isum[m][i]);
      // The stage's sums into float32: token column 8i + 2c + u of n8 block i.
      const Act8Meta* const ms = reinterpret_cast<const Act8Meta*>(ms0 + st * S::kMetaBytes);
#pragma unroll
      for (int i = 0; i < kTok / 8; ++i) {
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const Act8Meta am = ms[8 * i + 2 * c + u];
#pragma unroll
          for (int m = 0; m < 2; ++m) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // rows g and g + 8
              const int at = 4 * i + 2 * h + u;
              acc[m][at] = fmaf(static_cast<float>(isum[m][at] - zr[m][h] * am.sum), rs[m][h] * am.scale, acc[m][at]);
            }
          }
        }
      }
      st = st + 1 == kStages ? 0 : st + 1;
    }
    if (wg == 1 && !full) return;
#pragma unroll
    for (int m = 0; m < 2; ++m) store_tile<T, kTok / 8>(p, acc[m], e, rt0 + tl_a[m], pos0, rows_here, g, c);
    return;
  }
  const bool scaled = rel != nullptr;
  const bool per_step = bs && bs < kKC;  // scale block changes inside a stage

  // This thread's two m64 tiles: local row tiles wg * 8 + m * 4 + warp.
  int tl_of[2];
  BlockConsts<T, BITS> bc[2];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    tl_of[m] = wg * 8 + m * 4 + warp;
    // Row-wise weights: one set of constants for the whole K range.
    if (!bs) {
      const unsigned zw = zp ? reinterpret_cast<const unsigned short*>(zp)[tile_of(tl_of[m]) * nb * 8 + g] : 0u;
      bc[m].set(zw, zp != nullptr, 0u, false);
    }
  }

  float acc[2][kTok / 2];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int i = 0; i < kTok / 2; ++i) acc[m][i] = 0.f;

  unsigned afr[2][2][4];  // [step parity][m64 tile][register]: two A sets, used alternately
  int st = 0;
#pragma unroll 1
  for (int ch = 0; ch < nchunks; ++ch) {
    stage_barrier();  // stage ch is in shared memory (the producers' side of the same barrier)

    const unsigned char* const ws = ws0 + st * S::kWBytes;
    const unsigned* const rsw = reinterpret_cast<const unsigned*>(rs0 + st * S::kRelBytes);
    const unsigned short* const zsw = reinterpret_cast<const unsigned short*>(zs0 + st * S::kZpBytes);
    const std::uint64_t desc = b_desc(base_s + st * S::kXBytes);
    uint4 wv[2][S::kSlabs];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int sl = 0; sl < S::kSlabs; ++sl)
        wv[m][sl] = *reinterpret_cast<const uint4*>(ws + ((tl_of[m] * S::kSlabs + sl) * 32 + lane) * 16);

#pragma unroll
    for (int j = 0; j < 4; ++j) {  // k16 steps of the stage
      if (bs && (j == 0 || per_step)) {
        const int bl = per_step ? (16 * j) >> bshift : 0;
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const int at = (tl_of[m] * kMaxScaleBlocks + bl) * 8 + g;
          const unsigned rw = rel ? rsw[at] : 0u;
          const unsigned zw = zp ? zsw[at] : 0u;
          bc[m].set(zw, zp != nullptr, rw, scaled);
        }
      }
      wgmma_wait<1>();  // the wgmmas of step s - 2 (the last readers of afr[j & 1]) are done
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        if constexpr (BITS == 4) {
          dequant<T, BITS>(wv[m][0], j, bc[m], scaled, afr[j & 1][m]);
        } else {
          dequant<T, BITS>(wv[m][j >> 1], j & 1, bc[m], scaled, afr[j & 1][m]);
        }
      }
      wgmma_fence();  // A registers (and at the first step the zeroed accumulators) written
      // +32 bytes (2 in descriptor units) per k16 step inside the 128-byte swizzled rows.
      wgmma_m64<T, kTok>(acc[0], afr[j & 1][0], desc + 2 * j);
      wgmma_m64<T, kTok>(acc[1], afr[j & 1][1], desc + 2 * j);
      wgmma_commit();
    }
    st = st + 1 == kStages ? 0 : st + 1;
  }
  wgmma_wait<0>();
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int i = 0; i < kTok / 2; ++i) touch(acc[m][i]);

  // Epilogue: thread (warp, g, c) of m64 tile m holds rows g and g + 8 of row
  // tile rt0 + tl_of[m], token columns 8i + 2c + t (t = 0, 1) of each n8 block i.
  if (wg == 1 && !full) return;
#pragma unroll
  for (int m = 0; m < 2; ++m) store_tile<T, kTok / 8>(p, acc[m], e, rt0 + tl_of[m], pos0, rows_here, g, c);
#else
  (void)p;
  (void)row_blocks;
#endif
}

template <class T, int BITS, int N, bool A8>
void launch_one(const GemmProblem& p, std::int64_t tile_capacity, cudaStream_t stream) {
  using S = WShape<BITS, N, A8>;
  opt_in_smem<gemm_wgmma_kernel<T, BITS, N, A8>>(S::kSmemBytes);
  const std::int64_t row_blocks = ceil_div(p.g.padded_rows, kRows);
  const std::int64_t blocks = ceil_div(tile_capacity, kGroup) * row_blocks * kGroup;
  detail::require(blocks <= INT_MAX, "wgmma GEMM: grid of ", blocks, " blocks is too large");
  const int splits = p.fc1 ? 1 : p.splits;
  detail::require(splits >= 1 && splits <= 65535, "wgmma GEMM: bad split count ", splits);
  const dim3 grid(static_cast<unsigned>(blocks), 1, static_cast<unsigned>(splits));
  launch_kernel(gemm_wgmma_kernel<T, BITS, N, A8>, grid, dim3(kThreads), S::kSmemBytes, stream, p.pdl, p,
                static_cast<int>(row_blocks));
}

template <class T>
void launch_dtype(const GemmProblem& p, int tokens, std::int64_t cap, cudaStream_t s) {
  if (p.act_meta) {
    detail::require(act8_fits(p.g), "wgmma GEMM: int8 tokens need row-wise weights or blocks of at least ", kAct8Block,
                    " columns, got ", p.g.block_size);
    return p.g.bits == 4 ? launch_one<T, 4, 64, true>(p, cap, s) : launch_one<T, 8, 64, true>(p, cap, s);
  }
  if (tokens == 64)
    return p.g.bits == 4 ? launch_one<T, 4, 64, false>(p, cap, s) : launch_one<T, 8, 64, false>(p, cap, s);
  return p.g.bits == 4 ? launch_one<T, 4, 128, false>(p, cap, s) : launch_one<T, 8, 128, false>(p, cap, s);
}

}  // namespace

bool wgmma_available(int cc) {
  if (cc != 90) return false;
  // The sm_90a body declares static shared memory (s_row); the stub compiled
  // for any other target (an sm_80-only build JIT-compiled for this device,
  // or plain compute_90) declares none.
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, gemm_wgmma_kernel<__nv_bfloat16, 4, 128, false>) != cudaSuccess) {
    cudaGetLastError();  // clear
    return false;
  }
  // The register split assumes the kernel was allocated kLaunchRegs per
  // thread; with fewer the consumers' setmaxnreg.inc could never be granted.
  return a.sharedSizeBytes >= sizeof(long long) * 128 && a.numRegs == kLaunchRegs;
}

bool wgmma_act8_available(int cc) {
  if (!wgmma_available(cc)) return false;
  // Every A8 instantiation splits its registers too.
  for (auto kernel : {gemm_wgmma_kernel<__nv_bfloat16, 4, 64, true>, gemm_wgmma_kernel<__nv_bfloat16, 8, 64, true>,
                      gemm_wgmma_kernel<__half, 4, 64, true>, gemm_wgmma_kernel<__half, 8, 64, true>}) {
    cudaFuncAttributes a{};
    if (cudaFuncGetAttributes(&a, kernel) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    if (a.numRegs != kLaunchRegs) return false;
  }
  return true;
}

void launch_gemm_wgmma(const GemmProblem& p, DType dtype, int tokens, std::int64_t tile_capacity, cudaStream_t stream) {
  if (tile_capacity <= 0) return;
  if (dtype == DType::f16) return launch_dtype<__half>(p, tokens, tile_capacity, stream);
  return launch_dtype<__nv_bfloat16>(p, tokens, tile_capacity, stream);
}

}  // namespace qmoe::cuda
