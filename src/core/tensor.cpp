#include "qmoe/tensor.h"

#include <bit>
#include <cstring>
#include <sstream>

#include "core/check.h"

namespace qmoe {

std::size_t dtype_size(DType t) noexcept {
  switch (t) {
    case DType::f32:
      return 4;
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::u8:
      return 1;
  }
  return 1;
}

const char* dtype_name(DType t) noexcept {
  switch (t) {
    case DType::f32:
      return "float32";
    case DType::f16:
      return "float16";
    case DType::bf16:
      return "bfloat16";
    case DType::u8:
      return "uint8";
  }
  return "?";
}

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

static std::int64_t product(const Shape& s) {
  if (s.empty()) return 0;
  std::int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

std::int64_t TensorView::numel() const noexcept { return product(shape); }
std::int64_t MutableTensorView::numel() const noexcept { return product(shape); }

float f16_to_f32(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: value = man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return std::bit_cast<float>(bits);
}

std::uint16_t f32_to_f16(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to inf
  if (ax < 0x38800000u) {                        // below the smallest normal half: subnormal
    // Adding 0.5 (2^-1) aligns the half-subnormal grid (step 2^-24) to float's
    // last mantissa bits; the hardware add rounds to nearest even for us.
    const float r = std::bit_cast<float>(ax) + 0.5f;
    return sign | static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(r) - 0x3f000000u);
  }
  std::uint32_t m = ax + 0xc8000fffu + ((ax >> 13) & 1u);  // rebias exponent, round to nearest even
  return sign | static_cast<std::uint16_t>(m >> 13);
}

float bf16_to_f32(std::uint16_t h) noexcept { return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16); }

std::uint16_t f32_to_bf16(float f) noexcept {
  std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

namespace detail {

void require_shape(const TensorView& t, const char* name, const Shape& want) {
  if (t.shape != want) fail(name, ": expected shape ", shape_str(want), ", got ", shape_str(t.shape));
}

void require_dtype(const TensorView& t, const char* name, DType want) {
  if (t.dtype != want) fail(name, ": expected dtype ", dtype_name(want), ", got ", dtype_name(t.dtype));
}

void require_float(const TensorView& t, const char* name) {
  if (t.dtype == DType::u8) fail(name, ": expected dtype float32, float16 or bfloat16, got ", dtype_name(t.dtype));
}

void require_data(const TensorView& t, const char* name) {
  for (auto d : t.shape)
    if (d < 0) fail(name, ": negative dimension in shape ", shape_str(t.shape));
  if (t.numel() > 0 && t.data == nullptr) fail(name, ": data pointer is null for shape ", shape_str(t.shape));
}

float load_float(const void* data, DType t, std::int64_t i) noexcept {
  switch (t) {
    case DType::f32:
      return static_cast<const float*>(data)[i];
    case DType::f16:
      return f16_to_f32(static_cast<const std::uint16_t*>(data)[i]);
    case DType::bf16:
      return bf16_to_f32(static_cast<const std::uint16_t*>(data)[i]);
    case DType::u8:
      return static_cast<const std::uint8_t*>(data)[i];
  }
  return 0.f;
}

void to_f32(const void* src, DType t, std::int64_t n, float* dst) noexcept {
  if (t == DType::f32) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * 4);
    return;
  }
  for (std::int64_t i = 0; i < n; ++i) dst[i] = load_float(src, t, i);
}

void from_f32(const float* src, std::int64_t n, DType t, void* dst) noexcept {
  switch (t) {
    case DType::f32:
      std::memcpy(dst, src, static_cast<std::size_t>(n) * 4);
      return;
    case DType::f16:
      for (std::int64_t i = 0; i < n; ++i) static_cast<std::uint16_t*>(dst)[i] = f32_to_f16(src[i]);
      return;
    case DType::bf16:
      for (std::int64_t i = 0; i < n; ++i) static_cast<std::uint16_t*>(dst)[i] = f32_to_bf16(src[i]);
      return;
    case DType::u8:
      return;
  }
}

}  // namespace detail
}  // namespace qmoe
