// qmoe/config.h — the attributes of a QMoE layer, with ONNX Runtime's names,
// defaults and meanings (com.microsoft::QMoE, quant_type "int").
#pragma once

#include <limits>
#include <string>
#include <string_view>

namespace qmoe {

/// Expert activation, attribute `activation_type`.
enum class Activation { relu, gelu, silu, swiglu, identity };

/// Parses "relu", "gelu", "silu", "swiglu" or "identity"; throws qmoe::Error otherwise.
Activation parse_activation(std::string_view name);
/// The attribute spelling of an activation.
const char* activation_name(Activation a) noexcept;

/// QMoE attributes. Field names follow ONNX Runtime's attribute names.
struct MoeAttributes {
  /// `k`: experts chosen per token, 1..E.
  int k = 1;
  /// `activation_type`.
  Activation activation = Activation::relu;
  /// `normalize_routing_weights`: 1 divides the chosen weights by their sum.
  int normalize_routing_weights = 0;
  /// `use_sparse_mixer`: only 0 is supported; 1 is refused with an Error.
  int use_sparse_mixer = 0;
  /// `expert_weight_bits`: 4 or 8.
  int expert_weight_bits = 4;
  /// `block_size`: 0 = one scale per row; else a power of two >= 16 dividing
  /// both the hidden and the intermediate size.
  int block_size = 0;
  /// `swiglu_fusion`: 0 = gate in FC1 and up in FC3; 1 = FC1 rows interleaved
  /// (gate 2i, up 2i+1); 2 = FC1 rows concatenated (gate first half, up second).
  int swiglu_fusion = 0;
  /// `swiglu_limit`: gate clamped above, up clamped to [-limit, limit].
  float swiglu_limit = std::numeric_limits<float>::infinity();
  /// `activation_alpha`: swiglu uses G * sigmoid(alpha * G).
  float activation_alpha = 1.0f;
  /// `activation_beta`: swiglu uses (L + beta).
  float activation_beta = 0.0f;
};

/// One-line description, e.g. "k=4 act=swiglu bits=4 block=0 fusion=1 ...".
std::string describe(const MoeAttributes& a);

}  // namespace qmoe
