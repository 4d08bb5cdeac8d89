"""Writing a qmoe file tensor by tensor (the converter's output).

:func:`qmoe.save` needs every tensor in memory at once; a converted model
does not fit. The header of a safetensors file only needs names, dtypes and
shapes, which the converter knows before it quantizes anything, so
:class:`StreamWriter` writes the header first and then each tensor at its
offset as it is produced. The layout is qmoe's (see README, "The qmoe file"):
widest elements first so every tensor is aligned to its element size, no
gaps, ``__metadata__`` with ``qmoe.format_version``, ``qmoe.layers`` and one
``qmoe.layer.<name>`` per layer. The file is written beside its target and
renamed into place only after qmoe's own reader (C++) has opened it and
validated every layer; on any error the partial file is removed.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

import qmoe

FORMAT_VERSION = "1"
_DTYPES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "U8": 1, "I8": 1}
_NUMPY = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8, "F64": np.float64,
          "I32": np.int32, "I64": np.int64, "I16": np.int16, "U16": np.uint16, "BF16": np.uint16}
_ATTR_DEFAULTS: Dict[str, Any] = qmoe._ATTR_DEFAULTS  # every QMoE attribute with its default, in the file's order
_ATTR_ORDER = tuple(_ATTR_DEFAULTS)


def _num(v: float) -> Any:
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(v)


def attributes_json(attrs: Mapping[str, Any]) -> Dict[str, Any]:
    """QMoE attributes as the qmoe file stores them (every attribute, floats, infinities as strings)."""
    unknown = set(attrs) - set(_ATTR_ORDER)
    if unknown:
        raise ValueError(f"unknown QMoE attributes {sorted(unknown)}")
    a = {**_ATTR_DEFAULTS, **attrs}
    out: Dict[str, Any] = {}
    for k in _ATTR_ORDER:
        v = a[k]
        out[k] = _num(float(v)) if k in ("swiglu_limit", "activation_alpha", "activation_beta") else \
            (str(v) if k == "activation_type" else int(v))
    return out


class StreamWriter:
    """Declare every layer and tensor, then :meth:`write` each tensor once,
    then :meth:`close` (validates, renames into place). Use as a context
    manager: leaving it by an exception removes the partial file."""

    def __init__(self, path: "str | os.PathLike[str]",
                 layers: Sequence[Tuple[str, Mapping[str, Any], Mapping[str, str]]],
                 tensors: Sequence[Tuple[str, str, Sequence[int]]], metadata: Optional[Mapping[str, str]] = None):
        """``layers``: (name, QMoE attributes, metadata str -> str);
        ``tensors``: (full name, safetensors dtype, shape)."""
        self.path = os.fspath(path)
        meta: Dict[str, str] = {}
        for k, v in dict(metadata or {}).items():
            if str(k).startswith("qmoe."):
                raise ValueError(f"{self.path}: metadata key {k!r} is reserved (keys starting with 'qmoe.')")
            meta[str(k)] = str(v)
        names = []
        for name, attrs, md in layers:
            if name in names:
                raise ValueError(f"{self.path}: two layers are named {name!r}")
            names.append(name)
            meta[f"qmoe.layer.{name}"] = json.dumps({"attributes": attributes_json(attrs),
                                                      "metadata": {str(k): str(v) for k, v in md.items()}})
        meta["qmoe.format_version"] = FORMAT_VERSION
        meta["qmoe.layers"] = json.dumps(names)
        order = sorted(range(len(tensors)), key=lambda i: -_DTYPES[tensors[i][1]])  # stable: widest first
        header: Dict[str, Any] = {"__metadata__": meta}
        self._spec: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
        off = 0
        for i in order:
            name, dt, shape = tensors[i]
            if name in self._spec:
                raise ValueError(f"{self.path}: tensor {name!r} declared twice")
            shape = tuple(int(d) for d in shape)
            n = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dt]
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
            self._spec[name] = (dt, shape, off, n)
            off += n
        self._header = header
        self._layer_attrs = {name: attrs for name, attrs, _ in layers}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * ((8 - len(text) % 8) % 8)
        self._header_len = len(text)
        self._data0 = 8 + len(text)
        self.size = self._data0 + off
        self._written: set = set()
        self._tmp = f"{self.path}.tmp-{os.getpid()}"
        self._fd: Optional[int] = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(self._fd, len(text).to_bytes(8, "little") + text, 0)
            os.ftruncate(self._fd, self.size)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, array: Any) -> None:
        """Writes tensor ``name`` (a NumPy array of its declared dtype and shape; BF16 as uint16 bits)."""
        if name not in self._spec:
            raise KeyError(f"{self.path}: tensor {name!r} was not declared")
        if name in self._written:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        dt, shape, off, n = self._spec[name]
        a = np.ascontiguousarray(array)
        if a.dtype != np.dtype(_NUMPY[dt]) or tuple(a.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r}: expected {dt} {list(shape)}, got {a.dtype} "
                             f"{list(a.shape)}")
        view = memoryview(a.view(np.uint8).reshape(-1))
        done = 0
        while done < n:  # pwrite may write less than asked for
            done += os.pwrite(self._fd, view[done:], self._data0 + off + done)
        self._written.add(name)

    def set_layer_metadata(self, metadata: Mapping[str, Mapping[str, str]]) -> None:
        """Replaces layers' metadata (name -> str -> str) after the fact; the
        header is rewritten in place at :meth:`close`, so the new header must
        not be longer than the first (e.g. numbers of a fixed width)."""
        meta = self._header["__metadata__"]
        for name, md in metadata.items():
            if name not in self._layer_attrs:
                raise KeyError(f"{self.path}: no layer {name!r}")
            meta[f"qmoe.layer.{name}"] = json.dumps({"attributes": attributes_json(self._layer_attrs[name]),
                                                      "metadata": {str(k): str(v) for k, v in md.items()}})
        text = json.dumps(self._header, separators=(",", ":")).encode()
        if len(text) > self._header_len:
            raise ValueError(f"{self.path}: the rewritten header is {len(text)} bytes, longer than the "
                             f"{self._header_len} reserved")
        text += b" " * (self._header_len - len(text))
        assert self._fd is not None
        os.pwrite(self._fd, text, 8)

    def close(self) -> str:
        """Checks every tensor was written, syncs, validates with qmoe's
        reader and renames into place. Returns the path."""
        missing = sorted(set(self._spec) - self._written)
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: {len(missing)} tensor(s) were never written, e.g. {missing[:3]}")
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        try:
            qmoe.open(self._tmp)  # every layer's shapes against its attributes, by the C++ reader
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

