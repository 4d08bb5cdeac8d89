"""Conversion between ONNX Runtime's raw QMoE weight layout and the SM80
CUTLASS ``fpA_intB`` mixed-GEMM layout that ORT's CUDA EP consumes when a QMoE
node has ``weights_prepacked = 1`` (or ``-1``).

Raw layout (per expert, shape ``[N, K/pack]`` uint8, ``pack = 8 // bits``):
element ``c`` of output row ``n`` lives in byte ``c // pack``; with 4 bits the
even element is the low nibble. Codes are unsigned with an implicit zero point
``2**(bits-1)``.

Prepacked layout: the same number of bytes per expert, stored by ORT under the
raw ``[E, N, K/pack]`` shape but meaning ``[K, N/pack]``. It is what
``onnxruntime.quantization.cuda_quantizer._pack_weights_for_cuda_mixed_gemm``
(``force_arch=80``) produces. Seen element-wise (nibbles unpacked low first for
4 bits) the packer is a pure permutation of the ``N*K`` codes:

1. transpose ``W[N, K]`` to ``[K, N]`` and convert codes to signed
   (``code - 2**(bits-1)``);
2. permute the K rows inside each block of ``R`` rows (``R = 16`` for 8 bits,
   ``32`` for 4 bits) with the fixed MMA-operand map ``_ROW_PERM[bits]``;
3. transpose back to ``[N, K]`` (the "subbyte transpose");
4. column-interleave: view the ``[N, K]`` codes as
   ``[N/I, I, K/64, 64]`` and swap the middle axes to ``[N/I, K/64, I, 64]``
   (``I = 16 // bits``: 4 for 4 bits, 2 for 8 bits);
5. inside each group of ``32 // bits`` consecutive codes (4 bytes / 8 nibbles)
   reorder with ``_GROUP_PERM[bits]`` and add the bias ``2**(bits-1)`` back
   (the signed/unsigned conversions of steps 1 and 5 cancel exactly, so the
   stored code values are the raw unsigned codes).

Steps 2 and 3 combine into a single permutation of the K axis of ``W``, so the
inverse is: unpack codes, undo step 5's group reorder, undo step 4's axis swap,
undo step 2 on the K axis, repack. Every step is a bijection, so the transform
is exactly invertible on every shape the packer accepts:

* ``K % 64 == 0`` (K multiple of the 64-row interleave tile, which also
  covers the 16/32-row permutation blocks), and
* ``(N / pack) % 8 == 0`` (``N % 8 == 0`` for 8 bits, ``N % 16 == 0`` for 4).

Other shapes are refused with ``ValueError`` (the packer refuses them too).
This module is pure NumPy and never imports torch.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

__all__ = ["cutlass_to_raw", "raw_to_cutlass", "check_cutlass_shape"]

# Step 2: within each block of R rows of the [K, N] matrix, new row r is old
# row _ROW_PERM[bits][r] (fp16/bf16 activations: 16 bits of A per MMA lane).
_ROW_PERM: Dict[int, np.ndarray] = {
    8: np.array([0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15], dtype=np.intp),
    4: np.array([0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27,
                 4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23, 30, 31], dtype=np.intp),
}

# Step 5: within each group of 32 // bits consecutive codes, new code i is old
# code _GROUP_PERM[bits][i].
_GROUP_PERM: Dict[int, np.ndarray] = {
    8: np.array([0, 2, 1, 3], dtype=np.intp),
    4: np.array([0, 2, 4, 6, 1, 3, 5, 7], dtype=np.intp),
}

_TILE_K = 64  # rows (K elements) per column-interleave tile: 128 bytes * 8 / 16-bit A
_MMA_N = 8    # the packed [K, N/pack] columns must be a multiple of this


def _interleave(bits: int) -> int:
    return 16 // bits


def _shape_error(name: str, bits: int, shape: Tuple[int, ...]) -> str:
    """Reason the raw shape ``[E, N, K/pack]`` cannot be (un)packed, or ''."""
    pack = 8 // bits
    _, n, kp = shape
    k = kp * pack
    reasons = []
    if k % _TILE_K != 0:
        reasons.append(f"K = {k} must be a multiple of {_TILE_K}")
    if n % (_MMA_N * pack) != 0:
        reasons.append(f"N = {n} must be a multiple of {_MMA_N * pack} for {bits}-bit weights")
    if not reasons:
        return ""
    return (f"{name}: shape [E, N, K/pack] = {list(shape)} ({bits}-bit) cannot be "
            f"converted from/to the SM80 CUTLASS mixed-GEMM layout: " + " and ".join(reasons))


def check_cutlass_shape(shape: Tuple[int, ...], bits: int, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless the raw shape ``[E, N, K/pack]``
    is one the SM80 CUTLASS layout (and its inverse) supports."""
    if bits not in (4, 8):
        raise ValueError(f"{name}: bits must be 4 or 8, got {bits}")
    if len(shape) != 3:
        raise ValueError(f"{name}: expected a 3-D [E, N, K/pack] weight, got shape {list(shape)}")
    msg = _shape_error(name, bits, tuple(int(s) for s in shape))
    if msg:
        raise ValueError(msg)


def _as_u8(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.int8:
        a = a.view(np.uint8)
    if a.dtype != np.uint8:
        raise TypeError(f"{name}: expected a uint8 weight tensor, got dtype {a.dtype}")
    return np.ascontiguousarray(a)


def _unpack(b: np.ndarray, bits: int) -> np.ndarray:
    """Bytes [..., M] -> codes [..., M * pack] (low nibble first for 4 bits)."""
    if bits == 8:
        return b
    out = np.empty(b.shape[:-1] + (b.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = b & 0x0F
    out[..., 1::2] = b >> 4
    return out


def _pack(c: np.ndarray, bits: int) -> np.ndarray:
    """Codes [..., M] -> bytes [..., M / pack] (low nibble first for 4 bits)."""
    if bits == 8:
        return c
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def _k_perm(k: int, bits: int) -> np.ndarray:
    """Index map of step 2 over K: row r of the permuted [K, N] is row idx[r]."""
    p = _ROW_PERM[bits]
    r = p.size
    return (np.arange(k, dtype=np.intp) // r) * r + p[np.arange(k, dtype=np.intp) % r]


def _checked(arr: np.ndarray, bits: int, name: str) -> Tuple[np.ndarray, int, int, int, int, int, int]:
    """(contiguous uint8 array, E, N, K, K/pack, column interleave, codes per
    32-bit group) of a weight tensor whose shape the layout supports."""
    a = _as_u8(arr, name)
    check_cutlass_shape(a.shape, bits, name)
    e, n, kp = (int(s) for s in a.shape)
    return a, e, n, kp * (8 // bits), kp, _interleave(bits), 32 // bits


def cutlass_to_raw(packed: np.ndarray, bits: int, name: str) -> np.ndarray:
    """Convert CUTLASS-prepacked QMoE weights back to ORT's raw layout.

    Args:
        packed: uint8 (int8 is reinterpreted) array of shape ``[E, N, K/pack]``
            holding, per expert, the ``N*K/pack`` bytes of the SM80 CUTLASS
            ``fpA_intB`` layout (``[K, N/pack]``) as written by ORT's
            ``_pack_weights_for_cuda_mixed_gemm(..., force_arch=80)``.
        bits: 4 or 8.
        name: the tensor's name (e.g. ``"fc1_experts_weights"``), used in errors.

    Returns:
        A new ``[E, N, K/pack]`` uint8 array in the raw layout: element ``c`` of
        row ``n`` in byte ``c // pack``, even element in the low nibble, unsigned
        codes with implicit zero point ``2**(bits-1)``.

    Raises:
        TypeError: ``packed`` is not uint8/int8.
        ValueError: bad ``bits`` or rank, or a shape outside the layout's
            constraints (``K % 64 == 0`` and ``N % (8 * pack) == 0``); the
            message names ``name``, the shape and the reason.
    """
    a, e, n, k, kp, il, g = _checked(packed, bits, name)

    codes = _unpack(a.reshape(e, n * kp), bits)          # [E, N*K] stored order
    # undo step 5: stored[i] = before[perm[i]]  =>  before[perm] = stored
    before5 = np.empty_like(codes)
    before5.reshape(e, n * k // g, g)[:, :, _GROUP_PERM[bits]] = codes.reshape(e, n * k // g, g)
    # undo step 4: stored as [N/I, K/64, I, 64] -> [N/I, I, K/64, 64] = M[N, K]
    m = before5.reshape(e, n // il, k // _TILE_K, il, _TILE_K).transpose(0, 1, 3, 2, 4)
    m = m.reshape(e, n, k)
    # undo steps 2-3: M[:, :, r] = W[:, :, idx[r]]  =>  W[:, :, idx] = M
    w = np.empty_like(m)
    w[:, :, _k_perm(k, bits)] = m
    return np.ascontiguousarray(_pack(w, bits))


def raw_to_cutlass(raw: np.ndarray, bits: int, name: str) -> np.ndarray:
    """Inverse of :func:`cutlass_to_raw`: raw ``[E, N, K/pack]`` uint8 weights to
    the SM80 CUTLASS prepacked bytes, returned under the same ``[E, N, K/pack]``
    shape (each expert's bytes are the ``[K, N/pack]`` CUTLASS matrix). Same
    errors as :func:`cutlass_to_raw`."""
    a, e, n, k, kp, il, g = _checked(raw, bits, name)

    w = _unpack(a, bits)                                  # [E, N, K]
    m = w[:, :, _k_perm(k, bits)]                         # steps 1-3
    m = m.reshape(e, n // il, il, k // _TILE_K, _TILE_K).transpose(0, 1, 3, 2, 4)  # step 4
    m = m.reshape(e, n * k // g, g)[:, :, _GROUP_PERM[bits]]                       # step 5
    return np.ascontiguousarray(_pack(m.reshape(e, n * k), bits).reshape(e, n, kp))
