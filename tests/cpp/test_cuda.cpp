// The CUDA backend against the float64 reference (and against itself: graph
// replay, host vs device memory, repeated calls). Skips without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <string>
#include <thread>

#include "cuda/gemm_table.h"
#include "cuda/pack.h"
#include "helpers.h"

namespace qmoe::test {
namespace {

#define CK(call) ASSERT_EQ((call), cudaSuccess) << #call

bool have_gpu() { return cuda_available(); }

std::vector<std::uint16_t> to_half(const std::vector<float>& v, DType t) {
  std::vector<std::uint16_t> h(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) h[i] = t == DType::f16 ? f32_to_f16(v[i]) : f32_to_bf16(v[i]);
  return h;
}
std::vector<float> from_half(const std::vector<std::uint16_t>& h, DType t) {
  std::vector<float> v(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) v[i] = t == DType::f16 ? f16_to_f32(h[i]) : bf16_to_f32(h[i]);
  return v;
}

// A device copy of a host vector, freed on scope exit.
struct Dev {
  void* p = nullptr;
  std::size_t n = 0;
  template <class T>
  explicit Dev(const std::vector<T>& v) : n(v.size() * sizeof(T)) {
    EXPECT_EQ(cudaMalloc(&p, n), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, v.data(), n, cudaMemcpyHostToDevice), cudaSuccess);
  }
  explicit Dev(std::size_t bytes) : n(bytes) { EXPECT_EQ(cudaMalloc(&p, n), cudaSuccess); }
  ~Dev() { cudaFree(p); }
  template <class T>
  std::vector<T> get() const {
    std::vector<T> v(n / sizeof(T));
    EXPECT_EQ(cudaMemcpy(v.data(), p, n, cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
};

struct GpuCase {
  Case c;
  DType dt;
  bool mix;
  CudaGemm gemm = CudaGemm::automatic;  ///< LayerOptions::cuda_gemm
  int level = 0;                        ///< LayerOptions::accuracy_level
};

bool have_wgmma() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return major == 9 && minor == 0;
}

std::string gemm_suffix(CudaGemm g) { return g == CudaGemm::mma ? "_mma" : g == CudaGemm::wgmma ? "_wgmma" : ""; }

std::string case_name(const testing::TestParamInfo<GpuCase>& info) {
  const GpuCase& g = info.param;
  std::string n = std::string(g.dt == DType::f16 ? "f16" : "bf16") + "_q" + std::to_string(g.c.bits) + "_b" +
                  std::to_string(g.c.block) + (g.c.sym ? "_sym" : "_zp") + "_" + activation_name(g.c.act) +
                  std::to_string(g.c.fusion) + "_k" + std::to_string(g.c.k) + "_H" + std::to_string(g.c.h) + "_I" +
                  std::to_string(g.c.in) + "_E" + std::to_string(g.c.e) + "_T" + std::to_string(g.c.t) +
                  (g.mix ? "_mix" : "") + gemm_suffix(g.gemm) + (g.level ? "_L" + std::to_string(g.level) : "");
  return n;
}

class CudaParity : public testing::TestWithParam<GpuCase> {};

// Runs the layer on the GPU (device memory, forward_async + sync) and
// compares with the float64 reference of the same rounded inputs.
TEST_P(CudaParity, MatchesReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const GpuCase& g = GetParam();
  if (g.gemm == CudaGemm::wgmma && !have_wgmma()) GTEST_SKIP() << "the wgmma kernel needs compute capability 9.0";
  const Case& c = g.c;
  const MoeAttributes a = c.attrs();
  const tools::SynthLayer s = c.layer();
  const Inputs in = random_inputs(c.t, c.h, c.e, 7);
  const auto xh = to_half(in.x, g.dt), lh = to_half(in.logits, g.dt), mh = to_half(in.mix, g.dt);
  const TensorView xv(xh.data(), g.dt, {c.t, c.h}), lv(lh.data(), g.dt, {c.t, c.e});
  const TensorView mv = g.mix ? TensorView(mh.data(), g.dt, {c.t, c.e}) : TensorView{};
  const std::vector<double> ref = reference_forward(s.views(), a, xv, lv, mv);

  LayerOptions o;
  o.backend = Backend::cuda;
  o.cuda_gemm = g.gemm;
  o.accuracy_level = g.level;
  const Layer layer(s.views(), a, o);
  Dev dx(xh), dl(lh), dm(mh), dy(xh.size() * 2);
  layer.forward_async(TensorView(dx.p, g.dt, {c.t, c.h}), TensorView(dl.p, g.dt, {c.t, c.e}),
                      g.mix ? TensorView(dm.p, g.dt, {c.t, c.e}) : TensorView{},
                      MutableTensorView(dy.p, g.dt, {c.t, c.h}), nullptr);
  CK(cudaDeviceSynchronize());
  const std::vector<float> y = from_half(dy.get<std::uint16_t>(), g.dt);
  const double err = rel_l2(y, ref);
  // int8 tokens (accuracy_level 4 where the kernel takes the weights): these small layers have
  // one or two 128-column blocks per row; test_cuda.py holds the result to the int8 model.
  const bool int8 = std::string(layer.kernel_name()).find("int8 tokens") != std::string::npos;
  EXPECT_EQ(int8, g.level == 4 && have_wgmma() && (c.block == 0 || c.block >= 128)) << layer.kernel_name();
  EXPECT_LE(err, int8 ? 5e-2 : g.dt == DType::f16 ? 2e-3 : 1e-2) << layer.kernel_name();

  // Host memory through forward(): the same bits.
  std::vector<std::uint16_t> yh(xh.size());
  layer.forward(xv, lv, mv, MutableTensorView(yh.data(), g.dt, {c.t, c.h}));
  EXPECT_EQ(0, std::memcmp(yh.data(), dy.get<std::uint16_t>().data(), yh.size() * 2)) << "host path differs";
}

std::vector<GpuCase> sweep() {
  std::vector<GpuCase> v;
  const Activation acts[] = {Activation::relu, Activation::gelu, Activation::silu, Activation::identity};
  for (DType dt : {DType::f16, DType::bf16}) {
    for (int bits : {4, 8}) {
      for (int block : {0, 16, 32, 128}) {
        for (bool sym : {true, false}) {
          // swiglu, each fusion, around the tile edges
          for (int fusion : {0, 1, 2})
            v.push_back({{bits, block, sym, Activation::swiglu, fusion, 2, 128, block == 128 ? 128 : 96, 6,
                          fusion == 1 ? 33 : 5},
                         dt,
                         false});
          v.push_back({{bits, block, sym, acts[(bits + block / 16) % 4], 0, 3, 256, block == 128 ? 384 : 160, 5, 17},
                       dt,
                       block == 32});
        }
      }
    }
    // shapes off the 8/64/128 grids, one token, all tokens on every expert, many tokens
    v.push_back({{4, 0, true, Activation::swiglu, 1, 1, 40, 20, 4, 1}, dt, false});
    v.push_back({{4, 0, false, Activation::gelu, 0, 4, 36, 24, 4, 9}, dt, false});
    v.push_back({{8, 16, true, Activation::relu, 0, 4, 48, 16, 4, 3}, dt, true});
    v.push_back({{4, 0, true, Activation::relu, 0, 2, 42, 24, 4, 5}, dt, false});  // H % 4 != 0: scalar combine
    // decode over many 64-row blocks
    v.push_back({{4, 128, true, Activation::swiglu, 1, 4, 1024, 512, 64, 64}, dt, false});
    v.push_back({{4, 32, true, Activation::swiglu, 2, 2, 192, 96, 8, 300}, dt, false});
    v.push_back({{4, 64, false, Activation::swiglu, 0, 8, 128, 64, 16, 130}, dt, true});
  }
  // Every case again on the sm_90a wgmma prefill kernel (forced, whatever the
  // token count), and prefill-sized calls (several 128-token tiles per
  // expert, row counts both multiples of 256 and not) on each kernel.
  const std::size_t n = v.size();
  for (std::size_t i = 0; i < n; ++i) {
    GpuCase w = v[i];
    w.gemm = CudaGemm::wgmma;
    v.push_back(w);
  }
  for (CudaGemm gemm : {CudaGemm::automatic, CudaGemm::mma, CudaGemm::wgmma})
    for (DType dt : {DType::f16, DType::bf16}) {
      v.push_back({{4, 128, true, Activation::swiglu, 1, 2, 256, 384, 4, 600}, dt, false, gemm});
      v.push_back({{8, 32, false, Activation::silu, 0, 2, 384, 128, 3, 400}, dt, false, gemm});
      v.push_back({{4, 0, false, Activation::swiglu, 0, 1, 640, 320, 2, 513}, dt, true, gemm});
    }
  // accuracy_level 4: int8 tokens where wgmma runs and the weights allow (row-wise, blocks
  // >= 128; K not a multiple of 128 too), the token dtype otherwise (blocks of 32).
  for (CudaGemm gemm : {CudaGemm::automatic, CudaGemm::wgmma})
    for (DType dt : {DType::f16, DType::bf16}) {
      v.push_back({{4, 0, true, Activation::swiglu, 1, 2, 192, 96, 4, 130}, dt, false, gemm, 4});
      v.push_back({{8, 128, false, Activation::silu, 0, 2, 256, 384, 4, 300}, dt, true, gemm, 4});
      v.push_back({{4, 256, false, Activation::swiglu, 2, 2, 512, 256, 3, 3}, dt, false, gemm, 4});
      v.push_back({{8, 0, false, Activation::gelu, 0, 2, 320, 192, 4, 70}, dt, false, gemm, 4});
      v.push_back({{4, 32, true, Activation::relu, 0, 2, 128, 64, 4, 130}, dt, false, gemm, 4});
    }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Sweep, CudaParity, testing::ValuesIn(sweep()), case_name);

// The kernel table (host code: runs without a GPU). Each average token count
// gets the narrowest decode/mma.sync tile that holds twice it, wgmma from its
// threshold on, and the K split stays within the workspace and K.
TEST(CudaKernelTable, ChoosesByTokensPerExpert) {
  constexpr double kNever = std::numeric_limits<double>::infinity();
  const auto tile = [](double avg, double from) { return cuda::pick_gemm(avg, from).geometry.tile_tokens; };
  EXPECT_EQ(tile(0.25, kNever), 8);
  EXPECT_EQ(tile(4, kNever), 8);
  EXPECT_EQ(tile(4.5, kNever), 16);
  EXPECT_EQ(tile(8, kNever), 16);
  EXPECT_EQ(tile(9, kNever), 32);
  EXPECT_EQ(tile(16, kNever), 32);
  EXPECT_EQ(tile(17, kNever), 64);
  EXPECT_EQ(tile(1e6, kNever), 64);
  EXPECT_STREQ(cuda::pick_gemm(31.9, 32).name, "mma.sync");
  EXPECT_STREQ(cuda::pick_gemm(32, 32).name, "wgmma");
  EXPECT_EQ(tile(32, 32), 64);  // wgmma's tiles hold twice the average too
  EXPECT_EQ(tile(33, 32), cuda::kWgmmaGeometry.tile_tokens);
  EXPECT_EQ(tile(1, 0), 64);
  EXPECT_STREQ(cuda::pick_gemm(0.1, 0).name, "wgmma");
  EXPECT_STREQ(cuda::pick_gemm(2, kNever).name, "decode");
  // int8 tokens (accuracy_level 4) wherever wgmma runs, never below its threshold.
  EXPECT_STREQ(cuda::pick_gemm(32, 32, true).name, "wgmma.int8");
  EXPECT_STREQ(cuda::pick_gemm(500, 32, true).name, "wgmma.int8");
  EXPECT_STREQ(cuda::pick_gemm(31, 32, true).name, "mma.sync");
  EXPECT_STREQ(cuda::pick_gemm(2, kNever, true).name, "decode");
  EXPECT_TRUE(cuda::pick_gemm(32, 32, true).int8_tokens);
  EXPECT_FALSE(cuda::pick_gemm(32, 32).int8_tokens);
  // Forcing: mma never takes wgmma; automatic off sm_90 neither; wgmma off sm_90 is refused.
  EXPECT_EQ(cuda::wgmma_threshold(CudaGemm::mma, 90), kNever);
  EXPECT_EQ(cuda::wgmma_threshold(CudaGemm::automatic, 80), kNever);
  EXPECT_THROW(cuda::wgmma_threshold(CudaGemm::wgmma, 89), Error);
  // K splits: whole kKAlign pieces covering K, at most 16 and at most chunk / tokens.
  cuda::GpuGeometry g2;
  g2.padded_rows = 4096, g2.padded_cols = 14336;
  for (double avg : {0.5, 4.0, 12.0, 24.0, 48.0, 200.0})
    for (std::int64_t t : {1, 16, 300}) {
      const cuda::GemmVariant& v = cuda::pick_gemm(avg, 32);
      const cuda::KSplit s = cuda::fc2_k_split(v, g2, t * 2, 8, 132, 4096, t);
      EXPECT_GE(s.splits, 1);
      EXPECT_LE(s.splits, 16);
      EXPECT_LE(s.splits, std::max<std::int64_t>(1, 4096 / t));
      EXPECT_EQ(s.split_cols % cuda::kKAlign, 0);
      EXPECT_GE(s.split_cols * s.splits, g2.padded_cols);
      EXPECT_LT(s.split_cols * (s.splits - 1), g2.padded_cols);
    }
  // int8 tokens: splits start on 128-column activation blocks, K an odd multiple of 64 too.
  for (std::int64_t kp : {14336, 2880, 192, 64}) {
    g2.padded_cols = kp;
    for (std::int64_t t : {16, 64, 300}) {
      const cuda::KSplit s = cuda::fc2_k_split(cuda::pick_gemm(40, 32, true), g2, t * 2, 8, 132, 4096, t);
      EXPECT_EQ(s.split_cols % cuda::kAct8Block, 0) << kp;
      EXPECT_GE(s.split_cols * s.splits, kp);
      EXPECT_LT(s.split_cols * (s.splits - 1), kp);
      EXPECT_LE(s.splits, 16);
    }
  }
}

// accuracy_level 4 (host code: runs without a GPU). The int8 A fragment made from
// layout.h's code words (act8_a_fragment, the kernel's unpack) must pair each weight with
// the token column the quantizer stores at that k (act8_slot). The codes here are placed
// by an encoder written from layout.h's description, apart from the GPU packer.
TEST(CudaAct8, WeightFragmentsMeetTheirTokenColumns) {
  for (int bits : {4, 8}) {
    bool seen[16] = {};
    for (int kk = 0; kk < 16; ++kk) seen[cuda::act8_slot(bits, kk)] = true;
    for (bool b : seen) EXPECT_TRUE(b) << "act8_slot is not a permutation at " << bits << " bits";
    // One 16-row tile x 128 columns (one stage) of distinct-enough codes.
    const int qmax = (1 << bits) - 1;
    std::uint8_t w[16][128];
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < 128; ++k) w[r][k] = static_cast<std::uint8_t>((r * 37 + k * 11 + k / 16) % (qmax + 1));
    // layout.h: lane (g, c), k16 step j, register r: (row, first column) = (g, 2c), (g+8, 2c),
    // (g, 2c+8), (g+8, 2c+8) of the step; 4 bits: word j, nibbles [4r] and [16+4r]; 8 bits:
    // words 2j (r0, r1) and 2j+1 (r2, r3), each register's two bytes in column order.
    auto pair_of = [&](int lane, int step, int r, int which) {
      const int g = lane / 4, c = lane % 4;
      const int row = g + (r & 1) * 8, col = 16 * step + 2 * c + (r >> 1) * 8 + which;
      return static_cast<unsigned>(w[row][col]);
    };
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, c = lane % 4;
      for (int t = 0; t < 4; ++t) {  // k32 steps of the stage: k16 steps 2t, 2t + 1
        unsigned words[4] = {};
        if (bits == 4) {
          for (int h = 0; h < 2; ++h)
            for (int r = 0; r < 4; ++r)
              words[h] |= pair_of(lane, 2 * t + h, r, 0) << (4 * r) | pair_of(lane, 2 * t + h, r, 1) << (16 + 4 * r);
        } else {
          for (int h = 0; h < 2; ++h)
            for (int r = 0; r < 4; ++r)
              for (int which = 0; which < 2; ++which)
                words[2 * h + r / 2] |= pair_of(lane, 2 * t + h, r, which) << (8 * (2 * (r % 2) + which));
        }
        unsigned a[4];
        if (bits == 4)
          cuda::act8_a_fragment<4>(words, a);
        else
          cuda::act8_a_fragment<8>(words, a);
        // mma.m16n8k32 A: a0/a2 row g, a1/a3 row g + 8; a0/a1 k 4c..4c+3, a2/a3 16 + 4c.. .
        for (int reg = 0; reg < 4; ++reg)
          for (int j = 0; j < 4; ++j) {
            const int row = g + (reg & 1) * 8, kf = (reg >> 1) * 16 + 4 * c + j;
            int col = -1;  // the column whose token code sits at slot kf
            for (int kk = 0; kk < 16; ++kk)
              if (cuda::act8_slot(bits, kk) == kf % 16) col = 32 * t + (kf / 16) * 16 + kk;
            ASSERT_GE(col, 0);
            EXPECT_EQ((a[reg] >> (8 * j)) & 0xffu, w[row][col])
                << bits << " bits, lane " << lane << ", step " << t << ", register " << reg << ", byte " << j;
          }
      }
    }
  }
}

// A case's layer and its bfloat16 inputs (host).
struct Bf16Case {
  Case c;
  MoeAttributes a;
  tools::SynthLayer s;
  std::vector<std::uint16_t> xh, lh;
  Bf16Case(const Case& cs, std::uint64_t seed) : c(cs), a(cs.attrs()), s(cs.layer()) {
    const Inputs in = random_inputs(c.t, c.h, c.e, seed);
    xh = to_half(in.x, DType::bf16), lh = to_half(in.logits, DType::bf16);
  }
};

class CudaLayer : public testing::Test {
 protected:
  void SetUp() override {
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  }
};

// A forward captured into a CUDA graph replays to the same bits as the eager
// call; repeated calls give the same bits; T > max_tokens runs in passes.
TEST_F(CudaLayer, GraphReplayAndPasses) {
  const Bf16Case p({4, 32, true, Activation::swiglu, 1, 4, 256, 128, 8, 50}, 3);
  const Case& c = p.c;
  const MoeAttributes& a = p.a;
  const tools::SynthLayer& s = p.s;
  const DType dt = DType::bf16;
  const auto &xh = p.xh, &lh = p.lh;
  LayerOptions o;
  o.backend = Backend::cuda;
  o.max_tokens = 16;
  const Layer layer(s.views(), a, o);
  EXPECT_GT(layer.workspace_bytes(), 0u);
  EXPECT_LE(static_cast<double>(layer.device_bytes()), 1.05 * static_cast<double>(layer.packed_bytes()));
  Dev dx(xh), dl(lh), dy(xh.size() * 2), dg(xh.size() * 2);
  const TensorView xv(dx.p, dt, {c.t, c.h}), lv(dl.p, dt, {c.t, c.e});
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  layer.forward_async(xv, lv, {}, MutableTensorView(dy.p, dt, {c.t, c.h}), st);
  CK(cudaStreamSynchronize(st));
  const auto eager = dy.get<std::uint16_t>();

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  layer.forward_async(xv, lv, {}, MutableTensorView(dg.p, dt, {c.t, c.h}), st);
  CK(cudaStreamEndCapture(st, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  CK(cudaMemsetAsync(dg.p, 0, dg.n, st));
  CK(cudaGraphLaunch(exec, st));
  CK(cudaStreamSynchronize(st));
  EXPECT_EQ(eager, dg.get<std::uint16_t>());
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  CK(cudaStreamDestroy(st));

  const std::vector<double> ref =
      reference_forward(s.views(), a, TensorView(xh.data(), dt, {c.t, c.h}), TensorView(lh.data(), dt, {c.t, c.e}));
  EXPECT_LE(rel_l2(from_half(eager, dt), ref), 1e-2);
}

TEST_F(CudaLayer, BadInputsGiveClearErrors) {
  const Case c{4, 0, true, Activation::relu, 0, 2, 64, 32, 4, 3};
  const tools::SynthLayer s = c.layer();
  LayerOptions o;
  o.backend = Backend::cuda;
  const Layer layer(s.views(), c.attrs(), o);
  std::vector<float> x(3 * 64), lg(3 * 4), y(3 * 64);
  auto message = [&](auto&& f) -> std::string {
    try {
      f();
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  // float32 is refused by name.
  EXPECT_NE(message([&] {
              layer.forward(view_f32(x.data(), {3, 64}), view_f32(lg.data(), {3, 4}), output_f32(y.data(), {3, 64}));
            }).find("input: the CUDA backend takes float16 or bfloat16"),
            std::string::npos);
  // Shapes: the same validation (and message) as the CPU backend.
  std::vector<std::uint16_t> xh(3 * 64), lh(3 * 5), yh(3 * 64);
  EXPECT_NE(message([&] {
              layer.forward(TensorView(xh.data(), DType::f16, {3, 64}), TensorView(lh.data(), DType::f16, {3, 5}),
                            MutableTensorView(yh.data(), DType::f16, {3, 64}));
            }).find("router_probs"),
            std::string::npos);
  // forward_async needs device memory.
  EXPECT_NE(message([&] {
              layer.forward_async(TensorView(xh.data(), DType::f16, {3, 64}), TensorView(lh.data(), DType::f16, {3, 4}),
                                  {}, MutableTensorView(yh.data(), DType::f16, {3, 64}), nullptr);
            }).find("input: expected memory on CUDA device 0"),
            std::string::npos);
  // A device that does not exist.
  o.device = 1000;
  EXPECT_NE(message([&] { Layer(s.views(), c.attrs(), o); }).find("device: expected a CUDA device ordinal"),
            std::string::npos);
}

// Programmatic dependent launches (on by default where the device has them)
// change only when kernels start: calls of every regime issued back to back
// on one stream, with no host synchronization between them, give the bits of
// plain launches (a missing wait would race with the previous kernel or call).
TEST_F(CudaLayer, DependentLaunchesGiveTheSameBits) {
  const Bf16Case p({4, 128, true, Activation::swiglu, 1, 2, 256, 384, 8, 300}, 11);
  const Case& c = p.c;
  const DType dt = DType::bf16;
  Dev dx(p.xh), dl(p.lh);
  const std::int64_t counts[] = {1, 3, 16, 60, 100, 160, 300, 2};  // every GEMM regime
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  auto run = [&](bool pdl) {
    LayerOptions o;
    o.backend = Backend::cuda;
    o.cuda_pdl = pdl;
    const Layer layer(p.s.views(), p.a, o);
    std::vector<std::vector<std::uint16_t>> outs;
    std::deque<Dev> ys;  // Dev is not movable
    for (int rep = 0; rep < 3; ++rep)
      for (std::int64_t t : counts) {
        // Each call reads rows from a different offset, so stale data would show.
        const std::int64_t r0 = (rep * 7 + t) % (c.t - t + 1);
        ys.emplace_back(static_cast<std::size_t>(t * c.h * 2));
        layer.forward_async(TensorView(static_cast<std::uint16_t*>(dx.p) + r0 * c.h, dt, {t, c.h}),
                            TensorView(static_cast<std::uint16_t*>(dl.p) + r0 * c.e, dt, {t, c.e}), {},
                            MutableTensorView(ys.back().p, dt, {t, c.h}), st);
      }
    EXPECT_EQ(cudaStreamSynchronize(st), cudaSuccess);
    for (const Dev& y : ys) outs.push_back(y.get<std::uint16_t>());
    return outs;
  };
  const auto plain = run(false), dependent = run(true);
  ASSERT_EQ(plain.size(), dependent.size());
  for (std::size_t i = 0; i < plain.size(); ++i) EXPECT_EQ(plain[i], dependent[i]) << "call " << i;
  CK(cudaStreamDestroy(st));
}

// LayerOptions::cuda_fuse: the one-token FC1 that routes its token itself and
// FC2's fused combine (up to 16 tokens) change which kernels run, not the
// arithmetic: every call gives the bits of the unfused layer (eager, back to
// back on one stream, with and without dependent launches, and replayed from a
// graph), with ties, infinities and NaN among the logits, router_weights, an FC2
// bias, and hidden sizes that end inside an FC2 64-row block (360) and before an
// empty one (448, rows padded to 512).
TEST_F(CudaLayer, SmallCallFusionGivesTheSameBits) {
  struct Shape {
    Case c;
    DType dt;
    bool mix;
  };
  const Shape shapes[] = {{{4, 128, true, Activation::swiglu, 1, 2, 256, 384, 8, 40}, DType::bf16, false},
                          {{8, 0, false, Activation::swiglu, 1, 4, 360, 192, 32, 40}, DType::f16, true},
                          {{4, 32, false, Activation::silu, 0, 8, 448, 128, 64, 40}, DType::bf16, false}};
  const std::int64_t counts[] = {1, 2, 16, 3, 1, 17, 8, 1};  // fused (1-16), not (17), again
  auto same = [](const std::vector<std::uint16_t>& a, const std::vector<std::uint16_t>& b, DType dt) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
      const float x = dt == DType::f16 ? f16_to_f32(a[i]) : bf16_to_f32(a[i]);
      const float y = dt == DType::f16 ? f16_to_f32(b[i]) : bf16_to_f32(b[i]);
      if (a[i] != b[i] && !(x != x && y != y)) return false;  // NaN rows: NaN on both sides
    }
    return true;
  };
  for (const Shape& sh : shapes) {
    const Case& c = sh.c;
    SCOPED_TRACE(testing::Message() << "E " << c.e << " k " << c.k << " H " << c.h);
    const MoeAttributes a = c.attrs();
    const tools::SynthLayer s = c.layer();
    const Inputs in = random_inputs(c.t, c.h, c.e, 23);
    std::vector<float> logits = in.logits;
    // Rows 0-4 of the logits: all equal (ties to the lowest experts), +inf twice,
    // -inf everywhere but one, a NaN, and the largest logits at the last experts.
    for (std::int64_t e = 0; e < c.e; ++e) {
      logits[e] = 0.5f;
      logits[c.e + e] = e == 3 || e == c.e - 1 ? std::numeric_limits<float>::infinity() : 0.f;
      logits[2 * c.e + e] = e == 1 ? 1.f : -std::numeric_limits<float>::infinity();
      logits[4 * c.e + e] = static_cast<float>(e);
    }
    logits[3 * c.e + 2] = std::numeric_limits<float>::quiet_NaN();
    const auto xh = to_half(in.x, sh.dt), lh = to_half(logits, sh.dt), mh = to_half(in.mix, sh.dt);
    Dev dx(xh), dl(lh), dm(mh);
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    auto views = [&](std::int64_t r0, std::int64_t t) {
      const auto* x = static_cast<const std::uint16_t*>(dx.p) + r0 * c.h;
      const auto* l = static_cast<const std::uint16_t*>(dl.p) + r0 * c.e;
      const auto* m = static_cast<const std::uint16_t*>(dm.p) + r0 * c.e;
      return std::make_tuple(TensorView(x, sh.dt, {t, c.h}), TensorView(l, sh.dt, {t, c.e}),
                             sh.mix ? TensorView(m, sh.dt, {t, c.e}) : TensorView{});
    };
    // Calls starting at rows 0-4 (the special logits) and further down.
    auto run = [&](bool fuse, bool pdl) {
      LayerOptions o;
      o.backend = Backend::cuda;
      o.cuda_fuse = fuse;
      o.cuda_pdl = pdl;
      const Layer layer(s.views(), a, o);
      std::deque<Dev> ys;
      std::vector<std::vector<std::uint16_t>> outs;
      for (int rep = 0; rep < 2; ++rep)
        for (std::int64_t t : counts) {
          const std::int64_t r0 = rep == 0 ? (t == 1 ? static_cast<std::int64_t>(outs.size()) % 5 : 0) : 7 + t;
          ys.emplace_back(static_cast<std::size_t>(t * c.h * 2));
          const auto [xv, lv, mv] = views(r0, t);
          layer.forward_async(xv, lv, mv, MutableTensorView(ys.back().p, sh.dt, {t, c.h}), st);
          outs.emplace_back();
        }
      EXPECT_EQ(cudaStreamSynchronize(st), cudaSuccess);
      for (std::size_t i = 0; i < ys.size(); ++i) outs[i] = ys[i].get<std::uint16_t>();
      // A graph of a one-token call and a 16-token call, replayed twice.
      Dev g1(static_cast<std::size_t>(c.h * 2)), g16(static_cast<std::size_t>(16 * c.h * 2));
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      EXPECT_EQ(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
      {
        const auto [xv, lv, mv] = views(3, 1);
        layer.forward_async(xv, lv, mv, MutableTensorView(g1.p, sh.dt, {1, c.h}), st);
      }
      {
        const auto [xv, lv, mv] = views(0, 16);
        layer.forward_async(xv, lv, mv, MutableTensorView(g16.p, sh.dt, {16, c.h}), st);
      }
      EXPECT_EQ(cudaStreamEndCapture(st, &graph), cudaSuccess);
      EXPECT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
      for (int r = 0; r < 2; ++r) EXPECT_EQ(cudaGraphLaunch(exec, st), cudaSuccess);
      EXPECT_EQ(cudaStreamSynchronize(st), cudaSuccess);
      outs.push_back(g1.get<std::uint16_t>());
      outs.push_back(g16.get<std::uint16_t>());
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
      return outs;
    };
    const auto plain = run(false, true);
    for (const bool pdl : {true, false}) {
      const auto fused = run(true, pdl);
      ASSERT_EQ(plain.size(), fused.size());
      for (std::size_t i = 0; i < plain.size(); ++i)
        EXPECT_TRUE(same(plain[i], fused[i], sh.dt)) << "call " << i << (pdl ? " (pdl)" : "");
    }
    // The one-token calls on the special rows against float64 (routing semantics).
    const std::vector<double> ref =
        reference_forward(s.views(), a, TensorView(xh.data(), sh.dt, {5, c.h}), TensorView(lh.data(), sh.dt, {5, c.e}),
                          sh.mix ? TensorView(mh.data(), sh.dt, {5, c.e}) : TensorView{});
    for (std::size_t j = 0; j < std::size(counts); ++j) {  // rep 0's one-token calls start at row j % 5
      const std::size_t row = j % 5;
      if (counts[j] != 1 || row == 3) continue;  // (row 3: NaN)
      const std::vector<double> want(ref.begin() + static_cast<std::ptrdiff_t>(row * c.h),
                                     ref.begin() + static_cast<std::ptrdiff_t>((row + 1) * c.h));
      EXPECT_LE(rel_l2(from_half(plain[j], sh.dt), want), 1e-2) << "row " << row;
    }
    CK(cudaStreamDestroy(st));
  }
}

// Experts in host memory (LayerOptions::host_experts): against float64, the same bits run
// to run, on several passes; with host_experts_gpu_from the host experts run on the GPU
// from that many tokens on, through the same kernels: the all-GPU layer's bits.
TEST_F(CudaLayer, HostExperts) {
  const Bf16Case p({4, 32, false, Activation::swiglu, 1, 4, 256, 128, 8, 1100}, 17);
  const Case& c = p.c;
  const DType dt = DType::bf16;
  Dev dx(p.xh), dl(p.lh);
  // A layer with host experts runs at most 1024 tokens per pass; the all-GPU bits to
  // compare with come from a layer that splits a call the same way (T = 1100: 1024 + 76).
  LayerOptions plain_o;
  plain_o.backend = Backend::cuda;
  plain_o.max_tokens = 1024;
  const Layer same_passes(p.s.views(), p.a, plain_o);
  for (const std::vector<int>& host : {std::vector<int>{1, 3, 6}, std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}}) {
    for (std::int64_t gpu_from : {std::int64_t{0}, std::int64_t{32}}) {
      LayerOptions o = plain_o;
      o.threads = 4;
      o.host_experts = host;
      o.host_experts_gpu_from = gpu_from;
      const Layer layer(p.s.views(), p.a, o);
      for (std::int64_t t : {std::int64_t{1}, std::int64_t{40}, c.t}) {
        const TensorView xv(dx.p, dt, {t, c.h}), lv(dl.p, dt, {t, c.e});
        Dev y1(static_cast<std::size_t>(t * c.h * 2)), y2(y1.n), y3(y1.n);
        layer.forward_async(xv, lv, {}, MutableTensorView(y1.p, dt, {t, c.h}), nullptr);
        layer.forward_async(xv, lv, {}, MutableTensorView(y2.p, dt, {t, c.h}), nullptr);
        same_passes.forward_async(xv, lv, {}, MutableTensorView(y3.p, dt, {t, c.h}), nullptr);
        CK(cudaDeviceSynchronize());
        const auto a = y1.get<std::uint16_t>();
        EXPECT_EQ(a, y2.get<std::uint16_t>()) << "run to run, T = " << t << ", " << layer.kernel_name();
        if (gpu_from > 0 && t >= gpu_from) {
          EXPECT_EQ(a, y3.get<std::uint16_t>()) << "host experts on the GPU, T = " << t;
        }
        const std::vector<double> ref = reference_forward(p.s.views(), p.a, TensorView(p.xh.data(), dt, {t, c.h}),
                                                          TensorView(p.lh.data(), dt, {t, c.e}));
        EXPECT_LE(rel_l2(from_half(a, dt), ref), 1e-2) << "T = " << t << ", " << layer.kernel_name();
      }
    }
  }
}

// LayerOptions::cuda_host_polling: the eager handoffs to and from the CPU experts
// polled instead of host functions, the same bits: calls of one and several passes
// back to back on one stream (several passes queued at once), two polling Layers
// used at once from two threads on two streams, and a graph captured from a polling
// Layer (host functions there) replayed beside them.
TEST_F(CudaLayer, HostPollingGivesTheSameBits) {
  const Bf16Case p({4, 32, false, Activation::swiglu, 1, 4, 256, 128, 8, 1100}, 29);
  const Case& c = p.c;
  const DType dt = DType::bf16;
  Dev dx(p.xh), dl(p.lh);
  const std::int64_t counts[] = {1, 3, 40, 1100, 1, 16, 1};
  auto make = [&](const std::vector<int>& host, bool polling) {
    LayerOptions o;
    o.backend = Backend::cuda;
    o.threads = 3;
    o.host_experts = host;
    o.host_experts_gpu_from = 0;
    o.cuda_host_polling = polling;
    return std::make_unique<Layer>(p.s.views(), p.a, o);
  };
  auto run = [&](const Layer& layer, cudaStream_t st) {
    std::deque<Dev> ys;
    for (std::int64_t t : counts) {
      ys.emplace_back(static_cast<std::size_t>(t * c.h * 2));
      layer.forward_async(TensorView(dx.p, dt, {t, c.h}), TensorView(dl.p, dt, {t, c.e}), {},
                          MutableTensorView(ys.back().p, dt, {t, c.h}), st);
    }
    EXPECT_EQ(cudaStreamSynchronize(st), cudaSuccess);
    std::vector<std::vector<std::uint16_t>> outs;
    for (const Dev& y : ys) outs.push_back(y.get<std::uint16_t>());
    return outs;
  };
  cudaStream_t s1, s2, s3;
  CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithFlags(&s3, cudaStreamNonBlocking));
  const std::vector<int> half = {1, 3, 6, 7}, all = {0, 1, 2, 3, 4, 5, 6, 7};
  const auto want_half = run(*make(half, false), s1), want_all = run(*make(all, false), s1);
  const auto poll_half = make(half, true), poll_all = make(all, true);
  EXPECT_EQ(run(*poll_half, s1), want_half);
  EXPECT_EQ(run(*poll_all, s1), want_all);
  // A graph of a 5-token call of the polling Layer, captured now and replayed below.
  Dev gy(static_cast<std::size_t>(5 * c.h * 2)), ey(gy.n);
  poll_half->forward_async(TensorView(dx.p, dt, {5, c.h}), TensorView(dl.p, dt, {5, c.e}), {},
                           MutableTensorView(ey.p, dt, {5, c.h}), s1);
  CK(cudaStreamSynchronize(s1));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(s3, cudaStreamCaptureModeThreadLocal));
  poll_half->forward_async(TensorView(dx.p, dt, {5, c.h}), TensorView(dl.p, dt, {5, c.e}), {},
                           MutableTensorView(gy.p, dt, {5, c.h}), s3);
  CK(cudaStreamEndCapture(s3, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  // Both polling Layers at once, each from its own thread and stream, the graph beside them.
  std::vector<std::vector<std::uint16_t>> got_half, got_all;
  std::thread a([&] { got_half = run(*poll_half, s1); });
  std::thread b([&] { got_all = run(*poll_all, s2); });
  for (int r = 0; r < 3; ++r) CK(cudaGraphLaunch(exec, s3));
  a.join();
  b.join();
  CK(cudaStreamSynchronize(s3));
  EXPECT_EQ(got_half, want_half);
  EXPECT_EQ(got_all, want_all);
  EXPECT_EQ(gy.get<std::uint16_t>(), ey.get<std::uint16_t>());
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  for (cudaStream_t st : {s1, s2, s3}) CK(cudaStreamDestroy(st));
}

// Several Layers (sharing the device's working memory; two with host experts, one of
// them computing its host experts on the GPU from 32 tokens) used at once from several
// host threads, each on its own stream, and CUDA graphs (of a plain call and of both
// host-expert paths) replayed on other streams beside them: every call gives the bits of
// the same call made alone.
TEST_F(CudaLayer, ConcurrentLayersStreamsThreadsAndGraphsGiveSoloBits) {
  const Bf16Case p({4, 32, true, Activation::swiglu, 1, 4, 256, 128, 8, 300}, 19);
  const Bf16Case q({8, 0, true, Activation::relu, 0, 2, 128, 256, 6, 300}, 23);
  const DType dt = DType::bf16;
  LayerOptions o;
  o.backend = Backend::cuda;
  const Layer la(p.s.views(), p.a, o), lb(q.s.views(), q.a, o);
  LayerOptions oh = o;
  oh.threads = 2;
  oh.host_experts = {2, 5};
  oh.host_experts_gpu_from = 0;
  const Layer lc(p.s.views(), p.a, oh);
  oh.host_experts_gpu_from = 32;
  const Layer ld(p.s.views(), p.a, oh);
  struct Job {
    const Layer* layer;
    const Bf16Case* c;
    std::int64_t t;
  };
  const std::vector<Job> jobs = {{&la, &p, 1},  {&lb, &q, 16}, {&la, &p, 300}, {&lc, &p, 5},  {&lb, &q, 300},
                                 {&la, &p, 40}, {&lc, &p, 64}, {&lb, &q, 3},   {&ld, &p, 64}, {&ld, &p, 3}};
  Dev pxa(p.xh), pla(p.lh), qxa(q.xh), qla(q.lh);
  auto views = [&](const Job& j) {
    const bool is_p = j.c == &p;
    return std::pair{TensorView(is_p ? pxa.p : qxa.p, dt, {j.t, j.c->c.h}),
                     TensorView(is_p ? pla.p : qla.p, dt, {j.t, j.c->c.e})};
  };
  // Alone, one after the other.
  std::vector<std::vector<std::uint16_t>> solo;
  for (const Job& j : jobs) {
    Dev y(static_cast<std::size_t>(j.t * j.c->c.h * 2));
    const auto [xv, lv] = views(j);
    j.layer->forward_async(xv, lv, {}, MutableTensorView(y.p, dt, {j.t, j.c->c.h}), nullptr);
    CK(cudaDeviceSynchronize());
    solo.push_back(y.get<std::uint16_t>());
  }
  // Graphs of jobs 2 (la, T = 300), 6 (lc, T = 64) and 8 (ld, T = 64), captured before
  // the threads start, each replayed on a stream of its own.
  const std::vector<std::size_t> graphed = {2, 6, 8};
  std::vector<cudaStream_t> gs(graphed.size());
  std::deque<Dev> gy;  // Dev does not move
  std::vector<cudaGraph_t> graph(graphed.size());
  std::vector<cudaGraphExec_t> exec(graphed.size());
  for (std::size_t g = 0; g < graphed.size(); ++g) {
    const Job& j = jobs[graphed[g]];
    CK(cudaStreamCreateWithFlags(&gs[g], cudaStreamNonBlocking));
    gy.emplace_back(static_cast<std::size_t>(j.t * j.c->c.h * 2));
    const auto [xv, lv] = views(j);
    CK(cudaStreamBeginCapture(gs[g], cudaStreamCaptureModeThreadLocal));
    j.layer->forward_async(xv, lv, {}, MutableTensorView(gy.back().p, dt, {j.t, j.c->c.h}), gs[g]);
    CK(cudaStreamEndCapture(gs[g], &graph[g]));
    CK(cudaGraphInstantiate(&exec[g], graph[g], 0));
  }
  // Four threads, each its own stream, each all jobs (rotated) three times; the graph
  // replayed beside them.
  constexpr int kThreads = 4, kReps = 3;
  std::vector<std::deque<Dev>> outs(kThreads);
  std::vector<std::vector<std::size_t>> which(kThreads);
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> pool;
  for (int th = 0; th < kThreads; ++th)
    pool.emplace_back([&, th] {
      try {
        cudaStream_t st;
        if (cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess) throw std::runtime_error("stream");
        for (int rep = 0; rep < kReps; ++rep)
          for (std::size_t i = 0; i < jobs.size(); ++i) {
            const std::size_t k = (i + static_cast<std::size_t>(th)) % jobs.size();
            const Job& j = jobs[k];
            outs[th].emplace_back(static_cast<std::size_t>(j.t * j.c->c.h * 2));
            which[th].push_back(k);
            const auto [xv, lv] = views(j);
            j.layer->forward_async(xv, lv, {}, MutableTensorView(outs[th].back().p, dt, {j.t, j.c->c.h}), st);
          }
        if (cudaStreamSynchronize(st) != cudaSuccess) throw std::runtime_error("sync");
        cudaStreamDestroy(st);
      } catch (const std::exception& e) {
        errors[th] = e.what();
      }
    });
  for (int r = 0; r < 6; ++r)
    for (std::size_t g = 0; g < graphed.size(); ++g) CK(cudaGraphLaunch(exec[g], gs[g]));
  for (auto& t : pool) t.join();
  CK(cudaDeviceSynchronize());
  for (int th = 0; th < kThreads; ++th) {
    ASSERT_TRUE(errors[th].empty()) << "thread " << th << ": " << errors[th];
    for (std::size_t n = 0; n < outs[th].size(); ++n)
      EXPECT_EQ(outs[th][n].get<std::uint16_t>(), solo[which[th][n]])
          << "thread " << th << ", call " << n << " (job " << which[th][n] << ")";
  }
  for (std::size_t g = 0; g < graphed.size(); ++g) {
    EXPECT_EQ(gy[g].get<std::uint16_t>(), solo[graphed[g]]) << "graph of job " << graphed[g] << " beside the threads";
    CK(cudaGraphExecDestroy(exec[g]));
    CK(cudaGraphDestroy(graph[g]));
    CK(cudaStreamDestroy(gs[g]));
  }
}

// An output that is not 8-byte aligned (a bfloat16 view one element into a
// buffer) takes the combine's scalar path: the same bits as an aligned output.
TEST_F(CudaLayer, MisalignedOutputGivesTheSameBits) {
  const Bf16Case p({4, 128, true, Activation::swiglu, 1, 2, 256, 384, 8, 40}, 13);
  const Case& c = p.c;
  const DType dt = DType::bf16;
  LayerOptions o;
  o.backend = Backend::cuda;
  const Layer layer(p.s.views(), p.a, o);
  Dev dx(p.xh), dl(p.lh), ya(p.xh.size() * 2), yb(p.xh.size() * 2 + 8);
  std::uint16_t* const shifted = static_cast<std::uint16_t*>(yb.p) + 1;  // 2 bytes past an aligned base
  ASSERT_NE(reinterpret_cast<std::uintptr_t>(shifted) % 8, 0u);
  const TensorView xv(dx.p, dt, {c.t, c.h}), lv(dl.p, dt, {c.t, c.e});
  layer.forward_async(xv, lv, {}, MutableTensorView(ya.p, dt, {c.t, c.h}), nullptr);
  layer.forward_async(xv, lv, {}, MutableTensorView(shifted, dt, {c.t, c.h}), nullptr);
  CK(cudaDeviceSynchronize());
  const std::vector<std::uint16_t> a = ya.get<std::uint16_t>(), b = yb.get<std::uint16_t>();
  ASSERT_EQ(b.size(), a.size() + 4);
  EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin() + 1)) << "the scalar combine differs";
  // And the shifted output (so the aligned one too) matches the float64 reference.
  const std::vector<double> ref = reference_forward(p.s.views(), p.a, TensorView(p.xh.data(), dt, {c.t, c.h}),
                                                    TensorView(p.lh.data(), dt, {c.t, c.e}), {});
  EXPECT_LE(rel_l2(from_half(std::vector<std::uint16_t>(b.begin() + 1, b.begin() + 1 + a.size()), dt), ref), 1e-2);
}

// The tag of a packed matrix (host logic, runs without a GPU): the tag of the same
// geometry passes; another format, version or geometry is refused by name.
TEST(CudaPackTag, RefusesForeignOrMismatchedData) {
  cuda::GpuGeometry g;
  g.bits = 4, g.block_size = 128, g.gated = true, g.zero_points = false;
  g.rows = 2 * 1408, g.cols = 2048, g.padded_rows = 2816, g.padded_cols = 2048;
  const cuda::GpuPackTag good = cuda::make_tag(g, 64);
  EXPECT_NO_THROW(cuda::check_tag(good, g, 64, "fc1_experts_weights"));
  auto message = [&](const cuda::GpuPackTag& t, std::int64_t experts) -> std::string {
    try {
      cuda::check_tag(t, g, experts, "fc1_experts_weights");
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  cuda::GpuPackTag t = good;
  t.magic[0] = 'X';
  EXPECT_NE(message(t, 64).find("fc1_experts_weights: the packed data on the device is not qmoe CUDA data"),
            std::string::npos);
  t = good, t.version = 99;
  EXPECT_NE(message(t, 64).find("packed format version 99, this build reads version 1"), std::string::npos);
  t = good, t.bits = 8;
  EXPECT_NE(message(t, 64).find("fc1_experts_weights: packed data on the device has bits 8, this Layer expects 4"),
            std::string::npos);
  t = good, t.zero_points = 1;
  EXPECT_NE(message(t, 64).find("zero points (0/1) 1, this Layer expects 0"), std::string::npos);
  EXPECT_NE(message(good, 32).find("experts 64, this Layer expects 32"), std::string::npos);
  t = good, t.padded_cols = 2112;
  EXPECT_NE(message(t, 64).find("padded cols 2112, this Layer expects 2048"), std::string::npos);
}

TEST(CudaAbsent, ClearErrorWithoutGpu) {
  if (have_gpu()) GTEST_SKIP() << "a CUDA device is present";
  const Case c{4, 0, true, Activation::relu, 0, 2, 64, 32, 4, 3};
  LayerOptions o;
  o.backend = Backend::cuda;
  try {
    Layer layer(c.layer().views(), c.attrs(), o);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace qmoe::test
