// Internal: the int8-activation tile driver (accuracy_level 4), written once
// against per-ISA primitives ("IOps"), like gemm_driver.h.
//
// For each weight block and activation block (quant_act.h), the 16 rows' codes
// (unsigned) are multiplied with the int8 activations in 32-bit lanes, four
// byte products per lane per instruction (vpdpbusd on VNNI CPUs), exactly.
// Per activation block one conversion and one FMA: block_acc += float(int_acc) *
// act_scale; per weight block the zero point comes off once (quant_act.h) and
// the weight scale goes on: acc += weight_scale * (block_acc - zero * zsum).
// Decoding a group is one load and, for 4 bits, a mask and a shift, so there is
// no separate prefill regime: M tokens share each decode.
//
// IOps must provide (16 rows in NV vectors):
//   I izero(); F fzero(); I group(const uint8_t* p64); template <int BITS> void split(const I&, I* parts)
//   I dot(I acc, const I& codes, const int8_t* x4)   -- acc += 4 byte products per lane (x4: 4 activations)
//   IZ zeros(const uint8_t* z16)        -- the 16 zero points as floats (NV vectors)
//   F scale_add(const I& acc, float s, F f) = float(acc) * s + f (fused)
//   F sub_zero(F f, const IZ&, int j, float zsum) = f - zero * zsum (fused)
//   F load(const float*); void store(float*, F); F fma(F, F, F)
// The ODR caution of gemm_driver.h applies here too.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/kernels.h"
#include "cpu/kernels/gemm_driver.h"
#include "cpu/quant_act.h"

namespace qmoe::cpu::idriver {

constexpr int NR = 16;

template <class Ops, int BITS, int M>
void direct(const PackGeometry& g, const std::uint8_t* tile, const QuantRows& x, std::int64_t t0, float* y,
            std::int64_t ldy) {
  using I = typename Ops::I;
  using F = typename Ops::F;
  constexpr int NV = Ops::NV;
  constexpr std::int64_t G = 32 / BITS;  // columns per group
  const std::int64_t pb = (g.block_len + G - 1) / G * G, nb = g.cols / g.block_len;
  const std::int64_t block_bytes = NR * 5 + pb * NR * BITS / 8, per_block = (pb + kActBlock - 1) / kActBlock;
  F acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = Ops::fzero();
  for (std::int64_t b = 0; b < nb; ++b) {
    const std::uint8_t* blk = tile + b * block_bytes;
    const typename Ops::IZ zero = Ops::zeros(blk + NR * 4);
    const std::uint8_t* codes = blk + NR * 5;
    F bacc[M][NV];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NV; ++j) bacc[m][j] = Ops::fzero();
    for (std::int64_t a = 0; a < per_block; ++a) {
      const std::int64_t c0 = kActBlock * a, n = pb - c0 < kActBlock ? pb - c0 : kActBlock;
      I iacc[M][NV];
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < NV; ++j) iacc[m][j] = Ops::izero();
      for (std::int64_t c = c0; c < c0 + n; c += G) {
        I parts[2][NV];
        Ops::template split<BITS>(codes + (c / G) * 64, parts);
        for (int m = 0; m < M; ++m) {
          const std::int8_t* xq = x.q + (t0 + m) * x.ldq + b * pb + c;
          for (int j = 0; j < NV; ++j) iacc[m][j] = Ops::dot(iacc[m][j], parts[0][j], xq);
          if constexpr (BITS == 4)
            for (int j = 0; j < NV; ++j) iacc[m][j] = Ops::dot(iacc[m][j], parts[1][j], xq + 4);
        }
      }
      for (int m = 0; m < M; ++m) {
        const float sx = x.scale[(t0 + m) * x.lds + b * per_block + a];
        for (int j = 0; j < NV; ++j) bacc[m][j] = Ops::scale_add(iacc[m][j], sx, bacc[m][j]);
      }
    }
    for (int j = 0; j < NV; ++j) {
      const F ws = Ops::load(reinterpret_cast<const float*>(blk) + j * (NR / NV));
      for (int m = 0; m < M; ++m)
        acc[m][j] = Ops::fma(ws, Ops::sub_zero(bacc[m][j], zero, j, x.zsum[(t0 + m) * x.ldz + b]), acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) Ops::store(y + m * ldy + j * (NR / NV), acc[m][j]);
}

template <class Ops, int BITS>
void gemm(const PackGeometry& g, const std::uint8_t* tile, const QuantRows& x, std::int64_t ntok, float* y,
          std::int64_t ldy) {
  constexpr int MT = Ops::kTokens;
  std::int64_t t = 0;
  for (; t + MT <= ntok; t += MT) direct<Ops, BITS, MT>(g, tile, x, t, y + t * ldy, ldy);
  if (t < ntok)
    driver::with_count<MT - 1>(ntok - t, [&](auto M) { direct<Ops, BITS, M>(g, tile, x, t, y + t * ldy, ldy); });
}

}  // namespace qmoe::cpu::idriver
