"""qmoe.hf._formats decoders (BF16, FP8 E4M3/E5M2, DeepSeek-style block FP8, gpt-oss MXFP4) against references
written apart from them -- scalar decoders from the bit-level definitions here, ml_dtypes, torch and
transformers where installed -- bit for bit; and qmoe.hf._checkpoint.Checkpoint on checkpoints written by the
safetensors library, plus a corpus of malformed files and folders that must each give a ValueError that names
the file and the problem."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from qmoe.hf._checkpoint import Checkpoint
from qmoe.hf._formats import (
    bf16_to_f32,
    dequant_fp8_block,
    f16_to_f32,
    fp8_e4m3_to_f32,
    fp8_e5m2_to_f32,
    mxfp4_to_f32,
)

RNG_SEED = 20261207


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Same shape, dtype float32, NaN in the same places, identical bits everywhere else (so -0.0 != +0.0)."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float32)
    assert got.dtype == np.float32, got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_g, nan_w), f"NaN positions differ at {np.argwhere(nan_g != nan_w)[:5].tolist()}"
    bad = (got.view(np.uint32) != want.view(np.uint32)) & ~nan_w
    assert not bad.any(), (
        f"{int(bad.sum())} values differ, first at {np.argwhere(bad)[0].tolist()}: "
        f"got {got[bad][:4].tolist()}, want {want[bad][:4].tolist()}"
    )


# ---------------------------------------------------------------------------------------------------------------
# scalar references, from the format definitions (Python floats: every value below is exact in a double)


def ref_e4m3(byte: int) -> float:
    """OCP FP8 E4M3FN: s eeee mmm, bias 7, no infinities, s.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 0xF, byte & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return sign * (m / 8.0) * 2.0 ** (1 - 7)
    return sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)


def ref_e2m1(code: int) -> float:
    """OCP FP4 E2M1: s ee m, bias 1, e == 0 is subnormal (m * 0.5)."""
    sign = -1.0 if code & 0x8 else 1.0
    e, m = (code >> 1) & 0x3, code & 0x1
    if e == 0:
        return sign * m * 0.5
    return sign * (1.0 + m / 2.0) * 2.0 ** (e - 1)


def ref_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OCP MX: 32 E2M1 elements per E8M0 scale (2^(u-127), 255 = NaN); two elements a byte, low nibble first."""
    lead = blocks.shape[:-2]
    g_count = blocks.shape[-2]
    out = np.zeros(lead + (g_count * 32,), dtype=np.float32)
    for idx in np.ndindex(*lead):
        for g in range(g_count):
            u = int(scales[idx + (g,)])
            for j in range(16):
                byte = int(blocks[idx + (g, j)])
                for half, code in ((0, byte & 0xF), (1, byte >> 4)):
                    if u == 255:
                        value = math.nan
                    else:
                        value = ref_e2m1(code) * 2.0 ** (u - 127)  # a double: finite, exact
                    with np.errstate(over="ignore"):
                        out[idx + (g * 32 + 2 * j + half,)] = np.float32(value)  # > float32 max -> inf
    return out


# ---------------------------------------------------------------------------------------------------------------
# element decoders


def test_e4m3_all_codes_vs_definition():
    codes = np.arange(256, dtype=np.uint8)
    assert_bits_equal(fp8_e4m3_to_f32(codes), np.array([ref_e4m3(c) for c in range(256)], dtype=np.float32))
    got = fp8_e4m3_to_f32(codes)
    assert got[0x7E] == 448.0 and got[0xFE] == -448.0 and got[0x01] == 2.0 ** -9
    assert np.isnan(got[[0x7F, 0xFF]]).all() and np.isfinite(np.delete(got, [0x7F, 0xFF])).all()
    assert got[0x80] == 0.0 and np.signbit(got[0x80])


def test_e4m3_all_codes_vs_torch():
    torch = pytest.importorskip("torch")
    codes = np.arange(256, dtype=np.uint8)
    want = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    assert_bits_equal(fp8_e4m3_to_f32(codes), want)
    # any shape, read-only input (a view of a map)
    w = np.random.default_rng(RNG_SEED).integers(0, 256, size=(3, 5, 7), dtype=np.uint8)
    w.setflags(write=False)
    assert_bits_equal(fp8_e4m3_to_f32(w), fp8_e4m3_to_f32(codes)[w.ravel()].reshape(3, 5, 7))


def test_e5m2_all_codes_vs_ml_dtypes_and_torch():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    codes = np.arange(256, dtype=np.uint8)
    assert_bits_equal(fp8_e5m2_to_f32(codes), codes.view(ml_dtypes.float8_e5m2).astype(np.float32))
    torch = pytest.importorskip("torch")
    want = torch.from_numpy(codes.copy()).view(torch.float8_e5m2).to(torch.float32).numpy()
    assert_bits_equal(fp8_e5m2_to_f32(codes), want)


def test_bf16_all_patterns():
    pats = np.arange(65536, dtype=np.uint16)
    got = bf16_to_f32(pats)
    try:
        import ml_dtypes

        want = pats.view(ml_dtypes.bfloat16).astype(np.float32)
    except ImportError:
        torch = pytest.importorskip("torch")
        want = torch.from_numpy(pats.view(np.int16).copy()).view(torch.bfloat16).to(torch.float32).numpy()
    assert_bits_equal(got, want)
    # NaN payloads are kept: the float32 is exactly the pattern in the high half
    assert np.array_equal(got.view(np.uint32) >> 16, pats.astype(np.uint32))
    assert bf16_to_f32(pats.reshape(256, 256)).shape == (256, 256)


def test_f16():
    pats = np.arange(65536, dtype=np.uint16).view(np.float16)
    want = np.array([float(x) for x in pats[::97]], dtype=np.float32)  # Python's own half -> double
    assert_bits_equal(f16_to_f32(pats)[::97], want)


def test_decoders_reject_wrong_dtypes():
    with pytest.raises(ValueError, match="expected dtype uint16, got float32"):
        bf16_to_f32(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="fp8_e4m3_to_f32: expected dtype uint8, got int8"):
        fp8_e4m3_to_f32(np.zeros(3, np.int8))
    with pytest.raises(ValueError, match="mxfp4_to_f32: blocks: expected dtype uint8"):
        mxfp4_to_f32(np.zeros((2, 16), np.int8), np.zeros(2, np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# MXFP4


def _mx_inputs(rng: np.random.Generator, lead: tuple[int, ...], groups: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = rng.integers(0, 256, size=lead + (groups, 16), dtype=np.uint8)
    scales = rng.integers(0, 255, size=lead + (groups,), dtype=np.uint8)
    flat = scales.reshape(-1)
    extremes = np.array([0, 1, 126, 127, 128, 252, 253, 254], dtype=np.uint8)
    flat[: extremes.size] = extremes
    return blocks, scales


def test_mxfp4_vs_scalar_definition():
    rng = np.random.default_rng(RNG_SEED)
    blocks, scales = _mx_inputs(rng, (2, 3), 4)
    scales[1, 2, 3] = 255  # NaN scale: the whole block is NaN, zero codes included
    blocks[1, 2, 3, 0] = 0x00
    got = mxfp4_to_f32(blocks, scales)
    assert got.shape == (2, 3, 128)
    assert_bits_equal(got, ref_mxfp4(blocks, scales))
    assert np.isnan(got[1, 2, 96:128]).all()
    # each of the 16 codes in each nibble position, unit scale
    b = np.array([[(hi << 4) | lo for lo, hi in zip(range(16), range(16))]], dtype=np.uint8)
    b = np.concatenate([b, b[:, ::-1]], axis=0).reshape(2, 16)
    s = np.array([127, 127], dtype=np.uint8)
    want = ref_mxfp4(b, s)
    assert_bits_equal(mxfp4_to_f32(b, s), want)
    assert mxfp4_to_f32(np.array([[0x21] + [0] * 15], np.uint8), np.array([127], np.uint8))[:2].tolist() == [
        0.5,  # low nibble (code 1) first
        1.0,  # then the high nibble (code 2)
    ]


def test_mxfp4_all_exponents():
    # every finite scale with every code: 255 scales x 16 codes (codes 0..15 twice per block)
    scales = np.arange(255, dtype=np.uint8).reshape(255, 1)
    row = np.array([(c + 1) % 16 << 4 | c for c in range(16)], dtype=np.uint8)
    blocks = np.broadcast_to(row, (255, 1, 16)).copy()
    assert_bits_equal(mxfp4_to_f32(blocks, scales), ref_mxfp4(blocks, scales))
    got = mxfp4_to_f32(blocks, scales)
    # code 1 (0.5) x 2^-127 = 2^-128: a float32 subnormal, exact
    assert got.shape == (255, 32) and got[0, 2] == np.float32(2.0 ** -128)
    assert np.isinf(got[254]).any() and np.isfinite(got[252]).all()


def test_mxfp4_shape_errors():
    with pytest.raises(ValueError, match=r"expected blocks \[..., G, 16\] and scales \[..., G\]"):
        mxfp4_to_f32(np.zeros((2, 3, 8), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="got blocks"):
        mxfp4_to_f32(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8))


def test_mxfp4_vs_transformers():
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    rng = np.random.default_rng(RNG_SEED + 1)
    e, n, groups = 3, 5, 4  # gpt-oss: blocks [E, N, K/32, 16]
    blocks, scales = _mx_inputs(rng, (e, n), groups)
    # transformers' in-memory weight is [E, K, N]: the transpose of ours. (It turns a 255 scale into
    # +-inf for non-zero codes instead of NaN, so 255 stays out of this comparison.)
    theirs = mx.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    assert tuple(theirs.shape) == (e, groups * 32, n)
    assert_bits_equal(mxfp4_to_f32(blocks, scales).transpose(0, 2, 1), theirs.numpy())


# ---------------------------------------------------------------------------------------------------------------
# block-scaled FP8


def _loop_oracle(w: np.ndarray, s: np.ndarray, bn: int, bk: int) -> np.ndarray:
    out = np.zeros(w.shape, dtype=np.float32)
    for idx in np.ndindex(*w.shape):
        *lead, n, k = idx
        value = np.float32(ref_e4m3(int(w[idx])))
        out[idx] = value * s[tuple(lead) + (n // bn, k // bk)]  # one float32 multiply
    return out


@pytest.mark.parametrize(
    "shape,block",
    [
        ((200, 300), (128, 128)),
        ((128, 256), (128, 128)),
        ((1, 129), (128, 128)),
        ((257, 3), (128, 128)),
        ((2, 70, 45), (32, 16)),
        ((0, 5), (128, 128)),
    ],
)
def test_fp8_block_vs_loop(shape, block):
    rng = np.random.default_rng(RNG_SEED + sum(shape))
    bn, bk = block
    w = rng.integers(0, 256, size=shape, dtype=np.uint8)
    grid = shape[:-2] + (-(-shape[-2] // bn), -(-shape[-1] // bk))
    s = (rng.standard_normal(grid) * 2.0 ** rng.integers(-20, 20, size=grid)).astype(np.float32)
    with np.errstate(all="ignore"):
        want = _loop_oracle(w, s, bn, bk)
    assert_bits_equal(dequant_fp8_block(w, s, block), want)


def test_fp8_block_bf16_scale_and_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(RNG_SEED + 2)
    n, k = 300, 200
    w = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
    w[w & 0x7F == 0x7F] = 0  # no NaN codes
    s_bf16 = torch.from_numpy(rng.random((3, 2), dtype=np.float32) / 448).to(torch.bfloat16)
    s = bf16_to_f32(s_bf16.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(s, s_bf16.float().numpy())
    # DeepSeek-V3 weight_dequant: x.to(float32) * s, the s of block (n // 128, k // 128)
    full = torch.from_numpy(s).repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    want = torch.from_numpy(w).view(torch.float8_e4m3fn).to(torch.float32) * full
    assert_bits_equal(dequant_fp8_block(w, s), want.numpy())


def test_fp8_block_vs_transformers():
    torch = pytest.importorskip("torch")
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    rng = np.random.default_rng(RNG_SEED + 3)
    w = rng.integers(0, 256, size=(256, 384), dtype=np.uint8)
    s = rng.random((2, 3), dtype=np.float32)
    op = fp8.Fp8Dequantize(None)
    theirs = op._dequantize_one(torch.from_numpy(w).view(torch.float8_e4m3fn), torch.from_numpy(s), torch.float32)
    assert_bits_equal(dequant_fp8_block(w, s), theirs.numpy())


def test_fp8_block_errors():
    w = np.zeros((200, 300), np.uint8)
    with pytest.raises(ValueError, match=r"expected \(2, 3\), got \(2, 2\)"):
        dequant_fp8_block(w, np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="scale_inv: expected dtype float32, got float64"):
        dequant_fp8_block(w, np.ones((2, 3)))
    with pytest.raises(ValueError, match="block must be two positive ints"):
        dequant_fp8_block(w, np.ones((2, 3), np.float32), (0, 128))


def test_import_without_torch():
    code = "import sys, qmoe.hf._checkpoint, qmoe.hf._formats; print('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint: good files


def _numpy_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "a.u8": rng.integers(0, 256, size=(3, 17), dtype=np.uint8),
        "a.i8": rng.integers(-128, 128, size=(5,), dtype=np.int8),
        "b.i16": rng.integers(-(2**15), 2**15, size=(2, 2, 3), dtype=np.int16),
        "b.u16": rng.integers(0, 2**16, size=(7,), dtype=np.uint16),
        "c.i32": rng.integers(-(2**31), 2**31, size=(4, 1), dtype=np.int32),
        "c.i64": rng.integers(-(2**62), 2**62, size=(3,), dtype=np.int64),
        "d.f16": rng.standard_normal((6, 5)).astype(np.float16),
        "d.f32": rng.standard_normal((33, 9)).astype(np.float32),
        "d.f64": rng.standard_normal((2,)),
        "e.bool": rng.integers(0, 2, size=(9,)).astype(bool),
        "e.empty": np.zeros((0, 4), np.float32),
        "e.scalar": np.array(3.5, dtype=np.float32),
    }


_DTYPE_NAMES = {
    np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8", np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16",
    np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.bool_): "BOOL",
}


def _check_round_trip(ck: Checkpoint, tensors: dict[str, np.ndarray], shard_of: dict[str, str]) -> None:
    assert ck.names() == sorted(tensors)
    assert len(ck) == len(tensors)
    for name, want in tensors.items():
        assert name in ck
        dtype, shape, shard = ck.info(name)
        assert (dtype, shape, shard) == (_DTYPE_NAMES[want.dtype], want.shape, shard_of[name])
        got = ck.raw(name)
        assert got.dtype == want.dtype and got.shape == want.shape and not got.flags.writeable
        assert np.array_equal(got, want)
        if dtype in ("F16", "F32"):
            f = ck.float32(name)
            assert f.dtype == np.float32 and f.flags.writeable
            assert_bits_equal(f, want.astype(np.float32))
        ck.release(name)
        assert np.array_equal(ck.raw(name), want) and np.array_equal(got, want)  # re-read after release
    assert "nope" not in ck


def test_checkpoint_single_file(tmp_path):
    from safetensors.numpy import save_file

    tensors = _numpy_tensors(np.random.default_rng(RNG_SEED))
    file = str(tmp_path / "w.safetensors")
    save_file(tensors, file, metadata={"format": "np", "k": "v"})
    with Checkpoint(file) as ck:
        assert ck.config is None and ck.shards == [file]
        assert ck.metadata() == {"format": "np", "k": "v"}
        _check_round_trip(ck, tensors, {n: file for n in tensors})
        kept = ck.raw("d.f32")
    assert np.array_equal(kept, tensors["d.f32"])  # arrays outlive close()
    with pytest.raises(ValueError, match="float32\\(\\) expected dtype F32, F16 or BF16, got I32"):
        Checkpoint(file).float32("c.i32")
    with pytest.raises(ValueError, match="no tensor 'nope'"):
        Checkpoint(file).info("nope")


def test_checkpoint_folder_single_and_sharded(tmp_path):
    from safetensors.numpy import save_file

    tensors = _numpy_tensors(np.random.default_rng(RNG_SEED + 1))
    config = {"model_type": "toy", "hidden_size": 8}
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(single / "model.safetensors"))
    with Checkpoint(single) as ck:
        assert ck.config == config
        _check_round_trip(ck, tensors, {n: str(single / "model.safetensors") for n in tensors})

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    weight_map = {}
    for file, part in parts.items():
        save_file({n: tensors[n] for n in part}, str(sharded / file))
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with Checkpoint(str(sharded)) as ck:
        assert sorted(ck.shards) == sorted(str(sharded / f) for f in parts)
        _check_round_trip(ck, tensors, {n: str(sharded / f) for n, f in weight_map.items()})
        with pytest.raises(ValueError, match="2 shards"):
            ck.metadata()

    # a tensor in a shard that the index does not name is ignored
    del weight_map[names[0]]
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with Checkpoint(str(sharded)) as ck:
        assert ck.names() == names[1:] and names[0] not in ck


def test_checkpoint_bf16_fp8_written_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(RNG_SEED)
    x = torch.randn(37, 11, generator=g)
    tensors = {
        "w.bf16": x.to(torch.bfloat16),
        "w.fp8": (x * 40).to(torch.float8_e4m3fn),
        "w.fp8e5": x.to(torch.float8_e5m2),
        "w.scale_inv": torch.rand(1, 1, generator=g),
    }
    file = str(tmp_path / "t.safetensors")
    save_file(tensors, file)
    with Checkpoint(file) as ck:
        assert ck.info("w.bf16")[:2] == ("BF16", (37, 11)) and ck.raw("w.bf16").dtype == np.uint16
        assert ck.info("w.fp8")[:2] == ("F8_E4M3", (37, 11)) and ck.raw("w.fp8").dtype == np.uint8
        assert ck.info("w.fp8e5")[0] == "F8_E5M2"
        assert_bits_equal(ck.float32("w.bf16"), tensors["w.bf16"].float().numpy())
        assert_bits_equal(fp8_e4m3_to_f32(ck.raw("w.fp8")), tensors["w.fp8"].float().numpy())
        assert_bits_equal(fp8_e5m2_to_f32(ck.raw("w.fp8e5")), tensors["w.fp8e5"].float().numpy())
        want = tensors["w.fp8"].float() * tensors["w.scale_inv"]
        assert_bits_equal(dequant_fp8_block(ck.raw("w.fp8"), ck.float32("w.scale_inv")), want.numpy())
