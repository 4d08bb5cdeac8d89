"""qmoe.hf on the GPU (skipped without qmoe's CUDA backend and a GPU; run on the GPU host).

* bfloat16 models on CUDA with qmoe experts (quantize_model and
  from_pretrained) against the same model whose experts hold the dequantized
  weights, run by transformers in bfloat16: logits within 2e-2 relative L2.
  The float weights are bfloat16-representable, so both sides quantize the
  same values, and both models route as the float32 reference does
  (hf_models.PinnedRouting: a near-tie flipped by rounding would otherwise
  send a token elsewhere in one model and dominate the difference).
* A decode step over a static KV cache compiled with
  mode="reduce-overhead" (CUDA graphs) gives the eager tokens.
"""

from __future__ import annotations

import copy

import pytest

import qmoe

if not qmoe.cuda_available():
    pytest.skip("qmoe was built without its CUDA backend, or no CUDA device is visible", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)

from hf_models import PinnedRouting, tiny_model  # noqa: E402
from qmoe_np import record  # noqa: E402
from test_hf_model import BF16_FAMILIES, bf16_logits_error, dequantized_model  # noqa: E402

import qmoe.hf  # noqa: E402

DEV = torch.device("cuda:0")


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("family", BF16_FAMILIES)
def test_bf16_cuda_vs_dequantized(family):
    err = bf16_logits_error(family, "cuda")
    record(f"hf bf16 CUDA quantize_model vs dequantized (rel L2, routing pinned; {family})", err)
    assert err <= 2e-2, err


def test_from_pretrained_cuda(tmp_path):
    model = tiny_model("qwen3_moe", seed=8).to(torch.bfloat16).float()
    model.save_pretrained(str(tmp_path / "ck"))
    qmoe.hf.convert(str(tmp_path / "ck"), str(tmp_path / "m.qmoe"), bits=4, block_size=32, progress=False)
    m = qmoe.hf.from_pretrained(str(tmp_path / "ck"), str(tmp_path / "m.qmoe"), device="cuda")
    ref32 = dequantized_model(model, 4, 32, True)
    want_model = copy.deepcopy(ref32).to(DEV, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    for target in (m, want_model):
        p = PinnedRouting()
        p.record(ref32, ids)
        p.pin(target)
    with torch.no_grad():
        err = rel_l2(m(ids.to(DEV)).logits, want_model(ids.to(DEV)).logits)
    record("hf bf16 CUDA from_pretrained vs dequantized (rel L2, routing pinned)", err)
    assert err <= 2e-2


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_decode_step_in_a_cuda_graph(family):
    """A decode step over a static KV cache, compiled with mode="reduce-overhead" (torch's CUDA
    graphs: the step is captured once and replayed), gives the eager tokens; the qmoe op is one
    opaque node and nothing made inductor skip the graph."""
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    model = qmoe.hf.quantize_model(tiny_model(family, seed=9).to(DEV, torch.bfloat16), bits=4, block_size=32)
    P, steps = 6, 8
    prompt = torch.randint(0, 128, (1, P), generator=torch.Generator().manual_seed(2)).to(DEV)

    def step(ids, pos, cache):
        return model(ids, past_key_values=cache, cache_position=pos).logits[:, -1]

    def decode(fn):
        cache = StaticCache(config=model.config, max_cache_len=64)
        with torch.no_grad():
            out = model(prompt, past_key_values=cache, cache_position=torch.arange(P, device=DEV), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            toks, logits = [], []
            for s in range(steps):
                lg = fn(tok, torch.tensor([P + s], device=DEV), cache)
                logits.append(lg.float().clone())
                tok = lg.argmax(-1, keepdim=True)
                toks.append(int(tok))
        return toks, logits

    counters.clear()
    torch._dynamo.reset()
    want_tokens, want_logits = decode(step)
    got_tokens, got_logits = decode(torch.compile(step, mode="reduce-overhead"))
    assert got_tokens == want_tokens
    err = max(rel_l2(g, w) for g, w in zip(got_logits, want_logits))
    record(f"hf CUDA-graph decode step vs eager (rel L2, {family})", err)
    assert err <= 3e-2, err
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
