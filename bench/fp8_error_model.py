#!/usr/bin/env python3
"""What 8-bit activations (FP8 E4M3 or int8) would cost in accuracy: a numpy model.

    python bench/fp8_error_model.py [--models qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b] [--tokens 16]
                                    [--formats e4m3,int8] [--scales token,128] [--json out.json]

For each reference shape (tools/shapes.json; 4-bit codes and scales as bench/gpu_vs_torch.py makes them,
exact in bfloat16) it runs the float64 oracle (tests/python/qmoe_np.py) twice: as is, and with the
activation operand of the expert GEMMs rounded the way an FP8 tensor-core path would see it: the token
dtype (bfloat16) first, then E4M3 with a float32 scale amax/448 (or int8, amax/127, round half to even)
per token row or per block of columns. Weights stay exact (int4 codes are exact in E4M3 and int8; scales
are applied in float32), so the difference is
the activations' rounding alone. It reports the relative L2 error against the unrounded oracle with the
rounding on FC1's input, on FC2's input, and on both (the oracle's act_round hook says which GEMM a
row set feeds).

Why: E4M3 keeps 3 mantissa bits, a relative rounding error of about 2^-4 / sqrt(3) = 3.6% RMS per
element whatever the scale granularity, and a dot product of many such terms carries about that relative
error; a finer scale only helps rows with outliers. This model puts a number on the choice (which GEMMs,
which granularity) against the accuracy target before any kernel is written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "python"))
import ml_dtypes  # noqa: E402
import qmoe_np  # noqa: E402
from gpu.common import MODELS  # noqa: E402
from gpu.weights import gen_set, layer_attrs, make_inputs  # noqa: E402

E4M3 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
E4M3_MAX = 448.0


def round_act(a: np.ndarray, group: int, fmt: str = "e4m3") -> np.ndarray:
    """Rows of `a` as an 8-bit activation path holds them: bfloat16, then the 8-bit format times a float32
    scale per row (group 0) or per `group` columns (a ragged last group padded with zeros). e4m3: scale
    amax / 448, values rounded to E4M3; int8: scale amax / 127, values rounded to the nearest integer
    (ties to even) in -127..127, as the CPU's accuracy_level 4 does per 16 columns."""
    rows, k = a.shape
    g = k if group == 0 else group
    kp = -(-k // g) * g
    x = np.pad(a.astype(BF16).astype(np.float64), ((0, 0), (0, kp - k))).reshape(rows, kp // g, g)
    top = E4M3_MAX if fmt == "e4m3" else 127.0
    scale = (np.abs(x).max(axis=-1, keepdims=True) / top).astype(np.float32).astype(np.float64)
    scale[scale == 0] = 1.0
    v = (x / scale).astype(np.float32)
    q = v.astype(E4M3).astype(np.float64) if fmt == "e4m3" else np.clip(np.rint(v), -127, 127).astype(np.float64)
    return (q * scale).reshape(rows, kp)[:, :k]


def model_error(model: str, tokens: int, group: int, which: str, fmt: str = "e4m3", seed: int = 3) -> float:
    cfg = dict(MODELS[model])
    rng = np.random.default_rng(seed)
    block = cfg["block"]
    weights = gen_set(rng, cfg, 4, block, 1)
    attrs = layer_attrs(cfg, 4, block, 1)
    x, logits, _ = make_inputs(rng, tokens, cfg["H"], cfg["E"], cfg["k"])
    x = x.astype(BF16).astype(np.float64)  # the call's input in the token dtype
    ref = qmoe_np.np_reference(x, logits, **weights, **attrs)

    def act_round(a: np.ndarray, gemm: str) -> np.ndarray:
        return round_act(a, group, fmt) if which in ("both", gemm) else a

    y = qmoe_np.np_reference(x, logits, act_round=act_round, **weights, **attrs)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--scales", default="token,128", help="comma list: token (one scale per row) or a column count")
    p.add_argument("--formats", default="e4m3", help="comma list: e4m3 (FP8) and/or int8")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    models = a.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    groups: List[int] = []
    for sc in a.scales.split(","):
        if sc != "token" and not (sc.isdigit() and int(sc) > 0):
            p.error(f"--scales: expected 'token' or a positive column count, got {sc!r}")
        groups.append(0 if sc == "token" else int(sc))
    formats = a.formats.split(",")
    if any(f not in ("e4m3", "int8") for f in formats):
        p.error(f"--formats: expected e4m3 and/or int8, got {a.formats!r}")
    if a.tokens < 1:
        p.error(f"--tokens: expected at least 1, got {a.tokens}")
    rows: List[Dict[str, Any]] = []
    print(f"relative L2 vs the float64 oracle, T = {a.tokens}, activations rounded bf16 -> 8 bits with a float32 scale")
    gemms = ("fc1", "fc2", "both")
    for model in models:
        for fmt in formats:
            for group in groups:
                sc = "token" if group == 0 else str(group)
                for which in gemms:
                    err = model_error(model, a.tokens, group, which, fmt)
                    rows.append(dict(model=model, tokens=a.tokens, format=fmt, scale=sc, gemms=which, rel_l2=err))
                    print(f"  {model:<14} {fmt:<4} scale per {sc:<6} rounded: {which:<5} {err:.2e}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(tool="bench/fp8_error_model.py", rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
