"""What every module of the GPU benchmark shares: the optional imports, the models it runs, the acceptance
targets, and small helpers. ``common.qmoe`` is the qmoe package, None, or (--fake-qmoe) selftest.FakeQmoe:
read it at call time (``common.qmoe``), never import the name."""
from __future__ import annotations

import platform
import sys

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # --dry-run still checks the numpy parts
    torch = F = None
try:
    import qmoe
except ImportError:
    qmoe = None

from bench_setup import reference_shapes

# The reference shapes (tools/shapes.json) this benchmark runs; block: its default block size (0 = one
# scale per row), 128 for mixtral here (the GPU targets are defined at 128; the CPU benchmarks use 32).
MODELS = {name: m for name, m in reference_shapes().items() if name != "deepseek-v3"}
MODELS["mixtral-8x7b"] = dict(MODELS["mixtral-8x7b"], block=128)
# (model, T, metric, mode, target, text): the acceptance points of the GPU performance issue, judged on
# `mode` ("eager" or "graph"). Metrics: "ms" (qmoe's time per call, at most the target), "bw_fraction"
# (qmoe's share of the copy bandwidth) and "speedup" (baseline ms / qmoe ms), both at least the target.
ACCEPTANCE = [
    ("qwen3-30b-a3b", 1, "ms", "graph", 0.015, "qmoe <= 15 us with graphs"),
    ("qwen3-30b-a3b", 1, "ms", "eager", 0.022, "qmoe <= 22 us eager"),
    ("gpt-oss-20b", 1, "ms", "graph", 0.020, "qmoe <= 20 us with graphs"),
    ("gpt-oss-20b", 1, "ms", "eager", 0.030, "qmoe <= 30 us eager"),
    ("mixtral-8x7b", 1, "bw_fraction", "eager", 0.80, "qmoe >= 80% of copy bandwidth"),
    ("mixtral-8x7b", 16, "bw_fraction", "eager", 0.80, "qmoe >= 80% of copy bandwidth"),
    ("qwen3-30b-a3b", 16, "bw_fraction", "eager", 0.65, "qmoe >= 65% of copy bandwidth"),
    ("gpt-oss-20b", 16, "bw_fraction", "eager", 0.80, "qmoe >= 80% of copy bandwidth"),
    ("mixtral-8x7b", 128, "ms", "eager", 0.33, "qmoe <= 0.33 ms"),
    ("gpt-oss-20b", 128, "ms", "eager", 0.14, "qmoe <= 0.14 ms"),
    ("qwen3-30b-a3b", 128, "ms", "eager", 0.11, "qmoe <= 0.11 ms"),
    ("mixtral-8x7b", 4096, "speedup", "eager", 1.05, "qmoe >= 1.05x the bf16 baseline"),
    ("gpt-oss-20b", 4096, "speedup", "eager", 1.8, "qmoe >= 1.8x the bf16 baseline"),
    ("qwen3-30b-a3b", 4096, "speedup", "eager", 2.0, "qmoe >= 2.0x the bf16 baseline"),
]
ACCEPTANCE_BLOCK = {"mixtral-8x7b": 128}
# --variants: the weight and activation formats timed beside the main rows in the same run (the issue asks that
# float16 tokens, 8-bit weights and zero points "not fall off a cliff"): name -> (label, overrides of the
# main run's --dtype, --bits and --zero-points).
VARIANTS = {
    "f16": ("float16 tokens", dict(dtype="f16")),
    "int8": ("8-bit weights", dict(bits=8)),
    "zp": ("zero points", dict(zero_points=True)),
    "int8zp": ("8-bit weights, zero points", dict(bits=8, zero_points=True)),
}  # the block size a model's targets are defined at
DEFAULT_L2 = 60 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def mib(n):
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def dtname(dtype):
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).split(".")[-1]


def versions():
    v = dict(python=platform.python_version(), numpy=np.__version__)
    if torch is not None:
        v.update(torch=torch.__version__, cuda=torch.version.cuda)
    if qmoe is not None:
        v["qmoe"] = getattr(qmoe, "__version__", "?")
    return v
