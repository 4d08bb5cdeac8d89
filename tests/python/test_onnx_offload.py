"""qmoe.onnx.offload / qmoe.onnx.session / ``python -m qmoe.onnx offload``:
ONNX Runtime sessions whose QMoE nodes run on qmoe.

The oracle is ONNX Runtime itself running the original model (its own QMoE
CPU kernel), on a gpt-oss-20b-shaped but small model: 4 QMoE nodes chained
through router MatMuls (+ router bias Add, + residual Add), swiglu fusion 1
with alpha 1.702, beta 1, limit 7, biases, normalize_routing_weights 1,
k = 4 -- the offloaded session must agree within 1e-5 relative (float32).
Where ORT cannot run the source (CUTLASS-prepacked weights, float16, fc3,
router_weights), the oracle is the in-memory qmoe.Layer built from the same
arrays: the session must give its bits.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import qmoe
from qmoe_np import GPT_OSS_SWIGLU, make_layer, record, rel_max_err

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import qmoe.onnx  # noqa: E402
from qmoe.onnx import _session  # noqa: E402
from test_onnx_load import make_model, qmoe_node, quantizer, save, single_model, vi  # noqa: E402

TOL = 1e-5


def gpt_oss_small(seed: int = 0, *, layers: int = 4, E: int = 8, H: int = 64, k: int = 4, bits: int = 4,
                  block: int = 0, elem=TensorProto.FLOAT):
    """The gpt-oss-20b layer stack, small: per layer h -> MatMul(router) + Add(router bias) -> QMoE
    (swiglu fusion 1, 1.702 / 1 / 7, biases, normalize 1) -> Add(residual). Returns (model, specs)."""
    rng = np.random.default_rng(seed)
    fdt = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    nodes, inits, specs = [], [], []
    h = "hidden"
    for j in range(layers):
        w, a, _ = make_layer(rng, E=E, H=H, I=H, bits=bits, block=block, bias=True, activation_type="swiglu",
                             swiglu_fusion=1, quantizer=quantizer, float_dtype=fdt, **GPT_OSS_SWIGLU)
        a.update(k=k, normalize_routing_weights=1)
        p = f"model.layers.{j}.mlp"
        inits.append(numpy_helper.from_array((rng.standard_normal((H, E)) * 0.3).astype(fdt), f"{p}.router.weight"))
        inits.append(numpy_helper.from_array((rng.standard_normal(E) * 0.1).astype(fdt), f"{p}.router.bias"))
        nodes.append(helper.make_node("MatMul", [h, f"{p}.router.weight"], [f"{p}/router_mm"], name=f"{p}/router"))
        nodes.append(helper.make_node("Add", [f"{p}/router_mm", f"{p}.router.bias"], [f"{p}/logits"],
                                      name=f"{p}/router_bias"))
        node, ii = qmoe_node(f"{p}/moe", h, f"{p}/logits", f"{p}/moe_out", w, a, prefix=f"{p}.experts")
        nodes.append(node)
        inits += ii
        nodes.append(helper.make_node("Add", [h, f"{p}/moe_out"], [f"{p}/out"], name=f"{p}/residual"))
        specs.append((f"{p}/moe", w, a))
        h = f"{p}/out"
    nodes.append(helper.make_node("Identity", [h], ["out"], name="final"))
    # [T, H] hidden state (ONNX Runtime's QMoE takes router_probs as [T, E] only)
    model = make_model(nodes, inits, [vi("hidden", ["T", H], elem)], [vi("out", ["T", H], elem)])
    return model, specs


def ort_session(path, threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def hidden(T, H=64, seed=0, dtype=np.float32):
    return np.random.default_rng(seed + T).standard_normal((T, H)).astype(dtype)


# --------------------------------------------------------------------------- the acceptance model

@pytest.mark.parametrize("bits,block", [(4, 0), (4, 32)])
def test_gpt_oss_small_vs_onnxruntime(tmp_path, bits, block):
    model, specs = gpt_oss_small(1 + block, bits=bits, block=block)
    src = save(model, str(tmp_path / "src.onnx"))
    dst = str(tmp_path / "out" / "model.onnx")
    qfile = qmoe.onnx.offload(src, dst)
    assert qfile == str(tmp_path / "out" / "model.qmoe.safetensors") and os.path.exists(qfile)

    # the rewritten graph: no QMoE left, the routers and residuals kept, the expert weights gone
    out = onnx.load(dst)
    ops = [(n.op_type, n.domain) for n in out.graph.node]
    assert ("QMoE", "com.microsoft") not in ops and ops.count(("QmoeLayer", "ai.onnx.contrib")) == 4
    names = {t.name for t in out.graph.initializer}
    assert names == {f"model.layers.{j}.mlp.router.{p}" for j in range(4) for p in ("weight", "bias")}
    moe = [n for n in out.graph.node if n.op_type == "QmoeLayer"]
    assert [n.name for n in moe] == [s[0] for s in specs]
    attrs = {a.name: a.s.decode() for a in moe[0].attribute}
    assert attrs == {"qmoe_file": "model.qmoe.safetensors", "qmoe_layer": specs[0][0], "qmoe_session": "",
                     "qmoe_dtype": "float32"}
    assert os.path.getsize(dst) < 16384
    f = qmoe.open(qfile)
    assert list(f.layers) == [s[0] for s in specs]
    assert f.layers[specs[0][0]].attributes == qmoe.Layer(**specs[0][1], **specs[0][2]).attributes

    want_sess = ort_session(src)
    sess = qmoe.onnx.session(dst, threads=2)
    assert isinstance(sess, ort.InferenceSession)
    assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert sorted(sess.qmoe_layers) == sorted(s[0] for s in specs)
    for T in (1, 16, 37):
        x = hidden(T)
        want = want_sess.run(None, {"hidden": x})[0]
        got = sess.run(None, {"hidden": x})[0]
        assert got.shape == want.shape == x.shape and got.dtype == np.float32
        err = rel_max_err(got, want)
        record("onnx offload: gpt-oss-small session vs ORT", err)
        assert err <= TOL, f"T={T}: {err:.3e}"


def test_external_data_source_elsewhere(tmp_path):
    """Source with all tensors in external data; output in another folder; the source
    removed afterwards: the result stands on its own files."""
    model, specs = gpt_oss_small(3, layers=2)
    (tmp_path / "src").mkdir()
    src = save(model, str(tmp_path / "src" / "m.onnx"), external=True)
    x = hidden(5)
    want = ort_session(src).run(None, {"hidden": x})[0]
    dst = str(tmp_path / "dst" / "sub" / "o.onnx")
    qmoe.onnx.offload(src, dst)
    out = onnx.load(dst, load_external_data=False)
    for t in out.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "o.onnx.data"
    os.rename(tmp_path / "src", tmp_path / "gone")
    got = qmoe.onnx.session(dst, threads=2).run(None, {"hidden": x})[0]
    assert rel_max_err(got, want) <= TOL
    # and ONNX Runtime reads the rewritten external data itself
    assert onnx.load(dst).graph.initializer[0].raw_data


# --------------------------------------------------------------------------- bits of in-memory layers

def _single_session(tmp_path, weights, attrs, **kw):
    src = save(single_model(weights, attrs, **kw), str(tmp_path / "s.onnx"))
    dst = str(tmp_path / "o.onnx")
    return src, dst


def test_router_weights_and_fc3(tmp_path):
    rng = np.random.default_rng(4)
    w, a, _ = make_layer(rng, E=6, H=64, I=32, bits=8, block=16, zero_points=True, activation_type="swiglu",
                         swiglu_fusion=0, quantizer=quantizer)  # fc3: ORT's CPU EP cannot run this
    a.update(k=3, normalize_routing_weights=0)
    src, dst = _single_session(tmp_path, w, a, router_weights=True)
    qmoe.onnx.offload(src, dst)
    node = onnx.load(dst).graph.node[0]
    assert node.op_type == "QmoeLayerWeighted" and list(node.input) == ["input", "router_probs", "router_weights"]
    sess = qmoe.onnx.session(dst, threads=1)
    layer = qmoe.Layer(**w, **a)
    for T in (1, 11):
        x = rng.standard_normal((T, 64)).astype(np.float32)
        lg = rng.standard_normal((T, 6)).astype(np.float32)
        rw = rng.random((T, 6)).astype(np.float32)
        got = sess.run(None, {"input": x, "router_probs": lg, "router_weights": rw})[0]
        assert np.array_equal(got, layer(x, lg, rw))


@pytest.mark.parametrize("how", ["attr1", "layout"])
def test_cutlass_source(tmp_path, how):
    from qmoe._cutlass import raw_to_cutlass

    rng = np.random.default_rng(5)
    w, a, _ = make_layer(rng, E=4, H=128, I=64, bits=4, block=0, activation_type="swiglu", swiglu_fusion=1,
                         quantizer=quantizer, **GPT_OSS_SWIGLU)
    a.update(k=2, normalize_routing_weights=1)
    packed = dict(w, **{f"{fc}_experts_weights": raw_to_cutlass(w[f"{fc}_experts_weights"], 4, fc)
                        for fc in ("fc1", "fc2")})
    src, dst = _single_session(tmp_path, packed, a, prepacked=1 if how == "attr1" else None)
    if how == "layout":
        with pytest.raises(ValueError, match="'moe'.*weights_prepacked"):
            qmoe.onnx.offload(src, dst)
    qmoe.onnx.offload(src, dst, layout="cutlass" if how == "layout" else None)
    x = rng.standard_normal((7, 128)).astype(np.float32)
    lg = rng.standard_normal((7, 4)).astype(np.float32)
    got = qmoe.onnx.session(dst).run(None, {"input": x, "router_probs": lg})[0]
    assert np.array_equal(got, qmoe.Layer(**w, **a)(x, lg))


def test_float_moe_source(tmp_path):
    rng = np.random.default_rng(6)
    E, H, I = 4, 64, 32
    f1 = (rng.standard_normal((E, 2 * I, H)) * 0.1).astype(np.float32)
    b1 = (rng.standard_normal((E, 2 * I)) * 0.1).astype(np.float32)
    f2 = (rng.standard_normal((E, H, I)) * 0.1).astype(np.float32)
    attrs = dict(k=2, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)
    node = helper.make_node("MoE", ["input", "router_probs", "w1", "b1", "w2"], ["output"], name="fm",
                            domain="com.microsoft", **attrs)
    model = make_model([node], [numpy_helper.from_array(f1, "w1"), numpy_helper.from_array(b1, "b1"),
                                numpy_helper.from_array(f2, "w2")],
                       [vi("input", ["T", H]), vi("router_probs", ["T", E])], [vi("output", ["T", H])])
    src = save(model, str(tmp_path / "f.onnx"))
    dst = str(tmp_path / "o.onnx")
    qmoe.onnx.offload(src, dst, bits=8, block_size=32, symmetric=False)
    q1, q2 = qmoe.quantize(f1, 8, 32, False), qmoe.quantize(f2, 8, 32, False)
    layer = qmoe.Layer(fc1_experts_weights=q1.weights, fc1_scales=q1.scales, fc1_zero_points=q1.zero_points,
                       fc1_experts_bias=b1, fc2_experts_weights=q2.weights, fc2_scales=q2.scales,
                       fc2_zero_points=q2.zero_points, expert_weight_bits=8, block_size=32, **attrs)
    x = rng.standard_normal((5, H)).astype(np.float32)
    lg = rng.standard_normal((5, E)).astype(np.float32)
    assert np.array_equal(qmoe.onnx.session(dst).run(None, {"input": x, "router_probs": lg})[0], layer(x, lg))


def _one_float16_node(rng, *, E: int, k: int):
    """A one-node float16 QMoE model (gpt-oss-style swiglu, block 32, H = I = 64): (weights, attrs, model)."""
    w, a, _ = make_layer(rng, E=E, H=64, I=64, bits=4, block=32, bias=True, activation_type="swiglu",
                         swiglu_fusion=1, quantizer=quantizer, float_dtype=np.float16, **GPT_OSS_SWIGLU)
    a.update(k=k, normalize_routing_weights=1)
    node, inits = qmoe_node("moe", "input", "router_probs", "output", w, a)
    model = make_model([node], inits, [vi("input", ["T", 64], TensorProto.FLOAT16),
                                       vi("router_probs", ["T", E], TensorProto.FLOAT16)],
                       [vi("output", ["T", 64], TensorProto.FLOAT16)])
    return w, a, model


def test_float16_model(tmp_path):
    # the stacked model: Casts around each offloaded node, float16 out
    model, _ = gpt_oss_small(7, layers=2, elem=TensorProto.FLOAT16)
    src = save(model, str(tmp_path / "h.onnx"))
    qmoe.onnx.offload(src, str(tmp_path / "o.onnx"))
    nodes = onnx.load(str(tmp_path / "o.onnx")).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("Cast") == 6 and ops.count("QmoeLayer") == 2
    assert all({a.name: a.s for a in n.attribute}["qmoe_dtype"] == b"float16" for n in nodes
               if n.op_type == "QmoeLayer")
    x = hidden(9, dtype=np.float16)
    got = qmoe.onnx.session(str(tmp_path / "o.onnx"), threads=2).run(None, {"hidden": x})[0]
    want = ort_session(src).run(None, {"hidden": x})[0]
    assert got.dtype == np.float16
    err = rel_max_err(got, want)
    record("onnx offload: float16 session vs ORT float16", err)
    assert err <= 2e-3  # float16 rounding of the residual stream (ORT's own MatMul/Add in float16)
    # one float16 node: the session gives the in-memory float16 layer's bits
    rng = np.random.default_rng(14)
    w, a, one = _one_float16_node(rng, E=4, k=2)
    src1 = save(one, str(tmp_path / "one.onnx"))
    qmoe.onnx.offload(src1, str(tmp_path / "one_o.onnx"))
    x = rng.standard_normal((6, 64)).astype(np.float16)
    lg = rng.standard_normal((6, 4)).astype(np.float16)
    y = qmoe.onnx.session(str(tmp_path / "one_o.onnx")).run(None, {"input": x, "router_probs": lg})[0]
    assert y.dtype == np.float16 and np.array_equal(y, qmoe.Layer(**w, **a)(x, lg))


@pytest.mark.skipif(not qmoe.cuda_available(), reason="needs the CUDA backend and a GPU (run on the GPU host)")
def test_cuda_session(tmp_path):
    # device="cuda": a float16 node gives the bits of the in-memory CUDA layer built from the
    # same arrays (the op hands host arrays to the CUDA layer), and of qmoe.onnx.load's layer
    rng = np.random.default_rng(15)
    w, a, one = _one_float16_node(rng, E=8, k=4)
    src = save(one, str(tmp_path / "one.onnx"))
    qmoe.onnx.offload(src, str(tmp_path / "one_o.onnx"))
    sess = qmoe.onnx.session(str(tmp_path / "one_o.onnx"), device="cuda", max_tokens=64)
    mem = qmoe.Layer(**w, **a, device="cuda", max_tokens=64)
    direct = qmoe.onnx.load(src, device="cuda", max_tokens=64)["moe"]
    for T in (1, 16, 70):
        x = rng.standard_normal((T, 64)).astype(np.float16)
        lg = rng.standard_normal((T, 8)).astype(np.float16)
        y = sess.run(None, {"input": x, "router_probs": lg})[0]
        want = mem(x, lg)
        assert y.dtype == np.float16 and y.shape == (T, 64)
        assert np.array_equal(y, want), f"T={T}"
        assert np.array_equal(direct(x, lg), want), f"T={T}"
    # the stacked float16 model on the GPU against ONNX Runtime's float16 CPU run
    model, _ = gpt_oss_small(8, layers=2, elem=TensorProto.FLOAT16)
    src2 = save(model, str(tmp_path / "h.onnx"))
    qmoe.onnx.offload(src2, str(tmp_path / "h_o.onnx"))
    x = hidden(9, dtype=np.float16)
    got = qmoe.onnx.session(str(tmp_path / "h_o.onnx"), device="cuda").run(None, {"hidden": x})[0]
    want = ort_session(src2).run(None, {"hidden": x})[0]
    err = rel_max_err(got, want)
    record("onnx offload: float16 CUDA session vs ORT float16 (CPU)", err)
    assert got.dtype == np.float16 and err <= 1e-2, err


# --------------------------------------------------------------------------- sessions

def test_sessions_share_layers_and_are_released(tmp_path):
    model, specs = gpt_oss_small(8, layers=2)
    src = save(model, str(tmp_path / "m.onnx"))
    dst = str(tmp_path / "o.onnx")
    qmoe.onnx.offload(src, dst)
    x = hidden(3)
    want = ort_session(src).run(None, {"hidden": x})[0]
    s1 = qmoe.onnx.session(dst, threads=2)
    s2 = qmoe.onnx.session(dst, threads=2)
    s3 = qmoe.onnx.session(dst, threads=1)
    name = specs[0][0]
    assert s1.qmoe_layers[name] is s2.qmoe_layers[name]           # same file, same options: shared
    assert s3.qmoe_layers[name] is not s1.qmoe_layers[name]       # other options: its own
    assert s3.qmoe_layers[name].threads == 1 and s1.qmoe_layers[name].threads == 2
    for s in (s1, s2, s3):
        assert rel_max_err(s.run(None, {"hidden": x})[0], want) <= TOL
    # a second offloaded model in the same process (one Python op per op type: shared by all)
    model2, _ = gpt_oss_small(9, layers=1)
    src2 = save(model2, str(tmp_path / "m2.onnx"))
    qmoe.onnx.offload(src2, str(tmp_path / "o2.onnx"))
    s4 = qmoe.onnx.session(str(tmp_path / "o2.onnx"))
    assert rel_max_err(s4.run(None, {"hidden": x})[0], ort_session(src2).run(None, {"hidden": x})[0]) <= TOL
    tokens = {t._qmoe_token for t in (s1, s2, s3, s4)}
    assert len(tokens) == 4 and tokens <= set(_session._SESSIONS)
    del s1, s2, s3, s4, s
    gc.collect()
    assert not tokens & set(_session._SESSIONS)  # the registry lets go with the session


def test_run_time_errors_raise_and_never_abort(tmp_path, caplog):
    rng = np.random.default_rng(10)
    w, a, _ = make_layer(rng, E=4, H=64, I=32, bits=4, block=0, activation_type="relu", quantizer=quantizer)
    a.update(k=2, normalize_routing_weights=1)
    model = single_model(w, a)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "H"  # ORT no longer checks H
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "E"
    src = save(model, str(tmp_path / "s.onnx"))
    dst = str(tmp_path / "o.onnx")
    qmoe.onnx.offload(src, dst)
    sess = qmoe.onnx.session(dst)
    bad = {"input": np.zeros((2, 60), np.float32), "router_probs": np.zeros((2, 4), np.float32)}
    with caplog.at_level(logging.ERROR, logger="qmoe.onnx"):
        with pytest.raises(ValueError) as ei:
            sess.run(None, bad)
    assert "'moe'" in str(ei.value) and "o.onnx" in str(ei.value)
    assert any("'moe'" in r.getMessage() for r in caplog.records)
    # the session goes on working
    x = rng.standard_normal((3, 64)).astype(np.float32)
    lg = rng.standard_normal((3, 4)).astype(np.float32)
    assert np.array_equal(sess.run(None, {"input": x, "router_probs": lg})[0], qmoe.Layer(**w, **a)(x, lg))
    # a session built by hand (no qmoe.onnx.session): NaNs and a logged error, no abort
    from onnxruntime_extensions import get_library_path

    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    plain = ort.InferenceSession(dst, so, providers=["CPUExecutionProvider"])
    with caplog.at_level(logging.ERROR, logger="qmoe.onnx"):
        y = plain.run(None, {"input": x, "router_probs": lg})[0]
    assert np.isnan(y).all() and any("qmoe.onnx.session" in r.getMessage() for r in caplog.records)


def test_session_refusals(tmp_path):
    w, a, _ = make_layer(np.random.default_rng(11), E=4, H=64, I=32, activation_type="relu", quantizer=quantizer)
    src = save(single_model(w, a), str(tmp_path / "s.onnx"))
    with pytest.raises(ValueError, match="no ai.onnx.contrib::QmoeLayer node"):
        qmoe.onnx.session(src)
    dst = str(tmp_path / "o.onnx")
    qfile = qmoe.onnx.offload(src, dst)
    model = onnx.load(dst)
    for value, needle in (("../o.qmoe.safetensors", "outside the model's folder"),
                          (os.path.abspath(qfile), "is absolute"), ("none.safetensors", "does not exist")):
        for at in model.graph.node[0].attribute:
            if at.name == "qmoe_file":
                at.s = value.encode()
        onnx.save_model(model, str(tmp_path / "bad.onnx"))
        with pytest.raises(ValueError, match=needle):
            qmoe.onnx.session(str(tmp_path / "bad.onnx"))
    for at in model.graph.node[0].attribute:
        if at.name == "qmoe_file":
            at.s = b"o.qmoe.safetensors"
        if at.name == "qmoe_layer":
            at.s = b"nope"
    onnx.save_model(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ValueError, match="nope"):
        qmoe.onnx.session(str(tmp_path / "bad.onnx"))
    with pytest.raises(TypeError, match="not_an_option"):
        qmoe.onnx.session(dst, not_an_option=1)
    # qmoe's CUDA backend computes in float16/bfloat16: a float32 node is refused by name
    with pytest.raises(ValueError, match="'moe'.*qmoe_dtype.*float32"):
        qmoe.onnx.session(dst, device="cuda")


def test_offload_refusals(tmp_path):
    w, a, _ = make_layer(np.random.default_rng(12), E=4, H=64, I=32, activation_type="relu", quantizer=quantizer)
    src = save(single_model(w, a), str(tmp_path / "s.onnx"), external=True)
    with pytest.raises(ValueError, match="overwrite"):
        qmoe.onnx.offload(src, src)
    plain = make_model([helper.make_node("Identity", ["x"], ["y"])], [], [vi("x", [2])], [vi("y", [2])])
    with pytest.raises(ValueError, match="nothing to offload"):
        qmoe.onnx.offload(save(plain, str(tmp_path / "p.onnx")), str(tmp_path / "q.onnx"))
    with pytest.raises(ValueError, match="layout"):
        qmoe.onnx.offload(src, str(tmp_path / "q.onnx"), layout="cuda")


# --------------------------------------------------------------------------- the command line

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qmoe.onnx", *args], capture_output=True, text=True, timeout=300)


def test_cli(tmp_path):
    model, _ = gpt_oss_small(13, layers=2)
    src = save(model, str(tmp_path / "m.onnx"))
    dst = str(tmp_path / "o.onnx")
    r = _cli("offload", src, "-o", dst, "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "2 layer(s) offloaded" in r.stdout and "checked" in r.stdout
    x = hidden(4)
    assert rel_max_err(qmoe.onnx.session(dst).run(None, {"hidden": x})[0],
                       ort_session(src).run(None, {"hidden": x})[0]) <= TOL
    r = _cli("offload", src)                                    # no -o: usage
    assert r.returncode == 2 and "-o" in r.stderr
    r = _cli("offload", src, "-o", dst, "--layout", "gpu")      # bad choice: usage
    assert r.returncode == 2
    r = _cli("offload", str(tmp_path / "missing.onnx"), "-o", dst)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "missing.onnx" in r.stderr
    r = _cli("offload", src, "-o", src)
    assert r.returncode == 1 and "overwrite" in r.stderr


def test_bfloat16_node(tmp_path):
    """ORT's CPU EP has no bfloat16 QMoE, but Cast works: the offloaded node runs (oracle: the
    in-memory bfloat16 layer)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(15)
    w, a, _ = make_layer(rng, E=4, H=64, I=32, bits=4, block=0, bias=True, activation_type="silu",
                         quantizer=quantizer, float_dtype=bf16)
    a.update(k=2, normalize_routing_weights=1)
    node, inits = qmoe_node("moe", "input", "router_probs", "output", w, a)
    model = make_model([node], inits, [vi("input", ["T", 64], TensorProto.BFLOAT16),
                                       vi("router_probs", ["T", 4], TensorProto.BFLOAT16)],
                       [vi("output", ["T", 64], TensorProto.BFLOAT16)])
    src = save(model, str(tmp_path / "b.onnx"))
    qmoe.onnx.offload(src, str(tmp_path / "o.onnx"))
    x = rng.standard_normal((5, 64)).astype(bf16)
    lg = rng.standard_normal((5, 4)).astype(bf16)
    # ORT's Python API takes bfloat16 as OrtValues of the raw 16-bit words
    feed = {n: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v.view(np.uint16), TensorProto.BFLOAT16)
            for n, v in (("input", x), ("router_probs", lg))}
    # ... and gives none back: read the output through an exact Cast to float32
    out = onnx.load(str(tmp_path / "o.onnx"))
    out.graph.node.append(helper.make_node("Cast", ["output"], ["output_f32"], to=TensorProto.FLOAT))
    del out.graph.output[:]
    out.graph.output.append(vi("output_f32", ["T", 64]))
    onnx.save_model(out, str(tmp_path / "o32.onnx"))
    (y,) = qmoe.onnx.session(str(tmp_path / "o32.onnx")).run_with_ort_values(None, feed)
    want = qmoe.Layer(**w, **a)(x, lg)
    assert np.array_equal(y.numpy(), want.astype(np.float32))


def test_qmoe_imports_without_onnx():
    """import qmoe / qmoe.onnx must not need onnx, onnxruntime, onnxruntime-extensions or torch."""
    code = ("import sys\n"
            "for m in ('onnx', 'onnxruntime', 'onnxruntime_extensions', 'torch'): sys.modules[m] = None\n"
            "import qmoe, qmoe.onnx\n"
            "assert callable(qmoe.onnx.load) and callable(qmoe.onnx.session)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
