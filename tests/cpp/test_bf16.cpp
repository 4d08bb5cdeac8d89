// accuracy_level 3: bf16 activations and weights on AMX (where the CPU has it;
// elsewhere level 3 runs in float32). Against the float64 reference, one test instance per
// table: the AMX tables this CPU runs and the tile model's (amx_model.h), and the others.
#include <gtest/gtest.h>

#include <cstring>

#include "amx_model.h"
#include "cpu/epilogue.h"
#include "cpu/kernels.h"
#include "cpu/moe.h"
#include "helpers.h"

namespace qmoe::test {

bool amx_model_usable() {
  for (const cpu::KernelConfig* kc : cpu::supported_kernel_configs())
    if (kc->isa == cpu::Isa::avx512vnni) return __builtin_cpu_supports("avx512bf16");
  return false;
}

const cpu::KernelConfig* amx_model_table() {
  static const cpu::KernelConfig* table = []() -> const cpu::KernelConfig* {
    static cpu::KernelConfig m;
    for (const cpu::KernelConfig* kc : cpu::supported_kernel_configs())
      if (kc->isa == cpu::Isa::avx512vnni && amx_model_usable()) {
        m = *kc;
        m.name = "avx512vnni_amx_model";
        m.bf16 = cpu::kBf16Amx;  // its threshold and conversion (AVX-512 BF16 only); the model's tiles
        m.bf16.gemm = {{gemm_bf16_q4_model, "gemm_bf16_q4_model"}, {gemm_bf16_q8_model, "gemm_bf16_q8_model"}};
        return &m;
      }
    return nullptr;
  }();
  return table;
}

namespace {

// The tables whose level 3 runs the AMX kernel: the machine's own (real tiles), and,
// where the CPU can run it, the avx512vnni table with the tile model's kernels
// (amx_model.h), so the kernel's loops are tested on CPUs without AMX too.
std::vector<const cpu::KernelConfig*> amx_tables() {
  std::vector<const cpu::KernelConfig*> v;
  for (const cpu::KernelConfig* kc : cpu::supported_kernel_configs())
    if (kc->has_bf16()) v.push_back(kc);
  if (amx_model_table()) v.push_back(amx_model_table());
  return v;
}

// The error of table kc at level 3; 1 and 3 threads must give the same bits.
double run(const cpu::KernelConfig* kc, const Case& c) {
  const Problem p(c, 33);
  const std::vector<float> one = p.cpu_output(kc, 1, 3), three = p.cpu_output(kc, 3, 3);
  EXPECT_EQ(0, std::memcmp(one.data(), three.data(), one.size() * 4)) << "thread count changed bits";
  return rel_l2(one, p.ref);
}

// One instance per table with AMX kernels (none on a CPU without AMX or AVX-512 BF16).
class Bf16Amx : public PerTable {};
INSTANTIATE_TEST_SUITE_P(Tables, Bf16Amx, ::testing::ValuesIn(amx_tables()), table_name);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(Bf16Amx);

TEST_P(Bf16Amx, AgainstFloat64Reference) {
  const cpu::KernelConfig* kc = GetParam();
  int n = 0;
  for (int bits : {4, 8})
    for (int block : {0, 32, 128})
      for (bool sym : {true, false}) {
        const Activation act = n % 2 ? Activation::gelu : Activation::swiglu;
        // 200 tokens, k = 2 over 6 experts: most experts get >= 16 tokens (AMX); K = 384, not a power of two.
        const Case c{bits, block, sym, act, act == Activation::swiglu ? 1 + n % 2 : 0, 2, 384, 128, 6, 200};
        const double err = run(kc, c);
        EXPECT_LE(err, 1e-2) << "bits=" << bits << " block=" << block << " sym=" << sym;
        EXPECT_GT(err, 1e-6) << "bf16 cannot be exact";
        ++n;
      }
  // Row-wise K that is not a multiple of 32 (padded A/B tiles), fc3 path, tokens not a multiple of 16.
  EXPECT_LE(run(kc, {4, 0, false, Activation::swiglu, 0, 3, 72, 40, 4, 61}), 1e-2);
  // The same with symmetric weights: the table-lookup decode (codes - 8 exact in bf16, row scale in float32).
  EXPECT_LE(run(kc, {4, 0, true, Activation::swiglu, 0, 3, 72, 40, 4, 61}), 1e-2);
  EXPECT_LE(run(kc, {8, 0, true, Activation::relu, 0, 1, 36, 20, 2, 45}), 1e-2);
  // More than 96 tokens per expert: pairs of weight tiles per activation tile (symmetric and
  // general decoders, 4 and 8 bits, an odd tile count so single tiles follow pairs).
  EXPECT_LE(run(kc, {4, 0, true, Activation::swiglu, 1, 1, 96, 72, 2, 400}), 1e-2);
  EXPECT_LE(run(kc, {4, 32, false, Activation::gelu, 0, 1, 96, 64, 2, 300}), 1e-2);
  EXPECT_LE(run(kc, {8, 0, true, Activation::silu, 0, 1, 112, 64, 2, 300}), 1e-2);
}

// One instance per table without AMX kernels, where level 3 runs the float32 path.
std::vector<const cpu::KernelConfig*> tables_without_amx() {
  std::vector<const cpu::KernelConfig*> v;
  for (const cpu::KernelConfig* kc : cpu::supported_kernel_configs())
    if (!kc->has_bf16()) v.push_back(kc);
  return v;
}
class Level3WithoutAmx : public PerTable {};
INSTANTIATE_TEST_SUITE_P(Tables, Level3WithoutAmx, ::testing::ValuesIn(tables_without_amx()), table_name);

TEST_P(Level3WithoutAmx, IsFloat32) {
  MoeAttributes a;
  a.k = 2;
  a.activation = Activation::silu;
  const auto s = tools::synth_layer(3, 64, 32, a);
  const auto x = random_inputs(40, 64, 3, 2);
  const TensorView xv = view_f32(x.x.data(), {40, 64}), lv = view_f32(x.logits.data(), {40, 3});
  const auto ref = reference_forward(s.views(), a, xv, lv);
  const cpu::CpuMoe moe(s.views(), a, s.shape, 2, 3, cpu::CpuMoe::kDefaultChunkBytes, GetParam());
  std::vector<float> out(40 * 64);
  moe.forward(xv, lv, TensorView{}, output_f32(out.data(), {40, 64}), 40);
  EXPECT_LE(rel_max_error(out, ref), 1e-5);
}

// The FC1 epilogue writing the FC2 input of the AMX path (A-tile order, bf16) must place the
// very float32 values it writes on the float path, through the given conversion, and touch
// nothing else. Runs on every CPU (with a portable conversion), unlike the AMX kernels.
TEST(Bf16Epilogue, WritesBlockedBf16) {
  // Round to nearest even (finite inputs), standing in for the table's to_bf16.
  auto to_bf16 = [](const float* src, std::uint16_t* dst, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) {
      std::uint32_t u;
      std::memcpy(&u, &src[i], 4);
      dst[i] = static_cast<std::uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    }
  };
  constexpr std::int64_t kLd = 96;  // padded K of the blocked output: 3 K steps
  constexpr std::uint16_t kUntouched = 0xABCD;
  std::mt19937_64 rng(5);
  for (Activation act : {Activation::swiglu, Activation::gelu})
    for (std::int64_t rows : {5, 16, 37, 70})  // within a block, one block, across blocks and 32-row passes
      for (int valid : {16, 3}) {
        const int outs = act == Activation::swiglu ? 8 : 16;
        const std::int64_t first = 32 + outs;  // the tile's first output: in the second K step, not at its start
        const cpu::Fc1Epilogue epi{act, 1.702f, 1.f, 7.f};
        std::vector<float> y(static_cast<std::size_t>(rows * 16)), bias(16), ref(y.size(), NAN);
        tools::fill_normal(y, rng, 2.f);
        tools::fill_normal(bias, rng, 1.f);
        cpu::fc1_epilogue(epi, y.data(), 16, rows, bias.data(), cpu::Fc1Dst{.f32 = ref.data(), .ld = 16}, valid);
        const std::int64_t blocks = (rows + 15) / 16;
        std::vector<std::uint16_t> out(static_cast<std::size_t>(blocks * 16 * kLd), kUntouched);
        const cpu::Fc1Dst dst{.bf16 = out.data() + first / 32 * 512 + first % 32, .ld = kLd, .to_bf16 = to_bf16};
        cpu::fc1_epilogue(epi, y.data(), 16, rows, bias.data(), dst, valid);
        const int n = std::min(valid, outs);
        std::vector<std::uint16_t> want(out.size(), kUntouched);
        for (std::int64_t r = 0; r < rows; ++r)
          for (int q = 0; q < n; ++q) {
            const std::int64_t c = first + q;
            to_bf16(&ref[r * 16 + q], &want[(r / 16 * 16) * kLd + c / 32 * 512 + r % 16 * 32 + c % 32], 1);
          }
        EXPECT_EQ(out, want) << "act " << static_cast<int>(act) << " rows " << rows << " valid " << valid;
      }
}

}  // namespace
}  // namespace qmoe::test
