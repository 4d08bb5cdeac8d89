#include "convert.h"

#include <stdexcept>

namespace qmoe_py {

namespace {

qmoe::DType tag_to_dtype(int tag, const char* name) {
  switch (tag) {
    case static_cast<int>(qmoe::DType::f32): return qmoe::DType::f32;
    case static_cast<int>(qmoe::DType::f16): return qmoe::DType::f16;
    case static_cast<int>(qmoe::DType::bf16): return qmoe::DType::bf16;
    case static_cast<int>(qmoe::DType::u8): return qmoe::DType::u8;
    default: throw nb::value_error((std::string(name) + ": unknown dtype tag " + std::to_string(tag)).c_str());
  }
}

template <typename Arr>
qmoe::Shape shape_of(const Arr& a) {
  qmoe::Shape s(a.ndim());
  for (std::size_t i = 0; i < a.ndim(); ++i) s[i] = static_cast<std::int64_t>(a.shape(i));
  return s;
}

template <typename Arr>
void check(const Arr& a, qmoe::DType dt, const char* name) {
  // The Python layer has already refused 0-d arrays (an empty shape means
  // "absent" to the C++ API); this guards direct use of the _core module.
  if (a.ndim() == 0)
    throw nb::value_error((std::string(name) + ": expected an array with at least one dimension, got a scalar").c_str());
  if (a.itemsize() != qmoe::dtype_size(dt))
    throw nb::type_error((std::string(name) + ": element size " + std::to_string(a.itemsize()) +
                          " does not match dtype " + qmoe::dtype_name(dt))
                             .c_str());
}

}  // namespace

qmoe::TensorView to_view(const TaggedIn& t, const char* name) {
  const InArray& a = std::get<0>(t);
  const qmoe::DType dt = tag_to_dtype(std::get<1>(t), name);
  check(a, dt, name);
  return qmoe::TensorView(a.data(), dt, shape_of(a));
}

qmoe::TensorView to_view(const std::optional<TaggedIn>& t, const char* name) {
  return t ? to_view(*t, name) : qmoe::TensorView{};
}

qmoe::MutableTensorView to_mutable_view(const TaggedOut& t, const char* name) {
  const OutArray& a = std::get<0>(t);
  const qmoe::DType dt = tag_to_dtype(std::get<1>(t), name);
  check(a, dt, name);
  return qmoe::MutableTensorView(a.data(), dt, shape_of(a));
}

qmoe::ExpertWeights WeightArgs::views() const {
  static const char* const kNames[] = {
      "fc1_experts_weights", "fc1_scales", "fc1_experts_bias", "fc2_experts_weights",
      "fc2_scales",          "fc2_experts_bias", "fc3_experts_weights", "fc3_scales",
      "fc3_experts_bias",    "fc1_zero_points",  "fc2_zero_points",     "fc3_zero_points"};
  for (const auto& [key, value] : arrays) {
    bool known = false;
    for (const char* n : kNames) known |= key == n;
    if (!known) throw nb::value_error(("unknown weight tensor name \"" + key + "\"").c_str());
  }
  auto get = [&](const char* n) {
    auto it = arrays.find(n);
    return it == arrays.end() ? qmoe::TensorView{} : to_view(it->second, n);
  };
  qmoe::ExpertWeights w;
  w.fc1_weights = get("fc1_experts_weights");
  w.fc1_scales = get("fc1_scales");
  w.fc1_bias = get("fc1_experts_bias");
  w.fc2_weights = get("fc2_experts_weights");
  w.fc2_scales = get("fc2_scales");
  w.fc2_bias = get("fc2_experts_bias");
  w.fc3_weights = get("fc3_experts_weights");
  w.fc3_scales = get("fc3_scales");
  w.fc3_bias = get("fc3_experts_bias");
  w.fc1_zero_points = get("fc1_zero_points");
  w.fc2_zero_points = get("fc2_zero_points");
  w.fc3_zero_points = get("fc3_zero_points");
  return w;
}

}  // namespace qmoe_py
