"""A safetensors checkpoint reader in pure Python + NumPy + mmap (no torch, no safetensors library).

The safetensors file format
    ``[u64 little-endian n][n bytes of UTF-8 JSON header][data]``. The header is one JSON object mapping
    each tensor name to ``{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}``, offsets in
    bytes relative to the start of the data region (byte ``8 + n`` of the file); the optional key
    ``"__metadata__"`` maps strings to strings. Tensors are C-order and little-endian. BF16 is read as its
    uint16 bit patterns, the FP8 types (``F8_E4M3``, ``F8_E5M2``, ``F8_E8M0``) as uint8; decode them with
    :mod:`qmoe.hf._formats`. Sub-byte types (``F4``, ``F6_*``) are not supported.

What is checked (nothing read from a file is trusted)
    The file holds at least the 8-byte length; ``n <= file size - 8`` and ``n <= 100,000,000`` (the
    safetensors library's own cap); the header is UTF-8 JSON without duplicate keys and is an object; every
    entry is an object with a known ``dtype``, a ``shape`` list of non-negative ints (JSON booleans and
    floats are rejected) and ``data_offsets`` of two ints with ``0 <= begin <= end <= data size``;
    ``end - begin == prod(shape) * itemsize`` (Python ints: no overflow); no two non-empty tensors share a
    byte; ``__metadata__`` is a str -> str object. Gaps between tensors are allowed (the safetensors writer
    never leaves any, but nothing is read from them). Arrays are views of the map, so no allocation is ever
    sized from the file.

Checkpoint folders (the Hugging Face layout)
    ``config.json`` is required in a folder (it describes the model; a bare ``.safetensors`` file has
    ``config`` None). The weights are ``model.safetensors`` if present, else ``model.safetensors.index.json``
    (the order transformers looks them up in), whose ``weight_map`` maps each tensor name to a shard file.
    A shard name must be a plain file name in the folder: no path separator, not ``.``/``..``, not
    absolute (symbolic links are followed, as the Hugging Face cache's snapshot folders are made of them).
    Every shard named must exist and every tensor the index names must be in its shard's header. The
    index is authoritative: a tensor present in a shard but not named by the index is ignored (not listed
    by :meth:`Checkpoint.names`), except that a name present in the headers of two shards is an error,
    since the checkpoint is then ambiguous. Shards the index does not name are not opened.

Every problem is a ``ValueError`` naming the file and the tensor or field, with what was expected and
what was found.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from typing import Any, Iterator

import numpy as np

from ._formats import dequant_fp8_block, to_f32

__all__ = ["Checkpoint", "MAX_HEADER_BYTES", "DTYPES"]

MAX_HEADER_BYTES = 100_000_000
"""Largest JSON header accepted (bytes), as in the safetensors library."""

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # bit patterns; bf16_to_f32 decodes
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "F8_E4M3": np.dtype(np.uint8),  # bit patterns; fp8_e4m3_to_f32 decodes
    "F8_E5M2": np.dtype(np.uint8),  # fp8_e5m2_to_f32
    "F8_E8M0": np.dtype(np.uint8),  # 2^(u - 127), see _formats.E8M0_TABLE
}
"""safetensors dtype name -> the NumPy dtype :meth:`Checkpoint.raw` returns."""

_SAFE_SINGLE = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_CONFIG = "config.json"


def _no_duplicates(where: str):
    """A json ``object_pairs_hook`` that rejects duplicate keys (json.loads would keep the last)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"{where}: duplicate key {key!r} in the JSON")
            out[key] = value
        return out

    return hook


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Entry:
    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> None:
        self.dtype = dtype
        self.shape = shape
        self.begin = begin  # absolute file offsets
        self.end = end


class _Shard:
    """One memory-mapped, validated safetensors file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise ValueError(f"{path}: cannot read the safetensors file ({e.strerror or e})") from None
        if size < 8:
            raise ValueError(f"{path}: truncated safetensors file: expected at least 8 bytes, got {size}")
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ValueError(f"{path}: cannot map the safetensors file ({e.strerror or e})") from None
        try:
            self.metadata, self.entries = self._parse(size)
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int) -> tuple[dict[str, str], dict[str, _Entry]]:
        path, mm = self.path, self._map
        assert mm is not None
        n = int.from_bytes(mm[:8], "little")
        if n > size - 8:
            raise ValueError(
                f"{path}: header length beyond the file: expected at most {size - 8} bytes, got {n}"
            )
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length too large: expected at most {MAX_HEADER_BYTES}, got {n}")
        try:
            text = mm[8:8 + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: header is not UTF-8 ({e.reason} at byte {8 + e.start})") from None
        try:
            header = json.loads(text, object_pairs_hook=_no_duplicates(f"{path}: header"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: header is not JSON ({e.msg} at header char {e.pos})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: header: expected a JSON object, got {type(header).__name__}")
        data_start = 8 + n
        data_size = size - data_start
        metadata: dict[str, str] = {}
        entries: dict[str, _Entry] = {}
        for name, spec in header.items():
            if name == "__metadata__":
                if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                    raise ValueError(f"{path}: __metadata__: expected an object of strings, got {spec!r:.200}")
                metadata = dict(spec)
                continue
            where = f"{path}: tensor {name!r}"
            if not isinstance(spec, dict):
                raise ValueError(f"{where}: expected an object, got {type(spec).__name__}")
            for field in ("dtype", "shape", "data_offsets"):
                if field not in spec:
                    raise ValueError(f"{where}: field {field!r} missing")
            dtype = spec["dtype"]
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise ValueError(f"{where}: dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
            shape = spec["shape"]
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise ValueError(f"{where}: shape: expected a list of non-negative ints, got {shape!r:.200}")
            offsets = spec["data_offsets"]
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
                raise ValueError(f"{where}: data_offsets: expected [begin, end] ints, got {offsets!r:.200}")
            begin, end = offsets
            if not 0 <= begin <= end <= data_size:
                raise ValueError(
                    f"{where}: data_offsets {offsets} out of bounds: expected 0 <= begin <= end <= "
                    f"{data_size} (the data size)"
                )
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: exact, no overflow
            if end - begin != nbytes:
                raise ValueError(
                    f"{where}: size mismatch: {dtype} {shape} needs {nbytes} bytes, data_offsets {offsets} "
                    f"give {end - begin}"
                )
            entries[name] = _Entry(dtype, tuple(shape), data_start + begin, data_start + end)
        spans = sorted((e.begin, e.end, name) for name, e in entries.items() if e.end > e.begin)
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ValueError(
                    f"{path}: tensors {n0!r} and {n1!r} overlap: {n1!r} begins at data byte "
                    f"{b1 - data_start}, expected >= {e0 - data_start} (the end of {n0!r})"
                )
        return metadata, entries

    def raw(self, name: str) -> np.ndarray:
        e = self.entries[name]
        dtype = DTYPES[e.dtype]
        if self._map is None:
            raise ValueError(f"{self.path}: tensor {name!r}: the checkpoint is closed")
        if e.end == e.begin:
            out = np.empty(e.shape, dtype=dtype)
            out.setflags(write=False)
            return out
        count = (e.end - e.begin) // dtype.itemsize
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=e.begin).reshape(e.shape)

    def release(self, name: str) -> None:
        e = self.entries[name]
        mm = self._map
        if mm is None or e.end == e.begin or not hasattr(mm, "madvise"):
            return
        page = mmap.PAGESIZE
        start = e.begin // page * page
        stop = min(-(-e.end // page) * page, len(mm))
        mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        mm, self._map = self._map, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # arrays from raw() still use the map; it is unmapped when the last one goes


class Checkpoint:
    """A read-only view of a safetensors checkpoint: a Hugging Face model folder or one ``.safetensors`` file.

    ``path`` is a folder holding ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``
    plus its shards, or a single safetensors file. Every shard is memory-mapped read-only and validated when
    the checkpoint is opened (see the module docstring); errors are ``ValueError``. Use as a context manager
    or call :meth:`close`; arrays returned by :meth:`raw` stay valid after it (they keep their map alive).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._config: dict[str, Any] | None = None
        self._shards: dict[str, _Shard] = {}
        self._where: dict[str, _Shard] = {}
        try:
            if os.path.isdir(self.path):
                self._open_folder(self.path)
            elif os.path.isfile(self.path):
                shard = self._open_shard(self.path)
                self._where = {name: shard for name in shard.entries}
            else:
                raise ValueError(f"{self.path}: no such checkpoint folder or safetensors file")
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------------------------------

    def _open_shard(self, file: str) -> _Shard:
        shard = _Shard(file)
        self._shards[file] = shard
        return shard

    def _open_folder(self, folder: str) -> None:
        config_path = os.path.join(folder, _CONFIG)
        if not os.path.isfile(config_path):
            raise ValueError(f"{folder}: checkpoint folder without {_CONFIG}: expected {config_path}")
        config = self._read_json(config_path)
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
        self._config = config
        single = os.path.join(folder, _SAFE_SINGLE)
        index_path = os.path.join(folder, _SAFE_INDEX)
        if os.path.isfile(single):
            shard = self._open_shard(single)
            self._where = {name: shard for name in shard.entries}
        elif os.path.isfile(index_path):
            self._open_index(folder, index_path)
        else:
            raise ValueError(f"{folder}: no weights: expected {_SAFE_SINGLE} or {_SAFE_INDEX} in the folder")

    @staticmethod
    def _read_json(file: str) -> Any:
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"{file}: cannot read ({e.strerror or e})") from None
        try:
            return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates(file))
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not JSON ({e.msg} at char {e.pos})") from None

    def _open_index(self, folder: str, index_path: str) -> None:
        index = self._read_json(index_path)
        if not isinstance(index, dict):
            raise ValueError(f"{index_path}: expected a JSON object, got {type(index).__name__}")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: weight_map: expected an object, got {type(weight_map).__name__}")
        by_shard: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str):
                raise ValueError(f"{index_path}: weight_map[{name!r}]: expected a file name, got {file!r:.200}")
            by_shard.setdefault(file, []).append(name)
        for file in by_shard:
            bad = (
                not file
                or file in (".", "..")
                or os.path.isabs(file)
                or "/" in file
                or "\\" in file
                or (os.altsep is not None and os.altsep in file)
                or "\0" in file
            )
            if bad:
                raise ValueError(
                    f"{index_path}: weight_map shard {file!r} (for {by_shard[file][0]!r}): expected a plain "
                    f"file name inside the folder"
                )
            shard_path = os.path.join(folder, file)
            if not os.path.isfile(shard_path):
                raise ValueError(
                    f"{index_path}: weight_map shard {file!r} (for {by_shard[file][0]!r}) missing: "
                    f"expected the file {shard_path}"
                )
        owner: dict[str, _Shard] = {}
        for file, names in by_shard.items():
            shard = self._open_shard(os.path.join(folder, file))
            for name in shard.entries:
                if name in owner:
                    raise ValueError(
                        f"{index_path}: tensor {name!r} is in two shards: {owner[name].path} and {shard.path}"
                    )
                owner[name] = shard
            for name in names:
                if name not in shard.entries:
                    raise ValueError(
                        f"{index_path}: tensor {name!r}: the index puts it in {shard.path}, whose header "
                        f"does not have it"
                    )
        self._where = {name: owner[name] for name in weight_map}

    # -- queries ----------------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any] | None:
        """config.json of a checkpoint folder; None for a bare safetensors file."""
        return self._config

    @property
    def shards(self) -> list[str]:
        """Paths of the opened safetensors files."""
        return list(self._shards)

    def metadata(self, shard: str | None = None) -> dict[str, str]:
        """``__metadata__`` of one shard (its path; may be omitted when there is one shard)."""
        if shard is None:
            if len(self._shards) != 1:
                raise ValueError(f"{self.path}: metadata: {len(self._shards)} shards, name one of {self.shards}")
            shard = next(iter(self._shards))
        if shard not in self._shards:
            raise ValueError(f"{self.path}: metadata: no shard {shard!r}; expected one of {self.shards}")
        return dict(self._shards[shard].metadata)

    def names(self) -> list[str]:
        """Sorted tensor names."""
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._where)

    def _lookup(self, name: str) -> tuple[_Shard, _Entry]:
        shard = self._where.get(name)
        if shard is None:
            raise ValueError(f"{self.path}: no tensor {name!r}")
        return shard, shard.entries[name]

    def info(self, name: str) -> tuple[str, tuple[int, ...], str]:
        """``(safetensors dtype name, shape, shard path)`` of a tensor."""
        shard, e = self._lookup(name)
        return e.dtype, e.shape, shard.path

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only zero-copy array (dtype per :data:`DTYPES`: BF16 -> uint16,
        F8_* -> uint8), shaped as the header says."""
        shard, _ = self._lookup(name)
        return shard.raw(name)

    def float32(self, name: str) -> np.ndarray:
        """A float32 copy of an F32, F16 or BF16 tensor (exact). Other dtypes: use :meth:`raw` and a decoder."""
        shard, e = self._lookup(name)
        if e.dtype not in ("F32", "F16", "BF16"):
            raise ValueError(
                f"{shard.path}: tensor {name!r}: float32() expected dtype F32, F16 or BF16, got {e.dtype} "
                f"(use raw() and qmoe.hf._formats)"
            )
        return to_f32(shard.raw(name), e.dtype)

    @property
    def fp8_block(self) -> tuple[int, int]:
        """The (rows, cols) block of FP8 weights' ``weight_scale_inv``: config.json's
        ``quantization_config.weight_block_size``, else DeepSeek-V3's (128, 128)."""
        qc = (self.config or {}).get("quantization_config") or {}
        bn, bk = qc.get("weight_block_size") or (128, 128)
        return int(bn), int(bk)

    def dequantized(self, name: str) -> np.ndarray:
        """float32 of a float tensor (as :meth:`float32`), or of an F8_E4M3 weight times its
        ``<name>_scale_inv`` block scales (:attr:`fp8_block`)."""
        shard, e = self._lookup(name)
        if e.dtype != "F8_E4M3":
            return self.float32(name)
        sname = name + "_scale_inv"
        if sname not in self:
            raise ValueError(f"{shard.path}: tensor {name!r} is F8_E4M3 but {sname!r} (its block scales) is missing")
        return dequant_fp8_block(shard.raw(name), self.float32(sname), self.fp8_block)

    def release(self, name: str) -> None:
        """Drop the resident pages of the tensor's bytes (madvise MADV_DONTNEED on every page it touches).

        The map is a read-only file mapping, so this only frees memory: a later read faults the pages in
        again from the file (arrays from :meth:`raw` remain valid). A no-op where mmap has no madvise.
        """
        shard, _ = self._lookup(name)
        shard.release(name)

    def close(self) -> None:
        """Unmap every shard (maps still used by arrays from :meth:`raw` go when those arrays do)."""
        for shard in self._shards.values():
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}: {len(self._where)} tensors in {len(self._shards)} shard(s))"
