#!/usr/bin/env python3
"""A whole ONNX model on ONNX Runtime, plain against offloaded to qmoe (qmoe.onnx).

The model is a stack of gpt-oss-20b-shaped MoE layers (H = I =
2880, E = 32, k = 4, swiglu fusion 1 with alpha 1.702 / beta 1 / limit 7,
biases, normalize_routing_weights = 1; 4-bit row-wise by default), each

    h -> MatMul(router weight) -> Add(router bias) -> com.microsoft::QMoE -> Add(h)

like onnxruntime-genai's gpt-oss export (attention left out: it is the same
on both sides). Weights are random codes and scales made with NumPy and
written as ONNX external data (4 layers: ~1.6 GB). The script then

1. offloads the model with qmoe.onnx.offload (QMoE weights -> a qmoe file,
   nodes -> the qmoe custom op; routers and residuals stay in ONNX Runtime);
2. opens a plain ONNX Runtime session on the original and qmoe.onnx.session
   on the offloaded model, both with ``--threads`` intra-op threads (qmoe's
   layers with the same number);
3. for each T, after warm-up, times whole-model runs alternating between the
   two sessions (plain, offloaded, plain, ...), cycling through a few input
   sets, and checks the outputs agree (max relative error);
4. prints a table and writes JSON with the medians and the ratio.

    python bench/onnx_offload.py --threads 2                   # T = 1, 16; 4 layers
    python bench/onnx_offload.py --threads 16 --tokens 1,16,512 --json out/onnx_offload.json
    python bench/onnx_offload.py --layers 1 --hidden 256 --inter 256 --experts 8   # quick

The source model is kept in ``--dir`` (default out/onnx_offload) and reused
when the same shape is asked again (``--rebuild`` to regenerate); the
offloaded model is written anew each run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_setup import MODELS, cpu_competition, cpu_snapshot, load_average, log, machine_info  # noqa: E402
from bench_setup import rss as _rss  # noqa: E402

GPT_OSS = MODELS["gpt-oss-20b"]  # the layer shape of the stacked model (tools/shapes.json)

import qmoe  # noqa: E402
import qmoe.onnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss():
    """Anonymous resident bytes of this process: what a session holds of its own (the
    weight files themselves are memory-mapped)."""
    return _rss()[0]


# --------------------------------------------------------------------------- the model

class _Data:
    """The external data file, written array by array (64 KiB-aligned)."""

    def __init__(self, path):
        self.location = os.path.basename(path)
        self.f = open(path, "wb")
        self.offset = 0

    def tensor(self, name, a):
        from onnx import TensorProto, helper

        pad = -self.offset % 65536
        self.f.write(b"\0" * pad)
        self.offset += pad
        a = np.ascontiguousarray(a)
        self.f.write(memoryview(a.reshape(-1).view(np.uint8)))
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=list(a.shape),
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.location), ("offset", str(self.offset)), ("length", str(a.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += a.nbytes
        return t


def build_model(path, *, layers, H, I, E, k, bits, block, seed=0):
    """Writes the stacked gpt-oss-shaped model (weights in ``path + '.data'``); returns weight bytes."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    pack = 8 // bits
    data = _Data(path + ".data")
    nodes, inits = [], []
    h = "hidden"
    total = 0
    for j in range(layers):
        p = f"model.layers.{j}.mlp"
        arrays = {}
        for fc, n, kk in (("fc1", 2 * I, H), ("fc2", H, I)):
            nb = 1 if block == 0 else kk // block
            # scale: codes are uniform in [0, 2^bits); keep each output's std ~0.3
            s = 0.3 / (np.sqrt(kk) * 2 ** (bits - 1) / np.sqrt(3))
            arrays[f"{fc}_experts_weights"] = rng.integers(0, 256, (E, n, kk // pack), dtype=np.uint8)
            sc = (s * (0.5 + rng.random((E, n, nb)))).astype(np.float32)
            arrays[f"{fc}_scales"] = sc.reshape(E, n) if block == 0 else sc
            arrays[f"{fc}_experts_bias"] = (0.05 * rng.standard_normal((E, n))).astype(np.float32)
        order = ["fc1_experts_weights", "fc1_scales", "fc1_experts_bias",
                 "fc2_experts_weights", "fc2_scales", "fc2_experts_bias"]
        for name in order:
            inits.append(data.tensor(f"{p}.experts.{name}", arrays[name]))
            total += arrays[name].nbytes
        inits.append(data.tensor(f"{p}.router.weight", (rng.standard_normal((H, E)) / np.sqrt(H)).astype(np.float32)))
        inits.append(data.tensor(f"{p}.router.bias", (0.1 * rng.standard_normal(E)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [h, f"{p}.router.weight"], [f"{p}/router_mm"], name=f"{p}/router"))
        nodes.append(helper.make_node("Add", [f"{p}/router_mm", f"{p}.router.bias"], [f"{p}/logits"],
                                      name=f"{p}/router_bias"))
        attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=GPT_OSS["alpha"],
                     activation_beta=GPT_OSS["beta"], swiglu_limit=GPT_OSS["limit"], normalize_routing_weights=1,
                     expert_weight_bits=bits, weights_prepacked=0)
        if block:
            attrs["block_size"] = block
        nodes.append(helper.make_node("QMoE", [h, f"{p}/logits"] + [f"{p}.experts.{n}" for n in order],
                                      [f"{p}/moe_out"], name=f"{p}/moe", domain="com.microsoft", **attrs))
        nodes.append(helper.make_node("Add", [h, f"{p}/moe_out"], [f"{p}/out"], name=f"{p}/residual"))
        h = f"{p}/out"
        del arrays
    data.f.close()
    nodes.append(helper.make_node("Identity", [h], ["out"], name="final"))
    graph = helper.make_graph(nodes, "gpt_oss_moe_stack",
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["T", H])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    onnx.save_model(model, path)
    return total


# --------------------------------------------------------------------------- timing

def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of both sessions, qmoe's threads (2)")
    ap.add_argument("--tokens", default="1,16", help="token counts T (1,16)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=GPT_OSS["H"])
    ap.add_argument("--inter", type=int, default=GPT_OSS["I"])
    ap.add_argument("--experts", type=int, default=GPT_OSS["E"])
    ap.add_argument("--k", type=int, default=GPT_OSS["k"])
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--block", type=int, default=0, help="block size (0 = row-wise)")
    ap.add_argument("--runs", type=int, default=0, help="timed runs per side and T (default: by time budget)")
    ap.add_argument("--seconds", type=float, default=20.0, help="time budget per T for both sides (20)")
    ap.add_argument("--sets", type=int, default=4, help="input sets cycled per T (4)")
    ap.add_argument("--dir", default=os.path.join(ROOT, "out", "onnx_offload"))
    ap.add_argument("--rebuild", action="store_true", help="regenerate the model files")
    ap.add_argument("--json", default=None, help="write the results here (default DIR/results.json)")
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",") if t]
    os.makedirs(args.dir, exist_ok=True)
    shape = dict(layers=args.layers, H=args.hidden, I=args.inter, E=args.experts, k=args.k, bits=args.bits,
                 block=args.block)
    src = os.path.join(args.dir, "model.onnx")
    dst = os.path.join(args.dir, "offloaded.onnx")
    stamp = os.path.join(args.dir, "shape.json")
    fresh = args.rebuild or not os.path.exists(stamp) or json.load(open(stamp)) != shape
    t0 = time.perf_counter()
    if fresh:
        log(f"building {src}: {shape}")
        for p in (stamp, src, dst):
            if os.path.exists(p):
                os.remove(p)
        build_model(src, **shape)
        json.dump(shape, open(stamp, "w"))
    t_build = time.perf_counter() - t0
    weight_bytes = os.path.getsize(src + ".data")
    t0 = time.perf_counter()
    qmoe.onnx.offload(src, dst)  # always: a few seconds, and never a file of an older qmoe
    t_offload = time.perf_counter() - t0
    log(f"model {weight_bytes / 1e9:.2f} GB of weights (built in {t_build:.1f} s); offloaded in {t_offload:.1f} s")

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # ORT keeps its own spinning during its runs, but its workers stop spinning when run()
    # returns: otherwise they would spin on beside the other session's run (the two
    # sessions alternate here; a deployment has one).
    so.add_session_config_entry("session.force_spinning_stop", "1")
    rss0 = rss()
    t0 = time.perf_counter()
    plain = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    t_plain = time.perf_counter() - t0
    rss1 = rss()
    t0 = time.perf_counter()
    off = qmoe.onnx.session(dst, threads=args.threads, inter_op_num_threads=1, log_severity_level=3)
    t_off = time.perf_counter() - t0
    rss2 = rss()
    log(f"sessions: plain ORT {t_plain:.1f} s (+{(rss1 - rss0) / 2**20:.0f} MiB), "
        f"offloaded {t_off:.1f} s (+{(rss2 - rss1) / 2**20:.0f} MiB); qmoe kernels "
        f"{next(iter(off.qmoe_layers.values())).kernel_name}")

    rng = np.random.default_rng(1)
    results = []
    for T in tokens:
        sets = [rng.standard_normal((T, args.hidden)).astype(np.float32) for _ in range(args.sets)]
        err = 0.0
        for x in sets:  # warm-up and the check
            want = plain.run(None, {"hidden": x})[0]
            got = off.run(None, {"hidden": x})[0]
            err = max(err, rel_err(got, want))
        times = {"ort": [], "qmoe": []}
        snap = cpu_snapshot()
        t_start, i = time.perf_counter(), 0
        while True:
            x = sets[i % len(sets)]
            for side, sess in (("ort", plain), ("qmoe", off)):
                a = time.perf_counter()
                sess.run(None, {"hidden": x})
                times[side].append(time.perf_counter() - a)
            i += 1
            if args.runs:
                if i >= args.runs:
                    break
            elif i >= 3 and time.perf_counter() - t_start >= args.seconds:
                break
        other, steal = cpu_competition(snap, cpu_snapshot())
        med = {s: statistics.median(v) for s, v in times.items()}
        best = {s: min(v) for s, v in times.items()}
        r = dict(T=T, runs=i, ort_ms=med["ort"] * 1e3, qmoe_ms=med["qmoe"] * 1e3,
                 ort_min_ms=best["ort"] * 1e3, qmoe_min_ms=best["qmoe"] * 1e3,
                 ratio=med["ort"] / med["qmoe"], ratio_min=best["ort"] / best["qmoe"], max_rel_err=err,
                 other_cores=other, steal_cores=steal)
        results.append(r)
        log(f"T={T}: {r}")

    print(f"\n{args.layers} x gpt-oss-shaped MoE layers (H={args.hidden} I={args.inter} E={args.experts} k={args.k}, "
          f"{args.bits}-bit {'row-wise' if not args.block else f'block {args.block}'}), whole model, "
          f"{args.threads} threads, {qmoe.cpu_kernel_isa()}")
    print(f"{'T':>5} {'runs':>5} {'ORT ms':>10} {'qmoe ms':>10} {'ratio':>7} {'(best)':>7} {'rel err':>9} {'other':>6}")
    for r in results:
        print(f"{r['T']:>5} {r['runs']:>5} {r['ort_ms']:>10.2f} {r['qmoe_ms']:>10.2f} {r['ratio']:>6.1f}x "
              f"{r['ratio_min']:>6.1f}x {r['max_rel_err']:>9.1e} {r['other_cores']:>6.2f}")
    print("(median of alternating runs; 'best' = ratio of the fastest runs; 'other' = cores other processes "
          "kept busy meanwhile)")
    out = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine_info(),
               load_average=load_average(), threads=args.threads, shape=shape, weight_bytes=weight_bytes,
               offload_s=t_offload, session_s=dict(ort=t_plain, qmoe=t_off),
               session_rss_bytes=dict(ort=rss1 - rss0, qmoe=rss2 - rss1),
               versions=dict(qmoe=qmoe.__version__, onnxruntime=ort.__version__,
                             isa=qmoe.cpu_kernel_isa()), results=results)
    path = args.json or os.path.join(args.dir, "results.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
