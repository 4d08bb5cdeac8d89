"""Loading ``com.microsoft::QMoE`` and ``com.microsoft::MoE`` nodes of an ONNX
model as :class:`qmoe.Layer` objects (see :func:`load`)."""

from __future__ import annotations

import math
import mmap
import os
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

import qmoe

__all__ = ["load", "iter_layers", "NodeLayer", "QMOE_INPUTS", "MOE_INPUTS"]

_MS = "com.microsoft"

# ONNX Runtime 1.32's QMoE inputs, in order (21 of them).
QMOE_INPUTS: Tuple[str, ...] = (
    "input", "router_probs",
    "fc1_experts_weights", "fc1_scales", "fc1_experts_bias",
    "fc2_experts_weights", "fc2_scales", "fc2_experts_bias",
    "fc3_experts_weights", "fc3_scales", "fc3_experts_bias",
    "fc1_zero_points", "fc2_zero_points", "fc3_zero_points",
    "router_weights",
    "fc1_global_scale", "fc2_global_scale", "fc1_act_scale", "fc2_act_scale",
    "fc1_act_block_scale", "fc2_act_block_scale",
)
# The float MoE op: fc1's bias is input 3 (QMoE has fc1_scales there).
MOE_INPUTS: Tuple[str, ...] = (
    "input", "router_probs",
    "fc1_experts_weights", "fc1_experts_bias",
    "fc2_experts_weights", "fc2_experts_bias",
    "fc3_experts_weights", "fc3_experts_bias",
)

_INT, _FLOAT, _STRING = 2, 1, 3  # onnx.AttributeProto.AttributeType values
_TYPE_NAMES = {_INT: "int", _FLOAT: "float", _STRING: "string"}

# Attribute name -> (ONNX attribute type, default). Shared by QMoE and MoE.
_COMMON_ATTRS: Dict[str, Tuple[int, Any]] = {
    "k": (_INT, 1),
    "activation_type": (_STRING, "relu"),
    "normalize_routing_weights": (_INT, 0),
    "use_sparse_mixer": (_INT, 0),
    "swiglu_fusion": (_INT, 0),
    "swiglu_limit": (_FLOAT, float("inf")),
    "activation_alpha": (_FLOAT, 1.0),
    "activation_beta": (_FLOAT, 0.0),
    "swiglu_limit_after_activation": (_INT, 0),
}
_QMOE_ATTRS: Dict[str, Tuple[int, Any]] = dict(_COMMON_ATTRS, **{
    "expert_weight_bits": (_INT, 4),
    "block_size": (_INT, 0),
    "quant_type": (_STRING, "int"),
    "weights_prepacked": (_INT, -1),
    "accuracy_level": (_INT, 0),
    "fc1_expert_weight_bits": (_INT, None),
    "fc2_expert_weight_bits": (_INT, None),
    "fc3_expert_weight_bits": (_INT, None),
})
_MOE_ATTRS = _COMMON_ATTRS

_ACTIVATIONS = ("relu", "gelu", "silu", "swiglu", "identity")
# The attributes qmoe.Layer takes.
_LAYER_ATTRS = ("k", "activation_type", "normalize_routing_weights", "use_sparse_mixer", "swiglu_fusion",
                "swiglu_limit", "activation_alpha", "activation_beta")

# TensorProto.DataType -> NumPy dtype (the types a QMoE/MoE weight can have).
_FLOAT_T, _UINT8_T, _INT8_T, _UINT16_T, _INT16_T, _INT32_T, _FLOAT16_T, _DOUBLE_T, _BFLOAT16_T = \
    1, 2, 3, 4, 5, 6, 10, 11, 16


def _np_dtype(data_type: int) -> Optional[np.dtype]:
    table = {_FLOAT_T: np.float32, _UINT8_T: np.uint8, _INT8_T: np.int8, _UINT16_T: np.uint16,
             _INT16_T: np.int16, _INT32_T: np.int32, _FLOAT16_T: np.float16, _DOUBLE_T: np.float64}
    if data_type in table:
        return np.dtype(table[data_type])
    if data_type == _BFLOAT16_T:
        try:
            import ml_dtypes
        except ImportError:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    return None


class _Ctx:
    """Reading state for one model file: where its folder is and the open maps."""

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.maps: Dict[str, mmap.mmap] = {}

    def err(self, node: str, what: str, msg: str) -> ValueError:
        return ValueError(f"{self.path}: node {node!r}: {what}: {msg}")

    def resolve(self, node: str, what: str, location: str, kind: str = "external data") -> str:
        """The real path of ``location``, a file named relative to the model's
        folder; refused when empty, absolute, or resolving (symlinks
        included) outside that folder."""
        if not location:
            raise self.err(node, what, f"{kind} has no 'location'")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or os.path.splitdrive(location)[0]:
            raise self.err(node, what, f"{kind} location {location!r} is absolute; "
                                       f"expected a path relative to the model's folder {self.folder!r}")
        folder = os.path.realpath(self.folder)
        full = os.path.realpath(os.path.join(folder, location))
        if os.path.commonpath([folder, full]) != folder:
            raise self.err(node, what, f"{kind} location {location!r} resolves to {full!r}, "
                                       f"outside the model's folder {folder!r}")
        return full

    def mapped(self, node: str, what: str, location: str) -> mmap.mmap:
        full = self.resolve(node, what, location)
        m = self.maps.get(full)
        if m is None:
            if not os.path.isfile(full):
                raise self.err(node, what, f"external data file {location!r} ({full!r}) does not exist")
            with open(full, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                # mmap of an empty file fails: an empty read-only buffer stands for it.
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""  # type: ignore
            self.maps[full] = m
        return m


def _tensor_array(ctx: _Ctx, t: Any, node: str, what: str) -> np.ndarray:
    """A TensorProto as a NumPy array: inline raw_data viewed without a copy,
    external data viewed over a read-only memory map of its file."""
    dims = tuple(int(d) for d in t.dims)
    dt = _np_dtype(t.data_type)
    if dt is None:
        raise ctx.err(node, what, f"tensor {t.name!r} has unsupported element type {t.data_type} "
                                  f"(expected float, float16, bfloat16 or uint8)")
    count = math.prod(dims)
    nbytes = count * dt.itemsize
    if t.data_location == 1:  # EXTERNAL
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        buf = ctx.mapped(node, what, location)
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ctx.err(node, what, f"tensor {t.name!r}: external data offset/length are not integers: "
                                      f"{info!r}") from None
        size = len(buf)
        if length is None:
            length = nbytes
        if length != nbytes:
            raise ctx.err(node, what, f"tensor {t.name!r}: external data length {length} != {nbytes} bytes "
                                      f"({dt.name} x shape {list(dims)})")
        if offset < 0 or offset > size or offset + length > size:
            raise ctx.err(node, what, f"tensor {t.name!r}: external data [{offset}, {offset + length}) lies "
                                      f"outside {location!r} ({size} bytes)")
        if count == 0:
            return np.zeros(dims, dt)
        arr = np.frombuffer(buf, dtype=dt, count=count, offset=offset)
        if offset % dt.itemsize:
            arr = arr.copy()  # keep the C++ side on aligned memory
        return arr.reshape(dims)
    if t.HasField("raw_data"):
        raw = t.raw_data
        if len(raw) != nbytes:
            raise ctx.err(node, what, f"tensor {t.name!r}: raw_data has {len(raw)} bytes, expected {nbytes} "
                                      f"({dt.name} x shape {list(dims)})")
        return np.frombuffer(raw, dtype=dt).reshape(dims)
    # Typed-field fallbacks (onnx.helper.make_tensor without raw=True).
    if t.data_type == _FLOAT_T:
        vals = np.asarray(t.float_data, dtype=np.float32)
    elif t.data_type == _DOUBLE_T:
        vals = np.asarray(t.double_data, dtype=np.float64)
    elif t.data_type in (_FLOAT16_T, _BFLOAT16_T):
        vals = np.asarray(t.int32_data, dtype=np.int64).astype(np.uint16).view(dt)
    else:
        vals = np.asarray(t.int32_data, dtype=np.int64).astype(dt)
    if vals.size != count:
        raise ctx.err(node, what, f"tensor {t.name!r}: holds {vals.size} values, expected {count} "
                                  f"(shape {list(dims)})")
    return vals.reshape(dims)


def _attributes(ctx: _Ctx, node: Any, name: str, schema: Mapping[str, Tuple[int, Any]]) -> Dict[str, Any]:
    from onnx import helper

    out = {a: d for a, (_, d) in schema.items()}
    for a in node.attribute:
        if a.name not in schema:
            raise ctx.err(name, f"attribute {a.name!r}",
                          f"unknown attribute for {node.op_type} (expected one of {sorted(schema)})")
        want = schema[a.name][0]
        if a.type != want:
            raise ctx.err(name, f"attribute {a.name!r}",
                          f"expected type {_TYPE_NAMES[want]}, got attribute type {a.type}")
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return out


def _check_common(ctx: _Ctx, name: str, attrs: Dict[str, Any]) -> None:
    if attrs["use_sparse_mixer"] != 0:
        raise ctx.err(name, "attribute 'use_sparse_mixer'",
                      f"expected 0 (qmoe does not implement the sparse mixer), got {attrs['use_sparse_mixer']}")
    if attrs["activation_type"] not in _ACTIVATIONS:
        raise ctx.err(name, "attribute 'activation_type'",
                      f"expected one of {list(_ACTIVATIONS)}, got {attrs['activation_type']!r}")
    if attrs["swiglu_limit_after_activation"] != 0:
        raise ctx.err(name, "attribute 'swiglu_limit_after_activation'",
                      f"expected 0 (not implemented by qmoe), got {attrs['swiglu_limit_after_activation']}")


def _constants(graph: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(initializers by name, Constant-node tensors by output name)."""
    inits = {t.name: t for t in graph.initializer}
    consts = {}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    return inits, consts


def _source(graph: Any, tensor: str) -> str:
    if any(i.name == tensor for i in graph.input):
        return "a graph input"
    for n in graph.node:
        if tensor in n.output:
            return f"the output of node {n.name or n.op_type!r} ({n.op_type})"
    return "not defined in the graph"


def _node_inputs(ctx: _Ctx, node: Any, name: str, names: Tuple[str, ...]) -> List[str]:
    """A QMoE/MoE node's input names, checked against the op's input list
    ``names``: not too many, and input, router_probs, fc1_experts_weights and
    fc2_experts_weights present."""
    inputs = list(node.input)
    if len(inputs) > len(names):
        raise ctx.err(name, "inputs", f"expected at most {len(names)} inputs, got {len(inputs)}")
    fc2 = names.index("fc2_experts_weights")
    if len(inputs) <= fc2 or not inputs[0] or not inputs[1] or not inputs[2] or not inputs[fc2]:
        raise ctx.err(name, "inputs", "expected input, router_probs, fc1_experts_weights and "
                                      f"fc2_experts_weights (inputs 0, 1, 2, {fc2}), got {inputs!r}")
    return inputs


def _layout(ctx: _Ctx, name: str, attrs: Dict[str, Any], prepacked_layout: Optional[str]) -> str:
    wp = attrs["weights_prepacked"]
    if wp == 0:
        return "raw"
    if wp == 1:
        return "cutlass"
    if wp != -1:
        raise ctx.err(name, "attribute 'weights_prepacked'", f"expected 0 (raw) or 1 (CUTLASS), got {wp}")
    if prepacked_layout is None:
        raise ctx.err(name, "attribute 'weights_prepacked'",
                      "absent (ONNX Runtime's -1 = the execution provider's own layout: raw on the CPU EP, "
                      "CUTLASS on the CUDA EP), so the weight layout is unknown; pass "
                      "prepacked_layout=\"raw\" for models exported for the CPU EP or prepacked_layout=\"cutlass\" "
                      "for models exported for the CUDA EP")
    return prepacked_layout


def _qmoe_node(ctx: _Ctx, graph: Any, node: Any, name: str, tensors,
               prepacked_layout: Optional[str]) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """(raw weight arrays by ORT input name, qmoe.Layer attributes) of a QMoE node."""
    attrs = _attributes(ctx, node, name, _QMOE_ATTRS)
    _check_common(ctx, name, attrs)
    if attrs["quant_type"] != "int":
        raise ctx.err(name, "attribute 'quant_type'",
                      f"expected \"int\" (qmoe implements integer quantization only), got {attrs['quant_type']!r}")
    bits = attrs["expert_weight_bits"]
    if bits not in (4, 8):
        raise ctx.err(name, "attribute 'expert_weight_bits'", f"expected 4 or 8, got {bits}")
    for fc in ("fc1", "fc2", "fc3"):
        b = attrs[f"{fc}_expert_weight_bits"]
        if b is not None and b != bits:
            raise ctx.err(name, f"attribute '{fc}_expert_weight_bits'",
                          f"expected {bits} (= expert_weight_bits; per-matrix bit widths are not supported), got {b}")
    if attrs["block_size"] < 0:
        raise ctx.err(name, "attribute 'block_size'", f"expected 0 (row-wise) or a power of two >= 16, "
                                                      f"got {attrs['block_size']}")
    inputs = _node_inputs(ctx, node, name, QMOE_INPUTS)
    for i in range(15, len(inputs)):
        if inputs[i]:
            raise ctx.err(name, f"input {i} ({QMOE_INPUTS[i]})",
                          f"expected absent (qmoe has no global/activation scales), got tensor {inputs[i]!r}")
    layout = _layout(ctx, name, attrs, prepacked_layout)
    weights = _weight_arrays(ctx, graph, name, inputs, QMOE_INPUTS, range(2, 14), tensors)
    if layout == "cutlass":
        try:
            from qmoe._cutlass import cutlass_to_raw
        except ImportError as e:
            raise ctx.err(name, "attribute 'weights_prepacked'",
                          f"the weights are in the CUDA EP's CUTLASS layout, but qmoe._cutlass (its inverse) "
                          f"cannot be imported: {e}") from None
        for fc in ("fc1", "fc2", "fc3"):
            key = f"{fc}_experts_weights"
            if key in weights:
                tname = inputs[QMOE_INPUTS.index(key)]
                try:
                    weights[key] = cutlass_to_raw(weights[key], bits, tname)
                except ValueError as e:
                    raise ctx.err(name, f"{key} ({tname!r})", f"cannot undo the CUTLASS layout: {e}") from None
    layer_attrs = {a: attrs[a] for a in _LAYER_ATTRS}
    layer_attrs.update(expert_weight_bits=bits, block_size=attrs["block_size"])
    return weights, layer_attrs


def _moe_node(ctx: _Ctx, graph: Any, node: Any, name: str, tensors,
              quant: Dict[str, Any]) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """(raw weights quantized from the float ones, qmoe.Layer attributes) of a float MoE node."""
    attrs = _attributes(ctx, node, name, _MOE_ATTRS)
    _check_common(ctx, name, attrs)
    inputs = _node_inputs(ctx, node, name, MOE_INPUTS)
    floats = _weight_arrays(ctx, graph, name, inputs, MOE_INPUTS, range(2, 8), tensors)
    weights: Dict[str, np.ndarray] = {}
    for fc in ("fc1", "fc2", "fc3"):
        w = floats.get(f"{fc}_experts_weights")
        if w is None:
            continue
        try:
            q = qmoe.quantize(w, quant["bits"], quant["block_size"], quant["symmetric"])
        except (TypeError, ValueError) as e:
            raise ctx.err(name, f"{fc}_experts_weights", f"cannot quantize: {e}") from None
        weights[f"{fc}_experts_weights"] = q.weights
        weights[f"{fc}_scales"] = q.scales
        if q.zero_points is not None:
            weights[f"{fc}_zero_points"] = q.zero_points
        b = floats.get(f"{fc}_experts_bias")
        if b is not None:
            weights[f"{fc}_experts_bias"] = b
    layer_attrs = {a: attrs[a] for a in _LAYER_ATTRS}
    layer_attrs.update(expert_weight_bits=quant["bits"], block_size=quant["block_size"])
    return weights, layer_attrs


def _weight_arrays(ctx: _Ctx, graph: Any, name: str, inputs: List[str], names: Tuple[str, ...],
                   positions: range, tensors) -> Dict[str, np.ndarray]:
    inits, consts = tensors
    out = {}
    for i in positions:
        if i >= len(inputs) or not inputs[i]:
            continue
        tname = inputs[i]
        what = f"input {i} ({names[i]}) = tensor {tname!r}"
        t = inits.get(tname, consts.get(tname))
        if t is None:
            raise ctx.err(name, what, f"expected an initializer or a Constant node (weights are loaded once), "
                                      f"got {_source(graph, tname)} (fed at run time)")
        out[names[i]] = _tensor_array(ctx, t, name, what)
    return out


def _build(ctx: _Ctx, name: str, weights: Dict[str, np.ndarray], attrs: Dict[str, Any],
           opts: Dict[str, Any]) -> "qmoe.Layer":
    try:
        return qmoe.Layer(**weights, **attrs, **opts)
    except (TypeError, ValueError) as e:
        raise ctx.err(name, "layer", str(e)) from None


def load(path: "os.PathLike[str] | str", *, device: str = "cpu", threads: Optional[int] = None,
         accuracy_level: int = 0, max_tokens: int = 4096, bits: int = 4, block_size: int = 0,
         symmetric: bool = True, prepacked_layout: Optional[str] = None) -> Dict[str, "qmoe.Layer"]:
    """Loads every ``com.microsoft::QMoE`` and float ``com.microsoft::MoE``
    node of the ONNX model at ``path`` as a :class:`qmoe.Layer`.

    Returns a dict keyed by node name, in graph order. A node without a name
    is keyed ``"<op_type>_<index>"`` (``"QMoE_3"``, ``"MoE_0"``), ``index``
    being its position in ``graph.node`` (all nodes counted); duplicate keys
    raise ``ValueError``. Only the main graph is searched (not subgraphs or
    model-local functions). The other nodes (routers, attention, ...) are
    ignored: the caller runs them.

    ``device``, ``threads``, ``accuracy_level`` and ``max_tokens`` go to every
    :class:`qmoe.Layer` (a node's own ``accuracy_level`` attribute, an ONNX
    Runtime CPU EP setting, is accepted and not used: this argument decides).

    Weights (QMoE inputs 2..13, MoE inputs 2..7) must be initializers or
    ``Constant`` nodes; a weight fed at run time (a graph input, another node's
    output) is refused by name. An initializer that is also listed as a graph
    input is taken at its stored value. The model is parsed with
    ``load_external_data=False``: inline tensors are viewed in place, external
    data files are memory-mapped read-only (nothing is read into Python
    objects whole); an external location that is absolute or resolves
    (symlinks included) outside the model's folder, an offset/length outside
    the file, or a length other than dtype size x shape is refused.

    QMoE nodes: every attribute of ONNX Runtime 1.32's schema is read.
    ``weights_prepacked`` = 0 is the raw layout, 1 the CUDA EP's CUTLASS
    layout (converted back with ``qmoe._cutlass.cutlass_to_raw``). When the
    attribute is absent (ONNX Runtime's default -1, "the EP's own layout":
    raw on the CPU EP, CUTLASS on the CUDA EP) the layout cannot be known from
    the file, so ``prepacked_layout`` (``"raw"`` or ``"cutlass"``) must be
    given; it is used only for such nodes. Refused (``ValueError`` naming the
    file, the node and the attribute or tensor): ``quant_type`` other than
    ``"int"``, inputs 15..20 (global and activation scales),
    ``use_sparse_mixer`` = 1, ``swiglu_limit_after_activation`` != 0, bits
    other than 4/8 (or per-matrix ``fcN_expert_weight_bits`` that differ),
    unknown attributes and activations.

    MoE nodes (float weights, fc1's bias at input 3, weights [E, N, K] like
    QMoE's raw layout) are quantized at load with
    ``qmoe.quantize(w, bits, block_size, symmetric)``; biases stay float.

    Routing: qmoe follows ``normalize_routing_weights`` as written. ONNX
    Runtime's CPU EP renormalizes the top-k weights whenever input 14
    (router_weights) is absent, whatever the attribute says, so a model with
    ``normalize_routing_weights = 0`` computes differently there than here.
    """
    _check_options(prepacked_layout, bits, block_size, symmetric)
    opts = dict(device=device, threads=threads, accuracy_level=accuracy_level, max_tokens=max_tokens)
    layers: Dict[str, qmoe.Layer] = {}
    for nl in iter_layers(path, bits=bits, block_size=block_size, symmetric=symmetric,
                          prepacked_layout=prepacked_layout):
        layers[nl.name] = _build(nl.ctx, nl.name, nl.weights, nl.attrs, opts)
    return layers


def _check_options(prepacked_layout: Optional[str], bits: int, block_size: int, symmetric: bool) -> None:
    if prepacked_layout not in (None, "raw", "cutlass"):
        raise ValueError(f"prepacked_layout: expected None, \"raw\" or \"cutlass\", got {prepacked_layout!r}")
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 0:
        raise ValueError(f"block_size: expected 0 (row-wise) or a power of two >= 16, got {block_size!r}")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric: expected a bool, got {symmetric!r}")


class NodeLayer(NamedTuple):
    """One QMoE/MoE node of a model, read as a qmoe layer (see :func:`iter_layers`)."""

    index: int                      #: position in ``graph.node``
    node: Any                       #: the ``onnx.NodeProto``
    name: str                       #: the layer name (node name, or ``"<op_type>_<index>"``)
    weights: Dict[str, np.ndarray]  #: raw-layout arrays by ORT input name (2..13)
    attrs: Dict[str, Any]           #: the qmoe.Layer attributes
    weight_inputs: Tuple[str, ...]  #: the node's tensor names that the weights came from
    ctx: _Ctx                       #: the file's reading state (its memory maps back the arrays)


def iter_layers(path: "os.PathLike[str] | str", *, bits: int = 4, block_size: int = 0, symmetric: bool = True,
                prepacked_layout: Optional[str] = None, model: Any = None) -> Iterator[NodeLayer]:
    """Yields every QMoE/MoE node of the main graph of the model at ``path``
    as a :class:`NodeLayer` (raw weights and attributes), one node at a time,
    in graph order; the rules, checks and errors are those of :func:`load`.
    ``model``: the already parsed ``onnx.ModelProto`` of ``path`` (loaded with
    ``load_external_data=False``), to avoid parsing it twice."""
    path = os.fspath(path)
    _check_options(prepacked_layout, bits, block_size, symmetric)
    if model is None:
        import onnx

        model = onnx.load(path, load_external_data=False)
    ctx = _Ctx(path)
    graph = model.graph
    tensors = _constants(graph)
    quant = dict(bits=bits, block_size=block_size, symmetric=symmetric)
    seen = set()
    for index, node in enumerate(graph.node):
        if node.domain != _MS or node.op_type not in ("QMoE", "MoE"):
            continue
        name = node.name or f"{node.op_type}_{index}"
        if name in seen:
            raise ctx.err(name, "name", f"two QMoE/MoE nodes have the name {name!r} (expected unique names)")
        seen.add(name)
        if node.op_type == "QMoE":
            weights, attrs = _qmoe_node(ctx, graph, node, name, tensors, prepacked_layout)
            span = range(2, 14)
        else:
            weights, attrs = _moe_node(ctx, graph, node, name, tensors, quant)
            span = range(2, 8)
        used = tuple(node.input[i] for i in span if i < len(node.input) and node.input[i])
        yield NodeLayer(index, node, name, weights, attrs, used, ctx)
