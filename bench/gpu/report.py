"""The acceptance targets, the printed report, the JSON and the plot (what bench/plot_bench.py and the
README's figures read)."""
from __future__ import annotations

import json
import os
import traceback

from .common import ACCEPTANCE, ACCEPTANCE_BLOCK, log, mib


def acceptance(models, ceil):
    out = []
    by = {m["model"]: m for m in models}
    for model, T, metric, judged, target, text in ACCEPTANCE:
        m = by.get(model)
        e = dict(model=model, tokens=T, metric=metric, mode=judged, target=target, text=text)
        row = next((r for r in m["results"] if r["tokens"] == T), None) if m and "results" in m else None
        if row is None:
            e["status"] = "not run"
        else:
            if m["block_size"] != ACCEPTANCE_BLOCK.get(model, m["block_size"]):
                e["note"] = f"run at block {m['block_size']}, target defined at block {ACCEPTANCE_BLOCK[model]}"
            for mode in ("eager", "graph", "eager_vs_best"):
                v = (row.get("speedup", {}).get(mode) if metric == "speedup"
                     else row.get("qmoe", {}).get(mode, {}).get(metric))
                if v is not None:
                    e[mode] = v
            if judged not in e:
                e["status"] = "not run"
            else:
                met = e[judged] <= target if metric == "ms" else e[judged] >= target
                e["status"] = "PASS" if met else "FAIL"
        out.append(e)
    return out


def fmt(v, spec, dash="-"):
    return dash if v is None else format(v, spec)


def pct(frac):
    return "-" if frac is None else f"{100 * frac:.0f}%"


def times(v):
    return "-" if v is None else f"{v:.2f}x"


def print_report(data):
    c = data["ceilings"]
    mm_key = f"matmul_{data['dtype']}_flops"
    print(f"\n{data['machine'].get('gpu', '?')}, torch {data['versions'].get('torch')}, "
          f"qmoe {data['versions'].get('qmoe')}, {data['dtype']} activations")
    print(f"ceilings: copy {c['copy_rw_Bps'] / 1e9:.0f} GB/s (read+written; its read half "
          f"{c['copy_read_half_Bps'] / 1e9:.0f} GB/s), read-only sum {c['read_sum_Bps'] / 1e9:.0f} GB/s, "
          f"{data['dtype']} matmul {c[mm_key] / 1e12:.0f} TFLOP/s; L2 {mib(data['machine']['l2_bytes'])}")
    print(f"baseline: {data['baseline']}")
    for m in data["models"]:
        if "error" in m and "results" not in m:
            print(f"\n{m['model']}: not run: {m['error']}")
            continue
        sh, q = m["shape"], m.get("qmoe")
        layout = (f"block {m['block_size']}" if m["block_size"] else "row-wise") + (
            ", zero points" if m.get("zero_points") else "")
        print(f"\n{m['model']}: H={sh['hidden']} I={sh['inter']} E={sh['experts']} k={sh['k']}, {m['bits']}-bit "
              f"{layout}, swiglu fusion {m['attributes']['swiglu_fusion']}; {m['weight_sets']} weight sets "
              f"(>= {m['sets_needed_for_4x_l2']} for 4x L2)")
        if q:
            print(f"qmoe Layer: {q['kernel']}; packed {mib(q['packed_bytes'])}, device_bytes "
                  f"{mib(q['device_bytes'])} ({fmt(q.get('device_to_packed'), '.3f')}x packed), workspace "
                  f"{mib(q['workspace_bytes'])}; GPU memory held per Layer (mem_get_info): "
                  + ", ".join(mib(x) for x in q["gpu_memory_held_per_layer"]))
        print(f"baseline weights: {mib(m['baseline_weight_bytes_per_set'])} per set")
        graph = any("graph" in r.get(s, {}) for r in m["results"] for s in ("qmoe", "baseline"))
        loop = any("baseline_loop" in r for r in m["results"])
        hdr = (f"{'T':>5} {'experts':>8} {'qmoe ms':>9} {'base ms':>9} {'speedup':>7} {'q GB/s':>7} {'BW%':>4} "
               f"{'b GB/s':>7} {'BW%':>4} {'q TF/s':>7} {'mm%':>4} {'b TF/s':>7} {'mm%':>4}")
        if graph:
            hdr += f" | {'graph q':>9} {'graph b':>9} {'speedup':>7}"
        if loop:
            hdr += f" | {'loop ms':>9} {'vs best':>7}"
        hdr += f" | {'q~base':>7} {'q~f64':>7} {'base~f64':>8}"
        print(hdr)
        print("-" * len(hdr))
        for r in m["results"]:
            if "error" in r and "baseline" not in r:
                print(f"{r['tokens']:>5} error: {r['error']}")
                continue
            qe, be = r.get("qmoe", {}).get("eager", {}), r["baseline"]["eager"]
            sp = r.get("speedup", {})
            line = (f"{r['tokens']:>5} {r['experts_mean']:>4.1f}/{sh['experts']:<3} {fmt(qe.get('ms'), '.4f'):>9} "
                    f"{be['ms']:9.4f} {times(sp.get('eager')):>7} {fmt(qe.get('gbps'), '.0f'):>7} "
                    f"{pct(qe.get('bw_fraction')):>4} {be['gbps']:7.0f} {pct(be['bw_fraction']):>4} "
                    f"{fmt(qe.get('tflops'), '.1f'):>7} {pct(qe.get('mm_fraction')):>4} {be['tflops']:7.1f} "
                    f"{pct(be['mm_fraction']):>4}")
            if graph:
                qg, bg = r.get("qmoe", {}).get("graph", {}), r["baseline"].get("graph", {})
                line += f" | {fmt(qg.get('ms'), '.4f'):>9} {fmt(bg.get('ms'), '.4f'):>9} {times(sp.get('graph')):>7}"
            if loop:
                le = r.get("baseline_loop", {}).get("eager", {})
                line += f" | {fmt(le.get('ms'), '.4f'):>9} {times(sp.get('eager_vs_best')):>7}"
            line += (f" | {fmt(r.get('rel_l2_qmoe_vs_baseline'), '.1e'):>7} "
                     f"{fmt(r.get('rel_l2_qmoe_vs_f64'), '.1e'):>7} {fmt(r.get('rel_l2_baseline_vs_f64'), '.1e'):>8}")
            if "error" in r:
                line += f"  ({r['error']})"
            print(line)
        for r in m["results"]:
            for s in ("qmoe", "baseline"):
                g = r.get(s, {}).get("graph", {})
                if "error" in g:
                    print(f"  T={r['tokens']} {s}: CUDA graph capture failed: {g['error']}")
    print("\n(ms: median over rotating weight sets, CUDA events around each whole layer call, routing included;"
          "\n GB/s: expert bytes the call's routing touches (qmoe: packed_bytes/E each; baseline: its bf16 weights)"
          " / time,"
          "\n BW%: of the copy bandwidth (bytes read+written / time); TF/s: 2*T*k*H*3I flops / time, mm%: of the"
          "\n measured matmul rate; q~base, q~f64, base~f64: relative L2 errors on weight set 0 (f64: qmoe.reference))")
    if data.get("variants"):
        print_variants(data)
    if data.get("acceptance"):
        print("\nacceptance targets (status on the mode named; both modes shown):")
        for e in data["acceptance"]:
            val = lambda mode, e=e: ("-" if mode not in e else  # noqa: E731
                                f"{100 * e[mode]:.0f}%" if e["metric"] == "bw_fraction"
                                else f"{1e3 * e[mode]:.1f}us" if e["metric"] == "ms" and e[mode] < 0.1
                                else f"{e[mode]:.3f}ms" if e["metric"] == "ms" else f"{e[mode]:.2f}x")
            print(f"  {e['model']:<14} T={e['tokens']:<5} {e['text']:<36} {e['status']:<8} eager {val('eager'):>7}"
                  f"  graph {val('graph'):>7}" + (f"  vs the faster baseline {val('eager_vs_best')}"
                                                   if "eager_vs_best" in e else "")
                  + (f"  ({e['note']})" if "note" in e else ""))


def variant_efficiency(row, main_row):
    """A variant's rate over the main row's at the same T, eager: active-weight GB/s up to T = 16 (the
    weight-bound calls; 8-bit weights carry twice the bytes, so equal GB/s is no cliff), TFLOP/s above."""
    key = "gbps" if row["tokens"] <= 16 else "tflops"
    v = row.get("qmoe", {}).get("eager", {}).get(key)
    w = (main_row or {}).get("qmoe", {}).get("eager", {}).get(key)
    return None if not v or not w else v / w


def print_variants(data):
    """The --variants rows: each format beside the main rows, against its own baseline."""
    main = {m["model"]: m for m in data["models"] if m.get("results")}
    print("\nformats beside the main rows (each against its own baseline; eager, graphs where timed):")
    hdr = (f"{'model':<14} {'format':<27} {'T':>5} {'qmoe ms':>9} {'base ms':>9} {'speedup':>7} {'BW%':>4} "
           f"{'mm%':>4} {'graph q':>9} | {'main ms':>9} {'speedup':>7} {'rate vs main':>12} | {'q~f64':>7}")
    print(hdr)
    print("-" * len(hdr))
    for m in data["variants"]:
        label = m.get("variant_label", m.get("variant", "?"))
        if "results" not in m:
            print(f"{m['model']:<14} {label:<27} not run: {m.get('error', '?')}")
            continue
        m0 = main.get(m["model"])
        for r in m["results"]:
            if "error" in r and "baseline" not in r:
                print(f"{m['model']:<14} {label:<27} {r['tokens']:>5} error: {r['error']}")
                continue
            r0 = next((x for x in m0["results"] if x["tokens"] == r["tokens"]), None) if m0 else None
            qe, be = r.get("qmoe", {}).get("eager", {}), r["baseline"]["eager"]
            q0 = (r0 or {}).get("qmoe", {}).get("eager", {})
            print(f"{m['model']:<14} {label:<27} {r['tokens']:>5} {fmt(qe.get('ms'), '.4f'):>9} {be['ms']:9.4f} "
                  f"{times(r.get('speedup', {}).get('eager')):>7} {pct(qe.get('bw_fraction')):>4} "
                  f"{pct(qe.get('mm_fraction')):>4} {fmt(r.get('qmoe', {}).get('graph', {}).get('ms'), '.4f'):>9} | "
                  f"{fmt(q0.get('ms'), '.4f'):>9} {times((r0 or {}).get('speedup', {}).get('eager')):>7} "
                  f"{times(variant_efficiency(r, r0)):>12} | {fmt(r.get('rel_l2_qmoe_vs_f64'), '.1e'):>7}")
    print("(rate vs main: the format's active-weight GB/s over the main row's up to T = 16, its TFLOP/s above;"
          "\n 1.00x = no cliff; main: the first table's row of the same model and T)")


STYLE = {("qmoe", "eager"): ("qmoe (eager)", "#1f77b4", "s", "-"),
         ("qmoe", "graph"): ("qmoe (CUDA graph)", "#1f77b4", "s", "--"),
         ("baseline", "eager"): ("PyTorch bf16 (eager)", "#444444", "o", "-"),
         ("baseline", "graph"): ("PyTorch bf16 (CUDA graph)", "#444444", "o", "--"),
         ("baseline_loop", "eager"): ("PyTorch bf16, per-expert loop (eager)", "#999999", "v", ":")}


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [m for m in data["models"] if m.get("results")]
    if not models:
        raise ValueError("no results to plot")
    c = data["ceilings"]
    mm_key = f"matmul_{data['dtype']}_flops"
    fig, axes = plt.subplots(len(models), 3, figsize=(17, 4.6 * len(models) + 0.8), squeeze=False)

    def series(m, side, mode, key):
        pts = [(r["tokens"], r[side][mode][key]) for r in m["results"]
               if key in r.get(side, {}).get(mode, {})]
        return [p[0] for p in pts], [p[1] for p in pts]

    for row, m in enumerate(models):
        sh = m["shape"]
        layout = (f"block {m['block_size']}" if m["block_size"] else "row-wise") + (
            ", zero points" if m.get("zero_points") else "")
        name = (f"{m['model']} (H={sh['hidden']}, I={sh['inter']}, E={sh['experts']}, k={sh['k']}; "
                f"{m['bits']}-bit {layout})")
        tokens = [r["tokens"] for r in m["results"]]
        for col, (key, ylabel, title, ceil_v, ceil_txt, scale, frac) in enumerate([
                ("ms", "time per call [ms] (median)", "time per call (labels: speed-up vs PyTorch)", None, None, 1,
                 None),
                ("gbps", "GB/s (touched expert bytes / time)", "active-weight bandwidth (labels: % of copy BW)",
                 c["copy_rw_Bps"], "copy {:.0f} GB/s", 1e9, "bw_fraction"),
                ("tflops", "TFLOP/s (2 T k H 3I / time)", "compute rate (labels: % of matmul rate)",
                 c[mm_key], f"{data['dtype']} matmul " + "{:.0f} TFLOP/s", 1e12, "mm_fraction")]):
            ax = axes[row][col]
            top = 0
            for (side, mode), (legend, color, marker, ls) in STYLE.items():
                xs, ys = series(m, side, mode, key)
                if not xs:
                    continue
                legend = legend.replace("bf16", {"float16": "f16"}.get(data["dtype"], "bf16"))
                ax.plot(xs, ys, marker=marker, color=color, ls=ls, label=legend, lw=1.6, ms=6)
                top = max([top] + ys)
                if side == "qmoe" and mode == "eager":
                    for r in m["results"]:
                        s = r.get("qmoe", {}).get("eager", {})
                        if key == "ms" and "eager" in r.get("speedup", {}):
                            txt = f"{r['speedup']['eager']:.2f}x"
                        elif frac and s.get(frac) is not None and s[frac] >= 0.01:
                            txt = f"{100 * s[frac]:.0f}%"
                        else:
                            continue
                        ax.annotate(txt, (r["tokens"], s[key]), textcoords="offset points", xytext=(5, 5),
                                    fontsize=8, color=color)
            if ceil_v:
                ax.axhline(ceil_v / scale, color="#d62728" if col == 1 else "#2ca02c", ls=":", lw=1.5)
                ax.text(0.02, ceil_v / scale, ceil_txt.format(ceil_v / scale), fontsize=8, va="bottom",
                        transform=ax.get_yaxis_transform(), color="#d62728" if col == 1 else "#2ca02c")
                ax.set_ylim(0, max(top, ceil_v / scale) * 1.15)
            ax.set_xscale("log")
            if col == 0:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(  # 2 and 5 of each decade
                    lambda v, _: f"{v:g}" if v > 0 and f"{v:e}"[0] in "25" else ""))
            ax.set_xticks(tokens)
            ax.set_xticklabels([str(t) for t in tokens])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("tokens per call T")
            ax.set_ylabel(ylabel)
            ax.set_title((f"{name}\n" if col == 0 else "\n") + title, fontsize=10)
            ax.grid(True, alpha=0.3)
        targets = [e for e in data.get("acceptance", []) if e["model"] == m["model"]]
        if targets:
            axes[row][0].text(0.02, 0.97, "\n".join(f"T={e['tokens']}: {e['text']}: {e['status']}" for e in targets),
                              transform=axes[row][0].transAxes, fontsize=8, va="top")
    fig.suptitle(f"qmoe CUDA vs PyTorch {data['dtype']} MoE ({data.get('baseline_kind', '?')}) — "
                 f"{data['machine'].get('gpu', '?')}, torch {data['versions'].get('torch')}, {data['date'][:10]}",
                 fontsize=12)
    handles = {}
    for ax in axes.ravel():
        for h, lb in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lb, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.35 / (4.6 * len(models)), 1, 1 - 0.35 / (4.6 * len(models))))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(data, a):
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(data, f, indent=1, default=float)
    log(f"wrote {a.json}")
    if a.png:
        try:
            plot(data, a.png)
            log(f"wrote {a.png}")
        except ImportError:
            log("matplotlib is not installed: no plot")
        except Exception as e:  # noqa: BLE001 - the numbers are already saved
            traceback.print_exc()
            log(f"plot failed: {e}")
