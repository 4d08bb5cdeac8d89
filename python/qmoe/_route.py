"""qmoe.route: the library's top-k routing on its own (re-exported as
``qmoe.route``)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from . import _core, _host_arg, _int_attr


def route(router_probs: Any, k: int, normalize_routing_weights: int = 0,
          router_weights: Optional[Any] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The experts a :class:`qmoe.Layer` chooses for each token and their
    mixing weights, computed by the library's own routing, exactly as the CPU
    backend computes them.

    ``router_probs`` [..., E] (router logits) and the optional
    ``router_weights`` (same shape; mix by these instead of the softmax) are
    NumPy arrays or torch CPU tensors, float32, float16 or bfloat16.
    Selection: the k largest logits, ties to the lower index, a NaN logit
    ranks last. Weights: softmax(router_probs) (or router_weights) at the
    chosen experts, in float64, divided by their sum when
    ``normalize_routing_weights``, then rounded to float32.

    Returns ``(experts, weights)``: int32 and float32 arrays [..., k], each
    row in rank order (largest logit first). A wrong argument raises
    ``TypeError`` (dtype) or ``ValueError`` (shape, k), naming it.
    """
    lg = _host_arg(router_probs, "router_probs")
    rw = None if router_weights is None else _host_arg(router_weights, "router_weights")
    normalize = _int_attr(normalize_routing_weights, "normalize_routing_weights")
    if normalize not in (0, 1):
        raise ValueError(f"normalize_routing_weights: expected 0 or 1, got {normalize}")
    return _core.route(lg, _int_attr(k, "k"), bool(normalize), rw)
