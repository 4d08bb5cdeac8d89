"""Load speed and memory of qmoe files: builds every layer of a qmoe file with
``qmoe.load`` (CPU or CUDA) several times and reports, per run, the stored
bytes per second and the peak RSS growth of the process while loading (the
peak is reset before each run via /proc/self/clear_refs). The file is read
once beforehand (unmapped) so that it is served from the page cache.

    python bench/load_file.py FILE [--device cpu|cuda] [--threads N] [--runs 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Dict, List

import qmoe


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    f = qmoe.open(a.file)
    stored = sum(L.weight_bytes for L in f.layers.values())
    print(f"{a.file}: {len(f.layers)} layer(s), {stored / 2**30:.2f} GiB stored, device {a.device}, "
          f"threads {a.threads or os.cpu_count()}")
    _warm(a.file)
    runs: List[Dict[str, float]] = []
    for r in range(a.runs):
        before = _status("VmRSS:")
        reset = _reset_peak()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        layers = qmoe.load(a.file, device=a.device, threads=a.threads)
        dt = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
        peak = _status("VmHWM:")
        packed = sum(L.packed_bytes for L in layers.values())
        run = dict(seconds=dt, gbps=stored / dt / 1e9, peak_rss_growth=peak - before, packed_bytes=packed,
                   host_growth_minus_packed=(peak - before) - (packed if a.device == "cpu" else 0),
                   peak_reset=reset, user_s=user, sys_s=system)
        runs.append(run)
        print(f"  run {r}: {dt:.3f} s = {run['gbps']:.2f} GB/s; peak RSS growth {(peak - before) / 2**20:.1f} MiB"
              f" (packed {packed / 2**20:.1f} MiB{' on the host' if a.device == 'cpu' else ' on the device'});"
              f" CPU time user {user:.2f} s, system {system:.2f} s")
        del layers
    best = max(runs, key=lambda x: x["gbps"])
    print(f"best {best['gbps']:.2f} GB/s")
    if a.json:
        with open(a.json, "w") as out:
            json.dump(dict(file=a.file, device=a.device, threads=a.threads, stored_bytes=stored, runs=runs), out,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
