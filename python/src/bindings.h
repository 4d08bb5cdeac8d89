// Internal to the extension: what module.cpp and file.cpp share.
#pragma once

#include <nanobind/nanobind.h>

#include <vector>

#include "qmoe/qmoe.h"

namespace qmoe_py {

namespace nb = nanobind;

/// LayerOptions from the Python arguments (backend "cpu"/"cuda" or BACKEND_*;
/// host_experts: CUDA experts kept in host memory; host_experts_gpu_from: tokens per
/// pass from which they are computed on the GPU, -1 = measured).
qmoe::LayerOptions layer_options(int threads, int accuracy_level, nb::handle backend, int device,
                                 std::int64_t max_tokens, const std::vector<int>& host_experts = {},
                                 std::int64_t host_experts_gpu_from = qmoe::LayerOptions::kMeasureCrossover);
/// A built Layer as an instance of the bound Layer class.
nb::object wrap_layer(qmoe::Layer&& layer, const qmoe::LayerOptions& o);
/// Defines File and save_file on `m` (after Layer).
void bind_file(nb::module_& m);

}  // namespace qmoe_py
