"""Expert parallelism, qmoe.distributed.ExpertParallelLayer over W spawned ranks, against
one qmoe.Layer on the whole batch, with the exchange time broken out and the group's
all-to-all bandwidth measured in the same run.

    .venv/bin/python bench/ep_scaling.py --ranks 2 --tokens 1,64,512               # gloo, CPU
    python bench/ep_scaling.py --backend nccl --ranks 8 --model deepseek-v3 --tokens 1,64,4096

Layer: a reference shape of tools/shapes.json (--model; 4-bit, its block size or --block)
or --experts/--hidden/--inter/--k. Weights are random codes (bench/gpu/weights.py) drawn
per expert from a generator seeded by the expert id, so every rank draws exactly its own
experts (the others stay unallocated pages) and rank 0 draws all of them for the single
layer. Each rank holds E/W experts and T tokens.

* gloo: ranks on the CPU (``--threads`` each); the single layer runs the W*T tokens with
  W*threads threads on rank 0 and must give the same bits.
* nccl: rank r on cuda:r, bfloat16; the single layer runs the W*T tokens on cuda:0 (it
  must fit one GPU); reported: the relative L2 difference to it and whether two EP calls
  give the same bits.

Per call: the median over --reps of the slowest rank's phase times
(``ExpertParallelLayer.last_call_seconds``; on CUDA each call is synchronised). The
ceiling: ``all_to_all_single`` of --a2a-mib MiB per rank, timed the same way, as the
bytes each rank sends to the others per second. --json writes everything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_setup import reference_shapes  # noqa: E402
from gpu.weights import dims, mat_names, random_codes, random_scales  # noqa: E402

import qmoe  # noqa: E402
import qmoe.distributed  # noqa: E402

PHASES = ("gather", "route", "all_to_all", "experts", "combine", "total")


def shape_of(args) -> Dict[str, object]:
    if args.model:
        m = reference_shapes()[args.model]
        return dict(E=m["E"], H=m["H"], I=m["I"], k=m["k"], block=m["block"] if args.block is None else args.block,
                    alpha=m["alpha"], beta=m["beta"], limit=m["limit"])
    return dict(E=args.experts, H=args.hidden, I=args.inter, k=args.k, block=32 if args.block is None else args.block,
                alpha=1.0, beta=0.0, limit=float("inf"))


def weights(shape: Dict[str, object], first: int, end: int) -> Dict[str, np.ndarray]:
    """[E, ...] arrays with experts [first, end) drawn (expert e from a generator seeded by e), the others
    left as untouched pages of np.empty."""
    E, block = int(shape["E"]), int(shape["block"])
    d = dims(dict(H=shape["H"], I=shape["I"]), 1)
    W: Dict[str, np.ndarray] = {}
    for pre, rows, cols in mat_names(1):
        n, k = d[rows], d[cols]
        W[f"{pre}_experts_weights"] = np.empty((E, n, k // 2), np.uint8)
        W[f"{pre}_scales"] = np.empty((E, n) if block == 0 else (E, n, k // block), np.float32)
    for e in range(first, end):
        for j, (pre, rows, cols) in enumerate(mat_names(1)):
            rng = np.random.default_rng([e, j])
            n, k = d[rows], d[cols]
            W[f"{pre}_experts_weights"][e] = random_codes(rng, (n, k // 2), 4)
            W[f"{pre}_scales"][e] = random_scales(rng, (n,) if block == 0 else (n, k // block), k, 4)
    return W


def attributes(shape: Dict[str, object]) -> Dict[str, object]:
    return dict(k=shape["k"], activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                expert_weight_bits=4, block_size=shape["block"], activation_alpha=shape["alpha"],
                activation_beta=shape["beta"], swiglu_limit=shape["limit"])


def a2a_bandwidth(mib: int, reps: int, device: torch.device, world: int) -> float:
    """GB/s each rank sends to the others with all_to_all_single (median of reps)."""
    n = (mib << 20) // 4 // world * world
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ts = []
    for rep in range(reps + 1):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dist.all_to_all_single(dst, src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rep:
            ts.append(float(t.item()))
    return n * 4 * (world - 1) / world / statistics.median(ts) / 1e9


def _rank(rank: int, args, folder: str) -> None:
    torch.set_num_threads(args.threads)
    world, nccl = args.ranks, args.backend == "nccl"
    device = torch.device(f"cuda:{rank}") if nccl else torch.device("cpu")
    if nccl:
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=900))
    shape = shape_of(args)
    E, H = int(shape["E"]), int(shape["H"])
    first, end = qmoe.distributed.expert_range(E, world, rank)
    t0 = time.perf_counter()
    ep = qmoe.distributed.ExpertParallelLayer(**weights(shape, first, end), **attributes(shape),
                                              device=str(device), threads=args.threads, max_tokens=args.max_tokens)
    made = time.perf_counter() - t0
    single = None
    if rank == 0:
        opts = dict(device="cuda:0", max_tokens=args.max_tokens) if nccl else dict(threads=args.threads * world)
        single = qmoe.Layer(**weights(shape, 0, E), **attributes(shape), **opts)
    bw = a2a_bandwidth(args.a2a_mib, args.reps, device, world)
    dtype = torch.bfloat16 if nccl else torch.float32
    rows: List[Dict[str, object]] = []
    for t in args.tokens:
        rng = np.random.default_rng(t)
        x = torch.from_numpy(rng.standard_normal((world * t, H)).astype(np.float32)).to(device, dtype)
        lg = torch.from_numpy(rng.standard_normal((world * t, E)).astype(np.float32)).to(device, dtype)
        mine = slice(rank * t, (rank + 1) * t)
        phases: Dict[str, List[float]] = {p: [] for p in PHASES}
        outs = []
        for rep in range(args.reps + 1):
            dist.barrier()
            y = ep(x[mine], lg[mine])
            if nccl:
                torch.cuda.synchronize(device)
            times = torch.tensor([ep.last_call_seconds[p] for p in PHASES], dtype=torch.float64, device=device)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            if rep:  # the first call warms up
                for p, v in zip(PHASES, times.tolist()):
                    phases[p].append(v)
            if rep >= args.reps - 1:
                outs.append(y)
        gathered = [torch.empty_like(outs[-1]) for _ in range(world)]
        dist.all_gather(gathered, outs[-1])
        repeat = torch.tensor([float(torch.equal(outs[0].view(torch.int16 if nccl else torch.int32),
                                                 outs[-1].view(torch.int16 if nccl else torch.int32)))],
                              device=device)
        dist.all_reduce(repeat, op=dist.ReduceOp.MIN)
        dist.barrier()
        if rank == 0:
            ts = []
            want = single(x, lg)
            for _ in range(args.reps):
                if nccl:
                    torch.cuda.synchronize(device)
                s0 = time.perf_counter()
                want = single(x, lg)
                if nccl:
                    torch.cuda.synchronize(device)
                ts.append(time.perf_counter() - s0)
            got = torch.cat(gathered)
            diff = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
            rows.append(dict(tokens_per_rank=t, single_ms=statistics.median(ts) * 1e3,
                             phases_ms={p: statistics.median(v) * 1e3 for p, v in phases.items()},
                             same_bits_as_single=bool(torch.equal(got.view(torch.int16 if nccl else torch.int32),
                                                                  want.view(torch.int16 if nccl else torch.int32))),
                             rel_l2_vs_single=diff, ep_same_bits_run_to_run=bool(repeat.item() == 1.0)))
        dist.barrier()
    if rank == 0:
        where = f"{world} x {torch.cuda.get_device_name(0)}" if nccl else f"{world} CPU ranks x {args.threads} threads"
        print(f"layer: E={E} H={H} I={shape['I']} k={shape['k']} int4 block {shape['block']}; {args.backend}, "
              f"{where}; ExpertParallelLayer made in {made:.1f} s on rank 0; all_to_all {bw:.2f} GB/s per rank "
              f"({args.a2a_mib} MiB); ms, median of {args.reps}")
        print(f"{'T/rank':>7} {'single':>8} {'EP':>8} " + " ".join(f"{p:>10}" for p in PHASES[:-1])
              + "  vs single (rel L2, same bits)  run to run")
        for r in rows:
            ph = r["phases_ms"]
            print(f"{r['tokens_per_rank']:>7} {r['single_ms']:8.2f} {ph['total']:8.2f} "
                  + " ".join(f"{ph[p]:10.2f}" for p in PHASES[:-1])
                  + f"  {r['rel_l2_vs_single']:.1e} {r['same_bits_as_single']}  {r['ep_same_bits_run_to_run']}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(backend=args.backend, ranks=world, shape=shape, a2a_gb_s=bw, a2a_mib=args.a2a_mib,
                               date=time.strftime("%Y-%m-%d"), rows=rows), fh, indent=1)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64, 512],
                    help="tokens per rank, comma-separated")
    ap.add_argument("--model", default=None, help="a reference shape of tools/shapes.json (e.g. deepseek-v3)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--block", type=int, default=None, help="quantization block (default: the model's, or 32)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="CUDA: tokens per pass of the layers")
    ap.add_argument("--a2a-mib", type=int, default=64, help="MiB per rank for the all-to-all ceiling")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.backend == "nccl" and torch.cuda.device_count() < args.ranks:
        sys.exit(f"--backend nccl --ranks {args.ranks}: this machine has {torch.cuda.device_count()} GPU(s)")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(args, folder), nprocs=args.ranks)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
