"""qmoe.distributed: expert parallelism over a ``torch.distributed`` process group.

:class:`ExpertParallelLayer` is one QMoE layer whose experts are sharded over
the ranks of a process group (gloo on CPUs, NCCL on GPUs): rank r of W holds
the contiguous experts ``[r*E//W, (r+1)*E//W)`` (E need not be a multiple of
W; every rank needs at least one expert). Every rank calls the layer with its
own tokens (any count, 0 included, different per rank); a call

1. gathers the ranks' token counts (and checks every rank's arguments, so a
   bad argument on one rank raises on every rank instead of hanging the
   others),
2. routes the rank's tokens with the library's routing (:func:`qmoe.route`,
   on the host),
3. sends each (token, chosen expert) row to the rank owning the expert
   (``all_to_all_single`` with uneven splits),
4. runs the rank's experts on the rows it received with a local
   :class:`qmoe.Layer` holding only those experts (k = 1, each row routed to
   its expert with weight exactly 1.0, so the layer returns the expert's
   ``FC2 output + FC2 bias``),
5. sends the results back (``all_to_all_single``) and combines them per token
   in ascending expert order, ``out = 0 + w_0 * y_0``, ``out = out + w_j * y_j``
   in float32, as the CPU layer's combine does.

Results on the CPU (gloo): each rank's output is bit for bit the output of a
single-device CPU :class:`qmoe.Layer` (same attributes, ``accuracy_level``)
run on the concatenation of every rank's tokens in rank order. The CPU layer's
arithmetic depends on how many tokens each expert gets per call and it works
in chunks of ``max(1, 64 MiB // (k * (I + H) * 4))`` tokens, so the exchange
runs per chunk of that global concatenation and each expert receives its rows
in global token order: every expert sees exactly the rows the single layer
would give it.

Results on CUDA (NCCL; tensors on ``cuda:<local rank>``): the same code, with
a CUDA local layer. The CUDA layer rounds each expert's ``FC2 output + bias``
to the activation dtype (float16 / bfloat16) before this combine, so results
are deterministic (same bits run to run, whatever the world size splits) but
not bit-equal to a single CUDA layer; they are within the CUDA layer's error
bounds. The GPU path has not been run by the tests (no multi-GPU CI).

Costs per call: one all-gather of three integers, then per chunk (one chunk on
CUDA) three all-to-alls (per-expert counts, rows, results); the rows travel in
the input's dtype, the results in float32 on the CPU and in the activation
dtype on CUDA. Routing runs on the host (on CUDA the router logits are copied
to the host: one synchronisation per call).

Importing this module imports torch; ``import qmoe`` alone never does.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

import qmoe

from . import _ATTR_DEFAULTS, _WEIGHT_NAMES, _int_attr

__all__ = ["ExpertParallelLayer", "expert_range", "cpu_chunk_tokens"]

# The CPU layer's per-call working-memory budget (src/cpu/moe.h kDefaultChunkBytes):
# tokens per chunk = max(1, budget // (k * (I + H) * 4)).
_CPU_CHUNK_BYTES = 64 << 20

_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def expert_range(num_experts: int, world_size: int, rank: int) -> Tuple[int, int]:
    """The experts ``[first, end)`` rank ``rank`` of ``world_size`` holds:
    contiguous ranges, ``first = rank * E // W``, sizes differing by at most one."""
    return rank * num_experts // world_size, (rank + 1) * num_experts // world_size


def cpu_chunk_tokens(k: int, hidden_size: int, inter_size: int) -> int:
    """Tokens per chunk of the CPU layer (its call splits longer inputs; results
    depend on the chunking, which is why the exchange follows it)."""
    return max(1, _CPU_CHUNK_BYTES // (k * (inter_size + hidden_size) * 4))


class ExpertParallelLayer:
    """One QMoE layer with its experts sharded over a process group.

    Build it on every rank of ``group`` (``None``: the default group) with the
    same arguments, from the full raw weights (each rank keeps only its
    experts' slice; the arrays passed in are not referenced afterwards)::

        layer = qmoe.distributed.ExpertParallelLayer(
            fc1_experts_weights=w1, fc1_scales=s1, fc2_experts_weights=w2, fc2_scales=s2,
            k=4, activation_type="swiglu", swiglu_fusion=1, block_size=32, threads=4)
        y = layer(x, router_logits)      # every rank, its own tokens

    or from a qmoe file, reading only the rank's experts
    (:meth:`from_file`). The weight and attribute arguments are
    :class:`qmoe.Layer`'s (ONNX Runtime's names); ``threads`` and
    ``accuracy_level`` apply to the rank's local layer; ``device`` is ``"cpu"``
    (gloo) or ``"cuda:N"`` (NCCL; N is usually the local rank), ``max_tokens``
    sizes the CUDA local layer's passes.

    Construction is collective: the ranks check that they agree on the
    layer's shape and attributes. Raises ``ValueError`` naming the argument
    (e.g. ``group`` with fewer experts than ranks).
    """

    def __init__(self, fc1_experts_weights=None, fc1_scales=None, fc1_experts_bias=None,
                 fc2_experts_weights=None, fc2_scales=None, fc2_experts_bias=None,
                 fc3_experts_weights=None, fc3_scales=None, fc3_experts_bias=None,
                 fc1_zero_points=None, fc2_zero_points=None, fc3_zero_points=None,
                 *, group: Optional[Any] = None, device: Any = "cpu", threads: Optional[int] = None,
                 accuracy_level: int = 0, max_tokens: int = 4096, **attributes: Any):
        unknown = set(attributes) - set(_ATTR_DEFAULTS)
        if unknown:
            raise TypeError(f"ExpertParallelLayer: unknown arguments {sorted(unknown)}")
        weights = dict(
            fc1_experts_weights=fc1_experts_weights, fc1_scales=fc1_scales, fc1_experts_bias=fc1_experts_bias,
            fc2_experts_weights=fc2_experts_weights, fc2_scales=fc2_scales, fc2_experts_bias=fc2_experts_bias,
            fc3_experts_weights=fc3_experts_weights, fc3_scales=fc3_scales, fc3_experts_bias=fc3_experts_bias,
            fc1_zero_points=fc1_zero_points, fc2_zero_points=fc2_zero_points, fc3_zero_points=fc3_zero_points)
        if fc1_experts_weights is None:
            raise ValueError("fc1_experts_weights: required")
        num_experts = int(np.shape(fc1_experts_weights)[0]) if np.ndim(fc1_experts_weights) else 0
        attrs = {a: attributes.get(a, d) for a, d in _ATTR_DEFAULTS.items()}
        rank, world = _group_rank_size(group)
        first, end = _checked_range(num_experts, world, rank)
        local: Dict[str, Any] = {}
        for name in _WEIGHT_NAMES:
            v = weights[name]
            if v is None:
                continue
            if np.ndim(v) < 1 or np.shape(v)[0] != num_experts:
                raise ValueError(f"{name}: expected [E = {num_experts}, ...] like fc1_experts_weights, "
                                 f"got shape {tuple(np.shape(v))}")
            local[name] = v[first:end]
        layer = qmoe.Layer(**local, **_local_attributes(attrs), threads=threads, accuracy_level=accuracy_level,
                           device=device, max_tokens=max_tokens)
        self._setup(layer, attrs, num_experts, group, first, end)

    @classmethod
    def from_file(cls, path: "str | os.PathLike[str]", layer_name: str, *, group: Optional[Any] = None,
                  device: Any = "cpu", threads: Optional[int] = None, accuracy_level: int = 0,
                  max_tokens: int = 4096) -> "ExpertParallelLayer":
        """The layer ``layer_name`` of a qmoe file, each rank loading only its
        experts from the memory map (about the shard's packed bytes of
        memory per rank). Collective, like the constructor."""
        f = qmoe.open(path)
        if layer_name not in f.layers:
            raise ValueError(f"{os.fspath(path)}: no layer {layer_name!r} (the file has {list(f.layers)})")
        info = f.layers[layer_name]
        rank, world = _group_rank_size(group)
        first, end = _checked_range(info.num_experts, world, rank)
        layer = f.load(layer_name, device=device, threads=threads, accuracy_level=accuracy_level,
                       max_tokens=max_tokens, experts=(first, end), k=1, normalize_routing_weights=1)
        self = cls.__new__(cls)
        self._setup(layer, dict(info.attributes), info.num_experts, group, first, end)
        return self

    def _setup(self, layer: qmoe.Layer, attrs: Dict[str, Any], num_experts: int, group: Optional[Any],
               first: int, end: int) -> None:
        self._group = group
        self._rank, self._world = _group_rank_size(group)
        self._layer = layer
        self._attrs = dict(attrs)
        self._k = _int_attr(attrs["k"], "k")
        self._normalize = _int_attr(attrs["normalize_routing_weights"], "normalize_routing_weights")
        self._num_experts = num_experts
        self._first, self._end = first, end
        self._bounds = [expert_range(num_experts, self._world, r) for r in range(self._world)]
        self._hidden = layer.hidden_size
        self._inter = layer.inter_size
        self._device = torch.device(layer.device)
        if not 1 <= self._k <= num_experts:
            raise ValueError(f"k: expected 1..{num_experts} (the layer's experts), got {self._k}")
        # Every rank must describe the same layer (else the exchange would be garbage or hang).
        mine = torch.tensor([num_experts, self._hidden, self._inter, self._k, self._normalize,
                             _attributes_hash(self._attrs)], dtype=torch.int64, device=self._device)
        every = [torch.empty_like(mine) for _ in range(self._world)]
        dist.all_gather(every, mine, group=group)
        names = ("num_experts", "hidden_size", "inter_size", "k", "normalize_routing_weights", "attributes")
        for r, theirs in enumerate(every):
            for i, (a, b) in enumerate(zip(mine.tolist(), theirs.tolist())):
                if a != b:
                    raise ValueError(f"group: rank {r} built the layer with another {names[i]} "
                                     f"({b if i < 5 else 'differing'}) than rank {self._rank} "
                                     f"({a if i < 5 else self._attrs})")
        self._times: Dict[str, float] = {}
        self._chunk = (cpu_chunk_tokens(self._k, self._hidden, self._inter) if layer.backend == "cpu"
                       else None)

    # ------------------------------------------------------------------ properties

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Ranks in the group."""
        return self._world

    @property
    def experts(self) -> Tuple[int, int]:
        """The experts ``[first, end)`` this rank holds."""
        return self._first, self._end

    @property
    def num_experts(self) -> int:
        """E, the whole layer's experts."""
        return self._num_experts

    @property
    def hidden_size(self) -> int:
        """H."""
        return self._hidden

    @property
    def inter_size(self) -> int:
        """I."""
        return self._inter

    @property
    def attributes(self) -> Dict[str, Any]:
        """The whole layer's attributes, by ONNX Runtime name."""
        return dict(self._attrs)

    @property
    def local_layer(self) -> qmoe.Layer:
        """The :class:`qmoe.Layer` of this rank's experts (k = 1)."""
        return self._layer

    @property
    def last_call_seconds(self) -> Dict[str, float]:
        """Host wall time of the last call by phase: ``gather`` (token counts and
        argument checks, which also waits for the slowest rank to arrive),
        ``route``, ``all_to_all`` (the three exchanges of every chunk),
        ``experts`` (the local layer), ``combine``, and ``total``. On CUDA the
        phases only enqueue work (synchronise to time them)."""
        return dict(self._times)

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"``."""
        return self._layer.device

    def __repr__(self) -> str:
        return (f"qmoe.distributed.ExpertParallelLayer(rank={self._rank}/{self._world}, "
                f"experts=[{self._first}, {self._end}) of {self._num_experts}, hidden_size={self._hidden}, "
                f"inter_size={self._inter}, k={self._k}, device={self.device!r})")

    # ------------------------------------------------------------------ the call

    def __call__(self, input: torch.Tensor, router_logits: torch.Tensor,
                 router_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer on this rank's tokens: ``input`` [T, H] or [..., H],
        ``router_logits`` [T, E] (the whole layer's E; [..., E]), optional
        ``router_weights`` like ``router_logits`` (experts chosen by the logits,
        mixed by these). torch tensors, float32 / float16 / bfloat16 on the CPU
        (float16 / bfloat16 on CUDA), on the layer's device; every rank must
        use the same input dtype. Returns the input's shape and dtype.

        Collective: every rank of the group must call it (with 0 tokens if it
        has none). A bad argument on any rank raises ``ValueError`` /
        ``TypeError`` on every rank (naming the argument on that rank, the rank
        elsewhere) before any data is exchanged."""
        start = time.perf_counter()
        self._times = dict.fromkeys(("gather", "route", "all_to_all", "experts", "combine"), 0.0)
        error = self._check(input, router_logits, router_weights)
        t = int(input.reshape(-1, input.shape[-1]).shape[0]) if error is None else 0
        code = 0 if error is None else 1
        mine = torch.tensor([t, code, _DTYPE_CODES.get(getattr(input, "dtype", None), 0)], dtype=torch.int64,
                            device=self._device)
        every = [torch.empty_like(mine) for _ in range(self._world)]
        dist.all_gather(every, mine, group=self._group)
        table = torch.stack(every).cpu().tolist()
        self._times["gather"] = time.perf_counter() - start
        if error is not None:
            raise error
        bad = [r for r, row in enumerate(table) if row[1]]
        if bad:
            raise ValueError(f"ExpertParallelLayer: rank(s) {bad} refused their arguments (see the error there); "
                             f"nothing was computed")
        dtypes = {row[2] for row in table}
        if len(dtypes) > 1:
            raise TypeError(f"input: the ranks' dtypes differ (rank {self._rank}: {input.dtype}); every rank "
                            f"must use the same dtype")
        counts = [row[0] for row in table]
        offset, total = sum(counts[:self._rank]), sum(counts)

        shape = input.shape
        x = input.detach().reshape(t, self._hidden).contiguous()
        lg = router_logits.detach().reshape(t, self._num_experts)
        rw = None if router_weights is None else router_weights.detach().reshape(t, self._num_experts)
        mark = time.perf_counter()
        experts, weights = qmoe.route(lg.cpu(), self._k, self._normalize, None if rw is None else rw.cpu())
        self._times["route"] = time.perf_counter() - mark
        out = torch.empty((t, self._hidden), dtype=torch.float32, device=self._device)
        chunk = self._chunk or max(total, 1)
        for c0 in range(0, total, chunk):
            lo = min(max(c0 - offset, 0), t)
            hi = min(max(c0 + chunk - offset, 0), t)
            out[lo:hi] = self._exchange(x[lo:hi], experts[lo:hi], weights[lo:hi])
        result = out.to(input.dtype).reshape(shape)
        self._times["total"] = time.perf_counter() - start
        return result

    forward = __call__

    def _check(self, input: Any, router_logits: Any, router_weights: Any) -> Optional[Exception]:
        """This rank's argument error (not raised yet: the other ranks must hear of it first)."""
        for name, v in (("input", input), ("router_logits", router_logits), ("router_weights", router_weights)):
            if v is None and name == "router_weights":
                continue
            if not isinstance(v, torch.Tensor):
                return TypeError(f"{name}: expected a torch tensor, got {type(v).__name__}")
            if v.device != self._device:
                return ValueError(f"{name}: expected a tensor on {self._device} (the layer's device), got {v.device}")
            if v.dtype not in _DTYPE_CODES:
                return TypeError(f"{name}: expected float32, float16 or bfloat16, got {v.dtype}")
            if v.dim() < 1:
                return ValueError(f"{name}: expected a tensor with at least one dimension, got a scalar")
        if input.shape[-1] != self._hidden:
            return ValueError(f"input: expected [..., H = {self._hidden}], got {tuple(input.shape)}")
        if self._device.type == "cuda" and input.dtype == torch.float32:
            return TypeError("input: the CUDA backend takes float16 or bfloat16 activations, got float32")
        lead = tuple(input.shape[:-1])
        want = lead + (self._num_experts,)
        if tuple(router_logits.shape) != want:
            return ValueError(f"router_logits: expected {want} (the input's tokens x the layer's "
                              f"{self._num_experts} experts), got {tuple(router_logits.shape)}")
        if router_weights is not None and tuple(router_weights.shape) != want:
            return ValueError(f"router_weights: expected {want} like router_logits, got {tuple(router_weights.shape)}")
        return None

    def _exchange(self, x: torch.Tensor, experts: np.ndarray, weights: np.ndarray) -> torch.Tensor:
        """One chunk: this rank's n tokens (rows of the global chunk, maybe none)
        out to the experts' ranks, the rows that came in through the local
        layer, the results back, combined. Returns float32 [n, H]."""
        n, k, h, world = x.shape[0], self._k, self._hidden, self._world
        flat = experts.reshape(-1).astype(np.int64)  # row i * k + j: token i's j-th expert
        # Rows in (expert, token) order: experts are contiguous by rank, so this is
        # (destination rank, expert, token), and a token has each expert at most once.
        order = np.argsort(flat, kind="stable")
        per_expert = np.bincount(flat, minlength=self._num_experts)
        send_rows = [int(per_expert[a:b].sum()) for a, b in self._bounds]
        local_e = self._end - self._first
        mark = time.perf_counter()
        recv_counts = torch.empty(world * local_e, dtype=torch.int64, device=self._device)
        dist.all_to_all_single(recv_counts, torch.from_numpy(per_expert).to(self._device),
                               output_split_sizes=[local_e] * world,
                               input_split_sizes=[b - a for a, b in self._bounds], group=self._group)
        recv_per = recv_counts.cpu().numpy()
        self._times["all_to_all"] += time.perf_counter() - mark  # [world, local_e]: rows from rank s for local expert e
        recv_rows = [int(v) for v in recv_per.reshape(world, local_e).sum(axis=1)]
        rows = sum(recv_rows)
        index = torch.from_numpy(order // k).to(self._device)
        sent = x.index_select(0, index)
        got = torch.empty((rows, h), dtype=x.dtype, device=self._device)
        mark = time.perf_counter()
        dist.all_to_all_single(got, sent, output_split_sizes=recv_rows, input_split_sizes=send_rows,
                               group=self._group)
        self._times["all_to_all"] += time.perf_counter() - mark
        mark = time.perf_counter()
        # The rows came as (source rank, expert, token): for each expert its rows are in
        # global token order, as the single layer's plan orders them.
        cpu = self._device.type == "cpu"
        result_dtype = torch.float32 if cpu else x.dtype
        if rows:
            ids = torch.from_numpy(np.repeat(np.tile(np.arange(local_e), world), recv_per)).to(self._device)
            act = got.float() if cpu else got  # the CPU layer computes float32 outputs from float32 inputs
            logits = torch.full((rows, local_e), float("-inf"), dtype=act.dtype, device=self._device)
            logits.scatter_(1, ids.view(-1, 1), 0.0)  # softmax of the row's own expert: exactly 1.0
            y = self._layer(act, logits)
        else:
            y = torch.empty((0, h), dtype=result_dtype, device=self._device)
        back = torch.empty((n * k, h), dtype=result_dtype, device=self._device)
        self._times["experts"] += time.perf_counter() - mark
        mark = time.perf_counter()
        dist.all_to_all_single(back, y.contiguous(), output_split_sizes=send_rows, input_split_sizes=recv_rows,
                               group=self._group)
        self._times["all_to_all"] += time.perf_counter() - mark
        mark = time.perf_counter()
        # back[p] is row order[p]; put them back as [token, slot] with slots by ascending expert.
        by_expert = np.argsort(experts, axis=1, kind="stable")  # [n, k]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        pos = inverse.reshape(n, k)
        pos_sorted = np.take_along_axis(pos, by_expert, axis=1)
        w_sorted = torch.from_numpy(np.ascontiguousarray(np.take_along_axis(weights, by_expert, axis=1)))
        w_sorted = w_sorted.to(self._device)
        pos_t = torch.from_numpy(np.ascontiguousarray(pos_sorted)).to(self._device)
        acc = torch.zeros((n, h), dtype=torch.float32, device=self._device)
        for j in range(k):
            v = back.index_select(0, pos_t[:, j]).float()
            # Two roundings, multiply then add (no fused multiply-add), like the CPU combine.
            acc = acc + w_sorted[:, j:j + 1] * v
        self._times["combine"] += time.perf_counter() - mark
        return acc


def _group_rank_size(group: Optional[Any]) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call torch.distributed.init_process_group "
                         "first; world size 1 works too)")
    return dist.get_rank(group), dist.get_world_size(group)


def _checked_range(num_experts: int, world: int, rank: int) -> Tuple[int, int]:
    if num_experts < world:
        raise ValueError(f"group: the layer has {num_experts} experts, fewer than the group's {world} ranks "
                         f"(every rank must hold at least one expert)")
    return expert_range(num_experts, world, rank)


def _local_attributes(attrs: Dict[str, Any]) -> Dict[str, Any]:
    """The local layer's attributes: the layer's, routing to one expert with weight 1."""
    local = dict(attrs)
    local["k"] = 1
    local["normalize_routing_weights"] = 1
    return local


def _attributes_hash(attrs: Dict[str, Any]) -> int:
    """A stable 63-bit digest of the attributes (compared across ranks)."""
    text = repr(sorted((k, str(np.float32(v)) if isinstance(v, float) else str(v)) for k, v in attrs.items()))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1

