// The bad-file corpus: each malformed qmoe/safetensors file is refused by
// File::open with an error naming the file and what is wrong. The cases are
// made from one good file by editing its header or bytes; with
// QMOE_WRITE_BAD_FILES=<dir> the test also writes them there (the fuzz
// target's seed corpus, tests/fuzz/corpus, was made that way).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "helpers.h"
#include "qmoe/file.h"

namespace qmoe::test {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;
using Bytes = std::vector<std::uint8_t>;

struct Parts {
  json header;
  Bytes data;  // the data section
};

Bytes assemble(const std::string& text, const Bytes& data, std::uint64_t len_override = 0) {
  const std::uint64_t len = len_override ? len_override : text.size();
  // One allocation, filled by index (vector::insert of the text trips GCC 12's -Warray-bounds).
  Bytes out(8 + text.size() + data.size());
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(len >> (8 * i));
  std::copy(text.begin(), text.end(), out.begin() + 8);
  std::copy(data.begin(), data.end(), out.begin() + 8 + static_cast<std::ptrdiff_t>(text.size()));
  return out;
}

Bytes assemble(const Parts& p) { return assemble(p.header.dump(), p.data); }

fs::path dir() {
  static const fs::path d = [] {
    fs::path p = fs::temp_directory_path() / ("qmoe_bad_files_" + std::to_string(::getpid()));
    fs::create_directories(p);
    return p;
  }();
  return d;
}

// The good file: one layer with every kind of tensor (block-wise scales, zero
// points, biases, an extra tensor).
Parts good_parts() {
  MoeAttributes a;
  a.k = 2;
  a.activation = Activation::swiglu;
  a.swiglu_fusion = 1;
  a.block_size = 16;
  a.normalize_routing_weights = 1;
  tools::SynthOptions so;
  so.symmetric = false;
  const auto s = tools::synth_layer(3, 32, 32, a, so);
  const std::vector<float> router(3 * 32, 0.5f);
  const fs::path p = dir() / "good.safetensors";
  save_file(p.string(), {{"L", s.views(), a, {{"router.weight", view_f32(router.data(), {3, 32})}}, {}}});
  std::ifstream f(p, std::ios::binary);
  const Bytes b(std::istreambuf_iterator<char>(f), {});
  std::uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = len << 8 | b[static_cast<std::size_t>(i)];
  Parts parts;
  parts.header = json::parse(std::string(b.begin() + 8, b.begin() + 8 + static_cast<std::ptrdiff_t>(len)));
  parts.data.assign(b.begin() + 8 + static_cast<std::ptrdiff_t>(len), b.end());
  return parts;
}

json& layer_desc(json& h) { return h["__metadata__"]["qmoe.layer.L"]; }

// Edits the layer's description (a JSON string inside the metadata).
void edit_desc(Parts& p, const std::function<void(json&)>& f) {
  json d = json::parse(layer_desc(p.header).get<std::string>());
  f(d);
  layer_desc(p.header) = d.dump();
}

struct BadFile {
  std::string name;
  std::function<Bytes(Parts)> make;
  std::string expect;  // a part of the error message
};

std::vector<BadFile> corpus() {
  auto edit = [](std::function<void(Parts&)> f) {
    return [f](Parts p) {
      f(p);
      return assemble(p);
    };
  };
  auto raw = [](std::function<Bytes(const Parts&)> f) { return [f](Parts p) { return f(p); }; };
  return {
      {"empty", raw([](const Parts&) { return Bytes{}; }), "fewer than the 8-byte header length"},
      {"five_bytes", raw([](const Parts&) {
         return Bytes{1, 2, 3, 4, 5};
       }),
       "fewer than the 8-byte"},
      {"header_past_end", raw([](const Parts& p) { return assemble(p.header.dump(), {}, 1u << 20); }),
       "truncated: the header claims"},
      {"header_huge", raw([](const Parts& p) { return assemble(p.header.dump(), p.data, std::uint64_t{1} << 40); }),
       "exceeds the limit"},
      {"header_not_json", raw([](const Parts& p) { return assemble("{\"a\": nope}", p.data); }),
       "not a valid JSON object"},
      {"header_array", raw([](const Parts& p) { return assemble("[1, 2, 3]", p.data); }), "does not start with '{'"},
      {"header_nested", raw([](const Parts& p) { return assemble("{\"a\":[[[[[[[[1]]]]]]]]}", p.data); }),
       "nests deeper"},
      {"truncated_data", raw([](const Parts& p) {
         Bytes b = assemble(p);
         b.resize(b.size() - 100);
         return b;
       }),
       "lie beyond the"},
      {"no_version", edit([](Parts& p) { p.header["__metadata__"].erase("qmoe.format_version"); }), "not a qmoe file"},
      {"version_2", edit([](Parts& p) { p.header["__metadata__"]["qmoe.format_version"] = "2"; }),
       "format version \"2\" is not one this qmoe reads"},
      {"no_layer_list", edit([](Parts& p) { p.header["__metadata__"].erase("qmoe.layers"); }),
       "has no \"qmoe.layers\""},
      {"layer_list_not_array", edit([](Parts& p) { p.header["__metadata__"]["qmoe.layers"] = "L"; }),
       "must be a JSON array"},
      {"layer_listed_twice", edit([](Parts& p) { p.header["__metadata__"]["qmoe.layers"] = "[\"L\", \"L\"]"; }),
       "listed twice"},
      {"layer_undescribed", edit([](Parts& p) { p.header["__metadata__"]["qmoe.layers"] = "[\"L\", \"M\"]"; }),
       "layer \"M\": __metadata__ has no \"qmoe.layer.M\""},
      {"description_unlisted", edit([](Parts& p) { p.header["__metadata__"]["qmoe.layer.Z"] = "{}"; }),
       "not listed in qmoe.layers"},
      {"reserved_key", edit([](Parts& p) { p.header["__metadata__"]["qmoe.extra"] = "1"; }), "unknown reserved"},
      {"metadata_not_string", edit([](Parts& p) { p.header["__metadata__"]["x"] = 3; }), "must be a string"},
      {"unknown_attribute",
       edit([](Parts& p) { edit_desc(p, [](json& d) { d["attributes"]["quant_type"] = "fp4"; }); }),
       "unknown attribute \"quant_type\""},
      {"attribute_wrong_type", edit([](Parts& p) { edit_desc(p, [](json& d) { d["attributes"]["k"] = "two"; }); }),
       "attribute k: expected an integer"},
      {"unknown_activation",
       edit([](Parts& p) { edit_desc(p, [](json& d) { d["attributes"]["activation_type"] = "tanh"; }); }),
       "activation_type: expected one of"},
      {"sparse_mixer", edit([](Parts& p) { edit_desc(p, [](json& d) { d["attributes"]["use_sparse_mixer"] = 1; }); }),
       "use_sparse_mixer"},
      {"k_above_experts", edit([](Parts& p) { edit_desc(p, [](json& d) { d["attributes"]["k"] = 4; }); }),
       "k: expected 1..num_experts (3), got 4"},
      {"block_mismatch", edit([](Parts& p) { edit_desc(p, [](json& d) { d["attributes"]["block_size"] = 32; }); }),
       "fc1_scales"},
      {"bits_mismatch",
       edit([](Parts& p) { edit_desc(p, [](json& d) { d["attributes"]["expert_weight_bits"] = 8; }); }),
       "fc1_experts_weights"},
      {"unknown_desc_field", edit([](Parts& p) { edit_desc(p, [](json& d) { d["routing"] = "x"; }); }),
       "unknown field \"routing\""},
      {"unknown_dtype", edit([](Parts& p) { p.header["L.router.weight"]["dtype"] = "F64"; }),
       "dtype \"F64\" is not one qmoe reads"},
      {"negative_dim", edit([](Parts& p) {
         p.header["L.router.weight"]["shape"] = {-3, 32};
       }),
       "non-negative integer"},
      {"huge_dims", edit([](Parts& p) {
         p.header["L.router.weight"]["shape"] = {1u << 31, 1u << 31, 1u << 31};
       }),
       "more elements than the file has bytes"},
      {"bytes_mismatch", edit([](Parts& p) {
         p.header["L.router.weight"]["shape"] = {3, 31};
       }),
       "bytes, but data_offsets span"},
      {"offsets_reversed", edit([](Parts& p) {
         auto& o = p.header["L.router.weight"]["data_offsets"];
         o = {o[1], o[0]};
       }),
       "end before they begin"},
      {"offsets_out_of_bounds", edit([](Parts& p) {
         auto& o = p.header["L.router.weight"]["data_offsets"];
         o = {o[0].get<std::uint64_t>() + (1u << 30), o[1].get<std::uint64_t>() + (1u << 30)};
       }),
       "lie beyond the"},
      {"offsets_not_numbers", edit([](Parts& p) {
         p.header["L.router.weight"]["data_offsets"] = {"0", "4"};
       }),
       "must be [begin, end]"},
      {"overlap", edit([](Parts& p) {
         p.header["L.fc1_scales"]["data_offsets"] = p.header["L.fc2_scales"]["data_offsets"];
         p.header["L.fc1_scales"]["shape"] = p.header["L.fc2_scales"]["shape"];
       }),
       "overlap in the file"},
      {"duplicate_name", raw([](const Parts& p) {
         std::string t = p.header.dump();
         const std::string entry = "\"L.router.weight\":" + p.header["L.router.weight"].dump();
         t.insert(t.size() - 1, "," + entry);
         return assemble(t, p.data);
       }),
       "appears twice in the header"},
      {"unknown_tensor_field", edit([](Parts& p) { p.header["L.router.weight"]["offset"] = 0; }),
       "unknown field \"offset\""},
      {"missing_fc2", edit([](Parts& p) { p.header.erase("L.fc2_experts_weights"); }),
       "fc2_experts_weights: required, but absent"},
      {"weights_not_u8", edit([](Parts& p) {
         auto& t = p.header["L.fc2_experts_weights"];
         t["dtype"] = "F32";
         const auto n = t["data_offsets"][1].get<std::uint64_t>() - t["data_offsets"][0].get<std::uint64_t>();
         t["shape"] = {n / 4};
       }),
       "fc2_experts_weights"},
      {"scales_wrong_shape", edit([](Parts& p) {
         auto& t = p.header["L.fc1_scales"];
         auto s = t["shape"];
         t["shape"] = {s[0], s[2], s[1]};
       }),
       "fc1_scales"},
      {"scalar_weight", edit([](Parts& p) {
         auto& t = p.header["L.fc1_experts_bias"];
         t["shape"] = json::array();
         t["dtype"] = "U8";
         t["data_offsets"] = {t["data_offsets"][0], t["data_offsets"][0].get<std::uint64_t>() + 1};
       }),
       "is a scalar"},
  };
}

TEST(BadFiles, EachIsRefusedByNameAtOpen) {
  const Parts good = good_parts();
  const fs::path good_path = dir() / "good.safetensors";
  ASSERT_NO_THROW(File::open(good_path.string()));
  const char* out = std::getenv("QMOE_WRITE_BAD_FILES");
  const auto cases = corpus();
  EXPECT_GE(cases.size(), 25u);
  for (const BadFile& c : cases) {
    const fs::path p = dir() / (c.name + ".safetensors");
    {
      const Bytes b = c.make(good);
      std::ofstream f(p, std::ios::binary);
      f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
    }
    if (out) fs::copy_file(p, fs::path(out) / p.filename(), fs::copy_options::overwrite_existing);
    try {
      (void)File::open(p.string());
      ADD_FAILURE() << c.name << ": opened";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(p.string()), std::string::npos) << c.name << ": the message does not name the file: " << msg;
      EXPECT_NE(msg.find(c.expect), std::string::npos) << c.name << ": " << msg;
    }
  }
  if (out) fs::copy_file(good_path, fs::path(out) / "good.safetensors", fs::copy_options::overwrite_existing);
  std::error_code ec;
  fs::remove_all(dir(), ec);
}

TEST(BadFiles, NotAFileAndMissing) {
  for (const std::string& p : {std::string("/nonexistent/qmoe.safetensors"), fs::temp_directory_path().string()}) {
    try {
      (void)File::open(p);
      ADD_FAILURE() << p;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace qmoe::test
