"""Training observability: read runs' ``metrics.jsonl``, plot them, summarise them, mirror them to TensorBoard.

A run directory (written by :mod:`sparsert.train.trainer`) holds ``metrics.jsonl``, one JSON object per line:
training lines carry ``step`` and ``loss`` (and ``lr``, ``tokens_per_s``, ``flip_rate`` on mask-refresh steps,
``sparsity``, ...), evaluation lines carry ``step`` and ``val_loss``/``val_ppl``. Its checkpoints' ``state.json``
(``checkpoints/latest.json`` -> ``step_N/state.json``) gives the run's sparsity, quantization and training
config, from which the report labels the method.

:func:`build_report` writes, into one output folder:

- ``loss.png``: training loss (raw, faint, and a centred moving average) and validation loss of every run
  on one plot, the dense baseline drawn in black;
- ``flip_rate.png``: the mask flip rate ``r_t = ‖m_t − m_{t−1}‖₁ / D`` of Hu et al., "Accelerating Transformer
  Pre-training with 2:4 Sparsity" (ICML 2024), on a log scale — the paper's health signal for 2:4 training:
  it should fall by orders of magnitude as the masks settle;
- ``sparsity.png``: the share of pruned block-linear weights over the steps (the pruning schedule);
- ``router_aux_loss.png`` (only when a run logged it: a mixture-of-experts model trained with its router
  load-balancing loss): that loss over the steps;
- ``summary.md`` and ``summary.html``: one row per run — method, steps, tokens, final train and validation
  loss, perplexity, the relative gap to the dense run, and the flip rate's peak, final value and their ratio.

Plots need matplotlib (the ``report`` extra), used through its object-oriented API with the Agg canvas (no
pyplot, no global backend switch). :class:`TensorBoardWriter` writes the same records as TensorBoard scalars
when ``tensorboard`` is installed. Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsert.runtime.errors import ArtifactError, ConfigError, require_path
from sparsert.runtime.fileio import write_atomic
from sparsert.train.metrics import METRICS_FILE

TRAIN_LOSS_WINDOW = 10  # the "final" training loss is the mean of the last this many logged steps
_METHOD_WORDS = ("method", "schedule", "transposable", "mvue", "masked_decay", "distill", "teacher", "slorb",
                 "wanda", "dense_finetune", "dense_fine_tune", "qat", "prune", "ast", "sparse_ffn_only",
                 "ffn_only", "decay_schedule")
REPORT_HINT = "pip install sparsert[report]"
TENSORBOARD_HINT = "pip install sparsert[tensorboard] (or: pip install tensorboard)"


# --------------------------------------------------------------------------------------------------- reading

@dataclass
class RunMetrics:
    """One run's metrics: training and evaluation records in step order (a resumed run's re-logged steps
    replace the earlier ones), header records without a step, the latest checkpoint's ``state.json``."""

    path: Path
    name: str
    train: list[dict]
    evals: list[dict]
    meta: dict = field(default_factory=dict)
    state: dict | None = None
    notes: list[str] = field(default_factory=list)

    def series(self, key: str, *, evals: bool = False) -> tuple[list[int], list[float]]:
        """(steps, values) of the finite numeric ``key`` values of the training (or evaluation) records."""
        steps, values = [], []
        for r in self.evals if evals else self.train:
            v = r.get(key)
            if _is_finite(v):
                steps.append(int(r["step"]))
                values.append(float(v))
        return steps, values

    @property
    def last_step(self) -> int:
        return max([int(r["step"]) for r in self.train + self.evals], default=0)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v: object) -> bool:
    return _is_number(v) and math.isfinite(v)


def _metrics_path(run: Path) -> Path:
    if run.is_file() and run.name.endswith(".jsonl"):
        return run
    if not run.exists():
        raise ArtifactError(f"{run}: run directory does not exist")
    if not run.is_dir():
        raise ArtifactError(f"{run}: expected a run directory (or a metrics .jsonl file)")
    path = run / METRICS_FILE
    if not path.is_file():
        raise ArtifactError(f"{run}: no {METRICS_FILE}, not a training run directory (or it has not logged yet)")
    return path


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_run_state(run_dir: Path) -> tuple[dict | None, str | None]:
    """The latest checkpoint's ``state.json`` of a run (via ``checkpoints/latest.json``, else the highest
    ``step_*`` folder), or None; the second value explains a state that exists but cannot be read."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return None, None
    candidates = []
    try:
        latest = _read_json(ckpts / "latest.json")
        if isinstance(latest, dict) and isinstance(latest.get("dir"), str):
            candidates.append(ckpts / latest["dir"] / "state.json")
    except (OSError, ValueError):
        pass
    steps = [d for d in ckpts.glob("step_*") if re.fullmatch(r"step_\d+", d.name)]
    candidates += [d / "state.json" for d in sorted(steps, reverse=True)]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            state = _read_json(path)
        except (OSError, ValueError) as exc:
            return None, f"{path} unreadable ({exc})"
        if isinstance(state, dict):
            return state, None
    return None, None


def _append(records: list[dict], record: dict) -> None:
    """Append ``record``; a second line for the last step is merged into it, and a step lower than the last
    one (a resumed run logging again from its checkpoint) drops the records from that step on."""
    step = int(record["step"])
    if records and int(records[-1]["step"]) == step:
        records[-1] = {**records[-1], **record}
        return
    while records and int(records[-1]["step"]) > step:
        records.pop()
    if records and int(records[-1]["step"]) == step:
        records.pop()
    records.append(dict(record))


def load_run(run: str | Path, name: str | None = None) -> RunMetrics:
    """Read a run directory's ``metrics.jsonl`` (or that file itself) and its latest ``state.json``.

    Lines without a ``step`` are header records (merged into ``meta``); lines with ``val_loss`` are
    evaluations, lines with ``loss`` training steps. A last line cut short by a run still writing is
    skipped (and noted). ArtifactError for a missing run directory or metrics file, an invalid line
    (file:line), or a file with no training or validation loss at all.
    """
    run = Path(run)
    path = _metrics_path(run)
    run_dir = path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read ({exc})") from None
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    train: list[dict] = []
    evals: list[dict] = []
    meta: dict = {}
    notes: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last and not text.endswith("\n"):
                notes.append(f"skipped an incomplete last line ({path.name}:{i + 1})")
                continue
            raise ArtifactError(f"{path}:{i + 1}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ArtifactError(f"{path}:{i + 1}: expected a JSON object, got {type(record).__name__}")
        step = record.get("step")
        if step is None:
            meta.update(record)
            continue
        if not _is_number(step) or step != int(step) or step < 0:
            raise ArtifactError(f"{path}:{i + 1}: 'step' must be a non-negative integer, got {step!r}")
        for key in ("loss", "val_loss"):  # numbers, or the strings the trainer writes for NaN and infinity
            value = record.get(key)
            if key in record and not _is_number(value) and str(value).lower() not in ("nan", "inf", "-inf"):
                raise ArtifactError(f"{path}:{i + 1}: '{key}' must be a number, got {value!r}")
        # A line with val_loss is an evaluation; any other is a training step; a line with both is both.
        targets = ([evals] if "val_loss" in record else []) + ([train] if "val_loss" not in record
                                                              or "loss" in record else [])
        for target in targets:
            _append(target, record)
    # The trainer writes NaN/inf as strings (JSON has none); the series skip them, the summary says so.
    bad = next((r for r in train + evals for k in ("loss", "val_loss") if k in r and not _is_finite(r[k])), None)
    if bad is not None:
        notes.append(f"non-finite loss logged at step {bad['step']}")
    if not any("loss" in r for r in train) and not evals:
        raise ArtifactError(f"{path}: no training metrics (no line with a 'loss' or 'val_loss')")
    state, problem = read_run_state(run_dir)
    if problem:
        notes.append(problem)
    label = name or (run_dir.name if run_dir.name else str(run_dir))
    return RunMetrics(path=run_dir, name=label, train=train, evals=evals, meta=meta, state=state, notes=notes)


# --------------------------------------------------------------------------------------------------- summary

@dataclass
class RunSummary:
    """The numbers of one row of the summary table (None where the run did not log them)."""

    name: str
    method: str
    steps: int
    tokens: int | None
    train_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    val_loss_vs_dense: float | None  # (val_loss / dense val_loss) - 1
    ppl_ratio_to_dense: float | None
    flip_peak: float | None
    flip_peak_step: int | None
    flip_final: float | None
    flip_peak_over_final: float | None  # inf when the final flip rate is 0
    is_dense_baseline: bool = False
    mask_refresh_share: float | None = None  # mean share of step time spent on the masks after the update


def method_label(run: RunMetrics) -> str:
    """A short description of how the run was trained: N:M sparsity or dense, INT4 QAT, and the method
    switches found in its training config (e.g. ``2:4, INT4 g128, transposable, mvue``)."""
    state = run.state or {}
    parts = []
    if "sparsity" in state:
        sp = state.get("sparsity")
        parts.append("dense" if sp is None else f"{sp.get('n', '?')}:{sp.get('m', '?')}" if isinstance(sp, dict)
                     else str(sp))
    q = state.get("quantization")
    if isinstance(q, dict):
        parts.append(f"INT{q.get('bits', 4)} g{q.get('group_size', '?')}")
    config = dict(run.meta.get("train_config") or {}) if isinstance(run.meta.get("train_config"), dict) else {}
    if isinstance(state.get("train_config"), dict):
        config.update(state["train_config"])
    for key in sorted(config):
        value = config[key]
        if not any(w in key.lower() for w in _METHOD_WORDS) or value in (None, False, 0, "", "none"):
            continue
        if not _applies(key, config, state):
            continue
        shown = f"{value:g}" if isinstance(value, float) else value
        parts.append(key if value is True else f"{key}={shown}")
    return ", ".join(parts) if parts else "—"


def _applies(key: str, config: dict, state: dict) -> bool:
    """Whether training-config ``key`` shaped this run: the trainer keeps every method's settings (with their
    defaults) in every run's config, so a dense run also carries AST's distillation weights, a from-scratch
    run the gradual schedule's fractions, a run without SLoRB its rank."""
    k = key.lower()
    distilled = bool(config.get("teacher")) or config.get("method") == "ast"
    if k == "teacher" or k.startswith("distill"):
        return distilled
    if state.get("sparsity", "absent") is None:  # a dense run: none of the 2:4 methods ran
        return False
    if k.startswith("prune_"):
        return config.get("schedule") == "gradual"
    if k.startswith("slorb_"):
        return bool(config.get("slorb"))
    return True


def _tokens(run: RunMetrics) -> int | None:
    """Tokens trained on: the last logged ``tokens``, else the checkpoint's ``tokens_seen`` per step (or
    ``batch_size × seq_len`` of its training config) times the last logged step."""
    for r in reversed(run.train):
        if _is_number(r.get("tokens")):
            return int(r["tokens"])
    if not run.train:
        return None
    state = run.state or {}
    seen, at = state.get("tokens_seen"), state.get("step")
    if _is_number(seen) and _is_number(at) and at > 0:
        return round(seen / at * run.last_step)
    config = state.get("train_config")
    if not isinstance(config, dict):
        return None
    b, t = config.get("batch_size"), config.get("seq_len")
    if not (_is_number(b) and _is_number(t)):
        return None
    accum = config.get("grad_accum") or config.get("gradient_accumulation_steps") or 1
    return int(b * t * (accum if _is_number(accum) else 1) * run.last_step)


def _train_config(run: RunMetrics) -> dict:
    """The run's training config: the metrics header's, updated by the latest checkpoint's."""
    config = dict(run.meta["train_config"]) if isinstance(run.meta.get("train_config"), dict) else {}
    state = run.state or {}
    if isinstance(state.get("train_config"), dict):
        config.update(state["train_config"])
    return config


def _data_name(config: dict) -> str:
    data = config.get("data")
    return "the default corpus" if data in (None, "") else str(data)


def _tokenizer_identity(tok):
    """A recorded tokenizer without where it was read from (a Hugging Face tokenizer's ``path`` differs between
    machines and copies of one model directory)."""
    return {k: v for k, v in tok.items() if k != "path"} if isinstance(tok, dict) else tok


def comparison_issues(run: RunMetrics, dense: RunMetrics) -> tuple[list[str], list[str]]:
    """(blocking, caveats) of comparing ``run``'s validation loss with the dense baseline ``dense``.

    Blocking — the two losses are not measured on the same thing, so no ratio is given: different data (the
    checkpoints' ``data_digest``, the sha256 of the token streams; else the configured ``data`` paths),
    different tokenizers (losses per token of different units), or a different validation set (``seq_len``,
    or ``batch_size × eval_batches`` validation windows). Caveats — the ratio is given with a note: a
    different number of training tokens. Only what both runs record is compared."""
    if run is dense:
        return [], []
    rs, ds = run.state or {}, dense.state or {}
    rc, dc = _train_config(run), _train_config(dense)
    blocking: list[str] = []
    r_digest, d_digest = rs.get("data_digest"), ds.get("data_digest")
    if r_digest and d_digest:
        if r_digest != d_digest:
            what = (f"{_data_name(rc)} vs {_data_name(dc)}" if _data_name(rc) != _data_name(dc)
                    else f"{_data_name(rc)}, but its contents differ")
            blocking.append(f"trained and validated on different data ({what})")
    elif "data" in rc and "data" in dc and _data_name(rc) != _data_name(dc):
        blocking.append(f"trained and validated on different data ({_data_name(rc)} vs {_data_name(dc)})")
    r_tok, d_tok = rs.get("tokenizer"), ds.get("tokenizer")
    same_tokens = bool(r_digest) and r_digest == d_digest  # the same token streams: the same tokenization
    if r_tok and d_tok and not same_tokens and _tokenizer_identity(r_tok) != _tokenizer_identity(d_tok):
        blocking.append("different tokenizers (their losses per token are in different units)")
    if _is_number(rc.get("seq_len")) and _is_number(dc.get("seq_len")) and rc["seq_len"] != dc["seq_len"]:
        blocking.append(f"a different validation set (windows of seq_len {rc['seq_len']} vs {dc['seq_len']} "
                        "tokens)")
    else:
        windows = [c.get("batch_size") * c.get("eval_batches") if _is_number(c.get("batch_size"))
                   and _is_number(c.get("eval_batches")) else None for c in (rc, dc)]
        if None not in windows and windows[0] != windows[1]:
            blocking.append(f"a different validation set ({windows[0]} vs {windows[1]} validation windows, "
                            "batch_size x eval_batches)")
    caveats: list[str] = []
    r_tokens, d_tokens = _tokens(run), _tokens(dense)
    if r_tokens is not None and d_tokens is not None and r_tokens != d_tokens:
        caveats.append(f"trained on {_fmt_int(r_tokens)} tokens ({run.last_step} steps), the dense baseline on "
                       f"{_fmt_int(d_tokens)} ({dense.last_step} steps)")
    return blocking, caveats


def summarize_run(run: RunMetrics, dense: RunMetrics | None = None) -> RunSummary:
    """The summary row of ``run``; ratios against ``dense`` when given and comparable
    (:func:`comparison_issues` finds nothing blocking)."""
    _, losses = run.series("loss")
    tail = losses[-TRAIN_LOSS_WINDOW:]
    train_loss = sum(tail) / len(tail) if tail else None
    val_loss, val_ppl = _final_val(run)
    vs_dense = ppl_ratio = None
    if dense is not None and dense is not run and not comparison_issues(run, dense)[0]:
        d_loss, d_ppl = _final_val(dense)
        if val_loss is not None and d_loss:
            vs_dense = val_loss / d_loss - 1.0
        if val_ppl is not None and d_ppl:
            ppl_ratio = val_ppl / d_ppl
    flip_steps, flips = run.series("flip_rate")
    peak = peak_step = final = ratio = None
    if flips:
        i = max(range(len(flips)), key=flips.__getitem__)
        peak, peak_step, final = flips[i], flip_steps[i], flips[-1]
        ratio = peak / final if final > 0 else (math.inf if peak > 0 else None)
    _, shares = run.series("mask_refresh_share")
    return RunSummary(name=run.name, method=method_label(run), steps=run.last_step, tokens=_tokens(run),
                      train_loss=train_loss, val_loss=val_loss, val_ppl=val_ppl, val_loss_vs_dense=vs_dense,
                      ppl_ratio_to_dense=ppl_ratio, flip_peak=peak, flip_peak_step=peak_step, flip_final=final,
                      flip_peak_over_final=ratio, is_dense_baseline=dense is run,
                      mask_refresh_share=_mean_after_first(shares))


def _mean_after_first(values: list[float]) -> float | None:
    """Mean of ``values`` without the first (the first mask refresh also compiles or loads the CPU loops)."""
    rest = values[1:] if len(values) > 1 else values
    return sum(rest) / len(rest) if rest else None


def _final_val(run: RunMetrics) -> tuple[float | None, float | None]:
    """The last finite validation loss and perplexity of the model the run deploys: ``val_loss_sparse`` where
    the trainer logged it (a run that ends dense, e.g. the Hu recipe's fine-tuning or SPDF, whose artifact
    re-applies the last 2:4 masks), else ``val_loss``."""
    for r in reversed(run.evals):
        for suffix in ("_sparse", ""):
            loss = r.get(f"val_loss{suffix}")
            if _is_number(loss) and math.isfinite(loss):
                ppl = r.get(f"val_ppl{suffix}")
                if not _is_number(ppl):
                    ppl = math.exp(loss) if loss < 700 else math.inf
                return float(loss), float(ppl)
    return None, None


def _fmt(v: float | None, spec: str = ".4f") -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "∞"
    return format(v, spec)


def _fmt_int(v: int | None) -> str:
    if v is None:
        return "—"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= size:
            return f"{v / size:.3g}{unit}"
    return str(v)


COLUMNS = ("run", "method", "steps", "tokens", f"train loss (mean of last {TRAIN_LOSS_WINDOW})", "val loss",
           "val ppl", "val loss vs dense", "ppl ratio", "flip rate peak (step)", "flip rate final",
           "flip peak/final", "mask refresh share of step time")


def summary_rows(summaries: Iterable[RunSummary]) -> list[list[str]]:
    """The table cells (strings) of the summary, one list per run, in :data:`COLUMNS` order."""
    rows = []
    for s in summaries:
        name = f"{s.name} (dense baseline)" if s.is_dense_baseline else s.name
        vs = "—" if s.val_loss_vs_dense is None else f"{s.val_loss_vs_dense * 100:+.2f}%"
        peak = "—" if s.flip_peak is None else f"{s.flip_peak:.3g} ({s.flip_peak_step})"
        ratio = "—" if s.flip_peak_over_final is None else (
            "∞" if math.isinf(s.flip_peak_over_final) else f"{s.flip_peak_over_final:.1f}×")
        rows.append([name, s.method, str(s.steps), _fmt_int(s.tokens), _fmt(s.train_loss), _fmt(s.val_loss),
                     _fmt(s.val_ppl, ".2f"), vs, _fmt(s.ppl_ratio_to_dense, ".3f"), peak,
                     _fmt(s.flip_final, ".3g"), ratio,
                     "—" if s.mask_refresh_share is None else f"{s.mask_refresh_share * 100:.1f}%"])
    return rows


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(summaries: list[RunSummary]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in summary_rows(summaries)]
    return "\n".join(lines)


def _notes(runs: list[RunMetrics], dense: RunMetrics | None) -> list[str]:
    notes = []
    if dense is None:
        notes.append("No dense baseline given (--dense RUN_DIR): no ratios to dense.")
    for run in runs:
        notes += [f"{run.name}: {n}" for n in run.notes]
        if dense is not None and run is not dense:
            blocking, caveats = comparison_issues(run, dense)
            if blocking:
                notes.append(f"{run.name}: not compared with the dense baseline {dense.name}: "
                             f"{'; '.join(blocking)}.")
            elif caveats:
                notes.append(f"{run.name}: {'; '.join(caveats)}: the val loss gap to dense also reflects that.")
        if any(_is_number(r.get("val_loss_sparse")) for r in run.evals):
            notes.append(f"{run.name}: ends with dense fine-tuning; its val loss is the 2:4 model the artifact "
                         "holds (val_loss_sparse), not the dense fine-tuned one.")
        if not run.evals:
            notes.append(f"{run.name}: no validation lines logged.")
    return notes


def render_markdown(summaries: list[RunSummary], plots: list[str], notes: list[str]) -> str:
    out = ["# Training report", "", markdown_table(summaries), ""]
    out.append("Val loss vs dense: relative gap of the final validation loss to the dense baseline's. Flip rate: "
               "share of mask entries changed at a refresh (Hu et al., ICML 2024); peak/final ≥ 10× is the "
               "paper's sign of settled masks.")
    out.append("")
    for note in notes:
        out.append(f"- {note}")
    if notes:
        out.append("")
    for plot in plots:
        out += [f"![{plot}]({plot})", ""]
    return "\n".join(out)


def render_html(summaries: list[RunSummary], plots: list[str], notes: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n"
                   for row in summary_rows(summaries))
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    imgs = "".join(f'<p><img src="{html.escape(p)}" alt="{html.escape(p)}" style="max-width:100%"></p>\n'
                   for p in plots)
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>sparsert training report</title>\n"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}td:first-child,td:nth-child(2)"
            "{text-align:left}th{background:#eee}</style></head><body>\n<h1>Training report</h1>\n"
            f"<table><tr>{head}</tr>\n{body}</table>\n<ul>{note_html}</ul>\n{imgs}</body></html>\n")


# --------------------------------------------------------------------------------------------------- plots

def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"sparsert report needs matplotlib for its plots (the 'report' extra): {REPORT_HINT}; "
                          "or pass --no-plots for the summary alone") from None
    return Figure


def _smooth(values: list[float]) -> list[float]:
    """Centred moving average over about 1/40 of the series (odd window, shrinking at the ends): no lag,
    unlike an exponential average."""
    half = max(0, round(len(values) / 80))
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def _png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _style(runs: list[RunMetrics], dense: RunMetrics | None) -> dict[int, dict]:
    """Per-run line style: the dense baseline black, the others the tab10 colours in order."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    styles, k = {}, 0
    for run in runs:
        if run is dense:
            label = run.name if "dense" in run.name.lower() else f"{run.name} (dense)"
            styles[id(run)] = {"color": "black", "label": label}
        else:
            styles[id(run)] = {"color": palette[k % len(palette)], "label": run.name}
            k += 1
    return styles


def plot_loss(runs: list[RunMetrics], dense: RunMetrics | None = None) -> bytes:
    """PNG bytes: training loss (raw, faint; smoothed, solid) and validation loss (dashed, markers) vs step."""
    fig = _figure_class()(figsize=(8, 5))
    ax = fig.add_subplot()
    styles = _style(runs, dense)
    for run in runs:
        st = styles[id(run)]
        steps, losses = run.series("loss")
        if steps:
            ax.plot(steps, losses, color=st["color"], alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(losses), color=st["color"], linewidth=1.6, label=f"{st['label']} train")
        vsteps, vloss = run.series("val_loss", evals=True)
        if vsteps:
            ax.plot(vsteps, vloss, color=st["color"], linestyle="--", marker="o", markersize=3.5, linewidth=1.2,
                    label=f"{st['label']} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("Training and validation loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png_bytes(fig)


def plot_flip_rate(runs: list[RunMetrics], dense: RunMetrics | None = None) -> bytes | None:
    """PNG bytes of the flip rate vs step on a log scale (positive values only), or None when no run
    logged a flip rate."""
    styles = _style(runs, dense)
    series = [(run, *run.series("flip_rate")) for run in runs]
    series = [(run, [s for s, v in zip(st, fr, strict=True) if v > 0], [v for v in fr if v > 0])
              for run, st, fr in series]
    if not any(vals for _, _, vals in series):
        return None
    fig = _figure_class()(figsize=(8, 5))
    ax = fig.add_subplot()
    for run, steps, values in series:
        if not values:
            continue
        s = summarize_run(run)
        ratio = s.flip_peak_over_final
        extra = "" if ratio is None else (" (peak/final ∞)" if math.isinf(ratio) else f" (peak/final {ratio:.1f}×)")
        ax.plot(steps, values, color=styles[id(run)]["color"], marker=".", markersize=3, linewidth=1.2,
                label=styles[id(run)]["label"] + extra)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(r"flip rate $\|m_t - m_{t-1}\|_1 \,/\, D$")
    ax.set_title("Mask flip rate (Hu et al. 2024)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _png_bytes(fig)


def plot_sparsity(runs: list[RunMetrics], dense: RunMetrics | None = None) -> bytes | None:
    """PNG bytes of the pruned share of block-linear weights vs step, or None when no run logged it."""
    styles = _style(runs, dense)
    series = [(run, *run.series("sparsity")) for run in runs]
    if not any(vals for _, _, vals in series):
        return None
    fig = _figure_class()(figsize=(8, 4))
    ax = fig.add_subplot()
    for run, steps, values in series:
        if values:
            ax.step(steps, values, where="post", color=styles[id(run)]["color"], linewidth=1.5,
                    label=styles[id(run)]["label"])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity (share of weights pruned)")
    ax.set_title("Sparsity schedule")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png_bytes(fig)


def plot_router_aux_loss(runs: list[RunMetrics], dense: RunMetrics | None = None) -> bytes | None:
    """PNG bytes of the router load-balancing loss (``router_aux_loss``, unweighted; a mixture-of-experts run
    trained with it) vs step, raw (faint) and smoothed, or None when no run logged it. Perfect balance gives its
    minimum, the number of experts each token is routed to."""
    styles = _style(runs, dense)
    series = [(run, *run.series("router_aux_loss")) for run in runs]
    if not any(values for _, _, values in series):
        return None
    fig = _figure_class()(figsize=(8, 4))
    ax = fig.add_subplot()
    for run, steps, values in series:
        if values:
            color = styles[id(run)]["color"]
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values), color=color, linewidth=1.5, label=styles[id(run)]["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("router load-balancing loss (unweighted)")
    ax.set_title("MoE router load balance (Switch Transformer loss)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png_bytes(fig)


# --------------------------------------------------------------------------------------------------- writing

@dataclass
class Report:
    """What :func:`build_report` wrote: the output folder, the files (in write order) and the rows."""

    out_dir: Path
    files: list[Path]
    runs: list[RunMetrics]
    summaries: list[RunSummary]
    markdown: str
    notes: list[str] = field(default_factory=list)  # the summary's notes (comparability with dense among them)


def _is_artifact_dir(path: Path) -> bool:
    """Whether ``path`` holds a sparsert artifact's ``config.json`` (as ``runtime.artifact.is_artifact_dir``,
    which this module does not import: it would load torch)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == "sparsert-artifact"


def _unique_names(runs: list[RunMetrics]) -> None:
    """Runs whose folder names collide are labelled by their paths as given (``run``, ``other/run``), which
    differ: the same run given twice is refused before (:func:`build_report`)."""
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    for run in runs:
        if seen[run.name] > 1:
            run.name = str(run.path)


def _trained_dense(run: RunMetrics) -> bool | None:
    """Whether ``run`` trained dense (its checkpoint's sparsity or its training config); None if it does not say."""
    state = run.state or {}
    if "sparsity" in state:
        return state["sparsity"] is None
    for source in (state.get("train_config"), run.meta.get("train_config")):
        if isinstance(source, dict) and isinstance(source.get("dense"), bool):
            return source["dense"]
    return None


def build_report(run_dirs: list[str | Path], out_dir: str | Path | None = None, *,
                 dense: str | Path | None = None, plots: bool = True) -> Report:
    """Render the report of ``run_dirs`` into ``out_dir`` (default: ``<run>/report`` for a single run,
    ``./report`` for several). ``dense`` names the dense baseline run (included if not among the runs);
    ratios are taken against it. ``plots=False`` writes only the summaries (no matplotlib needed).
    Errors (missing run, no metrics, invalid line, matplotlib missing) are one-line SparsertErrors, raised
    before anything is written.
    """
    if not run_dirs:
        raise ConfigError("sparsert report: give at least one run directory")
    for value, what in [(r, "RUN_DIR") for r in run_dirs] + [(out_dir, "-o"), (dense, "--dense")]:
        require_path(value, what, f"the path of a {'folder' if what == '-o' else 'training run'}")
    listed = [load_run(r) for r in run_dirs]
    first: dict[Path, RunMetrics] = {}
    for run in listed:
        same = first.setdefault(run.path.resolve(), run)
        if same is not run:
            twice = "is given twice" if str(run.path) == str(same.path) else f"is the same run as {same.path}"
            raise ConfigError(f"RUN_DIR {run.path} {twice}: give each run once")
    runs = list(listed)
    dense_run = None
    if dense is not None:
        dense_path = Path(dense)
        resolved = _metrics_path(dense_path).parent.resolve()
        dense_run = next((r for r in runs if r.path.resolve() == resolved), None)
        if dense_run is None:
            dense_run = load_run(dense_path)
            runs.insert(0, dense_run)
        if _trained_dense(dense_run) is False:
            raise ConfigError(f"--dense {dense}: this run trained sparse; expected a dense baseline run "
                              "(sparsert train --dense)")
    _unique_names(runs)
    if plots:
        _figure_class()  # fail before writing anything
    out = Path(out_dir) if out_dir is not None else (listed[0].path / "report" if len(listed) == 1 else Path("report"))
    inside = next((p for p in (out, *out.resolve().parents) if _is_artifact_dir(p)), None)
    if inside is not None:
        raise ConfigError(f"-o {out} is inside the artifact directory {inside}: refusing to write a report into "
                          "an artifact (choose a folder outside it)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: report output path is a file, expected a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the report directory ({exc.strerror or exc})") from None
    summaries = [summarize_run(r, dense_run) for r in runs]
    files: list[Path] = []
    plot_names: list[str] = []
    notes = _notes(runs, dense_run)
    if plots:
        for fname, render in (("loss.png", plot_loss), ("flip_rate.png", plot_flip_rate),
                              ("sparsity.png", plot_sparsity)):
            data = render(runs, dense_run)
            if data is None:
                _drop_stale(out / fname)
                notes.append(f"{fname} not drawn: no run logged "
                             f"{'a flip rate' if fname.startswith('flip') else 'sparsity'}.")
                continue
            write_atomic(out / fname, data)
            files.append(out / fname)
            plot_names.append(fname)
        router = plot_router_aux_loss(runs, dense_run)  # MoE runs only: no note when absent
        if router is None:
            _drop_stale(out / "router_aux_loss.png")
        else:
            write_atomic(out / "router_aux_loss.png", router)
            files.append(out / "router_aux_loss.png")
            plot_names.append("router_aux_loss.png")
    md = render_markdown(summaries, plot_names, notes)
    write_atomic(out / "summary.md", md.encode("utf-8"))
    write_atomic(out / "summary.html", render_html(summaries, plot_names, notes).encode("utf-8"))
    files += [out / "summary.md", out / "summary.html"]
    return Report(out_dir=out, files=files, runs=runs, summaries=summaries, markdown=md, notes=notes)


def _drop_stale(plot: Path) -> None:
    """Remove a plot an earlier report left in the output directory that this report does not draw, so the folder
    never shows a plot of other runs beside this summary."""
    with contextlib.suppress(FileNotFoundError):
        plot.unlink()


# --------------------------------------------------------------------------------------------------- TensorBoard

def require_tensorboard() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or ConfigError naming the extra when tensorboard is missing."""
    import importlib.util

    missing = ConfigError(f"TensorBoard logging needs the 'tensorboard' package: {TENSORBOARD_HINT}")
    if importlib.util.find_spec("tensorboard") is None:
        raise missing  # checked first: importing torch.utils.tensorboard to find out costs seconds
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise missing from None
    return SummaryWriter


class TensorBoardWriter:
    """Mirror of metrics records as TensorBoard scalars (``torch.utils.tensorboard.SummaryWriter``).

    ``log(record)`` writes every finite numeric field but ``step`` at ``record["step"]``: evaluation fields
    (``val_*``) under ``eval/``, the others under ``train/``. Needs the ``tensorboard`` package; without it
    the constructor raises ConfigError naming the extra. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, log_dir: str | Path) -> None:
        SummaryWriter = require_tensorboard()  # noqa: N806 - a class
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, record: dict, step: int | None = None) -> int:
        """Write the record's scalars; returns how many were written."""
        step = record.get("step") if step is None else step
        if not _is_number(step):
            raise ConfigError(f"TensorBoard record needs an integer 'step', got {step!r}")
        n = 0
        for key, value in record.items():
            if key == "step" or not _is_number(value) or not math.isfinite(value):
                continue
            tag = f"eval/{key}" if key.startswith("val_") else f"train/{key}"
            self._writer.add_scalar(tag, float(value), int(step))
            n += 1
        return n

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def export_tensorboard(run: RunMetrics, log_dir: str | Path) -> Path:
    """Replay a run's records (training and evaluation, in step order) into TensorBoard event files under
    ``log_dir``; returns ``log_dir``."""
    records = sorted(run.train + run.evals, key=lambda r: int(r["step"]))
    with TensorBoardWriter(log_dir) as writer:
        for record in records:
            writer.log(record)
    return Path(log_dir)
