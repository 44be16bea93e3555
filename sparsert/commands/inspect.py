"""``sparsert inspect ARTIFACT [--json]``: sparsity, bits per weight, size and compression ratios (of an artifact,
of the 2:4 layers of a Hugging Face directory sparsert wrote, or of the MatMul/Gemm weights of an ONNX file)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("inspect")
@click.argument("artifact", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON (for scripts).")
def command(artifact: str, as_json: bool) -> None:
    """Validate ARTIFACT and report per-layer sparsity and bits/weight, size on disk and compression ratios; for a
    Hugging Face directory sparsert wrote, its recorded 2:4 layers and the bits/weight they take when served (for
    another causal-LM directory, which of its block linears are already 2:4); for an
    .onnx file (any exporter's), which MatMul/Gemm weights are 2:4 along K, as TensorRT's sparse tactics need."""
    from sparsert.runtime.artifact import is_hf_model_dir, read_config
    from sparsert.runtime.artifact_stats import artifact_stats, format_stats, stats_json

    if artifact.lower().endswith(".onnx") and Path(artifact).is_file():
        from sparsert.export.onnx_inspect import format_onnx_stats, onnx_stats_json, onnx_weight_stats

        onnx_stats = onnx_weight_stats(artifact)
        click.echo(onnx_stats_json(onnx_stats) if as_json else format_onnx_stats(onnx_stats))
        return
    if is_hf_model_dir(artifact):
        from sparsert.train.hf_inspect import format_hf_stats, hf_dir_stats, hf_stats_json

        hf = hf_dir_stats(artifact)
        click.echo(hf_stats_json(hf) if as_json else format_hf_stats(hf))
        return
    read_config(artifact)  # the path as given: "" is refused, not read as the current directory
    stats = artifact_stats(artifact)
    click.echo(stats_json(stats) if as_json else format_stats(stats))
