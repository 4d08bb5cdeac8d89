// Internal: the int8-activation tile driver (accuracy_level 4), written once
// against per-ISA primitives ("IOps"), like gemm_driver.h.
//
// For each weight block and activation block (quant_act.h), the 16 rows' codes
// (unsigned) are multiplied with the int8 activations in 32-bit lanes, four
// byte products per lane per instruction (vpdpbusd on VNNI CPUs), exactly.
// Per activation block one conversion and one FMA: block_acc += float(int_acc) *
// act_scale; per weight block the zero point comes off once (quant_act.h) and
// the weight scale goes on: y = weight_scale * (block_acc - zero * zsum) + y,
// with y = 0 before the first weight block. The running total lives in y (one
// load and store per weight block), so only the int and block accumulators
// take registers: 2 per token (per vector), which lets M tokens share each
// decoded group. A group is one load and, for 4 bits, a mask and a shift.
// The groups of a whole activation block are unrolled at compile time; only a
// block cut short by the end of its weight block takes the run-time loop. Ops may
// also provide full_blocks<BITS>(codes, xq, ldq, xs, lds, n, bacc): the loop over
// a weight block's n whole activation blocks for kTokens tokens, the same
// operations in the same order (iops_avx512vnni.h: in assembly).
//
// IOps must provide (16 rows in NV vectors):
//   I izero() (the int accumulator's start; scale_add reads float(acc - start)); F fzero()
//   template <int BITS> void split(const uint8_t* p64, I (*parts)[NV])
//   I dot(I acc, const I& codes, const int8_t* x4)   -- acc += 4 byte products per lane (x4: 4 activations)
//   IZ zeros(const uint8_t* z16)        -- the 16 zero points as floats (NV vectors)
//   F scale_add(const I& acc, float s, F f) = float(sum) * s + f (fused), sum = acc - izero() exactly
//   F sub_zero(F f, const IZ&, int j, float zsum) = f - zero * zsum (fused)
//   F load(const float*); void store(float*, F); F fma(F, F, F)
// The ODR caution of gemm_driver.h applies here too.
#pragma once

#include <cstdint>

#include "cpu/kernels.h"
#include "cpu/kernels/gemm_driver.h"
#include "cpu/quant_act.h"

namespace qmoe::cpu::idriver {

constexpr int NR = kTileRows;

// iacc[m] += codes x activations for the groups of columns [c, c + n) (n a
// multiple of the group), activations of token m at xq + m * ldq.
template <class Ops, int BITS, int M>
inline void dot_groups(const std::uint8_t* codes, const std::int8_t* xq, std::int64_t ldq, std::int64_t n,
                       typename Ops::I (&iacc)[M][Ops::NV]) {
  using I = typename Ops::I;
  constexpr int NV = Ops::NV;
  constexpr std::int64_t G = 32 / BITS;
  for (std::int64_t c = 0; c < n; c += G) {
    I parts[2][NV];
    Ops::template split<BITS>(codes + (c / G) * 64, parts);
    for (int m = 0; m < M; ++m) {
      const std::int8_t* xm = xq + m * ldq + c;
      for (int j = 0; j < NV; ++j) iacc[m][j] = Ops::dot(iacc[m][j], parts[0][j], xm);
      if constexpr (BITS == 4)
        for (int j = 0; j < NV; ++j) iacc[m][j] = Ops::dot(iacc[m][j], parts[1][j], xm + 4);
    }
  }
}

// Never inlined: inlined into gemm, some token counts lost a quarter of their speed to
// the larger function's register allocation (M = 8, one thread: 2.9 -> 4.4 ms per pass).
template <class Ops, int BITS, int M>
[[gnu::noinline]] void direct(const PackGeometry& g, const std::uint8_t* tile, const QuantRows& x, std::int64_t t0,
                              float* y, std::int64_t ldy) {
  using I = typename Ops::I;
  using F = typename Ops::F;
  constexpr int NV = Ops::NV;
  const std::int64_t pb = TileLayout::padded_block<BITS>(g.block_len), nb = g.cols / g.block_len;
  const std::int64_t block_bytes = TileLayout::block_bytes<BITS>(g.block_len);
  const std::int64_t per_block = (pb + kActBlock - 1) / kActBlock;
  const std::int64_t full = pb / kActBlock;  // activation blocks of kActBlock columns per weight block
  const std::int8_t* xq = x.q + t0 * x.ldq;
  const float* xs = x.scale + t0 * x.lds;
  for (std::int64_t b = 0; b < nb; ++b) {
    const std::uint8_t* blk = tile + b * block_bytes;
    const std::uint8_t* codes = blk + TileLayout::kCodesOffset;
    F bacc[M][NV];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NV; ++j) bacc[m][j] = Ops::fzero();
    std::int64_t a0 = 0;
    if constexpr (M == Ops::kTokens && requires { Ops::template full_blocks<BITS>; }) {
      if (full > 0)
        Ops::template full_blocks<BITS>(codes, xq + b * pb, x.ldq, xs + b * per_block, x.lds, full, bacc[0]);
      a0 = full;
    }
    for (std::int64_t a = a0; a < per_block; ++a) {
      const std::int64_t c0 = kActBlock * a;
      // Codes 4 KiB ahead into L1, as full_blocks does (iops_avx512vnni.h says why).
      for (std::int64_t l = 0; l < kActBlock * NR * BITS / 8; l += 64)
        __builtin_prefetch(codes + c0 * (NR * BITS / 8) + l + 4096, 0, 3);
      I iacc[M][NV];
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < NV; ++j) iacc[m][j] = Ops::izero();
      if (a < full)  // the common case: the group count is a compile-time constant
        dot_groups<Ops, BITS, M>(codes + c0 * (NR * BITS / 8), xq + b * pb + c0, x.ldq, kActBlock, iacc);
      else
        dot_groups<Ops, BITS, M>(codes + c0 * (NR * BITS / 8), xq + b * pb + c0, x.ldq, pb - c0, iacc);
      for (int m = 0; m < M; ++m) {
        const float sx = xs[m * x.lds + b * per_block + a];
        for (int j = 0; j < NV; ++j) bacc[m][j] = Ops::scale_add(iacc[m][j], sx, bacc[m][j]);
      }
    }
    const typename Ops::IZ zero = Ops::zeros(blk + TileLayout::kZerosOffset);
    for (int j = 0; j < NV; ++j) {
      const F ws = Ops::load(reinterpret_cast<const float*>(blk + TileLayout::kScalesOffset) + j * (NR / NV));
      for (int m = 0; m < M; ++m) {
        float* ym = y + m * ldy + j * (NR / NV);
        const F prev = b == 0 ? Ops::fzero() : Ops::load(ym);
        Ops::store(ym, Ops::fma(ws, Ops::sub_zero(bacc[m][j], zero, j, x.zsum[(t0 + m) * x.ldz + b]), prev));
      }
    }
  }
}

template <class Ops, int BITS>
void gemm(const PackGeometry& g, const std::uint8_t* tile, const QuantRows& x, std::int64_t ntok, float* y,
          std::int64_t ldy) {
  static_assert(Ops::NV * sizeof(typename Ops::I) == NR * sizeof(std::int32_t), "NV vectors hold a tile's rows");
  constexpr int MT = Ops::kTokens;
  std::int64_t t = 0;
  for (; t + MT <= ntok; t += MT) direct<Ops, BITS, MT>(g, tile, x, t, y + t * ldy, ldy);
  if constexpr (requires { Ops::kOverlapFrom; })
    if (t < ntok && t > 0 && ntok - t >= Ops::kOverlapFrom) {
      // The last MT tokens in one more full pass: the tokens it shares with the previous
      // pass get the same bits again (a token's operations do not depend on the others).
      direct<Ops, BITS, MT>(g, tile, x, ntok - MT, y + (ntok - MT) * ldy, ldy);
      return;
    }
  if (t < ntok)
    driver::with_count<MT - 1>(ntok - t, [&](auto M) { direct<Ops, BITS, M>(g, tile, x, t, y + t * ldy, ldy); });
}

}  // namespace qmoe::cpu::idriver
