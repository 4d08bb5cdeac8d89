#!/usr/bin/env python3
"""qmoe's CUDA backend against a bfloat16 PyTorch MoE: same weights, same routing, one run.

For each model shape the script synthesizes several independent weight sets
(raw 4-bit codes and scales in ONNX Runtime's QMoE layout), builds one
``qmoe.Layer(device="cuda")`` per set and, from the very same codes, the
dequantized bf16 weights of a PyTorch MoE (softmax -> top-k -> renormalize ->
grouped FC1 -> swiglu -> grouped FC2 -> weighted sum, grouped by expert with
``torch._grouped_mm`` when it works here, else a per-expert matmul loop). It
measures the GPU's ceilings in the same run (device-to-device copy bandwidth,
bf16 8192^3 matmul rate), times whole layer calls (routing included) with CUDA
events, and reports per (model, T): both times, the speed-up, qmoe's
active-weight GB/s against the copy bandwidth, TFLOP/s against the matmul rate,
the errors (qmoe vs the baseline, both vs the float64 reference), and the
Layer's device memory.

    python bench/gpu_vs_torch.py                                  # 3 models, T = 1,16,128,4096, bf16, eager
    python bench/gpu_vs_torch.py --graph                          # + CUDA-graph columns
    python bench/gpu_vs_torch.py --models mixtral-8x7b --tokens 1,4096 --block-size 64
    python bench/gpu_vs_torch.py --baseline both                  # + the per-expert loop, speed-up vs the faster
    python bench/gpu_vs_torch.py --baseline-only                  # the PyTorch side alone (no qmoe needed)
    python bench/gpu_vs_torch.py --fake-qmoe --ref-max-tokens 1   # harness self-test: qmoe replaced by the baseline
    python bench/gpu_vs_torch.py --dry-run                        # CPU: tiny shapes, baseline math vs numpy float64
    python bench/gpu_vs_torch.py --plot-only out/gpu_vs_torch.json --png out/gpu_vs_torch.png

Why rotate weight sets: a decode call (T = 1) reads k experts only (gpt-oss-20b
4-bit: 4 x 12 MB), less than the H200's 60 MB L2; timing one layer over and over
would time the L2, not HBM. Every timed call therefore uses the next of N
independent weight sets (and its own input), N chosen so that N x (the packed
bytes one T = 1 call reads) exceeds 4 x L2 (at least 2 sets). The timed calls
run in rounds with the sides alternating, after a warm-up of at least 0.3 s per
side: with a short warm-up the side timed first came out up to 1.4x slower than
the identical computation timed second (seen with --fake-qmoe; probably the
GPU's clocks coming back up after the host prepared the next shapes).

Why these weights: codes are uniform random bytes mapped to 1..15 (4-bit; the
symmetric range, 0 -> the zero point 8), scales are m * 2^p with m in 8..15, so
scale * (q - 8) has at most 7 significant bits and is exact in bfloat16 and
float16: the baseline's bf16 weights are the quantized weights exactly, and
qmoe vs baseline differences come from the activations' rounding alone. Router
logits are a random permutation of E distinct values exact in bf16 per token
(no ties, so both sides pick the same experts). ``--weights quantize`` uses
Gaussian weights through qmoe.quantize instead (slower; scales then not exact in bf16).

Exit status: 0 when at least one model ran, 1 when none did, 2 when qmoe's CUDA
backend (or a CUDA device) is unavailable.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # --dry-run still checks the numpy parts
    torch = None
try:
    import qmoe
except ImportError:
    qmoe = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_setup import reference_shapes  # noqa: E402

# The reference shapes (tools/shapes.json) this benchmark runs; block: its default block size (0 = one
# scale per row), 128 for mixtral here (the GPU targets are defined at 128; the CPU benchmarks use 32).
MODELS = {name: m for name, m in reference_shapes().items() if name != "deepseek-v3"}
MODELS["mixtral-8x7b"] = dict(MODELS["mixtral-8x7b"], block=128)
# (model, T, metric, target, text): the issue's acceptance points; metric "speedup" is baseline ms / qmoe ms.
ACCEPTANCE = [
    ("mixtral-8x7b", 1, "bw_fraction", 0.50, "qmoe >= 50% of copy bandwidth"),
    ("mixtral-8x7b", 1, "speedup", 2.5, "qmoe >= 2.5x baseline"),
    ("gpt-oss-20b", 1, "speedup", 2.0, "qmoe >= 2x baseline"),
    ("qwen3-30b-a3b", 1, "speedup", 2.0, "qmoe >= 2x baseline"),
    ("mixtral-8x7b", 4096, "speedup", 0.75, "qmoe >= 0.75x baseline throughput"),
]
ACCEPTANCE_BLOCK = {"mixtral-8x7b": 128}  # the block size a model's targets are defined at
DEFAULT_L2 = 60 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def mib(n):
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def dtname(dtype):
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).split(".")[-1]


# --------------------------------------------------------------------------- weights (numpy, ORT layout)

def _code_lut(bits):
    """byte -> byte whose code(s) lie in the symmetric range 1..2^bits-1 (0 becomes the zero point)."""
    b, zp = np.arange(256), 1 << (bits - 1)
    if bits == 4:
        lo, hi = b & 15, b >> 4
        return (np.where(lo == 0, zp, lo) | (np.where(hi == 0, zp, hi) << 4)).astype(np.uint8)
    return np.where(b == 0, zp, b).astype(np.uint8)


def random_codes(rng, shape, bits):
    n = int(np.prod(shape))
    raw = rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]  # 3x faster than rng.bytes
    return _code_lut(bits)[raw].reshape(shape)


def random_scales(rng, shape, fan_in, bits):
    """m * 2^p: with |q - zp| <= 7 (4-bit) and m in 8..15, or |q - zp| <= 127 (8-bit) and m = 1, every
    weight has <= 7 significant bits (exact in bf16 and f16); weights' std is about 1/sqrt(fan_in)."""
    code_std = 4.18 if bits == 4 else 73.6
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


def gen_set(rng, cfg, bits, block, fusion, weights="codes"):
    """One weight set as qmoe.Layer's keyword arguments (numpy, ORT layout)."""
    E, pack, d = cfg["E"], 8 // bits, dims(cfg, fusion)
    W = {}
    for pre, rows, cols in mat_names(fusion):
        n, k = d[rows], d[cols]
        if weights == "codes":
            W[f"{pre}_experts_weights"] = random_codes(rng, (E, n, k // pack), bits)
            W[f"{pre}_scales"] = random_scales(rng, (E, n) if block == 0 else (E, n, k // block), k, bits)
        else:  # Gaussian float32, one expert at a time through qmoe.quantize
            qs, ss = [], []
            for _ in range(E):
                w = rng.standard_normal((1, n, k), dtype=np.float32) * np.float32(1 / math.sqrt(k))
                q, s, zp = qmoe.quantize(w, bits=bits, block_size=block, symmetric=True)
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


# --------------------------------------------------------------------------- numpy float64 oracle (dry run)

def dequant_np(q, s, bits, block, K):
    """[N, K/pack] codes, [N] or [N, K/block] scales -> float64 [N, K]."""
    if bits == 4:
        c = np.empty((q.shape[0], K), np.float64)
        c[:, 0::2], c[:, 1::2] = q & 15, q >> 4
    else:
        c = q.astype(np.float64)
    c -= 1 << (bits - 1)
    bl = block or K
    return (c.reshape(-1, K // bl, bl) * s.reshape(-1, K // bl, 1).astype(np.float64)).reshape(-1, K)


def oracle_np(W, cfg, bits, block, fusion, x, lg):
    """The operator contract in float64, written apart from the torch baseline."""
    H, I, E, k = cfg["H"], cfg["I"], cfg["E"], cfg["k"]
    alpha, beta, limit = (float(np.float32(cfg[n])) for n in ("alpha", "beta", "limit"))
    d = dims(cfg, fusion)
    x, lg = x.astype(np.float64), lg.astype(np.float64)
    out = np.zeros((x.shape[0], H))
    for t in range(x.shape[0]):
        p = np.exp(lg[t] - lg[t].max())
        p /= p.sum()
        chosen = sorted(range(E), key=lambda e: (-lg[t, e], e))[:k]
        for e in chosen:
            h = {}
            for pre, _rows, cols in mat_names(fusion):
                if pre == "fc2":
                    continue
                w = dequant_np(W[f"{pre}_experts_weights"][e], W[f"{pre}_scales"][e], bits, block, d[cols])
                h[pre] = w @ x[t] + (W[f"{pre}_experts_bias"][e] if cfg["bias"] else 0)
            g, u = (h["fc1"][0::2], h["fc1"][1::2]) if fusion == 1 else (h["fc1"], h["fc3"])
            g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
            a = g / (1 + np.exp(-alpha * g)) * (u + beta)
            w2 = dequant_np(W["fc2_experts_weights"][e], W["fc2_scales"][e], bits, block, I)
            y = w2 @ a + (W["fc2_experts_bias"][e] if cfg["bias"] else 0)
            out[t] += p[e] / p[chosen].sum() * y
    return out


# --------------------------------------------------------------------------- the PyTorch baseline

def dequant_torch(q, s, bits, block, K, dtype, dev):
    """One expert's codes [N, K/pack] (numpy) and scales -> [N, K] in dtype, on dev."""
    q = torch.from_numpy(np.ascontiguousarray(q)).to(dev)
    c = torch.stack((q & 15, q >> 4), dim=-1).reshape(q.shape[0], K) if bits == 4 else q
    v = c.to(torch.float32) - float(1 << (bits - 1))
    bl = block or K
    s = torch.from_numpy(np.ascontiguousarray(s, np.float32)).to(dev).reshape(-1, K // bl, 1)
    return (v.reshape(-1, K // bl, bl) * s).reshape(-1, K).to(dtype)


class TorchMoE:
    """bf16 (or f16) PyTorch MoE on dequantized weights: FC1 as [E, 2I, H] with the gate rows first (the
    layer's interleaved fusion-1 rows, or FC1 and FC3 of fusion 0, reordered once here), FC2 [E, H, I]."""

    def __init__(self, W, cfg, bits, block, fusion, dtype, dev, gmm):
        E, H, I = cfg["E"], cfg["H"], cfg["I"]
        d = dims(cfg, fusion)
        self.cfg, self.gmm, self.k, self.E, self.I = cfg, gmm, cfg["k"], E, I
        self.w1 = torch.empty((E, 2 * I, H), dtype=dtype, device=dev)
        self.w2 = torch.empty((E, H, I), dtype=dtype, device=dev)
        bias = cfg["bias"]
        self.b1 = torch.empty((E, 2 * I), dtype=dtype, device=dev) if bias else None
        self.b2 = torch.empty((E, H), dtype=dtype, device=dev) if bias else None

        def deq(pre, e, K):
            return dequant_torch(W[f"{pre}_experts_weights"][e], W[f"{pre}_scales"][e], bits, block, K, dtype, dev)

        def bias_of(pre, e):
            return torch.from_numpy(W[f"{pre}_experts_bias"][e]).to(dev).to(dtype)

        for e in range(E):
            if fusion == 1:  # rows 2i (gate) and 2i+1 (linear) -> [gate; linear]
                w = deq("fc1", e, H)
                self.w1[e, :I], self.w1[e, I:] = w[0::2], w[1::2]
                if bias:
                    b = bias_of("fc1", e)
                    self.b1[e, :I], self.b1[e, I:] = b[0::2], b[1::2]
            elif fusion == 2:  # already [gate; linear]
                self.w1[e] = deq("fc1", e, H)
                if bias:
                    self.b1[e] = bias_of("fc1", e)
            else:  # FC1 = gate, FC3 = linear
                self.w1[e, :I], self.w1[e, I:] = deq("fc1", e, H), deq("fc3", e, H)
                if bias:
                    self.b1[e, :I], self.b1[e, I:] = bias_of("fc1", e), bias_of("fc3", e)
            self.w2[e] = deq("fc2", e, d["I"])
            if bias:
                self.b2[e] = bias_of("fc2", e)
        # grouped_mm's B operand: [E, K, N] as a transposed view (column-major per expert, cuBLAS's "TN").
        self.w1t, self.w2t = self.w1.transpose(1, 2), self.w2.transpose(1, 2)
        self.arange = torch.arange(E, device=dev)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in (self.w1, self.w2, self.b1, self.b2)
                                if t is not None)

    def _act(self, h):
        c, I = self.cfg, self.I
        g, u = h[:, :I], h[:, I:]
        if c["alpha"] == 1.0 and c["beta"] == 0.0 and not math.isfinite(c["limit"]):
            return F.silu(g) * u
        if math.isfinite(c["limit"]):
            g, u = g.clamp(max=c["limit"]), u.clamp(-c["limit"], c["limit"])
        return g * torch.sigmoid(g * c["alpha"]) * (u + c["beta"])

    @staticmethod
    def _loop_mm(a, w, counts):
        """Per-expert matmuls over the rows grouped by expert (needs the counts on the host)."""
        out = a.new_empty((a.shape[0], w.shape[1]))
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(a[start:start + c], w[e].t(), out=out[start:start + c])
                start += c
        return out

    def __call__(self, x, logits):
        T, k = x.shape[0], self.k
        p = torch.softmax(logits.float(), dim=-1)
        wts, idx = torch.topk(p, k, dim=-1)
        wts = wts / wts.sum(dim=-1, keepdim=True)  # normalize_routing_weights = 1
        flat = idx.reshape(-1)
        se, order = torch.sort(flat, stable=True)  # (token, slot) pairs grouped by expert
        tok = torch.div(order, k, rounding_mode="floor")
        xs = x.index_select(0, tok)
        if self.gmm is not None:  # no host synchronisation: graph-capturable
            offs = torch.searchsorted(se, self.arange, right=True).to(torch.int32)
            h = self.gmm(xs, self.w1t, offs)
        else:
            counts = torch.bincount(flat, minlength=self.E).tolist()
            h = self._loop_mm(xs, self.w1, counts)
        if self.b1 is not None:
            h = h + self.b1.index_select(0, se)
        a = self._act(h)
        y = self.gmm(a, self.w2t, offs) if self.gmm is not None else self._loop_mm(a, self.w2, counts)
        if self.b2 is not None:
            y = y + self.b2.index_select(0, se)
        # The weighted sum in float32 (bf16 x float32 promotes); index_add_ scatters back to the tokens.
        yw = y * wts.reshape(-1).index_select(0, order).unsqueeze(1)
        out = torch.zeros((T, yw.shape[1]), dtype=torch.float32, device=yw.device).index_add_(0, tok, yw)
        return out.to(x.dtype)


def pick_grouped_mm(dtype, dev):
    """(function or None, description): torch._grouped_mm when its schema has `offs` and it matches a
    per-expert loop on a small problem with an empty group; else None (the loop baseline)."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return None, "torch._grouped_mm is not in this torch"
    try:
        schema = str(torch.ops.aten._grouped_mm.default._schema)
    except Exception:  # noqa: BLE001 - the schema is informative only
        schema = "(schema not readable)"
    if "offs" not in schema and "(schema" not in schema:
        return None, f"torch._grouped_mm has no offs argument: {schema}"

    def gmm(a, bt, offs):
        return fn(a, bt, offs=offs)

    try:
        g = torch.Generator(device=dev).manual_seed(0)
        counts = [3, 0, 5, 1]
        a = torch.randn(sum(counts), 64, generator=g, device=dev).to(dtype)
        w = torch.randn(len(counts), 48, 64, generator=g, device=dev).to(dtype)
        offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device=dev)
        got = gmm(a, w.transpose(1, 2), offs).float()
        ref = TorchMoE._loop_mm(a.float(), w.float(), counts)
        err = float((got - ref).norm() / ref.norm())
        if not err < 2e-2:
            return None, f"torch._grouped_mm disagreed with the loop (rel. L2 {err:.1e})"
    except Exception as e:  # noqa: BLE001
        return None, f"torch._grouped_mm raised: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return gmm, f"torch._grouped_mm {schema}"


# --------------------------------------------------------------------------- timing and ceilings

def time_events(fns, calls, warmup_passes=1, warmup_s=0.0):
    """CUDA-event time (ms) of each of `calls` calls cycling through fns (one per weight set), after
    warm-up passes over all of them: at least warmup_passes, and at least warmup_s seconds (a few ms of
    warm-up left the side timed first up to 1.4x slow: clocks coming back up, probably). Returns [(set, ms)]."""
    n, t0, passes = len(fns), time.perf_counter(), 0
    while passes < warmup_passes or time.perf_counter() - t0 < warmup_s:
        for f in fns:
            f()
        torch.cuda.synchronize()
        passes += 1
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for i, (a, b) in enumerate(ev):
        a.record()
        fns[i % n]()
        b.record()
    torch.cuda.synchronize()
    return [(i % n, a.elapsed_time(b)) for i, (a, b) in enumerate(ev)]


def capture_graph(fn):
    """(CUDAGraph, its output tensor) for fn(), warmed up on a side stream first as PyTorch asks."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def measure_ceilings(dev, dtypes, copy_bytes, mm_n=8192):
    """HBM copy bandwidth (device-to-device copy of copy_bytes), a read-only pass (sum of the same
    buffer), and the dense matmul rate (mm_n^3, random data) for each dtype; best of 10 after warm-up."""
    def best_s(fn):
        return min(ms for _, ms in time_events([fn], 10, 3)) / 1e3

    def bandwidth():  # (the buffers are freed on return)
        a = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
        a.fill_(1)
        b = torch.empty_like(a)
        t_copy = best_s(lambda: b.copy_(a))
        t_sum = best_s(lambda: a.view(torch.float32).sum())
        return dict(copy_bytes=copy_bytes, copy_rw_Bps=2 * copy_bytes / t_copy,
                    copy_read_half_Bps=copy_bytes / t_copy, read_sum_Bps=copy_bytes / t_sum)

    def matmul_flops(dt):
        x = torch.randn(mm_n, mm_n, device=dev).to(dt)
        y = torch.randn(mm_n, mm_n, device=dev).to(dt)
        z = torch.empty(mm_n, mm_n, device=dev, dtype=dt)
        return 2.0 * mm_n ** 3 / best_s(lambda: torch.matmul(x, y, out=z))

    c = bandwidth()
    torch.cuda.empty_cache()
    for dt in dtypes:
        c[f"matmul_{dtname(dt)}_flops"] = matmul_flops(dt)
    torch.cuda.empty_cache()
    return c


def merge_ceilings(measured):
    """The highest of each ceiling over the measurements (a ceiling can only come out low)."""
    keys = [k for k in measured[0] if k.endswith("_Bps") or k.endswith("_flops")]
    return {k: max(m[k] for m in measured) for k in keys}


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def summarize(calls, bytes_per_set, flops, ceil, mm_key):
    """Median ms, GB/s (per call: the bytes its set's routing touches / its time; median) and TFLOP/s."""
    ms = [t for _, t in calls]
    med = statistics.median(ms)
    gbps = statistics.median(bytes_per_set[s] / (t / 1e3) / 1e9 for s, t in calls)
    tflops = flops / (med / 1e3) / 1e12
    return dict(ms=med, min_ms=min(ms), max_ms=max(ms), runs=len(ms), gbps=gbps, tflops=tflops,
                bw_fraction=gbps * 1e9 / ceil["copy_rw_Bps"] if ceil else None,
                mm_fraction=tflops * 1e12 / ceil[mm_key] if ceil else None)


# --------------------------------------------------------------------------- one model

def is_oom(e):
    return (torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)) or "out of memory" in str(e).lower()


def free_now():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def run_model(name, a, dev, dtype, gmm, ceil0, l2):
    cfg = dict(MODELS[name])
    H, I, E, k = cfg["H"], cfg["I"], cfg["E"], cfg["k"]
    bits, fusion = a.bits, a.swiglu_fusion
    block = cfg["block"] if a.block_size is None else a.block_size
    for K in (H, I):
        if block and K % block:
            raise ValueError(f"block size {block} does not divide {K} (H={H}, I={I})")
    attrs = layer_attrs(cfg, bits, block, fusion)
    mm_key = f"matmul_{dtname(dtype)}_flops"
    d, pack = dims(cfg, fusion), 8 // bits
    raw_set = 0
    for _pre, rows, cols in mat_names(fusion):
        n, kk = d[rows], d[cols]
        raw_set += E * n * (kk // pack + 4 * (kk // block if block else 1) + (4 if cfg["bias"] else 0))
    base_set = E * (2 * I * H + H * I + (2 * I + H if cfg["bias"] else 0)) * dtype.itemsize
    flops_per_token = 2.0 * k * H * (2 * I + I)  # FC1 (2I x H, or FC1 + FC3) and FC2 (H x I)
    res = dict(model=name, shape=dict(hidden=H, inter=I, experts=E, k=k), bits=bits, block_size=block,
               attributes=attrs, dtype=dtname(dtype), raw_bytes_per_set=raw_set,
               baseline_weight_bytes_per_set=base_set, results=[])
    # Rotation: N sets so that N x (bytes one T = 1 call reads) > 4 x L2, at least 2; as GPU memory allows.
    need = max(2, math.ceil(4 * l2 / (k * raw_set / E)))
    n_sets = a.sets or min(need, a.max_sets)
    free = free_now()
    per_set = (0 if a.baseline_only else raw_set) + base_set
    reserve = 6 << 30  # intermediates at T = 4096, graphs, the reference's host copies are not on the GPU
    fit = int((free - reserve) // max(per_set, 1))
    if fit < 1:
        raise MemoryError(f"one weight set needs {mib(per_set)}, {mib(free)} free on the GPU")
    if fit < n_sets:
        log(f"  GPU memory holds {fit} weight sets, not {n_sets}: rotating over {fit}")
        n_sets = fit
    res.update(weight_sets=n_sets, sets_needed_for_4x_l2=need, l2_bytes=l2)
    layout = f"block {block}" if block else "row-wise"
    log(f"{name}: H={H} I={I} E={E} k={k}, {bits}-bit {layout}, {res['dtype']}: {n_sets} weight sets "
        f"({mib(raw_set)} raw + {mib(base_set)} baseline each)")

    layers, bases, host0, mem_held = [], [], None, []
    try:
        t0 = time.perf_counter()
        for s in range(n_sets):
            W = gen_set(np.random.default_rng([a.seed, s]), cfg, bits, block, fusion, a.weights)
            if not a.baseline_only:
                f0 = free_now()
                tl = time.perf_counter()
                layer = qmoe.Layer(**W, **attrs, device="cuda", max_tokens=max(a.tokens))
                torch.cuda.synchronize()
                tl = time.perf_counter() - tl
                mem_held.append(f0 - torch.cuda.mem_get_info()[0])
                layers.append(layer)
                if s == 0:
                    res["qmoe"] = dict(kernel=getattr(layer, "kernel_name", None),
                                       packed_bytes=getattr(layer, "packed_bytes", None),
                                       device_bytes=getattr(layer, "device_bytes", None),
                                       workspace_bytes=getattr(layer, "workspace_bytes", None), layer_s=tl)
            bases.append(TorchMoE(W, cfg, bits, block, fusion, dtype, dev, gmm))
            if s == 0 and not a.no_reference and qmoe is not None:
                host0 = W
            del W
        res["setup_s"] = time.perf_counter() - t0
        if layers:
            q = res["qmoe"]
            q["gpu_memory_held_per_layer"] = mem_held
            if q["packed_bytes"] and q["device_bytes"] is not None:
                q["device_to_packed"] = q["device_bytes"] / q["packed_bytes"]
            log(f"  qmoe: {q['kernel']}; packed {mib(q['packed_bytes'])}, device {mib(q['device_bytes'])}, "
                f"workspace {mib(q['workspace_bytes'])}; GPU memory per Layer: "
                + ", ".join(mib(m) for m in mem_held) + f" ({q['layer_s']:.2f} s for the first)")
        per_expert_q = ((res["qmoe"]["packed_bytes"] if layers else None) or raw_set) / E
        per_expert_b = bases[0].weight_bytes / E
        res["qmoe_bytes_per_expert"], res["baseline_bytes_per_expert"] = per_expert_q, per_expert_b

        for T in a.tokens:
            row = dict(tokens=T, flops=flops_per_token * T)
            res["results"].append(row)
            try:
                run_tokens(row, T, a, dev, dtype, cfg, layers, bases, host0, attrs, per_expert_q, per_expert_b,
                           ceil0, mm_key)
            except Exception as e:  # noqa: BLE001 - report and go on with the next T
                if not is_oom(e):
                    traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(f"  T={T}: {row['error']}")
                free_now()
    finally:
        del layers, bases, host0
        res["gpu_free_after_bytes"] = free_now()
    return res


def run_tokens(row, T, a, dev, dtype, cfg, layers, bases, host0, attrs, per_expert_q, per_expert_b, ceil, mm_key):
    """Times one T on both sides (eager, then graphs with --graph) and fills `row`."""
    H, E, k = cfg["H"], cfg["E"], cfg["k"]
    n = len(bases)
    rng = np.random.default_rng([a.seed, 1000 + T])
    xs, lgs, used = [], [], []
    for _ in range(n):
        x, lg, u = make_inputs(rng, T, H, E, k)
        xs.append(torch.from_numpy(x).to(dev).to(dtype))
        lgs.append(torch.from_numpy(lg).to(dev).to(dtype))
        used.append(int(u.sum()))
    row.update(sets=n, experts_mean=float(np.mean(used)))
    # Timed calls in rounds, the sides alternating, so that a drift of the clocks favours neither side;
    # every set equally often in each round.
    per_round = math.ceil(max(a.repeats, n) / a.rounds / n) * n
    sides = {"baseline": [lambda i=i: bases[i](xs[i], lgs[i]) for i in range(n)]}
    if a.baseline == "both" and bases[0].gmm is not None:  # the same weights through the per-expert loop
        loops = [copy.copy(b) for b in bases]
        for b in loops:
            b.gmm = None
        sides["baseline_loop"] = [lambda i=i: loops[i](xs[i], lgs[i]) for i in range(n)]
    if layers:
        sides["qmoe"] = [lambda i=i: layers[i](xs[i], lgs[i]) for i in range(n)]
    nbytes = {"qmoe": [u * per_expert_q for u in used]}
    nbytes["baseline"] = nbytes["baseline_loop"] = [u * per_expert_b for u in used]
    out0 = {side: fns[0]().clone() for side, fns in sides.items()}
    got = {side: [] for side in sides}
    for rnd in range(a.rounds):
        for side, fns in sides.items():
            got[side] += time_events(fns, per_round, a.warmup if rnd == 0 else 1, a.warmup_s if rnd == 0 else 0.0)
    for side in sides:
        row[side] = {"eager": summarize(got[side], nbytes[side], row["flops"], ceil, mm_key)}
        log(f"  T={T:<5} {side:<13} eager {row[side]['eager']['ms']:9.4f} ms")
    if "qmoe" in out0:
        row["rel_l2_qmoe_vs_baseline"] = rel_l2(out0["qmoe"], out0["baseline"])
    if a.graph:
        graphs = {}
        for side, fns in sides.items():
            if side == "baseline_loop":  # syncs on the host: not capturable
                continue
            try:
                graphs[side] = [capture_graph(f) for f in fns]
                graphs[side][0][0].replay()
                torch.cuda.synchronize()
                row[side]["graph"] = dict(rel_l2_vs_eager=rel_l2(graphs[side][0][1], out0[side]))
            except Exception as e:  # noqa: BLE001 - reported; the other side and the next T go on
                graphs.pop(side, None)
                row[side]["graph"] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                log(f"  T={T:<5} {side:<13} graph capture failed: {row[side]['graph']['error']}")
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    pass
        got = {side: [] for side in graphs}
        for rnd in range(a.rounds):
            for side, gs in graphs.items():
                got[side] += time_events([g.replay for g, _ in gs], per_round, a.warmup if rnd == 0 else 1,
                                         a.warmup_s if rnd == 0 else 0.0)
        for side in graphs:
            row[side]["graph"].update(summarize(got[side], nbytes[side], row["flops"], ceil, mm_key))
            log(f"  T={T:<5} {side:<13} graph {row[side]['graph']['ms']:9.4f} ms")
        del graphs
    for mode in ("eager", "graph"):
        q, b = row.get("qmoe", {}).get(mode, {}), row["baseline"].get(mode, {})
        if "ms" in q and "ms" in b:
            row.setdefault("speedup", {})[mode] = b["ms"] / q["ms"]
    if "baseline_loop" in row and "eager" in row.get("speedup", {}):
        best = min(row["baseline"]["eager"]["ms"], row["baseline_loop"]["eager"]["ms"])
        row["speedup"]["eager_vs_best"] = best / row["qmoe"]["eager"]["ms"]
    if host0 is not None and T <= a.ref_max_tokens:
        tr = time.perf_counter()
        x0, lg0 = xs[0].float().cpu().numpy(), lgs[0].float().cpu().numpy()
        ref = torch.from_numpy(np.asarray(qmoe.reference(x0, lg0, **host0, **attrs), np.float64))
        row["reference_s"] = time.perf_counter() - tr
        for side, o in out0.items():
            row[f"rel_l2_{side}_vs_f64"] = rel_l2(o.cpu(), ref)


# --------------------------------------------------------------------------- report

def acceptance(models, ceil):
    out = []
    by = {m["model"]: m for m in models}
    for model, T, metric, target, text in ACCEPTANCE:
        m = by.get(model)
        e = dict(model=model, tokens=T, metric=metric, target=target, text=text)
        row = next((r for r in m["results"] if r["tokens"] == T), None) if m and "results" in m else None
        if row is None:
            e["status"] = "not run"
        else:
            if m["block_size"] != ACCEPTANCE_BLOCK.get(model, m["block_size"]):
                e["note"] = f"run at block {m['block_size']}, target defined at block {ACCEPTANCE_BLOCK[model]}"
            for mode in ("eager", "graph", "eager_vs_best"):
                v = (row.get("speedup", {}).get(mode) if metric == "speedup"
                     else row.get("qmoe", {}).get(mode, {}).get(metric))
                if v is not None:
                    e[mode] = v
            e["status"] = "not run" if "eager" not in e else ("PASS" if e["eager"] >= target else "FAIL")
        out.append(e)
    return out


def fmt(v, spec, dash="-"):
    return dash if v is None else format(v, spec)


def pct(frac):
    return "-" if frac is None else f"{100 * frac:.0f}%"


def times(v):
    return "-" if v is None else f"{v:.2f}x"


def print_report(data):
    c = data["ceilings"]
    mm_key = f"matmul_{data['dtype']}_flops"
    print(f"\n{data['machine'].get('gpu', '?')}, torch {data['versions'].get('torch')}, "
          f"qmoe {data['versions'].get('qmoe')}, {data['dtype']} activations")
    print(f"ceilings: copy {c['copy_rw_Bps'] / 1e9:.0f} GB/s (read+written; its read half "
          f"{c['copy_read_half_Bps'] / 1e9:.0f} GB/s), read-only sum {c['read_sum_Bps'] / 1e9:.0f} GB/s, "
          f"{data['dtype']} matmul {c[mm_key] / 1e12:.0f} TFLOP/s; L2 {mib(data['machine']['l2_bytes'])}")
    print(f"baseline: {data['baseline']}")
    for m in data["models"]:
        if "error" in m and "results" not in m:
            print(f"\n{m['model']}: not run: {m['error']}")
            continue
        sh, q = m["shape"], m.get("qmoe")
        layout = f"block {m['block_size']}" if m["block_size"] else "row-wise"
        print(f"\n{m['model']}: H={sh['hidden']} I={sh['inter']} E={sh['experts']} k={sh['k']}, {m['bits']}-bit "
              f"{layout}, swiglu fusion {m['attributes']['swiglu_fusion']}; {m['weight_sets']} weight sets "
              f"(>= {m['sets_needed_for_4x_l2']} for 4x L2)")
        if q:
            print(f"qmoe Layer: {q['kernel']}; packed {mib(q['packed_bytes'])}, device_bytes "
                  f"{mib(q['device_bytes'])} ({fmt(q.get('device_to_packed'), '.3f')}x packed), workspace "
                  f"{mib(q['workspace_bytes'])}; GPU memory held per Layer (mem_get_info): "
                  + ", ".join(mib(x) for x in q["gpu_memory_held_per_layer"]))
        print(f"baseline weights: {mib(m['baseline_weight_bytes_per_set'])} per set")
        graph = any("graph" in r.get(s, {}) for r in m["results"] for s in ("qmoe", "baseline"))
        loop = any("baseline_loop" in r for r in m["results"])
        hdr = (f"{'T':>5} {'experts':>8} {'qmoe ms':>9} {'base ms':>9} {'speedup':>7} {'q GB/s':>7} {'BW%':>4} "
               f"{'b GB/s':>7} {'BW%':>4} {'q TF/s':>7} {'mm%':>4} {'b TF/s':>7} {'mm%':>4}")
        if graph:
            hdr += f" | {'graph q':>9} {'graph b':>9} {'speedup':>7}"
        if loop:
            hdr += f" | {'loop ms':>9} {'vs best':>7}"
        hdr += f" | {'q~base':>7} {'q~f64':>7} {'base~f64':>8}"
        print(hdr)
        print("-" * len(hdr))
        for r in m["results"]:
            if "error" in r and "baseline" not in r:
                print(f"{r['tokens']:>5} error: {r['error']}")
                continue
            qe, be = r.get("qmoe", {}).get("eager", {}), r["baseline"]["eager"]
            sp = r.get("speedup", {})
            line = (f"{r['tokens']:>5} {r['experts_mean']:>4.1f}/{sh['experts']:<3} {fmt(qe.get('ms'), '.4f'):>9} "
                    f"{be['ms']:9.4f} {times(sp.get('eager')):>7} {fmt(qe.get('gbps'), '.0f'):>7} "
                    f"{pct(qe.get('bw_fraction')):>4} {be['gbps']:7.0f} {pct(be['bw_fraction']):>4} "
                    f"{fmt(qe.get('tflops'), '.1f'):>7} {pct(qe.get('mm_fraction')):>4} {be['tflops']:7.1f} "
                    f"{pct(be['mm_fraction']):>4}")
            if graph:
                qg, bg = r.get("qmoe", {}).get("graph", {}), r["baseline"].get("graph", {})
                line += f" | {fmt(qg.get('ms'), '.4f'):>9} {fmt(bg.get('ms'), '.4f'):>9} {times(sp.get('graph')):>7}"
            if loop:
                le = r.get("baseline_loop", {}).get("eager", {})
                line += f" | {fmt(le.get('ms'), '.4f'):>9} {times(sp.get('eager_vs_best')):>7}"
            line += (f" | {fmt(r.get('rel_l2_qmoe_vs_baseline'), '.1e'):>7} "
                     f"{fmt(r.get('rel_l2_qmoe_vs_f64'), '.1e'):>7} {fmt(r.get('rel_l2_baseline_vs_f64'), '.1e'):>8}")
            if "error" in r:
                line += f"  ({r['error']})"
            print(line)
        for r in m["results"]:
            for s in ("qmoe", "baseline"):
                g = r.get(s, {}).get("graph", {})
                if "error" in g:
                    print(f"  T={r['tokens']} {s}: CUDA graph capture failed: {g['error']}")
    print("\n(ms: median over rotating weight sets, CUDA events around each whole layer call, routing included;"
          "\n GB/s: expert bytes the call's routing touches (qmoe: packed_bytes/E each; baseline: its bf16 weights)"
          " / time,"
          "\n BW%: of the copy bandwidth (bytes read+written / time); TF/s: 2*T*k*H*3I flops / time, mm%: of the"
          "\n measured matmul rate; q~base, q~f64, base~f64: relative L2 errors on weight set 0 (f64: qmoe.reference))")
    if data.get("acceptance"):
        print("\nacceptance targets (eager; graph beside):")
        for e in data["acceptance"]:
            val = lambda mode, e=e: ("-" if mode not in e else  # noqa: E731
                                f"{100 * e[mode]:.0f}%" if e["metric"] == "bw_fraction" else f"{e[mode]:.2f}x")
            print(f"  {e['model']:<14} T={e['tokens']:<5} {e['text']:<36} {e['status']:<8} eager {val('eager'):>7}"
                  f"  graph {val('graph'):>7}" + (f"  vs the faster baseline {val('eager_vs_best')}"
                                                   if "eager_vs_best" in e else "")
                  + (f"  ({e['note']})" if "note" in e else ""))


STYLE = {("qmoe", "eager"): ("qmoe (eager)", "#1f77b4", "s", "-"),
         ("qmoe", "graph"): ("qmoe (CUDA graph)", "#1f77b4", "s", "--"),
         ("baseline", "eager"): ("PyTorch bf16 (eager)", "#444444", "o", "-"),
         ("baseline", "graph"): ("PyTorch bf16 (CUDA graph)", "#444444", "o", "--"),
         ("baseline_loop", "eager"): ("PyTorch bf16, per-expert loop (eager)", "#999999", "v", ":")}


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [m for m in data["models"] if m.get("results")]
    if not models:
        raise ValueError("no results to plot")
    c = data["ceilings"]
    mm_key = f"matmul_{data['dtype']}_flops"
    fig, axes = plt.subplots(len(models), 3, figsize=(17, 4.6 * len(models) + 0.8), squeeze=False)

    def series(m, side, mode, key):
        pts = [(r["tokens"], r[side][mode][key]) for r in m["results"]
               if key in r.get(side, {}).get(mode, {})]
        return [p[0] for p in pts], [p[1] for p in pts]

    for row, m in enumerate(models):
        sh = m["shape"]
        layout = f"block {m['block_size']}" if m["block_size"] else "row-wise"
        name = (f"{m['model']} (H={sh['hidden']}, I={sh['inter']}, E={sh['experts']}, k={sh['k']}; "
                f"{m['bits']}-bit {layout})")
        tokens = [r["tokens"] for r in m["results"]]
        for col, (key, ylabel, title, ceil_v, ceil_txt, scale, frac) in enumerate([
                ("ms", "time per call [ms] (median)", "time per call (labels: speed-up vs PyTorch)", None, None, 1,
                 None),
                ("gbps", "GB/s (touched expert bytes / time)", "active-weight bandwidth (labels: % of copy BW)",
                 c["copy_rw_Bps"], "copy {:.0f} GB/s", 1e9, "bw_fraction"),
                ("tflops", "TFLOP/s (2 T k H 3I / time)", "compute rate (labels: % of matmul rate)",
                 c[mm_key], f"{data['dtype']} matmul " + "{:.0f} TFLOP/s", 1e12, "mm_fraction")]):
            ax = axes[row][col]
            top = 0
            for (side, mode), (legend, color, marker, ls) in STYLE.items():
                xs, ys = series(m, side, mode, key)
                if not xs:
                    continue
                legend = legend.replace("bf16", {"float16": "f16"}.get(data["dtype"], "bf16"))
                ax.plot(xs, ys, marker=marker, color=color, ls=ls, label=legend, lw=1.6, ms=6)
                top = max([top] + ys)
                if side == "qmoe" and mode == "eager":
                    for r in m["results"]:
                        s = r.get("qmoe", {}).get("eager", {})
                        if key == "ms" and "eager" in r.get("speedup", {}):
                            txt = f"{r['speedup']['eager']:.2f}x"
                        elif frac and s.get(frac) is not None and s[frac] >= 0.01:
                            txt = f"{100 * s[frac]:.0f}%"
                        else:
                            continue
                        ax.annotate(txt, (r["tokens"], s[key]), textcoords="offset points", xytext=(5, 5),
                                    fontsize=8, color=color)
            if ceil_v:
                ax.axhline(ceil_v / scale, color="#d62728" if col == 1 else "#2ca02c", ls=":", lw=1.5)
                ax.text(0.02, ceil_v / scale, ceil_txt.format(ceil_v / scale), fontsize=8, va="bottom",
                        transform=ax.get_yaxis_transform(), color="#d62728" if col == 1 else "#2ca02c")
                ax.set_ylim(0, max(top, ceil_v / scale) * 1.15)
            ax.set_xscale("log")
            if col == 0:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(  # 2 and 5 of each decade
                    lambda v, _: f"{v:g}" if v > 0 and f"{v:e}"[0] in "25" else ""))
            ax.set_xticks(tokens)
            ax.set_xticklabels([str(t) for t in tokens])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("tokens per call T")
            ax.set_ylabel(ylabel)
            ax.set_title((f"{name}\n" if col == 0 else "\n") + title, fontsize=10)
            ax.grid(True, alpha=0.3)
        targets = [e for e in data.get("acceptance", []) if e["model"] == m["model"]]
        if targets:
            axes[row][0].text(0.02, 0.97, "\n".join(f"T={e['tokens']}: {e['text']}: {e['status']}" for e in targets),
                              transform=axes[row][0].transAxes, fontsize=8, va="top")
    fig.suptitle(f"qmoe CUDA vs PyTorch {data['dtype']} MoE ({data.get('baseline_kind', '?')}) — "
                 f"{data['machine'].get('gpu', '?')}, torch {data['versions'].get('torch')}, {data['date'][:10]}",
                 fontsize=12)
    handles = {}
    for ax in axes.ravel():
        for h, lb in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lb, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.35 / (4.6 * len(models)), 1, 1 - 0.35 / (4.6 * len(models))))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(data, a):
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(data, f, indent=1, default=float)
    log(f"wrote {a.json}")
    if a.png:
        try:
            plot(data, a.png)
            log(f"wrote {a.png}")
        except ImportError:
            log("matplotlib is not installed: no plot")
        except Exception as e:  # noqa: BLE001 - the numbers are already saved
            traceback.print_exc()
            log(f"plot failed: {e}")


# --------------------------------------------------------------------------- dry run (CPU)

def dry_run(a):
    """Tiny shapes: the weight synthesis and layout against qmoe.reference (if qmoe imports), the torch
    baseline (CPU float32 and bfloat16; CUDA too when present) against a numpy float64 oracle, then the
    report, JSON and plot on made-up timings."""
    ok, checks = True, []

    def check(name, err, tol):
        nonlocal ok
        good = err is not None and err <= tol
        ok &= good
        checks.append(dict(check=name, rel_l2=err, tol=tol, ok=good))
        log(f"  {'ok  ' if good else 'FAIL'} {name}: rel L2 {err:.2e} (tol {tol:.0e})")

    cases = [("gpt-oss-like row-wise, fusion 1, biases", dict(MODELS["gpt-oss-20b"], H=64, I=48, E=6, k=2), 4, 0, 1),
             ("swiglu block 32, fusion 1", dict(MODELS["mixtral-8x7b"], H=64, I=96, E=5, k=2), 4, 32, 1),
             ("swiglu block 16, fusion 0 (fc3), biases", dict(MODELS["qwen3-30b-a3b"], H=32, I=48, E=7, k=3,
                                                               bias=True), 4, 16, 0),
             ("8-bit block 32, fusion 1", dict(MODELS["qwen3-30b-a3b"], H=64, I=32, E=4, k=2), 8, 32, 1)]
    bf16 = None
    try:
        import ml_dtypes
        bf16 = ml_dtypes.bfloat16
    except ImportError:
        pass
    for label, cfg, bits, block, fusion in cases:
        log(f"{label}: H={cfg['H']} I={cfg['I']} E={cfg['E']} k={cfg['k']} {bits}-bit")
        W = gen_set(np.random.default_rng(5), cfg, bits, block, fusion)
        x, lg, used = make_inputs(np.random.default_rng(6), 9, cfg["H"], cfg["E"], cfg["k"])
        ref = oracle_np(W, cfg, bits, block, fusion, x, lg)
        if bf16 is not None:  # the dequantized weights and the logits survive a round trip through bf16
            for pre, _rows, cols in mat_names(fusion):
                w = dequant_np(W[f"{pre}_experts_weights"][0], W[f"{pre}_scales"][0], bits, block,
                               dims(cfg, fusion)[cols])
                check(f"{pre} weights exact in bf16", float(np.abs(w.astype(bf16).astype(np.float64) - w).max()), 0)
            check("logits exact in bf16", float(np.abs(lg.astype(bf16).astype(np.float32) - lg).max()), 0)
        attrs = layer_attrs(cfg, bits, block, fusion)
        if qmoe is not None:
            r = np.asarray(qmoe.reference(x, lg, **W, **attrs), np.float64)
            check("numpy oracle vs qmoe.reference", float(np.linalg.norm(r - ref) / np.linalg.norm(ref)), 1e-12)
            y = np.asarray(qmoe.Layer(**W, **attrs)(x, lg), np.float64)
            check("qmoe.Layer (CPU, float32) vs oracle", float(np.linalg.norm(y - ref) / np.linalg.norm(ref)), 1e-5)
        if torch is None:
            continue
        devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for dev in devs:
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
                if dev == "cuda" and dtype == torch.float32:
                    continue
                gmm, why = pick_grouped_mm(dtype, dev)
                for use in ([None, gmm] if gmm else [None]):
                    moe = TorchMoE(W, cfg, bits, block, fusion, dtype, dev, use)
                    xt, lt = torch.from_numpy(x).to(dev).to(dtype), torch.from_numpy(lg).to(dev).to(dtype)
                    if dtype != torch.float32:  # the oracle on the rounded input
                        ref_d = oracle_np(W, cfg, bits, block, fusion, xt.float().cpu().numpy(), lg)
                    else:
                        ref_d = ref
                    y = moe(xt, lt).double().cpu().numpy()
                    name = f"torch baseline {dev} {dtname(dtype)} {'grouped_mm' if use else 'loop'}"
                    check(name + " vs oracle", float(np.linalg.norm(y - ref_d) / np.linalg.norm(ref_d)), tol)
                    if dev == "cuda" and use is not None:
                        g, out = capture_graph(lambda moe=moe, xt=xt, lt=lt: moe(xt, lt))
                        g.replay()
                        torch.cuda.synchronize()
                        g_out = out.double().cpu().numpy()
                        # (index_add_'s float atomics may add in another order: a last-bit difference)
                        check(name + " CUDA graph vs eager", float(np.linalg.norm(g_out - y) / np.linalg.norm(y)), 1e-3)
                if gmm is None:
                    log(f"  (grouped_mm not used on {dev} {dtype}: {why})")
    if torch is None:
        log("torch is not importable here: the baseline's math was not run (numpy parts only)")

    # The report, JSON and plot on made-up timings (fixed, plausible H200 numbers).
    ceil = dict(copy_bytes=2 << 30, copy_rw_Bps=4.3e12, copy_read_half_Bps=2.15e12, read_sum_Bps=4.0e12,
                matmul_bfloat16_flops=7.8e14)
    models = []
    for name in ("gpt-oss-20b", "mixtral-8x7b"):
        cfg = MODELS[name]
        E, k = cfg["E"], cfg["k"]
        pe_q, pe_b = 3 * cfg["I"] * cfg["H"] / 2, 3 * cfg["I"] * cfg["H"] * 2
        m = dict(model=name, shape=dict(hidden=cfg["H"], inter=cfg["I"], experts=E, k=k), bits=4,
                 block_size=cfg["block"], attributes=layer_attrs(cfg, 4, cfg["block"], 1), dtype="bfloat16",
                 weight_sets=3, sets_needed_for_4x_l2=3, baseline_weight_bytes_per_set=pe_b * E,
                 qmoe=dict(kernel="(dry run)", packed_bytes=pe_q * E, device_bytes=pe_q * E * 1.01,
                           workspace_bytes=64 << 20, device_to_packed=1.01,
                           gpu_memory_held_per_layer=[pe_q * E * 1.01 + (64 << 20), pe_q * E * 1.01]), results=[])
        for T in (1, 16, 4096):
            ex = min(E, k * T)
            row = dict(tokens=T, flops=2.0 * k * cfg["H"] * 3 * cfg["I"] * T, sets=3, experts_mean=float(ex))
            for side, pe, scale in (("qmoe", pe_q, 1.0), ("baseline", pe_b, 3.0)):
                base = 0.02 + ex * pe / 3.0e12 * 1e3 + row["flops"] / 6e14 * 1e3
                calls = [(i % 3, base * scale * (1 + 0.01 * i)) for i in range(9)]
                row[side] = dict(eager=summarize(calls, [ex * pe] * 3, row["flops"], ceil, "matmul_bfloat16_flops"),
                                 graph=summarize([(s, t * 0.8) for s, t in calls], [ex * pe] * 3, row["flops"], ceil,
                                                 "matmul_bfloat16_flops"))
            row["speedup"] = {md: row["baseline"][md]["ms"] / row["qmoe"][md]["ms"] for md in ("eager", "graph")}
            if name == "mixtral-8x7b":  # the --baseline both column
                lp = [(s_, t * (1.3 if T == 1 else 0.8)) for s_, t in calls]
                row["baseline_loop"] = dict(eager=summarize(lp, [ex * pe_b] * 3, row["flops"], ceil,
                                                            "matmul_bfloat16_flops"))
                best_eager = min(row["baseline"]["eager"]["ms"], row["baseline_loop"]["eager"]["ms"])
                row["speedup"]["eager_vs_best"] = best_eager / row["qmoe"]["eager"]["ms"]
            row.update(rel_l2_qmoe_vs_baseline=3e-3, rel_l2_qmoe_vs_f64=2e-3 if T <= 16 else None,
                       rel_l2_baseline_vs_f64=3e-3 if T <= 16 else None)
            m["results"].append(row)
        models.append(m)
    data = dict(tool="bench/gpu_vs_torch.py --dry-run", date=datetime.datetime.now().isoformat(timespec="seconds"),
                dtype="bfloat16", machine=dict(gpu="(dry run: made-up timings)", l2_bytes=DEFAULT_L2),
                versions=versions(), baseline="torch._grouped_mm (dry run)", baseline_kind="torch._grouped_mm",
                ceilings=ceil, models=models,
                checks=checks)
    data["acceptance"] = acceptance(models, ceil)
    print_report(data)
    write_outputs(data, a)
    log("dry run: " + ("all checks passed" if ok else "SOME CHECKS FAILED"))
    return 0 if ok else 1


# --------------------------------------------------------------------------- --fake-qmoe

class FakeQmoe:
    """--fake-qmoe: stands in for the qmoe package (the API this script uses) so that the harness itself can
    be tested on a GPU before qmoe's CUDA backend exists. Its Layer is the PyTorch baseline in bf16 (q~base
    is then ~0 and the speed-up ~1x); its reference is the numpy oracle (slow: keep --ref-max-tokens small)."""

    __version__ = "fake (--fake-qmoe)"
    _gmm = None

    @staticmethod
    def cuda_available():
        return torch is not None and torch.cuda.is_available()

    @staticmethod
    def _split(kw):
        W = {n: v for n, v in kw.items() if n.startswith("fc") and v is not None}
        at = {n: v for n, v in kw.items() if not n.startswith("fc")}
        bits, pack = at["expert_weight_bits"], 8 // at["expert_weight_bits"]
        E, _, hp = W["fc1_experts_weights"].shape
        cfg = dict(H=hp * pack, I=W["fc2_experts_weights"].shape[2] * pack, E=E, k=at["k"],
                   alpha=at["activation_alpha"], beta=at["activation_beta"], limit=at["swiglu_limit"],
                   bias="fc1_experts_bias" in W)
        return W, cfg, bits, at["block_size"], at["swiglu_fusion"]

    class Layer:
        def __init__(self, device="cuda", max_tokens=4096, **kw):
            W, cfg, bits, block, fusion = FakeQmoe._split(kw)
            if FakeQmoe._gmm is None:
                FakeQmoe._gmm = pick_grouped_mm(torch.bfloat16, device)[0] or False
            self._moe = TorchMoE(W, cfg, bits, block, fusion, torch.bfloat16, device, FakeQmoe._gmm or None)
            self.packed_bytes = sum(v.nbytes for v in W.values())
            self.device_bytes, self.workspace_bytes = self._moe.weight_bytes, 0
            self.kernel_name = "fake: the PyTorch baseline in bf16 (--fake-qmoe)"

        def __call__(self, x, logits):
            return self._moe(x.to(torch.bfloat16), logits.to(torch.bfloat16)).to(x.dtype)

    @staticmethod
    def reference(x, logits, **kw):
        W, cfg, bits, block, fusion = FakeQmoe._split(kw)
        return oracle_np(W, cfg, bits, block, fusion, x, logits)


# --------------------------------------------------------------------------- main

def versions():
    v = dict(python=platform.python_version(), numpy=np.__version__)
    if torch is not None:
        v.update(torch=torch.__version__, cuda=torch.version.cuda)
    if qmoe is not None:
        v["qmoe"] = getattr(qmoe, "__version__", "?")
    return v


def qmoe_cuda_problem():
    """None when qmoe's CUDA backend builds and runs a tiny layer on torch tensors, else why not."""
    if qmoe is None:
        return "the qmoe package is not importable (build and install it with nvcc present: pip install .)"
    avail = getattr(qmoe, "cuda_available", None)
    if callable(avail) and not avail():
        return "qmoe.cuda_available() is False (this build has no CUDA backend, or no device is visible)"
    try:
        cfg = dict(H=64, I=64, E=4, k=2, alpha=1.0, beta=0.0, limit=math.inf, bias=False)
        W = gen_set(np.random.default_rng(0), cfg, 4, 32, 1)
        layer = qmoe.Layer(**W, **layer_attrs(cfg, 4, 32, 1), device="cuda", max_tokens=4)
        x, lg, _ = make_inputs(np.random.default_rng(1), 3, 64, 4, 2)
        y = layer(torch.from_numpy(x).cuda().bfloat16(), torch.from_numpy(lg).cuda().bfloat16())
        torch.cuda.synchronize()
        if not (isinstance(y, torch.Tensor) and y.is_cuda and tuple(y.shape) == (3, 64)):
            return f"qmoe's CUDA Layer returned {type(y).__name__} {getattr(y, 'shape', '')}, not a [3, 64] CUDA tensor"
        del layer, y
    except Exception as e:  # noqa: BLE001
        return f"qmoe's CUDA backend failed on a tiny layer: {type(e).__name__}: {e}"
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument("--tokens", default="1,16,128,4096", help="comma list of T (default 1,16,128,4096)")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--block-size", type=int, default=None,
                   help="block size for every model (0 = row-wise); default: gpt-oss-20b 0, the others 128")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "f16"))
    p.add_argument("--swiglu-fusion", type=int, default=1, choices=(0, 1, 2),
                   help="1: FC1 rows interleaved (default), 2: halves, 0: separate FC3")
    p.add_argument("--weights", default="codes", choices=("codes", "quantize"),
                   help="codes: random codes and bf16-exact scales (fast, default); quantize: Gaussian weights "
                        "through qmoe.quantize")
    p.add_argument("--graph", action="store_true", help="also time each side captured in CUDA graphs")
    p.add_argument("--baseline", default="grouped", choices=("grouped", "loop", "both"),
                   help="grouped: torch._grouped_mm when it works here (default), else the loop; loop: one "
                        "torch.mm per expert hit (host sync for the counts; no CUDA graph); both: grouped, and "
                        "the loop as an extra eager column with the speed-up against the faster of the two")
    p.add_argument("--repeats", type=int, default=60, help="timed calls per T and side (default 60; each "
                                                            "round rounded up to a multiple of the weight sets)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up passes over the weight sets (default 2)")
    p.add_argument("--warmup-s", type=float, default=0.3, help="and at least this many seconds of warm-up per "
                                                              "T and side (default 0.3: the GPU clocks ramp up)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per T, the sides alternating (default 3)")
    p.add_argument("--sets", type=int, default=0, help="weight sets (default: enough for 4x L2, at least 2)")
    p.add_argument("--max-sets", type=int, default=32)
    p.add_argument("--no-reference", action="store_true", help="skip the float64 reference")
    p.add_argument("--ref-max-tokens", type=int, default=16, help="reference only for T up to this (default 16)")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="copy-bandwidth buffer (default 2 GiB)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--baseline-only", action="store_true", help="time the PyTorch side alone (no qmoe needed)")
    p.add_argument("--fake-qmoe", action="store_true", help="harness self-test on a GPU: qmoe replaced by the "
                                                            "PyTorch baseline and the numpy oracle")
    p.add_argument("--dry-run", action="store_true", help="CPU self-check at tiny shapes, then the report on "
                                                          "made-up timings")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the plot of a JSON written earlier")
    outdir = os.environ.get("OUT") or os.path.join(os.getcwd(), "out")
    p.add_argument("--json", default=None, help=f"default {outdir}/gpu_vs_torch.json ($OUT if set, else ./out)")
    p.add_argument("--png", default=None, help="default: beside the JSON; '' for none")
    a = p.parse_args(argv)
    stem = "gpu_vs_torch_dry_run" if a.dry_run else "gpu_vs_torch"
    a.json = a.json or os.path.join(outdir, stem + ".json")
    if a.png is None:
        a.png = os.path.splitext(a.plot_only or a.json)[0] + ".png"
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in a.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    a.tokens = [int(t) for t in a.tokens.split(",") if t.strip()]
    if not a.tokens or min(a.tokens) < 1:
        p.error("--tokens: positive integers")
    if a.weights == "quantize" and qmoe is None:
        p.error("--weights quantize needs the qmoe package")
    return a


def main(argv):
    a = parse_args(argv)
    if torch is None:
        return run(a)
    with torch.inference_mode():  # no autograd bookkeeping on either side
        return run(a)


def run(a):
    global qmoe
    if a.fake_qmoe:
        qmoe = FakeQmoe
    if a.plot_only:
        with open(a.plot_only) as f:
            plot(json.load(f), a.png)
        log(f"wrote {a.png}")
        return 0
    if a.dry_run:
        return dry_run(a)
    if torch is None or not torch.cuda.is_available():
        log("no CUDA device visible to PyTorch (torch " + (torch.__version__ if torch else "not installed") + ")")
        return 2
    if not a.baseline_only:
        why = qmoe_cuda_problem()
        if why:
            log(f"qmoe's CUDA backend is not available: {why}\n(--baseline-only times the PyTorch side alone)")
            return 2
    dev = torch.device("cuda")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 0) or DEFAULT_L2
    machine = dict(gpu=props.name, sms=props.multi_processor_count, l2_bytes=l2, gpu_memory_bytes=props.total_memory,
                   capability=f"{props.major}.{props.minor}", host=platform.node(), cpus=os.cpu_count())
    if a.baseline == "loop":
        gmm, why = None, "--baseline loop"
    else:
        gmm, why = pick_grouped_mm(dtype, dev)
    baseline = why if gmm else f"per-expert torch.mm loop ({why})"
    log(f"{props.name}: L2 {mib(l2)}; baseline: {baseline}")
    mdt = [torch.bfloat16] + ([dtype] if dtype != torch.bfloat16 else [])
    measured = [measure_ceilings(dev, mdt, a.copy_bytes)]
    ceil = merge_ceilings(measured)
    log(f"ceilings: copy {ceil['copy_rw_Bps'] / 1e9:.0f} GB/s (read+written), "
        f"matmul {ceil[f'matmul_{dtname(dtype)}_flops'] / 1e12:.0f} TFLOP/s")
    data = dict(tool="bench/gpu_vs_torch.py", date=datetime.datetime.now().isoformat(timespec="seconds"),
                args=vars(a), machine=machine, versions=versions(), dtype=dtname(dtype),
                baseline=baseline, baseline_kind="torch._grouped_mm" if gmm else "per-expert loop", models=[])
    for name in a.models:
        try:
            m = run_model(name, a, dev, dtype, gmm, ceil, l2)
        except Exception as e:  # noqa: BLE001 - one model's failure (OOM, say) does not stop the others
            if not is_oom(e) and not isinstance(e, (MemoryError, ValueError)):
                traceback.print_exc()
            m = dict(model=name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log(f"{name}: {m['error']}")
            free_now()
        data["models"].append(m)
    measured.append(measure_ceilings(dev, mdt, a.copy_bytes))
    data["ceilings_measured"] = measured
    data["ceilings"] = ceil = merge_ceilings(measured)
    mm_key = f"matmul_{data['dtype']}_flops"
    for m in data["models"]:  # fractions against the final (highest) ceilings
        for r in m.get("results", []):
            for side in ("qmoe", "baseline", "baseline_loop"):
                for s in r.get(side, {}).values():
                    if "gbps" in s:
                        s["bw_fraction"] = s["gbps"] * 1e9 / ceil["copy_rw_Bps"]
                        s["mm_fraction"] = s["tflops"] * 1e12 / ceil[mm_key]
    if not a.baseline_only:
        data["acceptance"] = acceptance(data["models"], ceil)
    print_report(data)
    write_outputs(data, a)
    return 0 if any(m.get("results") for m in data["models"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
