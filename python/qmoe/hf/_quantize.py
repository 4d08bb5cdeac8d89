"""Float expert matrices -> qmoe's raw QMoE layer (weights dict + attributes).

Shared by :func:`qmoe.hf.quantize_model` (experts of a loaded transformers
model) and :func:`qmoe.hf.convert` (experts read from checkpoint shards).
Experts are quantized one at a time on a thread pool (``qmoe.quantize``
releases the GIL), so a layer's float32 copy never exists whole: the peak is
one float32 expert matrix per thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

import qmoe

#: ``get(e)`` returns expert e's matrix [N, K] (N outputs, K inputs) as float32.
ExpertGetter = Callable[[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Gating:
    """What an experts module computes between FC1 and FC2, in QMoE terms.

    ``activation`` is a QMoE ``activation_type``. For ``"swiglu"``, FC1 has
    2I rows: ``fusion`` 1 = gate and up interleaved (row 2i gate i, 2i+1 up
    i), 2 = concatenated (rows [0, I) gate, [I, 2I) up); the gated value is
    ``G * sigmoid(alpha * G) * (L + beta)`` with G clamped above and L to
    [-limit, limit].
    """

    activation: str
    fusion: int = 0
    alpha: float = 1.0
    beta: float = 0.0
    limit: float = float("inf")

    def attributes(self) -> Dict[str, Any]:
        a: Dict[str, Any] = {"activation_type": self.activation}
        if self.activation == "swiglu":
            a.update(swiglu_fusion=self.fusion, activation_alpha=self.alpha, activation_beta=self.beta,
                     swiglu_limit=self.limit)
        return a


#: transformers' ``hidden_act`` names that QMoE computes exactly, gated (act(gate) * up) or not.
SILU_NAMES = ("silu", "swish")
# QMoE's gelu is the tanh approximation (transformers' "gelu_new" / "gelu_pytorch_tanh"); transformers'
# "gelu" is the exact erf form, which QMoE does not compute, so it is refused.
PLAIN_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu_new": "gelu",
                     "gelu_pytorch_tanh": "gelu", "linear": "identity"}


def gating_for(hidden_act: str, gated: bool, fusion: int, where: str) -> Gating:
    """The Gating of ``act(gate) * up`` (``gated``) or ``act(h)`` for a
    transformers ``hidden_act`` name; a ValueError naming ``where`` otherwise."""
    if gated:
        if hidden_act not in SILU_NAMES:
            raise ValueError(f"{where}: gated experts with hidden_act={hidden_act!r}: QMoE's swiglu computes "
                             f"silu(gate) * up only (supported: {list(SILU_NAMES)})")
        return Gating("swiglu", fusion=fusion, alpha=1.0, beta=0.0)
    if hidden_act not in PLAIN_ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act={hidden_act!r} has no exact QMoE activation "
                         f"(supported: {sorted(PLAIN_ACTIVATIONS)})")
    return Gating(PLAIN_ACTIVATIONS[hidden_act])


def default_threads(threads: Optional[int]) -> int:
    if threads is None:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
    return threads


def check_block(block_size: int, dims: Dict[str, int], where: str) -> None:
    """QMoE needs K % block_size == 0 for both matrices, block_size 0 or a power of two >= 16."""
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size: expected an int, got {block_size!r}")
    if block_size != 0 and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"block_size: expected 0 (one scale per row) or a power of two >= 16, got {block_size}")
    for name, k in dims.items():
        if block_size and k % block_size:
            raise ValueError(f"{where}: block_size {block_size} does not divide {name} = {k} "
                             f"(choose a block size dividing it, or 0 for row-wise scales)")


def quantize_matrix(get: ExpertGetter, E: int, N: int, K: int, *, bits: int, block_size: int, symmetric: bool,
                    pool: concurrent.futures.Executor, name: str) -> Tuple[Dict[str, np.ndarray], float]:
    """Quantizes E experts' [N, K] matrices one at a time on ``pool``.

    Returns ({"weights", "scales", "zero_points"?} in QMoE's raw layout
    (scales float32), relative L2 quantization error of the whole matrix)."""
    per = (K * bits) // 8
    weights = np.empty((E, N, per), np.uint8)
    scales = np.empty((E, N) if block_size == 0 else (E, N, K // block_size), np.float32)
    zps: Optional[np.ndarray] = None
    sq_err = np.zeros(E)
    sq_ref = np.zeros(E)

    def one(e: int) -> Tuple[int, Any]:
        w = get(e)
        if w.shape != (N, K):
            raise ValueError(f"{name}: expert {e}: expected a [{N}, {K}] matrix, got {list(w.shape)}")
        w = np.ascontiguousarray(w, dtype=np.float32)
        try:
            q = qmoe.quantize(w[None], bits=bits, block_size=block_size, symmetric=symmetric)
        except ValueError as err:  # e.g. "w: non-finite value nan at [0, 5, 5]"
            raise ValueError(f"{name}: expert {e} has non-finite weights ({err})") from None
        flat = w.reshape(-1)
        ref = float(np.einsum("i,i->", flat, flat))  # single-threaded (a BLAS dot would start its own threads)
        return e, (q, ref)

    for e, (q, ref) in pool.map(one, range(E)):
        weights[e] = q.weights[0]
        scales[e] = q.scales[0]
        if q.zero_points is not None:
            if zps is None:
                zps = np.empty((E,) + q.zero_points.shape[1:], np.uint8)
            zps[e] = q.zero_points[0]
        sq_ref[e] = ref
        sq_err[e] = (q.rel_l2_error ** 2) * ref
    out = {"weights": weights, "scales": scales}
    if zps is not None:
        out["zero_points"] = zps
    total = float(sq_ref.sum())
    return out, (float(np.sqrt(sq_err.sum() / total)) if total > 0 else 0.0)


def quantize_layer(fc1: ExpertGetter, fc2: ExpertGetter, *, E: int, H: int, I: int, gating: Gating,
                   fc1_bias: Optional[np.ndarray], fc2_bias: Optional[np.ndarray], k: int, normalize: int,
                   bits: int, block_size: int, symmetric: bool, threads: Optional[int], where: str,
                   bias_dtype: Any = np.float32) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], Dict[str, float]]:
    """One MoE layer's experts in QMoE's raw layout.

    ``fc1(e)`` gives expert e's FC1 [N1, H] (N1 = 2I for swiglu, rows as
    ``gating.fusion`` says), ``fc2(e)`` its FC2 [H, I]. Returns (weights
    kwargs of qmoe.Layer, attribute kwargs, {"fc1": rel L2, "fc2": rel L2})."""
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")
    check_block(block_size, {"hidden size": H, "intermediate size": I}, where)
    n1 = 2 * I if gating.activation == "swiglu" else I
    with concurrent.futures.ThreadPoolExecutor(default_threads(threads)) as pool:
        q1, e1 = quantize_matrix(fc1, E, n1, H, bits=bits, block_size=block_size, symmetric=symmetric, pool=pool,
                                 name=f"{where} FC1")
        q2, e2 = quantize_matrix(fc2, E, H, I, bits=bits, block_size=block_size, symmetric=symmetric, pool=pool,
                                 name=f"{where} FC2")
    w: Dict[str, np.ndarray] = {}
    for fc, q in (("fc1", q1), ("fc2", q2)):
        w[f"{fc}_experts_weights"] = q["weights"]
        w[f"{fc}_scales"] = q["scales"]
        if "zero_points" in q:
            w[f"{fc}_zero_points"] = q["zero_points"]
    for fc, b, n in (("fc1", fc1_bias, n1), ("fc2", fc2_bias, H)):
        if b is not None:
            b = np.asarray(b)
            if b.shape != (E, n):
                raise ValueError(f"{where} {fc} bias: expected [{E}, {n}], got {list(b.shape)}")
            w[f"{fc}_experts_bias"] = np.ascontiguousarray(b, dtype=bias_dtype)
    attrs: Dict[str, Any] = dict(k=k, normalize_routing_weights=normalize, expert_weight_bits=bits,
                                 block_size=block_size, **gating.attributes())
    return w, attrs, {"fc1": e1, "fc2": e2}
