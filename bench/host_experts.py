"""Experts in host memory beside the GPU (issue 18 part A): a CUDA layer with a
share of its experts kept in host memory and run by the CPU kernels, against
the all-GPU layer and the all-CPU layer, in one run on the GPU host.

    python bench/host_experts.py [--models qwen3-30b-a3b,gpt-oss-20b] [--tokens 1,16,512]
                                 [--host 0,0.5,0.9,1] [--threads 16] [--json out.json]

For each model (tools/shapes.json; 4-bit, the model's block size, random codes)
and token count T it times, alternating the sides round by round:
  * gpu: every expert on the GPU (CUDA events around each call);
  * cpu: the CPU layer on float32 host arrays (wall clock);
  * host=f: CUDA layers with round(f * E) experts in host memory (every
    E / n-th expert, so routing hits them evenly), bf16 CUDA tensors in and out:
    the default layer (host_experts_gpu_from="auto": the host experts run on the
    GPU from the crossover measured when it is made, printed with the time it
    took to make) and the CPU path alone (host_experts_gpu_from=0).
Where the time goes, per host share: the CPU experts' time inside the call
(the layer's own profile clock, QMOE_PROFILE), the rows copied each way and
the host<->device bandwidth measured in the same run (pinned copies). The
issue's targets, judged on the default layer, are printed beside the figures:
  * 100% on the CPU, T = 1: <= 1.2x the all-CPU layer;
  * 50% on the CPU, T = 1: <= max(all-CPU x 0.5 + copies, all-GPU);
  * T = 512: <= 1.2x (host-expert bytes / measured H2D bandwidth + all-GPU).
With --polling, the CPU path is timed again with its handoffs polled instead of CUDA
host functions (LayerOptions::cuda_host_polling), in the same rounds, and checked for
the same bits.
With --gpu-from N, layers with host_experts_gpu_from=N (host experts' weights copied
to the GPU for the call) are timed too at T >= N, and checked for the all-GPU bits.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import common  # noqa: E402
from gpu.timing import copy_gb_s  # noqa: E402
from gpu.weights import gen_set, layer_attrs, make_inputs  # noqa: E402

import qmoe  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pcie_bandwidth(nbytes: int = 256 << 20) -> dict:
    """Best-of-5 pinned host->device and device->host copy rates (GB/s)."""
    h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return {"h2d": copy_gb_s(d, h), "d2h": copy_gb_s(h, d)}


def placed_layer(W: dict, attrs: dict, place: list, threads, gpu_from="auto"):
    """A CUDA layer with the experts `place` marks "cpu" in host memory."""
    return qmoe.Layer(**W, **attrs, device="cuda", threads=threads, expert_placement=place,
                      host_experts_gpu_from=gpu_from)


def time_gpu(fn, calls: int) -> float:
    """Median ms of `calls` calls (CUDA events), after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return statistics.median(ms)


def time_cpu(fn, calls: int) -> float:
    for _ in range(2):
        fn()
    ms = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms)


class StderrCapture:
    """Captures what C++ writes to file descriptor 2 (the layer's profile lines)."""

    def __enter__(self):
        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode(errors="replace")
        self._tmp.close()


def host_share(E: int, f: float) -> list:
    n = int(round(f * E))
    return sorted({int(i * E / n) for i in range(n)}) if n else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-30b-a3b,gpt-oss-20b")
    ap.add_argument("--tokens", default="1,16,512")
    ap.add_argument("--host", default="0,0.5,0.9,1", help="shares of the experts in host memory")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: all)")
    ap.add_argument("--host-threads", type=int, default=None,
                    help="CPU threads of the layers with host experts (default: the layer's own, all but one)")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gpu-from", type=int, default=0,
                    help="also time host_experts_gpu_from=N layers (host experts copied to the GPU) at T >= N")
    ap.add_argument("--polling", action="store_true",
                    help="also time the CPU path with LayerOptions::cuda_host_polling (QMOE_CUDA_HOST_POLLING=1), "
                         "in the same rounds, and check it gives the same bits")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    host_threads = args.host_threads or None
    shares = [float(f) for f in args.host.split(",")]
    bw = pcie_bandwidth()
    log(f"pinned copies: host->device {bw['h2d']:.1f} GB/s, device->host {bw['d2h']:.1f} GB/s")
    result = {"machine": {"gpu": torch.cuda.get_device_name(), "cpu_threads": args.threads or os.cpu_count(),
                          "date": time.strftime("%Y-%m-%d")}, "pcie": bw, "rows": []}
    for model in args.models.split(","):
        cfg = common.MODELS[model]
        E, H, I, k, block = cfg["E"], cfg["H"], cfg["I"], cfg["k"], cfg["block"]
        rng = np.random.default_rng(1)
        W = gen_set(rng, cfg, 4, block, 1)
        attrs = layer_attrs(cfg, 4, block, 1)
        expert_bytes = sum(a.nbytes for a in W.values()) / E
        log(f"{model}: E={E} H={H} I={I} k={k}, {expert_bytes / 2**20:.2f} MiB per expert")
        gpu = qmoe.Layer(**W, **attrs, device="cuda")
        cpu = qmoe.Layer(**W, **attrs, threads=args.threads or None)
        hybrid, profiled, streamed, auto, polled = {}, {}, {}, {}, {}
        for f in shares:
            if 0 < f:
                place = ["cpu" if e in set(host_share(E, f)) else "cuda" for e in range(E)]
                t0 = time.perf_counter()
                hybrid[f] = placed_layer(W, attrs, place, host_threads, 0)
                t1 = time.perf_counter()
                auto[f] = placed_layer(W, attrs, place, host_threads)
                t2 = time.perf_counter()
                log(f"{model} host {f * 100:3.0f}%: measured crossover {auto[f].host_experts_gpu_from} tokens "
                    f"(made in {t2 - t1:.2f} s, {t1 - t0:.2f} s with the CPU only)")
                os.environ["QMOE_PROFILE"] = "1"
                profiled[f] = placed_layer(W, attrs, place, host_threads, 0)
                del os.environ["QMOE_PROFILE"]
                if args.gpu_from > 0:
                    streamed[f] = placed_layer(W, attrs, place, host_threads, args.gpu_from)
                if args.polling:
                    os.environ["QMOE_CUDA_HOST_POLLING"] = "1"
                    polled[f] = placed_layer(W, attrs, place, host_threads, 0)
                    del os.environ["QMOE_CUDA_HOST_POLLING"]
        for T in tokens:
            x, lg, _ = make_inputs(rng, T, H, E, k)
            xd = torch.from_numpy(x).to("cuda", torch.bfloat16)
            lgd = torch.from_numpy(lg).to("cuda", torch.bfloat16)
            xh, lgh = xd.float().cpu().numpy(), lgd.float().cpu().numpy()
            times = {"gpu": [], "cpu": []}
            for f in hybrid:
                times[f] = []
                times[("auto", f)] = []
            on_gpu = {f: l for f, l in streamed.items() if T >= args.gpu_from}
            for f in on_gpu:
                times[("gpu", f)] = []
            for f in polled:
                times[("poll", f)] = []
            def call(layer, a=xd, b=lgd):
                return lambda: layer(a, b)
            for _ in range(args.rounds):
                times["gpu"].append(time_gpu(call(gpu), args.calls))
                times["cpu"].append(time_cpu(call(cpu, xh, lgh), max(5, args.calls // 3)))
                for f, layer in hybrid.items():
                    times[f].append(time_gpu(call(layer), args.calls))
                    times[("auto", f)].append(time_gpu(call(auto[f]), args.calls))
                for f, layer in on_gpu.items():
                    times[("gpu", f)].append(time_gpu(call(layer), args.calls))
                for f, layer in polled.items():
                    times[("poll", f)].append(time_gpu(call(layer), args.calls))
            t_gpu, t_cpu = min(times["gpu"]), min(times["cpu"])
            ref = gpu(xd, lgd).float()
            for f in shares:
                if f == 0:
                    t, cpu_ms, rows, t_auto, crossover = t_gpu, 0.0, 0, t_gpu, 0
                else:
                    t, t_auto, crossover = min(times[f]), min(times[("auto", f)]), auto[f].host_experts_gpu_from
                    with StderrCapture() as cap:
                        for _ in range(10):
                            profiled[f](xd, lgd)
                        torch.cuda.synchronize()
                    # One profile line per host pass: its phases, the last "host-experts"; their sum.
                    got = [sum(float(m) for m in re.findall(r" ([0-9.]+) ms", line))
                           for line in cap.text.splitlines() if "host-experts" in line]
                    cpu_ms = statistics.median(got) if got else float("nan")
                    host = set(host_share(E, f))
                    chosen = np.argsort(-lg, axis=1, kind="stable")[:, :k]
                    rows = int(np.isin(chosen, list(host)).sum())
                    diff = float((hybrid[f](xd, lgd).float() - ref).norm() / ref.norm())
                copy_ms = rows * H * 4 * 2 / (bw["d2h"] * 1e6) if rows else 0.0
                host_bytes = len(host_share(E, f)) * expert_bytes if f else 0
                row = dict(model=model, T=T, host=f, ms=t, gpu_ms=t_gpu, cpu_layer_ms=t_cpu, cpu_experts_ms=cpu_ms,
                           host_rows=rows, row_copy_ms=copy_ms, host_expert_bytes=host_bytes,
                           rel_diff_vs_gpu=0.0 if f == 0 else diff, ms_default=t_auto, crossover=crossover)
                if f in on_gpu:
                    row["ms_host_experts_on_gpu"] = min(times[("gpu", f)])
                    row["bits_equal_all_gpu"] = bool(torch.equal(on_gpu[f](xd, lgd).view(torch.int16),
                                                                 gpu(xd, lgd).view(torch.int16)))
                if f in polled:
                    row["ms_polling"] = min(times[("poll", f)])
                    row["bits_equal_polling"] = bool(torch.equal(polled[f](xd, lgd).view(torch.int16),
                                                                 hybrid[f](xd, lgd).view(torch.int16)))
                best = t_auto  # what a default layer (measured crossover) gives
                if f == 1 and T == 1:
                    row["target"] = ("<= 1.2x all-CPU", best <= 1.2 * t_cpu)
                elif f == 0.5 and T == 1:
                    row["target"] = ("<= max(all-CPU/2 + copies, all-GPU)",
                                     best <= max(t_cpu * 0.5 + copy_ms, t_gpu))
                elif T >= 512 and f > 0:
                    limit = host_bytes / (bw["h2d"] * 1e6) + t_gpu
                    row["target"] = (f"<= 1.2x (host bytes / H2D + all-GPU) = {1.2 * limit:.2f} ms",
                                     best <= 1.2 * limit)
                result["rows"].append(row)
                tgt = row.get("target")
                print(f"{model:14s} T={T:4d} host {f * 100:3.0f}%: default {t_auto:8.3f} ms (GPU from {crossover}), "
                      f"CPU path {t:8.3f} ms  (all-GPU {t_gpu:.3f}, all-CPU "
                      f"{t_cpu:.3f}; CPU experts {cpu_ms:.3f} ms, {rows} rows, copies ~{copy_ms:.3f} ms, "
                      f"vs all-GPU {row['rel_diff_vs_gpu']:.1e})"
                      + (f"  target {tgt[0]}: {'MET' if tgt[1] else 'NOT MET'}" if tgt else "")
                      + (f"  | on the GPU: {row['ms_host_experts_on_gpu']:.3f} ms, all-GPU bits: "
                         f"{row['bits_equal_all_gpu']}" if "ms_host_experts_on_gpu" in row else "")
                      + (f"  | polled: {row['ms_polling']:.3f} ms, same bits: {row['bits_equal_polling']}"
                         if "ms_polling" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
