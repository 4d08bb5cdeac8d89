"""The installed ``qmoe`` command on files: ``qmoe info FILE``, ``qmoe bench
--file`` and ``qmoe onnx offload`` (handed to ``python3 -m qmoe.onnx`` of
the same environment). The command is the one ``pip install .`` put beside
this interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qmoe
from qmoe_np import make_layer

QMOE = os.path.join(os.path.dirname(sys.executable), "qmoe")
pytestmark = pytest.mark.skipif(not os.access(QMOE, os.X_OK),
                                reason=f"no qmoe command beside {sys.executable} (pip install . puts it there)")

E, H, I = 4, 64, 32


def _layer(seed: int = 0):
    w, a, _ = make_layer(np.random.default_rng(seed), E=E, H=H, I=I, bits=4, block=32, bias=True,
                         activation_type="swiglu", swiglu_fusion=1, k=2, normalize_routing_weights=1)
    return w, a


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([QMOE, *args], capture_output=True, text=True, timeout=300)


def test_info_and_bench_on_a_file(tmp_path):
    w, a = _layer()
    path = str(tmp_path / "m.safetensors")
    qmoe.save(path, {"blocks.0.moe": dict(w, **a, metadata={"family": "test"})})
    r = _run("info", path)
    assert r.returncode == 0, r.stderr
    assert "layer blocks.0.moe" in r.stdout and "experts 4  hidden 64  inter 32  k 2  4-bit  block 32" in r.stdout
    assert "metadata family = test" in r.stdout
    r = _run("info", path, "--tensors")
    assert "blocks.0.moe.fc1_experts_weights" in r.stdout and "[4, 64, 32]" in r.stdout
    out = str(tmp_path / "bench.json")
    r = _run("bench", "--file", path, "--tokens", "1,3", "--threads", "1", "--min-time", "0.01", "--max-time", "0.05",
             "--no-ceilings", "--json", out)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out))
    assert res["load"]["layer"] == "blocks.0.moe" and res["load"]["gbps"] > 0
    assert all(x["rel_l2_err"] < 1e-5 for x in res["results"])  # against the float64 reference
    bad = _run("bench", "--file", path, "--layer", "nope")
    assert bad.returncode == 1 and 'no layer "nope" (the file has "blocks.0.moe")' in bad.stderr
    bad = _run("info", str(tmp_path / "missing.safetensors"))
    assert bad.returncode == 1 and "cannot open" in bad.stderr


def test_onnx_offload_command(tmp_path):
    pytest.importorskip("onnxruntime_extensions")
    import qmoe.onnx
    w, a = _layer(1)
    src = str(tmp_path / "moe.onnx")
    qmoe.onnx.export(src, {"moe": dict(w, **a)})
    dst = str(tmp_path / "out" / "moe.onnx")
    r = _run("onnx", "offload", src, "-o", dst, "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(tmp_path, "out", "moe.qmoe.safetensors"))
    sess = qmoe.onnx.session(dst, threads=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, H)).astype(np.float32)
    lg = rng.standard_normal((5, E)).astype(np.float32)
    (y,) = sess.run(None, {"input": x, "router_probs": lg})
    assert np.array_equal(y, qmoe.Layer(**w, **a, threads=1)(x, lg))
    r = _run("onnx", "offload", src)
    assert r.returncode == 2  # usage: -o is required
