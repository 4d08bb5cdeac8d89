"""Writing qmoe layers as an ONNX model of ``com.microsoft::QMoE`` nodes
(see :func:`export`)."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

import qmoe

from ._load import QMOE_INPUTS

__all__ = ["export"]

# The weight inputs (2..13) a layer dict may hold.
_WEIGHTS = QMOE_INPUTS[2:14]
_REQUIRED = ("fc1_experts_weights", "fc1_scales", "fc2_experts_weights", "fc2_scales")
_UINT8 = frozenset(n for n in _WEIGHTS if n.endswith(("_experts_weights", "_zero_points")))
_BIASES = ("fc1_experts_bias", "fc2_experts_bias", "fc3_experts_bias")

# Attribute -> (Python kind, ONNX Runtime's default), from the defaults qmoe.Layer uses.
_ATTRS: Dict[str, Tuple[type, Any]] = {n: (type(d), d) for n, d in qmoe._ATTR_DEFAULTS.items()}
# Keys of qmoe.save's layer dicts that have no place in an ONNX QMoE node.
_IGNORED = ("extra", "metadata")

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None}

# Above this many bytes of weights the model goes to external data: protobuf
# refuses messages of 2 GiB, and the graph itself needs some room.
_PROTO_LIMIT = 2 ** 31 - 64 * 2 ** 20
# External data: tensors of at least 1 MiB start on a 64 KiB boundary (so ONNX
# Runtime can memory-map them), the others on 64 bytes.
_ALIGN_BIG, _ALIGN_SMALL, _BIG = 65536, 64, 1 << 20


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_DTYPES[name])


def _layer_parts(layer: str, d: Mapping[str, Any]) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], bool]:
    """(weights, attributes, router_weights) of one layer dict, checked by name."""
    if not isinstance(d, Mapping):
        raise TypeError(f"layer {layer!r}: expected a dict of ORT input names and attributes, "
                        f"got {type(d).__name__}")
    weights: Dict[str, np.ndarray] = {}
    attrs: Dict[str, Any] = {}
    router_weights = False
    for key, v in d.items():
        if key in _WEIGHTS:
            if v is None:
                continue
            a = np.asarray(v)
            if a.ndim == 0:
                raise ValueError(f"layer {layer!r}: {key}: expected an array, got a scalar")
            if key in _UINT8 and a.dtype != np.uint8:
                raise ValueError(f"layer {layer!r}: {key}: expected dtype uint8, got {a.dtype}")
            if key not in _UINT8 and a.dtype.name not in _DTYPES:
                raise ValueError(f"layer {layer!r}: {key}: expected dtype float32, float16 or bfloat16, "
                                 f"got {a.dtype}")
            weights[key] = a
        elif key in _ATTRS:
            attrs[key] = v
        elif key == "router_weights":
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"layer {layer!r}: router_weights: expected True or False (whether the node "
                                 f"takes input 14 at run time), got {v!r}")
            router_weights = bool(v)
        elif key in _IGNORED:
            continue
        else:
            raise ValueError(f"layer {layer!r}: unknown key {key!r} (expected ORT QMoE input names "
                             f"{list(_WEIGHTS)}, attributes {list(_ATTRS)} or 'router_weights')")
    for key in _REQUIRED:
        if key not in weights:
            raise ValueError(f"layer {layer!r}: {key} is missing (required: {list(_REQUIRED)})")
    return weights, attrs, router_weights


def _attribute_values(layer: str, attrs: Mapping[str, Any]) -> Dict[str, Any]:
    """The node's attributes: every qmoe attribute, with block_size 0 and an
    infinite swiglu_limit left out (ONNX Runtime's defaults mean the same),
    and weights_prepacked = 0 (raw layout)."""
    out: Dict[str, Any] = {}
    for name, (kind, default) in _ATTRS.items():
        v = attrs.get(name, default)
        if kind is str:
            if not isinstance(v, str):
                raise ValueError(f"layer {layer!r}: attribute {name}: expected a string, got {v!r}")
        elif kind is int:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"layer {layer!r}: attribute {name}: expected an integer, got {v!r}")
            v = int(v)
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"layer {layer!r}: attribute {name}: expected a number, got {v!r}")
            v = float(v)
        out[name] = v
    if out["block_size"] == 0:
        del out["block_size"]
    if math.isinf(out["swiglu_limit"]) and out["swiglu_limit"] > 0:
        del out["swiglu_limit"]
    # Accepted by ONNX Runtime 1.32's schema (checked by the tests, which build a session).
    out["weights_prepacked"] = 0
    return out


class _DataFile:
    """The external data file, written tensor by tensor (never the whole model in memory)."""

    def __init__(self, path: str, location: str):
        self.path = path
        self.location = location
        self.f = open(path, "wb")
        self.offset = 0

    def write(self, a: np.ndarray) -> Tuple[int, int]:
        align = _ALIGN_BIG if a.nbytes >= _BIG else _ALIGN_SMALL
        pad = -self.offset % align
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        buf = np.ascontiguousarray(a)
        if not buf.dtype.isnative:
            buf = buf.astype(buf.dtype.newbyteorder("="))
        # ONNX stores little-endian: the only hosts qmoe supports are.
        self.f.write(memoryview(buf.reshape(-1).view(np.uint8)))
        self.offset += a.nbytes
        return start, a.nbytes

    def close(self) -> None:
        self.f.close()


def _tensor(name: str, a: np.ndarray, data: Optional[_DataFile]) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    if data is None:
        if a.dtype.name == "bfloat16":
            t = helper.make_tensor(name, TensorProto.BFLOAT16, a.shape,
                                   np.ascontiguousarray(a).view(np.uint16).tobytes(), raw=True)
            return t
        return numpy_helper.from_array(np.ascontiguousarray(a), name)
    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(a.dtype)
    t.dims.extend(int(s) for s in a.shape)
    offset, length = data.write(a)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", data.location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def export(path: "os.PathLike[str] | str", layers: Mapping[str, Mapping[str, Any]], *, opset: int = 21,
           external_data: Optional[bool] = None, dtype: Optional[str] = None, validate: bool = True) -> str:
    """Writes ``layers`` as an ONNX model with one ``com.microsoft::QMoE`` node
    per layer, weights in the raw layout (``weights_prepacked = 0``), and
    returns ``path``.

    ``layers`` maps a layer name to a qmoe-style dict: ONNX Runtime's QMoE
    input names (``fc1_experts_weights``, ``fc1_scales``, ... ``fc3_zero_points``)
    with their arrays in the raw layout, and the attributes (``k``,
    ``activation_type``, ``expert_weight_bits``, ``block_size``, ...): exactly
    what ``qmoe.Layer(**d)`` takes (a built :class:`qmoe.Layer` keeps no raw
    weights, so export takes the dicts). ``"router_weights": True`` gives the
    node ONNX Runtime's input 14 (router_weights: experts chosen by
    router_probs, mixed by router_weights). The ``"extra"`` and ``"metadata"``
    keys of :func:`qmoe.save` dicts are ignored; any other key is refused.

    Graph: one layer -> inputs ``input`` [T, H] and ``router_probs`` [T, E]
    in that order (then ``router_weights`` [T, E] when asked), output
    ``output`` [T, H], node named after the layer. Several layers -> each
    gets its own ``<name>.input``, ``<name>.router_probs``
    (``<name>.router_weights``) and ``<name>.output``. T is symbolic.
    Initializers are named ``<name>.<ORT input name>``.

    ``dtype``: the element type of input, router_probs, router_weights and
    output (``"float32"``, ``"float16"`` or ``"bfloat16"``). ONNX Runtime
    binds the biases to the same type, so ``None`` (default) takes the
    biases' dtype (float32 when there are none); a bias of another dtype
    than ``dtype`` raises ``ValueError`` (convert it yourself: export never
    rounds a value). Scales keep their own dtype.

    ``external_data``: ``None`` (default) puts the weights in an external data
    file when they exceed what one protobuf message can hold (~2 GB);
    ``True`` always; ``False`` never (``ValueError`` if they do not fit).
    The file is ``<model file name>.data`` beside the model, written tensor by
    tensor; large tensors start on 64 KiB boundaries.

    ``validate``: build each layer once as a :class:`qmoe.Layer` (one thread)
    before writing, so that a dict breaking the operator contract is refused
    with qmoe's message naming the layer and tensor, not written.

    ``opset``: the default-domain opset imported (``com.microsoft`` is 1);
    the graph uses no default-domain operator.
    """
    import onnx
    from onnx import helper

    path = os.fspath(path)
    if not layers:
        raise ValueError("layers: expected at least one layer")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype: expected None, 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    if external_data not in (None, True, False):
        raise ValueError(f"external_data: expected None, True or False, got {external_data!r}")
    parts: List[Tuple[str, Dict[str, np.ndarray], Dict[str, Any], bool, np.dtype]] = []
    total = 0
    for name, d in layers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"layers: expected non-empty string names, got {name!r}")
        weights, attrs, rw = _layer_parts(name, d)
        bias_dtypes = {weights[b].dtype for b in _BIASES if b in weights}
        if dtype is None:
            if len(bias_dtypes) > 1:
                raise ValueError(f"layer {name!r}: the biases have different dtypes {sorted(map(str, bias_dtypes))}"
                                 f" (ONNX Runtime binds them all to the input's type)")
            t = bias_dtypes.pop() if bias_dtypes else np.dtype(np.float32)
        else:
            t = _dtype(dtype)
            for b in _BIASES:
                if b in weights and weights[b].dtype != t:
                    raise ValueError(f"layer {name!r}: {b}: dtype {weights[b].dtype} differs from the model's "
                                     f"dtype {t} (ONNX Runtime binds the biases to the input's type; convert "
                                     f"the bias, or pass dtype={str(weights[b].dtype)!r})")
        if validate:
            try:
                qmoe.Layer(**weights, **attrs, threads=1)
            except (TypeError, ValueError) as e:
                raise ValueError(f"layer {name!r}: {e}") from None
        total += sum(a.nbytes for a in weights.values())
        parts.append((name, weights, attrs, rw, t))

    use_external = total > _PROTO_LIMIT if external_data is None else external_data
    if not use_external and total > _PROTO_LIMIT:
        raise ValueError(f"external_data=False, but the weights take {total} bytes: more than one protobuf "
                         f"message holds (use external_data=None or True)")
    folder = os.path.dirname(os.path.abspath(path))
    location = os.path.basename(path) + ".data"
    data = _DataFile(os.path.join(folder, location), location) if use_external else None

    single = len(parts) == 1
    nodes, inputs, outputs, inits = [], [], [], []
    try:
        for name, weights, attrs, rw, t in parts:
            tt = helper.np_dtype_to_tensor_dtype(t)
            prefix = "" if single else f"{name}."
            e = int(weights["fc1_experts_weights"].shape[0])
            h = int(weights["fc2_experts_weights"].shape[1])
            io = [f"{prefix}input", f"{prefix}router_probs"]
            inputs.append(helper.make_tensor_value_info(io[0], tt, ["T", h]))
            inputs.append(helper.make_tensor_value_info(io[1], tt, ["T", e]))
            node_inputs = io + [""] * 12
            for i, key in enumerate(_WEIGHTS):
                if key in weights:
                    tname = f"{name}.{key}"
                    node_inputs[2 + i] = tname
                    inits.append(_tensor(tname, weights[key], data))
            if rw:
                node_inputs.append(f"{prefix}router_weights")
                inputs.append(helper.make_tensor_value_info(node_inputs[-1], tt, ["T", e]))
            while not node_inputs[-1]:
                node_inputs.pop()
            out = f"{prefix}output"
            outputs.append(helper.make_tensor_value_info(out, tt, ["T", h]))
            nodes.append(helper.make_node("QMoE", node_inputs, [out], name=name, domain="com.microsoft",
                                          **_attribute_values(name, attrs)))
    finally:
        if data is not None:
            data.close()
    graph = helper.make_graph(nodes, "qmoe", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10, producer_name="qmoe", producer_version=qmoe.__version__)
    onnx.save_model(model, path)
    return path
