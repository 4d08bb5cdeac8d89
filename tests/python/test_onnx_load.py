"""qmoe.onnx.load: QMoE / MoE nodes of ONNX models as qmoe.Layer objects.

The models are built here with onnx.helper (not with qmoe.onnx.export), and
the oracles are independent of the loader:

* the in-memory ``qmoe.Layer`` built from the very arrays put in the model:
  the loaded layer must give the same bits (np.array_equal) -- over a sweep
  of 4/8-bit, row/block-wise, zero points, biases, every activation
  (swiglu fusion 0 with fc3, 1 and 2), router_weights; inline initializers,
  Constant nodes and external data files;
* CUTLASS-prepacked weights (``weights_prepacked = 1``, packed with
  qmoe._cutlass.raw_to_cutlass and, where torch is present, ONNX Runtime's
  own packer) load to the bits of the raw layer;
* a float ``com.microsoft::MoE`` node loads like ``qmoe.Layer`` built from
  ``qmoe.quantize`` of the same floats;
* ONNX Runtime's CPU EP running a model of two QMoE nodes chained through
  router MatMuls, against the loaded layers driven from NumPy (<= 1e-5).

Every refusal is checked by the names its message must carry.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Dict, Optional

import numpy as np
import pytest

import qmoe
from qmoe_np import GPT_OSS_SWIGLU, ORT_INPUTS, make_layer, record, rel_max_err

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import qmoe.onnx  # noqa: E402

TOL = 1e-5
MS = "com.microsoft"


def quantizer(w, bits, block, symmetric):
    return tuple(qmoe.quantize(w, bits, block, symmetric))


def random_layer(seed: int, *, E=6, H=64, I=48, bits=4, block=0, zp=False, bias=True, act="swiglu",
                 fusion=1, **extra):
    """(weights, attrs) of a random raw layer built with qmoe.quantize."""
    rng = np.random.default_rng(seed)
    if act == "swiglu" and not extra:
        extra = dict(GPT_OSS_SWIGLU)
    w, a, _ = make_layer(rng, E=E, H=H, I=I, bits=bits, block=block, zero_points=zp, bias=bias,
                         activation_type=act, swiglu_fusion=fusion, quantizer=quantizer, **extra)
    return w, a


def node_attrs(attrs: Dict[str, Any], *, prepacked: Optional[int] = 0, **more) -> Dict[str, Any]:
    """ONNX attributes of a QMoE node from qmoe-style attrs (block_size 0 left out)."""
    out = {k: v for k, v in attrs.items() if not (k == "block_size" and v == 0)}
    if prepacked is not None:
        out["weights_prepacked"] = prepacked
    out.update(more)
    return out


def qmoe_node(name: str, x: str, logits: str, out: str, weights: Dict[str, np.ndarray], attrs: Dict[str, Any],
              *, router_weights: Optional[str] = None, prepacked: Optional[int] = 0, prefix: Optional[str] = None,
              extra_inputs: Optional[Dict[int, str]] = None, **more):
    """(QMoE node, initializers): weights become initializers '<prefix>.<ORT name>'."""
    prefix = name if prefix is None else prefix
    inputs = [x, logits] + [""] * 12
    inits = []
    for i, key in enumerate(ORT_INPUTS[2:14]):
        if key in weights:
            inputs[2 + i] = f"{prefix}.{key}"
            inits.append(numpy_helper.from_array(np.ascontiguousarray(weights[key]), inputs[2 + i]))
    if router_weights:
        inputs.append(router_weights)
    for i, tname in (extra_inputs or {}).items():
        inputs += [""] * (i + 1 - len(inputs))
        inputs[i] = tname
    while not inputs[-1]:
        inputs.pop()
    node = helper.make_node("QMoE", inputs, [out], name=name, domain=MS,
                            **node_attrs(attrs, prepacked=prepacked, **more))
    return node, inits


def make_model(nodes, inits, inputs, outputs, *, opset=21):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                             ir_version=10)


def vi(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def single_model(weights, attrs, *, router_weights=False, **kw):
    """A one-node QMoE model: inputs (input, router_probs[, router_weights]) -> output."""
    E = weights["fc1_experts_weights"].shape[0]
    H = weights["fc2_experts_weights"].shape[1]
    node, inits = qmoe_node("moe", "input", "router_probs", "output", weights, attrs,
                            router_weights="router_weights" if router_weights else None, **kw)
    ins = [vi("input", ["T", H]), vi("router_probs", ["T", E])]
    if router_weights:
        ins.append(vi("router_weights", ["T", E]))
    return make_model([node], inits, ins, [vi("output", ["T", H])])


def save(model, path, external=False):
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".bin", size_threshold=0)
    else:
        onnx.save_model(model, path)
    return path


def activations(seed: int, T: int, H: int, E: int, router_weights: bool = False):
    rng = np.random.default_rng(seed + 99)
    x = rng.standard_normal((T, H)).astype(np.float32)
    lg = rng.standard_normal((T, E)).astype(np.float32)
    rw = rng.random((T, E)).astype(np.float32) if router_weights else None
    return x, lg, rw


def assert_same_bits(loaded: qmoe.Layer, weights, attrs, seed: int, router_weights=False):
    want_layer = qmoe.Layer(**weights, **attrs, threads=2)
    E = weights["fc1_experts_weights"].shape[0]
    H = weights["fc2_experts_weights"].shape[1]
    for T in (1, 9):
        x, lg, rw = activations(seed + T, T, H, E, router_weights)
        got, want = loaded(x, lg, rw), want_layer(x, lg, rw)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want), f"T={T}: loaded layer differs, max |diff| {np.abs(got - want).max()}"


# --------------------------------------------------------------------------- the sweep

ACTS = [("swiglu", 1), ("swiglu", 2), ("swiglu", 0), ("relu", 0), ("gelu", 0), ("silu", 0), ("identity", 0)]


def _sweep():
    out = []
    for i, (bits, block, zp, bias, (act, fusion)) in enumerate(
            itertools.product([4, 8], [0, 32], [False, True], [False, True], ACTS)):
        rw = i % 3 == 0   # router_weights on a third of the cases
        k = 1 + i % 4
        norm = i % 2
        out.append(pytest.param(bits, block, zp, bias, act, fusion, rw, k, norm, i,
                                id=f"b{bits}-blk{block}-{'zp' if zp else 'sym'}-{'bias' if bias else 'nob'}-"
                                   f"{act}{fusion if act == 'swiglu' else ''}-k{k}-n{norm}{'-rw' if rw else ''}"))
    return out


@pytest.mark.parametrize("bits,block,zp,bias,act,fusion,rw,k,norm,seed", _sweep())
def test_load_same_bits(tmp_path, bits, block, zp, bias, act, fusion, rw, k, norm, seed):
    shape = dict(H=64, I=48) if block == 0 else dict(H=96, I=64)  # 48 rows: partial tiles; 3 and 2 blocks
    w, a = random_layer(seed, bits=bits, block=block, zp=zp, bias=bias, act=act, fusion=fusion, **shape)
    a.update(k=k, normalize_routing_weights=norm)
    path = save(single_model(w, a, router_weights=rw), str(tmp_path / "m.onnx"), external=seed % 4 == 1)
    layers = qmoe.onnx.load(path, threads=2)
    assert list(layers) == ["moe"]
    assert layers["moe"].attributes == {**qmoe.Layer(**w, **a).attributes}
    assert_same_bits(layers["moe"], w, a, seed, rw)


@pytest.mark.parametrize("external", [False, True])
def test_external_data_and_constants(tmp_path, external):
    """External data in one file beside the model (every tensor, size_threshold=0) and
    weights given by Constant nodes; typed (non-raw) tensor fields too."""
    w, a = random_layer(5, bits=8, block=32, zp=True, H=96, I=64)
    a.update(k=2, normalize_routing_weights=1)
    model = single_model(w, a)
    if not external:
        # fc2_scales as a Constant node holding float_data (not raw_data)
        node = model.graph.node[0]
        name = node.input[6]
        init = next(t for t in model.graph.initializer if t.name == name)
        model.graph.initializer.remove(init)
        const = helper.make_tensor(name, TensorProto.FLOAT, list(init.dims),
                                   w["fc2_scales"].reshape(-1).tolist(), raw=False)
        model.graph.node.insert(0, helper.make_node("Constant", [], [name], value=const))
    path = save(model, str(tmp_path / "m.onnx"), external=external)
    if external:
        assert os.path.getsize(tmp_path / "m.onnx.bin") >= sum(v.nbytes for v in w.values())
        assert os.path.getsize(path) < 4096
    layers = qmoe.onnx.load(path, threads=2)
    assert_same_bits(layers["moe"], w, a, 5)


def test_unnamed_nodes_and_order(tmp_path):
    w1, a1 = random_layer(1, act="relu", fusion=0)
    w2, a2 = random_layer(2, act="gelu", fusion=0, bits=8)
    n1, i1 = qmoe_node("", "x", "p", "y1", w1, a1, prefix="l1")
    n2, i2 = qmoe_node("second", "x", "p", "y2", w2, a2)
    model = make_model([helper.make_node("Identity", ["x"], ["xi"]), n1, n2], i1 + i2,
                       [vi("x", ["T", 64]), vi("p", ["T", 6])], [vi("y1", ["T", 64]), vi("y2", ["T", 64])])
    layers = qmoe.onnx.load(save(model, str(tmp_path / "m.onnx")), threads=1)
    assert list(layers) == ["QMoE_1", "second"]
    assert_same_bits(layers["QMoE_1"], w1, a1, 1)
    assert_same_bits(layers["second"], w2, a2, 2)


# --------------------------------------------------------------------------- weights_prepacked

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("how", ["attr1", "absent+cutlass", "ort_packer"])
def test_cutlass_prepacked(tmp_path, bits, how):
    from qmoe._cutlass import raw_to_cutlass

    # N and K meet the SM80 layout: K % 64 == 0, N % (8 * pack) == 0
    w, a = random_layer(10 + bits, E=3, H=128, I=64, bits=bits, block=0, act="swiglu", fusion=1)
    packed = dict(w)
    for fc in ("fc1", "fc2"):
        key = f"{fc}_experts_weights"
        if how == "ort_packer":
            pytest.importorskip("torch")
            import logging

            from onnxruntime.quantization.cuda_quantizer import _pack_weights_for_cuda_mixed_gemm

            logging.getLogger("onnxruntime.quantization.cuda_quantizer").setLevel(logging.ERROR)
            e, n, kp = w[key].shape
            packed[key] = np.stack([
                np.asarray(_pack_weights_for_cuda_mixed_gemm(w[key][i], n, kp * (8 // bits), bits,
                                                             force_arch=80)).view(np.uint8)
                for i in range(e)]).reshape(e, n, kp)
        else:
            packed[key] = raw_to_cutlass(w[key], bits, key)
        assert not np.array_equal(packed[key], w[key])
    model = single_model(packed, a, prepacked=None if how == "absent+cutlass" else 1)
    path = save(model, str(tmp_path / "m.onnx"))
    layers = qmoe.onnx.load(path, threads=2, prepacked_layout="cutlass" if how == "absent+cutlass" else None)
    assert_same_bits(layers["moe"], w, a, 3)


def test_absent_weights_prepacked(tmp_path):
    w, a = random_layer(4, act="relu", fusion=0)
    path = save(single_model(w, a, prepacked=None), str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError) as ei:
        qmoe.onnx.load(path)
    msg = str(ei.value)
    assert "'moe'" in msg and "weights_prepacked" in msg and "prepacked_layout" in msg and path in msg
    assert_same_bits(qmoe.onnx.load(path, prepacked_layout="raw")["moe"], w, a, 4)
    with pytest.raises(ValueError, match="prepacked_layout"):
        qmoe.onnx.load(path, prepacked_layout="cuda")


def test_cutlass_shape_refused(tmp_path):
    w, a = random_layer(6, E=2, H=64, I=40, act="relu", fusion=0)  # N = 40: not a multiple of 16
    path = save(single_model(w, a, prepacked=1), str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match=r"'moe'.*fc1_experts_weights.*CUTLASS.*N = 40"):
        qmoe.onnx.load(path)


# --------------------------------------------------------------------------- refusals

def _refused(tmp_path, model, *needles, external=False, **load_kw):
    path = save(model, str(tmp_path / "bad.onnx"), external=external)
    with pytest.raises(ValueError) as ei:
        qmoe.onnx.load(path, **load_kw)
    msg = str(ei.value)
    for n in ("bad.onnx",) + needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_refuse_quant_type(tmp_path):
    w, a = random_layer(7)
    _refused(tmp_path, single_model(w, a, quant_type="fp4"), "'moe'", "quant_type", "fp4")


def test_refuse_global_scale_input(tmp_path):
    w, a = random_layer(7)
    model = single_model(w, a, extra_inputs={15: "gs"})
    model.graph.initializer.append(numpy_helper.from_array(np.ones(6, np.float32), "gs"))
    _refused(tmp_path, model, "'moe'", "input 15", "fc1_global_scale", "'gs'")


def test_refuse_sparse_mixer(tmp_path):
    w, a = random_layer(7, act="relu", fusion=0)
    _refused(tmp_path, single_model(w, dict(a, use_sparse_mixer=1, k=2)), "'moe'", "use_sparse_mixer")


def test_refuse_other_attributes(tmp_path):
    w, a = random_layer(7)
    _refused(tmp_path, single_model(w, a, swiglu_limit_after_activation=1), "swiglu_limit_after_activation")
    _refused(tmp_path, single_model(w, a, fc2_expert_weight_bits=8), "fc2_expert_weight_bits")
    _refused(tmp_path, single_model(w, a, weights_prepacked_typo=1), "weights_prepacked_typo")
    _refused(tmp_path, single_model(w, a, prepacked=2), "weights_prepacked", "got 2")


def test_refuse_weight_fed_at_run_time(tmp_path):
    w, a = random_layer(7)
    model = single_model(w, a)
    name = model.graph.node[0].input[3]
    init = next(t for t in model.graph.initializer if t.name == name)
    model.graph.initializer.remove(init)
    model.graph.input.append(vi(name, list(init.dims)))
    _refused(tmp_path, model, "'moe'", "fc1_scales", name, "graph input")


def _external_model(tmp_path, edit):
    """A model saved with external data, then its fc1 weights' external_data entries edited."""
    w, a = random_layer(8)
    path = save(single_model(w, a), str(tmp_path / "bad.onnx"), external=True)
    model = onnx.load(path, load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name.endswith("fc1_experts_weights"))
    info = {e.key: e for e in t.external_data}
    edit(info, t)
    onnx.save_model(model, path)
    return path, t.name


@pytest.mark.parametrize("case", ["parent", "absolute", "offset", "length", "missing"])
def test_refuse_external_locations(tmp_path, case):
    sub = tmp_path / "model"
    sub.mkdir()
    outside = tmp_path / "x.bin"
    outside.write_bytes(b"\0" * (1 << 16))

    def edit(info, t):
        if case == "parent":
            info["location"].value = "../x.bin"
        elif case == "absolute":
            info["location"].value = str(outside)
        elif case == "offset":
            info["offset"].value = str(1 << 40)
        elif case == "length":
            info["length"].value = str(int(info["length"].value) + 1)
        else:
            info["location"].value = "nothere.bin"

    path, tname = _external_model(sub, edit)
    with pytest.raises(ValueError) as ei:
        qmoe.onnx.load(path)
    msg = str(ei.value)
    assert "bad.onnx" in msg and "'moe'" in msg and tname in msg
    assert {"parent": "outside the model's folder", "absolute": "is absolute", "offset": "lies outside",
            "length": "length", "missing": "does not exist"}[case] in msg


def test_refuse_symlink_escape(tmp_path):
    sub = tmp_path / "model"
    sub.mkdir()
    path, tname = _external_model(sub, lambda info, t: None)
    data = sub / "bad.onnx.bin"
    os.replace(data, tmp_path / "real.bin")
    os.symlink(tmp_path / "real.bin", data)
    with pytest.raises(ValueError, match="outside the model's folder"):
        qmoe.onnx.load(path)


def test_refuse_duplicate_names(tmp_path):
    w, a = random_layer(9, act="relu", fusion=0)
    n1, i1 = qmoe_node("same", "x", "p", "y1", w, a, prefix="a")
    n2, i2 = qmoe_node("same", "x", "p", "y2", w, a, prefix="b")
    model = make_model([n1, n2], i1 + i2, [vi("x", ["T", 64]), vi("p", ["T", 6])],
                       [vi("y1", ["T", 64]), vi("y2", ["T", 64])])
    _refused(tmp_path, model, "'same'", "unique")


def test_bad_shapes_named(tmp_path):
    """A contract violation found by the layer itself names the node."""
    w, a = random_layer(9, act="relu", fusion=0)
    w = dict(w, fc1_scales=w["fc1_scales"][:, :-1].copy())
    _refused(tmp_path, single_model(w, a), "'moe'", "fc1_scales")


# --------------------------------------------------------------------------- float MoE

MOE_INPUTS = ("input", "router_probs", "fc1_experts_weights", "fc1_experts_bias", "fc2_experts_weights",
              "fc2_experts_bias", "fc3_experts_weights", "fc3_experts_bias")


@pytest.mark.parametrize("bits,block,symmetric,act,fusion", [
    (4, 0, True, "swiglu", 1), (8, 32, False, "silu", 0), (4, 16, True, "swiglu", 0), (8, 0, True, "relu", 0)])
def test_float_moe_node(tmp_path, bits, block, symmetric, act, fusion):
    rng = np.random.default_rng(bits + block)
    E, H, I = 4, 64, 32
    n1 = 2 * I if act == "swiglu" and fusion else I
    floats = {"fc1_experts_weights": rng.standard_normal((E, n1, H)).astype(np.float32) * 0.1,
              "fc1_experts_bias": rng.standard_normal((E, n1)).astype(np.float32) * 0.1,
              "fc2_experts_weights": rng.standard_normal((E, H, I)).astype(np.float32) * 0.1,
              "fc2_experts_bias": rng.standard_normal((E, H)).astype(np.float32) * 0.1}
    if act == "swiglu" and fusion == 0:
        floats["fc3_experts_weights"] = rng.standard_normal((E, I, H)).astype(np.float32) * 0.1
    attrs = dict(k=2, activation_type=act, normalize_routing_weights=1,
                 swiglu_fusion=fusion if act == "swiglu" else 0)
    inputs = ["input", "router_probs"] + [f"w.{n}" if n in floats else "" for n in MOE_INPUTS[2:]]
    while not inputs[-1]:
        inputs.pop()
    inits = [numpy_helper.from_array(floats[n], f"w.{n}") for n in floats]
    node = helper.make_node("MoE", inputs, ["output"], name="fmoe", domain=MS, **attrs)
    model = make_model([node], inits, [vi("input", ["T", H]), vi("router_probs", ["T", E])],
                       [vi("output", ["T", H])])
    path = save(model, str(tmp_path / "m.onnx"))
    layers = qmoe.onnx.load(path, bits=bits, block_size=block, symmetric=symmetric, threads=2)
    # the oracle: qmoe.Layer from qmoe.quantize of the same floats
    want = dict(attrs, expert_weight_bits=bits, block_size=block)
    for fc in ("fc1", "fc2", "fc3"):
        if f"{fc}_experts_weights" not in floats:
            continue
        q = qmoe.quantize(floats[f"{fc}_experts_weights"], bits, block, symmetric)
        want[f"{fc}_experts_weights"], want[f"{fc}_scales"] = q.weights, q.scales
        if q.zero_points is not None:
            want[f"{fc}_zero_points"] = q.zero_points
        if f"{fc}_experts_bias" in floats:
            want[f"{fc}_experts_bias"] = floats[f"{fc}_experts_bias"]
    weights = {k: v for k, v in want.items() if isinstance(v, np.ndarray)}
    assert_same_bits(layers["fmoe"], weights, {k: v for k, v in want.items() if k not in weights}, 11)


# --------------------------------------------------------------------------- ONNX Runtime, two chained nodes

def chained_model(seed: int, *, layers: int = 2, E=8, H=64, I=64, bits=4, block=0, act="swiglu",
                  zp=False, residual=True):
    """x -> [router MatMul -> QMoE (-> Add residual)] x layers -> y. Returns (model, specs),
    specs = [(node name, weights, attrs, router matrix)]. Configurations ORT's CPU EP computes
    exactly: swiglu fusion 1 (or a plain activation), no fc3, normalize_routing_weights = 1, and
    4-bit or 8-bit row-wise: with the weights as initializers (prepacked by ORT at session
    creation), ORT 1.32's 8-bit block-wise path is lossy (~1e-2 relative against the float64
    reference, whatever accuracy_level; exact when the weights are graph inputs, as in
    test_vs_onnxruntime.py)."""
    rng = np.random.default_rng(seed)
    nodes, inits, specs = [], [], []
    h = "x"
    for j in range(layers):
        w, a = random_layer(seed * 10 + j, E=E, H=H, I=I, bits=bits, block=block, zp=zp, act=act,
                            fusion=1 if act == "swiglu" else 0)
        a.update(k=2 + j % 3, normalize_routing_weights=1)
        wr = (rng.standard_normal((H, E)) * 0.5).astype(np.float32)
        name = f"layers.{j}.moe"
        inits.append(numpy_helper.from_array(wr, f"layers.{j}.router.weight"))
        nodes.append(helper.make_node("MatMul", [h, f"layers.{j}.router.weight"], [f"layers.{j}.logits"],
                                      name=f"layers.{j}.router"))
        node, ii = qmoe_node(name, h, f"layers.{j}.logits", f"layers.{j}.moe_out", w, a)
        nodes.append(node)
        inits += ii
        out = f"layers.{j}.moe_out"
        if residual:
            nodes.append(helper.make_node("Add", [h, out], [f"layers.{j}.out"], name=f"layers.{j}.residual"))
            out = f"layers.{j}.out"
        specs.append((name, w, a, wr))
        h = out
    return make_model(nodes, inits, [vi("x", ["T", H])], [vi(h, ["T", H])]), specs


def run_numpy(layers: Dict[str, qmoe.Layer], specs, x: np.ndarray, residual=True) -> np.ndarray:
    h = x
    for name, _, _, wr in specs:
        logits = np.matmul(h, wr, dtype=np.float32)
        y = layers[name](h, logits)
        h = (h + y).astype(np.float32) if residual else y
    return h


def ort_session(path_or_model, threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    src = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("act,bits,block,zp", [("swiglu", 4, 0, False), ("relu", 8, 0, True),
                                               ("swiglu", 4, 64, True), ("gelu", 4, 32, False)])
def test_chained_vs_onnxruntime(tmp_path, external, act, bits, block, zp):
    model, specs = chained_model(31 + bits + block, bits=bits, block=block, act=act, zp=zp)
    path = save(model, str(tmp_path / "chain.onnx"), external=external)
    sess = ort_session(path)
    layers = qmoe.onnx.load(path, threads=2)
    assert list(layers) == [s[0] for s in specs]
    for T in (1, 5, 33):
        x = np.random.default_rng(T).standard_normal((T, 64)).astype(np.float32)
        want = sess.run(None, {"x": x})[0]
        got = run_numpy(layers, specs, x)
        err = rel_max_err(got, want)
        record("onnx load: chained nodes vs ORT", err)
        assert err <= TOL, f"T={T}: {err:.3e}"
