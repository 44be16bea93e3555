"""Symmetric INT4 group quantization along K, and INT4 packing.

Quantization of ``w [out, K]`` with group size ``g`` (g divides K, groups run along K):

- ``scales``: [out, K/g] in ``scale_dtype`` (fp16 by default): ``scale = absmax(group) / 7``, rounded to
  ``scale_dtype`` *before* the codes are computed, so ``dequantize`` reproduces exactly the values that
  quantization-aware training saw. An all-zero group gets scale 0 and codes 0.
- ``codes``: int8 [out, K] in [-8, 7]: ``round(w / scale)`` clamped (only -7..7 occur for finite inputs).
- dequantized value: ``codes * scale`` computed in float32.

Packing (as ONNX INT4, TensorProto.INT4 = 22): two signed 4-bit codes per byte in two's complement, the first
element in the low nibble: ``byte j = (c[2j] & 0xF) | (c[2j+1] & 0xF) << 4``. An odd trailing element leaves
the high nibble zero.
"""

from __future__ import annotations

import torch

from sparsert.runtime.errors import FormatError, dtype_name

INT4_MIN, INT4_MAX = -8, 7


def check_group_size(w: torch.Tensor, group_size: int, name: str = "weight") -> None:
    """Raise FormatError unless ``w`` is 2-D [out, K] and ``group_size`` is positive and divides K."""
    if w.dim() != 2:
        raise FormatError(f"{name} must be 2-D [out, K], got shape {tuple(w.shape)}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise FormatError(f"INT4 group size must be a positive integer, got {group_size!r}")
    if w.shape[1] % group_size != 0:
        raise FormatError(
            f"{name} of shape {tuple(w.shape)}: K={w.shape[1]} is not divisible by the INT4 group size "
            f"{group_size}"
        )


def int4_scales(
    w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float16, name: str = "weight"
) -> torch.Tensor:
    """Per-group scales ``absmax / 7`` of ``w [out, K]``: [out, K/group_size] in ``scale_dtype``."""
    check_group_size(w, group_size, name)
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise FormatError(f"INT4 scale dtype must be a floating dtype (float16 by default), got {scale_dtype!r}")
    out, k = w.shape
    absmax = w.detach().float().abs().reshape(out, k // group_size, group_size).amax(-1)
    if not bool(torch.isfinite(absmax).all()):
        raise FormatError(f"{name} holds non-finite values; cannot quantize to INT4")
    scales = (absmax / INT4_MAX).to(scale_dtype)
    if not bool(torch.isfinite(scales).all()):
        big = float(absmax.max())
        raise FormatError(f"{name}: a group's absmax {big:.3g} gives a scale beyond the range of "
                          f"{dtype_name(scale_dtype)} (max {torch.finfo(scale_dtype).max:.3g} x 7)")
    return scales


def _expand(scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return scales.float().repeat_interleave(group_size, dim=1)


def quantize_int4(
    w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float16, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [out, K]`` (float) to (codes int8 [out, K] in [-8, 7], scales [out, K/g] scale_dtype)."""
    scales = int4_scales(w, group_size, scale_dtype, name)
    s = _expand(scales, group_size)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(w.detach().float() / safe).clamp_(INT4_MIN, INT4_MAX)
    codes = torch.where(s > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int8), scales


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """(codes int8 [out, K], scales [out, K/g]) -> float32 [out, K] = codes * scale."""
    if codes.dim() != 2 or scales.dim() != 2:
        raise FormatError(f"INT4 codes and scales must be 2-D [out, K] and [out, K/g], got {tuple(codes.shape)} and "
                          f"{tuple(scales.shape)}")
    if codes.shape[1] != scales.shape[1] * group_size or codes.shape[0] != scales.shape[0]:
        raise FormatError(
            f"INT4 codes of shape {tuple(codes.shape)} do not match scales {tuple(scales.shape)} "
            f"with group size {group_size}"
        )
    return codes.float() * _expand(scales, group_size)


def fake_quantize_int4(w: torch.Tensor, group_size: int = 128, name: str = "weight") -> torch.Tensor:
    """``dequantize(quantize(w))``: float ``w [out, K]`` -> the same shape in ``w``'s dtype, fp16 scales per group of
    ``group_size`` along K. No gradient logic (train/qat.py adds the STE)."""
    codes, scales = quantize_int4(w, group_size, torch.float16, name)
    return dequantize_int4(codes, scales, group_size).to(w.dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7], shape [..., K], into uint8 [..., ceil(K/2)], first element low nibble."""
    if codes.dtype != torch.int8 or codes.dim() < 1:
        raise FormatError(f"INT4 codes must be an int8 tensor [..., K], got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < INT4_MIN or int(codes.max()) > INT4_MAX):
        raise FormatError("INT4 codes must lie in [-8, 7]")
    k = codes.shape[-1]
    if k % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [..., ceil(K/2)] -> int8 [..., K] in [-8, 7]."""
    if packed.dtype != torch.uint8 or packed.dim() < 1:
        raise FormatError(f"packed INT4 tensor must be uint8 [..., ceil(K/2)], got {packed.dtype} "
                          f"{tuple(packed.shape)}")
    if packed.shape[-1] != (k + 1) // 2:
        raise FormatError(f"packed INT4 tensor has {packed.shape[-1]} bytes per row, expected {(k + 1) // 2}")
    nib = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)[..., :k]
    signed = nib.to(torch.int16)
    return torch.where(signed >= 8, signed - 16, signed).to(torch.int8)
