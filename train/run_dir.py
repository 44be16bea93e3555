"""Where a training run lives: a new run's directory (``--out`` or ``runs/<prefix>-<variant>-<time>``, checked
before anything is loaded or written), the run ``--resume`` continues, and the config a run was started with.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

from sparsert.runtime.artifact import is_artifact_dir, is_hf_model_dir
from sparsert.runtime.errors import ArtifactError, ConfigError
from sparsert.runtime.model import ModelConfig
from sparsert.train.checkpoint import (
    CHECKPOINTS,
    LATEST,
    Checkpoint,
    holds_no_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from sparsert.train.hf_train import (  # H11: sparsert train --model PATH (Hugging Face causal LMs)
    HF_DIR,
    is_hf_config,
    run_prefix,
)
from sparsert.train.metrics import METRICS_FILE, is_metrics_log
from sparsert.train.train_config import TrainConfig, record_differences

RUNS_DIR = "runs"


def load_train_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was started with (from its latest checkpoint), with ``resume=True`` and
    ``out_dir`` set to ``run_dir`` — ready to pass to :func:`sparsert.train.trainer.train` to continue it."""
    ckpt = load_checkpoint(run_dir, load_optimizer=False)
    return saved_config(ckpt, run_dir)


def saved_config(ckpt: Checkpoint, run_dir: str | Path) -> TrainConfig:
    raw = ckpt.state.get("train_config")
    if not isinstance(raw, dict):  # not the defaults: a resume would train another run's config from this step
        raise ArtifactError(f"{ckpt.path}/state.json: no train_config (the config the run trains with), so it cannot "
                            "be resumed; the checkpoint is damaged")
    try:
        saved = TrainConfig.from_dict(raw)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{ckpt.path}/state.json: train_config is not a valid training config ({exc})") from None
    disagree = record_differences(ckpt.state, saved)
    if disagree:
        raise ArtifactError(f"{ckpt.path}/state.json: train_config disagrees with the checkpoint's own records "
                            f"({'; '.join(disagree[:4])}): the file was edited or damaged; restore the values the run "
                            "was trained with")
    return dataclasses.replace(saved, resume=True, out_dir=str(run_dir))


def find_resume_dir(cfg: TrainConfig) -> Path:
    """The run to resume: ``cfg.out_dir``, or the newest ``runs/<preset>-<variant>-*`` with a checkpoint."""
    if cfg.out_dir is not None:
        return Path(cfg.out_dir)
    resumable = sorted(p for p in Path(RUNS_DIR).glob("*") if p.is_dir() and list_checkpoints(p / "checkpoints"))
    candidates = [p for p in resumable if p.name.startswith(f"{run_prefix(cfg)}-{cfg.variant}-")]
    if not candidates:
        # a run started with its own --out (or another preset) is not found by name: show what could be meant
        others = f" (runs with a checkpoint there: {', '.join(p.name for p in resumable[-5:])})" if resumable else ""
        raise ConfigError(
            f"--resume: no run of preset '{cfg.preset}' ({cfg.variant}) with a checkpoint under {RUNS_DIR}/"
            f"{others}; pass the run directory with --out"
        )
    return candidates[-1]


def new_run_dir(cfg: TrainConfig) -> Path:
    """The directory of a new run: ``cfg.out_dir`` once :func:`check_new_run_dir` accepts it, else a new
    ``runs/<preset>-<variant>-<timestamp>`` (with a ``-N`` suffix when that name is taken)."""
    if cfg.out_dir is not None:
        run_dir = Path(cfg.out_dir)
        check_new_run_dir(run_dir)
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(RUNS_DIR) / f"{run_prefix(cfg)}-{cfg.variant}-{stamp}"
    run_dir, i = base, 1
    while run_dir.exists():
        run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    return run_dir


def _is_run_leftover(path: Path) -> bool:
    if path.name == METRICS_FILE:
        return path.is_file() and not path.is_symlink() and is_metrics_log(path)
    if path.name == CHECKPOINTS:  # a run stopped before its first checkpoint was published
        return path.is_dir() and not path.is_symlink() and holds_no_checkpoint(path)
    return False


def check_new_run_dir(run_dir: Path) -> None:
    """ConfigError unless a new run may start in ``run_dir`` (``--out``): the names a run writes there
    (``metrics.jsonl``, ``checkpoints/``, ``artifact/``, ``hf/``) must be absent, empty, or what a sparsert run
    stopped before its first checkpoint leaves (its metrics log, ``checkpoints/`` without a complete
    checkpoint). A run with a checkpoint is refused (it is continued with ``--resume``). Anything else in the
    directory (a log ``tee`` writes, ``.gitkeep``, a ``report/``) is left alone. Checked before anything is
    loaded or written."""
    if not (run_dir.exists() or run_dir.is_symlink()):
        return
    if not run_dir.is_dir():
        what = "a file" if run_dir.is_file() else "something that is not a directory"
        raise ConfigError(f"--out {run_dir}: expected a run directory, got {what}")
    if (run_dir / CHECKPOINTS / LATEST).exists():
        raise ConfigError(
            f"{run_dir} already holds a training run; continue it with --resume or choose another --out"
        )
    what = ("a sparsert artifact" if is_artifact_dir(run_dir) else
            "a Hugging Face model directory" if is_hf_model_dir(run_dir) else None)
    if what is not None:
        raise ConfigError(f"--out {run_dir}: is {what}, not a run directory (a run writes checkpoints/ and "
                          "artifact/ or hf/ into it); choose another --out")
    try:
        clashes = []
        for name in (METRICS_FILE, CHECKPOINTS):
            path = run_dir / name
            if (path.exists() or path.is_symlink()) and not _is_run_leftover(path):
                clashes.append(name)
        for name in ("artifact", HF_DIR):
            path = run_dir / name
            if path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir())):
                clashes.append(name)
    except OSError as exc:
        raise ConfigError(f"--out {run_dir}: cannot be read ({exc})") from None
    if not clashes:
        return
    raise ConfigError(
        f"--out {run_dir}: it already holds {', '.join(clashes)}, not from an interrupted sparsert run, and a new "
        f"run writes {METRICS_FILE}, {CHECKPOINTS}/, artifact/ (or {HF_DIR}/) there: choose another --out, or move "
        f"{' and '.join(clashes)} out of {run_dir}"
    )


def check_artifact_target(run_dir: Path, cfg: TrainConfig, model_config: ModelConfig) -> None:
    """A resumed run ends by writing ``<run_dir>/artifact``, which compression refuses to do over anything but a
    sparsert artifact: ConfigError now, before training, rather than after it."""
    if is_hf_config(model_config) or not (cfg.dense or (cfg.n, cfg.m) == (2, 4)):
        return  # an HF run writes <run>/hf; an N:M run other than 2:4 writes no artifact
    target = run_dir / "artifact"
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_dir() and not target.is_symlink() and (not any(target.iterdir()) or is_artifact_dir(target)):
        return
    raise ConfigError(f"cannot resume {run_dir}: {target} is not a sparsert artifact, and the run ends by writing "
                      f"its artifact there; move it out of {run_dir} to resume")


