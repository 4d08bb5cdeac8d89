"""qmoe.torch: qmoe layers as PyTorch modules and one custom operator (inference only).

* :class:`QmoeMoE` -- a ``torch.nn.Module`` around a :class:`qmoe.Layer`:
  ``forward(input, router_probs, router_weights=None)`` computes the QMoE
  operator (router logits in, experts chosen and mixed by the layer).
* :class:`QmoeExperts` -- a drop-in for the "experts" module of transformers
  v5 MoE blocks: ``forward(hidden_states, top_k_index, top_k_weights)``, the
  routing already decided by the model's own router.

Both call one custom operator, ``torch.ops.qmoe.moe(input, router_probs,
router_weights, layer_id)``. A module registers its layer in a process-wide
table under a fresh integer id when it is built, and the entry goes away when
the module is garbage-collected; the operator looks the layer up by that id.
The operator has a fake (meta) implementation that returns
``torch.empty_like(input)``, so ``torch.compile`` (``fullgraph=True`` too)
traces a whole qmoe layer as a single opaque node, and on CUDA the call only
enqueues work on ``torch.cuda.current_stream()``, so it can be captured in a
CUDA graph (``torch.cuda.CUDAGraph``, ``mode="reduce-overhead"``). Graphs
hold the id, not the layer: they are only valid in this process, while the
module lives.

Devices: a CPU layer takes torch CPU tensors (float32, float16 or
bfloat16); a CUDA layer takes tensors on its own device (float16 or
bfloat16). All activations of one call have the input's dtype. Wrong devices
raise ``ValueError``, wrong dtypes ``TypeError``, both naming the argument
and the expected and actual values.

No autograd (inference only). A forward pass with tensors that require grad
is allowed (so a model called without ``torch.no_grad()`` still runs) and
the output is attached to the graph, but back-propagating through it raises
``RuntimeError``; under ``torch.compile`` the error comes when the backward
runs. Run inference under ``torch.no_grad()`` or ``torch.inference_mode()``.

Importing this module imports torch; ``import qmoe`` alone never does.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch  # the real torch: absolute import, this module is qmoe.torch

import qmoe

__all__ = ["QmoeMoE", "QmoeExperts", "moe", "registered_layer"]

# --------------------------------------------------------------------------- the layer registry

_LAYERS: Dict[int, qmoe.Layer] = {}
_NEXT_ID = itertools.count(1)
_LOCK = threading.Lock()


def _register(owner: object, layer: qmoe.Layer) -> int:
    """Puts ``layer`` in the registry under a new id, dropped when ``owner`` is collected."""
    with _LOCK:
        layer_id = next(_NEXT_ID)
        _LAYERS[layer_id] = layer
    # The callback must not hold `owner`: it gets the id and the dict's pop only.
    weakref.finalize(owner, _LAYERS.pop, layer_id, None)
    return layer_id


def registered_layer(layer_id: int) -> qmoe.Layer:
    """The :class:`qmoe.Layer` registered under ``layer_id`` (``ValueError`` when there is none)."""
    layer = _LAYERS.get(layer_id)
    if layer is None:
        raise ValueError(f"layer_id: no qmoe layer is registered under {layer_id} (the module that owned it "
                         f"was garbage-collected, or the id comes from another process)")
    return layer


# --------------------------------------------------------------------------- the custom operator

def _moe_impl(input: torch.Tensor, router_probs: torch.Tensor, router_weights: Optional[torch.Tensor],
              layer_id: int) -> torch.Tensor:
    # qmoe.Layer returns a new tensor (never an alias of an argument): on the
    # CPU computed synchronously, on CUDA enqueued on the current stream.
    return registered_layer(layer_id)(input, router_probs, router_weights)


moe = torch.library.custom_op(
    "qmoe::moe", _moe_impl, mutates_args=(),
    schema="(Tensor input, Tensor router_probs, Tensor? router_weights, int layer_id) -> Tensor")
moe.__doc__ = """``torch.ops.qmoe.moe(input, router_probs, router_weights, layer_id)``: the QMoE
operator of the layer registered under ``layer_id`` (see the module's docstring). Arguments are passed
to :meth:`qmoe.Layer.__call__` unchanged; prefer :class:`QmoeMoE`, which checks them first."""


@moe.register_fake
def _moe_fake(input: torch.Tensor, router_probs: torch.Tensor, router_weights: Optional[torch.Tensor],
              layer_id: int) -> torch.Tensor:
    return torch.empty_like(input, memory_format=torch.contiguous_format)


_NO_GRAD_MESSAGE = ("qmoe::moe has no gradient (qmoe is inference only): run the model under torch.no_grad() or "
                    "torch.inference_mode(), or keep qmoe layers out of the part you train")


def _no_backward_impl(grad: torch.Tensor, size: List[int]) -> torch.Tensor:
    raise RuntimeError(_NO_GRAD_MESSAGE)


# The backward of qmoe::moe computes each tensor argument's gradient with this
# operator, which raises when it runs. As an operator with a fake
# implementation it lets torch.compile trace a backward graph, so compiled and
# eager code fail alike: when the backward runs, not while the forward is
# compiled or run. One call per gradient, so that the gradient torch.compile
# keeps (say, only the router's) still raises.
_no_backward = torch.library.custom_op("qmoe::moe_no_backward", _no_backward_impl, mutates_args=(),
                                       schema="(Tensor grad, SymInt[] size) -> Tensor")


@_no_backward.register_fake
def _no_backward_fake(grad: torch.Tensor, size: List[int]) -> torch.Tensor:
    return grad.new_empty(size)


def _moe_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.sizes = [None if t is None else list(t.shape) for t in inputs[:3]]


def _moe_backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    grads = [None if size is None or not needed else _no_backward(grad, size)
             for size, needed in zip(ctx.sizes, ctx.needs_input_grad)]
    return grads[0], grads[1], grads[2], None


moe.register_autograd(_moe_backward, setup_context=_moe_setup_context)

# --------------------------------------------------------------------------- argument checks

_HOST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _expect_tensor(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__module__}.{type(t).__qualname__}")
    return t


def _expect_device(t: torch.Tensor, name: str, device: torch.device, why: str) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} ({why}), got one on {t.device}")


class _Wrapper(torch.nn.Module):
    """What QmoeMoE and QmoeExperts share: the layer, its registry id, input checks, copies."""

    def __init__(self, layer: qmoe.Layer):
        super().__init__()
        if not isinstance(layer, qmoe.Layer):
            raise TypeError(f"layer: expected a qmoe.Layer, got {type(layer).__module__}.{type(layer).__qualname__}")
        self.layer = layer
        self._layer_id = _register(self, layer)
        # Plain Python values for forward(): torch.compile reads them as
        # constants, where a call into the extension would break the graph.
        self._device = torch.device(layer.device)
        self._backend: str = layer.backend
        self._hidden: int = layer.hidden_size
        self._experts: int = layer.num_experts
        self._k: int = layer.attributes["k"]

    @property
    def layer_id(self) -> int:
        """The id under which this module's layer is registered (the operator's ``layer_id``)."""
        return self._layer_id

    def _check_input(self, input: torch.Tensor, name: str) -> torch.Tensor:
        """Checks the activations' device, dtype and last dimension; returns them as [T, H]."""
        _expect_tensor(input, name)
        _expect_device(input, name, self._device, "the qmoe layer's device")
        allowed = _HOST_DTYPES if self._backend == "cpu" else _CUDA_DTYPES
        if input.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{name}: expected dtype {names} (qmoe's {self._backend} backend), got {input.dtype}")
        H = self._hidden
        if input.dim() == 0 or input.shape[-1] != H:
            raise ValueError(f"{name}: expected shape [..., {H}] (hidden_size {H}), got {list(input.shape)}")
        return input.reshape(-1, H)

    def _rows(self, t: torch.Tensor, name: str, T: int, width: int, what: str) -> torch.Tensor:
        """``t`` of shape [..., width] with T rows in all, as [T, width]."""
        if t.dim() == 0 or t.shape[-1] != width or t.numel() != T * width:
            raise ValueError(f"{name}: expected shape [..., {width}] ({what}) with {T} rows like input, "
                             f"got {list(t.shape)}")
        return t.reshape(T, width)

    def _copy(self, memo: Optional[Dict[int, Any]]) -> "_Wrapper":
        # A copy shares the immutable Layer but gets its own registry entry, so
        # that it keeps working after the original is collected.
        cls = type(self)
        new = cls.__new__(cls)
        if memo is None:
            new.__dict__.update(self.__dict__)
            for key in ("_parameters", "_buffers", "_modules"):
                new.__dict__[key] = dict(self.__dict__[key])
        else:
            memo[id(self)] = new
            memo[id(self.layer)] = self.layer
            for key, value in self.__dict__.items():
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._layer_id = _register(new, self.layer)
        return new

    def __copy__(self) -> "_Wrapper":
        return self._copy(None)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Wrapper":
        return self._copy(memo)

    def extra_repr(self) -> str:
        lay = self.layer
        a = lay.attributes
        return (f"experts={lay.num_experts}, hidden={lay.hidden_size}, inter={lay.inter_size}, "
                f"bits={a['expert_weight_bits']}, block={a['block_size']}, activation={a['activation_type']!r}, "
                f"k={a['k']}, backend={lay.backend!r}, device={lay.device!r}")


# --------------------------------------------------------------------------- modules

class QmoeMoE(_Wrapper):
    """The QMoE operator of a :class:`qmoe.Layer` as a ``torch.nn.Module``.

    ``forward(input, router_probs, router_weights=None)``: ``input``
    [..., H]; ``router_probs`` the router logits, [T, E] or [..., E] with T
    rows in all (T = the number of input rows); optional ``router_weights``
    shaped like ``router_probs``: experts are chosen by the top k of
    ``router_probs`` and mixed by ``router_weights`` instead of the softmax.
    Returns a new tensor with the input's shape and dtype, on its device.
    The layer's attributes (k, activation, normalization) apply.

    A CPU layer takes CPU tensors, a CUDA layer tensors on its device; see the
    module's docstring for dtypes, errors, ``torch.compile`` and CUDA graphs.
    Inference only: no gradient flows through the module.
    """

    def __init__(self, layer: qmoe.Layer):
        super().__init__(layer)

    def forward(self, input: torch.Tensor, router_probs: torch.Tensor,
                router_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self._check_input(input, "input")
        T, E = x.shape[0], self._experts
        args = []
        for name, t in (("router_probs", router_probs), ("router_weights", router_weights)):
            if t is None:
                args.append(None)
                continue
            _expect_tensor(t, name)
            _expect_device(t, name, input.device, "the same as input")
            if t.dtype != input.dtype:
                raise TypeError(f"{name}: expected dtype {input.dtype} (the same as input), got {t.dtype}")
            args.append(self._rows(t, name, T, E, f"num_experts {E}"))
        y = moe(x, args[0], args[1], self._layer_id)
        return y.reshape(input.shape)


class QmoeExperts(_Wrapper):
    """A drop-in for the "experts" module of transformers v5 MoE blocks.

    ``forward(hidden_states, top_k_index, top_k_weights)``: ``hidden_states``
    [T, H] (or [..., H]), ``top_k_index`` [T, k] integer expert ids and
    ``top_k_weights`` [T, k] their weights, as the model's router computed
    them. Returns [T, H] (the input's shape and dtype)::

        out[t] = sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden_states[t])

    It builds, with tensor operations only (no Python loop over tokens, no
    host synchronisation, so CUDA graphs can capture it), ``router_probs``
    [T, E] = 1 at the chosen experts and 0 elsewhere, and ``router_weights``
    [T, E] = ``top_k_weights`` scattered to the same places (summed for a
    repeated id; cast to the input's dtype, which the layer requires), and
    calls the layer's QMoE with both. This is exact: a row of
    ``router_probs`` holds exactly k ones, so the layer's top-k of it is the
    chosen set, and with ``normalize_routing_weights=0`` the layer mixes the
    experts with ``router_weights`` as given (no softmax, no renormalization).
    The only rounding added is ``top_k_weights`` cast to the input's dtype.

    An id equal to E (the sentinel transformers' expert parallelism uses for
    "no expert") contributes nothing: the row then has fewer ones, and the
    experts the layer's top-k adds get weight 0. Ids outside 0..E are an
    error (on CUDA, a device-side assertion: nothing is checked on the host).

    The layer must have ``normalize_routing_weights=0``, unless
    ``normalized=True`` says the router's ``top_k_weights`` of each token
    already sum to 1 (softmax over the chosen experts, as Mixtral's or
    gpt-oss's routers give): the layer's renormalization then divides by that
    sum, changing the weights by rounding only. This lets a layer stored with
    the model's own routing attributes (a converted file: router_probs alone
    reproduce the routing) also serve a model's router. Its ``k`` must equal
    ``top_k`` (when given) and, at each call, ``top_k_index.shape[-1]``;
    ``ValueError`` otherwise. Inference only, like :class:`QmoeMoE`.
    """

    def __init__(self, layer: qmoe.Layer, top_k: Optional[int] = None, normalized: bool = False):
        super().__init__(layer)
        a = layer.attributes
        if a["normalize_routing_weights"] != 0 and not normalized:
            raise ValueError("layer: QmoeExperts needs a layer with normalize_routing_weights=0 (it mixes the experts "
                             "with the given top_k_weights as they are), got normalize_routing_weights="
                             f"{a['normalize_routing_weights']} (pass normalized=True if the router's weights "
                             "already sum to 1 per token)")
        if top_k is not None and top_k != a["k"]:
            raise ValueError(f"top_k: the model routes each token to {top_k} experts, but the layer was built with "
                             f"k={a['k']}")

    @property
    def top_k(self) -> int:
        """k, the experts per token."""
        return self._k

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x = self._check_input(hidden_states, "hidden_states")
        T, E, k = x.shape[0], self._experts, self._k
        _expect_tensor(top_k_index, "top_k_index")
        _expect_tensor(top_k_weights, "top_k_weights")
        _expect_device(top_k_index, "top_k_index", hidden_states.device, "the same as hidden_states")
        _expect_device(top_k_weights, "top_k_weights", hidden_states.device, "the same as hidden_states")
        if top_k_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"top_k_index: expected dtype int64 or int32, got {top_k_index.dtype}")
        if not top_k_weights.is_floating_point():
            raise TypeError(f"top_k_weights: expected a floating-point dtype, got {top_k_weights.dtype}")
        if top_k_index.dim() == 0 or top_k_index.shape[-1] != k:
            raise ValueError(f"top_k_index: expected shape [..., {k}] (the layer's k={k} experts per token), "
                             f"got {list(top_k_index.shape)}")
        idx = self._rows(top_k_index, "top_k_index", T, k, f"the layer's k={k}").to(torch.int64)
        if top_k_weights.shape != top_k_index.shape:
            raise ValueError(f"top_k_weights: expected the shape of top_k_index {list(top_k_index.shape)}, "
                             f"got {list(top_k_weights.shape)}")
        w = top_k_weights.reshape(T, k)
        # One extra column takes the sentinel id E; it is dropped before the call.
        probs = torch.zeros((T, E + 1), dtype=x.dtype, device=x.device).scatter_(1, idx, 1.0)
        weights = torch.zeros((T, E + 1), dtype=w.dtype, device=x.device).scatter_add_(1, idx, w)
        probs = probs[:, :E].contiguous()
        weights = weights[:, :E].to(x.dtype).contiguous()
        y = moe(x, probs, weights, self._layer_id)
        return y.reshape(hidden_states.shape)
