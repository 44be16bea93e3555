"""``sparsert compress CHECKPOINT -o OUT``: a training checkpoint -> a compressed 2:4(+INT4) artifact; a Hugging Face
model directory -> the same model pruned one-shot to 2:4 (+INT4), again a Hugging Face directory."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from sparsert.train.oneshot_prune import ONESHOT_METHODS


@click.command("compress")
@click.argument("checkpoint", type=str)
@click.option("-o", "--output", required=True, type=str,
              help="Artifact directory to write (replaced if it is one); for a Hugging Face CHECKPOINT, the Hugging "
              "Face directory to write.")
@click.option(
    "--int4/--no-int4",
    "int4",
    default=None,
    help="Quantize the kept values to INT4 (default: only if the checkpoint was trained with INT4 QAT, or --awq). "
    "--no-int4 on an INT4-QAT checkpoint stores the unquantized latent weights (with a note).",
)
@click.option(
    "--group-size",
    type=int,
    default=None,
    help="INT4 group size along K, a multiple of 4 dividing every K (default: the QAT group size, else 128). "
    "Refused for INT4-QAT checkpoints when it differs from the QAT group size, unless --force-group-size.",
)
@click.option("--force-group-size", is_flag=True, default=False,
              help="Allow a --group-size other than an INT4-QAT checkpoint's (re-quantizes in untrained groups).")
@click.option(
    "--prune",
    type=click.Choice(list(ONESHOT_METHODS)),
    default=None,
    help="One-shot 2:4 pruning of a dense checkpoint (default: magnitude): magnitude (|W|), wanda "
    "(|W|·‖X‖, calibration data) or sparsegpt (OBS reconstruction, calibration data). Sparse checkpoints keep "
    "their trained masks.",
)
@click.option(
    "--sparse-layers",
    type=click.Choice(["all", "ffn"]),
    default="all",
    show_default=True,
    help="One-shot pruning only: the block linears made 2:4, all of them or the feed-forward ones (MLP and MoE "
    "experts; attention stays dense).",
)
@click.option(
    "--keep-dense",
    "keep_dense",
    metavar="PATTERN",
    multiple=True,
    help="One-shot pruning only: keep the layers whose module name matches this shell pattern dense (repeatable), "
    "e.g. --keep-dense '*.layers.0.*' --keep-dense '*.down_proj'. Names as transformers gives them "
    "(model.layers.0.mlp.down_proj, experts as model.layers.0.mlp.experts.3.down_proj) or, for sparsert "
    "checkpoints, blocks.0.mlp.down_proj; a pattern matching no layer is refused.",
)
@click.option(
    "--awq",
    is_flag=True,
    default=False,
    help="Activation-aware INT4 scale search (AWQ) on calibration data, folded into the norms/v/up weights; "
    "implies --int4. Refused for INT4-QAT checkpoints (it changes the codes QAT saw) unless --force-awq.",
)
@click.option("--force-awq", is_flag=True, default=False, help="Allow --awq on an INT4-QAT checkpoint.")
@click.option(
    "--calib-data",
    type=str,
    default=None,
    help="Calibration text for wanda/sparsegpt/--awq: a file, folder or .jsonl (default: the built-in default "
    "corpus); windows come from its train split.",
)
@click.option("--calib-batches", type=int, default=None, help="Number of calibration batches (default: 8).")
@click.option(
    "--calib-seq-len",
    type=int,
    default=None,
    help="Tokens per calibration sequence (default: the model's max_seq_len, at most 256).",
)
@click.option("--calib-batch-size", type=int, default=None, help="Sequences per calibration batch (default: 4).")
@click.option("--seed", type=int, default=None, help="Seed of the calibration window sampler (default: 0).")
@click.option(
    "--dtype",
    "dense_dtype",
    type=click.Choice(["float16", "float32", "bfloat16"]),
    default="float16",
    show_default="float16 for an artifact, float32 for a Hugging Face directory",
    help="dtype of the unquantized 2:4 values and of the dense tensors (embeddings, norms, lm_head): float16 or "
    "float32 for an artifact; a Hugging Face directory is written in float32 unless --dtype is given.",
)
def command(
    checkpoint: str,
    output: str,
    int4: bool | None,
    group_size: int | None,
    force_group_size: bool,
    prune: str | None,
    sparse_layers: str,
    keep_dense: tuple[str, ...],
    awq: bool,
    force_awq: bool,
    calib_data: str | None,
    calib_batches: int | None,
    calib_seq_len: int | None,
    calib_batch_size: int | None,
    seed: int | None,
    dense_dtype: str,
) -> None:
    """Compress CHECKPOINT (a run dir, its checkpoints/ dir or a step dir) into an artifact directory; or prune a
    Hugging Face model directory (or the dense weights of a `train --model --dense` run) to 2:4 (+INT4) one-shot into
    a Hugging Face directory."""
    from sparsert.runtime.artifact import is_hf_model_dir
    from sparsert.runtime.artifact_stats import artifact_stats
    from sparsert.train.compress import compress_checkpoint

    hf_args = (output, int4, group_size, force_group_size, prune, awq or force_awq, calib_data, calib_batches,
               calib_seq_len, calib_batch_size, seed, dense_dtype, sparse_layers, keep_dense)
    if is_hf_model_dir(checkpoint):
        _compress_hf(click.get_current_context(), checkpoint, *hf_args)
        return
    if _is_dense_hf_run(checkpoint):
        _compress_dense_hf_run(click.get_current_context(), checkpoint, hf_args)
        return

    with _notes_as_lines():
        path = compress_checkpoint(
            checkpoint,
            output,
            int4_group_size=group_size,
            force_group_size=force_group_size,
            quantize=int4,
            prune=prune,
            dense_dtype=dense_dtype,
            calib_data=calib_data,
            calib_batches=calib_batches,
            calib_seq_len=calib_seq_len,
            calib_batch_size=calib_batch_size,
            seed=seed,
            awq=awq,
            force_awq=force_awq,
            sparse_layers=sparse_layers,
            keep_dense=keep_dense,
        )
    stats = artifact_stats(path)
    click.echo(
        f"wrote {path}: linear weights {stats.linear_bits_per_weight:.3f} bits/weight "
        f"({stats.linear_ratio_vs_fp32:.2f}x vs FP32), model.safetensors {stats.file_bytes:,} bytes "
        f"({stats.model_ratio_vs_fp32:.2f}x vs FP32)"
    )


@contextlib.contextmanager
def _notes_as_lines(rename: tuple[str, str] | None = None) -> Iterator[None]:
    """Print the compression's :class:`~sparsert.train.compress.CompressionNote` warnings as one ``note: ...``
    line each on stderr (after it, also when it fails), with ``rename = (old, new)`` replaced in them; any other
    warning as Python would have shown it."""
    import warnings

    from sparsert.train.compress import CompressionNote

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompressionNote)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, CompressionNote):
                    text = str(w.message) if rename is None else str(w.message).replace(*rename)
                    click.echo(f"note: {text}", err=True)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _is_dense_hf_run(checkpoint: str) -> bool:
    """Whether ``checkpoint`` designates a checkpoint of a ``train --model ... --dense`` run (False also for a path
    that is no checkpoint: compress_checkpoint then says what is wrong with it)."""
    from sparsert.runtime.errors import SparsertError
    from sparsert.train.checkpoint import STATE_FILE, resolve_checkpoint_dir

    try:
        state = json.loads((resolve_checkpoint_dir(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
    except (SparsertError, OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("hf_model") is not None and state.get("sparsity") is None


def _compress_dense_hf_run(ctx: click.Context, checkpoint: str, hf_args: tuple) -> None:
    """``compress`` of a dense ``train --model`` run: its weights as trained (the run's hf/ holds their magnitude
    2:4) are written to a scratch Hugging Face directory beside the output, pruned one-shot from there like any
    Hugging Face directory, and the scratch directory removed (also on Ctrl-C or SIGTERM). The options are checked
    before the weights are copied, and messages name the run, not the scratch copy."""
    from sparsert.runtime.errors import ConfigError, SparsertError
    from sparsert.train.checkpoint import load_checkpoint
    from sparsert.train.compress import calibration_flags_given
    from sparsert.train.hf_model import hf_directory_block_linears
    from sparsert.train.hf_train import save_dense_hf_run
    from sparsert.train.sparsify import pruned_layer_selection

    (output, int4, group_size, force_group_size, prune, awq, calib_data, calib_batches, calib_seq_len,
     calib_batch_size, seed, _, sparse_layers, keep_dense) = hf_args
    shown = f"{checkpoint} (its dense weights)"
    if awq:
        raise ConfigError(f"--awq (and --force-awq) fold scales into the norms of built-in sparsert checkpoints; "
                          f"{checkpoint} is a run of a Hugging Face model (use --int4 for plain group-wise INT4)")
    _hf_int4_choice(shown, {}, int4, group_size, force_group_size)
    given = calibration_flags_given(calib_data, calib_batches, calib_seq_len, calib_batch_size, seed)
    if given and ONESHOT_METHODS[prune or "magnitude"].needs is None:
        raise ConfigError(f"{given[0]} applies only to --prune wanda/sparsegpt; this compression uses no "
                          "calibration data")
    ckpt = load_checkpoint(checkpoint, load_optimizer=False)
    model_dir = Path(ckpt.state["hf_model"])
    if (sparse_layers != "all" or keep_dense) and (model_dir / "config.json").is_file():
        pruned_layer_selection(list(hf_directory_block_linears(model_dir)), sparse_layers, keep_dense)

    parent = Path(output).resolve().parent
    made = [d for d in (parent, *parent.parents) if not d.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{Path(output).name}.dense-run-", dir=parent))
    source = scratch / "model"
    done = False
    try:
        save_dense_hf_run(ckpt, source)  # SIGTERM unwinds to the finally below too (sparsert.cli)
        del ckpt
        try:
            _compress_hf(ctx, str(source), *hf_args, rename=(str(source), shown))
        except SparsertError as exc:  # name the run, not the scratch copy
            raise type(exc)(str(exc).replace(str(source), shown)) from None
        done = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not done:
            for d in made:  # the output's parents this command created, as they were
                with contextlib.suppress(OSError):
                    d.rmdir()


def _hf_int4_choice(shown: str, trained: dict, int4: bool | None, group_size: int | None,
                    force_group_size: bool) -> tuple[bool, int]:
    """``(quantize, group size)`` of a Hugging Face directory's compression from the INT4 flags and the layers its
    sparsert.json records (``trained``); ConfigError naming the flag (and the directory, as ``shown``)."""
    from sparsert.runtime.errors import ConfigError
    from sparsert.train.hf_model import SPARSERT_FILE

    if force_group_size and group_size is None:
        raise ConfigError("--force-group-size applies only together with --group-size")
    qat = sorted({info["qat_group_size"] for info in trained.values() if info["qat_group_size"] is not None})
    quantize = bool(qat) if int4 is None else int4
    if group_size is not None and not quantize:
        raise ConfigError("--group-size sets the INT4 groups; this compression stores no INT4 (add --int4)")
    if qat and group_size is not None and group_size != qat[0] and not force_group_size:
        raise ConfigError(f"--group-size {group_size}: {shown} holds INT4 values in groups of {qat[0]} (its "
                          f"{SPARSERT_FILE}); omit --group-size to keep them, or add --force-group-size to re-quantize")
    if force_group_size and (not qat or group_size == qat[0]):
        why = "holds no INT4 groups" if not qat else f"already holds INT4 groups of {qat[0]}"
        raise ConfigError(f"--force-group-size: {shown} {why}, so --group-size {group_size} needs no force")
    return quantize, group_size if group_size is not None else (qat[0] if qat else 128)


def _compress_hf(ctx: click.Context, path: str, output: str, int4: bool | None, group_size: int | None,
                 force_group_size: bool, prune: str | None, awq: bool, calib_data: str | None,
                 calib_batches: int | None, calib_seq_len: int | None, calib_batch_size: int | None, seed: int | None,
                 dense_dtype: str, sparse_layers: str, keep_dense: tuple[str, ...],
                 rename: tuple[str, str] | None = None) -> None:
    """``compress`` of a Hugging Face model directory (:func:`sparsert.train.hf_compress.compress_hf_model`);
    ``rename = (old, new)`` is replaced in its notes."""
    from sparsert.commands import option_given
    from sparsert.runtime.errors import ConfigError
    from sparsert.train.hf_compress import compress_hf_model
    from sparsert.train.hf_model import saved_sparse_layers

    if awq:
        raise ConfigError(f"--awq (and --force-awq) fold scales into sparsert checkpoints' norms; {path} is a Hugging "
                          "Face model directory (use --int4 for plain group-wise INT4)")
    quantize, group = _hf_int4_choice(path, saved_sparse_layers(path) or {}, int4, group_size, force_group_size)
    with _notes_as_lines(rename):
        out, names = compress_hf_model(
            path, output, prune=prune, int4=quantize, group_size=group,
            dtype=dense_dtype if option_given(ctx, "dense_dtype") else "float32", calib_data=calib_data,
            calib_batches=calib_batches, calib_seq_len=calib_seq_len, calib_batch_size=calib_batch_size, seed=seed,
            sparse_layers=sparse_layers, keep_dense=keep_dense)
    what = f"2:4 + INT4 (group {group})" if quantize else "2:4"
    click.echo(f"wrote {out}: a Hugging Face directory whose {len(names)} block linears are {what}; run it on "
               f"sparsert's kernels with: sparsert generate {out} --backend runtime --prompt ...")
