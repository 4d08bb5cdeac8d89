"""Synthetic weight sets in ONNX Runtime's QMoE layout (numpy), the layer's attributes and the inputs.
The float64 reference that checks them is tests/python/qmoe_np.py (np_reference, np_dequantize)."""
from __future__ import annotations

import math

import numpy as np

from . import common


def _code_lut(bits):
    """byte -> byte whose code(s) lie in the symmetric range 1..2^bits-1 (0 becomes the zero point)."""
    b, zp = np.arange(256), 1 << (bits - 1)
    if bits == 4:
        lo, hi = b & 15, b >> 4
        return (np.where(lo == 0, zp, lo) | (np.where(hi == 0, zp, hi) << 4)).astype(np.uint8)
    return np.where(b == 0, zp, b).astype(np.uint8)


def random_bytes(rng, n):
    return rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]  # 3x faster than rng.bytes


def random_codes(rng, shape, bits, full_range=False):
    """Packed codes: in the symmetric range 1..2^bits-1, or any code (full_range: for zero points)."""
    raw = random_bytes(rng, int(np.prod(shape)))
    return (raw if full_range else _code_lut(bits)[raw]).reshape(shape)


def random_zero_points(rng, E, n, nb, bits):
    """Zero points in 0..2^bits-1 per (row, block) in ONNX Runtime's packing: row-wise (nb = 0) [E, ceil(n/pack)]
    packed across rows, block-wise [E, n, ceil(nb/pack)] packed along blocks (even index in the low nibble)."""
    z = random_bytes(rng, E * n * max(nb, 1)).reshape(E, n if nb else 1, max(nb, 1) if nb else n)
    if bits == 4:
        z = z & 15
        if z.shape[-1] % 2:
            z = np.concatenate([z, np.zeros(z.shape[:-1] + (1,), np.uint8)], axis=-1)
        z = (z[..., 0::2] | (z[..., 1::2] << 4)).astype(np.uint8)
    return z.reshape(E, -1) if not nb else z


def random_scales(rng, shape, fan_in, bits, zero_points=False):
    """m * 2^p: with |q - zp| <= 7 (4-bit) and m in 8..15, or |q - zp| <= 127 (8-bit) and m = 1, every
    weight has <= 7 significant bits (exact in bf16 and f16); with zero points |q - zp| <= 15 (255), and m
    (8..15, or a power of two) times it stays below 2^8: exact too. Weights' std is about 1/sqrt(fan_in)."""
    code_std = (4.18 if bits == 4 else 73.6) * (1.41 if zero_points else 1.0)
    target = 1.0 / (math.sqrt(fan_in) * code_std)
    if bits == 4:
        p = round(math.log2(target / 11.5))
        m = rng.integers(8, 16, size=shape).astype(np.float32)
    else:
        p = round(math.log2(target))
        m = np.exp2(rng.integers(-1, 2, size=shape)).astype(np.float32)
    return (m * np.float32(2.0 ** p)).astype(np.float32)


def mat_names(fusion):
    """(prefix, rows, cols) of each weight matrix: FC1 (2I rows when fused), FC2, FC3 (fusion 0)."""
    return [("fc1", "N1", "H"), ("fc2", "H", "I")] + ([("fc3", "I", "H")] if fusion == 0 else [])


def dims(cfg, fusion):
    return dict(H=cfg["H"], I=cfg["I"], N1=(2 if fusion else 1) * cfg["I"])


def gen_set(rng, cfg, bits, block, fusion, weights="codes", zero_points=False):
    """One weight set as qmoe.Layer's keyword arguments (numpy, ORT layout); zero_points: codes over the
    full range with a random zero point per row (row-wise) or per (row, block) ("codes" weights only)."""
    E, pack, d = cfg["E"], 8 // bits, dims(cfg, fusion)
    W = {}
    for pre, rows, cols in mat_names(fusion):
        n, k = d[rows], d[cols]
        if weights == "codes":
            W[f"{pre}_experts_weights"] = random_codes(rng, (E, n, k // pack), bits, zero_points)
            W[f"{pre}_scales"] = random_scales(rng, (E, n) if block == 0 else (E, n, k // block), k, bits,
                                               zero_points)
            if zero_points:
                W[f"{pre}_zero_points"] = random_zero_points(rng, E, n, k // block if block else 0, bits)
        else:  # Gaussian float32, one expert at a time through qmoe.quantize
            if zero_points:
                raise ValueError("zero points are generated with the \"codes\" weights only")
            qs, ss = [], []
            for _ in range(E):
                w = rng.standard_normal((1, n, k), dtype=np.float32) * np.float32(1 / math.sqrt(k))
                q, s, zp = common.qmoe.quantize(w, bits=bits, block_size=block, symmetric=True)
                assert zp is None
                qs.append(np.asarray(q)[0])
                ss.append(np.asarray(s, np.float32)[0])
                del w
            W[f"{pre}_experts_weights"], W[f"{pre}_scales"] = np.stack(qs), np.stack(ss)
        if cfg["bias"]:  # multiples of 1/256 in [-1/8, 1/8]: exact in bf16 and f16
            W[f"{pre}_experts_bias"] = (rng.integers(-32, 33, size=(E, n)) / 256.0).astype(np.float32)
    return W


def layer_attrs(cfg, bits, block, fusion):
    return dict(k=cfg["k"], activation_type="swiglu", swiglu_fusion=fusion, normalize_routing_weights=1,
                expert_weight_bits=bits, block_size=block, swiglu_limit=float(cfg["limit"]),
                activation_alpha=float(cfg["alpha"]), activation_beta=float(cfg["beta"]))


def make_inputs(rng, T, H, E, k):
    """x [T,H] float32 (cast to the run dtype on the device), logits [T,E] exact in bf16/f16 and distinct
    per token, and the [E] mask of the experts the call routes to."""
    x = rng.standard_normal((T, H), dtype=np.float32)
    perm = np.argsort(rng.random((T, E)), axis=1)
    c = 2.0 ** -round(math.log2(max(E / 4, 1)))  # a logit range of about 4
    lg = ((perm - E // 2) * c).astype(np.float32)
    used = np.zeros(E, bool)
    used[np.argsort(-lg, axis=1, kind="stable")[:, :k].ravel()] = True
    return x, lg, used
