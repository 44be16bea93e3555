"""Calibration passes: per-input-channel statistics of linear layers' inputs, collected by forward hooks.

The one-shot pruners (:mod:`sparsert.train.oneshot_prune`: Wanda's ``‖X_j‖₂``, SparseGPT's ``XᵀX``) and the AWQ
scale search (:mod:`sparsert.train.awq`: ``mean_t |x_tj|`` and ``xᵀx``) need the same thing: run a few
calibration batches through the model and accumulate statistics of what a group of linears receives.
:func:`collect_input_stats` puts a forward pre-hook on each linear, runs the batches (:func:`run_calibration`),
ends each pass as soon as every hooked linear has seen its input (:class:`StopForward`: nothing later in the
model changes those inputs) and returns one :class:`InputStats` per linear. Everything is accumulated in
float64 on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsert.runtime.errors import ConfigError

__all__ = ["InputStats", "StopForward", "run_calibration", "calibration_input_ids", "collect_input_stats"]


@dataclass
class InputStats:
    """Statistics of a linear layer's inputs ``X [tokens, K]`` accumulated over calibration batches.

    ``abs_sum`` float64 [K]: ``Σ_t |X[t, j]|`` (AWQ's ``mean |x_j|`` times ``tokens``). ``sumsq`` float64 [K]:
    ``Σ_t X[t, j]²`` (Wanda's ``‖X_j‖₂²``). ``gram`` float64 [K, K] or None (``with_gram=False``): ``XᵀX``
    (SparseGPT's Hessian up to the factor 2, AWQ's output-error form). ``tokens``: rows seen.
    """

    in_features: int
    with_gram: bool = False
    abs_sum: torch.Tensor = field(init=False)
    sumsq: torch.Tensor = field(init=False)
    gram: torch.Tensor | None = field(init=False)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)
        self.sumsq = torch.zeros(self.in_features, dtype=torch.float64)
        self.gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float64) if self.with_gram else None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs float [..., K] (any device and float dtype)."""
        x2 = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)  # (tokens, K)
        self.abs_sum += x2.abs().sum(0)
        self.sumsq += x2.pow(2).sum(0)
        if self.gram is not None:
            self.gram += x2.t() @ x2
        self.tokens += x2.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """``‖X_j‖₂`` per input channel: float32 [K]."""
        return self.sumsq.sqrt().float()

    @property
    def mean_abs(self) -> torch.Tensor:
        """``mean_t |X[t, j]|`` per input channel: float32 [K] (zeros before any token)."""
        return (self.abs_sum / max(self.tokens, 1)).float()


class StopForward(Exception):
    """Raised by a forward hook to end a calibration pass early, once the layers under study have run."""


def run_calibration(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """``model(x)`` for every calibration batch ``x`` (int64 [B, T]); a :class:`StopForward` raised by one of
    the caller's hooks ends that pass early (the rest of the model cannot change the inputs under study)."""
    for x in batches:
        try:
            model(x)
        except StopForward:
            pass


def calibration_input_ids(batch: object) -> torch.Tensor:
    """The ``input_ids`` int64 [B, T] of a calibration batch given as the tensor itself or an ``(x, y)`` pair;
    ConfigError otherwise."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ConfigError("each calibration batch must be input_ids int64 [B, T] or an (x, y) pair")
    return x


def collect_input_stats(model: nn.Module, taps: Mapping[str, nn.Module], batches: Iterable[torch.Tensor], *,
                        with_gram: bool, what: str, may_skip: Collection[str] = ()) -> dict[str, InputStats]:
    """Run ``batches`` (input_ids int64 [B, T]) through ``model`` and return the :class:`InputStats` of the
    input of every module in ``taps`` (``{label: linear}``, each with a ``weight`` [out, K]), under the same
    labels. Each pass stops once every tapped module has run in it. ``what`` (e.g. ``"one-shot pruning"``)
    starts the ConfigError raised when a tapped module never ran or received non-finite values; the labels in
    ``may_skip`` (MoE experts, which see only the tokens routed to them) may see no token (``tokens == 0``).
    """
    stats = {label: InputStats(module.weight.shape[1], with_gram) for label, module in taps.items()}
    seen: set[str] = set()

    def make_hook(label: str):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple) -> None:
            stats[label].add(inputs[0])
            seen.add(label)
            if len(seen) == len(stats):
                raise StopForward  # the rest of the model cannot change these inputs

        return hook

    hooks = [module.register_forward_pre_hook(make_hook(label)) for label, module in taps.items()]
    hooks.append(model.register_forward_pre_hook(lambda module, inputs: seen.clear()))  # each pass starts afresh
    try:
        run_calibration(model, batches)
    finally:
        for h in hooks:
            h.remove()
    for label, st in stats.items():
        if st.tokens == 0 and label not in may_skip:
            raise ConfigError(f"{what}: layer '{label}' never ran during the calibration forward passes")
        if not (math.isfinite(float(st.abs_sum.sum())) and math.isfinite(float(st.sumsq.sum()))):
            raise ConfigError(f"{what}: non-finite inputs to layer '{label}' in the calibration pass")
    return stats
