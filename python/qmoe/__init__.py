"""qmoe: quantized Mixture-of-Experts layers that compute exactly what ONNX
Runtime's ``com.microsoft::QMoE`` operator defines.

Entry points (NumPy arrays in and out; ONNX Runtime's input and attribute
names as keyword arguments):

* :func:`qmoe` -- one call: build a layer and run it.
* :class:`Layer` -- prepack the weights once, call many times; on the CPU
  (``device="cpu"``) or on an NVIDIA GPU (``device="cuda"`` / ``"cuda:N"``,
  where calls also take torch CUDA tensors and run on torch's current stream).
* :func:`reference` -- the float64 reference forward (the oracle).
* :func:`quantize` -- float ``[E, N, K]`` matrices to the raw QMoE layout.
* :func:`save`, :func:`load`, :func:`open` -- qmoe's file (a safetensors
  file of layers in the raw layout; README "The qmoe file"): write, build
  layers from (prepacking straight from a memory map), inspect.
* :func:`cuda_available` -- whether this build has the CUDA backend and a GPU.
* :func:`measure_read_bandwidth`, :func:`measure_peak_flops`,
  :func:`cpu_kernel_isa` -- the machine's measured ceilings, to report
  performance against.

Dtypes: activations (``input``, ``router_probs``, ``router_weights``) may be
float32, float16 or bfloat16 (``ml_dtypes.bfloat16``) and must all have the
same dtype; the output has the input's dtype and shape (``[T, H]`` or
``[B, S, H]``). Scales and biases may be float32, float16 or bfloat16; weights
and zero points are uint8. Nothing is converted to float32 on the Python side:
the C++ library converts at the edges. Non-contiguous arrays are made
contiguous. A wrong dtype raises ``TypeError`` naming the argument; every
other contract violation raises ``ValueError`` with the library's message,
which names the tensor or attribute and the expected and actual values.

The CUDA backend computes in float16 or bfloat16 only (float32 activations
raise ``TypeError``). torch is never imported by this package: torch tensors
are recognised by their type, so NumPy-only installs need no torch.
"""

from __future__ import annotations

import collections
import operator
import re
import sys
from typing import Any, Dict, List, Tuple

import numpy as np

from . import _core
from ._placement import gpu_from as _gpu_from
from ._torch_tensors import forward_torch as _forward_torch
from ._torch_tensors import is_torch as _is_torch
from ._torch_tensors import is_torch_tensor as _is_torch_tensor
from ._placement import host_experts as _host_experts

__version__ = "0.1.0"
__all__ = ["qmoe", "Layer", "reference", "quantize", "QuantizedWeights", "cuda_available",
           "save", "load", "open", "QmoeFile", "FileLayer", "FileTensor",
           "measure_read_bandwidth", "measure_peak_flops", "cpu_kernel_isa", "__version__"]

_F32, _F16, _BF16, _U8 = _core.DTYPE_F32, _core.DTYPE_F16, _core.DTYPE_BF16, _core.DTYPE_U8
_FLOAT_TAGS = {"float32": _F32, "float16": _F16, "bfloat16": _BF16}

# ONNX Runtime's QMoE inputs 2..13, in order.
_WEIGHT_NAMES = (
    "fc1_experts_weights", "fc1_scales", "fc1_experts_bias",
    "fc2_experts_weights", "fc2_scales", "fc2_experts_bias",
    "fc3_experts_weights", "fc3_scales", "fc3_experts_bias",
    "fc1_zero_points", "fc2_zero_points", "fc3_zero_points",
)
_UINT8_NAMES = frozenset(
    ["fc1_experts_weights", "fc2_experts_weights", "fc3_experts_weights",
     "fc1_zero_points", "fc2_zero_points", "fc3_zero_points"])


def _as_array(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 0:
        # An empty shape means "absent" to the C++ API: never let a scalar slip through.
        raise ValueError(f"{name}: expected an array with at least one dimension, got a scalar")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def _float_arg(x: Any, name: str) -> Tuple[np.ndarray, int]:
    """(contiguous array, dtype tag); 2-byte floats travel as their uint16 bytes."""
    dt = np.asarray(x).dtype
    tag = _FLOAT_TAGS.get(dt.name)
    if tag is None or dt.itemsize != (4 if tag == _F32 else 2):
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {dt}")
    a = _as_array(x, name)
    if tag != _F32:
        a = a.view(np.uint16)
    return a, tag


def _uint8_arg(x: Any, name: str) -> Tuple[np.ndarray, int]:
    dt = np.asarray(x).dtype
    if dt != np.uint8:
        raise TypeError(f"{name}: expected dtype uint8, got {dt}")
    return _as_array(x, name), _U8


def _weights(values: Dict[str, Any]) -> Dict[str, Tuple[np.ndarray, int]]:
    out = {}
    for name in _WEIGHT_NAMES:
        v = values.get(name)
        if v is None:
            continue
        out[name] = _uint8_arg(v, name) if name in _UINT8_NAMES else _float_arg(v, name)
    return out


def _int_attr(v: Any, name: str) -> int:
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {v!r}") from None
    if not -2 ** 31 <= i < 2 ** 31:
        raise ValueError(f"{name}: {i} is out of range for a 32-bit integer attribute")
    return i


def _float_attr(v: Any, name: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {v!r}") from None


def _attributes(k, activation_type, normalize_routing_weights, use_sparse_mixer, expert_weight_bits,
                block_size, swiglu_fusion, swiglu_limit, activation_alpha, activation_beta):
    a = _core.Attributes()
    if not isinstance(activation_type, str):
        raise TypeError(f"activation_type: expected a string, got {activation_type!r}")
    a.activation_type = activation_type  # ValueError for unknown names
    a.k = _int_attr(k, "k")
    a.normalize_routing_weights = _int_attr(normalize_routing_weights, "normalize_routing_weights")
    a.use_sparse_mixer = _int_attr(use_sparse_mixer, "use_sparse_mixer")
    a.expert_weight_bits = _int_attr(expert_weight_bits, "expert_weight_bits")
    a.block_size = _int_attr(block_size, "block_size")
    a.swiglu_fusion = _int_attr(swiglu_fusion, "swiglu_fusion")
    a.swiglu_limit = _float_attr(swiglu_limit, "swiglu_limit")
    a.activation_alpha = _float_attr(activation_alpha, "activation_alpha")
    a.activation_beta = _float_attr(activation_beta, "activation_beta")
    return a


def _max_tokens(max_tokens: Any) -> int:
    try:
        n = operator.index(max_tokens)
    except TypeError:
        raise TypeError(f"max_tokens: expected an integer, got {max_tokens!r}") from None
    if not 1 <= n <= 1 << 24:  # the library's range; checked here for the CPU too
        raise ValueError(f"max_tokens: expected 1..16777216, got {n}")
    return n


def _call_args(input, router_probs, router_weights):
    x = _float_arg(input, "input")
    lg = _float_arg(router_probs, "router_probs")
    rw = None if router_weights is None else _float_arg(router_weights, "router_weights")
    return x, lg, rw


# --------------------------------------------------------------------------- devices and torch

_CUDA_DEVICE = re.compile(r"cuda:(\d+)")


def _parse_device(device: Any) -> Tuple[str, int]:
    """"cpu" -> ("cpu", 0); "cuda" -> ("cuda", 0); "cuda:N" -> ("cuda", N).
    A ``torch.device`` is taken by its string form."""
    if _is_torch(device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device: expected \"cpu\", \"cuda\" or \"cuda:N\", got {device!r}")
    if device == "cpu":
        return "cpu", 0
    if device == "cuda":
        return "cuda", 0
    m = _CUDA_DEVICE.fullmatch(device)
    if m is None:
        raise ValueError(f"device: expected \"cpu\", \"cuda\" or \"cuda:N\" (N = a CUDA device ordinal), "
                         f"got {device!r}")
    return "cuda", int(m.group(1))


def _torch():
    # Only reached with a torch tensor in hand, so torch is already imported.
    return sys.modules["torch"]


def _torch_host_arg(t: Any, name: str) -> Tuple[np.ndarray, int]:
    """A torch CPU tensor as (NumPy array sharing its memory, dtype tag):
    2-byte floats travel as their bytes (int16 viewed as uint16), like NumPy's."""
    torch = _torch()
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a host array (NumPy or a torch CPU tensor) like input, "
                         f"got a torch tensor on {t.device}")
    tags = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16}
    tag = tags.get(t.dtype)
    if tag is None:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{name}: expected an array with at least one dimension, got a scalar")
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    if tag == _F32:
        return t.numpy(), tag
    return t.view(torch.int16).numpy().view(np.uint16), tag


def _host_arg(x: Any, name: str) -> Tuple[np.ndarray, int]:
    return _torch_host_arg(x, name) if _is_torch_tensor(x) else _float_arg(x, name)


class Layer:
    """A prepacked, immutable QMoE layer.

    The arguments are ONNX Runtime's QMoE inputs 2..13 (the weights) and its
    attributes, with the same names and defaults::

        layer = qmoe.Layer(fc1_experts_weights=w1, fc1_scales=s1,
                           fc2_experts_weights=w2, fc2_scales=s2,
                           k=4, activation_type="swiglu", swiglu_fusion=1, ...)
        y = layer(x, router_logits)

    Construction validates the raw weights and prepacks them (with the GIL
    released); the layer keeps no reference to the arrays passed in, so they
    can be freed right after. ``threads=None`` uses all hardware threads.
    ``accuracy_level`` follows ONNX Runtime: 0 and 1 = float32 activations
    (exact to float32 rounding); 4 = activations quantized to int8 per 16
    columns at run time, int8 dot products (relative L2 error ~1e-2 or less
    against float64); 3 = bfloat16 activations and weights on CPUs with AMX
    (relative L2 error ~3e-3), float32 elsewhere; 2 runs as float32. Calling
    the layer is thread-safe.

    ``device`` chooses the backend: ``"cpu"`` (default), or ``"cuda"`` /
    ``"cuda:N"`` (``"cuda"`` is device 0; a ``torch.device`` works too) for an
    NVIDIA GPU. A CUDA layer holds its packed weights in device memory
    (:attr:`device_bytes`) and uses a per-device working memory sized for
    ``max_tokens`` tokens per pass (:attr:`workspace_bytes`; shared by the
    layers on one device); longer inputs run in several passes.
    ``max_tokens`` is ignored on the CPU. Building a CUDA layer where
    :func:`cuda_available` is False raises ``ValueError``.

    Experts in host memory beside a GPU (for models whose experts do not fit
    it): ``expert_placement`` gives ``"cuda"`` or ``"cpu"`` per expert, or
    ``gpu_memory_budget`` (bytes of raw expert weights) puts the most frequent
    experts (``expert_frequency``, one value per expert; default: all equal,
    lower ids first) on the GPU while they fit and the rest in host memory. A
    call routes on the GPU, copies only the rows routed to host experts to the
    host, runs them with the CPU kernels (``threads``, ``accuracy_level``;
    ``threads=None`` there: all hardware threads but one, left to the thread
    that drives the GPU)
    while the GPU experts run, copies the results back and combines on the GPU
    in a fixed order: the same result run to run. :attr:`host_experts` lists
    them. ``host_experts_gpu_from=N``: calls with at least N tokens per pass
    copy the host experts' weights (a second copy, GPU layout, pinned host
    memory) to the GPU and compute them there instead, faster for large
    batches; 0 = never (no second copy); ``"auto"`` (the default) = where the
    CPU becomes slower than the copy, measured when the layer is made.
    The CUDA backend takes float16 or bfloat16 activations (all of one dtype).
    """

    def __init__(self, fc1_experts_weights=None, fc1_scales=None, fc1_experts_bias=None,
                 fc2_experts_weights=None, fc2_scales=None, fc2_experts_bias=None,
                 fc3_experts_weights=None, fc3_scales=None, fc3_experts_bias=None,
                 fc1_zero_points=None, fc2_zero_points=None, fc3_zero_points=None,
                 *, k=1, activation_type="relu", normalize_routing_weights=0, use_sparse_mixer=0,
                 expert_weight_bits=4, block_size=0, swiglu_fusion=0, swiglu_limit=float("inf"),
                 activation_alpha=1.0, activation_beta=0.0, accuracy_level=0, threads=None,
                 device="cpu", max_tokens=4096, expert_placement=None, gpu_memory_budget=None,
                 expert_frequency=None, host_experts_gpu_from="auto"):
        backend, ordinal = _parse_device(device)
        weights = _weights(dict(
            fc1_experts_weights=fc1_experts_weights, fc1_scales=fc1_scales, fc1_experts_bias=fc1_experts_bias,
            fc2_experts_weights=fc2_experts_weights, fc2_scales=fc2_scales, fc2_experts_bias=fc2_experts_bias,
            fc3_experts_weights=fc3_experts_weights, fc3_scales=fc3_scales, fc3_experts_bias=fc3_experts_bias,
            fc1_zero_points=fc1_zero_points, fc2_zero_points=fc2_zero_points, fc3_zero_points=fc3_zero_points))
        attrs = _attributes(k, activation_type, normalize_routing_weights, use_sparse_mixer, expert_weight_bits,
                            block_size, swiglu_fusion, swiglu_limit, activation_alpha, activation_beta)
        nthreads = 0 if threads is None else _int_attr(threads, "threads")
        ntokens = _max_tokens(max_tokens)
        num_experts = int(weights["fc1_experts_weights"][0].shape[0]) if "fc1_experts_weights" in weights else 0
        expert_bytes = sum(a.nbytes for a, _ in weights.values()) / max(num_experts, 1)
        host = _host_experts(backend, num_experts, expert_bytes, expert_placement, gpu_memory_budget,
                             expert_frequency)
        self._device = ordinal
        self._host_experts = host
        self._layer = _core.Layer(weights, attrs, nthreads, _int_attr(accuracy_level, "accuracy_level"),
                                  backend, ordinal, ntokens, host,
                                  _gpu_from(host_experts_gpu_from))

    @classmethod
    def _wrap(cls, core: Any, ordinal: int) -> "Layer":
        """A Layer around an already built ``_core.Layer`` (from a file)."""
        self = cls.__new__(cls)
        self._device = ordinal
        self._host_experts = []
        self._layer = core
        return self

    def __call__(self, input, router_probs, router_weights=None):
        """QMoE(input, router_probs): ``input`` [T, H] or [B, S, H], ``router_probs``
        [T, E] router logits, optional ``router_weights`` [T, E] (experts are
        chosen by router_probs and mixed by router_weights). Returns the input's
        dtype and shape. T = 0 gives an empty output.

        What comes back depends on what ``input`` is:

        * a NumPy array (or anything ``np.asarray`` takes): a NumPy array. On a
          CUDA layer the call copies to and from the GPU and waits.
        * a torch CPU tensor: a torch CPU tensor (the other arguments may be
          torch CPU tensors or NumPy arrays); computed like NumPy input.
        * a torch CUDA tensor (CUDA layer, same device): a new torch CUDA tensor
          (``torch.empty_like(input)``). All arguments must be torch tensors on
          that device with the input's dtype (float16 or bfloat16). The work is
          enqueued on ``torch.cuda.current_stream()`` and the call returns
          without waiting, copying nothing through the host, so it can be
          captured in a CUDA graph. No autograd: the result has no gradient.
        """
        if _is_torch_tensor(input) and input.device.type != "cpu":
            return self._call_device(input, router_probs, router_weights)
        if self._layer.backend == "cuda":
            if _is_torch_tensor(input):
                dt, is_f32 = input.dtype, input.dtype == _torch().float32
            else:
                dt = np.asarray(input).dtype
                is_f32 = dt.name == "float32"
            if is_f32:
                raise TypeError(f"input: the CUDA backend takes float16 or bfloat16 activations, got {dt}")
        x = _host_arg(input, "input")
        lg = _host_arg(router_probs, "router_probs")
        rw = None if router_weights is None else _host_arg(router_weights, "router_weights")
        if _is_torch_tensor(input):
            torch = _torch()
            out = torch.empty(tuple(x[0].shape), dtype=input.dtype)
            out_buf = out.numpy() if x[1] == _F32 else out.view(torch.int16).numpy().view(np.uint16)
        else:
            out = np.empty(x[0].shape, dtype=np.asarray(input).dtype.newbyteorder("="))
            out_buf = out if x[1] == _F32 else out.view(np.uint16)
        self._layer.forward(x, lg, rw, (out_buf, x[1]))
        return out

    forward = __call__

    def _call_device(self, input, router_probs, router_weights):
        """torch CUDA tensors: enqueued on torch's current stream of the input's device."""
        return _forward_torch(self._layer, self._device, input, router_probs, router_weights)

    @property
    def num_experts(self) -> int:
        """E."""
        return self._layer.num_experts

    @property
    def hidden_size(self) -> int:
        """H."""
        return self._layer.hidden_size

    @property
    def inter_size(self) -> int:
        """I (per expert; FC1 has 2I rows for fused swiglu)."""
        return self._layer.inter_size

    @property
    def packed_bytes(self) -> int:
        """Bytes held by the prepacked weights (scales and biases included)."""
        return self._layer.packed_bytes

    @property
    def threads(self) -> int:
        """Threads a call uses (CPU, and a CUDA layer's host experts; else 0 on CUDA)."""
        return self._layer.threads

    @property
    def host_experts(self) -> List[int]:
        """CUDA: the experts kept in host memory and run on the CPU (ascending ids; empty: all on the GPU)."""
        return list(self._host_experts)

    @property
    def host_experts_gpu_from(self) -> int:
        """CUDA with host experts: tokens per pass from which they run on the GPU (0 = never)."""
        return self._layer.host_experts_gpu_from

    @property
    def kernel_name(self) -> str:
        """The kernels chosen, e.g. ``"cpu/scalar nr=16"``."""
        return self._layer.kernel_name

    @property
    def backend(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        return self._layer.backend

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"``."""
        return "cpu" if self._layer.backend == "cpu" else f"cuda:{self._device}"

    @property
    def device_bytes(self) -> int:
        """CUDA: device memory the layer itself holds (packed weights, scales,
        biases); 0 on the CPU."""
        return self._layer.device_bytes

    @property
    def workspace_bytes(self) -> int:
        """CUDA: bytes of the per-device working memory this layer uses (sized
        by ``max_tokens``; shared with the other layers on the device); 0 on
        the CPU."""
        return self._layer.workspace_bytes

    @property
    def attributes(self) -> Dict[str, Any]:
        """The layer's attributes, by ONNX Runtime name."""
        a = self._layer.attributes
        return {n: getattr(a, n) for n in (
            "k", "activation_type", "normalize_routing_weights", "use_sparse_mixer", "expert_weight_bits",
            "block_size", "swiglu_fusion", "swiglu_limit", "activation_alpha", "activation_beta")}

    def __repr__(self) -> str:
        where = (f"threads={self.threads}" if self.backend == "cpu" else
                 f"device={self.device!r}")
        mem = (f"packed_bytes={self.packed_bytes}" if self.backend == "cpu" else
               f"packed_bytes={self.packed_bytes}, device_bytes={self.device_bytes}, "
               f"workspace_bytes={self.workspace_bytes}")
        return (f"qmoe.Layer(num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"inter_size={self.inter_size}, {self._layer.attributes!r}, {where}, "
                f"kernel={self.kernel_name!r}, {mem})")


def qmoe(input, router_probs, fc1_experts_weights, fc1_scales, fc1_experts_bias=None,
         fc2_experts_weights=None, fc2_scales=None, fc2_experts_bias=None,
         fc3_experts_weights=None, fc3_scales=None, fc3_experts_bias=None,
         fc1_zero_points=None, fc2_zero_points=None, fc3_zero_points=None,
         router_weights=None, *, k=1, activation_type="relu", normalize_routing_weights=0,
         use_sparse_mixer=0, expert_weight_bits=4, block_size=0, swiglu_fusion=0,
         swiglu_limit=float("inf"), activation_alpha=1.0, activation_beta=0.0,
         accuracy_level=0, threads=None, device="cpu", max_tokens=4096):
    """The QMoE operator in one call, with ONNX Runtime's input order, names
    and attribute defaults. Equivalent to ``Layer(...)(input, router_probs,
    router_weights)`` (``device``, ``max_tokens``: see :class:`Layer`); build a
    :class:`Layer` to reuse the prepacked weights."""
    layer = Layer(fc1_experts_weights, fc1_scales, fc1_experts_bias, fc2_experts_weights, fc2_scales,
                  fc2_experts_bias, fc3_experts_weights, fc3_scales, fc3_experts_bias,
                  fc1_zero_points, fc2_zero_points, fc3_zero_points,
                  k=k, activation_type=activation_type, normalize_routing_weights=normalize_routing_weights,
                  use_sparse_mixer=use_sparse_mixer, expert_weight_bits=expert_weight_bits,
                  block_size=block_size, swiglu_fusion=swiglu_fusion, swiglu_limit=swiglu_limit,
                  activation_alpha=activation_alpha, activation_beta=activation_beta,
                  accuracy_level=accuracy_level, threads=threads, device=device, max_tokens=max_tokens)
    return layer(input, router_probs, router_weights)


def reference(input, router_probs, fc1_experts_weights, fc1_scales, fc1_experts_bias=None,
              fc2_experts_weights=None, fc2_scales=None, fc2_experts_bias=None,
              fc3_experts_weights=None, fc3_scales=None, fc3_experts_bias=None,
              fc1_zero_points=None, fc2_zero_points=None, fc3_zero_points=None,
              router_weights=None, *, k=1, activation_type="relu", normalize_routing_weights=0,
              use_sparse_mixer=0, expert_weight_bits=4, block_size=0, swiglu_fusion=0,
              swiglu_limit=float("inf"), activation_alpha=1.0, activation_beta=0.0):
    """The float64 reference forward (the oracle every backend is checked
    against): same arguments as :func:`qmoe`; returns float64 with the input's
    shape. It dequantizes the raw weights and follows the operator contract
    literally, so it is slow."""
    weights = _weights(dict(
        fc1_experts_weights=fc1_experts_weights, fc1_scales=fc1_scales, fc1_experts_bias=fc1_experts_bias,
        fc2_experts_weights=fc2_experts_weights, fc2_scales=fc2_scales, fc2_experts_bias=fc2_experts_bias,
        fc3_experts_weights=fc3_experts_weights, fc3_scales=fc3_scales, fc3_experts_bias=fc3_experts_bias,
        fc1_zero_points=fc1_zero_points, fc2_zero_points=fc2_zero_points, fc3_zero_points=fc3_zero_points))
    attrs = _attributes(k, activation_type, normalize_routing_weights, use_sparse_mixer, expert_weight_bits,
                        block_size, swiglu_fusion, swiglu_limit, activation_alpha, activation_beta)
    x, lg, rw = _call_args(input, router_probs, router_weights)
    y = _core.reference(weights, attrs, x, lg, rw)
    return y.reshape(x[0].shape)


_QuantizedBase = collections.namedtuple("QuantizedWeights", ["weights", "scales", "zero_points"])


class QuantizedWeights(_QuantizedBase):
    """The result of :func:`quantize`: a 3-tuple ``(weights, scales,
    zero_points)`` that unpacks as such, plus two attributes reporting the
    quantization error of the dequantized weights against the input:

    * ``max_abs_error``: max |dequantized - original|
    * ``rel_l2_error``: ||dequantized - original|| / ||original||
    """

    # No __slots__: instances carry the two error attributes in a __dict__.
    def __new__(cls, weights, scales, zero_points, max_abs_error=0.0, rel_l2_error=0.0):
        self = super().__new__(cls, weights, scales, zero_points)
        self.max_abs_error = float(max_abs_error)
        self.rel_l2_error = float(rel_l2_error)
        return self

    def __repr__(self) -> str:
        zp = None if self.zero_points is None else self.zero_points.shape
        return (f"QuantizedWeights(weights={self.weights.shape}, scales={self.scales.shape}, zero_points={zp}, "
                f"max_abs_error={self.max_abs_error:.3g}, rel_l2_error={self.rel_l2_error:.3g})")


def quantize(w, bits=4, block_size=0, symmetric=True) -> QuantizedWeights:
    """Quantizes float32/float16/bfloat16 ``w`` [E, N, K] (N outputs, K inputs)
    into ONNX Runtime's raw QMoE layout.

    Returns a :class:`QuantizedWeights` that unpacks as ``(weights, scales,
    zero_points)``: weights uint8 [E, N, K*bits/8] (4-bit: even element in the
    low nibble), scales float32 [E, N] (``block_size=0``, one scale per row)
    or [E, N, K/block_size], zero_points ``None`` when ``symmetric`` (implicit
    zero point 2^(bits-1)) else uint8 [E, ceil(N/pack)] (row-wise, packed
    across rows) or [E, N, ceil(blocks/pack)]. The quantization error is on
    the result's ``max_abs_error`` and ``rel_l2_error`` attributes.

    Symmetric: scale = absmax / (2^(bits-1) - 1). Asymmetric: scale =
    (max - min) / (2^bits - 1) over a range that always includes 0.
    """
    arr = _float_arg(w, "w")
    if not isinstance(symmetric, (bool, np.bool_)):
        raise TypeError(f"symmetric: expected a bool, got {symmetric!r}")
    weights, scales, zp, max_abs, rel_l2 = _core.quantize(
        arr, _int_attr(bits, "bits"), _int_attr(block_size, "block_size"), bool(symmetric))
    return QuantizedWeights(weights, scales, zp, max_abs, rel_l2)


def cuda_available() -> bool:
    """True when this build of qmoe has the CUDA backend and a CUDA device is
    present (``Layer(..., device="cuda")`` can then be built)."""
    return bool(_core.cuda_available())


# --------------------------------------------------------------------------- machine ceilings

def measure_read_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    """The machine's read bandwidth in bytes/s: ``threads`` threads each sum
    their share of a buffer of ``nbytes`` bytes (choose it far larger than the
    last-level cache; at least 1 MiB); the best of three timed passes after a
    warm-up pass. The ceiling for a layer's "weight GB/s" at small T. Takes
    about a second for 1 GiB and allocates the buffer for that time. Runs
    without the GIL. ``threads`` < 1 raises ``ValueError``."""
    t = _int_attr(threads, "threads")
    n = operator.index(nbytes)
    if n < 1 << 20:
        raise ValueError(f"nbytes: expected at least 1 MiB (1048576), got {n}")
    return float(_core.measure_read_bandwidth(t, n))


def measure_peak_flops(threads: int, seconds: float = 0.3) -> float:
    """The machine's float32 multiply-add rate in flop/s (2 per FMA):
    ``threads`` threads run independent FMA chains with the instruction set of
    the CPU kernels this process uses (see :func:`cpu_kernel_isa`;
    ``QMOE_CPU_ISA`` applies) for about ``seconds``. The ceiling for a layer's
    GFLOP/s at large T. Runs without the GIL. ``threads`` < 1 or ``seconds``
    not in (0, 3600] raises ``ValueError``."""
    return float(_core.measure_peak_flops(_int_attr(threads, "threads"), _float_attr(seconds, "seconds")))


def cpu_kernel_isa() -> str:
    """The CPU kernel table :class:`Layer` uses in this process, e.g.
    ``"avx512vnni"``, ``"avx2"`` or ``"scalar"``."""
    return _core.cpu_kernel_isa()


# The qmoe file (python/qmoe/_file.py), imported last: it builds on the definitions above.
from ._file import _ATTR_DEFAULTS, FileLayer, FileTensor, QmoeFile, load, open, save  # noqa: E402,F401,A004
from ._route import route  # noqa: E402,F401 (qmoe.route: the library's routing)
