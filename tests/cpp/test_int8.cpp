// accuracy_level 4 (int8 activations), on each kernel table this CPU runs (one test
// instance per table): error bound against the float64 reference, and the bits of the
// portable table (the integer dot products are exact and the float steps are the same fused
// operations, so the VNNI kernels must agree with the plain C++ ones exactly).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "cpu/kernels.h"
#include "cpu/moe.h"
#include "cpu/quant_act.h"
#include "helpers.h"

namespace qmoe::test {
namespace {

// Relative L2 error of one case on table kc (the same on every table), whose output must have
// the portable table's bits; the caller bounds the mean too.
double check(const cpu::KernelConfig* kc, const Case& c) {
  const Problem p(c, 21);
  const std::vector<float> out = p.cpu_output(kc, 2, 4);
  const double err = rel_l2(out, p.ref);
  // A single small case (one token, k = 1, H = 256) scatters around the mean:
  // bound each case at 1.5e-2 and the mean over cases at 1e-2.
  EXPECT_LE(err, 1.5e-2) << "bits=" << c.bits << " block=" << c.block << " T=" << c.t;
  EXPECT_GT(err, 0.0) << "int8 activations cannot be exact";
  const cpu::KernelConfig* portable = &cpu::kernel_config_named("scalar");
  if (kc != portable) {
    const std::vector<float> want = p.cpu_output(portable, 2, 4);
    EXPECT_EQ(std::memcmp(want.data(), out.data(), out.size() * 4), 0)
        << "differs from the scalar table: bits=" << c.bits << " block=" << c.block << " T=" << c.t;
  }
  return err;
}

QMOE_PER_TABLE_SUITE(Int8Activations);

TEST_P(Int8Activations, ErrorBoundAndThePortableBits) {
  int n = 0;
  double sum = 0;
  for (int bits : {4, 8})
    for (int block : {0, 16, 32, 128})
      for (bool sym : {true, false}) {
        const Activation act = n % 3 == 0 ? Activation::swiglu : n % 3 == 1 ? Activation::gelu : Activation::relu;
        const std::int64_t t = std::int64_t{1} + (n * 7) % 23;
        sum += check(GetParam(),
                     {bits, block, sym, act, act == Activation::swiglu ? 1 + n % 2 : 0, 1 + n % 4, 256, 128, 6, t});
        ++n;
      }
  EXPECT_LE(sum / n, 1e-2);
}

TEST_P(Int8Activations, RowwisePaddingAndManyTokens) {
  check(GetParam(),
        {4, 0, false, Activation::silu, 0, 2, 40, 24, 3, 37});  // K = 40, 24: groups of 8, partial act blocks
  check(GetParam(), {8, 0, true, Activation::swiglu, 0, 3, 36, 20, 4, 50});  // fc3 path, 8-bit groups of 4
}

// The table's activation quantizer gives the portable one's bits: codes, scales and
// zsums, for whole and short activation blocks, 16 blocks at a time and one by one,
// with blocks holding inf, NaN, only zeros, or a denormal maximum.
TEST_P(Int8Activations, QuantizerGivesThePortableBits) {
  struct Shape {
    int bits;
    std::int64_t cols, block;
  };
  for (const Shape sh : {Shape{4, 2880, 2880}, Shape{8, 2880, 2880}, Shape{4, 600, 40}, Shape{8, 264, 264},
                         Shape{4, 1024, 16}, Shape{8, 1024, 32}, Shape{4, 1024, 128}, Shape{4, 40, 40}}) {
    const cpu::PackGeometry g{sh.bits, 16, sh.cols, sh.block};
    const std::int64_t rows = 9, ld = g.padded_cols();
    std::vector<float> x(static_cast<std::size_t>(rows * ld), 0.f);
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.f, 2.f);
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < sh.cols; ++c) x[r * ld + c] = nd(rng);
    x[1 * ld + 3] = INFINITY;
    x[2 * ld + 17] = NAN;
    x[3 * ld + 300 % sh.cols] = -INFINITY;
    for (std::int64_t c = 16; c < 32; ++c) x[4 * ld + c] = 0.f;
    for (std::int64_t c = 0; c < 16; ++c) x[5 * ld + c] = c % 3 ? 1e-40f : -3e-41f;
    cpu::QuantRowsBuffer want, got;
    cpu::resize_for(want, rows, g);
    cpu::quantize_rows(x.data(), ld, 0, rows, g, want);
    cpu::resize_for(got, rows, g);
    GetParam()->qd8.quantize_rows(x.data(), ld, 0, rows, g, got);
    const std::string what =
        "bits=" + std::to_string(sh.bits) + " cols=" + std::to_string(sh.cols) + " block=" + std::to_string(sh.block);
    EXPECT_EQ(want.q, got.q) << what;
    EXPECT_EQ(std::memcmp(want.scale.data(), got.scale.data(), want.scale.size() * 4), 0) << what;
    EXPECT_EQ(std::memcmp(want.zsum.data(), got.zsum.data(), want.zsum.size() * 4), 0) << what;
  }
}

TEST_P(Int8Activations, NonFiniteInputPropagates) {
  MoeAttributes a;
  a.k = 2;
  const auto s = tools::synth_layer(3, 64, 32, a);
  const cpu::CpuMoe moe(s.views(), a, s.shape, 1, 4, cpu::CpuMoe::kDefaultChunkBytes, GetParam());
  auto x = random_inputs(2, 64, 3, 5);
  x.x[10] = INFINITY;
  std::vector<float> out(128);
  moe.forward(view_f32(x.x.data(), {2, 64}), view_f32(x.logits.data(), {2, 3}), TensorView{},
              output_f32(out.data(), {2, 64}), 2);
  EXPECT_TRUE(std::isnan(out[0]));      // token 0 saw the inf
  EXPECT_TRUE(std::isfinite(out[64]));  // token 1 did not
}

}  // namespace
}  // namespace qmoe::test
