"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

:func:`write_atomic` is the one single-file write of sparsert (kernel cache entries, the dispatch cache,
checkpoint ``latest.json``, report files). Directory-shaped outputs (artifacts, checkpoint steps, Hugging Face
directories) are written completely into a temporary sibling directory and moved into place by
:func:`replace_dir`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Best effort: make a rename inside ``path`` durable (not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, *, fsync: bool = True) -> Path:
    """Write ``data`` (a ``str`` as UTF-8) to ``path`` atomically and return ``path``.

    The bytes go to a uniquely named temporary file in the same folder (``.<name>.<random>.tmp``, created
    exclusively, with the usual permissions), which is flushed and fsynced (``fsync=True``) and renamed over
    ``path`` with ``os.replace``; the folder is then fsynced. The temporary file is removed when anything
    fails, and the exception propagates (an ``OSError`` names ``path``, not the temporary file). The folder must
    exist.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # name the file the caller asked for, not the hidden temporary one (chained below)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


# What a Hugging Face directory sparsert writes may hold: transformers' weights, configs and tokenizer files.
HF_DIR_FILES = re.compile(r"(config|generation_config|sparsert|special_tokens_map|added_tokens|preprocessor_config)"
                          r"\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|tokenizer.*|"
                          r"vocab\..*|merges\.txt|chat_template.*|.*\.tiktoken|spiece\.model")


def foreign_entry(directory: Path, written: re.Pattern[str] | frozenset[str]) -> str | None:
    """The name of an entry of ``directory`` that a sparsert output there would not have written (``written``: the
    names it writes, or a pattern they fully match), or None. A directory about to be replaced by a new output is
    checked with it first, so files a user put there are not deleted with the old output."""
    for entry in sorted(directory.iterdir()):
        name = entry.name
        ok = name in written if isinstance(written, frozenset) else written.fullmatch(name) is not None
        if not ok or not entry.is_file():
            return name
    return None


def replace_dir(staged: str | Path, target: str | Path) -> Path:
    """Move the complete directory ``staged`` to ``target`` (a sibling: same file system) and return ``target``.

    A directory already at ``target`` is renamed aside (``.<name>.<random>.old``) first and deleted only once
    ``staged`` is in place; if that last rename fails it is put back, so ``target`` is always either the old
    directory or the new one. The parent folder is fsynced after the swap.
    """
    staged, target = Path(staged), Path(target)
    if not target.exists():
        os.replace(staged, target)
        fsync_dir(target.parent)
        return target
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.old")
    os.replace(target, aside)
    try:
        os.replace(staged, target)
    except BaseException:
        os.replace(aside, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def user_cache_file(kind: str, device_name: str) -> Path:
    """``<root>/<kind>/<device name>.json``: a per-device cache file of measured choices. ``<root>`` is the parent
    of ``$SPARSERT_CACHE_DIR`` when set (the kernel cache lives beside), else ``~/.cache/sparsert``."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name).strip("_") or "device"
    base = os.environ.get("SPARSERT_CACHE_DIR")
    root = Path(base).parent if base else Path.home() / ".cache" / "sparsert"
    return root / kind / f"{slug}.json"
