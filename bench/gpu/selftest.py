"""--dry-run (CPU: tiny shapes against the numpy float64 reference, then the report on made-up timings) and
--fake-qmoe (FakeQmoe: the harness tested on a GPU with qmoe replaced by the baseline)."""
from __future__ import annotations

import datetime

import numpy as np
from bench_setup import np_dequantize, np_reference

from . import common
from .baseline import TorchMoE, pick_grouped_mm
from .common import DEFAULT_L2, MODELS, VARIANTS, dtname, log, torch, versions
from .report import acceptance, print_report, write_outputs
from .timing import capture_graph, summarize
from .weights import dims, gen_set, layer_attrs, make_inputs, mat_names


def dry_run(a):
    """Tiny shapes: the weight synthesis and layout against qmoe.reference (if qmoe imports), the torch
    baseline (CPU float32 and bfloat16; CUDA too when present) against the numpy float64 oracle
    (tests/python/qmoe_np.py's np_reference), then the report, JSON and plot on made-up timings."""
    ok, checks = True, []

    def check(name, err, tol):
        nonlocal ok
        good = err is not None and err <= tol
        ok &= good
        checks.append(dict(check=name, rel_l2=err, tol=tol, ok=good))
        log(f"  {'ok  ' if good else 'FAIL'} {name}: rel L2 {err:.2e} (tol {tol:.0e})")

    cases = [("gpt-oss-like row-wise, fusion 1, biases", dict(MODELS["gpt-oss-20b"], H=64, I=48, E=6, k=2), 4, 0, 1,
              False),
             ("swiglu block 32, fusion 1", dict(MODELS["mixtral-8x7b"], H=64, I=96, E=5, k=2), 4, 32, 1, False),
             ("swiglu block 16, fusion 0 (fc3), biases", dict(MODELS["qwen3-30b-a3b"], H=32, I=48, E=7, k=3,
                                                               bias=True), 4, 16, 0, False),
             ("8-bit block 32, fusion 1", dict(MODELS["qwen3-30b-a3b"], H=64, I=32, E=4, k=2), 8, 32, 1, False),
             ("row-wise zero points, fusion 1", dict(MODELS["gpt-oss-20b"], H=64, I=40, E=5, k=2), 4, 0,
              1, True),
             ("8-bit block 32 zero points, fusion 0", dict(MODELS["qwen3-30b-a3b"], H=64, I=32, E=4, k=2), 8, 32, 0,
              True),
             ("block 32 zero points, 3 blocks, fusion 1", dict(MODELS["mixtral-8x7b"], H=96, I=64, E=4, k=2), 4, 32, 1,
              True)]
    bf16 = None
    try:
        import ml_dtypes
        bf16 = ml_dtypes.bfloat16
    except ImportError:
        pass
    for label, cfg, bits, block, fusion, zp in cases:
        log(f"{label}: H={cfg['H']} I={cfg['I']} E={cfg['E']} k={cfg['k']} {bits}-bit")
        W = gen_set(np.random.default_rng(5), cfg, bits, block, fusion, zero_points=zp)
        x, lg, used = make_inputs(np.random.default_rng(6), 9, cfg["H"], cfg["E"], cfg["k"])
        attrs = layer_attrs(cfg, bits, block, fusion)
        ref = np_reference(x, lg, **W, **attrs)
        if bf16 is not None:  # the dequantized weights and the logits survive a round trip through bf16
            for pre, _rows, cols in mat_names(fusion):
                z = W.get(f"{pre}_zero_points")
                w = np_dequantize(W[f"{pre}_experts_weights"][:1], W[f"{pre}_scales"][:1],
                                  None if z is None else z[:1], bits, block, dims(cfg, fusion)[cols])[0]
                check(f"{pre} weights exact in bf16", float(np.abs(w.astype(bf16).astype(np.float64) - w).max()), 0)
            check("logits exact in bf16", float(np.abs(lg.astype(bf16).astype(np.float32) - lg).max()), 0)
        if common.qmoe is not None:
            r = np.asarray(common.qmoe.reference(x, lg, **W, **attrs), np.float64)
            check("numpy oracle vs qmoe.reference", float(np.linalg.norm(r - ref) / np.linalg.norm(ref)), 1e-12)
            y = np.asarray(common.qmoe.Layer(**W, **attrs)(x, lg), np.float64)
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
                        ref_d = np_reference(xt.float().cpu().numpy(), lg, **W, **attrs)
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
    def made_up(name, bits=4, slow=1.0):
        """A model's results on made-up timings; bits 8 doubles qmoe's bytes, slow scales its times."""
        cfg = MODELS[name]
        E, k = cfg["E"], cfg["k"]
        pe_q, pe_b = 3 * cfg["I"] * cfg["H"] * bits / 8, 3 * cfg["I"] * cfg["H"] * 2
        m = dict(model=name, shape=dict(hidden=cfg["H"], inter=cfg["I"], experts=E, k=k), bits=bits,
                 block_size=cfg["block"], attributes=layer_attrs(cfg, bits, cfg["block"], 1), dtype="bfloat16",
                 weight_sets=3, sets_needed_for_4x_l2=3, baseline_weight_bytes_per_set=pe_b * E,
                 qmoe=dict(kernel="(dry run)", packed_bytes=pe_q * E, device_bytes=pe_q * E * 1.01,
                           workspace_bytes=64 << 20, device_to_packed=1.01,
                           gpu_memory_held_per_layer=[pe_q * E * 1.01 + (64 << 20), pe_q * E * 1.01]), results=[])
        for T in (1, 16, 4096):
            ex = min(E, k * T)
            row = dict(tokens=T, flops=2.0 * k * cfg["H"] * 3 * cfg["I"] * T, sets=3, experts_mean=float(ex))
            for side, pe, scale in (("qmoe", pe_q, slow), ("baseline", pe_b, 3.0)):
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
        return m

    models = [made_up(name) for name in ("gpt-oss-20b", "mixtral-8x7b")]
    # --variants rows: 8-bit weights (twice the bytes, the same rate), zero points at 1.1x the time.
    variants = [dict(made_up("gpt-oss-20b", bits, slow), variant=v, variant_label=VARIANTS[v][0])
                for v, bits, slow in (("int8", 8, 1.0), ("zp", 4, 1.1))]
    data = dict(tool="bench/gpu_vs_torch.py --dry-run", date=datetime.datetime.now().isoformat(timespec="seconds"),
                dtype="bfloat16", machine=dict(gpu="(dry run: made-up timings)", l2_bytes=DEFAULT_L2),
                versions=versions(), baseline="torch._grouped_mm (dry run)", baseline_kind="torch._grouped_mm",
                ceilings=ceil, models=models, variants=variants,
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
    is then ~0 and the speed-up ~1x); its reference is the numpy oracle, tests/python/qmoe_np.py's np_reference
    (slow: keep --ref-max-tokens small)."""

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
        def __init__(self, device="cuda", max_tokens=4096, accuracy_level=0, **kw):
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
        return np_reference(x, logits, **kw)
