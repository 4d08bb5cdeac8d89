#include "core/check.h"
#include "core/validate.h"
#include "cpu/moe.h"
#include "qmoe/layer.h"

namespace qmoe {

namespace {
constexpr int kMaxThreads = 1024;
}

struct Layer::Impl {
  MoeAttributes attrs;
  MoeShape shape;
  std::unique_ptr<cpu::CpuMoe> cpu;
};

Layer::Layer(const ExpertWeights& weights, const MoeAttributes& attrs, const LayerOptions& options)
    : impl_(std::make_unique<Impl>()) {
  using detail::require;
  require(options.threads >= 0 && options.threads <= kMaxThreads, "threads: expected 0..", kMaxThreads,
          " (0 = all hardware threads), got ", options.threads);
  require(options.accuracy_level >= 0 && options.accuracy_level <= 4,
          "accuracy_level: expected 0..4 (ONNX Runtime's meaning), got ", options.accuracy_level);
  impl_->attrs = attrs;
  impl_->shape = validate(weights, attrs);
  switch (options.backend) {
    case Backend::cpu: impl_->cpu = std::make_unique<cpu::CpuMoe>(weights, attrs, impl_->shape, options.threads, options.accuracy_level);
      break;
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
  im.cpu->forward(input, router_probs, router_weights, out, t);
}

const MoeAttributes& Layer::attributes() const { return impl().attrs; }
const MoeShape& Layer::shape() const { return impl().shape; }
std::size_t Layer::packed_bytes() const { return impl().cpu->packed_bytes(); }
int Layer::threads() const { return impl().cpu->threads(); }
const char* Layer::kernel_name() const { return impl().cpu->name().c_str(); }

}  // namespace qmoe
