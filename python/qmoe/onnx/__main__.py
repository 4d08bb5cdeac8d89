"""``python -m qmoe.onnx``: the command line of :mod:`qmoe.onnx`.

    python -m qmoe.onnx offload MODEL.onnx -o OUT.onnx [--layout raw|cutlass]
                                [--bits 4|8] [--block-size N] [--asymmetric]
                                [--threads N] [--no-check]

``offload`` writes OUT.onnx and OUT.qmoe.safetensors (see
:func:`qmoe.onnx.offload`), then checks the result by opening it once with
:func:`qmoe.onnx.session` (every layer loaded and prepacked with ``--threads``
threads, the ONNX Runtime session built) unless ``--no-check``. Exit status:
0 done, 1 error (the message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qmoe.onnx",
                                description="qmoe and ONNX models: run a model's QMoE nodes on qmoe inside "
                                            "ONNX Runtime.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    o = sub.add_parser("offload", help="move every QMoE/MoE node's weights into a qmoe file and replace the "
                                       "node by a call into qmoe",
                       description="Writes OUT.onnx (the model with each com.microsoft::QMoE/MoE node replaced "
                                   "by a qmoe custom op) and OUT.qmoe.safetensors (the layers, raw layout) beside "
                                   "it. Run the result with qmoe.onnx.session(OUT.onnx).")
    o.add_argument("model", metavar="MODEL.onnx", help="the source model")
    o.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="the model to write")
    o.add_argument("--layout", choices=("raw", "cutlass"),
                   help="weight layout of QMoE nodes without the weights_prepacked attribute (raw: CPU "
                        "exports; cutlass: CUDA exports); required only for such nodes")
    o.add_argument("--bits", type=int, choices=(4, 8), default=4, help="quantization of float MoE nodes (4)")
    o.add_argument("--block-size", type=int, default=0, metavar="N",
                   help="quantization block of float MoE nodes (0 = one scale per row)")
    o.add_argument("--asymmetric", action="store_true", help="float MoE nodes: zero points (asymmetric)")
    o.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for the check (prepacking; ONNX Runtime intra-op threads)")
    o.add_argument("--no-check", action="store_true", help="do not open the result with qmoe.onnx.session")
    return p


def _offload(args: argparse.Namespace) -> int:
    from . import offload, session

    t0 = time.perf_counter()
    qfile = offload(args.model, args.output, layout=args.layout, bits=args.bits, block_size=args.block_size,
                    symmetric=not args.asymmetric)
    t1 = time.perf_counter()
    import qmoe

    f = qmoe.open(qfile)
    print(f"{args.output}: {len(f.layers)} layer(s) offloaded in {t1 - t0:.2f} s")
    for name, layer in f.layers.items():
        a = layer.attributes
        print(f"  {name}: E={layer.num_experts} H={layer.hidden_size} I={layer.inter_size} "
              f"{a['expert_weight_bits']}-bit block={a['block_size']} {a['activation_type']} k={a['k']}")
    print(f"{qfile}: {os.path.getsize(qfile)} bytes")
    data = args.output + ".data"
    print(f"{args.output}: {os.path.getsize(args.output)} bytes"
          + (f" (+ {os.path.getsize(data)} bytes in {os.path.basename(data)})" if os.path.exists(data) else ""))
    if not args.no_check:
        sess = session(args.output, threads=args.threads)
        print(f"checked: qmoe.onnx.session opened it ({len(sess.qmoe_layers)} layer(s) prepacked) in "
              f"{time.perf_counter() - t1:.2f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)  # exits 2 on usage errors
    if args.command == "offload" and (args.block_size < 0 or (args.threads is not None and args.threads < 1)):
        _parser().error("--block-size must be >= 0 and --threads >= 1")
    try:
        return _offload(args)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - e.g. protobuf's DecodeError for a file that is not a model
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
