"""Shared setup of bench/vs_onnxruntime.py: the reference shapes, the machine
(CPU, last-level cache, memory, measured ceilings), synthetic quantized weights
written to one file (ONNX external data, memory-mapped for qmoe), the one-node
ONNX Runtime QMoE model on that file, and the rotating input sets."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

import numpy as np

try:
    import qmoe  # the package under test
except ImportError:  # pragma: no cover - exercised only before the package exists
    qmoe = None

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
SHAPES_JSON = os.path.join(_ROOT, "tools", "shapes.json")
# The one numpy float64 reference (quantizer, dequantizer, MoE forward) is the tests' independent oracle,
# tests/python/qmoe_np.py; the benchmarks import it from here.
sys.path.append(os.path.join(_ROOT, "tests", "python"))
from qmoe_np import np_dequantize, np_quantize, np_reference  # noqa: E402, F401 - re-exported to the benchmarks


def reference_shapes() -> dict:
    """The reference shapes of tools/shapes.json (the one definition, which tools/synth.cpp builds in):
    name -> dict(H, I, E, k, alpha, beta, limit, block, bias), in the file's order."""
    with open(SHAPES_JSON) as f:
        raw = json.load(f)
    return {name: dict(H=m["hidden"], I=m["inter"], E=m["experts"], k=m["k"], alpha=float(m["activation_alpha"]),
                       beta=float(m["activation_beta"]),
                       limit=math.inf if m["swiglu_limit"] == "inf" else float(m["swiglu_limit"]),
                       block=m["block_size"], bias=bool(m["bias"]))
            for name, m in raw.items() if not name.startswith("_")}


MODELS = reference_shapes()
MAX_SETS = 64               # input sets per T, at most
MAX_SET_BYTES = 512 << 20   # inputs of one T, at most
# ORT's session grows the process by about this many times the raw weight bytes
# (measured: +1259 MiB anonymous memory for gpt-oss-20b's 382 MiB, ORT 1.32,
# 4-bit row-wise, weights as external data); used to skip ORT where it cannot fit.
ORT_MEMORY_FACTOR = 3.5


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def llc_bytes():
    """(bytes, reported): the level-3 cache of cpu0 from sysfs, else 64 MiB assumed."""
    for i in range(16):
        d = f"/sys/devices/system/cpu/cpu0/cache/index{i}/"
        try:
            with open(d + "level") as f:
                if f.read().strip() != "3":
                    continue
            with open(d + "size") as f:
                s = f.read().strip()
        except OSError:
            if i >= 4:
                break
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
        digits = s[:-1] if s[-1:] in "KMG" else s
        if digits.isdigit():
            return int(digits) * mult, True
    return 64 << 20, False


def meminfo(key):
    """A /proc/meminfo entry in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss():
    """(anonymous, file-backed) resident bytes of this process (Linux; zeros if unknown).
    The weights are memory-mapped from a file, so only the anonymous part is what a
    session or a Layer holds of its own."""
    out = {"RssAnon": 0, "RssFile": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k = line.split(":", 1)[0]
                if k in out:
                    out[k] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out["RssAnon"], out["RssFile"]


def cpu_snapshot():
    """(wall s, busy CPU s of the whole machine, steal s, CPU s of this process) for cpu_competition()."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = steal = 0.0
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
        steal = (v[7] if len(v) > 7 else 0) / hz
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.perf_counter(), busy, steal, t.user + t.system


def cpu_competition(before, after):
    """(cores other processes kept busy, cores the hypervisor stole) on average between
    two cpu_snapshot()s: what competed with the timed calls. On a shared machine a
    timing with more than a small fraction of a core of competition is suspect."""
    wall = max(after[0] - before[0], 1e-9)
    other = ((after[1] - before[1]) - (after[3] - before[3])) / wall
    return max(other, 0.0), (after[2] - before[2]) / wall


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine_info():
    llc, reported = llc_bytes()
    return dict(cpu_model=cpu_model(), logical_cpus=os.cpu_count(), llc_bytes=llc, llc_reported=reported,
                mem_total_bytes=meminfo("MemTotal"), platform=platform.platform(), python=platform.python_version())


def measure_ceilings(threads, previous=None):
    """The machine's read bandwidth (1 GiB buffer) and float32 FMA peak with `threads`
    threads. With `previous`, each ceiling is the higher of the two measurements:
    on a shared machine a measurement can only come out low (competing processes),
    and the higher ceiling gives the lower, honest percentage."""
    if qmoe is None or not hasattr(qmoe, "measure_read_bandwidth"):
        return dict(threads=threads, read_bandwidth=None, fma_peak=None, kernel_isa=None)
    c = dict(threads=threads, read_bandwidth=qmoe.measure_read_bandwidth(threads, 1 << 30),
             fma_peak=qmoe.measure_peak_flops(threads, 0.3), kernel_isa=qmoe.cpu_kernel_isa())
    c["measured"] = [dict(read_bandwidth=c["read_bandwidth"], fma_peak=c["fma_peak"])]
    if previous and previous.get("read_bandwidth"):
        c["measured"] = previous["measured"] + c["measured"]
        c["read_bandwidth"] = max(m["read_bandwidth"] for m in c["measured"])
        c["fma_peak"] = max(m["fma_peak"] for m in c["measured"])
    return c


# --------------------------------------------------------------------------- weights

def quantize(w, bits, block_size):
    if qmoe is not None:
        return qmoe.quantize(w, bits=bits, block_size=block_size, symmetric=True)
    return np_quantize(w, bits, block_size)[:3]  # the same rule in numpy (tests/python/qmoe_np.py)


# ONNX Runtime's input names of the arrays the script makes, in input order.
WEIGHT_INPUTS = [("w1", "fc1_experts_weights"), ("s1", "fc1_scales"), ("b1", "fc1_experts_bias"),
                 ("w2", "fc2_experts_weights"), ("s2", "fc2_scales"), ("b2", "fc2_experts_bias")]


def weight_layout(cfg, bits, block):
    """{short name: (shape, dtype)} of the raw QMoE inputs (swiglu fusion 1: FC1 has 2I rows)."""
    H, I, E = cfg["H"], cfg["I"], cfg["E"]
    pack = 8 // bits
    lay = dict(w1=((E, 2 * I, H // pack), np.uint8),
               s1=((E, 2 * I) if block == 0 else (E, 2 * I, H // block), np.float32),
               w2=((E, H, I // pack), np.uint8),
               s2=((E, H) if block == 0 else (E, H, I // block), np.float32))
    if cfg["bias"]:
        lay["b1"] = ((E, 2 * I), np.float32)
        lay["b2"] = ((E, H), np.float32)
    return lay


def synth_weights(cfg, bits, block, seed, path):
    """Writes Gaussian weights (std 1/sqrt(fan_in)), quantized one expert at a time,
    into one file (64 KiB-aligned arrays: ONNX external data) and returns
    ({name: read-only memmap}, {name: (offset, nbytes)}). The float32 weights of
    the whole layer never exist at once, and the quantized ones live in the page
    cache, not in this process's anonymous memory."""
    lay = weight_layout(cfg, bits, block)
    offsets, pos = {}, 0
    for name, (shape, dt) in lay.items():
        nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
        offsets[name] = (pos, nbytes)
        pos = (pos + nbytes + 65535) // 65536 * 65536
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(pos,))
    views = {n: mm[o:o + b].view(lay[n][1]).reshape(lay[n][0]) for n, (o, b) in offsets.items()}
    rng = np.random.default_rng(seed)
    H, I, E = cfg["H"], cfg["I"], cfg["E"]
    total, done, t0, last = 2 * E, 0, time.perf_counter(), 0.0
    for wname, sname, n, k in (("w1", "s1", 2 * I, H), ("w2", "s2", H, I)):
        for e in range(E):
            w = rng.standard_normal((1, n, k), dtype=np.float32)
            w *= np.float32(1.0 / math.sqrt(k))
            q, s, zp = quantize(w, bits, block)
            assert zp is None, "symmetric quantization returns no zero points"
            del w
            views[wname][e] = np.asarray(q)[0]
            views[sname][e] = np.asarray(s, dtype=np.float32)[0]
            done += 1
            el = time.perf_counter() - t0
            if el - last >= 5:
                last = el
                log(f"  quantized {done}/{total} expert matrices, {el:.0f} s")
    if cfg["bias"]:
        views["b1"][...] = 0.1 * rng.standard_normal(lay["b1"][0])
        views["b2"][...] = 0.1 * rng.standard_normal(lay["b2"][0])
    mm.flush()
    del views, mm
    ro = np.memmap(path, dtype=np.uint8, mode="r")
    W = {n: ro[o:o + b].view(lay[n][1]).reshape(lay[n][0]) for n, (o, b) in offsets.items()}
    return W, offsets


def qmoe_kwargs(W, cfg, bits, block):
    """qmoe's keyword arguments (ONNX Runtime's names) for the weights W."""
    kw = {ort_name: W.get(short) for short, ort_name in WEIGHT_INPUTS}
    kw.update(k=cfg["k"], activation_type="swiglu", normalize_routing_weights=1, expert_weight_bits=bits,
              block_size=block, swiglu_fusion=1, swiglu_limit=float(cfg["limit"]),
              activation_alpha=float(cfg["alpha"]), activation_beta=float(cfg["beta"]))
    return kw


# --------------------------------------------------------------------------- ONNX Runtime

def ort_model_file(W, offsets, cfg, bits, block, weight_path):
    """Writes the one-node QMoE model next to the weight file (external data) and returns its path."""
    import onnx
    from onnx import TensorProto, helper

    H, E = cfg["H"], cfg["E"]
    inits, inputs = [], ["input", "router_probs"]
    for short, name in WEIGHT_INPUTS:
        if short not in W:
            inputs.append("")
            continue
        a = W[short]
        t = TensorProto(name=name, data_type=TensorProto.UINT8 if a.dtype == np.uint8 else TensorProto.FLOAT,
                        dims=list(a.shape), data_location=TensorProto.EXTERNAL)
        off, nbytes = offsets[short]
        for key, value in (("location", os.path.basename(weight_path)), ("offset", str(off)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)
        inputs.append(name)
    attrs = dict(k=cfg["k"], activation_type="swiglu", normalize_routing_weights=1, use_sparse_mixer=0,
                 expert_weight_bits=bits, swiglu_fusion=1, activation_alpha=float(cfg["alpha"]),
                 activation_beta=float(cfg["beta"]), weights_prepacked=0)
    if block:
        attrs["block_size"] = block
    if math.isfinite(cfg["limit"]):
        attrs["swiglu_limit"] = float(cfg["limit"])
    node = helper.make_node("QMoE", inputs, ["output"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "qmoe_bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["T", H]),
         helper.make_tensor_value_info("router_probs", TensorProto.FLOAT, ["T", E])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["T", H])],
        initializer=inits)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    path = os.path.join(os.path.dirname(weight_path), "qmoe_bench.onnx")
    onnx.save_model(model, path)
    return path


def ort_session(model_path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- inputs

def route_mask(logits, k):
    """[E] bool: the experts in the top-k of some token (ties: lower index first)."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    used = np.zeros(logits.shape[1], bool)
    used[order.ravel()] = True
    return used


def draw_set(rng, T, H, E, k):
    x = rng.standard_normal((T, H), dtype=np.float32)
    lg = (1.5 * rng.standard_normal((T, E))).astype(np.float32)
    x[x == 0], lg[lg == 0] = 1e-3, 1e-3  # never exact zeros
    return dict(x=x, logits=lg, used=route_mask(lg, k))


def rotating_sets(rng, T, cfg, bytes_per_expert, target):
    """The input sets of one T (see the module docstring: why rotate). Sets are
    drawn until the experts they touch together exceed `target` bytes, or cover
    every expert, or number MAX_SETS; each is the best of up to 32 draws at
    sharing no expert with the set before it (the last one also with the first,
    since the cycle wraps)."""
    H, E, k = cfg["H"], cfg["E"], cfg["k"]
    max_sets = max(1, min(MAX_SETS, MAX_SET_BYTES // (4 * T * (H + E))))

    def draw(avoid):
        best, best_ov = None, None
        for _ in range(32):
            c = draw_set(rng, T, H, E, k)
            ov = sum(int((c["used"] & a["used"]).sum()) for a in avoid)
            if best is None or ov < best_ov:
                best, best_ov = c, ov
            if not avoid or best_ov == 0 or c["used"].all():
                break
        return best

    sets, union = [], np.zeros(E, bool)
    while True:
        s = draw(sets[-1:])
        sets.append(s)
        union |= s["used"]
        if union.sum() * bytes_per_expert >= target or union.all() or len(sets) >= max_sets:
            break
    if len(sets) > 2:
        def ov(c):
            return int((c["used"] & sets[-2]["used"]).sum() + (c["used"] & sets[0]["used"]).sum())
        last = draw([sets[-2], sets[0]])
        if ov(last) < ov(sets[-1]):
            sets[-1] = last
    return sets
