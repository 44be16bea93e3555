"""``sparsert inspect ARTIFACT [--json]``: sparsity, bits per weight, size and compression ratios."""

from __future__ import annotations

import click


@click.command("inspect")
@click.argument("artifact", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON (for scripts).")
def command(artifact: str, as_json: bool) -> None:
    """Validate ARTIFACT and report per-layer sparsity and bits/weight, size on disk and compression ratios."""
    from sparsert.runtime.artifact import read_config
    from sparsert.runtime.artifact_stats import artifact_stats, format_stats, stats_json

    read_config(artifact)  # the path as given: "" is refused, not read as the current directory
    stats = artifact_stats(artifact)
    click.echo(stats_json(stats) if as_json else format_stats(stats))
