"""Swap a model's block linears for :class:`SparseLinear` and manage their masks as one.

:func:`sparsify_model` replaces the sparse linears (:func:`sparsert.runtime.model.sparse_linear_names`:
``blocks.{i}.attn.{q,k,v,o}_proj``, ``blocks.{i}.mlp.{gate,up,down}_proj``) in place, keeping their weight and
bias Parameters; embeddings, norms and ``lm_head`` stay dense. :func:`refresh_masks` recomputes the masks that
are due at an optimizer step and returns the model-wide flip rate (Hu et al., ICML 2024):
``Σ_layers ‖m_t − m_{t−1}‖₁ / Σ_layers D``.

:class:`MaskController` runs the masks of a whole training run: the phases of a sparsity schedule
(:class:`sparsert.train.schedules.SparsitySchedule`: dense warm-up, gradual pruning, N:M, dense fine-tuning),
the periodic mask refresh (top-n |W|, the transposable 2:4 mask of Hu et al., or AST's adaptive masks with an
optional Wanda score via :class:`sparsert.train.ast_distill.AdaptiveMasks`), FFN-only sparsity (the other
block linears train dense), and the flip rate overall and per layer at every refresh.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparsert.runtime.errors import ArtifactError, ConfigError
from sparsert.runtime.model import sparse_linear_names
from sparsert.runtime.nm_mask import nm_mask
from sparsert.train.ast_distill import AdaptiveMasks
from sparsert.train.schedules import SparsitySchedule, gradual_nm_mask
from sparsert.train.sparse_linear import SparseLinear, SparsityConfig

# Module-path components that mark a feed-forward (MLP) linear, in sparsert and Hugging Face models.
FFN_WORDS = ("mlp", "ffn", "feed_forward", "feedforward")
_FFN_LINEAR = re.compile(r"fc_?\d+|fc_(in|out)")  # feed-forward linears named so without an MLP module around them
SPARSE_LAYER_CHOICES = ("all", "ffn")
DENSE_PHASES = ("dense", "dense_finetune")


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


def is_ffn_name(name: str) -> bool:
    """True for a feed-forward linear: a dotted module name whose parent path has a component containing a word
    of :data:`FFN_WORDS` (``blocks.0.mlp.up_proj``, ``model.layers.3.mlp.gate_proj``, ``transformer.h.1.mlp.c_fc``,
    Granite's ``shared_mlp.input_linear``, RecurrentGemma's ``mlp_block.up_proj``), naming MoE experts
    (``block_sparse_moe.experts.3.down_proj``, ``shared_expert.up_proj``), or a linear named ``fc1``/``fc2``/
    ``fc_in``/``fc_out`` (OPT, XGLM, BioGPT keep them directly in the decoder layer). Attention, state-space and
    recurrence projections (``temporal_block.linear_x``, ``mamba.in_proj``) are not."""
    parts = [part.lower() for part in name.split(".")]
    if any(word in part for part in parts[:-1] for word in FFN_WORDS):
        return True
    return any("expert" in part or "moe" in part for part in parts) or _FFN_LINEAR.fullmatch(parts[-1]) is not None


def select_sparse_layers(names: list[str], which: str) -> list[str]:
    """The layers of ``names`` trained sparse: all of them (``"all"``) or the feed-forward ones (``"ffn"``,
    Hu et al. 2024 sparsify only the FFN linears). ConfigError for another choice or when none is left."""
    if which not in SPARSE_LAYER_CHOICES:
        raise ConfigError(f"--sparse-layers: expected one of {', '.join(SPARSE_LAYER_CHOICES)}, got {which!r}")
    chosen = list(names) if which == "all" else [n for n in names if is_ffn_name(n)]
    if not chosen:
        raise ConfigError(f"--sparse-layers {which}: the model has no such linear layer to make sparse")
    return chosen


def pruned_layer_selection(names: list[str], sparse_layers: str = "all", keep_dense: Sequence[str] = (), *,
                           strict: bool = True) -> list[str]:
    """The layers of ``names`` made 2:4 (trained sparse, or pruned one-shot): :func:`select_sparse_layers`
    (``--sparse-layers``) minus those whose name matches a ``keep_dense`` shell pattern (``--keep-dense``,
    :func:`fnmatch.fnmatchcase` on the module name, e.g. ``*.layers.0.*`` or ``*.down_proj``), in the order of
    ``names``. ConfigError for a pattern that matches none of the layers (naming one of them; not checked when
    ``strict`` is off) or when no layer is left."""
    if isinstance(keep_dense, str):
        raise ConfigError(f"--keep-dense: expected a list of layer name patterns, got the string {keep_dense!r}")
    chosen = select_sparse_layers(names, sparse_layers)
    for pattern in keep_dense:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"--keep-dense: expected a layer name pattern, got {pattern!r}")
        if strict and not any(fnmatch.fnmatchcase(n, pattern) for n in chosen):
            raise ConfigError(f"--keep-dense {pattern!r}: matches none of the {len(chosen)} layers to make 2:4 "
                              f"(module names such as {chosen[0]!r}; shell patterns, e.g. '*.layers.0.*')")
    left = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in keep_dense)]
    if not left:
        raise ConfigError(f"--keep-dense {' '.join(keep_dense)}: keeps every layer dense; none is left to make 2:4")
    return left


def refuse_layer_selection(sparse_layers: str, keep_dense: Sequence[str], trained: str) -> None:
    """ConfigError naming ``--sparse-layers`` / ``--keep-dense`` when either is given (not ``"all"`` / empty) for a
    model whose 2:4 layers are already trained (``trained`` says where they are recorded): those keep their masks."""
    given = [flag for flag, on in (("--sparse-layers", sparse_layers != "all"), ("--keep-dense", keep_dense)) if on]
    if given:
        raise ConfigError(f"{given[0]} chooses the layers one-shot pruning makes 2:4; {trained}, which keep their "
                          "masks")


def sparse_modules(model: nn.Module) -> dict[str, SparseLinear]:
    """Every SparseLinear of ``model`` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def refresh_masks(model: nn.Module, step: int | None = None) -> float | None:
    """Recompute the masks that are due after optimizer step ``step`` (every layer when ``step`` is None).

    A layer is due when ``step % config.mask_refresh_interval == 0``; dense-mode layers are skipped.
    Returns the aggregate flip rate over the refreshed layers (changed entries / their total entries), or
    None when no layer was refreshed. Each refreshed layer's own rate is its ``last_flip_rate``.
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
    """Share of the SparseLinears' weights that the forward pass prunes: a dense-mode layer prunes none
    (0.5 when every layer is 2:4; 0.0 for a model without SparseLinears or with all of them dense)."""
    kept = total = 0
    for module in sparse_modules(model).values():
        total += module.weight.numel()
        kept += module.weight.numel() if module.dense else int(module.active_mask.sum())
    return 1.0 - kept / total if total else 0.0


@dataclass
class MaskUpdate:
    """What :meth:`MaskController.after_step` did. ``phase``: the schedule phase of the next step.
    ``flip_rate`` / ``flip_rate_layers`` ({layer: rate}): set when masks were recomputed. ``changed``: masks
    or dense/sparse modes changed (the pruned share must be recomputed)."""

    phase: str
    flip_rate: float | None = None
    flip_rate_layers: dict[str, float] | None = None
    changed: bool = False


class MaskController:
    """The masks of one training run, step by step.

    Args:
        model: a model whose block linears are :class:`SparseLinear` (sparsified before).
        schedule: when layers are dense, being pruned, N:M, or dense again
            (:class:`~sparsert.train.schedules.SparsitySchedule`; steps are 0-based there, 1-based here).
        total_steps: the run's optimizer steps.
        sparse_names: the layers trained sparse (default: every SparseLinear). The others train dense for
            the whole run; their masks (magnitude N:M of the current weights, recomputed by
            :meth:`prepare_checkpoint`) only say what compression will keep.
        refresh_interval: recompute the N:M masks after every this many optimizer steps.
        adaptive: refresh through AST's :class:`~sparsert.train.ast_distill.AdaptiveMasks` (Huang et al.
            2025) instead of each layer's :meth:`SparseLinear.refresh_mask` (the same top-n |W|, or
            transposable, masks; the flip rate per layer is measured around it).
        wanda: score masks by Wanda's ``|W_ij|·‖X_j‖₂`` (implies ``adaptive``; the activation norms are
            collected by forward hooks between refreshes, training forward passes only — pause them around
            evaluation with :meth:`hooks_paused`).

    Phases (of the *next* step, decided after each optimizer step, so a checkpoint holds the masks the next
    step uses): ``dense`` — sparse layers train dense; ``pruning`` — gradual masks
    (:func:`~sparsert.train.schedules.gradual_nm_mask` at the schedule's density) recomputed from the
    weights after every step, magnitude-scored, used as each layer's non-persistent ``forward_mask`` while the
    persistent mask is the N:M part (so checkpoints hold N:M masks and a resume recomputes the same gradual
    masks from the same weights); ``sparse`` — N:M masks, refreshed when the phase starts and every
    ``refresh_interval`` steps; ``dense_finetune`` — every layer dense, the last masks kept (compression
    re-applies them).
    """

    def __init__(self, model: nn.Module, schedule: SparsitySchedule, total_steps: int, *,
                 sparse_names: list[str] | None = None, refresh_interval: int = 10, adaptive: bool = False,
                 wanda: bool = False) -> None:
        self.model = model
        self.layers = sparse_modules(model)
        if not self.layers:
            raise ConfigError("mask controller: the model has no sparse linear layers (sparsify it first)")
        names = list(self.layers) if sparse_names is None else list(sparse_names)
        unknown = [n for n in names if n not in self.layers]
        if unknown:
            raise ConfigError(f"mask controller: '{unknown[0]}' is not a sparse linear of the model")
        if not names:
            raise ConfigError("mask controller: no layer is trained sparse")
        self.sparse = {n: self.layers[n] for n in names}
        self.fixed_dense = {n: m for n, m in self.layers.items() if n not in self.sparse}
        if isinstance(refresh_interval, bool) or not isinstance(refresh_interval, int) or refresh_interval <= 0:
            raise ConfigError(f"mask refresh interval: expected a positive integer, got {refresh_interval!r}")
        self.schedule, self.total, self.interval = schedule, total_steps, refresh_interval
        first = next(iter(self.sparse.values())).config
        self.n, self.m = first.n, first.m
        self.adaptive: AdaptiveMasks | None = None
        if adaptive or wanda:
            for name, module in self.layers.items():  # AdaptiveMasks takes the sparse-mode layers it finds
                module.dense = name not in self.sparse
            pattern = "transposable" if first.transposable else "nm"
            self.adaptive = AdaptiveMasks(model, refresh_interval, self.n, self.m, wanda=wanda, pattern=pattern)
            self.adaptive.modules = {n: m for n, m in self.adaptive.modules.items() if n in self.sparse}
            self.adaptive.attach()
        self.current: str | None = None

    # --------------------------------------------------------------------------------------------- phases

    def phase_of(self, step: int) -> str:
        """Schedule phase of 1-based optimizer step ``step`` (``1 .. total_steps``)."""
        return self.schedule.phase(min(max(step, 1), self.total) - 1, self.total)

    def _set_modes(self, phase: str) -> None:
        for module in self.fixed_dense.values():
            module.dense = True
        for module in self.sparse.values():
            module.dense = phase in DENSE_PHASES

    def begin(self, start_step: int, *, fresh: bool) -> str:
        """Prepare the masks for step ``start_step + 1``: set dense/sparse modes for its phase; with ``fresh``
        (a new run, weights possibly loaded from elsewhere) recompute every mask from the current weights; in
        the pruning phase recompute the gradual masks. Returns the phase."""
        phase = self.phase_of(start_step + 1)
        if fresh:
            for module in self.layers.values():
                module.refresh_mask()
                module.last_flip_rate = None
        self._set_modes(phase)
        if phase == "pruning":
            self._gradual(start_step)
        if phase == "dense_finetune" and self.adaptive is not None:
            self.adaptive.detach()  # as after_step does when fine-tuning starts
        self.current = phase
        return phase

    def after_step(self, step: int) -> MaskUpdate:
        """After optimizer step ``step`` (1-based): switch modes and recompute the masks the next step needs
        (at the last step, as if the run went on in the same phase, so its refresh is still logged)."""
        if self.current is None:
            raise ConfigError("mask controller: call begin() before after_step()")
        prev, nxt = self.current, self.phase_of(step + 1) if step < self.total else self.current
        update = MaskUpdate(phase=nxt)
        if nxt in DENSE_PHASES:
            if prev != nxt:
                self._set_modes(nxt)
                update.changed = True
                if nxt == "dense_finetune" and self.adaptive is not None:
                    self.adaptive.detach()  # no refresh follows; stop collecting activation norms
        elif nxt == "pruning":
            self._set_modes(nxt)
            update.flip_rate, update.flip_rate_layers = self._gradual(step)
            update.changed = True
        elif prev != "sparse" or step % self.interval == 0:
            self._set_modes(nxt)
            update.flip_rate, update.flip_rate_layers = self._refresh()
            update.changed = True
        self.current = nxt
        return update

    # ---------------------------------------------------------------------------------------------- masks

    def _rates(self, flips: dict[str, int]) -> tuple[float, dict[str, float]]:
        total = sum(self.sparse[n].mask.numel() for n in flips)
        rates = {n: f / self.sparse[n].mask.numel() for n, f in flips.items()}
        return sum(flips.values()) / max(total, 1), rates

    @torch.no_grad()
    def _gradual(self, index: int) -> tuple[float, dict[str, float]]:
        """Gradual masks at the density of 0-based schedule step ``index`` for every sparse layer."""
        density = self.schedule.density(min(index, self.total - 1), self.total)
        flips = {}
        for name, module in self.sparse.items():
            w = module.weight.detach()
            base = nm_mask(w, self.n, self.m, name=module.name)
            full = gradual_nm_mask(w, max(density, self.n / self.m), self.n, self.m, name=module.name, base=base)
            flips[name] = module.set_gradual_mask(full, base)
        return self._rates(flips)

    @torch.no_grad()
    def _refresh(self) -> tuple[float, dict[str, float]]:
        """N:M (or transposable) masks of every sparse layer from the current weights."""
        if self.adaptive is None:
            return self._rates({name: module.refresh_mask() for name, module in self.sparse.items()})
        before = {name: module.active_mask.clone() for name, module in self.sparse.items()}
        for module in self.sparse.values():
            module.forward_mask = None
        self.adaptive.refresh()
        flips = {}
        for name, module in self.sparse.items():
            flips[name] = int((module.mask != before[name]).sum())
            module.last_flip_rate = flips[name] / module.mask.numel()
        return self._rates(flips)

    @torch.no_grad()
    def prepare_checkpoint(self) -> None:
        """Give the layers that train dense right now (all but during dense fine-tuning, which keeps the last
        trained masks) the magnitude N:M mask of their current weights: the checkpoint format holds a mask for
        every block linear. Compression uses the masks of the trained-sparse layers only (layers never trained
        sparse stay dense). Masks of dense-mode layers never enter the forward pass, so this changes nothing
        in training."""
        modules = list(self.fixed_dense.values())
        if self.current == "dense":
            modules += list(self.sparse.values())
        for module in modules:  # plain magnitude N:M (best kept |W|), transposable or not
            c = module.config
            module.mask.copy_(nm_mask(module.weight.detach(), c.n, c.m, name=module.name).to(module.mask.dtype))
            module.forward_mask = None

    @property
    def any_dense(self) -> bool:
        """True when some layer trained sparse runs dense right now (dense fine-tuning, a dense phase): the
        trained model is then not the model compression keeps. Layers never trained sparse do not count."""
        return any(module.dense for module in self.sparse.values())

    @contextlib.contextmanager
    def sparse_view(self) -> Iterator[None]:
        """Temporarily run every trained-sparse layer with its mask (what the compressed model computes: the
        last trained masks) while the layers that never train sparse (``sparse_layers="ffn"``) stay dense, as
        compression keeps them; restores the modes on exit."""
        self.prepare_checkpoint()
        modes = {name: module.dense for name, module in self.layers.items()}
        try:
            for module in self.sparse.values():
                module.dense = False
            yield
        finally:
            for name, module in self.layers.items():
                module.dense = modes[name]

    @contextlib.contextmanager
    def hooks_paused(self) -> Iterator[None]:
        """No Wanda activation statistics collected inside (e.g. around validation forward passes)."""
        with self.adaptive.paused() if self.adaptive is not None else contextlib.nullcontext():
            yield

    # ---------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """JSON-serialisable state beyond the masks: Wanda's activation sums since the last refresh."""
        if self.adaptive is None or not self.adaptive.wanda:
            return {}
        # Checkpointing the sums since the last refresh makes a resume exact.
        sums = {name: base64.b64encode(t.float().cpu().numpy().tobytes()).decode("ascii")
                for name, t in self.adaptive.state_dict().items()}
        return {"wanda_sumsq": sums}

    def load_state_dict(self, state: dict, where: str = "checkpoint") -> None:
        """Restore :meth:`state_dict`; ArtifactError naming ``where`` for a malformed entry."""
        if self.adaptive is None or not self.adaptive.wanda:
            return
        sums = state.get("wanda_sumsq") or {}
        restored = {}
        for name, text in sums.items():
            module = self.adaptive.modules.get(name)
            try:
                t = torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.float32)
            except (ValueError, TypeError):
                t = None
            if module is None or t is None or t.numel() != module.weight.shape[1]:
                raise ArtifactError(f"{where}: the saved Wanda activation statistics of '{name}' are invalid")
            restored[name] = t.clone().to(module.weight.device)
        try:
            self.adaptive.load_state_dict(restored)
        except ConfigError as exc:
            raise ArtifactError(f"{where}: {exc}") from None
