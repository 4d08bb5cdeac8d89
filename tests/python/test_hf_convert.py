"""qmoe.hf.convert / ``qmoe convert`` / qmoe.hf.from_pretrained on real files.

* Every family's ``save_pretrained`` output converts, and the file's expert
  tensors are the bits qmoe.hf.quantize_model quantizes from the same model
  (whose oracle test is test_hf_model.py); attributes, routers, shared
  experts and routing descriptions are checked against the model.
* A converted layer run on its own (router_probs = the router's logits)
  gives the dequantized transformers block's output, for the families whose
  routing QMoE computes natively.
* from_pretrained(checkpoint, file) gives quantize_model's logits and tokens.
* Hand-written hub-style checkpoints: per-expert names in sharded files with
  an index; gpt-oss MXFP4 (oracle: transformers' own MXFP4 decode); FP8 E4M3
  with 128x128 block scales (oracle: torch's float8_e4m3fn).
* Errors name the tensor; nothing is left at the output path.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qmoe

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import FAMILIES, tiny_model  # noqa: E402
from qmoe_np import record  # noqa: E402
from test_hf_model import dequantized_model  # noqa: E402

import qmoe.hf  # noqa: E402
from qmoe.hf._model import iter_experts, quantize_experts  # noqa: E402

BITS, BLOCK = 4, 16
ROUTER = {"gpt_oss": "router", "granitemoe": "router"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (model, checkpoint dir, qmoe file, summary)."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        model = tiny_model(fam, seed=11)
        model.save_pretrained(str(d / "ckpt"))
        s = qmoe.hf.convert(str(d / "ckpt"), str(d / "m.qmoe"), bits=BITS, block_size=BLOCK, threads=2,
                            progress=False)
        out[fam] = (model, str(d / "ckpt"), str(d / "m.qmoe"), s)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_gives_quantize_model_bits(converted, family):
    model, _, path, summary = converted[family]
    f = qmoe.open(path)
    found = list(iter_experts(model))
    assert list(f.layers) == [n.rsplit(".", 1)[0] for n, *_ in found]
    cfg = model.config
    for name, parent, _, mod in found:
        lname = name.rsplit(".", 1)[0]
        w, a, err = quantize_experts(mod, k=cfg.num_experts_per_tok, bits=BITS, block_size=BLOCK, where=name)
        for t, arr in w.items():
            assert np.array_equal(f.tensor(f"{lname}.{t}"), arr), t
        names = {t.name for t in f.tensors if t.name.startswith(lname + ".")}
        fl = f.layers[lname]
        at = fl.attributes
        for key in ("activation_type", "swiglu_fusion", "activation_alpha", "activation_beta", "swiglu_limit",
                    "expert_weight_bits", "block_size"):
            want = a[key]
            assert (at[key] == want if isinstance(want, str) else np.float32(at[key]) == np.float32(want)), key
        routing = json.loads(fl.metadata["routing"])
        assert routing["top_k"] == at["k"] == cfg.num_experts_per_tok
        want_norm = {"softmax_topk": int(routing.get("renormalize", False)), "topk_softmax": 1}.get(
            routing["type"], 0)
        assert at["normalize_routing_weights"] == want_norm
        q = json.loads(fl.metadata["quantization"])
        assert (q["bits"], q["block_size"], q["symmetric"]) == (BITS, BLOCK, True)
        assert q["rel_l2_fc1"] == pytest.approx(summary["layers"][lname]["fc1"], rel=1e-5)
        assert q["rel_l2_fc1"] == pytest.approx(err["fc1"], rel=1e-5)
        # the router, as the model holds it
        router = getattr(parent, "gate", None) or parent.router
        assert np.array_equal(f.tensor(f"{lname}.router.weight"), router.weight.detach().numpy())
        if family == "gpt_oss":
            assert np.array_equal(f.tensor(f"{lname}.router.bias"), router.bias.detach().numpy())
        if family == "deepseek_v3":
            assert np.array_equal(f.tensor(f"{lname}.router.e_score_correction_bias"),
                                  router.e_score_correction_bias.numpy())
        if family == "qwen2_moe":
            assert np.array_equal(f.tensor(f"{lname}.shared_expert.down_proj.weight"),
                                  parent.shared_expert.down_proj.weight.detach().numpy())
            assert f"{lname}.shared_expert_gate.weight" in names
        assert json.loads(fl.metadata["source"])["tensors"]
    assert f.metadata["hf.model_type"] == cfg.model_type


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen3_moe_nonorm", "gpt_oss", "olmoe", "granitemoe"])
def test_converted_layer_alone_gives_the_block(converted, family):
    """router_probs = x @ router.weight.T (+ bias) and the file's attributes reproduce the
    family's routing: the layer alone equals the dequantized model's MoE block."""
    model, _, path, _ = converted[family]
    ref = dequantized_model(model, BITS, BLOCK, True)
    f = qmoe.open(path)
    x = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for lname in f.layers:
        i = int(lname.split(".")[2])
        block = getattr(ref.model.layers[i], lname.split(".")[3])
        with torch.no_grad():
            want = block(x[None])
            want = (want[0] if isinstance(want, tuple) else want)[0].numpy()
        logits = x.numpy() @ f.tensor(f"{lname}.router.weight").T
        if f"{lname}.router.bias" in {t.name for t in f.tensors}:
            logits = logits + f.tensor(f"{lname}.router.bias")
        got = f.load(lname, threads=2)(x.numpy(), logits.astype(np.float32))
        err = float(np.abs(got - want).max() / np.abs(want).max())
        record(f"hf convert: layer alone vs transformers block ({family})", err)
        assert err <= 1e-5, (lname, err)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_gives_quantize_model(converted, family):
    model, ckpt, path, _ = converted[family]
    q = qmoe.hf.quantize_model(copy.deepcopy(model), bits=BITS, block_size=BLOCK, threads=2)
    m = qmoe.hf.from_pretrained(ckpt, path, threads=2)
    assert not [n for n, p in m.named_parameters() if ".experts." in n]
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = q(ids).logits
        got = m(ids).logits
    err = float((got - want).abs().max() / want.abs().max())
    record(f"hf from_pretrained vs quantize_model ({family})", err)
    assert err <= 1e-5, err
    g = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(m.generate(ids[:1, :4], **g), q.generate(ids[:1, :4], **g))


# --------------------------------------------------------------------------- hand-written hub checkpoints

def _write_sharded(folder, tensors, config, shards=2):
    """tensors: name -> torch tensor; written over `shards` files with an index, hub style."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def test_sharded_hub_checkpoint_bf16(tmp_path, converted):
    """Mixtral in the hub's per-expert naming, BF16, sharded with an index: the experts
    quantize exactly as the same float weights through quantize_model's path."""
    model = tiny_model("mixtral", seed=11)
    sd = {n: t.to(torch.bfloat16) for n, t in model.state_dict().items()}
    tensors = {}
    for n, t in sd.items():
        n = n.replace(".mlp.", ".block_sparse_moe.")
        if n.endswith("experts.gate_up_proj"):
            I = t.shape[1] // 2
            for j in range(t.shape[0]):
                tensors[n.replace("gate_up_proj", f"{j}.w1.weight")] = t[j, :I]
                tensors[n.replace("gate_up_proj", f"{j}.w3.weight")] = t[j, I:]
        elif n.endswith("experts.down_proj"):
            for j in range(t.shape[0]):
                tensors[n.replace("down_proj", f"{j}.w2.weight")] = t[j]
        else:
            tensors[n] = t
    cfg = model.config.to_dict()
    cfg["dtype"] = "bfloat16"
    _write_sharded(str(tmp_path / "hub"), tensors, cfg, shards=3)
    qmoe.hf.convert(str(tmp_path / "hub"), str(tmp_path / "hub.qmoe"), bits=8, block_size=32, threads=2,
                    progress=False)
    f = qmoe.open(str(tmp_path / "hub.qmoe"))
    bf = tiny_model("mixtral", seed=11).to(torch.bfloat16).float()
    for name, _, _, mod in iter_experts(bf):
        w, _, _ = quantize_experts(mod, k=2, bits=8, block_size=32, where=name)
        lname = name.rsplit(".", 1)[0]
        for t, arr in w.items():
            assert np.array_equal(f.tensor(f"{lname}.{t}"), arr), t
        assert f.tensor(f"{lname}.router.weight").dtype.name == "bfloat16" or \
            f.tensors[0].dtype in ("BF16", "F32", "U8")
    # and from_pretrained reads the bf16 shards into a float32 model
    m = qmoe.hf.from_pretrained(str(tmp_path / "hub"), str(tmp_path / "hub.qmoe"), threads=2)
    q = qmoe.hf.quantize_model(bf, bits=8, block_size=32, threads=2)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = float((m(ids).logits - q(ids).logits).abs().max() / q(ids).logits.abs().max())
    assert err <= 1e-5


def test_gpt_oss_mxfp4_checkpoint(tmp_path):
    """The hub's MXFP4 experts: the file holds what quantizing transformers' own MXFP4
    decode gives."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = tiny_model("gpt_oss", seed=5)
    cfg = model.config.to_dict()
    E, H, I = 4, 64, 64
    rng = np.random.default_rng(0)
    tensors = {n: t for n, t in model.state_dict().items() if ".experts." not in n}
    mx = {}
    for i in range(2):
        x = f"model.layers.{i}.mlp.experts"
        for proj, N, K in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            blocks = rng.integers(0, 256, (E, N, K // 32, 16), dtype=np.uint8)
            scales = rng.integers(120, 130, (E, N, K // 32), dtype=np.uint8)
            tensors[f"{x}.{proj}_blocks"] = torch.from_numpy(blocks)
            tensors[f"{x}.{proj}_scales"] = torch.from_numpy(scales)
            tensors[f"{x}.{proj}_bias"] = torch.randn(E, N, generator=torch.Generator().manual_seed(i)).to(
                torch.bfloat16)
            # transformers' decode gives the in-memory [E, K, N] (x @ W); ours wants [E, N, K]
            mx[(i, proj)] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                       dtype=torch.float32).transpose(1, 2).numpy()
    _write_sharded(str(tmp_path / "oss"), tensors, cfg, shards=2)
    qmoe.hf.convert(str(tmp_path / "oss"), str(tmp_path / "oss.qmoe"), bits=4, block_size=32, threads=2,
                    progress=False)
    f = qmoe.open(str(tmp_path / "oss.qmoe"))
    for i in range(2):
        lname = f"model.layers.{i}.mlp"
        assert json.loads(f.layers[lname].metadata["source"])["dtype"] == "MXFP4"
        for fc, proj in (("fc1", "gate_up_proj"), ("fc2", "down_proj")):
            want = qmoe.quantize(mx[(i, proj)], bits=4, block_size=32)
            assert np.array_equal(f.tensor(f"{lname}.{fc}_experts_weights"), want.weights)
            assert np.array_equal(f.tensor(f"{lname}.{fc}_scales"), want.scales)
            bias = tensors[f"model.layers.{i}.mlp.experts.{proj}_bias"].float().numpy()
            assert np.array_equal(f.tensor(f"{lname}.{fc}_experts_bias"), bias)


def test_deepseek_fp8_checkpoint(tmp_path):
    """DeepSeek-V3's FP8 E4M3 experts with 128x128 block scales (ragged: I = 160)."""
    from safetensors.torch import save_file

    model = tiny_model("deepseek_v3", seed=6)
    cfg = model.config.to_dict()
    E, H, I = 8, 64, 32
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"}
    gen = torch.Generator().manual_seed(3)
    tensors = {n: t for n, t in model.state_dict().items() if ".experts." not in n}
    floats = {}
    for j in range(E):
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            n = f"model.layers.1.mlp.experts.{j}.{proj}.weight"
            w8 = (torch.randn(*shape, generator=gen) * 100).to(torch.float8_e4m3fn)
            s = torch.rand((shape[0] + 127) // 128, (shape[1] + 127) // 128, generator=gen) + 0.01
            tensors[n] = w8
            tensors[n + "_scale_inv"] = s
            floats[(j, proj)] = (w8.to(torch.float32) * s.repeat_interleave(128, 0)[:shape[0]]
                                 .repeat_interleave(128, 1)[:, :shape[1]]).numpy()
    os.makedirs(tmp_path / "ds")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp_path / "ds" / "model.safetensors"))
    with open(tmp_path / "ds" / "config.json", "w") as fh:
        json.dump(cfg, fh)
    qmoe.hf.convert(str(tmp_path / "ds"), str(tmp_path / "ds.qmoe"), bits=8, block_size=16, threads=2,
                    progress=False)
    f = qmoe.open(str(tmp_path / "ds.qmoe"))
    assert list(f.layers) == ["model.layers.1.mlp"]
    fc1 = np.stack([np.concatenate([floats[(j, "gate_proj")], floats[(j, "up_proj")]]) for j in range(E)])
    fc2 = np.stack([floats[(j, "down_proj")] for j in range(E)])
    for fc, m in (("fc1", fc1), ("fc2", fc2)):
        want = qmoe.quantize(m, bits=8, block_size=16)
        assert np.array_equal(f.tensor(f"model.layers.1.mlp.{fc}_experts_weights"), want.weights)
        assert np.array_equal(f.tensor(f"model.layers.1.mlp.{fc}_scales"), want.scales)
    assert json.loads(f.layers["model.layers.1.mlp"].metadata["source"])["dtype"] == "F8_E4M3"


# --------------------------------------------------------------------------- errors and the command line

def _edit_checkpoint(src, dst, drop=(), reshape=None, config=None):
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    sd = load_file(os.path.join(src, "model.safetensors"))
    for n in drop:
        del sd[n]
    for n, shape in (reshape or {}).items():
        sd[n] = torch.zeros(shape)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config or {})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_convert_errors_leave_nothing(converted, tmp_path):
    _, ckpt, _, _ = converted["mixtral"]
    out = tmp_path / "o.qmoe"
    cases = [
        (dict(config={"model_type": "llama"}), "unknown MoE architecture model_type='llama'"),
        (dict(drop=["model.layers.1.block_sparse_moe.experts.2.w3.weight"]),
         "missing tensor 'model.layers.1.block_sparse_moe.experts.2.w3.weight'"),
        (dict(reshape={"model.layers.0.block_sparse_moe.experts.1.w2.weight": (64, 95)}),
         r"experts.1.w2.weight': expected shape \[64, 96\], got \[64, 95\]"),
        (dict(drop=["model.layers.0.block_sparse_moe.gate.weight"]),
         "missing tensor 'model.layers.0.block_sparse_moe.gate.weight'"),
        (dict(config={"num_local_experts": "four"}), "expected a positive integer 'num_local_experts'"),
    ]
    for i, (edit, msg) in enumerate(cases):
        d = str(tmp_path / f"bad{i}")
        _edit_checkpoint(ckpt, d, **edit)
        with pytest.raises(ValueError, match=msg):
            qmoe.hf.convert(d, str(out), block_size=16, progress=False)
        assert not out.exists()
    with pytest.raises(ValueError, match="block_size 128 does not divide hidden_size = 64"):
        qmoe.hf.convert(ckpt, str(out), block_size=128, progress=False)
    # a failure midway (a NaN weight in the last layer): no file and no temporary left
    d = str(tmp_path / "nan")
    _edit_checkpoint(ckpt, d, reshape={"model.layers.1.block_sparse_moe.experts.3.w1.weight": (96, 64)})
    from safetensors.torch import load_file, save_file
    sd = load_file(os.path.join(d, "model.safetensors"))
    sd["model.layers.1.block_sparse_moe.experts.3.w1.weight"][5, 5] = float("nan")
    save_file(sd, os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match="expert 3 has non-finite"):
        qmoe.hf.convert(d, str(out), block_size=16, progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o.qmoe")]


QMOE = os.path.join(os.path.dirname(sys.executable), "qmoe")  # where pip install . puts the command


@pytest.mark.parametrize("how", ["python -m qmoe.hf", "qmoe"])
def test_cli_convert(converted, tmp_path, how):
    _, ckpt, _, _ = converted["qwen3_moe"]
    if how == "qmoe" and not os.access(QMOE, os.X_OK):
        pytest.skip(f"no qmoe command beside {sys.executable} (pip install . puts it there)")
    cmd = [QMOE] if how == "qmoe" else [sys.executable, "-m", "qmoe.hf"]
    out = str(tmp_path / "c.qmoe")
    r = subprocess.run(cmd + ["convert", ckpt, "-o", out, "--bits", "8", "--block", "32", "--zero-points",
                              "--threads", "2", "--json", str(tmp_path / "s.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[2/2] model.layers.1.mlp" in r.stderr and "2 Qwen3-MoE layer(s)" in r.stdout
    f = qmoe.open(out)
    assert f.layers["model.layers.0.mlp"].attributes["expert_weight_bits"] == 8
    assert "model.layers.0.mlp.fc1_zero_points" in {t.name for t in f.tensors}
    assert json.load(open(tmp_path / "s.json"))["family"] == "Qwen3-MoE"
    r = subprocess.run(cmd + ["convert", str(tmp_path / "nope"), "-o", out + "2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "not a checkpoint folder" in r.stderr and not os.path.exists(out + "2")
