"""SR-STE: sparse-refined straight-through estimator for N:M sparse training.

Zhou, Ma, Zhu, Liu, Zhang, Yuan, Sun, Li, "Learning N:M Fine-grained Structured Sparse Neural Networks From
Scratch", ICLR 2021 (official code: github.com/aojunzz/NM-sparsity).

The forward pass uses the masked weight ``W~ = W ⊙ E`` (E keeps the top-N |W| of every M along K). The
backward pass hands the gradient with respect to ``W~`` straight through to the dense ``W`` and adds the
sparse-refined term ``λ·(1 − E) ⊙ W``, which pulls the pruned weights towards zero so the mask settles
(the official code returns ``grad + decay * (1 - mask) * weight``). Default ``λ = 2e-4``.

Two forms with the same gradient:

- :class:`SRSTELinear` fuses the masking into the linear layer (one autograd node, no extra copies) — the
  fast path used in training;
- :class:`SRSTEWeight` is the official weight-only form, for composing with another straight-through
  transform (INT4 fake quantization in :mod:`sparsert.train.qat`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_DECAY = 2e-4


class SRSTELinear(torch.autograd.Function):
    """``y = F.linear(x, W ⊙ mask, b)`` with the SR-STE gradient for ``W``.

    Inputs: ``x`` float [..., K]; ``weight`` float [out, K]; ``mask`` [out, K] 0/1 (bool or uint8, any
    layout that broadcasts like ``weight``); ``bias`` float [out] or None; ``decay`` λ (float).
    Output: float [..., out].
    Gradients: ``dx = dy @ (W ⊙ mask)``; ``dW = dyᵀ x + λ (1 − mask) ⊙ W`` (straight-through); ``db = Σ dy``.
    """

    @staticmethod
    def forward(ctx, x, weight, mask, bias, decay):  # noqa: ANN001 - autograd signature
        w_kept = weight * mask
        ctx.save_for_backward(x, weight, w_kept)
        ctx.decay = float(decay)
        ctx.has_bias = bias is not None
        return F.linear(x, w_kept, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        x, weight, w_kept = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ w_kept
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (B*T, out)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])  # (out, K), gradient w.r.t. W ⊙ mask
            if ctx.decay:
                # (1 - mask) ⊙ W == W - W ⊙ mask
                grad_w.add_(weight - w_kept, alpha=ctx.decay)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, None, grad_b, None


class SRSTEWeight(torch.autograd.Function):
    """``W -> W ⊙ mask`` with the SR-STE backward ``g + λ (1 − mask) ⊙ W`` (the official code's form).

    ``weight`` float [out, K]; ``mask`` [out, K] 0/1 (bool or uint8); returns float [out, K].
    """

    @staticmethod
    def forward(ctx, weight, mask, decay):  # noqa: ANN001
        w_kept = weight * mask
        ctx.save_for_backward(weight, w_kept)
        ctx.decay = float(decay)
        return w_kept

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        weight, w_kept = ctx.saved_tensors
        grad = grad_out
        if ctx.decay:
            grad = grad_out + ctx.decay * (weight - w_kept)
        return grad, None, None


def sr_ste_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    decay: float = DEFAULT_DECAY,
) -> torch.Tensor:
    """Functional form of :class:`SRSTELinear`: x [..., K], weight [out, K], mask [out, K] -> [..., out]."""
    return SRSTELinear.apply(x, weight, mask, bias, decay)


def sr_ste_weight(weight: torch.Tensor, mask: torch.Tensor, decay: float = DEFAULT_DECAY) -> torch.Tensor:
    """Functional form of :class:`SRSTEWeight`: weight [out, K], mask [out, K] -> W ⊙ mask [out, K]."""
    return SRSTEWeight.apply(weight, mask, decay)
