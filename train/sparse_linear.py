"""The trainable N:M sparse linear layer (SR-STE, optional INT4 QAT), a drop-in for ``nn.Linear``.

:class:`SparseLinear` keeps the dense weight ``W [out, K]`` as the trained parameter and a 0/1 mask
``[out, K]`` (uint8 buffer ``mask``, saved as ``<name>.mask``) with ``n`` ones in every ``m`` consecutive
columns along K. Training uses SR-STE (Zhou et al., ICLR 2021; :mod:`sparsert.train.sr_ste`): forward with
``W ⊙ mask``, straight-through gradient plus ``λ (1 − mask) ⊙ W``. With ``qat_group_size`` set, the kept
values are fake-quantized to INT4 in the forward pass (:mod:`sparsert.train.qat`).

The mask is recomputed from |W| by :meth:`SparseLinear.refresh_mask`, which the trainer calls every
``mask_refresh_interval`` optimizer steps (amortising the top-n sort over several steps, as Hu et al. 2024
refresh every 40 steps and AST every 10). Each refresh records the flip rate of Hu et al., "Accelerating
Transformer Pre-training with 2:4 Sparsity" (ICML 2024): ``r = ‖m_t − m_{t−1}‖₁ / D``, the share of the D
mask entries that changed since the previous refresh.

``dense=True`` trains the layer plainly (``F.linear(x, W, b)``; mask kept but unused), e.g. for a dense
fine-tuning phase.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsert.runtime.errors import ConfigError
from sparsert.runtime.int4 import check_group_size, fake_quantize_int4
from sparsert.runtime.nm_mask import check_groups, nm_mask
from sparsert.train.qat import fake_quant_int4_ste
from sparsert.train.sr_ste import DEFAULT_DECAY, sr_ste_linear, sr_ste_weight


@dataclass
class SparsityConfig:
    """How a :class:`SparseLinear` trains.

    n, m: keep ``n`` of every ``m`` weights along K (2:4 default).
    decay: SR-STE λ applied to the pruned weights' gradient (2e-4, the paper's default; 0 = plain STE).
    mask_refresh_interval: recompute the mask from |W| every this many optimizer steps.
    qat_group_size: INT4 fake-quantization group size along K for QAT; None = no quantization.
    """

    n: int = 2
    m: int = 4
    decay: float = DEFAULT_DECAY
    mask_refresh_interval: int = 1
    qat_group_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("n", "m", "mask_refresh_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"sparsity config '{name}': expected a positive integer, got {value!r}")
        if self.n >= self.m:
            raise ConfigError(f"sparsity config: N:M needs 0 < N < M, got {self.n}:{self.m}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not self.decay >= 0:
            raise ConfigError(f"sparsity config 'decay': expected a number >= 0, got {self.decay!r}")
        g = self.qat_group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0):
            raise ConfigError(f"sparsity config 'qat_group_size': expected a positive integer or None, got {g!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class SparseLinear(nn.Module):
    """N:M sparse linear layer trained with SR-STE.

    Parameters: ``weight`` float [out, K] (dense, trained), ``bias`` float [out] or None.
    Buffer: ``mask`` uint8 [out, K], 0/1, ``n`` ones per group of ``m`` along K.
    ``forward(x [..., K]) -> [..., out]`` computes ``x @ (W ⊙ mask)ᵀ + b`` (INT4 fake-quantized kept values
    when ``config.qat_group_size`` is set; plain ``W`` when ``dense``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: SparsityConfig | None = None,
        *,
        dense: bool = False,
        name: str = "weight",
        weight: nn.Parameter | None = None,
        bias_param: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config if config is not None else SparsityConfig()
        self.dense = dense
        self.name = name
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features))
            nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        if tuple(weight.shape) != (out_features, in_features):
            raise ConfigError(
                f"{name}: weight has shape {tuple(weight.shape)}, expected ({out_features}, {in_features})"
            )
        check_groups(weight, self.config.m, name)
        if self.config.qat_group_size is not None:
            check_group_size(weight, self.config.qat_group_size, name)
        self.weight = weight
        if bias and bias_param is None:
            bias_param = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype))
        self.bias = bias_param if bias else None
        self.register_buffer("mask", self._compute_mask())
        self.last_flip_rate: float | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: SparsityConfig | None = None, *, name: str = "weight", dense: bool = False
    ) -> SparseLinear:
        """A SparseLinear sharing ``linear``'s weight and bias Parameters; mask from its current |W|."""
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            config=config,
            dense=dense,
            name=name,
            weight=linear.weight,
            bias_param=linear.bias,
        )

    def _compute_mask(self) -> torch.Tensor:
        c = self.config
        return nm_mask(self.weight, c.n, c.m, name=self.name).to(torch.uint8)

    @torch.no_grad()
    def refresh_mask(self) -> int:
        """Recompute the mask from |W|; return the number of mask entries that changed (flip rate × D).

        Sets :attr:`last_flip_rate` = changed / D.
        """
        new = self._compute_mask()
        flips = int((new != self.mask).sum())
        self.mask.copy_(new)
        self.last_flip_rate = flips / self.mask.numel()
        return flips

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses, detached: float [out, K] = fq(W ⊙ mask) (or W when dense)."""
        w = self.weight if self.dense else self.weight * self.mask
        g = self.config.qat_group_size
        return fake_quantize_int4(w, g, name=self.name) if g is not None else w.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        g = c.qat_group_size
        if self.dense:
            w = self.weight if g is None else fake_quant_int4_ste(self.weight, g, self.name)
            return F.linear(x, w, self.bias)
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            w = self.weight * self.mask
            if g is not None:
                w = fake_quantize_int4(w, g, name=self.name)
            return F.linear(x, w, self.bias)
        if g is None:
            return sr_ste_linear(x, self.weight, self.mask, self.bias, c.decay)
        w = fake_quant_int4_ste(sr_ste_weight(self.weight, self.mask, c.decay), g, self.name)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        c = self.config
        mode = "dense" if self.dense else f"{c.n}:{c.m}, decay={c.decay:g}, refresh={c.mask_refresh_interval}"
        q = f", int4 group={c.qat_group_size}" if c.qat_group_size is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}{q}"
