// Internal: a read-only memory map of a safetensors file and its parsed,
// validated tensor table. Nothing here trusts a size or an offset it read:
// every one is checked against the file's size before use, and nothing is
// allocated in proportion to a number read from the file (only to the header,
// whose bytes are in the file).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "qmoe/file.h"

namespace qmoe::io {

/// The most header bytes accepted (the safetensors library's own limit).
inline constexpr std::uint64_t kMaxHeaderBytes = std::uint64_t{100} << 20;

/// A read-only, private memory map of a whole file.
class Mapping {
 public:
  explicit Mapping(const std::string& path);  ///< throws qmoe::Error naming the file
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  const std::uint8_t* data() const { return data_; }
  std::uint64_t size() const { return size_; }
  /// Drops the mapped pages that cover [p, p + n) from this process (they
  /// are read again from the page cache if touched later). No-op outside the map.
  void release(const void* p, std::size_t n) const noexcept;

 private:
  const std::uint8_t* data_ = nullptr;
  std::uint64_t size_ = 0;
};

/// The parsed header of a safetensors file.
struct Header {
  std::vector<FileTensor> tensors;              ///< header order; offsets from the file start
  std::map<std::string, std::string> metadata;  ///< `__metadata__`
};

/// Parses and validates the header of the `size` bytes at `data` (a whole
/// file named `path` in messages): the length prefix, the JSON, each entry's
/// dtype, shape and offsets (in bounds, dtype x shape == bytes, no two
/// tensors overlapping, no duplicate names), `__metadata__` values strings.
Header parse_header(const std::uint8_t* data, std::uint64_t size, const std::string& path);

/// "F32" / "F16" / "BF16" / "U8".
const char* safetensors_dtype(DType t) noexcept;

}  // namespace qmoe::io
