"""``qmoe convert``: a Hugging Face checkpoint folder -> a qmoe file.

The checkpoint is read tensor by tensor from memory-mapped shards
(:class:`~qmoe.hf._checkpoint.Checkpoint`); each MoE layer's experts are
decoded to float32 one expert at a time (BF16/F16/F32, FP8 E4M3 with block
scales, MXFP4), quantized on a thread pool and written at their offsets in
the output (:class:`~qmoe.hf._writer.StreamWriter`), and the source pages are
dropped as soon as the layer is written. Peak memory: one layer's quantized
output + one float32 expert per thread + what the page cache keeps mapped.

The output file holds, per MoE layer ``model.layers.{i}.<block>`` (the
block's name in transformers' modules, e.g. ``model.layers.3.mlp``):

* the QMoE inputs in raw ONNX Runtime layout (``<layer>.fc1_experts_weights``,
  ``fc1_scales``, ..., biases where the family has them), scales float32;
* the router: ``<layer>.router.weight`` [E, H], ``<layer>.router.bias`` [E]
  (gpt-oss), ``<layer>.router.e_score_correction_bias`` [E] (DeepSeek-V3), in
  the checkpoint's dtype;
* Qwen2-MoE's shared expert and its gate as dense tensors
  (``<layer>.shared_expert.gate_proj.weight``, ..., ``<layer>.shared_expert_gate.weight``);
* metadata: ``routing`` (JSON, see :mod:`qmoe.hf._families`), ``router`` (role
  -> tensor name), ``shared`` (tensor names), ``source`` (family, model_type,
  source dtype, the checkpoint tensors the experts came from),
  ``quantization`` (bits, block_size, symmetric, rel L2 error of FC1 and FC2).

File metadata: ``hf.model_type``, ``hf.config`` (config.json's text),
``hf.converted_by``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._checkpoint import Checkpoint
from ._families import PER_EXPERT_NAMES, Family, config_int, family_of, moe_layers, num_experts, qmoe_routing_attrs
from ._formats import mxfp4_to_f32, to_f32
from ._quantize import Gating, check_block, gating_for, quantize_layer
from ._writer import StreamWriter

_ERR_PLACEHOLDER = "0.000000e+00"  # rel L2 errors are rewritten in place, same width ("%.6e")


def _decode(a: np.ndarray, dtype: str, name: str) -> np.ndarray:
    try:
        return to_f32(a, dtype)
    except ValueError:
        raise ValueError(f"tensor {name!r}: expected F32, F16 or BF16 (or F8_E4M3 with weight_scale_inv), "
                         f"got {dtype}") from None


class _Sources:
    """One layer's expert tensors in a checkpoint: getters of expert e's FC1
    [N1, H] and FC2 [H, I] float32, biases, and the names read."""

    def __init__(self, ck: Checkpoint, fam: Family, cfg: Dict[str, Any], i: int, E: int, H: int, I: int) -> None:
        self.ck = ck
        self.names: List[str] = []
        self.fc1_bias: Optional[np.ndarray] = None
        self.fc2_bias: Optional[np.ndarray] = None
        p = f"model.layers.{i}.{fam.ckpt_block}"
        self.where = f"{ck.path}: layer {i} ({p})"
        self.dtype = "?"
        if fam.layout == "gpt_oss":
            self._gpt_oss(p, E, H, I)
        elif fam.layout == "granite":
            self._fused(f"{p}.input_linear.weight", f"{p}.output_linear.weight", E, H, I)
        else:
            self._per_expert(p, f"model.layers.{i}.{fam.module_block}", E, H, I)

    # -- helpers
    def _need(self, name: str, shape: Optional[Sequence[int]] = None) -> Tuple[str, Tuple[int, ...]]:
        if name not in self.ck:
            raise ValueError(f"{self.where}: missing tensor {name!r}")
        dt, sh, _ = self.ck.info(name)
        if shape is not None and tuple(sh) != tuple(shape):
            raise ValueError(f"{self.where}: tensor {name!r}: expected shape {list(shape)}, got {list(sh)}")
        self.names.append(name)
        return dt, sh

    def _matrix(self, name: str, shape: Sequence[int]) -> Callable[[], np.ndarray]:
        """A [N, K] float32 getter of a 2-D weight (F32/F16/BF16, or FP8 E4M3 with its weight_scale_inv)."""
        dt, _ = self._need(name, shape)
        self.dtype = dt
        if dt == "F8_E4M3":
            sname = name + "_scale_inv"
            if sname not in self.ck:
                raise ValueError(f"{self.where}: tensor {name!r} is F8_E4M3 but {sname!r} (its block scales) "
                                 f"is missing")
            _, ssh, _ = self.ck.info(sname)
            self.names.append(sname)
            bn, bk = self.ck.fp8_block
            want = (-(-shape[0] // bn), -(-shape[1] // bk))
            if tuple(ssh) != want:
                raise ValueError(f"{self.where}: tensor {sname!r}: expected shape {list(want)} (blocks of "
                                 f"{bn}x{bk}), got {list(ssh)}")

            def fp8() -> np.ndarray:
                out = self.ck.dequantized(name)
                self.ck.release(name)
                return out
            return fp8

        def plain() -> np.ndarray:  # each expert matrix is read once: its pages go right after
            out = _decode(self.ck.raw(name), dt, name)
            self.ck.release(name)
            return out
        return plain

    def _slice(self, name: str, e: int, dt: str) -> np.ndarray:
        return _decode(self.ck.raw(name)[e], dt, name)

    # -- layouts
    def _per_expert(self, p: str, module_p: str, E: int, H: int, I: int) -> None:
        names = next((n for n in PER_EXPERT_NAMES if f"{p}.experts.0.{n[0]}.weight" in self.ck), None)
        if names is None:
            for q in (p, module_p):  # transformers v5's own fused names
                if f"{q}.experts.gate_up_proj" in self.ck:
                    self._fused(f"{q}.experts.gate_up_proj", f"{q}.experts.down_proj", E, H, I)
                    return
            raise ValueError(f"{self.where}: missing tensor {p + '.experts.0.gate_proj.weight'!r} (looked for "
                             f"per-expert {[n[0] for n in PER_EXPERT_NAMES]} names and fused "
                             f"'{p}.experts.gate_up_proj')")
        g, u, d = names
        gates = [self._matrix(f"{p}.experts.{j}.{g}.weight", (I, H)) for j in range(E)]
        ups = [self._matrix(f"{p}.experts.{j}.{u}.weight", (I, H)) for j in range(E)]
        downs = [self._matrix(f"{p}.experts.{j}.{d}.weight", (H, I)) for j in range(E)]
        self.fc1 = lambda e: np.concatenate([gates[e](), ups[e]()])  # gate | up: fusion 2
        self.fc2 = lambda e: downs[e]()
        self.fusion = 2

    def _fused(self, up_name: str, down_name: str, E: int, H: int, I: int) -> None:
        dt1, _ = self._need(up_name, (E, 2 * I, H))
        dt2, _ = self._need(down_name, (E, H, I))
        self.dtype = dt1
        self.fc1 = lambda e: self._slice(up_name, e, dt1)
        self.fc2 = lambda e: self._slice(down_name, e, dt2)
        self.fusion = 2

    def _gpt_oss(self, p: str, E: int, H: int, I: int) -> None:
        x = f"{p}.experts"
        self.fusion = 1
        if f"{x}.gate_up_proj_blocks" in self.ck:  # the hub's MXFP4
            for n, shape in ((f"{x}.gate_up_proj_blocks", (E, 2 * I, H // 32, 16)),
                             (f"{x}.gate_up_proj_scales", (E, 2 * I, H // 32)),
                             (f"{x}.down_proj_blocks", (E, H, I // 32, 16)),
                             (f"{x}.down_proj_scales", (E, H, I // 32))):
                dt, _ = self._need(n, shape)
                if dt != "U8":
                    raise ValueError(f"{self.where}: tensor {n!r}: expected U8 (MXFP4), got {dt}")
            if H % 32 or I % 32:
                raise ValueError(f"{self.where}: MXFP4 needs hidden and intermediate sizes divisible by 32")
            self.dtype = "MXFP4"
            self.fc1 = lambda e: mxfp4_to_f32(self.ck.raw(f"{x}.gate_up_proj_blocks")[e],
                                              self.ck.raw(f"{x}.gate_up_proj_scales")[e])
            self.fc2 = lambda e: mxfp4_to_f32(self.ck.raw(f"{x}.down_proj_blocks")[e],
                                              self.ck.raw(f"{x}.down_proj_scales")[e])
        else:  # transformers' layout, x @ W: [E, H, 2I] and [E, I, H]
            dt1, _ = self._need(f"{x}.gate_up_proj", (E, H, 2 * I))
            dt2, _ = self._need(f"{x}.down_proj", (E, I, H))
            self.dtype = dt1
            self.fc1 = lambda e: np.ascontiguousarray(self._slice(f"{x}.gate_up_proj", e, dt1).T)
            self.fc2 = lambda e: np.ascontiguousarray(self._slice(f"{x}.down_proj", e, dt2).T)
        for attr, n, shape in (("fc1_bias", f"{x}.gate_up_proj_bias", (E, 2 * I)),
                               ("fc2_bias", f"{x}.down_proj_bias", (E, H))):
            dt, _ = self._need(n, shape)
            setattr(self, attr, _decode(self.ck.raw(n), dt, n))

    def release(self) -> None:
        for n in self.names:
            self.ck.release(n)


def _gating(fam: Family, cfg: Dict[str, Any], fusion: int, where: str) -> Gating:
    if fam.layout == "gpt_oss":
        return Gating("swiglu", fusion=1, alpha=1.702, beta=1.0, limit=float(cfg.get("swiglu_limit", 7.0)))
    return gating_for(str(cfg.get("hidden_act", "silu")), True, fusion, where)


def _quant_shapes(prefix: str, E: int, N: int, K: int, bits: int, block: int, symmetric: bool,
                  bias: bool) -> List[Tuple[str, str, Tuple[int, ...]]]:
    pack = 8 // bits
    out = [(f"{prefix}_experts_weights", "U8", (E, N, K * bits // 8)),
           (f"{prefix}_scales", "F32", (E, N) if block == 0 else (E, N, K // block))]
    if not symmetric:
        out.append((f"{prefix}_zero_points", "U8",
                    (E, -(-N // pack)) if block == 0 else (E, N, -(-(K // block) // pack))))
    if bias:
        out.append((f"{prefix}_experts_bias", "F32", (E, N)))
    return out


def convert(checkpoint: "str | os.PathLike[str]", out: "str | os.PathLike[str]", *, bits: int = 4,
            block_size: int = 128, symmetric: bool = True, threads: Optional[int] = None,
            progress: bool = True) -> Dict[str, Any]:
    """Converts a Hugging Face MoE checkpoint folder into a qmoe file at ``out``.

    ``checkpoint``: a folder with config.json and model.safetensors (or an
    index and its shards). Families: Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss
    (BF16 or the hub's MXFP4), DeepSeek-V3 (BF16 or FP8 E4M3 with 128x128
    block scales), OLMoE, Granite-MoE, Phi-3.5-MoE. ``bits`` 4 or 8,
    ``block_size`` 0 (one scale per row) or a power of two >= 16 dividing the
    hidden and intermediate sizes, ``symmetric=False`` adds zero points.

    Prints one progress line per layer to stderr (``progress``) and returns
    a summary: {"layers": {name: {"fc1": rel L2, "fc2": rel L2}}, "seconds",
    "source_bytes", "out_bytes", "family"}. Nothing is left at ``out`` unless
    the whole file was written and validated.
    """
    t0 = time.perf_counter()
    src = os.fspath(checkpoint)
    dst = os.fspath(out)
    if not os.path.isdir(src):
        raise ValueError(f"{src}: not a checkpoint folder (expected a folder with config.json and safetensors)")
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")
    with Checkpoint(src) as ck:
        cfg = ck.config
        if cfg is None:
            raise ValueError(f"{src}: no config.json")
        fam = family_of(cfg, f"{src}/config.json")
        where = f"{src}/config.json"
        E = num_experts(fam, cfg, where)
        I = config_int(cfg, fam.inter_key, where)
        H = config_int(cfg, "hidden_size", where)
        k = config_int(cfg, "num_experts_per_tok", where)
        if k > E:
            raise ValueError(f"{where}: num_experts_per_tok {k} exceeds the {E} experts")
        check_block(block_size, {"hidden_size": H, fam.inter_key: I}, where)
        routing = fam.routing(cfg)
        rattrs = qmoe_routing_attrs(routing)
        layer_ids = moe_layers(fam, cfg, where)
        if not layer_ids:
            raise ValueError(f"{where}: no MoE layer (by {fam.name}'s config rules)")

        # plan: every tensor's name, dtype and shape before anything is quantized
        plans = []
        for i in layer_ids:
            s = _Sources(ck, fam, cfg, i, E, H, I)
            gating = _gating(fam, cfg, s.fusion, s.where)
            n1 = 2 * I
            name = f"model.layers.{i}.{fam.module_block}"
            p = f"model.layers.{i}.{fam.ckpt_block}"
            tensors = [(f"{name}.{t}", dt, sh) for t, dt, sh in
                       _quant_shapes("fc1", E, n1, H, bits, block_size, symmetric, s.fc1_bias is not None) +
                       _quant_shapes("fc2", E, H, I, bits, block_size, symmetric, s.fc2_bias is not None)]
            copies = []  # (checkpoint name, file name)
            router: Dict[str, str] = {}
            for role, suffix in fam.router.items():
                cname = f"{p}.{suffix}"
                if cname not in ck:
                    if role == "bias":
                        continue
                    raise ValueError(f"{s.where}: missing tensor {cname!r} (the router's {role})")
                dt, sh, _ = ck.info(cname)
                want = (E, H) if role == "weight" else (E,)
                if tuple(sh) != want:
                    raise ValueError(f"{s.where}: tensor {cname!r}: expected shape {list(want)}, got {list(sh)}")
                if dt not in ("F32", "F16", "BF16"):
                    raise ValueError(f"{s.where}: tensor {cname!r}: expected F32, F16 or BF16, got {dt}")
                router[role] = f"{name}.router.{role}"
                copies.append((cname, router[role]))
                tensors.append((router[role], dt, tuple(sh)))
            shared = []
            for suffix in fam.shared:
                cname = f"{p}.{suffix}"
                if cname not in ck:
                    raise ValueError(f"{s.where}: missing tensor {cname!r} (the shared expert)")
                dt, sh, _ = ck.info(cname)
                if dt not in ("F32", "F16", "BF16"):
                    raise ValueError(f"{s.where}: tensor {cname!r}: expected F32, F16 or BF16, got {dt}")
                shared.append(f"{name}.{suffix}")
                copies.append((cname, shared[-1]))
                tensors.append((shared[-1], dt, tuple(sh)))
            attrs = dict(rattrs, expert_weight_bits=bits, block_size=block_size, **gating.attributes())
            meta = {"routing": json.dumps(routing), "router": json.dumps(router), "shared": json.dumps(shared),
                    "source": json.dumps({"family": fam.name, "model_type": fam.model_type, "dtype": s.dtype,
                                          "tensors": s.names}),
                    "quantization": _quant_meta(bits, block_size, symmetric, _ERR_PLACEHOLDER, _ERR_PLACEHOLDER)}
            src_bytes = sum(int(np.prod(ck.info(n)[1], dtype=np.int64)) * ck.raw(n).itemsize for n in s.names)
            plans.append(dict(i=i, name=name, sources=s, gating=gating, tensors=tensors, copies=copies,
                              attrs=attrs, meta=meta, src_bytes=src_bytes))

        file_meta = {"hf.model_type": fam.model_type, "hf.config": json.dumps(cfg),
                     "hf.converted_by": "qmoe.hf.convert"}
        all_tensors = [t for pl in plans for t in pl["tensors"]]
        layers_decl = [(pl["name"], pl["attrs"], pl["meta"]) for pl in plans]
        total = sum(pl["src_bytes"] for pl in plans)
        errors: Dict[str, Dict[str, float]] = {}
        done_bytes = 0
        with StreamWriter(dst, layers_decl, all_tensors, file_meta) as wr:
            for n, pl in enumerate(plans):
                t1 = time.perf_counter()
                s = pl["sources"]
                w, _, err = quantize_layer(s.fc1, s.fc2, E=E, H=H, I=I, gating=pl["gating"], fc1_bias=s.fc1_bias,
                                           fc2_bias=s.fc2_bias, k=k, normalize=rattrs["normalize_routing_weights"],
                                           bits=bits, block_size=block_size, symmetric=symmetric, threads=threads,
                                           where=s.where)
                for t, a in w.items():
                    wr.write(f"{pl['name']}.{t}", a)
                for cname, fname in pl["copies"]:
                    wr.write(fname, ck.raw(cname))
                    ck.release(cname)
                s.release()
                errors[pl["name"]] = err
                pl["meta"]["quantization"] = _quant_meta(bits, block_size, symmetric, f"{err['fc1']:.6e}",
                                                         f"{err['fc2']:.6e}")
                done_bytes += pl["src_bytes"]
                if progress:
                    el = time.perf_counter() - t0
                    rate = done_bytes / max(el, 1e-9)
                    eta = (total - done_bytes) / rate if rate > 0 else math.inf
                    print(f"[{n + 1}/{len(plans)}] {pl['name']}: {pl['src_bytes'] / 1e9:.3f} GB in "
                          f"{time.perf_counter() - t1:.2f} s, {rate / 1e9:.2f} GB/s overall, ETA {eta:.0f} s; "
                          f"rel L2 fc1 {err['fc1']:.3e} fc2 {err['fc2']:.3e}", file=sys.stderr, flush=True)
            wr.set_layer_metadata({pl["name"]: pl["meta"] for pl in plans})
            path = wr.close()
    secs = time.perf_counter() - t0
    return {"layers": errors, "seconds": secs, "source_bytes": total, "out_bytes": os.path.getsize(path),
            "family": fam.name, "path": path}


def _quant_meta(bits: int, block: int, symmetric: bool, e1: str, e2: str) -> str:
    return (f'{{"bits": {bits}, "block_size": {block}, "symmetric": {str(symmetric).lower()}, '
            f'"rel_l2_fc1": {e1}, "rel_l2_fc2": {e2}}}')
