"""AST (Adaptive Sparse Trainer): distillation loss, teacher, annealed decay and adaptive masks.

Huang, Hu, Jian, Zhu, Chen, "Pruning Large Language Models with Semi-Structural Adaptive Sparse Training",
AAAI 2025. Its pieces, each usable on its own:

- **Distillation** from the dense model (:func:`distillation_loss`): per token,
  ``L = α·CE(student, targets) + β·T²·KL(p_teacher ‖ p_student)``, ``p = softmax(logits / T)``, ``T = 2``.
  GPT-2 defaults ``α = 0.33, β = 0.67`` (:data:`AST_GPT2`); LLaMA ``CE + 0.5·KL`` (:data:`AST_LLAMA`).
- **Teacher** (:class:`Teacher`): any ``nn.Module`` mapping ``input_ids [B, T]`` to logits ``[B, T, V]`` (a
  dense sparsert :class:`~sparsert.runtime.model.DecoderLM`, or a Hugging Face causal LM, whose output's
  ``.logits`` is taken), frozen and in eval mode. Its vocabulary must equal the student's (ConfigError).
- **Annealed decay** (:func:`annealed_decay`): ``λ(t) = λ_max·t/T_inc`` for ``t < T_inc``, then ``λ_max``
  (GPT-2: ``λ_max = 1e-4``, ``T_inc`` = 10k of 40k steps). Apply it with
  :func:`sparsert.train.masked_decay.apply_masked_decay` (``g += λ(t)·(1 − M) ⊙ W``) — on a boolean
  ``(1 − M)``; the public code's ``~mask`` on an integer tensor is a bug (``~1 == −2``).
- **Adaptive masks** (:class:`AdaptiveMasks`): forward with ``W ⊙ M`` and a plain straight-through gradient,
  ``M`` recomputed from the current dense ``W`` every ``N`` (10) steps as the top-2 of each 4 along K, by
  ``|W_ij|`` or by Wanda's score ``|W_ij|·‖X_j‖₂`` (Sun et al., ICLR 2024) with the input-channel norms
  collected by forward hooks since the previous refresh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsert.runtime.errors import ConfigError, FormatError
from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.transposable_mask import transposable_24_mask
from sparsert.train.masked_decay import masked_modules

__all__ = ["ASTConfig", "AST_GPT2", "AST_LLAMA", "DistillLoss", "distillation_loss", "Teacher", "teacher_vocab_size",
           "check_tokenizers_match", "check_same_tokenizer", "describe_tokenizer", "annealed_decay", "AdaptiveMasks"]


def _number(value: object, field: str, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        want = "a positive number" if positive else "a number >= 0"
        raise ConfigError(f"AST config '{field}': expected {want}, got {value!r}")
    return float(value)


@dataclass
class ASTConfig:
    """AST hyper-parameters (defaults: the paper's GPT-2 runs).

    alpha, beta: weights of cross-entropy and of the ``T²``-scaled KL term. temperature: ``T``.
    decay_max: ``λ_max`` of the annealed masked decay. decay_warmup_steps: ``T_inc``.
    mask_interval: recompute masks every this many optimizer steps. wanda: score masks by ``|W|·‖X‖₂``.
    slorb: add SLoRB terms (:mod:`sparsert.train.slorb`) with group size ``slorb_k``.
    """

    alpha: float = 0.33
    beta: float = 0.67
    temperature: float = 2.0
    decay_max: float = 1e-4
    decay_warmup_steps: int = 10_000
    mask_interval: int = 10
    wanda: bool = False
    slorb: bool = False
    slorb_k: int = 16

    def __post_init__(self) -> None:
        self.alpha = _number(self.alpha, "alpha")
        self.beta = _number(self.beta, "beta")
        if self.alpha == 0 and self.beta == 0:
            raise ConfigError("AST config: alpha and beta are both 0, the loss would be zero")
        self.temperature = _number(self.temperature, "temperature", positive=True)
        self.decay_max = _number(self.decay_max, "decay_max")
        for field in ("decay_warmup_steps", "mask_interval", "slorb_k"):
            v = getattr(self, field)
            low = 0 if field == "decay_warmup_steps" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"AST config '{field}': expected an integer >= {low}, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)


AST_GPT2 = ASTConfig(alpha=0.33, beta=0.67)
AST_LLAMA = ASTConfig(alpha=1.0, beta=0.5)


@dataclass
class DistillLoss:
    """``total = alpha·ce + beta·T²·kl`` (scalars with autograd); ``ce`` and ``kl`` are per-token means."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.33,
    beta: float = 0.67,
    temperature: float = 2.0,
    ignore_index: int = -100,
) -> DistillLoss:
    """AST's loss ``α·CE + β·T²·KL(p_teacher ‖ p_student)``, ``p = softmax(logits / T)``.

    Args:
        student_logits: float [B, T, V] (or [N, V]); teacher_logits: same shape (no gradient taken).
        targets: int64 [B, T] (or [N]); positions equal to ``ignore_index`` count in neither term.
    Returns:
        :class:`DistillLoss`; CE and KL are averaged over the counted positions (KL summed over V).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"distillation: teacher logits {tuple(teacher_logits.shape)} do not match the student's"
            f" {tuple(student_logits.shape)} (vocabularies must be equal)"
        )
    if targets.shape != student_logits.shape[:-1]:
        raise FormatError(f"distillation: targets {tuple(targets.shape)} do not match logits"
                          f" {tuple(student_logits.shape)} ([..., V] vs [...])")
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float()
    t = teacher_logits.detach().reshape(-1, v).float()
    y = targets.reshape(-1)
    valid = y != ignore_index
    count = valid.sum().clamp(min=1)
    ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="sum") / count
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl_tok = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)  # Σ p_t (log p_t − log p_s)
    kl = (kl_tok * valid).sum() / count
    total = alpha * ce + beta * temperature**2 * kl
    return DistillLoss(total=total, ce=ce, kl=kl)


def teacher_vocab_size(module: nn.Module) -> int | None:
    """The vocabulary size a module declares: ``config.vocab_size`` (sparsert and Hugging Face models),
    else the output embedding's / ``lm_head``'s ``out_features``; None when it declares none."""
    config = getattr(module, "config", None)
    v = getattr(config, "vocab_size", None)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    get_out = getattr(module, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else getattr(module, "lm_head", None)
    out = getattr(head, "out_features", None)
    return out if isinstance(out, int) else None


class Teacher:
    """A frozen dense model producing logits for distillation.

    ``Teacher(module, student_vocab_size)``: ``module`` maps ``input_ids`` int64 [B, T] to logits
    [B, T, V] (a tensor, or an object with ``.logits`` such as a Hugging Face ``CausalLMOutput``, or a tuple
    whose first item is the logits). The module is put in eval mode with ``requires_grad_(False)``.
    ConfigError when its declared vocabulary (:func:`teacher_vocab_size`) or the width of its logits differs
    from ``student_vocab_size``.
    """

    def __init__(self, module: nn.Module, student_vocab_size: int) -> None:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"teacher: expected a torch nn.Module returning logits, got {type(module).__name__}")
        self.module = module.eval().requires_grad_(False)
        self.vocab_size = student_vocab_size
        declared = teacher_vocab_size(module)
        if declared is not None and declared != student_vocab_size:
            raise ConfigError(
                f"teacher vocabulary has {declared} tokens but the student's has {student_vocab_size};"
                " distillation needs the same tokenizer"
            )

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher logits float32 [B, T, V] for ``input_ids`` int64 [B, T], no gradient."""
        out: Any = self.module(input_ids)
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(logits, torch.Tensor) or logits.shape[:-1] != input_ids.shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ConfigError(
                f"teacher returned {shape}, expected logits [B, T, V] for input {tuple(input_ids.shape)}"
            )
        if logits.shape[-1] != self.vocab_size:
            raise ConfigError(
                f"teacher produces {logits.shape[-1]} logits per token but the student's vocabulary has"
                f" {self.vocab_size}; distillation needs the same tokenizer"
            )
        return logits.float()


_PROBE_TEXT = "Sparse 2:4 teacher/student tokenizer probe: ÄÖü 東京 1234 \n\t end."


def _tokenizer_kind(tokenizer: Any) -> str:
    """``to_dict()["type"]`` when the tokenizer has one (``"byte"``, ``"hf"``), else its class name."""
    to_dict = getattr(tokenizer, "to_dict", None)
    d = to_dict() if callable(to_dict) else None
    kind = d.get("type") if isinstance(d, dict) else None
    return kind if isinstance(kind, str) else type(tokenizer).__name__


def _hf_vocabulary(tokenizer: Any) -> dict[str, int] | None:
    """The token -> id map of a Hugging Face tokenizer (``tokenizer.hf.get_vocab()``, added tokens included),
    None for other tokenizers."""
    get_vocab = getattr(getattr(tokenizer, "hf", None), "get_vocab", None)
    return dict(get_vocab()) if callable(get_vocab) else None


def check_tokenizers_match(teacher_tokenizer: Any, student_tokenizer: Any, *, name: str = "teacher") -> None:
    """ConfigError unless both tokenizers are the same: same type (``to_dict()["type"]``, else the class), same
    ``vocab_size``, for Hugging Face tokenizers the same vocabulary (every token with the same id; where each
    was loaded from does not matter), and the same ids for a probe text. ``name``: how the message calls the
    first tokenizer's owner (``"teacher tokenizer is of type ..."``)."""
    tk, sk = _tokenizer_kind(teacher_tokenizer), _tokenizer_kind(student_tokenizer)
    if tk != sk:
        raise ConfigError(f"{name} tokenizer is of type {tk!r}, the student's {sk!r}")
    tv, sv = getattr(teacher_tokenizer, "vocab_size", None), getattr(student_tokenizer, "vocab_size", None)
    if tv != sv:
        raise ConfigError(f"{name} tokenizer has vocab_size {tv}, the student's {sv}")
    t_vocab, s_vocab = _hf_vocabulary(teacher_tokenizer), _hf_vocabulary(student_tokenizer)
    if t_vocab != s_vocab:
        if t_vocab is None or s_vocab is None:
            raise ConfigError("the tokenizers differ (only one exposes a Hugging Face vocabulary)")
        token = min(set(t_vocab) ^ set(s_vocab) or {t for t in t_vocab if t_vocab[t] != s_vocab[t]})
        raise ConfigError(f"the tokenizers have different vocabularies (token {token!r}:"
                          f" id {t_vocab.get(token)} vs {s_vocab.get(token)})")
    if list(teacher_tokenizer.encode(_PROBE_TEXT)) != list(student_tokenizer.encode(_PROBE_TEXT)):
        raise ConfigError("the tokenizers encode the same text differently")


def describe_tokenizer(tokenizer: Any) -> str:
    """A tokenizer named for an error message: ``'hf' tokenizer of /abs/dir (300 tokens)``, ``'byte' tokenizer
    (256 tokens)``; a tokenizer without ``to_dict()`` by its class name."""
    kind = _tokenizer_kind(tokenizer)
    name = f"{kind!r} tokenizer" if kind != type(tokenizer).__name__ else kind
    path = getattr(tokenizer, "path", None)
    return f"{name}{f' of {path}' if path is not None else ''} ({getattr(tokenizer, 'vocab_size', '?')} tokens)"


def check_same_tokenizer(other: Any, student_tokenizer: Any, where: str) -> None:
    """:func:`check_tokenizers_match` for the tokenizer of another model (``--teacher``, ``--init-from``): its
    ConfigError says ``where`` and names both tokenizers (:func:`describe_tokenizer`), then the difference."""
    try:
        check_tokenizers_match(other, student_tokenizer, name="its")
    except ConfigError as exc:
        raise ConfigError(f"{where}: its tokenizer, {describe_tokenizer(other)}, differs from the student's, "
                          f"{describe_tokenizer(student_tokenizer)} ({exc})") from None


def annealed_decay(step: int, decay_max: float = 1e-4, warmup_steps: int = 10_000) -> float:
    """AST's decay coefficient at optimizer step ``step``: ``λ_max·step/T_inc`` for ``step < T_inc``, then
    ``λ_max`` (``T_inc = warmup_steps``; 0 means ``λ_max`` from the start)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"annealed decay: step must be a non-negative integer, got {step!r}")
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(decay_max)
    return float(decay_max) * step / warmup_steps


class AdaptiveMasks:
    """Recompute the masks of a model's masked modules from their dense weights every ``interval`` steps.

    ``model``'s masked modules are those with a ``weight`` and a same-shaped ``mask`` tensor (see
    :func:`sparsert.train.masked_decay.masked_modules`), e.g. :class:`~sparsert.train.sparse_linear.SparseLinear`.
    ``pattern="nm"`` keeps the top-``n`` of every ``m`` along K; ``pattern="transposable"`` uses the 2:4
    transposable mask (:func:`sparsert.runtime.transposable_mask.transposable_24_mask`). With ``wanda=True``
    the score is ``|W_ij|·‖X_j‖₂``, ``‖X_j‖₂`` the norm of input channel ``j`` over every token seen by the
    module since the previous refresh (forward hooks, registered by :meth:`attach`).

    Use: ``masks = AdaptiveMasks(model, interval=10, wanda=True).attach()``; after each optimizer step
    ``flip = masks.step(step)`` (None when no refresh was due); ``masks.detach()`` removes the hooks. Forward
    passes inside ``with masks.paused():`` (evaluation) are not counted. :meth:`state_dict` /
    :meth:`load_state_dict` save and restore the statistics gathered since the last refresh, so a resumed run
    computes the same Wanda masks.
    """

    def __init__(self, model: nn.Module, interval: int = 10, n: int = 2, m: int = 4, *, wanda: bool = False,
                 pattern: str = "nm") -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
            raise ConfigError(f"adaptive masks: interval must be a positive integer, got {interval!r}")
        if pattern not in ("nm", "transposable"):
            raise ConfigError(f"adaptive masks: pattern must be 'nm' or 'transposable', got {pattern!r}")
        if pattern == "transposable" and (n, m) != (2, 4):
            raise ConfigError(f"adaptive masks: transposable masks are 2:4 only, got {n}:{m}")
        self.modules = masked_modules(model)
        if not self.modules:
            raise ConfigError("adaptive masks: the model has no module with a weight and a mask (sparsify it first)")
        self.interval, self.n, self.m, self.wanda, self.pattern = interval, n, m, wanda, pattern
        self._sumsq: dict[str, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._pauses = 0
        self.last_flip_rate: float | None = None

    def attach(self) -> AdaptiveMasks:
        """Register the activation-norm hooks (only needed with ``wanda=True``; harmless otherwise)."""
        if self.wanda and not self._hooks:
            for name, module in self.modules.items():
                self._hooks.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, forward passes add nothing to the Wanda statistics (e.g. around evaluation); nests."""
        self._pauses += 1
        try:
            yield
        finally:
            self._pauses -= 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The Wanda statistics since the last refresh: module name -> float32 [K], the sum over every token
        seen of the squared input channel ``x_j²`` (detached copies; modules that saw no token are absent)."""
        return {name: t.detach().clone() for name, t in self._sumsq.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the Wanda statistics with ``state`` (as returned by :meth:`state_dict`). ConfigError, and
        nothing changed, for an unknown module name or an entry that is not a finite, non-negative float
        tensor [K] (K = the module's input features)."""
        restored = {}
        for name, t in state.items():
            module = self.modules.get(name)
            if module is None:
                raise ConfigError(f"adaptive masks: statistics for '{name}', which is not a masked module")
            k = module.weight.shape[1]
            ok = isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) == (k,)
            if not ok or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                what = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ConfigError(f"adaptive masks: statistics for '{name}' must be finite non-negative floats"
                                  f" [{k}], got {what}")
            restored[name] = t.detach().to(device=module.weight.device, dtype=torch.float32).clone()
        self._sumsq = restored

    def _make_hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if self._pauses:
                return
            x = inputs[0].detach()
            sq = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)  # (K,)
            prev = self._sumsq.get(name)
            self._sumsq[name] = sq if prev is None else prev + sq

        return hook

    def activation_norms(self, name: str) -> torch.Tensor:
        """‖X_j‖₂ per input channel of module ``name`` since the last refresh: float32 [K]."""
        if name not in self._sumsq:
            raise ConfigError(
                f"adaptive masks (wanda): no activations recorded for '{name}' since the last refresh;"
                " call attach() and run a forward pass first"
            )
        return self._sumsq[name].sqrt()

    def step(self, step: int) -> float | None:
        """After optimizer step ``step``: refresh when ``step % interval == 0``; returns the flip rate or None."""
        if step % self.interval != 0:
            return None
        return self.refresh()

    @torch.no_grad()
    def refresh(self) -> float:
        """Recompute every mask now. Returns the flip rate (Hu et al. 2024): changed entries / all entries. With
        Wanda, a layer that saw no token since the last refresh gets the magnitude mask."""
        flips = total = 0
        for name, module in self.modules.items():
            w = module.weight.detach()
            score = None
            sumsq = self._sumsq.get(name) if self.wanda else None
            if sumsq is not None and bool((sumsq > 0).any()):
                score = w.abs().float() * sumsq.sqrt().to(w.device)[None, :]
            # else (wanda): no token reached the layer since the last refresh (an MoE expert no token was routed
            # to): its mask comes from |W| alone, as without Wanda, not from a score of zeros
            if self.pattern == "transposable":
                new = transposable_24_mask(w, score=score, name=f"{name}.weight")
            else:
                new = nm_mask(w, self.n, self.m, score=score, name=f"{name}.weight")
            old = module.mask
            flips += int((new != old.bool()).sum())
            total += new.numel()
            old.copy_(new.to(old.dtype))
        self._sumsq.clear()
        self.last_flip_rate = flips / max(total, 1)
        return self.last_flip_rate
