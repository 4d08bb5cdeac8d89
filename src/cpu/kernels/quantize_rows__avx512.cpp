// quantize_rows (quant_act.h) with AVX-512: one activation block of 16 columns
// per zmm. The same bits as the portable version: max and the integer sum are
// exact whatever the order, the scale, inverse and zsum steps are the same
// IEEE operations (vector lanes or scalars), and the vector multiply, clamp and
// round-to-nearest-even conversion match the scalar ones lane by lane.
//
// Where the activation blocks of a row lie back to back (padded_block a multiple
// of 16: row-wise K a multiple of 16, and every block size), 16 blocks go at once:
// their 16 maxima and 16 code sums come out of one transposing reduction tree
// each (15 ops and 30 shuffles, instead of 16 separate horizontal reductions),
// and the scales and inverses are one vector division each. Row-wise gpt-oss-20b
// rows (2048 x 2880, one thread): 5.1 -> 1.7 ms.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "cpu/kernels.h"
#include "cpu/quant_act.h"

namespace qmoe::cpu {

namespace {

// The tree's last level leaves block 4q + j in lane 4j + q; this puts block k in lane k.
inline __m512i tree_order() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }

// Lane k = op over the lanes of v[k]. Each level halves the vectors: it pairs the
// (256-bit halves, 128-bit quarters, pairs of lanes, lanes) of two vectors by two
// shuffles and combines them with op, so every lane ends up holding one block's result.
// The shuffles only move bits, so integer vectors pass through them as floats.
template <class Op>
inline __m512 reduce16(const __m512 (&v)[16], Op op) {
  __m512 w[8], u[4], s[2];
  for (int i = 0; i < 8; ++i)
    w[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    u[i] = op(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88), _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    s[i] = op(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
  return _mm512_permutexvar_ps(tree_order(),
                               op(_mm512_shuffle_ps(s[0], s[1], 0x88), _mm512_shuffle_ps(s[0], s[1], 0xDD)));
}

// Lane k = max over the lanes of v[k].
inline __m512 max16(const __m512 (&v)[16]) {
  return reduce16(v, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); });
}

// Lane k = sum of the 32-bit integer lanes of v[k].
inline __m512i sum16(const __m512i (&v)[16]) {
  __m512 f[16];
  for (int i = 0; i < 16; ++i) f[i] = _mm512_castsi512_ps(v[i]);
  return _mm512_castps_si512(reduce16(f, [](__m512 a, __m512 b) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }));
}

struct Consts {
  __m128i order;  // 4-bit weights: within each group of 8 columns, even columns first, then odd
  __m512 inf = _mm512_set1_ps(INFINITY), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
};

// One activation block of n <= 16 columns at x into q; returns its scale and code sum.
inline float one_block(const float* x, std::int64_t n, const Consts& k, std::int8_t* q, std::int32_t& sum) {
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);  // lanes past n read as 0.f: no effect
  const __m512 v = _mm512_maskz_loadu_ps(m, x), av = _mm512_abs_ps(v);
  const bool finite = _mm512_cmp_ps_mask(av, k.inf, _CMP_LT_OQ) == 0xffff;  // NaN compares false
  const float amax = _mm512_reduce_max_ps(av);
  // Non-finite activations poison the block (NaN scale, zero codes); inv is capped so
  // that a tiny max cannot make it infinite (0 * inf is NaN).
  const float scale = finite ? amax / 127.f : NAN;
  const float inv = finite && amax > 0.f ? std::fmin(127.f / amax, FLT_MAX) : 0.f;
  const __m512 y = _mm512_maskz_mul_ps(finite ? m : __mmask16{0}, v, _mm512_set1_ps(inv));
  const __m512i c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(y, k.lo), k.hi));
  _mm_mask_storeu_epi8(q, m, _mm_shuffle_epi8(_mm512_cvtepi32_epi8(c), k.order));
  sum = _mm512_reduce_add_epi32(c);
  return scale;
}

// 16 whole activation blocks at x into q and scale[0..16); sums[k] = block k's code sum.
inline void sixteen_blocks(const float* x, const Consts& k, std::int8_t* q, float* scale, std::int32_t* sums) {
  __m512 v[16], av[16];
  for (int j = 0; j < 16; ++j) {
    v[j] = _mm512_loadu_ps(x + 16 * j);
    // min(NaN, inf) is inf (the second operand): a non-finite block's maximum is inf.
    av[j] = _mm512_min_ps(_mm512_abs_ps(v[j]), k.inf);
  }
  const __m512 amax = max16(av);
  const __mmask16 finite = _mm512_cmp_ps_mask(amax, k.inf, _CMP_LT_OQ);
  const __mmask16 positive = _mm512_mask_cmp_ps_mask(finite, amax, _mm512_setzero_ps(), _CMP_GT_OQ);
  _mm512_storeu_ps(scale, _mm512_mask_div_ps(_mm512_set1_ps(NAN), finite, amax, k.hi));
  const __m512 inv = _mm512_maskz_min_ps(positive, _mm512_div_ps(k.hi, amax), _mm512_set1_ps(FLT_MAX));
  __m512i c[16];
  for (int j = 0; j < 16; ++j) {
    const __m512 y = _mm512_maskz_mul_ps(static_cast<__mmask16>(-((finite >> j) & 1)), v[j],
                                         _mm512_permutexvar_ps(_mm512_set1_epi32(j), inv));
    c[j] = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(y, k.lo), k.hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * j), _mm_shuffle_epi8(_mm512_cvtepi32_epi8(c[j]), k.order));
  }
  _mm512_storeu_si512(sums, sum16(c));
}

}  // namespace

void quantize_rows__avx512(const float* x, std::int64_t ldx, std::int64_t r0, std::int64_t r1, const PackGeometry& g,
                           QuantRowsBuffer& out) {
  static_assert(kActBlock == 16, "one activation block per zmm");
  const std::int64_t pb = g.padded_block(), ldq = g.padded_cols(), lds = act_blocks_per_row(g);
  const std::int64_t per_block = act_blocks_per_block(g), nb = g.blocks();
  Consts k;
  k.order = g.bits == 4 ? _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)
                        : _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (std::int64_t row = r0; row < r1; ++row) {
    const float* xr = x + row * ldx;
    std::int8_t* qr = out.q.data() + row * ldq;
    float* sr = out.scale.data() + row * lds;
    float* zr = out.zsum.data() + row * nb;
    if (pb % kActBlock == 0) {
      // Block a of the row covers columns [16a, 16a + 16) and weight block a / per_block.
      // zsum runs over each weight block's activation blocks in order, as in quantize_rows.
      float zsum = 0.f;
      std::int64_t left = per_block;  // activation blocks until the current weight block ends
      auto add = [&](std::int64_t a, std::int32_t sum) {
        zsum = std::fma(sr[a], static_cast<float>(sum), zsum);
        if (--left == 0) zr[a / per_block] = zsum, zsum = 0.f, left = per_block;
      };
      std::int64_t a = 0;
      alignas(64) std::int32_t sums[16];
      for (; a + 16 <= lds; a += 16) {
        sixteen_blocks(xr + kActBlock * a, k, qr + kActBlock * a, sr + a, sums);
        for (int j = 0; j < 16; ++j) add(a + j, sums[j]);
      }
      for (std::int32_t sum; a < lds; ++a) {
        sr[a] = one_block(xr + kActBlock * a, kActBlock, k, qr + kActBlock * a, sum);
        add(a, sum);
      }
      continue;
    }
    for (std::int64_t b = 0; b < nb; ++b) {  // the last activation block of each weight block is short
      float zsum = 0.f;
      for (std::int64_t a = 0; a < per_block; ++a) {
        const std::int64_t c0 = b * pb + kActBlock * a;
        std::int32_t sum;
        const float scale = one_block(xr + c0, std::min<std::int64_t>(pb - kActBlock * a, kActBlock), k, qr + c0, sum);
        sr[b * per_block + a] = scale;
        zsum = std::fma(scale, static_cast<float>(sum), zsum);
      }
      zr[b] = zsum;
    }
  }
}

}  // namespace qmoe::cpu
