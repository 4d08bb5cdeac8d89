"""Converter throughput and peak memory on a synthetic checkpoint.

Writes a Qwen3-MoE-shaped checkpoint (qwen3-30b-a3b layer shapes: H 2048,
moe_intermediate 768, 128 experts, k 8; BF16, the hub's per-expert names,
sharded with an index) of ``--layers`` MoE layers (2 = 2.42 GB of experts),
then runs ``python -m qmoe.hf convert`` on it in a fresh process and reports:

* wall time and GB/s of expert weights read (source bytes / wall time);
* the converter process's peak RSS (``ru_maxrss``) against the bound
  1.5 GiB + one layer's experts (source bytes);
* ceilings measured in the same run: ``qmoe.quantize`` alone on float32 data
  already in memory, on the same thread count (the compute ceiling of the
  quantization step), and reading the shards from the page cache.

    python bench/convert_checkpoint.py [--layers 2] [--bits 4] [--block 128] [--threads N] [--dir /tmp/ck]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

H, I, E, K = 2048, 768, 128, 8


def write_checkpoint(folder: str, layers: int) -> int:
    """Per-expert BF16 tensors, one shard per layer (hub naming); returns the expert bytes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map = {}
    total = 0
    for i in range(layers):
        t = {}
        p = f"model.layers.{i}.mlp"
        for j in range(E):
            for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                f32 = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
                t[f"{p}.experts.{j}.{proj}.weight"] = (f32.view(np.uint32) >> 16).astype(np.uint16)
                total += f32.size * 2
        t[f"{p}.gate.weight"] = (rng.standard_normal((E, H), dtype=np.float32).view(np.uint32) >> 16).astype(
            np.uint16)
        fname = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        _save_bf16(t, os.path.join(folder, fname))
        weight_map.update({n: fname for n in t})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=H, num_hidden_layers=layers,
               num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I, intermediate_size=6144,
               norm_topk_prob=True, hidden_act="silu", decoder_sparse_step=1, mlp_only_layers=[],
               torch_dtype="bfloat16")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return total


def _save_bf16(tensors: dict, path: str) -> None:
    """A safetensors file of BF16 tensors given as uint16 bit patterns (NumPy has no bfloat16)."""
    header, off = {}, 0
    for n, a in tensors.items():
        header[n] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--dir", default="/tmp/qmoe_convert_bench")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import qmoe

    ck = os.path.join(args.dir, "ckpt")
    out = os.path.join(args.dir, "out.safetensors")
    t0 = time.perf_counter()
    total = write_checkpoint(ck, args.layers)
    print(f"synthetic qwen3-30b-a3b-shaped checkpoint: {args.layers} MoE layers, {total / 2**30:.2f} GiB of BF16 "
          f"experts in {time.perf_counter() - t0:.1f} s")

    # ceiling 1: reading the shards (page cache), all threads
    shards = sorted(p for p in os.listdir(ck) if p.endswith(".safetensors"))

    def read(p: str) -> int:
        n = 0
        with open(os.path.join(ck, p), "rb") as f:
            while True:
                b = f.read(1 << 24)
                if not b:
                    return n
                n += len(b)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        nread = sum(pool.map(read, shards))
    read_gbps = nread / (time.perf_counter() - t0) / 1e9

    # ceiling 2: qmoe.quantize alone on float32 experts in memory, same threads
    rng = np.random.default_rng(1)
    mats = [rng.standard_normal((2 * I, H), dtype=np.float32) for _ in range(16)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(lambda m: qmoe.quantize(m[None], bits=args.bits, block_size=args.block), mats * 4))
    q_gbps = 64 * mats[0].size * 2 / (time.perf_counter() - t0) / 1e9  # in BF16 source bytes

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "qmoe.hf", "convert", ck, "-o", out, "--bits", str(args.bits),
                        "--block", str(args.block), "--threads", str(args.threads)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(r.stderr.strip().splitlines()[-1])
    print(r.stdout.strip())
    layer_bytes = total / args.layers
    bound = 1.5 * 2**30 + layer_bytes
    res = dict(layers=args.layers, source_bytes=total, seconds=wall, gbps=total / wall / 1e9, peak_rss=peak,
               bound=bound, read_gbps=read_gbps, quantize_gbps=q_gbps, threads=args.threads, bits=args.bits,
               block=args.block, out_bytes=os.path.getsize(out), peak_before=before)
    print(f"convert: {total / 1e9:.2f} GB of BF16 experts in {wall:.2f} s = {res['gbps']:.2f} GB/s "
          f"({args.threads} threads, {args.bits}-bit block {args.block}); ceilings in this run: quantize alone "
          f"{q_gbps:.2f} GB/s, reading the shards {read_gbps:.2f} GB/s")
    print(f"peak RSS of the converter {peak / 2**30:.2f} GiB; bound 1.5 GiB + one layer's experts "
          f"({layer_bytes / 2**30:.2f} GiB) = {bound / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    os.remove(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
