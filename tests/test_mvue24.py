"""MVUE24 (Hu et al., ICML 2024): unbiasedness, 2:4 pattern, zero groups, determinism, and the MVUE linear."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparsert.runtime.errors import FormatError
from sparsert.train.mvue24 import inclusion_probabilities_24, mvue24, mvue24_with_mask, sparse_linear_mvue

GROUPS = torch.tensor(
    [
        [1.0, 2.0, 3.0, 4.0],
        [-0.5, 0.1, 2.0, -3.0],
        [0.0, 0.0, 0.0, 0.0],  # zero group
        [0.0, 5.0, 0.0, 0.0],  # one non-zero
        [1.0, -1.0, 0.0, 0.0],  # exactly two non-zeros: kept exactly
        [0.0, 1e-3, 7.0, 0.0],
        [1e6, 1.0, 1.0, 1.0],  # S − a_i would cancel in float32
    ]
)


def _exact_inclusion(a: list[float]) -> list[float]:
    """π_j by enumerating the ordered draws (i, j) of the two-step sampler."""
    s = sum(a)
    pi = [0.0] * 4
    for i, j in itertools.permutations(range(4), 2):
        rest = s - a[i]
        if a[i] == 0 or rest == 0:
            continue
        p = a[i] / s * a[j] / rest
        pi[i] += p
        pi[j] += p
    # single non-zero: drawn first with probability 1, second draw among zeros
    for i in range(4):
        if a[i] > 0 and s - a[i] == 0:
            pi[i] = 1.0
    return pi


def test_inclusion_probabilities_match_enumeration():
    a = GROUPS.abs()
    pi = inclusion_probabilities_24(a)
    for row, p in zip(a.double().tolist(), pi.tolist(), strict=True):
        assert p == pytest.approx(_exact_inclusion(row), rel=1e-5, abs=1e-7)
    sums = pi.sum(-1)
    assert sums[0].item() == pytest.approx(2.0) and sums[2].item() == 0.0 and sums[3].item() == pytest.approx(1.0)


def test_unbiased_within_standard_errors():
    samples = 20000
    g = torch.Generator().manual_seed(0)
    x = GROUPS.reshape(1, -1).expand(samples, -1).contiguous()  # (S, 28)
    out = mvue24(x, generator=g)
    target = GROUPS.reshape(-1).double()
    pi = torch.tensor([p for row in GROUPS.abs().double().tolist() for p in _exact_inclusion(row)],
                      dtype=torch.float64)
    # analytic standard error: Var[out_j] = x_j² (1/π_j − 1); exact entries (π = 1 or x = 0) have none
    var = torch.where(pi > 0, target**2 * (1 / pi.clamp(min=1e-300) - 1), torch.zeros_like(pi))
    sem = (var / samples).sqrt()
    mean = out.double().mean(0)
    assert ((mean - target).abs() <= 4.5 * sem + 1e-6 * target.abs()).all(), (mean - target, sem)
    # it is really stochastic: sampled entries vary
    assert out[:, :4].std(0).min() > 0


def test_sampling_frequencies_match_inclusion_probabilities():
    samples = 20000
    g = torch.Generator().manual_seed(1)
    x = GROUPS[:2].reshape(1, -1).expand(samples, -1).contiguous()
    _, sampled = mvue24_with_mask(x, generator=g)
    freq = sampled.double().mean(0).reshape(2, 4)
    pi = inclusion_probabilities_24(GROUPS[:2].abs()).double()
    assert (freq - pi).abs().max() < 4.5 * (0.25 / samples) ** 0.5


def test_exact_24_pattern_and_zero_groups():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 64, generator=g)
    x[0, 0, :8] = 0  # two zero groups
    x[1, 2, 4:7] = 0  # one non-zero left in a group
    out, kept = mvue24_with_mask(x, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype and kept.shape == x.shape
    nonzeros = (x != 0).reshape(-1, 4).sum(-1)
    assert torch.equal(kept.reshape(-1, 4).sum(-1), nonzeros.clamp(max=2))  # two per group when possible
    assert ((out != 0).reshape(-1, 4).sum(-1) <= 2).all()
    assert not (out != 0)[~kept].any() and not (kept & (x == 0)).any()
    assert torch.isfinite(out).all()
    assert (out[0, 0, :8] == 0).all()
    assert out[1, 2, 7] == x[1, 2, 7]  # lone non-zero kept with scale 1
    # survivors are x / π: same sign, never smaller in magnitude
    kept = out != 0
    assert (torch.sign(out[kept]) == torch.sign(x[kept])).all() and (out[kept].abs() >= x[kept].abs() - 1e-6).all()


def test_determinism_with_generator():
    x = torch.randn(16, 32)
    a = mvue24(x, generator=torch.Generator().manual_seed(7))
    b = mvue24(x, generator=torch.Generator().manual_seed(7))
    c = mvue24(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_half_precision_input():
    x = torch.randn(8, 16).to(torch.bfloat16)
    out = mvue24(x, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and ((out != 0).reshape(-1, 4).sum(-1) <= 2).all()


def test_bad_input():
    with pytest.raises(FormatError, match=r"grad: MVUE24 needs .* divisible by 4, got \(3, 6\)"):
        mvue24(torch.randn(3, 6), name="grad")
    with pytest.raises(FormatError, match="floating-point"):
        mvue24(torch.ones(4, 4, dtype=torch.int64))


def _setup(tokens: int = 12):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, tokens // 2, 8, generator=g, requires_grad=True)
    w = torch.randn(6, 8, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    mask = torch.rand(6, 8, generator=g) > 0.5
    gy = torch.randn(2, tokens // 2, 6, generator=g)
    return x, w, b, mask, gy


def test_sparse_linear_mvue_forward_and_exact_gradients():
    x, w, b, mask, gy = _setup()
    y = sparse_linear_mvue(x, w, mask, b, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, F.linear(x, w * mask, b))
    y.backward(gy)
    torch.testing.assert_close(x.grad, gy @ (w * mask).detach())  # ∇X = ∇Z · (W ⊙ m), exact
    torch.testing.assert_close(b.grad, gy.sum((0, 1)))
    # ∇W = MVUE24(∇Zᵀ) · X, sampling along the token dimension, same generator stream
    gt = gy.reshape(-1, 6).t()
    expected = mvue24(gt, generator=torch.Generator().manual_seed(0)) @ x.detach().reshape(-1, 8)
    torch.testing.assert_close(w.grad, expected)
    assert not torch.allclose(w.grad, gt @ x.detach().reshape(-1, 8))  # it did sample


def test_sparse_linear_mvue_exact_mode_and_padding():
    x, w, b, mask, gy = _setup(tokens=10)  # 10 tokens: padded to 12 for the 2:4 sampling
    sparse_linear_mvue(x, w, mask, b, mvue=False).backward(gy)
    torch.testing.assert_close(w.grad, gy.reshape(-1, 6).t() @ x.detach().reshape(-1, 8))
    w.grad = None
    sparse_linear_mvue(x, w, mask, b, generator=torch.Generator().manual_seed(1)).backward(gy)
    gt = torch.nn.functional.pad(gy.reshape(-1, 6).t(), (0, 2))
    xp = torch.nn.functional.pad(x.detach().reshape(-1, 8), (0, 0, 0, 2))
    torch.testing.assert_close(w.grad, mvue24(gt, generator=torch.Generator().manual_seed(1)) @ xp)


def test_sparse_linear_mvue_weight_gradient_unbiased():
    x, w, b, mask, gy = _setup(tokens=8)
    exact = gy.reshape(-1, 6).t() @ x.detach().reshape(-1, 8)
    g = torch.Generator().manual_seed(5)
    grads = []
    for _ in range(400):
        w.grad = None
        sparse_linear_mvue(x, w, mask, b, generator=g).backward(gy)
        grads.append(w.grad.clone())
    stack = torch.stack(grads).double()
    sem = stack.std(0) / len(grads) ** 0.5
    assert ((stack.mean(0) - exact.double()).abs() <= 4.5 * sem + 1e-6).all()


def test_sparse_linear_mvue_shape_errors():
    with pytest.raises(FormatError, match="does not match weight"):
        sparse_linear_mvue(torch.randn(2, 5), torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(FormatError, match="mask"):
        sparse_linear_mvue(torch.randn(2, 4), torch.randn(3, 4), torch.ones(4, 3, dtype=torch.bool))
