"""transformers MoE models with qmoe experts against transformers' own experts:
decode and prefill speed and memory, one run, both sides alternating.

Models are built from configs with the layer shapes of qwen3-30b-a3b
(H 2048, moe_intermediate 768, 128 experts, k 8) and gpt-oss-20b (H 2880,
I 2880, 32 experts, k 4), random weights, ``--layers`` decoder layers with
their real attention, a 32768-token vocabulary (the MoE layers are the
subject). The baseline is transformers itself: float32 on the CPU, bfloat16
on CUDA, with the fastest of its built-in experts implementations ("eager",
"batched_mm", "grouped_mm"), picked by a timed decode in this same run. The
qmoe side is the same model after ``qmoe.hf.quantize_model`` (4-bit, block
``--block``: 128 for qwen3, 32 for gpt-oss whose 2880 no larger power of two
divides); both share every non-expert weight.

Per side: prefill tokens/s (one forward of a ``--prompt``-token prompt, KV
cache on), decode tokens/s at batch 1 (greedy single-token steps with the KV
cache, medians over ``--reps`` alternating repetitions of ``--tokens`` steps),
expert memory (float parameters vs qmoe's packed bytes) and, on CUDA, peak
allocated memory. Ceilings measured in the same run: the read bandwidth of
the device (CPU: qmoe.measure_read_bandwidth; CUDA: a device-to-device copy)
and what it implies for a decode step that reads every active expert's
weights once.

    python bench/hf_generate.py --device cpu --threads 2 [--models qwen3,gpt-oss] [--layers 4]
    python bench/hf_generate.py --device cuda [--layers 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Dict, List

import qmoe
import qmoe.hf

SHAPES = {
    "qwen3": dict(cls="Qwen3MoeConfig", hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                  num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4,
                  head_dim=128, norm_topk_prob=True, block=128),
    "gpt-oss": dict(cls="GptOssConfig", hidden_size=2880, intermediate_size=2880, num_local_experts=32,
                    num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                    block=32),  # 2880 = 90 * 32
}


def build(name: str, layers: int, dtype: Any, device: Any) -> Any:
    import torch
    import transformers as tf

    kw = dict(SHAPES[name])
    cls = getattr(tf, kw.pop("cls"))
    kw.pop("block")
    if name == "gpt-oss":
        kw["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2)
    cfg = cls(vocab_size=32768, num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False,
              **kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def qmoe_twin(model: Any, block: int, threads: int) -> Any:
    """A model sharing every non-expert parameter and buffer of ``model``, its
    experts quantized by qmoe (the float experts stay in ``model`` only)."""
    import itertools

    import torch

    from qmoe.hf._model import iter_experts

    found = list(iter_experts(model))
    for _, parent, attr, _ in found:
        setattr(parent, attr, None)  # copied without its experts
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, memo)
    for name, parent, attr, experts in found:
        setattr(parent, attr, experts)
        setattr(twin.get_submodule(name.rsplit(".", 1)[0]), attr, experts)
    del found
    with torch.no_grad():
        qmoe.hf.quantize_model(twin, bits=4, block_size=block, threads=threads)
    return twin


class ExpertTimer:
    """Time spent inside a model's experts modules (transformers' or qmoe's),
    by forward hooks: host clocks on the CPU, CUDA events on the GPU (read
    once at the end, so nothing waits in between)."""

    def __init__(self, model: Any, cuda: bool) -> None:
        import torch

        self.cuda, self.spans, self.t0 = cuda, [], None
        self._torch = torch
        mods = [m for m in model.modules()
                if type(m).__name__ == "QmoeExperts" or (hasattr(m, "is_transposed") and hasattr(m, "down_proj"))]
        for m in mods:
            m.register_forward_pre_hook(self._pre)
            m.register_forward_hook(self._post)
        self.active = False

    def _now(self) -> Any:
        if self.cuda:
            e = self._torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _pre(self, *_: Any) -> None:
        if self.active:
            self.t0 = self._now()

    def _post(self, *_: Any) -> None:
        if self.active:
            self.spans.append((self.t0, self._now()))

    def take(self) -> float:
        """Seconds inside the experts since the last take()."""
        if self.cuda:
            self._torch.cuda.synchronize()
            s = sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        else:
            s = sum(b - a for a, b in self.spans)
        self.spans = []
        return s


def timed_decode(model: Any, prompt: Any, steps: int, sync: Any, timer: Any = None) -> Dict[str, float]:
    import torch

    if timer is not None:
        timer.active = False
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        sync()
        t1 = time.perf_counter()
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        if timer is not None:
            timer.active = True
            timer.take()
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
        sync()
        t2 = time.perf_counter()
    res = {"prefill_s": t1 - t0, "decode_s": (t2 - t1) / steps}
    if timer is not None:
        timer.active = False
        res["decode_experts_s"] = timer.take() / steps
    return res


def graph_decode(model: Any, prompt: Any, steps: int) -> Dict[str, Any]:
    """Greedy decoding at batch 1 over a static KV cache with the decode step
    compiled by ``torch.compile(mode="reduce-overhead")`` -- inductor's CUDA
    graphs: the step is captured once and each token is one replay. This is
    how transformers itself runs a static cache fast. Returns decode seconds
    per token, the tokens and the inductor counters that tell whether CUDA
    graphs were skipped, or {"error": ...}."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    dev = prompt.device
    P = prompt.shape[1]
    warm = 3
    try:
        torch._dynamo.reset()
        counters.clear()
        cache = StaticCache(config=model.config, max_cache_len=P + warm + steps + 8)

        def step(ids: Any, pos: Any) -> Any:
            return model(ids, past_key_values=cache, cache_position=pos).logits[:, -1:].argmax(-1)

        fn = torch.compile(step, mode="reduce-overhead")
        with torch.no_grad():
            tok = model(prompt, past_key_values=cache, cache_position=torch.arange(P, device=dev),
                        use_cache=True).logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for s in range(warm):  # compile, record the graph
                tok = fn(tok, torch.tensor([P + s], device=dev)).clone()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            tokens = []
            t0 = time.perf_counter()
            for s in range(warm, warm + steps):
                tok = fn(tok, torch.tensor([P + s], device=dev)).clone()
                tokens.append(tok)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
        return {"decode_s": (t1 - t0) / steps, "compile_s": compile_s, "tokens": [int(t) for t in tokens[:8]],
                "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}
    except Exception as e:  # noqa: BLE001 - a model torch.compile cannot take
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}


def expert_bytes(model: Any) -> int:
    from qmoe.hf._model import iter_experts

    n = 0
    for _, _, _, mod in iter_experts(model):
        n += sum(p.numel() * p.element_size() for p in mod.parameters())
    for m in model.modules():
        if type(m).__name__ == "QmoeExperts":
            L = m.layer
            n += L.device_bytes if L.backend == "cuda" else L.packed_bytes
    return n


def run_model(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    cuda = args.device == "cuda"
    dev = torch.device("cuda:0" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    base = build(name, args.layers, dtype, dev)
    block = args.block if args.block is not None else SHAPES[name]["block"]
    q = qmoe_twin(base, block, args.threads)
    print(f"{name}: {args.layers} layers built and quantized in {time.perf_counter() - t0:.1f} s", flush=True)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 32768, (1, args.prompt), generator=g).to(dev)
    # the baseline's fastest experts implementation, by a short timed decode
    impls = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        try:
            base.set_experts_implementation(impl)
            timed_decode(base, prompt[:, :8], 2, sync)
            impls[impl] = min(timed_decode(base, prompt[:, :8], 4, sync)["decode_s"] for _ in range(2))
        except Exception as e:  # noqa: BLE001 - an implementation this build of torch lacks
            impls[impl] = float("inf")
            print(f"  experts_implementation={impl}: unavailable ({type(e).__name__}: {str(e)[:80]})")
    best = min(impls, key=impls.get)
    base.set_experts_implementation(best)
    print("  transformers experts implementations, decode ms: "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in impls.items()) + f" -> {best}")
    timed_decode(q, prompt[:, :8], 2, sync)  # warm-up
    runs: Dict[str, List[Dict[str, float]]] = {"transformers": [], "qmoe": []}
    timers = {"transformers": ExpertTimer(base, cuda), "qmoe": ExpertTimer(q, cuda)}
    peak: Dict[str, int] = {}
    for _ in range(args.reps):
        for side, m in (("transformers", base), ("qmoe", q)):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            runs[side].append(timed_decode(m, prompt, args.tokens, sync, timers[side]))
            if cuda:
                peak[side] = max(peak.get(side, 0), torch.cuda.max_memory_allocated())
    res: Dict[str, Any] = {"model": name, "layers": args.layers, "block": block, "impl": best, "impl_decode_ms":
                           {k: v * 1e3 for k, v in impls.items()}}
    if cuda and args.graph:
        # CUDA graphs: transformers' fastest implementation that captures, against qmoe
        gres: Dict[str, Any] = {}
        for impl in args.graph_impls.split(","):
            base.set_experts_implementation(impl)
            g = graph_decode(base, prompt, args.tokens)
            gres[f"transformers/{impl}"] = g
            print(f"  graph decode, transformers {impl}: " + (f"{g['decode_s'] * 1e3:.2f} ms/token (compiled in "
                                                               f"{g['compile_s']:.0f} s, cudagraph skips "
                                                               f"{g['cudagraph_skips']})" if "decode_s" in g
                                                               else g["error"]))
        base.set_experts_implementation(best)
        gq = graph_decode(q, prompt, args.tokens)
        gres["qmoe"] = gq
        print("  graph decode, qmoe: " + (f"{gq['decode_s'] * 1e3:.2f} ms/token (compiled in {gq['compile_s']:.0f} s, "
                                          f"cudagraph skips {gq['cudagraph_skips']})" if "decode_s" in gq
                                          else gq["error"]))
        ok = {k: v for k, v in gres.items() if k.startswith("transformers") and "decode_s" in v}
        if ok and "decode_s" in gq:
            bk = min(ok, key=lambda k: ok[k]["decode_s"])
            res["graph"] = {"runs": gres, "baseline": bk, "transformers_ms": ok[bk]["decode_s"] * 1e3,
                            "qmoe_ms": gq["decode_s"] * 1e3, "speedup": ok[bk]["decode_s"] / gq["decode_s"]}
        else:
            res["graph"] = {"runs": gres}
    for side in runs:
        d = statistics.median(x["decode_s"] for x in runs[side])
        p = statistics.median(x["prefill_s"] for x in runs[side])
        ex = statistics.median(x["decode_experts_s"] for x in runs[side])
        res[side] = {"decode_tok_s": 1 / d, "decode_ms": d * 1e3, "decode_experts_ms": ex * 1e3,
                     "prefill_tok_s": args.prompt / p,
                     "prefill_ms": p * 1e3, "expert_bytes": expert_bytes(base if side == "transformers" else q)}
        if cuda:
            res[side]["peak_allocated"] = peak[side]
    res["qmoe"]["qmoe_device_bytes"] = sum(m.layer.device_bytes + m.layer.workspace_bytes for m in q.modules()
                                           if type(m).__name__ == "QmoeExperts") if cuda else 0
    res["decode_speedup"] = res["qmoe"]["decode_tok_s"] / res["transformers"]["decode_tok_s"]
    res["decode_experts_speedup"] = res["transformers"]["decode_experts_ms"] / res["qmoe"]["decode_experts_ms"]
    res["prefill_speedup"] = res["qmoe"]["prefill_tok_s"] / res["transformers"]["prefill_tok_s"]
    res["expert_memory_ratio"] = res["qmoe"]["expert_bytes"] / res["transformers"]["expert_bytes"]
    cfg = base.config
    k, E = cfg.num_experts_per_tok, getattr(cfg, "num_experts", None) or cfg.num_local_experts
    res["active_expert_bytes_per_token"] = {s: res[s]["expert_bytes"] * k / E for s in ("transformers", "qmoe")}
    del base, q
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", default="qwen3,gpt-oss")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--block", type=int, default=None, help="qmoe block size (default: 128 qwen3, 32 gpt-oss)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--graph", action="store_true",
                    help="CUDA: also decode with the step compiled in CUDA graphs (torch.compile reduce-overhead)")
    ap.add_argument("--graph-impls", default="batched_mm,grouped_mm",
                    help="transformers experts implementations tried with --graph (the fastest is the baseline)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads)
    out: Dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "threads": args.threads,
                           "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    import transformers

    out["transformers"] = transformers.__version__
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        best = 0.0
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            y.copy_(x)
            torch.cuda.synchronize()
            best = max(best, 2 * x.numel() / (time.perf_counter() - t))
        out["copy_gbps"] = best / 1e9  # bytes read + written
        del x, y
    else:
        out["read_gbps"] = qmoe.measure_read_bandwidth(args.threads) / 1e9
    results = [run_model(m, args) for m in args.models.split(",")]
    out["results"] = results
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ceiling = out.get("read_gbps") or out.get("copy_gbps", 0) / 2
    print(f"\n{args.device} ({out.get('gpu', out['cpu'])}), {args.threads} threads, torch {out['torch']}, "
          f"transformers {out['transformers']}; {'read' if args.device == 'cpu' else 'copy/2'} bandwidth "
          f"{ceiling:.1f} GB/s (measured in this run)")
    print(f"{'model':8} {'side':24} {'decode tok/s':>12} {'ms/token':>8} {'in experts':>10} {'floor':>6} "
          f"{'prefill tok/s':>13} {'expert GB':>9}")
    for r in results:
        for side in ("transformers", "qmoe"):
            s = r[side]
            floor = r["active_expert_bytes_per_token"][side] / (ceiling * 1e9) * 1e3
            label = side + (f" ({r['impl']})" if side == "transformers" else f" (4-bit, block {r['block']})")
            print(f"{r['model']:8} {label:24} {s['decode_tok_s']:12.1f} {s['decode_ms']:8.1f} "
                  f"{s['decode_experts_ms']:10.1f} {floor:6.1f} {s['prefill_tok_s']:13.1f} "
                  f"{s['expert_bytes'] / 1e9:9.2f}")
        print(f"{'':8} qmoe/transformers: decode {r['decode_speedup']:.2f}x (experts alone "
              f"{r['decode_experts_speedup']:.2f}x), prefill {r['prefill_speedup']:.2f}x, expert memory "
              f"{r['expert_memory_ratio']:.3f}x")
        if "graph" in r and "speedup" in r["graph"]:
            gr = r["graph"]
            print(f"{'':8} CUDA graphs (static cache, torch.compile reduce-overhead): transformers "
                  f"({gr['baseline']}) {gr['transformers_ms']:.2f} "
                  f"ms/token, qmoe {gr['qmoe_ms']:.2f} ms/token: {gr['speedup']:.2f}x")
        elif "graph" in r:
            errs = "; ".join(f"{k}: {v.get('error', 'ok')}" for k, v in r["graph"]["runs"].items())
            print(f"{'':8} CUDA graphs: {errs}")
    print("(ms/token: a whole decode step; in experts: the part inside the experts modules, the only part qmoe "
          "replaces; floor: the active experts' weights read once at the measured bandwidth)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
