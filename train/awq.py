"""Activation-aware INT4 scale search (AWQ) for 2:4 + INT4 artifacts, folded exactly into the model.

AWQ (Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", MLSys 2024): a few input channels of a linear carry much larger
activations than the others, so their weights matter more. Scaling input channel ``j`` of the weight up by
``s_j`` (and its input down by ``s_j``) computes the same function but lets the quantization grid resolve
those weights better. Per group of linears that share one input ``x [tokens, K]``::

    s(α)  = mean_t |x_tj| ^ α,   normalised by sqrt(max s · min s) (as in the AWQ code), α ∈ {0, 0.1, ..., 1}
    err(α) = Σ_layers ‖ Q(W ⊙ M · diag(s)) · diag(1/s) · xᵀ − (W ⊙ M) · xᵀ ‖²_F
    α*     = argmin err(α)     (α = 0 gives s = 1, plain INT4, so the search never does worse on calibration)

``Q`` is the artifact's quantizer (:func:`sparsert.runtime.int4.fake_quantize_int4`: symmetric, groups along K,
fp16 scales). ``err`` is computed exactly from the Gram matrix ``G = xᵀx`` as ``Σ tr(ΔW G ΔWᵀ)``, so only
``G`` (K × K) is kept, not the activations. Weight clipping (AWQ's second search) is not done.

**2:4 first, mask fixed.** The weights are pruned (checkpoint masks or a one-shot pruner) *before* the
search, and the mask ``M`` stays as it is: scaling a column by ``s_j > 0`` keeps zeros zero, so
``W ⊙ M · diag(s)`` has the same 2:4 pattern, and its INT4 codes at pruned positions are 0. The mask is not
re-chosen on the scaled weights (a magnitude mask of ``W·diag(s)`` would differ; Wanda's score
``|W_ij|·‖x_j‖`` is invariant under the rescaling anyway).

**Folding, no extra ops.** ``1/s`` goes into the op that produces the group's input, so the artifact computes
the same function with the same graph (:func:`fold_block_scales`)::

    q/k/v   (input attn_norm(x))   attn_norm.weight /= s  (and .bias for the GPT-2 LayerNorm)
    o_proj  (input attention out)  v_proj rows /= s  (and v bias): attention output = softmax(·) @ v is
                                   linear in v per channel h·hd + j, the same index as v_proj's output row
    gate/up (input mlp_norm(x))    mlp_norm.weight /= s (and .bias)
    down    (input silu(g)·u)      up_proj rows /= s (and up bias): down(silu(gate x) · up x) is linear in
                                   up's output — Llama style only; GPT-2's down(gelu(up x)) has no linear
                                   producer, so its down_proj keeps plain INT4 (s = 1)

and the linears' columns are multiplied by ``s``. Only the fold of ``o``/``down`` into the rows of ``v``/``up``
changes a layer that is itself quantized; scaling a row by a constant commutes with per-row group INT4 up to
the fp16 rounding of the group scale.

**QAT checkpoints.** A checkpoint trained with INT4 quantization-aware training learned weights for the
codes of ``Q(W ⊙ M)``; AWQ rescales the weights and so changes those codes. ``sparsert compress`` therefore
refuses ``--awq`` on a QAT checkpoint unless ``--force-awq`` is given (see :mod:`sparsert.train.compress`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparsert.runtime.errors import ConfigError
from sparsert.runtime.int4 import fake_quantize_int4
from sparsert.train.calibration import InputStats, calibration_input_ids, collect_input_stats

DEFAULT_GRID = 10
"""α grid: ``{i / DEFAULT_GRID for i in 0..DEFAULT_GRID}`` = 0, 0.1, ..., 1."""
MIN_MEAN_ABS = 1e-4  # AWQ clamps mean |x| here so dead channels do not get a zero (or infinite) scale


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ per-input-channel scales: ``mean_abs`` float [K] -> float32 [K], ``s = clamp(mean_abs)^α`` divided
    by ``sqrt(max s · min s)`` (so the scales straddle 1); all ones for ``α = 0``."""
    s = mean_abs.float().clamp(min=MIN_MEAN_ABS).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def int4_output_error(weights: Sequence[torch.Tensor], gram: torch.Tensor, scales: torch.Tensor | None,
                      group_size: int) -> float:
    """``Σ_l ‖Q(W_l · diag(s)) · diag(1/s) · xᵀ − W_l · xᵀ‖²_F`` over all calibration tokens, from ``gram = xᵀx``.

    Args:
        weights: float [out_l, K] each, already pruned (zeros at pruned positions, which stay zero).
        gram: float [K, K], ``xᵀx`` of the layers' shared input.
        scales: float [K] (> 0), or None for plain INT4 (s = 1).
        group_size: INT4 group size along K (must divide K).
    """
    g = gram.to(torch.float64)
    total = 0.0
    for w in weights:
        w = w.detach().float()
        if scales is None:
            dq = fake_quantize_int4(w, group_size).double()
        else:
            s = scales.float()[None, :]
            dq = fake_quantize_int4(w * s, group_size).double() / s.double()
        delta = dq - w.double()  # (out, K)
        total += float(((delta @ g) * delta).sum())
    return total


@dataclass
class ScaleSearch:
    """Result of :func:`search_scales` for one group: the chosen ``alpha``, its ``scales`` float32 [K], its
    output ``error`` and the ``plain_error`` of INT4 without scaling (both as in :func:`int4_output_error`)."""

    alpha: float
    scales: torch.Tensor
    error: float
    plain_error: float


@torch.no_grad()
def search_scales(weights: Sequence[torch.Tensor], stats: InputStats, group_size: int,
                  grid: int = DEFAULT_GRID) -> ScaleSearch:
    """Grid search of AWQ's α for linears sharing one input (see the module docstring).

    ``weights``: pruned float [out_l, K]; ``stats``: their input's :class:`~sparsert.train.calibration.InputStats`
    (``with_gram=True``); ``grid``: number of steps of α over [0, 1]. Ties keep the smaller α (α = 0 is plain
    INT4 with scales of exactly 1).
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or grid <= 0:
        raise ConfigError(f"AWQ grid must be a positive integer, got {grid!r}")
    if stats.tokens == 0:
        raise ConfigError("AWQ scale search: no calibration tokens reached the layer")
    if stats.gram is None:
        raise ConfigError("AWQ scale search: the input statistics hold no Gram matrix (collect them with_gram=True)")
    plain = int4_output_error(weights, stats.gram, None, group_size)
    best = ScaleSearch(0.0, torch.ones(stats.in_features), plain, plain)
    mean_abs = stats.mean_abs
    for i in range(1, grid + 1):
        alpha = i / grid
        s = awq_scales(mean_abs, alpha)
        err = int4_output_error(weights, stats.gram, s, group_size)
        if err < best.error:
            best = ScaleSearch(alpha, s, err, plain)
    return best


@dataclass
class BlockScales:
    """AWQ scales of one transformer block, float [K] each, None = leave that group unscaled.

    ``qkv`` [d]: inputs of q/k/v_proj; ``o`` [d]: input of o_proj; ``gate_up`` [d]: inputs of gate/up_proj;
    ``down`` [ffn]: input of down_proj (Llama style only).
    """

    qkv: torch.Tensor | None = None
    o: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None
    down: torch.Tensor | None = None


def _scale_columns(linear: nn.Module, s: torch.Tensor) -> None:
    linear.weight.mul_(s.to(linear.weight)[None, :])


def _divide_outputs(module: nn.Module, s: torch.Tensor) -> None:
    """Divide the output channels of a linear (rows + bias) or a norm (weight + bias) by ``s``."""
    w = module.weight
    w.div_(s.to(w)[:, None] if w.dim() == 2 else s.to(w))
    if getattr(module, "bias", None) is not None:
        module.bias.div_(s.to(module.bias))


@torch.no_grad()
def fold_block_scales(block: nn.Module, scales: BlockScales) -> None:
    """Apply ``scales`` to a :class:`sparsert.runtime.model.Block` in place, computing the same function.

    Each group's linears get their input columns multiplied by ``s``; ``1/s`` is folded into the producer of
    their input (norm weight/bias, v_proj rows/bias for o_proj, up_proj rows/bias for a gated MLP's
    down_proj). A ``down`` scale for an ungated (GPT-2) MLP is a ConfigError: GELU is not linear.
    """
    attn, mlp = block.attn, block.mlp
    gated = hasattr(mlp, "gate_proj")
    for name, s in (("qkv", scales.qkv), ("o", scales.o), ("gate_up", scales.gate_up), ("down", scales.down)):
        if s is not None and (s.dim() != 1 or not bool((s > 0).all()) or not bool(torch.isfinite(s).all())):
            raise ConfigError(f"AWQ {name} scales must be a finite positive vector [K], got shape {tuple(s.shape)}")
    if scales.qkv is not None:
        _divide_outputs(block.attn_norm, scales.qkv)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            _scale_columns(lin, scales.qkv)
    if scales.o is not None:
        _divide_outputs(attn.v_proj, scales.o)
        _scale_columns(attn.o_proj, scales.o)
    if scales.gate_up is not None:
        _divide_outputs(block.mlp_norm, scales.gate_up)
        for lin in ((mlp.gate_proj, mlp.up_proj) if gated else (mlp.up_proj,)):
            _scale_columns(lin, scales.gate_up)
    if scales.down is not None:
        if not gated:
            raise ConfigError("AWQ: down_proj scales cannot be folded into a GELU MLP (GPT-2 style); leave them None")
        _divide_outputs(mlp.up_proj, scales.down)
        _scale_columns(mlp.down_proj, scales.down)


@torch.no_grad()
def awq_scale_model(model: nn.Module, calib_batches: Iterable[torch.Tensor], group_size: int, *,
                    grid: int = DEFAULT_GRID, quantized: Collection[str] | None = None) -> dict[str, ScaleSearch]:
    """Search AWQ scales block by block and fold them into ``model`` (in place); the float model computes the
    same function afterwards (up to float rounding), its INT4 quantization a better one.

    Args:
        model: a float32 :class:`~sparsert.runtime.model.DecoderLM` whose sparse linears are already pruned
            (zeros at pruned positions; the 2:4 pattern is kept, see the module docstring).
        calib_batches: calibration ``input_ids`` int64 [B, T] (or ``(x, y)`` pairs).
        group_size: the INT4 group size along K the artifact will use (must divide every K).
        grid: steps of α over [0, 1].
        quantized: the linears the artifact quantizes (module names, ``blocks.{i}.attn.q_proj`` ...; default:
            all). A group's error sums over its quantized linears only (a layer kept dense computes the same
            function at any scale), and a group with none is not searched.
    Returns:
        ``{"blocks.{i}.attn.qkv" | "blocks.{i}.attn.o_proj" | "blocks.{i}.mlp.gate_up" | "blocks.{i}.mlp.down_proj":
        ScaleSearch}`` for the searched groups (no ``down_proj`` entry for GPT-2 style blocks).
    """
    batches = [calibration_input_ids(b) for b in calib_batches]
    if not batches:
        raise ConfigError("AWQ needs calibration batches (got none)")
    was_training = model.training
    model.eval()
    results: dict[str, ScaleSearch] = {}
    try:
        for i, block in enumerate(model.blocks):
            gated = hasattr(block.mlp, "gate_proj")
            # label -> (BlockScales field, the linears sharing one input, the one whose input is tapped)
            groups = {
                "attn.qkv": ("qkv", ["attn.q_proj", "attn.k_proj", "attn.v_proj"], "attn.q_proj"),
                "attn.o_proj": ("o", ["attn.o_proj"], "attn.o_proj"),
                "mlp.gate_up": ("gate_up", ["mlp.gate_proj", "mlp.up_proj"] if gated else ["mlp.up_proj"],
                                "mlp.up_proj"),
            }
            if gated:
                groups["mlp.down_proj"] = ("down", ["mlp.down_proj"], "mlp.down_proj")
            if quantized is not None:
                groups = {label: (key, [n for n in linears if f"blocks.{i}.{n}" in quantized], tap)
                          for label, (key, linears, tap) in groups.items()}
                groups = {label: group for label, group in groups.items() if group[1]}
                if not groups:
                    continue
            taps = {f"blocks.{i}.{tap}": block.get_submodule(tap) for _, _, tap in groups.values()}
            stats = collect_input_stats(model, taps, batches, with_gram=True, what="AWQ")
            found = {}
            for label, (key, linears, tap) in groups.items():
                weights = [block.get_submodule(n).weight for n in linears]
                res = search_scales(weights, stats[f"blocks.{i}.{tap}"], group_size, grid)
                results[f"blocks.{i}.{label}"] = res
                found[key] = res.scales if res.alpha > 0 else None
            fold_block_scales(block, BlockScales(**found))
    finally:
        model.train(was_training)
    return results
