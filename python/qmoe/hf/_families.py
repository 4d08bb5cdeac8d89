"""The MoE families qmoe.hf converts: where each keeps its experts and router
in a checkpoint, which layers are sparse, and how it routes.

Routing descriptions (stored as JSON in each converted layer's metadata under
``"routing"``) say how to compute the layer's inputs from the router logits
``z = x @ router.weight.T (+ router.bias)``, [T, E]:

* ``softmax_topk``: p = softmax(z) over all E; choose the k largest p; mix
  with p[chosen], divided by their sum iff ``renormalize``. QMoE computes it
  from ``router_probs = z`` (``normalize_routing_weights`` = renormalize).
* ``topk_softmax``: choose the k largest z; mix with softmax over those k.
  Equal to softmax_topk with renormalization (QMoE: ``router_probs = z``,
  ``normalize_routing_weights = 1``).
* ``sigmoid_group_topk`` (DeepSeek-V3): s = sigmoid(z); choice score
  c = s + e_score_correction_bias; experts fall in ``n_group`` groups, a
  group scores the sum of its 2 best c, the ``topk_group`` best groups stay
  and the others are masked; choose the k largest c among the rest; mix with
  s[chosen], divided by (their sum + 1e-20) iff ``norm_topk_prob``, times
  ``routed_scaling_factor``. QMoE needs ``router_probs`` = c with masked
  groups set to -inf (or any ranking that chooses the same experts) and
  ``router_weights`` = the final mixing weights scattered into [T, E];
  ``normalize_routing_weights`` = 0.
* ``sparsemixer`` (Phi-3.5-MoE): the sparsemixer's top-2 choice and weights
  (``jitter_eps``); QMoE's use_sparse_mixer is not implemented, so the
  layer takes ``router_weights`` (the sparsemixer's weights scattered into
  [T, E]) and ``router_probs`` ranking the chosen experts first;
  ``normalize_routing_weights`` = 0.

``"inputs"`` in the description is ``"router_probs"`` when router_probs = z
is all the layer needs, or ``"router_probs+router_weights"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

# (gate, up, down) names of per-expert checkpoints
PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


@dataclasses.dataclass(frozen=True)
class Family:
    """One MoE family's checkpoint conventions (see the module docstring)."""

    model_type: str
    name: str
    #: the MoE block under ``model.layers.{i}.`` in checkpoints, and in transformers' modules
    ckpt_block: str
    module_block: str
    #: config keys: number of experts (the first present), expert intermediate size
    experts_key: Tuple[str, ...]
    inter_key: str
    #: "per_expert" (w1/w3/w2 or gate/up/down, or v5 fused [E, 2I, H] gate|up), "gpt_oss", "granite"
    layout: str
    #: router tensors: role -> checkpoint suffix under the block
    router: Dict[str, str]
    #: dense tensors kept in the file beside the layer (checkpoint suffixes under the block)
    shared: Tuple[str, ...]
    routing: Callable[[Dict[str, Any]], Dict[str, Any]]
    is_moe_layer: Callable[[Dict[str, Any], int], bool]


def _k(cfg: Dict[str, Any]) -> int:
    return int(cfg["num_experts_per_tok"])


def _all_layers(cfg: Dict[str, Any], i: int) -> bool:
    return True


def _qwen_sparse(cfg: Dict[str, Any], i: int) -> bool:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    n = cfg.get("num_experts", cfg.get("num_local_experts", 0))
    return i not in (cfg.get("mlp_only_layers") or []) and int(n or 0) > 0 and (i + 1) % step == 0


def _deepseek_sparse(cfg: Dict[str, Any], i: int) -> bool:
    return i >= int(cfg.get("first_k_dense_replace", 0))


def _softmax_topk(renorm_key: Optional[str], default: bool) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    def f(cfg: Dict[str, Any]) -> Dict[str, Any]:
        renorm = bool(cfg.get(renorm_key, default)) if renorm_key else default
        return {"type": "softmax_topk", "top_k": _k(cfg), "renormalize": renorm, "inputs": "router_probs"}
    return f


def _topk_softmax(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {"type": "topk_softmax", "top_k": _k(cfg), "inputs": "router_probs"}


def _deepseek_routing(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {"type": "sigmoid_group_topk", "top_k": _k(cfg), "n_group": int(cfg.get("n_group", 1)),
            "topk_group": int(cfg.get("topk_group", 1)), "norm_topk_prob": bool(cfg.get("norm_topk_prob", True)),
            "routed_scaling_factor": float(cfg.get("routed_scaling_factor", 1.0)),
            "inputs": "router_probs+router_weights"}


def _sparsemixer(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {"type": "sparsemixer", "top_k": _k(cfg), "jitter_eps": float(cfg.get("router_jitter_noise", 0.01)),
            "inputs": "router_probs+router_weights"}


FAMILIES: Dict[str, Family] = {f.model_type: f for f in [
    Family("mixtral", "Mixtral", "block_sparse_moe", "mlp", ("num_local_experts",), "intermediate_size",
           "per_expert",
           {"weight": "gate.weight"}, (), _softmax_topk(None, True), _all_layers),
    Family("qwen2_moe", "Qwen2-MoE", "mlp", "mlp", ("num_experts", "num_local_experts"), "moe_intermediate_size",
           "per_expert",
           {"weight": "gate.weight"},
           ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight",
            "shared_expert_gate.weight"), _softmax_topk("norm_topk_prob", False), _qwen_sparse),
    Family("qwen3_moe", "Qwen3-MoE", "mlp", "mlp", ("num_experts", "num_local_experts"), "moe_intermediate_size",
           "per_expert",
           {"weight": "gate.weight"}, (), _softmax_topk("norm_topk_prob", True), _qwen_sparse),
    Family("gpt_oss", "gpt-oss", "mlp", "mlp", ("num_local_experts",), "intermediate_size", "gpt_oss",
           {"weight": "router.weight", "bias": "router.bias"}, (), _topk_softmax, _all_layers),
    Family("deepseek_v3", "DeepSeek-V3", "mlp", "mlp", ("n_routed_experts",), "moe_intermediate_size", "per_expert",
           {"weight": "gate.weight", "e_score_correction_bias": "gate.e_score_correction_bias"}, (),
           _deepseek_routing, _deepseek_sparse),
    Family("olmoe", "OLMoE", "mlp", "mlp", ("num_experts", "num_local_experts"), "intermediate_size", "per_expert",
           {"weight": "gate.weight"}, (), _softmax_topk("norm_topk_prob", False), _all_layers),
    Family("granitemoe", "Granite-MoE", "block_sparse_moe", "block_sparse_moe", ("num_local_experts",),
           "intermediate_size", "granite", {"weight": "router.layer.weight"}, (), _topk_softmax, _all_layers),
    Family("phimoe", "Phi-3.5-MoE", "block_sparse_moe", "mlp", ("num_local_experts",), "intermediate_size",
           "per_expert", {"weight": "gate.weight"}, (), _sparsemixer, _all_layers),
]}


def family_of(cfg: Dict[str, Any], where: str) -> Family:
    """The Family of a checkpoint's config.json (by ``model_type``)."""
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        archs = cfg.get("architectures")
        raise ValueError(f"{where}: unknown MoE architecture model_type={mt!r} (architectures {archs}); qmoe "
                         f"converts {', '.join(f'{f.name} ({t})' for t, f in FAMILIES.items())}")
    return FAMILIES[mt]


def config_int(cfg: Dict[str, Any], key: str, where: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{where}: config.json: expected a positive integer {key!r}, got {v!r}")
    return v


def num_experts(fam: Family, cfg: Dict[str, Any], where: str) -> int:
    for key in fam.experts_key:
        if key in cfg:
            return config_int(cfg, key, where)
    raise ValueError(f"{where}: config.json has none of {list(fam.experts_key)} (the number of experts)")


def moe_layers(fam: Family, cfg: Dict[str, Any], where: str) -> List[int]:
    n = config_int(cfg, "num_hidden_layers", where)
    return [i for i in range(n) if fam.is_moe_layer(cfg, i)]


def qmoe_routing_attrs(routing: Dict[str, Any]) -> Dict[str, Any]:
    """The QMoE attributes (k, normalize_routing_weights) that go with a routing description."""
    if routing["type"] == "softmax_topk":
        return {"k": routing["top_k"], "normalize_routing_weights": int(routing["renormalize"])}
    if routing["type"] == "topk_softmax":
        return {"k": routing["top_k"], "normalize_routing_weights": 1}
    return {"k": routing["top_k"], "normalize_routing_weights": 0}
