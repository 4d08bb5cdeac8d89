// libFuzzer target for the qmoe file reader (include/qmoe/file.h): the bytes
// are a whole file handed to io::parse_file, which File::open runs on the map.
// A qmoe::Error naming the file is the only acceptable refusal; any other
// exception, a crash, a sanitizer report, a leak, a hang or a large allocation
// is a bug. When the bytes parse, the target does what a loader does next
// without a map: it checks the parse's promises (every tensor inside the data
// section, dtype x shape == bytes, no overlap), reads every tensor byte (so ASan
// sees any offset out of bounds), and for small layers builds a Layer from the
// views (prepack, CPU, 1 thread) and, where the values are tame (see tame()),
// runs forward on one token; then File::open and File::load do the same from a
// map of the bytes, and must give the same output bit for bit.
//
// Build and run: scripts/fuzz.sh [SECONDS] (tests/fuzz/CMakeLists.txt).
//
// Seeds (tests/fuzz/corpus, dictionary tests/fuzz/file.dict): good.safetensors
// is the file tests/cpp/test_bad_files.cpp writes with QMOE_WRITE_BAD_FILES;
// bad_<case> are that test's cases made again on a 3.6 KB layer (its own files
// are 9.8 KB each); ok_* are small valid files of each configuration (4/8-bit,
// row/block, zero points, f16/bf16 scales, fc3, fusion 2, two layers "a" and
// "a.b", misaligned tensors, extra tensors, metadata); bad_empty_weight_huge_dims
// and bad_layer_list_deep_nesting reproduce reader bugs fixed; nan_scales_silu
// reached the NaN in fast_exp (fixed) with QMOE_FUZZ_ANY_VALUES=1.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "io/file_format.h"
#include "qmoe/error.h"
#include "qmoe/file.h"
#include "qmoe/layer.h"
#include "qmoe/weights.h"

namespace {

constexpr const char* kPath = "fuzz-input";
// Layers with fewer weight bytes than this are also built and run.
constexpr std::uint64_t kBuildLimit = std::uint64_t{1} << 20;

volatile std::uint64_t g_sink;  // keeps the byte reads from being optimized away

[[noreturn]] void bug(const char* what, const std::string& detail = {}) {
  std::fprintf(stderr, "fuzz_file: BUG: %s %s\n", what, detail.c_str());
  std::abort();
}
#define FUZZ_CHECK(cond, ...)                                            \
  do {                                                                   \
    if (!(cond)) bug("check failed: " #cond __VA_OPT__(, ) __VA_ARGS__); \
  } while (0)

std::uint64_t checksum(const std::uint8_t* p, std::uint64_t n) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::uint64_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// Forward runs only on layers whose float values are tame (finite, |v| <= 1e3,
// so no sum overflows). The fuzzer found the CPU epilogue's fast_exp turning a
// NaN into an int (undefined; fixed, and unit-tested in test_activation.cpp);
// non-finite values through the other paths (int8 activations at level 4) are
// not yet claimed clean, so CI keeps to tame values. Set
// QMOE_FUZZ_ANY_VALUES=1 to run forward on every layer anyway.
constexpr float kTame = 1e3f;
const bool g_any_values = [] {
  const char* e = std::getenv("QMOE_FUZZ_ANY_VALUES");
  return e && *e && *e != '0';
}();

bool tame(float v) { return std::isfinite(v) && std::fabs(v) <= kTame; }

bool tame(const qmoe::TensorView& t) {
  if (!t.present() || t.dtype == qmoe::DType::u8) return true;
  const auto n = static_cast<std::size_t>(t.numel());
  for (std::size_t i = 0; i < n; ++i) {
    float v;
    if (t.dtype == qmoe::DType::f32) {
      std::memcpy(&v, static_cast<const std::uint8_t*>(t.data) + 4 * i, 4);
    } else {
      std::uint16_t h;
      std::memcpy(&h, static_cast<const std::uint8_t*>(t.data) + 2 * i, 2);
      v = t.dtype == qmoe::DType::f16 ? qmoe::f16_to_f32(h) : qmoe::bf16_to_f32(h);
    }
    if (!tame(v)) return false;
  }
  return true;
}

bool tame(const qmoe::ExpertWeights& w, const qmoe::MoeAttributes& a) {
  bool ok = tame(a.activation_alpha) && tame(a.activation_beta);
  qmoe::for_each_tensor(w, [&](const char*, const qmoe::TensorView& t) { ok = ok && tame(t); });
  return ok;
}

// The slot of ExpertWeights for an ORT input name (as the loader fills it).
qmoe::TensorView* slot_of(qmoe::ExpertWeights& w, std::string_view name) {
  qmoe::TensorView* slot = nullptr;
  qmoe::for_each_tensor(w, [&](const char* n, qmoe::TensorView& v) {
    if (name == n) slot = &v;
  });
  return slot;
}

// Every tensor lies inside the data section, has dtype x shape bytes, and no
// two share a byte; each is read in full.
std::uint64_t check_tensors(const std::uint8_t* data, std::uint64_t size, const qmoe::io::ParsedFile& pf) {
  std::uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = header << 8 | data[i];
  const std::uint64_t base = 8 + header;
  FUZZ_CHECK(size >= 8 && header <= size - 8);
  std::uint64_t h = 0;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
  for (const qmoe::FileTensor& t : pf.tensors) {
    FUZZ_CHECK(t.offset >= base && t.offset <= size && t.nbytes <= size - t.offset, t.name);
    unsigned __int128 count = 1;
    for (std::int64_t d : t.shape) {
      FUZZ_CHECK(d >= 0, t.name);
      count *= static_cast<std::uint64_t>(d);
      if (count > size) count = size + 1;  // saturate: no overflow, still "too many"
    }
    FUZZ_CHECK(count * qmoe::dtype_size(t.dtype) == t.nbytes, t.name);
    h ^= checksum(data + t.offset, t.nbytes);
    if (t.nbytes) ranges.emplace_back(t.offset, t.offset + t.nbytes);
  }
  std::sort(ranges.begin(), ranges.end());
  for (std::size_t i = 1; i < ranges.size(); ++i) FUZZ_CHECK(ranges[i - 1].second <= ranges[i].first);
  return h;
}

// Each tensor belongs to the listed layer with the longest name that prefixes
// it followed by '.' (checked against the plain quadratic rule).
void check_owners(const qmoe::io::ParsedFile& pf) {
  const auto named = [](const std::vector<qmoe::FileTensor>& v, const std::string& n) {
    return std::any_of(v.begin(), v.end(), [&](const qmoe::FileTensor& t) { return t.name == n; });
  };
  for (const qmoe::FileTensor& t : pf.tensors) {
    const qmoe::FileLayer* best = nullptr;
    for (const qmoe::FileLayer& L : pf.layers)
      if (t.name.size() > L.name.size() + 1 && t.name.compare(0, L.name.size(), L.name) == 0 &&
          t.name[L.name.size()] == '.' && (!best || L.name.size() > best->name.size()))
        best = &L;
    int found = 0;
    for (const qmoe::FileLayer& L : pf.layers)
      if (named(L.tensors, t.name) || named(L.extra, t.name)) {
        ++found;
        FUZZ_CHECK(&L == best, t.name + " is given to layer " + L.name);
      }
    FUZZ_CHECK(found == (best ? 1 : 0), t.name);
  }
}

// A layer built and run on one token: its options, and the output.
struct Run {
  const qmoe::FileLayer* layer = nullptr;
  qmoe::LayerOptions options;
  std::vector<float> out;
};

// The fixed token and router logits a layer runs on.
std::vector<float> token(std::int64_t hidden) {
  std::vector<float> x(static_cast<std::size_t>(hidden));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7) * 0.25f - 0.75f;
  return x;
}
std::vector<float> logits(std::int64_t experts) {
  std::vector<float> p(static_cast<std::size_t>(experts));
  for (std::size_t i = 0; i < p.size(); ++i) p[i] = static_cast<float>(i % 5) * 0.5f;
  return p;
}

std::vector<float> forward(const qmoe::Layer& layer) {
  const qmoe::MoeShape& s = layer.shape();
  const std::vector<float> x = token(s.hidden), probs = logits(s.num_experts);
  std::vector<float> out(x.size());
  layer.forward(qmoe::view_f32(x.data(), {1, s.hidden}), qmoe::view_f32(probs.data(), {1, s.num_experts}),
                qmoe::output_f32(out.data(), {1, s.hidden}));
  return out;
}

// What File::load does without the map: views into the bytes, misaligned
// float tensors copied to aligned memory, then a Layer built and run.
Run exercise_layer(const std::uint8_t* data, std::uint64_t size, const qmoe::io::ParsedFile& pf,
                   const qmoe::FileLayer& L) {
  qmoe::ExpertWeights w;
  std::vector<std::vector<std::uint64_t>> copies;  // 8-byte aligned storage
  std::uint64_t bytes = 0;
  for (const qmoe::FileTensor& t : L.tensors) {
    FUZZ_CHECK(t.name.size() > L.name.size() + 1 && t.name.compare(0, L.name.size(), L.name) == 0 &&
                   t.name[L.name.size()] == '.',
               t.name);
    const bool listed = std::any_of(pf.tensors.begin(), pf.tensors.end(), [&](const qmoe::FileTensor& f) {
      return f.name == t.name && f.offset == t.offset && f.nbytes == t.nbytes;
    });
    FUZZ_CHECK(listed, t.name);
    qmoe::TensorView* slot = slot_of(w, std::string_view(t.name).substr(L.name.size() + 1));
    FUZZ_CHECK(slot != nullptr, t.name);
    FUZZ_CHECK(!slot->present(), "tensor given twice: " + t.name);
    FUZZ_CHECK(t.offset <= size && t.nbytes <= size - t.offset, t.name);
    *slot = qmoe::TensorView(data + t.offset, t.dtype, t.shape);
    if (reinterpret_cast<std::uintptr_t>(slot->data) % qmoe::dtype_size(t.dtype) != 0) {
      copies.emplace_back(t.nbytes / 8 + 1);
      std::memcpy(copies.back().data(), slot->data, t.nbytes);
      slot->data = copies.back().data();
    }
    bytes += t.nbytes;
  }
  FUZZ_CHECK(bytes == L.weight_bytes, L.name);

  // The shape the parse reports is the one the views give.
  qmoe::MoeShape s;
  try {
    s = qmoe::validate(w, L.attributes);
  } catch (const qmoe::Error& e) {
    bug("parse_file accepted a layer that validate() refuses:", e.what());
  }
  FUZZ_CHECK(s.num_experts == L.shape.num_experts && s.hidden == L.shape.hidden && s.inter == L.shape.inter &&
                 s.fc1_rows == L.shape.fc1_rows,
             L.name);

  // The attributes survive the writer's encoding.
  const qmoe::MoeAttributes back =
      qmoe::io::attributes_from_json(qmoe::io::attributes_to_json(L.attributes), "round trip");
  const qmoe::MoeAttributes& a = L.attributes;
  FUZZ_CHECK(back.k == a.k && back.activation == a.activation &&
                 back.normalize_routing_weights == a.normalize_routing_weights &&
                 back.use_sparse_mixer == a.use_sparse_mixer && back.expert_weight_bits == a.expert_weight_bits &&
                 back.block_size == a.block_size && back.swiglu_fusion == a.swiglu_fusion &&
                 back.swiglu_limit == a.swiglu_limit && back.activation_alpha == a.activation_alpha &&
                 back.activation_beta == a.activation_beta,
             L.name);

  Run run;
  if (L.weight_bytes >= kBuildLimit) return run;
  // The accuracy level (which prepack runs) comes from the last byte.
  static constexpr int kLevels[] = {0, 4, 3};
  run.options.threads = 1;
  run.options.accuracy_level = kLevels[data[size - 1] % 3];
  try {
    const qmoe::Layer layer(w, L.attributes, run.options);
    if (!g_any_values && !tame(w, L.attributes)) return run;
    run.out = forward(layer);
  } catch (const qmoe::Error& e) {
    bug("a layer parse_file accepted cannot be built or run:", e.what());
  }
  run.layer = &L;
  return run;
}

// The same bytes through the public API: File::open maps them (a memfd) and
// File::load prepacks from the map, dropping pages as it goes; each layer run
// above must give the same output, bit for bit.
void through_file(const std::uint8_t* data, std::uint64_t size, const qmoe::io::ParsedFile& pf,
                  const std::vector<Run>& runs) {
  const int fd = ::memfd_create("qmoe-fuzz", MFD_CLOEXEC);
  FUZZ_CHECK(fd >= 0);
  for (std::uint64_t done = 0; done < size;) {
    const ssize_t n = ::write(fd, data + done, size - done);
    FUZZ_CHECK(n > 0);
    done += static_cast<std::uint64_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  try {
    const qmoe::File file = qmoe::File::open(path);
    ::close(fd);  // the map keeps the memfd
    FUZZ_CHECK(file.layers().size() == pf.layers.size() && file.tensors().size() == pf.tensors.size());
    for (const Run& r : runs) {
      const std::vector<float> out = forward(file.load(r.layer->name, r.options));
      FUZZ_CHECK(std::memcmp(out.data(), r.out.data(), out.size() * sizeof(float)) == 0,
                 "File::load and a Layer from the views give different outputs: layer " + r.layer->name);
      g_sink = g_sink + checksum(reinterpret_cast<const std::uint8_t*>(out.data()), out.size() * sizeof(float));
    }
  } catch (const qmoe::Error& e) {
    bug("File::open / File::load refused bytes that parse_file accepted:", e.what());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  qmoe::io::ParsedFile pf;
  try {
    pf = qmoe::io::parse_file(data, size, kPath);
  } catch (const qmoe::Error& e) {
    // A refusal must say which file.
    FUZZ_CHECK(std::strstr(e.what(), kPath) != nullptr, e.what());
    return 0;
  }
  g_sink = g_sink + check_tensors(data, size, pf);
  check_owners(pf);
  std::vector<Run> runs;
  for (const qmoe::FileLayer& L : pf.layers)
    if (Run r = exercise_layer(data, size, pf, L); r.layer) runs.push_back(std::move(r));
  if (!runs.empty()) through_file(data, size, pf, runs);
  return 0;
}
