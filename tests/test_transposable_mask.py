"""Transposable 2:4 masks (Hu et al., ICML 2024): the 90 patterns, validity, optimality, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsert.runtime.errors import FormatError
from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.transposable_mask import (
    TRANSPOSABLE_PATTERNS_24,
    is_transposable_24,
    transposable_24_mask,
    transposable_24_mask_reference,
    transposable_patterns_24,
)


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def mask_path(request, monkeypatch):
    """Every test runs on both CPU paths: the numba loop (runtime/transposable_mask_cpu.py) and the torch one."""
    from sparsert.runtime import transposable_mask_cpu

    if request.param == "compiled" and not transposable_mask_cpu.available():
        pytest.skip("numba is not installed")
    if request.param == "torch":
        monkeypatch.setattr(transposable_mask_cpu, "available", lambda: False)
    return request.param


def _block_scores(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ|W| kept per 4×4 block, float64 [nblocks]."""
    out, k = weight.shape
    kept = (weight.double().abs() * mask).reshape(out // 4, 4, k // 4, 4)
    return kept.sum(dim=(1, 3)).flatten()


def _brute_force_best(weight: torch.Tensor) -> torch.Tensor:
    """Best Σ|W| per block over all 2^16 masks filtered to two-per-row-and-column (independent of the module)."""
    out, k = weight.shape
    blocks = weight.double().abs().reshape(out // 4, 4, k // 4, 4).permute(0, 2, 1, 3).reshape(-1, 4, 4)
    every = ((torch.arange(1 << 16)[:, None] >> torch.arange(16)) & 1).reshape(-1, 4, 4)  # all 2^16 masks
    ok = (every.sum(1) == 2).all(1) & (every.sum(2) == 2).all(1)
    pats = every[ok].double()  # (90, 4, 4)
    assert pats.shape[0] == 90
    return torch.einsum("bij,pij->bp", blocks, pats).max(1).values


def test_ninety_distinct_patterns_two_per_row_and_column():
    p = transposable_patterns_24()
    assert p.shape == (90, 4, 4) and p.dtype == torch.bool
    assert (p.sum(1) == 2).all() and (p.sum(2) == 2).all()
    assert len({bytes(x.flatten().tolist()) for x in p}) == 90
    # complementary pairs: pattern 2k+1 == ~pattern 2k
    assert torch.equal(p[1::2], ~p[0::2])
    assert torch.equal(p, TRANSPOSABLE_PATTERNS_24)


def test_count_matches_combinatorics():
    # independent count: 4x4 0/1 matrices with all row and column sums 2
    count = 0
    for rows in itertools.product(itertools.combinations(range(4), 2), repeat=4):
        cols = [0] * 4
        for r in rows:
            for c in r:
                cols[c] += 1
        count += cols == [2, 2, 2, 2]
    assert count == 90


@pytest.mark.parametrize("shape", [(4, 4), (8, 12), (64, 128), (132, 36)])
def test_mask_is_24_for_w_and_wt(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    m = transposable_24_mask(w)
    assert m.shape == w.shape and m.dtype == torch.bool
    assert is_transposable_24(m)
    assert (m.reshape(shape[0], -1, 4).sum(-1) == 2).all()  # 2:4 along K for W
    assert (m.t().reshape(shape[1], -1, 4).sum(-1) == 2).all()  # 2:4 along K for Wᵀ


def test_optimal_against_brute_force():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    m = transposable_24_mask(w)
    torch.testing.assert_close(_block_scores(w, m), _brute_force_best(w), rtol=1e-5, atol=1e-6)


def test_fast_path_matches_literal_90_pattern_argmax():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 200, generator=g)
    fast, ref = transposable_24_mask(w), transposable_24_mask_reference(w)
    # identical up to near-ties (relative 2^-17); scores must agree everywhere
    torch.testing.assert_close(_block_scores(w, fast), _block_scores(w, ref), rtol=1e-5, atol=1e-6)
    assert (fast == ref).float().mean() > 0.999
    # integer-valued weights with distinct block optima: exactly the reference's choice
    wi = torch.randint(-1000, 1000, (64, 64), generator=g).float()
    assert torch.equal(transposable_24_mask(wi), transposable_24_mask_reference(wi))


def test_known_block_pattern():
    # large weights on a valid transposable pattern must be selected exactly
    p = TRANSPOSABLE_PATTERNS_24[37]
    w = torch.where(p, torch.tensor(5.0), torch.tensor(0.1)) * torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert torch.equal(transposable_24_mask(w), p)
    assert torch.equal(transposable_24_mask_reference(w), p)


def test_ties_go_to_lower_pattern_index():
    # all-equal block: every pattern ties -> pattern 0
    w = torch.ones(4, 8)
    m = transposable_24_mask(w)
    assert torch.equal(m[:, :4], TRANSPOSABLE_PATTERNS_24[0]) and torch.equal(m[:, 4:], TRANSPOSABLE_PATTERNS_24[0])
    assert torch.equal(transposable_24_mask_reference(w), m)
    assert torch.equal(transposable_24_mask(torch.zeros(8, 8)), transposable_24_mask_reference(torch.zeros(8, 8)))


def test_never_better_than_unconstrained_1d_mask():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    t, one_d = transposable_24_mask(w), nm_mask(w, 2, 4)
    assert (w.abs() * t).sum() <= (w.abs() * one_d).sum() + 1e-5
    # ...but it keeps most of the magnitude the 1-D mask keeps
    assert (w.abs() * t).sum() > 0.9 * (w.abs() * one_d).sum()


def test_score_argument_and_dtypes():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 32, generator=g)
    score = torch.rand(16, 32, generator=g)
    m = transposable_24_mask(w, score=score)
    assert torch.equal(m, transposable_24_mask(score))  # score replaces |W|
    signed = torch.randn(16, 32, generator=g)  # a score is used as given, not abs'd
    assert torch.equal(transposable_24_mask(w, score=signed), transposable_24_mask_reference(w, score=signed))
    assert not torch.equal(transposable_24_mask(w, score=signed), transposable_24_mask(signed))
    zeros = torch.where(TRANSPOSABLE_PATTERNS_24[0], -0.0, 0.0)  # -0 and +0 tie: the lower pattern wins
    assert torch.equal(transposable_24_mask(zeros, score=zeros), TRANSPOSABLE_PATTERNS_24[0])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        wd = w.to(dtype)
        assert torch.equal(transposable_24_mask(wd), transposable_24_mask_reference(wd))
    assert is_transposable_24(transposable_24_mask(w.t()))  # non-contiguous input


def test_shape_errors_name_the_tensor():
    with pytest.raises(FormatError, match=r"blocks\.0\.mlp\.up_proj\.weight of shape \(6, 8\).*divisible by 4"):
        transposable_24_mask(torch.randn(6, 8), name="blocks.0.mlp.up_proj.weight")
    with pytest.raises(FormatError, match=r"weight of shape \(8, 10\)"):
        transposable_24_mask(torch.randn(8, 10))
    with pytest.raises(FormatError, match="2-D"):
        transposable_24_mask(torch.randn(4, 4, 4))
    with pytest.raises(FormatError, match=r"score for weight has shape \(4, 8\)"):
        transposable_24_mask(torch.randn(8, 8), score=torch.rand(4, 8))


def test_is_transposable_rejects_plain_24():
    m = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.bool)  # 2:4 along K, columns 0 and 1 hold four
    assert not is_transposable_24(m)
    assert not is_transposable_24(torch.ones(3, 4, dtype=torch.bool))


def test_compiled_mask_is_the_argmax_up_to_near_ties_and_never_picks_nan(mask_path):
    if mask_path != "compiled":
        pytest.skip("the compiled path only")
    g = torch.Generator().manual_seed(5)
    for shape in [(4, 4), (8, 1028), (132, 36), (256, 512)]:
        w = torch.randn(*shape, generator=g)
        fast, ref = transposable_24_mask(w), transposable_24_mask_reference(w)
        best = _block_scores(w, ref)
        assert (_block_scores(w, fast) >= best * (1 - 2.0**-16)).all(), shape  # a near-tie at most
        assert (fast == ref).float().mean() > 0.999, shape
        # a near-tie (relative 2^-17) goes to the lower pattern, whichever side of it the rounding falls
        tie = torch.where(TRANSPOSABLE_PATTERNS_24[5], 1.0, 0.0) + torch.where(TRANSPOSABLE_PATTERNS_24[3], 1.0, 0.0)
        tie = tie + 1e-3 * torch.where(TRANSPOSABLE_PATTERNS_24[5], 1.0, 0.0)  # pattern 5 better by ~5e-4 relative
        assert torch.equal(transposable_24_mask(tie), transposable_24_mask_reference(tie))  # a real gap: 5 wins
        tie = tie - 1e-3 * torch.where(TRANSPOSABLE_PATTERNS_24[5], 1.0, 0.0) + \
            1e-6 * torch.where(TRANSPOSABLE_PATTERNS_24[5], 1.0, 0.0)  # ~5e-7 relative: a near-tie
        assert torch.equal(transposable_24_mask(tie), TRANSPOSABLE_PATTERNS_24[3])
        if shape[0] == 4:
            continue
        wn = w.clone()
        wn[0, 0] = float("nan")  # NaN scores never win: the NaN entry is pruned ...
        wn[-4:, -4:] = float("nan")  # ... and an all-NaN block gets pattern 0, still a valid pattern
        m = transposable_24_mask(wn)
        assert is_transposable_24(m) and not m[0, 0]
        assert torch.equal(m[-4:, -4:], TRANSPOSABLE_PATTERNS_24[0])
