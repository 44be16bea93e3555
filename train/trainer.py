"""The training loop: 2:4 SR-STE (optionally INT4 QAT) or dense, with metrics, checkpoints and resume.

``train(TrainConfig(...)) -> TrainResult``. One run lives in one directory::

    <run_dir>/metrics.jsonl        one line per step and per evaluation (sparsert.train.metrics)
    <run_dir>/checkpoints/...      atomic checkpoints (sparsert.train.checkpoint), the newest two kept
    <run_dir>/artifact/            the compressed 2:4(+INT4) artifact, written at the end

Method: the block linears become :class:`~sparsert.train.sparse_linear.SparseLinear` layers trained with SR-STE
(Zhou et al., ICLR 2021) — forward with ``W ⊙ mask``, straight-through gradient plus ``λ (1 − mask) ⊙ W`` —
with masks recomputed from |W| every ``mask_refresh_interval`` optimizer steps and the flip rate of Hu et al.
(ICML 2024) logged at each refresh. With ``qat`` the kept values are fake-quantized to INT4 (groups along K)
in the forward pass, so the artifact holds exactly the weights the model was trained and evaluated with.
``dense`` trains the same model without masks (the baseline). AdamW (Loshchilov & Hutter 2019) with linear
warm-up and cosine decay, global gradient-norm clipping.

Resume (``resume=True``) restores model, masks, optimizer, step and the data sampler's RNG, truncates the
metrics log back to the checkpoint, and continues bit for bit as if never stopped. The architecture comes
from the checkpoint; a config that differs from the checkpoint's is refused with the list of differences.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sparsert.runtime.errors import ArtifactError, ConfigError, SparsertError
from sparsert.runtime.model import DecoderLM, ModelConfig, model_config_from_preset
from sparsert.runtime.tokenizer import ByteTokenizer
from sparsert.train.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from sparsert.train.data import TokenData, load_corpus
from sparsert.train.metrics import METRICS_FILE, MetricsLog
from sparsert.train.sparse_linear import SparsityConfig
from sparsert.train.sparsify import mask_sparsity, refresh_masks, sparsify_model

RUNS_DIR = "runs"
# Fields that may differ between a run and its resumption (they do not change what is computed).
RESUME_FREE_FIELDS = ("resume", "threads", "out_dir", "progress")


class TrainingDivergedError(SparsertError):
    """The loss or the gradient became non-finite; training stopped without writing a checkpoint."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. The defaults are the built-in default run: the tiny preset on
    the default corpus (Python stdlib sources), 2:4 SR-STE, about three minutes on two CPU cores.

    lr schedule: linear warm-up over ``warmup_steps`` (default 5% of ``steps``), then cosine decay to
    ``min_lr_ratio * lr`` at ``steps``. ``weight_decay`` (AdamW) applies to 2-D weights only.
    ``decay`` is SR-STE's λ; ``mask_refresh_interval`` how often (optimizer steps) masks are recomputed.
    ``qat``: INT4 fake quantization of the kept values, groups of ``group_size`` along K.
    ``eval_interval``/``eval_batches``: validation every that many steps (and at the end) on that many
    batches. ``ckpt_interval``: checkpoint every that many steps (and at the end); ``keep_checkpoints`` newest
    kept. ``out_dir``: default ``runs/<preset>-<sparse24|sparse24-int4|dense>-<YYYYmmdd-HHMMSS>``.
    """

    preset: str = "tiny"
    arch: str | None = None
    data: str | None = None
    out_dir: str | None = None
    steps: int = 1200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    dense: bool = False
    n: int = 2
    m: int = 4
    decay: float = 2e-4
    mask_refresh_interval: int = 10
    qat: bool = False
    group_size: int = 128
    eval_interval: int = 200
    eval_batches: int = 16
    ckpt_interval: int = 200
    keep_checkpoints: int = 2
    max_data_bytes: int = 8 * 1024 * 1024
    resume: bool = False
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "n", "m", "mask_refresh_interval", "group_size",
                    "eval_interval", "eval_batches", "ckpt_interval", "keep_checkpoints", "max_data_bytes")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps",):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0)
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        for name, lo, lo_ok in (("lr", 0.0, False), ("weight_decay", 0.0, True), ("grad_clip", 0.0, False),
                                ("decay", 0.0, True), ("min_lr_ratio", 0.0, True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    value < lo or (value == lo and not lo_ok):
                bound = ">=" if lo_ok else ">"
                raise ConfigError(f"train config '{name}': expected a number {bound} {lo:g}, got {value!r}")
        if self.min_lr_ratio > 1:
            raise ConfigError(f"train config 'min_lr_ratio': expected a number in [0, 1], got {self.min_lr_ratio}")
        if not self.n < self.m:
            raise ConfigError(f"train config sparsity: N:M needs 0 < N < M, got {self.n}:{self.m}")
        if self.dense and self.qat:
            raise ConfigError("--qat trains the INT4 values of the sparse model; it cannot be combined with --dense")
        if self.qat and self.group_size % self.m:
            raise ConfigError(f"train config 'group_size': {self.group_size} must be a multiple of M={self.m}")

    @property
    def variant(self) -> str:
        if self.dense:
            return "dense"
        return f"sparse{self.n}{self.m}" + ("-int4" if self.qat else "")

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"train config: unknown field '{unknown[0]}'")
        return cls(**d)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"train config '{name}': expected {what}, got {value!r}")


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    step: int
    final_val_loss: float
    final_val_ppl: float
    checkpoint: Path
    artifact: Path | None
    elapsed_s: float


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine to min_lr_ratio·lr."""
    warm = cfg.warmup()
    if step <= warm:
        return cfg.lr * step / max(warm, 1)
    progress = min(1.0, (step - warm) / max(cfg.steps - warm, 1))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def sparsity_config(cfg: TrainConfig) -> SparsityConfig | None:
    if cfg.dense:
        return None
    return SparsityConfig(n=cfg.n, m=cfg.m, decay=cfg.decay, mask_refresh_interval=cfg.mask_refresh_interval,
                          qat_group_size=cfg.group_size if cfg.qat else None)


def build_model(model_config: ModelConfig, cfg: TrainConfig) -> nn.Module:
    """A fresh DecoderLM (seeded by ``cfg.seed``), its block linears sparsified unless ``cfg.dense``."""
    torch.manual_seed(cfg.seed)
    model = DecoderLM(model_config)
    scfg = sparsity_config(cfg)
    if scfg is not None:
        sparsify_model(model, scfg)
    return model


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (norm weights, biases and nothing else undecayed)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class StepResult:
    """Outcome of :func:`train_step`: the loss before the update, the gradient norm before clipping (nan
    when the loss was not finite) and the flip rate when masks were refreshed (else None)."""

    loss: float
    grad_norm: float
    flip_rate: float | None


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               step: int, lr: float, grad_clip: float, sparse: bool) -> StepResult:
    """One optimizer step on a batch (x, y int64 [B, T]): cross-entropy, backward, global-norm clipping,
    AdamW update, then the masks due at ``step`` refreshed (``sparse``). Stops before touching the weights
    when the loss or the gradient norm is not finite (the caller decides what to do)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        return StepResult(loss_value, float("nan"), None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if not math.isfinite(grad_norm):
        return StepResult(loss_value, grad_norm, None)
    optimizer.step()
    flip = refresh_masks(model, step) if sparse else None
    return StepResult(loss_value, grad_norm, flip)


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, batch_size: int, seq_len: int, max_batches: int) -> float:
    """Mean validation cross-entropy (nats/token) over the fixed validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data.val_batches(batch_size, seq_len, max_batches):
        logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1)


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """``field: saved -> current`` for every field that matters to the computation and differs."""
    out = []
    for f in fields(TrainConfig):
        if f.name in RESUME_FREE_FIELDS:
            continue
        a, b = getattr(saved, f.name), getattr(current, f.name)
        if f.name == "data" and a is not None and b is not None:
            a, b = str(Path(a).resolve()), str(Path(b).resolve())
        if a != b:
            out.append(f"{f.name}: {a!r} -> {b!r}")
    return out


def load_train_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run was started with (from its latest checkpoint), with ``resume=True`` and
    ``out_dir`` set to ``run_dir`` — ready to pass to :func:`train` to continue it."""
    ckpt = load_checkpoint(run_dir, load_optimizer=False)
    return _saved_config(ckpt, run_dir)


def _saved_config(ckpt: Checkpoint, run_dir: str | Path) -> TrainConfig:
    try:
        saved = TrainConfig.from_dict(ckpt.state.get("train_config") or {})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{ckpt.path}/state.json: train_config is not a valid training config ({exc})") from None
    return dataclasses.replace(saved, resume=True, out_dir=str(run_dir))


def find_resume_dir(cfg: TrainConfig) -> Path:
    """The run to resume: ``cfg.out_dir``, or the newest ``runs/<preset>-<variant>-*`` with a checkpoint."""
    if cfg.out_dir is not None:
        return Path(cfg.out_dir)
    candidates = sorted(Path(RUNS_DIR).glob(f"{cfg.preset}-{cfg.variant}-*"))
    candidates = [p for p in candidates if list_checkpoints(p / "checkpoints")]
    if not candidates:
        raise ConfigError(
            f"--resume: no run of preset '{cfg.preset}' ({cfg.variant}) with a checkpoint under {RUNS_DIR}/; "
            "pass the run directory with --out"
        )
    return candidates[-1]


def _new_run_dir(cfg: TrainConfig) -> Path:
    if cfg.out_dir is not None:
        run_dir = Path(cfg.out_dir)
        if (run_dir / "checkpoints" / "latest.json").exists():
            raise ConfigError(
                f"{run_dir} already holds a training run; continue it with --resume or choose another --out"
            )
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(RUNS_DIR) / f"{cfg.preset}-{cfg.variant}-{stamp}"
    run_dir, i = base, 1
    while run_dir.exists():
        run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    return run_dir


def _rng_to_str(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _restore_rng(set_state, s: object, where: str) -> None:  # noqa: ANN001 - Generator.set_state or torch's
    try:
        set_state(torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8).clone())
    except (ValueError, TypeError, RuntimeError):
        raise ArtifactError(f"{where}: the saved RNG state is missing or invalid") from None


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as ``cfg`` says; see the module docstring. Returns the run's results.

    Raises ConfigError/DataError before anything is written for bad configs or data; ArtifactError for a
    corrupt checkpoint on resume; TrainingDivergedError (naming the step) when the loss turns non-finite.
    KeyboardInterrupt propagates after saying where the last complete checkpoint is and how to resume.
    """
    t_start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    ckpt: Checkpoint | None = None
    if cfg.resume:
        run_dir = find_resume_dir(cfg)
        ckpt = load_checkpoint(run_dir)
        saved = _saved_config(ckpt, run_dir)
        diffs = config_differences(saved, cfg)
        if diffs:
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from its checkpoint's ({'; '.join(diffs)}); "
                "resume without those options, or start a new run"
            )
        model_config = ckpt.model_config
    else:
        model_config = model_config_from_preset(cfg.preset, cfg.arch)
        run_dir = None
    if cfg.seq_len > model_config.max_seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}")

    tokenizer = ByteTokenizer()
    data = TokenData.from_corpus(load_corpus(cfg.data, max_bytes=cfg.max_data_bytes), tokenizer)
    # Fail now (DataError), before anything is written, if a split is too short for seq_len.
    data.get_batch("train", 1, cfg.seq_len, generator=torch.Generator())
    next(iter(data.val_batches(1, cfg.seq_len, 1)))

    model = build_model(model_config, cfg)  # FormatError here for a K the sparsity/group size does not fit
    optimizer = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start_step = 0
    metrics_offset = None
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        restore_optimizer(optimizer, model, ckpt)
        where = f"{ckpt.path}/state.json"
        _restore_rng(gen.set_state, ckpt.state.get("data_rng"), where)
        _restore_rng(torch.set_rng_state, ckpt.state.get("torch_rng"), where)
        start_step = ckpt.step
        metrics_offset = int(ckpt.state.get("metrics_offset", 0))
    else:
        run_dir = _new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.out_dir is None:
        cfg = dataclasses.replace(cfg, out_dir=str(run_dir))
    if cfg.data is not None:
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))

    scfg = sparsity_config(cfg)
    base_state = {
        "model_config": model_config.to_dict(),
        "train_config": cfg.to_dict(),
        "sparsity": None if scfg is None else {"n": cfg.n, "m": cfg.m, "method": "sr-ste", "decay": cfg.decay,
                                               "mask_refresh_interval": cfg.mask_refresh_interval},
        "quantization": {"bits": 4, "group_size": cfg.group_size, "method": "qat"} if cfg.qat else None,
        "tokenizer": tokenizer.to_dict(),
    }
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last_ckpt: Path | None = ckpt.path if ckpt is not None else None
    last_ckpt_step = start_step if ckpt is not None else None
    val_loss = float("nan")
    sparsity = mask_sparsity(model)
    step = start_step
    last_flip: float | None = None

    def checkpoint(at: int) -> None:
        nonlocal last_ckpt, last_ckpt_step
        state = dict(base_state, data_rng=_rng_to_str(gen.get_state()), torch_rng=_rng_to_str(torch.get_rng_state()),
                     metrics_offset=metrics.offset(), tokens_seen=at * tokens_per_step)
        last_ckpt = save_checkpoint(run_dir, at, model, optimizer, state, keep=cfg.keep_checkpoints)
        last_ckpt_step = at

    # A fresh run starts a new log (a run interrupted before its first checkpoint may have left one).
    metrics = MetricsLog(run_dir / METRICS_FILE, truncate_to=0 if ckpt is None else metrics_offset)
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress, unit="step", dynamic_ncols=True,
               desc=f"train {cfg.variant}", file=sys.stderr)
    try:
        _say(f"run: {run_dir}" + (f" (resumed at step {start_step})" if ckpt is not None else ""))
        model.train()
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(cfg, step)
            x, y = data.get_batch("train", cfg.batch_size, cfg.seq_len, generator=gen)
            out = train_step(model, optimizer, x, y, step=step, lr=lr, grad_clip=cfg.grad_clip,
                             sparse=scfg is not None)
            for what, value in (("loss", out.loss), ("gradient norm", out.grad_norm)):
                if not math.isfinite(value):
                    raise TrainingDivergedError(_diverged_message(what, value, step, last_ckpt, last_ckpt_step))
            loss_value, flip = out.loss, out.flip_rate
            if flip is not None:
                sparsity = mask_sparsity(model)
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_step / dt,
                      "sparsity": sparsity}
            if flip is not None:
                record["flip_rate"] = flip
            metrics.write(record)
            postfix = {"loss": f"{loss_value:.3f}", "tok/s": f"{tokens_per_step / dt:,.0f}"}
            last_flip = flip if flip is not None else last_flip
            if last_flip is not None:
                postfix["flip"] = f"{last_flip:.4f}"  # the latest refresh's
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                val_loss = evaluate(model, data, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
                metrics.write({"step": step, "val_loss": val_loss, "val_ppl": _ppl(val_loss)})
                _say(f"step {step}: val loss {val_loss:.4f} (ppl {_ppl(val_loss):.2f})")
            if step % cfg.ckpt_interval == 0 or step == cfg.steps:
                checkpoint(step)
    except KeyboardInterrupt:
        bar.close()
        metrics.close()
        if last_ckpt is None:
            _say(f"interrupted at step {step}: no checkpoint was written yet, nothing to resume")
        else:
            _say(f"interrupted at step {step}: the last complete checkpoint is step {last_ckpt_step} ({last_ckpt}); "
                 f"resume with: sparsert train --resume --out {run_dir}")
        raise
    finally:
        bar.close()
        metrics.close()

    if math.isnan(val_loss):
        # Resumed a run that had already finished: nothing trained, evaluate the final weights.
        val_loss = evaluate(model, data, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    artifact: Path | None = None
    note = ""
    if cfg.dense or (cfg.n, cfg.m) == (2, 4):
        from sparsert.train.compress import compress_checkpoint

        artifact = compress_checkpoint(last_ckpt, run_dir / "artifact",
                                       int4_group_size=cfg.group_size if cfg.qat else None)
        note = " (dense weights pruned one-shot to 2:4 by magnitude)" if cfg.dense else ""
    elapsed = time.perf_counter() - t_start
    print(f"final val loss {val_loss:.4f} (ppl {_ppl(val_loss):.2f}) after {cfg.steps} steps, {elapsed:.0f} s")
    print(f"checkpoint: {last_ckpt}")
    if artifact is not None:
        print(f"artifact{note}: {artifact}")
    else:
        print(f"no artifact: the compressed format stores 2:4 sparsity, this run trained {cfg.n}:{cfg.m}")
    return TrainResult(run_dir, cfg.steps, val_loss, _ppl(val_loss), last_ckpt, artifact, elapsed)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 80.0))


def _diverged_message(what: str, value: float, step: int, last: Path | None, last_step: int | None) -> str:
    keep = (f"the last good checkpoint is step {last_step} ({last})" if last is not None
            else "no checkpoint had been written")
    return f"{what} became {value} at step {step}; training stopped and {keep}. Try a lower --lr"
