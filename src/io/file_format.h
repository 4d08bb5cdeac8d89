// Internal: the qmoe file's metadata keys and the parse of a whole file from
// bytes (shared by File::open, which maps the file, and the fuzz target,
// which hands it bytes).
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qmoe/file.h"

namespace qmoe::io {

inline constexpr const char* kVersionKey = "qmoe.format_version";
inline constexpr const char* kLayersKey = "qmoe.layers";
inline constexpr const char* kLayerKeyPrefix = "qmoe.layer.";

/// A qmoe file's header, its layers validated (no weight byte read).
struct ParsedFile {
  std::vector<FileTensor> tensors;
  std::vector<FileLayer> layers;
  std::map<std::string, std::string> metadata;  ///< free-form keys only
};

/// Parses the `size` bytes at `data` (a whole file, named `path` in errors).
ParsedFile parse_file(const std::uint8_t* data, std::uint64_t size, const std::string& path);

/// A layer's attributes as stored ("inf" for infinite floats) and back;
/// unknown names are refused.
nlohmann::ordered_json attributes_to_json(const MoeAttributes& a);
MoeAttributes attributes_from_json(const nlohmann::ordered_json& j, const std::string& where);

}  // namespace qmoe::io
