"""Bit-exact NumPy decoders, to float32, of the weight formats Hugging Face MoE checkpoints ship.

Every decoder here is vectorized (table look-ups and one float32 multiply; Python loops run at most over
128-row blocks, never over elements) and imports nothing but NumPy. Each result equals, bit for bit, the
float32 the format's definition gives: all decoded values are exactly representable in float32, and the
only arithmetic is one float32 multiply by a scale, rounded once as IEEE-754 prescribes (for MXFP4 the
scale is a power of two, so that multiply is exact unless it leaves the float32 range).

BF16 (``bf16_to_f32``)
    bfloat16 is the top half of a float32: 1 sign, 8 exponent, 7 mantissa bits. Decoding shifts the
    16-bit pattern into the high half of a 32-bit word; NaN payloads are kept as they are.

F16 (``f16_to_f32``)
    IEEE binary16; NumPy's own conversion is exact.

FP8 E4M3 (``fp8_e4m3_to_f32``; safetensors dtype ``F8_E4M3``, torch ``float8_e4m3fn``)
    The OCP 8-bit floating point "E4M3" (the "FN" variant: finite, no infinities). Bit 7 is the sign,
    bits 6..3 the exponent ``e`` (bias 7), bits 2..0 the mantissa ``m``.
    ``e == 0``: subnormal, ``(-1)^s * m/8 * 2^-6``; ``1 <= e <= 15``: ``(-1)^s * (1 + m/8) * 2^(e-7)``,
    except ``e == 15, m == 7`` (``S.1111.111``, bytes 0x7F and 0xFF), which is NaN. The largest finite
    magnitude is ``1.75 * 2^8 = 448``; both zeros keep their sign. The decoder is a 256-entry table built
    from that definition.

FP8 E5M2 (``fp8_e5m2_to_f32``; safetensors ``F8_E5M2``, torch ``float8_e5m2``)
    The top byte of an IEEE binary16 (bias 15, with infinities and NaNs), decoded as such.

Block-scaled FP8 (``dequant_fp8_block``): DeepSeek-V3 style ``weight`` + ``weight_scale_inv``
    ``weight`` is F8_E4M3 of shape ``[N, K]`` (``N`` outputs, ``K`` inputs, the ``nn.Linear`` layout);
    ``weight_scale_inv`` is float32 (some checkpoints: BF16) of shape ``[ceil(N/bn), ceil(K/bk)]`` with
    ``(bn, bk) = quantization_config["weight_block_size"]``, ``(128, 128)`` in DeepSeek-V3/R1 and Qwen3 FP8.
    Despite its name, the stored scale *multiplies*: ``w[n, k] = fp8(weight[n, k]) * scale[n // bn, k // bk]``
    in float32. The grid is the ceiling of the shape over the block, the last block row/column being
    ragged (partial) when ``N`` or ``K`` is not a multiple of the block. Confirmed in DeepSeek-V3's
    reference ``inference/kernel.py`` (``weight_dequant_kernel``: ``y = x.to(float32) * s`` over a
    ``cdiv(M, 128) x cdiv(N, 128)`` grid with masked ragged edges; ``weight_quant`` stores
    ``s = amax / 448`` there), and in transformers 5.x ``integrations/finegrained_fp8.py``
    (``FP8Linear.weight_scale_inv`` is allocated ``[cdiv(out, bn), cdiv(in, bk)]``; ``Fp8Dequantize`` computes
    ``q.to(float32) * s``). Note: that transformers ``Fp8Dequantize`` derives the block size as
    ``rows // scale_rows`` and so mis-reads ragged shapes whose size happens to divide evenly (``N = 200``
    with two block rows gives it 100-row blocks); here the block size is an argument, not a guess.

MXFP4 (``mxfp4_to_f32``): OCP Microscaling, as gpt-oss ships its expert weights
    A block of 32 FP4 E2M1 elements shares one E8M0 scale. Element codes (4 bits): bit 3 the sign, then
    the magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` for codes 0..7 (exponent bias 1, one mantissa bit, with
    a subnormal 0.5). Each byte of ``*_blocks`` packs two elements, the **low nibble first**: byte ``j`` of
    a 16-byte block holds element ``2j`` in bits 3..0 and element ``2j + 1`` in bits 7..4. The scale byte
    ``u`` is E8M0, ``2^(u - 127)``; ``u == 255`` is NaN and makes the whole block NaN (zeros included).
    Values past float32's range (only possible with ``u >= 253``) become +-inf.
    Confirmed in transformers 5.x ``integrations/mxfp4.py`` (``_convert_moe_packed_tensors``:
    ``lut[blk & 0x0F]`` goes to output columns ``0::2`` and ``lut[blk >> 4]`` to ``1::2``; the scale is
    applied as ``ldexp(value, scale_u8 - 127)``; ``FP4_VALUES`` is the table above, ``-0.0`` included)
    -- which, unlike this decoder, turns a 255 scale into ``+-inf`` for non-zero codes rather than NaN.

gpt-oss hub layout (``openai/gpt-oss-20b`` / ``-120b``; ``E`` experts, hidden ``H``, intermediate ``I``)
    Per layer ``model.layers.{i}.mlp.experts.``:

    * ``gate_up_proj_blocks`` U8 ``[E, 2I, H/32, 16]``, ``gate_up_proj_scales`` U8 ``[E, 2I, H/32]``,
      ``gate_up_proj_bias`` BF16 ``[E, 2I]``;
    * ``down_proj_blocks`` U8 ``[E, H, I/32, 16]``, ``down_proj_scales`` U8 ``[E, H, I/32]``,
      ``down_proj_bias`` BF16 ``[E, H]``.

    (gpt-oss-20b: ``E = 32, H = I = 2880``, so ``H/32 = I/32 = 90``.) ``mxfp4_to_f32(blocks, scales)`` gives
    ``[E, N, K]`` -- output features by input features, the ``nn.Linear`` ``[out, in]`` orientation:
    ``[E, 2I, H]`` for gate_up and ``[E, H, I]`` for down. transformers' in-memory ``GptOssExperts`` holds
    the **transpose**, ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]``, used as ``x @ W[e] + b[e]``;
    its dequantizing loader returns ``out.transpose(1, 2)`` of exactly this decode
    (``_convert_moe_packed_tensors``; ``Mxfp4ReverseDeserialize`` reshapes the other way,
    ``[E, 2I, 90, 16]``, for gpt-oss-20b). The ``2I`` gate_up rows are **interleaved**, not concatenated:
    row ``2j`` is gate ``j`` and row ``2j + 1`` is up ``j`` (``GptOssExperts._apply_gate`` takes
    ``gate_up[..., ::2]`` and ``gate_up[..., 1::2]`` of the in-memory product).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bf16_to_f32",
    "f16_to_f32",
    "fp8_e4m3_to_f32",
    "fp8_e5m2_to_f32",
    "dequant_fp8_block",
    "mxfp4_to_f32",
    "FP8_E4M3_TABLE",
    "FP4_E2M1_TABLE",
    "E8M0_TABLE",
]


def _e4m3_table() -> np.ndarray:
    """The 256 E4M3FN codes as float32, computed from the definition in the module docstring."""
    code = np.arange(256, dtype=np.int64)
    sign = np.where(code >> 7 == 1, -1.0, 1.0)
    exp = (code >> 3) & 0xF
    man = code & 0x7
    mag = np.where(exp == 0, np.ldexp(man.astype(np.float64), -9), np.ldexp(8.0 + man, exp - 10))
    table = (sign * mag).astype(np.float32)  # every value has <= 4 significant bits: exact in float32
    table[(exp == 15) & (man == 7)] = np.nan
    table.setflags(write=False)
    return table


def _e2m1_table() -> np.ndarray:
    """The 16 FP4 E2M1 codes as float32 (bit 3 the sign)."""
    mag = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
    table = np.concatenate([mag, -mag]).astype(np.float32)
    table.setflags(write=False)
    return table


def _e8m0_table() -> np.ndarray:
    """The 256 E8M0 scale codes as float32: ``2^(u - 127)``, 255 = NaN (2^-127 is a float32 subnormal)."""
    with np.errstate(over="ignore"):
        table = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - 127).astype(np.float32)
    table[255] = np.nan
    table.setflags(write=False)
    return table


FP8_E4M3_TABLE: np.ndarray = _e4m3_table()
"""float32[256]: the value of every OCP FP8 E4M3FN code (read-only)."""

FP4_E2M1_TABLE: np.ndarray = _e2m1_table()
"""float32[16]: the value of every FP4 E2M1 code (read-only)."""

E8M0_TABLE: np.ndarray = _e8m0_table()
"""float32[256]: the value of every E8M0 scale code (read-only)."""


def _require_dtype(a: np.ndarray, dtype: type, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"{what}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    return a


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16, any shape) -> float32 of the same shape, exact (NaN payloads kept)."""
    u16 = _require_dtype(u16, np.uint16, "bf16_to_f32")
    return (u16.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f16_to_f32(f16: np.ndarray) -> np.ndarray:
    """IEEE float16 (any shape) -> float32 of the same shape, exact."""
    return _require_dtype(f16, np.float16, "f16_to_f32").astype(np.float32)


def fp8_e4m3_to_f32(u8: np.ndarray) -> np.ndarray:
    """OCP FP8 E4M3FN bytes (uint8, any shape) -> float32 of the same shape, exact (0x7F/0xFF -> NaN)."""
    return FP8_E4M3_TABLE[_require_dtype(u8, np.uint8, "fp8_e4m3_to_f32")]


def fp8_e5m2_to_f32(u8: np.ndarray) -> np.ndarray:
    """FP8 E5M2 bytes (uint8, any shape) -> float32 of the same shape, exact (the high byte of a float16)."""
    u8 = _require_dtype(u8, np.uint8, "fp8_e5m2_to_f32")
    return (u8.astype(np.uint16) << np.uint16(8)).view(np.float16).astype(np.float32)


def dequant_fp8_block(
    w_u8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)
) -> np.ndarray:
    """Block-scaled FP8 E4M3 weight -> float32: ``out[.., n, k] = fp8(w[.., n, k]) * scale_inv[.., n//bn, k//bk]``.

    ``w_u8`` is uint8 ``[..., N, K]`` (the F8_E4M3 bytes, e.g. ``Checkpoint.raw``); ``scale_inv`` is float32
    ``[..., ceil(N/bn), ceil(K/bk)]`` with the same leading dimensions (decode a BF16 scale with
    :func:`bf16_to_f32` first; that is exact). Each product is one float32 multiply, as in the reference
    kernels. ``block`` is ``(bn, bk)``, ``quantization_config["weight_block_size"]`` in the checkpoint.
    """
    w_u8 = _require_dtype(w_u8, np.uint8, "dequant_fp8_block: weight")
    scale = _require_dtype(scale_inv, np.float32, "dequant_fp8_block: scale_inv")
    if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in block):
        raise ValueError(f"dequant_fp8_block: block must be two positive ints, got {block!r}")
    bn, bk = int(block[0]), int(block[1])
    if w_u8.ndim < 2:
        raise ValueError(f"dequant_fp8_block: weight must be [..., N, K], got shape {w_u8.shape}")
    n, k = w_u8.shape[-2:]
    want = w_u8.shape[:-2] + (-(-n // bn), -(-k // bk))
    if scale.shape != want:
        raise ValueError(
            f"dequant_fp8_block: scale_inv shape for weight {w_u8.shape} with block ({bn}, {bk}): "
            f"expected {want}, got {scale.shape}"
        )
    out = FP8_E4M3_TABLE[w_u8]  # a fresh float32 array
    if out.size == 0:
        return out
    scale_k = np.repeat(scale, bk, axis=-1)[..., :k]  # [..., ceil(N/bn), K]: small
    with np.errstate(over="ignore", invalid="ignore"):  # IEEE results (inf, NaN) are the answer
        for i in range(want[-2]):  # one step per block row (N/128 of them), not per element
            out[..., i * bn:(i + 1) * bn, :] *= scale_k[..., i:i + 1, :]
    return out


def mxfp4_to_f32(blocks_u8: np.ndarray, scales_u8: np.ndarray) -> np.ndarray:
    """MXFP4 -> float32: uint8 ``blocks_u8 [..., G, 16]`` and ``scales_u8 [..., G]`` give ``[..., G*32]``.

    Element ``32g + 2j`` is the low nibble of byte ``blocks[..., g, j]``, element ``32g + 2j + 1`` its high
    nibble, each times ``2^(scales[..., g] - 127)`` (255: NaN). See the module docstring for the gpt-oss
    tensor shapes and how the result relates to transformers' in-memory (transposed) weights.
    """
    blocks_u8 = _require_dtype(blocks_u8, np.uint8, "mxfp4_to_f32: blocks")
    scales_u8 = _require_dtype(scales_u8, np.uint8, "mxfp4_to_f32: scales")
    if blocks_u8.ndim < 2 or blocks_u8.shape[-1] != 16 or blocks_u8.shape[:-1] != scales_u8.shape:
        raise ValueError(
            f"mxfp4_to_f32: expected blocks [..., G, 16] and scales [..., G], "
            f"got blocks {blocks_u8.shape} and scales {scales_u8.shape}"
        )
    out = np.empty(blocks_u8.shape[:-1] + (32,), dtype=np.float32)
    out[..., 0::2] = FP4_E2M1_TABLE[blocks_u8 & np.uint8(0x0F)]
    out[..., 1::2] = FP4_E2M1_TABLE[blocks_u8 >> np.uint8(4)]
    with np.errstate(over="ignore", invalid="ignore"):  # past float32's range: +-inf, as IEEE rounds it
        out *= E8M0_TABLE[scales_u8][..., None]
    return out.reshape(blocks_u8.shape[:-2] + (blocks_u8.shape[-2] * 32,))


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 copy of ``a`` whose safetensors dtype is ``dtype`` (F32, F16, or BF16 given as uint16 bits);
    ``ValueError`` for any other dtype."""
    if dtype == "F32":
        return np.array(a, dtype=np.float32)
    if dtype == "F16":
        return f16_to_f32(a)
    if dtype == "BF16":
        return bf16_to_f32(a)
    raise ValueError(f"expected dtype F32, F16 or BF16, got {dtype}")
