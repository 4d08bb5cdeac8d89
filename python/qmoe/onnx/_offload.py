"""ONNX Runtime sessions whose QMoE nodes run on qmoe: :func:`offload` (this module)
and :func:`qmoe.onnx.session` (the custom op and the session, in _session.py).

How it fits together:

* :func:`offload` rewrites a model: each ``com.microsoft::QMoE`` / ``MoE``
  node's weights go into one qmoe file beside the new model (raw layout,
  written by :func:`qmoe.save`), and the node becomes an
  ``ai.onnx.contrib`` node (``QmoeLayer``, or ``QmoeLayerWeighted`` with
  router_weights) whose only inputs are input, router_probs
  [, router_weights] and whose string attributes name the file
  (``qmoe_file``, relative to the model) and the layer (``qmoe_layer``),
  the node's element type in the source (``qmoe_dtype``), plus an empty
  ``qmoe_session``.
* :func:`qmoe.onnx.session` loads every referenced qmoe file once (``qmoe.load``:
  layers prepacked once), files the layers in a process-wide registry under
  a fresh token, writes the token into each node's ``qmoe_session``
  attribute of an in-memory copy of the model, and builds the
  ``onnxruntime.InferenceSession`` from that copy with
  onnxruntime-extensions' custom-op library registered. At run time the
  Python custom op finds its layer by (token, file, layer) and calls it on
  the activations ONNX Runtime hands over: no weight is copied per call.
  The registry entry is dropped when the session is garbage-collected;
  sessions of one file with the same options share the prepacked layers.

Limits (onnxruntime-extensions 0.15 Python custom ops):

* One Python op per op type per process: qmoe registers its two op types
  once, on the first :func:`qmoe.onnx.session`; every session of every file goes
  through them (the token tells sessions apart).
* The custom op takes float32 only; offload puts ``Cast`` nodes around a
  float16/bfloat16 node (qmoe converts at the edges anyway: same values).
* Activations are copied into and out of NumPy on each call (ONNX Runtime
  -> Python -> ONNX Runtime), and the op runs under the GIL except inside
  the layer.
* An exception escaping a Python custom op aborts the process, so the op
  never raises: on an error (an input shape the layer refuses, a model run
  without :func:`qmoe.onnx.session`) it logs the message, returns NaNs of the
  input's shape, and the session returned by :func:`qmoe.onnx.session` raises
  ``ValueError`` with that message when ``run`` (``run_with_ort_values``,
  ``run_with_iobinding``) returns. Other entry points (``run_async``) and
  sessions built by hand only log. Errors are kept per session: with
  concurrent runs of one session, the first run to finish reports them.
* onnxruntime-extensions imports torch when it is installed (about 2 s and
  300 MiB, once per process, on the first :func:`qmoe.onnx.session`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple


import qmoe

from ._load import NodeLayer, _Ctx, iter_layers

__all__ = ["offload", "OP_DOMAIN", "OP_TYPE", "OP_TYPE_WEIGHTED", "qmoe_file_for"]

OP_DOMAIN = "ai.onnx.contrib"       # onnxruntime-extensions' Python custom-op domain
OP_TYPE = "QmoeLayer"               # inputs: input, router_probs
OP_TYPE_WEIGHTED = "QmoeLayerWeighted"  # inputs: input, router_probs, router_weights
ATTR_FILE, ATTR_LAYER, ATTR_SESSION = "qmoe_file", "qmoe_layer", "qmoe_session"
ATTR_DTYPE = "qmoe_dtype"  # the node's element type in the source model (the op itself runs float32)
_OP_TYPES = (OP_TYPE, OP_TYPE_WEIGHTED)
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_SPIN_KEY = "session.intra_op.allow_spinning"

_log = logging.getLogger("qmoe.onnx")

# TensorProto element types the QMoE input may have.
_FLOAT, _FLOAT16, _BFLOAT16 = 1, 10, 16
_TYPE_NAMES = {_FLOAT: "float32", _FLOAT16: "float16", _BFLOAT16: "bfloat16"}
# Above this the rewritten model's inline tensors move to external data.
_PROTO_LIMIT = 2 ** 31 - 64 * 2 ** 20
_ALIGN_BIG, _ALIGN_SMALL, _BIG = 65536, 64, 1 << 20


def qmoe_file_for(dst: "os.PathLike[str] | str") -> str:
    """The qmoe file :func:`offload` writes for the model ``dst``:
    ``OUT.onnx`` -> ``OUT.qmoe.safetensors`` in the same folder."""
    dst = os.fspath(dst)
    stem = dst[:-5] if dst.endswith(".onnx") else dst
    return stem + ".qmoe.safetensors"


# --------------------------------------------------------------------------- offload

def _subgraphs(graph: Any) -> Iterable[Any]:
    for n in graph.node:
        for a in n.attribute:
            if a.type == 5:  # GRAPH
                yield a.g
            elif a.type == 10:  # GRAPHS
                yield from a.graphs


def _used_names(graph: Any, skip: Set[int]) -> Set[str]:
    """Every tensor name read by a node (subgraphs included, where outer names
    are visible) or listed as a graph output, except the nodes whose ids are
    in ``skip``."""
    used: Set[str] = {o.name for o in graph.output}
    for n in graph.node:
        if id(n) in skip:
            continue
        used.update(i for i in n.input if i)
    for g in _subgraphs(graph):
        used |= _used_names(g, set())
    return used


def _all_tensors(graph: Any) -> Iterable[Any]:
    """Every TensorProto a graph holds: initializers, sparse initializers,
    Constant/attribute tensors, recursively through subgraphs."""
    yield from graph.initializer
    for s in graph.sparse_initializer:
        yield s.values
        yield s.indices
    for n in graph.node:
        for a in n.attribute:
            if a.type == 4:  # TENSOR
                yield a.t
            elif a.type == 9:  # TENSORS
                yield from a.tensors
            elif a.type == 11:  # SPARSE_TENSOR
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
    for g in _subgraphs(graph):
        yield from _all_tensors(g)


def _elem_types(model: Any) -> Dict[str, int]:
    """Element type of every tensor whose type the model declares or ONNX's
    shape inference can tell (com.microsoft ops are opaque to it)."""
    import onnx

    types: Dict[str, int] = {}

    def note(vis: Iterable[Any]) -> None:
        for vi in vis:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types.setdefault(vi.name, vi.type.tensor_type.elem_type)

    g = model.graph
    note(g.input)
    note(g.output)
    note(g.value_info)
    for t in g.initializer:
        types.setdefault(t.name, t.data_type)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # an unparsable corner of the graph: the declared types still count
        return types
    note(inferred.graph.value_info)
    return types


def _node_type(ctx: _Ctx, nl: NodeLayer, types: Dict[str, int], inits: Dict[str, Any]) -> int:
    """The node's T (input/output element type): declared or inferred for its
    input, else that of its biases (bound to T by ONNX Runtime's schema) or,
    for MoE, of its float weights."""
    node = nl.node
    t = types.get(node.input[0], 0)
    if not t:
        bias_pos = (4, 7, 10) if node.op_type == "QMoE" else (3, 5, 7, 2)
        for i in bias_pos:
            if i < len(node.input) and node.input[i] in inits:
                t = inits[node.input[i]].data_type
                break
    if not t:
        raise ctx.err(nl.name, f"input 0 ({node.input[0]!r})",
                      "cannot tell its element type (not declared, not inferable, and the node has no bias): "
                      "declare it in the graph's value_info")
    if t not in (_FLOAT, _FLOAT16, _BFLOAT16):
        raise ctx.err(nl.name, f"input 0 ({node.input[0]!r})",
                      f"expected element type float, float16 or bfloat16, got TensorProto type {t}")
    return t


def _replacement(nl: NodeLayer, t: int, file_attr: str, taken: Set[str]) -> List[Any]:
    """The nodes that stand for ``nl.node``: the custom op, between Casts when T is not float32."""
    from onnx import helper

    node = nl.node
    weighted = len(node.input) > 14 and bool(node.input[14])
    acts = [node.input[0], node.input[1]] + ([node.input[14]] if weighted else [])
    out = node.output[0]
    nodes = []

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    op_in, op_out = acts, out
    if t != _FLOAT:
        op_in = []
        for a in acts:
            c = fresh(f"{a}/qmoe_f32")
            nodes.append(helper.make_node("Cast", [a], [c], name=fresh(f"{nl.name}/qmoe_cast_in"), to=_FLOAT))
            op_in.append(c)
        op_out = fresh(f"{out}/qmoe_f32")
    nodes.append(helper.make_node(OP_TYPE_WEIGHTED if weighted else OP_TYPE, op_in, [op_out],
                                  name=node.name or nl.name, domain=OP_DOMAIN,
                                  **{ATTR_FILE: file_attr, ATTR_LAYER: nl.name, ATTR_SESSION: "",
                                     ATTR_DTYPE: _TYPE_NAMES[t]}))
    if t != _FLOAT:
        nodes.append(helper.make_node("Cast", [op_out], [out], name=fresh(f"{nl.name}/qmoe_cast_out"), to=t))
    return nodes


class _DataWriter:
    """dst's external data file, filled by copying byte ranges."""

    def __init__(self, folder: str, location: str):
        self.location = location
        self.path = os.path.join(folder, location)
        self.f = None
        self.offset = 0

    def write(self, data: "memoryview | bytes") -> Tuple[int, int]:
        if self.f is None:
            self.f = open(self.path, "wb")
        n = len(data)
        pad = -self.offset % (_ALIGN_BIG if n >= _BIG else _ALIGN_SMALL)
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        self.f.write(data)
        self.offset += n
        return start, n

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _set_external(t: Any, location: str, offset: int, length: int) -> None:
    keep = [(e.key, e.value) for e in t.external_data if e.key not in ("location", "offset", "length")]
    del t.external_data[:]
    for k, v in [("location", location), ("offset", str(offset)), ("length", str(length))] + keep:
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = 1  # EXTERNAL


def _copy_external(ctx: _Ctx, model: Any, out: _DataWriter) -> int:
    """Copies every external tensor's bytes of the source into ``out`` and
    points the tensor there. Returns the number of tensors moved."""
    count = 0
    for t in _all_tensors(model.graph):
        if t.data_location != 1:
            continue
        info = {e.key: e.value for e in t.external_data}
        what = f"tensor {t.name!r}"
        buf = ctx.mapped("(graph)", what, info.get("location", ""))
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else len(buf) - offset
        except ValueError:
            raise ctx.err("(graph)", what, f"external data offset/length are not integers: {info!r}") from None
        if offset < 0 or length < 0 or offset + length > len(buf):
            raise ctx.err("(graph)", what, f"external data [{offset}, {offset + length}) lies outside "
                                           f"{info.get('location')!r} ({len(buf)} bytes)")
        start, n = out.write(memoryview(buf)[offset:offset + length] if length else b"")
        _set_external(t, out.location, start, n)
        count += 1
    return count


def _externalize_inline(model: Any, out: _DataWriter) -> None:
    """Moves inline raw_data tensors (largest first) to ``out`` until the
    model fits one protobuf message."""
    tensors = [t for t in _all_tensors(model.graph) if t.data_location != 1 and len(t.raw_data) >= 1024]
    tensors.sort(key=lambda t: len(t.raw_data), reverse=True)
    for t in tensors:
        if model.ByteSize() <= _PROTO_LIMIT:
            return
        start, n = out.write(t.raw_data)
        t.ClearField("raw_data")
        _set_external(t, out.location, start, n)


def offload(src: "os.PathLike[str] | str", dst: "os.PathLike[str] | str", *, layout: Optional[str] = None,
            bits: int = 4, block_size: int = 0, symmetric: bool = True) -> str:
    """Writes ``dst``: the model ``src`` with every ``com.microsoft::QMoE``
    and float ``com.microsoft::MoE`` node of its main graph replaced by a
    node that runs the layer on qmoe, the weights moved to a qmoe file
    beside ``dst`` (:func:`qmoe_file_for`: ``OUT.onnx`` ->
    ``OUT.qmoe.safetensors``). Returns the qmoe file's path. Run the result
    with :func:`session`.

    Nodes are read as :func:`qmoe.onnx.load` reads them (same checks and
    refusals, by node name): ``layout`` (``"raw"`` or ``"cutlass"``) decides
    for QMoE nodes without ``weights_prepacked`` (CUTLASS weights are
    converted back to the raw layout); MoE nodes are quantized with
    ``bits``, ``block_size`` and ``symmetric``. Each layer is stored under
    its node's name (``"<op_type>_<index>"`` for an unnamed node) with its
    attributes.

    The replacement keeps the node's name, its input/router_probs
    (/router_weights) and output tensors; a float16/bfloat16 node gets Casts
    to float32 and back around it. Initializers and Constant nodes that
    only fed the replaced nodes are dropped; everything else stays. Tensors
    of ``src`` held in external data are copied to ``<dst file name>.data``
    (a fresh file; inline tensors stay inline unless the model would not fit
    one protobuf message). ``dst`` must differ from ``src`` and from its
    data files.
    """
    import onnx
    from onnx import helper

    src, dst = os.fspath(src), os.fspath(dst)
    if layout not in (None, "raw", "cutlass"):
        raise ValueError(f"layout: expected None, \"raw\" or \"cutlass\", got {layout!r}")
    model = onnx.load(src, load_external_data=False)
    ctx = _Ctx(src)
    dst_folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(dst_folder, exist_ok=True)
    qfile = qmoe_file_for(dst)
    data_location = os.path.basename(dst) + ".data"
    sources = {os.path.realpath(src)}
    for t in _all_tensors(model.graph):
        if t.data_location == 1:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            sources.add(ctx.resolve("(graph)", f"tensor {t.name!r}", loc))
    for p, what in ((dst, "the model"), (qfile, "the qmoe file"),
                    (os.path.join(dst_folder, data_location), "the external data file")):
        if os.path.realpath(p) in sources:
            raise ValueError(f"{dst}: {what} {p!r} would overwrite {src!r} or one of its data files; "
                             f"choose another output path")

    layers = list(iter_layers(src, bits=bits, block_size=block_size, symmetric=symmetric,
                              prepacked_layout=layout, model=model))
    if not layers:
        raise ValueError(f"{src}: no com.microsoft::QMoE or MoE node in the main graph: nothing to offload")
    graph = model.graph
    types = _elem_types(model)
    inits = {t.name: t for t in graph.initializer}
    node_types = [_node_type(ctx, nl, types, inits) for nl in layers]

    qmoe.save(qfile, {nl.name: dict(nl.weights, **nl.attrs,
                                    metadata={"onnx_source": os.path.basename(src), "onnx_op": nl.node.op_type})
                      for nl in layers})

    # Replace the nodes in place (graph order is topological order).
    file_attr = os.path.basename(qfile)
    taken = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | \
        {i for n in graph.node for i in n.input} | {i.name for i in graph.input}
    by_index = {nl.index: (nl, t) for nl, t in zip(layers, node_types)}
    replaced = {id(nl.node) for nl in layers}
    weight_names = {w for nl in layers for w in nl.weight_inputs}
    new_nodes = []
    for i, n in enumerate(graph.node):
        if i in by_index:
            nl, t = by_index[i]
            new_nodes.extend(_replacement(nl, t, file_attr, taken))
        else:
            new_nodes.append(n)
    still_used = _used_names(graph, replaced)
    drop = weight_names - still_used
    kept_nodes = [n for n in new_nodes
                  if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output
                          and n.output[0] in drop)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept_inits = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    for field in (graph.input, graph.value_info):
        kept = [v for v in field if v.name not in drop]
        del field[:]
        field.extend(kept)
    if not any(o.domain == OP_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(OP_DOMAIN, 1))

    out = _DataWriter(dst_folder, data_location)
    try:
        _copy_external(ctx, model, out)
        if model.ByteSize() > _PROTO_LIMIT:
            _externalize_inline(model, out)
    finally:
        out.close()
    if out.f is None and os.path.exists(out.path):
        os.remove(out.path)  # a stale data file of an earlier run would mislead
    onnx.save_model(model, dst)
    return qfile
