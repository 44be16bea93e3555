"""Backend-neutral autoregressive generation.

Every backend (PyTorch, ONNX Runtime, our GPU runtime) implements the :class:`Stepper` protocol: it keeps
its own KV cache, ``step(ids)`` feeds new token ids after those already fed and returns the logits of the
last position. :func:`generate_ids` runs the same loop on any of them: the prompt is fed in one call
(prefill), then one sampled token per call (decode).

Token choice: greedy (``argmax``, first index on ties) when ``temperature == 0``; otherwise sampling from
``softmax(logits / temperature)`` in float64, restricted to the ``top_k`` largest logits when given, by
inverse CDF with one ``numpy.random.Generator(PCG64(seed)).random()`` draw per token. Because the draws do
not depend on the backend, two backends whose logits agree closely produce the same tokens for one seed.

Context limit: the prompt must be shorter than the stepper's ``max_seq_len``; generation stops early,
returning fewer than ``max_new_tokens`` tokens, when prompt + generated tokens reach ``max_seq_len``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from sparsert.runtime.errors import ConfigError, FormatError
from sparsert.runtime.tokenizer import Tokenizer

MAX_SEED = 2**63 - 1  # the range `sparsert train` and `sparsert compress` accept


@dataclass
class GenerationConfig:
    """Options of :func:`generate_ids`; validated on construction (messages name the CLI flag)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"--max-new-tokens must be a positive integer, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"--temperature must be a finite number >= 0, got {t!r}")
        self.temperature = float(t)
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
            raise ConfigError(f"--top-k must be a positive integer, got {k!r}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise ConfigError(f"--seed must be an integer in [0, 2**63 - 1], got {s!r}")


@runtime_checkable
class Stepper(Protocol):
    """One backend's incremental forward pass.

    ``reset()`` empties the KV cache; ``step(ids)`` feeds ``ids`` (a list of ints, the prompt on the first
    call, then one token per call) at the positions after those already fed and returns the logits of the
    last fed position, shape [V] (numpy array or torch tensor, any float dtype). ``max_seq_len`` is the
    number of positions the backend can hold.
    """

    max_seq_len: int

    def reset(self) -> None: ...

    def step(self, ids: list[int]) -> np.ndarray | torch.Tensor: ...


TORCH_CACHE_START = 256  # positions of TorchStepper's first KV cache; it grows (doubling) up to max_seq_len


class TorchStepper:
    """:class:`Stepper` over a :class:`~sparsert.runtime.model.DecoderLM` with its static KV cache
    (batch 1), on the model's device; the model is put in eval mode.

    The cache starts at ``min(max_seq_len, 256)`` positions and is reallocated (at least doubling, at most
    ``max_seq_len``) when a step needs more, so its memory follows the positions used, not the model's
    ``max_seq_len`` (a long-context config would otherwise allocate its whole cache for a short prompt)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.max_seq_len = model.config.max_seq_len
        self.cache = model.new_cache(1, min(self.max_seq_len, TORCH_CACHE_START))

    def reset(self) -> None:
        self.cache.reset()

    def _reserve(self, positions: int) -> None:
        """Grow the cache to hold ``positions`` (capped at ``max_seq_len``: the model refuses more itself)."""
        old = self.cache
        if positions <= old.max_len or old.max_len >= self.max_seq_len:
            return
        new = self.model.new_cache(1, min(self.max_seq_len, max(positions, 2 * old.max_len)))
        n = old.length
        new.k[:, :, :, :n] = old.k[:, :, :, :n]
        new.v[:, :, :, :n] = old.v[:, :, :, :n]
        new.length = n
        self.cache = new

    @torch.inference_mode()
    def step(self, ids: list[int]) -> torch.Tensor:
        self._reserve(self.cache.length + len(ids))
        device = self.cache.k.device
        input_ids = torch.tensor([list(ids)], dtype=torch.int64, device=device)  # (1, T)
        return self.model(input_ids, cache=self.cache)[0, -1]  # (V,)


def _as_numpy(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().to(device="cpu", dtype=torch.float64).numpy()
    out = np.asarray(logits, dtype=np.float64)
    if out.ndim != 1:
        raise FormatError(f"stepper logits: shape {list(out.shape)}, expected [vocab_size] (the last position only)")
    return out


def choose_token(logits: np.ndarray | torch.Tensor, cfg: GenerationConfig, rng: np.random.Generator) -> int:
    """One next token from last-position logits [V] (see the module docstring for the rule)."""
    z = _as_numpy(logits)
    if np.isnan(z).any() or np.isposinf(z).any():
        bad = int(np.isnan(z).sum() + np.isposinf(z).sum())
        raise FormatError(f"stepper logits: {bad} of {z.size} values are NaN or +inf, expected finite logits "
                          "[vocab_size] (-inf marks a token that may not be chosen)")
    if not np.isfinite(z).any():
        raise FormatError(f"stepper logits: all {z.size} values are -inf: no token may be chosen")
    if cfg.temperature == 0.0:
        return int(np.argmax(z))
    with np.errstate(over="ignore"):  # <= 0 before dividing: a tiny temperature gives -inf, never NaN
        z = (z - z.max()) / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < z.size:
        keep = np.argsort(-z, kind="stable")[: cfg.top_k]
        masked = np.full_like(z, -np.inf)
        masked[keep] = z[keep]
        z = masked
    p = np.exp(z)
    cdf = np.cumsum(p)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), z.size - 1))


def _prompt_ids(prompt_ids: Sequence[int]) -> list[int]:
    """The prompt as a list of ints; a string, a float id or a tensor that is not 1-D integer is a ConfigError."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 1 or prompt_ids.is_floating_point() or prompt_ids.is_complex():
            raise ConfigError(f"prompt ids must be a 1-D integer tensor, got {prompt_ids.dtype} "
                              f"{list(prompt_ids.shape)}")
        return [int(i) for i in prompt_ids.tolist()]
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, (Sequence, np.ndarray)):
        raise ConfigError(f"prompt ids must be a sequence of token ids (ints), got {type(prompt_ids).__name__}")
    out = []
    for i in prompt_ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ConfigError(f"prompt ids must be integers, got {i!r} ({type(i).__name__})")
        out.append(int(i))
    return out


def generate_ids(stepper: Stepper, prompt_ids: Sequence[int], cfg: GenerationConfig,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
    """Generate up to ``cfg.max_new_tokens`` token ids after ``prompt_ids``; returns only the new ids.

    ``on_token`` (optional) is called with each new id as soon as it is chosen (for streaming output).
    Stops early when prompt + generated tokens reach ``stepper.max_seq_len``.
    """
    if not isinstance(cfg, GenerationConfig):
        raise ConfigError(f"generation config must be a GenerationConfig, got {type(cfg).__name__}")
    prompt = _prompt_ids(prompt_ids)
    if not prompt:
        raise ConfigError("prompt is empty")
    limit = stepper.max_seq_len
    if len(prompt) >= limit:
        raise ConfigError(
            f"prompt is {len(prompt)} tokens; the model's context is {limit} tokens, leaving no room to generate"
        )
    rng = np.random.default_rng(cfg.seed)
    stepper.reset()
    logits = stepper.step(prompt)  # prefill
    out: list[int] = []
    while True:
        token = choose_token(logits, cfg, rng)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if len(out) == cfg.max_new_tokens or len(prompt) + len(out) >= limit:
            return out
        logits = stepper.step([token])  # decode one token


def generate_text(stepper: Stepper, tokenizer: Tokenizer, prompt: str, cfg: GenerationConfig) -> str:
    """Generate a continuation of ``prompt``; returns the new text only (the prompt is not repeated)."""
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise ConfigError("prompt is empty")
    return tokenizer.decode(generate_ids(stepper, tokenizer.encode(prompt), cfg))
