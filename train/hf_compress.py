"""One-shot 2:4 (+INT4) compression of a Hugging Face causal LM directory: ``sparsert compress HF_DIR -o OUT``.

For users without a training budget (issue 3, item 5) whose model is a transformers checkpoint: the block
linears (:func:`sparsert.train.hf_model.hf_sparse_linear_names`, fused MoE experts included once unfused into
per-expert linears; embeddings, norms, routers and ``lm_head`` stay dense) are pruned to 2:4 in one shot by
magnitude, Wanda (Sun et al., ICLR 2024) or SparseGPT (Frantar & Alistarh, ICML 2023) with
:func:`sparsert.train.oneshot_prune.prune_model_oneshot`, block by block on calibration windows
of the train split of ``calib_data`` tokenized with the model's own tokenizer. With ``int4`` the kept values are
quantized to INT4 (symmetric, ``group_size`` columns per fp16 scale) and stored dequantized.

The output is again a Hugging Face directory that ``transformers`` loads as is (dense weights carrying the 2:4
zeros, as :func:`sparsert.train.hf_model.save_hf_checkpoint` writes them), with ``sparsert.json`` recording the
2:4 layers and their INT4 group: ``sparsert generate OUT --backend runtime`` (or
:func:`~sparsert.train.hf_model.swap_saved_sparse_layers`) then runs those layers on sparsert's kernels, and
quantizing the stored values again gives back exactly their codes. A directory that already records 2:4 layers
(a ``sparsert train --model`` run's ``hf/``) keeps its trained masks: only ``int4`` applies to it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from sparsert.runtime.errors import ArtifactError, ConfigError, require_path
from sparsert.runtime.fileio import HF_DIR_FILES, foreign_entry
from sparsert.runtime.linear_swap import outside_linears_note
from sparsert.runtime.moe_experts import unfuse_experts
from sparsert.runtime.nm_mask import is_nm_sparse
from sparsert.train.compress import (
    MAX_DEFAULT_CALIB_SEQ_LEN,
    CompressionNote,
    calibration_batches,
    calibration_flags_given,
    check_calibration_options,
)
from sparsert.train.hf_model import (
    SPARSERT_FILE,
    conv1d_to_linear,
    has_tokenizer_files,
    hf_directory_block_linears,
    hf_sparse_linear_names,
    load_hf_causal_lm,
    save_hf_checkpoint,
    saved_sparse_layers,
    served_as_2_4,
    sparsify_hf_model,
)
from sparsert.train.hf_train import hf_model_config
from sparsert.train.oneshot_prune import ONESHOT_METHODS, prune_model_oneshot
from sparsert.train.sparse_linear import SparsityConfig
from sparsert.train.sparsify import pruned_layer_selection, refuse_layer_selection, sparse_modules

HF_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_output(source: Path, output: Path) -> None:
    """The output may be new, or a directory this module (or ``sparsert train --model``) wrote, which is replaced;
    never the model directory itself, a folder inside it or one that holds it (replacing that would delete it)."""
    src, out = source.resolve(), output.resolve()
    if out == src:
        raise ConfigError(f"-o {output}: the same directory as the model; write the compressed model elsewhere")
    if src in out.parents or out in src.parents:
        where = "inside" if src in out.parents else "above"
        raise ConfigError(f"-o {output}: a directory {where} the model directory {source}; write the compressed "
                          "model elsewhere")
    if not (output.exists() or output.is_symlink()):
        return
    if output.is_dir() and not output.is_symlink() and (output / SPARSERT_FILE).is_file():
        foreign = foreign_entry(output, HF_DIR_FILES)
        if foreign is not None:
            raise ConfigError(f"-o {output}: holds {foreign}, which is not part of the Hugging Face directory "
                              "sparsert writes (replacing it would delete it); move it out or choose a new path")
        return
    raise ConfigError(f"-o {output}: already exists and is not a Hugging Face directory sparsert wrote (no "
                      f"{SPARSERT_FILE}); choose a new path")


def compress_hf_model(path: str | Path, output: str | Path, *, prune: str | None = None, int4: bool = False,
                      group_size: int = 128, dtype: str = "float32", calib_data: str | Path | None = None,
                      calib_batches: int | None = None, calib_seq_len: int | None = None,
                      calib_batch_size: int | None = None, seed: int | None = None, sparse_layers: str = "all",
                      keep_dense: Sequence[str] = ()) -> tuple[Path, list[str]]:
    """Prune (and optionally INT4-quantize) the Hugging Face causal LM at ``path`` to 2:4 and write it to
    ``output``; returns ``(output, the 2:4 layer names)``.

    Args:
        prune: one of :data:`~sparsert.train.oneshot_prune.ONESHOT_METHODS` (default ``"magnitude"``); refused for
            a directory whose ``sparsert.json`` already records 2:4 layers.
        int4, group_size: INT4 on the kept values, ``group_size`` (a multiple of 4 dividing every K) per scale.
        dtype: the saved weights' dtype (``float32``, ``float16`` or ``bfloat16``).
        calib_data, calib_batches (8), calib_seq_len (min(context, 256)), calib_batch_size (4), seed (0): the
            calibration windows of wanda and sparsegpt (:func:`sparsert.train.compress.calibration_batches`).
        sparse_layers, keep_dense: which block linears are pruned (``"all"`` or the feed-forward ones, ``"ffn"``,
            experts included) minus those matching a ``keep_dense`` shell pattern
            (:func:`~sparsert.train.sparsify.pruned_layer_selection`); the rest stay dense as stored. Refused for a
            directory that records trained 2:4 layers.
    Raises:
        ConfigError naming the option or path; ArtifactError for unreadable weights; DataError for unusable
        calibration data. A :class:`~sparsert.train.compress.CompressionNote` warning names weights that are not
        linear layers even after unfusing MoE experts (an experts layout transformers does not document,
        convolutions), which stay dense. The output is written under a temporary name and
        renamed: nothing is left on failure.
    """
    require_path(path, "CHECKPOINT", "the path of a Hugging Face model directory")
    require_path(output, "-o", "the path of the directory to write")
    require_path(calib_data, "--calib-data", "the path of a text file, folder or .jsonl")
    if prune is not None and prune not in ONESHOT_METHODS:
        raise ConfigError(f"unknown pruning method '{prune}' (choose from {', '.join(ONESHOT_METHODS)})")
    if int4 and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 4):
        raise ConfigError(f"--group-size: the INT4 group size must be a positive multiple of 4, got {group_size!r}")
    if dtype not in HF_DTYPES:
        raise ConfigError(f"--dtype for a Hugging Face model must be one of {', '.join(HF_DTYPES)}, got {dtype!r}")
    check_calibration_options(calib_batches, calib_seq_len, calib_batch_size, seed)
    out = Path(output)
    _check_output(Path(path), out)

    trained = saved_sparse_layers(path)
    if trained is not None and prune is not None:
        raise ConfigError(f"--prune {prune}: {path} already records 2:4 layers ({SPARSERT_FILE}); they keep their "
                          "trained masks (leave --prune out)")
    if trained is not None:
        refuse_layer_selection(sparse_layers, keep_dense,
                               f"{path} already records trained 2:4 layers ({SPARSERT_FILE})")
    elif sparse_layers != "all" or keep_dense:  # a pattern that matches nothing is named before the weights are read
        pruned_layer_selection(list(hf_directory_block_linears(path)), sparse_layers, keep_dense)
    method = prune or ("magnitude" if trained is None else None)
    needs_calibration = method is not None and ONESHOT_METHODS[method].needs is not None
    given = calibration_flags_given(calib_data, calib_batches, calib_seq_len, calib_batch_size, seed)
    if given and not needs_calibration:
        raise ConfigError(f"{given[0]} applies only to --prune wanda/sparsegpt; this compression uses no "
                          "calibration data")

    if trained is not None and not any(served_as_2_4(info) for info in trained.values()):
        patterns = sorted({"{}:{}".format(i["n"], i["m"]) for i in trained.values() if not i["dense"]}) or ["none"]
        raise ConfigError(f"{Path(path) / SPARSERT_FILE} records no 2:4 layer (its sparse layers are "
                          f"{', '.join(patterns)}); sparsert's formats and kernels hold 2:4")
    context = None
    if needs_calibration:  # checked before the model is loaded
        if not has_tokenizer_files(path):
            raise ConfigError(f"--prune {method} calibrates on text, but {path} has no tokenizer files")
        context = hf_model_config(path).max_seq_len
        if calib_seq_len is not None and calib_seq_len > context:
            raise ConfigError(f"--calib-seq-len {calib_seq_len} exceeds the model's context of {context}")

    if int4 and dtype != "float32":
        warnings.warn(f"--dtype {dtype} rounds the INT4 values (codes times fp16 scales need float32 to stay exact): "
                      "serving and export quantize the stored values again and may get other codes; export keeps "
                      "such layers float32 2:4", CompressionNote, stacklevel=2)
    bundle = load_hf_causal_lm(path)
    model, tokenizer = bundle.model, bundle.tokenizer
    unfuse_experts(model)  # fused MoE experts -> per-expert linears, pruned like the other MLP layers
    outside = outside_linears_note(model)
    if outside is not None:
        warnings.warn(f"{path}: {outside}", CompressionNote, stacklevel=2)
    if trained is not None:
        names = [n for n, info in trained.items() if served_as_2_4(info)]
        other = {n: f"{info['n']}:{info['m']}" for n, info in trained.items()
                 if not info["dense"] and not served_as_2_4(info)}
        if other:
            first, patterns = next(iter(other)), ", ".join(sorted(set(other.values())))
            warnings.warn(f"{len(other)} layer(s) recorded with another N:M pattern ({patterns}, e.g. {first}) stay "
                          "as stored, dense in sparsert's formats (they hold 2:4)", CompressionNote, stacklevel=2)
    else:
        names = pruned_layer_selection(hf_sparse_linear_names(model), sparse_layers, keep_dense)
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"{Path(path) / SPARSERT_FILE} records layer '{name}', which the model does not "
                                "have") from None
    conv1d_to_linear(model, names)
    for name in names:
        k = model.get_submodule(name).weight.shape[1]
        if k % 4 or (int4 and k % group_size):
            what = "4 (2:4 groups run along K)" if k % 4 else f"the INT4 group size {group_size} (--group-size)"
            raise ConfigError(f"{name}: K={k} (its input features) is not divisible by {what}")
    masks: dict[str, torch.Tensor]
    if method is None:
        masks = {n: model.get_submodule(n).weight.detach() != 0 for n in names}
        bad = [n for n, mask in masks.items() if not is_nm_sparse(mask, 2, 4)]
        if bad:
            raise ConfigError(f"{path}: {SPARSERT_FILE} records {bad[0]} as 2:4, but its weight is not 2:4 along K")
    else:
        calibration = None
        if needs_calibration:
            seq_len = calib_seq_len if calib_seq_len is not None else min(context, MAX_DEFAULT_CALIB_SEQ_LEN)
            given_sizes = {"batches": calib_batches, "batch_size": calib_batch_size, "seed": seed}
            calibration = calibration_batches(tokenizer, calib_data, seq_len=seq_len,  # defaults for the rest
                                              **{k: v for k, v in given_sizes.items() if v is not None})
        masks = prune_model_oneshot(model, method, calibration, names=names)
    sparsify_hf_model(model, SparsityConfig(qat_group_size=group_size if int4 else None), names)
    with torch.no_grad():
        for name, module in sparse_modules(model).items():
            module.mask.copy_(masks[name].to(module.mask.dtype))
    save_hf_checkpoint(model, tokenizer, out, overwrite=True, dtype=HF_DTYPES[dtype], consume=True)
    return out, names
