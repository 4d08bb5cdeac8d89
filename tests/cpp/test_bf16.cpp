// accuracy_level 3: bf16 activations and weights on AMX (where the CPU has it;
// elsewhere level 3 runs in float32). Against the float64 reference.
#include <gtest/gtest.h>

#include <cstring>

#include "amx_model.h"
#include "cpu/epilogue.h"
#include "cpu/kernels.h"
#include "cpu/moe.h"
#include "helpers.h"

namespace qmoe::test {
namespace {}  // namespace

bool amx_model_usable() {
  for (const cpu::KernelConfig* kc : cpu::supported_kernel_configs())
    if (kc->isa == cpu::Isa::avx512vnni) return __builtin_cpu_supports("avx512bf16");
  return false;
}

namespace {

// The tables whose level 3 runs the AMX kernel: the machine's own (real tiles), and,
// where the CPU can run it, the avx512vnni table with the tile model's kernels
// (amx_model.h), so the kernel's loops are tested on CPUs without AMX too.
std::vector<cpu::KernelConfig> amx_tables() {
  std::vector<cpu::KernelConfig> v;
  for (const cpu::KernelConfig* kc : cpu::supported_kernel_configs()) {
    if (kc->has_bf16()) v.push_back(*kc);
    if (kc->isa == cpu::Isa::avx512vnni && amx_model_usable()) {
      cpu::KernelConfig m = *kc;
      m.name = "avx512vnni + AMX tile model";
      m.bf16 = cpu::kBf16Amx;  // its threshold and its conversion (AVX-512 BF16 only), the model's tiles
      m.bf16.gemm = {{gemm_bf16_q4_model, "gemm_bf16_q4_model"}, {gemm_bf16_q8_model, "gemm_bf16_q8_model"}};
      v.push_back(m);
    }
  }
  return v;
}

// Returns the error of each AMX table (none: empty); 1 and 3 threads must give the same bits.
std::vector<double> run(const Case& c) {
  const Problem p(c, 33);
  std::vector<double> errs;
  for (const cpu::KernelConfig& kc : amx_tables()) {
    const std::vector<float> one = p.cpu_output(&kc, 1, 3), three = p.cpu_output(&kc, 3, 3);
    EXPECT_EQ(0, std::memcmp(one.data(), three.data(), one.size() * 4)) << kc.name << ": thread count changed bits";
    errs.push_back(rel_l2(one, p.ref));
  }
  return errs;
}

TEST(Bf16Amx, AgainstFloat64Reference) {
  bool any = false;
  int n = 0;
  for (int bits : {4, 8})
    for (int block : {0, 32, 128})
      for (bool sym : {true, false}) {
        const Activation act = n % 2 ? Activation::gelu : Activation::swiglu;
        // 200 tokens, k = 2 over 6 experts: most experts get >= 16 tokens (AMX); K = 384, not a power of two.
        const Case c{bits, block, sym, act, act == Activation::swiglu ? 1 + n % 2 : 0, 2, 384, 128, 6, 200};
        for (double err : run(c)) {
          any = true;
          EXPECT_LE(err, 1e-2) << "bits=" << bits << " block=" << block << " sym=" << sym;
          EXPECT_GT(err, 1e-6) << "bf16 cannot be exact";
        }
        ++n;
      }
  // Row-wise K that is not a multiple of 32 (padded A/B tiles), fc3 path, tokens not a multiple of 16.
  for (double err : run({4, 0, false, Activation::swiglu, 0, 3, 72, 40, 4, 61})) EXPECT_LE(err, 1e-2);
  // The same with symmetric weights: the table-lookup decode (codes - 8 exact in bf16, row scale in float32).
  for (double err : run({4, 0, true, Activation::swiglu, 0, 3, 72, 40, 4, 61})) EXPECT_LE(err, 1e-2);
  for (double err : run({8, 0, true, Activation::relu, 0, 1, 36, 20, 2, 45})) EXPECT_LE(err, 1e-2);
  // More than 96 tokens per expert: pairs of weight tiles per activation tile (symmetric and
  // general decoders, 4 and 8 bits, an odd tile count so single tiles follow pairs).
  for (double err : run({4, 0, true, Activation::swiglu, 1, 1, 96, 72, 2, 400})) EXPECT_LE(err, 1e-2);
  for (double err : run({4, 32, false, Activation::gelu, 0, 1, 96, 64, 2, 300})) EXPECT_LE(err, 1e-2);
  for (double err : run({8, 0, true, Activation::silu, 0, 1, 112, 64, 2, 300})) EXPECT_LE(err, 1e-2);
  if (!any) GTEST_SKIP() << "this CPU has neither AMX nor AVX-512 BF16 for the tile model";
}

TEST(Bf16Amx, Level3WithoutAmxIsFloat32) {
  MoeAttributes a;
  a.k = 2;
  a.activation = Activation::silu;
  const auto s = tools::synth_layer(3, 64, 32, a);
  const auto x = random_inputs(40, 64, 3, 2);
  const TensorView xv = view_f32(x.x.data(), {40, 64}), lv = view_f32(x.logits.data(), {40, 3});
  const auto ref = reference_forward(s.views(), a, xv, lv);
  for (const cpu::KernelConfig* kc : cpu::supported_kernel_configs()) {
    if (kc->has_bf16()) continue;
    const cpu::CpuMoe moe(s.views(), a, s.shape, 2, 3, cpu::CpuMoe::kDefaultChunkBytes, kc);
    std::vector<float> out(40 * 64);
    moe.forward(xv, lv, TensorView{}, output_f32(out.data(), {40, 64}), 40);
    EXPECT_LE(rel_max_error(out, ref), 1e-5) << kc->name;
  }
}

// The FC1 epilogue writing the FC2 input of the AMX path (A-tile order, bf16) must place the
// very float32 values it writes on the float path, through the given conversion, and touch
// nothing else. Runs on every CPU (with a portable conversion), unlike the AMX kernels.
TEST(Bf16Amx, EpilogueWritesBlockedBf16) {
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
