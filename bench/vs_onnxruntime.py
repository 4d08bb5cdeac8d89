#!/usr/bin/env python3
"""qmoe against ONNX Runtime's com.microsoft::QMoE (CPU EP), same weights, one run.

Both sides get the same raw quantized weights (ONNX Runtime's layout, made with
qmoe.quantize) and the same inputs; the script times the median latency of one
call per token count T for each, and compares the outputs.

    python bench/vs_onnxruntime.py                       # gpt-oss-20b, 4-bit row-wise, 2 threads
    python bench/vs_onnxruntime.py --threads 2 --tokens 1,16,512 --json out.json
    python bench/vs_onnxruntime.py --model qwen3-30b-a3b --bits 4 --block 128
    python bench/vs_onnxruntime.py --selfcheck           # tiny shapes vs a numpy float64 reference

The ORT model is a one-node graph whose expert weights are initializers, so
ONNX Runtime can prepack them at session creation (its fastest CPU path), with
normalize_routing_weights=1 (ORT's CPU kernel always renormalizes; with the
flag set both define the same function) and weights_prepacked=0 (raw
[E, N, K/pack] layout, the format qmoe.quantize produces).

Needs: numpy, onnx, onnxruntime (tested with 1.32.0) and the qmoe package.
Without qmoe installed the script still runs the ONNX Runtime half (weights
then come from a numpy copy of the same symmetric quantizer), to test the setup.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

try:
    import qmoe  # the package under test
except ImportError:  # pragma: no cover - exercised only before the package exists
    qmoe = None

# The reference shapes of DESIGN.md §3 (H, I, E, k, swiglu attributes, default block size).
MODELS = {
    "gpt-oss-20b": dict(H=2880, I=2880, E=32, k=4, alpha=1.702, beta=1.0, limit=7.0, block=0, bias=True),
    "qwen3-30b-a3b": dict(H=2048, I=768, E=128, k=8, alpha=1.0, beta=0.0, limit=math.inf, block=128, bias=False),
    "mixtral-8x7b": dict(H=4096, I=14336, E=8, k=2, alpha=1.0, beta=0.0, limit=math.inf, block=32, bias=False),
    "deepseek-v3": dict(H=7168, I=2048, E=256, k=8, alpha=1.0, beta=0.0, limit=math.inf, block=128, bias=False),
}


# --------------------------------------------------------------------------- weights

def quantize_np(w: np.ndarray, bits: int, block_size: int):
    """numpy copy of qmoe's symmetric quantizer (used only when qmoe is absent)."""
    e, n, k = w.shape
    bl = block_size or k
    offset = 1 << (bits - 1)
    wb = w.reshape(e, n, k // bl, bl).astype(np.float32)
    amax = np.abs(wb).max(axis=-1, keepdims=True)
    scale = (amax / np.float32(offset - 1)).astype(np.float32)
    inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    q = np.clip(np.rint(wb * inv) + offset, 0, (1 << bits) - 1).astype(np.uint8).reshape(e, n, k)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = scale.reshape(e, n, k // bl)
    return q, (scales.reshape(e, n) if block_size == 0 else scales), None


def quantize(w, bits, block_size):
    if qmoe is not None:
        return qmoe.quantize(w, bits=bits, block_size=block_size, symmetric=True)
    return quantize_np(w, bits, block_size)


def synth_matrix(rng, e, n, k, bits, block_size, progress):
    """[E, N, K] Gaussian weights (std 1/sqrt(K)) quantized one expert at a time."""
    wq = sc = None
    for i in range(e):
        w = rng.standard_normal((1, n, k), dtype=np.float32)
        w *= np.float32(1.0 / math.sqrt(k))
        q, s, zp = quantize(w, bits, block_size)
        assert zp is None, "symmetric quantization returns no zero points"
        q, s = np.asarray(q), np.asarray(s, dtype=np.float32)
        if wq is None:
            wq = np.empty((e,) + q.shape[1:], np.uint8)
            sc = np.empty((e,) + s.shape[1:], np.float32)
        wq[i], sc[i] = q[0], s[0]
        progress()
    return wq, sc


def synth_weights(cfg, bits, block_size, seed, bias=True):
    H, I, E = cfg["H"], cfg["I"], cfg["E"]
    rng = np.random.default_rng(seed)
    total, done, t0 = 2 * E, [0], time.perf_counter()

    def progress():
        done[0] += 1
        if sys.stderr.isatty():
            el = time.perf_counter() - t0
            print(f"\rquantizing experts {done[0]}/{total}  {el:.1f} s", end="", file=sys.stderr, flush=True)

    w1, s1 = synth_matrix(rng, E, 2 * I, H, bits, block_size, progress)  # swiglu fusion 1: gate/up interleaved
    w2, s2 = synth_matrix(rng, E, H, I, bits, block_size, progress)
    b1 = (0.1 * rng.standard_normal((E, 2 * I))).astype(np.float32) if bias else None
    b2 = (0.1 * rng.standard_normal((E, H))).astype(np.float32) if bias else None
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return dict(w1=w1, s1=s1, b1=b1, w2=w2, s2=s2, b2=b2)


def rss_bytes():
    """VmRSS of this process (Linux), bytes; 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def weight_bytes_per_expert(W):
    n = sum(W[k].nbytes for k in ("w1", "s1", "w2", "s2"))
    n += sum(W[k].nbytes for k in ("b1", "b2") if W[k] is not None)
    return n / W["w1"].shape[0]


# --------------------------------------------------------------------------- ONNX Runtime

def ort_session(W, cfg, bits, block_size, threads):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    H, E = cfg["H"], cfg["E"]
    names = ["fc1_experts_weights", "fc1_scales", "fc1_experts_bias", "fc2_experts_weights", "fc2_scales",
             "fc2_experts_bias"]
    arrays = [W["w1"], W["s1"], W["b1"], W["w2"], W["s2"], W["b2"]]
    inits = [numpy_helper.from_array(a, n) for n, a in zip(names, arrays) if a is not None]
    inputs = ["input", "router_probs"] + [n if a is not None else "" for n, a in zip(names, arrays)]
    attrs = dict(k=cfg["k"], activation_type="swiglu", normalize_routing_weights=1, use_sparse_mixer=0,
                 expert_weight_bits=bits, swiglu_fusion=1, activation_alpha=float(cfg["alpha"]),
                 activation_beta=float(cfg["beta"]), weights_prepacked=0)
    if block_size:
        attrs["block_size"] = block_size
    if math.isfinite(cfg["limit"]):
        attrs["swiglu_limit"] = float(cfg["limit"])
    node = helper.make_node("QMoE", inputs, ["output"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "qmoe_bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["T", H]),
         helper.make_tensor_value_info("router_probs", TensorProto.FLOAT, ["T", E])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["T", H])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    blob = model.SerializeToString()
    del model, graph, inits
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    del blob
    gc.collect()
    return sess


# --------------------------------------------------------------------------- qmoe

def qmoe_layer(W, cfg, bits, block_size, threads):
    return qmoe.Layer(
        fc1_experts_weights=W["w1"], fc1_scales=W["s1"], fc1_experts_bias=W["b1"],
        fc2_experts_weights=W["w2"], fc2_scales=W["s2"], fc2_experts_bias=W["b2"],
        k=cfg["k"], activation_type="swiglu", normalize_routing_weights=1, expert_weight_bits=bits,
        block_size=block_size, swiglu_fusion=1, swiglu_limit=float(cfg["limit"]),
        activation_alpha=float(cfg["alpha"]), activation_beta=float(cfg["beta"]), threads=threads)


# --------------------------------------------------------------------------- reference (selfcheck)

def dequantize_np(wq, s, bits, block_size, k):
    if bits == 4:
        q = np.empty(wq.shape[:-1] + (k,), np.float64)
        q[..., 0::2] = wq & 0x0F
        q[..., 1::2] = wq >> 4
    else:
        q = wq.astype(np.float64)
    q -= 1 << (bits - 1)
    bl = block_size or k
    s = s.reshape(s.shape[0], s.shape[1], -1).astype(np.float64)
    return (q.reshape(q.shape[0], q.shape[1], k // bl, bl) * s[..., None]).reshape(q.shape)


def reference_np(W, cfg, bits, block_size, x, logits):
    """float64 forward of DESIGN §1 (swiglu fusion 1, normalized routing)."""
    H, I, E, k = cfg["H"], cfg["I"], cfg["E"], cfg["k"]
    x, logits = x.astype(np.float64), logits.astype(np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        order = sorted(range(E), key=lambda e: (-logits[t, e], e))[:k]
        p = np.exp(logits[t] - logits[t].max())
        p /= p.sum()
        wts = p[order] / p[order].sum()
        for e, wt in zip(order, wts):
            w1 = dequantize_np(W["w1"][e:e + 1], W["s1"][e:e + 1], bits, block_size, H)[0]
            w2 = dequantize_np(W["w2"][e:e + 1], W["s2"][e:e + 1], bits, block_size, I)[0]
            h = w1 @ x[t] + (W["b1"][e] if W["b1"] is not None else 0)
            g, l = np.minimum(h[0::2], cfg["limit"]), np.clip(h[1::2], -cfg["limit"], cfg["limit"])
            a = g / (1 + np.exp(-cfg["alpha"] * g)) * (l + cfg["beta"])
            out[t] += wt * (w2 @ a + (W["b2"][e] if W["b2"] is not None else 0))
    return out


# --------------------------------------------------------------------------- timing

def touched_experts(logits, k):
    """Distinct experts in the top-k of each token (ties: lower index first)."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return len(np.unique(order))


def time_fn(fn, min_runs, min_time, max_time):
    fn()  # warm-up
    times, t0 = [], time.perf_counter()
    while True:
        a = time.perf_counter()
        fn()
        times.append(time.perf_counter() - a)
        el = time.perf_counter() - t0
        if (len(times) >= min_runs and el >= min_time) or el >= max_time:
            break
    return statistics.median(times), len(times)


def rel_max(a, b):
    """max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def selfcheck(threads):
    """Tiny shapes: ORT and qmoe against the numpy float64 reference."""
    ok = True
    for bits in (4, 8):
        for block in (0, 32):
            cfg = dict(H=64, I=96, E=6, k=2, alpha=1.702, beta=1.0, limit=7.0, block=block, bias=True)
            if block == 0:
                cfg["I"] = 48
            W = synth_weights(cfg, bits, block, seed=7)
            rng = np.random.default_rng(3)
            x = rng.standard_normal((5, cfg["H"]), dtype=np.float32)
            lg = (1.5 * rng.standard_normal((5, cfg["E"]))).astype(np.float32)
            ref = reference_np(W, cfg, bits, block, x, lg)
            y_ort = ort_session(W, cfg, bits, block, threads).run(None, {"input": x, "router_probs": lg})[0]
            # ORT has no float32 kernel for block-wise 8-bit experts: it quantizes the
            # activations to int8 there, so only a loose agreement is expected.
            ort_tol = 3e-2 if (bits == 8 and block) else 1e-4
            line = f"selfcheck bits={bits} block={block}: ort vs ref {rel_max(y_ort, ref):.2e} (tol {ort_tol:g})"
            ok &= rel_max(y_ort, ref) < ort_tol
            if qmoe is not None:
                y_q = np.asarray(qmoe_layer(W, cfg, bits, block, threads)(x, lg))
                line += f", qmoe vs ref {rel_max(y_q, ref):.2e}"
                ok &= rel_max(y_q, ref) < 1e-4
            print(line)
    print("selfcheck:", "OK" if ok else "FAILED")
    return 0 if ok else 1


# --------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt-oss-20b")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--block", type=int, default=None,
                    help="0 = one scale per row; else a power of two >= 16 (default: the model's)")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra_op_num_threads and qmoe threads (default 2)")
    ap.add_argument("--tokens", default="1,16,512", help="comma-separated token counts (default 1,16,512)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-runs", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per T and side, at least (default 1)")
    ap.add_argument("--max-time", type=float, default=10.0, help="seconds per T and side, at most (default 10)")
    ap.add_argument("--no-qmoe", action="store_true", help="time ONNX Runtime only")
    ap.add_argument("--selfcheck", action="store_true", help="tiny shapes vs a numpy float64 reference, then exit")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    a = ap.parse_args(argv)
    try:
        a.tokens = [int(t) for t in a.tokens.split(",")]
    except ValueError:
        ap.error(f"--tokens: expected comma-separated integers, got {a.tokens!r}")
    if any(t < 1 for t in a.tokens):
        ap.error("--tokens: every T must be >= 1")
    if a.threads < 1:
        ap.error("--threads: expected >= 1")
    cfg = MODELS[a.model]
    if a.block is None:
        a.block = cfg["block"]
    if a.block and (a.block < 16 or a.block & (a.block - 1) or cfg["H"] % a.block or cfg["I"] % a.block):
        ap.error(f"--block: expected 0 or a power of two >= 16 dividing H={cfg['H']} and I={cfg['I']}")
    return a


def main(argv=None):
    import onnxruntime as ort

    a = parse_args(argv)
    if a.selfcheck:
        return selfcheck(a.threads)
    run_qmoe = qmoe is not None and not a.no_qmoe
    if qmoe is None:
        print("note: the qmoe package is not installed; timing ONNX Runtime only "
              "(weights from the numpy copy of the quantizer)", file=sys.stderr)
    cfg = dict(MODELS[a.model])
    H, I, E, k = cfg["H"], cfg["I"], cfg["E"], cfg["k"]
    layout = f"block {a.block}" if a.block else "row-wise"
    print(f"{a.model}: H={H} I={I} E={E} k={k} swiglu(fusion 1, alpha {cfg['alpha']}, beta {cfg['beta']}, "
          f"limit {cfg['limit']}){', biases' if cfg['bias'] else ''}; {a.bits}-bit {layout} symmetric, float32; "
          f"{a.threads} thread(s)")
    print(f"onnxruntime {ort.__version__}" + (f", qmoe {getattr(qmoe, '__version__', '?')}" if run_qmoe else ""))

    t0 = time.perf_counter()
    W = synth_weights(cfg, a.bits, a.block, a.seed, bias=cfg["bias"])
    per_expert = weight_bytes_per_expert(W)
    print(f"weights: {per_expert * E / 2**20:.1f} MiB raw quantized ({time.perf_counter() - t0:.1f} s to synthesize)")

    # Memory: RSS growth of each side's load (the raw arrays W stay alive meanwhile).
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    sess = ort_session(W, cfg, a.bits, a.block, a.threads)
    t_ort_load = time.perf_counter() - t0
    rss1 = rss_bytes()
    layer, t_q_load, rss2 = None, 0.0, rss1
    if run_qmoe:
        t0 = time.perf_counter()
        layer = qmoe_layer(W, cfg, a.bits, a.block, a.threads)
        t_q_load = time.perf_counter() - t0
        rss2 = rss_bytes()
    mib = 2.0 ** 20
    print(f"load: ORT session {t_ort_load:.2f} s, RSS {(rss1 - rss0) / mib:+.0f} MiB"
          + (f"; qmoe Layer {t_q_load:.2f} s, RSS {(rss2 - rss1) / mib:+.0f} MiB" if run_qmoe else "")
          + f" (raw weights {per_expert * E / mib:.0f} MiB)")
    del W
    gc.collect()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if load > 0.5:
        print(f"note: load average {load:.2f}: other processes compete for the cores, timings may be noisy")

    rng = np.random.default_rng(a.seed + 1000)
    rows = []
    for T in a.tokens:
        x = rng.standard_normal((T, H), dtype=np.float32)
        lg = (1.5 * rng.standard_normal((T, E))).astype(np.float32)
        x[x == 0], lg[lg == 0] = 1e-3, 1e-3  # never exact zeros
        touched = touched_experts(lg, k)
        feeds = {"input": x, "router_probs": lg}
        y_ort = sess.run(None, feeds)[0]
        t_ort, n_ort = time_fn(lambda: sess.run(None, feeds), a.min_runs, a.min_time, a.max_time)
        row = dict(tokens=T, experts_touched=touched, weight_bytes_touched=per_expert * touched,
                   ort_ms=1e3 * t_ort, ort_runs=n_ort, ort_tokens_per_s=T / t_ort,
                   ort_weight_gbps=per_expert * touched / t_ort / 1e9)
        if run_qmoe:
            y_q = np.asarray(layer(x, lg))
            t_q, n_q = time_fn(lambda: layer(x, lg), a.min_runs, a.min_time, a.max_time)
            row.update(qmoe_ms=1e3 * t_q, qmoe_runs=n_q, qmoe_tokens_per_s=T / t_q,
                       qmoe_weight_gbps=per_expert * touched / t_q / 1e9, speedup=t_ort / t_q,
                       max_abs_diff_over_max_ort=rel_max(y_q, y_ort))
        rows.append(row)
        print(f"  T={T}: ORT {1e3 * t_ort:.2f} ms ({n_ort} runs)"
              + (f", qmoe {row['qmoe_ms']:.2f} ms ({row['qmoe_runs']} runs)" if run_qmoe else ""), flush=True)

    print()
    if run_qmoe:
        print(f"{'T':>6} {'ORT ms':>10} {'qmoe ms':>10} {'speed-up':>9} {'ORT tok/s':>11} {'qmoe tok/s':>11} "
              f"{'experts':>8} {'qmoe GB/s':>10} {'max|q-ort|/max|ort|':>20}")
        for r in rows:
            print(f"{r['tokens']:>6} {r['ort_ms']:>10.2f} {r['qmoe_ms']:>10.2f} {r['speedup']:>8.2f}x "
                  f"{r['ort_tokens_per_s']:>11.1f} {r['qmoe_tokens_per_s']:>11.1f} "
                  f"{r['experts_touched']:>4}/{E:<3} {r['qmoe_weight_gbps']:>10.2f} "
                  f"{r['max_abs_diff_over_max_ort']:>20.2e}")
    else:
        print(f"{'T':>6} {'ORT ms':>10} {'ORT tok/s':>11} {'experts':>8} {'ORT GB/s':>10}")
        for r in rows:
            print(f"{r['tokens']:>6} {r['ort_ms']:>10.2f} {r['ort_tokens_per_s']:>11.1f} "
                  f"{r['experts_touched']:>4}/{E:<3} {r['ort_weight_gbps']:>10.2f}")
    print("(GB/s: raw quantized bytes of the distinct experts a call touches / median time)")

    if a.json:
        out = dict(model=a.model, shape=dict(hidden=H, inter=I, experts=E, k=k), bits=a.bits, block_size=a.block,
                   dtype="float32", threads=a.threads, seed=a.seed, onnxruntime=ort.__version__,
                   qmoe=getattr(qmoe, "__version__", None) if run_qmoe else None,
                   machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
                   load_average=load, weight_bytes_per_expert=per_expert, ort_session_s=t_ort_load,
                   qmoe_layer_s=t_q_load, ort_session_rss_growth=rss1 - rss0, qmoe_layer_rss_growth=rss2 - rss1,
                   results=rows)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
