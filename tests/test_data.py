"""Corpus loading (default, file, folder, JSONL), its errors, the deterministic split and batches."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sparsert.runtime.errors import ConfigError, DataError
from sparsert.runtime.tokenizer import ByteTokenizer
from sparsert.train.data import Corpus, TokenData, default_corpus_root, load_corpus

TOK = ByteTokenizer()


def test_default_corpus_is_the_stdlib_sources():
    corpus = load_corpus(None, max_bytes=200_000)
    assert corpus.documents and corpus.num_bytes == 200_000 and corpus.truncated
    assert corpus.sources == sorted(corpus.sources)
    assert all(s.endswith(".py") and "site-packages" not in s for s in corpus.sources)
    root = default_corpus_root()
    first = (root / corpus.sources[0]).read_bytes().decode("utf-8", errors="replace")
    assert corpus.documents[0] == first
    assert load_corpus(None, max_bytes=200_000).documents == corpus.documents  # deterministic


def test_default_corpus_full_size_loads():
    corpus = load_corpus()
    assert corpus.num_bytes == 8 * 1024 * 1024
    data = TokenData.from_corpus(corpus, TOK)
    assert data.train.dtype == torch.uint8
    assert data.train.numel() + data.val.numel() == len(corpus.text().encode())
    assert 0.04 < data.val.numel() / (data.train.numel() + data.val.numel()) < 0.06


def test_text_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("héllo wörld\n", encoding="utf-8")
    corpus = load_corpus(p)
    assert corpus.documents == ["héllo wörld\n"] and corpus.sources == ["a.txt"]
    assert corpus.num_bytes == len("héllo wörld\n".encode())


def test_text_file_must_be_utf8(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("abc é".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text \(invalid byte at offset 4\)"):
        load_corpus(p)


def test_folder_recursive_sorted_skips_binaries_and_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zzz")
    (tmp_path / "b" / "a.md").write_text("aaa")
    (tmp_path / "c.txt").write_text("ccc")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("git")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    corpus = load_corpus(tmp_path)
    assert corpus.sources == ["b/a.md", "b/z.txt", "c.txt", "d.jsonl:1"]
    assert corpus.documents == ["aaa", "zzz", "ccc", "from jsonl"]
    assert corpus.skipped == ["img.png"]
    assert corpus.text() == "aaa\nzzz\nccc\nfrom jsonl"


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    corpus = load_corpus(p)
    assert corpus.documents == ["one", "two"]
    assert corpus.sources == ["d.jsonl:1", "d.jsonl:3"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('{"txt": "x"}', r"bad\.jsonl:2: expected a JSON object with a string 'text' field"),
        ('{"text": 3}', r"bad\.jsonl:2: expected a JSON object with a string 'text' field"),
        ('["text"]', r"bad\.jsonl:2: expected a JSON object with a string 'text' field"),
    ],
)
def test_bad_jsonl_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        load_corpus(p)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: data path does not exist"):
        load_corpus(tmp_path / "nope.txt")


@pytest.mark.parametrize("kind", ["file", "folder", "jsonl", "binary-folder"])
def test_empty_corpus(tmp_path, kind):
    if kind == "file":
        path = tmp_path / "empty.txt"
        path.write_text("")
    elif kind == "jsonl":
        path = tmp_path / "empty.jsonl"
        path.write_text('{"text": ""}\n\n')
    else:
        path = tmp_path / "dir"
        path.mkdir()
        if kind == "binary-folder":
            (path / "x.bin").write_bytes(b"\x00\x01\x02")
    what = "no UTF-8 text files" if kind == "binary-folder" else "no text"
    with pytest.raises(DataError, match=rf"corpus is empty \({what}\)"):
        load_corpus(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read files without permission")
def test_unreadable_file(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_text("x")
    p.chmod(0)
    try:
        with pytest.raises(DataError, match=r"secret\.txt: cannot read \(Permission denied\)"):
            load_corpus(p)
    finally:
        p.chmod(0o600)


def test_unreadable_path_that_is_not_a_file(tmp_path):
    fifo = tmp_path / "pipe"
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"pipe: not a regular file or folder"):
        load_corpus(fifo)


def test_max_bytes_cuts_at_a_character_boundary(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("aé" * 10)  # 3 bytes per pair
    corpus = load_corpus(p, max_bytes=5)
    assert corpus.documents == ["aéa"] and corpus.truncated  # "aéa" = 4 bytes; the next é would make 6
    with pytest.raises(ConfigError, match="max_bytes must be a positive integer or None"):
        load_corpus(p, max_bytes=0)


def _corpus(text: str) -> Corpus:
    return Corpus(name="test", documents=[text], sources=["t"])


def test_split_every_20th_chunk_is_validation():
    tokens = torch.arange(100_000) % 251
    data = TokenData.from_tokens(tokens.to(torch.uint8), 256)
    assert data.chunk_size == 4096 and data.val_every == 20
    chunks = tokens.split(4096)  # 25 chunks: only chunk 19 is validation
    assert torch.equal(data.val.long(), chunks[19])
    assert torch.equal(data.train.long(), torch.cat(chunks[:19] + chunks[20:]))
    assert data.train.numel() + data.val.numel() == 100_000


def test_split_is_deterministic_and_disjoint():
    # Positions as tokens (int32 vocabulary) make membership checkable.
    n = 50_000
    tokens = torch.arange(n, dtype=torch.int32)
    a = TokenData.from_tokens(tokens, vocab_size=n)
    b = TokenData.from_tokens(tokens.clone(), vocab_size=n)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    train, val = set(a.train.tolist()), set(a.val.tolist())
    assert not train & val and len(train | val) == n
    text_data = TokenData.from_corpus(_corpus("abc" * 10_000), TOK, val_fraction=0.1)
    assert text_data.val_every == 10


def test_small_corpus_still_gets_a_validation_split():
    data = TokenData.from_corpus(_corpus("hello world " * 50), TOK)
    assert data.chunk_size == 600 // 20
    assert data.val.numel() == 30 and data.train.numel() == 570


def test_get_batch_windows_are_shifted_by_one():
    text = "".join(chr(ord("a") + i % 26) for i in range(20_000))
    data = TokenData.from_corpus(_corpus(text), TOK)
    gen = torch.Generator().manual_seed(1)
    x, y = data.get_batch("train", 4, 16, gen)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = data.get_batch("train", 4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)
    xv, yv = data.get_batch("val", 2, 8, gen)
    assert xv.shape == (2, 8)


def test_batch_errors():
    data = TokenData.from_corpus(_corpus("x" * 400), TOK)
    with pytest.raises(DataError, match=r"val split has 20 tokens, fewer than seq_len \+ 1 = 33"):
        data.get_batch("val", 2, 32)
    with pytest.raises(ConfigError, match="split must be 'train' or 'val', got 'test'"):
        data.get_batch("test", 2, 8)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        data.get_batch("train", 0, 8)


def test_val_batches_are_fixed_and_spread():
    n = 200_000
    data = TokenData.from_tokens(torch.arange(n, dtype=torch.int32), vocab_size=n)
    batches = list(data.val_batches(4, 32, max_batches=3))
    assert len(batches) == 3 and all(x.shape == (4, 32) for x, _ in batches)
    again = list(data.val_batches(4, 32, max_batches=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts.unique().numel() == 12
    assert starts.max() > data.val[data.val.numel() // 2]  # reaches the second half of the val stream
    everything = list(data.val_batches(8, 32))
    assert sum(x.shape[0] for x, _ in everything) == (data.val.numel() - 1) // 32 // 8 * 8
