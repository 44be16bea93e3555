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

Options of Hu et al. (ICML 2024), switched on in :class:`SparsityConfig`:

- ``transposable``: the mask is the transposable 2:4 mask (best of the 90 4×4 patterns per block,
  :func:`sparsert.runtime.transposable_mask.transposable_24_mask`), 2:4 along K for both ``W`` and ``Wᵀ``;
- ``mvue``: the weight-gradient GEMM uses MVUE24-sampled output gradients
  (:func:`sparsert.train.mvue24.sparse_linear_mvue`), drawn from the layer's ``generator`` (a
  ``torch.Generator`` the trainer assigns and checkpoints; None = torch's global RNG).

A gradual pruning schedule (:mod:`sparsert.train.schedules`) needs masks that keep more than ``n`` of ``m``
for a while. They are set with :meth:`SparseLinear.set_gradual_mask` as the non-persistent ``forward_mask``
(what the forward pass uses), while the persistent ``mask`` stays the N:M mask of the same weights, so every
checkpoint holds a valid N:M mask; the trainer recomputes the gradual mask from the weights, never loads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsert.runtime.errors import ConfigError
from sparsert.runtime.int4 import check_group_size, fake_quantize_int4
from sparsert.runtime.nm_mask import check_groups, nm_mask
from sparsert.runtime.transposable_mask import check_transposable_shape, transposable_24_mask
from sparsert.train.mvue24 import sparse_linear_mvue
from sparsert.train.qat import fake_quant_int4_ste
from sparsert.train.sr_ste import DEFAULT_DECAY, sr_ste_linear, sr_ste_weight


@dataclass
class SparsityConfig:
    """How a :class:`SparseLinear` trains.

    n, m: keep ``n`` of every ``m`` weights along K (2:4 default).
    decay: SR-STE λ applied to the pruned weights' gradient (2e-4, the paper's default; 0 = plain STE).
    mask_refresh_interval: recompute the mask from |W| every this many optimizer steps.
    qat_group_size: INT4 fake-quantization group size along K for QAT; None = no quantization.
    transposable: transposable 2:4 masks (Hu et al. 2024; 2:4 only, ``out`` and K multiples of 4).
    mvue: MVUE24 sampling of the output gradient in the weight-gradient GEMM (Hu et al. 2024).
    """

    n: int = 2
    m: int = 4
    decay: float = DEFAULT_DECAY
    mask_refresh_interval: int = 1
    qat_group_size: int | None = None
    transposable: bool = False
    mvue: bool = False

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
        for name in ("transposable", "mvue"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"sparsity config '{name}': expected true or false, got {getattr(self, name)!r}")
        if self.transposable and (self.n, self.m) != (2, 4):
            raise ConfigError(f"sparsity config: transposable masks are 2:4 only, got {self.n}:{self.m}")

    def to_dict(self) -> dict:
        return asdict(self)


class SparseLinear(nn.Module):
    """N:M sparse linear layer trained with SR-STE.

    Parameters: ``weight`` float [out, K] (dense, trained), ``bias`` float [out] or None.
    Buffer: ``mask`` uint8 [out, K], 0/1, ``n`` ones per group of ``m`` along K (transposable 2:4 with
    ``config.transposable``). Non-persistent buffer ``forward_mask``: None, or a uint8 [out, K] 0/1 mask that
    replaces ``mask`` in the forward pass (gradual pruning); :attr:`active_mask` is the one in use.
    ``forward(x [..., K]) -> [..., out]`` computes ``x @ (W ⊙ mask)ᵀ + b`` (INT4 fake-quantized kept values
    when ``config.qat_group_size`` is set; plain ``W`` when ``dense``), plus ``slorb(x)`` when the optional
    submodule ``slorb`` (a :class:`sparsert.train.slorb.SLoRB`, state dict ``slorb.S``) is set.
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
        if self.config.transposable:
            check_transposable_shape(weight, name)
        if self.config.qat_group_size is not None:
            check_group_size(weight, self.config.qat_group_size, name)
        self.weight = weight
        if bias and bias_param is None:
            bias_param = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype))
        self.bias = bias_param if bias else None
        self.register_buffer("mask", self._compute_mask())
        self.register_buffer("forward_mask", None, persistent=False)
        self.last_flip_rate: float | None = None
        self.generator: torch.Generator | None = None  # MVUE24 sampling (config.mvue)
        # How training runs the transposable + MVUE24 layer: "masked" (matmuls on W ⊙ mask), or "ours" /
        # "cusparselt" (Hu et al.'s three 2:4 sparse GEMMs, train/sparse24_training_linear.py); set by the trainer
        # (--sparse-gemm), not saved: it changes how the same function is computed, not the model.
        self.gemm = "masked"
        # SLoRB (AST §3.4): optional extra term added to the output, set by train.slorb.attach_slorb.
        self.register_module("slorb", None)

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

    @torch.no_grad()
    def _compute_mask(self, score: torch.Tensor | None = None) -> torch.Tensor:
        """The N:M (or transposable 2:4) mask of ``score`` (default |W|): uint8 [out, K]."""
        c = self.config
        if c.transposable:
            return transposable_24_mask(self.weight, score=score, name=self.name).to(torch.uint8)
        return nm_mask(self.weight, c.n, c.m, score=score, name=self.name).to(torch.uint8)

    @property
    def active_mask(self) -> torch.Tensor:
        """The mask the forward pass applies: ``forward_mask`` when set, else ``mask`` (uint8 [out, K])."""
        return self.mask if self.forward_mask is None else self.forward_mask

    @torch.no_grad()
    def refresh_mask(self, score: torch.Tensor | None = None) -> int:
        """Recompute the mask from |W| (or ``score`` float [out, K]) and drop any ``forward_mask``; return the
        number of entries of the active mask that changed (flip rate × D).

        Sets :attr:`last_flip_rate` = changed / D.
        """
        new = self._compute_mask(score)
        flips = int((new != self.active_mask).sum())
        self.mask.copy_(new)
        self.forward_mask = None
        self.last_flip_rate = flips / self.mask.numel()
        return flips

    @torch.no_grad()
    def set_gradual_mask(self, forward_mask: torch.Tensor, base_mask: torch.Tensor) -> int:
        """Use ``forward_mask`` (bool or 0/1 [out, K], any density) in the forward pass and keep ``base_mask``
        (its N:M part) as the persistent ``mask``. Returns the entries of the active mask that changed and sets
        :attr:`last_flip_rate`. ConfigError for a shape other than the weight's."""
        for what, t in (("forward mask", forward_mask), ("base mask", base_mask)):
            if tuple(t.shape) != tuple(self.weight.shape):
                raise ConfigError(
                    f"{self.name}: {what} has shape {tuple(t.shape)}, expected {tuple(self.weight.shape)}"
                )
        new = forward_mask.to(device=self.mask.device, dtype=torch.uint8)
        flips = int((new != self.active_mask).sum())
        self.mask.copy_(base_mask.to(torch.uint8))
        self.forward_mask = new
        self.last_flip_rate = flips / self.mask.numel()
        return flips

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses, detached: float [out, K] = fq(W ⊙ mask) (or W when dense)."""
        w = self.weight if self.dense else self.weight * self.active_mask
        g = self.config.qat_group_size
        return fake_quantize_int4(w, g, name=self.name) if g is not None else w.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward_linear(x)
        # --- SLoRB term (train/slorb.py): y += S · groupsum_k(x); absent unless attach_slorb was called.
        return y if self.slorb is None else y + self.slorb(x)

    def _forward_linear(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        g = c.qat_group_size
        if self.dense:
            w = self.weight if g is None else fake_quant_int4_ste(self.weight, g, self.name)
            return F.linear(x, w, self.bias)
        mask = self.active_mask
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            w = self.weight * mask
            if g is not None:
                w = fake_quantize_int4(w, g, name=self.name)
            return F.linear(x, w, self.bias)
        if self.gemm != "masked" and c.transposable and c.mvue and g is None and self.forward_mask is None:
            return self._sparse_gemm_linear(x, mask)
        if c.mvue:
            # Straight-through to the dense W (plus SR-STE's decay, if any) and fake quantization compose on
            # the weight; the linear itself samples ∇Z with MVUE24 for ∇W (Hu et al. 2024).
            w = self.weight
            if c.decay or g is not None:
                w = sr_ste_weight(w, mask, c.decay)
            if g is not None:
                w = fake_quant_int4_ste(w, g, self.name)
            return sparse_linear_mvue(x, w, mask, self.bias, generator=self.generator)
        if g is None:
            return sr_ste_linear(x, self.weight, mask, self.bias, c.decay)
        w = fake_quant_int4_ste(sr_ste_weight(self.weight, mask, c.decay), g, self.name)
        return F.linear(x, w, self.bias)

    def _sparse_gemm_linear(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hu et al. (ICML 2024) §4: ``x @ (W ⊙ mask)ᵀ + b`` with the forward, input-gradient and MVUE24
        weight-gradient GEMMs on 2:4 sparse GEMMs (:func:`sparsert.train.sparse24_training_linear.
        sparse24_training_linear`, ``gemm=self.gemm``): ``x`` bf16/fp16 (or float32 under a bf16/fp16 autocast),
        the mask transposable 2:4. The MVUE24 draw's seed comes from :attr:`generator` (torch's global RNG when
        None; the trainer gives these layers a CPU generator, so the draw never waits for a GPU), mixed with the
        process's rank under torch.distributed; a checkpointed generator state resumes the same draws. SR-STE's
        decay, if any, composes on W."""
        from sparsert.train.sparse24_training_linear import sparse24_training_linear, step_seed

        c = self.config
        w = sr_ste_weight(self.weight, mask, c.decay) if c.decay else self.weight
        gen = self.generator
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device if gen is not None else "cpu"))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            seed = step_seed(seed, torch.distributed.get_rank())  # each rank its own draws of its own tokens
        keep = mask.view(torch.bool) if mask.dtype == torch.uint8 else mask.bool()
        return sparse24_training_linear(x, w, keep, self.bias, seed=seed, gemm=self.gemm, check_mask=False)

    def extra_repr(self) -> str:
        c = self.config
        mode = "dense" if self.dense else f"{c.n}:{c.m}, decay={c.decay:g}, refresh={c.mask_refresh_interval}"
        q = f", int4 group={c.qat_group_size}" if c.qat_group_size is not None else ""
        hu = "".join(f", {k}" for k in ("transposable", "mvue") if getattr(c, k))
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}{hu}{q}"
