"""The mma.sp metadata layout: encoder vs an independent decoder written from the PTX ISA, and the ISA figure."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsert.runtime.errors import FormatError
from sparsert.runtime.sparse24 import compress_24, unpack_indices_24
from sparsert.runtime.sparse_meta import (
    MMA_SHAPES,
    ORDERED_NIBBLES,
    decode_meta_isa,
    isa_metadata_location,
    meta_from_packed_indices,
    meta_shape,
    reorder_meta_for_mma,
    unreorder_meta,
)

PAIRS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=torch.uint8)


def random_indices(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    choice = torch.randint(0, 6, (m, k // 4), generator=gen)
    return PAIRS[choice].reshape(m, k // 2)


# Cells read off the PTX ISA metadata figures ("Tk: [m..n]" = bits m..n of thread k's metadata register):
# (shape, row, chunk, selector) -> (laneid, low bit).
ISA_FIGURE_CELLS = [
    ("m16n8k16", 0, 0, 0, 0, 0),     # T0: [3:0]    row 0, columns 0..3
    ("m16n8k16", 0, 3, 0, 0, 12),    # T0: [15:12]  row 0, columns 12..15
    ("m16n8k16", 8, 0, 0, 0, 16),    # T0: [19:16]  row 8, columns 0..3
    ("m16n8k16", 15, 3, 0, 28, 28),  # T28: [31:28] row 15, columns 12..15
    ("m16n8k16", 5, 1, 2, 22, 4),    # selector 2: T(4*5+2): [7:4]
    ("m16n8k16", 13, 2, 3, 23, 24),  # selector 3: T(4*5+3): [27:24] (row 13 = groupID 5 + 8)
    ("m16n8k32", 0, 0, 0, 0, 0),     # thread pair (T0, T1): T0 columns 0..15 ...
    ("m16n8k32", 0, 4, 0, 1, 0),     # ... T1 columns 16..31
    ("m16n8k32", 8, 7, 0, 1, 28),    # row 8, columns 28..31 -> T1: [31:28]
    ("m16n8k32", 3, 5, 1, 15, 4),    # selector 1: pair (T14, T15); columns 20..23 -> T15: [7:4]
    ("m16n8k32", 11, 2, 1, 14, 24),  # row 11 = groupID 3 + 8, columns 8..11 -> T14: [27:24]
]


@pytest.mark.parametrize("shape,row,chunk,selector,lane,low", ISA_FIGURE_CELLS)
def test_isa_location_matches_figure(shape, row, chunk, selector, lane, low):
    assert isa_metadata_location(shape, row, chunk, selector) == (lane, low)


@pytest.mark.parametrize("shape", MMA_SHAPES)
def test_isa_location_is_a_bijection_per_instruction(shape):
    """Every (row, chunk) of one MMA maps to a distinct nibble, and only selected threads are used."""
    chunks, selectors = (4, 4) if shape == "m16n8k16" else (8, 2)
    for sel in range(selectors):
        cells = {isa_metadata_location(shape, r, c, sel) for r in range(16) for c in range(chunks)}
        assert len(cells) == 16 * chunks
        lanes = {lane for lane, _ in cells}
        allowed = {4 * g + sel for g in range(8)} if shape == "m16n8k16" else \
            {4 * g + 2 * sel + p for g in range(8) for p in range(2)}
        assert lanes == allowed


@pytest.mark.parametrize("shape", MMA_SHAPES)
def test_encode_then_isa_decode_roundtrip(shape):
    gen = torch.Generator().manual_seed(1)
    idx = random_indices(32, 128, gen)
    meta = reorder_meta_for_mma(idx)
    assert meta.shape == (2, 2, 32) and meta.dtype == torch.int32 and meta.is_contiguous()
    assert torch.equal(decode_meta_isa(meta, 32, 128, shape), idx)


@settings(max_examples=25, deadline=None)
@given(mt=st.integers(1, 3), kb=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_roundtrip_property(mt, kb, seed):
    m, k = 16 * mt, 64 * kb
    idx = random_indices(m, k, torch.Generator().manual_seed(seed))
    meta = reorder_meta_for_mma(idx)
    assert tuple(meta.shape) == meta_shape(m, k)
    assert torch.equal(unreorder_meta(meta, m, k), idx)
    shape = MMA_SHAPES[seed % 2]
    assert torch.equal(decode_meta_isa(meta, m, k, shape), idx)
    nibbles = ((meta.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    assert set(nibbles.unique().tolist()) <= set(ORDERED_NIBBLES)


@pytest.mark.parametrize("shape", MMA_SHAPES)
@pytest.mark.parametrize("row,col", [(0, 0), (7, 60), (8, 4), (15, 127), (21, 66), (31, 100)])
def test_single_chunk_lands_where_the_isa_says(shape, row, col):
    """Change one chunk: exactly one nibble of the metadata changes, at the ISA's (lane, bits) of the tile's
    instruction, in the block the kernel loads for that tile."""
    m, k = 32, 128
    base = PAIRS[0].repeat(m, k // 4)  # every chunk (0, 1) -> nibble 0b0100
    changed = base.clone()
    chunk = col // 4
    changed[row, 2 * chunk: 2 * chunk + 2] = torch.tensor([2, 3], dtype=torch.uint8)  # nibble 0b1110
    diff = (reorder_meta_for_mma(base) ^ reorder_meta_for_mma(changed)).to(torch.int64) & 0xFFFFFFFF
    tile_k = 16 if shape == "m16n8k16" else 32
    tile = col // tile_k
    kb, selector = divmod(tile, 64 // tile_k)
    lane, low = isa_metadata_location(shape, row % 16, (col % tile_k) // 4, selector)
    expected = torch.zeros_like(diff)
    expected[row // 16, kb, lane] = (0b0100 ^ 0b1110) << low
    assert torch.equal(diff, expected)


def test_meta_from_packed_indices_matches_compress24():
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(16, 64, generator=gen)
    dense[dense.abs() < 0.6] = 0  # some groups with fewer than two non-zeros
    groups = dense.reshape(16, 16, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    pruned = torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).reshape(16, 64)
    _, packed = compress_24(pruned)
    meta = meta_from_packed_indices(packed, 64)
    assert torch.equal(unreorder_meta(meta, 16, 64), unpack_indices_24(packed, 64))


@pytest.mark.parametrize("idx,match", [
    (torch.zeros(16, 32, dtype=torch.uint8), "strictly increasing"),
    (PAIRS[0].repeat(16, 16) + 4, "0..3"),
    (PAIRS[0].repeat(8, 16), r"multiple of 16"),
    (PAIRS[0].repeat(16, 8), r"multiple of 64"),
    (torch.zeros(16, dtype=torch.uint8), "2-D"),
    (torch.zeros(16, 32), "integer"),
])
def test_bad_indices_rejected(idx, match):
    with pytest.raises(FormatError, match=match):
        reorder_meta_for_mma(idx)


def test_unreorder_rejects_wrong_shape():
    with pytest.raises(FormatError, match=r"int32 \[1, 1, 32\]"):
        unreorder_meta(torch.zeros(1, 2, 32, dtype=torch.int32), 16, 64)
