#!/usr/bin/env python3
"""Where a small-batch CUDA call's time goes: per kernel and between kernels.

    python bench/gpu_timeline.py [--models qwen3-30b-a3b,gpt-oss-20b] [--tokens 1,16] [--calls 200]

For each model (tools/shapes.json; 4-bit, the model's block size, random codes)
and T it makes a CUDA layer, then:
  * host: the wall time of enqueueing one call (forward on CUDA tensors, no
    synchronisation), median over --calls; and through the DLPack entry
    (_core forward_async with a preallocated output) for comparison;
  * eager and graph: the GPU time of one call (CUDA events around --calls
    back-to-back calls, divided), eager and replayed as a CUDA graph;
  * kernels: under torch.profiler (CUPTI), each kernel's median duration and
    the median gap from the end of the kernel before it to its start, in the
    call's order; the sum of kernel time against the call's span.
Rotates --sets weight sets (default enough for 2x the L2) so the weights come
from HBM, as in bench/gpu_vs_torch.py. Prints a table; --json writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import common  # noqa: E402
from gpu.weights import gen_set, layer_attrs, make_inputs  # noqa: E402

import qmoe  # noqa: E402


def kernel_rows(prof, calls):
    """Kernels of the profiled calls, grouped by position in a call: name, median duration, median gap."""
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                 and e.device_resource_id is not None and "Memcpy" not in e.name and "Memset" not in e.name),
                key=lambda e: e.time_range.start)
    per = len(ev) // calls if calls else 0
    if per == 0:
        return [], 0.0
    rows = []
    for i in range(per):
        d = [ev[c * per + i].time_range.elapsed_us() for c in range(calls)]
        g = [ev[c * per + i].time_range.start - ev[c * per + i - 1].time_range.end
             for c in range(calls) if c * per + i - 1 >= 0]
        rows.append(dict(kernel=ev[i].name[:60], us=statistics.median(d), gap_us=statistics.median(g) if g else 0.0))
    span = statistics.median(ev[c * per + per - 1].time_range.end - ev[c * per].time_range.start for c in range(calls))
    return rows, span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-30b-a3b,gpt-oss-20b")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--sets", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    out = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": []}
    for model in args.models.split(","):
        cfg = common.MODELS[model]
        E, H, k, block = cfg["E"], cfg["H"], cfg["k"], cfg["block"]
        rng = np.random.default_rng(1)
        attrs = layer_attrs(cfg, 4, block, 1)
        first = qmoe.Layer(**gen_set(rng, cfg, 4, block, 1), **attrs, device="cuda")
        per_call = first.device_bytes / E * k
        n = args.sets or max(2, min(16, int(2 * l2 / per_call) + 1))
        layers = [first] + [qmoe.Layer(**gen_set(rng, cfg, 4, block, 1), **attrs, device="cuda")
                            for _ in range(n - 1)]
        for T in (int(t) for t in args.tokens.split(",")):
            x, lg, _ = make_inputs(rng, T, H, E, k)
            xd = torch.from_numpy(x).to(dev, torch.bfloat16)
            lgd = torch.from_numpy(lg).to(dev, torch.bfloat16)
            calls = [(lambda L=L, a=xd, b=lgd: L(a, b)) for L in layers]
            for c in calls * 3:
                c()
            torch.cuda.synchronize()
            # Host: enqueue time of one call.
            host = []
            for i in range(args.calls):
                t0 = time.perf_counter()
                calls[i % n]()
                host.append((time.perf_counter() - t0) * 1e6)
                if i % 16 == 15:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            # The same through the DLPack entry (_core forward_async, output preallocated).
            out0, stream = torch.empty_like(xd), torch.cuda.current_stream().cuda_stream
            host_dl = []
            for i in range(args.calls):
                t0 = time.perf_counter()
                layers[i % n]._layer.forward_async(xd, lgd, None, out0, stream)
                host_dl.append((time.perf_counter() - t0) * 1e6)
                if i % 16 == 15:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            # Eager and graph GPU time per call.
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for i in range(args.calls):
                calls[i % n]()
            e.record()
            torch.cuda.synchronize()
            eager = s.elapsed_time(e) * 1e3 / args.calls
            g = torch.cuda.CUDAGraph()
            st = torch.cuda.Stream()
            st.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(st):
                for c in calls:
                    c()
            torch.cuda.current_stream().wait_stream(st)
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                for c in calls:
                    c()
            reps = max(1, args.calls // n)
            g.replay()
            torch.cuda.synchronize()
            s.record()
            for _ in range(reps):
                g.replay()
            e.record()
            torch.cuda.synchronize()
            graph = s.elapsed_time(e) * 1e3 / (reps * n)
            # Kernels.
            pc = min(args.calls, 64)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for i in range(pc):
                    calls[i % n]()
                torch.cuda.synchronize()
            kr, span = kernel_rows(prof, pc)
            row = dict(model=model, T=T, host_us=statistics.median(host), host_dlpack_us=statistics.median(host_dl),
                       eager_us=eager, graph_us=graph,
                       span_us=span, kernels=kr, sets=n, kernel_name=first.kernel_name)
            out["rows"].append(row)
            print(f"{model} T={T}: host enqueue {row['host_us']:.1f} us (DLPack entry "
                  f"{row['host_dlpack_us']:.1f} us), eager {eager:.1f} us/call, "
                  f"graph {graph:.1f} us/call, kernel span {span:.1f} us ({n} weight sets; {first.kernel_name})")
            for r in kr:
                print(f"    {r['us']:7.1f} us  (gap before {r['gap_us']:6.1f} us)  {r['kernel']}")
            print(f"    sum of kernels {sum(r['us'] for r in kr):.1f} us", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
