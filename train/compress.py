"""Checkpoint -> compressed artifact: 2:4 masks (trained or one-shot pruned), optional INT4, packed and saved.

A checkpoint trained sparse (``state["sparsity"]`` set) carries a 0/1 mask ``<name>.mask`` for each of its
sparse linears; those masks define the kept weights ``W ⊙ mask``. A dense checkpoint (trained with
``--dense``, or without masks) is pruned one-shot to 2:4 by a *pruner* from :data:`PRUNERS`; only
``"magnitude"`` (keep the two largest |W| of every four along K, the baseline of Mishra et al., "Accelerating
Sparse Deep Neural Networks", 2021) exists today. Activation-aware methods (Wanda, Sun et al. 2023;
SparseGPT, Frantar & Alistarh 2023) plug in through :func:`register_pruner` and receive calibration batches
in :class:`PruneRequest`.

INT4 (symmetric, groups along the original K, fp16 scales) is applied to the kept values iff the checkpoint
was trained with quantization-aware training (``state["quantization"]``), unless overridden, with the QAT
group size, so the artifact stores exactly the codes the QAT forward pass saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsert.runtime.artifact import QuantizationInfo, SparsityInfo, model_state_shapes, save_artifact
from sparsert.runtime.errors import ArtifactError, ConfigError
from sparsert.runtime.model import ModelConfig, sparse_linear_names
from sparsert.runtime.nm_mask import is_nm_sparse, nm_mask
from sparsert.runtime.packed_linear import PackedLinear, pack_linear
from sparsert.runtime.tokenizer import ByteTokenizer, tokenizer_from_dict
from sparsert.train.checkpoint import Checkpoint, load_checkpoint

DEFAULT_GROUP_SIZE = 128


@dataclass
class PruneRequest:
    """What a pruner gets.

    weights: layer name -> dense float32 weight [out, K] of each linear to prune.
    state: the checkpoint's full model state dict (for methods that run the model on calibration data).
    calibration: token batches int64 [B, T] for activation-aware methods; None when not supplied.
    """

    model_config: ModelConfig
    weights: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    n: int = 2
    m: int = 4
    calibration: Sequence[torch.Tensor] | None = None


@dataclass
class PrunedLayer:
    """A pruner's result for one layer: the (possibly updated) weight float32 [out, K] and its bool N:M
    mask [out, K] (SparseGPT updates the kept weights; magnitude pruning does not)."""

    weight: torch.Tensor
    mask: torch.Tensor


Pruner = Callable[[PruneRequest], dict[str, PrunedLayer]]
PRUNERS: dict[str, Pruner] = {}


def register_pruner(name: str) -> Callable[[Pruner], Pruner]:
    """Decorator adding a pruner to :data:`PRUNERS` under ``name`` (the ``--prune`` value)."""

    def add(fn: Pruner) -> Pruner:
        PRUNERS[name] = fn
        return fn

    return add


@register_pruner("magnitude")
def prune_magnitude(request: PruneRequest) -> dict[str, PrunedLayer]:
    """Keep the ``n`` largest |W| of every ``m`` along K (ties: lower index); weights unchanged."""
    return {
        name: PrunedLayer(w, nm_mask(w, request.n, request.m, name=f"{name}.weight"))
        for name, w in request.weights.items()
    }


def _checkpoint_masks(ckpt: Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
    """The trained masks of a sparse checkpoint, validated as 0/1, the weight's shape and 2:4 along K."""
    state, where = ckpt.model_state, f"checkpoint {ckpt.path}"
    masks = {}
    for name in names:
        mask = state.get(f"{name}.mask")
        if mask is None:
            continue
        shape = tuple(state[f"{name}.weight"].shape)
        if tuple(mask.shape) != shape:
            raise ArtifactError(f"{where}: mask '{name}.mask' has shape {list(mask.shape)}, expected {list(shape)}")
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            raise ArtifactError(f"{where}: mask '{name}.mask' holds values other than 0 and 1")
        mask = mask.to(torch.bool)
        if not is_nm_sparse(mask, 2, 4):
            raise ArtifactError(f"{where}: mask '{name}.mask' keeps more than 2 of some group of 4 along K")
        masks[name] = mask
    return masks


def compress_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    int4_group_size: int | None = None,
    quantize: bool | None = None,
    prune: str | None = None,
    dense_dtype: str = "float16",
    calibration: Sequence[torch.Tensor] | None = None,
) -> Path:
    """Compress a training checkpoint into an artifact directory at ``output``; returns its path.

    Args:
        checkpoint: a run dir, its checkpoints dir or one step dir (see :func:`load_checkpoint`).
        int4_group_size: INT4 group size along K (default: the QAT group size, else 128); giving one without
            INT4 is a ConfigError. A size other than the QAT one gives codes QAT did not see.
        quantize: INT4 on/off (default: on iff the checkpoint was trained with QAT).
        prune: one-shot pruner for a dense checkpoint (default "magnitude"); a sparse checkpoint's trained
            masks are used as they are, and asking to prune it is a ConfigError.
        dense_dtype: "float16" or "float32" for the unquantized 2:4 values and the dense tensors.
        calibration: token batches for activation-aware pruners.
    Raises:
        ArtifactError for a missing/corrupt checkpoint or bad masks; ConfigError for bad options (unknown
        pruner, a group size that does not divide a layer's K, ...). Nothing is written on failure.
    """
    if prune is not None and prune not in PRUNERS:
        raise ConfigError(f"unknown pruning method '{prune}' (choose from {', '.join(PRUNERS)})")
    if int4_group_size is not None and (
        isinstance(int4_group_size, bool) or not isinstance(int4_group_size, int) or int4_group_size <= 0
        or int4_group_size % 4
    ):
        raise ConfigError(f"INT4 group size must be a positive multiple of 4, got {int4_group_size!r}")
    if dense_dtype not in ("float16", "float32"):
        raise ConfigError(f"dense dtype must be float16 or float32, got {dense_dtype!r}")
    ckpt = load_checkpoint(checkpoint, load_optimizer=False)
    config, state, where = ckpt.model_config, ckpt.model_state, f"checkpoint {ckpt.path}"

    shapes = model_state_shapes(config)
    for key, shape in shapes.items():
        if key not in state:
            raise ArtifactError(f"{where}: model state has no tensor '{key}'")
        if tuple(state[key].shape) != shape:
            raise ArtifactError(
                f"{where}: tensor '{key}' has shape {list(state[key].shape)}, expected {list(shape)}"
            )

    sparsity = ckpt.state.get("sparsity")
    if sparsity is not None and (sparsity.get("n"), sparsity.get("m")) != (2, 4):
        raise ConfigError(
            f"{where} was trained with {sparsity.get('n')}:{sparsity.get('m')} sparsity; the artifact stores 2:4 only"
        )
    names = sparse_linear_names(config)
    masks = _checkpoint_masks(ckpt, names) if sparsity is not None else {}
    if masks:
        if prune is not None:
            raise ConfigError(
                f"{where} carries trained 2:4 masks; --prune applies only to dense checkpoints"
            )
        layers = [n for n in names if n in masks]
        pruned = {n: PrunedLayer(state[f"{n}.weight"].float(), masks[n]) for n in layers}
        mask_source = "checkpoint masks"
    else:
        method = prune or "magnitude"
        request = PruneRequest(
            model_config=config,
            weights={n: state[f"{n}.weight"].float() for n in names},
            state=state,
            calibration=calibration,
        )
        pruned = PRUNERS[method](request)
        layers = [n for n in names if n in pruned]
        mask_source = f"{method} one-shot"

    qat = ckpt.state.get("quantization")
    if quantize is None:
        quantize = qat is not None
    if not quantize and int4_group_size is not None:
        reason = "INT4 is switched off" if qat is not None else f"{where} was not trained with INT4 QAT"
        raise ConfigError(f"--group-size {int4_group_size} applies only to INT4, but {reason}; add --int4 to quantize")
    group = int4_group_size or (qat or {}).get("group_size") or DEFAULT_GROUP_SIZE
    if quantize:
        for n in layers:
            k = shapes[f"{n}.weight"][1]
            if k % group:
                raise ConfigError(f"INT4 group size {group} does not divide K={k} of layer '{n}' (weight [out, K])")

    packed: dict[str, PackedLinear] = {}
    for n in layers:
        packed[n] = pack_linear(
            pruned[n].weight,
            mask=pruned[n].mask,
            int4_group_size=group if quantize else None,
            bias=state.get(f"{n}.bias"),
            values_dtype=torch.float16 if dense_dtype == "float16" else torch.float32,
            name=f"{n}.weight",
        )
    dense = {k: state[k] for k in shapes if k.rpartition(".")[0] not in packed}
    tokenizer = ByteTokenizer() if "tokenizer" not in ckpt.state else tokenizer_from_dict(ckpt.state["tokenizer"])
    return save_artifact(
        output,
        model_config=config,
        tokenizer=tokenizer,
        packed=packed,
        dense=dense,
        sparsity=SparsityInfo(tuple(layers)),
        quantization=QuantizationInfo(tuple(layers), group) if quantize else None,
        dense_dtype=dense_dtype,
        producer={"source": {"checkpoint": str(ckpt.path), "step": ckpt.step}, "masks": mask_source},
    )
