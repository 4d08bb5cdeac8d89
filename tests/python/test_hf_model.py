"""qmoe.hf.quantize_model on tiny random transformers models of every family.

Oracle: the same model whose expert weights were replaced by the dequantized
ones (dequantized here by qmoe_np.np_dequantize, written apart from qmoe's
packer and kernels), run by transformers' own code. The patched model must
give the oracle's logits within 1e-4 (relative to the largest logit, float32,
CPU) and the same 32 greedy tokens.
"""

from __future__ import annotations

import copy

import pytest

import qmoe

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import PinnedRouting, tiny_model  # noqa: E402
from qmoe_np import np_dequantize, record  # noqa: E402

import qmoe.hf  # noqa: E402
from qmoe.hf._model import iter_experts, quantize_experts  # noqa: E402

TOL = 1e-4
CASES = [("mixtral", 4, 32, True), ("qwen2_moe", 4, 16, False), ("qwen3_moe", 8, 0, True),
         ("qwen3_moe_nonorm", 4, 32, True), ("gpt_oss", 4, 32, True), ("olmoe", 8, 32, False),
         ("granitemoe", 4, 0, True), ("deepseek_v3", 4, 16, True), ("phimoe", 4, 32, True)]


def dequantized_model(model, bits: int, block: int, symmetric: bool):
    """A copy of ``model`` whose experts hold the dequantized weights qmoe computes with."""
    ref = copy.deepcopy(model)
    k = model.config.num_experts_per_tok
    for name, _, _, mod in iter_experts(ref):
        w, a, _ = quantize_experts(mod, k=k, bits=bits, block_size=block, symmetric=symmetric, where=name)
        deq = {}
        H = mod.gate_up_proj.shape[1] if mod.is_transposed else mod.gate_up_proj.shape[2]
        for fc, K in (("fc1", H), ("fc2", a_inter(mod))):
            deq[fc] = np_dequantize(w[f"{fc}_experts_weights"], w[f"{fc}_scales"], w.get(f"{fc}_zero_points"),
                                    bits, block, K)
        with torch.no_grad():
            if mod.is_transposed:  # x @ W layouts: [E, H, 2I] and [E, I, H]
                mod.gate_up_proj.copy_(torch.from_numpy(deq["fc1"].transpose(0, 2, 1).copy()))
                mod.down_proj.copy_(torch.from_numpy(deq["fc2"].transpose(0, 2, 1).copy()))
            else:
                mod.gate_up_proj.copy_(torch.from_numpy(deq["fc1"]))
                mod.down_proj.copy_(torch.from_numpy(deq["fc2"]))
    return ref


def a_inter(mod) -> int:
    return mod.down_proj.shape[1] if mod.is_transposed else mod.down_proj.shape[2]


@pytest.mark.parametrize("family,bits,block,symmetric", CASES, ids=[c[0] for c in CASES])
def test_quantize_model_matches_dequantized_transformers(family, bits, block, symmetric):
    model = tiny_model(family, seed=3)
    want_model = dequantized_model(model, bits, block, symmetric)
    got_model = qmoe.hf.quantize_model(copy.deepcopy(model), bits=bits, block_size=block, symmetric=symmetric,
                                       threads=2)
    names = [n for n, *_ in iter_experts(model)]
    assert names and sorted(got_model.qmoe_quantization_errors) == sorted(names)
    assert not list(iter_experts(got_model))  # every experts module replaced
    assert all(0 < e["fc1"] < 0.2 and 0 < e["fc2"] < 0.2 for e in got_model.qmoe_quantization_errors.values())
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = want_model(ids).logits
        got = got_model(ids).logits
        float_logits = model(ids).logits
    err = float((got - want).abs().max() / want.abs().max())
    record(f"hf quantize_model vs dequantized transformers ({family})", err)
    assert err <= TOL, err
    # the quantization is not a no-op: the float model differs by much more
    assert float((float_logits - want).abs().max() / want.abs().max()) > 10 * err
    prompt = ids[:1, :4]
    g = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want_tokens = want_model.generate(prompt, **g)
        got_tokens = got_model.generate(prompt, **g)
    assert torch.equal(got_tokens, want_tokens)


def test_quantize_model_frees_float_experts_and_reports():
    model = tiny_model("mixtral", seed=1)
    before = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    qmoe.hf.quantize_model(model, bits=4, block_size=32, threads=1)
    assert before > 0 and not [n for n, _ in model.named_parameters() if ".experts." in n]
    mods = [m for m in model.modules() if type(m).__name__ == "QmoeExperts"]
    assert len(mods) == model.config.num_hidden_layers
    layer = mods[0].layer
    assert layer.num_experts == 4 and layer.hidden_size == 64 and layer.inter_size == 96
    a = layer.attributes
    assert a["activation_type"] == "swiglu" and a["swiglu_fusion"] == 2 and a["normalize_routing_weights"] == 0


def test_quantize_model_refusals():
    model = tiny_model("mixtral", seed=2)
    with pytest.raises(ValueError, match="block_size 128 does not divide hidden size = 64"):
        qmoe.hf.quantize_model(copy.deepcopy(model), bits=4, block_size=128)
    with pytest.raises(ValueError, match="bits: expected 4 or 8"):
        qmoe.hf.quantize_model(copy.deepcopy(model), bits=3, block_size=0)
    with pytest.raises(ValueError, match="power of two"):
        qmoe.hf.quantize_model(copy.deepcopy(model), bits=4, block_size=24)
    with pytest.raises(ValueError, match="no transformers sparse-MoE experts module"):
        qmoe.hf.quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))

    class LegacyBlock(torch.nn.Module):  # transformers 4.x style: a ModuleList of per-expert MLPs
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    legacy = torch.nn.Module()
    legacy.block_sparse_moe = LegacyBlock()
    with pytest.raises(ValueError, match="'block_sparse_moe.experts' is a per-expert nn.ModuleList"):
        qmoe.hf.quantize_model(legacy)
    m = copy.deepcopy(model)
    m.config.hidden_act = "gelu_pytorch_tanh"
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts.*gelu_pytorch_tanh"):
        qmoe.hf.quantize_model(m, bits=4, block_size=0)
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts FC2: expert 2 has non-finite"):
        qmoe.hf.quantize_model(m, bits=4, block_size=0)


BF16_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "granitemoe"]


def bf16_logits_error(family: str, device: str) -> float:
    """qmoe bfloat16 against the dequantized model in bfloat16 (transformers), routing pinned to the
    float32 dequantized model's (see PinnedRouting), relative L2 of the logits."""
    # master weights that bfloat16 holds exactly, so both sides quantize the same values
    model = tiny_model(family, seed=7).to(torch.bfloat16).float()
    ref32 = dequantized_model(model, 4, 32, True)
    want_model = copy.deepcopy(ref32).to(device, torch.bfloat16)
    got_model = qmoe.hf.quantize_model(copy.deepcopy(model).to(device, torch.bfloat16), bits=4, block_size=32,
                                       threads=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    pins = []
    for m in (want_model, got_model):
        p = PinnedRouting()
        p.record(ref32, ids)
        p.pin(m)
        pins.append(p)
    with torch.no_grad():
        want = want_model(ids.to(device)).logits.float()
        got = got_model(ids.to(device)).logits
    assert got.dtype == torch.bfloat16
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.parametrize("family", BF16_FAMILIES)
def test_bf16_cpu_vs_dequantized(family):
    err = bf16_logits_error(family, "cpu")
    record(f"hf bf16 CPU quantize_model vs dequantized (rel L2, routing pinned; {family})", err)
    assert err <= 2e-2, err
