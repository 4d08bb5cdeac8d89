// Synthetic quantized MoE layers of any shape (used by the CLI, tests and benchmarks).
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "qmoe/qmoe.h"

namespace qmoe::tools {

/// A layer's raw weights, owned. Experts are drawn and quantized a few at a time
/// (in parallel, each from its own random stream) so that the float weights of the
/// whole layer never exist at once.
struct SynthLayer {
  MoeAttributes attrs;
  MoeShape shape;
  QuantizedWeights fc1, fc2, fc3;  // fc3 only for swiglu fusion 0
  std::vector<float> b1, b2, b3;   // empty when without biases
  double quant_rel_l2 = 0;         // quantization error of the weights (rel. L2, all matrices)

  /// Views in the ONNX Runtime layout.
  ExpertWeights views() const;
  /// Bytes of the raw quantized weights (+ scales, zero points, biases).
  std::size_t raw_bytes() const;
};

struct SynthOptions {
  bool symmetric = true;
  bool bias = true;
  std::uint64_t seed = 1;
  /// progress(done_experts, total) is called after each expert when set (from
  /// the synthesizing threads, one call at a time).
  std::function<void(std::int64_t, std::int64_t)> progress;
};

/// Draws Gaussian weights (std 1/sqrt(fan_in)) for E experts of H x I and quantizes them.
SynthLayer synth_layer(std::int64_t experts, std::int64_t hidden, std::int64_t inter, const MoeAttributes& attrs,
                       const SynthOptions& opt = {});

/// A named reference shape (gpt-oss-20b, qwen3-30b-a3b, mixtral-8x7b, deepseek-v3).
struct ModelShape {
  std::string name;
  std::int64_t hidden, inter, experts;
  MoeAttributes attrs;
};
/// All reference shapes; `bits` and `block_size` override the quantization.
std::vector<ModelShape> model_shapes(int bits, int block_size);
/// Looks a shape up by name; throws qmoe::Error listing the names otherwise.
ModelShape model_shape(const std::string& name, int bits, int block_size);

/// Fills v with N(0, stddev) floats.
void fill_normal(std::vector<float>& v, std::mt19937_64& rng, float stddev);

}  // namespace qmoe::tools
