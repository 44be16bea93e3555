"""``sparsert compress CHECKPOINT -o OUT``: a training checkpoint -> a compressed 2:4(+INT4) artifact."""

from __future__ import annotations

import click

from sparsert.train.compress import PRUNERS


@click.command("compress")
@click.argument("checkpoint", type=str)
@click.option("-o", "--output", required=True, type=str, help="Artifact directory to write (replaced if it is one).")
@click.option(
    "--int4/--no-int4",
    "int4",
    default=None,
    help="Quantize the kept values to INT4 (default: only if the checkpoint was trained with INT4 QAT).",
)
@click.option(
    "--group-size",
    type=int,
    default=None,
    help="INT4 group size along K, a multiple of 4 dividing every K (default: the QAT group size, else 128).",
)
@click.option(
    "--prune",
    type=click.Choice(sorted(PRUNERS)),
    default=None,
    help="One-shot 2:4 pruning for a dense checkpoint (default: magnitude). Sparse checkpoints use their masks.",
)
@click.option(
    "--dtype",
    "dense_dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="dtype of the unquantized 2:4 values and of the dense tensors (embeddings, norms, lm_head).",
)
def command(
    checkpoint: str, output: str, int4: bool | None, group_size: int | None, prune: str | None, dense_dtype: str
) -> None:
    """Compress CHECKPOINT (a run dir, its checkpoints/ dir or a step dir) into an artifact directory."""
    from sparsert.runtime.artifact_stats import artifact_stats
    from sparsert.train.compress import compress_checkpoint

    path = compress_checkpoint(
        checkpoint, output, int4_group_size=group_size, quantize=int4, prune=prune, dense_dtype=dense_dtype
    )
    stats = artifact_stats(path)
    click.echo(
        f"wrote {path}: linear weights {stats.linear_bits_per_weight:.3f} bits/weight "
        f"({stats.linear_ratio_vs_fp32:.2f}x vs FP32), model.safetensors {stats.file_bytes:,} bytes "
        f"({stats.model_ratio_vs_fp32:.2f}x vs FP32)"
    )
