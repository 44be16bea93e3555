"""``sparsert inspect ARTIFACT [--json]``: sparsity, bits per weight, size and compression ratios (of an artifact,
or of the 2:4 layers of a Hugging Face directory sparsert wrote)."""

from __future__ import annotations

import click


@click.command("inspect")
@click.argument("artifact", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON (for scripts).")
def command(artifact: str, as_json: bool) -> None:
    """Validate ARTIFACT and report per-layer sparsity and bits/weight, size on disk and compression ratios; for a
    Hugging Face directory sparsert wrote, its recorded 2:4 layers and the bits/weight they take when served."""
    from sparsert.runtime.artifact import is_hf_model_dir, read_config
    from sparsert.runtime.artifact_stats import artifact_stats, format_stats, stats_json

    if is_hf_model_dir(artifact):
        from sparsert.train.hf_inspect import format_hf_stats, hf_dir_stats, hf_stats_json

        hf = hf_dir_stats(artifact)
        click.echo(hf_stats_json(hf) if as_json else format_hf_stats(hf))
        return
    read_config(artifact)  # the path as given: "" is refused, not read as the current directory
    stats = artifact_stats(artifact)
    click.echo(stats_json(stats) if as_json else format_stats(stats))
