"""Sparse tensor-core metadata for the 2:4 operand A of ``mma.sp`` / ``wgmma.mma_async.sp`` (bf16/fp16).

This module fixes the *global-memory* layout of the metadata that our sparse GEMM kernels load, and gives an
encoder (:func:`reorder_meta_for_mma`), its vectorised inverse (:func:`unreorder_meta`) and an independent
decoder written from the PTX ISA's figures (:func:`decode_meta_isa`) that the tests use to check the encoder.

Reference: NVIDIA PTX ISA, "Matrix multiply-accumulate operation using mma.sp instruction with sparse
matrix A" (sparse matrix storage; "Matrix fragments for sparse mma.m16n8k16 / mma.m16n8k32 with .f16 and
.bf16 types", metadata figures) and the warpgroup-level ``wgmma.mma_async.sp`` section (each warp of the
warpgroup supplies the metadata of 16 rows of A, warp ``w % 4`` -> rows ``16w .. 16w+15``).

What the ISA says (f16/bf16, 2:4 along K)
-----------------------------------------
* A chunk is 4 consecutive columns of one row of A. Its metadata is one nibble: bits [1:0] hold the column
  (0..3) of the first kept value, bits [3:2] the column of the second. With ``mma.sp::ordered_metadata``
  the first index must be the smaller one, so only 0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110 occur;
  0b0000, 0b0101, 0b1010, 0b1111 are undefined behaviour.
* ``groupID = laneid >> 2``, ``threadID_in_group = laneid % 4``. Within each quad of threads only the threads
  named by the *sparsity selector* supply metadata (one ``.b32`` register each):

  - ``m16n8k16`` (selector 0..3): thread ``4*groupID + selector`` holds row ``groupID`` chunks 0..3 in bits
    [15:0] (chunk ``j`` at bits [4j+3:4j]) and row ``groupID + 8`` chunks 0..3 in bits [31:16].
  - ``m16n8k32`` (selector 0..1, a *thread pair*): thread ``4*groupID + 2*selector + p`` (p = 0, 1) holds
    chunks ``4p .. 4p+3`` (columns 16p .. 16p+15) of row ``groupID`` in bits [15:0] and of row
    ``groupID + 8`` in bits [31:16].
  - ``wgmma.mma_async.sp`` m64nNk32: every warp of the warpgroup uses the m16n8k32 rule for its 16 rows.

Our global layout (what the kernels load)
-----------------------------------------
For A = W ``[M, K]`` (the weight: M = out_features, K = in_features; the kernel computes ``W @ X^T``),
``M % 16 == 0`` and ``K % 64 == 0``, the metadata is an int32 tensor (uint32 bit patterns) of shape
``[M/16, K/64, 32]``, contiguous. Block ``(mt, kb)`` covers rows ``16*mt .. 16*mt+15`` and columns
``64*kb .. 64*kb+63``; its word ``lane`` (0..31) is exactly the register lane ``lane`` of a warp passes:

    g = lane >> 2, s = lane & 3
    word = sum_j nib(row 16mt+g,   chunk 16kb + 4s + j) << 4j          (bits [15:0],  j = 0..3)
         | sum_j nib(row 16mt+g+8, chunk 16kb + 4s + j) << (16 + 4j)   (bits [31:16])

i.e. the 16 columns ``64kb + 16s .. 64kb + 16s + 15`` of rows g and g+8. A warp therefore loads 32
consecutive words (128 bytes, fully coalesced, one ``uint32`` per lane) and issues, without any shuffle:

  - ``mma.sp.m16n8k16``: the k16 tile ``t`` (columns 16t..16t+15) with sparsity selector ``t % 4`` using the
    word of block ``kb = t // 4``;
  - ``mma.sp.m16n8k32`` / ``wgmma...sp`` k32 step: the k32 tile ``t`` (columns 32t..32t+31) with selector
    ``t % 2`` using the word of block ``kb = t // 2`` (pair ``(4g+2s', 4g+2s'+1)`` holds columns 0..15 and
    16..31 of the tile, as the ISA requires).

The kept values stay ``[M, K/2]`` in K order (two per chunk, increasing column), exactly as
``runtime/sparse24.py`` stores them; the ``a`` fragments of the sparse MMA take them as a dense ``[16, 8]``
(k16) or ``[16, 16]`` (k32) operand.
"""

from __future__ import annotations

import torch

from sparsert.runtime.errors import FormatError

META_ROWS = 16  # rows of A per metadata block (one MMA tile / one warp of a warpgroup)
META_COLS = 64  # columns of A per metadata block (4 k16 tiles, 2 k32 tiles)
META_WORDS = 32  # uint32 words per block, one per lane
MMA_SHAPES = ("m16n8k16", "m16n8k32")

# The six ordered-metadata nibbles (first index in bits [1:0], second in [3:2], first < second).
ORDERED_NIBBLES = (0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110)


def meta_shape(m: int, k: int) -> tuple[int, int, int]:
    """Shape ``(M/16, K/64, 32)`` of the metadata of an ``[M, K]`` 2:4 operand; FormatError if not tiled."""
    check_meta_dims(m, k)
    return (m // META_ROWS, k // META_COLS, META_WORDS)


def check_meta_dims(m: int, k: int, name: str = "weight") -> None:
    """Raise FormatError unless ``M % 16 == 0`` and ``K % 64 == 0`` (the metadata block)."""
    if m <= 0 or m % META_ROWS:
        raise FormatError(f"{name}: rows (out_features) M={m} must be a positive multiple of {META_ROWS}")
    if k <= 0 or k % META_COLS:
        raise FormatError(f"{name}: K (in_features) ={k} must be a positive multiple of {META_COLS}")


def _check_indices(indices: torch.Tensor, name: str) -> tuple[int, int]:
    if indices.dim() != 2 or not (indices.dtype == torch.uint8 or not indices.dtype.is_floating_point):
        raise FormatError(f"{name} must be a 2-D integer tensor [M, K/2], got {indices.dtype} "
                          f"{tuple(indices.shape)}")
    m, half = indices.shape
    k = half * 2
    check_meta_dims(m, k, name)
    idx = indices.to(torch.int64).reshape(m, k // 4, 2)
    if bool(((idx < 0) | (idx > 3)).any()):
        raise FormatError(f"{name} must hold 2-bit indices in 0..3")
    bad = idx[..., 0] >= idx[..., 1]
    if bool(bad.any()):
        row, group = bad.nonzero()[0].tolist()
        raise FormatError(
            f"{name}: row {row}, group {group} has indices {tuple(idx[row, group].tolist())}; ordered "
            "metadata needs two strictly increasing indices in 0..3"
        )
    return m, k


def reorder_meta_for_mma(indices: torch.Tensor, name: str = "indices") -> torch.Tensor:
    """Encode 2:4 indices into the kernel's metadata layout (module docstring).

    Args:
        indices: integer (uint8) ``[M, K/2]`` with values 0..3: kept value ``j`` of row ``r`` sits at column
            ``4*(j//2) + indices[r, j]`` (``unpack_indices_24`` output). Each pair strictly increasing.
            ``M % 16 == 0``, ``K % 64 == 0``.
    Returns:
        int32 ``[M/16, K/64, 32]`` contiguous (uint32 bit patterns), on ``indices.device``.
    Raises:
        FormatError naming ``name`` for bad shape, values or order.
    """
    m, k = _check_indices(indices, name)
    idx = indices.to(torch.int64).reshape(m, k // 4, 2)
    nib = idx[..., 0] | (idx[..., 1] << 2)  # (M, K/4) one nibble per chunk
    # (M/16, half h, g, K/64, s, j): row = 16mt + 8h + g, chunk = 16kb + 4s + j
    nib = nib.reshape(m // 16, 2, 8, k // 64, 4, 4)
    shifts = (torch.arange(2, device=nib.device).view(2, 1, 1, 1, 1) * 16
              + torch.arange(4, device=nib.device).view(1, 1, 1, 1, 4) * 4)  # (h, g, kb, s, j) broadcast
    words = (nib << shifts).sum(dim=(1, 5))  # (M/16, g, K/64, s); disjoint bit fields, so sum == or
    words = words.permute(0, 2, 1, 3).reshape(m // 16, k // 64, 32)  # lane = 4g + s
    return _to_int32_bits(words).contiguous()


def unreorder_meta(meta: torch.Tensor, m: int, k: int, name: str = "meta") -> torch.Tensor:
    """Vectorised inverse of :func:`reorder_meta_for_mma`: int32 ``[M/16, K/64, 32]`` -> uint8 ``[M, K/2]``."""
    shape = meta_shape(m, k)
    if tuple(meta.shape) != shape or meta.dtype != torch.int32:
        raise FormatError(f"{name} must be int32 {list(shape)} for M={m}, K={k}, got {meta.dtype} "
                          f"{list(meta.shape)}")
    words = meta.to(torch.int64) & 0xFFFFFFFF
    words = words.reshape(m // 16, k // 64, 8, 4).permute(0, 2, 1, 3)  # (mt, g, kb, s)
    shifts = (torch.arange(2, device=meta.device).view(2, 1, 1, 1, 1) * 16
              + torch.arange(4, device=meta.device).view(1, 1, 1, 1, 4) * 4)
    nib = (words.unsqueeze(1).unsqueeze(-1) >> shifts) & 0xF  # (mt, h, g, kb, s, j)
    nib = nib.reshape(m, k // 4)
    idx = torch.stack([nib & 3, nib >> 2], dim=-1).reshape(m, k // 2)
    return idx.to(torch.uint8)


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 tensor of values in [0, 2^32) -> int32 with the same 32-bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# ---------------------------------------------------------------------------------------------------------
# Independent decoder: written from the ISA's per-instruction description, one MMA at a time.
# ---------------------------------------------------------------------------------------------------------

def isa_metadata_location(shape: str, row: int, chunk: int, selector: int) -> tuple[int, int]:
    """Where the ISA puts the metadata nibble of one chunk of one MMA's A tile.

    Args:
        shape: ``"m16n8k16"`` or ``"m16n8k32"`` (f16/bf16).
        row: row of the MMA's A tile, 0..15.
        chunk: 4-column chunk of the MMA's A tile, 0..3 (k16) or 0..7 (k32).
        selector: the instruction's sparsity selector, 0..3 (k16) or 0..1 (k32).
    Returns:
        ``(laneid, low_bit)``: the thread whose metadata register holds the nibble, and the nibble's lowest
        bit in that register ("Tk: [m..n]" in the ISA figure, n = low_bit, m = low_bit + 3).
    """
    group_id, upper = row % 8, row // 8  # rows groupID and groupID + 8 share a thread
    if shape == "m16n8k16":
        if not (0 <= selector <= 3 and 0 <= chunk <= 3):
            raise ValueError("m16n8k16 needs selector 0..3 and chunk 0..3")
        return 4 * group_id + selector, 16 * upper + 4 * chunk
    if shape == "m16n8k32":
        if not (0 <= selector <= 1 and 0 <= chunk <= 7):
            raise ValueError("m16n8k32 needs selector 0..1 and chunk 0..7")
        pair_member = chunk // 4  # T(2i) holds columns 0..15, T(2i+1) columns 16..31
        return 4 * group_id + 2 * selector + pair_member, 16 * upper + 4 * (chunk % 4)
    raise ValueError(f"unknown MMA shape {shape!r}; expected one of {MMA_SHAPES}")


def decode_meta_isa(meta: torch.Tensor, m: int, k: int, shape: str = "m16n8k32") -> torch.Tensor:
    """Decode the kernel's metadata the way the tensor cores read it, MMA by MMA (slow, for tests).

    For every MMA tile (16 rows x 16 or 32 columns) the kernel passes lane ``l`` the word
    ``meta[mt, kb, l]`` of the block that contains the tile and the selector of the tile's position in the
    block; this walks every (row, chunk) of the tile, asks :func:`isa_metadata_location` which lane and bits
    the ISA reads, and extracts the two indices.

    Returns:
        uint8 ``[M, K/2]`` indices (first index of each pair in bits [1:0] of its nibble).
    """
    check_meta_dims(m, k)
    tile_k = 16 if shape == "m16n8k16" else 32
    tiles_per_block = META_COLS // tile_k
    words = (meta.to(torch.int64) & 0xFFFFFFFF).reshape(m // 16, k // 64, 32).tolist()
    out = [[0] * (k // 2) for _ in range(m)]
    for mt in range(m // 16):
        for t in range(k // tile_k):
            kb, selector = divmod(t, tiles_per_block)
            regs = words[mt][kb]  # what lane l passes as its metadata operand
            for row in range(16):
                for chunk in range(tile_k // 4):
                    lane, lo = isa_metadata_location(shape, row, chunk, selector)
                    nibble = (regs[lane] >> lo) & 0xF
                    global_chunk = t * (tile_k // 4) + chunk
                    out[16 * mt + row][2 * global_chunk] = nibble & 3
                    out[16 * mt + row][2 * global_chunk + 1] = nibble >> 2
    return torch.tensor(out, dtype=torch.uint8).reshape(m, k // 2)


def meta_from_packed_indices(packed: torch.Tensor, k: int, name: str = "indices") -> torch.Tensor:
    """``runtime/sparse24.py`` packed indices uint8 ``[M, ceil(K/8)]`` -> kernel metadata ``[M/16, K/64, 32]``."""
    from sparsert.runtime.sparse24 import unpack_indices_24

    return reorder_meta_for_mma(unpack_indices_24(packed, k), name=name)
