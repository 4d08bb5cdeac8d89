// Internal: builds a Layer whose packer reports the raw bytes it is done with
// (used by the file loader to drop memory-mapped pages as it goes).
#pragma once

#include <cstddef>
#include <functional>

#include "qmoe/layer.h"

namespace qmoe::detail {

struct LayerBuilder {
  using Release = std::function<void(const void*, std::size_t)>;
  static Layer build(const ExpertWeights& w, const MoeAttributes& a, const LayerOptions& o, const Release* release) {
    return Layer(w, a, o, release);
  }
};

}  // namespace qmoe::detail
