"""The transposable 2:4 mask on CPU as one compiled loop (numba): the 90-pattern argmax, block by block.

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024, §4.1: each 4×4
block of ``W`` gets, among the 90 patterns with two ones in every row and column, the one keeping the largest
``Σ |W|``. Scored exactly as the CUDA kernel (``cuda/transposable_mask.cu``) scores it: per block row ``r`` the
six pair sums ``s_r = |a| + |b|`` (columns ``a < b``), a pattern's score ``((s_0 + s_1) + s_2) + s_3`` in
float32, the first maximum in the order of :data:`~sparsert.runtime.transposable_mask.TRANSPOSABLE_PATTERNS_24`
winning. Blocks are processed in chunks of one block row: the 24 pair sums of the chunk's blocks, then the 90
patterns one after another over all of them (a loop LLVM vectorises across blocks), then four int32 stores per
block (one per row: the pattern row's four bools).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; transposable_mask.py's torch path covers it
    numba = None

__all__ = ["available", "transposable_24_mask_cpu"]

_PAIRS = tuple(itertools.combinations(range(4), 2))  # the six column pairs of a block row, in this order
_CHUNK = 256  # blocks per chunk: 24 pair-sum rows of 1 KiB (24 KiB) stay in L1


def available() -> bool:
    """True when the compiled mask can run (numba imports)."""
    return numba is not None


def _pattern_tables(patterns: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [90, 4]: per pattern and block row the index ``6·r + pair`` of its pair sum; int32 [90, 4]: the
    pattern's rows as int32 words of four bool bytes) for bool ``patterns [90, 4, 4]``."""
    index = np.zeros((90, 4), dtype=np.int64)
    for p in range(90):
        for r in range(4):
            cols = tuple(int(c) for c in torch.nonzero(patterns[p, r]).flatten())
            index[p, r] = 6 * r + _PAIRS.index(cols)
    words = patterns.reshape(90, 16).contiguous().view(torch.int32).reshape(90, 4).numpy().copy()
    return index, words


def _mask_kernel(w, out32, index, words, chunk, take_abs):  # noqa: ANN001, PLR0913 - numba kernel
    """``w`` float32 [R, C] C-contiguous, ``out32`` int32 [R, C/4] (the bool mask's bytes, four per block row);
    scores are ``|w|`` with ``take_abs``, else ``w`` as given."""
    rows, cols = w.shape
    nbc = cols // 4
    ps = np.empty((24, chunk), dtype=np.float32)
    best = np.empty(chunk, dtype=np.float32)
    arg = np.empty(chunk, dtype=np.int64)
    for bi in range(rows // 4):
        for j0 in range(0, nbc, chunk):
            n = min(chunk, nbc - j0)
            for r in range(4):
                row = w[4 * bi + r]
                p0 = ps[6 * r]
                p1 = ps[6 * r + 1]
                p2 = ps[6 * r + 2]
                p3 = ps[6 * r + 3]
                p4 = ps[6 * r + 4]
                p5 = ps[6 * r + 5]
                for j in range(n):
                    c = 4 * (j0 + j)
                    a0 = row[c]
                    a1 = row[c + 1]
                    a2 = row[c + 2]
                    a3 = row[c + 3]
                    if take_abs:
                        a0 = abs(a0)
                        a1 = abs(a1)
                        a2 = abs(a2)
                        a3 = abs(a3)
                    p0[j] = a0 + a1
                    p1[j] = a0 + a2
                    p2[j] = a0 + a3
                    p3[j] = a1 + a2
                    p4[j] = a1 + a3
                    p5[j] = a2 + a3
            for j in range(n):
                best[j] = -np.inf  # for |w| the kernel's -1: scores are >= 0 there
                arg[j] = 0
            for p in range(90):
                q0 = ps[index[p, 0]]
                q1 = ps[index[p, 1]]
                q2 = ps[index[p, 2]]
                q3 = ps[index[p, 3]]
                for j in range(n):
                    score = ((q0[j] + q1[j]) + q2[j]) + q3[j]
                    if score > best[j]:  # first maximum wins; NaN scores never do
                        best[j] = score
                        arg[j] = p
            for r in range(4):
                dst = out32[4 * bi + r]
                for j in range(n):
                    dst[j0 + j] = words[arg[j], r]


if numba is not None:
    _mask_kernel = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")(_mask_kernel)

_tables: tuple[np.ndarray, np.ndarray] | None = None


def transposable_24_mask_cpu(values: torch.Tensor, patterns: torch.Tensor, take_abs: bool = True) -> torch.Tensor:
    """Transposable 2:4 mask of ``values`` float32 [R, C] (CPU, ``R % 4 == 0``, ``C % 4 == 0``; scored by
    ``|values|``, or by ``values`` as given when not ``take_abs``) with bool ``patterns [90, 4, 4]`` in
    tie-break order. Returns bool [R, C]: block ``(i, j)``
    (rows ``4i..4i+3``, columns ``4j..4j+3``) holds the first pattern maximising ``((s_0+s_1)+s_2)+s_3``."""
    global _tables
    if _tables is None:
        _tables = _pattern_tables(patterns)
    if values.dtype != torch.float32 or values.device.type != "cpu" or values.dim() != 2:
        raise ValueError("transposable_24_mask_cpu: a 2-D float32 CPU tensor expected, got "
                         f"{values.dtype} {tuple(values.shape)} on {values.device}")
    r, c = values.shape
    w = values.contiguous()
    mask = torch.empty(r, c, dtype=torch.bool)
    if mask.numel():
        _mask_kernel(w.numpy(), mask.view(torch.int32).numpy(), _tables[0], _tables[1], _CHUNK, take_abs)
    return mask
