"""Transposable 2:4 masks: one mask that is 2:4 along K for both ``W`` and ``Wᵀ``.

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024, §4.1: split
``W [out, K]`` into 4×4 blocks and give each block, among the 90 binary 4×4 patterns with exactly two ones
in every row and every column, the one that keeps the largest ``Σ |W|``. Every row of the resulting mask
is 2:4 along K (forward GEMM ``Y = X·(W⊙M)ᵀ``) and so is every row of its transpose (backward GEMM
``∇X = ∇Z·(W⊙M)``), so both GEMMs can run on 2:4 sparse tensor cores. The paper computes it as one matmul,
``scores = patterns[90×16] · |W_blocks|[16×nblocks]``, then an argmax over the 90 patterns; this module is
the CPU (and plain-torch GPU) reference for the kernels in ``cuda/``.

Speed (the issue asks for a 4096×4096 weight in under 50 ms on one CPU core; see
``tools/bench_mask_refresh.py``). On CPU the mask comes from :mod:`sparsert.runtime.transposable_mask_cpu`,
a numba loop scoring the 90 patterns from row pair sums as the CUDA kernel does (~39 ms). The torch
path below (other devices without the kernel; CPU without numba) uses two exact identities that halve the
work and remove the slow argmax:

- The 90 patterns come in 45 complementary pairs ``(P, J − P)`` (the complement of a two-per-row,
  two-per-column pattern is one too), and ``score(J − P) = T − score(P)`` with ``T`` the block's total. So
  ``max over 90 = (T + max_k |d_k|) / 2`` with ``d_k = S_k · a``, ``S_k = 2·P_k − J`` (±1 entries): a
  45-row matmul instead of 90, and the sign of the winning ``d_k`` says whether ``P_k`` or its complement wins.
- The argmax over the 45 rows is an integer max: ``|d_k|``'s float bits (a non-negative float orders like
  its int32 bits) with the low 6 mantissa bits replaced by the row index (rows in reverse pattern order, so
  a larger code is a lower pattern). Near-ties — scores within a relative 2⁻¹⁷ (≈ 7.6e-6) of each other —
  therefore go to the lower pattern index; otherwise the result is the exact argmax.
  :func:`transposable_24_mask_reference` is the literal 90-pattern argmax.

Work is done in chunks of block rows so every intermediate stays in cache and nothing is allocated per
element of the weight beyond the output mask.
"""

from __future__ import annotations

import itertools

import torch

from sparsert.runtime import transposable_mask_cpu
from sparsert.runtime.errors import FormatError

__all__ = [
    "TRANSPOSABLE_PATTERNS_24",
    "transposable_patterns_24",
    "transposable_24_mask",
    "transposable_24_mask_reference",
    "is_transposable_24",
    "check_transposable_shape",
]


def transposable_patterns_24() -> torch.Tensor:
    """The 90 binary 4×4 patterns with exactly two ones in every row and every column.

    Returns bool [90, 4, 4] (pattern, row, column). Ordered in complementary pairs: pattern ``2k + 1`` is
    the complement (``~``) of pattern ``2k``; the even patterns follow the lexicographic order of their
    rows' column pairs, taking each pattern the first time it or its complement appears.
    """
    pairs = list(itertools.combinations(range(4), 2))  # the 6 ways to keep two of four columns
    found: list[torch.Tensor] = []
    for choice in itertools.product(range(6), repeat=4):  # one column pair per row
        p = torch.zeros(4, 4, dtype=torch.bool)
        for row, c in enumerate(choice):
            p[row, list(pairs[c])] = True
        if bool((p.sum(0) == 2).all()):
            found.append(p)
    assert len(found) == 90, f"expected 90 transposable 2:4 patterns, generated {len(found)}"
    ordered: list[torch.Tensor] = []
    seen: set[bytes] = set()
    for p in found:
        key = p.numpy().tobytes()
        if key in seen:
            continue
        q = ~p
        seen.update((key, q.numpy().tobytes()))
        ordered += [p, q]
    patterns = torch.stack(ordered)
    assert patterns.shape == (90, 4, 4)
    return patterns


TRANSPOSABLE_PATTERNS_24: torch.Tensor = transposable_patterns_24()
"""bool [90, 4, 4]; see :func:`transposable_patterns_24` (do not modify in place)."""

# ±1 matrix of the 45 even patterns in reverse order: row r holds pattern pair k = 44 − r, so
# d_r = S_r · a and score(P_{2k}) = (T + d_r) / 2, score(P_{2k+1}) = (T − d_r) / 2.
_SIGNS_45 = (TRANSPOSABLE_PATTERNS_24[0::2].flip(0).reshape(45, 16).float() * 2 - 1).contiguous()


# int32 [90, 4]: each pattern's four rows as int32 words of four bool bytes (how both paths write the mask).
_PATTERN_ROWS = TRANSPOSABLE_PATTERNS_24.reshape(90, 16).contiguous().view(torch.int32).reshape(90, 4)
# int64 [90, 4]: the pair sums each pattern keeps, for the compiled CPU loop.
_PAIR_INDEX = transposable_mask_cpu.pair_sum_index(TRANSPOSABLE_PATTERNS_24)


def _rows_table() -> torch.Tensor:
    """int32 [128, 4]: entry ``r + 64·(d_r < 0)`` holds the four rows (4 bools = one int32 each) of the
    winning pattern, ``P_{2(44−r)}`` or its complement."""
    rows = _PATTERN_ROWS
    table = torch.zeros(128, 4, dtype=torch.int32)
    for r in range(45):
        table[r], table[64 + r] = rows[2 * (44 - r)], rows[2 * (44 - r) + 1]
    return table


_ROWS_TABLE = _rows_table()
_LOW_BITS = 6  # 45 pattern pairs fit in 6 bits
_CODE_MASK = (1 << _LOW_BITS) - 1
_KEY_MASK = 0x7FFFFFFF & ~_CODE_MASK  # clears the sign bit (abs) and the low 6 mantissa bits
_TARGET_BLOCKS_PER_CHUNK = 8192  # 45 × 8192 float32 = 1.4 MiB of scores per chunk


def check_transposable_shape(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise FormatError unless ``weight`` is 2-D ``[out, K]`` with ``out % 4 == 0`` and ``K % 4 == 0``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise FormatError(f"{name} must be a 2-D tensor [out, K] for a transposable 2:4 mask, got {shape}")
    out, k = weight.shape
    if out % 4 != 0 or k % 4 != 0:
        raise FormatError(
            f"{name} of shape {tuple(weight.shape)}: a transposable 2:4 mask needs out and K divisible by 4"
        )


def _scores_source(weight: torch.Tensor, score: torch.Tensor | None, name: str) -> torch.Tensor:
    check_transposable_shape(weight, name)
    if score is None:
        return weight.detach().contiguous()
    if not isinstance(score, torch.Tensor) or score.shape != weight.shape:
        shape = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
        raise FormatError(f"score for {name} has shape {shape}, expected {tuple(weight.shape)}")
    return score.detach().contiguous()


@torch.no_grad()
def transposable_24_mask(
    weight: torch.Tensor, score: torch.Tensor | None = None, name: str = "weight"
) -> torch.Tensor:
    """Transposable 2:4 mask of ``weight`` (Hu et al., ICML 2024): per 4×4 block, the best of 90 patterns.

    Args:
        weight: [out, K], any float dtype, any device; ``out % 4 == 0`` and ``K % 4 == 0``.
        score: optional [out, K] importance to maximise instead of ``|weight|`` (used as given, not abs'd).
        name: tensor name for error messages.
    Returns:
        bool [out, K] on ``weight``'s device. Block ``(i, j)`` covers rows ``4i..4i+3`` and columns
        ``4j..4j+3``; inside it every row and every column holds exactly two True. So ``mask`` is 2:4 along
        K and ``mask.T`` is 2:4 along ``out``. Ties and near-ties (within a relative 2⁻¹⁷) keep the lower
        pattern index of :data:`TRANSPOSABLE_PATTERNS_24` (on CPU through the numba loop of
        :mod:`~sparsert.runtime.transposable_mask_cpu`, elsewhere the torch path below). Non-finite weights
        give a valid but arbitrary block pattern.
    """
    src = _scores_source(weight, score, name)
    out, k = src.shape
    if src.device.type == "cpu" and transposable_mask_cpu.available():
        return transposable_mask_cpu.transposable_24_mask_cpu(src.float(), _PAIR_INDEX, _PATTERN_ROWS.numpy(),
                                                              score is None)
    nbc = k // 4  # blocks per block row
    device = src.device
    mask = torch.empty(out, k, dtype=torch.bool, device=device)
    if mask.numel() == 0:
        return mask
    mask_rows = mask.view(torch.int32).view(out // 4, 4, nbc)  # one int32 = one block row's 4 bools
    signs = _SIGNS_45.to(device)
    codes = torch.arange(45, dtype=torch.int32, device=device)[:, None]
    rows_table = _ROWS_TABLE.to(device)
    br_per_chunk = max(1, min(out // 4, _TARGET_BLOCKS_PER_CHUNK // nbc))
    # One block row of a block = 4 floats = 16 bytes, moved as one complex128 element: gathering the blocks
    # into [n, 16] rows (block-major) copies 16-byte elements, 4x fewer than a float-by-float permute.
    wide = src.dtype == torch.float32 and src.storage_offset() % 4 == 0
    a = torch.empty(br_per_chunk * nbc, 16, device=device)  # (block, 4 rows x 4 columns of the block)
    d = torch.empty(45, br_per_chunk * nbc, device=device)
    key = torch.empty(45, br_per_chunk * nbc, dtype=torch.int32, device=device)
    for b0 in range(0, out // 4, br_per_chunk):
        nbr = min(br_per_chunk, out // 4 - b0)
        n = nbr * nbc
        a_c, d_c, key_c = a[:n], d[:, :n], key[:, :n]
        rows = src[4 * b0: 4 * (b0 + nbr)]
        if wide:
            a_c.view(torch.complex128).view(nbr, nbc, 4).copy_(rows.view(torch.complex128).view(nbr, 4, nbc)
                                                                .permute(0, 2, 1))
        else:
            a_c.view(nbr, nbc, 4, 4).copy_(rows.view(nbr, 4, nbc, 4).permute(0, 2, 1, 3))
        if score is None:
            a_c.abs_()
        torch.mm(signs, a_c.t(), out=d_c)  # d_r for the 45 pattern pairs, (45, n)
        torch.bitwise_and(d_c.view(torch.int32), _KEY_MASK, out=key_c)  # |d_r| bits, low 6 bits cleared
        key_c |= codes  # ... replaced by r: an int max is the argmax, ties to the larger r = lower pattern
        r = key_c.amax(0)  # (n,)
        r &= _CODE_MASK
        sign = d_c.view(torch.int32).gather(0, r.long()[None])[0]  # bits of the winning d_r
        sign >>= 25  # arithmetic shift: bit 6 now holds the sign bit
        sign &= 64
        r |= sign  # table index r + 64·(d_r < 0): the complement wins when d_r < 0
        mask_rows[b0: b0 + nbr] = rows_table.index_select(0, r).view(nbr, nbc, 4).permute(0, 2, 1)
    return mask


@torch.no_grad()
def transposable_24_mask_reference(
    weight: torch.Tensor, score: torch.Tensor | None = None, name: str = "weight"
) -> torch.Tensor:
    """The literal method: ``scores = patterns[90×16] · |W_blocks|[16×nblocks]``, argmax over the 90.

    Same arguments and result layout as :func:`transposable_24_mask`; exact float32 argmax, ties to the
    lower pattern index. Slow (allocates 90 scores per block); for tests and as a kernel reference.
    """
    src = _scores_source(weight, score, name)
    out, k = src.shape
    vals = src.float() if score is not None else src.float().abs()
    blocks = vals.reshape(out // 4, 4, k // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)  # (nblocks, 16)
    patterns = TRANSPOSABLE_PATTERNS_24.to(src.device).reshape(90, 16)
    best = torch.argmax(blocks @ patterns.float().t(), dim=1)  # first maximum on ties
    chosen = patterns[best].reshape(out // 4, k // 4, 4, 4).permute(0, 2, 1, 3)
    return chosen.reshape(out, k)


def is_transposable_24(mask: torch.Tensor) -> bool:
    """True when the 2-D ``mask`` (bool or 0/1) keeps exactly two of every four along K in ``mask`` and in
    ``mask.T`` (i.e. every aligned 4×4 block is one of the 90 patterns); False for any other shape."""
    if mask.dim() != 2 or mask.shape[0] % 4 != 0 or mask.shape[1] % 4 != 0:
        return False
    m = mask != 0
    along_k = m.reshape(m.shape[0], -1, 4).sum(-1)
    along_out = m.t().reshape(m.shape[1], -1, 4).sum(-1)
    return bool((along_k == 2).all()) and bool((along_out == 2).all())
