"""``qmoe.hf.from_pretrained``: a transformers model built from its
checkpoint folder, with its experts taken from a converted qmoe file.

The model is constructed with every *parameter* on the meta device (buffers
stay real, so rotary tables and the like are computed as usual), so no float
expert is ever allocated. Each experts module is then replaced by a
:class:`qmoe.torch.QmoeExperts` over the file's layer, and the other weights
are read from the checkpoint's shards: the names transformers renames at load
time (its own ``WeightRenaming`` rules for the family) are renamed the same
way, FP8 weights with block scales are dequantized, and the tensors the
converter consumed for the experts are skipped. Any parameter left unloaded
is an error naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import numpy as np

import qmoe

from ._checkpoint import Checkpoint
from ._model import iter_experts


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside goes to the meta device (its
    storage is never touched, so a large torch.empty costs no memory)."""
    import torch

    orig = torch.nn.Module.register_parameter

    def register(self: Any, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(self, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = orig  # type: ignore[method-assign]


def _renamings(model_type: str) -> List[Tuple[str, str]]:
    """transformers' own checkpoint -> module renaming rules for the family (regexes)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # pragma: no cover
        return []
    out = []
    for r in get_checkpoint_conversion_mapping(model_type) or []:
        if type(r).__name__ != "WeightRenaming":
            continue
        src, dst = r.source_patterns, r.target_patterns
        src = src if isinstance(src, (list, tuple)) else [src]
        dst = dst if isinstance(dst, (list, tuple)) else [dst]
        if len(src) == len(dst) == 1:
            out.append((str(src[0]), str(dst[0])))
    return out


def _to_torch(ck: Checkpoint, name: str, dtype: Any) -> Any:
    import torch

    dt, shape, _ = ck.info(name)
    raw = ck.raw(name)
    if dt == "F8_E4M3":  # with its block scales
        return torch.from_numpy(ck.dequantized(name)).to(dtype)
    if dt == "BF16":
        return torch.from_numpy(np.array(raw).view(np.int16)).view(torch.bfloat16).to(dtype)
    if dt in ("F32", "F16", "F64"):
        return torch.from_numpy(np.array(raw)).to(dtype)
    return torch.from_numpy(np.array(raw))


def from_pretrained(checkpoint: "str | os.PathLike[str]", qmoe_file: "str | os.PathLike[str]", *,
                    device: Any = "cpu", dtype: Any = None, threads: Optional[int] = None, accuracy_level: int = 0,
                    max_tokens: int = 4096) -> Any:
    """A transformers causal LM from ``checkpoint`` (its config.json and the
    non-expert weights) with every experts module running on the layers of
    ``qmoe_file`` (written by :func:`qmoe.hf.convert` from that checkpoint).

    ``device``: "cpu" or "cuda[:N]" (the whole model goes there; CUDA layers
    take float16/bfloat16). ``dtype``: the torch dtype of the non-expert
    weights and activations (default float32 on the CPU, bfloat16 on CUDA).
    Float experts are never built. Returns the model in eval mode.
    """
    import torch
    import transformers

    src = os.fspath(checkpoint)
    qpath = os.fspath(qmoe_file)
    ck = Checkpoint(src)
    if ck.config is None:
        raise ValueError(f"{src}: no config.json")
    qf = qmoe.open(qpath)
    mt = qf.metadata.get("hf.model_type")
    if mt is not None and mt != ck.config.get("model_type"):
        raise ValueError(f"{qpath}: converted from a {mt!r} checkpoint, but {src} is {ck.config.get('model_type')!r}")
    dev = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = transformers.AutoConfig.from_pretrained(src)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()

    from qmoe.torch import QmoeExperts

    k = int(cfg.num_experts_per_tok)
    consumed: Set[str] = set()
    found = list(iter_experts(model))
    if not found:
        raise ValueError(f"{src}: the model has no transformers experts module")
    layer_names = set(qf.layers)
    for name, parent, attr, mod in found:
        lname = name.rsplit(".", 1)[0]
        if lname not in layer_names:
            raise ValueError(f"{qpath}: no layer {lname!r} for the model's experts module {name!r} (the file has "
                             f"{sorted(layer_names)[:4]}...)")
        fl = qf.layers[lname]
        up = mod.gate_up_proj if mod.has_gate else mod.up_proj
        E = up.shape[0]
        H = up.shape[1] if mod.is_transposed else up.shape[2]
        shapes = {t.name.rsplit(".", 1)[-1]: t.shape for t in qf.tensors if t.name.startswith(lname + ".")}
        if shapes.get("fc1_experts_weights", [None])[0] != E or shapes.get("fc2_experts_weights", [0, None])[1] != H:
            raise ValueError(f"{qpath}: layer {lname!r} has fc1 {shapes.get('fc1_experts_weights')} / fc2 "
                             f"{shapes.get('fc2_experts_weights')}, the model's experts have E={E}, H={H}")
        routing = json.loads(fl.metadata.get("routing", "{}"))
        source = json.loads(fl.metadata.get("source", "{}"))
        consumed.update(source.get("tensors", []))
        layer = qf.load(lname, device=device, threads=threads, accuracy_level=accuracy_level, max_tokens=max_tokens)
        # the model's router hands over final weights; a layer that renormalizes gets weights summing to 1
        normalized = routing.get("type") == "topk_softmax" or bool(routing.get("renormalize"))
        setattr(parent, attr, QmoeExperts(layer, top_k=k, normalized=normalized))
    del found

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    renames = _renamings(str(cfg.model_type))
    sd: Dict[str, Any] = {}
    for n in ck.names():
        if n in consumed or n.endswith("_scale_inv"):
            continue
        target = n
        for a, b in renames:
            target = re.sub(a, b, target)
        ref = params.get(target, buffers.get(target))
        if ref is None:
            continue  # e.g. rotary tables some checkpoints carry; transformers ignores them too
        t = _to_torch(ck, n, ref.dtype if ref.is_floating_point() else None)
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{src}: tensor {n!r}: expected shape {list(ref.shape)} for {target!r}, got "
                             f"{list(t.shape)}")
        sd[target] = t
        ck.release(n)
    model.load_state_dict(sd, strict=False, assign=True)
    if getattr(cfg, "tie_word_embeddings", False) or getattr(cfg.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{src}: no checkpoint tensor for {len(missing)} parameter(s), e.g. {missing[:4]}")
    ck.close()
    return model.to(dev)
