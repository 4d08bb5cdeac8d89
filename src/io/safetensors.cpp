// The safetensors container: a read-only map of a file and its header, parsed
// and checked against the file's size before any tensor byte is used.
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"

namespace qmoe::io {

using detail::fail;
using detail::require;
// std::map objects: ordered_json looks a key up linearly, so parsing a header
// of n tensors with it takes O(n^2) (20 s for a crafted 8 MB header, about an
// hour at the 100 MB limit); parse_header records the header order itself.
using json = nlohmann::json;

namespace {

std::uint64_t page_size() {
  static const std::uint64_t p = static_cast<std::uint64_t>(sysconf(_SC_PAGESIZE));
  return p;
}

// Parses a safetensors dtype name; false for names qmoe does not read.
bool parse_dtype(const std::string& s, DType* t) {
  if (s == "F32") return *t = DType::f32, true;
  if (s == "F16") return *t = DType::f16, true;
  if (s == "BF16") return *t = DType::bf16, true;
  if (s == "U8") return *t = DType::u8, true;
  return false;
}

// parse_header's first pass (nlohmann's SAX interface): the top-level keys in
// order, the first one repeated, and a nesting limit that stops the parse.
// (A parse callback cannot do it: nlohmann then scans the enclosing object at
// the end of each object, O(n^2) in the tensors.)
struct HeaderScan {
  std::set<std::string> seen;
  std::vector<std::string> order;
  std::string duplicate;
  int depth = 0;
  bool too_deep = false;

  bool open() { return !(too_deep = too_deep || ++depth > 4); }
  bool start_object(std::size_t) { return open(); }
  bool start_array(std::size_t) { return open(); }
  bool end_object() { return --depth, true; }
  bool end_array() { return --depth, true; }
  bool key(std::string& k) {
    if (depth == 1) {
      if (seen.insert(k).second)
        order.push_back(k);
      else if (duplicate.empty())
        duplicate = k;
    }
    return true;
  }
  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(json::number_integer_t) { return true; }
  bool number_unsigned(json::number_unsigned_t) { return true; }
  bool number_float(json::number_float_t, const std::string&) { return true; }
  bool string(std::string&) { return true; }
  bool binary(json::binary_t&) { return true; }
  bool parse_error(std::size_t, const std::string&, const json::exception&) { return false; }
};

}  // namespace

const char* safetensors_dtype(DType t) noexcept {
  switch (t) {
    case DType::f32:
      return "F32";
    case DType::f16:
      return "F16";
    case DType::bf16:
      return "BF16";
    case DType::u8:
      return "U8";
  }
  return "?";
}

Mapping::Mapping(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(path, ": cannot stat: ", std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  size_ = static_cast<std::uint64_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      fail(path, ": cannot memory-map ", size_, " bytes: ", std::strerror(err));
    }
    data_ = static_cast<const std::uint8_t*>(p);
  }
  ::close(fd);  // the map keeps the file open
}

Mapping::~Mapping() {
  if (data_) ::munmap(const_cast<std::uint8_t*>(data_), size_);
}

void Mapping::release(const void* p, std::size_t n) const noexcept {
  const auto* b = static_cast<const std::uint8_t*>(p);
  if (!data_ || b < data_ || b >= data_ + size_) return;
  // Only whole pages inside [p, p + n): a page shared with bytes still to be
  // read stays. Dropping a private, never-written file page only forgets it:
  // a later touch reads it again from the page cache, so this cannot change data.
  const std::uint64_t ps = page_size();
  const std::uint64_t lo = (static_cast<std::uint64_t>(b - data_) + ps - 1) / ps * ps;
  const std::uint64_t hi = std::min<std::uint64_t>(static_cast<std::uint64_t>(b - data_) + n, size_) / ps * ps;
  if (hi > lo) ::madvise(const_cast<std::uint8_t*>(data_) + lo, hi - lo, MADV_DONTNEED);
}

Header parse_header(const std::uint8_t* data, std::uint64_t size, const std::string& path) {
  require(size >= 8, path, ": not a safetensors file: ", size, " bytes, fewer than the 8-byte header length");
  std::uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = len << 8 | data[i];  // little-endian
  require(len <= kMaxHeaderBytes, path, ": header length ", len, " exceeds the limit of ", kMaxHeaderBytes,
          " bytes (not a safetensors file, or a corrupt one)");
  require(len <= size - 8, path, ": truncated: the header claims ", len, " bytes but the file has ", size - 8,
          " after the length prefix");
  require(len >= 2, path, ": header of ", len, " bytes cannot hold a JSON object");
  const char* text = reinterpret_cast<const char*>(data + 8);
  require(text[0] == '{', path, ": the header does not start with '{' (not a safetensors file)");

  // Names must be unique (nlohmann keeps the last of duplicate keys silently)
  // and nesting shallow: a first pass meets the top-level keys in order.
  HeaderScan scan;
  const bool well_formed = json::sax_parse(text, text + len, &scan);
  require(!scan.too_deep, path, ": header JSON nests deeper than a safetensors header can");
  require(well_formed, path, ": the header is not a valid JSON object");
  const json j = json::parse(text, text + len, nullptr, /*allow_exceptions=*/false);
  require(!j.is_discarded() && j.is_object(), path, ": the header is not a valid JSON object");
  require(scan.duplicate.empty(), path, ": tensor name \"", scan.duplicate, "\" appears twice in the header");

  Header h;
  const std::uint64_t base = 8 + len, data_bytes = size - base;
  for (const std::string& name : scan.order) {
    const auto found = j.find(name);
    require(found != j.end(), path, ": tensor \"", name, "\" is lost parsing the header");
    const json& v = *found;
    if (name == "__metadata__") {
      require(v.is_object(), path, ": __metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        require(m.value().is_string(), path, ": __metadata__[\"", m.key(), "\"] must be a string, got ",
                m.value().type_name());
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    std::string where = path;
    where.append(": tensor \"").append(name).append("\"");
    require(!name.empty(), path, ": a tensor has an empty name");
    require(v.is_object(), where, ": expected an object {dtype, shape, data_offsets}, got ", v.type_name());
    for (auto f = v.begin(); f != v.end(); ++f)
      require(f.key() == "dtype" || f.key() == "shape" || f.key() == "data_offsets", where, ": unknown field \"",
              f.key(), "\"");
    FileTensor t;
    t.name = name;
    const auto dt = v.find("dtype");
    require(dt != v.end() && dt->is_string(), where, ": missing or non-string \"dtype\"");
    require(parse_dtype(dt->get<std::string>(), &t.dtype), where, ": dtype \"", dt->get<std::string>(),
            "\" is not one qmoe reads (expected F32, F16, BF16 or U8)");
    const auto sh = v.find("shape");
    require(sh != v.end() && sh->is_array(), where, ": missing or non-array \"shape\"");
    require(sh->size() <= 8, where, ": rank ", sh->size(), " is more than the 8 dimensions qmoe accepts");
    // The element count may not exceed the file: checked with no overflow.
    std::uint64_t count = 1;
    bool zero = false;
    for (const json& d : *sh) {
      require(d.is_number_unsigned() || (d.is_number_integer() && d.get<std::int64_t>() >= 0), where, ": shape ",
              sh->dump(), " has an entry that is not a non-negative integer");
      const std::uint64_t n = d.get<std::uint64_t>();
      require(n <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), where, ": dimension ", n,
              " is too large");
      t.shape.push_back(static_cast<std::int64_t>(n));
      if (n == 0)
        zero = true;
      else if (!zero) {
        require(count <= size / n, where, ": shape ", sh->dump(), " holds more elements than the file has bytes (",
                size, ")");
        count *= n;
      }
    }
    if (zero) count = 0;
    const auto off = v.find("data_offsets");
    require(off != v.end() && off->is_array() && off->size() == 2 && (*off)[0].is_number_unsigned() &&
                (*off)[1].is_number_unsigned(),
            where, ": \"data_offsets\" must be [begin, end] with non-negative integers");
    const std::uint64_t b = (*off)[0].get<std::uint64_t>(), e = (*off)[1].get<std::uint64_t>();
    require(b <= e, where, ": data_offsets [", b, ", ", e, "] end before they begin");
    require(e <= data_bytes, where, ": data_offsets [", b, ", ", e, "] lie beyond the ", data_bytes,
            " data bytes of the file (truncated or corrupt)");
    t.nbytes = e - b;
    t.offset = base + b;
    require(t.nbytes == count * dtype_size(t.dtype), where, ": ", dt->get<std::string>(), " x shape ",
            shape_str(t.shape), " = ", count * dtype_size(t.dtype), " bytes, but data_offsets span ", t.nbytes);
    h.tensors.push_back(std::move(t));
  }

  // No two tensors may share a byte.
  std::vector<const FileTensor*> by_offset;
  for (const FileTensor& t : h.tensors)
    if (t.nbytes) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const FileTensor* a, const FileTensor* b) { return a->offset < b->offset; });
  for (std::size_t i = 1; i < by_offset.size(); ++i)
    require(by_offset[i - 1]->offset + by_offset[i - 1]->nbytes <= by_offset[i]->offset, path, ": tensors \"",
            by_offset[i - 1]->name, "\" and \"", by_offset[i]->name, "\" overlap in the file");
  return h;
}

}  // namespace qmoe::io
