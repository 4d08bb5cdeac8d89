// Every tile kernel this CPU can run, on its own, against a float64 dot product of the raw
// codes (in the spirit of XNNPACK's gemm-microkernel-tester.h). One test per (kernel, bits,
// block): token counts across the kernel's regime boundaries (the table's f32.reuse_from,
// register blocks, remainders, AMX token blocks and tile pairs), K with and without tails,
// runs of tiles, partial last tiles, input and output strides, three kinds of zero points.
//
// The weights are random raw ONNX Runtime bytes, packed by the packer; the reference decodes
// the same raw bytes with its own few lines below (from include/qmoe/weights.h), never through
// the packer or an unpacker. Outputs outside the kernel's rows and tokens must keep a sentinel.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "amx_model.h"
#include "cpu/kernels.h"
#include "cpu/pack.h"
#include "cpu/quant_act.h"
#include "quant/raw.h"

namespace qmoe::test {
namespace {

enum class Kind { f32, qd8, bf16 };

struct TileKernelCase {
  std::string name;  // the kernel's, and the block
  Kind kind;
  const cpu::KernelConfig* table;  // the first supported table with the kernel (its thresholds, quantizer)
  int bits, block;                 // block 0: row-wise
};
void PrintTo(const TileKernelCase& c, std::ostream* os) { *os << c.name << " (" << c.table->name << ")"; }

// One case per distinct kernel of the tables this CPU runs, for each bit width and block.
std::vector<TileKernelCase> tile_kernel_cases() {
  std::vector<const cpu::KernelConfig*> tables = cpu::supported_kernel_configs();
  if (amx_model_table()) tables.push_back(amx_model_table());  // AMX kernels on the tile model
  std::vector<TileKernelCase> cases;
  auto add = [&](Kind kind, const cpu::KernelConfig* kc, int bits, const char* name) {
    for (const TileKernelCase& c : cases)
      if (c.name.rfind(std::string(name) + "_b", 0) == 0) return;  // another table's
    for (int block : {0, 16, 32, 64, 128})
      cases.push_back({std::string(name) + "_b" + std::to_string(block), kind, kc, bits, block});
  };
  for (const cpu::KernelConfig* kc : tables)
    for (int bits : {4, 8}) {
      add(Kind::f32, kc, bits, kc->f32.gemm(bits).name);
      add(Kind::qd8, kc, bits, kc->qd8.gemm(bits).name);
      if (kc->has_bf16()) add(Kind::bf16, kc, bits, kc->bf16.gemm(bits).name);
    }
  return cases;
}

// Raw ONNX Runtime bytes of one [1, N, K] matrix with random codes and scales. Zero points:
// 0 absent (2^(bits-1)), 1 present and all equal (3), 2 present and random.
struct RawWeights {
  int bits, block;
  std::int64_t n, k;
  std::vector<std::uint8_t> w, z;
  std::vector<float> s;

  RawWeights(int bits_, int block_, std::int64_t n_, std::int64_t k_, int zero_mode, std::mt19937& rng)
      : bits(bits_), block(block_), n(n_), k(k_) {
    std::uniform_int_distribution<int> byte(0, 255);
    std::normal_distribution<float> nd(0.f, 0.05f);
    w.resize(static_cast<std::size_t>(n * k * bits / 8));
    for (auto& b : w) b = static_cast<std::uint8_t>(byte(rng));
    s.resize(static_cast<std::size_t>(n * blocks()));
    for (auto& v : s) v = nd(rng);
    if (zero_mode == 0) return;
    const std::int64_t pack = 8 / bits;
    z.resize(static_cast<std::size_t>(block ? n * ((blocks() + pack - 1) / pack) : (n + pack - 1) / pack));
    for (auto& b : z) b = static_cast<std::uint8_t>(zero_mode == 1 ? (bits == 4 ? 0x33 : 3) : byte(rng));
  }
  std::int64_t blocks() const { return block ? k / block : 1; }

  // Decoded from the layout of include/qmoe/weights.h alone.
  int code(std::int64_t r, std::int64_t c) const {
    const std::uint8_t b = w[static_cast<std::size_t>(r * (k * bits / 8) + c * bits / 8)];
    return bits == 8 ? b : (c % 2 ? b >> 4 : b & 15);
  }
  int zero(std::int64_t r, std::int64_t blk) const {
    if (z.empty()) return 1 << (bits - 1);
    const std::int64_t pack = 8 / bits, i = block ? blk : r;  // packed along the blocks, or across the rows
    const std::uint8_t b =
        z[static_cast<std::size_t>(block ? r * ((blocks() + pack - 1) / pack) + i / pack : i / pack)];
    return bits == 8 ? b : (i % 2 ? b >> 4 : b & 15);
  }
  float scale(std::int64_t r, std::int64_t blk) const { return s[static_cast<std::size_t>(r * blocks() + blk)]; }

  detail::RawMatrix raw() const {
    const std::int64_t pack = 8 / bits;
    const TensorView wv(w.data(), DType::u8, {1, n, k / pack});
    const TensorView sv(s.data(), DType::f32,
                        block ? std::vector<std::int64_t>{1, n, blocks()} : std::vector<std::int64_t>{1, n});
    const TensorView zv = z.empty() ? TensorView{}
                                    : TensorView(z.data(), DType::u8,
                                                 block ? std::vector<std::int64_t>{1, n, (blocks() + pack - 1) / pack}
                                                       : std::vector<std::int64_t>{1, (n + pack - 1) / pack});
    return detail::RawMatrix(wv, sv, zv, bits, block, n, k);
  }
};

float bf16_round(float v) {  // round to nearest even, as the kernels' conversions do
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
  std::memcpy(&v, &u, 4);
  return v;
}
std::uint16_t bf16_bits(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<std::uint16_t>(u >> 16);
}

constexpr std::uint32_t kSentinel = 0x7FA5A5A5u;  // a NaN no kernel computes

// One kernel call: K columns, ntok tokens, a run of ntiles tiles holding n rows, input and
// output strides, zero-point kind.
struct Call {
  std::int64_t k, ntok, ntiles, n, ldx, ldy;
  int zero_mode;
};

// Runs one call of tc's kernel on fresh random weights and activations and checks every output
// against the float64 reference (within 1e-5 of the magnitude summed) and every other float
// of the output buffer against the sentinel. Returns the outputs checked.
std::int64_t check_call(const TileKernelCase& tc, const Call& call, std::mt19937& rng) {
  const cpu::KernelConfig& kc = *tc.table;
  const int bits = tc.bits, block = tc.block;
  const std::int64_t k = call.k, ntok = call.ntok, ntiles = call.ntiles, n = call.n, ldx = call.ldx, ldy = call.ldy;
  const std::int64_t nout = ntiles * 16;
  const RawWeights rw(bits, block, n, k, call.zero_mode, rng);
  const detail::RawMatrix raw = rw.raw();
  const cpu::PackGeometry g{bits, n, k, block ? block : k};
  cpu::PackedMatrix m(g, kc.isa, 1);
  cpu::pack_expert(
      g, 0,
      [&](std::int64_t p) {
        return cpu::RowSource{&raw, p};
      },
      m.expert(0));
  const std::int64_t kp = g.padded_cols();
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(static_cast<std::size_t>(ntok * ldx), 0.f);  // zero-padded columns
  for (std::int64_t t = 0; t < ntok; ++t)
    for (std::int64_t c = 0; c < k; ++c) x[t * ldx + c] = tc.kind == Kind::bf16 ? bf16_round(nd(rng)) : nd(rng);
  std::vector<float> y(static_cast<std::size_t>((ntok + 2) * ldy));  // 2 rows past the tokens
  for (float& v : y) std::memcpy(&v, &kSentinel, 4);

  // The kernel, and xr: the activations it multiplies.
  std::vector<double> xr(static_cast<std::size_t>(ntok * k));
  for (std::int64_t t = 0; t < ntok; ++t)
    for (std::int64_t c = 0; c < k; ++c) xr[t * k + c] = x[t * ldx + c];
  if (tc.kind == Kind::f32) {
    std::vector<float> scratch(static_cast<std::size_t>(kc.f32.scratch_floats));
    kc.f32.gemm(bits).fn(g, m.tile(0, 0), ntiles, x.data(), ldx, ntok, y.data(), ldy, scratch.data());
  } else if (tc.kind == Kind::qd8) {
    cpu::QuantRowsBuffer qb;
    cpu::resize_for(qb, ntok, g);
    kc.qd8.quantize_rows(x.data(), ldx, 0, ntok, g, qb);
    const cpu::QuantRows q = qb.view(g);
    for (std::int64_t j = 0; j < ntiles; ++j) kc.qd8.gemm(bits).fn(g, m.tile(0, j), q, ntok, y.data() + 16 * j, ldy);
    // The dequantized int8 activations (quant_act.h: 4-bit codes in groups of 8 stored even
    // columns first; one scale per 16 columns of a block).
    const std::int64_t pb = g.padded_block(), per_block = cpu::act_blocks_per_block(g);
    for (std::int64_t t = 0; t < ntok; ++t)
      for (std::int64_t c = 0; c < k; ++c) {
        const std::int64_t in_group = c % 8, at = bits == 4 ? c - in_group + in_group % 2 * 4 + in_group / 2 : c;
        xr[t * k + c] = static_cast<double>(q.q[t * q.ldq + at]) *
                        q.scale[t * q.lds + c / pb * per_block + c % pb / cpu::kActBlock];
      }
  } else {
    const std::int64_t kb = (kp + 31) / 32 * 32;  // A-tile order (kernels.h), zero-padded
    std::vector<std::uint16_t> xb(static_cast<std::size_t>((ntok + 15) / 16 * 16 * kb), 0);
    for (std::int64_t t = 0; t < ntok; ++t)
      for (std::int64_t c = 0; c < k; ++c)
        xb[t / 16 * 16 * kb + c / 32 * 512 + t % 16 * 32 + c % 32] = bf16_bits(x[t * ldx + c]);
    std::vector<float> scratch(cpu::kBf16ScratchBytes / 4 + 16);
    kc.bf16.gemm(bits).fn(g, m.tile(0, 0), ntiles, xb.data(), kb, ntok, y.data(), ldy, scratch.data());
  }

  // The reference weights: scale * (code - zero) in float64. AMX weights are bf16 (scale *
  // (code - zero) rounded once to float32, then to bf16), except that a tile of symmetric
  // row-wise 4-bit rows multiplies code - 8 and applies the row scale after (amx_bf16_driver.h):
  // a full tile (padding rows have zero point 0), both tiles full where two run as a pair
  // (above 16 x kMaxTokenBlocks = 96 tokens). wmag: the magnitudes the kernel sums (int8: the
  // zero point comes off after the sums, quant_act.h).
  const bool pair = ntiles == 2 && ntok > 96;
  std::vector<double> w(static_cast<std::size_t>(n * k)), wmag(w.size()), post(static_cast<std::size_t>(n), 1.0);
  for (std::int64_t r = 0; r < n; ++r) {
    const bool sym = tc.kind == Kind::bf16 && bits == 4 && g.block_len == k && call.zero_mode == 0 &&
                     n >= (pair ? 2 : r / 16 + 1) * 16;
    if (sym) post[r] = rw.scale(r, 0);
    for (std::int64_t c = 0; c < k; ++c) {
      const std::int64_t b = block ? c / block : 0;
      const int q = rw.code(r, c) - rw.zero(r, b);
      double& v = w[r * k + c];
      if (tc.kind != Kind::bf16)
        v = static_cast<double>(rw.scale(r, b)) * q;
      else
        v = sym ? q : bf16_round(static_cast<float>(q) * rw.scale(r, b));
      wmag[r * k + c] =
          tc.kind == Kind::qd8 ? std::fabs(rw.scale(r, b)) * (rw.code(r, c) + rw.zero(r, b)) : std::fabs(v);
    }
  }
  std::int64_t checked = 0;
  for (std::int64_t t = 0; t < ntok; ++t)
    for (std::int64_t r = 0; r < nout; ++r) {
      const float got = y[t * ldy + r];
      if (r >= n) {  // a padding row: zero scale
        EXPECT_EQ(got, 0.f) << tc.name << " padding row " << r << " T=" << ntok << " K=" << k;
        continue;
      }
      double ref = 0, mag = 0;
      for (std::int64_t c = 0; c < k; ++c) {
        ref += w[r * k + c] * xr[t * k + c];
        mag += wmag[r * k + c] * std::fabs(xr[t * k + c]);
      }
      ref *= post[r], mag *= std::fabs(post[r]);
      if (!(std::fabs(got - ref) <= 1e-5 * mag + 1e-30)) {
        ADD_FAILURE() << tc.name << " row " << r << " token " << t << " of " << ntok << ", K=" << k << ", " << ntiles
                      << " tiles, zero points " << call.zero_mode << ": got " << got << ", want " << ref;
        return checked;
      }
      ++checked;
    }
  // Nothing outside the kernel's rows and tokens is written.
  for (std::int64_t t = 0; t < ntok + 2; ++t)
    for (std::int64_t r = t < ntok ? nout : 0; r < ldy; ++r)
      if (std::memcmp(&y[t * ldy + r], &kSentinel, 4) != 0) {
        ADD_FAILURE() << tc.name << " wrote token " << t << " of " << ntok << ", column " << r << " (ldy " << ldy
                      << ")";
        return checked;
      }
  return checked;
}

class TileKernel : public ::testing::TestWithParam<TileKernelCase> {};

TEST_P(TileKernel, MatchesFloat64DotProductOfRawCodes) {
  const TileKernelCase& tc = GetParam();
  const int bits = tc.bits, block = tc.block;
  // Token counts: every count to 40, then around the larger block sizes and thresholds.
  const std::int64_t reuse_from = tc.table->f32.reuse_from;
  std::vector<std::int64_t> tokens;
  for (std::int64_t t = 1; t <= 40; ++t) tokens.push_back(t);
  for (std::int64_t t : {reuse_from - 1, reuse_from, reuse_from + 1, std::int64_t{47}, std::int64_t{48},
                         std::int64_t{49}, std::int64_t{64}, std::int64_t{65}, std::int64_t{95}, std::int64_t{96},
                         std::int64_t{97}, std::int64_t{113}, std::int64_t{150}})
    if (t > 40) tokens.push_back(t);
  // K: row-wise with a group tail (and past a 256-column dequantization chunk), or whole blocks.
  const std::vector<std::int64_t> ks = block ? std::vector<std::int64_t>{block, 3 * block, (300 / block + 1) * block}
                                             : std::vector<std::int64_t>{bits == 4 ? 36 : 37, 64, 302};
  const std::vector<std::int64_t> runs =
      tc.kind == Kind::f32 ? std::vector<std::int64_t>{1, 2, 3, 5} : std::vector<std::int64_t>{1, 2};
  std::mt19937 rng(static_cast<unsigned>(bits * 1000 + block));
  std::int64_t checked = 0;
  // Each token count twice, with the K, zero points, run of tiles and strides cycling so that
  // every combination of K and zero points meets many token counts.
  for (std::size_t ti = 0; ti < tokens.size(); ++ti)
    for (std::size_t rep = 0; rep < 2; ++rep) {
      const std::size_t v = ti + 5 * rep;
      Call call{.k = ks[v % 3],
                .ntok = tokens[ti],
                .ntiles = runs[(ti + rep) % runs.size()],
                .n = 0,
                .ldx = 0,
                .ldy = 0,
                .zero_mode = static_cast<int>((v / 3 + rep) % 3)};
      call.n = call.ntiles * 16 - (v % 4 == 1 ? 5 : 0);  // sometimes a partial last tile
      const cpu::PackGeometry g{bits, call.n, call.k, block ? block : call.k};
      call.ldx = g.padded_cols() + (v % 2 ? 5 : 0);
      call.ldy = call.ntiles * 16 + (v % 5 >= 3 ? 19 : 0);
      checked += check_call(tc, call, rng);
      if (HasFailure()) return;
    }
  EXPECT_GT(checked, 0);
}

INSTANTIATE_TEST_SUITE_P(Supported, TileKernel, ::testing::ValuesIn(tile_kernel_cases()),
                         [](const ::testing::TestParamInfo<TileKernelCase>& p) { return p.param.name; });

}  // namespace
}  // namespace qmoe::test
