"""The GPU benchmark's harness on the CPU (bench/gpu_vs_torch.py --dry-run): its synthetic weight sets
(with and without zero points, 4- and 8-bit, row-wise and block-wise) are exact in bfloat16 and decode to
the independent numpy float64 oracle (tests/python/qmoe_np.py) and to qmoe.reference; the PyTorch
baseline built from them matches the oracle; the report judges each acceptance target in its direction."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench_on_path():
    """bench/ importable (its gpu package and gpu_vs_torch), once."""
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)


def test_dry_run_checks_pass(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "dry.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_vs_torch.py"), "--dry-run",
                        "--json", str(out), "--png", ""], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    checks = data["checks"]
    assert checks and all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    names = " ".join(c["check"] for c in checks)
    assert "qmoe.Layer (CPU, float32) vs oracle" in names and "torch baseline cpu bfloat16" in names
    assert "zero points" in r.stderr  # the zero-point weight sets ran
    assert "formats beside the main rows" in r.stdout and [v["variant"] for v in data["variants"]] == ["int8", "zp"]
    # Made-up timings: each target judged on its own mode and direction.
    by = {(e["model"], e["tokens"], e["mode"], e["metric"]): e for e in data["acceptance"]}
    graph_us = by[("gpt-oss-20b", 1, "graph", "ms")]
    assert graph_us["status"] == ("PASS" if graph_us["graph"] <= graph_us["target"] else "FAIL")
    speed = by[("gpt-oss-20b", 4096, "eager", "speedup")]
    assert speed["status"] == ("PASS" if speed["eager"] >= speed["target"] else "FAIL")
    assert by[("qwen3-30b-a3b", 128, "eager", "ms")]["status"] == "not run"


def test_variant_rows_are_rated_against_the_main_rows():
    """--variants: each format's row is rated against the main row of the same model and T (GB/s up to
    T = 16, TFLOP/s above), and a variant equal to the main run's format is refused."""
    _bench_on_path()
    from gpu.report import variant_efficiency

    def row(T, ms, gbps, tflops):
        return dict(tokens=T, qmoe=dict(eager=dict(ms=ms, gbps=gbps, tflops=tflops)))

    assert variant_efficiency(row(16, 2.0, 900.0, 1.0), row(16, 1.0, 1000.0, 2.0)) == pytest.approx(0.9)
    assert variant_efficiency(row(128, 2.0, 900.0, 30.0), row(128, 1.0, 1000.0, 40.0)) == pytest.approx(0.75)
    assert variant_efficiency(row(1, 2.0, 900.0, 1.0), None) is None
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_vs_torch.py"), "--dry-run",
                        "--variants", "int8", "--bits", "8"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "the main run's own format" in r.stderr, r.stderr[-2000:]


def test_variants_rerun_each_model_with_one_format_changed(monkeypatch):
    """The --variants loop (no GPU needed: the device, the ceilings and run_model are stand-ins): each
    variant reruns every model at --variant-tokens with only its own format changed, and its rows land
    under "variants" with their own dtype, rated against the main rows."""
    torch = pytest.importorskip("torch")
    _bench_on_path()
    import gpu_vs_torch as g

    class Props:
        name, multi_processor_count, L2_cache_size = "stand-in", 132, 50 << 20
        total_memory, major, minor = 1 << 36, 9, 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props)
    monkeypatch.setattr(g, "qmoe_cuda_problem", lambda: None)
    monkeypatch.setattr(g, "pick_grouped_mm", lambda dt, dev: (None, "stand-in"))
    monkeypatch.setattr(g, "measure_ceilings", lambda dev, dts, n: dict(
        copy_bytes=n, copy_rw_Bps=4e12, copy_read_half_Bps=2e12, read_sum_Bps=4e12,
        **{f"matmul_{g.dtname(d)}_flops": 7e14 for d in dts}))
    calls, written = [], {}

    def run_model(name, a, dev, dtype, gmm, ceil, l2):
        calls.append((name, a.bits, a.zero_points, g.dtname(dtype), tuple(a.tokens)))
        rows = [dict(tokens=T, experts_mean=2.0, baseline=dict(eager=dict(ms=3.0, gbps=1.0, tflops=1.0)),
                     qmoe=dict(eager=dict(ms=a.bits / 4, gbps=100.0, tflops=10.0 * 4 / a.bits))) for T in a.tokens]
        return dict(model=name, shape=dict(hidden=8, inter=8, experts=4, k=2), bits=a.bits, block_size=0,
                    zero_points=a.zero_points, attributes=dict(swiglu_fusion=1), dtype=g.dtname(dtype),
                    weight_sets=2, sets_needed_for_4x_l2=2, baseline_weight_bytes_per_set=1, results=rows)

    monkeypatch.setattr(g, "run_model", run_model)
    monkeypatch.setattr(g, "write_outputs", lambda data, a: written.update(data))
    a = g.parse_args(["--models", "gpt-oss-20b", "--tokens", "1,128", "--variants", "f16,int8zp",
                      "--variant-tokens", "128"])
    assert g.run(a) == 0
    assert calls == [("gpt-oss-20b", 4, False, "bfloat16", (1, 128)), ("gpt-oss-20b", 4, False, "float16", (128,)),
                     ("gpt-oss-20b", 8, True, "bfloat16", (128,))]
    assert [(m["variant"], m["dtype"]) for m in written["variants"]] == [("f16", "float16"), ("int8zp", "bfloat16")]
    q = written["variants"][1]["results"][0]["qmoe"]["eager"]
    assert q["mm_fraction"] == pytest.approx(5.0e12 / 7e14)  # against the ceiling of its own dtype
