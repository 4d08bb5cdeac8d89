"""``python -m qmoe.hf`` (also ``qmoe convert``): the command line of :mod:`qmoe.hf`.

    python -m qmoe.hf convert CHECKPOINT_DIR -o OUT.safetensors [--bits 4|8] [--block N]
                              [--zero-points] [--threads N] [--quiet] [--json FILE]

Writes every MoE layer of the checkpoint, quantized, with its router and
routing description (see :func:`qmoe.hf.convert`), printing one line per
layer (size, speed, ETA, quantization error) and a summary. Exit status: 0
done, 1 error (the message on stderr; nothing is left at OUT), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qmoe.hf",
                                description="Hugging Face MoE checkpoints to qmoe files.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    c = sub.add_parser("convert", help="quantize a checkpoint folder's MoE experts into a qmoe file",
                       description="Reads CHECKPOINT_DIR (config.json + safetensors shards) tensor by tensor and "
                                   "writes OUT: each MoE layer's experts quantized (raw ONNX Runtime QMoE layout), "
                                   "its router tensors and routing description. Families: Mixtral, Qwen2-MoE, "
                                   "Qwen3-MoE, gpt-oss (BF16 or MXFP4), DeepSeek-V3 (BF16 or FP8), OLMoE, "
                                   "Granite-MoE, Phi-3.5-MoE.")
    c.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    c.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    c.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits per weight (4)")
    c.add_argument("--block", "--block-size", dest="block", type=int, default=128, metavar="N",
                   help="weights per scale along the input axis: 0 = one scale per row, else a power of two "
                        ">= 16 (128)")
    c.add_argument("--zero-points", action="store_true", help="asymmetric quantization (zero points)")
    c.add_argument("--threads", type=int, default=None, metavar="N", help="quantization threads (all cores)")
    c.add_argument("--quiet", action="store_true", help="no per-layer progress lines")
    c.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    from . import convert

    try:
        s = convert(args.checkpoint, args.output, bits=args.bits, block_size=args.block,
                    symmetric=not args.zero_points, threads=args.threads, progress=not args.quiet)
    except (ValueError, TypeError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    errs = s["layers"].values()
    worst = max(max(e["fc1"], e["fc2"]) for e in errs)
    print(f"{s['path']}: {len(s['layers'])} {s['family']} layer(s), {s['source_bytes'] / 1e9:.3f} GB of experts "
          f"-> {s['out_bytes'] / 1e9:.3f} GB in {s['seconds']:.2f} s "
          f"({s['source_bytes'] / 1e9 / max(s['seconds'], 1e-9):.2f} GB/s); worst rel L2 error {worst:.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
