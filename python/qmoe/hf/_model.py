"""Swapping the experts of a loaded transformers model for qmoe layers.

transformers (v5) gives every sparse-MoE family the same split: the block's
own router computes ``top_k_index`` and ``top_k_weights`` (softmax, top-k,
renormalization, sigmoid + group-limited choice, sparsemixer, ... whatever
the family does) and hands them to an *experts* module,
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.
The experts modules are marked by transformers with their layout
(``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``) and keep
their weights as 3-D parameters (``gate_up_proj``, ``down_proj``).

So :func:`quantize_model` replaces exactly that module, by a
:class:`qmoe.torch.QmoeExperts` that mixes the chosen experts with the given
weights (QMoE's ``router_weights``, ``normalize_routing_weights = 0``). The
router, the shared experts, the residual and the block's return conventions
stay the model's own code, for every family.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

import qmoe

from ._quantize import Gating, gating_for, quantize_layer

# Experts classes whose _apply_gate is their own: the QMoE activation each computes.
_CUSTOM_GATES = {
    # gate = min(G, limit); up = clamp(L, -limit, limit); (up + 1) * gate * sigmoid(alpha * gate), interleaved
    "GptOssExperts": lambda m: Gating("swiglu", fusion=1, alpha=float(m.alpha), beta=1.0, limit=float(m.limit)),
}


def _is_experts(mod: Any) -> bool:
    return all(hasattr(mod, a) for a in ("is_transposed", "is_concatenated", "has_bias", "has_gate")) and \
        hasattr(mod, "down_proj")


def iter_experts(model: Any) -> Iterator[Tuple[str, Any, str, Any]]:
    """(qualified name, parent module, attribute name, experts module) for
    every transformers v5 experts module of ``model``, in module order."""
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if _is_experts(child):
                yield (f"{name}.{child_name}" if name else child_name), mod, child_name, child


def _to_f32(t: Any) -> np.ndarray:
    return t.detach().to("cpu", copy=False).float().numpy()


def experts_layout(mod: Any, where: str) -> Dict[str, Any]:
    """How a transformers experts module maps onto QMoE: getters for each
    expert's FC1 [N1, H] and FC2 [H, I] (float32 NumPy), biases, the Gating,
    and E, H, I."""
    import torch

    gated = bool(mod.has_gate)
    up = mod.gate_up_proj if gated else getattr(mod, "up_proj", None)
    down = mod.down_proj
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"{where}: expected 3-D gate_up_proj/up_proj and down_proj parameters "
                         f"({type(mod).__name__})")
    if up.device.type == "meta" or down.device.type == "meta":
        raise ValueError(f"{where}: the expert weights are on the meta device (not loaded)")
    E = up.shape[0]
    if mod.is_transposed:  # x @ W: [E, H, N1] and [E, I, H]
        H, n1 = up.shape[1], up.shape[2]
        I = down.shape[1]
        ok = down.shape == (E, I, H)
        fc1 = lambda e: _to_f32(up[e].t())  # noqa: E731
        fc2 = lambda e: _to_f32(down[e].t())  # noqa: E731
    else:  # F.linear(x, W): [E, N1, H] and [E, H, I]
        n1, H = up.shape[1], up.shape[2]
        I = down.shape[2]
        ok = down.shape == (E, H, I)
        fc1 = lambda e: _to_f32(up[e])  # noqa: E731
        fc2 = lambda e: _to_f32(down[e])  # noqa: E731
    if not ok or n1 != (2 * I if gated else I):
        raise ValueError(f"{where}: inconsistent expert shapes: gate_up/up {list(up.shape)}, down "
                         f"{list(down.shape)} (transposed={bool(mod.is_transposed)}, gated={gated})")
    fusion = 2 if mod.is_concatenated else 1
    own_gate = getattr(type(mod), "_apply_gate", None)
    try:
        from transformers.integrations.moe import _default_apply_gate as default_gate
    except ImportError:  # pragma: no cover - older transformers
        default_gate = None
    if own_gate is default_gate:
        own_gate = None
    custom = _CUSTOM_GATES.get(type(mod).__name__)
    if custom is not None and own_gate is not None:
        gating = custom(mod)
        if gating.fusion != fusion:
            raise ValueError(f"{where}: {type(mod).__name__} is marked is_concatenated={bool(mod.is_concatenated)}, "
                             f"unlike the interleaved gate qmoe knows for it")
    elif own_gate is not None:
        raise ValueError(f"{where}: {type(mod).__name__} computes its own gate (_apply_gate), which qmoe does not "
                         f"know how to express in QMoE's activations")
    else:
        act = getattr(mod.config, "hidden_act", None)
        fn = type(getattr(mod, "act_fn", None)).__name__
        if act in ("silu", "swish") and fn not in ("SiLUActivation", "SiLU"):
            raise ValueError(f"{where}: config.hidden_act is {act!r} but act_fn is {fn}")
        gating = gating_for(str(act), gated, fusion, where)
    b1 = b2 = None
    if mod.has_bias:
        b1 = _to_f32(mod.gate_up_proj_bias if gated else mod.up_proj_bias)
        b2 = _to_f32(mod.down_proj_bias)
    return dict(fc1=fc1, fc2=fc2, fc1_bias=b1, fc2_bias=b2, gating=gating, E=E, H=H, I=I, dtype=up.dtype,
                device=up.device)


def quantize_experts(mod: Any, *, k: int, bits: int = 4, block_size: int = 128, symmetric: bool = True,
                     threads: Optional[int] = None, where: str = "experts"
                     ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], Dict[str, float]]:
    """The QMoE layer (weights kwargs, attribute kwargs, rel L2 errors) of a
    transformers experts module, mixed by router_weights
    (normalize_routing_weights = 0, experts chosen by the caller)."""
    lay = experts_layout(mod, where)
    return quantize_layer(lay["fc1"], lay["fc2"], E=lay["E"], H=lay["H"], I=lay["I"], gating=lay["gating"],
                          fc1_bias=lay["fc1_bias"], fc2_bias=lay["fc2_bias"], k=k, normalize=0, bits=bits,
                          block_size=block_size, symmetric=symmetric, threads=threads, where=where)


def _top_k(model: Any, where: str) -> int:
    cfg = getattr(model, "config", None)
    for key in ("num_experts_per_tok", "moe_topk", "top_k"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(f"{where}: the model's config has no num_experts_per_tok")


def quantize_model(model: Any, bits: int = 4, block_size: int = 128, device: Any = None, *,
                   symmetric: bool = True, threads: Optional[int] = None, accuracy_level: int = 0,
                   max_tokens: int = 4096, verbose: bool = False) -> Any:
    """Replaces, in place, every sparse-MoE experts module of a loaded
    transformers model by a qmoe layer; returns the model.

    Each experts module's float weights are quantized (``bits`` 4 or 8,
    ``block_size`` 0 = one scale per row, else a power of two >= 16 dividing
    the hidden and intermediate sizes; ``symmetric=False`` adds zero points)
    and dropped. The model's routers, shared experts and everything else stay
    as they are, so ``model(...)`` and ``model.generate(...)`` work as before.

    ``device``: where the qmoe layers run: ``None`` = where each experts
    module's weights are ("cpu" or "cuda:N"), or ``"cpu"`` / ``"cuda"`` /
    ``"cuda:N"``. A CUDA layer takes float16/bfloat16 activations on that
    device. ``threads``, ``accuracy_level`` and ``max_tokens`` are
    :class:`qmoe.Layer`'s. Inference only. Returns the model; the per-layer
    quantization errors are on ``model.qmoe_quantization_errors`` (name ->
    {"fc1": rel L2, "fc2": rel L2}).
    """
    from qmoe.torch import QmoeExperts

    found = list(iter_experts(model))
    if not found:
        legacy = [n for n, m in model.named_modules()
                  if n.endswith(".experts") and type(m).__name__ == "ModuleList"]
        hint = (f"; {legacy[0]!r} is a per-expert nn.ModuleList (transformers < 5 or remote code), whose block "
                f"runs its own expert loop: load the model with transformers >= 5 (its fused experts modules), or "
                f"convert the checkpoint with qmoe.hf.convert") if legacy else ""
        raise ValueError(f"{type(model).__name__}: no transformers sparse-MoE experts module found (qmoe knows the "
                         f"fused experts modules of transformers >= 5: Mixtral, Qwen2/3-MoE, gpt-oss, DeepSeek-V3, "
                         f"OLMoE, Granite-MoE, Phi-3.5-MoE, ...){hint}")
    k = _top_k(model, type(model).__name__)
    errors: Dict[str, Dict[str, float]] = {}
    for i in range(len(found)):
        name, parent, attr, mod = found[i]
        found[i] = None  # type: ignore[call-overload]  # the float experts go with the last reference
        w, a, err = quantize_experts(mod, k=k, bits=bits, block_size=block_size, symmetric=symmetric,
                                     threads=threads, where=name)
        dev = device if device is not None else str(mod.down_proj.device)
        layer = qmoe.Layer(**w, **a, device=dev, threads=threads, accuracy_level=accuracy_level,
                           max_tokens=max_tokens)
        setattr(parent, attr, QmoeExperts(layer, top_k=k))
        del mod
        errors[name] = err
        if verbose:
            print(f"{name}: {layer!r}  rel L2 fc1 {err['fc1']:.3e} fc2 {err['fc2']:.3e}")
    model.qmoe_quantization_errors = errors
    return model


def experts_names(model: Any) -> List[str]:
    """Qualified names of the experts modules quantize_model would replace."""
    return [n for n, *_ in iter_experts(model)]
