"""Swap a model's block linears for :class:`SparseLinear` and manage their masks as one.

:func:`sparsify_model` replaces the sparse linears (:func:`sparsert.runtime.model.sparse_linear_names`:
``blocks.{i}.attn.{q,k,v,o}_proj``, ``blocks.{i}.mlp.{gate,up,down}_proj``) in place, keeping their weight and
bias Parameters; embeddings, norms and ``lm_head`` stay dense. :func:`refresh_masks` recomputes the masks that
are due at an optimizer step and returns the model-wide flip rate (Hu et al., ICML 2024):
``Σ_layers ‖m_t − m_{t−1}‖₁ / Σ_layers D``.
"""

from __future__ import annotations

from torch import nn

from sparsert.runtime.errors import ConfigError
from sparsert.runtime.model import sparse_linear_names
from sparsert.train.sparse_linear import SparseLinear, SparsityConfig


def sparsify_model(
    model: nn.Module, cfg: SparsityConfig, names: list[str] | None = None, *, dense: bool = False
) -> list[str]:
    """Replace the named ``nn.Linear`` submodules (default: the model's sparse linears) by SparseLinear.

    Weights are kept (the same Parameter objects); each mask starts as the top-n |W| of every m along K.
    Returns the names replaced. ConfigError when a name is not an ``nn.Linear`` of the model; FormatError
    (naming the layer) when its K is not divisible by m or by the QAT group size.
    """
    names = sparse_linear_names(model) if names is None else list(names)
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"sparsify: the model has no submodule '{name}'") from None
        if isinstance(module, SparseLinear):
            continue
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"sparsify: '{name}' is a {type(module).__name__}, expected nn.Linear")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SparseLinear.from_linear(module, cfg, name=f"{name}.weight", dense=dense))
    return names


def sparse_modules(model: nn.Module) -> dict[str, SparseLinear]:
    """Every SparseLinear of ``model`` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def refresh_masks(model: nn.Module, step: int | None = None) -> float | None:
    """Recompute the masks that are due after optimizer step ``step`` (every layer when ``step`` is None).

    A layer is due when ``step % config.mask_refresh_interval == 0``; dense-mode layers are skipped.
    Returns the aggregate flip rate over the refreshed layers (changed entries / their total entries), or
    None when no layer was refreshed.
    """
    flips = total = 0
    for module in sparse_modules(model).values():
        if module.dense:
            continue
        if step is not None and step % module.config.mask_refresh_interval != 0:
            continue
        flips += module.refresh_mask()
        total += module.mask.numel()
    return flips / total if total else None


def set_dense(model: nn.Module, dense: bool) -> None:
    """Switch every SparseLinear to plain dense training (``True``) or back to sparse (``False``)."""
    for module in sparse_modules(model).values():
        module.dense = dense


def mask_sparsity(model: nn.Module) -> float:
    """Share of weights pruned by the masks of the sparse-mode SparseLinears (0.5 for 2:4; 0.0 if none)."""
    kept = total = 0
    for module in sparse_modules(model).values():
        if module.dense:
            continue
        kept += int(module.mask.sum())
        total += module.mask.numel()
    return 1.0 - kept / total if total else 0.0
