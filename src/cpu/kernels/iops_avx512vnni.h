// Internal: int8-activation primitives for AVX-512 VNNI (vpdpbusd).
// Included only by *__avx512vnni.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

// Hand-laid inline-asm tables: clang-format 14 reflows them differently on every pass.
// clang-format off
// Operands of the fused loop (full_blocks): the activations of token 3k + j at byte
// `off` of the current block sit at b_k + j * ldq, its scale at s_k + j * lds * 4
// (x86 base + index * {1, 2} addressing: 4 + 4 pointers for 12 tokens).
#define QMOE_IDX0 ""
#define QMOE_IDX1 ",%[ld],1"
#define QMOE_IDX2 ",%[ld],2"
#define QMOE_SIDX0 ""
#define QMOE_SIDX1 ",%[sld],1"
#define QMOE_SIDX2 ",%[sld],2"
// iacc_m (zmm m) += codes (zmm `code`) x the 4 activations at `off`, broadcast from memory.
#define QMOE_DP(off, code, k, j, m) \
  "vpdpbusd " #off "(%[b" #k "]" QMOE_IDX##j ")%{1to16%}, %%zmm" #code ", %%zmm" #m "\n\t"
#define QMOE_DP12(off, code)                                                                                 \
  QMOE_DP(off, code, 0, 0, 0) QMOE_DP(off, code, 0, 1, 1) QMOE_DP(off, code, 0, 2, 2)                       \
  QMOE_DP(off, code, 1, 0, 3) QMOE_DP(off, code, 1, 1, 4) QMOE_DP(off, code, 1, 2, 5)                       \
  QMOE_DP(off, code, 2, 0, 6) QMOE_DP(off, code, 2, 1, 7) QMOE_DP(off, code, 2, 2, 8)                       \
  QMOE_DP(off, code, 3, 0, 9) QMOE_DP(off, code, 3, 1, 10) QMOE_DP(off, code, 3, 2, 11)
// Block start: iacc_m = kBias bits.
#define QMOE_INIT(m) "vmovdqa64 %[bias], %%zmm" #m "\n\t"
#define QMOE_INIT12                                                                                          \
  QMOE_INIT(0) QMOE_INIT(1) QMOE_INIT(2) QMOE_INIT(3) QMOE_INIT(4) QMOE_INIT(5) QMOE_INIT(6) QMOE_INIT(7)     \
  QMOE_INIT(8) QMOE_INIT(9) QMOE_INIT(10) QMOE_INIT(11)
// Block end (scale_add): bacc_m (zmm 16 + m) += (float bits of iacc_m - kBias) * scale of token m.
#define QMOE_EPI(k, j, m, b)                                     \
  "vsubps %[bias], %%zmm" #m ", %%zmm" #m "\n\t"                \
  "vfmadd231ps (%[s" #k "]" QMOE_SIDX##j ")%{1to16%}, %%zmm" #m ", %%zmm" #b "\n\t"
#define QMOE_EPI12                                                                                           \
  QMOE_EPI(0, 0, 0, 16) QMOE_EPI(0, 1, 1, 17) QMOE_EPI(0, 2, 2, 18) QMOE_EPI(1, 0, 3, 19)                   \
  QMOE_EPI(1, 1, 4, 20) QMOE_EPI(1, 2, 5, 21) QMOE_EPI(2, 0, 6, 22) QMOE_EPI(2, 1, 7, 23)                   \
  QMOE_EPI(2, 2, 8, 24) QMOE_EPI(3, 0, 9, 25) QMOE_EPI(3, 1, 10, 26) QMOE_EPI(3, 2, 11, 27)
#define QMOE_ACC(op, m, b) op " " #m "*64(%[acc]), %%zmm" #b "\n\t"
#define QMOE_LOAD_ACC12                                                                                      \
  "vmovups 0(%[acc]), %%zmm16\n\t" "vmovups 64(%[acc]), %%zmm17\n\t" "vmovups 128(%[acc]), %%zmm18\n\t"      \
  "vmovups 192(%[acc]), %%zmm19\n\t" "vmovups 256(%[acc]), %%zmm20\n\t" "vmovups 320(%[acc]), %%zmm21\n\t"  \
  "vmovups 384(%[acc]), %%zmm22\n\t" "vmovups 448(%[acc]), %%zmm23\n\t" "vmovups 512(%[acc]), %%zmm24\n\t"  \
  "vmovups 576(%[acc]), %%zmm25\n\t" "vmovups 640(%[acc]), %%zmm26\n\t" "vmovups 704(%[acc]), %%zmm27\n\t"
#define QMOE_STORE_ACC12                                                                                     \
  "vmovups %%zmm16, 0(%[acc])\n\t" "vmovups %%zmm17, 64(%[acc])\n\t" "vmovups %%zmm18, 128(%[acc])\n\t"      \
  "vmovups %%zmm19, 192(%[acc])\n\t" "vmovups %%zmm20, 256(%[acc])\n\t" "vmovups %%zmm21, 320(%[acc])\n\t"  \
  "vmovups %%zmm22, 384(%[acc])\n\t" "vmovups %%zmm23, 448(%[acc])\n\t" "vmovups %%zmm24, 512(%[acc])\n\t"  \
  "vmovups %%zmm25, 576(%[acc])\n\t" "vmovups %%zmm26, 640(%[acc])\n\t" "vmovups %%zmm27, 704(%[acc])\n\t"
// Codes of the block 4 KiB ahead into L1 (one prefetch per 64-byte line). Why: a
// tile's first pass streams its codes from DRAM while 12 activation rows and their
// scales are read alongside, and the hardware prefetchers alone left that pass at
// half speed (single-thread FC1 loop, 64 tokens/expert: 650 -> 790 GOPS). Later
// passes find the lines in L1 or L2; 1 to 8 KiB ahead measured within noise of each other.
#define QMOE_PREFETCH(off) "prefetcht0 4096+" #off "(%[c])\n\t"
// Next block: 16 activations and one scale further per token, `code_bytes` of codes.
#define QMOE_ADVANCE(code_bytes)                                                                             \
  "add $16, %[b0]\n\t" "add $16, %[b1]\n\t" "add $16, %[b2]\n\t" "add $16, %[b3]\n\t"                       \
  "add $4, %[s0]\n\t" "add $4, %[s1]\n\t" "add $4, %[s2]\n\t" "add $4, %[s3]\n\t"                           \
  "add $" #code_bytes ", %[c]\n\t" "dec %[n]\n\t" "jnz 1b\n\t"
#define QMOE_FUSED_OPERANDS                                                                                  \
  : [b0] "+r"(b0), [b1] "+r"(b1), [b2] "+r"(b2), [b3] "+r"(b3), [s0] "+r"(s0), [s1] "+r"(s1), [s2] "+r"(s2), \
    [s3] "+r"(s3), [c] "+r"(codes), [n] "+r"(n)                                                              \
  : [ld] "r"(ldq), [sld] "r"(lds * 4), [mask] "v"(mask), [bias] "v"(bias), [acc] "r"(acc)                    \
  : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", \
    "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",         \
    "xmm24", "xmm25", "xmm26", "xmm27", "cc", "memory"
// clang-format on

namespace qmoe::cpu {

struct IOpsAvx512Vnni {
  typedef __m512i I;
  typedef __m512 F;
  typedef __m512 IZ;
  static constexpr int NV = 1;
  static constexpr int kTokens = 12;  // 12 x (int, block) accumulators + codes, mask and bias, of 32 zmm
  // A remainder of this many tokens (or more) after whole passes of kTokens is cheaper as one
  // more kTokens pass that overlaps the previous one than in the generic loop, where GCC spills
  // (4-bit, one thread, 8 experts of 5760 x 2880: 9 remaining tokens 5.1 ms generic, 3.9 ms as a
  // full pass; 8 remaining: 3.1 ms generic).
  static constexpr int kOverlapFrom = 9;

  // Int accumulators start at the bits of kBias = 1.5 * 2^23 instead of 0: for
  // |sum| < 2^22 (an activation block's sum is at most 16 * 255 * 127) the lane
  // then holds the float kBias + sum exactly, and float(sum) is one exact
  // subtraction (an add-pipe op) instead of a conversion that competes with vpdpbusd.
  static constexpr float kBias = 12582912.f;
  // The driver's loop over the n >= 1 whole activation blocks of one weight block for
  // kTokens = 12 tokens, in assembly: GCC's register allocation of the same loop
  // written with intrinsics copies and spills accumulators and reloads token pointers.
  // Register use: iacc in zmm0-11, codes in zmm12-13, bacc in zmm16-27 (loaded from
  // and stored back to acc[0..12)). The operations and their order are those of
  // izero, split, dot and scale_add, so the bits are the same as the generic loop's.
  template <int BITS>
  static void full_blocks(const std::uint8_t* codes, const std::int8_t* xq, std::int64_t ldq, const float* xs,
                          std::int64_t lds, std::int64_t n, F* acc) {
    static_assert(kTokens == 12, "the assembly names 12 tokens");
    const std::int8_t *b0 = xq, *b1 = xq + 3 * ldq, *b2 = xq + 6 * ldq, *b3 = xq + 9 * ldq;
    const float *s0 = xs, *s1 = xs + 3 * lds, *s2 = xs + 6 * lds, *s3 = xs + 9 * lds;
    const __m512i mask = _mm512_set1_epi8(0x0f);
    const __m512 bias = _mm512_set1_ps(kBias);
    if constexpr (BITS == 4) {  // 2 groups of 8 columns: low nibbles x activations 0-3, high x 4-7
      asm volatile(QMOE_LOAD_ACC12 "1:\n\t" QMOE_INIT12
                   "vmovdqu64 0(%[c]), %%zmm12\n\t" "vpsrld $4, %%zmm12, %%zmm13\n\t"
                   "vpandd %[mask], %%zmm12, %%zmm12\n\t" "vpandd %[mask], %%zmm13, %%zmm13\n\t"
                   QMOE_PREFETCH(0) QMOE_PREFETCH(64) QMOE_DP12(0, 12) QMOE_DP12(4, 13)
                   "vmovdqu64 64(%[c]), %%zmm12\n\t" "vpsrld $4, %%zmm12, %%zmm13\n\t"
                   "vpandd %[mask], %%zmm12, %%zmm12\n\t" "vpandd %[mask], %%zmm13, %%zmm13\n\t"
                   QMOE_DP12(8, 12) QMOE_DP12(12, 13)
                   QMOE_EPI12 QMOE_ADVANCE(128) QMOE_STORE_ACC12 QMOE_FUSED_OPERANDS);
    } else {  // 4 groups of 4 columns
      asm volatile(QMOE_LOAD_ACC12 "1:\n\t" QMOE_INIT12
                   "vmovdqu64 0(%[c]), %%zmm12\n\t" "vmovdqu64 64(%[c]), %%zmm13\n\t"
                   QMOE_PREFETCH(0) QMOE_PREFETCH(64) QMOE_DP12(0, 12) QMOE_DP12(4, 13)
                   "vmovdqu64 128(%[c]), %%zmm12\n\t" "vmovdqu64 192(%[c]), %%zmm13\n\t"
                   QMOE_PREFETCH(128) QMOE_PREFETCH(192) QMOE_DP12(8, 12) QMOE_DP12(12, 13)
                   QMOE_EPI12 QMOE_ADVANCE(256) QMOE_STORE_ACC12 QMOE_FUSED_OPERANDS);
    }
  }
  static I izero() { return _mm512_castps_si512(_mm512_set1_ps(kBias)); }
  static F fzero() { return _mm512_setzero_ps(); }
  template <int BITS>
  static void split(const std::uint8_t* p64, I (*parts)[1]) {
    const __m512i q = _mm512_loadu_si512(p64);
    if constexpr (BITS == 4) {
      const __m512i m = _mm512_set1_epi8(0x0f);
      parts[0][0] = _mm512_and_si512(q, m);
      parts[1][0] = _mm512_and_si512(_mm512_srli_epi32(q, 4), m);
    } else {
      parts[0][0] = q;
    }
  }
  // The 4 activations are broadcast from memory (a load, no shuffle-port work per product).
  static I dot(I acc, const I& codes, const std::int8_t* x4) {
    std::int32_t v;
    std::memcpy(&v, x4, 4);
    return _mm512_dpbusd_epi32(acc, codes, _mm512_set1_epi32(v));
  }
  static IZ zeros(const std::uint8_t* z16) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z16))));
  }
  static F sub_zero(const F& f, const IZ& z, int, float zsum) { return _mm512_fnmadd_ps(z, _mm512_set1_ps(zsum), f); }
  static F scale_add(const I& acc, float s, F f) {
    return _mm512_fmadd_ps(_mm512_sub_ps(_mm512_castsi512_ps(acc), _mm512_set1_ps(kBias)), _mm512_set1_ps(s), f);
  }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, const F& f) { _mm512_storeu_ps(p, f); }
  static F fma(const F& a, const F& b, const F& c) { return _mm512_fmadd_ps(a, b, c); }
};

}  // namespace qmoe::cpu
