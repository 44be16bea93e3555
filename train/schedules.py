"""Sparsity schedules: from-scratch N:M, SPDF (sparse then dense fine-tuning) and gradual pruning to N:M.

- **From scratch**: N:M sparse from the first step (SR-STE, Zhou et al. 2021).
- **SPDF / dense fine-tuning**: sparse pre-training, then every layer dense for the last fraction of steps.
  Thangarasa et al., "SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language Models" (Cerebras,
  2023); Hu et al., "Accelerating Transformer Pre-training with 2:4 Sparsity" (ICML 2024) switch to dense
  for the last 1/6 of steps (GPT-2: step 250k of 300k) — the default fraction here.
- **Gradual**: "The Journey Matters: Average Parameter Count over Pre-training Unifies Sparse and Dense
  Scaling Laws" (2025): dense warm-up, then pruning between fractions ``start`` (0.25) and ``end`` (0.75) of
  training, one event every ``interval`` (100) steps, each removing the constant fraction
  ``p = 1 − (1 − s)^{1/E}`` of the weights still remaining (``E`` events, final sparsity ``s``). After event
  ``e`` the density is ``(1 − s)^{e/E}``; with ``s = 1 − n/m`` the last event lands exactly on N:M.

N:M-compatible gradual pruning (our design, :func:`gradual_nm_mask`): the ``n`` largest entries of every
group of ``m`` are always kept, so every intermediate mask is a superset of the final N:M mask and the last
event is exactly N:M. The other ``m − n`` entries of each group are *candidates*; at density ``d`` the
``round((d − n/m)·D)`` highest-scoring candidates of the whole tensor survive (a per-tensor soft threshold).
So groups lose their weakest entries first, no group ever drops below ``n`` kept, and the density follows
the paper's geometric schedule as closely as whole weights allow.

:class:`SparsitySchedule` answers, for an optimizer step: the phase (``"dense"``, ``"pruning"``,
``"sparse"``, ``"dense_finetune"``), the target density, the average kept per group of ``m``, whether a
pruning event falls on that step, and the mask to use.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from sparsert.runtime.errors import ConfigError
from sparsert.runtime.nm_mask import check_groups, check_nm, nm_mask

__all__ = ["PHASES", "SCHEDULE_KINDS", "SparsitySchedule", "gradual_nm_mask"]

PHASES = ("dense", "pruning", "sparse", "dense_finetune")
SCHEDULE_KINDS = ("from_scratch", "spdf", "gradual")
DEFAULT_DENSE_FINETUNE_FRACTION = 1 / 6


def _fraction(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"sparsity schedule '{field}': expected a fraction in [0, 1], got {value!r}")
    return float(value)


@dataclass
class SparsitySchedule:
    """When layers are dense, being pruned, N:M sparse or dense again, as fractions of the total steps.

    kind: ``"from_scratch"`` (sparse from step 0), ``"spdf"`` (sparse, then dense fine-tuning),
        ``"gradual"`` (dense warm-up, gradual pruning to N:M between ``prune_start`` and ``prune_end``).
    n, m: the final N:M pattern (2:4).
    prune_start, prune_end: gradual pruning window as fractions of training (0.25, 0.75).
    prune_interval: optimizer steps between pruning events (100).
    dense_finetune_fraction: last fraction of training run dense (SPDF; default 1/6 for ``"spdf"``, 0
        otherwise; any kind may set it).
    Steps are 0-based optimizer steps ``0 .. total_steps − 1``.
    """

    kind: str = "from_scratch"
    n: int = 2
    m: int = 4
    prune_start: float = 0.25
    prune_end: float = 0.75
    prune_interval: int = 100
    dense_finetune_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            kinds = ", ".join(SCHEDULE_KINDS)
            raise ConfigError(f"sparsity schedule 'kind': expected one of {kinds}, got {self.kind!r}")
        try:
            check_nm(self.n, self.m)
        except ValueError as e:
            raise ConfigError(f"sparsity schedule: {e}") from None
        self.prune_start = _fraction(self.prune_start, "prune_start")
        self.prune_end = _fraction(self.prune_end, "prune_end")
        if self.prune_start >= self.prune_end:
            raise ConfigError(
                f"sparsity schedule 'prune_start' {self.prune_start:g} must be before sparsity schedule 'prune_end' "
                f"{self.prune_end:g} (the fractions of the steps where pruning starts and ends)"
            )
        iv = self.prune_interval
        if isinstance(iv, bool) or not isinstance(iv, int) or iv <= 0:
            raise ConfigError(f"sparsity schedule 'prune_interval': expected a positive integer, got {iv!r}")
        if self.dense_finetune_fraction is None:
            self.dense_finetune_fraction = DEFAULT_DENSE_FINETUNE_FRACTION if self.kind == "spdf" else 0.0
        f = _fraction(self.dense_finetune_fraction, "dense_finetune_fraction")
        if f >= 1.0:
            raise ConfigError("sparsity schedule 'dense_finetune_fraction': must be below 1 (no sparse phase left)")
        if self.kind == "gradual" and self.prune_end > 1.0 - f:
            raise ConfigError(
                f"sparsity schedule 'prune_end' {self.prune_end:g}: pruning must end by the start of dense "
                f"fine-tuning, at {1.0 - f:.4g} of the steps (sparsity schedule 'dense_finetune_fraction' {f:.4g})"
            )
        self.dense_finetune_fraction = f

    @classmethod
    def from_scratch(cls, n: int = 2, m: int = 4) -> SparsitySchedule:
        return cls(kind="from_scratch", n=n, m=m)

    @classmethod
    def spdf(cls, dense_finetune_fraction: float = DEFAULT_DENSE_FINETUNE_FRACTION, n: int = 2, m: int = 4
             ) -> SparsitySchedule:
        return cls(kind="spdf", n=n, m=m, dense_finetune_fraction=dense_finetune_fraction)

    @classmethod
    def gradual(cls, start: float = 0.25, end: float = 0.75, interval: int = 100, n: int = 2, m: int = 4,
                dense_finetune_fraction: float = 0.0) -> SparsitySchedule:
        return cls(kind="gradual", n=n, m=m, prune_start=start, prune_end=end, prune_interval=interval,
                   dense_finetune_fraction=dense_finetune_fraction)

    def to_dict(self) -> dict:
        return asdict(self)

    # --- step boundaries -------------------------------------------------------------------------------

    @staticmethod
    def _check_step(step: int, total_steps: int) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ConfigError(f"sparsity schedule: total_steps must be a positive integer, got {total_steps!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"sparsity schedule: step must be a non-negative integer, got {step!r}")

    def finetune_start(self, total_steps: int) -> int:
        """First dense fine-tuning step (``total_steps`` when there is none)."""
        return total_steps - math.floor(self.dense_finetune_fraction * total_steps + 1e-9)

    def pruning_window(self, total_steps: int) -> tuple[int, int]:
        """``(first, end)`` steps of the gradual pruning phase (``first`` inclusive, ``end`` exclusive)."""
        return round(self.prune_start * total_steps), round(self.prune_end * total_steps)

    def num_events(self, total_steps: int) -> int:
        """Number of pruning events ``E`` (at least 1) in the gradual window."""
        first, end = self.pruning_window(total_steps)
        return max(1, math.ceil((end - first) / self.prune_interval))

    def events_done(self, step: int, total_steps: int) -> int:
        """Gradual pruning events applied at or before ``step`` (0 before the window, ``E`` after)."""
        self._check_step(step, total_steps)
        first, _ = self.pruning_window(total_steps)
        if self.kind != "gradual" or step < first:
            return 0
        return min(self.num_events(total_steps), (step - first) // self.prune_interval + 1)

    def is_pruning_event(self, step: int, total_steps: int) -> bool:
        """True when a gradual pruning event falls on ``step`` (masks must be recomputed then)."""
        self._check_step(step, total_steps)
        if self.kind != "gradual":
            return False
        first, _ = self.pruning_window(total_steps)
        k = step - first
        return k >= 0 and k % self.prune_interval == 0 and k // self.prune_interval < self.num_events(total_steps)

    # --- what to do at a step --------------------------------------------------------------------------

    def phase(self, step: int, total_steps: int) -> str:
        """``"dense"`` | ``"pruning"`` | ``"sparse"`` | ``"dense_finetune"`` for optimizer step ``step``."""
        self._check_step(step, total_steps)
        if step >= self.finetune_start(total_steps):
            return "dense_finetune"
        if self.kind != "gradual":
            return "sparse"
        first, end = self.pruning_window(total_steps)
        if step < first:
            return "dense"
        return "pruning" if step < end else "sparse"

    def density(self, step: int, total_steps: int) -> float:
        """Target share of kept weights in a sparse layer at ``step``: 1 when dense, ``n/m`` when N:M, the
        geometric ``(n/m)^{e/E}`` after ``e`` of ``E`` gradual events (``p = 1 − (n/m)^{1/E}`` per event)."""
        phase = self.phase(step, total_steps)
        if phase in ("dense", "dense_finetune"):
            return 1.0
        final = self.n / self.m
        if phase == "sparse":
            return final
        return final ** (self.events_done(step, total_steps) / self.num_events(total_steps))

    def keep_per_group(self, step: int, total_steps: int) -> float:
        """Average number of weights kept per group of ``m`` at ``step`` (``m · density``; ``n`` when N:M)."""
        return self.m * self.density(step, total_steps)

    def mask(self, weight: torch.Tensor, step: int, total_steps: int, score: torch.Tensor | None = None,
             name: str = "weight") -> torch.Tensor:
        """The mask for ``weight`` [out, K] at ``step``: all True when dense, :func:`gradual_nm_mask` at the
        current density while pruning, the N:M mask otherwise. bool [out, K]."""
        check_groups(weight, self.m, name)
        d = self.density(step, total_steps)
        if d >= 1.0:
            return torch.ones_like(weight, dtype=torch.bool)
        return gradual_nm_mask(weight, d, self.n, self.m, score=score, name=name)


@torch.no_grad()
def gradual_nm_mask(weight: torch.Tensor, density: float, n: int = 2, m: int = 4,
                    score: torch.Tensor | None = None, name: str = "weight", *,
                    base: torch.Tensor | None = None) -> torch.Tensor:
    """Mask keeping a share ``density`` of ``weight``, always a superset of the N:M mask.

    Args:
        weight: [out, K], K % m == 0.
        density: target kept share in ``[n/m, 1]``.
        score: optional [out, K] importance (default ``|weight|``).
        base: the N:M mask ``nm_mask(weight, n, m, score)`` (bool [out, K]) when the caller already holds it,
            so it is not computed twice; None computes it.
    Returns:
        bool [out, K]: the top-``n`` of every group of ``m`` (ties to the lower index, as
        :func:`sparsert.runtime.nm_mask.nm_mask`) plus the ``round((density − n/m) · numel)`` highest-scoring
        remaining entries of the tensor (ties to the lower flat index). ``density == n/m`` gives exactly the
        N:M mask; ``density == 1`` keeps everything.
    """
    check_nm(n, m)
    check_groups(weight, m, name)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not n / m - 1e-9 <= density <= 1.0:
        raise ConfigError(f"gradual mask for {name}: density must be in [{n / m:g}, 1], got {density!r}")
    if base is None:
        base = nm_mask(weight, n, m, score=score, name=name)
    elif base.shape != weight.shape or base.dtype != torch.bool:
        raise ConfigError(f"gradual mask for {name}: base mask must be bool {tuple(weight.shape)}, got "
                          f"{base.dtype} {tuple(base.shape)}")
    extra = round((density - n / m) * weight.numel())
    if extra <= 0:
        return base
    s = (weight.detach().abs() if score is None else score.detach()).float().flatten()
    s = torch.where(base.flatten(), torch.full_like(s, -math.inf), s)
    order = torch.sort(s, descending=True, stable=True).indices[:extra]
    out = base.flatten().clone()
    out[order] = True
    return out.reshape(weight.shape)
