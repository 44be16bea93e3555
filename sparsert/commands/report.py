"""``sparsert report RUN_DIR [RUN_DIR ...] [-o OUT_DIR] [--dense RUN_DIR]``: plots and a summary of runs."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=str, metavar="RUN_DIR...")
@click.option("-o", "--output", "out_dir", type=str, default=None, metavar="DIR",
              help="Output folder (not inside an artifact). Default: RUN_DIR/report for one run, ./report for "
              "several.")
@click.option("--dense", "dense", type=str, default=None, metavar="RUN_DIR",
              help="The dense baseline run (added to the report if not listed); ratios are taken against it, for "
              "runs trained on the same data and validated on the same set (the notes say what differs).")
@click.option("--no-plots", is_flag=True, help="Write only summary.md/summary.html (no matplotlib needed).")
@click.option("--tensorboard", "tb_dir", type=str, default=None, metavar="DIR",
              help="Also write each run's metrics as TensorBoard event files under DIR/<run name> "
                   "(needs the tensorboard package).")
def command(run_dirs: tuple[str, ...], out_dir: str | None, dense: str | None, no_plots: bool,
            tb_dir: str | None) -> None:
    """Render loss (dense vs sparse), flip-rate and sparsity plots (PNG; also the router load-balancing loss of MoE
    runs that logged it) and a summary table (summary.md, summary.html) of the training runs RUN_DIR... from their
    metrics.jsonl and checkpoint state.json."""
    from sparsert.runtime.errors import require_path
    from sparsert.train.report import build_report, export_tensorboard, markdown_table, require_tensorboard

    if tb_dir is not None:
        require_path(tb_dir, "--tensorboard", "the path of a folder")
        require_tensorboard()  # fail before writing anything
    report = build_report(list(run_dirs), out_dir, dense=dense, plots=not no_plots)
    click.echo(markdown_table(report.summaries))
    for note in report.notes:
        click.echo(f"note: {note}")
    for path in report.files:
        click.echo(f"wrote {path}")
    if tb_dir is not None:
        for run in report.runs:
            target = export_tensorboard(run, Path(tb_dir) / run.name.replace("/", "_"))
            click.echo(f"wrote TensorBoard events to {target}")
