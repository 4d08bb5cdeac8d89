"""qmoe._cutlass: inverting ORT's SM80 CUTLASS fpA_intB weight prepacking.

The oracle is ONNX Runtime's own packer,
``onnxruntime.quantization.cuda_quantizer._pack_weights_for_cuda_mixed_gemm``
(``force_arch=80``), which is a PyTorch implementation that falls back to the
CPU when no GPU is present, so these tests run on CPU-only CI (torch required).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
import pytest
import torch  # noqa: F401  (required by ORT's packer; pinned in CI)
from onnxruntime.quantization.cuda_quantizer import _pack_weights_for_cuda_mixed_gemm

try:
    from qmoe._cutlass import cutlass_to_raw, raw_to_cutlass
except ImportError:  # source tree on PYTHONPATH without the built extension
    _path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python", "qmoe", "_cutlass.py")
    _spec = importlib.util.spec_from_file_location("qmoe_cutlass_src", _path)
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    cutlass_to_raw, raw_to_cutlass = _mod.cutlass_to_raw, _mod.raw_to_cutlass

# ORT warns (once) that it packs on the CPU; that is expected here.
logging.getLogger("onnxruntime.quantization.cuda_quantizer").setLevel(logging.ERROR)

NAME = "fc1_experts_weights"


def ort_pack(raw: np.ndarray, bits: int) -> np.ndarray:
    """Per expert: ORT's packer on raw [N, K/pack] -> bytes stored under [E, N, K/pack]."""
    e, n, kp = raw.shape
    k = kp * (8 // bits)
    out = [np.asarray(_pack_weights_for_cuda_mixed_gemm(raw[i], n, k, bits, force_arch=80)).view(np.uint8)
           for i in range(e)]
    return np.stack(out).reshape(e, n, kp)


# (N in units of the minimum 8*pack, K in units of 64): around the tile constraints.
N_UNITS = [1, 2, 3, 5]
K_UNITS = [1, 2, 3, 5]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n_units", N_UNITS)
@pytest.mark.parametrize("k_units", K_UNITS)
def test_roundtrip_matches_ort_packer(bits, n_units, k_units):
    pack = 8 // bits
    n, k = 8 * pack * n_units, 64 * k_units
    e = 1 + (n_units + k_units) % 3  # E = 1..3 across the grid
    rng = np.random.default_rng(1000 * bits + 10 * n_units + k_units)
    raw = rng.integers(0, 256, size=(e, n, k // pack), dtype=np.uint8)
    packed = ort_pack(raw, bits)
    assert packed.shape == raw.shape and not np.array_equal(packed, raw)

    before = packed.copy()
    got = cutlass_to_raw(packed, bits, NAME)
    assert got.dtype == np.uint8 and got.shape == raw.shape
    assert np.array_equal(got, raw)
    assert np.array_equal(packed, before)  # input untouched
    # the forward direction reproduces ORT's bytes exactly
    assert np.array_equal(raw_to_cutlass(raw, bits, NAME), packed)
    # int8 storage (what ORT's packer returns) is accepted as the same bytes
    assert np.array_equal(cutlass_to_raw(packed.view(np.int8), bits, NAME), raw)


@pytest.mark.parametrize("bits", [4, 8])
def test_larger_shape_and_extreme_codes(bits):
    pack = 8 // bits
    n, k, e = 256, 512, 2
    rng = np.random.default_rng(bits)
    raw = rng.integers(0, 256, size=(e, n, k // pack), dtype=np.uint8)
    raw[0, :4] = 0x00           # most negative / zero-point boundary codes
    raw[0, 4:8] = 0xFF
    raw[1, :4] = 0x88 if bits == 4 else 0x80
    raw[1, 4:8] = 0x77 if bits == 4 else 0x7F
    packed = ort_pack(raw, bits)
    assert np.array_equal(cutlass_to_raw(packed, bits, NAME), raw)


@pytest.mark.parametrize("bits", [4, 8])
def test_every_position_tracked(bits):
    """Distinct codes at every element position: the inverse is the exact permutation."""
    pack = 8 // bits
    n, k = 8 * pack * 2, 128
    if bits == 8:
        codes = (np.arange(n * k) % 256).astype(np.uint8).reshape(1, n, k)
        raw = codes
    else:
        codes = (np.arange(n * k) % 16).astype(np.uint8).reshape(1, n, k)
        raw = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    assert np.array_equal(cutlass_to_raw(ort_pack(raw, bits), bits, NAME), raw)


# Shapes [N, K] outside the SM80 layout's constraints (K % 64, N % (8 * pack)).
REFUSED = [
    (4, 16, 32),    # K multiple of 32 (row-permutation block) but not of 64
    (4, 16, 96),
    (4, 8, 64),     # N/2 = 4 packed columns, not a multiple of 8
    (4, 24, 64),
    (4, 24, 96),    # both wrong
    (8, 16, 16),    # K multiple of 16 (row-permutation block) but not of 64
    (8, 16, 32),
    (8, 8, 80),
    (8, 4, 64),     # N not a multiple of 8
    (8, 12, 128),
]


@pytest.mark.parametrize("bits,n,k", REFUSED)
def test_refused_shapes(bits, n, k):
    pack = 8 // bits
    raw = np.zeros((2, n, k // pack), dtype=np.uint8)
    with pytest.raises((ValueError, RuntimeError)):
        _pack_weights_for_cuda_mixed_gemm(raw[0], n, k, bits, force_arch=80)
    for fn in (cutlass_to_raw, raw_to_cutlass):
        with pytest.raises(ValueError) as ei:
            fn(raw, bits, NAME)
        msg = str(ei.value)
        assert NAME in msg and str([2, n, k // pack]) in msg
        assert ("K = " in msg) == (k % 64 != 0)
        assert ("N = " in msg) == (n % (8 * pack) != 0)


def test_bad_arguments():
    good = np.zeros((1, 16, 32), dtype=np.uint8)
    with pytest.raises(ValueError, match="fc2_experts_weights.*bits must be 4 or 8"):
        cutlass_to_raw(good, 2, "fc2_experts_weights")
    with pytest.raises(ValueError, match="fc2_experts_weights.*3-D"):
        cutlass_to_raw(good[0], 4, "fc2_experts_weights")
    with pytest.raises(TypeError, match="fc2_experts_weights.*uint8"):
        cutlass_to_raw(good.astype(np.float32), 4, "fc2_experts_weights")
    with pytest.raises(ValueError):  # ORT refuses other bit widths too
        _pack_weights_for_cuda_mixed_gemm(good[0], 16, 64, 2, force_arch=80)
    # zero experts is a valid (empty) tensor
    assert cutlass_to_raw(np.zeros((0, 16, 32), dtype=np.uint8), 4, NAME).shape == (0, 16, 32)
