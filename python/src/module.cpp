// qmoe._core: the nanobind bindings of the C++ library.
//
// This layer is deliberately thin: NumPy dtype policy, defaults and keyword
// names live in python/qmoe/__init__.py; here we only turn (array, dtype tag)
// pairs into views, release the GIL around the real work, and translate
// qmoe::Error into ValueError (the C++ message names the offending tensor).
//
// Lifetime rules (why the code is shaped this way):
//  * nanobind's ndarray handles touch Python reference counts when they are
//    destroyed, so they are created and destroyed with the GIL held; only the
//    C++ work in between runs with the GIL released.
//  * qmoe::Layer prepacks in its constructor and keeps no pointer into the raw
//    weights, so the bound Layer holds no reference to the NumPy arrays passed
//    to __init__: they are released as soon as construction returns.
//  * forward_async (CUDA backend) takes DLPack tensors (torch CUDA tensors)
//    and a cudaStream_t as an int; it only enqueues work, so the caller keeps
//    the tensors alive until the stream has run it (torch's stream-ordered
//    caching allocator does that for tensors used on the current stream).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>

#include "bindings.h"
#include "convert.h"
#include "core/routing.h"
#include "qmoe/qmoe.h"

namespace nb = nanobind;
using namespace nb::literals;
using qmoe_py::DeviceIn;
using qmoe_py::DeviceOut;
using qmoe_py::InArray;
using qmoe_py::TaggedIn;
using qmoe_py::TaggedOut;

namespace {

// The bound layer: a qmoe::Layer that also remembers the CUDA ordinal it was
// built for (qmoe::Layer does not report it), so that forward_async can refuse
// tensors on another device before any CUDA call.
struct PyLayer : qmoe::Layer {
  PyLayer(const qmoe::ExpertWeights& w, const qmoe::MoeAttributes& a, const qmoe::LayerOptions& o)
      : qmoe::Layer(w, a, o), device(o.backend == qmoe::Backend::cuda ? o.device : -1) {}
  PyLayer(qmoe::Layer&& l, const qmoe::LayerOptions& o)
      : qmoe::Layer(std::move(l)), device(o.backend == qmoe::Backend::cuda ? o.device : -1) {}
  int device;  ///< CUDA ordinal; -1 on the CPU backend
};

const char* backend_name(qmoe::Backend b) { return b == qmoe::Backend::cuda ? "cuda" : "cpu"; }

/// "cpu" / "cuda", or the qmoe::Backend value as an int.
qmoe::Backend parse_backend(nb::handle b) {
  if (nb::isinstance<nb::str>(b)) {
    const std::string s = nb::cast<std::string>(b);
    if (s == "cpu") return qmoe::Backend::cpu;
    if (s == "cuda") return qmoe::Backend::cuda;
    throw nb::value_error(("backend: expected \"cpu\" or \"cuda\", got \"" + s + "\"").c_str());
  }
  if (nb::isinstance<nb::int_>(b) && !nb::isinstance<nb::bool_>(b)) {
    long long v = 0;
    if (!nb::try_cast(b, v))
      throw nb::value_error(("backend: " + nb::cast<std::string>(nb::repr(b)) + " is out of range").c_str());
    if (v == static_cast<long long>(qmoe::Backend::cpu)) return qmoe::Backend::cpu;
    if (v == static_cast<long long>(qmoe::Backend::cuda)) return qmoe::Backend::cuda;
    throw nb::value_error(("backend: expected " + std::to_string(static_cast<int>(qmoe::Backend::cpu)) + " (cpu) or " +
                           std::to_string(static_cast<int>(qmoe::Backend::cuda)) + " (cuda), got " + std::to_string(v))
                              .c_str());
  }
  throw nb::type_error(
      ("backend: expected \"cpu\", \"cuda\" or an int, got " + nb::cast<std::string>(nb::repr(b))).c_str());
}

void layer_init(PyLayer* self, const std::map<std::string, TaggedIn>& weights, const qmoe::MoeAttributes& attrs,
                int threads, int accuracy_level, nb::handle backend, int device, std::int64_t max_tokens,
                const std::vector<int>& host_experts, std::int64_t host_experts_gpu_from) {
  qmoe_py::WeightArgs args{weights};  // holds the arrays (GIL held) until this returns
  const qmoe::ExpertWeights views = args.views();
  const qmoe::LayerOptions opts =
      qmoe_py::layer_options(threads, accuracy_level, backend, device, max_tokens, host_experts, host_experts_gpu_from);
  nb::gil_scoped_release release;
  new (self) PyLayer(views, attrs, opts);
}

void layer_forward(const PyLayer& layer, const TaggedIn& input, const TaggedIn& router_probs,
                   const std::optional<TaggedIn>& router_weights, const TaggedOut& out) {
  const qmoe::TensorView x = qmoe_py::to_view(input, "input");
  const qmoe::TensorView lg = qmoe_py::to_view(router_probs, "router_probs");
  const qmoe::TensorView mix = qmoe_py::to_view(router_weights, "router_weights");
  const qmoe::MutableTensorView o = qmoe_py::to_mutable_view(out, "output");
  nb::gil_scoped_release release;
  layer.forward(x, lg, mix, o);
}

// CUDA backend: device tensors in, work enqueued on `stream`, no wait. All the
// checks a wrong argument can fail happen here or in the library's validation
// (which runs before any CUDA call), so an error leaves nothing enqueued.
void layer_forward_async(const PyLayer& layer, const DeviceIn& input, const DeviceIn& router_probs,
                         const std::optional<DeviceIn>& router_weights, const DeviceOut& out, std::uintptr_t stream) {
  if (layer.backend() != qmoe::Backend::cuda)
    throw nb::value_error(
        "forward_async: the layer runs on the CPU backend, which takes host arrays (call forward instead)");
  const qmoe::TensorView x = qmoe_py::to_device_view(input, "input", layer.device);
  if (x.dtype == qmoe::DType::f32)
    throw nb::type_error("input: the CUDA backend takes float16 or bfloat16 activations, got float32");
  const qmoe::TensorView lg = qmoe_py::to_device_view(router_probs, "router_probs", layer.device);
  const qmoe::TensorView mix = qmoe_py::to_device_view(router_weights, "router_weights", layer.device);
  const qmoe::MutableTensorView o = qmoe_py::to_device_mutable_view(out, "output", layer.device);
  void* s = reinterpret_cast<void*>(stream);  // a cudaStream_t; 0 = the legacy default stream
  nb::gil_scoped_release release;
  layer.forward_async(x, lg, mix, o, s);
}

// The same from raw pointers, for qmoe.Layer's torch path: DLPack's import costs
// microseconds per tensor (a Python-level __dlpack__ call), more than a decode call's
// GPU time. The caller (python/qmoe/_torch_tensors.py) has checked the tensors' device and
// made them C-contiguous; shapes and dtypes are validated here and by the library as
// for forward_async, and the backend refuses pointers outside the layer's device.
// Dtype codes are qmoe::DType's values; mix = 0: no router_weights.
qmoe::DType dtype_code(int code, const char* name) {
  if (code == static_cast<int>(qmoe::DType::f16)) return qmoe::DType::f16;
  if (code == static_cast<int>(qmoe::DType::bf16)) return qmoe::DType::bf16;
  if (code == static_cast<int>(qmoe::DType::f32)) return qmoe::DType::f32;
  throw nb::type_error((std::string(name) + ": expected dtype float16 or bfloat16 (CUDA backend)").c_str());
}

void layer_forward_ptrs(const PyLayer& layer, std::uintptr_t x, const qmoe::Shape& x_shape, int x_dtype,
                        std::uintptr_t lg, const qmoe::Shape& lg_shape, int lg_dtype, std::uintptr_t mix,
                        const qmoe::Shape& mix_shape, int mix_dtype, std::uintptr_t out, std::uintptr_t stream) {
  if (layer.backend() != qmoe::Backend::cuda)
    throw nb::value_error("forward_ptrs: the layer runs on the CPU backend, which takes host arrays");
  const qmoe::DType dt = dtype_code(x_dtype, "input");
  if (dt == qmoe::DType::f32)
    throw nb::type_error("input: the CUDA backend takes float16 or bfloat16 activations, got float32");
  auto p = [](std::uintptr_t v) { return reinterpret_cast<const void*>(v); };
  const qmoe::TensorView xv(p(x), dt, x_shape), lv(p(lg), dtype_code(lg_dtype, "router_probs"), lg_shape);
  const qmoe::TensorView mv =
      mix ? qmoe::TensorView(p(mix), dtype_code(mix_dtype, "router_weights"), mix_shape) : qmoe::TensorView{};
  const qmoe::MutableTensorView o(reinterpret_cast<void*>(out), dt, x_shape);
  nb::gil_scoped_release release;
  layer.forward_async(xv, lv, mv, o, reinterpret_cast<void*>(stream));
}

nb::ndarray<nb::numpy, double> reference(const std::map<std::string, TaggedIn>& weights,
                                         const qmoe::MoeAttributes& attrs, const TaggedIn& input,
                                         const TaggedIn& router_probs, const std::optional<TaggedIn>& router_weights) {
  qmoe_py::WeightArgs args{weights};
  const qmoe::ExpertWeights views = args.views();
  const qmoe::TensorView x = qmoe_py::to_view(input, "input");
  const qmoe::TensorView lg = qmoe_py::to_view(router_probs, "router_probs");
  const qmoe::TensorView mix = qmoe_py::to_view(router_weights, "router_weights");
  std::vector<double> y;
  {
    nb::gil_scoped_release release;
    y = qmoe::reference_forward(views, attrs, x, lg, mix);
  }
  const std::size_t h = x.shape.back();
  const std::size_t t = h ? y.size() / h : 0;
  return qmoe_py::to_numpy(std::move(y), {t, h});
}

nb::tuple quantize(const TaggedIn& w, int bits, int block_size, bool symmetric) {
  const qmoe::TensorView v = qmoe_py::to_view(w, "w");
  qmoe::QuantizeOptions o;
  o.bits = bits;
  o.block_size = block_size;
  o.symmetric = symmetric;
  qmoe::QuantizedWeights q;
  {
    nb::gil_scoped_release release;
    q = qmoe::quantize(v, o);
  }
  auto dims = [](const qmoe::TensorView& t) {
    std::vector<std::size_t> d;
    for (auto x : t.shape) d.push_back(static_cast<std::size_t>(x));
    return d;
  };
  const auto wshape = dims(q.weights_view()), sshape = dims(q.scales_view()), zshape = dims(q.zero_points_view());
  const bool has_zp = !q.zero_points.empty();
  nb::object weights = nb::cast(qmoe_py::to_numpy(std::move(q.weights), wshape));
  nb::object scales = nb::cast(qmoe_py::to_numpy(std::move(q.scales), sshape));
  nb::object zp = has_zp ? nb::cast(qmoe_py::to_numpy(std::move(q.zero_points), zshape)) : nb::none();
  return nb::make_tuple(weights, scales, zp, q.max_abs_error, q.rel_l2_error);
}

// Top-k routing of every row of router_probs [..., E] with the library's own
// routing (core/routing.h, float64 weights), each weight rounded to float32 as
// the CPU backend rounds it (cpu/plan.cpp). Returns (experts int32 [..., k],
// weights float32 [..., k]), each row in rank order (largest first).
nb::tuple route(const TaggedIn& router_probs, int k, bool normalize, const std::optional<TaggedIn>& router_weights) {
  const qmoe::TensorView lg = qmoe_py::to_view(router_probs, "router_probs");
  const qmoe::TensorView mix = qmoe_py::to_view(router_weights, "router_weights");
  if (lg.shape.empty() || lg.shape.back() < 1)
    throw qmoe::Error("router_probs: expected [..., E] with E >= 1 experts, got " + qmoe::shape_str(lg.shape));
  const std::int64_t e = lg.shape.back(), t = lg.numel() / e;
  if (k < 1 || k > e)
    throw qmoe::Error("k: expected 1..E = 1.." + std::to_string(e) + " (router_probs' last dimension), got " +
                      std::to_string(k));
  if (mix.present() && mix.shape != lg.shape)
    throw qmoe::Error("router_weights: expected the shape of router_probs " + qmoe::shape_str(lg.shape) + ", got " +
                      qmoe::shape_str(mix.shape));
  auto as_f32 = [](const qmoe::TensorView& v) {
    std::vector<float> f(static_cast<std::size_t>(v.numel()));
    for (std::size_t i = 0; i < f.size(); ++i) {
      switch (v.dtype) {
        case qmoe::DType::f16:
          f[i] = qmoe::f16_to_f32(static_cast<const std::uint16_t*>(v.data)[i]);
          break;
        case qmoe::DType::bf16:
          f[i] = qmoe::bf16_to_f32(static_cast<const std::uint16_t*>(v.data)[i]);
          break;
        default:
          f[i] = static_cast<const float*>(v.data)[i];
      }
    }
    return f;
  };
  for (const auto* v : {&lg, &mix})
    if (v->present() && v->dtype == qmoe::DType::u8)
      throw qmoe::Error(std::string(v == &lg ? "router_probs" : "router_weights") +
                        ": expected float32, float16 or bfloat16, got uint8");
  std::vector<std::int32_t> experts(static_cast<std::size_t>(t * k));
  std::vector<float> weights(static_cast<std::size_t>(t * k));
  {
    nb::gil_scoped_release release;
    const std::vector<float> l = as_f32(lg);
    const std::vector<float> m = mix.present() ? as_f32(mix) : std::vector<float>{};
    std::vector<int> chosen(static_cast<std::size_t>(k));
    std::vector<double> w(static_cast<std::size_t>(k));
    for (std::int64_t i = 0; i < t; ++i) {
      qmoe::detail::route_token(l.data() + i * e, m.empty() ? nullptr : m.data() + i * e, static_cast<int>(e), k,
                                normalize, chosen.data(), w.data());
      for (int j = 0; j < k; ++j) {
        experts[static_cast<std::size_t>(i * k + j)] = chosen[static_cast<std::size_t>(j)];
        weights[static_cast<std::size_t>(i * k + j)] = static_cast<float>(w[static_cast<std::size_t>(j)]);
      }
    }
  }
  std::vector<std::size_t> shape(lg.shape.begin(), lg.shape.end());
  shape.back() = static_cast<std::size_t>(k);
  return nb::make_tuple(qmoe_py::to_numpy(std::move(experts), shape), qmoe_py::to_numpy(std::move(weights), shape));
}

// The machine's measured ceilings (qmoe/sysinfo.h): long-running, so without the GIL.
double read_bandwidth(int threads, std::size_t nbytes) {
  nb::gil_scoped_release release;
  return qmoe::measure_read_bandwidth(threads, nbytes);
}

double peak_flops(int threads, double seconds) {
  if (!(seconds > 0 && seconds <= 3600))  // also refuses NaN
    throw qmoe::Error("seconds: expected a number in (0, 3600], got " + std::to_string(seconds));
  nb::gil_scoped_release release;
  return qmoe::measure_peak_flops(threads, seconds);
}

}  // namespace

namespace qmoe_py {

qmoe::LayerOptions layer_options(int threads, int accuracy_level, nb::handle backend, int device,
                                 std::int64_t max_tokens, const std::vector<int>& host_experts,
                                 std::int64_t host_experts_gpu_from) {
  qmoe::LayerOptions opts;
  opts.host_experts = host_experts;
  opts.host_experts_gpu_from = host_experts_gpu_from;
  opts.backend = parse_backend(backend);
  opts.threads = threads;
  opts.accuracy_level = accuracy_level;
  opts.device = device;
  opts.max_tokens = max_tokens;
  return opts;
}

nb::object wrap_layer(qmoe::Layer&& layer, const qmoe::LayerOptions& o) {
  return nb::cast(PyLayer(std::move(layer), o), nb::rv_policy::move);
}

}  // namespace qmoe_py

NB_MODULE(_core, m) {
  m.doc() = "qmoe C++ bindings (use the qmoe package, not this module directly)";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const qmoe::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  // dtype tags (qmoe::DType values) used by the Python layer.
  m.attr("DTYPE_F32") = static_cast<int>(qmoe::DType::f32);
  m.attr("DTYPE_F16") = static_cast<int>(qmoe::DType::f16);
  m.attr("DTYPE_BF16") = static_cast<int>(qmoe::DType::bf16);
  m.attr("DTYPE_U8") = static_cast<int>(qmoe::DType::u8);

  nb::class_<qmoe::MoeAttributes>(m, "Attributes", "QMoE attributes, with ONNX Runtime's names.")
      .def(nb::init<>())
      .def_rw("k", &qmoe::MoeAttributes::k)
      .def_prop_rw(
          "activation_type",
          [](const qmoe::MoeAttributes& a) { return std::string(qmoe::activation_name(a.activation)); },
          [](qmoe::MoeAttributes& a, const std::string& s) { a.activation = qmoe::parse_activation(s); })
      .def_rw("normalize_routing_weights", &qmoe::MoeAttributes::normalize_routing_weights)
      .def_rw("use_sparse_mixer", &qmoe::MoeAttributes::use_sparse_mixer)
      .def_rw("expert_weight_bits", &qmoe::MoeAttributes::expert_weight_bits)
      .def_rw("block_size", &qmoe::MoeAttributes::block_size)
      .def_rw("swiglu_fusion", &qmoe::MoeAttributes::swiglu_fusion)
      .def_rw("swiglu_limit", &qmoe::MoeAttributes::swiglu_limit)
      .def_rw("activation_alpha", &qmoe::MoeAttributes::activation_alpha)
      .def_rw("activation_beta", &qmoe::MoeAttributes::activation_beta)
      .def("__repr__", [](const qmoe::MoeAttributes& a) { return "Attributes(" + qmoe::describe(a) + ")"; });

  m.attr("BACKEND_CPU") = static_cast<int>(qmoe::Backend::cpu);
  m.attr("BACKEND_CUDA") = static_cast<int>(qmoe::Backend::cuda);

  nb::class_<PyLayer>(m, "Layer", "A prepacked, immutable QMoE layer (use qmoe.Layer).")
      .def("__init__", &layer_init, "weights"_a, "attrs"_a, "threads"_a, "accuracy_level"_a, "backend"_a = "cpu",
           "device"_a = 0, "max_tokens"_a = 4096, "host_experts"_a = std::vector<int>{},
           "host_experts_gpu_from"_a = qmoe::LayerOptions::kMeasureCrossover,
           "Validates and prepacks the raw weights (GIL released); keeps no reference to them. "
           "backend: \"cpu\", \"cuda\" or BACKEND_*; device: CUDA ordinal; max_tokens: tokens per CUDA pass; "
           "host_experts: CUDA experts kept in host memory and run on the CPU kernels; host_experts_gpu_from: tokens "
           "per pass from which they are copied to the GPU and computed there (0 = never, -1 = measured).")
      .def("forward", &layer_forward, "input"_a, "router_probs"_a, "router_weights"_a.none(), "out"_a,
           "Writes QMoE(input, router_probs[, router_weights]) into out (host arrays; on a CUDA layer the call "
           "copies to and from the device and waits; GIL released).")
      .def("forward_async", &layer_forward_async, "input"_a.noconvert(), "router_probs"_a.noconvert(),
           "router_weights"_a.noconvert().none(), "out"_a.noconvert(), "stream"_a,
           "CUDA layer: enqueues QMoE(input, router_probs[, router_weights]) -> out on `stream` (a cudaStream_t "
           "as an int; 0 = the legacy default stream) and returns without waiting. The arguments are C-contiguous "
           "DLPack tensors (e.g. torch) in device memory on the layer's device, float16 or bfloat16 (all the same). "
           "Keep them alive until the stream has run the work.")
      .def("forward_ptrs", &layer_forward_ptrs, "x"_a, "x_shape"_a, "x_dtype"_a, "lg"_a, "lg_shape"_a, "lg_dtype"_a,
           "mix"_a, "mix_shape"_a, "mix_dtype"_a, "out"_a, "stream"_a,
           "forward_async from device pointers (ints), shapes and dtype codes (DTYPE_*); out has x's shape and "
           "dtype; mix = 0: no router_weights. For qmoe.Layer's torch path: no DLPack import per call.")
      .def_prop_ro("attributes", [](const PyLayer& l) { return l.attributes(); })
      .def_prop_ro("num_experts", [](const PyLayer& l) { return l.shape().num_experts; })
      .def_prop_ro("hidden_size", [](const PyLayer& l) { return l.shape().hidden; })
      .def_prop_ro("inter_size", [](const PyLayer& l) { return l.shape().inter; })
      .def_prop_ro("fc1_rows", [](const PyLayer& l) { return l.shape().fc1_rows; })
      .def_prop_ro("packed_bytes", [](const PyLayer& l) { return l.packed_bytes(); })
      .def_prop_ro("threads", [](const PyLayer& l) { return l.threads(); })
      .def_prop_ro("host_experts_gpu_from", [](const PyLayer& l) { return l.host_experts_gpu_from(); })
      .def_prop_ro("kernel_name", [](const PyLayer& l) { return std::string(l.kernel_name()); })
      .def_prop_ro(
          "backend", [](const PyLayer& l) { return std::string(backend_name(l.backend())); }, "\"cpu\" or \"cuda\".")
      .def_prop_ro(
          "device", [](const PyLayer& l) { return l.device; }, "The CUDA ordinal; -1 on the CPU backend.")
      .def_prop_ro(
          "device_bytes", [](const PyLayer& l) { return l.device_bytes(); },
          "CUDA: device memory the layer holds (packed weights, scales, biases); 0 on the CPU.")
      .def_prop_ro(
          "workspace_bytes", [](const PyLayer& l) { return l.workspace_bytes(); },
          "CUDA: bytes of the per-device working memory the layer uses (shared); 0 on the CPU.");

  qmoe_py::bind_file(m);

  m.def("reference", &reference, "weights"_a, "attrs"_a, "input"_a, "router_probs"_a, "router_weights"_a.none(),
        "The float64 reference forward; returns [T, H] float64.");
  m.def("route", &route, "router_probs"_a, "k"_a, "normalize"_a, "router_weights"_a.none(),
        "Top-k routing with the library's routing (as the CPU backend computes it): (experts int32 [..., k], "
        "weights float32 [..., k]) in rank order.");
  m.def("quantize", &quantize, "w"_a, "bits"_a, "block_size"_a, "symmetric"_a,
        "Quantizes float [E, N, K]; returns (weights, scales, zero_points|None, max_abs_error, rel_l2_error).");
  m.def("measure_read_bandwidth", &read_bandwidth, "threads"_a, "nbytes"_a,
        "Read bandwidth in bytes/s of `threads` threads summing a buffer of `nbytes` (GIL released).");
  m.def("measure_peak_flops", &peak_flops, "threads"_a, "seconds"_a,
        "float32 FMA rate in flop/s of `threads` threads with the CPU kernels' ISA (GIL released).");
  m.def("cuda_available", &qmoe::cuda_available,
        "True when this build has the CUDA backend and a CUDA device is present.");
  m.def(
      "cpu_kernel_isa", [] { return std::string(qmoe::cpu_kernel_isa()); },
      "The CPU kernel table Layer uses in this process, e.g. 'avx512vnni'.");
}
