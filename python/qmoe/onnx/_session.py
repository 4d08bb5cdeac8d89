"""ONNX Runtime sessions whose QMoE nodes run on qmoe: the custom op
(onnxruntime-extensions' Python custom ops, domain ``ai.onnx.contrib``) that a
model written by :func:`qmoe.onnx.offload` calls, and :func:`session`, which
prepacks each layer once and returns the ``onnxruntime.InferenceSession``.
The module notes of :mod:`qmoe.onnx._offload` describe the rewritten graph.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

import qmoe

from ._load import _Ctx
from ._offload import (_EXTERNAL_FOLDER_KEY, _OP_TYPES, _SPIN_KEY, _TYPE_NAMES, ATTR_DTYPE, ATTR_FILE, ATTR_LAYER,
                       ATTR_SESSION, OP_DOMAIN, OP_TYPE, OP_TYPE_WEIGHTED, _log)

# --------------------------------------------------------------------------- the custom op

class _Entry:
    """One session's layers: (qmoe_file attribute, qmoe_layer attribute) -> Layer."""

    def __init__(self, model: str, layers: Dict[Tuple[str, str], "qmoe.Layer"], files: List[Any]):
        self.model = model
        self.layers = layers
        self.files = files          # the _Loaded objects, kept alive by the session
        self.errors: List[str] = []


class _Loaded:
    """The layers of one qmoe file loaded with one set of options (shared by sessions)."""

    def __init__(self, layers: Dict[str, "qmoe.Layer"]):
        self.layers = layers


_lock = threading.Lock()
_SESSIONS: Dict[str, _Entry] = {}
_FILES: "weakref.WeakValueDictionary[Tuple[Any, ...], _Loaded]" = weakref.WeakValueDictionary()
_OPS: Dict[int, Any] = {}       # Opdef id -> the op's body
_registered = False


def _fail(x: Any, msg: str, token: str) -> np.ndarray:
    """Records an op error (raised by the session after run) and returns NaNs."""
    entry = _SESSIONS.get(token)
    if entry is not None:
        with _lock:
            entry.errors.append(msg)
    _log.error("%s", msg)
    shape = getattr(x, "shape", (0,))
    return np.full(shape, np.nan, dtype=np.float32)


def _half_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name == "float16":
        return np.dtype(np.float16)
    raise ValueError(f"the CUDA backend needs a float16/bfloat16 node, got {ATTR_DTYPE} = {name!r}")


def _make_body(weighted: bool):
    nin = 3 if weighted else 2

    def body(*feed: np.ndarray, **attrs: str) -> np.ndarray:
        # Must never raise: an exception here aborts the process (onnxruntime-extensions).
        token = attrs.get(ATTR_SESSION, "")
        try:
            x = feed[0] if feed else np.zeros((0,), np.float32)
            if len(feed) != nin:
                return _fail(x, f"qmoe custom op: expected {nin} inputs, got {len(feed)}", token)
            entry = _SESSIONS.get(token)
            key = (attrs.get(ATTR_FILE, ""), attrs.get(ATTR_LAYER, ""))
            if entry is None:
                return _fail(x, f"qmoe layer {key[1]!r} of {key[0]!r}: this model must be run through "
                                f"qmoe.onnx.session() (qmoe_session = {token!r} names no live session)", token)
            layer = entry.layers.get(key)
            if layer is None:
                return _fail(x, f"{entry.model}: qmoe layer {key[1]!r} of {key[0]!r} was not loaded", token)
            try:
                args = [x, feed[1], feed[2] if weighted else None]
                if layer.backend == "cuda":
                    # The CUDA backend takes float16/bfloat16 only; these float32 values came
                    # from the node's own float16/bfloat16 through a Cast (session() refuses
                    # float32 nodes on CUDA), so converting back is exact.
                    dt = _half_dtype(attrs.get(ATTR_DTYPE, ""))
                    args = [None if a is None else a.astype(dt) for a in args]
                y = layer(*args)
            except Exception as e:  # noqa: BLE001 - reported through the session
                return _fail(x, f"{entry.model}: qmoe layer {key[1]!r} of {key[0]!r}: {e}", token)
            return np.ascontiguousarray(y, dtype=np.float32)
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt included: never leave the op
            return _fail(feed[0] if feed else None, f"qmoe custom op: {type(e).__name__}: {e}", token)

    return body


def _ensure_ops() -> None:
    """Registers the two Python custom ops with onnxruntime-extensions (once
    per process) and, where the package allows, a faster invocation hook."""
    global _registered
    with _lock:
        if _registered:
            return
        try:
            from onnxruntime_extensions import PyCustomOpDef, onnx_op
        except ImportError as e:
            raise ImportError(f"qmoe.onnx.session needs onnxruntime-extensions (pip install "
                              f"onnxruntime-extensions): {e}") from None
        attrs = {ATTR_FILE: PyCustomOpDef.dt_string, ATTR_LAYER: PyCustomOpDef.dt_string,
                 ATTR_SESSION: PyCustomOpDef.dt_string, ATTR_DTYPE: PyCustomOpDef.dt_string}
        for op_type, weighted in ((OP_TYPE, False), (OP_TYPE_WEIGHTED, True)):
            n = 3 if weighted else 2
            opdef = onnx_op(op_type=op_type, inputs=[PyCustomOpDef.dt_float] * n,
                            outputs=[PyCustomOpDef.dt_float], attrs=attrs)(_make_body(weighted))
            _OPS[opdef._id] = opdef.body
        _install_hook(PyCustomOpDef)
        _registered = True


def _install_hook(PyCustomOpDef: Any) -> None:
    """onnxruntime-extensions' own hook turns every output into a Python list
    (``flatten().tolist()``); its C++ side takes any array. This hook hands
    qmoe's outputs over as arrays and passes every other op to the original."""
    try:
        from onnxruntime_extensions import _ocos
        original = _ocos._on_pyop_invocation
    except (ImportError, AttributeError):
        return  # a different onnxruntime-extensions: its own (slower) hook still works

    def invoke(k_id: int, feed: Any, attributes: Any) -> Any:
        body = _OPS.get(k_id)
        if body is None:
            return original(k_id, feed, attributes)
        y = body(*feed, **attributes)
        return (k_id, y.shape, y)

    PyCustomOpDef.install_hooker(invoke)


def _release(token: str) -> None:
    with _lock:
        _SESSIONS.pop(token, None)


# --------------------------------------------------------------------------- session

_session_cls: Any = None


def _session_class() -> Any:
    """An ``onnxruntime.InferenceSession`` subclass that raises the custom op's errors after a run."""
    global _session_cls
    if _session_cls is not None:
        return _session_cls
    import onnxruntime as ort

    class QmoeSession(ort.InferenceSession):
        """An ``onnxruntime.InferenceSession`` whose qmoe nodes run on qmoe
        (made by :func:`qmoe.onnx.session`). ``run``, ``run_with_ort_values``
        and ``run_with_iobinding`` raise ``ValueError`` when a qmoe layer
        refused its inputs during the run. ``qmoe_layers``: the layers, by
        layer name."""

        _qmoe_token = ""

        @property
        def qmoe_layers(self) -> Dict[str, "qmoe.Layer"]:
            entry = _SESSIONS.get(self._qmoe_token)
            return {} if entry is None else {k[1]: v for k, v in entry.layers.items()}

        def _qmoe_check(self) -> None:
            entry = _SESSIONS.get(self._qmoe_token)
            if entry is None or not entry.errors:
                return
            with _lock:
                errors, entry.errors = entry.errors, []
            raise ValueError(errors[0] if len(errors) == 1 else
                             f"{errors[0]} (and {len(errors) - 1} more qmoe errors in this run)")

        def run(self, output_names, input_feed, run_options=None):  # type: ignore[override]
            out = super().run(output_names, input_feed, run_options)
            self._qmoe_check()
            return out

        def run_with_ort_values(self, output_names, input_dict_ort_values, run_options=None):  # type: ignore
            out = super().run_with_ort_values(output_names, input_dict_ort_values, run_options)
            self._qmoe_check()
            return out

        def run_with_iobinding(self, iobinding, run_options=None):  # type: ignore[override]
            out = super().run_with_iobinding(iobinding, run_options)
            self._qmoe_check()
            return out

    _session_cls = QmoeSession
    return QmoeSession


def _load_file(full: str, names: Sequence[str], device: str, threads: Optional[int], accuracy_level: int,
               max_tokens: int) -> _Loaded:
    st = os.stat(full)
    key = (full, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, device, threads, accuracy_level,
           max_tokens, tuple(sorted(names)))
    with _lock:
        loaded = _FILES.get(key)
    if loaded is not None:
        return loaded
    layers = qmoe.load(full, device=device, threads=threads, accuracy_level=accuracy_level,
                       max_tokens=max_tokens, layers=sorted(names))
    loaded = _Loaded(dict(layers))
    with _lock:
        _FILES[key] = loaded
    return loaded


def session(path: "os.PathLike[str] | str", threads: Optional[int] = None, device: str = "cpu", *,
            accuracy_level: int = 0, max_tokens: int = 4096, sess_options: Any = None,
            providers: Optional[Sequence[Any]] = None, provider_options: Optional[Sequence[Any]] = None,
            config: Optional[Dict[str, str]] = None, **options: Any) -> Any:
    """An ``onnxruntime.InferenceSession`` for the model at ``path`` (written
    by :func:`offload`) whose qmoe nodes run on qmoe.

    Every qmoe file the model's nodes name is loaded once for this session
    with :func:`qmoe.load` (``device``, ``threads``, ``accuracy_level``,
    ``max_tokens`` as there: layers prepacked once); sessions of the same
    file and options share the layers. A file named by a node must lie in
    the model's folder (``ValueError`` otherwise, or when a layer is missing).

    ONNX Runtime's own options: ``sess_options`` (an
    ``onnxruntime.SessionOptions``, modified: the custom-op library is
    registered on it) or keyword ``options`` set as attributes on a new one
    (e.g. ``graph_optimization_level=...``); ``config``: session config
    entries (``add_session_config_entry``). ``threads`` also sets
    ``intra_op_num_threads`` when neither says otherwise. A new
    SessionOptions gets ``session.intra_op.allow_spinning = 0``: ONNX
    Runtime's idle workers would otherwise spin beside qmoe's threads while a
    layer runs (``config`` can set it back to ``"1"``; a given
    ``sess_options`` is left as it is). ``providers`` defaults to
    ``["CPUExecutionProvider"]``.

    ``device="cuda"`` runs the layers on qmoe's CUDA backend, which computes
    in float16/bfloat16: nodes that were float16/bfloat16 in the source run
    there exactly (the op converts their float32-cast values back); float32
    nodes are refused. The op itself always takes host arrays: with ONNX
    Runtime's CUDA EP, ONNX Runtime copies its inputs and output.

    The session is built from an in-memory copy of the model (each qmoe
    node's ``qmoe_session`` attribute set to this session's token); tensors
    in external data are read from the model's folder. Returns a subclass of
    ``onnxruntime.InferenceSession`` whose ``run`` raises ``ValueError`` when
    a qmoe layer refused its inputs (see the module notes on limits).
    """
    import onnx
    import onnxruntime as ort

    path = os.fspath(path)
    _ensure_ops()
    model = onnx.load(path, load_external_data=False)
    ctx = _Ctx(path)
    nodes = [n for n in model.graph.node if n.domain == OP_DOMAIN and n.op_type in _OP_TYPES]
    if not nodes:
        raise ValueError(f"{path}: no {OP_DOMAIN}::{OP_TYPE} node: not a model written by qmoe.onnx.offload "
                         f"(run offload first)")
    wanted: Dict[str, Set[str]] = {}
    where: Dict[str, str] = {}
    for n in nodes:
        attrs = {a.name: a for a in n.attribute}
        for a in (ATTR_FILE, ATTR_LAYER, ATTR_SESSION, ATTR_DTYPE):
            if a not in attrs or attrs[a].type != 3:  # STRING
                raise ctx.err(n.name, f"attribute {a!r}", "missing or not a string (expected the attributes "
                                                          "qmoe.onnx.offload writes)")
        file_attr = attrs[ATTR_FILE].s.decode("utf-8")
        layer = attrs[ATTR_LAYER].s.decode("utf-8")
        dtype = attrs[ATTR_DTYPE].s.decode("utf-8")
        if dtype not in _TYPE_NAMES.values():
            raise ctx.err(n.name, f"attribute {ATTR_DTYPE!r}", f"expected one of {sorted(_TYPE_NAMES.values())}, "
                                                               f"got {dtype!r}")
        if device != "cpu" and dtype == "float32":
            raise ctx.err(n.name, f"attribute {ATTR_DTYPE!r}",
                          f"device={device!r}: qmoe's CUDA backend computes in float16/bfloat16, and this node is "
                          f"float32 (run it on the CPU, or export the model in float16/bfloat16)")
        full = ctx.resolve(n.name, f"attribute {ATTR_FILE!r}", file_attr, kind="qmoe file")
        if not os.path.isfile(full):
            raise ctx.err(n.name, f"attribute {ATTR_FILE!r}", f"qmoe file {file_attr!r} ({full!r}) does not exist")
        wanted.setdefault(file_attr, set()).add(layer)
        where[file_attr] = full

    files, table = [], {}
    for file_attr, names in wanted.items():
        try:
            loaded = _load_file(where[file_attr], sorted(names), device, threads, accuracy_level, max_tokens)
        except (TypeError, ValueError, KeyError, OSError) as e:
            raise ValueError(f"{path}: qmoe file {file_attr!r}: {e}") from None
        files.append(loaded)
        for name in names:
            if name not in loaded.layers:
                raise ValueError(f"{path}: qmoe file {file_attr!r} has no layer {name!r} "
                                 f"(it has {sorted(loaded.layers)})")
            table[(file_attr, name)] = loaded.layers[name]

    token = uuid.uuid4().hex
    for n in nodes:
        for a in n.attribute:
            if a.name == ATTR_SESSION:
                a.s = token.encode()

    so = sess_options if sess_options is not None else ort.SessionOptions()
    if sess_options is None:
        # ONNX Runtime's idle intra-op workers spin after each of its kernels; while a
        # qmoe layer runs (its own threads) they would take the cores from it: measured on
        # 2 cores, 4 gpt-oss layers at T = 16 took 152 ms spinning, 95 ms not.
        so.add_session_config_entry(_SPIN_KEY, "0")
    for k, v in (config or {}).items():
        so.add_session_config_entry(str(k), str(v))
    for k, v in options.items():
        if not hasattr(so, k):
            raise TypeError(f"session: unknown option {k!r} (not an onnxruntime.SessionOptions attribute)")
        setattr(so, k, v)
    if threads is not None and sess_options is None and "intra_op_num_threads" not in options:
        so.intra_op_num_threads = int(threads)
    from onnxruntime_extensions import get_library_path

    so.register_custom_ops_library(get_library_path())
    so.add_session_config_entry(_EXTERNAL_FOLDER_KEY, ctx.folder)

    with _lock:
        _SESSIONS[token] = _Entry(path, table, files)
    try:
        sess = _session_class()(model.SerializeToString(), so,
                                providers=list(providers) if providers else ["CPUExecutionProvider"],
                                provider_options=provider_options)
    except BaseException:
        _release(token)
        raise
    sess._qmoe_token = token
    weakref.finalize(sess, _release, token)
    return sess

