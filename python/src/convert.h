// Conversions between NumPy arrays (as the Python layer hands them over) or
// CUDA tensors (DLPack, e.g. torch) and qmoe's non-owning tensor views.
//
// The Python layer (python/qmoe/__init__.py) does all dtype policy: it checks
// each argument's NumPy dtype, makes it C-contiguous and passes it here as an
// (array, dtype tag) pair. bfloat16 arrays (ml_dtypes) arrive as their bytes
// viewed as uint16 with tag BF16, so no float32 copy is ever made in Python;
// the C++ library converts at the edges.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "qmoe/qmoe.h"

namespace qmoe_py {

namespace nb = nanobind;

/// Any C-contiguous CPU array, read-only.
using InArray = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;
/// Any C-contiguous CPU array, writable (outputs).
using OutArray = nb::ndarray<nb::c_contig, nb::device::cpu>;
/// (array, qmoe::DType as int) as built by the Python layer.
using TaggedIn = std::tuple<InArray, int>;
using TaggedOut = std::tuple<OutArray, int>;

/// The view of a tagged array; checks that the tag is known and matches the
/// element size. `name` is the ONNX Runtime input name (for messages).
qmoe::TensorView to_view(const TaggedIn& t, const char* name);
qmoe::MutableTensorView to_mutable_view(const TaggedOut& t, const char* name);
/// An absent view when `t` is empty.
qmoe::TensorView to_view(const std::optional<TaggedIn>& t, const char* name);

/// Any DLPack tensor (torch CUDA tensors for Layer.forward_async), read-only /
/// writable. Deliberately without device, dtype or order constraints: nanobind
/// would answer a mismatch with its generic "incompatible function arguments"
/// (naming no tensor), and with implicit conversion allowed it could even hand
/// us a contiguous *copy* -- an output written into a copy is silently lost.
/// to_device_view() checks everything itself, naming the tensor.
using DeviceIn = nb::ndarray<nb::ro>;
using DeviceOut = nb::ndarray<>;

/// The view of a tensor in CUDA device memory on device ordinal `device`.
/// Refuses (naming the tensor): another device type or ordinal (ValueError),
/// a dtype other than float16 / bfloat16 (DLPack kDLBfloat, 16 bits) /
/// float32 (TypeError), a 0-d or non-C-contiguous tensor (ValueError).
/// float32 is let through on purpose: the library then reports a dtype that
/// differs from the input's with the same message as on the CPU; the caller
/// refuses a float32 *input* (the CUDA backend computes in float16/bfloat16).
qmoe::TensorView to_device_view(const DeviceIn& a, const char* name, int device);
qmoe::MutableTensorView to_device_mutable_view(const DeviceOut& a, const char* name, int device);
/// An absent view when `a` is empty.
qmoe::TensorView to_device_view(const std::optional<DeviceIn>& a, const char* name, int device);

/// The weight tensors by ONNX Runtime input name (fc1_experts_weights, ...,
/// fc3_zero_points). Holds the arrays, so the views stay valid while it lives.
/// Unknown names are refused with a ValueError naming them.
struct WeightArgs {
  std::map<std::string, TaggedIn> arrays;
  qmoe::ExpertWeights views() const;
};

/// A NumPy array that owns a moved-in std::vector.
template <typename T>
nb::ndarray<nb::numpy, T> to_numpy(std::vector<T>&& v, std::vector<std::size_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(owned->data(), shape.size(), shape.data(), owner);
}

}  // namespace qmoe_py
