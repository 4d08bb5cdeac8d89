#!/usr/bin/env python3
"""qmoe's CUDA backend against a bfloat16 PyTorch MoE: same weights, same routing, one run.

For each model shape the script synthesizes several independent weight sets
(raw 4-bit codes and scales in ONNX Runtime's QMoE layout), builds one
``qmoe.Layer(device="cuda")`` per set and, from the very same codes, the
dequantized bf16 weights of a PyTorch MoE (softmax -> top-k -> renormalize ->
grouped FC1 -> swiglu -> grouped FC2 -> weighted sum, grouped by expert with
``torch._grouped_mm`` when it works here, else a per-expert matmul loop). It
measures the GPU's ceilings in the same run (device-to-device copy bandwidth,
bf16 8192^3 matmul rate), times whole layer calls (routing included) with CUDA
events, and reports per (model, T): both times, the speed-up, qmoe's
active-weight GB/s against the copy bandwidth, TFLOP/s against the matmul rate,
the errors (qmoe vs the baseline, both vs the float64 reference), and the
Layer's device memory.

    python bench/gpu_vs_torch.py                                  # 3 models, T = 1,16,128,4096, bf16, eager
    python bench/gpu_vs_torch.py --graph                          # + CUDA-graph columns
    python bench/gpu_vs_torch.py --models mixtral-8x7b --tokens 1,4096 --block-size 64
    python bench/gpu_vs_torch.py --baseline both                  # + the per-expert loop, speed-up vs the faster
    python bench/gpu_vs_torch.py --bits 8 --zero-points           # 8-bit codes, a zero point per row or block
    python bench/gpu_vs_torch.py --graph --variants f16,int8,zp --variant-tokens 1,16,128,4096
                                                                  # + float16 tokens, 8-bit weights, zero points
    python bench/gpu_vs_torch.py --accuracy-level 4 --models gpt-oss-20b,qwen3-30b-a3b --tokens 128,4096
    python bench/gpu_vs_torch.py --baseline-only                  # the PyTorch side alone (no qmoe needed)
    python bench/gpu_vs_torch.py --fake-qmoe --ref-max-tokens 1   # harness self-test: qmoe replaced by the baseline
    python bench/gpu_vs_torch.py --dry-run                        # CPU: tiny shapes, baseline math vs numpy float64
    python bench/gpu_vs_torch.py --plot-only out/gpu_vs_torch.json --png out/gpu_vs_torch.png

Why rotate weight sets: a decode call (T = 1) reads k experts only (gpt-oss-20b
4-bit: 4 x 12 MB), less than the H200's 60 MB L2; timing one layer over and over
would time the L2, not HBM. Every timed call therefore uses the next of N
independent weight sets (and its own input), N chosen so that N x (the packed
bytes one T = 1 call reads) exceeds 4 x L2 (at least 2 sets). The timed calls
run in rounds with the sides alternating, after a warm-up of at least 0.3 s per
side: with a short warm-up the side timed first came out up to 1.4x slower than
the identical computation timed second (seen with --fake-qmoe; probably the
GPU's clocks coming back up after the host prepared the next shapes).

Why these weights: codes are uniform random bytes mapped to 1..15 (4-bit; the
symmetric range, 0 -> the zero point 8), scales are m * 2^p with m in 8..15, so
scale * (q - 8) has at most 7 significant bits and is exact in bfloat16 and
float16: the baseline's bf16 weights are the quantized weights exactly, and
qmoe vs baseline differences come from the activations' rounding alone. Router
logits are a random permutation of E distinct values exact in bf16 per token
(no ties, so both sides pick the same experts). ``--weights quantize`` uses
Gaussian weights through qmoe.quantize instead (slower; scales then not exact in bf16).

Exit status: 0 when at least one model ran, 1 when none did, 2 when qmoe's CUDA
backend (or a CUDA device) is unavailable.

The code lives in bench/gpu/ (weights, baseline, timing, runner, report,
selftest: see its __init__.py); this file is the command line.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: bench_setup and the gpu package
from gpu import common  # noqa: E402 - the modules: bench/gpu/__init__.py
from gpu.baseline import pick_grouped_mm  # noqa: E402
from gpu.common import DEFAULT_L2, MODELS, VARIANTS, dtname, log, mib, torch, versions  # noqa: E402
from gpu.report import acceptance, plot, print_report, write_outputs  # noqa: E402
from gpu.runner import qmoe_cuda_problem, run_model  # noqa: E402
from gpu.selftest import FakeQmoe, dry_run  # noqa: E402
from gpu.timing import free_now, is_oom, measure_ceilings, merge_ceilings  # noqa: E402


def token_list(p, flag, text):
    """A comma list of positive token counts, or the parser's error naming the flag."""
    try:
        tokens = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        tokens = []
    if not tokens or min(tokens) < 1:
        p.error(f"{flag}: a comma list of positive integers, got {text!r}")
    return tokens


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument("--tokens", default="1,16,128,4096", help="comma list of T (default 1,16,128,4096)")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--block-size", type=int, default=None,
                   help="block size for every model (0 = row-wise); default: gpt-oss-20b 0, the others 128")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "f16"))
    p.add_argument("--swiglu-fusion", type=int, default=1, choices=(0, 1, 2),
                   help="1: FC1 rows interleaved (default), 2: halves, 0: separate FC3")
    p.add_argument("--weights", default="codes", choices=("codes", "quantize"),
                   help="codes: random codes and bf16-exact scales (fast, default); quantize: Gaussian weights "
                        "through qmoe.quantize")
    p.add_argument("--zero-points", action="store_true",
                   help="codes over the full range with a random zero point per row or (row, block) (codes weights)")
    p.add_argument("--graph", action="store_true", help="also time each side captured in CUDA graphs")
    p.add_argument("--accuracy-level", type=int, default=0, choices=(0, 4),
                   help="qmoe's accuracy_level: 4 = int8 tokens on the int8 tensor cores where wgmma runs "
                        "(row-wise weights or blocks of >= 128; the kernel line says when)")
    p.add_argument("--variants", default="",
                   help="comma list of formats timed in the same run beside the main rows, each against its own "
                        "baseline: " + ", ".join(f"{k} ({v[0]})" for k, v in VARIANTS.items()))
    p.add_argument("--variant-tokens", default=None, help="comma list of T for the variants (default: --tokens)")
    p.add_argument("--baseline", default="grouped", choices=("grouped", "loop", "both"),
                   help="grouped: torch._grouped_mm when it works here (default), else the loop; loop: one "
                        "torch.mm per expert hit (host sync for the counts; no CUDA graph); both: grouped, and "
                        "the loop as an extra eager column with the speed-up against the faster of the two")
    p.add_argument("--repeats", type=int, default=60, help="timed calls per T and side (default 60; each "
                                                            "round rounded up to a multiple of the weight sets)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up passes over the weight sets (default 2)")
    p.add_argument("--warmup-s", type=float, default=0.3, help="and at least this many seconds of warm-up per "
                                                              "T and side (default 0.3: the GPU clocks ramp up)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per T, the sides alternating (default 3)")
    p.add_argument("--sets", type=int, default=0, help="weight sets (default: enough for 4x L2, at least 2)")
    p.add_argument("--max-sets", type=int, default=32)
    p.add_argument("--no-reference", action="store_true", help="skip the float64 reference")
    p.add_argument("--ref-max-tokens", type=int, default=16, help="reference only for T up to this (default 16)")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="copy-bandwidth buffer (default 2 GiB)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--baseline-only", action="store_true", help="time the PyTorch side alone (no qmoe needed)")
    p.add_argument("--fake-qmoe", action="store_true", help="harness self-test on a GPU: qmoe replaced by the "
                                                            "PyTorch baseline and the numpy oracle")
    p.add_argument("--dry-run", action="store_true", help="CPU self-check at tiny shapes, then the report on "
                                                          "made-up timings")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the plot of a JSON written earlier")
    outdir = os.environ.get("OUT") or os.path.join(os.getcwd(), "out")
    p.add_argument("--json", default=None, help=f"default {outdir}/gpu_vs_torch.json ($OUT if set, else ./out)")
    p.add_argument("--png", default=None, help="default: beside the JSON; '' for none")
    a = p.parse_args(argv)
    stem = "gpu_vs_torch_dry_run" if a.dry_run else "gpu_vs_torch"
    a.json = a.json or os.path.join(outdir, stem + ".json")
    if a.png is None:
        a.png = os.path.splitext(a.plot_only or a.json)[0] + ".png"
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in a.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    a.tokens = token_list(p, "--tokens", a.tokens)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in a.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")
        if all(getattr(a, f) == x for f, x in VARIANTS[v][1].items()):
            p.error(f"--variants: {v!r} ({VARIANTS[v][0]}) is the main run's own format")
    a.variant_tokens = a.tokens if a.variant_tokens is None else token_list(p, "--variant-tokens", a.variant_tokens)
    if a.variants and a.baseline_only:
        p.error("--variants times qmoe: not with --baseline-only")
    if a.weights == "quantize" and common.qmoe is None:
        p.error("--weights quantize needs the qmoe package")
    return a


def variant_args(a, v):
    """The arguments of variant v's run: the main run's, with the variant's format and --variant-tokens."""
    va = copy.copy(a)
    for field, value in VARIANTS[v][1].items():
        setattr(va, field, value)
    va.tokens = a.variant_tokens
    return va


def torch_dtypes():
    """--dtype's names -> torch dtypes."""
    return {"bf16": torch.bfloat16, "f16": torch.float16}


def run_models(a, dev, dtype, gmm, ceil, l2, tag=""):
    """run_model for each of a.models; a model that fails (out of memory, say) is reported in its place
    and the others still run."""
    out = []
    for name in a.models:
        try:
            m = run_model(name, a, dev, dtype, gmm, ceil, l2)
        except Exception as e:  # noqa: BLE001 - one model's failure does not stop the others
            if not is_oom(e) and not isinstance(e, (MemoryError, ValueError)):
                traceback.print_exc()
            m = dict(model=name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log(f"{name}{tag}: {m['error']}")
            free_now()
        out.append(m)
    return out


def main(argv):
    a = parse_args(argv)
    if torch is None:
        return run(a)
    with torch.inference_mode():  # no autograd bookkeeping on either side
        return run(a)


def run(a):
    if a.fake_qmoe:
        common.qmoe = FakeQmoe
    if a.plot_only:
        with open(a.plot_only) as f:
            plot(json.load(f), a.png)
        log(f"wrote {a.png}")
        return 0
    if a.dry_run:
        return dry_run(a)
    if torch is None or not torch.cuda.is_available():
        log("no CUDA device visible to PyTorch (torch " + (torch.__version__ if torch else "not installed") + ")")
        return 2
    if not a.baseline_only:
        why = qmoe_cuda_problem()
        if why:
            log(f"qmoe's CUDA backend is not available: {why}\n(--baseline-only times the PyTorch side alone)")
            return 2
    dev = torch.device("cuda")
    dtype = torch_dtypes()[a.dtype]
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 0) or DEFAULT_L2
    machine = dict(gpu=props.name, sms=props.multi_processor_count, l2_bytes=l2, gpu_memory_bytes=props.total_memory,
                   capability=f"{props.major}.{props.minor}", host=platform.node(), cpus=os.cpu_count())
    if a.baseline == "loop":
        gmm, why = None, "--baseline loop"
    else:
        gmm, why = pick_grouped_mm(dtype, dev)
    baseline = why if gmm else f"per-expert torch.mm loop ({why})"
    log(f"{props.name}: L2 {mib(l2)}; baseline: {baseline}")
    variants = [(v, variant_args(a, v)) for v in a.variants]
    mdt = [torch.bfloat16] + [torch_dtypes()[d] for d in sorted({a.dtype} | {va.dtype for _, va in variants})
                              if d != "bf16"]
    measured = [measure_ceilings(dev, mdt, a.copy_bytes)]
    ceil = merge_ceilings(measured)
    log(f"ceilings: copy {ceil['copy_rw_Bps'] / 1e9:.0f} GB/s (read+written), "
        f"matmul {ceil[f'matmul_{dtname(dtype)}_flops'] / 1e12:.0f} TFLOP/s")
    data = dict(tool="bench/gpu_vs_torch.py", date=datetime.datetime.now().isoformat(timespec="seconds"),
                args=vars(a), machine=machine, versions=versions(), dtype=dtname(dtype),
                baseline=baseline, baseline_kind="torch._grouped_mm" if gmm else "per-expert loop", models=[])
    data["models"] = run_models(a, dev, dtype, gmm, ceil, l2)
    if variants:
        data["variants"] = []
    for v, va in variants:  # the same models again, one format changed, each against its own baseline
        vdtype = torch_dtypes()[va.dtype]
        vgmm = gmm if vdtype == dtype or a.baseline == "loop" else pick_grouped_mm(vdtype, dev)[0]
        log(f"variant {v}: {VARIANTS[v][0]}")
        for m in run_models(va, dev, vdtype, vgmm, ceil, l2, f" ({v})"):
            m.update(variant=v, variant_label=VARIANTS[v][0])
            data["variants"].append(m)
    measured.append(measure_ceilings(dev, mdt, a.copy_bytes))
    data["ceilings_measured"] = measured
    data["ceilings"] = ceil = merge_ceilings(measured)
    for m in data["models"] + data.get("variants", []):  # fractions against the final (highest) ceilings
        mm_key = f"matmul_{m.get('dtype', data['dtype'])}_flops"
        for r in m.get("results", []):
            for side in ("qmoe", "baseline", "baseline_loop"):
                for s in r.get(side, {}).values():
                    if "gbps" in s:
                        s["bw_fraction"] = s["gbps"] * 1e9 / ceil["copy_rw_Bps"]
                        s["mm_fraction"] = s["tflops"] * 1e12 / ceil[mm_key]
    if not a.baseline_only:
        data["acceptance"] = acceptance(data["models"], ceil)
    print_report(data)
    write_outputs(data, a)
    return 0 if any(m.get("results") for m in data["models"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
