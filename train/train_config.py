"""The training run's configuration: :class:`TrainConfig`, the recipes ``method`` selects
(:data:`METHOD_DEFAULTS`), the checks every field gets, and what a resume compares (:func:`config_differences`).

Defaults are the built-in default run (the README's quickstart); see :mod:`sparsert.train.trainer` for the
methods and the papers behind each switch.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sparsert.runtime.errors import ConfigError
from sparsert.train.ast_distill import ASTConfig, annealed_decay
from sparsert.train.distributed import (  # H11: multi-process training (DDP / FSDP2 under torchrun)
    DEVICES,
    check_mode,
)
from sparsert.train.hf_train import (  # H11: sparsert train --model PATH (Hugging Face causal LMs)
    check_hf_fields,
)
from sparsert.train.masked_decay import DEFAULT_MASKED_DECAY
from sparsert.train.schedules import DEFAULT_DENSE_FINETUNE_FRACTION, SparsitySchedule
from sparsert.train.sparse_linear import SparsityConfig

METHODS = ("sr-ste", "hu", "ast")
# How the Hu recipe's sparse layers run their GEMMs in training: "masked" (dense matmuls on W⊙M in float32, any
# device), "ours" / "cusparselt" (its three 2:4 sparse GEMMs, train/sparse24_training_linear.py, under bf16
# autocast: our kernels — their torch fallback on a CPU — or cuSPARSELt with searched configurations).
SPARSE_GEMMS = ("masked", "ours", "cusparselt")
SCHEDULES = ("from-scratch", "gradual", "spdf")
# Defaults each --method gives the fields left unset (None). SR-STE: Zhou et al. 2021, masks recomputed every
# step as in the original (on the tiny preset a refresh every 10 steps ended 8% above dense, every step within
# a few percent: bench/RESULTS.md). Hu: Hu et al., ICML 2024
# (transposable masks, MVUE24, masked decay 6e-5 on gradients, refresh every 40 steps, dense fine-tuning for the
# last 1/6, FFN linears only). AST: Huang et al., AAAI 2025 (plain STE, adaptive masks, annealed decay;
# distillation from a dense teacher); the paper recomputes masks every 10 steps, but on the tiny preset every
# step ended 1.2% above dense and every 10 steps 4.0% (same teacher, bench/RESULTS.md), as for SR-STE.
METHOD_DEFAULTS: dict[str, dict[str, object]] = {
    "sr-ste": {"transposable": False, "mvue": False, "masked_decay": 0.0, "mask_refresh_interval": 1,
               "dense_finetune": 0.0, "sparse_layers": "all"},
    "hu": {"transposable": True, "mvue": True, "masked_decay": DEFAULT_MASKED_DECAY, "mask_refresh_interval": 40,
           "dense_finetune": DEFAULT_DENSE_FINETUNE_FRACTION, "sparse_layers": "ffn"},
    "ast": {"transposable": False, "mvue": False, "masked_decay": 0.0, "mask_refresh_interval": 1,
            "dense_finetune": 0.0, "sparse_layers": "all"},
}
SRSTE_DECAY = 2e-4
# Path fields compared as resolved absolute paths on resume.
PATH_FIELDS = ("data", "init_from", "teacher", "hf_model")
# Fields that may differ between a run and its resumption: how or where the same training is computed (the
# device and --sparse-gemm change the arithmetic's precision and the random streams, not the recipe).
RESUME_FREE_FIELDS = ("resume", "threads", "out_dir", "progress", "distributed", "device", "sparse_gemm")


@dataclass
class TrainConfig:
    """Everything a training run depends on. The defaults are the built-in default run: the tiny preset on
    the default corpus (Python stdlib sources), 2:4 SR-STE, about 3 to 12 minutes on two CPU cores.

    lr schedule: linear warm-up over ``warmup_steps`` (default 5% of ``steps``), then cosine decay to
    ``min_lr_ratio * lr`` at ``steps``. ``weight_decay`` (AdamW) applies to 2-D weights only.
    ``decay`` is SR-STE's λ; ``mask_refresh_interval`` how often (optimizer steps) masks are recomputed.
    ``qat``: INT4 fake quantization of the kept values, groups of ``group_size`` along K.

    Training methods (issue 3). ``method`` picks a recipe whose defaults fill the fields left None
    (:data:`METHOD_DEFAULTS`): ``"sr-ste"`` (default), ``"hu"`` (Hu et al. 2024: ``transposable`` masks, ``mvue`` weight
    gradients, ``masked_decay`` α on the gradients after clipping, refresh every 40 steps, ``dense_finetune`` = 1/6,
    ``sparse_layers="ffn"``), ``"ast"`` (Huang et al. 2025: distillation from ``teacher`` with ``α·CE + β·T²·KL`` —
    ``distill_alpha``, ``distill_beta``, ``distill_temperature`` —, masks recomputed every step from the dense weights
    (the paper: every 10), optionally by ``wanda_score``, the annealed masked decay ``λ(t)`` rising linearly to
    ``decay_max`` over ``decay_warmup`` steps (default a quarter of ``steps``), and ``slorb`` extra parameters with
    group ``slorb_k``). ``decay`` (SR-STE's λ) defaults to 2e-4 only when no masked decay is on. ``schedule``:
    ``"from-scratch"`` (2:4 from step 1), ``"gradual"`` (dense, then pruning to N:M between the ``prune_start`` and
    ``prune_end`` fractions of training, one event every ``prune_interval`` steps — default 100, or a tenth of the
    window when shorter), ``"spdf"`` (sparse, then dense for the last ``dense_finetune`` fraction, default 1/6).
    ``sparse_gemm`` (:data:`SPARSE_GEMMS`): how the Hu recipe's sparse layers compute in training — matmuls on
    ``W⊙M`` in float32 (``"masked"``), or its three 2:4 GEMMs under bf16 autocast (``"ours"``, ``"cusparselt"``).
    ``init_from``: start from a sparsert checkpoint's weights (and its data order). With ``qat``, ``dense_finetune``
    defaults to 0 and ``sparse_layers`` to ``"all"`` (QAT must train the values the INT4 artifact stores).
    ``eval_interval``/``eval_batches``: validation every that many steps (and at the end) on that many batches.
    ``ckpt_interval``: checkpoint every that many steps (and at the end); ``keep_checkpoints`` newest kept. ``out_dir``:
    default ``runs/<preset>-<variant>-<YYYYmmdd-HHMMSS>`` (:attr:`variant`).
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
    decay: float | None = None
    mask_refresh_interval: int | None = None
    qat: bool = False
    group_size: int = 128
    # --- training methods of issue 3 (H10); None = the method's default (METHOD_DEFAULTS) ---
    method: str = "sr-ste"
    transposable: bool | None = None
    mvue: bool | None = None
    masked_decay: float | None = None
    dense_finetune: float | None = None
    sparse_layers: str | None = None
    keep_dense: tuple[str, ...] = ()  # shell patterns of layer names that train (and stay) dense
    schedule: str = "from-scratch"
    prune_start: float = 0.25
    prune_end: float = 0.75
    prune_interval: int | None = None
    init_from: str | None = None
    teacher: str | None = None
    distill_alpha: float = 0.33
    distill_beta: float = 0.67
    distill_temperature: float = 2.0
    decay_max: float = 1e-4
    decay_warmup: int | None = None
    wanda_score: bool = False
    slorb: bool = False
    slorb_k: int = 16
    sparse_gemm: str = "masked"  # SPARSE_GEMMS
    # --- end of the issue-3 method fields ---
    # --- H11: a local Hugging Face model directory (--model) and multi-process training (--distributed) ---
    hf_model: str | None = None
    # weight of a MoE model's router load-balancing loss; None = the model config's (router_aux_loss_coef when its
    # output_router_logits is true, else 0)
    router_aux_loss: float | None = None
    distributed: str | None = None
    # auto (the GPU when torch sees one) | cpu | cuda; the default comes from $SPARSERT_DEVICE when set
    device: str = field(default_factory=lambda: os.environ.get("SPARSERT_DEVICE") or "auto")
    eval_interval: int = 200
    eval_batches: int = 16
    ckpt_interval: int = 200
    keep_checkpoints: int = 2
    max_data_bytes: int = 8 * 1024 * 1024
    resume: bool = False
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("dense", "qat", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):  # e.g. qat="no" from a hand-written config would be truthy
                raise ConfigError(f"train config '{name}': expected true or false, got {getattr(self, name)!r}")
        if isinstance(self.data, os.PathLike):
            self.data = os.fspath(self.data)
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise ConfigError(f"train config 'data': expected a path to a text file or directory, got {self.data!r}")
        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)
        if self.out_dir is not None and (not isinstance(self.out_dir, str) or not self.out_dir):
            # "" would be the current directory: the run's files would land among whatever is there
            raise ConfigError(f"train config 'out_dir': expected a run directory path, got {self.out_dir!r}")
        self._resolve_method_defaults()
        positive = ("steps", "batch_size", "seq_len", "n", "m", "mask_refresh_interval", "group_size",
                    "eval_interval", "eval_batches", "ckpt_interval", "keep_checkpoints", "max_data_bytes")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps",):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0)
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1, maximum=4096)
        if self.device not in DEVICES:
            raise ConfigError(f"train config 'device': expected one of {', '.join(DEVICES)}, got {self.device!r}")
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
        self._check_methods()
        check_mode(self.distributed)  # H11
        check_hf_fields(self)  # H11

    def _resolve_method_defaults(self) -> None:
        """Fill the fields left None from :data:`METHOD_DEFAULTS` (and the schedule, QAT and step count)."""
        if self.method not in METHODS:
            raise ConfigError(f"train config 'method': expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"train config 'schedule': expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        defaults = dict(METHOD_DEFAULTS["sr-ste" if self.dense else self.method])
        if self.schedule == "spdf" and self.qat:
            raise ConfigError("--schedule spdf ends with dense fine-tuning, which --qat leaves out (the artifact "
                              "holds the INT4 codes QAT trained); use --qat with --schedule from-scratch or gradual")
        if self.schedule == "spdf":
            defaults["dense_finetune"] = DEFAULT_DENSE_FINETUNE_FRACTION
        if self.qat:
            defaults.update(dense_finetune=0.0, sparse_layers="all")
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.decay is None:
            self.decay = SRSTE_DECAY if self.method == "sr-ste" and not self.masked_decay else 0.0
        if self.teacher is None and self.method == "ast" and not self.dense:
            self.teacher = self.init_from
            # not a field (asdict and the resume comparison skip it): only for errors naming the flag given
            self._teacher_from_init = self.init_from is not None
        if self.decay_warmup is None and isinstance(self.steps, int):
            self.decay_warmup = max(self.steps // 4, 0)
        if self.prune_interval is None and isinstance(self.steps, int) and _is_fraction(self.prune_start) \
                and _is_fraction(self.prune_end):
            window = round(self.prune_end * self.steps) - round(self.prune_start * self.steps)
            self.prune_interval = min(100, max(1, window // 10))

    def _check_sparse_gemm(self) -> None:
        """``--sparse-gemm ours|cusparselt`` runs the Hu recipe's sparse GEMMs: what they cannot train is refused."""
        if self.sparse_gemm == "masked":
            return
        flag = f"--sparse-gemm {self.sparse_gemm}"
        if self.method != "hu" or not (self.transposable and self.mvue):
            raise ConfigError(f"{flag} runs the three 2:4 GEMMs of the Hu et al. recipe: it needs --method hu with "
                              "its transposable masks and MVUE24 gradients (--transposable --mvue)")
        if self.qat:
            raise ConfigError(f"{flag} multiplies the 2:4 values as they are; --qat trains fake-quantized ones: "
                              "use --sparse-gemm masked with --qat")
        if self.schedule == "gradual":
            raise ConfigError(f"{flag} needs 2:4 masks from the first sparse step; --schedule gradual prunes "
                              "through denser masks first: use --schedule from-scratch or spdf")
        if self.distributed == "fsdp":
            raise ConfigError(f"{flag} is not supported with --distributed fsdp (not tested with sharded "
                              "parameters); use --distributed ddp")

    def _check_methods(self) -> None:
        for name in ("transposable", "mvue", "wanda_score", "slorb"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"train config '{name}': expected true or false, got {getattr(self, name)!r}")
        for name, positive in (("masked_decay", False), ("distill_alpha", False), ("distill_beta", False),
                               ("distill_temperature", True), ("decay_max", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    value < 0 or (positive and value == 0):
                raise ConfigError(f"train config '{name}': expected a number {'>' if positive else '>='} 0, "
                                  f"got {value!r}")
        for name in ("dense_finetune", "prune_start", "prune_end"):
            if not _is_fraction(getattr(self, name)):
                raise ConfigError(f"train config '{name}': expected a fraction in [0, 1], got {getattr(self, name)!r}")
        _check_int("decay_warmup", self.decay_warmup, minimum=0)
        _check_int("prune_interval", self.prune_interval, minimum=1)
        _check_int("slorb_k", self.slorb_k, minimum=1)
        if not isinstance(self.keep_dense, (list, tuple)) or not all(isinstance(p, str) and p for p in self.keep_dense):
            raise ConfigError(f"train config 'keep_dense': expected a list of layer name patterns, got "
                              f"{self.keep_dense!r}")
        self.keep_dense = tuple(sorted(set(self.keep_dense)))  # the order of the patterns does not matter
        if self.sparse_layers not in ("all", "ffn"):
            raise ConfigError(f"train config 'sparse_layers': expected 'all' or 'ffn', got {self.sparse_layers!r}")
        if self.sparse_gemm not in SPARSE_GEMMS:
            raise ConfigError(f"train config 'sparse_gemm': expected one of {', '.join(SPARSE_GEMMS)}, got "
                              f"{self.sparse_gemm!r}")
        for name in PATH_FIELDS[1:]:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"train config '{name}': expected a path, got {value!r}")
        if self.dense:
            used = [name for name, on in (
                ("method", self.method != "sr-ste"), ("transposable", self.transposable), ("mvue", self.mvue),
                ("masked_decay", self.masked_decay > 0), ("dense_finetune", self.dense_finetune > 0),
                ("sparse_layers", self.sparse_layers != "all"), ("keep_dense", bool(self.keep_dense)),
                ("schedule", self.schedule != "from-scratch"),
                ("teacher", self.teacher is not None), ("wanda_score", self.wanda_score), ("slorb", self.slorb),
                ("sparse_gemm", self.sparse_gemm != "masked"),
            ) if on]
            if used:
                raise ConfigError(f"train config '{used[0]}' applies to sparse training; it cannot be combined "
                                  "with --dense")
            return
        if self.transposable and (self.n, self.m) != (2, 4):
            raise ConfigError(f"--transposable masks are 2:4 only, got --sparsity {self.n}:{self.m}")
        self._check_sparse_gemm()
        if self.dense_finetune >= 1:
            raise ConfigError("train config 'dense_finetune': expected a fraction below 1 (no sparse phase is left)")
        if self.schedule == "spdf" and self.dense_finetune == 0:
            raise ConfigError("--schedule spdf is sparse training followed by dense fine-tuning; train config "
                              "'dense_finetune' 0 leaves none, which is --schedule from-scratch: use that, or a "
                              "fraction above 0")
        if self.method == "ast" and self.masked_decay > 0:
            raise ConfigError("--masked-decay is the Hu recipe's constant decay; AST decays with the annealed "
                              "--decay-max/--decay-warmup")
        if self.decay > 0 and (self.masked_decay > 0 or (self.method == "ast" and self.decay_max > 0)):
            raise ConfigError("--decay (SR-STE's λ) and the masked decay both decay the pruned weights; set one of "
                              "them to 0")
        if self.qat and self.dense_finetune > 0:
            raise ConfigError("--qat trains the INT4 values of the 2:4 artifact; dense fine-tuning (--dense-finetune) "
                              "would train other values, so it cannot be combined with --qat")
        if self.qat and self.some_layers_dense:
            raise ConfigError("--qat trains the INT4 values of the 2:4 artifact, which stores every block linear 2:4; "
                              "use --sparse-layers all and no --keep-dense with --qat")
        if self.slorb and (self.schedule != "from-scratch" or self.dense_finetune > 0 or self.some_layers_dense):
            raise ConfigError("--slorb adds AST's SLoRB terms to layers that train 2:4 from the first step to the "
                              "last; it needs --schedule from-scratch, --dense-finetune 0, --sparse-layers all and "
                              "no --keep-dense")
        if self.distill_alpha == 0 and self.distill_beta == 0:
            raise ConfigError("--distill-alpha and --distill-beta are both 0: the loss would be zero")
        if self.method == "ast" and self.distill_beta > 0 and self.teacher is None:
            raise ConfigError("--method ast distils from a dense teacher: give --teacher PATH (a dense sparsert run or "
                              "checkpoint, or a Hugging Face model directory) or --init-from (then used as the "
                              "teacher), or --distill-beta 0")
        try:
            self.sparsity_schedule()
        except ConfigError as exc:  # worded with this config's fields (the CLI shows them as --prune-start, ...)
            text = str(exc).replace("sparsity schedule '", "train config '")  # a field: named as ours
            text = text.replace("sparsity schedule", "train config schedule")
            raise ConfigError(text.replace("'dense_finetune_fraction'", "'dense_finetune'")) from None

    def sparsity_schedule(self) -> SparsitySchedule:
        """The :class:`SparsitySchedule` of this run (``from_scratch`` with optional dense fine-tuning, ``spdf``
        or ``gradual``)."""
        kind = {"from-scratch": "from_scratch", "gradual": "gradual", "spdf": "spdf"}[self.schedule]
        return SparsitySchedule(kind=kind, n=self.n, m=self.m, prune_start=self.prune_start, prune_end=self.prune_end,
                                prune_interval=self.prune_interval, dense_finetune_fraction=self.dense_finetune)

    def ast_config(self) -> ASTConfig:
        """The AST hyper-parameters of this run (:class:`~sparsert.train.ast_distill.ASTConfig`)."""
        return ASTConfig(alpha=self.distill_alpha, beta=self.distill_beta, temperature=self.distill_temperature,
                         decay_max=self.decay_max, decay_warmup_steps=self.decay_warmup,
                         mask_interval=self.mask_refresh_interval, wanda=self.wanda_score, slorb=self.slorb,
                         slorb_k=self.slorb_k)

    @property
    def some_layers_dense(self) -> bool:
        """True when some block linears train dense: ``--sparse-layers ffn`` or a ``--keep-dense`` pattern."""
        return self.sparse_layers != "all" or bool(self.keep_dense)

    @property
    def distills(self) -> bool:
        """True when the loss distils from a teacher (a teacher is set and ``distill_beta > 0``)."""
        return not self.dense and self.teacher is not None and self.distill_beta > 0

    def masked_decay_at(self, step: int) -> float:
        """Masked-decay coefficient applied to the gradients at optimizer step ``step``: AST's annealed
        ``λ(t)``, else the constant ``masked_decay`` (0 = off; always 0 for a dense run)."""
        if self.dense:
            return 0.0
        if self.method == "ast":
            return annealed_decay(step, self.decay_max, self.decay_warmup)
        return float(self.masked_decay)

    @property
    def variant(self) -> str:
        if self.dense:
            return "dense"
        method = "" if self.method == "sr-ste" else f"-{self.method}"
        return f"sparse{self.n}{self.m}{method}" + ("-int4" if self.qat else "")

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def to_dict(self) -> dict:
        """The fields as JSON values (``keep_dense`` as a list), as the run's config.json and checkpoints hold them."""
        return {**asdict(self), "keep_dense": list(self.keep_dense)}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"train config: unknown field '{unknown[0]}'")
        return cls(**d)


def _is_fraction(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def _check_int(name: str, value: object, minimum: int, maximum: int = 2**63 - 1) -> None:
    """``maximum``: by default the int64 range torch takes (seeds, sizes); beyond it torch fails deep inside."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"train config '{name}': expected {what}, got {value!r}")
    if value > maximum:
        raise ConfigError(f"train config '{name}': expected {what} of at most {maximum}, got {value!r}")


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
                          qat_group_size=cfg.group_size if cfg.qat else None, transposable=cfg.transposable,
                          mvue=cfg.mvue)


def sparsity_record(cfg: TrainConfig) -> dict | None:
    """The ``sparsity`` entry of a checkpoint's ``state.json`` for ``cfg`` (the trainer adds ``layers``);
    None for a dense run."""
    if sparsity_config(cfg) is None:
        return None
    return {"n": cfg.n, "m": cfg.m, "method": cfg.method, "decay": cfg.decay,
            "mask_refresh_interval": cfg.mask_refresh_interval, "transposable": cfg.transposable, "mvue": cfg.mvue,
            "masked_decay": cfg.masked_decay, "schedule": cfg.schedule, "dense_finetune": cfg.dense_finetune}


def quantization_record(cfg: TrainConfig) -> dict | None:
    """The ``quantization`` entry of a checkpoint's ``state.json`` for ``cfg``; None without QAT."""
    return {"bits": 4, "group_size": cfg.group_size, "method": "qat"} if cfg.qat else None


def record_differences(state: dict, cfg: TrainConfig) -> list[str]:
    """``entry.key: recorded X, train_config Y`` wherever a checkpoint's ``sparsity`` / ``quantization``
    records disagree with the ``train_config`` beside them (keys an older checkpoint lacks are not compared).
    Both are written from one config, so a difference means the file was edited or damaged."""
    out = []
    for entry, expected in (("sparsity", sparsity_record(cfg)), ("quantization", quantization_record(cfg))):
        if entry not in state:
            continue
        recorded = state[entry]
        if (recorded is None) != (expected is None) or (recorded is not None and not isinstance(recorded, dict)):
            out.append(f"{entry}: recorded {_summary(entry, recorded)}, train_config {_summary(entry, expected)}")
            continue
        for key, value in (expected or {}).items():
            if key in recorded and recorded[key] != value:
                out.append(f"{entry}.{key}: recorded {recorded[key]!r}, train_config {value!r}")
    return out


def _summary(entry: str, record: object) -> str:
    if record is None:
        return "dense" if entry == "sparsity" else "none"
    if not isinstance(record, dict):
        return repr(record)
    if entry == "sparsity":
        return f"{record.get('n')}:{record.get('m')}"
    return f"INT{record.get('bits')} group {record.get('group_size')}"


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """``field: saved -> current`` for every field that matters to the computation and differs."""
    out = []
    for f in fields(TrainConfig):
        if f.name in RESUME_FREE_FIELDS:
            continue
        a, b = getattr(saved, f.name), getattr(current, f.name)
        if f.name in PATH_FIELDS and a is not None and b is not None:
            a, b = str(Path(a).resolve()), str(Path(b).resolve())
        if a != b:
            out.append(f"{f.name}: {a!r} -> {b!r}")
    return out


