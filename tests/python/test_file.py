"""qmoe.save / qmoe.load / qmoe.open: the stored layer computes the in-memory
layer's bits, and the file is a plain safetensors file that the safetensors
library (an independent reader and writer) agrees with."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

import qmoe
from qmoe_np import make_layer, np_moe_from, rel_max_err

E, H, I, T = 6, 64, 32, 7

CONFIGS = [
    dict(bits=b, block=bl, zero_points=zp, bias=bias, activation_type="swiglu", swiglu_fusion=1)
    for b, bl, zp, bias in itertools.product((4, 8), (0, 16, 32), (False, True), (True,))
] + [
    dict(activation_type=a, bias=a != "relu") for a in ("relu", "gelu", "silu", "identity")
] + [
    dict(activation_type="swiglu", swiglu_fusion=f, block=16, zero_points=True, float_dtype=np.float16)
    for f in (0, 2)
]


def _case(i: int, cfg: dict):
    rng = np.random.default_rng(100 + i)
    cfg = dict(cfg)
    w, a, deq = make_layer(rng, E=E, H=H, I=I, k=2, normalize_routing_weights=i % 2, **cfg)
    if a["activation_type"] == "swiglu":
        a.update(activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0)
    return w, a, deq


def test_save_load_same_bits_as_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, H)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    mix = rng.uniform(0.1, 1, (T, E)).astype(np.float32)
    layers, cases = {}, {}
    for i, cfg in enumerate(CONFIGS):
        w, a, deq = _case(i, cfg)
        name = f"model.layers.{i}.mlp"
        layers[name] = dict(w, **a, extra={"router.weight": rng.standard_normal((E, H)).astype(np.float32)},
                            metadata={"config": json.dumps(str(cfg))})
        cases[name] = (w, a, deq)
    path = tmp_path / "sweep.safetensors"
    qmoe.save(path, layers, metadata={"producer": "test"})
    loaded = qmoe.load(path, threads=2)
    assert list(loaded) == list(layers)
    for name, (w, a, deq) in cases.items():
        mem = qmoe.Layer(**w, **a, threads=2)
        for rw in (None, mix):
            got, want = loaded[name](x, logits, rw), mem(x, logits, rw)
            assert np.array_equal(got, want), name
        # and against the float64 reference of the dequantized weights (independent oracle)
        assert rel_max_err(loaded[name](x, logits), np_moe_from(deq, x, logits, a)) < 1e-4
    # a subset, on another accuracy level
    sub = qmoe.load(path, layers=["model.layers.3.mlp"], threads=1, accuracy_level=4)
    w, a, _ = cases["model.layers.3.mlp"]
    assert np.array_equal(sub["model.layers.3.mlp"](x, logits),
                          qmoe.Layer(**w, **a, threads=1, accuracy_level=4)(x, logits))


def test_open_reports_without_loading(tmp_path):
    w, a, _ = _case(0, CONFIGS[0])
    path = tmp_path / "one.safetensors"
    router = np.arange(E * H, dtype=np.float32).reshape(E, H)
    qmoe.save(path, {"blk": dict(w, **a, extra={"router.weight": router}, metadata={"family": "test"})},
              metadata={"note": "n"})
    f = qmoe.open(path)
    assert list(f.layers) == ["blk"] and f.metadata == {"note": "n"}
    L = f.layers["blk"]
    assert (L.num_experts, L.hidden_size, L.inter_size) == (E, H, I)
    assert L.attributes["expert_weight_bits"] == a["expert_weight_bits"]
    assert L.attributes["activation_type"] == "swiglu" and L.attributes["swiglu_limit"] == 7.0
    assert L.metadata == {"family": "test"}
    assert set(L.tensors) == {k for k in w}
    assert L.weight_bytes == sum(np.asarray(v).nbytes for v in w.values())
    assert L.tensors["fc1_experts_weights"].shape == w["fc1_experts_weights"].shape
    assert np.array_equal(f.tensor("blk.router.weight"), router)
    assert f.size_bytes == os.path.getsize(path)


def test_safetensors_library_reads_and_writes_the_format(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open
    w, a, _ = _case(3, CONFIGS[3])
    path = tmp_path / "ours.safetensors"
    qmoe.save(path, {"L": dict(w, **a)})
    # an independent reader sees our tensors, bytes and metadata
    with safe_open(str(path), "np") as f:
        md = f.metadata()
        assert md["qmoe.format_version"] == "1" and json.loads(md["qmoe.layers"]) == ["L"]
        assert json.loads(md["qmoe.layer.L"])["attributes"]["expert_weight_bits"] == a["expert_weight_bits"]
        for k, v in w.items():
            assert np.array_equal(f.get_tensor(f"L.{k}"), v), k
    # an independent writer: the same tensors and metadata through safetensors.numpy
    other = tmp_path / "theirs.safetensors"
    st.save_file({f"L.{k}": np.ascontiguousarray(v) for k, v in w.items()}, str(other), metadata=md)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, H)).astype(np.float32)
    lg = rng.standard_normal((T, E)).astype(np.float32)
    assert np.array_equal(qmoe.load(other, threads=1)["L"](x, lg), qmoe.Layer(**w, **a, threads=1)(x, lg))
    # a plain safetensors file without qmoe's metadata is refused by name
    plain = tmp_path / "plain.safetensors"
    st.save_file({"a": np.zeros(4, np.float32)}, str(plain))
    with pytest.raises(ValueError, match="plain.safetensors: not a qmoe file"):
        qmoe.open(plain)


def test_save_refuses_bad_layers(tmp_path):
    w, a, _ = _case(0, CONFIGS[0])
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="unknown keys \\['fc4_weights'\\]"):
        qmoe.save(path, {"L": dict(w, **a, fc4_weights=w["fc1_experts_weights"])})
    bad = dict(w, **a)
    bad["fc2_scales"] = bad["fc2_scales"][:, :-1]
    with pytest.raises(ValueError, match='layer "L": fc2_scales'):
        qmoe.save(path, {"L": bad})
    with pytest.raises(TypeError, match="fc1_experts_weights: expected dtype uint8"):
        qmoe.save(path, {"L": dict(w, **a, fc1_experts_weights=w["fc1_experts_weights"].astype(np.int16))})
    with pytest.raises(ValueError, match="reserved"):
        qmoe.save(path, {"L": dict(w, **a)}, metadata={"qmoe.x": "1"})
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="no layer 'nope'|no layer \"nope\""):
        qmoe.save(path, {"L": dict(w, **a)})
        qmoe.load(path, layers=["nope"])
    with pytest.raises(ValueError, match="cannot open"):
        qmoe.open(tmp_path / "missing.safetensors")


@pytest.mark.skipif(not qmoe.cuda_available(), reason="needs the CUDA backend and a GPU (run on the GPU host)")
def test_cuda_load_same_bits_as_in_memory(tmp_path):
    import ml_dtypes
    layers, cases = {}, {}
    for i, cfg in enumerate(CONFIGS):
        w, a, _ = _case(i, cfg)
        layers[f"l{i}"] = dict(w, **a)
        cases[f"l{i}"] = (w, a)
    path = tmp_path / "cuda.safetensors"
    qmoe.save(path, layers)
    loaded = qmoe.load(path, device="cuda", max_tokens=64)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    lg = rng.standard_normal((T, E)).astype(ml_dtypes.bfloat16)
    for name, (w, a) in cases.items():
        mem = qmoe.Layer(**w, **a, device="cuda", max_tokens=64)
        assert loaded[name].device_bytes == mem.device_bytes
        assert np.array_equal(loaded[name](x, lg).view(np.uint16), mem(x, lg).view(np.uint16)), name
