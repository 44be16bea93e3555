"""Training corpus: loading, tokenization, a deterministic train/validation split and batches.

Sources (:func:`load_corpus`):

- ``None``: the built-in default corpus, the Python standard library's own ``*.py`` source files of the
  running interpreter (``sysconfig.get_paths()["stdlib"]``, without ``site-packages``/``dist-packages``),
  sorted by relative POSIX path, read as UTF-8 with ``errors="replace"``. Real text on every machine, no
  download.
- a text file: must be UTF-8 (otherwise :class:`DataError` with the offset of the first bad byte).
- a folder: every regular file below it, recursively, sorted by relative path; hidden files and folders
  (names starting with ".") are skipped, ``*.jsonl`` files are read as JSONL, and files that are not UTF-8
  text (invalid UTF-8 or containing NUL bytes, i.e. binaries) are skipped and listed in
  ``Corpus.skipped``, so a folder with a stray image still works and the report says what was left out.
- a ``.jsonl`` file: one JSON object per non-blank line with a string ``"text"`` field; each is a document.

Documents are taken in that order until ``max_bytes`` UTF-8 bytes (the last one is cut at a character
boundary); they are joined with one ``"\\n"`` between them before tokenization.

Split (:meth:`TokenData.from_corpus`): the token stream is cut into chunks of ``chunk_size`` = 4096 tokens
and every k-th chunk (k = round(1 / val_fraction) = 20 for 0.05; chunks k-1, 2k-1, ...) goes to
validation, the rest to training. The split depends only on the token stream, so it is identical on every
machine and spread over the whole corpus. A stream shorter than k chunks uses chunks of
``len // k`` tokens so validation is never empty. Tokens are stored as uint8 (vocab <= 256), int16
(<= 32768) or int32 and converted to int64 per batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparsert.runtime.errors import ConfigError, DataError
from sparsert.runtime.tokenizer import Tokenizer

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 4096
_EXCLUDED_DIRS = ("site-packages", "dist-packages")


@dataclass
class Corpus:
    """Documents (text) and, in the same order, where each came from (a relative path, or ``path:line``
    for JSONL records). ``skipped`` lists folder files left out as not UTF-8 text; ``truncated`` says
    whether ``max_bytes`` cut the corpus short."""

    name: str
    documents: list[str]
    sources: list[str]
    skipped: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def num_bytes(self) -> int:
        return sum(len(doc.encode("utf-8")) for doc in self.documents)

    def text(self) -> str:
        return "\n".join(self.documents)


def default_corpus_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _walk_files(root: Path, *, suffix: str | None = None, skip_hidden: bool = False,
                exclude_dirs: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of regular files below root, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        dirnames[:] = [d for d in dirnames if d not in exclude_dirs and not (skip_hidden and d.startswith("."))]
        for name in filenames:
            if suffix is not None and not name.endswith(suffix):
                continue
            if skip_hidden and name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def _raise_walk_error(exc: OSError) -> None:
    raise DataError(f"{exc.filename}: cannot read folder ({exc.strerror})")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _decode_strict(data: bytes) -> str | None:
    """UTF-8 text, or None for invalid UTF-8 or data with NUL bytes (binary files)."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_documents(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
        yield record["text"], f"{rel}:{lineno}"


class _Collector:
    """Accumulates documents up to max_bytes UTF-8 bytes; ``truncated`` once the limit cut one short."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.documents: list[str] = []
        self.sources: list[str] = []
        self.total = 0
        self.truncated = False

    def add(self, text: str, source: str) -> None:
        nbytes = len(text.encode("utf-8"))
        if self.max_bytes is not None and self.total + nbytes > self.max_bytes:
            room = self.max_bytes - self.total
            text = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
            nbytes = len(text.encode("utf-8"))
            self.truncated = True
        if text:
            self.documents.append(text)
            self.sources.append(source)
            self.total += nbytes


def _documents(path: str | Path | None, skipped: list[str]) -> Iterator[tuple[str, str]]:
    """(text, source) of every document of ``path`` (None: the default corpus), in corpus order, read lazily;
    folder files that are not UTF-8 text are appended to ``skipped`` instead."""
    if path is None:
        root = default_corpus_root()
        if not root.is_dir():
            raise DataError(f"{root}: the Python standard library folder (default corpus) does not exist")
        for rel, file in _walk_files(root, suffix=".py", exclude_dirs=_EXCLUDED_DIRS):
            yield _read_bytes(file).decode("utf-8", errors="replace"), rel
        return
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data path does not exist")
    if p.is_dir():
        for rel, file in _walk_files(p, skip_hidden=True):
            if file.suffix == ".jsonl":
                yield from _jsonl_documents(file, rel)
                continue
            text = _decode_strict(_read_bytes(file))
            if text is None:
                skipped.append(rel)
            else:
                yield text, rel
    elif p.is_file():
        if p.suffix == ".jsonl":
            yield from _jsonl_documents(p, p.name)
            return
        try:
            text = _read_bytes(p).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{p}: not UTF-8 text (invalid byte at offset {exc.start})") from None
        yield text, p.name
    else:
        raise DataError(f"{p}: not a regular file or folder")


def load_corpus(path: str | Path | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Corpus:
    """Load the training corpus from ``path`` (file, folder or ``.jsonl``; ``None``: the default corpus),
    keeping at most ``max_bytes`` UTF-8 bytes (``None``: no limit). See the module docstring for the rules.

    Raises DataError (naming the path) for a missing or unreadable path, a bad JSONL line (file and line
    number) or an empty corpus.
    """
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ConfigError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    out = _Collector(max_bytes)
    skipped: list[str] = []
    for text, source in _documents(path, skipped):
        out.add(text, source)
        if out.truncated:
            break
    name = f"python-stdlib:{default_corpus_root()}" if path is None else str(Path(path))
    if out.total == 0:
        what = "no UTF-8 text files" if skipped else "no text"
        raise DataError(f"{name}: corpus is empty ({what})")
    return Corpus(name=name, documents=out.documents, sources=out.sources, skipped=skipped,
                  truncated=out.truncated)


def _token_dtype(vocab_size: int) -> torch.dtype:
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 32768:
        return torch.int16
    return torch.int32


def encode_corpus(corpus: Corpus, tokenizer: Tokenizer) -> torch.Tensor:
    """The corpus as one token stream, 1-D [N] in the smallest integer dtype holding the vocabulary."""
    text = corpus.text()
    fast = getattr(tokenizer, "encode_numpy", None)
    ids = np.asarray(fast(text)) if fast is not None else np.asarray(tokenizer.encode(text), dtype=np.int64)
    if not ids.flags.writeable:
        ids = ids.copy()
    return torch.from_numpy(ids).to(_token_dtype(tokenizer.vocab_size))


@dataclass
class TokenData:
    """Train/validation token streams (1-D, uint8/int16/int32) and the split that produced them."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    chunk_size: int
    val_every: int

    @classmethod
    def from_corpus(cls, corpus: Corpus, tokenizer: Tokenizer, val_fraction: float = 0.05,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> TokenData:
        """Tokenize ``corpus`` and split it: every ``round(1/val_fraction)``-th chunk of ``chunk_size``
        tokens goes to validation (see the module docstring)."""
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction <= 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        tokens = encode_corpus(corpus, tokenizer)
        return cls.from_tokens(tokens, tokenizer.vocab_size, val_fraction, chunk_size)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, vocab_size: int, val_fraction: float = 0.05,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> TokenData:
        """Split a 1-D token stream [N] (see :meth:`from_corpus`)."""
        every = max(2, round(1 / val_fraction))
        n = tokens.numel()
        if n < every:
            raise DataError(f"corpus has {n} tokens, too few to split into train and validation")
        chunk = min(chunk_size, n // every)
        chunks = tokens.reshape(-1).split(chunk)  # ceil(n / chunk) views of [chunk] tokens (last may be short)
        train = torch.cat([c for i, c in enumerate(chunks) if i % every != every - 1])
        val = torch.cat([c for i, c in enumerate(chunks) if i % every == every - 1])
        return cls(train=train, val=val, vocab_size=vocab_size, chunk_size=chunk, val_every=every)

    def _split(self, split: str) -> torch.Tensor:
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")

    def _check(self, split: str, data: torch.Tensor, batch_size: int, seq_len: int) -> None:
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if data.numel() < seq_len + 1:
            raise DataError(
                f"{split} split has {data.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use more data or a shorter sequence"
            )

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x int64 [B, T] at uniformly drawn starts and y = the next tokens (x shifted by
        one), both int64 [B, T]. Starts come from ``generator`` (on CPU), so a seeded generator reproduces
        the batches."""
        data = self._split(split)
        self._check(split, data, batch_size, seq_len)
        starts = torch.randint(data.numel() - seq_len, (batch_size,), generator=generator)
        return self._windows(data, starts, seq_len, device)

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                    device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed sequence of (x, y) int64 [B, T] validation batches: non-overlapping windows spread
        evenly over the validation stream, at most ``max_batches`` batches, all of the same size (one
        smaller batch only when fewer than ``batch_size`` windows exist)."""
        data = self.val
        self._check("val", data, batch_size, seq_len)
        available = (data.numel() - 1) // seq_len
        wanted = available if max_batches is None else min(available, max_batches * batch_size)
        if wanted >= batch_size:
            wanted -= wanted % batch_size
        starts = (torch.arange(wanted) * available // wanted) * seq_len
        for i in range(0, wanted, batch_size):
            yield self._windows(data, starts[i:i + batch_size], seq_len, device)

    @staticmethod
    def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int,
                 device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T+1)
        w = data[idx].long()  # (B, T+1)
        x, y = w[:, :-1], w[:, 1:]
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x.contiguous(), y.contiguous()

    def digest(self) -> str:
        """sha256 (hex) of both token streams and the split: what a resumed run must see again."""
        h = hashlib.sha256(f"{self.vocab_size} {self.chunk_size} {self.val_every} {self.train.dtype}".encode())
        for part in (self.train, self.val):
            h.update(str(part.numel()).encode())
            h.update(part.contiguous().numpy())  # the array's buffer: no copy of the stream
        return h.hexdigest()

    def summary(self) -> dict:
        return {"train_tokens": self.train.numel(), "val_tokens": self.val.numel(),
                "chunk_size": self.chunk_size, "val_every": self.val_every}
