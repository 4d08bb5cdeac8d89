"""Independent NumPy oracles for the qmoe tests.

Nothing here calls qmoe: the quantizer, the unpacker/dequantizer and the
float64 MoE forward are written from the operator contract (ONNX Runtime's QMoE),
not from the C++ sources, so that a shared misunderstanding cannot hide.

* ``np_quantize`` mirrors the documented quantization rule with float32
  arithmetic (so its codes can be compared bit for bit with qmoe.quantize).
* ``np_unpack`` / ``np_dequantize`` are written apart from the packer: they
  split bytes arithmetically (% 16, // 16) and interleave, rather than
  reversing the packer's strided slicing.
* ``np_moe`` is a float64 forward vectorised per expert; ``np_reference`` runs
  it on the raw QMoE inputs (qmoe.reference's arguments). The benchmarks in
  bench/ use these too (through bench/bench_setup.py): one float64 reference.
"""

from __future__ import annotations

import numpy as np

ORT_INPUTS = (
    "input", "router_probs",
    "fc1_experts_weights", "fc1_scales", "fc1_experts_bias",
    "fc2_experts_weights", "fc2_scales", "fc2_experts_bias",
    "fc3_experts_weights", "fc3_scales", "fc3_experts_bias",
    "fc1_zero_points", "fc2_zero_points", "fc3_zero_points",
    "router_weights",
)

GPT_OSS_SWIGLU = dict(activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0)


# --------------------------------------------------------------------------
# Quantizer (float32 arithmetic, the documented rule)
# --------------------------------------------------------------------------

def _pack_last_axis(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs uint8 codes along the last axis: 4-bit puts element 2j in the low
    nibble of byte j and 2j+1 in the high nibble (zero-padded to even length)."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        pad = np.zeros(codes.shape[:-1] + (1,), np.uint8)
        codes = np.concatenate([codes, pad], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def np_quantize(w, bits: int, block: int, symmetric: bool = True):
    """(packed uint8 [E,N,K/pack], float32 scales, packed zero points | None,
    integer codes [E,N,K], integer zero points [E,N,nb]).

    Symmetric: scale = absmax/(2^(b-1)-1), code = clamp(rint(v * (1/scale)) + 2^(b-1)).
    Asymmetric: range [min(0,min), max(0,max)], scale = (hi-lo)/(2^b-1),
    zp = clamp(rint(-lo/scale)), code = clamp(rint(v * (1/scale)) + zp).
    All in float32, round-half-to-even; a zero block gets scale 0 and code zp."""
    w = np.asarray(w).astype(np.float32)
    E, N, K = w.shape
    bs = K if block == 0 else block
    nb = K // bs
    wb = w.reshape(E, N, nb, bs)
    levels = np.float32(2 ** bits - 1)
    offset = np.float32(2 ** (bits - 1))
    if symmetric:
        amax = np.abs(wb).max(-1)
        scale = (amax / np.float32(offset - 1)).astype(np.float32)
        zp = np.full(scale.shape, offset, np.float32)
    else:
        lo = np.minimum(wb.min(-1), np.float32(0))
        hi = np.maximum(wb.max(-1), np.float32(0))
        scale = ((hi - lo) / levels).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale > 0, np.clip(np.rint(-lo / scale), 0, levels), offset).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint(wb * inv[..., None]) + zp[..., None], 0, levels).astype(np.uint8).reshape(E, N, K)
    packed = _pack_last_axis(codes, bits)
    zpi = zp.astype(np.uint8)
    scales = scale if block else scale.reshape(E, N)
    if symmetric:
        zpp = None
    elif block:
        zpp = _pack_last_axis(zpi, bits)                    # [E, N, ceil(nb/pack)]
    else:
        zpp = _pack_last_axis(zpi.reshape(E, N), bits)      # [E, ceil(N/pack)] packed across rows
    return packed, scales.astype(np.float32), zpp, codes, zpi


# --------------------------------------------------------------------------
# Unpacker / dequantizer (written apart from the packer)
# --------------------------------------------------------------------------

def np_unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes along the last axis: for 4-bit, byte j holds element 2j (bits 0..3)
    and 2j+1 (bits 4..7). Returns int64 [..., count]."""
    p = np.asarray(packed).astype(np.int64)
    if bits == 8:
        return p[..., :count]
    lo = p % 16
    hi = p // 16
    both = np.stack([lo, hi], axis=-1).reshape(p.shape[:-1] + (2 * p.shape[-1],))
    return both[..., :count]


def np_dequantize(packed, scales, zero_points, bits: int, block: int, K: int) -> np.ndarray:
    """float64 [E, N, K] = scale * (code - zp); zp = 2^(bits-1) when absent."""
    E, N = packed.shape[0], packed.shape[1]
    q = np_unpack(packed, bits, K).astype(np.float64)
    bs = K if block == 0 else block
    nb = K // bs
    s = np.asarray(scales).astype(np.float64).reshape(E, N, nb)
    if zero_points is None:
        z = np.full((E, N, nb), 2.0 ** (bits - 1))
    elif block == 0:
        z = np_unpack(zero_points, bits, N).reshape(E, N, 1).astype(np.float64)
    else:
        z = np_unpack(zero_points, bits, nb).astype(np.float64)
    return ((q.reshape(E, N, nb, bs) - z[..., None]) * s[..., None]).reshape(E, N, K)


# --------------------------------------------------------------------------
# float64 MoE forward
# --------------------------------------------------------------------------

def _activate(h, act):
    if act == "relu":
        return np.maximum(h, 0.0)
    if act == "gelu":  # tanh approximation
        return 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))
    if act == "silu":
        return h / (1.0 + np.exp(-h))
    if act == "identity":
        return h
    raise ValueError(act)


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def np_moe(x, logits, W1, b1, W2, b2, W3=None, b3=None, router_weights=None, *, k, activation_type,
           normalize_routing_weights=0, swiglu_fusion=0, activation_alpha=1.0, activation_beta=0.0,
           swiglu_limit=float("inf"), act_round=None):
    """float64 MoE forward from dequantized float64 matrices W1 [E,N1,H],
    W2 [E,H,I], W3 [E,I,H]. Returns the input's shape (float64). `act_round`, when
    given, is called as act_round(rows, "fc1") on each expert's FC1/FC3 input rows and
    act_round(rows, "fc2") on its FC2 input rows, and returns what a reduced-precision
    path multiplies instead (e.g. int8 codes times their scales)."""
    rnd = act_round or (lambda a, gemm: a)
    x = np.asarray(x)
    shape = x.shape
    H = shape[-1]
    xs = x.reshape(-1, H).astype(np.float64)
    if xs.shape[0] == 0:
        return np.zeros(shape)
    lg = np.asarray(logits).astype(np.float64).reshape(xs.shape[0], -1)
    T, E = lg.shape
    out = np.zeros((T, H))
    # Choose: largest logits first, ties -> lower expert index (stable sort).
    chosen = np.argsort(-lg, axis=1, kind="stable")[:, :k]
    p = np.exp(lg - lg.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    src = p if router_weights is None else np.asarray(router_weights).astype(np.float64).reshape(T, E)
    wts = np.take_along_axis(src, chosen, axis=1)
    if normalize_routing_weights:
        wts = wts / wts.sum(axis=1, keepdims=True)
    b1, b2, b3 = _f64(b1), _f64(b2), _f64(b3)
    # ONNX float attributes are float32: use exactly the values the operator sees.
    alpha, beta, limit = (float(np.float32(v)) for v in (activation_alpha, activation_beta, swiglu_limit))
    for e in range(E):
        tok, slot = np.nonzero(chosen == e)
        if tok.size == 0:
            continue
        xe = rnd(xs[tok], "fc1")
        h = xe @ W1[e].T + (b1[e] if b1 is not None else 0.0)
        if activation_type == "swiglu":
            if swiglu_fusion == 1:
                g, lin = h[:, 0::2], h[:, 1::2]
            elif swiglu_fusion == 2:
                half = h.shape[1] // 2
                g, lin = h[:, :half], h[:, half:]
            else:
                g = h
                lin = xe @ W3[e].T + (b3[e] if b3 is not None else 0.0)
            G = np.minimum(g, limit)
            L = np.clip(lin, -limit, limit)
            a = G / (1.0 + np.exp(-alpha * G)) * (L + beta)
        else:
            a = _activate(h, activation_type)
        y = rnd(a, "fc2") @ W2[e].T + (b2[e] if b2 is not None else 0.0)
        np.add.at(out, tok, wts[tok, slot][:, None] * y)
    return out.reshape(shape)


class _Experts:
    """Indexable like np_dequantize's [E, N, K] result, dequantizing expert e only when [e] is asked for, so
    that a forward on full-size layers (the benchmarks' reference) never holds every expert in float64."""

    def __init__(self, packed, scales, zero_points, bits, block, K):
        self.args = (packed, scales, zero_points, bits, block, K)

    def __getitem__(self, e):
        packed, scales, zp, bits, block, K = self.args
        return np_dequantize(packed[e:e + 1], scales[e:e + 1], None if zp is None else zp[e:e + 1], bits, block,
                             K)[0]


def np_reference(x, logits, router_weights=None, act_round=None, **kw):
    """np_moe straight from the raw QMoE inputs, with qmoe.reference's keyword arguments (ONNX Runtime's
    input and attribute names: fc1_experts_weights, fc1_scales, ..., k, expert_weight_bits, block_size);
    act_round as np_moe's."""
    bits, block = kw.get("expert_weight_bits", 4), kw.get("block_size", 0)
    H = np.asarray(x).shape[-1]

    def mat(name, K=None):
        w = kw.get(f"{name}_experts_weights")
        if w is None:
            return None
        w = np.asarray(w)
        K = K or w.shape[-1] * (8 // bits)
        return _Experts(w, np.asarray(kw[f"{name}_scales"]), kw.get(f"{name}_zero_points"), bits, block, K)

    keep = ("k", "activation_type", "normalize_routing_weights", "swiglu_fusion", "activation_alpha",
            "activation_beta", "swiglu_limit")
    return np_moe(x, logits, mat("fc1", H), kw.get("fc1_experts_bias"), mat("fc2"), kw.get("fc2_experts_bias"),
                  mat("fc3", H), kw.get("fc3_experts_bias"), router_weights, act_round=act_round,
                  **{a: v for a, v in kw.items() if a in keep})


WORST_ERRORS = {}


def record(category: str, err: float) -> None:
    """Remembers the largest relative error seen for `category` (printed by conftest.py)."""
    WORST_ERRORS[category] = max(WORST_ERRORS.get(category, 0.0), float(err))


def rel_max_err(got, want) -> float:
    """max|got - want| / max|want| in float64 (0 for empty arrays)."""
    got = np.asarray(got).astype(np.float64)
    want = np.asarray(want).astype(np.float64)
    if want.size == 0:
        return 0.0
    denom = np.abs(want).max()
    return float(np.abs(got - want).max() / (denom if denom > 0 else 1.0))


# --------------------------------------------------------------------------
# Random layers
# --------------------------------------------------------------------------

def make_layer(rng, *, E, H, I, bits=4, block=0, zero_points=False, bias=True, activation_type="relu",
               swiglu_fusion=0, quantizer=None, float_dtype=np.float32, **extra_attrs):
    """A random layer in raw QMoE layout. Returns (weights kwargs, attrs kwargs,
    dequantized float64 matrices dict). `quantizer(w, bits, block, symmetric)`
    returns (packed, scales, zp); by default np_quantize."""
    swiglu = activation_type == "swiglu"
    n1 = 2 * I if swiglu and swiglu_fusion in (1, 2) else I
    q = quantizer or (lambda w, b, bl, s: np_quantize(w, b, bl, s)[:3])
    mats = {"fc1": rng.standard_normal((E, n1, H)).astype(np.float32) * 0.1,
            "fc2": rng.standard_normal((E, H, I)).astype(np.float32) * 0.1}
    if swiglu and swiglu_fusion == 0:
        mats["fc3"] = rng.standard_normal((E, I, H)).astype(np.float32) * 0.1
    weights, deq = {}, {}
    for name, m in mats.items():
        packed, scales, zp = q(m, bits, block, not zero_points)
        weights[f"{name}_experts_weights"] = packed
        weights[f"{name}_scales"] = np.asarray(scales).astype(float_dtype)
        if zp is not None:
            weights[f"{name}_zero_points"] = zp
        if bias:
            weights[f"{name}_experts_bias"] = (rng.standard_normal((E, m.shape[1])) * 0.1).astype(float_dtype)
        K = m.shape[2]
        deq[name] = np_dequantize(packed, weights[f"{name}_scales"], zp, bits, block, K)
        deq[name + "_bias"] = weights.get(f"{name}_experts_bias")
    attrs = dict(activation_type=activation_type, expert_weight_bits=bits, block_size=block,
                 swiglu_fusion=swiglu_fusion if swiglu else 0, **extra_attrs)
    return weights, attrs, deq


def np_moe_from(deq, x, logits, attrs, router_weights=None, act_round=None):
    """np_moe with the matrices of make_layer and qmoe-style attribute kwargs."""
    keep = ("k", "activation_type", "normalize_routing_weights", "swiglu_fusion", "activation_alpha",
            "activation_beta", "swiglu_limit")
    return np_moe(x, logits, deq["fc1"], deq["fc1_bias"], deq["fc2"], deq["fc2_bias"], deq.get("fc3"),
                  deq.get("fc3_bias"), router_weights, act_round=act_round,
                  **{a: v for a, v in attrs.items() if a in keep})
