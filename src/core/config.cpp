#include "qmoe/config.h"

#include <sstream>

#include "core/check.h"

namespace qmoe {

Activation parse_activation(std::string_view name) {
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "silu") return Activation::silu;
  if (name == "swiglu") return Activation::swiglu;
  if (name == "identity") return Activation::identity;
  detail::fail("activation_type: expected one of relu, gelu, silu, swiglu, identity, got \"", name, "\"");
}

const char* activation_name(Activation a) noexcept {
  switch (a) {
    case Activation::relu:
      return "relu";
    case Activation::gelu:
      return "gelu";
    case Activation::silu:
      return "silu";
    case Activation::swiglu:
      return "swiglu";
    case Activation::identity:
      return "identity";
  }
  return "?";
}

std::string describe(const MoeAttributes& a) {
  std::ostringstream os;
  os << "k=" << a.k << " activation_type=" << activation_name(a.activation)
     << " expert_weight_bits=" << a.expert_weight_bits << " block_size=" << a.block_size
     << " normalize_routing_weights=" << a.normalize_routing_weights;
  if (a.activation == Activation::swiglu)
    os << " swiglu_fusion=" << a.swiglu_fusion << " swiglu_limit=" << a.swiglu_limit
       << " activation_alpha=" << a.activation_alpha << " activation_beta=" << a.activation_beta;
  return os.str();
}

}  // namespace qmoe
