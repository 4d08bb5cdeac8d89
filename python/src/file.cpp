// Bindings of qmoe's file format (qmoe/file.h): open (inspect), load, save.
#include "qmoe/file.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>

#include "bindings.h"
#include "convert.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace qmoe_py {

namespace {

nb::dict tensor_info(const qmoe::FileTensor& t) {
  nb::dict d;
  d["name"] = t.name;
  d["dtype"] = std::string(qmoe::dtype_name(t.dtype));
  d["shape"] = nb::tuple(nb::cast(t.shape));
  d["offset"] = t.offset;
  d["nbytes"] = t.nbytes;
  return d;
}

nb::dict layer_info(const qmoe::FileLayer& l) {
  nb::dict d;
  d["name"] = l.name;
  d["attributes"] = l.attributes;
  d["num_experts"] = l.shape.num_experts;
  d["hidden_size"] = l.shape.hidden;
  d["inter_size"] = l.shape.inter;
  d["fc1_rows"] = l.shape.fc1_rows;
  d["weight_bytes"] = l.weight_bytes;
  nb::list tensors, extra;
  for (const auto& t : l.tensors) tensors.append(tensor_info(t));
  for (const auto& t : l.extra) extra.append(tensor_info(t));
  d["tensors"] = tensors;
  d["extra"] = extra;
  d["metadata"] = l.metadata;
  return d;
}

// A copy of a stored tensor as a NumPy array of its bytes (uint8, or
// float32 / uint16 for 4- and 2-byte floats; the Python side views bf16/f16).
nb::object tensor_copy(const qmoe::File& f, const std::string& name) {
  const qmoe::TensorView v = f.tensor(name);
  std::vector<std::size_t> shape;
  for (auto s : v.shape) shape.push_back(static_cast<std::size_t>(s));
  const std::size_t n = v.nbytes();
  switch (v.dtype) {
    case qmoe::DType::f32: {
      std::vector<float> out(n / 4);
      std::memcpy(out.data(), v.data, n);
      return nb::cast(to_numpy(std::move(out), shape));
    }
    case qmoe::DType::f16:
    case qmoe::DType::bf16: {
      std::vector<std::uint16_t> out(n / 2);
      std::memcpy(out.data(), v.data, n);
      return nb::cast(to_numpy(std::move(out), shape));
    }
    case qmoe::DType::u8:
      break;
  }
  std::vector<std::uint8_t> out(n);
  std::memcpy(out.data(), v.data, n);
  return nb::cast(to_numpy(std::move(out), shape));
}

// (name, weights by ORT input name, attributes, extra by suffix, metadata)
using PyLayerToSave = std::tuple<std::string, std::map<std::string, TaggedIn>, qmoe::MoeAttributes,
                                 std::map<std::string, TaggedIn>, std::map<std::string, std::string>>;

void save(const std::string& path, const std::vector<PyLayerToSave>& layers,
          const std::map<std::string, std::string>& metadata) {
  std::vector<WeightArgs> args;  // hold the arrays while writing
  args.reserve(layers.size());
  std::vector<qmoe::LayerToSave> out;
  for (const auto& [name, weights, attrs, extra, md] : layers) {
    args.push_back(WeightArgs{weights});
    qmoe::LayerToSave l;
    l.name = name;
    l.weights = args.back().views();
    l.attributes = attrs;
    for (const auto& [suffix, t] : extra) l.extra.emplace_back(suffix, to_view(t, suffix.c_str()));
    l.metadata = md;
    out.push_back(std::move(l));
  }
  nb::gil_scoped_release release;
  qmoe::save_file(path, out, metadata);
}

}  // namespace

void bind_file(nb::module_& m) {
  nb::class_<qmoe::File>(m, "File", "An open qmoe file (memory-mapped; use qmoe.open).")
      .def_static(
          "open",
          [](const std::string& p) {
            nb::gil_scoped_release release;
            return qmoe::File::open(p);
          },
          "path"_a)
      .def_prop_ro("path", &qmoe::File::path)
      .def_prop_ro("size_bytes", &qmoe::File::size_bytes)
      .def_prop_ro("metadata", &qmoe::File::metadata)
      .def_prop_ro("layers",
                   [](const qmoe::File& f) {
                     nb::list out;
                     for (const auto& l : f.layers()) out.append(layer_info(l));
                     return out;
                   })
      .def_prop_ro("tensors",
                   [](const qmoe::File& f) {
                     nb::list out;
                     for (const auto& t : f.tensors()) out.append(tensor_info(t));
                     return out;
                   })
      .def("tensor", &tensor_copy, "name"_a, "A copy of a stored tensor (2-byte floats as uint16).")
      .def(
          "load",
          [](const qmoe::File& f, const std::string& name, int threads, int accuracy_level, nb::handle backend,
             int device, std::int64_t max_tokens, const std::vector<int>& host_experts,
             std::int64_t host_experts_gpu_from) {
            const qmoe::LayerOptions o = layer_options(threads, accuracy_level, backend, device, max_tokens,
                                                       host_experts, host_experts_gpu_from);
            std::unique_ptr<qmoe::Layer> l;
            {
              nb::gil_scoped_release release;
              l = std::make_unique<qmoe::Layer>(f.load(name, o));
            }
            return wrap_layer(std::move(*l), o);
          },
          "name"_a, "threads"_a, "accuracy_level"_a, "backend"_a = "cpu", "device"_a = 0, "max_tokens"_a = 4096,
          "host_experts"_a = std::vector<int>{}, "host_experts_gpu_from"_a = qmoe::LayerOptions::kMeasureCrossover,
          "Builds a Layer from a stored layer, prepacking from the map (GIL released).");
  // Part of a stored layer (File::Part): experts [first_expert, end_expert), the built layer's k
  // (0: stored) and normalize_routing_weights (-1: stored); qmoe.distributed loads a rank's shard with it.
  m.def(
      "file_load_part",
      [](const qmoe::File& f, const std::string& name, std::int64_t first_expert, std::int64_t end_expert, int k,
         int normalize_routing_weights, int threads, int accuracy_level, nb::handle backend, int device,
         std::int64_t max_tokens) {
        const qmoe::LayerOptions o = layer_options(threads, accuracy_level, backend, device, max_tokens);
        const qmoe::File::Part part{first_expert, end_expert, k, normalize_routing_weights};
        std::unique_ptr<qmoe::Layer> l;
        {
          nb::gil_scoped_release release;
          l = std::make_unique<qmoe::Layer>(f.load(name, o, part));
        }
        return wrap_layer(std::move(*l), o);
      },
      "file"_a, "name"_a, "first_expert"_a, "end_expert"_a, "k"_a, "normalize_routing_weights"_a, "threads"_a,
      "accuracy_level"_a, "backend"_a = "cpu", "device"_a = 0, "max_tokens"_a = 4096,
      "Builds a Layer of experts [first_expert, end_expert) of a stored layer (File::load with a File::Part).");
  m.def("save_file", &save, "path"_a, "layers"_a, "metadata"_a,
        "Writes a qmoe file: layers = [(name, weights, attrs, extra, metadata)].");
}

}  // namespace qmoe_py
