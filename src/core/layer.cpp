#include "qmoe/layer.h"

#include "core/check.h"
#include "core/validate.h"
#include "cpu/moe.h"
#include "cuda/cuda_moe.h"

namespace qmoe {

namespace {
constexpr int kMaxThreads = 1024;
}

struct Layer::Impl {
  MoeAttributes attrs;
  MoeShape shape;
  Backend backend = Backend::cpu;
  std::unique_ptr<cpu::CpuMoe> cpu;
  std::unique_ptr<cuda::CudaMoe> gpu;
};

bool cuda_available() noexcept { return cuda::available(); }

Layer::Layer(const ExpertWeights& weights, const MoeAttributes& attrs, const LayerOptions& options)
    : Layer(weights, attrs, options, nullptr) {}

Layer::Layer(const ExpertWeights& weights, const MoeAttributes& attrs, const LayerOptions& options,
             const std::function<void(const void*, std::size_t)>* release)
    : impl_(std::make_unique<Impl>()) {
  using detail::require;
  require(options.threads >= 0 && options.threads <= kMaxThreads, "threads: expected 0..", kMaxThreads,
          " (0 = all hardware threads), got ", options.threads);
  require(options.accuracy_level >= 0 && options.accuracy_level <= 4,
          "accuracy_level: expected 0..4 (ONNX Runtime's meaning), got ", options.accuracy_level);
  impl_->attrs = attrs;
  impl_->shape = validate(weights, attrs);
  impl_->backend = options.backend;
  switch (options.backend) {
    case Backend::cpu:
      impl_->cpu = std::make_unique<cpu::CpuMoe>(weights, attrs, impl_->shape, options.threads, options.accuracy_level,
                                                 cpu::CpuMoe::kDefaultChunkBytes, nullptr, release);
      break;
    case Backend::cuda:
      require(options.max_tokens >= 1 && options.max_tokens <= (std::int64_t{1} << 24),
              "max_tokens: expected 1..16777216, got ", options.max_tokens);
      require(options.device >= 0, "device: expected a CUDA device ordinal >= 0, got ", options.device);
      impl_->gpu = std::make_unique<cuda::CudaMoe>(weights, attrs, impl_->shape, options, release);
      break;
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
  if (im.gpu) {
    im.gpu->forward(input, router_probs, router_weights, out, t);
  } else {
    im.cpu->forward(input, router_probs, router_weights, out, t);
  }
}

void Layer::forward_async(const TensorView& input, const TensorView& router_probs, const TensorView& router_weights,
                          const MutableTensorView& out, void* stream) const {
  const Impl& im = impl();
  if (!im.gpu) {
    detail::require(stream == nullptr, "forward_async: the CPU backend takes no stream (got a non-null one)");
    forward(input, router_probs, router_weights, out);
    return;
  }
  const std::int64_t t = detail::validate_call(im.shape, input, router_probs, router_weights, &out);
  if (t == 0) return;
  im.gpu->forward_async(input, router_probs, router_weights, out, t, stream);
}

const MoeAttributes& Layer::attributes() const { return impl().attrs; }
const MoeShape& Layer::shape() const { return impl().shape; }
std::size_t Layer::packed_bytes() const {
  const Impl& im = impl();
  return im.gpu ? im.gpu->packed_bytes() : im.cpu->packed_bytes();
}
int Layer::threads() const {
  const Impl& im = impl();
  return im.gpu ? 0 : im.cpu->threads();
}
Backend Layer::backend() const { return impl().backend; }
std::size_t Layer::device_bytes() const {
  const Impl& im = impl();
  return im.gpu ? im.gpu->device_bytes() : 0;
}
std::size_t Layer::workspace_bytes() const {
  const Impl& im = impl();
  return im.gpu ? im.gpu->workspace_bytes() : 0;
}
const char* Layer::kernel_name() const {
  const Impl& im = impl();
  return im.gpu ? im.gpu->name().c_str() : im.cpu->name().c_str();
}

}  // namespace qmoe
