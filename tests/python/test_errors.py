"""Contract violations raise ValueError (wrong dtypes: TypeError) whose message
names the offending tensor or attribute -- never a crash, never a silent result.

Each case starts from one valid call and breaks exactly one thing; it is run
through qmoe.qmoe, qmoe.Layer + call, and qmoe.reference (where the argument
exists there).
"""

import re

import numpy as np
import pytest

import qmoe
from qmoe_np import np_quantize

ml_dtypes = pytest.importorskip("ml_dtypes")

E, H, I, T = 4, 64, 32, 5


def _valid(activation_type="relu", swiglu_fusion=0, block=0, zero_points=False):
    rng = np.random.default_rng(0)
    n1 = 2 * I if activation_type == "swiglu" and swiglu_fusion else I
    w = {}
    mats = {"fc1": (E, n1, H), "fc2": (E, H, I)}
    if activation_type == "swiglu" and swiglu_fusion == 0:
        mats["fc3"] = (E, I, H)
    for name, shape in mats.items():
        p, s, z, _, _ = np_quantize(rng.standard_normal(shape).astype(np.float32), 4, block, not zero_points)
        w[f"{name}_experts_weights"], w[f"{name}_scales"] = p, s
        w[f"{name}_experts_bias"] = rng.standard_normal(shape[:2]).astype(np.float32)
        if z is not None:
            w[f"{name}_zero_points"] = z
    call = dict(input=rng.standard_normal((T, H)).astype(np.float32),
                router_probs=rng.standard_normal((T, E)).astype(np.float32))
    attrs = dict(k=2, activation_type=activation_type, swiglu_fusion=swiglu_fusion, block_size=block)
    return w, attrs, call


def _run_all(w, attrs, call, opts=None):
    """Yields thunks for each entry point on these arguments."""
    opts = opts or {}
    yield lambda: qmoe.qmoe(**call, **w, **attrs, **opts)
    yield lambda: qmoe.Layer(**w, **attrs, **opts)(**call)
    if not opts:
        yield lambda: qmoe.reference(**call, **w, **attrs)


def _mutate(case):
    """(weights, attrs, call, layer options) for a named broken case."""
    w, attrs, call = _valid(**case.get("base", {}))
    for key, value in case.get("weights", {}).items():
        if value is None:
            w.pop(key, None)
        else:
            w[key] = value(w) if callable(value) else value
    attrs.update(case.get("attrs", {}))
    for key, value in case.get("call", {}).items():
        call[key] = value(call) if callable(value) else value
    return w, attrs, call, case.get("opts", {})


CASES = {
    # --- activations / call arguments
    "input wrong hidden size": dict(call={"input": lambda c: c["input"][:, :48].copy()},
                                    match=r"^input: .*hidden_size 64"),
    "input rank 1": dict(call={"input": lambda c: c["input"][0]}, match=r"^input: expected rank 2"),
    "input float64": dict(call={"input": lambda c: c["input"].astype(np.float64)}, exc=TypeError,
                          match=r"^input: expected dtype float32, float16 or bfloat16, got float64"),
    "input int32": dict(call={"input": lambda c: c["input"].astype(np.int32)}, exc=TypeError, match=r"^input: "),
    "router_probs wrong shape": dict(call={"router_probs": lambda c: c["router_probs"][:, :3].copy()},
                                     match=r"^router_probs: expected shape \[5, 4\], got \[5, 3\]"),
    "router_probs wrong token count": dict(call={"router_probs": lambda c: c["router_probs"][:4].copy()},
                                           match=r"^router_probs: expected shape \[5, 4\]"),
    "router_probs dtype differs from input": dict(call={"router_probs": lambda c: c["router_probs"].astype(np.float16)},
                                                  match=r"^router_probs: expected dtype float32 \(same as input\)"),
    "bfloat16 input, float32 router_probs": dict(call={"input": lambda c: c["input"].astype(ml_dtypes.bfloat16)},
                                                 match=r"^router_probs: expected dtype bfloat16"),
    "router_weights wrong shape": dict(call={"router_weights": np.ones((5, 5), np.float32)},
                                       match=r"^router_weights: expected shape \[5, 4\]"),
    "router_weights float64": dict(call={"router_weights": np.ones((5, 4))}, exc=TypeError, match=r"^router_weights: "),
    # --- weights
    "fc1 weights int32": dict(weights={"fc1_experts_weights": lambda w: w["fc1_experts_weights"].astype(np.int32)},
                              exc=TypeError, match=r"^fc1_experts_weights: expected dtype uint8, got int32"),
    "fc1 weights wrong shape": dict(weights={"fc1_experts_weights": lambda w: w["fc1_experts_weights"][:, :30].copy()},
                                    match=r"^fc1_experts_weights: expected shape \[4, 32, 32\], got \[4, 30, 32\]"),
    "fc1 weights rank 2": dict(weights={"fc1_experts_weights": lambda w: w["fc1_experts_weights"][0]},
                               match=r"^fc1_experts_weights: expected rank 3"),
    "fc2 weights missing": dict(weights={"fc2_experts_weights": None}, match=r"^fc2_experts_weights: required"),
    "fc2 weights other expert count": dict(weights={"fc2_experts_weights":
                                                    lambda w: w["fc2_experts_weights"][:3].copy()},
                                           match=r"^fc2_experts_weights: expected shape \[4, 64, 16\]"),
    "fc1 scales wrong shape": dict(weights={"fc1_scales": lambda w: w["fc1_scales"][:, :31].copy()},
                                   match=r"^fc1_scales: expected shape \[4, 32\], got \[4, 31\]"),
    "fc2 scales missing": dict(weights={"fc2_scales": None}, match=r"^fc2_scales: required, but absent"),
    "fc2 scales uint8": dict(weights={"fc2_scales": lambda w: w["fc2_scales"].astype(np.uint8)}, exc=TypeError,
                             match=r"^fc2_scales: expected dtype float32, float16 or bfloat16, got uint8"),
    "fc1 bias wrong shape": dict(weights={"fc1_experts_bias": np.zeros((E, I + 1), np.float32)},
                                 match=r"^fc1_experts_bias: expected shape \[4, 32\], got \[4, 33\]"),
    "fc2 bias scalar": dict(weights={"fc2_experts_bias": np.float32(1.0)}, match=r"^fc2_experts_bias: .*scalar"),
    "fc1 zero points wrong shape": dict(base=dict(zero_points=True),
                                        weights={"fc1_zero_points": np.zeros((E, I), np.uint8)},
                                        match=r"^fc1_zero_points: expected shape \[4, 16\], got \[4, 32\]"),
    "block zero points wrong shape": dict(base=dict(zero_points=True, block=16),
                                          weights={"fc2_zero_points": np.zeros((E, H, 2), np.uint8)},
                                          match=r"^fc2_zero_points: expected shape \[4, 64, 1\], got \[4, 64, 2\]"),
    "zero points float": dict(base=dict(zero_points=True),
                              weights={"fc1_zero_points": lambda w: w["fc1_zero_points"].astype(np.float32)},
                              exc=TypeError, match=r"^fc1_zero_points: expected dtype uint8"),
    "fc3 given without swiglu": dict(weights={"fc3_experts_weights": lambda w: w["fc1_experts_weights"]},
                                     match=r"^fc3_experts_weights: must be absent when activation_type is not swiglu"),
    "fc3 missing for swiglu fusion 0": dict(base=dict(activation_type="swiglu"), weights={"fc3_experts_weights": None},
                                            match=r"^fc3_experts_weights: required for activation_type swiglu with "
                                                  r"swiglu_fusion 0"),
    "fc3 given with fused swiglu": dict(base=dict(activation_type="swiglu", swiglu_fusion=1),
                                        weights={"fc3_scales": np.ones((E, I), np.float32)},
                                        match=r"^fc3_scales: must be absent when swiglu_fusion is not 0"),
    "fused swiglu with unfused fc1": dict(base=dict(activation_type="swiglu", swiglu_fusion=0),
                                          weights={"fc3_experts_weights": None, "fc3_scales": None,
                                                   "fc3_experts_bias": None},
                                          attrs={"swiglu_fusion": 2},
                                          match=r"^fc1_experts_weights: expected shape \[4, 64, 32\]"),
    # --- attributes
    "k > E": dict(attrs={"k": 5}, match=r"^k: expected 1..num_experts \(4\), got 5"),
    "k = 0": dict(attrs={"k": 0}, match=r"^k: expected >= 1, got 0"),
    "k out of int32 range": dict(attrs={"k": 2 ** 40}, match=r"^k: 1099511627776 is out of range"),
    "k not an integer": dict(attrs={"k": 2.5}, exc=TypeError, match=r"^k: expected an integer"),
    "block_size does not divide": dict(base=dict(block=16), attrs={"block_size": 64},
                                       match=r"^block_size: 64 does not divide inter_size 32"),
    "block_size not a power of two": dict(attrs={"block_size": 24}, match=r"^block_size: expected 0 \(row-wise\) or a "
                                                                          r"power of two >= 16, got 24"),
    "block scales for row-wise": dict(base=dict(block=16), attrs={"block_size": 0},
                                      match=r"^fc1_scales: expected shape \[4, 32, 1\], got \[4, 32, 4\]"),
    "use_sparse_mixer=1": dict(attrs={"use_sparse_mixer": 1}, match=r"^use_sparse_mixer: 1 is not supported"),
    "unknown activation_type": dict(attrs={"activation_type": "tanh"},
                                    match=r"^activation_type: expected one of relu, gelu, silu, swiglu, identity, "
                                          r"got \"tanh\""),
    "activation_type not a string": dict(attrs={"activation_type": 1}, exc=TypeError, match=r"^activation_type: "),
    "swiglu_fusion without swiglu": dict(attrs={"swiglu_fusion": 1},
                                         match=r"^swiglu_fusion: must be 0 unless activation_type is swiglu, got 1"),
    "swiglu_fusion 3": dict(base=dict(activation_type="swiglu", swiglu_fusion=1), attrs={"swiglu_fusion": 3},
                            match=r"^swiglu_fusion: expected 0, 1 or 2, got 3"),
    "swiglu_limit negative": dict(base=dict(activation_type="swiglu", swiglu_fusion=1), attrs={"swiglu_limit": -1.0},
                                  match=r"^swiglu_limit: expected a positive value"),
    "activation_alpha nan": dict(attrs={"activation_alpha": float("nan")}, match=r"^activation_alpha: "),
    "expert_weight_bits 2": dict(attrs={"expert_weight_bits": 2}, match=r"^expert_weight_bits: expected 4 or 8, got 2"),
    "8-bit attribute on 4-bit weights": dict(attrs={"expert_weight_bits": 8},
                                             match=r"^fc1_experts_weights: expected shape \[4, 16, 64\]"),
    "normalize_routing_weights 2": dict(attrs={"normalize_routing_weights": 2},
                                        match=r"^normalize_routing_weights: expected 0 or 1, got 2"),
    # --- layer options (qmoe.qmoe and qmoe.Layer only)
    "accuracy_level -1": dict(opts={"accuracy_level": -1}, match=r"^accuracy_level: expected 0..4"),
    "accuracy_level 7": dict(opts={"accuracy_level": 7}, match=r"^accuracy_level: expected 0..4"),
    "threads negative": dict(opts={"threads": -1}, match=r"^threads: expected 0\.\.1024"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_contract_violation(name):
    case = CASES[name]
    w, attrs, call, opts = _mutate(case)
    exc = case.get("exc", ValueError)
    for thunk in _run_all(w, attrs, call, opts):
        with pytest.raises(exc, match=case["match"]):
            thunk()


def test_enough_distinct_cases():
    assert len(CASES) >= 12
    # Every message names a tensor or attribute first ("name: ...").
    assert all(re.match(r"\^\w+: ", c["match"]) for c in CASES.values())


def test_valid_base_calls_succeed():
    for base in [{}, dict(activation_type="swiglu"), dict(activation_type="swiglu", swiglu_fusion=1),
                 dict(zero_points=True, block=16)]:
        w, attrs, call = _valid(**base)
        for thunk in _run_all(w, attrs, call):
            out = thunk()
            assert out.shape == (T, H)


def test_layer_call_errors_leave_layer_usable():
    w, attrs, call = _valid()
    layer = qmoe.Layer(**w, **attrs)
    good = layer(**call)
    with pytest.raises(ValueError, match=r"^input: "):
        layer(call["input"][:, :10].copy(), call["router_probs"])
    np.testing.assert_array_equal(layer(**call), good)


# --------------------------------------------------------------------------
# qmoe.quantize
# --------------------------------------------------------------------------

QUANT_CASES = [
    (dict(w=np.zeros((2, 4, 64), np.float64)), TypeError, r"^w: expected dtype float32, float16 or bfloat16"),
    (dict(w=np.zeros((4, 64), np.float32)), ValueError, r"^w: expected rank 3 \[E, N, K\]"),
    (dict(w=np.zeros((2, 4, 63), np.float32)), ValueError, r"^w: K = 63 must be a multiple of 2"),
    (dict(w=np.zeros((2, 4, 64), np.float32), bits=3), ValueError, r"^bits: expected 4 or 8, got 3"),
    (dict(w=np.zeros((2, 4, 64), np.float32), block_size=48), ValueError, r"^block_size: expected 0 \(row-wise\)"),
    (dict(w=np.zeros((2, 4, 48), np.float32), block_size=32), ValueError, r"^block_size: 32 does not divide K = 48"),
    (dict(w=np.full((2, 4, 64), np.inf, np.float32)), ValueError, r"^w: non-finite value"),
    (dict(w=np.zeros((2, 4, 64), np.float32), symmetric="yes"), TypeError, r"^symmetric: expected a bool"),
    (dict(w=np.float32(1.0)), ValueError, r"^w: .*scalar"),
]


@pytest.mark.parametrize("kwargs,exc,match", QUANT_CASES)
def test_quantize_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        qmoe.quantize(**kwargs)
