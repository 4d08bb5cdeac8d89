// LayerOptions' override fields: what they do on the CPU backend, and how
// with_environment() (the one place environment variables are read) fills them.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "cpu/kernels.h"
#include "helpers.h"

namespace qmoe::test {
namespace {

// Sets an environment variable for the guard's lifetime (tests of with_environment() only).
class EnvGuard {
 public:
  EnvGuard(const char* name, const char* value) : name_(name) {
    const char* v = std::getenv(name);
    had_ = v != nullptr;
    if (had_) old_ = v;
    setenv(name, value, 1);
  }
  ~EnvGuard() {
    if (had_)
      setenv(name_.c_str(), old_.c_str(), 1);
    else
      unsetenv(name_.c_str());
  }
  EnvGuard(const EnvGuard&) = delete;
  EnvGuard& operator=(const EnvGuard&) = delete;

 private:
  std::string name_;
  bool had_ = false;
  std::string old_;
};

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Options, EnvironmentFillsOnlyFieldsAtTheirDefaults) {
  const EnvGuard isa("QMOE_CPU_ISA", "scalar"), gemm("QMOE_CUDA_GEMM", "wgmma"), pdl("QMOE_CUDA_PDL", "0"),
      fuse("QMOE_CUDA_FUSE", "1"), poll("QMOE_CUDA_HOST_POLLING", "1"), prof("QMOE_PROFILE", "1");
  const LayerOptions filled = with_environment({});
  EXPECT_EQ(filled.cpu_kernels, "scalar");
  EXPECT_EQ(filled.cuda_gemm, CudaGemm::wgmma);
  EXPECT_FALSE(filled.cuda_pdl);
  EXPECT_TRUE(filled.cuda_fuse);
  EXPECT_TRUE(filled.cuda_host_polling);
  EXPECT_TRUE(filled.profile);
  LayerOptions mine;
  mine.cpu_kernels = "avx2";
  mine.cuda_gemm = CudaGemm::mma;
  const LayerOptions kept = with_environment(mine);
  EXPECT_EQ(kept.cpu_kernels, "avx2");
  EXPECT_EQ(kept.cuda_gemm, CudaGemm::mma);
}

TEST(Options, UnsetOrEmptyVariablesLeaveTheDefaults) {
  const EnvGuard isa("QMOE_CPU_ISA", ""), gemm("QMOE_CUDA_GEMM", ""), pdl("QMOE_CUDA_PDL", ""),
      fuse("QMOE_CUDA_FUSE", ""), poll("QMOE_CUDA_HOST_POLLING", ""), prof("QMOE_PROFILE", "");
  const LayerOptions o = with_environment({});
  EXPECT_EQ(o.cpu_kernels, "");
  EXPECT_EQ(o.cuda_gemm, CudaGemm::automatic);
  EXPECT_TRUE(o.cuda_pdl);
  EXPECT_EQ(o.cuda_fuse, LayerOptions{}.cuda_fuse);
  EXPECT_EQ(o.cuda_host_polling, LayerOptions{}.cuda_host_polling);
  EXPECT_FALSE(o.profile);
}

TEST(Options, BadEnvironmentValuesAreRefusedByName) {
  {
    const EnvGuard g("QMOE_CUDA_GEMM", "fastest");
    EXPECT_NE(error_of([] { with_environment({}); }).find("QMOE_CUDA_GEMM: expected one of auto, mma, wgmma"),
              std::string::npos);
  }
  {
    const EnvGuard f("QMOE_CUDA_HOST_POLLING", "2");
    EXPECT_NE(error_of([] { with_environment({}); }).find("QMOE_CUDA_HOST_POLLING: expected 0 or 1, got \"2\""),
              std::string::npos);
  }
  {
    const EnvGuard f("QMOE_CUDA_FUSE", "on");
    EXPECT_NE(error_of([] { with_environment({}); }).find("QMOE_CUDA_FUSE: expected 0 or 1, got \"on\""),
              std::string::npos);
  }
  const EnvGuard p("QMOE_CUDA_PDL", "yes");
  EXPECT_NE(error_of([] { with_environment({}); }).find("QMOE_CUDA_PDL: expected 0 or 1, got \"yes\""),
            std::string::npos);
}

TEST(Options, CpuKernelsPicksTheTable) {
  MoeAttributes a;
  a.k = 2;
  const tools::SynthLayer s = tools::synth_layer(4, 64, 32, a);
  const Inputs in = random_inputs(3, 64, 4, 5);
  for (const cpu::KernelConfig* kc : cpu::supported_kernel_configs()) {
    LayerOptions o;
    o.threads = 1;
    o.cpu_kernels = kc->name;
    const Layer layer(s.views(), a, o);
    EXPECT_NE(std::string(layer.kernel_name()).find(kc->name), std::string::npos) << layer.kernel_name();
    // The same bits as the backend built on that table directly.
    const cpu::CpuMoe direct(s.views(), a, s.shape, 1, 0, cpu::CpuMoe::kDefaultChunkBytes, kc);
    std::vector<float> y1(3 * 64), y2(3 * 64);
    const TensorView xv = view_f32(in.x.data(), {3, 64}), lv = view_f32(in.logits.data(), {3, 4});
    layer.forward(xv, lv, output_f32(y1.data(), {3, 64}));
    direct.forward(xv, lv, TensorView{}, output_f32(y2.data(), {3, 64}), 3);
    EXPECT_EQ(y1, y2) << kc->name;
  }
  LayerOptions bad;
  bad.cpu_kernels = "neon";
  EXPECT_NE(error_of([&] {
              Layer(s.views(), a, bad);
            }).find("cpu_kernels (QMOE_CPU_ISA): expected one of amx, avx512vnni, avx512, avx2, scalar, got \"neon\""),
            std::string::npos);
}

TEST(Options, ProfilePrintsPhaseTimes) {
  MoeAttributes a;
  a.k = 1;
  const tools::SynthLayer s = tools::synth_layer(2, 32, 16, a);
  const Inputs in = random_inputs(2, 32, 2, 5);
  std::vector<float> y(2 * 32);
  for (bool on : {false, true}) {
    LayerOptions o;
    o.threads = 1;
    o.profile = on;
    const Layer layer(s.views(), a, o);
    testing::internal::CaptureStderr();
    layer.forward(view_f32(in.x.data(), {2, 32}), view_f32(in.logits.data(), {2, 2}), output_f32(y.data(), {2, 32}));
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_EQ(err.find("qmoe profile:") != std::string::npos, on) << err;
  }
}

TEST(Options, CpuBackendTakesNoStream) {
  MoeAttributes a;
  a.k = 1;
  const tools::SynthLayer s = tools::synth_layer(2, 32, 16, a);
  const Layer layer(s.views(), a, {});
  std::vector<float> x(32), lg(2), y(32);
  int dummy = 0;
  EXPECT_NE(error_of([&] {
              layer.forward_async(view_f32(x.data(), {1, 32}), view_f32(lg.data(), {1, 2}), {},
                                  output_f32(y.data(), {1, 32}), &dummy);
            }).find("takes no stream"),
            std::string::npos);
}

}  // namespace
}  // namespace qmoe::test
