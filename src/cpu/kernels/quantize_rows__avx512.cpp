// quantize_rows (quant_act.h) with AVX-512: one activation block of 16 columns
// per zmm. The same bits as the portable version: max and the integer sum are
// exact whatever the order, the scale, inverse and zsum steps are the same
// scalar operations, and the vector multiply, clamp and round-to-nearest-even
// conversion match the scalar ones lane by lane.
#include <immintrin.h>

#include <cfloat>
#include <cmath>

#include "cpu/kernels.h"
#include "cpu/quant_act.h"

namespace qmoe::cpu {

void quantize_rows__avx512(const float* x, std::int64_t ldx, std::int64_t r0, std::int64_t r1, const PackGeometry& g,
                           QuantRowsBuffer& out) {
  static_assert(kActBlock == 16, "one activation block per zmm");
  const std::int64_t pb = g.padded_block(), ldq = g.padded_cols(), lds = act_blocks_per_row(g);
  const std::int64_t per_block = act_blocks_per_block(g);
  // 4-bit weights: within each group of 8 columns, even columns first, then odd.
  const __m128i order = g.bits == 4 ? _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)
                                    : _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 inf = _mm512_set1_ps(INFINITY), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (std::int64_t row = r0; row < r1; ++row) {
    const float* xr = x + row * ldx;
    std::int8_t* qr = out.q.data() + row * ldq;
    float* sr = out.scale.data() + row * lds;
    for (std::int64_t b = 0; b < g.blocks(); ++b) {
      float zsum = 0.f;
      for (std::int64_t a = 0; a < per_block; ++a) {
        const std::int64_t c0 = b * pb + kActBlock * a;
        const std::int64_t n = pb - kActBlock * a < kActBlock ? pb - kActBlock * a : kActBlock;
        const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);  // lanes past n read as 0.f: no effect
        const __m512 v = _mm512_maskz_loadu_ps(m, xr + c0), av = _mm512_abs_ps(v);
        const bool finite = _mm512_cmp_ps_mask(av, inf, _CMP_LT_OQ) == 0xffff;  // NaN compares false
        const float amax = _mm512_reduce_max_ps(av);
        // Non-finite activations poison the block (NaN scale, zero codes); inv is capped so
        // that a tiny max cannot make it infinite (0 * inf is NaN).
        const float scale = finite ? amax / 127.f : NAN;
        const float inv = finite && amax > 0.f ? std::fmin(127.f / amax, FLT_MAX) : 0.f;
        const __m512 y = _mm512_maskz_mul_ps(finite ? m : __mmask16{0}, v, _mm512_set1_ps(inv));
        const __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(y, lo), hi));
        _mm_mask_storeu_epi8(qr + c0, m, _mm_shuffle_epi8(_mm512_cvtepi32_epi8(q), order));
        sr[b * per_block + a] = scale;
        zsum = std::fma(scale, static_cast<float>(_mm512_reduce_add_epi32(q)), zsum);
      }
      out.zsum[static_cast<std::size_t>(row * g.blocks() + b)] = zsum;
    }
  }
}

}  // namespace qmoe::cpu
