#include "cpu/epilogue.h"

#include <cstring>

#include "core/activation.h"
#include "cpu/packed.h"

// One clone per vector width, picked at load time from the CPU (GCC on
// x86-64 ELF): the loops below vectorize at 512 bits where the CPU allows.
// (Not under the sanitizers: their run-time starts after ifunc resolvers run.)
#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_UNDEFINED__)
#define QMOE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QMOE_MULTIVERSION
#endif

namespace qmoe::cpu {

namespace {
constexpr int kNr = kTileRows;
// Rows gathered into flat arrays at once (6 KiB on the stack); a multiple of the 16-row
// A-tile blocks, so each pass starts on a block boundary of the blocked bf16 output.
constexpr std::int64_t kRowsPerPass = 32;
static_assert(kRowsPerPass % 16 == 0);

// Copies the first n of the outs values of rows r < m (src rows outs apart) to row_at(r).
// Whole tiles (n == outs) copy a constant size, which compiles to a few moves.
template <class T, class RowAt>
inline void store_rows(const T* src, std::int64_t m, int outs, int n, RowAt row_at) {
  if (n == outs && outs == kNr / 2) {
    for (std::int64_t r = 0; r < m; ++r) std::memcpy(row_at(r), src + r * outs, kNr / 2 * sizeof(T));
  } else if (n == outs) {
    for (std::int64_t r = 0; r < m; ++r) std::memcpy(row_at(r), src + r * outs, kNr * sizeof(T));
  } else {
    for (std::int64_t r = 0; r < m; ++r)
      for (int q = 0; q < n; ++q) row_at(r)[q] = src[r * outs + q];
  }
}
}  // namespace

// Each pass gathers up to kRowsPerPass rows into flat arrays (gate / up separated),
// runs the activation over them in one long loop that vectorizes at full width, and
// writes the valid outputs back. All loops live in this multiversioned function, so
// every clone compiles them for its own ISA.
QMOE_MULTIVERSION
void fc1_epilogue(const Fc1Epilogue& p, const float* y, std::int64_t ldy, std::int64_t rows, const float* bias,
                  const Fc1Dst& dst, int valid) {
  const float alpha = p.alpha, beta = p.beta, limit = p.limit;
  const bool gated = p.kind == Activation::swiglu;
  const int outs = gated ? kNr / 2 : kNr, n = valid < outs ? valid : outs;
  float a[kRowsPerPass * kNr], b[kRowsPerPass * kNr / 2], v[kRowsPerPass * kNr];
  std::uint16_t vb[kRowsPerPass * kNr];
  for (std::int64_t r0 = 0; r0 < rows; r0 += kRowsPerPass) {
    const std::int64_t m = rows - r0 < kRowsPerPass ? rows - r0 : kRowsPerPass, len = m * outs;
    const float* yb = y + r0 * ldy;
    if (gated) {
      for (std::int64_t r = 0; r < m; ++r)
        for (int q = 0; q < kNr / 2; ++q) {
          a[r * 8 + q] = yb[r * ldy + 2 * q] + bias[2 * q];
          b[r * 8 + q] = yb[r * ldy + 2 * q + 1] + bias[2 * q + 1];
        }
      for (std::int64_t i = 0; i < len; ++i) v[i] = detail::fast_swiglu(a[i], b[i], alpha, beta, limit);
    } else {
      for (std::int64_t r = 0; r < m; ++r)
        for (int q = 0; q < kNr; ++q) a[r * kNr + q] = yb[r * ldy + q] + bias[q];
      switch (p.kind) {
        case Activation::relu:
          for (std::int64_t i = 0; i < len; ++i) v[i] = detail::fast_activate(Activation::relu, a[i]);
          break;
        case Activation::gelu:
          for (std::int64_t i = 0; i < len; ++i) v[i] = detail::fast_activate(Activation::gelu, a[i]);
          break;
        case Activation::silu:
          for (std::int64_t i = 0; i < len; ++i) v[i] = detail::fast_activate(Activation::silu, a[i]);
          break;
        default:
          for (std::int64_t i = 0; i < len; ++i) v[i] = a[i];
          break;
      }
    }
    if (dst.bf16) {
      // One conversion call per pass, then each row's outputs into its A-tile row.
      dst.to_bf16(v, vb, len);
      std::uint16_t* db = dst.bf16 + r0 * dst.ld;  // r0: a block boundary
      store_rows(vb, m, outs, n, [&](std::int64_t r) { return db + r / 16 * 16 * dst.ld + r % 16 * 32; });
    } else {
      float* db = dst.f32 + r0 * dst.ld;
      store_rows(v, m, outs, n, [&](std::int64_t r) { return db + r * dst.ld; });
    }
  }
}

}  // namespace qmoe::cpu
