#!/usr/bin/env python3
"""One model-shaped CUDA layer called a few times at T tokens: a target for a profiler.

    ncu --kernel-name-base demangled -k regex:qmoe --launch-skip 8 --launch-count 4 \\
        python bench/gpu_one_call.py --model qwen3-30b-a3b --tokens 1 --calls 3

(4-bit, the model's block size, random codes, bf16 activations; tools/shapes.json.)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import common  # noqa: E402
from gpu.weights import gen_set, layer_attrs, make_inputs  # noqa: E402

import qmoe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    cfg = common.MODELS[args.model]
    rng = np.random.default_rng(1)
    layer = qmoe.Layer(**gen_set(rng, cfg, 4, cfg["block"], 1), **layer_attrs(cfg, 4, cfg["block"], 1),
                       device="cuda")
    x, lg, _ = make_inputs(rng, args.tokens, cfg["H"], cfg["E"], cfg["k"])
    xd = torch.from_numpy(x).to("cuda", torch.bfloat16)
    lgd = torch.from_numpy(lg).to("cuda", torch.bfloat16)
    for _ in range(args.calls):
        layer(xd, lgd)
    torch.cuda.synchronize()
    print(f"{args.model} T={args.tokens}: {args.calls} calls of {layer.kernel_name}")


if __name__ == "__main__":
    main()
