// The CPU backend against the float64 reference over the whole contract, on each kernel
// table this CPU runs (one test instance per table: Tables/Parity.<test>/<table>).
#include <gtest/gtest.h>

#include <tuple>

#include "cpu/kernels.h"
#include "cpu/moe.h"
#include "helpers.h"

namespace qmoe::test {
namespace {

struct Case {
  int bits, block;
  bool symmetric, bias;
  Activation act;
  int fusion, k;
  std::int64_t t;
};

std::string name_of(const Case& c) {
  return std::to_string(c.bits) + "bit_b" + std::to_string(c.block) + (c.symmetric ? "_sym" : "_zp") +
         (c.bias ? "_bias" : "") + "_" + activation_name(c.act) + std::to_string(c.fusion) + "_k" +
         std::to_string(c.k) + "_T" + std::to_string(c.t);
}

// The output of table kc against the float64 reference: max relative error.
double run_case(const cpu::KernelConfig* kc, const Case& c, std::int64_t h, std::int64_t in, std::int64_t e,
                bool with_router_weights = false, int normalize = 1) {
  MoeAttributes a;
  a.k = c.k;
  a.activation = c.act;
  a.expert_weight_bits = c.bits;
  a.block_size = c.block;
  a.swiglu_fusion = c.fusion;
  a.normalize_routing_weights = normalize;
  if (c.act == Activation::swiglu) a.activation_alpha = 1.702f, a.activation_beta = 1.0f, a.swiglu_limit = 7.0f;
  tools::SynthOptions so;
  so.symmetric = c.symmetric;
  so.bias = c.bias;
  so.seed = 7 + static_cast<std::uint64_t>(c.t);
  const auto s = tools::synth_layer(e, h, in, a, so);
  const Inputs x = random_inputs(c.t, h, e, 99);
  const TensorView xv = view_f32(x.x.data(), {c.t, h}), lv = view_f32(x.logits.data(), {c.t, e});
  const TensorView mv = with_router_weights ? view_f32(x.mix.data(), {c.t, e}) : TensorView{};
  const auto ref = reference_forward(s.views(), a, xv, lv, mv);
  const cpu::CpuMoe moe(s.views(), a, s.shape, 2, 0, cpu::CpuMoe::kDefaultChunkBytes, kc);
  std::vector<float> out(static_cast<std::size_t>(c.t * h), NAN);
  moe.forward(xv, lv, mv, output_f32(out.data(), {c.t, h}), c.t);
  return rel_max_error(out, ref);
}

QMOE_PER_TABLE_SUITE(Parity);

TEST_P(Parity, ContractSweepAgainstFloat64Reference) {
  int n = 0;
  for (int bits : {4, 8})
    for (int block : {0, 16, 32, 64, 128})
      for (bool sym : {true, false})
        for (auto act :
             {Activation::swiglu, Activation::relu, Activation::gelu, Activation::silu, Activation::identity}) {
          const int fusion = act == Activation::swiglu ? (n % 3) : 0;
          const Case c{bits, block, sym, n % 2 == 0, act, fusion, 1 + n % 4, std::int64_t{1 + (n * 5) % 17}};
          ++n;
          const std::int64_t h = block == 128 ? 256 : 128, in = block >= 64 ? 128 : 96;
          EXPECT_LE(run_case(GetParam(), c, h, in, 6), 1e-5) << name_of(c);
        }
}

TEST_P(Parity, TokenCountsAroundTheKernelRegimes) {
  // Few tokens per expert use the decode path, many the dequantize-and-reuse path. Tokens per
  // expert (t / 2 with k = 1 of 2 experts) around every table's decode block (2 or 4 tokens),
  // reuse threshold (f32.reuse_from: 4 or 32) and prefill register blocks (2, 6, 12 tokens), both
  // bit widths; the tile tests (test_tile_kernels.cpp) sweep each kernel exactly.
  for (int bits : {4, 8})
    for (std::int64_t t : {1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 25, 31, 64, 65, 80, 150}) {
      const Case c{bits, 0, true, true, Activation::swiglu, 1, 2, t};
      EXPECT_LE(run_case(GetParam(), c, 64, 40, 4), 1e-5) << name_of(c);
    }
}

TEST_P(Parity, RouterWeightsMixWhileRouterProbsChoose) {
  for (int norm : {0, 1}) {
    const Case c{4, 32, true, true, Activation::silu, 0, 3, 11};
    EXPECT_LE(run_case(GetParam(), c, 64, 64, 8, true, norm), 1e-5) << "normalize_routing_weights=" << norm;
  }
}

TEST_P(Parity, KEqualsNumberOfExperts) {
  const Case c{8, 0, false, true, Activation::gelu, 0, 5, 9};
  EXPECT_LE(run_case(GetParam(), c, 32, 48, 5), 1e-5);
}

TEST_P(Parity, OddIntermediateSizeAndTinyShapes) {
  // I not a multiple of the 16-row tile (odd I needs 8-bit for FC2's rows), H = 2.
  const Case c{8, 0, true, true, Activation::swiglu, 2, 2, 5};
  EXPECT_LE(run_case(GetParam(), c, 2, 3, 3), 1e-5);
  const Case d{8, 0, true, false, Activation::relu, 0, 1, 3};
  EXPECT_LE(run_case(GetParam(), d, 18, 17, 2), 1e-5);
  // Row-wise K not a multiple of the 8-column code group: packed with zero-weight padding.
  for (std::int64_t t : {1, 3, 9}) {
    const Case p{4, 0, false, true, Activation::gelu, 0, 2, t};
    EXPECT_LE(run_case(GetParam(), p, 10, 6, 3), 1e-5);
    const Case q{8, 0, false, true, Activation::swiglu, 0, 2, t};
    EXPECT_LE(run_case(GetParam(), q, 7, 5, 3), 1e-5);
  }
}

}  // namespace
}  // namespace qmoe::test
