// qmoe_enqueue_cost: what enqueueing one CUDA forward_async costs the host, beside the
// CUDA calls it is made of, timed alone on this machine (a diagnosis tool, not
// installed). Prints microseconds per operation, medians of rounds of back-to-back
// calls (the stream drained between rounds so the launch queue never fills).
//   build/qmoe_enqueue_cost [rounds]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "qmoe/qmoe.h"
#include "synth.h"

namespace {

__global__ void empty_kernel(int) {}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// Median over `rounds` of the mean time of 64 calls of f, in microseconds.
double time_us(int rounds, cudaStream_t s, const std::function<void()>& f) {
  std::vector<double> r;
  for (int i = 0; i < rounds; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int j = 0; j < 64; ++j) f();
    const auto t1 = std::chrono::steady_clock::now();
    r.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / 64);
    check(cudaStreamSynchronize(s), "sync");
  }
  std::sort(r.begin(), r.end());
  return r[r.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 31;
  using namespace qmoe;
  MoeAttributes a;
  a.k = 8;
  a.expert_weight_bits = 4;
  a.block_size = 32;
  a.activation = Activation::silu;
  a.normalize_routing_weights = 1;
  const tools::SynthLayer syn = tools::synth_layer(128, 256, 128, a);
  LayerOptions o;
  o.backend = Backend::cuda;
  const Layer layer(syn.views(), syn.attrs, o);
  const std::int64_t T = 1, H = 256, E = 128;
  void *x, *lg, *y;
  check(cudaMalloc(&x, T * H * 2), "malloc");
  check(cudaMalloc(&lg, T * E * 2), "malloc");
  check(cudaMalloc(&y, T * H * 2), "malloc");
  check(cudaMemset(x, 0, T * H * 2), "memset");
  check(cudaMemset(lg, 0, T * E * 2), "memset");
  cudaStream_t s;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  cudaEvent_t ev;
  check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "event");
  const TensorView xv(x, DType::bf16, {T, H}), lv(lg, DType::bf16, {T, E});
  const MutableTensorView yv(y, DType::bf16, {T, H});
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  auto launch_ex = [&](bool pdl) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(1), cfg.blockDim = dim3(32), cfg.stream = s;
    cfg.attrs = attr, cfg.numAttrs = pdl ? 1 : 0;
    check(cudaLaunchKernelEx(&cfg, empty_kernel, 0), "launch");
  };
  for (int i = 0; i < 100; ++i) layer.forward_async(xv, lv, {}, yv, s);  // warm
  check(cudaStreamSynchronize(s), "sync");
  std::printf("%s, T = 1, E = 128, k = 8 (%s)\n", layer.kernel_name(), "microseconds per call, host side");
  struct Row {
    const char* name;
    std::function<void()> f;
  };
  const std::vector<Row> rows = {
      {"Layer::forward_async (whole enqueue)", [&] { layer.forward_async(xv, lv, {}, yv, s); }},
      {"cudaPointerGetAttributes",
       [&] {
         cudaPointerAttributes at{};
         check(cudaPointerGetAttributes(&at, x), "attrs");
       }},
      {"cudaStreamIsCapturing",
       [&] {
         cudaStreamCaptureStatus c;
         check(cudaStreamIsCapturing(s, &c), "capturing");
       }},
      {"cudaGetDevice",
       [&] {
         int d;
         check(cudaGetDevice(&d), "device");
       }},
      {"cudaEventRecord", [&] { check(cudaEventRecord(ev, s), "record"); }},
      {"cudaStreamWaitEvent", [&] { check(cudaStreamWaitEvent(s, ev, 0), "wait"); }},
      {"empty kernel <<<1, 32>>>", [&] { empty_kernel<<<1, 32, 0, s>>>(0); }},
      {"cudaLaunchKernelEx", [&] { launch_ex(false); }},
      {"cudaLaunchKernelEx + PDL attribute", [&] { launch_ex(true); }},
  };
  for (const Row& r : rows) std::printf("%8.2f  %s\n", time_us(rounds, s, r.f), r.name);
  return 0;
}
