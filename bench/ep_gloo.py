"""Expert parallelism on the CPU (gloo): qmoe.distributed.ExpertParallelLayer
over W spawned ranks against one qmoe.Layer on the whole batch, with the
exchange time broken out.

    .venv/bin/python bench/ep_gloo.py --ranks 2 --threads 1 --tokens 1,64,512

Each rank holds E/W experts and T tokens; the single layer runs the W*T tokens
with W*threads threads (same cores in total), on rank 0 while the others wait.
Per call: the median over --reps of the slowest rank's phase times
(``ExpertParallelLayer.last_call_seconds``). The outputs are checked bit for bit
against the single layer's. Everything runs on this machine's CPUs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qmoe
import qmoe.distributed

PHASES = ("gather", "route", "all_to_all", "experts", "combine", "total")


def _layer(args) -> Dict[str, object]:
    rng = np.random.default_rng(0)
    E, H, I = args.experts, args.hidden, args.inter
    w1 = qmoe.quantize(rng.standard_normal((E, 2 * I, H), np.float32) * 0.1, 4, args.block, False)
    w2 = qmoe.quantize(rng.standard_normal((E, H, I), np.float32) * 0.1, 4, args.block, False)
    return dict(fc1_experts_weights=w1.weights, fc1_scales=w1.scales, fc1_zero_points=w1.zero_points,
                fc2_experts_weights=w2.weights, fc2_scales=w2.scales, fc2_zero_points=w2.zero_points,
                k=args.k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                block_size=args.block)


def _rank(rank: int, args, folder: str) -> None:
    torch.set_num_threads(1)
    world = args.ranks
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    spec = _layer(args)
    ep = qmoe.distributed.ExpertParallelLayer(**spec, threads=args.threads, accuracy_level=args.level)
    single = qmoe.Layer(**spec, threads=args.threads * world, accuracy_level=args.level) if rank == 0 else None
    rows = []
    for t in args.tokens:
        rng = np.random.default_rng(t)
        x = torch.from_numpy(rng.standard_normal((world * t, args.hidden)).astype(np.float32))
        lg = torch.from_numpy(rng.standard_normal((world * t, args.experts)).astype(np.float32))
        mine = slice(rank * t, (rank + 1) * t)
        phases: Dict[str, List[float]] = {p: [] for p in PHASES}
        y = None
        for rep in range(args.reps + 1):
            dist.barrier()
            y = ep(x[mine], lg[mine])
            times = torch.tensor([ep.last_call_seconds[p] for p in PHASES], dtype=torch.float64)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            if rep:  # the first call warms up
                for p, v in zip(PHASES, times.tolist()):
                    phases[p].append(v)
        gathered = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(gathered, y)
        dist.barrier()
        if rank == 0:
            single(x, lg)
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                want = single(x, lg)
                ts.append(time.perf_counter() - t0)
            same = torch.equal(torch.cat(gathered).view(torch.int32), want.view(torch.int32))
            rows.append((t, statistics.median(ts), {p: statistics.median(v) for p, v in phases.items()}, same))
        dist.barrier()
    if rank == 0:
        print(f"layer: E={args.experts} H={args.hidden} I={args.inter} k={args.k} int4 block {args.block}, "
              f"level {args.level}; {world} gloo ranks x {args.threads} threads vs one layer x "
              f"{args.threads * world} threads; ms, median of {args.reps}")
        print(f"{'T/rank':>7} {'single':>8} {'EP':>8} " + " ".join(f"{p:>10}" for p in PHASES[:-1]) + "  same bits")
        for t, single_s, ph, same in rows:
            print(f"{t:>7} {single_s * 1e3:8.2f} {ph['total'] * 1e3:8.2f} "
                  + " ".join(f"{ph[p] * 1e3:10.2f}" for p in PHASES[:-1]) + f"  {same}")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    ap.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64, 512],
                    help="tokens per rank, comma-separated")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--level", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(args, folder), nprocs=args.ranks)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
