"""``sparsert train``: train a 2:4 sparse (SR-STE, optionally INT4 QAT) model or a dense baseline.

A thin click layer over :func:`sparsert.train.trainer.train`: each flag maps to a
:class:`~sparsert.train.trainer.TrainConfig` field and shows that field's default. With ``--resume`` the run's
saved config is used and only the flags given on the command line override it (a real difference is
refused by the trainer, listing it).
"""

from __future__ import annotations

import dataclasses
import re

import click
from click.core import ParameterSource

from sparsert.runtime.errors import ConfigError
from sparsert.train.trainer import TrainConfig, find_resume_dir, load_train_config, train

_D = TrainConfig  # the defaults shown in --help are TrainConfig's own

# CLI parameter name -> TrainConfig field (when they differ); "sparsity" maps to n and m.
_FIELD = {"out": "out_dir", "mask_refresh": "mask_refresh_interval"}
_FLAG = {
    "out_dir": "--out", "mask_refresh_interval": "--mask-refresh", "n": "--sparsity", "m": "--sparsity",
    "qat": "--qat", "progress": "--no-progress",
}


def _flag(field: str) -> str:
    return _FLAG.get(field, "--" + field.replace("_", "-"))


def parse_sparsity(text: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M) with integers 0 < N < M; ConfigError naming --sparsity otherwise."""
    parts = text.split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--sparsity: expected N:M with integers 0 < N < M (e.g. 2:4), got {text!r}") from None
    if not 0 < n < m:
        raise ConfigError(f"--sparsity: expected N:M with integers 0 < N < M (e.g. 2:4), got {text!r}")
    return n, m


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _config_error(exc: ConfigError) -> ConfigError:
    """Rewrite ``train config 'field'`` in a TrainConfig message as the flag a CLI user typed."""
    return ConfigError(re.sub(r"train config '(\w+)'", lambda m: _flag(m.group(1)), str(exc)))


@click.command("train")
@click.option("--preset", metavar="NAME", default=_D.preset, show_default=True,
              help="Model size preset (tiny, small, base).")
@click.option("--arch", type=click.Choice(["llama", "gpt2"]), default=None,
              help="Architecture (default: the preset's, llama).")
@click.option("--data", metavar="PATH", type=str, default=None,
              help="Text file, folder of text files or JSONL file with a 'text' field "
                   "(default: the Python standard library's sources).")
@click.option("--out", metavar="DIR", type=str, default=None,
              help="Run directory (default: runs/<preset>-<sparse24|sparse24-int4|dense>-<timestamp>).")
@click.option("--steps", type=int, default=_D.steps, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=_D.batch_size, show_default=True, help="Sequences per step.")
@click.option("--seq-len", type=int, default=_D.seq_len, show_default=True, help="Tokens per sequence.")
@click.option("--lr", type=float, default=_D.lr, show_default=True,
              help="Peak learning rate (AdamW; 5% linear warm-up, cosine decay to 10%).")
@click.option("--weight-decay", type=float, default=_D.weight_decay, show_default=True,
              help="AdamW weight decay on 2-D weights.")
@click.option("--dense", is_flag=True, help="Train the same model densely (the baseline; no masks).")
@click.option("--sparsity", metavar="N:M", default="2:4", show_default=True,
              help="N:M pattern along K for the block linears.")
@click.option("--decay", type=float, default=_D.decay, show_default=True,
              help="SR-STE decay λ on the pruned weights' gradient (0 = plain STE).")
@click.option("--mask-refresh", type=int, default=_D.mask_refresh_interval, show_default=True,
              help="Recompute the masks from |W| every this many steps.")
@click.option("--qat", "--int4", "qat", is_flag=True,
              help="INT4 quantization-aware training of the kept values (fake quantization, STE).")
@click.option("--group-size", type=int, default=_D.group_size, show_default=True,
              help="INT4 group size along K for --qat.")
@click.option("--eval-interval", type=int, default=_D.eval_interval, show_default=True,
              help="Evaluate validation loss every this many steps (and at the end).")
@click.option("--eval-batches", type=int, default=_D.eval_batches, show_default=True,
              help="Validation batches per evaluation.")
@click.option("--ckpt-interval", type=int, default=_D.ckpt_interval, show_default=True,
              help="Checkpoint every this many steps (and at the end); the newest two are kept.")
@click.option("--seed", type=int, default=_D.seed, show_default=True, help="Seed of the model init and data order.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out (default: the newest matching run under runs/) from its last checkpoint.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--no-progress", "no_progress", is_flag=True, help="No progress bar.")
@click.pass_context
def command(ctx: click.Context, **opts: object) -> None:
    """Train a 2:4 sparse transformer with SR-STE (or --dense), then compress it to an artifact.

    With no options this runs the built-in default: the tiny preset on the default corpus, 2:4 SR-STE, a few
    minutes on a 2-core CPU. Writes metrics.jsonl, checkpoints/ and artifact/ in the run directory and prints
    where the artifact is.
    """
    values: dict[str, object] = {}
    given: set[str] = set()
    for name, value in opts.items():
        if name == "sparsity":
            continue
        field = "progress" if name == "no_progress" else _FIELD.get(name, name)
        values[field] = (not value) if name == "no_progress" else value
        if _given(ctx, name):
            given.add(field)
    n, m = parse_sparsity(str(opts["sparsity"]))
    values.update(n=n, m=m)
    if _given(ctx, "sparsity"):
        if opts["dense"]:
            raise ConfigError("--sparsity sets the pattern of a sparse run; it cannot be combined with --dense")
        given.update({"n", "m"})

    try:
        if opts["resume"]:
            probe = TrainConfig(**values)
            run_dir = find_resume_dir(probe)
            saved = load_train_config(run_dir)
            cfg = dataclasses.replace(saved, **{k: values[k] for k in given if k != "out_dir"})
        else:
            cfg = TrainConfig(**values)
    except ConfigError as exc:
        raise _config_error(exc) from None
    train(cfg)
