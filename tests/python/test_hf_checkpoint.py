"""qmoe.hf._checkpoint's refusals: a corpus of malformed safetensors files,
folders and indexes, each refused with a ValueError naming the file and the
problem (split from test_hf_formats.py, which holds the decoders and the
round trips)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from qmoe.hf._checkpoint import MAX_HEADER_BYTES, Checkpoint

# ---------------------------------------------------------------------------------------------------------------
# Checkpoint: the bad-file corpus


def _st_bytes(header: object, data: bytes = b"", n: int | None = None) -> bytes:
    """A safetensors file: header (an object to dump, or raw bytes), data; ``n`` overrides the length field."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if n is None else n) + text + data


def _t(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


BAD_FILES = {
    "truncated": (b"\x10\x00\x00", ["truncated", "expected at least 8 bytes, got 3"]),
    "header_beyond_file": (_st_bytes({}, n=1000), ["header length beyond the file", "got 1000"]),
    "header_not_utf8": (_st_bytes(b"\xff\xfe{}"), ["header is not UTF-8"]),
    "header_not_json": (_st_bytes(b"{not json"), ["header is not JSON"]),
    "header_not_object": (_st_bytes([1, 2]), ["header: expected a JSON object, got list"]),
    "duplicate_key": (_st_bytes(b'{"a": {}, "a": {}}'), ["duplicate key 'a'"]),
    "entry_not_object": (_st_bytes({"w": 3}), ["tensor 'w'", "expected an object, got int"]),
    "missing_field": (_st_bytes({"w": {"dtype": "F32", "shape": [1]}}, bytes(4)), ["'data_offsets' missing"]),
    "unknown_dtype": (_st_bytes({"w": _t("Q8", [4], 0, 4)}, bytes(4)), ["tensor 'w'", "dtype", "got 'Q8'"]),
    "negative_shape": (_st_bytes({"w": _t("U8", [-4], 0, 0)}), ["tensor 'w'", "non-negative ints, got [-4]"]),
    "float_shape": (_st_bytes({"w": _t("U8", [4.0], 0, 4)}, bytes(4)), ["tensor 'w'", "shape", "[4.0]"]),
    "bool_shape": (_st_bytes({"w": _t("U8", [True], 0, 1)}, bytes(8)), ["tensor 'w'", "shape", "[True]"]),
    "float_offsets": (_st_bytes({"w": _t("U8", [4], 0, 4.0)}, bytes(4)), ["tensor 'w'", "data_offsets"]),
    "offsets_out_of_bounds": (
        _st_bytes({"w": _t("F32", [256], 0, 1024)}, bytes(16)),
        ["tensor 'w'", "out of bounds", "<= 16 (the data size)"],
    ),
    "offsets_reversed": (_st_bytes({"w": _t("U8", [0], 8, 4)}, bytes(8)), ["tensor 'w'", "out of bounds"]),
    "size_mismatch": (
        _st_bytes({"w": _t("F32", [3, 2], 0, 16)}, bytes(24)),
        ["tensor 'w'", "size mismatch", "F32 [3, 2] needs 24 bytes", "give 16"],
    ),
    "huge_shape": (
        _st_bytes({"w": _t("F64", [2**40, 2**40], 0, 8)}, bytes(8)),
        ["tensor 'w'", "size mismatch", f"needs {2**83} bytes"],
    ),
    "overlap": (
        _st_bytes({"a": _t("F32", [4], 0, 16), "b": _t("U8", [8], 12, 20)}, bytes(24)),
        ["tensors 'a' and 'b' overlap", "begins at data byte 12, expected >= 16"],
    ),
    "metadata_not_strings": (_st_bytes({"__metadata__": {"k": 1}}), ["__metadata__", "object of strings"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file(tmp_path, case):
    content, fragments = BAD_FILES[case]
    file = tmp_path / f"{case}.safetensors"
    file.write_bytes(content)
    _refused(file, fragments)


def _refused(path, fragments) -> None:
    """Checkpoint(path) raises a ValueError naming the path and every fragment."""
    with pytest.raises(ValueError) as err:
        Checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_bad_file_header_over_cap(tmp_path):
    file = tmp_path / "big.safetensors"
    n = MAX_HEADER_BYTES + 1
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 8)  # sparse: nothing is written
    with pytest.raises(ValueError, match=f"big.safetensors: header length too large: expected at most {n - 1}"):
        Checkpoint(file)


def _folder(tmp_path, shards: dict[str, dict[str, np.ndarray]], weight_map: dict | None, config: object = None):
    from safetensors.numpy import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for file, tensors in shards.items():
        save_file(tensors, str(folder / file))
    if weight_map is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


_A = {"a": np.ones(3, np.float32)}
_B = {"b": np.zeros(2, np.uint8)}
_CFG = {"model_type": "toy"}

BAD_FOLDERS = {
    "missing_config": (
        dict(shards={"model.safetensors": _A}, weight_map=None, config=None),
        ["checkpoint folder without config.json", "config.json"],
    ),
    "config_not_json": (
        dict(shards={"model.safetensors": _A}, weight_map=None, config="{oops"),
        ["config.json: not JSON"],
    ),
    "config_not_object": (
        dict(shards={"model.safetensors": _A}, weight_map=None, config="[1]"),
        ["config.json: expected a JSON object, got list"],
    ),
    "no_weights": (dict(shards={}, weight_map=None, config=_CFG), ["no weights", "model.safetensors.index.json"]),
    "missing_shard": (
        dict(shards={"s1.safetensors": _A}, weight_map={"a": "s1.safetensors", "b": "s2.safetensors"}, config=_CFG),
        ["model.safetensors.index.json", "shard 's2.safetensors' (for 'b') missing", "s2.safetensors"],
    ),
    "escaping_shard": (
        dict(shards={"s1.safetensors": _A}, weight_map={"a": "../s1.safetensors"}, config=_CFG),
        ["model.safetensors.index.json", "'../s1.safetensors'", "expected a plain file name inside the folder"],
    ),
    "absolute_shard": (
        dict(shards={"s1.safetensors": _A}, weight_map={"a": "/etc/passwd"}, config=_CFG),
        ["model.safetensors.index.json", "'/etc/passwd'", "plain file name"],
    ),
    "subfolder_shard": (
        dict(shards={"s1.safetensors": _A}, weight_map={"a": "sub/s1.safetensors"}, config=_CFG),
        ["'sub/s1.safetensors'", "plain file name"],
    ),
    "dotdot_shard": (
        dict(shards={"s1.safetensors": _A}, weight_map={"a": ".."}, config=_CFG),
        ["'..'", "plain file name"],
    ),
    "tensor_absent_from_shard": (
        dict(
            shards={"s1.safetensors": _A, "s2.safetensors": _B},
            weight_map={"a": "s1.safetensors", "b": "s1.safetensors"},
            config=_CFG,
        ),
        ["tensor 'b'", "s1.safetensors, whose header does not have it"],
    ),
    "duplicate_across_shards": (
        dict(
            shards={"s1.safetensors": {**_A, **_B}, "s2.safetensors": _B},
            weight_map={"a": "s1.safetensors", "b": "s2.safetensors"},
            config=_CFG,
        ),
        ["tensor 'b' is in two shards", "s1.safetensors and ", "s2.safetensors"],
    ),
    "bad_shard_inside": (
        dict(shards={"s1.safetensors": _A}, weight_map={"a": "s1.safetensors", "b": "s2.safetensors"}, config=_CFG),
        ["s2.safetensors: truncated"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folder(tmp_path, case):
    kwargs, fragments = BAD_FOLDERS[case]
    folder = _folder(tmp_path, **kwargs)
    if case == "bad_shard_inside":
        (folder / "s2.safetensors").write_bytes(b"\x00")
    _refused(folder, fragments)


def test_bad_index(tmp_path):
    folder = _folder(tmp_path, {"s1.safetensors": _A}, None, _CFG)
    index = folder / "model.safetensors.index.json"
    for text, fragment in [
        ("{", "model.safetensors.index.json: not JSON"),
        ("[]", "model.safetensors.index.json: expected a JSON object, got list"),
        ('{"weight_map": []}', "weight_map: expected an object, got list"),
        ('{"weight_map": {"a": 3}}', "weight_map['a']: expected a file name, got 3"),
    ]:
        index.write_text(text)
        with pytest.raises(ValueError) as err:
            Checkpoint(folder)
        assert fragment in str(err.value) and str(folder) in str(err.value), str(err.value)


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint folder or safetensors file"):
        Checkpoint(tmp_path / "nothing")
