// qmoe/tensor.h — non-owning views of dense, row-major tensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace qmoe {

/// Element types qmoe reads and writes.
enum class DType : std::uint8_t {
  f32,   ///< IEEE float32
  f16,   ///< IEEE float16 (binary16)
  bf16,  ///< bfloat16 (upper half of a float32)
  u8,    ///< uint8: packed quantized weights and zero points
};

/// Size of one element in bytes.
std::size_t dtype_size(DType t) noexcept;
/// "float32", "float16", "bfloat16" or "uint8".
const char* dtype_name(DType t) noexcept;

/// Shape of a tensor, outermost dimension first.
using Shape = std::vector<std::int64_t>;

/// "[2, 3, 4]".
std::string shape_str(const Shape& s);

/// A read-only view of a contiguous row-major tensor owned by the caller.
/// A default-constructed view is "absent" (used for optional inputs).
struct TensorView {
  const void* data = nullptr;  ///< first element; may be null only when absent or empty
  DType dtype = DType::f32;    ///< element type
  Shape shape;                 ///< dimensions; empty shape = absent

  TensorView() = default;
  TensorView(const void* d, DType t, Shape s) : data(d), dtype(t), shape(std::move(s)) {}

  /// True when the view refers to a tensor (optional inputs may be absent).
  bool present() const noexcept { return !shape.empty(); }
  /// Number of dimensions.
  int rank() const noexcept { return static_cast<int>(shape.size()); }
  /// Product of the dimensions (0 when absent).
  std::int64_t numel() const noexcept;
  /// Size of the data in bytes.
  std::size_t nbytes() const noexcept { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
};

/// A writable view of a contiguous row-major tensor owned by the caller.
struct MutableTensorView {
  void* data = nullptr;      ///< first element
  DType dtype = DType::f32;  ///< element type
  Shape shape;               ///< dimensions

  MutableTensorView() = default;
  MutableTensorView(void* d, DType t, Shape s) : data(d), dtype(t), shape(std::move(s)) {}
  /// Number of elements.
  std::int64_t numel() const noexcept;
  /// The same memory, read-only.
  TensorView view() const { return TensorView(data, dtype, shape); }
};

/// Convenience constructors for views over typed host buffers.
inline TensorView view_f32(const float* p, Shape s) { return {p, DType::f32, std::move(s)}; }
inline TensorView view_u8(const std::uint8_t* p, Shape s) { return {p, DType::u8, std::move(s)}; }
inline MutableTensorView output_f32(float* p, Shape s) { return {p, DType::f32, std::move(s)}; }

/// float16 / bfloat16 <-> float32 conversions (round to nearest even).
float f16_to_f32(std::uint16_t h) noexcept;
std::uint16_t f32_to_f16(float f) noexcept;
float bf16_to_f32(std::uint16_t h) noexcept;
std::uint16_t f32_to_bf16(float f) noexcept;

}  // namespace qmoe
