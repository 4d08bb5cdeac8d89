"""The qmoe file from Python: :func:`open` (inspect without reading weights),
:func:`load` (build :class:`qmoe.Layer` objects, prepacked from the memory
map) and :func:`save`. Re-exported by the package as ``qmoe.open``,
``qmoe.load``, ``qmoe.save``; the format is README's "The qmoe file"."""

from __future__ import annotations

import collections
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import (_WEIGHT_NAMES, Layer, _attributes, _core, _float_arg, _int_attr, _max_tokens, _parse_device,
               _uint8_arg, _weights)

_ATTR_DEFAULTS: Dict[str, Any] = dict(
    k=1, activation_type="relu", normalize_routing_weights=0, use_sparse_mixer=0, expert_weight_bits=4,
    block_size=0, swiglu_fusion=0, swiglu_limit=float("inf"), activation_alpha=1.0, activation_beta=0.0)


def _attrs_dict(a: Any) -> Dict[str, Any]:
    return {n: getattr(a, n) for n in _ATTR_DEFAULTS}


def _stored_array(a: np.ndarray, dtype: str) -> np.ndarray:
    """A tensor copied out of a file (2-byte floats arrive as uint16) in its dtype."""
    if dtype == "float16":
        return a.view(np.float16)
    if dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return a  # the raw bfloat16 bits as uint16
        return a.view(ml_dtypes.bfloat16)
    return a


class FileTensor(collections.namedtuple("FileTensor", ["name", "dtype", "shape", "offset", "nbytes"])):
    """One stored tensor: its full name, dtype name, shape, byte offset in the file and size."""


class FileLayer:
    """One layer of a qmoe file, as :func:`open` reports it (no weight read)."""

    def __init__(self, info: Dict[str, Any]):
        self.name: str = info["name"]
        #: the attributes, by ONNX Runtime name (what :class:`Layer` takes)
        self.attributes: Dict[str, Any] = _attrs_dict(info["attributes"])
        self.num_experts: int = info["num_experts"]
        self.hidden_size: int = info["hidden_size"]
        self.inter_size: int = info["inter_size"]
        #: bytes of the stored QMoE inputs (weights, scales, biases, zero points)
        self.weight_bytes: int = info["weight_bytes"]
        #: the QMoE inputs present, by ORT input name
        self.tensors: Dict[str, FileTensor] = {
            t["name"][len(self.name) + 1:]: FileTensor(**t) for t in info["tensors"]}
        #: other tensors of the layer (e.g. ``router.weight``), by suffix
        self.extra: Dict[str, FileTensor] = {t["name"][len(self.name) + 1:]: FileTensor(**t) for t in info["extra"]}
        #: the layer's free-form metadata
        self.metadata: Dict[str, str] = dict(info["metadata"])

    def __repr__(self) -> str:
        a = self.attributes
        return (f"FileLayer({self.name!r}, experts={self.num_experts}, hidden={self.hidden_size}, "
                f"inter={self.inter_size}, bits={a['expert_weight_bits']}, block={a['block_size']}, "
                f"activation={a['activation_type']!r}, k={a['k']}, bytes={self.weight_bytes})")


def _expert_range(experts: Any) -> Tuple[int, int]:
    """``experts=(first, end)`` as two ints; ``None`` is every expert."""
    if experts is None:
        return 0, -1
    try:
        first, end = experts
    except (TypeError, ValueError):
        raise TypeError(f"experts: expected (first, end), got {experts!r}") from None
    first, end = _int_attr(first, "experts[0]"), _int_attr(end, "experts[1]")
    if end == -1:
        raise ValueError("experts: expected (first, end) with end >= 1, got end = -1")
    return first, end


class QmoeFile:
    """An open qmoe file (see :func:`open`): the header is parsed and every
    layer validated; the weights stay in the memory map until a layer is
    loaded."""

    def __init__(self, path: "str | os.PathLike[str]"):
        self._f = _core.File.open(os.fspath(path))
        #: layers by name, in file order
        self.layers: Dict[str, FileLayer] = {d["name"]: FileLayer(d) for d in self._f.layers}

    @property
    def path(self) -> str:
        return self._f.path

    @property
    def size_bytes(self) -> int:
        return self._f.size_bytes

    @property
    def metadata(self) -> Dict[str, str]:
        """The file's free-form metadata (``__metadata__`` keys not starting with ``qmoe.``)."""
        return dict(self._f.metadata)

    @property
    def tensors(self) -> List[FileTensor]:
        """Every tensor of the file, in header order."""
        return [FileTensor(**t) for t in self._f.tensors]

    def tensor(self, name: str) -> np.ndarray:
        """A copy of the stored tensor ``name`` (full name, e.g. ``"layer0.router.weight"``)."""
        for t in self._f.tensors:
            if t["name"] == name:
                return _stored_array(self._f.tensor(name), t["dtype"])
        raise ValueError(f"{self.path}: no tensor {name!r}")

    def load(self, name: str, *, device: Any = "cpu", threads: Optional[int] = None, accuracy_level: int = 0,
             max_tokens: int = 4096, experts: Optional[Tuple[int, int]] = None, k: Optional[int] = None,
             normalize_routing_weights: Optional[int] = None) -> "Layer":
        """Builds the :class:`Layer` ``name``, prepacking straight from the
        memory map expert by expert (pages are dropped as they are packed).

        ``experts=(first, end)`` builds only the stored experts
        ``first .. end - 1`` (expert i of the result is stored expert
        ``first + i``): only their bytes are read, so a process holding a
        shard (e.g. one rank of :mod:`qmoe.distributed`) costs about the
        shard's packed bytes. ``k`` and ``normalize_routing_weights`` replace
        the stored routing attributes of the built layer (``None``: stored).
        A range that is empty or outside the layer's experts raises
        ``ValueError`` naming the file, the layer, the range and the expert
        count."""
        backend, ordinal = _parse_device(device)
        nthreads = 0 if threads is None else _int_attr(threads, "threads")
        level = _int_attr(accuracy_level, "accuracy_level")
        if experts is None and k is None and normalize_routing_weights is None:
            core = self._f.load(name, nthreads, level, backend, ordinal, _max_tokens(max_tokens))
            return Layer._wrap(core, ordinal)
        first, end = _expert_range(experts)
        core = _core.file_load_part(
            self._f, name, first, end, 0 if k is None else _int_attr(k, "k"),
            -1 if normalize_routing_weights is None else _int_attr(normalize_routing_weights,
                                                                   "normalize_routing_weights"),
            nthreads, level, backend, ordinal, _max_tokens(max_tokens))
        return Layer._wrap(core, ordinal)

    def __repr__(self) -> str:
        return f"qmoe.QmoeFile({self.path!r}, layers={list(self.layers)}, size_bytes={self.size_bytes})"


def open(path: "str | os.PathLike[str]") -> QmoeFile:  # noqa: A001 (qmoe.open, like the issue asks)
    """Opens a qmoe file for inspection: layer names, attributes, shapes and
    tensors, without reading any weight byte. Raises ``ValueError`` naming the
    file and what is wrong for a malformed file."""
    return QmoeFile(path)


def load(path: "str | os.PathLike[str]", device: Any = "cpu", threads: Optional[int] = None,
         accuracy_level: int = 0, max_tokens: int = 4096,
         layers: Optional[Sequence[str]] = None,
         experts: Optional[Tuple[int, int]] = None) -> Dict[str, "Layer"]:
    """Builds :class:`Layer` objects from a qmoe file: all its layers, or those
    named in ``layers``, keyed by name in file order. The file is
    memory-mapped and each layer prepacked from the map expert by expert, so
    loading adds about the packed bytes to the process's memory. The other
    arguments are :class:`Layer`'s; ``experts=(first, end)`` builds only
    those experts of every layer (see :meth:`QmoeFile.load`)."""
    f = QmoeFile(path)
    names = list(f.layers) if layers is None else list(layers)
    return {n: f.load(n, device=device, threads=threads, accuracy_level=accuracy_level, max_tokens=max_tokens,
                      experts=experts)
            for n in names}


def save(path: "str | os.PathLike[str]", layers: Mapping[str, Mapping[str, Any]],
         metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes a qmoe file. ``layers`` maps each layer name to a dict of the
    arguments :class:`Layer` takes: the raw weights by ONNX Runtime input name
    (``fc1_experts_weights``, ``fc1_scales``, ..., ``fc3_zero_points``) and
    the attributes (``k``, ``activation_type``, ...; defaults as in
    :class:`Layer`), plus optionally ``"extra"`` (suffix -> array, stored as
    ``<name>.<suffix>``, e.g. ``{"router.weight": w}``; float32, float16,
    bfloat16 or uint8) and ``"metadata"`` (str -> str). ``metadata`` is the
    file's own. Every layer is validated before anything is written; the file
    appears under ``path`` only when complete."""
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers: expected a dict of layer name -> dict, got {type(layers).__name__}")
    out = []
    for name, spec in layers.items():
        if not isinstance(name, str):
            raise TypeError(f"layers: expected str layer names, got {name!r}")
        if not isinstance(spec, Mapping):
            raise TypeError(f"layers[{name!r}]: expected a dict of ORT inputs and attributes, got "
                            f"{type(spec).__name__}")
        unknown = set(spec) - set(_WEIGHT_NAMES) - set(_ATTR_DEFAULTS) - {"extra", "metadata"}
        if unknown:
            raise ValueError(f"layers[{name!r}]: unknown keys {sorted(unknown)} (expected ONNX Runtime QMoE input "
                             f"and attribute names, 'extra' and 'metadata')")
        weights = _weights(dict(spec))
        attrs = _attributes(**{a: spec.get(a, d) for a, d in _ATTR_DEFAULTS.items()})
        extra = {}
        for suffix, arr in dict(spec.get("extra") or {}).items():
            what = f"layers[{name!r}].extra[{suffix!r}]"
            a = np.asarray(arr)
            extra[str(suffix)] = _uint8_arg(a, what) if a.dtype == np.uint8 else _float_arg(a, what)
        md = {str(k): str(v) for k, v in dict(spec.get("metadata") or {}).items()}
        out.append((name, weights, attrs, extra, md))
    meta = {str(k): str(v) for k, v in dict(metadata or {}).items()}
    _core.save_file(os.fspath(path), out, meta)
