"""torch tensors at the boundary: recognising them without importing torch, and the CUDA
path of :class:`qmoe.Layer` (device tensors in, the call enqueued on torch's current stream)."""
from __future__ import annotations

import sys
from typing import Any

from . import _core

_DTYPE_CODES: dict = {}


def is_torch(x: Any) -> bool:
    """True for torch objects (tensors, devices), without importing torch."""
    return type(x).__module__.split(".", 1)[0] == "torch"


def is_torch_tensor(x: Any) -> bool:
    return is_torch(x) and hasattr(x, "data_ptr") and hasattr(x, "device")


def describe(x: Any) -> str:
    if is_torch_tensor(x):
        return f"a torch tensor on {x.device}"
    return f"a {type(x).__module__}.{type(x).__qualname__}"


def _dtype_codes(torch: Any) -> dict:
    """torch dtype -> the core's DTYPE_* code: the dtypes the CUDA path takes, and float32
    so that the library names a float32 router tensor's mismatch as on the CPU."""
    if not _DTYPE_CODES:
        _DTYPE_CODES.update({torch.float16: _core.DTYPE_F16, torch.bfloat16: _core.DTYPE_BF16,
                             torch.float32: _core.DTYPE_F32})
    return _DTYPE_CODES


def _current_stream(torch: Any, dev: Any) -> int:
    """torch's current stream on `dev` as a cudaStream_t int (the raw getter where this torch
    has it: a fraction of torch.cuda.current_stream's cost)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(dev.index)
    return torch.cuda.current_stream(dev).cuda_stream


def forward_torch(core: Any, ordinal: int, input: Any, router_probs: Any, router_weights: Any) -> Any:
    """QMoE on torch CUDA tensors with the bound layer `core` (on CUDA device `ordinal`):
    the output is allocated like `input` and the call enqueued on torch's current stream,
    without waiting. Device pointers go to the library as ints (DLPack's per-tensor import
    costs more than a decode call's GPU time); shapes and dtypes are checked there."""
    torch = sys.modules["torch"]  # only reached with a torch tensor in hand
    dev = input.device
    if core.backend != "cuda":
        raise ValueError(f"input: a torch tensor on {dev}, but this layer runs on the CPU "
                         f"(build it with device=\"cuda\", or pass host arrays)")
    if dev.type != "cuda" or dev.index != ordinal:
        raise ValueError(f"input: the tensor is on {dev}, but the layer is on cuda:{ordinal}")
    if input.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"input: the CUDA backend takes float16 or bfloat16 activations, got {input.dtype}")
    codes = _dtype_codes(torch)
    args: list = []
    keep = []  # contiguous copies stay referenced until the call is enqueued (see below)
    for name, t in (("router_probs", router_probs), ("router_weights", router_weights)):
        if t is None:
            args += [0, (), -1]
            continue
        if not is_torch_tensor(t) or t.device != dev:
            raise ValueError(f"{name}: expected a torch tensor on {dev} like input, got {describe(t)}")
        # float32 passes here: the library then says "expected dtype ... (same as input)".
        if t.dtype not in codes:
            raise TypeError(f"{name}: expected dtype float16 or bfloat16 (CUDA backend), got "
                            f"{str(t.dtype).replace('torch.', '')}")
        t = t if t.is_contiguous() else t.contiguous()
        keep.append(t)
        args += [t.data_ptr(), t.shape, codes[t.dtype]]
    # A copy made by .contiguous() is made on the current stream, where the caching
    # allocator may reuse its memory once it is freed, for work enqueued after the free:
    # so it is freed only after the call below is enqueued (freed earlier, the next
    # allocation here could take it and overwrite it before this call reads it).
    x = input if input.is_contiguous() else input.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    core.forward_ptrs(x.data_ptr(), x.shape, codes[x.dtype], *args, out.data_ptr(), _current_stream(torch, dev))
    del keep
    return out
