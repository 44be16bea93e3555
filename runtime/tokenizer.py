"""Tokenizers: the built-in byte-level tokenizer and the protocol any other tokenizer implements.

:class:`ByteTokenizer` maps text to its UTF-8 bytes (vocabulary 256, no special tokens), so every string
round-trips and no vocabulary file is needed. A tokenizer is stored in an artifact's ``config.json`` (and a
checkpoint's ``state.json``) as ``to_dict()`` and rebuilt with :func:`tokenizer_from_dict`, which dispatches on
``"type"``: ``"byte"`` (:class:`ByteTokenizer`) or ``"hf"`` (a local Hugging Face tokenizer,
:class:`sparsert.runtime.hf_tokenizer.HFTokenizer`; ``transformers`` is imported only then).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from sparsert.runtime.errors import ConfigError
from sparsert.runtime.hf_tokenizer import HFTokenizer


@runtime_checkable
class Tokenizer(Protocol):
    """What sparsert needs from a tokenizer. ``encode_numpy`` is an optional fast path used by the data
    loader (``train/data.py``); tokenizers without it are encoded through :meth:`encode`."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_dict(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, ``vocab_size = 256``; decoding replaces invalid byte sequences
    with U+FFFD (``errors="replace"``)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_numpy(self, text: str) -> np.ndarray:
        """``encode`` as a uint8 array [N] (no Python list; fast for large corpora)."""
        return np.frombuffer(bytearray(text.encode("utf-8")), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        try:
            data = bytes(int(i) for i in ids)
        except ValueError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < 256)
            raise ConfigError(f"byte tokenizer: token id {bad} is out of range 0..255") from None
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "byte", "vocab_size": 256}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from its ``to_dict()``: ``{"type": "byte", ...}`` or ``{"type": "hf", "path", ...}``.

    ConfigError for an unknown ``type``, inconsistent fields, or (``"hf"``) a tokenizer directory that is gone,
    holds a tokenizer of another size, or needs the missing ``transformers``.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"tokenizer config: expected a JSON object, got {type(d).__name__}")
    kind = d.get("type")
    if kind == "byte":
        if d.get("vocab_size", 256) != 256:
            raise ConfigError(f"tokenizer config: a byte tokenizer has vocab_size 256, got {d['vocab_size']!r}")
        unknown = sorted(set(d) - {"type", "vocab_size"})
        if unknown:
            raise ConfigError(f"tokenizer config: unknown field '{unknown[0]}' for type 'byte'")
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.from_dict(d)
    raise ConfigError(f"tokenizer config: unknown type {kind!r} (known: 'byte', 'hf')")
