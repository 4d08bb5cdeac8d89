#include "core/check.h"
#include "qmoe/quantize.h"
#include "quant/raw.h"

namespace qmoe::detail {

RawMatrix::RawMatrix(const TensorView& w, const TensorView& s, const TensorView& z, int bits_, int block,
                     std::int64_t rows_, std::int64_t cols_)
    : weights(static_cast<const std::uint8_t*>(w.data)),
      scales(s.data),
      scale_dtype(s.dtype),
      zero_points(z.present() ? static_cast<const std::uint8_t*>(z.data) : nullptr),
      bits(bits_),
      block_size(block),
      experts(w.shape.empty() ? 0 : w.shape[0]),
      rows(rows_),
      cols(cols_) {}

int RawMatrix::code(std::int64_t e, std::int64_t n, std::int64_t c) const {
  const std::int64_t row_bytes = cols / pack();
  const std::uint8_t byte = weights[(e * rows + n) * row_bytes + c / pack()];
  if (bits == 8) return byte;
  return (c % 2 == 0) ? (byte & 0x0f) : (byte >> 4);
}

int RawMatrix::zero(std::int64_t e, std::int64_t n, std::int64_t b) const {
  if (!zero_points) return 1 << (bits - 1);
  std::int64_t index;  // element index along the packed axis, and the row of bytes it lives in
  const std::uint8_t* base;
  if (block_size == 0) {  // [E, ceil(N/pack)]: packed across rows
    base = zero_points + e * ((rows + pack() - 1) / pack());
    index = n;
  } else {  // [E, N, ceil(blocks/pack)]: packed along the blocks of a row
    base = zero_points + (e * rows + n) * ((blocks() + pack() - 1) / pack());
    index = b;
  }
  const std::uint8_t byte = base[index / pack()];
  if (bits == 8) return byte;
  return (index % 2 == 0) ? (byte & 0x0f) : (byte >> 4);
}

float RawMatrix::scale(std::int64_t e, std::int64_t n, std::int64_t b) const {
  return load_float(scales, scale_dtype, (e * rows + n) * blocks() + b);
}

double RawMatrix::value(std::int64_t e, std::int64_t n, std::int64_t c) const {
  const std::int64_t b = c / block_len();
  return static_cast<double>(scale(e, n, b)) * (code(e, n, c) - zero(e, n, b));
}

void dequantize_expert(const RawMatrix& m, std::int64_t e, double* out) {
  for (std::int64_t n = 0; n < m.rows; ++n)
    for (std::int64_t c = 0; c < m.cols; ++c) out[n * m.cols + c] = m.value(e, n, c);
}

}  // namespace qmoe::detail

namespace qmoe {

std::vector<double> dequantize(const TensorView& weights, const TensorView& scales, const TensorView& zero_points,
                               int bits, int block_size, std::int64_t cols) {
  using namespace detail;
  require(bits == 4 || bits == 8, "bits: expected 4 or 8, got ", bits);
  if (!(weights.present() && weights.rank() == 3))
    fail("weights: expected rank 3 [E, N, K/pack], got shape ", shape_str(weights.shape));
  require_dtype(weights, "weights", DType::u8);
  require_data(weights, "weights");
  const std::int64_t e = weights.shape[0], n = weights.shape[1];
  require(cols >= 1 && cols * bits / 8 == weights.shape[2] && cols % (8 / bits) == 0, "weights: last dimension ",
          weights.shape[2], " does not hold ", cols, " columns of ", bits, " bits");
  require(block_size == 0 || (block_size >= 16 && (block_size & (block_size - 1)) == 0 && cols % block_size == 0),
          "block_size: expected 0 or a power of two >= 16 dividing ", cols, ", got ", block_size);
  require(scales.present(), "scales: required, but absent");
  require_float(scales, "scales");
  require_data(scales, "scales");
  if (block_size == 0 && scales.rank() == 2)
    require_shape(scales, "scales", {e, n});
  else
    require_shape(scales, "scales", {e, n, block_size ? cols / block_size : 1});
  const std::int64_t pack = 8 / bits;
  if (zero_points.present()) {
    require_dtype(zero_points, "zero_points", DType::u8);
    require_data(zero_points, "zero_points");
    if (block_size == 0)
      require_shape(zero_points, "zero_points", {e, (n + pack - 1) / pack});
    else
      require_shape(zero_points, "zero_points", {e, n, (cols / block_size + pack - 1) / pack});
  }
  RawMatrix m(weights, scales, zero_points, bits, block_size, n, cols);
  std::vector<double> out(static_cast<std::size_t>(e * n * cols));
  for (std::int64_t i = 0; i < e; ++i) dequantize_expert(m, i, out.data() + i * n * cols);
  return out;
}

}  // namespace qmoe
