"""The training metrics log: one JSON object per line in ``<run_dir>/metrics.jsonl``.

Step lines: ``{"step", "loss", "lr", "tokens_per_s", "sparsity"}`` plus, when they apply, ``phase`` (with a
sparsity schedule), ``decay`` (masked decay in effect), ``loss_total`` and ``kl`` (distillation),
``router_aux_loss`` (a MoE model trained with its router load-balancing loss: the unweighted term), ``flip_rate``
and ``flip_rate_layers`` (on steps that refreshed the masks), ``mask_refresh_share`` (sparse runs: share of the
step's wall time spent on the masks after the update). Eval lines: ``{"step", "val_loss", "val_ppl"}`` (and
``val_loss_sparse``/``val_ppl_sparse`` at the end when the trained model is not the 2:4 one; the trainer's
:func:`~sparsert.train.trainer.train` writes them all). Header lines have no ``step``: ``{"data_skipped": [...]}``
lists the files of a ``--data`` folder left out as not UTF-8 text. Every line is flushed as written;
a checkpoint records the byte offset reached (:meth:`MetricsLog.offset`) so that a resumed run truncates the
log back to the checkpoint and rewrites nothing twice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from sparsert.runtime.errors import ArtifactError

METRICS_FILE = "metrics.jsonl"
TIMING_KEYS = ("tokens_per_s", "elapsed_s", "mask_refresh_share")
STEP_KEYS = frozenset({"step", "loss", "lr", "tokens_per_s", "sparsity"})  # in every step line
HEADER_KEYS = frozenset({"data_skipped"})


def is_metrics_log(path: Path) -> bool:
    """Whether ``path`` is empty or starts with a line this module writes (a step line or a header line): a
    metrics log of sparsert's, not someone else's file of the same name."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline(1 << 22)
        if not first.strip():
            return first == ""
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and (STEP_KEYS <= set(record) or set(record) == HEADER_KEYS)


def _clean(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsLog:
    """Append-only JSONL writer. ``offset()`` is the file size after the last complete line."""

    def __init__(self, path: str | Path, *, truncate_to: int | None = None) -> None:
        self.path = Path(path)
        if truncate_to is not None:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size < truncate_to:
                raise ArtifactError(
                    f"{self.path}: the metrics log is shorter ({size} bytes) than the checkpoint recorded "
                    f"({truncate_to} bytes); it was modified or truncated"
                )
            if self.path.exists():
                os.truncate(self.path, truncate_to)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def offset(self) -> int:
        self._f.flush()
        return self._f.tell()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics JSONL file (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ArtifactError(f"{path}: line {lineno} is not valid JSON") from None
    return records
