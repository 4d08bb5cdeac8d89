"""qmoe.onnx.export: qmoe-style layer dicts written as com.microsoft::QMoE models.

Oracles:

* ONNX Runtime 1.32's CPU EP runs the exported model; its output must match
  the in-memory ``qmoe.Layer`` built from the same dict within 1e-5 relative
  (float32) on the configurations ORT's CPU kernel computes exactly with
  constant weights: 4-bit row- or block-wise and 8-bit row-wise, zero points
  or not, biases or not, swiglu (fusion 1, gpt-oss constants) / relu / gelu
  / silu / identity, k 1..4, ``normalize_routing_weights = 1`` (ORT's CPU EP
  always renormalizes).
* Round trip: export -> qmoe.onnx.load gives the same bits as the in-memory
  Layer, over configurations ORT cannot run too (fusion 0 with fc3, fusion 2,
  8-bit block-wise, normalize 0, router_weights, float16).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

import qmoe
from qmoe_np import GPT_OSS_SWIGLU, make_layer, record, rel_max_err

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import qmoe.onnx  # noqa: E402
from qmoe.onnx import _export  # noqa: E402

TOL = 1e-5


def quantizer(w, bits, block, symmetric):
    return tuple(qmoe.quantize(w, bits, block, symmetric))


def layer_dict(seed, *, E=6, H=64, I=48, bits=4, block=0, zp=False, bias=True, act="swiglu", fusion=1, k=2,
               norm=1, float_dtype=np.float32):
    rng = np.random.default_rng(seed)
    extra = dict(GPT_OSS_SWIGLU) if act == "swiglu" else {}
    w, a, _ = make_layer(rng, E=E, H=H, I=I, bits=bits, block=block, zero_points=zp, bias=bias,
                         activation_type=act, swiglu_fusion=fusion if act == "swiglu" else 0,
                         quantizer=quantizer, float_dtype=float_dtype, **extra)
    return dict(w, **a, k=k, normalize_routing_weights=norm)


def split(d):
    w = {k: v for k, v in d.items() if isinstance(v, np.ndarray)}
    a = {k: v for k, v in d.items() if k not in w and k != "router_weights"}
    return w, a


def session(path, threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def acts(seed, T, H, E, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T, H)).astype(dtype), rng.standard_normal((T, E)).astype(dtype),
            rng.random((T, E)).astype(dtype))


# --------------------------------------------------------------------------- ONNX Runtime runs the export

def _ort_configs():
    out = []
    quants = [(4, 0), (4, 32), (4, 64), (8, 0)]
    for i, ((bits, block), zp, bias, act) in enumerate(itertools.product(
            quants, [False, True], [False, True], ["swiglu", "relu", "gelu", "silu", "identity"])):
        out.append(pytest.param(bits, block, zp, bias, act, 1 + i % 4, i,
                                id=f"b{bits}-blk{block}-{'zp' if zp else 'sym'}-{'bias' if bias else 'nob'}-"
                                   f"{act}-k{1 + i % 4}"))
    return out


@pytest.mark.parametrize("bits,block,zp,bias,act,k,seed", _ort_configs())
def test_onnxruntime_runs_export(tmp_path, bits, block, zp, bias, act, k, seed):
    shape = dict(H=64, I=48) if block == 0 else dict(H=128, I=64)
    d = layer_dict(seed, bits=bits, block=block, zp=zp, bias=bias, act=act, k=k, **shape)
    path = qmoe.onnx.export(str(tmp_path / "m.onnx"), {"moe": d})
    sess = session(path)
    layer = qmoe.Layer(**split(d)[0], **split(d)[1], threads=2)
    for T in (1, 7, 40):
        x, lg, _ = acts(seed + T, T, shape["H"], 6)
        want = sess.run(None, {"input": x, "router_probs": lg})[0]
        got = layer(x, lg)
        err = rel_max_err(got, want)
        record("onnx export: ORT runs the export", err)
        assert err <= TOL, f"T={T}: {err:.3e}"


def test_graph_interface(tmp_path):
    d = layer_dict(1, block=32, H=128, I=64, zp=True)
    path = qmoe.onnx.export(str(tmp_path / "m.onnx"), {"blocks.0.moe": d})
    model = onnx.load(path)
    g = model.graph
    assert [i.name for i in g.input] == ["input", "router_probs"]
    assert [o.name for o in g.output] == ["output"]
    assert [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim] == ["T", 128]
    assert [d.dim_param or d.dim_value for d in g.input[1].type.tensor_type.shape.dim] == ["T", 6]
    (node,) = g.node
    assert (node.op_type, node.domain, node.name) == ("QMoE", "com.microsoft", "blocks.0.moe")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["weights_prepacked"] == 0 and attrs["block_size"] == 32 and attrs["k"] == 2
    assert attrs["activation_type"] == b"swiglu" and attrs["swiglu_fusion"] == 1
    assert abs(attrs["swiglu_limit"] - 7.0) < 1e-6 and abs(attrs["activation_alpha"] - 1.702) < 1e-6
    names = {t.name for t in g.initializer}
    assert names == {f"blocks.0.moe.{n}" for n in split(d)[0]}
    assert list(node.input[:2]) == ["input", "router_probs"] and node.input[3] == "blocks.0.moe.fc1_scales"
    assert not os.path.exists(path + ".data")


def test_several_layers_and_router_weights(tmp_path):
    layers = {"a": layer_dict(2, act="relu"), "b": dict(layer_dict(3, bits=8, act="silu", k=3), router_weights=True)}
    path = qmoe.onnx.export(str(tmp_path / "m.onnx"), layers)
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["a.input", "a.router_probs", "b.input", "b.router_probs",
                                                   "b.router_weights"]
    assert [o.name for o in sess.get_outputs()] == ["a.output", "b.output"]
    x, lg, rw = acts(4, 5, 64, 6)
    ya, yb = sess.run(None, {"a.input": x, "a.router_probs": lg, "b.input": x, "b.router_probs": lg,
                             "b.router_weights": rw})
    wa, aa = split(layers["a"])
    wb, ab = split(layers["b"])
    assert rel_max_err(qmoe.Layer(**wa, **aa)(x, lg), ya) <= TOL
    # ORT's CPU EP mixes with router_weights (renormalized: normalize_routing_weights = 1)
    err = rel_max_err(qmoe.Layer(**wb, **ab)(x, lg, rw), yb)
    record("onnx export: ORT with router_weights", err)
    assert err <= TOL
    loaded = qmoe.onnx.load(path)
    assert list(loaded) == ["a", "b"]
    assert np.array_equal(loaded["b"](x, lg, rw), qmoe.Layer(**wb, **ab)(x, lg, rw))


# --------------------------------------------------------------------------- round trip

def _roundtrip_configs():
    acts_ = [("swiglu", 0), ("swiglu", 1), ("swiglu", 2), ("relu", 0), ("gelu", 0), ("silu", 0), ("identity", 0)]
    out = []
    for i, ((bits, block), zp, (act, fusion)) in enumerate(itertools.product(
            [(4, 0), (4, 16), (8, 0), (8, 32)], [False, True], acts_)):
        out.append(pytest.param(bits, block, zp, act, fusion, i,
                                id=f"b{bits}-blk{block}-{'zp' if zp else 'sym'}-{act}{fusion}"))
    return out


@pytest.mark.parametrize("bits,block,zp,act,fusion,seed", _roundtrip_configs())
def test_roundtrip_same_bits(tmp_path, bits, block, zp, act, fusion, seed):
    rw = seed % 3 == 0
    d = layer_dict(seed, bits=bits, block=block, zp=zp, act=act, fusion=fusion, bias=seed % 2 == 0,
                   k=1 + seed % 4, norm=seed % 2, H=64, I=48 if block != 32 else 64)
    if rw:
        d["router_weights"] = True
    path = qmoe.onnx.export(str(tmp_path / "m.onnx"), {"L": d}, external_data=seed % 5 == 0)
    layer = qmoe.onnx.load(path)["L"]
    w, a = split(d)
    want = qmoe.Layer(**w, **a)
    for T in (1, 8):
        x, lg, r = acts(seed + T, T, 64, 6)
        r = r if rw else None
        assert np.array_equal(layer(x, lg, r), want(x, lg, r))


@pytest.mark.parametrize("scales", [np.float16, np.float32])
def test_float16(tmp_path, scales):
    d = layer_dict(7, act="swiglu", float_dtype=np.float16)
    for fc in ("fc1", "fc2"):
        d[f"{fc}_scales"] = d[f"{fc}_scales"].astype(scales)
    path = qmoe.onnx.export(str(tmp_path / "m.onnx"), {"L": d})
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    w, a = split(d)
    want = qmoe.Layer(**w, **a)
    x, lg, _ = acts(8, 6, 64, 6, np.float16)
    y = qmoe.onnx.load(path)["L"](x, lg)
    assert y.dtype == np.float16 and np.array_equal(y, want(x, lg))
    got = session(path).run(None, {"input": x, "router_probs": lg})[0]
    assert got.dtype == np.float16
    err = rel_max_err(got, y)
    record("onnx export: ORT float16 vs qmoe float16", err)
    assert err <= 2e-3  # both round to float16 at the edges; ORT's float16 kernel differs inside


def test_external_data(tmp_path, monkeypatch):
    d = layer_dict(9, bits=8)
    w, a = split(d)
    weight_bytes = sum(v.nbytes for v in w.values())
    path = qmoe.onnx.export(str(tmp_path / "ext.onnx"), {"L": d}, external_data=True)
    assert os.path.getsize(path + ".data") >= weight_bytes and os.path.getsize(path) < 4096
    x, lg, _ = acts(1, 3, 64, 6)
    assert rel_max_err(qmoe.Layer(**w, **a)(x, lg), session(path).run(None, {"input": x, "router_probs": lg})[0]) \
        <= TOL
    model = onnx.load(path, load_external_data=False)
    offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in model.graph.initializer]
    assert all(o % 64 == 0 for o in offsets)
    # the automatic choice: above the protobuf limit the data goes external
    monkeypatch.setattr(_export, "_PROTO_LIMIT", weight_bytes - 1)
    auto = qmoe.onnx.export(str(tmp_path / "auto.onnx"), {"L": d})
    assert os.path.exists(auto + ".data")
    assert np.array_equal(qmoe.onnx.load(auto)["L"](x, lg), qmoe.Layer(**w, **a)(x, lg))
    with pytest.raises(ValueError, match="external_data=False"):
        qmoe.onnx.export(str(tmp_path / "no.onnx"), {"L": d}, external_data=False)
    monkeypatch.undo()
    qmoe.onnx.export(str(tmp_path / "small.onnx"), {"L": d})
    assert not os.path.exists(str(tmp_path / "small.onnx.data"))


# --------------------------------------------------------------------------- refusals

def test_refusals(tmp_path):
    p = str(tmp_path / "m.onnx")
    d = layer_dict(11)
    with pytest.raises(ValueError, match="'L'.*fc1_scales is missing"):
        qmoe.onnx.export(p, {"L": {k: v for k, v in d.items() if k != "fc1_scales"}})
    with pytest.raises(ValueError, match="'L'.*unknown key 'fc1_weight'"):
        qmoe.onnx.export(p, {"L": dict(d, fc1_weight=d["fc1_experts_weights"])})
    with pytest.raises(ValueError, match="'L'.*fc1_experts_bias.*float32.*float16"):
        qmoe.onnx.export(p, {"L": d}, dtype="float16")
    with pytest.raises(ValueError, match="'L'.*fc2_scales"):  # the layer itself validates
        qmoe.onnx.export(p, {"L": dict(d, fc2_scales=d["fc2_scales"][:, :3].copy())})
    with pytest.raises(ValueError, match="'L'.*router_weights"):
        qmoe.onnx.export(p, {"L": dict(d, router_weights="yes")})
    with pytest.raises(ValueError, match="'L'.*k: expected an integer"):
        qmoe.onnx.export(p, {"L": dict(d, k=2.5)})
    with pytest.raises(ValueError, match="dtype"):
        qmoe.onnx.export(p, {"L": d}, dtype="float64")
    with pytest.raises(ValueError, match="at least one layer"):
        qmoe.onnx.export(p, {})
    assert not os.path.exists(p)
    # qmoe.save-style extras are accepted and not written
    qmoe.onnx.export(p, {"L": dict(d, extra={"router.weight": np.zeros((6, 64), np.float32)},
                                   metadata={"source": "test"})})
    assert {t.name for t in onnx.load(p).graph.initializer} == {f"L.{n}" for n in split(d)[0]}


@pytest.mark.parametrize("external", [False, True])
def test_bfloat16_roundtrip(tmp_path, external):
    """bfloat16 scales/biases and activations: written (inline or external) and loaded to the same bits
    (ONNX Runtime's CPU EP has no bfloat16 QMoE: no ORT run here)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    d = layer_dict(13, float_dtype=bf16, block=16, zp=True)
    path = qmoe.onnx.export(str(tmp_path / "m.onnx"), {"L": d}, external_data=external)
    assert onnx.load(path).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    w, a = split(d)
    x, lg, _ = acts(14, 5, 64, 6)
    x, lg = x.astype(bf16), lg.astype(bf16)
    y = qmoe.onnx.load(path)["L"](x, lg)
    assert y.dtype == bf16 and np.array_equal(y.view(np.uint16), qmoe.Layer(**w, **a)(x, lg).view(np.uint16))
