"""qmoe.distributed on the CPU (gloo): 1, 2 and 4 ranks, each with its own
tokens, give bit for bit the single-device CPU layer's output on the
concatenation of every rank's tokens (rank order). Also qmoe.route (against
the layer and a NumPy top-k) and the expert-range file loader the ranks use.

The parent writes every case once (a qmoe file of the layer, the inputs of
the whole batch); ``torch.multiprocessing.spawn`` starts the ranks (file://
rendezvous in a temporary folder), which run every case and save their rows;
the tests compare them with a single :class:`qmoe.Layer` run here."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Dict, Optional, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import qmoe  # noqa: E402
import qmoe.distributed  # noqa: E402
import qmoe_np  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer and batch. ``splits[W]`` is each rank's token count (sums to ``tokens``)."""
    name: str
    layer: Dict[str, object]  # qmoe_np.make_layer arguments (shape, bits, block, activation, attributes)
    tokens: int
    splits: Dict[int, Tuple[int, ...]]
    level: int = 0
    dtype: str = "float32"
    router_weights: bool = False
    from_file: bool = False  # ExpertParallelLayer.from_file, else the constructor with the full weights
    big: bool = False  # quantized with qmoe.quantize (the NumPy quantizer is slow at this size)


SWIGLU = dict(E=6, H=64, I=32, bits=4, block=16, zero_points=True, bias=True, activation_type="swiglu",
              swiglu_fusion=1, k=3, normalize_routing_weights=1, swiglu_limit=7.0, activation_alpha=1.702,
              activation_beta=1.0)
CASES = [
    # Enough tokens for ~75 rows per expert (the reuse regime) and few for others.
    Case("swiglu-b16-zp-level0", SWIGLU, 150, {1: (150,), 2: (97, 53), 4: (60, 0, 41, 49)}),
    Case("swiglu-b16-zp-level4-rw-file", SWIGLU, 37, {1: (37,), 2: (7, 30), 4: (11, 9, 0, 17)}, level=4,
         router_weights=True, from_file=True),
    Case("relu-8bit-rowwise-bf16-file", dict(E=5, H=32, I=48, bits=8, block=0, zero_points=False, bias=True,
                                             activation_type="relu", k=2),
         29, {2: (0, 29), 4: (8, 8, 8, 5)}, dtype="bfloat16", from_file=True),
    Case("swiglu-fusion0-b32-f16-rw", dict(E=8, H=64, I=64, bits=4, block=32, zero_points=True, bias=True,
                                           activation_type="swiglu", swiglu_fusion=0, k=2,
                                           activation_alpha=1.702, activation_beta=1.0),
         45, {2: (20, 25), 4: (1, 14, 30, 0)}, dtype="float16", router_weights=True),
    # I so large that the CPU layer's chunk is 32 tokens: 80 tokens cross two chunk boundaries,
    # and rank boundaries fall inside chunks.
    Case("relu-b16-zp-chunks", dict(E=4, H=16, I=262128, bits=4, block=16, zero_points=True, bias=True,
                                    activation_type="relu", k=2),
         80, {2: (50, 30), 4: (20, 0, 37, 23)}, from_file=True, big=True),
]
WORLDS = (2, 4)
LAYER = "model.layers.0.mlp"


def _layer_spec(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    spec = dict(case.layer)
    shape = {k: spec.pop(k) for k in ("E", "H", "I", "bits", "block", "zero_points", "bias", "activation_type",
                                       "swiglu_fusion") if k in spec}
    if case.big:  # make_layer's float64 dequantization is the slow part at this size: skip it
        weights, attrs = _quick_layer(rng, **shape, **spec)
    else:
        weights, attrs, _ = qmoe_np.make_layer(rng, **shape, **spec)
    return weights, attrs, rng


def _quick_layer(rng, *, E, H, I, bits, block, zero_points, bias, activation_type, **attrs):
    """make_layer's layer (non-gated) without the float64 matrices, quantized by qmoe."""
    weights = {}
    for name, (n, kdim) in {"fc1": (I, H), "fc2": (H, I)}.items():
        q = qmoe.quantize(rng.standard_normal((E, n, kdim)).astype(np.float32) * 0.1, bits, block,
                          not zero_points)
        weights[f"{name}_experts_weights"], weights[f"{name}_scales"] = q.weights, q.scales
        if q.zero_points is not None:
            weights[f"{name}_zero_points"] = q.zero_points
        if bias:
            weights[f"{name}_experts_bias"] = (rng.standard_normal((E, n)) * 0.1).astype(np.float32)
    return weights, dict(activation_type=activation_type, expert_weight_bits=bits, block_size=block, **attrs)


def _write_case(folder: str, i: int, case: Case) -> None:
    weights, attrs, rng = _layer_spec(case, 100 + i)
    qmoe.save(os.path.join(folder, f"case{i}.safetensors"), {LAYER: dict(**weights, **attrs)})
    E, H = case.layer["E"], case.layer["H"]
    x = rng.standard_normal((case.tokens, H)).astype(np.float32)
    logits = rng.standard_normal((case.tokens, E)).astype(np.float32)
    rw = rng.uniform(0.1, 1.0, (case.tokens, E)).astype(np.float32)
    np.savez(os.path.join(folder, f"case{i}.npz"), x=x, logits=logits, rw=rw)


def _inputs(folder: str, i: int, case: Case, lo: int, hi: int):
    """torch CPU tensors of tokens [lo, hi) in the case's dtype."""
    d = np.load(os.path.join(folder, f"case{i}.npz"))
    dt = _DTYPES[case.dtype]
    x, lg = (torch.from_numpy(d[n][lo:hi]).to(dt) for n in ("x", "logits"))
    rw = torch.from_numpy(d["rw"][lo:hi]).to(dt) if case.router_weights else None
    return x, lg, rw


def _full_weights(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, object]]:
    f = qmoe.open(path)
    info = f.layers[LAYER]
    return {n: f.tensor(f"{LAYER}.{n}") for n in info.tensors}, info.attributes


def _build(folder: str, i: int, case: Case, group=None):
    path = os.path.join(folder, f"case{i}.safetensors")
    if case.from_file:
        return qmoe.distributed.ExpertParallelLayer.from_file(path, LAYER, group=group, threads=1,
                                                              accuracy_level=case.level)
    weights, attrs = _full_weights(path)
    return qmoe.distributed.ExpertParallelLayer(**weights, **attrs, group=group, threads=1,
                                                accuracy_level=case.level)


def _expect_error(fn, kind) -> str:
    try:
        fn()
    except kind as e:
        return str(e)
    return "no error"


# --------------------------------------------------------------------------- the ranks

def _rank_main(rank: int, world: int, folder: str) -> None:
    import qmoe.distributed  # noqa: F401 (spawned: a fresh interpreter)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous{world}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        times = {}
        for i, case in enumerate(CASES):
            if world not in case.splits:
                continue
            counts = case.splits[world]
            lo = sum(counts[:rank])
            t0 = time.perf_counter()
            layer = _build(folder, i, case)
            x, lg, rw = _inputs(folder, i, case, lo, lo + counts[rank])
            y = layer(x, lg, rw)
            assert y.dtype == x.dtype and y.shape == x.shape
            np.save(os.path.join(folder, f"out_w{world}_c{i}_r{rank}.npy"), y.float().numpy())
            times[case.name] = time.perf_counter() - t0
        errors = {}
        if world == 2:
            layer = _build(folder, 0, CASES[0])
            x, lg, _ = _inputs(folder, 0, CASES[0], 0, 4)
            if rank == 1:
                x = x[:, :32].contiguous()  # the wrong hidden size on rank 1 only
            errors["hidden"] = _expect_error(lambda: layer(x, lg), ValueError)
            # The layer still works after a refused call.
            x, lg, _ = _inputs(folder, 0, CASES[0], 0, 4)
            errors["after"] = str(layer(x, lg).shape)
            if rank == 0:
                x = x.to(torch.float16)
                lg = lg.to(torch.float16)
            errors["dtypes"] = _expect_error(lambda: layer(x, lg), TypeError)
            # Ranks disagreeing on the layer: rank 1 with another activation.
            weights, attrs = _full_weights(os.path.join(folder, "case2.safetensors"))
            attrs = dict(attrs, activation_type="silu" if rank == 1 else "relu")
            errors["attributes"] = _expect_error(
                lambda: qmoe.distributed.ExpertParallelLayer(**weights, **attrs, threads=1), ValueError)
            # Fewer experts than ranks.
            one = {n: v[:1] for n, v in weights.items()}
            errors["experts"] = _expect_error(
                lambda: qmoe.distributed.ExpertParallelLayer(**one, **dict(attrs, k=1), threads=1), ValueError)
        with open(os.path.join(folder, f"result_w{world}_r{rank}.json"), "w") as f:
            json.dump({"times": times, "errors": errors}, f)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, folder: str, seconds: float = 240) -> None:
    ctx = mp.spawn(_rank_main, args=(world, folder), nprocs=world, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{world} gloo ranks did not finish within {seconds} s")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("ep"))
    for i, case in enumerate(CASES):
        _write_case(d, i, case)
    for world in WORLDS:
        _spawn(world, d)
    return d


_REFERENCE: Dict[int, np.ndarray] = {}


def _reference(folder: str, i: int) -> np.ndarray:
    """The single-device CPU layer on the whole batch, as float32."""
    if i not in _REFERENCE:
        case = CASES[i]
        weights, attrs = _full_weights(os.path.join(folder, f"case{i}.safetensors"))
        layer = qmoe.Layer(**weights, **attrs, threads=1, accuracy_level=case.level)
        x, lg, rw = _inputs(folder, i, case, 0, case.tokens)
        _REFERENCE[i] = layer(x, lg, rw).float().numpy()
    return _REFERENCE[i]


def _same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("i", range(len(CASES)), ids=[c.name for c in CASES])
def test_ranks_give_the_single_layers_bits(folder, world, i):
    case = CASES[i]
    if world not in case.splits:
        pytest.skip(f"{case.name}: no split for {world} ranks")
    want = _reference(folder, i)
    got = np.concatenate([np.load(os.path.join(folder, f"out_w{world}_c{i}_r{r}.npy")) for r in range(world)])
    assert np.isfinite(want).all()
    assert _same_bits(got, want), f"max |diff| {np.abs(got - want).max()}"


def test_the_chunk_case_crosses_chunks():
    case = CASES[-1]
    chunk = qmoe.distributed.cpu_chunk_tokens(case.layer["k"], case.layer["H"], case.layer["I"])
    assert chunk == 32 and case.tokens > 2 * chunk


def test_errors_reach_every_rank(folder):
    res = [json.load(open(os.path.join(folder, f"result_w2_r{r}.json")))["errors"] for r in range(2)]
    assert "input: expected [..., H = 64], got (4, 32)" in res[1]["hidden"]
    assert "rank(s) [1] refused their arguments" in res[0]["hidden"]
    assert res[0]["after"] == res[1]["after"] == "torch.Size([4, 64])"
    for r in range(2):
        assert "input: the ranks' dtypes differ" in res[r]["dtypes"]
        assert "group: rank 1 built the layer with another attributes" in res[r]["attributes"] or \
            "group: rank 0 built the layer with another attributes" in res[r]["attributes"]
        assert "group: the layer has 1 experts, fewer than the group's 2 ranks" in res[r]["experts"]


def test_world_size_one_in_process(tmp_path, folder):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        for i in (0, 2):
            case = CASES[i]
            layer = _build(folder, i, case)
            assert layer.experts == (0, case.layer["E"]) and layer.world_size == 1
            x, lg, rw = _inputs(folder, i, case, 0, case.tokens)
            # [B, S, H] input: the output keeps the shape.
            n = case.tokens - case.tokens % 2
            y = layer(x[:n].reshape(2, n // 2, -1), lg[:n].reshape(2, n // 2, -1),
                      None if rw is None else rw[:n].reshape(2, n // 2, -1))
            assert y.shape == (2, n // 2, case.layer["H"])
            single = qmoe.Layer(**_full_weights(os.path.join(folder, f"case{i}.safetensors"))[0],
                                **_full_weights(os.path.join(folder, f"case{i}.safetensors"))[1], threads=1,
                                accuracy_level=case.level)
            want = single(x[:n], lg[:n], None if rw is None else rw[:n]).float().numpy()
            assert _same_bits(y.reshape(n, -1).float().numpy(), want)
            assert layer(x[:0], lg[:0]).shape == (0, case.layer["H"])
        with pytest.raises(ValueError, match=r"router_logits: expected \(3, 6\)"):
            layer0 = _build(folder, 0, CASES[0])
            layer0(torch.zeros(3, 64), torch.zeros(3, 5))
        with pytest.raises(ValueError, match="expected a tensor on cpu"):
            layer0(torch.zeros(3, 64, device="meta"), torch.zeros(3, 6))
        with pytest.raises(TypeError, match="input: expected a torch tensor"):
            layer0(np.zeros((3, 64), np.float32), torch.zeros(3, 6))
    finally:
        dist.destroy_process_group()


def test_nccl_one_gpu(tmp_path, folder):
    """The NCCL path on one GPU (world size 1): CUDA local layer, all-to-all through NCCL, the
    combine on the GPU. Within the CUDA tolerance of float64 (it rounds each expert's y + b2 to
    the activation dtype before combining), and the same bits run to run."""
    if not (torch.cuda.is_available() and qmoe.cuda_available() and dist.is_nccl_available()):
        pytest.skip("needs qmoe's CUDA backend, a GPU and NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous_nccl", rank=0, world_size=1)
    try:
        for i in (0, 2):
            case = CASES[i]
            path = os.path.join(folder, f"case{i}.safetensors")
            layer = qmoe.distributed.ExpertParallelLayer.from_file(path, LAYER, device="cuda")
            x, lg, rw = _inputs(folder, i, case, 0, case.tokens)
            xd = x.to("cuda", torch.bfloat16)
            lgd, rwd = lg.to("cuda", torch.bfloat16), None if rw is None else rw.to("cuda", torch.bfloat16)
            y = layer(xd, lgd, rwd)
            assert y.dtype == torch.bfloat16 and y.device.type == "cuda"
            assert torch.equal(y.view(torch.int16), layer(xd, lgd, rwd).view(torch.int16))
            w, attrs = _full_weights(path)
            ref = qmoe.reference(xd.float().cpu().numpy(), lgd.float().cpu().numpy(),
                                 router_weights=None if rwd is None else rwd.float().cpu().numpy(), **w, **attrs)
            got = y.float().cpu().numpy().astype(np.float64)
            assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 2e-2
    finally:
        dist.destroy_process_group()


def test_needs_an_initialized_group(folder):
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        _build(folder, 0, CASES[0])


# --------------------------------------------------------------------------- qmoe.route

def _np_route(logits: np.ndarray, k: int, normalize: bool, mix: Optional[np.ndarray] = None):
    lg = logits.astype(np.float64)
    chosen = np.argsort(-lg, axis=1, kind="stable")[:, :k]
    p = np.exp(lg - lg.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    w = np.take_along_axis(p if mix is None else mix.astype(np.float64), chosen, axis=1)
    if normalize:
        w = w / w.sum(axis=1, keepdims=True)
    return chosen, w


@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("mix", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_route_matches_numpy_topk(normalize, mix, dtype):
    rng = np.random.default_rng(3)
    logits = np.round(rng.standard_normal((200, 10)), 1).astype(dtype)  # many ties: the lower index wins
    rw = rng.uniform(0.1, 1, (200, 10)).astype(dtype) if mix else None
    experts, weights = qmoe.route(logits, 4, normalize, rw)
    assert experts.dtype == np.int32 and weights.dtype == np.float32 and experts.shape == (200, 4)
    want_e, want_w = _np_route(logits.astype(np.float32), 4, normalize, None if rw is None else rw.astype(np.float32))
    np.testing.assert_array_equal(experts, want_e)
    np.testing.assert_allclose(weights, want_w, rtol=1e-6)
    # torch tensors and [B, S, E] too.
    e3, w3 = qmoe.route(torch.from_numpy(logits).reshape(20, 10, 10), 4, normalize,
                        None if rw is None else torch.from_numpy(rw).reshape(20, 10, 10))
    np.testing.assert_array_equal(e3.reshape(200, 4), experts)
    np.testing.assert_array_equal(w3.reshape(200, 4), weights)


@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("mix", [False, True])
def test_route_gives_the_layers_weights(normalize, mix):
    """A layer whose experts output exactly one-hot rows (zero weights, FC2 bias e_j) writes
    each chosen expert's float32 routing weight into its column: they are route's bits."""
    E, H, I, k, T = 8, 16, 16, 3, 64
    rng = np.random.default_rng(4)
    q1 = qmoe.quantize(np.zeros((E, I, H), np.float32), 4, 0, True)
    q2 = qmoe.quantize(np.zeros((E, H, I), np.float32), 4, 0, True)
    b2 = np.zeros((E, H), np.float32)
    b2[np.arange(E), np.arange(E)] = 1.0
    layer = qmoe.Layer(fc1_experts_weights=q1.weights, fc1_scales=q1.scales, fc2_experts_weights=q2.weights,
                       fc2_scales=q2.scales, fc2_experts_bias=b2, k=k, normalize_routing_weights=normalize,
                       threads=1)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    rw = rng.uniform(0.1, 1, (T, E)).astype(np.float32) if mix else None
    out = layer(logits[:, :1].repeat(H, 1), logits, rw)
    experts, weights = qmoe.route(logits, k, normalize, rw)
    want = np.zeros((T, H), np.float32)
    np.put_along_axis(want, experts.astype(np.int64), weights, axis=1)
    assert _same_bits(out, want)


def test_route_errors():
    lg = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"k: expected 1..E = 1..4"):
        qmoe.route(lg, 5)
    with pytest.raises(ValueError, match="router_weights: expected the shape of router_probs"):
        qmoe.route(lg, 2, 0, np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError, match="router_probs: expected dtype float32"):
        qmoe.route(np.zeros((3, 4), np.int32), 2)
    with pytest.raises(ValueError, match="normalize_routing_weights: expected 0 or 1"):
        qmoe.route(lg, 2, 2)
    e, w = qmoe.route(np.zeros((0, 4), np.float32), 2)
    assert e.shape == w.shape == (0, 2)


# --------------------------------------------------------------------------- expert ranges from a file

def test_load_expert_range(tmp_path):
    rng = np.random.default_rng(5)
    weights, attrs, _ = qmoe_np.make_layer(rng, **{k: v for k, v in SWIGLU.items()})
    path = str(tmp_path / "m.safetensors")
    qmoe.save(path, {"a": dict(**weights, **attrs), "b": dict(**weights, **dict(attrs, k=1))})
    x = rng.standard_normal((40, 64)).astype(np.float32)
    for first, end in ((0, 6), (1, 3), (5, 6)):
        part = qmoe.open(path).load("a", threads=1, experts=(first, end), k=1, normalize_routing_weights=1)
        assert part.num_experts == end - first and part.attributes["k"] == 1
        assert part.attributes["activation_type"] == "swiglu" and part.attributes["swiglu_fusion"] == 1
        sliced = qmoe.Layer(**{n: v[first:end] for n, v in weights.items()},
                            **dict(attrs, k=1, normalize_routing_weights=1), threads=1)
        lg = rng.standard_normal((40, end - first)).astype(np.float32)
        assert _same_bits(part(x, lg), sliced(x, lg))
    # qmoe.load: every layer's range (the stored k must fit it).
    layers = qmoe.load(path, threads=1, layers=["b"], experts=(2, 4))
    assert layers["b"].num_experts == 2
    whole = qmoe.open(path).load("a", threads=1, k=2)
    assert whole.num_experts == 6 and whole.attributes["k"] == 2
    for bad in ((3, 3), (0, 7), (-1, 2)):
        with pytest.raises(ValueError, match=rf"{path}: layer \"a\": experts \[{bad[0]}, {bad[1]}\) is not a "
                                             r"non-empty range within the layer's 6 experts \[0, 6\)"):
            qmoe.open(path).load("a", experts=bad, k=1)
    with pytest.raises(ValueError, match=r"layer \"a\" experts \[4, 6\): .*k"):
        qmoe.open(path).load("a", experts=(4, 6))  # the stored k = 3 > 2 experts
    with pytest.raises(TypeError, match=r"experts: expected \(first, end\)"):
        qmoe.open(path).load("a", experts=3)
    with pytest.raises(ValueError, match="end = -1"):
        qmoe.open(path).load("a", experts=(0, -1))

