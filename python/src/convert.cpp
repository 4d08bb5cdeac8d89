#include "convert.h"

#include <stdexcept>

namespace qmoe_py {

namespace {

qmoe::DType tag_to_dtype(int tag, const char* name) {
  switch (tag) {
    case static_cast<int>(qmoe::DType::f32):
      return qmoe::DType::f32;
    case static_cast<int>(qmoe::DType::f16):
      return qmoe::DType::f16;
    case static_cast<int>(qmoe::DType::bf16):
      return qmoe::DType::bf16;
    case static_cast<int>(qmoe::DType::u8):
      return qmoe::DType::u8;
    default:
      throw nb::value_error((std::string(name) + ": unknown dtype tag " + std::to_string(tag)).c_str());
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
    throw nb::value_error(
        (std::string(name) + ": expected an array with at least one dimension, got a scalar").c_str());
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
  qmoe::ExpertWeights w;
  std::size_t used = 0;
  qmoe::for_each_tensor(w, [&](const char* name, qmoe::TensorView& view) {
    auto it = arrays.find(name);
    if (it != arrays.end()) view = to_view(it->second, name), ++used;
  });
  if (used != arrays.size())
    for (const auto& [key, value] : arrays) {
      bool known = false;
      qmoe::for_each_tensor(w, [&](const char* name, const qmoe::TensorView&) { known |= key == name; });
      if (!known) throw nb::value_error(("unknown weight tensor name \"" + key + "\"").c_str());
    }
  return w;
}

}  // namespace qmoe_py
