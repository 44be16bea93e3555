"""A Hugging Face tokenizer behind sparsert's :class:`~sparsert.runtime.tokenizer.Tokenizer` protocol.

:class:`HFTokenizer` wraps the tokenizer stored in a local model directory (``tokenizer.json``,
``tokenizer_config.json``, ``vocab.json``/``merges.txt``, ``tokenizer.model``...) as loaded by
``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)``, so a corpus can be tokenised
for an HF model exactly as the model was trained, and an artifact can record which tokenizer it needs:
``{"type": "hf", "path": "/abs/model/dir", "vocab_size": N}``.

Text is encoded without special tokens (no BOS/EOS is inserted into the training stream) and decoded
without skipping special tokens or "cleaning up" spaces, so ``decode(encode(s))`` is the identity for the
byte-level BPE tokenizers of GPT-2, Llama 3 and Qwen2.

``transformers`` is an optional dependency (the ``hf`` extra); it is imported only when an
:class:`HFTokenizer` is built, and its absence is a :class:`ConfigError` that says how to install it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from sparsert.runtime.errors import ConfigError

HF_EXTRA_HINT = "pip install sparsert[hf]"


def import_transformers(what: str = "loading a Hugging Face model") -> ModuleType:
    """Import ``transformers`` or raise ConfigError naming the 'hf' extra."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{what} needs the 'hf' extra (transformers): {HF_EXTRA_HINT}") from None
    return transformers


def load_hf_tokenizer_object(path: str | Path) -> object:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``, with one-line ConfigErrors for a
    missing directory or a directory without a loadable tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{p}: Hugging Face tokenizer directory does not exist")
    transformers = import_transformers("a Hugging Face tokenizer")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{p}: cannot load a Hugging Face tokenizer from this directory ({first})") from None
    if isinstance(tok, bool) or tok is None:
        raise ConfigError(f"{p}: no Hugging Face tokenizer found in this directory")
    return tok


class HFTokenizer:
    """A local Hugging Face tokenizer with the ByteTokenizer interface.

    ``encode(text) -> list[int]`` (no special tokens added), ``encode_numpy(text) -> int32 [N]``,
    ``decode(ids) -> str`` (ids must lie in ``0 .. vocab_size-1``), ``vocab_size`` = ``len(tokenizer)``
    (base vocabulary plus added tokens), ``to_dict()`` = ``{"type": "hf", "path", "vocab_size"}``.
    ``hf`` is the wrapped ``transformers`` tokenizer (for ``save_pretrained``).
    """

    def __init__(self, path: str | Path, tokenizer: object | None = None) -> None:
        self.path = Path(path).resolve()
        self.hf = tokenizer if tokenizer is not None else load_hf_tokenizer_object(self.path)
        self.vocab_size = int(len(self.hf))

    @property
    def eos_token_id(self) -> int | None:
        return getattr(self.hf, "eos_token_id", None)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ConfigError(f"hf tokenizer: encode expects a str, got {type(text).__name__}")
        # verbose=False: a whole corpus is longer than model_max_length; that is fine for a token stream.
        return list(self.hf.encode(text, add_special_tokens=False, verbose=False))

    def encode_numpy(self, text: str) -> np.ndarray:
        """``encode`` as an int32 array [N]."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ConfigError(f"hf tokenizer {self.path}: token id {bad} is out of range 0..{self.vocab_size - 1}")
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def to_dict(self) -> dict:
        return {"type": "hf", "path": str(self.path), "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, d: dict) -> HFTokenizer:
        """Rebuild from :meth:`to_dict`; the directory must still hold a tokenizer of the recorded size."""
        if not isinstance(d, dict):
            raise ConfigError(f"tokenizer config: expected a JSON object, got {type(d).__name__}")
        if d.get("type") != "hf":
            raise ConfigError(f"tokenizer config: expected type 'hf', got {d.get('type')!r}")
        unknown = sorted(set(d) - {"type", "path", "vocab_size"})
        if unknown:
            raise ConfigError(f"tokenizer config: unknown field '{unknown[0]}' for type 'hf'")
        path = d.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError("tokenizer config: type 'hf' needs a string 'path' to the tokenizer directory")
        tok = cls(path)
        expected = d.get("vocab_size")
        if expected is not None and expected != tok.vocab_size:
            raise ConfigError(
                f"tokenizer config: {path} has vocab_size {tok.vocab_size}, the artifact recorded {expected!r}"
            )
        return tok

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
