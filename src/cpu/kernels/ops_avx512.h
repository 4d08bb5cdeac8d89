// Internal: driver primitives for AVX-512 (F + BW + VL + DQ). Included only by *__avx512.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>

// Hand-laid inline-asm tables: clang-format 14 reflows them differently on every pass.
// clang-format off
// Operands of the prefill loop (chunk2): token 3k + j's activations at x_k + j * ldx (bytes).
#define QMOE_FIDX0 ""
#define QMOE_FIDX1 ",%[ld],1"
#define QMOE_FIDX2 ",%[ld],2"
// Token m = 3k + j: acc (zmm 2m, zmm 2m + 1) += the two tiles' weights (zmm24, zmm25) x its activation.
#define QMOE_FTOK(k, j, m0, m1, b)                                                            \
  "vbroadcastss (%[x" #k "]" QMOE_FIDX##j "), %%zmm" #b "\n\t"                             \
  "vfmadd231ps %%zmm" #b ", %%zmm24, %%zmm" #m0 "\n\t" "vfmadd231ps %%zmm" #b ", %%zmm25, %%zmm" #m1 "\n\t"
#define QMOE_FTOK10                                                                                        \
  QMOE_FTOK(0, 0, 0, 1, 26) QMOE_FTOK(0, 1, 2, 3, 27) QMOE_FTOK(0, 2, 4, 5, 26) QMOE_FTOK(1, 0, 6, 7, 27)   \
  QMOE_FTOK(1, 1, 8, 9, 26) QMOE_FTOK(1, 2, 10, 11, 27) QMOE_FTOK(2, 0, 12, 13, 26)                       \
  QMOE_FTOK(2, 1, 14, 15, 27) QMOE_FTOK(2, 2, 16, 17, 26) QMOE_FTOK(3, 0, 18, 19, 27)
#define QMOE_FTOK11 QMOE_FTOK10 QMOE_FTOK(3, 1, 20, 21, 26)
#define QMOE_FTOK12 QMOE_FTOK11 QMOE_FTOK(3, 2, 22, 23, 27)
// Accumulators of token m from / to its output row (pointer m of yp), or zero.
#define QMOE_FACC(op, m, m0, m1)                                                                  \
  "mov " #m "*8(%[yp]), %%rax\n\t" op(m0, "(%%rax)") op(m1, "64(%%rax)")
#define QMOE_FLOAD(r, mem) "vmovups " mem ", %%zmm" #r "\n\t"
#define QMOE_FSTORE(r, mem) "vmovups %%zmm" #r ", " mem "\n\t"
#define QMOE_FZERO(r, mem) "vpxord %%zmm" #r ", %%zmm" #r ", %%zmm" #r "\n\t"
#define QMOE_FACC10(op)                                                                                     \
  QMOE_FACC(op, 0, 0, 1) QMOE_FACC(op, 1, 2, 3) QMOE_FACC(op, 2, 4, 5) QMOE_FACC(op, 3, 6, 7)              \
  QMOE_FACC(op, 4, 8, 9) QMOE_FACC(op, 5, 10, 11) QMOE_FACC(op, 6, 12, 13) QMOE_FACC(op, 7, 14, 15)        \
  QMOE_FACC(op, 8, 16, 17) QMOE_FACC(op, 9, 18, 19)
#define QMOE_FACC11(op) QMOE_FACC10(op) QMOE_FACC(op, 10, 20, 21)
#define QMOE_FACC12(op) QMOE_FACC11(op) QMOE_FACC(op, 11, 22, 23)
// The whole call for M tokens: accumulators in, n columns, accumulators out.
#define QMOE_FCHUNK(M, init)                                                                                \
  asm volatile(QMOE_FACC##M(init) "1:\n\t"                                                                 \
               "vmovups (%[w]), %%zmm24\n\t" "vmovups 64(%[w]), %%zmm25\n\t" QMOE_FTOK##M                 \
               "add $128, %[w]\n\t" "add $4, %[x0]\n\t" "add $4, %[x1]\n\t" "add $4, %[x2]\n\t"          \
               "add $4, %[x3]\n\t" "dec %[n]\n\t" "jnz 1b\n\t" QMOE_FACC##M(QMOE_FSTORE)                   \
               : [w] "+r"(w), [n] "+r"(n), [x0] "+r"(x0), [x1] "+r"(x1), [x2] "+r"(x2), [x3] "+r"(x3)         \
               : [ld] "r"(ldb), [yp] "r"(yp)                                                                 \
               : "rax", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",       \
                 "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19",   \
                 "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "cc", "memory")
// clang-format on

namespace qmoe::cpu {

struct OpsAvx512 {
  typedef __m512 V;
  struct Z {
    __m512 z;    // 2^23 + zero point, per row
    __m512 lut;  // float(i - zero of row 0) for i = 0..15
    bool uniform;
  };
  struct Q {
    __m512i q;
  };
  static constexpr int NV = 1;             // one zmm = the 16 rows of a column
  static constexpr int kDirectTokens = 4;  // 4 tokens x (even, odd) = 8 independent FMA chains
  static constexpr int kDirectTiles = 1;   // one sequential weight stream: decode is bandwidth-bound, and
                                           // two tiles' streams at once measured slower (T=1) than one
  static constexpr int kReuseTokens = 12;  // 12 tokens x 2 tiles = 24 accumulators + 2 weights, of 32 zmm:
  static constexpr int kReuseTiles = 2;    // 14 loads (2 weights, 12 broadcasts) per 24 FMAs
  static constexpr int kDecodeTokens = 6;  // tokens run inside the prefill decode loop (measured best of 4-8)

  // The prefill regime's inner loop (gemm_driver.h, chunk_tokens) for two tiles and M = 10..12
  // tokens (the token blocks of 30 or more tokens), in assembly: per column 2 weight loads, M
  // broadcasts and 2M FMAs, with the 2M accumulators in zmm0-23 from the first column to the
  // last. GCC's version of the same loop moved all 24 accumulators through the stack on entry
  // and exit of every call (a call is one 256-column chunk). The same FMAs in the same order.
  template <int M>
  static constexpr bool kChunk2 = M >= 10 && M <= 12;
  template <int M>
  static void chunk2(const float* w, std::int64_t n, const float* x, std::int64_t ldx, float* y, std::int64_t ldy,
                     bool first) {
    float* yp[M];
    for (int m = 0; m < M; ++m) yp[m] = y + m * ldy;
    const float *x0 = x, *x1 = x + 3 * ldx, *x2 = x + 6 * ldx, *x3 = x + 9 * ldx;
    const std::int64_t ldb = ldx * 4;
    if constexpr (M == 10) {
      if (first)
        QMOE_FCHUNK(10, QMOE_FZERO);
      else
        QMOE_FCHUNK(10, QMOE_FLOAD);
    } else if constexpr (M == 11) {
      if (first)
        QMOE_FCHUNK(11, QMOE_FZERO);
      else
        QMOE_FCHUNK(11, QMOE_FLOAD);
    } else {
      if (first)
        QMOE_FCHUNK(12, QMOE_FZERO);
      else
        QMOE_FCHUNK(12, QMOE_FLOAD);
    }
  }
  template <int BITS>
  static constexpr bool kLut = BITS == 4;

  static V zero() { return _mm512_setzero_ps(); }
  static V splat(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }

  static Z zeros(const std::uint8_t* z16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(z16));
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return {_mm512_castsi512_ps(_mm512_or_si512(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(0x4B000000))),
            _mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(z16[0]))),
            _mm_cmpeq_epi8_mask(b, _mm_broadcastb_epi8(b)) == 0xFFFF};
  }
  static bool uniform(const Z& z) { return z.uniform; }
  static Q group(const std::uint8_t* p64) { return {_mm512_loadu_si512(p64)}; }
  template <int BITS, int J>
  static void column(const Q& q, const Z& z, V* w) {
    // (lane >> shift) & mask | 2^23 in one ternary-logic op: imm 0xEA = (A & B) | C.
    const __m512i c = _mm512_ternarylogic_epi32(_mm512_srli_epi32(q.q, BITS * J), _mm512_set1_epi32((1 << BITS) - 1),
                                                _mm512_set1_epi32(0x4B000000), 0xEA);
    w[0] = _mm512_sub_ps(_mm512_castsi512_ps(c), z.z);
  }
  // 4-bit: vpermps reads only the low 4 bits of each 32-bit index, so no mask is needed.
  template <int J>
  static void column_lut(const Q& q, const Z& z, V* w) {
    w[0] = _mm512_permutexvar_ps(J == 0 ? q.q : _mm512_srli_epi32(q.q, 4 * J), z.lut);
  }
};

}  // namespace qmoe::cpu
