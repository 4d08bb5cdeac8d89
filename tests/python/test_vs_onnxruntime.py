"""Differential tests: qmoe against ONNX Runtime's own QMoE CPU kernel.

Each case builds a one-node ONNX model (com.microsoft::QMoE, opset imports
'' 21 and com.microsoft 1, ir_version 10) whose weights are graph inputs, and
runs it on the CPUExecutionProvider with 2 intra-op threads. ONNX Runtime's
CPU kernel always renormalizes the top-k routing weights, so every case sets
``normalize_routing_weights=1``. Acceptance: max|qmoe - ort| / max|ort| <= 1e-5
(float32).

Coverage:

* ``test_matches_onnxruntime`` is the FULL cross product
  bits {4, 8} x block {0 (row-wise), 16, 32, 64, 128} x zero points {no, yes}
  x biases {no, yes} x activation {swiglu (gpt-oss: alpha 1.702, beta 1,
  limit 7, fusion 1), relu, gelu, silu, identity} x k {1, 2, 3, 4} = 800
  configurations. Each builds ONE onnxruntime session (the token dimension
  is symbolic) and runs it for ALL three T in {1, 7, 64}: 2400 differential
  runs, nothing sampled or cycled. The shapes are small, so this takes about
  half a minute on two cores.
* ``test_k_t_sweep`` repeats the k {1..4} x T {1, 7, 64} product with one
  Layer per k reused across T, on three representative configurations
  (4-bit block-32 swiglu with zero points and biases; 8-bit row-wise relu;
  4-bit block-128 gelu without biases).
* ``test_quantize_matches_numpy`` checks qmoe.quantize bit for bit against an
  independent NumPy quantizer, its reported errors, and dequantizes with an
  unpacker written apart from the packer.

Shapes are small (E 4..8, H 72..256, I 40..128). Row-wise cases use row
counts that are not multiples of the kernels' 16-row tiles; block-wise cases
use odd numbers of blocks per row (odd packed zero-point rows for 4-bit).
"""

import itertools

import numpy as np
import pytest

import qmoe
from qmoe_np import (GPT_OSS_SWIGLU, ORT_INPUTS, make_layer, np_dequantize, np_moe_from, np_quantize,
                     np_unpack, record, rel_max_err)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

TOL = 1e-5
BITS = [4, 8]
BLOCKS = [0, 16, 32, 64, 128]
ZPS = [False, True]
BIASES = [False, True]
ACTS = ["swiglu", "relu", "gelu", "silu", "identity"]
TOKENS = [1, 7, 64]
KS = [1, 2, 3, 4]


def _configs():
    out = []
    for bits, block, zp, bias, act, k in itertools.product(BITS, BLOCKS, ZPS, BIASES, ACTS, KS):
        out.append(pytest.param(bits, block, zp, bias, act, k,
                                id=f"b{bits}-blk{block}-{'zp' if zp else 'sym'}-"
                                   f"{'bias' if bias else 'nobias'}-{act}-k{k}"))
    return out


def _shape_for(block, index):
    """(E, H, I): block sizes must divide H and I; row-wise uses sizes that are
    not multiples of 16 to exercise partial tiles."""
    if block == 0:
        return (6 if index % 2 else 8), 72, 40   # rows 40/80/72: partial 16-row tiles
    if block == 16:
        return 8, 144, 48                         # 9 and 3 (or 6) blocks per row
    if block == 32:
        return 8, 160, 96                         # odd block counts: 5 and 3
    if block == 64:
        return 6, 192, 64                         # 3 and 1 blocks
    return 4, 256, 128                            # 2 and 1 blocks


_TT = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
       np.dtype(np.uint8): TensorProto.UINT8}


class OrtQMoE:
    """One ONNX Runtime session for a QMoE node whose weights are graph inputs;
    the token dimension is symbolic so one session serves every T."""

    def __init__(self, weights, attrs, H, E):
        self.weights = weights
        present = set(weights) | {"input", "router_probs"}
        last = max(i for i, n in enumerate(ORT_INPUTS) if n in present)
        inputs = [n if n in present else "" for n in ORT_INPUTS[:last + 1]]
        ort_attrs = {a: v for a, v in attrs.items() if v is not None}
        if ort_attrs.get("block_size", 0) == 0:
            ort_attrs.pop("block_size", None)
        node = helper.make_node("QMoE", inputs, ["output"], domain="com.microsoft", **ort_attrs)
        vi = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["T", H]),
              helper.make_tensor_value_info("router_probs", TensorProto.FLOAT, ["T", E])]
        vi += [helper.make_tensor_value_info(n, _TT[weights[n].dtype], list(weights[n].shape))
               for n in inputs if n and n in weights]
        graph = helper.make_graph([node], "qmoe", vi,
                                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["T", H])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def __call__(self, x, logits):
        feeds = dict(self.weights, input=x, router_probs=logits)
        return self.session.run(None, feeds)[0]


def _run_config(seed, bits, block, zp, bias, act, ks, tokens, label):
    rng = np.random.default_rng(seed)
    E, H, I = _shape_for(block, seed)
    extra = dict(GPT_OSS_SWIGLU) if act == "swiglu" else {}
    weights, attrs, deq = make_layer(rng, E=E, H=H, I=I, bits=bits, block=block, zero_points=zp, bias=bias,
                                     activation_type=act, swiglu_fusion=1 if act == "swiglu" else 0,
                                     quantizer=lambda w, b, bl, s: tuple(qmoe.quantize(w, b, bl, s)), **extra)
    attrs["normalize_routing_weights"] = 1
    for k in ks:
        attrs_k = dict(attrs, k=k)
        session = OrtQMoE(weights, attrs_k, H, E)  # one session serves all T
        layer = qmoe.Layer(**weights, **attrs_k, threads=2)
        for T in tokens:
            x = rng.standard_normal((T, H)).astype(np.float32)
            logits = rng.standard_normal((T, E)).astype(np.float32)
            want = session(x, logits)
            got = layer(x, logits)
            assert got.dtype == np.float32 and got.shape == (T, H)
            err = rel_max_err(got, want)
            record(f"vs ORT float32 {label}", err)
            record("vs ORT float32 (all)", err)
            assert err <= TOL, f"k={k} T={T}: max rel error {err:.3e} vs onnxruntime"
            # Sanity of the oracles themselves: ORT agrees with the NumPy float64 forward.
            ref = np_moe_from(deq, x, logits, attrs_k)
            record("ORT vs numpy float64 reference", rel_max_err(want, ref))
            assert rel_max_err(want, ref) <= TOL


@pytest.mark.parametrize("bits,block,zp,bias,act,k", _configs())
def test_matches_onnxruntime(bits, block, zp, bias, act, k):
    seed = bits * 1000003 + block * 10007 + zp * 101 + bias * 13 + ACTS.index(act) * 7 + k
    label = f"{bits}-bit {'row-wise' if block == 0 else 'block'} {'asym/zp' if zp else 'sym'} {act}"
    _run_config(seed, bits, block, zp, bias, act, [k], TOKENS, label)


@pytest.mark.parametrize("bits,block,zp,bias,act", [
    (4, 32, True, True, "swiglu"),
    (8, 0, False, True, "relu"),
    (4, 128, False, False, "gelu"),
])
def test_k_t_sweep(bits, block, zp, bias, act):
    _run_config(7 + bits + block, bits, block, zp, bias, act, [1, 2, 3, 4], TOKENS, "k x T sweep")


# --------------------------------------------------------------------------
# qmoe.quantize against an independent NumPy quantizer / unpacker
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_matches_numpy(bits, block, symmetric):
    rng = np.random.default_rng(bits + block + symmetric)
    E, N, K = 3, 37, 256  # N odd: row-wise 4-bit zero points pad the last byte
    w = rng.standard_normal((E, N, K)).astype(np.float32)
    w[0, 0, :] = 0.0           # an all-zero row/block: scale 0
    w[1, 2, :] = np.abs(w[1, 2, :])  # an all-positive row: asymmetric zp = 0
    q = qmoe.quantize(w, bits=bits, block_size=block, symmetric=symmetric)
    packed, scales, zp = q  # unpacks as a 3-tuple
    np_packed, np_scales, np_zp, codes, zpi = np_quantize(w, bits, block, symmetric)
    pack = 8 // bits
    assert packed.dtype == np.uint8 and packed.shape == (E, N, K // pack)
    assert scales.dtype == np.float32
    assert scales.shape == ((E, N) if block == 0 else (E, N, K // block))
    np.testing.assert_array_equal(scales, np_scales)
    np.testing.assert_array_equal(packed, np_packed)
    if symmetric:
        assert zp is None
    else:
        nb = 1 if block == 0 else K // block
        assert zp.dtype == np.uint8
        assert zp.shape == ((E, -(-N // pack)) if block == 0 else (E, N, -(-nb // pack)))
        np.testing.assert_array_equal(zp, np_zp)
    # The unpacker (written apart from the packer) recovers the codes.
    np.testing.assert_array_equal(np_unpack(packed, bits, K), codes)
    # Reported errors agree with the dequantized weights.
    deq = np_dequantize(packed, scales, zp, bits, block, K)
    diff = deq - w.astype(np.float64)
    assert q.max_abs_error == pytest.approx(np.abs(diff).max(), rel=1e-9, abs=1e-12)
    assert q.rel_l2_error == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(w.astype(np.float64)), rel=1e-9)
    # Rounding error is at most half a step (nothing is clamped: the range covers every value).
    s = np.asarray(scales, np.float64).reshape(E, N, -1)
    step = np.repeat(s, K // s.shape[-1], axis=-1)
    assert np.all(np.abs(diff) <= 0.5 * step * (1 + 1e-5) + 1e-7)
    record(f"quantize rel_l2 {bits}-bit {'sym' if symmetric else 'asym'}", q.rel_l2_error)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_quantize_half_inputs(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 16, 64)).astype(dt)
    q = qmoe.quantize(w, bits=4, block_size=32, symmetric=False)
    want = np_quantize(w.astype(np.float32), 4, 32, False)
    np.testing.assert_array_equal(q.weights, want[0])
    np.testing.assert_array_equal(q.scales, want[1])
    np.testing.assert_array_equal(q.zero_points, want[2])
