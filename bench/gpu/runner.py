"""One model: its weight sets (qmoe Layers and PyTorch baselines from the same codes), then each token
count T timed on both sides, checked against each other and against the float64 reference."""
from __future__ import annotations

import copy
import math
import time
import traceback

import numpy as np

from . import common
from .baseline import TorchMoE
from .common import MODELS, dtname, log, mib, torch
from .timing import capture_graph, free_now, is_oom, rel_l2, summarize, time_events
from .weights import dims, gen_set, layer_attrs, make_inputs, mat_names


def qmoe_cuda_problem():
    """None when qmoe's CUDA backend builds and runs a tiny layer on torch tensors, else why not."""
    if common.qmoe is None:
        return "the qmoe package is not importable (build and install it with nvcc present: pip install .)"
    avail = getattr(common.qmoe, "cuda_available", None)
    if callable(avail) and not avail():
        return "qmoe.cuda_available() is False (this build has no CUDA backend, or no device is visible)"
    try:
        cfg = dict(H=64, I=64, E=4, k=2, alpha=1.0, beta=0.0, limit=math.inf, bias=False)
        W = gen_set(np.random.default_rng(0), cfg, 4, 32, 1)
        layer = common.qmoe.Layer(**W, **layer_attrs(cfg, 4, 32, 1), device="cuda", max_tokens=4)
        x, lg, _ = make_inputs(np.random.default_rng(1), 3, 64, 4, 2)
        y = layer(torch.from_numpy(x).cuda().bfloat16(), torch.from_numpy(lg).cuda().bfloat16())
        torch.cuda.synchronize()
        if not (isinstance(y, torch.Tensor) and y.is_cuda and tuple(y.shape) == (3, 64)):
            return f"qmoe's CUDA Layer returned {type(y).__name__} {getattr(y, 'shape', '')}, not a [3, 64] CUDA tensor"
        del layer, y
    except Exception as e:  # noqa: BLE001
        return f"qmoe's CUDA backend failed on a tiny layer: {type(e).__name__}: {e}"
    return None


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
        nb = kk // block if block else 1
        raw_set += E * n * (kk // pack + 4 * nb + (4 if cfg["bias"] else 0))
        if a.zero_points:
            raw_set += E * (n * -(-nb // pack) if block else -(-n // pack))
    base_set = E * (2 * I * H + H * I + (2 * I + H if cfg["bias"] else 0)) * dtype.itemsize
    flops_per_token = 2.0 * k * H * (2 * I + I)  # FC1 (2I x H, or FC1 + FC3) and FC2 (H x I)
    res = dict(model=name, shape=dict(hidden=H, inter=I, experts=E, k=k), bits=bits, block_size=block,
               zero_points=bool(a.zero_points),
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
    layout = (f"block {block}" if block else "row-wise") + (", zero points" if a.zero_points else "")
    log(f"{name}: H={H} I={I} E={E} k={k}, {bits}-bit {layout}, {res['dtype']}: {n_sets} weight sets "
        f"({mib(raw_set)} raw + {mib(base_set)} baseline each)")

    layers, bases, host0, mem_held = [], [], None, []
    try:
        t0 = time.perf_counter()
        for s in range(n_sets):
            W = gen_set(np.random.default_rng([a.seed, s]), cfg, bits, block, fusion, a.weights, a.zero_points)
            if not a.baseline_only:
                f0 = free_now()
                tl = time.perf_counter()
                layer = common.qmoe.Layer(**W, **attrs, device="cuda", max_tokens=max(a.tokens),
                                          accuracy_level=a.accuracy_level)
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
            if s == 0 and not a.no_reference and common.qmoe is not None:
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
        ref = torch.from_numpy(np.asarray(common.qmoe.reference(x0, lg0, **host0, **attrs), np.float64))
        row["reference_s"] = time.perf_counter() - tr
        for side, o in out0.items():
            row[f"rel_l2_{side}_vs_f64"] = rel_l2(o.cpu(), ref)
