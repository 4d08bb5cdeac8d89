// The Layer front: validates what the contract says, picks the backend (the
// only code that does), and forwards calls to it.
#include "qmoe/layer.h"

#include <algorithm>

#include "core/check.h"
#include "core/validate.h"
#include "layer/backend.h"

namespace qmoe {

namespace {
constexpr int kMaxThreads = 1024;
}

struct Layer::Impl {
  MoeAttributes attrs;
  MoeShape shape;
  Backend backend = Backend::cpu;
  std::unique_ptr<detail::LayerBackend> run;
};

bool cuda_available() noexcept { return detail::cuda_backend_available(); }

void detail::LayerBackend::forward_async(const TensorView& input, const TensorView& router_probs,
                                         const TensorView& router_weights, const MutableTensorView& out,
                                         std::int64_t tokens, void* stream) const {
  detail::require(stream == nullptr, "forward_async: this backend (", name(), ") takes no stream (got a non-null one)");
  forward(input, router_probs, router_weights, out, tokens);
}

Layer::Layer(const ExpertWeights& weights, const MoeAttributes& attrs, const LayerOptions& options)
    : Layer(weights, attrs, options, nullptr) {}

Layer::Layer(const ExpertWeights& weights, const MoeAttributes& attrs, const LayerOptions& options_in,
             const std::function<void(const void*, std::size_t)>* release)
    : impl_(std::make_unique<Impl>()) {
  using detail::require;
  const LayerOptions options = with_environment(options_in);
  require(options.threads >= 0 && options.threads <= kMaxThreads, "threads: expected 0..", kMaxThreads,
          " (0 = all hardware threads), got ", options.threads);
  require(options.accuracy_level >= 0 && options.accuracy_level <= 4,
          "accuracy_level: expected 0..4 (ONNX Runtime's meaning), got ", options.accuracy_level);
  impl_->attrs = attrs;
  impl_->shape = validate(weights, attrs);
  impl_->backend = options.backend;
  switch (options.backend) {
    case Backend::cpu:
      require(options.host_experts.empty(), "host_experts: only for the CUDA backend (a CPU layer keeps all ",
              impl_->shape.num_experts, " experts in host memory), got ", options.host_experts.size(), " experts");
      require(options.host_experts_gpu_from <= 0,
              "host_experts_gpu_from: only for a CUDA layer with host_experts, got ", options.host_experts_gpu_from);
      impl_->run = detail::make_cpu_backend(weights, attrs, impl_->shape, options, release);
      break;
    case Backend::cuda: {
      require(options.max_tokens >= 1 && options.max_tokens <= (std::int64_t{1} << 24),
              "max_tokens: expected 1..16777216, got ", options.max_tokens);
      require(options.device >= 0, "device: expected a CUDA device ordinal >= 0, got ", options.device);
      require(options.host_experts_gpu_from >= LayerOptions::kMeasureCrossover,
              "host_experts_gpu_from: expected tokens >= 0 (0 = never) or kMeasureCrossover (-1), got ",
              options.host_experts_gpu_from);
      require(options.host_experts_gpu_from <= 0 || !options.host_experts.empty(),
              "host_experts_gpu_from: only with host_experts (every expert is on the GPU), got ",
              options.host_experts_gpu_from);
      std::vector<int> host = options.host_experts;
      std::sort(host.begin(), host.end());
      for (std::size_t i = 0; i < host.size(); ++i) {
        require(host[i] >= 0 && host[i] < impl_->shape.num_experts, "host_experts: expected expert ids 0..",
                impl_->shape.num_experts - 1, ", got ", host[i]);
        require(i == 0 || host[i] != host[i - 1], "host_experts: expert ", host[i], " is named twice");
      }
      LayerOptions o = options;
      o.host_experts = std::move(host);
      const MoeShape& shape = impl_->shape;
      const detail::HostExpertsFactory host_side = [&]() {
        return detail::make_cpu_host_experts(weights, attrs, shape, o, o.host_experts, release);
      };
      impl_->run = detail::make_cuda_backend(weights, attrs, shape, o, release, &host_side);
      break;
    }
    default:
      detail::fail("backend: expected Backend::cpu or Backend::cuda, got ", static_cast<int>(options.backend));
  }
}

Layer::~Layer() = default;
Layer::Layer(Layer&&) noexcept = default;
Layer& Layer::operator=(Layer&&) noexcept = default;

void Layer::forward(const TensorView& input, const TensorView& router_probs, const MutableTensorView& out) const {
  forward(input, router_probs, TensorView{}, out);
}

const Layer::Impl& Layer::impl() const {
  detail::require(impl_ != nullptr, "Layer: used after being moved from");
  return *impl_;
}

void Layer::forward(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                    const MutableTensorView& out) const {
  const Impl& im = impl();
  const std::int64_t t = detail::validate_call(im.shape, input, router_probs, router_weights, &out);
  if (t == 0) return;
  im.run->forward(input, router_probs, router_weights, out, t);
}

void Layer::forward_async(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                          const MutableTensorView& out, void* stream) const {
  const Impl& im = impl();
  const std::int64_t t = detail::validate_call(im.shape, input, router_probs, router_weights, &out);
  if (t == 0) return;
  im.run->forward_async(input, router_probs, router_weights, out, t, stream);
}

const MoeAttributes& Layer::attributes() const { return impl().attrs; }
const MoeShape& Layer::shape() const { return impl().shape; }
std::size_t Layer::packed_bytes() const { return impl().run->packed_bytes(); }
int Layer::threads() const { return impl().run->threads(); }
Backend Layer::backend() const { return impl().backend; }
std::size_t Layer::device_bytes() const { return impl().run->device_bytes(); }
std::size_t Layer::workspace_bytes() const { return impl().run->workspace_bytes(); }
std::int64_t Layer::host_experts_gpu_from() const { return impl().run->host_experts_gpu_from(); }
const char* Layer::kernel_name() const { return impl().run->name().c_str(); }

}  // namespace qmoe
