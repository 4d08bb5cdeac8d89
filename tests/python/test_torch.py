"""qmoe.torch: the qmoe::moe custom operator and the QmoeMoE / QmoeExperts modules.

CPU (always, where torch is installed):

* QmoeMoE gives the bits of the Layer's own call (float32, bfloat16, [B, S, H]
  input, router_weights);
* QmoeExperts against an independent float64 oracle: each expert's output
  from the dequantized weights (qmoe_np's expert math), mixed by
  top_k_weights -- for swiglu (fusion 2, silu-style), silu and relu; plus the
  expert-parallel sentinel id and zero tokens, and bfloat16 against the
  Layer called with router_probs / router_weights built in NumPy;
* QmoeExperts in a transformers Mixtral MoE block in place of its experts;
* torch.compile(fullgraph=True): one graph, the operator once, the eager bits
  (aot_eager; inductor too), one recompilation per module (the layer id is
  guarded);
* no gradient: the forward runs with tensors that require grad, the backward
  raises (eager and compiled);
* argument errors; the registry entry going away with its module; copies.

CUDA (where qmoe has its CUDA backend and torch sees a GPU): both modules give
the Layer's bits on bfloat16 CUDA tensors, CUDA-graph capture and replay with
new inputs give the eager bits, and torch.compile with mode="reduce-overhead"
and "max-autotune-no-cudagraphs" gives the eager bits.
"""

from __future__ import annotations

import copy
import gc
from typing import Any, Dict, Tuple

import numpy as np
import pytest

import qmoe
from cuda_graphs import capture
from qmoe_np import make_layer, np_moe, record, rel_max_err

pytest.importorskip("torch")
import torch  # noqa: E402
import torch._dynamo.testing  # noqa: E402,F401

qt = pytest.importorskip("qmoe.torch")

E, H, I = 8, 64, 32
SWIGLU_SILU = dict(activation_type="swiglu", swiglu_fusion=2, activation_alpha=1.0, activation_beta=0.0)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def _quantizer(w, bits, block, symmetric):
    q = qmoe.quantize(w, bits=bits, block_size=block, symmetric=symmetric)
    return q.weights, q.scales, q.zero_points


def _layer(seed: int = 0, *, k: int = 2, normalize: int = 0, device: str = "cpu", bias: bool = True,
           act: Dict[str, Any] = SWIGLU_SILU, E: int = E, H: int = H, I: int = I) -> Tuple[qmoe.Layer, Dict, Dict]:
    """(layer, attributes, dequantized float64 matrices) of a random 4-bit layer, block 32, zero points."""
    rng = np.random.default_rng(seed)
    act = dict(act)
    kind = act.pop("activation_type")
    fusion = act.pop("swiglu_fusion", 0)
    weights, attrs, deq = make_layer(rng, E=E, H=H, I=I, bits=4, block=32, zero_points=True, bias=bias,
                                     activation_type=kind, swiglu_fusion=fusion, quantizer=_quantizer, **act)
    attrs.update(k=k, normalize_routing_weights=normalize)
    extra = dict(threads=2) if device == "cpu" else dict(device=device)
    return qmoe.Layer(**weights, **attrs, **extra), attrs, deq


def _same_bits(a: "torch.Tensor", b: "torch.Tensor") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    bits = torch.int32 if a.element_size() == 4 else torch.int16
    assert torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def _routing(gen: "torch.Generator", T: int, k: int, E: int = E) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """A router's output: top_k_index [T, k] int64 (distinct per row) and positive top_k_weights [T, k] float32."""
    logits = torch.randn(T, E, generator=gen)
    idx = torch.topk(logits, k, dim=1).indices
    w = torch.rand(T, k, generator=gen) + 0.1
    return idx, w


def _expert_outputs(deq: Dict, attrs: Dict, e: int, xs: np.ndarray) -> np.ndarray:
    """Expert e applied to the rows xs, in float64: qmoe_np.np_moe's expert math on a one-expert layer (k=1,
    weight 1), so the activation and its attributes are exactly the oracle's."""
    one = lambda name: None if deq.get(name) is None else deq[name][e:e + 1]  # noqa: E731
    keep = ("activation_type", "swiglu_fusion", "activation_alpha", "activation_beta", "swiglu_limit")
    T = xs.shape[0]
    return np_moe(xs, np.zeros((T, 1)), one("fc1"), one("fc1_bias"), one("fc2"), one("fc2_bias"), one("fc3"),
                  one("fc3_bias"), np.ones((T, 1)), k=1, **{a: v for a, v in attrs.items() if a in keep})


def _mixture_oracle(deq: Dict, attrs: Dict, x: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float64 sum_j w[t, j] * expert_{idx[t, j]}(x[t]); ids outside 0..E-1 contribute nothing."""
    xs = x.astype(np.float64)
    out = np.zeros_like(xs)
    n_exp = deq["fc1"].shape[0]
    for e in range(n_exp):
        tok, slot = np.nonzero(idx == e)
        if tok.size:
            out[tok] += w[tok, slot].astype(np.float64)[:, None] * _expert_outputs(deq, attrs, e, xs[tok])
    return out


# --------------------------------------------------------------------------
# QmoeMoE on the CPU
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_moe_module_gives_the_layers_bits(dtype):
    layer, _, _ = _layer(1, normalize=1)
    mod = qt.QmoeMoE(layer)
    assert mod.layer is layer
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, H, generator=gen).to(dtype)
    lg = torch.randn(10, E, generator=gen).to(dtype)
    rw = torch.rand(10, E, generator=gen).to(dtype)
    y = mod(x, lg)
    assert y.shape == (2, 5, H)
    _same_bits(y, layer(x, lg))
    _same_bits(mod(x, lg, rw), layer(x, lg, rw))
    # router tensors shaped like the input's leading dimensions
    _same_bits(mod(x, lg.reshape(2, 5, E), rw.reshape(2, 5, E)), layer(x, lg, rw))
    # [T, H] and a single token [H]
    _same_bits(mod(x.reshape(10, H), lg), layer(x.reshape(10, H), lg))
    _same_bits(mod(x[0, 0], lg[0]), layer(x[0, :1], lg[:1]).reshape(H))
    # non-contiguous input and zero tokens
    xt = x.reshape(10, H).t().contiguous().t()
    _same_bits(mod(xt, lg), layer(x.reshape(10, H), lg))
    assert mod(x[:, :0], lg[:0]).shape == (2, 0, H)


def test_repr_names_the_layer():
    layer, _, _ = _layer(2)
    r = repr(qt.QmoeMoE(layer))
    for part in (f"experts={E}", f"hidden={H}", f"inter={I}", "bits=4", "block=32", "backend='cpu'"):
        assert part in r
    assert "k=2" in repr(qt.QmoeExperts(layer))


def test_inference_mode_and_no_grad():
    layer, _, _ = _layer(3)
    mod = qt.QmoeMoE(layer)
    x, lg = torch.randn(4, H), torch.randn(4, E)
    want = layer(x, lg)
    with torch.inference_mode():
        _same_bits(mod(x, lg), want)
    with torch.no_grad():
        y = mod(x, lg)
        assert not y.requires_grad
        _same_bits(y, want)


# --------------------------------------------------------------------------
# QmoeExperts on the CPU
# --------------------------------------------------------------------------

ACTIVATIONS = {
    "swiglu_fusion2_silu": SWIGLU_SILU,
    "silu": dict(activation_type="silu"),
    "relu": dict(activation_type="relu"),
}


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_experts_vs_float64_oracle(act, k):
    layer, attrs, deq = _layer(10 + k, k=k, act=ACTIVATIONS[act])
    mod = qt.QmoeExperts(layer, top_k=k)
    gen = torch.Generator().manual_seed(k)
    for T in (1, 7, 64):
        x = torch.randn(T, H, generator=gen)
        idx, w = _routing(gen, T, k)
        y = mod(x, idx, w)
        assert y.shape == (T, H) and y.dtype == torch.float32
        err = rel_max_err(y.numpy(), _mixture_oracle(deq, attrs, x.numpy(), idx.numpy(), w.numpy()))
        record(f"torch QmoeExperts f32 {act} vs float64", err)
        assert err <= 1e-5, (act, k, T, err)


def test_experts_sentinel_id_and_zero_tokens():
    """An id equal to E (transformers' expert-parallel "no expert") drops that slot; T = 0 works."""
    layer, attrs, deq = _layer(20, k=4)
    mod = qt.QmoeExperts(layer)
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(9, H, generator=gen)
    idx, w = _routing(gen, 9, 4)
    idx[0, 1] = E
    idx[3, :] = E  # a token with no expert at all gives zeros
    idx[5, 0], idx[5, 3] = E, E
    y = mod(x, idx, w)
    want = _mixture_oracle(deq, attrs, x.numpy(), idx.numpy(), w.numpy())
    assert rel_max_err(y.numpy(), want) <= 1e-5
    assert torch.count_nonzero(y[3]) == 0
    empty = mod(x[:0], idx[:0], w[:0])
    assert empty.shape == (0, H)


def test_experts_bfloat16_is_the_layer_with_scattered_routing():
    """bfloat16 (and int32 ids, float32 weights cast to bfloat16): the bits of the Layer called with
    router_probs / router_weights built by a NumPy loop."""
    layer, _, _ = _layer(21, k=2)
    mod = qt.QmoeExperts(layer, top_k=2)
    gen = torch.Generator().manual_seed(21)
    T = 33
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    idx, w = _routing(gen, T, 2)
    probs = np.zeros((T, E), np.float32)
    rw = np.zeros((T, E), np.float32)
    for t in range(T):
        for j in range(2):
            e = int(idx[t, j])
            probs[t, e] = 1.0
            rw[t, e] = float(w[t, j].to(torch.bfloat16))
    want = layer(x, torch.from_numpy(probs).to(torch.bfloat16), torch.from_numpy(rw).to(torch.bfloat16))
    _same_bits(mod(x, idx, w), want)
    _same_bits(mod(x, idx.to(torch.int32), w.to(torch.bfloat16)), want)


def test_experts_in_a_transformers_mixtral_block():
    """QmoeExperts in place of a Mixtral block's experts (swiglu: silu(gate) * up, gate first) equals the
    block with the layer's dequantized weights in float32."""
    modeling = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    from transformers import MixtralConfig
    layer, _, deq = _layer(22, k=2, bias=False)
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2,
                        hidden_act="silu")
    block = modeling.MixtralSparseMoeBlock(cfg).eval()
    torch.manual_seed(22)
    torch.nn.init.normal_(block.gate.weight, std=0.2)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(torch.from_numpy(deq["fc1"]).float())
        block.experts.down_proj.copy_(torch.from_numpy(deq["fc2"]).float())
        x = torch.randn(2, 6, H)
        want = block(x)
        block.experts = qt.QmoeExperts(layer, top_k=cfg.num_experts_per_tok)
        got = block(x)
    assert got.shape == want.shape
    err = rel_max_err(got.numpy(), want.numpy())
    record("torch QmoeExperts in Mixtral block vs float32 experts", err)
    assert err <= 1e-5


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------

def _op_count(gm: "torch.fx.GraphModule") -> int:
    return sum(1 for n in gm.graph.nodes if n.target is torch.ops.qmoe.moe.default)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_compile_is_one_graph_with_one_op(dtype):
    layer, _, _ = _layer(30, normalize=1)
    mod = qt.QmoeMoE(layer)
    x = torch.randn(2, 3, H).to(dtype)
    lg, rw = torch.randn(6, E).to(dtype), torch.rand(6, E).to(dtype)

    def fn(x, lg, rw):
        return mod(x, lg, rw)

    explained = torch._dynamo.explain(fn)(x, lg, rw)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    with torch.no_grad():
        _same_bits(compiled(x, lg, rw), mod(x, lg, rw))
        for T in (5, 0, 17):  # other token counts
            xt, lt, rt = torch.randn(T, H).to(dtype), torch.randn(T, E).to(dtype), torch.rand(T, E).to(dtype)
            _same_bits(compiled(xt, lt, rt), layer(xt, lt, rt))
    assert all(_op_count(g) == 1 for g in counter.graphs)
    # static T=6, then one graph for a dynamic T, and T=0 (dynamo specializes sizes 0 and 1)
    assert counter.frame_count <= 3


def test_compile_experts_one_op_and_a_recompilation_per_module():
    """Two modules through one compiled function: the layer id is guarded, each module gets its own bits."""
    m1 = qt.QmoeExperts(_layer(31)[0])
    m2 = qt.QmoeExperts(_layer(32)[0])
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda m, x, i, w: m(x, i, w), fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(8, H, generator=gen)
    idx, w = _routing(gen, 8, 2)
    with torch.no_grad():
        _same_bits(compiled(m1, x, idx, w), m1(x, idx, w))
        _same_bits(compiled(m2, x, idx, w), m2(x, idx, w))
        _same_bits(compiled(m1, x, idx, w), m1(x, idx, w))
    assert counter.frame_count == 2
    assert [_op_count(g) for g in counter.graphs] == [1, 1]


def test_compile_inductor():
    """Inductor around the operator (an extern kernel) and the scatter that builds the routing."""
    moe = qt.QmoeMoE(_layer(33)[0])
    experts = qt.QmoeExperts(moe.layer)
    gen = torch.Generator().manual_seed(33)
    x, lg = torch.randn(6, H, generator=gen), torch.randn(6, E, generator=gen)
    idx, w = _routing(gen, 6, 2)

    def fn(x, lg, idx, w):
        return moe(x, lg) * 2.0 + experts(x, idx, w)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    with torch.no_grad():
        _same_bits(compiled(x, lg, idx, w), moe(x, lg) * 2.0 + experts(x, idx, w))


# --------------------------------------------------------------------------
# No gradient
# --------------------------------------------------------------------------

@pytest.mark.parametrize("grad_through", ["input", "router_only"])
def test_backward_raises_eager_and_compiled(grad_through):
    """The forward runs with tensors that require grad; the backward raises, also when only the router's
    gradient is asked for (torch.compile keeps just that one)."""
    moe = qt.QmoeMoE(_layer(40)[0])
    experts = qt.QmoeExperts(moe.layer)
    lin = torch.nn.Linear(H, H)
    router = torch.nn.Linear(H, E)
    x = torch.randn(4, H)

    def fn(x):
        h = lin(x) if grad_through == "input" else x
        top = torch.topk(router(x).softmax(-1), 2)
        return moe(h, router(x)), experts(h, top.indices, top.values)

    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        for y in f(x):
            assert y.requires_grad
            with pytest.raises(RuntimeError, match="inference only"):
                y.sum().backward(retain_graph=True)
    with torch.no_grad():
        h = lin(x) if grad_through == "input" else x
        _same_bits(fn(x)[0], moe.layer(h, router(x)))


# --------------------------------------------------------------------------
# Errors, registry, copies
# --------------------------------------------------------------------------

def test_errors_name_the_argument():
    layer, _, _ = _layer(50)
    moe, experts = qt.QmoeMoE(layer), qt.QmoeExperts(layer)
    x, lg = torch.randn(3, H), torch.randn(3, E)
    idx, w = _routing(torch.Generator().manual_seed(50), 3, 2)
    meta = torch.empty(3, H, device="meta")
    with pytest.raises(ValueError, match=r"input: expected a tensor on cpu .*got one on meta"):
        moe(meta, lg)
    with pytest.raises(ValueError, match=r"router_probs: expected a tensor on cpu .*got one on meta"):
        moe(x, lg.to("meta"))
    with pytest.raises(TypeError, match=r"input: expected dtype float32, float16, bfloat16 .*got torch.float64"):
        moe(x.double(), lg.double())
    with pytest.raises(TypeError, match=r"router_probs: expected dtype torch.bfloat16 \(the same as input\), "
                                        r"got torch.float32"):
        moe(x.bfloat16(), lg)
    with pytest.raises(TypeError, match=r"router_weights: expected dtype torch.float32"):
        moe(x, lg, lg.half())
    with pytest.raises(ValueError, match=rf"input: expected shape \[..., {H}\]"):
        moe(torch.randn(3, H + 1), lg)
    with pytest.raises(ValueError, match=rf"router_probs: expected shape \[..., {E}\]"):
        moe(x, torch.randn(3, E - 1))
    with pytest.raises(ValueError, match=r"router_probs: .* with 3 rows like input"):
        moe(x, torch.randn(4, E))
    with pytest.raises(TypeError, match=r"router_probs: expected a torch.Tensor, got numpy.ndarray"):
        moe(x, lg.numpy())
    # QmoeExperts
    with pytest.raises(ValueError, match=r"top_k_index: expected shape \[..., 2\] \(the layer's k=2"):
        experts(x, torch.topk(lg, 3).indices, torch.rand(3, 3))
    with pytest.raises(TypeError, match=r"top_k_index: expected dtype int64 or int32, got torch.float32"):
        experts(x, idx.float(), w)
    with pytest.raises(TypeError, match=r"top_k_weights: expected a floating-point dtype"):
        experts(x, idx, idx)
    with pytest.raises(ValueError, match=r"top_k_weights: expected the shape of top_k_index"):
        experts(x, idx, w[:, :1])
    with pytest.raises(ValueError, match=r"top_k_index: expected a tensor on cpu"):
        experts(x, idx.to("meta"), w)
    with pytest.raises(ValueError, match=r"hidden_states: expected a tensor on cpu"):
        experts(meta, idx, w)


def test_constructor_errors():
    layer, _, _ = _layer(51, k=2)
    with pytest.raises(ValueError, match=r"top_k: the model routes each token to 3 experts, but the layer was "
                                         r"built with k=2"):
        qt.QmoeExperts(layer, top_k=3)
    with pytest.raises(ValueError, match=r"normalize_routing_weights=0"):
        qt.QmoeExperts(_layer(52, normalize=1)[0])
    with pytest.raises(TypeError, match=r"layer: expected a qmoe.Layer"):
        qt.QmoeMoE(object())
    assert qt.QmoeExperts(layer, top_k=2).top_k == 2


def test_registry_entry_follows_the_module():
    layer, _, _ = _layer(53)
    mod = qt.QmoeMoE(layer)
    lid = mod.layer_id
    assert qt.registered_layer(lid) is layer
    x, lg = torch.randn(2, H), torch.randn(2, E)
    _same_bits(torch.ops.qmoe.moe(x, lg, None, lid), layer(x, lg))
    other = qt.QmoeMoE(layer)
    assert other.layer_id != lid
    del mod
    gc.collect()
    with pytest.raises(ValueError, match=rf"no qmoe layer is registered under {lid}"):
        qt.registered_layer(lid)
    with pytest.raises(ValueError, match=rf"no qmoe layer is registered under {lid}"):
        torch.ops.qmoe.moe(x, lg, None, lid)
    _same_bits(other(x, lg), layer(x, lg))


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy])
def test_copies_have_their_own_entry(how):
    layer, _, _ = _layer(54)
    mod = qt.QmoeExperts(layer, top_k=2)
    dup = how(mod)
    assert dup.layer is layer and dup.layer_id != mod.layer_id and dup.top_k == 2
    del mod
    gc.collect()
    x = torch.randn(3, H)
    idx, w = _routing(torch.Generator().manual_seed(54), 3, 2)
    _same_bits(dup(x, idx, w), qt.QmoeExperts(layer)(x, idx, w))


# --------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------

def _cuda_or_skip() -> "torch.device":
    if not qmoe.cuda_available():
        pytest.skip("qmoe was built without its CUDA backend, or no CUDA device is visible")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch.device("cuda:0")


def _cuda_case(seed: int, T: int = 24):
    dev = _cuda_or_skip()
    layer, _, _ = _layer(seed, k=2, device="cuda")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
    lg = torch.randn(T, E, generator=gen).to(torch.bfloat16).to(dev)
    idx, w = (t.to(dev) for t in _routing(gen, T, 2))
    return dev, layer, x, lg, idx, w


def test_cuda_modules_give_the_layers_bits():
    dev, layer, x, lg, idx, w = _cuda_case(60)
    moe, experts = qt.QmoeMoE(layer), qt.QmoeExperts(layer, top_k=2)
    rw = torch.rand(x.shape[0], E, device=dev).to(torch.bfloat16)
    _same_bits(moe(x, lg), layer(x, lg))
    _same_bits(moe(x, lg, rw), layer(x, lg, rw))
    _same_bits(moe(x.reshape(4, -1, H), lg), layer(x, lg).reshape(4, -1, H))
    probs = torch.zeros(x.shape[0], E, dtype=x.dtype, device=dev).scatter_(1, idx, 1.0)
    weights = torch.zeros(x.shape[0], E, dtype=x.dtype, device=dev).scatter_(1, idx, w.to(x.dtype))
    _same_bits(experts(x, idx, w), layer(x, probs, weights))
    # and the CPU layer on the same values agrees to bfloat16 accuracy
    cpu_layer = _layer(60, k=2)[0]
    got = qt.QmoeExperts(cpu_layer)(x.cpu(), idx.cpu(), w.cpu()).float()
    assert rel_max_err(experts(x, idx, w).float().cpu().numpy(), got.numpy()) <= 2e-2


def test_cuda_errors():
    dev, layer, x, lg, idx, w = _cuda_case(61)
    moe, experts = qt.QmoeMoE(layer), qt.QmoeExperts(layer)
    with pytest.raises(ValueError, match=r"input: expected a tensor on cuda:0 .*got one on cpu"):
        moe(x.cpu(), lg.cpu())
    with pytest.raises(ValueError, match=r"router_probs: expected a tensor on cuda:0 .*got one on cpu"):
        moe(x, lg.cpu())
    with pytest.raises(TypeError, match=r"input: expected dtype float16, bfloat16 \(qmoe's cuda backend\), "
                                        r"got torch.float32"):
        moe(x.float(), lg.float())
    with pytest.raises(ValueError, match=r"top_k_weights: expected a tensor on cuda:0"):
        experts(x, idx, w.cpu())
    cpu_mod = qt.QmoeMoE(_layer(61)[0])
    with pytest.raises(ValueError, match=r"input: expected a tensor on cpu .*got one on cuda:0"):
        cpu_mod(x, lg)


@pytest.mark.parametrize("which", ["moe", "experts"])
def test_cuda_graph_replay_with_new_inputs(which):
    dev, layer, x, lg, idx, w = _cuda_case(62)
    mod = qt.QmoeMoE(layer) if which == "moe" else qt.QmoeExperts(layer, top_k=2)
    args = (x, lg) if which == "moe" else (x, idx, w)
    static = [a.clone() for a in args]
    graph, static_out = capture(torch, mod, *static)  # (a warm-up outside the capture first)
    graph.replay()
    torch.cuda.synchronize()
    _same_bits(static_out, mod(*args))
    _, _, x2, lg2, idx2, w2 = _cuda_case(63)
    for s, new in zip(static, (x2, lg2) if which == "moe" else (x2, idx2, w2)):
        s.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    _same_bits(static_out, mod(*static))
    _same_bits(static_out, mod(x2, lg2) if which == "moe" else mod(x2, idx2, w2))


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_cuda_compile(mode):
    dev, layer, x, lg, idx, w = _cuda_case(64)
    moe, experts = qt.QmoeMoE(layer), qt.QmoeExperts(layer, top_k=2)

    def fn(x, lg, idx, w):
        return moe(x, lg), experts(x, idx, w)

    compiled = torch.compile(fn, fullgraph=True, mode=mode)
    with torch.no_grad():
        for seed in (64, 65, 66, 67):  # cudagraph trees record on a later call, then replay
            _, _, x, lg, idx, w = _cuda_case(seed)
            got = compiled(x, lg, idx, w)
            got = [g.clone() for g in got]
            want = fn(x, lg, idx, w)
            torch.cuda.synchronize()
            for g, e in zip(got, want):
                _same_bits(g, e)
