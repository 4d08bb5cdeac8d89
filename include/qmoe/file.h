// qmoe/file.h — qmoe's model file: MoE layers in a safetensors file.
//
// The format (version 1; README "The qmoe file"):
//  * A plain safetensors file: 8-byte little-endian header length, a JSON
//    header, then the tensor bytes. Any safetensors reader can open it.
//  * Tensor `<layer>.<ONNX Runtime QMoE input name>` (e.g.
//    `model.layers.3.mlp.fc1_experts_weights`) holds that input in the raw ONNX
//    Runtime layout — never a backend's packed layout. Other tensors of a layer
//    are `<layer>.<suffix>` (conventionally `router.weight` [E, H] and
//    `router.bias` [E]); dtypes float32, float16, bfloat16, uint8.
//  * `__metadata__` (string -> string): "qmoe.format_version" = "1";
//    "qmoe.layers" = a JSON array of the layer names; per layer
//    "qmoe.layer.<name>" = a JSON object {"attributes": {ONNX Runtime attribute
//    names -> values}, "metadata": {string -> string}}. Other keys are the
//    file's free-form metadata.
//  * A reader refuses a missing or unknown format version and unknown
//    attribute names: a change that an older reader could misread gets a new
//    version number.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "qmoe/config.h"
#include "qmoe/layer.h"
#include "qmoe/tensor.h"
#include "qmoe/weights.h"

namespace qmoe {

/// The format version this build writes and reads.
inline constexpr int kFileFormatVersion = 1;

/// One tensor of a file (where it lies; reading it touches nothing).
struct FileTensor {
  std::string name;  ///< full safetensors name
  DType dtype = DType::u8;
  Shape shape;
  std::uint64_t offset = 0;  ///< from the start of the file
  std::uint64_t nbytes = 0;
};

/// One MoE layer of a file.
struct FileLayer {
  std::string name;
  MoeAttributes attributes;
  MoeShape shape;                               ///< validated against the attributes
  std::vector<FileTensor> tensors;              ///< the ONNX Runtime inputs present, in input order
  std::vector<FileTensor> extra;                ///< other `<name>.<suffix>` tensors (router, ...)
  std::map<std::string, std::string> metadata;  ///< the layer's free-form metadata
  std::uint64_t weight_bytes = 0;               ///< bytes of `tensors`
};

/// An open qmoe file: memory-mapped read-only; the header is parsed and every
/// layer validated at open() without reading any weight byte. Immutable;
/// safe to use from several threads.
class File {
 public:
  /// Throws qmoe::Error naming the file and what is wrong (truncated file,
  /// header or offsets out of bounds, overlapping tensors, dtype x shape !=
  /// bytes, unknown dtype, missing/unknown format version, missing tensors,
  /// shapes inconsistent with the attributes, ...).
  static File open(const std::string& path);

  ~File();
  File(File&&) noexcept;
  File& operator=(File&&) noexcept;

  const std::string& path() const;
  std::uint64_t size_bytes() const;
  const std::vector<FileLayer>& layers() const;
  /// Throws qmoe::Error naming the file and the layer when absent.
  const FileLayer& layer(std::string_view name) const;
  /// The file's free-form metadata (the `__metadata__` keys not starting with "qmoe.").
  const std::map<std::string, std::string>& metadata() const;
  /// Every tensor of the file, in header order.
  const std::vector<FileTensor>& tensors() const;
  /// A view of any tensor into the map (valid while the File lives).
  TensorView tensor(std::string_view name) const;
  /// The raw weights of a layer as views into the map.
  ExpertWeights weights(std::string_view layer) const;
  /// Builds a Layer from a stored layer, prepacking straight from the map,
  /// expert by expert; the mapped pages it has read are dropped as it goes, so
  /// building adds about the packed bytes to the process's memory.
  Layer load(std::string_view layer, const LayerOptions& options = {}) const;

  /// Which part of a stored layer File::load builds: the experts
  /// [first_expert, end_expert) (expert i of the built Layer is stored expert
  /// first_expert + i), and the built Layer's routing attributes, which are
  /// not part of the stored tensors. The defaults build the whole layer as stored.
  struct Part {
    std::int64_t first_expert = 0;
    std::int64_t end_expert = -1;        ///< one past the last; -1: the stored expert count
    int k = 0;                           ///< the built Layer's k; 0: the stored k
    int normalize_routing_weights = -1;  ///< the built Layer's; -1: the stored value
  };
  /// Builds a Layer of part of a stored layer (e.g. one rank's experts for
  /// expert parallelism). Only the part's bytes are read (every stored tensor
  /// is [E, ...] with the experts contiguous, so each is sliced along its first
  /// dimension without a copy) and dropped as they are packed. Throws
  /// qmoe::Error naming the file, the layer and the range against the stored
  /// expert count for a range that is empty or outside it.
  Layer load(std::string_view layer, const LayerOptions& options, const Part& part) const;

  struct Impl;

 private:
  explicit File(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// A layer to write: raw weights (views) and attributes as a Layer takes them,
/// extra tensors stored as `<name>.<suffix>`, and free-form metadata.
struct LayerToSave {
  std::string name;
  ExpertWeights weights;
  MoeAttributes attributes;
  std::vector<std::pair<std::string, TensorView>> extra;  ///< (suffix, tensor)
  std::map<std::string, std::string> metadata;
};

/// Writes a qmoe file. Every layer is validated first; the file is written
/// under a temporary name beside `path` and renamed into place, so a failure
/// leaves nothing that looks complete. Throws qmoe::Error.
void save_file(const std::string& path, const std::vector<LayerToSave>& layers,
               const std::map<std::string, std::string>& metadata = {});

}  // namespace qmoe
