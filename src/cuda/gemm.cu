// The grouped mixed-input GEMM: for each (expert, token tile) of the per-call
// plan and each tile of output rows, out^T = W x^T on the tensor cores
// (mma.sync m16n8k16, float32 accumulation), with the int4/int8 weights
// dequantized in registers from the fragment-ordered layout of layout.h.
//
// One kernel serves both regimes. Decode (few tokens per expert): 8 or 16
// token columns, many row tiles and (for FC2) K splits, so every SM streams
// weights; each lane's 16-byte loads are issued D slabs ahead of their use.
// Prefill: 64 token columns and 32 rows per warp, so each dequantized weight
// fragment feeds 8 MMAs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>

#include "cuda/common.cuh"
#include "cuda/convert.cuh"
#include "cuda/gemm.h"

namespace qmoe::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

template <class T>
struct Types;
template <>
struct Types<__half> {
  using T2 = __half2;
  static constexpr unsigned kMagic = 0x64006400u;  // 1024.0 in each half: 0x6400 | n = 1024 + n
  static constexpr float kMagicValue = 1024.f;
};
template <>
struct Types<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr unsigned kMagic = 0x43004300u;  // 128.0 in each half: 0x4300 | n = 128 + n (n < 128)
  static constexpr float kMagicValue = 128.f;
};

template <class T2>
__device__ __forceinline__ T2 as_t2(unsigned u) {
  T2 v;
  static_assert(sizeof(v) == 4);
  __builtin_memcpy(&v, &u, 4);
  return v;
}
template <class T2>
__device__ __forceinline__ unsigned as_u32(T2 v) {
  unsigned u;
  __builtin_memcpy(&u, &v, 4);
  return u;
}

// (x & mask) | magic in one instruction.
__device__ __forceinline__ unsigned and_or(unsigned x, unsigned mask, unsigned magic) {
  unsigned r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(x), "r"(mask), "r"(magic));
  return r;
}

template <class T>
__device__ __forceinline__ typename Types<T>::T2 splat(float v) {
  typename Types<T>::T2 r;
  r.x = r.y = from_float<T>(v);
  return r;
}

template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (sizeof(T) == 2 && Types<T>::kMagic == 0x64006400u) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Weights are read once per call: stream them past L1.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ unsigned word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// The scale-block constants of one lane's two rows (g and g + 8): the
// zero-point offsets and the relative scales, as pairs of the token dtype.
template <class T, int BITS>
struct BlockConsts {
  using T2 = typename Types<T>::T2;
  T2 zoff[2];   // magic + zero point (float16, bfloat16 at 4 bits)
  float zf[2];  // 2^23 + zero point (bfloat16 at 8 bits)
  T2 scale[2];
  // From the stored words: zero points (row g, row g + 8) and relative scales.
  __device__ __forceinline__ void set(unsigned zpair, bool has_zp, unsigned relword, bool has_rel) {
    int z0 = BITS == 4 ? 8 : 128, z1 = z0;
    if (has_zp) z0 = static_cast<int>(zpair & 0xff), z1 = static_cast<int>(zpair >> 8);
    zoff[0] = splat<T>(Types<T>::kMagicValue + static_cast<float>(z0));
    zoff[1] = splat<T>(Types<T>::kMagicValue + static_cast<float>(z1));
    zf[0] = 8388608.f + static_cast<float>(z0);
    zf[1] = 8388608.f + static_cast<float>(z1);
    if (has_rel) {
      scale[0] = splat<T>(__half2float(__ushort_as_half(static_cast<unsigned short>(relword & 0xffff))));
      scale[1] = splat<T>(__half2float(__ushort_as_half(static_cast<unsigned short>(relword >> 16))));
    }
  }
};

// One k16 step of a lane's A fragment (rows g, g+8 of a 16-row tile).
template <class T, int BITS>
__device__ __forceinline__ void dequant(const uint4& v, int j, const BlockConsts<T, BITS>& bc, bool scaled,
                                        unsigned (&a)[4]) {
  using T2 = typename Types<T>::T2;
  if constexpr (BITS == 4) {
    const unsigned w = word(v, j);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const unsigned q = and_or(w >> (4 * r), 0x000f000fu, Types<T>::kMagic);
      T2 x = __hsub2(as_t2<T2>(q), bc.zoff[r & 1]);  // q - z, exact
      if (scaled) x = __hmul2(x, bc.scale[r & 1]);
      a[r] = as_u32(x);
    }
  } else {
    const unsigned w0 = word(v, 2 * j), w1 = word(v, 2 * j + 1);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const unsigned w = r < 2 ? w0 : w1;
      const int sh = (r & 1) * 16;
      T2 x;
      if constexpr (Types<T>::kMagic == 0x64006400u) {
        // float16 holds 1024 + q exactly for q < 1024.
        x = __hsub2(as_t2<T2>(__byte_perm(w, 0x64646464u, (r & 1) ? 0x4342 : 0x4140)), bc.zoff[r & 1]);
      } else {
        // bfloat16 cannot hold 128 + q for q >= 128: go through float32 (exact).
        const float lo = __uint_as_float(0x4B000000u | ((w >> sh) & 0xff)) - bc.zf[r & 1];
        const float hi = __uint_as_float(0x4B000000u | ((w >> (sh + 8)) & 0xff)) - bc.zf[r & 1];
        x = __floats2bfloat162_rn(lo, hi);
      }
      if (scaled) x = __hmul2(x, bc.scale[r & 1]);
      a[r] = as_u32(x);
    }
  }
}

__device__ __forceinline__ float sigmoid_mul(float x, float s) { return x / (1.f + __expf(-s * x)); }

__device__ __forceinline__ float activate(const GemmProblem& p, float h) {
  switch (p.act) {
    case Activation::relu: return h < 0.f ? 0.f : h;
    case Activation::gelu: {
      const float u = 0.7978845608028654f * (h + 0.044715f * h * h * h);
      return 0.5f * h * (1.f + tanhf(u));
    }
    case Activation::silu: return sigmoid_mul(h, 1.f);
    default: return h;
  }
}

__device__ __forceinline__ float swiglu(const GemmProblem& p, float g, float l) {
  const float gg = p.limit < g ? p.limit : g;                             // min(g, limit), NaN stays NaN
  const float ll = l < -p.limit ? -p.limit : (p.limit < l ? p.limit : l);  // clamp, NaN stays NaN
  return sigmoid_mul(gg, p.alpha) * (ll + p.beta);
}

template <int MT>
struct Shape {
  static constexpr int BM = 8 * MT;               // token columns per block
  static constexpr int WR = MT >= 8 ? 2 : 1;      // 16-row tiles per warp
  static constexpr int BN = kWarps * 16 * WR;     // output rows per block
  static constexpr int KC = MT >= 8 ? 256 : MT >= 4 ? 512 : 1024;  // K columns per shared-memory chunk
  static constexpr int LDS = KC + 8;              // row stride: B fragment loads hit 32 distinct banks
  static constexpr int D = WR == 1 ? 4 : 2;       // slabs of weights loaded ahead
  static constexpr int kSmemBytes = 2 * BM * LDS * 2;
};

template <class T, int BITS, int MT>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmProblem p) {
  using S = Shape<MT>;
  constexpr int SC = BITS == 4 ? 64 : 32;  // columns per slab
  constexpr int STEPS = SC / 16;           // k16 steps per slab
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);

  if (static_cast<int>(blockIdx.y) >= *p.num_tiles) return;
  const MTile mt = p.tiles[blockIdx.y];
  const int e = mt.expert;
  const int pos0 = p.offsets[e] + mt.m0;
  const int rows_here = min(S::BM, p.offsets[e + 1] - pos0);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, c = lane % 4;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) * S::BN + warp * 16 * S::WR;

  const std::int64_t kp = p.g.padded_cols;
  const std::int64_t k_begin = p.fc1 ? 0 : static_cast<std::int64_t>(blockIdx.z) * p.split_cols;
  const std::int64_t k_end = p.fc1 ? kp : (kp < k_begin + p.split_cols ? kp : k_begin + p.split_cols);
  const int nchunks = static_cast<int>((k_end - k_begin + S::KC - 1) / S::KC);

  const std::int64_t slabs_total = p.g.slabs();
  const uint4* codes = reinterpret_cast<const uint4*>(p.codes + e * p.g.code_bytes_per_expert());
  const unsigned* rel =
      p.rel_scales ? reinterpret_cast<const unsigned*>(p.rel_scales) + e * p.g.rel_scale_words_per_expert() : nullptr;
  const unsigned short* zp =
      p.zero_points ? reinterpret_cast<const unsigned short*>(p.zero_points) + e * p.g.zp_pairs_per_expert()
                    : nullptr;
  const bool scaled = rel != nullptr;

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

  float acc[S::WR][MT][4];
#pragma unroll
  for (int r = 0; r < S::WR; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][m][i] = 0.f;

  // Row-wise weights: one set of constants per row tile. Block-wise: the
  // zero-point and relative-scale words are loaded together with the codes
  // they belong to (a load in the dependent path would stall every block).
  BlockConsts<T, BITS> bc[S::WR];
  const std::int64_t bs = p.g.block_size;
  const std::int64_t nb = p.g.blocks();
  // block_size is a power of two: a shift, not a 64-bit division (a long subroutine on the GPU).
  const int bshift = bs ? __ffsll(bs) - 1 : 0;
  if (!bs) {
#pragma unroll
    for (int r = 0; r < S::WR; ++r) bc[r].set(zp ? zp[(row0 / 16 + r) * nb * 8 + g] : 0u, zp != nullptr, 0u, false);
  }
  // Scale blocks narrower than a slab (16 or 32 columns at 4 bits, 16 at 8)
  // change every k16 step or two; wider ones once per slab at most.
  const bool per_step = bs && bs < SC;

  struct Group {
    uint4 wv[S::D][S::WR];
    unsigned relw[S::D][STEPS][S::WR], zpw[S::D][STEPS][S::WR];
  };
  auto load_group = [&](Group& gr, std::int64_t kc0, std::int64_t slab0, int s0, int nslabs) {
#pragma unroll
    for (int d = 0; d < S::D; ++d) {
#pragma unroll
      for (int r = 0; r < S::WR; ++r) {
        if (s0 + d >= nslabs) continue;
        const std::int64_t tile = row0 / 16 + r;
        gr.wv[d][r] = load_stream(codes + ((tile * slabs_total + slab0 + s0 + d) * 32 + lane));
        if (!bs) continue;
#pragma unroll
        for (int j = 0; j < STEPS; ++j) {
          if (j > 0 && !per_step) continue;
          const std::int64_t at = (tile * nb + ((kc0 + (s0 + d) * SC + 16 * j) >> bshift)) * 8 + g;
          if (rel) gr.relw[d][j][r] = __ldg(rel + at);
          if (zp) gr.zpw[d][j][r] = __ldg(zp + at);
        }
      }
    }
  };
  auto compute_group = [&](const Group& gr, const T* xb, std::int64_t kc0, int s0, int nslabs) {
    (void)kc0;
#pragma unroll
    for (int d = 0; d < S::D; ++d) {
      if (s0 + d >= nslabs) break;
      const int kl = (s0 + d) * SC;
#pragma unroll
      for (int j = 0; j < STEPS; ++j) {
        if (bs && (j == 0 || per_step)) {
          // (select values, not an index: a run-time index would put the arrays in local memory)
#pragma unroll
          for (int r = 0; r < S::WR; ++r) {
            const unsigned zw = zp ? (per_step ? gr.zpw[d][j][r] : gr.zpw[d][0][r]) : 0u;
            const unsigned rw = rel ? (per_step ? gr.relw[d][j][r] : gr.relw[d][0][r]) : 0u;
            bc[r].set(zw, zp != nullptr, rw, rel != nullptr);
          }
        }
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
          dequant<T, BITS>(gr.wv[d][r], j, bc[r], scaled, a);
#pragma unroll
          for (int m = 0; m < MT; ++m) mma16816<T>(acc[r][m], a, b[m][0], b[m][1]);
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
    const std::int64_t slab0 = kc0 / SC;
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

  // Epilogue. Lane (g, c) holds rows g and g + 8 of each 16-row tile for
  // token columns 2c and 2c + 1 of each 8-token group.
  const float* rs = p.row_scales + e * p.g.padded_rows;
#pragma unroll
  for (int r = 0; r < S::WR; ++r) {
    const std::int64_t ra = row0 + 16 * r + g, rb = ra + 8;
    const float sa = rs[ra], sb = rs[rb];
    if (p.fc1) {
      const float* bias = p.bias + e * p.g.padded_rows;
      const float ba = bias[ra], bb = bias[rb];
      T* out = static_cast<T*>(p.out);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          const int tok = m * 8 + 2 * c + t;
          if (tok >= rows_here) continue;
          const float ha = acc[r][m][t] * sa + ba, hb = acc[r][m][2 + t] * sb + bb;
          T* orow = out + (pos0 + tok) * p.out_stride;
          if (p.g.gated) {
            const std::int64_t i = (row0 / 16 + r) * 8 + g;
            if (i < p.inter) orow[i] = from_float<T>(swiglu(p, ha, hb));
          } else {
            if (ra < p.g.rows) orow[ra] = from_float<T>(activate(p, ha));
            if (rb < p.g.rows) orow[rb] = from_float<T>(activate(p, hb));
          }
        }
      }
    } else {
      float* out = static_cast<float*>(p.out) + static_cast<std::int64_t>(blockIdx.z) * p.split_stride;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          const int tok = m * 8 + 2 * c + t;
          if (tok >= rows_here) continue;
          float* orow = out + (pos0 + tok) * p.out_stride;
          if (ra < p.g.rows) orow[ra] = acc[r][m][t] * sa;
          if (rb < p.g.rows) orow[rb] = acc[r][m][2 + t] * sb;
        }
      }
    }
  }
}

template <class T, int BITS, int MT>
void launch_one(const GemmProblem& p, std::int64_t tile_capacity, cudaStream_t stream) {
  using S = Shape<MT>;
  static std::once_flag once;
  std::call_once(once, [] {
    QMOE_CUDA_CHECK(cudaFuncSetAttribute(gemm_kernel<T, BITS, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         S::kSmemBytes));
  });
  const dim3 grid(static_cast<unsigned>(p.g.padded_rows / S::BN), static_cast<unsigned>(tile_capacity),
                  static_cast<unsigned>(p.fc1 ? 1 : p.splits));
  gemm_kernel<T, BITS, MT><<<grid, kThreads, S::kSmemBytes, stream>>>(p);
  QMOE_CUDA_CHECK(cudaGetLastError());
}

template <class T, int BITS>
void launch_bits(const GemmProblem& p, int mt, std::int64_t cap, cudaStream_t s) {
  switch (mt) {
    case 1: return launch_one<T, BITS, 1>(p, cap, s);
    case 2: return launch_one<T, BITS, 2>(p, cap, s);
    case 4: return launch_one<T, BITS, 4>(p, cap, s);
    default: return launch_one<T, BITS, 8>(p, cap, s);
  }
}

template <class T>
void launch_dtype(const GemmProblem& p, int mt, std::int64_t cap, cudaStream_t s) {
  if (p.g.bits == 4) return launch_bits<T, 4>(p, mt, cap, s);
  return launch_bits<T, 8>(p, mt, cap, s);
}

}  // namespace

int pick_mt(double avg) { return avg <= 8 ? 1 : avg <= 16 ? 2 : avg <= 32 ? 4 : 8; }

void launch_gemm(const GemmProblem& p, DType dtype, int mt, std::int64_t tile_capacity, cudaStream_t stream) {
  if (tile_capacity <= 0) return;
  if (dtype == DType::f16) return launch_dtype<__half>(p, mt, tile_capacity, stream);
  return launch_dtype<__nv_bfloat16>(p, mt, tile_capacity, stream);
}

}  // namespace qmoe::cuda
