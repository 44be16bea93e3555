"""Checkpoint -> compressed artifact: 2:4 masks (trained or one-shot pruned), optional INT4 (optionally with an
AWQ scale search), packed and saved.

A checkpoint trained sparse (``state["sparsity"]`` set) carries a 0/1 mask ``<name>.mask`` for each of its
sparse linears; those masks define the kept weights ``W ⊙ mask``. A dense checkpoint (trained with
``--dense``, or without masks) is pruned one-shot to 2:4 by a method of
:data:`sparsert.train.oneshot_prune.ONESHOT_METHODS` (the one registry of ``--prune`` values):

- ``magnitude`` (default): keep the two largest |W| of every four along K (Mishra et al., "Accelerating
  Sparse Deep Neural Networks", 2021); needs no data;
- ``wanda``: score ``|W_ij|·‖X_j‖₂`` (Sun et al., ICLR 2024);
- ``sparsegpt``: OBS reconstruction, also updates the kept weights (Frantar & Alistarh, ICML 2023).

The model is built from the checkpoint and pruned block by block with
:func:`sparsert.train.oneshot_prune.prune_model_oneshot` on *calibration batches*: ``calib_batches`` batches of
``calib_batch_size`` random windows of ``calib_seq_len`` tokens from the **train** split (never the
validation split) of ``calib_data`` (default: the built-in default corpus), tokenized with the checkpoint's
tokenizer, windows drawn with a generator seeded by ``seed``.

INT4 (symmetric, groups along the original K, fp16 scales) is applied to the kept values iff the checkpoint
was trained with quantization-aware training (``state["quantization"]``), unless overridden, with the QAT
group size, so the artifact stores exactly the codes the QAT forward pass saw. ``awq=True`` runs the
activation-aware scale search of :mod:`sparsert.train.awq` on the pruned model before quantizing (it implies
INT4); it is refused for a QAT checkpoint unless ``force_awq=True``, because it would change the codes QAT
trained with; so is an ``int4_group_size`` other than the QAT one unless ``force_group_size=True``. Switching
INT4 off for a QAT checkpoint stores the unquantized latent weights, with a :class:`CompressionNote` warning.

SLoRB (AST, :mod:`sparsert.train.slorb`): a checkpoint whose state holds ``<layer>.slorb.S`` [out, K/k] tensors
is compressed with those terms carried over unchanged: the artifact lists them under ``config.json["slorb"]``
and stores each ``S`` dense in ``dense_dtype``. AWQ is refused for such checkpoints (its input-channel scales
would have to be folded into the group sums, which they do not commute with).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from sparsert.runtime.artifact import (
    QuantizationInfo,
    SLoRBInfo,
    SparsityInfo,
    is_artifact_dir,
    model_state_shapes,
    save_artifact,
)
from sparsert.runtime.errors import ArtifactError, ConfigError, DataError, FormatError, require_path
from sparsert.runtime.model import DecoderLM, add_slorb, sparse_linear_names
from sparsert.runtime.nm_mask import is_nm_sparse
from sparsert.runtime.packed_linear import PackedLinear, pack_linear
from sparsert.runtime.tokenizer import ByteTokenizer, Tokenizer, tokenizer_from_dict
from sparsert.train.checkpoint import MODEL_FILE, Checkpoint, load_checkpoint
from sparsert.train.notes import CompressionNote
from sparsert.train.oneshot_prune import ONESHOT_METHODS, prune_model_oneshot
from sparsert.train.slorb import slorb_from_state
from sparsert.train.sparsify import pruned_layer_selection, refuse_layer_selection

DEFAULT_GROUP_SIZE = 128
DEFAULT_CALIB_BATCHES = 8
DEFAULT_CALIB_BATCH_SIZE = 4
MAX_DEFAULT_CALIB_SEQ_LEN = 256
DEFAULT_SEED = 0


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


def _trained_sparse_layers(sparsity: dict, names: list[str], where: str) -> list[str]:
    """The linears a sparse checkpoint trained N:M (``state["sparsity"]["layers"]``; all of ``names`` when a
    checkpoint does not list them), in model order."""
    listed = sparsity.get("layers")
    if listed is None:
        return names
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise ArtifactError(f"{where}: sparsity.layers must be a list of layer names, got {listed!r}")
    unknown = [n for n in listed if n not in names]
    if unknown:
        raise ArtifactError(f"{where}: sparsity.layers names '{unknown[0]}', which is not a block linear of this "
                            f"model (expected names like '{names[0]}')")
    return [n for n in names if n in listed]


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
MAX_CALIB_TOKENS = 1 << 24  # calibration windows are drawn up front; this bounds their memory (128 MiB of ids)


def check_positive_int(value: object, flag: str) -> None:
    """ConfigError naming ``flag`` unless ``value`` is None or a positive int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"{flag} must be a positive integer, got {value!r}")


def check_calibration_options(batches: object, seq_len: object, batch_size: object, seed: object) -> None:
    """ConfigError naming the flag: ``--calib-batches``, ``--calib-seq-len`` and ``--calib-batch-size`` must be None
    or positive ints, ``--seed`` None or an int in [0, 2**63 - 1]."""
    for value, flag in ((batches, "--calib-batches"), (seq_len, "--calib-seq-len"), (batch_size, "--calib-batch-size")):
        check_positive_int(value, flag)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise ConfigError(f"--seed must be an integer in [0, 2**63 - 1], got {seed!r}")


def calibration_flags_given(data: object, batches: object, seq_len: object, batch_size: object,
                            seed: object) -> list[str]:
    """The calibration flags set (not None), named as on the command line, for refusing them where a
    compression uses no calibration data."""
    flags = (("--calib-data", data), ("--calib-batches", batches), ("--calib-seq-len", seq_len),
             ("--calib-batch-size", batch_size), ("--seed", seed))
    return [flag for flag, value in flags if value is not None]


def calibration_batches(
    tokenizer: Tokenizer,
    data: str | Path | None = None,
    *,
    batches: int = DEFAULT_CALIB_BATCHES,
    batch_size: int = DEFAULT_CALIB_BATCH_SIZE,
    seq_len: int = MAX_DEFAULT_CALIB_SEQ_LEN,
    seed: int = DEFAULT_SEED,
) -> list[torch.Tensor]:
    """Calibration ``input_ids``: ``batches`` int64 tensors [batch_size, seq_len] of random windows from the
    train split of ``data`` (a text file, folder or .jsonl, as :func:`sparsert.train.data.load_corpus`;
    None = the default corpus), drawn by a ``torch.Generator`` seeded with ``seed``.

    Raises DataError naming the path (missing, unreadable, empty, too short for ``seq_len``).
    """
    from sparsert.train.data import TokenData, load_corpus  # noqa: PLC0415 - only needed with calibration

    for value, flag in ((batches, "--calib-batches"), (batch_size, "--calib-batch-size"), (seq_len, "--calib-seq-len")):
        check_positive_int(value, flag)
    if batches * batch_size * seq_len > MAX_CALIB_TOKENS:
        total = batches * batch_size * seq_len
        raise ConfigError(f"calibration of --calib-batches {batches} x --calib-batch-size {batch_size} x "
                          f"--calib-seq-len {seq_len} = {total:,} tokens is more than the {MAX_CALIB_TOKENS:,} this "
                          "tool holds in memory (one-shot pruning needs a few thousand)")
    what = "default corpus" if data is None else str(data)
    try:
        tokens = TokenData.from_corpus(load_corpus(data), tokenizer)
        gen = torch.Generator().manual_seed(int(seed))
        return [tokens.get_batch("train", batch_size, seq_len, gen)[0] for _ in range(batches)]
    except DataError as exc:
        raise DataError(f"calibration data ({what}): {exc}") from None


def _build_model(ckpt: Checkpoint, slorb: SLoRBInfo | None = None) -> DecoderLM:
    """A float32 DecoderLM in eval mode holding the checkpoint's weights (masks are not applied), with the
    checkpoint's SLoRB terms when ``slorb`` is given."""
    model = DecoderLM(ckpt.model_config)
    if slorb is not None:
        add_slorb(model, slorb.layers, slorb.k)
    own = model.state_dict()
    model.load_state_dict({k: ckpt.model_state[k].float() for k in own}, strict=True)
    return model.eval()


def compress_checkpoint(
    checkpoint: str | Path | Checkpoint,
    output: str | Path,
    *,
    int4_group_size: int | None = None,
    quantize: bool | None = None,
    prune: str | None = None,
    dense_dtype: str = "float16",
    calibration: Sequence[torch.Tensor] | None = None,
    calib_data: str | Path | None = None,
    calib_batches: int | None = None,
    calib_seq_len: int | None = None,
    calib_batch_size: int | None = None,
    seed: int | None = None,
    awq: bool = False,
    force_awq: bool = False,
    force_group_size: bool = False,
    sparse_layers: str = "all",
    keep_dense: Sequence[str] = (),
) -> Path:
    """Compress a training checkpoint into an artifact directory at ``output``; returns its path.

    Args:
        checkpoint: a run dir, its checkpoints dir or one step dir (see :func:`load_checkpoint`), or a
            :class:`Checkpoint` already loaded.
        int4_group_size: INT4 group size along K (default: the QAT group size, else 128); giving one without
            INT4 is a ConfigError, and so is one other than a QAT checkpoint's own unless ``force_group_size``
            (it gives codes QAT did not see).
        quantize: INT4 on/off (default: on iff the checkpoint was trained with QAT, or ``awq`` is set).
        prune: one-shot method of ``ONESHOT_METHODS`` for a dense checkpoint (default "magnitude"); a sparse
            checkpoint's trained masks are used as they are, and asking to prune it is a ConfigError.
        dense_dtype: "float16" or "float32" for the unquantized 2:4 values and the dense tensors.
        calibration: calibration token batches int64 [B, T] given directly (instead of ``calib_data``).
        calib_data, calib_batches (8), calib_seq_len (min(max_seq_len, 256)), calib_batch_size (4), seed (0):
            where calibration batches come from (see :func:`calibration_batches`); used by wanda, sparsegpt and
            AWQ only, and a ConfigError when given to a compression that uses no calibration data.
        awq: search AWQ INT4 scales (:mod:`sparsert.train.awq`) on the pruned model and fold them in; implies
            INT4 (``quantize=False`` with it is a ConfigError).
        force_awq: allow ``awq`` on a QAT checkpoint (refused by default: it changes the codes QAT saw).
        force_group_size: allow an ``int4_group_size`` other than a QAT checkpoint's own (refused by default:
            the kept values would be re-quantized in groups QAT never trained with).
        sparse_layers, keep_dense: the layers one-shot pruning makes 2:4 (``"all"`` block linears or the
            feed-forward ones, ``"ffn"``) minus those matching a ``keep_dense`` shell pattern
            (:func:`~sparsert.train.sparsify.pruned_layer_selection`); the others are stored dense. A ConfigError
            for a checkpoint with trained masks.
    Raises:
        ArtifactError for a missing/corrupt checkpoint or bad masks; ConfigError for bad options (unknown
        pruner, a group size that does not divide a layer's K, ...); DataError for unusable calibration
        data. Nothing is written on failure.
    """
    require_path(checkpoint, "CHECKPOINT", "the path of a training run (or its checkpoints/ or a step directory)")
    require_path(output, "-o", "the path of the artifact directory to write")
    require_path(calib_data, "--calib-data", "the path of a text file, folder or .jsonl")
    if prune is not None and prune not in ONESHOT_METHODS:
        raise ConfigError(f"unknown pruning method '{prune}' (choose from {', '.join(ONESHOT_METHODS)})")
    if int4_group_size is not None and (
        isinstance(int4_group_size, bool) or not isinstance(int4_group_size, int) or int4_group_size <= 0
        or int4_group_size % 4
    ):
        raise ConfigError(f"--group-size: the INT4 group size must be a positive multiple of 4, got "
                          f"{int4_group_size!r}")
    if dense_dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype of an artifact must be float16 or float32, got {dense_dtype!r}")
    check_calibration_options(calib_batches, calib_seq_len, calib_batch_size, seed)
    if calibration is not None and calib_data is not None:
        raise ConfigError("give calibration batches or --calib-data, not both")
    if force_awq and not awq:
        raise ConfigError("--force-awq applies only together with --awq")
    if force_group_size and int4_group_size is None:
        raise ConfigError("--force-group-size applies only together with --group-size")
    if awq and quantize is False:
        raise ConfigError("--awq searches INT4 scales; it cannot be combined with --no-int4")

    if not isinstance(checkpoint, Checkpoint) and is_artifact_dir(checkpoint):
        run = Path(checkpoint).resolve().parent
        hint = f" such as {run}" if (run / "checkpoints").is_dir() else ""
        raise ConfigError(f"{checkpoint} is a sparsert artifact (already compressed); compress takes a training "
                          f"run directory{hint} (or its checkpoints/ or a step directory)")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, load_optimizer=False)
    config, state, where = ckpt.model_config, ckpt.model_state, f"checkpoint {ckpt.path}"
    if ckpt.state.get("hf_model") is not None:  # H11: runs of `sparsert train --model PATH`
        how = ("`sparsert compress` of the run prunes its dense weights one-shot into a Hugging Face directory "
               "(save_dense_hf_run, then compress_hf_model)" if ckpt.state.get("sparsity") is None else
               "the run's hf/ directory holds the trained model (dense weights carrying the 2:4 zeros) for "
               "transformers; `sparsert compress RUN/hf` quantizes it")
        raise ArtifactError(f"{where} is a run of the Hugging Face model {ckpt.state['hf_model']}; the artifact "
                            f"format describes the built-in architectures only; {how}")
    found = slorb_from_state(state, config, where)
    slorb = None if found is None else SLoRBInfo(found[0], tuple(found[1]))
    shapes = model_state_shapes(config, slorb)
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
    # Layers trained dense in a sparse run (``--sparse-layers ffn``) stay dense: their checkpoint masks are
    # magnitude masks the training never used, and pruning them would cost quality the run never saw.
    trained = _trained_sparse_layers(sparsity, names, where) if sparsity is not None else names
    masks = _checkpoint_masks(ckpt, trained) if sparsity is not None else {}
    if masks and prune is not None:
        raise ConfigError(
            f"{where} carries trained 2:4 masks; --prune applies only to dense checkpoints "
            "(a sparse checkpoint's trained masks are kept as they are; re-pruning would discard them)"
        )
    method = None if masks else prune or "magnitude"
    if method is None:
        refuse_layer_selection(sparse_layers, keep_dense, f"{where} carries trained 2:4 layers")
    else:
        names = pruned_layer_selection(names, sparse_layers, keep_dense)

    qat = ckpt.state.get("quantization")
    if awq and slorb is not None:
        raise ConfigError(
            f"{where} carries SLoRB terms; --awq cannot be used with them (its per-input-channel scales do not "
            "pass through SLoRB's group sums, so the compressed model would compute something else)"
        )
    if awq and qat is not None and not force_awq:
        raise ConfigError(
            f"{where} was trained with INT4 QAT; --awq would rescale its weights and change the codes QAT "
            "trained with (add --force-awq to do it anyway)"
        )
    if quantize is None:
        quantize = qat is not None or awq
    if not quantize and int4_group_size is not None:
        reason = "INT4 is switched off" if qat is not None else f"{where} was not trained with INT4 QAT"
        raise ConfigError(f"--group-size {int4_group_size} applies only to INT4, but {reason}; add --int4 to quantize")
    qat_group = qat.get("group_size") if isinstance(qat, dict) else None
    if (quantize and qat_group is not None and int4_group_size is not None and int4_group_size != qat_group
            and not force_group_size):
        raise ConfigError(
            f"{where} was trained with INT4 QAT in groups of {qat_group}; --group-size {int4_group_size} would "
            f"re-quantize its weights in groups QAT never trained with (usually worse): omit --group-size to "
            f"keep {qat_group}, or add --force-group-size to do it anyway"
        )
    if force_group_size and (qat_group is None or int4_group_size == qat_group):
        why = (f"{where} was not trained with INT4 QAT" if qat_group is None
               else f"--group-size {int4_group_size} is the QAT run's own")
        raise ConfigError(f"--force-group-size has no effect here: {why}; leave it out")
    if not quantize and qat is not None:
        warnings.warn(f"{where} was trained with INT4 QAT (group size {qat_group}); --no-int4 stores its kept "
                      "values unquantized (the latent weights, not the INT4 codes QAT trained with)",
                      CompressionNote, stacklevel=2)
    group = int4_group_size or qat_group or DEFAULT_GROUP_SIZE
    layers = names if method is not None else [n for n in names if n in masks]
    if quantize:
        for n in layers:
            k = shapes[f"{n}.weight"][1]
            if k % group:
                raise ConfigError(f"INT4 group size {group} does not divide K={k} of layer '{n}' (weight [out, K])")

    tokenizer = ByteTokenizer() if "tokenizer" not in ckpt.state else tokenizer_from_dict(ckpt.state["tokenizer"])
    needs_calibration = awq or (method is not None and ONESHOT_METHODS[method].needs is not None)
    given = (["calibration batches"] if calibration is not None else []) + calibration_flags_given(
        calib_data, calib_batches, calib_seq_len, calib_batch_size, seed)
    calib_info = None
    if not needs_calibration and given:
        raise ConfigError(
            f"{given[0]} applies only to --prune wanda/sparsegpt and --awq; this compression uses no calibration data"
        )
    if needs_calibration and calibration is None:
        seq_len = calib_seq_len or min(config.max_seq_len, MAX_DEFAULT_CALIB_SEQ_LEN)
        if seq_len > config.max_seq_len:
            raise ConfigError(f"--calib-seq-len {seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
        calib_info = {
            "data": "default corpus" if calib_data is None else str(calib_data),
            "batches": calib_batches or DEFAULT_CALIB_BATCHES,
            "batch_size": calib_batch_size or DEFAULT_CALIB_BATCH_SIZE,
            "seq_len": seq_len,
            "seed": DEFAULT_SEED if seed is None else seed,
        }
        calibration = calibration_batches(
            tokenizer, calib_data, batches=calib_info["batches"], batch_size=calib_info["batch_size"],
            seq_len=seq_len, seed=calib_info["seed"],
        )

    model = _build_model(ckpt, slorb)
    if method is not None:
        masks = prune_model_oneshot(model, method, calibration, names=names)
        mask_source = f"{method} one-shot"
    else:
        with torch.no_grad():
            for n in layers:
                model.get_submodule(n).weight.mul_(masks[n])
        mask_source = "checkpoint masks"
    producer: dict = {"source": {"checkpoint": str(ckpt.path), "step": ckpt.step}, "masks": mask_source}
    if awq:
        from sparsert.train.awq import DEFAULT_GRID, awq_scale_model  # noqa: PLC0415

        searches = awq_scale_model(model, calibration, group, quantized=set(layers))
        producer["int4_scales"] = {"method": "awq", "grid": DEFAULT_GRID,
                                   "alpha": {k: r.alpha for k, r in searches.items()}}
    if calib_info is not None:
        producer["calibration"] = calib_info

    model_state = model.state_dict()
    packed: dict[str, PackedLinear] = {}
    for n in layers:
        try:
            packed[n] = pack_linear(
                model_state[f"{n}.weight"],
                mask=masks[n],
                int4_group_size=group if quantize else None,
                bias=model_state.get(f"{n}.bias"),
                values_dtype=torch.float16 if dense_dtype == "float16" else torch.float32,
                name=f"{n}.weight",
            )
        except FormatError as exc:  # e.g. NaN weights: say which checkpoint holds them
            raise ArtifactError(f"checkpoint {ckpt.path / MODEL_FILE}: {exc}") from None
    dense = {k: model_state[k] for k in shapes if k.rpartition(".")[0] not in packed}
    return save_artifact(
        output,
        model_config=config,
        tokenizer=tokenizer,
        packed=packed,
        dense=dense,
        sparsity=SparsityInfo(tuple(layers)),
        quantization=QuantizationInfo(tuple(layers), group) if quantize else None,
        dense_dtype=dense_dtype,
        producer=producer,
        slorb=slorb,
    )
