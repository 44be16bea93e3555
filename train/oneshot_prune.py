"""One-shot N:M pruning from a small calibration set: magnitude, Wanda and SparseGPT.

- **Magnitude**: keep the top-``n`` ``|W|`` of every ``m`` along K.
- **Wanda** (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
  ICLR 2024): score ``|W_ij|·‖X_j‖₂``, ``‖X_j‖₂`` the norm of input channel ``j`` over the calibration
  tokens; keep the top-``n`` score of every ``m``; no weight update.
- **SparseGPT** (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot", ICML 2023): layer-wise OBS reconstruction minimising ``‖XWᵀ − XŴᵀ‖²``. With
  ``H = XᵀX + damp·I`` (``damp`` = ``percdamp`` × mean diagonal), columns are processed left to right in
  blocks of ``blocksize`` (128) using the upper Cholesky factor ``U`` of ``H⁻¹``; at the first column of
  every group of ``m`` the ``m − n`` entries with the smallest OBS saliency ``w² / U_jj²`` are pruned, and
  each pruned column's error ``(w − q)/U_jj`` is spread over the remaining columns of the block
  (``W[:, j:] −= err·U[j, j:]``), then lazily over the later blocks in one GEMM.

:func:`prune_model_oneshot` runs layer by layer in the model's data-flow order, as both papers do: for each
transformer block it runs the calibration batches through the (already pruned) earlier blocks with forward
hooks on the block's sparse linears, collects their input statistics
(:func:`sparsert.train.calibration.collect_input_stats`), prunes them, and moves on. Pruned
weights are set to zero in the model (SparseGPT also updates the kept ones); modules with a ``mask`` buffer
get the new mask copied in. :data:`ONESHOT_METHODS` names the methods for ``sparsert compress --prune``
(``train/compress.py`` builds the model from a dense checkpoint and calls :func:`prune_model_oneshot`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from sparsert.runtime.errors import ConfigError, FormatError
from sparsert.runtime.moe_experts import expert_layer_names
from sparsert.runtime.nm_mask import check_groups, check_nm, nm_mask
from sparsert.train.calibration import InputStats, calibration_input_ids, collect_input_stats
from sparsert.train.notes import CompressionNote

__all__ = ["magnitude_prune", "wanda_prune", "sparsegpt_prune", "PruneResult", "LayerPruner", "ONESHOT_METHODS",
           "prune_model_oneshot"]


def _check_weight(weight: torch.Tensor, n: int, m: int, name: str) -> None:
    check_nm(n, m)
    check_groups(weight, m, name)


@torch.no_grad()
def magnitude_prune(weight: torch.Tensor, n: int = 2, m: int = 4, name: str = "weight") -> torch.Tensor:
    """Magnitude N:M mask: float [out, K] -> bool [out, K], top-``n`` ``|W|`` of every ``m`` along K."""
    _check_weight(weight, n, m, name)
    return nm_mask(weight, n, m, name=name)


@torch.no_grad()
def wanda_prune(weight: torch.Tensor, input_norms: torch.Tensor, n: int = 2, m: int = 4,
                name: str = "weight") -> torch.Tensor:
    """Wanda N:M mask: ``weight`` float [out, K], ``input_norms`` float [K] (``‖X_j‖₂``) -> bool [out, K]
    keeping the top-``n`` of ``|W_ij|·‖X_j‖₂`` in every group of ``m`` along K."""
    _check_weight(weight, n, m, name)
    if input_norms.shape != (weight.shape[1],):
        raise FormatError(
            f"Wanda input norms for {name}: shape {tuple(input_norms.shape)}, expected ({weight.shape[1]},)"
        )
    score = weight.detach().abs().float() * input_norms.to(weight.device, torch.float32)[None, :]
    return nm_mask(weight, n, m, score=score, name=name)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, n: int = 2, m: int = 4, *, blocksize: int = 128,
                    percdamp: float = 0.01, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M pruning of one layer (Frantar & Alistarh 2023, Algorithm 1 with N:M selection).

    Args:
        weight: float [out, K] (not modified).
        gram: ``XᵀX`` float [K, K] of the layer's calibration inputs (any positive scale).
        blocksize: columns per lazy-update block (a multiple of ``m``).
        percdamp: dampening ``λ = percdamp · mean(diag H)`` added to the diagonal.
    Returns:
        ``(new_weight, mask)``: ``new_weight`` [out, K] in ``weight``'s dtype, zero where ``mask`` is False
        and OBS-updated elsewhere; ``mask`` bool [out, K], exactly N:M along K.
    """
    _check_weight(weight, n, m, name)
    out, k = weight.shape
    if gram.shape != (k, k):
        raise FormatError(f"SparseGPT Hessian for {name}: shape {tuple(gram.shape)}, expected ({k}, {k})")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0 or blocksize % m:
        raise ConfigError(f"SparseGPT blocksize must be a positive multiple of m={m}, got {blocksize!r}")
    if not percdamp > 0:
        raise ConfigError(f"SparseGPT percdamp must be > 0, got {percdamp!r}")
    w = weight.detach().to(dtype=torch.float64, device="cpu").clone()
    h = gram.detach().to(dtype=torch.float64, device="cpu").clone()
    dead = torch.diagonal(h) == 0  # channels never active: their weights cannot matter, prune freely
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.diagonal(h).mean()
    h += damp * torch.eye(k, dtype=h.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:
        raise ConfigError(
            f"SparseGPT for {name}: the dampened Hessian is not positive definite; raise percdamp"
        ) from None
    mask = torch.zeros(out, k, dtype=torch.bool)
    for b0 in range(0, k, blocksize):
        b1 = min(b0 + blocksize, k)
        w1 = w[:, b0:b1].clone()  # (out, bs)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        d1 = torch.diagonal(hinv1)
        for i in range(b1 - b0):
            if i % m == 0:
                saliency = w1[:, i:i + m] ** 2 / d1[i:i + m][None, :] ** 2  # OBS: w² / [H⁻¹]_jj
                mask[:, b0 + i:b0 + i + m] = nm_mask(w1[:, i:i + m], n, m, score=saliency, name=name)
            col = w1[:, i]
            q = torch.where(mask[:, b0 + i], col, torch.zeros_like(col))
            e = (col - q) / d1[i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, b0:b1] = w1
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]  # lazy batch update of the later columns
    w[~mask] = 0.0
    return w.to(device=weight.device, dtype=weight.dtype), mask.to(weight.device)


@dataclass
class PruneResult:
    """What a pruner did to one layer: its mask (bool [out, K]) and, if it rewrote them, the new weights."""

    mask: torch.Tensor
    weight: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerPruner:
    """A registered one-shot method: ``needs`` is ``None`` (no calibration), ``"norms"`` or ``"gram"``;
    ``prune(weight, stats | None, n, m) -> PruneResult``."""

    name: str
    needs: str | None
    prune: Callable[[torch.Tensor, InputStats | None, int, int], PruneResult]


def _magnitude(weight: torch.Tensor, stats: InputStats | None, n: int, m: int) -> PruneResult:
    return PruneResult(magnitude_prune(weight, n, m))


def _wanda(weight: torch.Tensor, stats: InputStats | None, n: int, m: int) -> PruneResult:
    return PruneResult(wanda_prune(weight, stats.norms, n, m))


def _sparsegpt(weight: torch.Tensor, stats: InputStats | None, n: int, m: int) -> PruneResult:
    w, mask = sparsegpt_prune(weight, stats.gram, n, m)
    return PruneResult(mask, w)


ONESHOT_METHODS: dict[str, LayerPruner] = {
    "magnitude": LayerPruner("magnitude", None, _magnitude),
    "wanda": LayerPruner("wanda", "norms", _wanda),
    "sparsegpt": LayerPruner("sparsegpt", "gram", _sparsegpt),
}
"""Registry of one-shot pruning methods by name (``sparsert compress --prune NAME``)."""


def _block_prefix(name: str) -> str:
    """The transformer block a layer belongs to: its name up to the first numeric component (``blocks.3``,
    ``model.layers.3``, ``transformer.h.3``); the name itself when it has none."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _layer_groups(names: list[str]) -> list[list[str]]:
    """Consecutive names sharing their transformer block (:func:`_block_prefix`) form one group."""
    groups: list[list[str]] = []
    last = None
    for nm in names:
        prefix = _block_prefix(nm)
        if groups and prefix == last:
            groups[-1].append(nm)
        else:
            groups.append([nm])
        last = prefix
    return groups


@torch.no_grad()
def prune_model_oneshot(model: nn.Module, method: str, calib_batches: Iterable[object] | None = None, n: int = 2,
                        m: int = 4, *, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Prune the sparse linears of ``model`` to N:M in one shot; returns ``{name: mask bool [out, K]}``.

    Args:
        model: a :class:`~sparsert.runtime.model.DecoderLM` (or any module called as ``model(input_ids)``),
            modified in place: pruned weights become 0, SparseGPT also updates the kept ones, and a module
            with a ``mask`` buffer receives the new mask.
        method: a key of :data:`ONESHOT_METHODS` (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``).
        calib_batches: calibration ``input_ids`` int64 [B, T] (or ``(x, y)`` pairs); required except for
            magnitude. Materialised once (it is iterated once per transformer block).
        names: layers to prune (default :func:`sparsert.runtime.model.sparse_linear_names`), in data-flow order.

    An unfused MoE expert (:func:`sparsert.runtime.moe_experts.expert_layer_names`) sees only the calibration
    tokens routed to it; one that sees none is pruned by magnitude instead, with a
    :class:`~sparsert.train.notes.CompressionNote` naming how many did.
    """
    if method not in ONESHOT_METHODS:
        raise ConfigError(f"unknown one-shot pruning method '{method}' (choose from {', '.join(ONESHOT_METHODS)})")
    check_nm(n, m)
    pruner = ONESHOT_METHODS[method]
    if names is None:
        from sparsert.runtime.model import sparse_linear_names

        names = sparse_linear_names(model)
    modules = {}
    for nm in names:
        try:
            modules[nm] = model.get_submodule(nm)
        except AttributeError:
            raise ConfigError(f"one-shot pruning: the model has no submodule '{nm}'") from None
        if not isinstance(getattr(modules[nm], "weight", None), torch.Tensor):
            raise ConfigError(f"one-shot pruning: '{nm}' has no weight tensor")
        check_groups(modules[nm].weight, m, f"{nm}.weight")
    batches = [] if calib_batches is None else [calibration_input_ids(b) for b in calib_batches]
    if pruner.needs is not None and not batches:
        raise ConfigError(f"one-shot pruning with '{method}' needs calibration batches (got none)")

    was_training = model.training
    model.eval()
    masks: dict[str, torch.Tensor] = {}
    experts = set(expert_layer_names(model))
    unrouted: list[str] = []
    try:
        for group in _layer_groups(list(names)):
            stats = {nm: None for nm in group}
            if pruner.needs is not None:
                stats = collect_input_stats(model, {nm: modules[nm] for nm in group}, batches,
                                            with_gram=pruner.needs == "gram", what="one-shot pruning",
                                            may_skip=experts)
            for nm in group:
                module = modules[nm]
                layer_pruner = pruner
                if stats[nm] is not None and stats[nm].tokens == 0:
                    layer_pruner = ONESHOT_METHODS["magnitude"]
                    unrouted.append(nm)
                result = layer_pruner.prune(module.weight.detach(), stats[nm], n, m)
                mask = result.mask.to(module.weight.device)
                new_w = result.weight if result.weight is not None else module.weight.detach() * mask
                module.weight.copy_(new_w.to(module.weight.dtype))
                if isinstance(getattr(module, "mask", None), torch.Tensor) and module.mask.shape == mask.shape:
                    module.mask.copy_(mask.to(module.mask.dtype))
                masks[nm] = mask
    finally:
        model.train(was_training)
    if unrouted:
        warnings.warn(f"{len(unrouted)} MoE expert layer(s) received no calibration token (e.g. {unrouted[0]}) and "
                      f"were pruned by magnitude instead of {method}; more calibration data (--calib-batches) "
                      "reaches more experts", CompressionNote, stacklevel=2)
    return masks
