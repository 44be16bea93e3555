"""The ``sparsert`` command line: a thin click layer over typed Python functions.

Each command lives in ``sparsert/commands/<name>.py`` as a click command called ``command``; it is imported
only when used, so ``sparsert --help`` stays fast. A :class:`SparsertError`, a bad flag or value, and a
filesystem error on a named path (an existing file where a folder is needed, no permission, ...) become a
one-line ``error: ...`` message and exit code 2. Ctrl-C exits with 130, SIGTERM with 143 and SIGUSR1 with 138,
all after the ``finally`` blocks ran (no temporary file is left); ``train`` checkpoints the step it is on for
SIGTERM or SIGUSR1 and exits with 128 + the signal number. Under ``torchrun`` a configuration error or bad flag,
which every rank meets alike, is printed by rank 0 only; other errors carry ``[rank N]``.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import click

COMMANDS = {
    "train": "Train a 2:4 sparse (optionally INT4-QAT) model, or a dense baseline.",
    "compress": "Turn a training checkpoint into a compressed 2:4(+INT4) artifact, or prune an HF model to 2:4.",
    "inspect": "Report sparsity, bits per weight and compression ratios of an artifact.",
    "export": "Export an artifact to ONNX and check parity against PyTorch.",
    "generate": "Generate text from an artifact or HF directory (PyTorch, ONNX Runtime or GPU runtime).",
    "report": "Render plots and a summary of one or more training runs.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        try:
            module = importlib.import_module(f"sparsert.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sparsert.commands.{name}":
                return None
            raise
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))


@click.group(cls=LazyGroup)
@click.version_option(package_name="sparsert")
def cli() -> None:
    """sparsert: 2:4 sparse + INT4 transformer models — train, compress, export, serve."""


def _launcher_rank() -> int:
    """This process's rank under ``torchrun`` (which sets ``TORCHELASTIC_RUN_ID``; ``RANK`` within ``WORLD_SIZE``);
    0 otherwise: for ``RANK`` inherited outside torchrun (a job pod's environment) and for a broken environment,
    whose error every process must show. A subprocess of a torchrun worker inherits the variables and counts as
    that rank."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return 0
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0
    return rank if 0 <= rank < world else 0


class Terminated(BaseException):
    """SIGTERM or SIGUSR1 arrived (``kill``, ``timeout``, a batch scheduler ending the job or, with Slurm's
    ``--signal``, warning of its time limit; torchrun ending the other ranks of a failed run). A BaseException, like
    KeyboardInterrupt, so no ``except Exception`` takes it for an error. ``signum``: the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block SIGTERM and SIGUSR1 raise :class:`Terminated` where the process stands, so ``finally``
    blocks run (temporary files and scratch copies are removed, as on Ctrl-C) instead of the default action, which
    ends the process at once. ``sparsert train`` notes them instead while it trains, and stops after the step
    (:mod:`sparsert.train.stop_signals`)."""
    from sparsert.train.stop_signals import handling_stop_signals

    def unwind(signum: int, frame: object) -> None:
        raise Terminated(signum)

    with handling_stop_signals(unwind):
        yield


def main(argv: list[str] | None = None) -> None:
    from sparsert.runtime.errors import SparsertError, StoppedBySignal

    # transformers' bars for loading and saving local model files are noise around sparsert's own lines (an error
    # must stay one line); set HF_HUB_DISABLE_PROGRESS_BARS=0 to keep them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    from sparsert.runtime.errors import ConfigError

    rank = _launcher_rank()
    try:
        with sigterm_unwinds():
            cli.main(args=argv, prog_name="sparsert", standalone_mode=False)
    except StoppedBySignal as exc:  # the job said where it stopped and how to resume
        sys.exit(128 + exc.signum)
    except Terminated as exc:
        from sparsert.train.stop_signals import signal_name

        click.echo("terminated" if exc.signum == signal.SIGTERM else f"terminated by {signal_name(exc.signum)}",
                   err=True)
        sys.exit(128 + exc.signum)
    except SparsertError as exc:
        if rank == 0 or not isinstance(exc, ConfigError):  # every rank finds the same config error: rank 0 says it
            click.echo(f"error: {'' if rank == 0 else f'[rank {rank}] '}{exc}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a bad flag or value: one line, like every other error
        command = exc.ctx.command_path if exc.ctx is not None else "sparsert"
        if rank == 0:
            click.echo(f"error: {exc.format_message()} (see '{command} --help')", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a bug, keep its traceback
            raise
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        why = exc.strerror or str(exc)
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder of the path should be
            path = Path(os.fsdecode(exc.filename))  # EEXIST: a mkdir of the path itself, or of a folder on it
            blocking = next((p for p in (path, *path.parents) if p.is_file()), None)
            why = f"{blocking} is a file, not a directory" if blocking is not None else why
        click.echo(f"error: cannot use {where}: {why}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
