"""qmoe against its float64 oracle (qmoe.reference) and against an
independent float64 NumPy forward (qmoe_np.np_moe), for everything ONNX
Runtime's CPU kernel cannot run: swiglu_fusion 0 (separate fc3) and 2,
router_weights (choose by router_probs, mix by router_weights) with and
without normalize_routing_weights, float16/bfloat16 activations, float16 and
bfloat16 scales/biases, 3-D input, T = 0, k = E and ties in the router logits.

Tolerances (max|got - want| / max|want|): 1e-5 for float32 outputs, 1e-2
for float16 and bfloat16 outputs. qmoe.reference and the NumPy forward are
both float64 and must agree to 1e-10.
"""


import numpy as np
import pytest

import qmoe
from qmoe_np import GPT_OSS_SWIGLU, make_layer, np_moe_from, record, rel_max_err

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16
HALF = {"float16": np.float16, "bfloat16": BF16}
TOL32, TOL16, TOL64 = 1e-5, 1e-2, 1e-10


def check(layer_or_none, weights, attrs, deq, x, logits, router_weights=None, label="", tol=None):
    """Runs qmoe (a Layer, or qmoe.qmoe when None), qmoe.reference and the
    NumPy forward; checks all three pairwise; returns the qmoe output."""
    if layer_or_none is None:
        got = qmoe.qmoe(x, logits, router_weights=router_weights, **weights, **attrs, threads=2)
    else:
        got = layer_or_none(x, logits, router_weights)
    assert got.dtype == x.dtype and got.shape == x.shape
    ref = qmoe.reference(x, logits, router_weights=router_weights, **weights, **attrs)
    assert ref.dtype == np.float64 and ref.shape == x.shape
    npref = np_moe_from(deq, x, logits, attrs, router_weights)
    if tol is None:
        tol = TOL32 if x.dtype == np.float32 else TOL16
    e_ref, e_np, e_oracles = rel_max_err(got, ref), rel_max_err(got, npref), rel_max_err(ref, npref)
    dt = np.dtype(x.dtype).name
    record(f"vs qmoe.reference {dt} {label}", e_ref)
    record(f"vs numpy float64 {dt} {label}", e_np)
    record("qmoe.reference vs numpy float64", e_oracles)
    assert e_oracles <= TOL64, f"the two float64 oracles disagree: {e_oracles:.3e}"
    assert e_ref <= tol, f"vs qmoe.reference: {e_ref:.3e}"
    assert e_np <= tol, f"vs numpy reference: {e_np:.3e}"
    return got


def inputs(rng, T, H, E, dtype=np.float32):
    x = rng.standard_normal((T, H)).astype(np.float32).astype(dtype)
    logits = rng.standard_normal((T, E)).astype(np.float32).astype(dtype)
    return x, logits


# --------------------------------------------------------------------------
# swiglu fusions 0 (fc3), 1 and 2
# --------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", [0, 1, 2])
@pytest.mark.parametrize("bits,block", [(4, 0), (4, 32), (8, 0), (8, 64)])
@pytest.mark.parametrize("zp,bias", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("constants", ["gpt-oss", "plain"])
def test_swiglu_fusions(fusion, bits, block, zp, bias, constants):
    rng = np.random.default_rng(fusion * 100 + bits + block + 7 * zp + 3 * bias + len(constants))
    E, H, I = 6, 128, 64 if block else 56
    extra = GPT_OSS_SWIGLU if constants == "gpt-oss" else dict(activation_alpha=1.0, activation_beta=0.0)
    weights, attrs, deq = make_layer(rng, E=E, H=H, I=I, bits=bits, block=block, zero_points=zp, bias=bias,
                                     activation_type="swiglu", swiglu_fusion=fusion, **extra)
    attrs.update(k=2, normalize_routing_weights=int(zp))
    layer = qmoe.Layer(**weights, **attrs, threads=2)
    assert layer.inter_size == I and layer.num_experts == E and layer.hidden_size == H
    for T in (1, 9, 33):
        check(layer, weights, attrs, deq, *inputs(rng, T, H, E), label=f"swiglu fusion {fusion}")


def test_swiglu_limit_is_active():
    """With a small limit the clamps must bite (the result differs from no limit)."""
    rng = np.random.default_rng(5)
    weights, attrs, deq = make_layer(rng, E=4, H=64, I=32, activation_type="swiglu", swiglu_fusion=2,
                                     activation_alpha=1.702, activation_beta=1.0, swiglu_limit=0.05)
    attrs["k"] = 2
    x, lg = inputs(rng, 8, 64, 4)
    x *= 10
    limited = check(None, weights, attrs, deq, x, lg, label="swiglu limit 0.05")
    unlimited = qmoe.qmoe(x, lg, **weights, **dict(attrs, swiglu_limit=float("inf")))
    assert rel_max_err(limited, unlimited) > 1e-2


# --------------------------------------------------------------------------
# router_weights: choose by router_probs, mix by router_weights
# --------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("act,fusion", [("relu", 0), ("swiglu", 1), ("silu", 0)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_router_weights(normalize, act, fusion, k):
    rng = np.random.default_rng(11 * k + normalize + fusion)
    E, H, I, T = 8, 96, 48, 21
    weights, attrs, deq = make_layer(rng, E=E, H=H, I=I, block=16, bias=True, activation_type=act,
                                     swiglu_fusion=fusion, **(GPT_OSS_SWIGLU if act == "swiglu" else {}))
    attrs.update(k=k, normalize_routing_weights=normalize)
    x, lg = inputs(rng, T, H, E)
    rw = rng.uniform(0.1, 1.0, (T, E)).astype(np.float32)
    layer = qmoe.Layer(**weights, **attrs)
    got = check(layer, weights, attrs, deq, x, lg, rw, label="router_weights")
    # Mixing really used router_weights (and not softmax(router_probs)).
    plain = layer(x, lg)
    if not (normalize and k == 1):  # k=1 renormalized: both mix with weight 1
        assert rel_max_err(got, plain) > 1e-3
    else:
        assert rel_max_err(got, plain) <= TOL32
    # Selection is by router_probs: router_weights that would pick other experts change nothing
    # about which experts run, only their weights.
    rw2 = rw.copy()
    rw2[np.arange(T), np.argsort(lg, axis=1)[:, 0]] = 100.0  # huge weight on the least likely expert
    check(layer, weights, attrs, deq, x, lg, rw2, label="router_weights")


# --------------------------------------------------------------------------
# float16 / bfloat16 activations, scales and biases
# --------------------------------------------------------------------------

@pytest.mark.parametrize("act_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("param_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("act,fusion,bits,block", [("swiglu", 1, 4, 32), ("gelu", 0, 8, 0), ("swiglu", 0, 4, 0)])
def test_half_activations(act_dtype, param_dtype, act, fusion, bits, block):
    rng = np.random.default_rng(len(act_dtype) + len(param_dtype) + bits + block + fusion)
    E, H, I = 4, 64, 32
    pdt = np.float32 if param_dtype == "float32" else HALF[param_dtype]
    weights, attrs, deq = make_layer(rng, E=E, H=H, I=I, bits=bits, block=block, zero_points=True, bias=True,
                                     activation_type=act, swiglu_fusion=fusion, float_dtype=pdt,
                                     **(GPT_OSS_SWIGLU if act == "swiglu" else {}))
    attrs.update(k=2, normalize_routing_weights=1)
    if param_dtype != "float32":
        assert weights["fc1_scales"].dtype == pdt and weights["fc2_experts_bias"].dtype == pdt
    layer = qmoe.Layer(**weights, **attrs, threads=2)
    for T in (1, 16):
        x, lg = inputs(rng, T, H, E, HALF[act_dtype])
        check(layer, weights, attrs, deq, x, lg, label="half activations")
        # router_weights in the input dtype too.
        rw = rng.uniform(0, 1, (T, E)).astype(HALF[act_dtype])
        check(layer, weights, attrs, deq, x, lg, rw, label="half activations + router_weights")


@pytest.mark.parametrize("param_dtype", ["float16", "bfloat16"])
def test_half_params_float32_activations(param_dtype):
    rng = np.random.default_rng(99)
    weights, attrs, deq = make_layer(rng, E=5, H=64, I=48, bits=4, block=16, zero_points=False, bias=True,
                                     activation_type="relu", float_dtype=HALF[param_dtype])
    attrs["k"] = 3
    check(None, weights, attrs, deq, *inputs(rng, 12, 64, 5), label=f"{param_dtype} scales/biases")


# --------------------------------------------------------------------------
# Shapes: 3-D input, T = 0, k = E, row-wise scales as [E, N, 1]
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_3d_input(dtype):
    dt = np.float32 if dtype == "float32" else HALF[dtype]
    rng = np.random.default_rng(2)
    B, S, E, H, I = 3, 5, 6, 64, 32
    weights, attrs, deq = make_layer(rng, E=E, H=H, I=I, activation_type="swiglu", swiglu_fusion=1, bias=True)
    attrs["k"] = 2
    layer = qmoe.Layer(**weights, **attrs)
    x = rng.standard_normal((B, S, H)).astype(np.float32).astype(dt)
    lg = rng.standard_normal((B * S, E)).astype(np.float32).astype(dt)
    got = check(layer, weights, attrs, deq, x, lg, label="3-D input")
    assert got.shape == (B, S, H)
    flat = layer(x.reshape(B * S, H), lg)
    np.testing.assert_array_equal(got.reshape(B * S, H).view(np.uint8), flat.view(np.uint8))


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (0, 3, 64)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_tokens(shape, dtype):
    dt = np.float32 if dtype == "float32" else HALF[dtype]
    rng = np.random.default_rng(4)
    weights, attrs, _ = make_layer(rng, E=4, H=64, I=32)
    layer = qmoe.Layer(**weights, **attrs)
    x = np.zeros(shape, dt)
    lg = np.zeros((0, 4), dt)
    y = layer(x, lg)
    assert y.shape == shape and y.dtype == x.dtype and y.size == 0
    r = qmoe.reference(x, lg, **weights, **attrs)
    assert r.shape == shape and r.dtype == np.float64
    y2 = qmoe.qmoe(x, lg, router_weights=np.zeros((0, 4), dt), **weights, **attrs)
    assert y2.shape == shape


@pytest.mark.parametrize("E", [1, 4, 7])
@pytest.mark.parametrize("normalize", [0, 1])
def test_k_equals_num_experts(E, normalize):
    rng = np.random.default_rng(E)
    weights, attrs, deq = make_layer(rng, E=E, H=64, I=32, bits=8, block=32, zero_points=True,
                                     activation_type="silu")
    attrs.update(k=E, normalize_routing_weights=normalize)
    check(None, weights, attrs, deq, *inputs(rng, 10, 64, E), label="k = E")


def test_rowwise_scales_with_trailing_one():
    rng = np.random.default_rng(8)
    weights, attrs, deq = make_layer(rng, E=4, H=64, I=32, activation_type="identity")
    attrs["k"] = 2
    x, lg = inputs(rng, 6, 64, 4)
    a = qmoe.qmoe(x, lg, **weights, **attrs)
    w3 = dict(weights, fc1_scales=weights["fc1_scales"][..., None], fc2_scales=weights["fc2_scales"][..., None])
    b = check(None, w3, attrs, deq, x, lg, label="scales [E,N,1]")
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Ties in the router logits: the lower expert index wins
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_router_ties(dtype, k):
    dt = np.float32 if dtype == "float32" else BF16
    rng = np.random.default_rng(k)
    E, H = 6, 64
    weights, attrs, deq = make_layer(rng, E=E, H=H, I=32, bias=True, activation_type="relu")
    attrs["k"] = k
    T = 5
    x = rng.standard_normal((T, H)).astype(dt)
    lg = np.array([[1, 1, 1, 1, 1, 1],           # all tied
                   [0, 2, 2, 0, 2, 2],           # ties at the top
                   [3, 1, 1, 1, 1, 3],           # first and last tie
                   [0, 0, 0, 0, 0, 5],           # one winner, then ties
                   [-1, -1, 4, 4, -1, 4]], dtype=np.float32).astype(dt)
    check(None, weights, attrs, deq, x, lg, label="router ties")
    # Independently of either oracle's tie rule: mix with weight 1 on the experts
    # we expect to be chosen (lower index first among equals) and 0 elsewhere.
    # If any other expert were chosen, one expected expert would be missing.
    expect = {1: [[0], [1], [0], [5], [2]],
              2: [[0, 1], [1, 2], [0, 5], [5, 0], [2, 3]],
              3: [[0, 1, 2], [1, 2, 4], [0, 5, 1], [5, 0, 1], [2, 3, 5]]}[k]
    rw = np.zeros((T, E), np.float32)
    for t, experts in enumerate(expect):
        rw[t, experts] = 1.0
    got = qmoe.qmoe(x, lg, router_weights=rw.astype(dt), **weights, **attrs)
    want = np.zeros((T, H))
    for t, experts in enumerate(expect):
        for e in experts:
            onehot = np.full((1, E), -10.0)
            onehot[0, e] = 10.0
            want[t] += np_moe_from(deq, x[t:t + 1], onehot, dict(attrs, k=1, normalize_routing_weights=1))[0]
    err = rel_max_err(got, want)
    record(f"vs numpy float64 {dtype} router ties (expected experts)", err)
    assert err <= (TOL32 if dtype == "float32" else TOL16)


def test_tie_picks_lower_index_directly():
    """k=1 with all logits equal must equal running expert 0 alone."""
    rng = np.random.default_rng(1)
    weights, attrs, deq = make_layer(rng, E=4, H=64, I=32, bias=True, activation_type="gelu")
    x = rng.standard_normal((3, 64)).astype(np.float32)
    tied = np.zeros((3, 4), np.float32)
    only0 = np.array([[9, 0, 0, 0]] * 3, np.float32)
    a = qmoe.qmoe(x, tied, **weights, **dict(attrs, k=1, normalize_routing_weights=1))
    b = qmoe.qmoe(x, only0, **weights, **dict(attrs, k=1, normalize_routing_weights=1))
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Layout of the arguments does not matter
# --------------------------------------------------------------------------

def test_non_contiguous_and_byte_order():
    rng = np.random.default_rng(12)
    E, H, I, T = 4, 64, 32, 9
    weights, attrs, deq = make_layer(rng, E=E, H=H, I=I, block=16, zero_points=True, bias=True,
                                     activation_type="swiglu", swiglu_fusion=1)
    attrs["k"] = 2
    x, lg = inputs(rng, T, H, E)
    want = qmoe.qmoe(x, lg, **weights, **attrs)
    xf = np.asfortranarray(x)
    lg_strided = np.repeat(lg, 2, axis=1)[:, ::2]
    assert not xf.flags.c_contiguous and not lg_strided.flags.c_contiguous
    w_nc = {n: (np.asfortranarray(a) if a.ndim > 1 else a) for n, a in weights.items()}
    w_be = {n: (a.astype(a.dtype.newbyteorder(">")) if a.dtype.kind == "f" else a) for n, a in weights.items()}
    np.testing.assert_array_equal(qmoe.qmoe(xf, lg_strided, **w_nc, **attrs), want)
    np.testing.assert_array_equal(qmoe.qmoe(x.astype(">f4"), lg.astype(">f4"), **w_be, **attrs), want)
    check(None, w_nc, attrs, deq, xf, lg_strided, label="non-contiguous")


# --------------------------------------------------------------------------
# accuracy_level 4: int8 activations
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits,block,zp", [(4, 0, False), (4, 32, True), (8, 0, True), (8, 128, False)])
@pytest.mark.parametrize("act,fusion", [("swiglu", 1), ("swiglu", 0), ("gelu", 0)])
def test_accuracy_level_4(bits, block, zp, act, fusion):
    """int8 activations: relative L2 error against the float64 reference <= 1.5e-2 per
    case (small layers scatter), and clearly not the float32 result."""
    rng = np.random.default_rng(bits * 100 + block + fusion)
    E, H, I, T = 6, 256, 128, 33
    weights, attrs, deq = make_layer(rng, E=E, H=H, I=I, bits=bits, block=block, zero_points=zp, bias=True,
                                     activation_type=act, swiglu_fusion=fusion,
                                     **(GPT_OSS_SWIGLU if act == "swiglu" else {}))
    attrs.update(k=2, normalize_routing_weights=1)
    x, lg = inputs(rng, T, H, E)
    ref = qmoe.reference(x, lg, **weights, **attrs)
    y4 = qmoe.Layer(**weights, **attrs, accuracy_level=4, threads=2)(x, lg)
    y0 = qmoe.Layer(**weights, **attrs, accuracy_level=0, threads=2)(x, lg)
    err4 = float(np.linalg.norm(y4 - ref) / np.linalg.norm(ref))
    err0 = float(np.linalg.norm(y0 - ref) / np.linalg.norm(ref))
    record("vs qmoe.reference accuracy_level 4 (rel L2)", err4)
    assert err4 <= 1.5e-2
    assert err0 <= 1e-5 < err4
