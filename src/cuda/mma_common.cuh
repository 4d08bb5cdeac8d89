// Internal: device helpers shared by the GEMM kernels (gemm.cu: mma.sync for
// every regime and architecture; gemm_wgmma.cu: the sm_90a prefill kernel):
// token dtype traits, int4/int8 -> float16/bfloat16 dequantization of the
// fragment-ordered codes of layout.h, the FC1 activations, cp.async, and the
// streaming weight load.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/convert.cuh"
#include "cuda/gemm.h"

namespace qmoe::cuda {

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

// The work of one block of the mma.sync GEMMs (gemm.cu, gemm_decode.cu): the
// plan's m-tile blockIdx.y (expert e, its tokens at positions pos0.. of which
// rows_here are valid, at most bm) and the K range of split blockIdx.z (FC2;
// FC1 takes all of K). False for blocks past the plan's tiles.
struct TileWork {
  int e = 0, pos0 = 0, rows_here = 0;
  std::int64_t k_begin = 0, k_end = 0;
};
// The K columns [k_begin, k_end) of this block: all of K for FC1, the range of
// split blockIdx.z for FC2 (every GEMM kernel).
__device__ __forceinline__ void split_k_range(const GemmProblem& p, std::int64_t& k_begin, std::int64_t& k_end) {
  const std::int64_t kp = p.g.padded_cols;
  k_begin = p.fc1 ? 0 : static_cast<std::int64_t>(blockIdx.z) * p.split_cols;
  k_end = p.fc1 ? kp : (kp < k_begin + p.split_cols ? kp : k_begin + p.split_cols);
}
__device__ __forceinline__ bool tile_work(const GemmProblem& p, int bm, TileWork& w) {
  if (static_cast<int>(blockIdx.y) >= *p.num_tiles) return false;
  const MTile mt = p.tiles[blockIdx.y];
  if (mt.expert < p.slot_begin || mt.expert >= p.slot_end) return false;
  w.e = mt.expert;
  w.pos0 = p.offsets[w.e] + mt.m0;
  w.rows_here = min(bm, p.offsets[w.e + 1] - w.pos0);
  split_k_range(p, w.k_begin, w.k_end);
  return true;
}

// How scales change along K, the mma.sync GEMMs' template parameter SK:
// 0 = one scale per row (row-wise), 1 = blocks of a slab or more (new scale
// words once per slab at most), 2 = blocks narrower than a slab (new words
// every k16 step or two). A template parameter so each kind holds only the
// registers it needs. (IntC and TypeC, compile-time values for the dispatch: common.cuh.)

// Calls launch(TypeC<T>{}, IntC<BITS>{}, IntC<SK>{}) with the token dtype, the
// weight bits and the scale kind of p as compile-time values (host side).
template <class Launch>
void dispatch_mma(const GemmProblem& p, DType dtype, Launch&& launch) {
  auto by_sk = [&](auto t, auto bits) {
    if (p.g.block_size == 0) return launch(t, bits, IntC<0>{});
    if (p.g.block_size >= p.g.slab_cols()) return launch(t, bits, IntC<1>{});
    return launch(t, bits, IntC<2>{});
  };
  auto by_bits = [&](auto t) {
    if (p.g.bits == 4) return by_sk(t, IntC<4>{});
    return by_sk(t, IntC<8>{});
  };
  if (dtype == DType::f16) return by_bits(TypeC<__half>{});
  return by_bits(TypeC<__nv_bfloat16>{});
}

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
    case Activation::relu:
      return h < 0.f ? 0.f : h;
    case Activation::gelu: {
      const float u = 0.7978845608028654f * (h + 0.044715f * h * h * h);
      return 0.5f * h * (1.f + tanhf(u));
    }
    case Activation::silu:
      return sigmoid_mul(h, 1.f);
    default:
      return h;
  }
}

__device__ __forceinline__ float swiglu(const GemmProblem& p, float g, float l) {
  const float gg = p.limit < g ? p.limit : g;                              // min(g, limit), NaN stays NaN
  const float ll = l < -p.limit ? -p.limit : (p.limit < l ? p.limit : l);  // clamp, NaN stays NaN
  return sigmoid_mul(gg, p.alpha) * (ll + p.beta);
}

// The epilogue of one 16-row tile (packed row tile `rtile` of expert e) for
// NG groups of 8 token columns, in the accumulator layout of mma.m16n8k16
// and wgmma alike: lane (g, c) holds acc[4i + t] = (row g, column 8i + 2c + t)
// and acc[4i + 2 + t] = (row g + 8, same column). FC1: row scale, bias and
// the activation, stored in the token dtype; FC2: scaled float32 partials of
// K split blockIdx.z. Columns at or past rows_here are not stored.
template <class T, int NG>
__device__ __forceinline__ void store_tile(const GemmProblem& p, const float* acc, int e, std::int64_t rtile, int pos0,
                                           int rows_here, int g, int c) {
  const std::int64_t ra = rtile * 16 + g, rb = ra + 8;
  const float* rs = p.row_scales + e * p.g.padded_rows;
  const float sa = rs[ra], sb = rs[rb];
  if (p.fc1) {
    const float* bias = p.bias + e * p.g.padded_rows;
    const float ba = bias[ra], bb = bias[rb];
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int i = 0; i < NG; ++i) {
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int tok = i * 8 + 2 * c + t;
        if (tok >= rows_here) continue;
        const float ha = acc[4 * i + t] * sa + ba, hb = acc[4 * i + 2 + t] * sb + bb;
        T* orow = out + static_cast<std::int64_t>(pos0 + tok) * p.out_stride;
        if (p.g.gated) {
          const std::int64_t col = rtile * 8 + g;  // gate/up pair in rows g, g + 8 (layout.h)
          if (col < p.inter) orow[col] = from_float<T>(swiglu(p, ha, hb));
        } else {
          if (ra < p.g.rows) orow[ra] = from_float<T>(activate(p, ha));
          if (rb < p.g.rows) orow[rb] = from_float<T>(activate(p, hb));
        }
      }
    }
  } else {
    float* out = static_cast<float*>(p.out) + static_cast<std::int64_t>(blockIdx.z) * p.split_stride;
#pragma unroll
    for (int i = 0; i < NG; ++i) {
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int tok = i * 8 + 2 * c + t;
        if (tok >= rows_here) continue;
        float* orow = out + static_cast<std::int64_t>(pos0 + tok) * p.out_stride;
        if (ra < p.g.rows) orow[ra] = acc[4 * i + t] * sa;
        if (rb < p.g.rows) orow[rb] = acc[4 * i + 2 + t] * sb;
      }
    }
  }
}

}  // namespace qmoe::cuda
