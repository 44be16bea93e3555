"""The transposable 2:4 mask on CPU as one compiled loop (numba): the 90-pattern argmax, block by block.

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024, §4.1: each 4×4
block of ``W`` gets, among the 90 patterns with two ones in every row and column, the one keeping the largest
``Σ |W|``. Scores are summed as the CUDA kernel (``cuda/transposable_mask.cu``) sums them: per block row ``r``
the six pair sums ``s_r = |a| + |b|`` (columns ``a < b``), a pattern's score ``((s_0 + s_1) + s_2) + s_3`` in
float32. They are compared with their low 6 mantissa bits cleared, the first maximum in the order of
:data:`~sparsert.runtime.transposable_mask.TRANSPOSABLE_PATTERNS_24` winning: near-ties (within a relative
2⁻¹⁷) go to the lower pattern — the CUDA kernel applies the same rule, so the two give the same mask; the torch
path buckets another quantity (the pattern-minus-complement difference), so it can differ at near-ties. A
rounding-level difference in the weights can still flip a block whose two best scores straddle a bucket edge
(about as rarely as it would flip an exact argmax). A NaN score never wins. Blocks are processed in chunks
along one block row: the 24 pair sums of the chunk's blocks, then the 90 patterns one after another over all
of them (a loop LLVM vectorises across blocks), then four int32 stores per block (one per row: the pattern
row's four bools).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from sparsert.runtime.cpu_jit import cpu_kernel, numba_available

__all__ = ["available", "pair_sum_index", "transposable_24_mask_cpu"]

_PAIRS = tuple(itertools.combinations(range(4), 2))  # the six column pairs of a block row, in this order
_KEY_MASK = ~63  # scores compared with their low 6 mantissa bits cleared: near-ties go to the lower pattern
_KEY_FLOOR = -(2**31)
_CHUNK = 256  # blocks per chunk: 24 pair-sum rows of 1 KiB (24 KiB) stay in L1


def available() -> bool:
    """True when the compiled mask can run (:func:`~sparsert.runtime.cpu_jit.numba_available`)."""
    return numba_available()


def pair_sum_index(patterns: torch.Tensor) -> np.ndarray:
    """int64 [90, 4]: for bool ``patterns [90, 4, 4]``, per pattern and block row ``r`` the index ``6·r + pair``
    of the pair sum it keeps (pairs in :data:`_PAIRS` order)."""
    rows = patterns.tolist()
    return np.array([[6 * r + _PAIRS.index(tuple(c for c in range(4) if rows[p][r][c])) for r in range(4)]
                     for p in range(90)], dtype=np.int64)


def scores4(v, b, take_abs):  # noqa: ANN001, ANN201 - numba helper
    """The four scores ``v[b..b+3]`` (1-D float32), as absolute values with ``take_abs``."""
    if take_abs:
        return abs(v[b]), abs(v[b + 1]), abs(v[b + 2]), abs(v[b + 3])
    return v[b], v[b + 1], v[b + 2], v[b + 3]


def _mask_kernel(w, out32, index, words, chunk, take_abs):  # noqa: ANN001, PLR0913 - numba kernel
    """``w`` float32 [R, C] C-contiguous, ``out32`` int32 [R, C/4] (the bool mask's bytes, four per block row);
    scores are ``|w|`` with ``take_abs``, else ``w`` as given."""
    rows, cols = w.shape
    nbc = cols // 4
    ps = np.empty((24, chunk), dtype=np.float32)
    score = np.empty(chunk, dtype=np.float32)
    score_bits = score.view(np.int32)
    best = np.empty(chunk, dtype=np.int32)
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
                    a0, a1, a2, a3 = scores4(row, 4 * (j0 + j), take_abs)
                    p0[j] = a0 + a1
                    p1[j] = a0 + a2
                    p2[j] = a0 + a3
                    p3[j] = a1 + a2
                    p4[j] = a1 + a3
                    p5[j] = a2 + a3
            for j in range(n):
                best[j] = _KEY_FLOOR
                arg[j] = 0
            for p in range(90):
                q0 = ps[index[p, 0]]
                q1 = ps[index[p, 1]]
                q2 = ps[index[p, 2]]
                q3 = ps[index[p, 3]]
                for j in range(n):
                    score[j] = ((q0[j] + q1[j]) + q2[j]) + q3[j]
                    bits = score_bits[j]
                    key = (bits if bits >= 0 else -(bits & 0x7FFFFFFF)) & _KEY_MASK  # monotone; -0 == +0
                    if key > best[j] and score[j] == score[j]:  # first maximal key wins; NaN never does
                        best[j] = key
                        arg[j] = p
            for r in range(4):
                dst = out32[4 * bi + r]
                for j in range(n):
                    dst[j0 + j] = words[arg[j], r]


scores4 = cpu_kernel(scores4, inline=True)
_mask_kernel = cpu_kernel(_mask_kernel)

def transposable_24_mask_cpu(values: torch.Tensor, pair_index: np.ndarray, pattern_rows: np.ndarray,
                             take_abs: bool = True) -> torch.Tensor:
    """Transposable 2:4 mask of ``values`` float32 [R, C] (CPU, ``R % 4 == 0``, ``C % 4 == 0``; scored by
    ``|values|``, or by ``values`` as given when not ``take_abs``) over the 90 patterns in tie-break order, given
    as ``pair_index`` (:func:`pair_sum_index`) and ``pattern_rows`` (int32 [90, 4]: each pattern's rows as int32
    words of four bool bytes). Returns bool [R, C]: block ``(i, j)`` (rows ``4i..4i+3``, columns ``4j..4j+3``)
    holds the first pattern maximising ``((s_0+s_1)+s_2)+s_3`` up to near-ties (relative 2⁻¹⁷, to the lower
    pattern)."""
    if values.dtype != torch.float32 or values.device.type != "cpu" or values.dim() != 2 or \
            values.shape[0] % 4 or values.shape[1] % 4:
        raise ValueError("transposable_24_mask_cpu: a 2-D float32 CPU tensor [R, C] with R and C multiples of 4 "
                         f"expected, got {values.dtype} {tuple(values.shape)} on {values.device}")
    if pair_index.shape != (90, 4) or pattern_rows.shape != (90, 4) or pattern_rows.dtype != np.int32:
        raise ValueError(f"transposable_24_mask_cpu: pattern tables [90, 4] expected, got {pair_index.shape} and "
                         f"{pattern_rows.shape} {pattern_rows.dtype}")
    r, c = values.shape
    w = values.contiguous()
    mask = torch.empty(r, c, dtype=torch.bool)
    if mask.numel():
        _mask_kernel(w.numpy(), mask.view(torch.int32).numpy(), pair_index, pattern_rows, _CHUNK, take_abs)
    return mask
