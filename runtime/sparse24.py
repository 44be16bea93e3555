"""2:4 compression: a dense weight that is 2:4 along K <-> kept values + packed 2-bit indices.

Layout (lossless for any tensor with at most two non-zeros in every group of four along K):

- ``values``: [out, K/2], the dense tensor's dtype. Row ``r`` holds, group by group in K order, the two kept
  entries of each group of four, in increasing column order.
- ``indices``: uint8 [out, ceil(K/8)]. Each kept value has a 2-bit index (0..3) = its column within its group;
  the two indices of a group are strictly increasing. Four indices per byte, the first in the lowest two
  bits: kept value ``j`` of a row sits in byte ``j // 4`` at bits ``2*(j % 4) .. 2*(j % 4) + 1``. When K/2 is not
  a multiple of 4 the unused high bits of the last byte are zero.

A group with fewer than two non-zeros keeps explicit zeros at its lowest free columns, so every group stores
exactly two entries (what the sparse tensor cores expect).
"""

from __future__ import annotations

import torch

from sparsert.runtime.errors import FormatError
from sparsert.runtime.nm_mask import check_groups

_POSITION_TIEBREAK = torch.tensor([3, 2, 1, 0], dtype=torch.int16)


def packed_indices_width(k: int) -> int:
    """Bytes per row of packed indices for K input columns: ceil(K/8)."""
    return (k // 2 + 3) // 4


def compress_24(dense: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-along-K tensor.

    Args:
        dense: [out, K] any dtype, K % 4 == 0, at most two non-zeros per group of four along K.
    Returns:
        (values [out, K/2] dense.dtype, indices uint8 [out, ceil(K/8)]) as described in the module docstring.
    Raises:
        FormatError naming ``name``, the first offending row and group when ``dense`` is not 2:4.
    """
    check_groups(dense, 4, name)
    out, k = dense.shape
    groups = dense.reshape(out, k // 4, 4)  # (out, K/4, 4)
    nonzero = groups != 0
    counts = nonzero.sum(-1)
    if bool((counts > 2).any()):
        row, group = (counts > 2).nonzero()[0].tolist()
        raise FormatError(
            f"{name} of shape {(out, k)} is not 2:4 along K: row {row}, columns {4 * group}..{4 * group + 3} "
            f"hold {int(counts[row, group])} non-zeros"
        )
    # Non-zeros first, then the lowest free columns; then put each pair in increasing column order.
    score = nonzero.to(torch.int16) * 4 + _POSITION_TIEBREAK.to(dense.device)
    chosen = torch.topk(score, 2, dim=-1).indices.sort(dim=-1).values  # (out, K/4, 2)
    values = torch.gather(groups, -1, chosen).reshape(out, k // 2)
    return values.contiguous(), pack_indices_24(chosen.reshape(out, k // 2).to(torch.uint8))


def pack_indices_24(idx: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit indices four per byte.

    Args:
        idx: [out, K/2] integer tensor with values in 0..3.
    Returns:
        uint8 [out, ceil(K/8)]; index ``j`` at bits ``2*(j % 4)`` of byte ``j // 4``.
    """
    out, half = idx.shape
    width = packed_indices_width(half * 2)
    padded = torch.zeros(out, width * 4, dtype=torch.uint8, device=idx.device)
    padded[:, :half] = idx.to(torch.uint8)
    quads = padded.reshape(out, width, 4)
    return quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)


def unpack_indices_24(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices_24`: uint8 [out, ceil(K/8)] -> uint8 [out, K/2] with values 0..3."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    quads = (packed.unsqueeze(-1) >> shifts) & 3  # (out, width, 4)
    return quads.reshape(packed.shape[0], -1)[:, : k // 2]


def validate_indices_24(packed: torch.Tensor, k: int, name: str = "indices") -> None:
    """Raise FormatError unless ``packed`` (uint8 [out, ceil(K/8)]) decodes to a valid 2:4 pattern.

    Valid means: the right shape and dtype, the two indices of every group strictly increasing, and zero
    padding bits.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"{name} must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if k % 4 != 0:
        raise FormatError(f"{name}: K={k} is not divisible by 4")
    if packed.shape[1] != packed_indices_width(k):
        raise FormatError(
            f"{name} has shape {tuple(packed.shape)}, expected [out, {packed_indices_width(k)}] for K={k}"
        )
    check_index_pairs(unpack_indices_24(packed, k).reshape(packed.shape[0], k // 4, 2), name)
    used = k // 2
    if used % 4 and bool((packed[:, -1] >> (2 * (used % 4))).any()):
        raise FormatError(f"{name}: padding bits of the last byte are not zero")


def check_index_pairs(idx: torch.Tensor, name: str = "indices") -> None:
    """Raise FormatError unless every group's two kept-column indices (integer ``[out, K/4, 2]``, values 0..3)
    strictly increase: a repeated column would silently drop a kept value when the pairs are expanded."""
    bad = idx[..., 0] >= idx[..., 1]
    if bool(bad.any()):
        row, group = bad.nonzero()[0].tolist()
        first, second = idx[row, group].tolist()
        raise FormatError(
            f"{name} does not decode to a valid 2:4 pattern: row {row}, group {group} has indices "
            f"({first}, {second}), expected two strictly increasing indices in 0..3"
        )


def expand_index_pairs(values: torch.Tensor, idx: torch.Tensor, k: int, name: str = "indices") -> torch.Tensor:
    """``values [out, K/2]`` placed at the columns ``idx`` (integer ``[out, K/4, 2]``, checked by
    :func:`check_index_pairs`) names within each group of four -> dense ``[out, K]`` in ``values.dtype``, zeros
    elsewhere."""
    check_index_pairs(idx, name)
    out = values.shape[0]
    dense = torch.zeros(out, k // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx.long(), values.reshape(out, k // 4, 2))
    return dense.reshape(out, k)


def decompress_24(values: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """Expand (values [out, K/2], indices uint8 [out, ceil(K/8)]) back to the dense [out, K] tensor.

    The result has ``values.dtype``; pruned positions are exactly zero. Raises FormatError for values or indices
    of the wrong shape and for indices that are not a valid 2:4 pattern (a repeated index would silently drop a
    value).
    """
    if values.dim() != 2 or values.shape[1] != k // 2:
        raise FormatError(f"values has shape {tuple(values.shape)}, expected [out, {k // 2}] for K={k}")
    out = values.shape[0]
    if indices.dim() == 2 and indices.shape[0] != out:
        raise FormatError(f"indices has {indices.shape[0]} rows but values has {out}")
    if indices.dtype != torch.uint8 or tuple(indices.shape) != (out, packed_indices_width(k)):
        raise FormatError(f"indices is {indices.dtype} {list(indices.shape)}, expected uint8 "
                          f"[{out}, {packed_indices_width(k)}] for values of {out} rows and K={k}")
    return expand_index_pairs(values, unpack_indices_24(indices, k).reshape(out, k // 4, 2), k)
