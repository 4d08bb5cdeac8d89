"""qmoe.hf on the GPU (skipped without qmoe's CUDA backend and a GPU; run on the GPU host).

* bfloat16 models on CUDA with qmoe experts (quantize_model and
  from_pretrained) against the same model whose experts hold the dequantized
  weights, run by transformers in bfloat16: logits within 2e-2 relative L2.
  The float weights are bfloat16-representable, so both sides quantize the
  same values (quantizing the bfloat16-rounded weights of a float32 model
  would move codes by one step and show as a 4% difference).
* One decode step (static KV cache) captured in a CUDA graph and replayed
  gives the eager step's logits; greedy decoding by graph replay gives the
  eager tokens.
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

from hf_models import tiny_model  # noqa: E402
from qmoe_np import record  # noqa: E402
from test_hf_model import dequantized_model  # noqa: E402

import qmoe.hf  # noqa: E402

DEV = torch.device("cuda:0")


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "granitemoe"])
def test_bf16_cuda_vs_dequantized(family):
    # master weights that bfloat16 holds exactly, so both sides quantize the same values
    model = tiny_model(family, seed=7).to(torch.bfloat16).float()
    want_model = dequantized_model(model, 4, 32, True).to(DEV, torch.bfloat16)
    got_model = qmoe.hf.quantize_model(copy.deepcopy(model).to(DEV, torch.bfloat16), bits=4, block_size=32)
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3)).to(DEV)
    with torch.no_grad():
        want = want_model(ids).logits
        got = got_model(ids).logits
    err = rel_l2(got, want)
    record(f"hf bf16 CUDA quantize_model vs dequantized (rel L2, {family})", err)
    assert got.dtype == torch.bfloat16 and err <= 2e-2, err


def test_from_pretrained_cuda(tmp_path):
    model = tiny_model("qwen3_moe", seed=8).to(torch.bfloat16).float()
    model.save_pretrained(str(tmp_path / "ck"))
    qmoe.hf.convert(str(tmp_path / "ck"), str(tmp_path / "m.qmoe"), bits=4, block_size=32, progress=False)
    m = qmoe.hf.from_pretrained(str(tmp_path / "ck"), str(tmp_path / "m.qmoe"), device="cuda")
    want_model = dequantized_model(model, 4, 32, True).to(DEV, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1)).to(DEV)
    with torch.no_grad():
        err = rel_l2(m(ids).logits, want_model(ids).logits)
    record("hf bf16 CUDA from_pretrained vs dequantized (rel L2)", err)
    assert err <= 2e-2


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_decode_step_in_a_cuda_graph(family):
    from transformers import StaticCache

    model = qmoe.hf.quantize_model(tiny_model(family, seed=9).to(DEV, torch.bfloat16), bits=4, block_size=32)
    P, steps = 6, 8
    prompt = torch.randint(0, 128, (1, P), generator=torch.Generator().manual_seed(2)).to(DEV)

    def prefill(cache):
        with torch.no_grad():
            out = model(prompt, past_key_values=cache, cache_position=torch.arange(P, device=DEV), use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    # eager greedy decoding
    cache = StaticCache(config=model.config, max_cache_len=64)
    tok = prefill(cache)
    eager_tokens, eager_logits = [], []
    with torch.no_grad():
        for s in range(steps):
            lg = model(tok, past_key_values=cache, cache_position=torch.tensor([P + s], device=DEV)).logits[:, -1]
            eager_logits.append(lg.clone())
            tok = lg.argmax(-1, keepdim=True)
            eager_tokens.append(int(tok))

    # the same with one captured decode step, replayed
    cache = StaticCache(config=model.config, max_cache_len=64)
    first = prefill(cache)
    ids = first.clone()
    pos = torch.tensor([P], device=DEV)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (allocations, lazy init) writes the same K/V at the same position
            model(ids, past_key_values=cache, cache_position=pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_logits = model(ids, past_key_values=cache, cache_position=pos).logits[:, -1]
    tokens = []
    for s in range(steps):
        pos.fill_(P + s)
        graph.replay()
        err = rel_l2(static_logits, eager_logits[s])
        assert err <= 1e-3, (s, err)
        nxt = static_logits.argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        ids.copy_(nxt)
    torch.cuda.synchronize()
    assert tokens == eager_tokens
