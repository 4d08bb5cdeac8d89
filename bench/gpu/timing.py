"""CUDA-event timing, CUDA-graph capture, the GPU's ceilings and the per-side summaries."""
from __future__ import annotations

import gc
import statistics
import time

from .common import dtname, torch


def copy_gb_s(dst, src, reps=5):
    """Best of `reps` copies src -> dst (torch tensors of the same size; asynchronous where the host
    side is pinned), in GB/s."""
    nbytes = src.numel() * src.element_size()
    non_blocking = (src.device.type == "cpu" and src.is_pinned()) or (dst.device.type == "cpu" and dst.is_pinned())
    best = 0.0
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=non_blocking)
        torch.cuda.synchronize()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


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


def is_oom(e):
    return (torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)) or "out of memory" in str(e).lower()


def free_now():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]
