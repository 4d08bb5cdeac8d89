// Internal helpers for building qmoe::Error messages.
#pragma once

#include <sstream>
#include <string>
#include <utility>

#include "qmoe/error.h"
#include "qmoe/tensor.h"

namespace qmoe::detail {

template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  throw Error(os.str());
}

/// Throws unless `cond`, with the message assembled from args.
template <typename... Args>
void require(bool cond, Args&&... args) {
  if (!cond) fail(std::forward<Args>(args)...);
}

/// Requires `t` to have exactly shape `want`.
void require_shape(const TensorView& t, const char* name, const Shape& want);
/// Requires `t` to have dtype `want`.
void require_dtype(const TensorView& t, const char* name, DType want);
/// Requires a floating dtype (float32/float16/bfloat16).
void require_float(const TensorView& t, const char* name);
/// Requires non-null data when the tensor has elements.
void require_data(const TensorView& t, const char* name);

/// Reads element i of a float tensor of any float dtype as float.
float load_float(const void* data, DType t, std::int64_t i) noexcept;
/// Converts n floats of dtype t at src into float32 at dst.
void to_f32(const void* src, DType t, std::int64_t n, float* dst) noexcept;
/// Converts n float32 into dtype t at dst.
void from_f32(const float* src, std::int64_t n, DType t, void* dst) noexcept;

}  // namespace qmoe::detail
