// The quantizer: float expert matrices -> raw ONNX Runtime layout.
#include "qmoe/quantize.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "quant/raw.h"

namespace qmoe {

TensorView QuantizedWeights::weights_view() const {
  return {weights.data(), DType::u8, {experts, rows, cols * bits / 8}};
}

TensorView QuantizedWeights::scales_view() const {
  if (block_size == 0) return {scales.data(), DType::f32, {experts, rows}};
  return {scales.data(), DType::f32, {experts, rows, cols / block_size}};
}

TensorView QuantizedWeights::zero_points_view() const {
  if (zero_points.empty()) return {};
  const std::int64_t pack = 8 / bits;
  if (block_size == 0) return {zero_points.data(), DType::u8, {experts, (rows + pack - 1) / pack}};
  return {zero_points.data(), DType::u8, {experts, rows, (cols / block_size + pack - 1) / pack}};
}

namespace {

// Stores code v at element `index` of a packed byte row.
void put(std::uint8_t* row, std::int64_t index, int bits, int v) {
  if (bits == 8) {
    row[index] = static_cast<std::uint8_t>(v);
  } else if (index % 2 == 0) {
    row[index / 2] = static_cast<std::uint8_t>((row[index / 2] & 0xf0) | v);
  } else {
    row[index / 2] = static_cast<std::uint8_t>((row[index / 2] & 0x0f) | (v << 4));
  }
}

// Round to nearest, ties to even (what std::nearbyint does in the default
// rounding mode), without the libm call nearbyint costs on baseline x86-64:
// adding and subtracting 1.5 * 2^23 leaves no fraction bits for |x| < 2^22.
// Larger magnitudes (and infinities) are integers already.
inline float round_even(float x) {
  constexpr float kMagic = 12582912.f;
  if (!(std::fabs(x) < 4194304.f)) return x;
  return (x + kMagic) - kMagic;  // not reassociated: the library is not built with -ffast-math
}

}  // namespace

QuantizedWeights quantize(const TensorView& w, const QuantizeOptions& o) {
  using namespace detail;
  require(o.bits == 4 || o.bits == 8, "bits: expected 4 or 8, got ", o.bits);
  if (!(w.present() && w.rank() == 3)) fail("w: expected rank 3 [E, N, K], got shape ", shape_str(w.shape));
  require_float(w, "w");
  require_data(w, "w");
  const std::int64_t e = w.shape[0], n = w.shape[1], k = w.shape[2];
  const std::int64_t pack = 8 / o.bits;
  if (!(e >= 1 && n >= 1 && k >= 1)) fail("w: expected non-empty [E, N, K], got shape ", shape_str(w.shape));
  require(k % pack == 0, "w: K = ", k, " must be a multiple of ", pack, " for ", o.bits, "-bit weights");
  require(o.block_size == 0 || (o.block_size >= 16 && (o.block_size & (o.block_size - 1)) == 0),
          "block_size: expected 0 (row-wise) or a power of two >= 16, got ", o.block_size);
  require(o.block_size == 0 || k % o.block_size == 0, "block_size: ", o.block_size, " does not divide K = ", k);

  QuantizedWeights q;
  q.experts = e, q.rows = n, q.cols = k, q.bits = o.bits, q.block_size = o.block_size;
  const std::int64_t bl = o.block_size ? o.block_size : k, nb = k / bl;
  const std::int64_t zp_row_bytes = o.block_size ? (nb + pack - 1) / pack : 0;
  q.weights.assign(static_cast<std::size_t>(e * n * (k / pack)), 0);
  q.scales.assign(static_cast<std::size_t>(e * n * nb), 0.f);
  if (!o.symmetric)
    q.zero_points.assign(static_cast<std::size_t>(o.block_size ? e * n * zp_row_bytes : e * ((n + pack - 1) / pack)),
                         0);
  const int levels = (1 << o.bits) - 1, offset = 1 << (o.bits - 1), qmax = offset - 1;
  std::vector<float> vals(static_cast<std::size_t>(bl));
  double err2 = 0, ref2 = 0, errmax = 0;
  const std::int64_t esize = static_cast<std::int64_t>(dtype_size(w.dtype));
  for (std::int64_t ei = 0; ei < e; ++ei)
    for (std::int64_t r = 0; r < n; ++r) {
      std::uint8_t* wrow = q.weights.data() + (ei * n + r) * (k / pack);
      for (std::int64_t b = 0; b < nb; ++b) {
        const std::int64_t base = (ei * n + r) * k + b * bl;
        // The block as float32 in one call, then a loop without calls (so the
        // running minimum, maximum and absmax stay in registers).
        to_f32(static_cast<const std::uint8_t*>(w.data) + base * esize, w.dtype, bl, vals.data());
        float lo = 0.f, hi = 0.f, amax = 0.f;  // the range always includes 0 so that 0 is representable
        bool finite = true;
        for (std::int64_t c = 0; c < bl; ++c) {
          const float v = vals[static_cast<std::size_t>(c)];
          finite &= std::isfinite(v);
          lo = std::min(lo, v), hi = std::max(hi, v), amax = std::max(amax, std::fabs(v));
        }
        if (!finite)
          for (std::int64_t c = 0; c < bl; ++c)
            require(std::isfinite(vals[static_cast<std::size_t>(c)]), "w: non-finite value ",
                    vals[static_cast<std::size_t>(c)], " at [", ei, ", ", r, ", ", b * bl + c, "]");
        float scale;
        int zp;
        if (o.symmetric) {
          scale = amax / static_cast<float>(qmax);
          zp = offset;
        } else {
          scale = (hi - lo) / static_cast<float>(levels);
          zp = scale > 0 ? static_cast<int>(std::clamp(round_even(-lo / scale), 0.f, static_cast<float>(levels)))
                         : offset;
        }
        const float inv = scale > 0 ? 1.f / scale : 0.f;
        double e2 = 0, r2 = 0, emax = 0;  // per block: short dependency chains
        for (std::int64_t c = 0; c < bl; ++c) {
          const float v = vals[static_cast<std::size_t>(c)];
          const int qv = static_cast<int>(
              std::clamp(round_even(v * inv) + static_cast<float>(zp), 0.f, static_cast<float>(levels)));
          put(wrow, b * bl + c, o.bits, qv);
          const double d = static_cast<double>(scale) * (qv - zp) - v;
          e2 += d * d, r2 += static_cast<double>(v) * v, emax = std::max(emax, std::fabs(d));
        }
        err2 += e2, ref2 += r2, errmax = std::max(errmax, emax);
        q.scales[static_cast<std::size_t>((ei * n + r) * nb + b)] = scale;
        if (!o.symmetric) {
          if (o.block_size)
            put(q.zero_points.data() + (ei * n + r) * zp_row_bytes, b, o.bits, zp);
          else
            put(q.zero_points.data() + ei * ((n + pack - 1) / pack), r, o.bits, zp);
        }
      }
    }
  q.max_abs_error = errmax;
  q.rel_l2_error = ref2 > 0 ? std::sqrt(err2 / ref2) : 0.0;
  return q;
}

}  // namespace qmoe
