"""The device arguments of qmoe.Layer / qmoe.qmoe and the things about them
that need no GPU: parsing of device="cpu" / "cuda" / "cuda:N", the error when
the CUDA backend is missing, the CPU layer's device properties, max_tokens
checks, forward_async refused on a CPU layer, and torch CPU tensors (when torch
is installed). The GPU itself is tested in test_cuda.py."""

import numpy as np
import pytest

import qmoe
from qmoe_np import make_layer


def _args(seed=0, **kw):
    rng = np.random.default_rng(seed)
    weights, attrs, _ = make_layer(rng, E=4, H=64, I=32, block=16, bias=True, activation_type="silu", **kw)
    attrs["k"] = 2
    x = rng.standard_normal((5, 64)).astype(np.float32)
    lg = rng.standard_normal((5, 4)).astype(np.float32)
    return weights, attrs, x, lg


def test_cuda_available_is_a_bool():
    assert isinstance(qmoe.cuda_available(), bool)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:", "cuda:-1", "CUDA", "cuda:0:1", "cuda 0", "", "gpu"])
def test_bad_device_strings(device):
    weights, attrs, x, lg = _args()
    with pytest.raises(ValueError, match=r'^device: expected "cpu", "cuda" or "cuda:N"'):
        qmoe.Layer(**weights, **attrs, device=device)
    with pytest.raises(ValueError, match=r"^device: "):
        qmoe.qmoe(x, lg, **weights, **attrs, device=device)


@pytest.mark.parametrize("device", [0, None, 1.0, b"cuda"])
def test_device_not_a_string(device):
    weights, attrs, _, _ = _args()
    with pytest.raises(TypeError, match=r"^device: "):
        qmoe.Layer(**weights, **attrs, device=device)


@pytest.mark.skipif(qmoe.cuda_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_unavailable_is_a_clear_error(device):
    weights, attrs, x, lg = _args()
    with pytest.raises(ValueError, match=r"CUDA"):
        qmoe.Layer(**weights, **attrs, device=device)
    with pytest.raises(ValueError, match=r"CUDA"):
        qmoe.qmoe(x.astype(np.float16), lg.astype(np.float16), **weights, **attrs, device=device)


def test_cpu_layer_device_properties():
    weights, attrs, x, lg = _args()
    layer = qmoe.Layer(**weights, **attrs, threads=2)
    assert layer.backend == "cpu" and layer.device == "cpu"
    assert layer.device_bytes == 0 and layer.workspace_bytes == 0
    assert "threads=2" in repr(layer) and "device_bytes" not in repr(layer)
    # max_tokens means nothing on the CPU, but is still checked.
    np.testing.assert_array_equal(qmoe.Layer(**weights, **attrs, device="cpu", max_tokens=1)(x, lg), layer(x, lg))


@pytest.mark.parametrize("max_tokens,exc", [(0, ValueError), (-5, ValueError), (1 << 25, ValueError),
                                            (1.5, TypeError), ("16", TypeError)])
def test_bad_max_tokens(max_tokens, exc):
    weights, attrs, _, _ = _args()
    with pytest.raises(exc, match=r"^max_tokens: "):
        qmoe.Layer(**weights, **attrs, max_tokens=max_tokens)


def test_core_backend_argument():
    weights, attrs, _, _ = _args()
    core = qmoe._core
    w = qmoe._weights(weights)
    a = qmoe._attributes(**{n: attrs.get(n, d) for n, d in [
        ("k", 1), ("activation_type", "relu"), ("normalize_routing_weights", 0), ("use_sparse_mixer", 0),
        ("expert_weight_bits", 4), ("block_size", 0), ("swiglu_fusion", 0), ("swiglu_limit", float("inf")),
        ("activation_alpha", 1.0), ("activation_beta", 0.0)]})
    assert core.Layer(w, a, 2, 0).backend == "cpu"  # the old positional form still works
    assert core.Layer(w, a, 2, 0, core.BACKEND_CPU).backend == "cpu"
    with pytest.raises(ValueError, match=r'^backend: expected "cpu" or "cuda", got "gpu"'):
        core.Layer(w, a, 2, 0, "gpu")
    with pytest.raises(ValueError, match=r"^backend: expected 0 \(cpu\) or 1 \(cuda\), got 7"):
        core.Layer(w, a, 2, 0, 7)
    with pytest.raises(TypeError, match=r"^backend: "):
        core.Layer(w, a, 2, 0, 1.0)


def test_forward_async_refused_on_a_cpu_layer():
    weights, attrs, x, lg = _args()
    layer = qmoe.Layer(**weights, **attrs)
    with pytest.raises(ValueError, match=r"^forward_async: the layer runs on the CPU backend"):
        layer._layer.forward_async(x, lg, None, np.empty_like(x), 0)


# --------------------------------------------------------------------------
# torch CPU tensors (where torch is installed)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_cpu_tensors(dtype):
    torch = pytest.importorskip("torch")
    weights, attrs, x, lg = _args(1)
    layer = qmoe.Layer(**weights, **attrs, threads=2)
    tdt = getattr(torch, dtype)
    xt, lgt = torch.from_numpy(x).to(tdt), torch.from_numpy(lg).to(tdt)
    rwt = torch.rand((5, 4)).to(tdt)
    y = layer(xt, lgt, rwt)
    assert isinstance(y, torch.Tensor) and y.dtype == tdt and y.shape == xt.shape and y.device.type == "cpu"
    # Same bits as NumPy arrays of the same values (bfloat16 via float32 is exact in the reference).
    ref = qmoe.reference(xt.float().numpy(), lgt.float().numpy(), router_weights=rwt.float().numpy(),
                         **weights, **attrs)
    err = np.abs(y.float().numpy() - ref).max() / np.abs(ref).max()
    assert err <= (1e-5 if dtype == "float32" else 1e-2)
    if dtype != "bfloat16":
        yn = layer(xt.numpy(), lgt.numpy(), rwt.numpy())
        np.testing.assert_array_equal(y.numpy().view(np.uint8), yn.view(np.uint8))
    # Mixed torch CPU / NumPy arguments, non-contiguous and requires_grad tensors.
    x_nc = xt.t().contiguous().t()
    assert not x_nc.is_contiguous()
    y2 = layer(x_nc, lgt.numpy() if dtype != "bfloat16" else lgt, rwt.clone().requires_grad_(True))
    assert torch.equal(y2.view(torch.uint8), y.view(torch.uint8))
    # 3-D input keeps its shape.
    assert layer(xt.reshape(1, 5, 64), lgt).shape == (1, 5, 64)


def test_torch_bad_tensors():
    torch = pytest.importorskip("torch")
    weights, attrs, x, lg = _args(2)
    layer = qmoe.Layer(**weights, **attrs)
    with pytest.raises(TypeError, match=r"^input: expected dtype float32, float16 or bfloat16, got torch.float64"):
        layer(torch.from_numpy(x).double(), torch.from_numpy(lg))
    with pytest.raises(ValueError, match=r"^router_probs: expected shape \[5, 4\], got \[5, 3\]"):
        layer(torch.from_numpy(x), torch.from_numpy(lg[:, :3].copy()))
    with pytest.raises(ValueError, match=r"^input: .*scalar"):
        layer(torch.tensor(1.0), torch.from_numpy(lg))
