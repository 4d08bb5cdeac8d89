#include "convert.h"

#include <cstdint>
#include <stdexcept>
#include <string>

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

// --- CUDA tensors (DLPack) ----------------------------------------------------

constexpr std::int32_t kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLROCM = 10, kDLCUDAManaged = 13;

std::string device_type_name(std::int32_t t) {
  switch (t) {
    case kDLCPU:
      return "cpu";
    case kDLCUDA:
      return "cuda";
    case kDLCUDAHost:
      return "cuda host (pinned) memory";
    case kDLROCM:
      return "rocm";
    case kDLCUDAManaged:
      return "cuda managed memory";
    default:
      return "DLPack device type " + std::to_string(t);
  }
}

std::string dl_dtype_name(nb::dlpack::dtype d) {
  using code = nb::dlpack::dtype_code;
  std::string base;
  switch (static_cast<code>(d.code)) {
    case code::Int:
      base = "int";
      break;
    case code::UInt:
      base = "uint";
      break;
    case code::Float:
      base = "float";
      break;
    case code::Bfloat:
      base = "bfloat";
      break;
    case code::Complex:
      base = "complex";
      break;
    case code::Bool:
      return "bool";
    default:
      base = "DLPack type code " + std::to_string(d.code) + " bits ";
      break;
  }
  std::string s = base + std::to_string(d.bits);
  if (d.lanes != 1) s += "x" + std::to_string(d.lanes);
  return s;
}

/// float16 <- (kDLFloat, 16), bfloat16 <- (kDLBfloat, 16), float32 <- (kDLFloat, 32).
qmoe::DType device_dtype(nb::dlpack::dtype d, const char* name) {
  using code = nb::dlpack::dtype_code;
  if (d.lanes == 1) {
    if (d.code == static_cast<std::uint8_t>(code::Float) && d.bits == 16) return qmoe::DType::f16;
    if (d.code == static_cast<std::uint8_t>(code::Bfloat) && d.bits == 16) return qmoe::DType::bf16;
    if (d.code == static_cast<std::uint8_t>(code::Float) && d.bits == 32) return qmoe::DType::f32;
  }
  throw nb::type_error(
      (std::string(name) + ": expected dtype float16 or bfloat16 (CUDA backend), got " + dl_dtype_name(d)).c_str());
}

template <typename Arr>
qmoe::Shape device_checks(const Arr& a, const char* name, int device) {
  const std::string n(name);
  if (a.device_type() != kDLCUDA)
    throw nb::value_error((n + ": expected a tensor in CUDA device memory on cuda:" + std::to_string(device) +
                           ", got one in " + device_type_name(a.device_type()))
                              .c_str());
  if (a.device_id() != device)
    throw nb::value_error((n + ": the tensor is on cuda:" + std::to_string(a.device_id()) +
                           ", but the layer is on cuda:" + std::to_string(device))
                              .c_str());
  if (a.ndim() == 0)
    throw nb::value_error((n + ": expected a tensor with at least one dimension, got a scalar").c_str());
  const qmoe::Shape shape = shape_of(a);
  // C order, element strides. Dimensions of extent 1 may carry any stride
  // (torch gives them arbitrary ones), and an empty tensor has no layout.
  bool empty = false;
  for (auto d : shape) empty |= d == 0;
  std::int64_t want = 1;
  bool c_order = true;
  for (std::size_t i = a.ndim(); i-- > 0;) {
    if (shape[i] != 1 && a.stride(i) != want) c_order = false;
    want *= shape[i];
  }
  if (!c_order && !empty) {
    std::string strides;
    for (std::size_t i = 0; i < a.ndim(); ++i) strides += (i ? ", " : "") + std::to_string(a.stride(i));
    throw nb::value_error((n + ": expected a C-contiguous tensor, got shape " + qmoe::shape_str(shape) +
                           " with strides [" + strides + "] (call .contiguous())")
                              .c_str());
  }
  return shape;
}

}  // namespace

qmoe::TensorView to_device_view(const DeviceIn& a, const char* name, int device) {
  qmoe::Shape shape = device_checks(a, name, device);
  return qmoe::TensorView(a.data(), device_dtype(a.dtype(), name), std::move(shape));
}

qmoe::TensorView to_device_view(const std::optional<DeviceIn>& a, const char* name, int device) {
  return a ? to_device_view(*a, name, device) : qmoe::TensorView{};
}

qmoe::MutableTensorView to_device_mutable_view(const DeviceOut& a, const char* name, int device) {
  qmoe::Shape shape = device_checks(a, name, device);
  return qmoe::MutableTensorView(a.data(), device_dtype(a.dtype(), name), std::move(shape));
}

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
