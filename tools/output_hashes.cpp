// qmoe_output_hashes: prints a hash of the output bits of every case of a fixed
// sweep (the CPU parity sweep, the reduced-precision levels and input dtypes, or
// the CUDA suite's shapes on each GEMM choice), one line per case, then a total.
//
// It uses the public API and the synthesizer only, so the same file builds
// against an older checkout: a refactor that must not change behaviour is
// checked by diffing this program's output before and after, e.g.
//   QMOE_CPU_ISA=avx2 build/qmoe_output_hashes cpu > after.txt
//   build/qmoe_output_hashes cuda > after_cuda.txt
//   QMOE_CUDA_FUSE=1 build/qmoe_output_hashes cuda > fused_cuda.txt   (the same bits)
// (the CPU kernel table comes from QMOE_CPU_ISA, read once per process).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "qmoe/qmoe.h"
#include "synth.h"

namespace {

using namespace qmoe;

std::uint64_t fnv1a(const void* p, std::size_t n, std::uint64_t h = 1469598103934665603ull) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

struct Case {
  int bits, block;
  bool sym, bias;
  Activation act;
  int fusion, k;
  std::int64_t h, in, e, t;
  bool mix = false;
  int normalize = 1;
};

std::string name_of(const Case& c) {
  char b[160];
  std::snprintf(b, sizeof b, "q%d_b%d_%s%s_a%df%d_k%d_H%lld_I%lld_E%lld_T%lld%s_n%d", c.bits, c.block,
                c.sym ? "sym" : "zp", c.bias ? "_bias" : "", static_cast<int>(c.act), c.fusion, c.k,
                static_cast<long long>(c.h), static_cast<long long>(c.in), static_cast<long long>(c.e),
                static_cast<long long>(c.t), c.mix ? "_mix" : "", c.normalize);
  return b;
}

MoeAttributes attrs_of(const Case& c) {
  MoeAttributes a;
  a.k = c.k;
  a.activation = c.act;
  a.expert_weight_bits = c.bits;
  a.block_size = c.block;
  a.swiglu_fusion = c.fusion;
  a.normalize_routing_weights = c.normalize;
  if (c.act == Activation::swiglu) a.activation_alpha = 1.702f, a.activation_beta = 1.0f, a.swiglu_limit = 7.0f;
  return a;
}

std::vector<std::uint16_t> halves(const std::vector<float>& v, DType t) {
  std::vector<std::uint16_t> h(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) h[i] = t == DType::f16 ? f32_to_f16(v[i]) : f32_to_bf16(v[i]);
  return h;
}

// Runs one case on `o` for each input dtype in `dtypes`; prints one line per run.
std::uint64_t run(const Case& c, const LayerOptions& o, const std::vector<DType>& dtypes, const std::string& tag,
                  std::uint64_t total) {
  const MoeAttributes a = attrs_of(c);
  tools::SynthOptions so;
  so.symmetric = c.sym;
  so.bias = c.bias;
  so.seed = 7 + static_cast<std::uint64_t>(c.t);
  const tools::SynthLayer s = tools::synth_layer(c.e, c.h, c.in, a, so);
  std::mt19937_64 rng(99 + static_cast<std::uint64_t>(c.t));
  std::vector<float> x(static_cast<std::size_t>(c.t * c.h)), lg(static_cast<std::size_t>(c.t * c.e)), mix(lg.size());
  tools::fill_normal(x, rng, 1.0f);
  tools::fill_normal(lg, rng, 1.5f);
  std::uniform_real_distribution<float> u(0.05f, 1.0f);
  for (float& m : mix) m = u(rng);
  std::string label;
  std::uint64_t h = 0;
  try {
    const Layer layer(s.views(), a, o);
    for (DType dt : dtypes) {
      std::vector<std::uint16_t> xh, lh, mh;
      TensorView xv, lv, mv;
      std::vector<unsigned char> out(static_cast<std::size_t>(c.t * c.h) * dtype_size(dt));
      if (dt == DType::f32) {
        xv = view_f32(x.data(), {c.t, c.h});
        lv = view_f32(lg.data(), {c.t, c.e});
        if (c.mix) mv = view_f32(mix.data(), {c.t, c.e});
      } else {
        xh = halves(x, dt), lh = halves(lg, dt), mh = halves(mix, dt);
        xv = TensorView(xh.data(), dt, {c.t, c.h});
        lv = TensorView(lh.data(), dt, {c.t, c.e});
        if (c.mix) mv = TensorView(mh.data(), dt, {c.t, c.e});
      }
      layer.forward(xv, lv, mv, MutableTensorView(out.data(), dt, {c.t, c.h}));
      h = fnv1a(out.data(), out.size());
      std::printf("%s %s %s %016llx\n", tag.c_str(), name_of(c).c_str(), dtype_name(dt),
                  static_cast<unsigned long long>(h));
      total = fnv1a(&h, sizeof h, total);
    }
  } catch (const Error& e) {
    std::printf("%s %s error: %s\n", tag.c_str(), name_of(c).c_str(), e.what());
    total = fnv1a(e.what(), std::strlen(e.what()), total);
  }
  return total;
}

// The CPU parity sweep (tests/cpp/test_parity.cpp) plus bigger shapes around
// the kernels' regimes, at accuracy levels 0, 3 and 4, in float32, float16 and bfloat16.
std::vector<Case> cpu_cases() {
  std::vector<Case> v;
  int n = 0;
  for (int bits : {4, 8})
    for (int block : {0, 16, 32, 64, 128})
      for (bool sym : {true, false})
        for (auto act :
             {Activation::swiglu, Activation::relu, Activation::gelu, Activation::silu, Activation::identity}) {
          const int fusion = act == Activation::swiglu ? (n % 3) : 0;
          const std::int64_t h = block == 128 ? 256 : 128, in = block >= 64 ? 128 : 96;
          v.push_back({bits, block, sym, n % 2 == 0, act, fusion, 1 + n % 4, h, in, 6, std::int64_t{1 + (n * 5) % 17}});
          ++n;
        }
  for (int bits : {4, 8})
    for (std::int64_t t : {1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 25, 31, 64, 65, 80, 150})
      v.push_back({bits, 0, true, true, Activation::swiglu, 1, 2, 64, 40, 4, t});
  for (int norm : {0, 1}) {
    Case c{4, 32, true, true, Activation::silu, 0, 3, 64, 64, 8, 11, true, norm};
    v.push_back(c);
  }
  v.push_back({8, 0, false, true, Activation::gelu, 0, 5, 32, 48, 5, 9});
  v.push_back({8, 0, true, true, Activation::swiglu, 2, 2, 2, 3, 3, 5});
  v.push_back({8, 0, true, false, Activation::relu, 0, 1, 18, 17, 2, 3});
  for (std::int64_t t : {1, 3, 9}) {
    v.push_back({4, 0, false, true, Activation::gelu, 0, 2, 10, 6, 3, t});
    v.push_back({8, 0, false, true, Activation::swiglu, 0, 2, 7, 5, 3, t});
  }
  // Larger layers: many tokens per expert (prefill kernels, several tiles, K tails).
  for (std::int64_t t : {1, 6, 33, 200, 700}) {
    v.push_back({4, 32, true, true, Activation::swiglu, 1, 4, 512, 384, 8, t});
    v.push_back({8, 0, false, false, Activation::silu, 0, 2, 320, 200, 6, t, t % 2 == 1});
    v.push_back({4, 128, false, true, Activation::swiglu, 0, 2, 256, 512, 4, t});
  }
  return v;
}

// The CUDA suite's shapes (tests/cpp/test_cuda.cpp) plus prefill-sized calls.
std::vector<Case> cuda_cases() {
  std::vector<Case> v;
  const Activation acts[] = {Activation::relu, Activation::gelu, Activation::silu, Activation::identity};
  for (int bits : {4, 8})
    for (int block : {0, 16, 32, 128})
      for (bool sym : {true, false}) {
        for (int fusion : {0, 1, 2})
          v.push_back({bits, block, sym, true, Activation::swiglu, fusion, 2, 128, block == 128 ? 128 : 96, 6,
                       fusion == 1 ? 33 : 5});
        v.push_back({bits, block, sym, true, acts[(bits + block / 16) % 4], 0, 3, 256, block == 128 ? 384 : 160, 5, 17,
                     block == 32});
      }
  v.push_back({4, 0, true, true, Activation::swiglu, 1, 1, 40, 20, 4, 1});
  v.push_back({4, 0, false, true, Activation::gelu, 0, 4, 36, 24, 4, 9});
  v.push_back({8, 16, true, true, Activation::relu, 0, 4, 48, 16, 4, 3, true});
  v.push_back({4, 0, true, true, Activation::relu, 0, 2, 42, 24, 4, 5});
  v.push_back({4, 32, true, true, Activation::swiglu, 2, 2, 192, 96, 8, 300});
  v.push_back({4, 64, false, true, Activation::swiglu, 0, 8, 128, 64, 16, 130, true});
  for (std::int64_t t : {1, 2, 8, 31, 32, 64, 257, 600, 2000}) {
    v.push_back({4, 128, true, true, Activation::swiglu, 1, 2, 256, 384, 4, t});
    v.push_back({8, 32, false, true, Activation::silu, 0, 2, 384, 128, 3, t});
    v.push_back({4, 0, false, true, Activation::swiglu, 0, 1, 640, 320, 2, t, true});
  }
  return v;
}

void set_env(const char* name, const char* value) {
#if defined(_WIN32)
  _putenv_s(name, value);
#else
  setenv(name, value, 1);
#endif
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "cpu";
  std::uint64_t total = 1469598103934665603ull;
  std::size_t lines = 0;
  if (mode == "cpu") {
    for (int level : {0, 3, 4}) {
      LayerOptions o;
      o.threads = 2;
      o.accuracy_level = level;
      for (const Case& c : cpu_cases()) {
        const std::vector<DType> dts =
            c.t % 3 == 0 ? std::vector<DType>{DType::f32, DType::f16, DType::bf16} : std::vector<DType>{DType::f32};
        char tag[16];
        std::snprintf(tag, sizeof tag, "cpu_l%d", level);
        total = run(c, o, dts, tag, total);
        lines += dts.size();
      }
    }
  } else if (mode == "cuda") {
    if (!cuda_available()) {
      std::fprintf(stderr, "qmoe_output_hashes: no CUDA device\n");
      return 2;
    }
    // QMOE_CUDA_FUSE as the caller set it (the fused and unfused layers give the same
    // bits: compare two runs), the GEMM choice and PDL set here.
    for (const char* gemm : {"auto", "mma", "wgmma"})
      for (const char* pdl : {"1", "0"}) {
        if (std::strcmp(pdl, "0") == 0 && std::strcmp(gemm, "auto") != 0) continue;
        set_env("QMOE_CUDA_GEMM", gemm);
        set_env("QMOE_CUDA_PDL", pdl);
        LayerOptions o;
        o.backend = Backend::cuda;
        for (const Case& c : cuda_cases()) {
          char tag[32];
          std::snprintf(tag, sizeof tag, "cuda_%s_pdl%s", gemm, pdl);
          total = run(c, o, {DType::f16, DType::bf16}, tag, total);
          lines += 2;
        }
      }
  } else {
    std::fprintf(stderr, "usage: qmoe_output_hashes [cpu|cuda]\n");
    return 2;
  }
  std::printf("total %zu %016llx\n", lines, static_cast<unsigned long long>(total));
  return 0;
}
