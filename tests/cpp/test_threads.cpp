// Determinism across thread counts, concurrent forward() calls, and the
// input forms: T = 0, 3-D input, float16 and bfloat16 activations.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <ctime>
#include <stdexcept>
#include <thread>

#include "cpu/kernels.h"
#include "cpu/moe.h"
#include "cpu/thread_pool.h"
#include "helpers.h"

namespace qmoe::test {
namespace {

tools::SynthLayer make(MoeAttributes& a, std::int64_t e, std::int64_t h, std::int64_t in) {
  a.k = 3;
  a.activation = Activation::swiglu;
  a.swiglu_fusion = 1;
  a.activation_alpha = 1.702f, a.activation_beta = 1.f, a.swiglu_limit = 7.f;
  a.block_size = 32;
  a.normalize_routing_weights = 1;
  return tools::synth_layer(e, h, in, a);
}

QMOE_PER_TABLE_SUITE(Threads);

TEST_P(Threads, BitIdenticalForAnyThreadCount) {
  MoeAttributes a;
  const std::int64_t e = 8, h = 128, in = 96;
  const auto s = make(a, e, h, in);
  for (std::int64_t t : {1, 5, 40}) {
    const auto x = random_inputs(t, h, e, 5);
    for (int level : {0, 3, 4}) {
      std::vector<float> first;
      for (int threads : {1, 2, 3, 4, 7}) {
        const cpu::CpuMoe moe(s.views(), a, s.shape, threads, level, cpu::CpuMoe::kDefaultChunkBytes, GetParam());
        std::vector<float> out(static_cast<std::size_t>(t * h));
        for (int rep = 0; rep < 2; ++rep) {
          moe.forward(view_f32(x.x.data(), {t, h}), view_f32(x.logits.data(), {t, e}), TensorView{},
                      output_f32(out.data(), {t, h}), t);
          if (first.empty()) first = out;
          ASSERT_EQ(std::memcmp(first.data(), out.data(), out.size() * 4), 0)
              << "level=" << level << " T=" << t << " threads=" << threads;
        }
      }
    }
  }
}

TEST(Threads, ConcurrentForwardOnOneLayer) {
  MoeAttributes a;
  const std::int64_t e = 6, h = 64, in = 64, t = 9;
  const auto s = make(a, e, h, in);
  const Layer layer(s.views(), a, {Backend::cpu, 2, 0});
  const auto x = random_inputs(t, h, e, 11);
  std::vector<float> expect(static_cast<std::size_t>(t * h));
  layer.forward(view_f32(x.x.data(), {t, h}), view_f32(x.logits.data(), {t, e}), output_f32(expect.data(), {t, h}));
  std::vector<std::thread> callers;
  std::vector<int> ok(4, 0);
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&, c] {
      std::vector<float> out(expect.size());
      bool same = true;
      for (int rep = 0; rep < 20; ++rep) {
        layer.forward(view_f32(x.x.data(), {t, h}), view_f32(x.logits.data(), {t, e}), output_f32(out.data(), {t, h}));
        same &= std::memcmp(out.data(), expect.data(), out.size() * 4) == 0;
      }
      ok[c] = same;
    });
  for (auto& th : callers) th.join();
  for (int c = 0; c < 4; ++c) EXPECT_TRUE(ok[c]) << "caller " << c;
}

// The pool itself: many short jobs (workers spinning between them, some joining
// late or not at all on this small machine) still run every item exactly once.
TEST(ThreadPool, EveryItemExactlyOnceOverManyShortJobs) {
  for (int threads : {2, 3, 8}) {
    cpu::ThreadPool pool(threads);
    std::vector<std::atomic<int>> hits(64);
    for (int job = 0; job < 3000; ++job) {
      const std::int64_t n = 2 + job % 63;
      for (std::int64_t i = 0; i < n; ++i) hits[i].store(0);
      std::atomic<int> bad_tid{0};
      pool.parallel_for(n, [&](std::int64_t i, int tid) {
        hits[i].fetch_add(1);
        if (tid < 0 || tid >= threads) bad_tid.store(1);
      });
      for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "threads=" << threads << " job=" << job;
      ASSERT_EQ(bad_tid.load(), 0);
      if (job % 500 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));  // let the workers fall asleep
    }
  }
}

TEST(ThreadPool, ExceptionPropagatesAndThePoolStaysUsable) {
  cpu::ThreadPool pool(4);
  for (int rep = 0; rep < 50; ++rep) {
    EXPECT_THROW(pool.parallel_for(100,
                                   [&](std::int64_t i, int) {
                                     if (i == rep) throw std::runtime_error("item failed");
                                   }),
                 std::runtime_error);
    std::atomic<std::int64_t> sum{0};
    pool.parallel_for(100, [&](std::int64_t i, int) { sum.fetch_add(i); });
    ASSERT_EQ(sum.load(), 4950);
  }
}

TEST(ThreadPool, ConcurrentCallersSerialize) {
  cpu::ThreadPool pool(3);
  std::vector<std::thread> callers;
  std::vector<int> ok(4, 0);
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&, c] {
      bool good = true;
      for (int job = 0; job < 500; ++job) {
        const std::int64_t n = 5 + (job + c) % 40;
        std::atomic<std::int64_t> sum{0};
        pool.parallel_for(n, [&](std::int64_t i, int) { sum.fetch_add(i + c); });
        good &= sum.load() == n * (n - 1) / 2 + n * c;
      }
      ok[c] = good;
    });
  for (auto& th : callers) th.join();
  for (int c = 0; c < 4; ++c) EXPECT_TRUE(ok[c]) << "caller " << c;
}

#ifdef CLOCK_PROCESS_CPUTIME_ID
double cpu_ms() {  // CPU time of the whole process
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) * 1e-6;
}
#endif

// wake() (a job announced ahead, from another thread too) never loses, repeats or
// misroutes items, whether the workers are asleep, spinning or inside a job; and
// after the wake window the pool sleeps again (IdlePoolDoesNotBurnCpu's check).
TEST(ThreadPool, WakeAheadOfJobs) {
  cpu::ThreadPool pool(4);
  std::atomic<bool> stop{false};
  std::thread waker([&] {
    while (!stop.load()) {
      pool.wake();
      std::this_thread::sleep_for(std::chrono::microseconds(70));
    }
  });
  for (int job = 0; job < 2000; ++job) {
    if (job % 3 == 0) pool.wake();
    const std::int64_t n = 1 + job % 50;
    std::atomic<std::int64_t> sum{0};
    pool.parallel_for(n, [&](std::int64_t i, int) { sum.fetch_add(i + 1); });
    ASSERT_EQ(sum.load(), n * (n + 1) / 2) << "job " << job;
    if (job % 400 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));  // past every window
  }
  stop.store(true);
  waker.join();
#ifdef CLOCK_PROCESS_CPUTIME_ID
  pool.wake();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past the wake window
  const double c0 = cpu_ms();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_LT(cpu_ms() - c0, 30.0) << "ms of CPU used in 300 ms after a wake()";
#endif
}

TEST(ThreadPool, DestroyedRightAfterStartOrAJob) {
  for (int rep = 0; rep < 50; ++rep) {
    cpu::ThreadPool idle(4);
    cpu::ThreadPool busy(4);
    std::atomic<int> n{0};
    busy.parallel_for(8, [&](std::int64_t, int) { n.fetch_add(1); });
    EXPECT_EQ(n.load(), 8);
  }
}

#ifdef CLOCK_PROCESS_CPUTIME_ID
// Spinning is bounded: a pool left idle sleeps, so the process uses (almost) no CPU.
TEST(ThreadPool, IdlePoolDoesNotBurnCpu) {
  cpu::ThreadPool pool(4);
  std::atomic<int> n{0};
  pool.parallel_for(16, [&](std::int64_t, int) { n.fetch_add(1); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past every spin window
  const double c0 = cpu_ms();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double used = cpu_ms() - c0;
  EXPECT_LT(used, 30.0) << "ms of CPU used by an idle pool in 300 ms";
}
#endif

TEST(Inputs, TokenChunksAgreeWithReference) {
  // A tiny working-memory budget forces many token chunks per call.
  MoeAttributes a;
  const std::int64_t e = 4, h = 32, in = 64, t = 23;
  const auto s = make(a, e, h, in);
  const cpu::CpuMoe moe(s.views(), a, s.shape, 2, 0, /*chunk_bytes=*/a.k * (h + in) * 4 * 5);  // 5 tokens a chunk
  const auto x = random_inputs(t, h, e, 3);
  std::vector<float> out(static_cast<std::size_t>(t * h), NAN);
  const TensorView xv = view_f32(x.x.data(), {t, h}), lv = view_f32(x.logits.data(), {t, e});
  moe.forward(xv, lv, TensorView{}, output_f32(out.data(), {t, h}), t);
  EXPECT_LE(rel_max_error(out, reference_forward(s.views(), a, xv, lv)), 1e-5);
}

TEST(Inputs, ZeroTokensAndThreeDimensionalInput) {
  MoeAttributes a;
  const std::int64_t e = 4, h = 32, in = 32;
  const auto s = make(a, e, h, in);
  const Layer layer(s.views(), a, {Backend::cpu, 2, 0});
  float dummy = 0;
  EXPECT_NO_THROW(layer.forward(view_f32(&dummy, {0, h}), view_f32(&dummy, {0, e}), output_f32(&dummy, {0, h})));
  EXPECT_TRUE(reference_forward(s.views(), a, view_f32(&dummy, {0, h}), view_f32(&dummy, {0, e})).empty());
  const auto x = random_inputs(6, h, e, 2);
  std::vector<float> out3(6 * h), out2(6 * h);
  layer.forward(view_f32(x.x.data(), {2, 3, h}), view_f32(x.logits.data(), {6, e}), output_f32(out3.data(), {2, 3, h}));
  layer.forward(view_f32(x.x.data(), {6, h}), view_f32(x.logits.data(), {6, e}), output_f32(out2.data(), {6, h}));
  EXPECT_EQ(out3, out2);
  const auto ref = reference_forward(s.views(), a, view_f32(x.x.data(), {2, 3, h}), view_f32(x.logits.data(), {6, e}));
  EXPECT_LE(rel_max_error(out3, ref), 1e-5);
}

TEST(Inputs, HalfPrecisionActivationsAgainstReference) {
  MoeAttributes a;
  const std::int64_t e = 5, h = 64, in = 64, t = 13;
  const auto s = make(a, e, h, in);
  const Layer layer(s.views(), a, {Backend::cpu, 2, 0});
  const auto x = random_inputs(t, h, e, 4);
  for (DType dt : {DType::f16, DType::bf16}) {
    auto enc = [&](const std::vector<float>& v) {
      std::vector<std::uint16_t> r(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) r[i] = dt == DType::f16 ? f32_to_f16(v[i]) : f32_to_bf16(v[i]);
      return r;
    };
    const auto xh = enc(x.x), lh = enc(x.logits), mh = enc(x.mix);
    std::vector<std::uint16_t> oh(static_cast<std::size_t>(t * h));
    const TensorView xv(xh.data(), dt, {t, h}), lv(lh.data(), dt, {t, e}), mv(mh.data(), dt, {t, e});
    for (bool mix : {false, true}) {
      layer.forward(xv, lv, mix ? mv : TensorView{}, MutableTensorView(oh.data(), dt, {t, h}));
      std::vector<float> got(oh.size());
      for (std::size_t i = 0; i < oh.size(); ++i) got[i] = dt == DType::f16 ? f16_to_f32(oh[i]) : bf16_to_f32(oh[i]);
      // The reference sees the same half-precision inputs, computed in float64.
      const auto ref = reference_forward(s.views(), a, xv, lv, mix ? mv : TensorView{});
      EXPECT_LE(rel_max_error(got, ref), 1e-2) << dtype_name(dt) << " mix=" << mix;
    }
  }
}

TEST(Inputs, ScalesAndBiasesInFloat16) {
  MoeAttributes a;
  a.k = 2;
  a.activation = Activation::gelu;
  const std::int64_t e = 3, h = 32, in = 32, t = 4;
  auto s = tools::synth_layer(e, h, in, a);
  // Round the float32 scales/biases to float16, and build a float32 twin with the same values.
  std::vector<std::uint16_t> s1(s.fc1.scales.size()), b2(s.b2.size());
  for (std::size_t i = 0; i < s1.size(); ++i) s1[i] = f32_to_f16(s.fc1.scales[i]), s.fc1.scales[i] = f16_to_f32(s1[i]);
  for (std::size_t i = 0; i < b2.size(); ++i) b2[i] = f32_to_f16(s.b2[i]), s.b2[i] = f16_to_f32(b2[i]);
  ExpertWeights w16 = s.views();
  w16.fc1_scales = TensorView(s1.data(), DType::f16, w16.fc1_scales.shape);
  w16.fc2_bias = TensorView(b2.data(), DType::f16, w16.fc2_bias.shape);
  const Layer l16(w16, a, {Backend::cpu, 1, 0}), l32(s.views(), a, {Backend::cpu, 1, 0});
  const auto x = random_inputs(t, h, e, 8);
  std::vector<float> o16(t * h), o32(t * h);
  l16.forward(view_f32(x.x.data(), {t, h}), view_f32(x.logits.data(), {t, e}), output_f32(o16.data(), {t, h}));
  l32.forward(view_f32(x.x.data(), {t, h}), view_f32(x.logits.data(), {t, e}), output_f32(o32.data(), {t, h}));
  EXPECT_EQ(o16, o32);
}

}  // namespace
}  // namespace qmoe::test
