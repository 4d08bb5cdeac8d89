// qmoe's model file (include/qmoe/file.h): MoE layers stored as a safetensors
// file in the raw ONNX Runtime layout, opened through a read-only memory map
// and prepacked straight from it.
#include "qmoe/file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"
#include "io/file_format.h"
#include "io/safetensors.h"
#include "layer/builder.h"

namespace qmoe {

using detail::fail;
using detail::require;
using json = nlohmann::ordered_json;
// For text read from a file: std::map objects (ordered_json looks a key up
// linearly, which makes a parse O(n^2) in the keys of an object).
using ujson = nlohmann::json;

namespace io {

namespace {

const char* const kWeightNames[] = {"fc1_experts_weights", "fc1_scales",      "fc1_experts_bias",
                                    "fc2_experts_weights", "fc2_scales",      "fc2_experts_bias",
                                    "fc3_experts_weights", "fc3_scales",      "fc3_experts_bias",
                                    "fc1_zero_points",     "fc2_zero_points", "fc3_zero_points"};

// The slot of ExpertWeights holding ORT input `name`, or null.
TensorView* weight_slot(ExpertWeights& w, std::string_view name) {
  TensorView* slot = nullptr;
  for_each_tensor(w, [&](const char* n, TensorView& v) {
    if (name == n) slot = &v;
  });
  return slot;
}

// The deepest nesting of [ and { in JSON text (strings skipped; exact for
// valid JSON).
std::size_t json_nesting(const std::string& s) {
  std::size_t depth = 0, most = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      most = std::max(most, ++depth);
    } else if ((c == ']' || c == '}') && depth) {
      --depth;
    }
  }
  return most;
}

// JSON text from a file's __metadata__ (`key` names it in errors), its nesting
// limited first: the messages that quote a value use nlohmann's dump(), which
// recurses (a 2 MB "[[[[...]]]]" overflowed the stack). Discarded if invalid.
ujson parse_metadata_json(const std::string& text, const std::string& where, const std::string& key) {
  constexpr std::size_t kMaxNesting = 16;
  require(json_nesting(text) <= kMaxNesting, where, ": __metadata__[\"", key, "\"] nests deeper than ", kMaxNesting,
          " levels");
  return ujson::parse(text, nullptr, false);
}

template <typename T>
T get_attr(const ujson& v, const std::string& where, const char* name) {
  if constexpr (std::is_same_v<T, int>) {
    require(v.is_number_integer(), where, ": attribute ", name, ": expected an integer, got ", v.dump());
    const auto i = v.get<std::int64_t>();
    require(i >= std::numeric_limits<int>::min() && i <= std::numeric_limits<int>::max(), where, ": attribute ", name,
            ": ", i, " is out of range");
    return static_cast<int>(i);
  } else {
    // JSON has no infinities: "inf" / "-inf" stand for them.
    if (v.is_string()) {
      const std::string s = v.get<std::string>();
      if (s == "inf") return std::numeric_limits<float>::infinity();
      if (s == "-inf") return -std::numeric_limits<float>::infinity();
    }
    require(v.is_number(), where, ": attribute ", name, ": expected a number (or \"inf\"), got ", v.dump());
    return v.get<float>();
  }
}

}  // namespace

json attributes_to_json(const MoeAttributes& a) {
  json j;
  auto num = [](float f) -> json {
    if (std::isinf(f)) return f > 0 ? "inf" : "-inf";
    return f;
  };
  j["k"] = a.k;
  j["activation_type"] = activation_name(a.activation);
  j["normalize_routing_weights"] = a.normalize_routing_weights;
  j["use_sparse_mixer"] = a.use_sparse_mixer;
  j["expert_weight_bits"] = a.expert_weight_bits;
  j["block_size"] = a.block_size;
  j["swiglu_fusion"] = a.swiglu_fusion;
  j["swiglu_limit"] = num(a.swiglu_limit);
  j["activation_alpha"] = num(a.activation_alpha);
  j["activation_beta"] = num(a.activation_beta);
  return j;
}

namespace {

MoeAttributes attributes_from(const ujson& j, const std::string& where) {
  require(j.is_object(), where, ": \"attributes\" must be a JSON object, got ", j.dump());
  MoeAttributes a;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const ujson& v = it.value();
    if (k == "k")
      a.k = get_attr<int>(v, where, "k");
    else if (k == "activation_type") {
      require(v.is_string(), where, ": attribute activation_type: expected a string, got ", v.dump());
      try {
        a.activation = parse_activation(v.get<std::string>());
      } catch (const Error& e) {
        fail(where, ": ", e.what());
      }
    } else if (k == "normalize_routing_weights")
      a.normalize_routing_weights = get_attr<int>(v, where, "normalize_routing_weights");
    else if (k == "use_sparse_mixer")
      a.use_sparse_mixer = get_attr<int>(v, where, "use_sparse_mixer");
    else if (k == "expert_weight_bits")
      a.expert_weight_bits = get_attr<int>(v, where, "expert_weight_bits");
    else if (k == "block_size")
      a.block_size = get_attr<int>(v, where, "block_size");
    else if (k == "swiglu_fusion")
      a.swiglu_fusion = get_attr<int>(v, where, "swiglu_fusion");
    else if (k == "swiglu_limit")
      a.swiglu_limit = get_attr<float>(v, where, "swiglu_limit");
    else if (k == "activation_alpha")
      a.activation_alpha = get_attr<float>(v, where, "activation_alpha");
    else if (k == "activation_beta")
      a.activation_beta = get_attr<float>(v, where, "activation_beta");
    else
      fail(where, ": unknown attribute \"", k, "\" (a newer format? this reader knows format version ",
           kFileFormatVersion, ")");
  }
  return a;
}

}  // namespace

MoeAttributes attributes_from_json(const json& j, const std::string& where) { return attributes_from(ujson(j), where); }

ParsedFile parse_file(const std::uint8_t* data, std::uint64_t size, const std::string& path) {
  ParsedFile pf;
  Header h = parse_header(data, size, path);
  pf.tensors = std::move(h.tensors);

  const auto version = h.metadata.find(kVersionKey);
  require(version != h.metadata.end(), path, ": not a qmoe file: __metadata__ has no \"", kVersionKey,
          "\" (a plain safetensors file; write qmoe files with qmoe::save_file / qmoe.save)");
  require(version->second == std::to_string(kFileFormatVersion), path, ": format version \"", version->second,
          "\" is not one this qmoe reads (it reads version ", kFileFormatVersion, ")");
  const auto list = h.metadata.find(kLayersKey);
  require(list != h.metadata.end(), path, ": __metadata__ has no \"", kLayersKey, "\" (the layer names)");
  const ujson names = parse_metadata_json(list->second, path, kLayersKey);
  require(!names.is_discarded() && names.is_array(), path, ": __metadata__[\"", kLayersKey,
          "\"] must be a JSON array of layer names, got \"", list->second.substr(0, 200), "\"");
  std::set<std::string> layer_names;
  for (const ujson& n : names) {
    require(n.is_string() && !n.get<std::string>().empty(), path, ": ", kLayersKey,
            " holds a non-string or empty layer name: ", n.dump());
    require(layer_names.insert(n.get<std::string>()).second, path, ": layer \"", n.get<std::string>(),
            "\" is listed twice in ", kLayersKey);
  }
  for (const auto& [k, v] : h.metadata) {
    if (k.rfind(kLayerKeyPrefix, 0) == 0) {
      require(layer_names.count(k.substr(std::strlen(kLayerKeyPrefix))), path, ": __metadata__[\"", k,
              "\"] describes a layer not listed in ", kLayersKey);
    } else if (k.rfind("qmoe.", 0) == 0) {
      require(k == kVersionKey || k == kLayersKey, path, ": unknown reserved __metadata__ key \"", k, "\"");
    } else {
      pf.metadata[k] = v;
    }
  }

  // Each tensor belongs to the layer with the longest name that prefixes it
  // followed by '.', so layers "a" and "a.b" can live in one file. With the
  // tensor names sorted, those under layer L are the range [L + ".", L + "/")
  // ('/' follows '.'): the longest layers claim theirs first and a skip list
  // passes over claimed ones, so this is O(n log n) (comparing every tensor
  // with every layer spun for an hour on a crafted 100 MB header).
  std::vector<std::vector<const FileTensor*>> owned(names.size());
  std::vector<std::string> ordered;
  for (const ujson& n : names) ordered.push_back(n.get<std::string>());
  const std::size_t nt = pf.tensors.size();
  std::vector<std::size_t> sorted(nt), next(nt + 1), by_length(ordered.size());
  std::vector<std::ptrdiff_t> owner(nt, -1);
  for (std::size_t i = 0; i < nt; ++i) sorted[i] = i;
  for (std::size_t i = 0; i <= nt; ++i) next[i] = i;  // next[i] == i: position i is unclaimed
  for (std::size_t i = 0; i < ordered.size(); ++i) by_length[i] = i;
  const auto name_of = [&](std::size_t t) -> const std::string& { return pf.tensors[t].name; };
  std::sort(sorted.begin(), sorted.end(), [&](std::size_t a, std::size_t b) { return name_of(a) < name_of(b); });
  std::stable_sort(by_length.begin(), by_length.end(),
                   [&](std::size_t a, std::size_t b) { return ordered[a].size() > ordered[b].size(); });
  const auto unclaimed = [&](std::size_t i) {  // the first unclaimed position >= i
    while (next[i] != i) i = next[i] = next[next[i]];
    return i;
  };
  const auto position = [&](const std::string& key) {
    return static_cast<std::size_t>(
        std::lower_bound(sorted.begin(), sorted.end(), key,
                         [&](std::size_t t, const std::string& k) { return name_of(t) < k; }) -
        sorted.begin());
  };
  for (const std::size_t l : by_length) {
    const std::string& ln = ordered[l];
    const std::size_t hi = position(ln + "/");
    for (std::size_t k = unclaimed(position(ln + ".")); k < hi; k = unclaimed(k + 1)) {
      if (name_of(sorted[k]).size() == ln.size() + 1) continue;  // "<layer>." alone: no suffix
      owner[sorted[k]] = static_cast<std::ptrdiff_t>(l);
      next[k] = k + 1;
    }
  }
  for (std::size_t t = 0; t < nt; ++t)
    if (owner[t] >= 0) owned[static_cast<std::size_t>(owner[t])].push_back(&pf.tensors[t]);

  for (std::size_t i = 0; i < ordered.size(); ++i) {
    FileLayer L;
    L.name = ordered[i];
    const std::string where = path + ": layer \"" + L.name + "\"";
    const auto desc = h.metadata.find(kLayerKeyPrefix + L.name);
    require(desc != h.metadata.end(), where, ": __metadata__ has no \"", kLayerKeyPrefix, L.name,
            "\" (its attributes)");
    const ujson d = parse_metadata_json(desc->second, where, kLayerKeyPrefix + L.name);
    require(!d.is_discarded() && d.is_object(), where, ": __metadata__[\"", kLayerKeyPrefix, L.name,
            "\"] is not a JSON object");
    for (auto it = d.begin(); it != d.end(); ++it)
      require(it.key() == "attributes" || it.key() == "metadata", where, ": unknown field \"", it.key(),
              "\" in its description");
    const auto attrs = d.find("attributes");
    require(attrs != d.end(), where, ": its description has no \"attributes\"");
    L.attributes = attributes_from(*attrs, where);
    if (const auto md = d.find("metadata"); md != d.end()) {
      require(md->is_object(), where, ": \"metadata\" must be an object of strings");
      for (auto it = md->begin(); it != md->end(); ++it) {
        require(it.value().is_string(), where, ": metadata \"", it.key(), "\" must be a string, got ",
                it.value().dump());
        L.metadata[it.key()] = it.value().get<std::string>();
      }
    }
    ExpertWeights w;
    for (const FileTensor* t : owned[i]) {
      const std::string suffix = t->name.substr(L.name.size() + 1);
      if (TensorView* slot = weight_slot(w, suffix)) {
        *slot = TensorView(data + t->offset, t->dtype, t->shape);
        L.weight_bytes += t->nbytes;
        // An empty shape means "absent" to the API: a rank-0 weight would vanish.
        require(!t->shape.empty(), where, ": tensor \"", t->name, "\" is a scalar (expected its ORT shape)");
        // Every dimension of a QMoE input is at least 1; an empty tensor may
        // carry any other dimension (up to 2^63), which validate()'s size
        // arithmetic must never see.
        require(t->nbytes > 0, where, ": tensor \"", t->name, "\" is empty (shape ", shape_str(t->shape),
                "); every dimension of a QMoE input is at least 1");
      } else {
        L.extra.push_back(*t);
      }
    }
    for (const char* n : kWeightNames)
      for (const FileTensor* t : owned[i])
        if (std::string_view(t->name).substr(L.name.size() + 1) == n) L.tensors.push_back(*t);
    try {
      L.shape = validate(w, L.attributes);
    } catch (const Error& e) {
      fail(where, ": ", e.what());
    }
    pf.layers.push_back(std::move(L));
  }
  return pf;
}

}  // namespace io

// ---------------------------------------------------------------------------- File

struct File::Impl {
  std::string path;
  io::Mapping map;
  io::ParsedFile parsed;
  explicit Impl(const std::string& p) : path(p), map(p), parsed(io::parse_file(map.data(), map.size(), p)) {}
};

File::File(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
File::~File() = default;
File::File(File&&) noexcept = default;
File& File::operator=(File&&) noexcept = default;

File File::open(const std::string& path) { return File(std::make_unique<Impl>(path)); }

const std::string& File::path() const { return impl_->path; }
std::uint64_t File::size_bytes() const { return impl_->map.size(); }
const std::vector<FileLayer>& File::layers() const { return impl_->parsed.layers; }
const std::map<std::string, std::string>& File::metadata() const { return impl_->parsed.metadata; }
const std::vector<FileTensor>& File::tensors() const { return impl_->parsed.tensors; }

const FileLayer& File::layer(std::string_view name) const {
  for (const FileLayer& l : impl_->parsed.layers)
    if (l.name == name) return l;
  std::string known;
  for (const FileLayer& l : impl_->parsed.layers) known += (known.empty() ? "" : ", ") + ("\"" + l.name + "\"");
  fail(impl_->path, ": no layer \"", name, "\" (the file has ", known.empty() ? "none" : known, ")");
}

TensorView File::tensor(std::string_view name) const {
  for (const FileTensor& t : impl_->parsed.tensors)
    if (t.name == name) return TensorView(impl_->map.data() + t.offset, t.dtype, t.shape);
  fail(impl_->path, ": no tensor \"", name, "\"");
}

namespace {

// Float tensors are read as typed arrays: one whose offset is not a multiple
// of its element size (a foreign writer's) is copied to aligned memory.
bool misaligned(const TensorView& v) { return reinterpret_cast<std::uintptr_t>(v.data) % dtype_size(v.dtype) != 0; }

}  // namespace

ExpertWeights File::weights(std::string_view name) const {
  const FileLayer& L = layer(name);
  ExpertWeights w;
  for (const FileTensor& t : L.tensors) {
    TensorView* slot = io::weight_slot(w, std::string_view(t.name).substr(L.name.size() + 1));
    *slot = TensorView(impl_->map.data() + t.offset, t.dtype, t.shape);
    require(!misaligned(*slot), impl_->path, ": tensor \"", t.name, "\" starts at byte ", t.offset,
            ", not a multiple of its element size: File::weights() cannot view it (File::load() copies it)");
  }
  return w;
}

Layer File::load(std::string_view name, const LayerOptions& options) const { return load(name, options, Part{}); }

Layer File::load(std::string_view name, const LayerOptions& options, const Part& part) const {
  const FileLayer& L = layer(name);
  const std::int64_t experts = L.shape.num_experts;
  const std::int64_t first = part.first_expert, end = part.end_expert == -1 ? experts : part.end_expert;
  require(0 <= first && first < end && end <= experts, impl_->path, ": layer \"", L.name, "\": experts [", first, ", ",
          end, ") is not a non-empty range within the layer's ", experts, " experts [0, ", experts, ")");
  MoeAttributes attrs = L.attributes;
  if (part.k != 0) attrs.k = part.k;
  if (part.normalize_routing_weights != -1) attrs.normalize_routing_weights = part.normalize_routing_weights;
  // Every stored tensor is [E, ...] (validated at open), so experts [first, end)
  // are one byte range of it.
  struct Slice {
    std::uint64_t offset, nbytes;
  };
  std::vector<Slice> slices;
  ExpertWeights w;
  std::vector<std::vector<std::uint8_t>> copies;
  for (const FileTensor& t : L.tensors) {
    TensorView* slot = io::weight_slot(w, std::string_view(t.name).substr(L.name.size() + 1));
    const std::uint64_t per_expert = t.nbytes / static_cast<std::uint64_t>(experts);
    const Slice s{t.offset + per_expert * static_cast<std::uint64_t>(first),
                  per_expert * static_cast<std::uint64_t>(end - first)};
    Shape shape = t.shape;
    shape[0] = end - first;
    slices.push_back(s);
    *slot = TensorView(impl_->map.data() + s.offset, t.dtype, shape);
    if (misaligned(*slot)) {
      // 8-byte aligned storage, tiny next to the weights (scales, biases).
      copies.emplace_back(s.nbytes + 8);
      auto* p = copies.back().data();
      p += (8 - reinterpret_cast<std::uintptr_t>(p) % 8) % 8;
      std::memcpy(p, slot->data, s.nbytes);
      slot->data = p;
    }
  }
  const io::Mapping& map = impl_->map;
  const detail::LayerBuilder::Release release = [&map](const void* p, std::size_t n) { map.release(p, n); };
  try {
    Layer layer = detail::LayerBuilder::build(w, attrs, options, &release);
    for (const Slice& s : slices) map.release(map.data() + s.offset, s.nbytes);
    return layer;
  } catch (const Error& e) {
    if (first == 0 && end == experts) fail(impl_->path, ": layer \"", L.name, "\": ", e.what());
    fail(impl_->path, ": layer \"", L.name, "\" experts [", first, ", ", end, "): ", e.what());
  }
}

// ---------------------------------------------------------------------------- save_file

namespace {

struct Entry {
  std::string name;
  TensorView view;
};

// Writes all of [p, p + n) or throws.
void write_all(int fd, const void* p, std::size_t n, const std::string& path) {
  const auto* b = static_cast<const std::uint8_t*>(p);
  while (n) {
    const ssize_t w = ::write(fd, b, std::min<std::size_t>(n, std::size_t{1} << 30));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail(path, ": write failed: ", std::strerror(errno));
    b += w, n -= static_cast<std::size_t>(w);
  }
}

}  // namespace

void save_file(const std::string& path, const std::vector<LayerToSave>& layers,
               const std::map<std::string, std::string>& metadata) {
  require(!path.empty(), "save_file: empty path");
  std::vector<Entry> entries;
  std::set<std::string> names, layer_names;
  auto add = [&](const std::string& name, const TensorView& v) {
    require(names.insert(name).second, path, ": tensor \"", name, "\" would be written twice");
    entries.push_back({name, v});
  };
  json list = json::array();
  std::map<std::string, std::string> meta;
  for (const auto& [k, v] : metadata) {
    require(k.rfind("qmoe.", 0) != 0, path, ": metadata key \"", k, "\" is reserved (keys starting with \"qmoe.\")");
    meta[k] = v;
  }
  for (const LayerToSave& L : layers) {
    const std::string where = path + ": layer \"" + L.name + "\"";
    require(!L.name.empty(), path, ": a layer has an empty name");
    require(layer_names.insert(L.name).second, path, ": two layers are named \"", L.name, "\"");
    try {
      validate(L.weights, L.attributes);
    } catch (const Error& e) {
      fail(where, ": ", e.what());
    }
    for_each_tensor(L.weights, [&](const char* n, const TensorView& v) {
      if (v.present()) add(L.name + "." + n, v);
    });
    for (const auto& [suffix, v] : L.extra) {
      require(!suffix.empty(), where, ": an extra tensor has an empty name");
      ExpertWeights probe;
      require(io::weight_slot(probe, suffix) == nullptr, where, ": extra tensor \"", suffix,
              "\" has the name of a QMoE input; pass it in weights");
      require(v.present(), where, ": extra tensor \"", suffix, "\" has no shape (scalars are stored as [1])");
      require(v.data || v.numel() == 0, where, ": extra tensor \"", suffix, "\" has no data");
      add(L.name + "." + suffix, v);
    }
    json d;
    d["attributes"] = io::attributes_to_json(L.attributes);
    json md = json::object();
    for (const auto& [k, v] : L.metadata) md[k] = v;
    d["metadata"] = md;
    meta[io::kLayerKeyPrefix + L.name] = d.dump();
    list.push_back(L.name);
  }
  meta[io::kVersionKey] = std::to_string(kFileFormatVersion);
  meta[io::kLayersKey] = list.dump();

  // Widest elements first: with the data section 8-byte aligned, every tensor
  // then starts at a multiple of its element size, and there are no holes
  // (safetensors readers refuse gaps between tensors).
  std::stable_sort(entries.begin(), entries.end(),
                   [](const Entry& a, const Entry& b) { return dtype_size(a.view.dtype) > dtype_size(b.view.dtype); });
  json header;
  json jm = json::object();
  for (const auto& [k, v] : meta) jm[k] = v;
  header["__metadata__"] = jm;
  std::uint64_t off = 0;
  for (const Entry& e : entries) {
    json t;
    t["dtype"] = io::safetensors_dtype(e.view.dtype);
    t["shape"] = e.view.shape;
    t["data_offsets"] = {off, off + e.view.nbytes()};
    header[e.name] = t;
    off += e.view.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::uint8_t prefix[8];
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<std::uint8_t>(static_cast<std::uint64_t>(text.size()) >> (8 * i));

  // Write beside the target and rename into place: a failure (or a crash)
  // leaves no file that looks complete under `path`.
  static std::atomic<unsigned> counter{0};
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) fail(path, ": cannot create ", tmp, ": ", std::strerror(errno));
  try {
    write_all(fd, prefix, 8, path);
    write_all(fd, text.data(), text.size(), path);
    for (const Entry& e : entries) write_all(fd, e.view.data, e.view.nbytes(), path);
    if (::fsync(fd) != 0) fail(path, ": fsync failed: ", std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail(path, ": close failed: ", std::strerror(err));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail(path, ": cannot rename ", tmp, " into place: ", std::strerror(err));
  }
}

}  // namespace qmoe
