#include "cpu/quant_act.h"

#include <cfloat>
#include <cmath>

namespace qmoe::cpu {

void resize_for(QuantRowsBuffer& b, std::int64_t rows, const PackGeometry& g) {
  b.q.resize(static_cast<std::size_t>(rows * g.padded_cols()));
  b.scale.resize(static_cast<std::size_t>(rows * act_blocks_per_row(g)));
  b.zsum.resize(static_cast<std::size_t>(rows * g.blocks()));
}

void quantize_rows(const float* x, std::int64_t ldx, std::int64_t r0, std::int64_t r1, const PackGeometry& g,
                   QuantRowsBuffer& out) {
  const std::int64_t pb = g.padded_block(), ldq = g.padded_cols(), lds = act_blocks_per_row(g);
  const std::int64_t per_block = act_blocks_per_block(g);
  const bool nibbles = g.bits == 4;
  for (std::int64_t row = r0; row < r1; ++row) {
    const float* xr = x + row * ldx;
    std::int8_t* qr = out.q.data() + row * ldq;
    for (std::int64_t b = 0; b < g.blocks(); ++b) {
      float zsum = 0.f;
      for (std::int64_t a = 0; a < per_block; ++a) {
        const std::int64_t c0 = b * pb + kActBlock * a;
        const std::int64_t n = pb - kActBlock * a < kActBlock ? pb - kActBlock * a : kActBlock;
        float amax = 0.f;
        bool finite = true;
        for (std::int64_t c = 0; c < n; ++c) {
          finite &= std::isfinite(xr[c0 + c]);
          amax = std::fmax(amax, std::fabs(xr[c0 + c]));
        }
        // Non-finite activations poison the block (NaN scale, zero codes); inv is capped so
        // that a tiny max cannot make it infinite (0 * inf is NaN).
        const float scale = finite ? amax / 127.f : NAN;
        const float inv = finite && amax > 0.f ? std::fmin(127.f / amax, FLT_MAX) : 0.f;
        std::int32_t sum = 0;
        for (std::int64_t c = 0; c < n; ++c) {
          float v = finite ? xr[c0 + c] * inv : 0.f;
          v = v < -127.f ? -127.f : v > 127.f ? 127.f : v;
          const auto qv = static_cast<std::int8_t>(std::nearbyint(v));
          sum += qv;
          const std::int64_t col = c0 + c;
          std::int64_t dst = col;
          if (nibbles) {  // within a group of 8: even columns first, then odd
            const std::int64_t in_group = col % 8;
            dst = col - in_group + (in_group % 2) * 4 + in_group / 2;
          }
          qr[dst] = qv;
        }
        const std::int64_t s = row * lds + b * per_block + a;
        out.scale[static_cast<std::size_t>(s)] = scale;
        zsum = std::fma(scale, static_cast<float>(sum), zsum);
      }
      out.zsum[static_cast<std::size_t>(row * g.blocks() + b)] = zsum;
    }
  }
}

}  // namespace qmoe::cpu
