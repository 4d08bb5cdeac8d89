"""Which experts of a CUDA layer stay in host memory (Layer's expert_placement /
gpu_memory_budget / expert_frequency arguments)."""
from __future__ import annotations

import math
import operator
from typing import Any, List

import numpy as np


def host_experts(backend: str, num_experts: int, expert_bytes: float, expert_placement: Any,
                 gpu_memory_budget: Any, expert_frequency: Any) -> List[int]:
    """The experts a CUDA layer keeps in host memory (ascending ids), from
    ``expert_placement`` or from ``gpu_memory_budget`` (+ ``expert_frequency``)."""
    if expert_placement is None and gpu_memory_budget is None:
        if expert_frequency is not None:
            raise ValueError("expert_frequency: only with gpu_memory_budget")
        return []
    if backend != "cuda":
        raise ValueError("expert_placement / gpu_memory_budget: only for a CUDA layer (device='cuda'); "
                         "a CPU layer keeps every expert in host memory")
    if expert_placement is not None:
        if gpu_memory_budget is not None or expert_frequency is not None:
            raise ValueError("expert_placement: give it or gpu_memory_budget (+ expert_frequency), not both")
        if isinstance(expert_placement, (str, bytes)):
            raise ValueError(f"expert_placement: expected one 'cuda' or 'cpu' per expert (a sequence), "
                             f"got the string {expert_placement!r}")
        places = [str(p) for p in expert_placement]
        if len(places) != num_experts:
            raise ValueError(f"expert_placement: expected {num_experts} entries (one per expert), got {len(places)}")
        host = []
        for e, p in enumerate(places):
            if p in ("cpu", "host"):
                host.append(e)
            elif p not in ("cuda", "gpu") and not p.startswith("cuda:"):
                raise ValueError(f"expert_placement[{e}]: expected 'cuda' or 'cpu', got {p!r}")
        return host
    budget = _budget(gpu_memory_budget)
    if not budget >= 0:
        raise ValueError(f"gpu_memory_budget: expected bytes >= 0, got {gpu_memory_budget!r}")
    if expert_frequency is None:
        freq = np.ones(num_experts)
    else:
        freq = np.asarray(expert_frequency, dtype=np.float64).reshape(-1)
        if freq.shape[0] != num_experts or not np.all(np.isfinite(freq)) or np.any(freq < 0):
            raise ValueError(f"expert_frequency: expected {num_experts} finite values >= 0, got "
                             f"{freq.shape[0]} values")
    # The most frequent experts on the GPU while they fit (ties: lower id first).
    order = sorted(range(num_experts), key=lambda e: (-freq[e], e))
    on_gpu = int(min(num_experts, budget // max(expert_bytes, 1.0)))
    return sorted(order[on_gpu:])



def _budget(v: Any) -> float:
    try:
        b = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"gpu_memory_budget: expected bytes >= 0, got {v!r}") from None
    if math.isnan(b):
        raise ValueError(f"gpu_memory_budget: expected bytes >= 0, got {v!r}")
    return b


def gpu_from(v: Any) -> int:
    """``host_experts_gpu_from`` for the core: ``"auto"`` -> -1 (measured), else tokens >= 0."""
    if isinstance(v, str):
        if v != "auto":
            raise ValueError(f"host_experts_gpu_from: expected tokens >= 0 (0 = never) or 'auto', got {v!r}")
        return -1
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"host_experts_gpu_from: expected an integer or 'auto', got {v!r}") from None
    if not 0 <= i < 2 ** 31:
        raise ValueError(f"host_experts_gpu_from: expected tokens >= 0 (0 = never) or 'auto', got {i}")
    return i
