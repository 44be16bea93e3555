"""MVUE24: an unbiased stochastic 2:4 sparsifier, and a sparse linear whose weight gradient uses it.

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024, §4.2, after
Chmiel, Hubara, Banner, Soudry, "Minimum Variance Unbiased N:M Sparsity for the Neural Gradients", ICLR 2023.
In the weight-gradient GEMM ``∇W = ∇Zᵀ · X`` the output gradient ``∇Zᵀ [N, T]`` is made 2:4 along the
token dimension T (its last dimension, the GEMM's reduction dimension), so this GEMM can run on sparse
tensor cores too. Deterministic top-2 would bias the gradient; MVUE24 samples two of each four instead:

- the first survivor ``i`` with probability ``p_i = |x_i| / S`` (``S = Σ |x|`` of the group),
- the second ``j ≠ i`` with probability ``|x_j| / (S − |x_i|)``,
- every survivor is divided by its inclusion probability
  ``π_j = p_j + Σ_{i≠j} p_i · |x_j| / (S − |x_i|)``, so ``E[out] = x`` exactly.

Zero groups stay zero; a group with a single non-zero keeps it unscaled (``π = 1``). Every group of the
output has at most two non-zeros, so it is a valid 2:4 operand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsert.runtime.errors import FormatError

__all__ = ["mvue24", "mvue24_with_mask", "inclusion_probabilities_24", "SparseLinearMVUE", "sparse_linear_mvue"]

# _OTHERS[i, j] = 1 for j != i: (|x| @ _OTHERS)[i] = Σ_{j≠i} |x_j| without the cancellation of S − |x_i|.
_OTHERS = 1.0 - torch.eye(4)


def _check_last_dim(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] % 4 != 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise FormatError(f"{name}: MVUE24 needs a tensor whose last dimension is divisible by 4, got {shape}")
    if not x.is_floating_point():
        raise FormatError(f"{name}: MVUE24 needs a floating-point tensor, got {x.dtype}")


def inclusion_probabilities_24(a: torch.Tensor) -> torch.Tensor:
    """Inclusion probabilities of MVUE24's two-draw sampling without replacement.

    ``a``: float32 [G, 4], non-negative magnitudes. Returns float32 [G, 4]: ``π_j`` for entries with
    ``a_j > 0`` (in (0, 1], summing to 2 over a group with at least two non-zeros, 1 for a lone non-zero);
    0 where ``a_j == 0``. Closed form: ``π_j = (a_j / S)·(1 + Σ_{i≠j} r_i)`` with ``r_i = a_i / (S − a_i)``
    (``0`` when ``S − a_i = 0``). Both ``S − a_i`` and ``Σ_{i≠j}`` are summed over the other three entries
    (a matmul with ``1 − I``), never subtracted, so a dominant entry cannot cancel the others away.
    """
    rest = a @ _OTHERS.to(a.device, a.dtype)  # (G, 4): S - a_i without cancellation
    r = torch.where(rest > 0, a / rest, torch.zeros_like(a))
    total = a.sum(-1, keepdim=True)
    pi = a / total * (1 + r @ _OTHERS.to(a.device, a.dtype))  # Σ_{i≠j} r_i, again without cancellation
    return torch.where(a > 0, pi.clamp(max=1.0), torch.zeros_like(pi))


def _draw_soa(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One categorical draw ∝ ``weights`` per group, groups as columns: ``weights`` float32 [4, G]
    (non-negative), ``u`` [G] in [0, 1). Returns a one-hot bool [4, G]; all False for an all-zero group.

    Inverse CDF: ``j`` is drawn when ``c_{j−1} <= u·S < c_j`` (``c`` the cumulative sum, ``S = c_3``). Since
    ``c`` is non-decreasing, ``u·S < c_j`` holds from the drawn ``j`` on, so the one-hot is that indicator
    XOR itself shifted by one. The intervals partition ``[0, S)`` exactly and ``u·S < S`` for float32
    ``u <= 1 − 2⁻²⁴``, so exactly one entry — one with positive weight — is drawn when ``S > 0``.
    """
    c = weights.cumsum(0)  # (4, G)
    below = (u * c[3]) < c  # (4, G), monotone along dim 0
    onehot = below.clone()
    onehot[1:] ^= below[:3]
    return onehot


def _sum_of_others(v: torch.Tensor) -> torch.Tensor:
    """``Σ_{i≠j} v_i`` for each of the 4 rows of ``v`` [4, G], from pair sums (no ``total − v_j``
    cancellation): others_0 = v_1 + (v_2 + v_3), others_2 = v_3 + (v_0 + v_1), ..."""
    pairs = v.view(2, 2, -1)  # (pair, member, G)
    return (pairs.flip(1) + pairs.sum(1).flip(0)[:, None, :]).view(4, -1)


_CHUNK_GROUPS = 16384  # groups per chunk: every [4, G] float32 temporary is 256 KiB and stays in cache


def mvue24_with_mask(
    x: torch.Tensor, generator: torch.Generator | None = None, name: str = "x"
) -> tuple[torch.Tensor, torch.Tensor]:
    """MVUE24 along the last dimension of ``x``; also returns which entries survived.

    Args:
        x: float [..., L] with ``L % 4 == 0`` (any float dtype; computed in float32).
        generator: torch.Generator for reproducible sampling (on ``x``'s device); None = global RNG. Two
            uniforms are drawn per group (``[2, G]``, group order), whatever the chunking.
    Returns:
        ``(out, kept)``: ``out`` same shape and dtype as ``x``, the two drawn entries of each group divided
        by their inclusion probability and zeros elsewhere (``E[out] = x``); ``kept`` bool, same shape, True
        at the drawn non-zero entries: exactly two per group of four when the group has two or more
        non-zeros, one for a lone non-zero, none for a zero group (drawing stops at zeros: they would
        contribute nothing).
    """
    _check_last_dim(x, name)
    shape = x.shape
    xf = x.detach().reshape(-1, 4)  # (G, 4)
    g = xf.shape[0]
    u = torch.rand(2, g, generator=generator, device=x.device)
    out = torch.empty(g, 4, dtype=x.dtype, device=x.device)
    kept = torch.empty(g, 4, dtype=torch.bool, device=x.device)
    tiny = torch.finfo(torch.float32).tiny
    for g0 in range(0, g, _CHUNK_GROUPS):
        g1 = min(g0 + _CHUNK_GROUPS, g)
        # Structure of arrays: row j holds entry j of every group, so each op is a contiguous vector op.
        xc = torch.empty(4, g1 - g0, device=x.device)
        xc.copy_(xf[g0:g1].t())  # (4, Gc) float32
        a = xc.abs()
        first = _draw_soa(a, u[0, g0:g1])
        k = first | _draw_soa(a * ~first, u[1, g0:g1])  # (masked_fill/where are slow on CPU; mul is not)
        # Inclusion probabilities (see inclusion_probabilities_24). They are finite and > 0 wherever k is
        # True (a > 0, S > 0); elsewhere 0/0 or 0·inf may appear, and k/π there is 0/π or NaN -> set to 0.
        r = a / _sum_of_others(a).clamp(min=tiny)  # a lone non-zero gets a huge r_i; only zeros read it
        pi = a / a.sum(0) * (1 + _sum_of_others(r))
        scale = torch.nan_to_num(k / pi.clamp(max=1.0), nan=0.0)  # 1/π where kept, 0 elsewhere
        out[g0:g1].t().copy_(xc * scale)
        kept[g0:g1].t().copy_(k)
    return out.reshape(shape), kept.reshape(shape)


def mvue24(x: torch.Tensor, generator: torch.Generator | None = None, name: str = "x") -> torch.Tensor:
    """MVUE24 along the last dimension of ``x`` (see :func:`mvue24_with_mask`); returns ``out`` only.

    float [..., L], ``L % 4 == 0`` -> same shape and dtype, at most two non-zeros per group of four,
    ``E[mvue24(x)] = x``.
    """
    return mvue24_with_mask(x, generator, name)[0]


class SparseLinearMVUE(torch.autograd.Function):
    """``y = F.linear(x, W ⊙ mask, b)`` whose weight gradient samples ∇Z with MVUE24 (Hu et al. 2024).

    Forward: ``x`` float [..., K], ``weight`` [N, K], ``mask`` [N, K] bool or 0/1, ``bias`` [N] or None
    -> ``y`` [..., N].
    Backward, with the tokens flattened (``X [T, K]``, ``∇Z [T, N]``):

    - ``∇X = ∇Z · (W ⊙ mask)`` (exact; with a transposable mask this GEMM is 2:4 too),
    - ``∇W = MVUE24(∇Zᵀ) · X``: ``∇Zᵀ [N, T]`` sampled 2:4 along T, the token dimension (zero-padded to a
      multiple of 4 tokens; padding contributes nothing). Straight-through: the gradient goes to the dense
      ``W`` for every entry, pruned ones included (masked decay is applied separately). Unbiased:
      ``E[∇W] = ∇Zᵀ · X``.
    - ``∇b = Σ_t ∇Z[t]`` (exact).
    ``mvue=False`` gives the exact ``∇W = ∇Zᵀ · X`` (for comparison and dense fine-tuning).
    """

    @staticmethod
    def forward(ctx, x, weight, mask, bias, generator, mvue):  # noqa: ANN001 - autograd signature
        w_kept = weight * mask
        ctx.save_for_backward(x, w_kept)
        ctx.has_bias = bias is not None
        ctx.generator = generator
        ctx.mvue = bool(mvue)
        return F.linear(x, w_kept, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        x, w_kept = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (T, N)
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ w_kept.to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])  # (T, K)
            gt = g2.t()  # (N, T)
            if ctx.mvue:
                pad = (-gt.shape[1]) % 4
                if pad:
                    gt = F.pad(gt, (0, pad))
                    x2 = F.pad(x2, (0, 0, 0, pad))
                gt = mvue24(gt, ctx.generator, name="grad_output")
            grad_w = (gt @ x2.to(gt.dtype)).to(w_kept.dtype)  # (N, K)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, None, grad_b, None, None


def sparse_linear_mvue(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    mvue: bool = True,
) -> torch.Tensor:
    """``x @ (weight ⊙ mask)ᵀ + bias`` with the MVUE24 weight gradient of :class:`SparseLinearMVUE`.

    ``x`` float [..., K]; ``weight`` float [N, K]; ``mask`` bool or 0/1 [N, K]; ``bias`` [N] or None;
    ``generator`` seeds the gradient sampling (None = global RNG). Returns float [..., N].
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise FormatError(
            f"sparse_linear_mvue: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} (x[..., K], W[N, K])"
        )
    if mask.shape != weight.shape:
        raise FormatError(f"sparse_linear_mvue: mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
    return SparseLinearMVUE.apply(x, weight, mask, bias, generator, mvue)
