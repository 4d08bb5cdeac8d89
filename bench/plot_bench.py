#!/usr/bin/env python3
"""Plots the JSON of bench/vs_onnxruntime.py: per model, (a) time per call vs T
(log-log) for ONNX Runtime and each qmoe accuracy level, (b) effective weight
GB/s vs T against the measured read bandwidth, (c) GFLOP/s vs T against the
measured float32 FMA peak.

    python bench/plot_bench.py out/bench.png out/bench.json [more.json ...]

Several JSON files (e.g. runs with different token counts) go into one figure,
one row per model. Needs matplotlib (Agg backend, no display).
"""
from __future__ import annotations

import json
import sys

SIDE_STYLE = {  # label -> (legend, color, marker)
    "ort": ("ONNX Runtime", "#444444", "o"),
    "qmoe0": ("qmoe level 0 (fp32 act.)", "#1f77b4", "s"),
    "qmoe1": ("qmoe level 1", "#17becf", "s"),
    "qmoe2": ("qmoe level 2", "#9467bd", "D"),
    "qmoe3": ("qmoe level 3 (bf16 with AMX)", "#8c564b", "D"),
    "qmoe4": ("qmoe level 4 (int8 act.)", "#ff7f0e", "^"),
}


def _series(model, label, key):
    xs, ys = [], []
    for r in model["results"]:
        s = r["sides"].get(label)
        if s and key in s and s[key] is not None:
            xs.append(r["tokens"])
            ys.append(s[key])
    return xs, ys


def _offset(model, label, key, tokens):
    """Label offset in points for the qmoe point (label, T): above the point when it
    is the highest qmoe point of that T, else below, so that labels do not collide."""
    vals = [r["sides"][lb][key] for r in model["results"] if r["tokens"] == tokens
            for lb in r["sides"] if lb.startswith("qmoe") and r["sides"][lb].get(key) is not None]
    mine = next(r["sides"][label][key] for r in model["results"] if r["tokens"] == tokens)
    return (6, 5) if mine >= max(vals) else (6, -13)


def _rate_panel(ax, model, labels, key, frac_key, min_frac, ceiling, ceiling_text, color, text_x, ha):
    """Plots each side's `key` (per second, 1e9 units) against T with its fraction labels, and the
    measured ceiling as a dashed line; the ceiling and every point stay in view."""
    for lb in labels:
        legend, side_color, marker = SIDE_STYLE[lb]
        xs, ys = _series(model, lb, key)
        if xs:
            ax.plot(xs, ys, marker=marker, color=side_color, label=legend, lw=1.8, ms=7)
        _label_fractions(ax, model, lb, key, frac_key, side_color, min_frac)
    if ceiling:
        ax.axhline(ceiling / 1e9, color=color, ls="--", lw=1.5)
        ax.text(text_x, ceiling / 1e9, ceiling_text.format(ceiling / 1e9), color=color, fontsize=8, ha=ha,
                va="bottom", transform=ax.get_yaxis_transform())
        top = max([ceiling / 1e9] + [y for lb in labels for y in _series(model, lb, key)[1]])
        ax.set_ylim(0, top * 1.15)


def _label_fractions(ax, model, label, key, frac_key, color, min_frac):
    """Writes "NN%" (of the ceiling) next to each point of a qmoe series."""
    if not label.startswith("qmoe"):
        return
    for r in model["results"]:
        s = r["sides"].get(label, {})
        if s.get(frac_key) is not None and s[frac_key] >= min_frac:
            ax.annotate(f"{100 * s[frac_key]:.0f}%", (r["tokens"], s[key]), textcoords="offset points",
                        xytext=_offset(model, label, key, r["tokens"]), fontsize=8, color=color)


def plot(data, path):
    """Writes the figure for `data` (one vs_onnxruntime.py JSON, or a list of them) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = data if isinstance(data, list) else [data]
    models = [(run, m) for run in runs for m in run["models"]]
    if not models:
        raise ValueError("no models in the JSON")
    fig, axes = plt.subplots(len(models), 3, figsize=(17, 4.6 * len(models) + 0.7), squeeze=False)
    for row, (run, m) in enumerate(models):
        ceil = m.get("ceilings") or run["ceilings"]
        bw, peak = ceil.get("read_bandwidth"), ceil.get("fma_peak")
        labels = [lb for lb in SIDE_STYLE if any(lb in r["sides"] for r in m["results"])]
        tokens = [r["tokens"] for r in m["results"]]
        sh = m["shape"]
        layout = f"block {m['block_size']}" if m["block_size"] else "row-wise"
        name = (f"{m['model']}  (H={sh['hidden']}, I={sh['inter']}, E={sh['experts']}, k={sh['k']}; "
                f"{m['bits']}-bit {layout})")
        ax_t, ax_bw, ax_fl = axes[row]

        # (a) time per call
        for lb in labels:
            legend, color, marker = SIDE_STYLE[lb]
            xs, ys = _series(m, lb, "ms")
            if xs:
                ax_t.plot(xs, ys, marker=marker, color=color, label=legend, lw=1.8, ms=7)
            if lb.startswith("qmoe"):
                for r in m["results"]:
                    s = r["sides"].get(lb, {})
                    if s.get("speedup_vs_ort"):
                        ax_t.annotate(f"{s['speedup_vs_ort']:.1f}x", (r["tokens"], s["ms"]), textcoords="offset points",
                                      xytext=_offset(m, lb, "ms", r["tokens"]), fontsize=8, color=color)
        skipped = [r["tokens"] for r in m["results"] if "skipped" in r["sides"].get("ort", {})]
        if "skipped" in m.get("ort", {}):
            ax_t.text(0.02, 0.97, f"ONNX Runtime skipped: {m['ort']['skipped']}", transform=ax_t.transAxes,
                      va="top", fontsize=8, color=SIDE_STYLE["ort"][1], wrap=True)
        elif skipped:
            ax_t.text(0.02, 0.97, "ONNX Runtime not timed at T = " + ", ".join(map(str, skipped)),
                      transform=ax_t.transAxes, va="top", fontsize=8, color=SIDE_STYLE["ort"][1])
        ax_t.set_xscale("log")
        ax_t.set_yscale("log")
        ax_t.set_ylabel("time per call [ms] (median)")
        ax_t.set_title(f"(a) {name}\ntime per call (labels: speed-up vs ONNX Runtime)", fontsize=10)

        # (b) effective weight bandwidth, (c) compute rate: one series per side, each against its ceiling
        _rate_panel(ax_bw, m, labels, "weight_gbps", "bandwidth_fraction", 0.05, bw,
                    "measured read bandwidth {:.1f} GB/s", "#d62728", 0.98, "right")
        ax_bw.set_xscale("log")
        ax_bw.set_ylabel("weight GB/s (touched expert bytes / time)")
        ax_bw.set_title("(b) effective weight bandwidth (memory-bound at small T)\nlabels: % of the measured read "
                        "bandwidth", fontsize=10)

        # (AMX (bf16) and int8 can exceed the float32 FMA peak)
        _rate_panel(ax_fl, m, labels, "gflops", "peak_fraction", 0.0, peak,
                    "measured float32 FMA peak {:.0f} GFLOP/s", "#2ca02c", 0.02, "left")
        ax_fl.set_xscale("log")
        ax_fl.set_ylabel("GFLOP/s (2 x weights x routed tokens / time)")
        ax_fl.set_title("(c) compute rate (compute-bound at large T)\nlabels: % of the measured float32 FMA peak "
                        "(int8 level 4 can exceed it)",
                        fontsize=10)

        for ax in (ax_t, ax_bw, ax_fl):
            ax.set_xlabel("tokens per call T")
            ax.set_xticks(tokens)
            ax.set_xticklabels([str(t) for t in tokens])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if len(tokens) == 1:
                ax.set_xlim(tokens[0] / 2, tokens[0] * 2)
            ax.grid(True, which="major", alpha=0.3)
        lo, hi = ax_t.get_ylim()
        ax_t.set_ylim(lo / 1.6, hi * 1.6)  # room for the speed-up labels

    run = runs[0]
    mach = run["machine"]
    ceil = run["ceilings"]
    threads = run.get("threads", ceil.get("threads"))
    fig.suptitle(f"qmoe vs ONNX Runtime {run['versions']['onnxruntime']} QMoE on CPU, float32 activations, "
                 f"{threads} thread(s) — {mach['cpu_model']} ({mach['logical_cpus']} logical CPUs, "
                 f"{ceil.get('kernel_isa')}), {run['date'][:10]}", fontsize=12)
    handles = {}
    for ax in axes.ravel():
        for h, lb in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lb, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles), fontsize=10,
               frameon=False)
    top = 1 - 0.35 / (4.6 * len(models))
    bottom = 0.3 / (4.6 * len(models))
    fig.tight_layout(rect=(0, bottom, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, inputs = argv[0], argv[1:]
    data = []
    for p in inputs:
        with open(p) as f:
            data.append(json.load(f))
    plot(data, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
