"""Experts in host memory beside the GPU (expert_placement / gpu_memory_budget
on a CUDA layer): against the float64 oracle qmoe.reference and against the
all-GPU layer, for every placement from all-GPU to all-CPU.

The placement logic (which experts go to the host) is checked everywhere; the
layer runs where qmoe has its CUDA backend and torch sees a GPU.

* all on the GPU (placement given explicitly) = the plain CUDA layer's bits;
* mixed and all-CPU placements: relative L2 against float64 within the CUDA
  tolerance (the host experts compute in float32, the combine on the GPU), and
  the same bits run to run, eager, on several streams and in a CUDA graph;
* more tokens than one pass (host passes hold 1024 tokens);
* host experts computing with int8 activations (accuracy_level 4);
* bad placements: clear errors.
"""

import numpy as np
import pytest

import qmoe
from qmoe._placement import host_experts
from cuda_graphs import capture
from qmoe_np import GPT_OSS_SWIGLU, make_layer

E, H, I = 8, 128, 64


def _quantizer(w, bits, block, symmetric):
    q = qmoe.quantize(w, bits=bits, block_size=block, symmetric=symmetric)
    return q.weights, q.scales, q.zero_points


def _layer_args(seed, act="swiglu", bits=4, block=32, k=4):
    rng = np.random.default_rng(seed)
    extra = GPT_OSS_SWIGLU if act == "swiglu" else {}
    weights, attrs, _ = make_layer(rng, E=E, H=H, I=I, bits=bits, block=block, zero_points=True, bias=True,
                                   activation_type=act, swiglu_fusion=1 if act == "swiglu" else 0,
                                   quantizer=_quantizer, **extra)
    attrs.update(k=k, normalize_routing_weights=1)
    return rng, weights, attrs


# --------------------------------------------------------------------------
# Placement (no GPU needed)
# --------------------------------------------------------------------------

def test_placement_from_budget_and_frequency():
    f = host_experts
    assert f("cuda", 4, 100.0, None, None, None) == []
    assert f("cuda", 4, 100.0, ["cuda", "cpu", "cuda", "cpu"], None, None) == [1, 3]
    assert f("cuda", 4, 100.0, None, 250, None) == [2, 3]          # two fit, lower ids first
    assert f("cuda", 4, 100.0, None, 250, [1, 5, 0, 3]) == [0, 2]  # the two most frequent on the GPU
    assert f("cuda", 4, 100.0, None, 0, None) == [0, 1, 2, 3]
    assert f("cuda", 4, 100.0, None, 10_000, None) == []


@pytest.mark.parametrize("kw, msg", [
    (dict(expert_placement=["cuda"] * 3), "expected 4 entries"),
    (dict(expert_placement="cpu"), "a sequence"),
    (dict(expert_placement=["cuda", "tpu", "cpu", "cpu"]), "expert_placement[1]"),
    (dict(expert_placement=["cuda"] * 4, gpu_memory_budget=1), "not both"),
    (dict(gpu_memory_budget=-1), "gpu_memory_budget"),
    (dict(gpu_memory_budget=1, expert_frequency=[1, 2]), "expert_frequency"),
    (dict(expert_frequency=[1, 2, 3, 4]), "only with gpu_memory_budget"),
])
def test_bad_placements(kw, msg):
    args = {"expert_placement": None, "gpu_memory_budget": None, "expert_frequency": None}
    args.update(kw)
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        host_experts("cuda", 4, 100.0, args["expert_placement"], args["gpu_memory_budget"],
                           args["expert_frequency"])


def test_cpu_layer_refuses_a_placement():
    _, weights, attrs = _layer_args(0)
    with pytest.raises(ValueError, match="only for a CUDA layer"):
        qmoe.Layer(**weights, **attrs, expert_placement=["cpu"] * E)


# --------------------------------------------------------------------------
# The layer on the GPU
# --------------------------------------------------------------------------

def _gpu():
    if not qmoe.cuda_available():
        pytest.skip("qmoe was built without its CUDA backend, or no CUDA device is visible")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


def _captured(torch, layer, x, lg):
    """(graph, its output) of layer(x, lg) captured in a CUDA graph (warmed up on a side
    stream first, as torch asks), replayed once and synchronized."""
    graph, out = capture(torch, layer, x, lg)
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


PLACEMENTS = {
    "none": [],
    "one": [5],
    "half": [0, 2, 4, 6],
    "most": [0, 1, 2, 3, 4, 5, 7],
    "all": list(range(E)),
}


def _placement(host):
    return ["cpu" if e in host else "cuda" for e in range(E)]


def _f32(t):
    return t.detach().float().cpu().numpy()


def _rel_l2(y, ref):
    y = _f32(y).astype(np.float64)
    assert np.isfinite(y).all(), "non-finite output"
    return float(np.linalg.norm(y - ref)) / float(np.linalg.norm(ref))


def _same_bits(torch, a, b):
    assert torch.equal(a.view(torch.int16), b.view(torch.int16)), "results differ in their bits"


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("name", list(PLACEMENTS))
@pytest.mark.parametrize("T", [1, 5, 64, 300])
def test_placements_against_float64(name, dtype, T):
    torch = _gpu()
    rng, weights, attrs = _layer_args(1)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float16
    host = PLACEMENTS[name]
    layer = qmoe.Layer(**weights, **attrs, device="cuda", threads=4, expert_placement=_placement(host),
                       host_experts_gpu_from=0)  # the CPU at every T
    assert layer.host_experts == host
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32)).to(dt)
    lg = torch.from_numpy(rng.standard_normal((T, E)).astype(np.float32)).to(dt)
    xd, lgd = x.cuda(), lg.cuda()
    y = layer(xd, lgd)
    ref = qmoe.reference(_f32(x), _f32(lg), **weights, **attrs)
    assert _rel_l2(y, ref) <= (1e-2 if dtype == "bf16" else 2e-3)
    _same_bits(torch, y, layer(xd, lgd))  # run to run
    if not host:  # all on the GPU: the plain CUDA layer's bits
        plain = qmoe.Layer(**weights, **attrs, device="cuda")
        _same_bits(torch, y, plain(xd, lgd))
    if dtype == "f16":  # the host path (NumPy float16 in and out): the same bits
        yh = layer(x.numpy(), lg.numpy())
        assert np.array_equal(yh.view(np.uint16), y.cpu().numpy().view(np.uint16))


@pytest.mark.parametrize("name", ["half", "all"])
def test_graph_streams_and_passes(name):
    torch = _gpu()
    rng, weights, attrs = _layer_args(2)
    host = PLACEMENTS[name]
    layer = qmoe.Layer(**weights, **attrs, device="cuda", threads=4, expert_placement=_placement(host),
                       host_experts_gpu_from=0)
    T = 1100  # more than one host pass (1024 tokens)
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32)).to(torch.bfloat16).cuda()
    lg = torch.from_numpy(rng.standard_normal((T, E)).astype(np.float32)).to(torch.bfloat16).cuda()
    eager = layer(x, lg)
    torch.cuda.synchronize()
    ref = qmoe.reference(_f32(x), _f32(lg), **weights, **attrs)
    assert _rel_l2(eager, ref) <= 1e-2
    # Two streams, each its own calls, interleaved.
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    outs = []
    for s in (s1, s2, s1, s2):
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            outs.append(layer(x, lg))
    torch.cuda.synchronize()
    for o in outs:
        _same_bits(torch, o, eager)
    # A CUDA graph: capture, replay, new inputs.
    xs, lgs = x[:40].clone(), lg[:40].clone()
    graph, static_out = _captured(torch, layer, xs, lgs)
    _same_bits(torch, static_out, layer(x[:40], lg[:40]))  # a 40-token call (batch composition sets the regimes)
    xs.copy_(x[40:80])
    lgs.copy_(lg[40:80])
    graph.replay()
    torch.cuda.synchronize()
    _same_bits(torch, static_out, layer(x[40:80].clone(), lg[40:80].clone()))


@pytest.mark.parametrize("name", ["one", "half", "all"])
def test_host_polling_gives_the_same_bits(name, monkeypatch):
    """QMOE_CUDA_HOST_POLLING=1 (LayerOptions::cuda_host_polling): eager calls hand the rows
    over by polling instead of CUDA host functions; the bits of the default layer, for
    calls queued back to back (one and two host passes) and for a captured graph."""
    torch = _gpu()
    rng, weights, attrs = _layer_args(4)
    host = PLACEMENTS[name]
    T = 1100
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32)).to(torch.bfloat16).cuda()
    lg = torch.from_numpy(rng.standard_normal((T, E)).astype(np.float32)).to(torch.bfloat16).cuda()

    def layer_with(polling: str):
        monkeypatch.setenv("QMOE_CUDA_HOST_POLLING", polling)
        return qmoe.Layer(**weights, **attrs, device="cuda", threads=4, expert_placement=_placement(host),
                          host_experts_gpu_from=0)

    def calls(layer):
        return [layer(x[:t], lg[:t]) for t in (1, 5, T, 1, 64)]  # no synchronization between them

    want = calls(layer_with("0"))
    polled = layer_with("1")
    got = calls(polled)
    torch.cuda.synchronize()
    for a, b in zip(want, got):
        _same_bits(torch, a, b)
    xs, lgs = x[:5].clone(), lg[:5].clone()
    graph, static_out = _captured(torch, polled, xs, lgs)
    _same_bits(torch, static_out, want[1])


def test_int8_host_experts_and_budget():
    torch = _gpu()
    rng, weights, attrs = _layer_args(3, act="silu", bits=8, block=0, k=2)
    per_expert = sum(np.asarray(v).nbytes for v in weights.values() if v is not None) / E
    layer = qmoe.Layer(**weights, **attrs, device="cuda", threads=4, accuracy_level=4,
                       gpu_memory_budget=3 * per_expert, expert_frequency=np.arange(E)[::-1])
    assert layer.host_experts == [3, 4, 5, 6, 7]
    assert "experts on cpu/" in layer.kernel_name
    T = 48
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32)).to(torch.float16)
    lg = torch.from_numpy(rng.standard_normal((T, E)).astype(np.float32)).to(torch.float16)
    y = layer(x.cuda(), lg.cuda())
    ref = qmoe.reference(_f32(x), _f32(lg), **weights, **attrs)
    assert _rel_l2(y, ref) <= 3e-2
    # The packed bytes are split between the sides: the GPU holds only 3 experts.
    full = qmoe.Layer(**weights, **attrs, device="cuda")
    assert layer.device_bytes < full.device_bytes


@pytest.mark.parametrize("name", ["one", "half", "all"])
@pytest.mark.parametrize("T", [1, 64, 300])
def test_host_experts_on_the_gpu_give_the_all_gpu_bits(name, T):
    """host_experts_gpu_from: from that many tokens the host experts' weights are copied
    to the GPU and run by the same kernels on the same rows as in the all-GPU layer, so
    the result is the all-GPU layer's, bit for bit; below it, the CPU computes them."""
    torch = _gpu()
    rng, weights, attrs = _layer_args(4)
    dt = torch.bfloat16
    host = PLACEMENTS[name]
    plain = qmoe.Layer(**weights, **attrs, device="cuda")
    layer = qmoe.Layer(**weights, **attrs, device="cuda", threads=4, expert_placement=_placement(host),
                       host_experts_gpu_from=64)
    assert "on the GPU from 64 tokens" in layer.kernel_name
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32)).to(dt).cuda()
    lg = torch.from_numpy(rng.standard_normal((T, E)).astype(np.float32)).to(dt).cuda()
    y = layer(x, lg)
    ref = qmoe.reference(_f32(x), _f32(lg), **weights, **attrs)
    assert _rel_l2(y, ref) <= 1e-2
    _same_bits(torch, y, layer(x, lg))
    if T >= 64:
        _same_bits(torch, y, plain(x, lg))
        _, static_out = _captured(torch, layer, x, lg)  # a CUDA graph of the copy and the staged GEMMs
        _same_bits(torch, static_out, y)


def test_measured_crossover_picks_the_path():
    """host_experts_gpu_from="auto" (the default): the token count from which the GPU
    computes the host experts is measured when the layer is made (once per process for a
    configuration); below it the result is the CPU path's bits, from it the all-GPU bits."""
    torch = _gpu()
    rng, weights, attrs = _layer_args(5)
    host = PLACEMENTS["half"]
    auto = qmoe.Layer(**weights, **attrs, device="cuda", threads=4, expert_placement=_placement(host))
    n = auto.host_experts_gpu_from
    assert 0 <= n <= 1024
    again = qmoe.Layer(**weights, **attrs, device="cuda", threads=4, expert_placement=_placement(host))
    assert again.host_experts_gpu_from == n  # measured once
    assert ("on the GPU from %d tokens" % n in auto.kernel_name) == (n > 0)
    cpu = qmoe.Layer(**weights, **attrs, device="cuda", threads=4, expert_placement=_placement(host),
                     host_experts_gpu_from=0)
    assert cpu.host_experts_gpu_from == 0 and "on the GPU from" not in cpu.kernel_name
    plain = qmoe.Layer(**weights, **attrs, device="cuda", max_tokens=1024)
    for T in sorted({1, max(n - 1, 1), max(n, 1), 700}):
        x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32)).to(torch.bfloat16).cuda()
        lg = torch.from_numpy(rng.standard_normal((T, E)).astype(np.float32)).to(torch.bfloat16).cuda()
        _same_bits(torch, auto(x, lg), plain(x, lg) if 0 < n <= T else cpu(x, lg))


def test_gpu_from_argument():
    """host_experts_gpu_from: "auto" (measured), or tokens >= 0; anything else refused by
    name. A CPU layer takes the default and 0, and reports 0 (never)."""
    from qmoe._placement import gpu_from
    assert gpu_from("auto") == -1 and gpu_from(0) == 0 and gpu_from(64) == 64 and gpu_from(np.int64(8)) == 8
    for bad, exc in [("never", ValueError), (-1, ValueError), (2 ** 31, ValueError), (1.5, TypeError),
                     (None, TypeError)]:
        with pytest.raises(exc, match="^host_experts_gpu_from: expected"):
            gpu_from(bad)
    _, weights, attrs = _layer_args(0)
    assert qmoe.Layer(**weights, **attrs).host_experts_gpu_from == 0
    assert qmoe.Layer(**weights, **attrs, host_experts_gpu_from=0).host_experts_gpu_from == 0


def test_host_experts_gpu_from_needs_a_cuda_layer():
    _, weights, attrs = _layer_args(0)
    with pytest.raises(ValueError, match="host_experts_gpu_from: only for a CUDA layer with host_experts"):
        qmoe.Layer(**weights, **attrs, host_experts_gpu_from=5)


def test_host_experts_gpu_from_is_checked():
    _, weights, attrs = _layer_args(0)
    _gpu()
    with pytest.raises(ValueError, match="host_experts_gpu_from: only with host_experts"):
        qmoe.Layer(**weights, **attrs, device="cuda", host_experts_gpu_from=5)
    with pytest.raises(ValueError, match="host_experts_gpu_from: expected tokens >= 0"):
        qmoe.Layer(**weights, **attrs, device="cuda", expert_placement=_placement([1]), host_experts_gpu_from=-1)
    with pytest.raises(ValueError, match="host_experts_gpu_from: expected tokens >= 0 .* or 'auto', got 'never'"):
        qmoe.Layer(**weights, **attrs, device="cuda", expert_placement=_placement([1]), host_experts_gpu_from="never")
