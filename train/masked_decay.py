"""Masked decay on gradients (Hu et al., "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024).

SR-STE (Zhou et al. 2021) adds ``λ·(1 − m) ⊙ W`` to the *update*; Hu et al. add it to the *gradient* after
gradient clipping and before ``optimizer.step()``, so the term flows through Adam's first and second moments
and keeps pulling the pruned weights to zero, which lowers the mask flip rate:

    g ← g + α · (1 − m) ⊙ W

Defaults from the authors' code: α = 6e-5 for GPT-2 124M/774M, 2e-4 for GPT-2 350M/1558M, 6e-6 for BERT.
``(1 − m)`` is taken on a boolean mask (``~mask.bool()``), never ``~`` on an integer tensor (a bug in AST's
public code: ``~1 == -2``). The trainer calls :func:`apply_masked_decay` between ``clip_grad_norm_`` and
``optimizer.step()``; with SR-STE's own decay on, set that one to 0 to avoid applying both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsert.runtime.errors import ConfigError, FormatError

__all__ = ["MASKED_DECAY_DEFAULTS", "DEFAULT_MASKED_DECAY", "MaskedDecayConfig", "masked_decay_", "apply_masked_decay",
           "masked_modules"]

MASKED_DECAY_DEFAULTS: dict[str, float] = {
    "gpt2-124m": 6e-5,
    "gpt2-774m": 6e-5,
    "gpt2-350m": 2e-4,
    "gpt2-1558m": 2e-4,
    "bert": 6e-6,
}
DEFAULT_MASKED_DECAY = MASKED_DECAY_DEFAULTS["gpt2-124m"]


@dataclass
class MaskedDecayConfig:
    """alpha: the decay coefficient α (>= 0; 0 turns masked decay off)."""

    alpha: float = DEFAULT_MASKED_DECAY

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a >= 0 or a == float("inf"):
            raise ConfigError(f"masked decay 'alpha': expected a finite number >= 0, got {a!r}")
        self.alpha = float(a)


@torch.no_grad()
def masked_decay_(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place ``grad += alpha · (1 − mask) ⊙ weight``; returns ``grad``.

    ``grad``, ``weight``: float [out, K] (same shape); ``mask``: [out, K] bool or 0/1 integer (1 = kept).
    """
    if grad.shape != weight.shape or mask.shape != weight.shape:
        raise FormatError(
            f"masked decay: grad {tuple(grad.shape)}, weight {tuple(weight.shape)} and mask {tuple(mask.shape)}"
            " must have the same shape"
        )
    if alpha:
        pruned = ~mask.bool()
        grad.add_(weight.detach() * pruned, alpha=alpha)
    return grad


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that expose a ``weight`` Parameter and a ``mask`` tensor of the same shape, by name.

    Matches :class:`sparsert.train.sparse_linear.SparseLinear` and any module following its convention.
    Modules with a truthy ``dense`` attribute (dense fine-tuning) are skipped.
    """
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        mask = getattr(module, "mask", None)
        if isinstance(weight, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.shape == weight.shape:
            if getattr(module, "dense", False):
                continue
            found[name] = module
    return found


@torch.no_grad()
def apply_masked_decay(model: nn.Module, alpha: float = DEFAULT_MASKED_DECAY) -> int:
    """Add ``alpha · (1 − m) ⊙ W`` to the gradient of every masked module of ``model``.

    Call after gradient clipping and before ``optimizer.step()``. Modules whose weight has no gradient are
    skipped. Returns the number of modules decayed.
    """
    MaskedDecayConfig(alpha)  # validates
    count = 0
    for module in masked_modules(model).values():
        if module.weight.grad is None:
            continue
        masked_decay_(module.weight.grad, module.weight, module.mask, alpha)
        count += 1
    return count
