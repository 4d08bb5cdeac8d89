// Validation of everything a caller hands in, before any work is done.
#include "core/validate.h"

#include <cmath>

#include "core/check.h"

namespace qmoe::detail {

void validate_attributes(const MoeAttributes& a) {
  require(a.expert_weight_bits == 4 || a.expert_weight_bits == 8, "expert_weight_bits: expected 4 or 8, got ",
          a.expert_weight_bits);
  require(a.block_size == 0 || (a.block_size >= 16 && (a.block_size & (a.block_size - 1)) == 0),
          "block_size: expected 0 (row-wise) or a power of two >= 16, got ", a.block_size);
  require(a.k >= 1, "k: expected >= 1, got ", a.k);
  require(a.normalize_routing_weights == 0 || a.normalize_routing_weights == 1,
          "normalize_routing_weights: expected 0 or 1, got ", a.normalize_routing_weights);
  require(a.use_sparse_mixer == 0 || a.use_sparse_mixer == 1, "use_sparse_mixer: expected 0 or 1, got ",
          a.use_sparse_mixer);
  require(a.use_sparse_mixer == 0,
          "use_sparse_mixer: 1 is not supported by qmoe (only 0); refusing rather than "
          "computing a different routing");
  require(a.swiglu_fusion >= 0 && a.swiglu_fusion <= 2, "swiglu_fusion: expected 0, 1 or 2, got ", a.swiglu_fusion);
  require(!std::isnan(a.swiglu_limit) && a.swiglu_limit > 0, "swiglu_limit: expected a positive value, got ",
          a.swiglu_limit);
  require(std::isfinite(a.activation_alpha), "activation_alpha: expected a finite value, got ", a.activation_alpha);
  require(std::isfinite(a.activation_beta), "activation_beta: expected a finite value, got ", a.activation_beta);
}

namespace {

// Scales: row-wise [E,N] or [E,N,1]; block-wise [E,N,K/block].
void check_scales(const TensorView& s, const char* name, std::int64_t e, std::int64_t n, std::int64_t k, int block) {
  require(s.present(), name, ": required, but absent");
  require_float(s, name);
  require_data(s, name);
  if (block == 0) {
    if (s.rank() == 3)
      require_shape(s, name, {e, n, 1});
    else
      require_shape(s, name, {e, n});
  } else {
    require_shape(s, name, {e, n, k / block});
  }
}

// Zero points, packed like weights along their last axis.
void check_zero_points(const TensorView& z, const char* name, std::int64_t e, std::int64_t n, std::int64_t k, int bits,
                       int block) {
  if (!z.present()) return;
  require_dtype(z, name, DType::u8);
  require_data(z, name);
  const std::int64_t pack = 8 / bits;
  if (block == 0)
    require_shape(z, name, {e, (n + pack - 1) / pack});
  else
    require_shape(z, name, {e, n, (k / block + pack - 1) / pack});
}

void check_bias(const TensorView& b, const char* name, std::int64_t e, std::int64_t n) {
  if (!b.present()) return;
  require_float(b, name);
  require_data(b, name);
  require_shape(b, name, {e, n});
}

void check_weights(const TensorView& w, const char* name, std::int64_t e, std::int64_t n, std::int64_t k, int bits) {
  require(w.present(), name, ": required, but absent");
  require_dtype(w, name, DType::u8);
  require_data(w, name);
  require_shape(w, name, {e, n, k * bits / 8});
}

// A view with data but no dimensions is a 0-d (scalar) tensor, not an absent one.
void refuse_scalar(const TensorView& t, const char* name) {
  require(t.present() || t.data == nullptr, name,
          ": got a 0-d (scalar) tensor; expected a tensor of rank >= 2 (or no tensor for an optional input)");
}

}  // namespace

}  // namespace qmoe::detail

namespace qmoe {

MoeShape validate(const ExpertWeights& w, const MoeAttributes& a) {
  using namespace detail;
  validate_attributes(a);
  for_each_tensor(w, [](const char* name, const TensorView& t) { refuse_scalar(t, name); });
  const int bits = a.expert_weight_bits;
  const std::int64_t pack = 8 / bits;
  // fc1 and fc2 give the sizes; everything else must agree with them.
  require(w.fc1_weights.present(), "fc1_experts_weights: required, but absent");
  require(w.fc2_weights.present(), "fc2_experts_weights: required, but absent");
  if (!(w.fc1_weights.rank() == 3))
    fail("fc1_experts_weights: expected rank 3 [E, N1, H/", pack, "], got shape ", shape_str(w.fc1_weights.shape));
  if (!(w.fc2_weights.rank() == 3))
    fail("fc2_experts_weights: expected rank 3 [E, H, I/", pack, "], got shape ", shape_str(w.fc2_weights.shape));
  MoeShape s;
  s.num_experts = w.fc1_weights.shape[0];
  s.hidden = w.fc2_weights.shape[1];
  s.inter = w.fc2_weights.shape[2] * pack;
  if (!(s.num_experts >= 1))
    fail("fc1_experts_weights: expected at least one expert, got shape ", shape_str(w.fc1_weights.shape));
  if (!(s.hidden >= 1 && s.inter >= 1))
    fail("fc2_experts_weights: expected non-empty [E, H, I/", pack, "], got shape ", shape_str(w.fc2_weights.shape));
  const bool swiglu = a.activation == Activation::swiglu;
  const bool fused = swiglu && a.swiglu_fusion != 0;
  s.fc1_rows = fused ? 2 * s.inter : s.inter;
  require(a.k <= s.num_experts, "k: expected 1..num_experts (", s.num_experts, "), got ", a.k);
  if (!swiglu)
    require(a.swiglu_fusion == 0, "swiglu_fusion: must be 0 unless activation_type is swiglu, got ", a.swiglu_fusion);
  if (a.block_size) {
    require(s.hidden % a.block_size == 0, "block_size: ", a.block_size, " does not divide hidden_size ", s.hidden);
    require(s.inter % a.block_size == 0, "block_size: ", a.block_size, " does not divide inter_size ", s.inter);
  }
  require(s.hidden % pack == 0, "fc2_experts_weights: hidden_size ", s.hidden, " must be a multiple of ", pack, " for ",
          bits, "-bit weights");
  check_weights(w.fc1_weights, "fc1_experts_weights", s.num_experts, s.fc1_rows, s.hidden, bits);
  check_weights(w.fc2_weights, "fc2_experts_weights", s.num_experts, s.hidden, s.inter, bits);
  check_scales(w.fc1_scales, "fc1_scales", s.num_experts, s.fc1_rows, s.hidden, a.block_size);
  check_scales(w.fc2_scales, "fc2_scales", s.num_experts, s.hidden, s.inter, a.block_size);
  check_bias(w.fc1_bias, "fc1_experts_bias", s.num_experts, s.fc1_rows);
  check_bias(w.fc2_bias, "fc2_experts_bias", s.num_experts, s.hidden);
  check_zero_points(w.fc1_zero_points, "fc1_zero_points", s.num_experts, s.fc1_rows, s.hidden, bits, a.block_size);
  check_zero_points(w.fc2_zero_points, "fc2_zero_points", s.num_experts, s.hidden, s.inter, bits, a.block_size);
  const bool need_fc3 = swiglu && a.swiglu_fusion == 0;
  if (need_fc3) {
    require(w.fc3_weights.present(),
            "fc3_experts_weights: required for activation_type swiglu with swiglu_fusion 0 "
            "(the up projection), but absent");
    check_weights(w.fc3_weights, "fc3_experts_weights", s.num_experts, s.inter, s.hidden, bits);
    check_scales(w.fc3_scales, "fc3_scales", s.num_experts, s.inter, s.hidden, a.block_size);
    check_bias(w.fc3_bias, "fc3_experts_bias", s.num_experts, s.inter);
    check_zero_points(w.fc3_zero_points, "fc3_zero_points", s.num_experts, s.inter, s.hidden, bits, a.block_size);
  } else {
    const char* why = swiglu ? "swiglu_fusion is not 0 (FC3 is fused into FC1)" : "activation_type is not swiglu";
    require(!w.fc3_weights.present(), "fc3_experts_weights: must be absent when ", why);
    require(!w.fc3_scales.present(), "fc3_scales: must be absent when ", why);
    require(!w.fc3_bias.present(), "fc3_experts_bias: must be absent when ", why);
    require(!w.fc3_zero_points.present(), "fc3_zero_points: must be absent when ", why);
  }
  return s;
}

namespace detail {

std::int64_t validate_call(const MoeShape& s, const TensorView& input, const TensorView& router_probs,
                           const TensorView& router_weights, const MutableTensorView* out) {
  refuse_scalar(input, "input");
  refuse_scalar(router_probs, "router_probs");
  refuse_scalar(router_weights, "router_weights");
  require(input.present(), "input: required, but absent");
  require_float(input, "input");
  if (!(input.rank() == 2 || input.rank() == 3))
    fail("input: expected rank 2 [T, H] or 3 [B, S, H], got shape ", shape_str(input.shape));
  require_data(input, "input");
  if (!(input.shape.back() == s.hidden))
    fail("input: expected last dimension hidden_size ", s.hidden, ", got shape ", shape_str(input.shape));
  const std::int64_t t = input.numel() / s.hidden;
  require(router_probs.present(), "router_probs: required, but absent");
  require(router_probs.dtype == input.dtype, "router_probs: expected dtype ", dtype_name(input.dtype),
          " (same as input), got ", dtype_name(router_probs.dtype));
  require_data(router_probs, "router_probs");
  require_shape(router_probs, "router_probs", {t, s.num_experts});
  if (router_weights.present()) {
    require(router_weights.dtype == input.dtype, "router_weights: expected dtype ", dtype_name(input.dtype),
            " (same as input), got ", dtype_name(router_weights.dtype));
    require_data(router_weights, "router_weights");
    require_shape(router_weights, "router_weights", {t, s.num_experts});
  }
  if (out) {
    require(out->dtype == input.dtype, "output: expected dtype ", dtype_name(input.dtype), " (same as input), got ",
            dtype_name(out->dtype));
    if (!(out->shape == input.shape))
      fail("output: expected shape ", shape_str(input.shape), " (same as input), got ", shape_str(out->shape));
    require(t == 0 || out->data != nullptr, "output: data pointer is null");
  }
  return t;
}

}  // namespace detail
}  // namespace qmoe
