// qmoe's file format: save -> open -> load gives the in-memory Layer's bits,
// and every malformed file is refused by name before anything is allocated.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
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

// A scratch folder per test process, removed at exit.
const fs::path& scratch() {
  static const fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / ("qmoe_test_file_" + std::to_string(::getpid()));
    fs::create_directories(d);
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(fs::temp_directory_path() / ("qmoe_test_file_" + std::to_string(::getpid())), ec);
    });
    return d;
  }();
  return dir;
}

std::vector<std::uint8_t> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(f), {});
}

void write_bytes(const fs::path& p, const std::vector<std::uint8_t>& b) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

struct Config {
  int bits, block;
  bool symmetric, bias;
  Activation act;
  int fusion;
  bool router_weights;
};

std::vector<float> run(const Layer& layer, const Inputs& x, std::int64_t t, std::int64_t h, std::int64_t e, bool rw) {
  std::vector<float> out(static_cast<std::size_t>(t * h), NAN);
  layer.forward(view_f32(x.x.data(), {t, h}), view_f32(x.logits.data(), {t, e}),
                rw ? view_f32(x.mix.data(), {t, e}) : TensorView{}, output_f32(out.data(), {t, h}));
  return out;
}

TEST(File, SaveOpenLoadGivesTheInMemoryLayersBits) {
  std::vector<Config> configs;
  for (int bits : {4, 8})
    for (int block : {0, 16, 32})
      for (bool sym : {true, false}) configs.push_back({bits, block, sym, true, Activation::swiglu, 1, false});
  for (Activation act : {Activation::relu, Activation::gelu, Activation::silu, Activation::identity})
    configs.push_back({4, 0, true, act == Activation::gelu, act, 0, act == Activation::silu});
  for (int fusion : {0, 2}) configs.push_back({4, 32, false, true, Activation::swiglu, fusion, fusion == 2});
  configs.push_back({8, 16, true, false, Activation::swiglu, 0, true});

  const std::int64_t e = 6, h = 64, in = 96, t = 9;
  std::vector<tools::SynthLayer> synth;
  std::vector<LayerToSave> to_save;
  for (std::size_t i = 0; i < configs.size(); ++i) {
    const Config& c = configs[i];
    MoeAttributes a;
    a.k = 2;
    a.activation = c.act;
    a.expert_weight_bits = c.bits;
    a.block_size = c.block;
    a.swiglu_fusion = c.fusion;
    a.normalize_routing_weights = static_cast<int>(i % 2);
    if (c.act == Activation::swiglu) a.activation_alpha = 1.702f, a.activation_beta = 1.f, a.swiglu_limit = 7.f;
    tools::SynthOptions so;
    so.symmetric = c.symmetric;
    so.bias = c.bias;
    so.seed = 100 + i;
    synth.push_back(tools::synth_layer(e, h, in, a, so));
  }
  const std::vector<float> router(static_cast<std::size_t>(e * h), 0.25f);
  for (std::size_t i = 0; i < configs.size(); ++i) {
    LayerToSave L;
    // "layers.1" and "layers.1.x" side by side: tensors go to the longest prefix.
    L.name = i == 1 ? "model.layers.0.mlp.x" : "model.layers." + std::to_string(i) + ".mlp";
    L.weights = synth[i].views();
    L.attributes = synth[i].attrs;
    L.extra = {{"router.weight", view_f32(router.data(), {e, h})}};
    L.metadata = {{"source", "test " + std::to_string(i)}};
    to_save.push_back(L);
  }
  const std::string path = (scratch() / "sweep.safetensors").string();
  save_file(path, to_save, {{"note", "a test file"}});

  const File f = File::open(path);
  ASSERT_EQ(f.layers().size(), configs.size());
  EXPECT_EQ(f.metadata().at("note"), "a test file");
  EXPECT_EQ(f.metadata().size(), 1u);
  const Inputs x = random_inputs(t, h, e, 5);
  for (std::size_t i = 0; i < configs.size(); ++i) {
    SCOPED_TRACE(to_save[i].name);
    const FileLayer& L = f.layer(to_save[i].name);
    EXPECT_EQ(describe(L.attributes), describe(synth[i].attrs));
    EXPECT_EQ(L.attributes.swiglu_limit, synth[i].attrs.swiglu_limit);
    EXPECT_EQ(L.shape.fc1_rows, synth[i].shape.fc1_rows);
    EXPECT_EQ(L.metadata.at("source"), "test " + std::to_string(i));
    ASSERT_EQ(L.extra.size(), 1u);
    EXPECT_EQ(L.extra[0].name, to_save[i].name + ".router.weight");
    const TensorView rv = f.tensor(L.extra[0].name);
    EXPECT_EQ(std::memcmp(rv.data, router.data(), router.size() * 4), 0);
    const ExpertWeights sv = synth[i].views();
    std::uint64_t present = 0;
    for_each_tensor(sv, [&](const char*, const TensorView& v) { present += v.nbytes(); });
    EXPECT_EQ(L.weight_bytes, present);

    const Layer mem(synth[i].views(), synth[i].attrs, LayerOptions{Backend::cpu, 2});
    const Layer fromfile = f.load(L.name, LayerOptions{Backend::cpu, 2});
    EXPECT_EQ(fromfile.packed_bytes(), mem.packed_bytes());
    const auto want = run(mem, x, t, h, e, configs[i].router_weights);
    const auto got = run(fromfile, x, t, h, e, configs[i].router_weights);
    EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * 4), 0);
    // The mapped pages dropped while packing are read again: a second load agrees.
    const auto again = run(f.load(L.name, LayerOptions{Backend::cpu, 1}), x, t, h, e, configs[i].router_weights);
    EXPECT_EQ(std::memcmp(want.data(), again.data(), want.size() * 4), 0);
    // And the file's weights are the saved bytes.
    const ExpertWeights w = f.weights(L.name);
    for_each_tensor(sv, [&](const char* n, const TensorView& v) {
      TensorView stored;
      for_each_tensor(w, [&](const char* m, const TensorView& s) {
        if (std::strcmp(n, m) == 0) stored = s;
      });
      ASSERT_EQ(stored.present(), v.present()) << n;
      if (v.present()) {
        EXPECT_EQ(stored.shape, v.shape) << n;
        EXPECT_EQ(std::memcmp(stored.data, v.data, v.nbytes()), 0) << n;
      }
    });
  }
}

TEST(File, AnotherLayerAccuracyLevelAndUnalignedForeignScales) {
  MoeAttributes a;
  a.k = 2;
  a.activation = Activation::silu;
  a.block_size = 32;
  const auto s = tools::synth_layer(4, 64, 64, a);
  const std::string path = (scratch() / "one.safetensors").string();
  save_file(path, {{"only", s.views(), a, {}, {}}});
  // A foreign writer may put a float tensor at an odd offset: rewrite the file
  // with a 1-byte tensor first (shifting everything after it by one byte).
  auto bytes = read_bytes(path);
  std::uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = len << 8 | bytes[static_cast<std::size_t>(i)];
  json hdr = json::parse(std::string(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(len)));
  for (auto& [k, v] : hdr.items())
    if (k != "__metadata__")
      v["data_offsets"] = {v["data_offsets"][0].get<std::uint64_t>() + 1,
                           v["data_offsets"][1].get<std::uint64_t>() + 1};
  hdr["pad"] = {{"dtype", "U8"}, {"shape", {1}}, {"data_offsets", {0, 1}}};
  std::string text = hdr.dump();
  text.append((4 - text.size() % 4) % 4, ' ');  // data at a multiple of 4, so the +1 misaligns
  std::vector<std::uint8_t> out(8);
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(text.size() >> (8 * i));
  out.insert(out.end(), text.begin(), text.end());
  out.push_back(0x5a);
  out.insert(out.end(), bytes.begin() + 8 + static_cast<std::ptrdiff_t>(len), bytes.end());
  const fs::path shifted = scratch() / "shifted.safetensors";
  write_bytes(shifted, out);

  const Inputs x = random_inputs(5, 64, 4, 1);
  for (int level : {0, 4}) {
    const Layer mem(s.views(), a, LayerOptions{Backend::cpu, 1, level});
    const auto want = run(mem, x, 5, 64, 4, false);
    for (const std::string& p : {path, shifted.string()}) {
      const File f = File::open(p);
      const auto got = run(f.load("only", LayerOptions{Backend::cpu, 1, level}), x, 5, 64, 4, false);
      EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * 4), 0) << p << " level " << level;
    }
  }
  EXPECT_THROW(File::open(shifted.string()).weights("only"), Error);
  try {
    (void)File::open(path).layer("nope");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no layer \"nope\" (the file has \"only\")"), std::string::npos) << e.what();
  }
}

// Experts [first, end) of every tensor of `w` (each is [E, ...], experts contiguous).
ExpertWeights slice_experts(const ExpertWeights& w, std::int64_t first, std::int64_t end) {
  ExpertWeights out = w;
  for_each_tensor(out, [&](const char*, TensorView& v) {
    if (!v.present()) return;
    const std::size_t per = v.nbytes() / static_cast<std::size_t>(v.shape[0]);
    v.data = static_cast<const std::uint8_t*>(v.data) + per * static_cast<std::size_t>(first);
    v.shape[0] = end - first;
  });
  return out;
}

TEST(File, LoadsARangeOfExpertsWithOtherRouting) {
  const std::int64_t e = 6, h = 64, in = 32, t = 11;
  struct Case {
    Activation act;
    int block;
    bool symmetric;
  };
  for (const Case c :
       {Case{Activation::swiglu, 16, false}, Case{Activation::relu, 0, false}, Case{Activation::silu, 32, true}}) {
    MoeAttributes a;
    a.k = 3;
    a.activation = c.act;
    a.block_size = c.block;
    if (c.act == Activation::swiglu) a.swiglu_fusion = 1, a.activation_alpha = 1.702f, a.swiglu_limit = 7.f;
    tools::SynthOptions so;
    so.symmetric = c.symmetric;
    const auto s = tools::synth_layer(e, h, in, a, so);
    const std::string path = (scratch() / "part.safetensors").string();
    save_file(path, {{"moe", s.views(), a, {}, {}}});
    const File f = File::open(path);
    for (auto [first, end] : {std::pair<std::int64_t, std::int64_t>{0, 6}, {2, 5}, {5, 6}, {0, 1}}) {
      SCOPED_TRACE(std::to_string(first) + ".." + std::to_string(end));
      const std::int64_t n = end - first;
      MoeAttributes pa = a;
      pa.k = 1;
      pa.normalize_routing_weights = 1;
      const Layer mem(slice_experts(s.views(), first, end), pa, LayerOptions{Backend::cpu, 1});
      const Layer part = f.load("moe", LayerOptions{Backend::cpu, 1}, File::Part{first, end, 1, 1});
      EXPECT_EQ(part.shape().num_experts, n);
      EXPECT_EQ(part.attributes().k, 1);
      EXPECT_EQ(part.attributes().normalize_routing_weights, 1);
      EXPECT_EQ(part.attributes().activation, a.activation);
      EXPECT_EQ(part.packed_bytes(), mem.packed_bytes());
      const Inputs x = random_inputs(t, h, n, 7);
      EXPECT_EQ(std::memcmp(run(mem, x, t, h, n, false).data(), run(part, x, t, h, n, false).data(),
                            static_cast<std::size_t>(t * h) * 4),
                0);
    }
    // The defaults are the stored layer; -1 is the stored end.
    const Layer whole = f.load("moe", LayerOptions{Backend::cpu, 1}, File::Part{});
    EXPECT_EQ(whole.attributes().k, 3);
    EXPECT_EQ(f.load("moe", {}, File::Part{4, -1, 2, -1}).shape().num_experts, 2);
    const Inputs x = random_inputs(t, h, e, 8);
    EXPECT_EQ(std::memcmp(run(whole, x, t, h, e, true).data(), run(f.load("moe", {}), x, t, h, e, true).data(),
                          static_cast<std::size_t>(t * h) * 4),
              0);
  }
  MoeAttributes a;
  a.k = 2;
  const auto s = tools::synth_layer(e, h, in, a);
  const std::string path = (scratch() / "part_bad.safetensors").string();
  save_file(path, {{"moe", s.views(), a, {}, {}}});
  const File f = File::open(path);
  auto message = [&](const File::Part& p) {
    try {
      (void)f.load("moe", {}, p);
    } catch (const Error& err) {
      return std::string(err.what());
    }
    return std::string("no error");
  };
  for (auto [first, end] : {std::pair<std::int64_t, std::int64_t>{3, 3}, {-1, 2}, {4, 7}, {5, 2}, {0, -2}}) {
    const std::string m = message({first, end});
    EXPECT_NE(m.find(path + ": layer \"moe\": experts [" + std::to_string(first) + ", " + std::to_string(end) +
                     ") is not a non-empty range within the layer's 6 experts [0, 6)"),
              std::string::npos)
        << m;
  }
  // The stored k = 2 does not fit one expert: the builder's message, with the file, layer and range.
  const std::string m = message({5, 6});
  EXPECT_NE(m.find(path + ": layer \"moe\" experts [5, 6): "), std::string::npos) << m;
  EXPECT_NE(m.find("k"), std::string::npos) << m;
}

TEST(File, SaveRefusesBadLayersAndLeavesNothingBehind) {
  MoeAttributes a;
  a.k = 2;
  const auto s = tools::synth_layer(4, 32, 32, a);
  const fs::path dir = scratch() / "save_refusals";
  fs::create_directories(dir);
  const std::string path = (dir / "x.safetensors").string();
  auto expect_refused = [&](const std::vector<LayerToSave>& layers, const std::string& what,
                            const std::map<std::string, std::string>& md = {}) {
    try {
      save_file(path, layers, md);
      ADD_FAILURE() << "saved: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    EXPECT_TRUE(fs::is_empty(dir)) << what;
  };
  ExpertWeights bad = s.views();
  bad.fc1_scales.shape[1] += 1;
  expect_refused({{"l", bad, a, {}, {}}}, "layer \"l\": fc1_scales");
  expect_refused({{"l", s.views(), a, {}, {}}, {"l", s.views(), a, {}, {}}}, "two layers are named \"l\"");
  expect_refused({{"", s.views(), a, {}, {}}}, "empty name");
  expect_refused({{"l", s.views(), a, {{"fc1_scales", s.views().fc1_scales}}, {}}}, "name of a QMoE input");
  expect_refused({{"l", s.views(), a, {}, {}}}, "reserved", {{"qmoe.x", "1"}});
  MoeAttributes k9 = a;
  k9.k = 9;
  expect_refused({{"l", s.views(), k9, {}, {}}}, "k: expected");
  try {
    save_file((dir / "missing" / "x.safetensors").string(), {{"l", s.views(), a, {}, {}}});
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot create"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace qmoe::test
