"""N:M sparsity masks along the input (K) dimension.

Layout: a weight is ``W [out, K]`` (``nn.Linear.weight``); group ``g`` of row ``r`` is ``W[r, m*g : m*g + m]``.
An N:M mask keeps ``n`` of every ``m`` consecutive entries along K (2:4 by default: NVIDIA's sparse tensor
cores need at least two zeros in every four consecutive input channels of each output channel).
"""

from __future__ import annotations

import torch

from sparsert.runtime import nm_mask_cpu
from sparsert.runtime.errors import FormatError


def check_nm(n: int, m: int) -> None:
    """Raise FormatError unless ``0 < n < m``."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise FormatError(f"N:M sparsity needs integers 0 < N < M, got {n}:{m}")


def check_groups(weight: torch.Tensor, m: int, name: str = "weight") -> None:
    """Raise FormatError unless ``weight`` is 2-D with K (its last dim) divisible by ``m``."""
    if weight.dim() != 2:
        raise FormatError(f"{name} must be 2-D [out, K], got shape {tuple(weight.shape)}")
    if weight.shape[1] % m != 0:
        raise FormatError(
            f"{name} of shape {tuple(weight.shape)}: K={weight.shape[1]} is not divisible by M={m}"
        )


def nm_mask(
    weight: torch.Tensor, n: int = 2, m: int = 4, score: torch.Tensor | None = None, name: str = "weight"
) -> torch.Tensor:
    """Boolean N:M mask of ``weight`` along K.

    Args:
        weight: [out, K], any float dtype; K % m == 0.
        n, m: keep ``n`` of every ``m`` consecutive entries along K.
        score: optional [out, K] importance (e.g. Wanda's |W|·‖X‖); default |weight|.
    Returns:
        bool [out, K] on weight's device, exactly ``n`` True per group. Ties keep the lower index. (NaN
        compares false, so a group holding NaN scores keeps every NaN and may keep more than ``n``.)
    """
    check_nm(n, m)
    check_groups(weight, m, name)
    if score is not None and score.shape != weight.shape:
        raise FormatError(f"score for {name} has shape {tuple(score.shape)}, expected {tuple(weight.shape)}")
    src = weight if score is None else score
    if (n, m) == (2, 4) and src.device.type == "cpu" and nm_mask_cpu.available():
        return nm_mask_cpu.mask_24_cpu(src.detach().float(), take_abs=score is None)  # the same mask, compiled
    s = weight.detach().abs() if score is None else score.detach()
    out, k = s.shape
    groups = s.float().reshape(out, k // m, m)  # (out, K/m, m)
    # Rank of entry i in its group = #entries larger + #equal entries at a lower index (ties keep the lower
    # index, so masks are deterministic). m*(m-1) strided comparisons are ~4x faster than a sort along a
    # dimension of size m, which matters because SR-STE refreshes every mask at every step.
    rank = torch.zeros_like(groups, dtype=torch.int16)
    for i in range(m):
        col = groups[..., i]
        for j in range(m):
            if j != i:
                rank[..., i] += (groups[..., j] >= col) if j < i else (groups[..., j] > col)
    return (rank < n).reshape(out, k)


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` along K of the 2-D ``weight`` has at most ``n`` non-zeros."""
    check_nm(n, m)
    if weight.dim() != 2 or weight.shape[1] % m != 0:
        return False
    nonzero = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
    return bool((nonzero <= n).all())
