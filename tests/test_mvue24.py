"""MVUE24 (Hu et al., ICML 2024): unbiasedness, 2:4 pattern, zero groups, determinism, and the MVUE linear."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparsert.runtime.errors import FormatError
from sparsert.train.mvue24 import (
    inclusion_probabilities_24,
    mvue24,
    mvue24_weight_grad,
    mvue24_with_mask,
    sparse_linear_mvue,
)

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


def _exact_pairs(a: list[float]) -> dict[frozenset, float]:
    """P(kept pair = {i, j}) of the two-step sampler, by enumerating the ordered draws."""
    s = sum(a)
    pairs: dict[frozenset, float] = {}
    for i, j in itertools.permutations(range(4), 2):
        if a[i] > 0 and s - a[i] > 0 and a[j] > 0:
            pairs[frozenset((i, j))] = pairs.get(frozenset((i, j)), 0.0) + a[i] / s * a[j] / (s - a[i])
    return pairs


def test_kept_pairs_follow_the_two_draw_law():
    # The second draw reuses the first uniform's residual; the joint law of the kept pair must still be
    # P{i, j} = p_i·a_j/(S − a_i) + p_j·a_i/(S − a_j), not just the right marginals.
    samples = 40000
    groups = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-0.5, 0.1, 2.0, -3.0], [1e6, 1.0, 1.0, 1.0], [0.3, -3.0, 0.03, 1.0]])
    x = groups.reshape(1, -1).expand(samples, -1).contiguous()
    _, kept = mvue24_with_mask(x, generator=torch.Generator().manual_seed(9))
    kept = kept.reshape(samples, len(groups), 4)
    for gi, row in enumerate(groups.abs().double().tolist()):
        pairs = _exact_pairs(row)
        assert sum(pairs.values()) == pytest.approx(1.0)
        total = 0.0
        for pair, p in pairs.items():
            want = torch.zeros(4, dtype=torch.bool)
            want[list(pair)] = True
            freq = (kept[:, gi] == want).all(-1).double().mean().item()
            total += freq
            assert abs(freq - p) <= 4.5 * (p * (1 - p) / samples) ** 0.5 + 1e-9, (gi, sorted(pair), freq, p)
        assert total == 1.0  # every sample kept one of the possible pairs


def test_groups_along_dim_0_and_a_middle_dimension():
    samples = 20000
    # dim 0: 4 rows = one group per column, GROUPS' 7 groups repeated (also crosses the CPU column blocks)
    x = GROUPS.t().repeat(1, samples)  # (4, 7·samples)
    out = mvue24(x, generator=torch.Generator().manual_seed(3), dim=0)
    mean = out.double().reshape(4, samples, 7).mean(1)
    target = GROUPS.t().double()
    pi = torch.tensor([_exact_inclusion(row) for row in GROUPS.abs().double().tolist()], dtype=torch.float64).t()
    sem = torch.where(pi > 0, target**2 * (1 / pi.clamp(min=1e-300) - 1), torch.zeros_like(pi)).div(samples).sqrt()
    assert ((mean - target).abs() <= 4.5 * sem + 1e-6 * target.abs()).all()
    # a middle dimension: groups of 4 consecutive entries along dim 1 of (3, 8, 5)
    g = torch.Generator().manual_seed(4)
    y = torch.randn(3, 8, 5, generator=g)
    y[0, :4, 0] = 0
    y[1, 4:8, 2] = torch.tensor([0.0, 0.0, 2.5, 0.0])
    out, kept = mvue24_with_mask(y, generator=g, dim=1)
    nonzeros = (y != 0).reshape(3, 2, 4, 5).sum(2)
    assert torch.equal(kept.reshape(3, 2, 4, 5).sum(2), nonzeros.clamp(max=2))
    assert (out[0, :4, 0] == 0).all() and out[1, 6, 2] == 2.5 and torch.isfinite(out).all()
    with pytest.raises(FormatError, match=r"y: MVUE24 needs a tensor whose dimension 0 is divisible by 4, got \(3, 8"):
        mvue24(torch.randn(3, 8), dim=0, name="y")
    with pytest.raises(FormatError, match="along dimension 2, but the tensor has shape"):
        mvue24(torch.randn(4, 4), dim=2)


def test_blocks_give_the_same_draws_and_the_fused_gemm_matches(monkeypatch):
    import sparsert.train.mvue24 as mv

    g = torch.Generator().manual_seed(6)
    grad, x = torch.randn(64, 24, generator=g), torch.randn(64, 8, generator=g)  # 64 tokens, N = 24, K = 8
    grad[:4, 0] = 0  # a zero group
    ref = mvue24(grad, torch.Generator().manual_seed(0), dim=0)
    torch.testing.assert_close(mvue24_weight_grad(grad, x, torch.Generator().manual_seed(0)), ref.t() @ x)
    # blocks of 3 groups of rows (12 tokens): row blocks consume the generator in order, so the draws are the
    # same, and the block GEMMs accumulate to the same gradient
    monkeypatch.setattr(mv, "_CPU_BLOCK_GROUPS", 3 * 24)
    monkeypatch.setattr(mv, "_CPU_MIN_ROWS", 1)
    assert torch.equal(mvue24(grad, torch.Generator().manual_seed(0), dim=0), ref)
    torch.testing.assert_close(mvue24_weight_grad(grad, x, torch.Generator().manual_seed(0)), ref.t() @ x)
    # column blocks too (8 columns): other draws, same guarantees
    monkeypatch.setattr(mv, "_CPU_MAX_COLS", 8)
    out = mvue24(grad, torch.Generator().manual_seed(0), dim=0)
    assert ((out != 0).reshape(16, 4, 24).sum(1) == (grad != 0).reshape(16, 4, 24).sum(1).clamp(max=2)).all()
    torch.testing.assert_close(mvue24_weight_grad(grad, x, torch.Generator().manual_seed(0)), out.t() @ x)
    # low-precision gradients come back in their dtype
    wg = mvue24_weight_grad(grad.bfloat16(), x.bfloat16(), torch.Generator().manual_seed(0))
    assert wg.dtype == torch.bfloat16 and wg.shape == (24, 8)
    with pytest.raises(FormatError, match=r"must be \[T, N\] and \[T, K\]"):
        mvue24_weight_grad(grad, x[:60])


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


def test_inference_mode_then_normal_mode_in_a_fresh_thread():
    # the CPU scratch is per thread and kept between calls; one made in inference mode could not be updated
    # in place outside it, so inference mode must not leave one behind
    import threading

    x = torch.randn(32, 12)
    results: dict[str, object] = {}

    def work() -> None:
        try:
            with torch.inference_mode():
                results["inside"] = mvue24(x, generator=torch.Generator().manual_seed(5), dim=0)
            results["outside"] = mvue24(x, generator=torch.Generator().manual_seed(5), dim=0)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert "error" not in results, results.get("error")
    assert torch.equal(results["inside"], results["outside"])


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
    # ∇W = MVUE24(∇Zᵀ) · X, sampling along the token dimension (dim 0 of ∇Z [T, N]), same generator stream
    g2 = gy.reshape(-1, 6)
    sampled = mvue24(g2, generator=torch.Generator().manual_seed(0), dim=0)
    assert ((sampled != 0).reshape(-1, 4, 6).sum(1) == 2).all()  # 2:4 along the tokens
    expected = sampled.t() @ x.detach().reshape(-1, 8)
    torch.testing.assert_close(w.grad, expected)
    assert not torch.allclose(w.grad, g2.t() @ x.detach().reshape(-1, 8))  # it did sample


def test_sparse_linear_mvue_exact_mode_and_padding():
    x, w, b, mask, gy = _setup(tokens=10)  # 10 tokens: padded to 12 for the 2:4 sampling
    sparse_linear_mvue(x, w, mask, b, mvue=False).backward(gy)
    torch.testing.assert_close(w.grad, gy.reshape(-1, 6).t() @ x.detach().reshape(-1, 8))
    w.grad = None
    sparse_linear_mvue(x, w, mask, b, generator=torch.Generator().manual_seed(1)).backward(gy)
    gp = torch.nn.functional.pad(gy.reshape(-1, 6), (0, 0, 0, 2))  # (12, 6): two zero tokens
    xp = torch.nn.functional.pad(x.detach().reshape(-1, 8), (0, 0, 0, 2))
    sampled = mvue24(gp, generator=torch.Generator().manual_seed(1), dim=0)
    torch.testing.assert_close(w.grad, sampled.t() @ xp)
    torch.testing.assert_close(
        mvue24_weight_grad(gy.reshape(-1, 6), x.detach().reshape(-1, 8), torch.Generator().manual_seed(1)), w.grad)


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


def _special_groups(m: int, c: int, seed: int) -> torch.Tensor:
    """[m, 4, c] float32 gradients with zeros, subnormals, ±inf, NaN, huge values, lone non-zeros, zero groups."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 4, c, generator=g)
    r = torch.rand(m, 4, c, generator=g)
    x[r < 0.2] = 0
    x[(r > 0.2) & (r < 0.22)] = 1e-39
    x[(r > 0.3) & (r < 0.301)] = float("nan")
    x[(r > 0.4) & (r < 0.401)] = float("inf")
    x[(r > 0.5) & (r < 0.501)] = -float("inf")
    x[(r > 0.6) & (r < 0.65)] *= 1e30
    x[(r > 0.7) & (r < 0.75)] = -0.0
    x[: m // 4] = 0
    x[: m // 8, 2] = 3.0
    return x


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical float32 tensors (so +0 and -0 differ), NaN compared as NaN whatever its sign bit."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


@pytest.mark.parametrize(("m", "c"), [(1, 1), (3, 5), (17, 33), (64, 384)])
def test_compiled_cpu_sampler_is_bit_identical_to_the_torch_reference(m, c):
    import sparsert.train.mvue24 as mv
    from sparsert.train import mvue24_cpu

    if not mvue24_cpu.available():
        pytest.skip("numba is not installed: the torch sampler runs on CPU")
    for seed, x in enumerate((torch.randn(m, 4, c, generator=torch.Generator().manual_seed(m)),
                              _special_groups(m, c, m + c))):
        u = torch.rand(m, c, generator=torch.Generator().manual_seed(seed))
        u.view(-1)[:4] = torch.tensor([0.0, 1 - 2**-24, 0.5, 0.25])[: u.numel()]
        views = mv._block_views(torch.empty(22 * m * c), m, c, None)
        views.u.copy_(u)
        ref = torch.empty(m, 4, c)
        mv._sample_block(x, ref, views)
        out = torch.full((m, 4, c), 7.0)
        mvue24_cpu.sample_block_cpu(x, out, u)
        assert _same_bits(out, ref)
        # a column block of wider tensors (strided input and output): the same values, nothing else written
        wide = torch.randn(m, 4, c + 9)
        wide[:, :, 3:3 + c] = x
        dst = torch.full((m, 4, c + 5), 7.0)
        mvue24_cpu.sample_block_cpu(wide[:, :, 3:3 + c], dst[:, :, 2:2 + c], u)
        assert _same_bits(dst[:, :, 2:2 + c].contiguous(), ref)
        assert (dst[:, :, :2] == 7).all() and (dst[:, :, 2 + c:] == 7).all()
    with pytest.raises(ValueError, match="float32 operands expected"):
        mvue24_cpu.sample_block_cpu(x.double(), out, u)
    with pytest.raises(ValueError, match=r"x \[m, 4, c\], out \[m, 4, c\] and u \[m, c\] expected"):
        mvue24_cpu.sample_block_cpu(x, out, u[:, :-1] if c > 1 else u[:0])


def test_compiled_and_torch_samplers_give_the_same_draws_end_to_end(monkeypatch):
    import sparsert.train.mvue24 as mv
    from sparsert.train import mvue24_cpu

    if not mvue24_cpu.available():
        pytest.skip("numba is not installed: the torch sampler runs on CPU")
    g = torch.Generator().manual_seed(11)
    grad, x = torch.randn(256, 40, generator=g), torch.randn(256, 16, generator=g)
    last = torch.randn(6, 20, generator=g)  # groups along the last dimension
    monkeypatch.setattr(mv, "_CPU_BLOCK_GROUPS", 4 * 40)  # several row blocks
    monkeypatch.setattr(mv, "_CPU_MIN_ROWS", 1)
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(mvue24_cpu, "available", lambda compiled=compiled: compiled)
        results.append((mvue24(grad, torch.Generator().manual_seed(0), dim=0),
                        mvue24_weight_grad(grad, x, torch.Generator().manual_seed(0)),
                        mvue24(last, torch.Generator().manual_seed(1))))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
