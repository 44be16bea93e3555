"""A ``transformers`` causal LM behind the :class:`~sparsert.runtime.generate.Stepper` protocol.

:class:`HFStepper` feeds token ids to the model with its own KV cache (batch 1) and returns the logits of the
last position, so :func:`~sparsert.runtime.generate.generate_ids` drives a Hugging Face model exactly as it
drives sparsert's own models: on the CPU as loaded, or on the GPU after
:func:`~sparsert.runtime.linear_swap.swap_sparse_linears`. ``transformers`` itself is not imported here: the
model is any causal LM whose forward takes ``input_ids``, ``use_cache`` and a KV cache keyword (``cache`` from
transformers 5, ``past_key_values`` before) and returns ``logits`` and that cache.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from sparsert.runtime.errors import ConfigError


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword a transformers causal LM's forward takes its KV cache by: ``cache`` (transformers 5) or
    ``past_key_values`` (before); None when it takes neither."""
    params = inspect.signature(model.forward).parameters
    return next((key for key in ("cache", "past_key_values") if key in params), None)


class HFStepper:
    """Stepper over a ``transformers`` causal LM (batch 1).

    Args:
        model: the causal LM, in eval mode, on the device it runs on.
        max_seq_len: the most positions it takes (``max_position_embeddings``).
        vocab_size: the tokenizer's size: token ids must be below it, and the logits are cut to it (an embedding
            padded past the tokenizer must not produce ids the tokenizer cannot decode). Default: the input
            embedding's rows.
    """

    def __init__(self, model: nn.Module, max_seq_len: int, vocab_size: int | None = None) -> None:
        key = cache_keyword(model)
        if key is not None:
            self._cache_key = key
        else:
            raise ConfigError(f"HFStepper: {type(model).__name__}.forward takes no KV cache (neither 'cache' nor "
                              "'past_key_values'); it is not a transformers causal LM")
        self.model = model
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size or model.get_input_embeddings().weight.shape[0]
        self.device = next(model.parameters()).device
        self._cache = None
        self._length = 0

    def reset(self) -> None:
        self._cache, self._length = None, 0

    @torch.inference_mode()
    def step(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` after the cached positions; float32 logits ``[V]`` of the last position."""
        ids = list(ids)
        if not ids:
            raise ConfigError("HFStepper.step: no token ids given")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ConfigError(f"HFStepper.step: token ids must be in 0..{self.vocab_size - 1}, got "
                              f"{min(ids)}..{max(ids)}")
        if self._length + len(ids) > self.max_seq_len:
            raise ConfigError(f"HFStepper.step: {self._length + len(ids)} positions exceed the model's "
                              f"{self.max_seq_len}")
        x = torch.tensor([ids], dtype=torch.int64, device=self.device)
        out = self.model(input_ids=x, use_cache=True, **{self._cache_key: self._cache})
        self._cache = out[self._cache_key]
        self._length += len(ids)
        return out.logits[0, -1, : self.vocab_size].float()
