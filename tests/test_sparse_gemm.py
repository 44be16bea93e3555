"""2:4 sparse GEMMs (runtime/sparse_gemm.py, cuda/sparse24_gemm*.cu, cuda/w4a16_sparse24_gemm.cu).

CPU (always):
* weight preparation: fragment shuffles round-trip, metadata is exactly ``reorder_meta_for_mma``;
* register-level emulation of every kernel: the kernels' own shared-memory and fragment index formulas
  (mirrored here line by line) feed a model of ``mma.sp m16n8k32`` written from the PTX ISA (A/B/C fragment
  layouts; metadata located with ``sparse_meta.isa_metadata_location``, the independent decoder of the ISA
  figures), ``ldmatrix`` and the lop3/magic-number INT4 dequantisation; the emulated result must equal the
  float64 product with the decompressed weight;
* torch fallbacks against float64 references; argument checks; decode split planning.
GPU (``-m gpu``): every kernel against a float64 reference on fresh random inputs, outputs poisoned with NaN.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from sparsert.runtime.errors import ConfigError, DeviceError, FormatError
from sparsert.runtime.packed_linear import PackedLinear, pack_linear
from sparsert.runtime.sparse24 import unpack_indices_24
from sparsert.runtime.sparse_gemm import (
    ACTIVATIONS,
    DECODE_DEEP_STAGES,
    DECODE_STAGES,
    PREFILL_CONFIGS,
    ROW_PAD,
    SM90_CONFIGS,
    SPARSE24_KERNELS,
    SPARSE24_TILES,
    W4A16_KERNELS,
    W4A16_SM90_CONFIGS,
    TileConfig,
    W4A16Weight,
    apply_activation,
    choose_sparse24_tile,
    cluster_tile_coords,
    codes_to_words,
    decode_smem_bytes,
    fragments_to_values,
    plan_decode,
    plan_sparse24,
    plan_w4a16,
    prepare_sparse24,
    prepare_sparse24_dense,
    prepare_w4a16,
    sparse24_linear,
    tile_coords,
    values_to_fragments,
    w4a16_linear,
    words_to_codes,
)
from sparsert.runtime.sparse_meta import isa_metadata_location, reorder_meta_for_mma

DTYPES = [torch.bfloat16, torch.float16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _packed(n: int, k: int, seed: int, *, group: int | None = None, bias: bool = True) -> PackedLinear:
    g = _gen(seed)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return pack_linear(w, sparse=True, int4_group_size=group, bias=b)


def _x(m: int, k: int, dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=_gen(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# A model of the PTX ISA pieces the kernels use
# ---------------------------------------------------------------------------------------------------------

def u16_to_f64(bits: np.ndarray, dtype) -> np.ndarray:
    bits = np.asarray(bits, dtype=np.uint16)
    if dtype == torch.float16:
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def f64_to_u16(v: np.ndarray, dtype) -> np.ndarray:
    t = torch.from_numpy(np.asarray(v, dtype=np.float64)).to(dtype)
    return t.view(torch.int16).numpy().view(np.uint16)


def halves(regs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) 16-bit halves of uint32 registers."""
    regs = np.asarray(regs, dtype=np.uint64)
    return (regs & 0xFFFF).astype(np.uint16), ((regs >> 16) & 0xFFFF).astype(np.uint16)


# Sparse m16n8k32 (f16/bf16), PTX ISA: A fragment = the m16n8k16 A layout on the compressed 16x16 tile:
# register i (0..3), half h of lane 4g+t: row g + 8*(i % 2), compressed column 2t + h + 8*(i // 2).
# B fragment (32x8): register i, half h: row (k) 2t + h + 8i, column g. C/D: c[2*hr + j] = (g + 8hr, 2t + j).
_LANES = np.arange(32)
_G, _T = _LANES >> 2, _LANES & 3
_META_LOC = {
    sel: np.array([[isa_metadata_location("m16n8k32", r, j, sel) for j in range(8)] for r in range(16)])
    for sel in (0, 1)
}  # (16 rows, 8 chunks, (lane, low bit))


def isa_mma_sp(a: np.ndarray, b: np.ndarray, meta: np.ndarray, sel: int, dtype) -> np.ndarray:
    """One warp's ``mma.sp.m16n8k32`` from register contents: a, b uint32 (32, 4), meta uint32 (32,).

    Returns the D fragment (32 lanes, 4) in float64 (C = 0)."""
    ac = np.zeros((16, 16))
    bm = np.zeros((32, 8))
    for i in range(4):
        for h in range(2):
            va = u16_to_f64(halves(a[:, i])[h], dtype)
            ac[_G + 8 * (i % 2), 2 * _T + h + 8 * (i // 2)] = va
            vb = u16_to_f64(halves(b[:, i])[h], dtype)
            bm[2 * _T + h + 8 * i, _G] = vb
    loc = _META_LOC[sel]
    nib = (meta.astype(np.uint64)[loc[..., 0]] >> loc[..., 1].astype(np.uint64)) & 0xF  # (16, 8)
    i0, i1 = (nib & 3).astype(int), (nib >> 2).astype(int)
    assert (i0 < i1).all(), "ordered metadata: first index must be the smaller one"
    dense = np.zeros((16, 32))
    rows = np.arange(16)[:, None]
    chunks = np.arange(8)[None, :]
    dense[rows, 4 * chunks + i0] = ac[rows, 2 * chunks]
    dense[rows, 4 * chunks + i1] = ac[rows, 2 * chunks + 1]
    d = dense @ bm  # (16, 8)
    out = np.zeros((32, 4))
    for hr in range(2):
        for j in range(2):
            out[:, 2 * hr + j] = d[_G + 8 * hr, 2 * _T + j]
    return out


def ldmatrix_x4(smem_bytes: np.ndarray, addrs: np.ndarray) -> np.ndarray:
    """``ldmatrix.sync.aligned.m8n8.x4.b16``: lanes 8j..8j+7 give the row addresses of matrix j; lane l
    receives row l // 4, elements 2(l % 4), 2(l % 4) + 1 of matrix j in register j."""
    out = np.zeros((32, 4), dtype=np.uint32)
    for j in range(4):
        for lane in range(32):
            row_addr = int(addrs[8 * j + lane // 4])
            word = smem_bytes[row_addr + 4 * (lane % 4): row_addr + 4 * (lane % 4) + 4].view(np.uint32)[0]
            out[lane, j] = word
    return out


def lds(smem_bytes: np.ndarray, addr: int, nbytes: int) -> np.ndarray:
    return smem_bytes[addr:addr + nbytes].view(np.uint32)


def gbytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes (global memory image)."""
    return t.contiguous().view(torch.uint8).reshape(-1).numpy() if t.dtype == torch.uint8 else \
        t.contiguous().reshape(-1).view(torch.uint8).numpy()


def copy16(dst: np.ndarray, daddr: int, src: np.ndarray, saddr: int, valid: bool = True, nbytes: int = 16):
    dst[daddr:daddr + nbytes] = src[saddr:saddr + nbytes] if valid else 0


# --- lop3 / magic-number dequantisation, bit for bit -----------------------------------------------------

def _round16(v: np.ndarray, dtype) -> np.ndarray:
    return u16_to_f64(f64_to_u16(v, dtype), dtype)


def _pack_halves(lo: np.ndarray, hi: np.ndarray, dtype) -> np.ndarray:
    return f64_to_u16(lo, dtype).astype(np.uint32) | (f64_to_u16(hi, dtype).astype(np.uint32) << 16)


def _h2(reg: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = halves(reg)
    return u16_to_f64(lo, dtype), u16_to_f64(hi, dtype)


def dequant_word(q: np.ndarray, sg: np.ndarray, sg8: np.ndarray, dtype) -> np.ndarray:
    """cuda/w4a16_sparse24_gemm.cu ``dequant_word`` on uint32 arrays: returns the 4 A registers (..., 4).

    sg / sg8 are the replicated scale registers (lo_pair / hi_pair); every fp op rounds to the dtype once."""
    q = q.astype(np.uint64)

    def lop3(a, b, c):  # (a & b) | c
        return (a & b) | c

    s_g = _h2(sg, dtype)[0]
    s_g8 = _h2(sg8, dtype)[0]
    regs = []
    if dtype == torch.float16:
        lo0, hi0 = lop3(q, 0x000F000F, 0x64006400), lop3(q, 0x00F000F0, 0x64006400)
        q8 = q >> 8
        lo1, hi1 = lop3(q8, 0x000F000F, 0x64006400), lop3(q8, 0x00F000F0, 0x64006400)
        for reg, kind, s in ((lo0, "sub", s_g), (hi0, "fma", s_g8), (lo1, "sub", s_g), (hi1, "fma", s_g8)):
            a, b = _h2(reg, dtype)
            if kind == "sub":  # sub.f16x2 with 1032
                a, b = _round16(a - 1032.0, dtype), _round16(b - 1032.0, dtype)
            else:  # fma.rn.f16x2 with (1/16, -72)
                a, b = _round16(a / 16.0 - 72.0, dtype), _round16(b / 16.0 - 72.0, dtype)
            regs.append(_pack_halves(_round16(a * s, dtype), _round16(b * s, dtype), dtype))
    else:
        for r, s in ((0, s_g), (1, s_g8), (2, s_g), (3, s_g8)):
            reg = lop3(q >> (4 * r), 0x000F000F, 0x43004300)
            a, b = _h2(reg, dtype)
            a, b = _round16(a - 136.0, dtype), _round16(b - 136.0, dtype)  # fma.rn.bf16x2 (x, 1, -136)
            regs.append(_pack_halves(_round16(a * s, dtype), _round16(b * s, dtype), dtype))
    return np.stack(regs, axis=-1).astype(np.uint32)


def lo_pair(s: np.ndarray) -> np.ndarray:
    s = s.astype(np.uint32)
    return (s & 0xFFFF) | ((s & 0xFFFF) << 16)


def hi_pair(s: np.ndarray) -> np.ndarray:
    s = s.astype(np.uint32)
    return (s >> 16) | (s & 0xFFFF0000)


# ---------------------------------------------------------------------------------------------------------
# Kernel emulators: the .cu index formulas, mirrored
# ---------------------------------------------------------------------------------------------------------

# cuda/sparse24_gemm_common.cuh and the shared pieces of cuda/sparse24_gemm_sm90.cu, mirrored.

def cta_tiles(m: int, n: int, br: int, bt: int):
    """The CTAs of a 1-D grid over ceil(N/br) x ceil(M/bt) tiles in ``tile_coords`` order: yields (first output
    feature n0, first token m0, first 16-row weight block blk0)."""
    nx, ny = -(-n // br), -(-m // bt)
    for pid in range(nx * ny):
        bx, by = tile_coords(pid, nx, ny)
        yield bx * br, by * bt, bx * br // 16


def sm90_ctas(m: int, n: int, bt: int, cluster: int = 1):
    """The CTAs of an sm90 wgmma grid (``cta_setup``; clusters of ``cluster`` CTAs as the ``*_mc`` kernels launch
    them, :func:`cluster_tile_coords`): yields (n0, m0, wblk0 = the weight block the producer loads from,
    x_boxes). ``x_boxes`` lists the X boxes landing in this CTA's stage as (first row within the stage, first X
    row, rows): one box of BT rows from its own producer, or with a cluster one of BT / cluster rows from the
    producer of every CTA of the cluster, each taken from that CTA's own tile coordinates (so a cluster whose
    CTAs did not share their tokens would assemble the wrong X tile)."""
    nx, ny = -(-n // 128), -(-m // bt)
    grid = -(-nx // cluster) * cluster * ny
    assert grid % cluster == 0
    rows = bt // cluster
    for c0 in range(0, grid, cluster):
        tiles = [cluster_tile_coords(pid, nx, ny, cluster) if cluster > 1 else tile_coords(pid, nx, ny)
                 for pid in range(c0, c0 + cluster)]
        boxes = [(q * rows, ty * bt + q * rows, rows) for q, (_, ty) in enumerate(tiles)]
        for tx, ty in tiles:
            yield tx * 128, ty * bt, min(tx, nx - 1) * 8, boxes


def copy_block_slabs(st: np.ndarray, dst: int, src: np.ndarray, blk0: int, ktiles: int, kt: int, nblk: int,
                     slab: int, unit: int | None = None) -> None:
    """``copy_block_slabs``: block b's ``slab`` bytes from ``((blk0 + b) * ktiles + kt) * unit`` to
    ``dst + b * slab``, 16 bytes per chunk."""
    unit = slab if unit is None else unit
    ch = slab // 16
    for c in range(nblk * ch):
        b, j = c // ch, c % ch
        copy16(st, dst + b * slab + j * 16, src, ((blk0 + b) * ktiles + kt) * unit + j * 16)


def ldsm_x_frags(smem: np.ndarray, tile: int, row_bytes: int, row0: int, chunk0: int, nb: int) -> list[np.ndarray]:
    """``ldsm_x_frags``: the B fragments of nb n8 token blocks from a row-swizzled X tile."""
    frags = []
    for i in range(nb):
        rows = row0 + i * 8 + (_LANES & 7)
        chunk = chunk0 + (_LANES >> 3)
        frags.append(ldmatrix_x4(smem, tile + rows * row_bytes + ((chunk ^ (rows & 7)) << 4)))
    return frags


def scatter_mma_tile(y: np.ndarray, acc: np.ndarray, wt_n: int, wm: int, wn: int, m0: int, n0: int) -> None:
    """``mma_tile_epilogue``'s index math: warp w's D fragments acc[w, mi, ni] (32 lanes, 4) -> y [M, N]."""
    m, n = y.shape
    for warp in range(acc.shape[0]):
        wr, wt = warp // wt_n, warp % wt_n
        for mi in range(acc.shape[1]):
            for h in range(2):
                r = wr * wm + mi * 16 + _G + 8 * h
                for ni in range(acc.shape[2]):
                    c = wt * wn + ni * 8 + 2 * _T
                    for j in range(2):
                        mm, nn = m0 + c + j, n0 + r
                        ok = (mm < m) & (nn < n)
                        y[mm[ok], nn[ok]] = acc[warp, mi, ni, :, 2 * h + j][ok]


def scatter_sm90_tile(y: np.ndarray, acc: np.ndarray, bt: int, m0: int, n0: int) -> None:
    """sm90 ``consumer_epilogue``'s index math: acc[c, wi] (32 lanes, BT/2) of consumer warpgroup c, warp wi."""
    m, n = y.shape
    for cg in range(2):
        for wi in range(4):
            for h in range(2):
                r = 64 * cg + 16 * wi + _G + 8 * h
                for j8 in range(bt // 8):
                    col = 8 * j8 + 2 * _T
                    for j in range(2):
                        mm, nn = m0 + col + j, n0 + r
                        ok = (mm < m) & (nn < n)
                        y[mm[ok], nn[ok]] = acc[cg, wi, :, 4 * j8 + 2 * h + j][ok]


def load_x_tile_sm90(st: np.ndarray, xv: np.ndarray, bt: int, subs: int, m0: int, m: int, k: int, k0: int) -> None:
    """sm90 ``load_x_tile``: ``subs`` 64-column sub-tiles of BT rows x 128 B in the 128-byte swizzle."""
    for c in range(bt * 8 * subs):
        r, j = c // (8 * subs), c % (8 * subs)
        h, jj = j >> 3, j & 7
        ok = m0 + r < m
        src = ((m0 + r if ok else 0) * k + k0 + j * 8) * 2
        copy16(st, h * bt * 128 + r * 128 + ((jj ^ (r & 7)) << 4), xv, src, ok)


def emulate_sparse24(x: torch.Tensor, w, cfg: TileConfig) -> np.ndarray:
    """cuda/sparse24_gemm.cu: returns the fp64 accumulator tile values scattered to [M, N] (pre-epilogue)."""
    dtype = x.dtype
    m, k = x.shape
    n = w.out_features
    br, bt, wr_n, wt_n = cfg.br, cfg.bt, cfg.wr, cfg.wt
    wm, wn = br // wr_n, bt // wt_n
    mi_n, ni_n = wm // 16, wn // 8
    nblk = br // 16
    a_bytes, e_bytes = nblk * 1024, nblk * 128
    kt_n = k // 64
    xv, wv, wmeta = gbytes(x), gbytes(w.values), gbytes(w.meta)
    y = np.full((m, n), np.nan)
    for n0, m0, blk0 in cta_tiles(m, n, br, bt):
        acc = np.zeros((wr_n * wt_n, mi_n, ni_n, 32, 4))
        for kt in range(kt_n):
            smem = np.zeros(a_bytes + e_bytes + bt * 128, dtype=np.uint8)
            copy_block_slabs(smem, 0, wv, blk0, kt_n, kt, nblk, 1024)
            copy_block_slabs(smem, a_bytes, wmeta, blk0, kt_n, kt, nblk, 128)
            for c in range(bt * 8):
                r, j = c >> 3, c & 7
                ok = m0 + r < m
                src = ((m0 + r if ok else 0) * k + kt * 64 + j * 8) * 2
                copy16(smem, a_bytes + e_bytes + r * 128 + ((j ^ (r & 7)) << 4), xv, src, ok)
            for warp in range(wr_n * wt_n):
                wr, wt = warp // wt_n, warp % wt_n
                e = [np.array([lds(smem, a_bytes + (wr * mi_n + mi) * 128 + lane * 4, 4)[0]
                               for lane in range(32)]) for mi in range(mi_n)]
                for ks in range(2):
                    a = [np.stack([lds(smem, (wr * mi_n + mi) * 1024 + ks * 512 + lane * 16, 16)
                                   for lane in range(32)]) for mi in range(mi_n)]
                    bfr = ldsm_x_frags(smem, a_bytes + e_bytes, 128, wt * wn, ks * 4, ni_n)
                    for mi in range(mi_n):
                        for ni in range(ni_n):
                            acc[warp, mi, ni] += isa_mma_sp(a[mi], bfr[ni], e[mi], ks, dtype)
        scatter_mma_tile(y, acc, wt_n, wm, wn, m0, n0)
    return y


def sm90_b_descriptor(saddr: int) -> int:
    """``desc_k_major_sw128`` of cuda/sparse24_gemm_sm90.cu: the B descriptor the kernel passes to wgmma for
    shared address ``saddr`` (the emulators put the 1024-byte-aligned stage at address 0)."""
    return ((saddr & 0x3FFFF) >> 4) | (1 << 16) | ((1024 >> 4) << 32) | (1 << 62)


def isa_descriptor_address(desc: int, rows: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """Shared address of 16-byte chunk ``chunk`` (0..3 within a k32 step of 16-bit values) of K-major row
    ``rows`` of a wgmma operand, decoded from the 64-bit matrix descriptor by the PTX ISA's "Matrix Descriptor
    Format" (CUTLASS GmmaDescriptor): start address >> 4 in bits 0-13, stride byte offset >> 4 (between
    8-row core-matrix groups) in 32-45, base offset in 49-51, layout type in 62-63 (1 = 128-byte swizzle,
    rows 128 B apart within a group). The 128-byte swizzle XORs address bits 4-6 with bits 7-9."""
    start = (desc & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    assert desc >> 62 == 1 and (desc >> 49) & 7 == 0, f"descriptor {desc:#x}: not 128B-swizzled with base 0"
    addr = start + (rows // 8) * sbo + (rows % 8) * 128 + chunk * 16
    return addr ^ (((addr >> 7) & 7) << 4)


def tma_load_2d_sw128(st: np.ndarray, dst: int, xv: np.ndarray, rows: int, cols: int, c0: int, c1: int,
                      box_rows: int) -> None:
    """A TMA tile load of a 16-bit ``[rows, cols]`` tensor with box {64, box_rows} at (column c0, row c1) and the
    128-byte swizzle, as the copy engine does it (CUTLASS ``Swizzle<3, 4, 3>`` on shared-memory byte addresses:
    bits 4-6 XOR bits 7-9; ``dst`` 1024-byte aligned): box row r, 16-byte chunk j lands at
    ``a ^ (((a >> 7) & 7) << 4)``, a = dst + 128 r + 16 j; rows >= ``rows`` read as zero."""
    for r in range(box_rows):
        ok = c1 + r < rows
        for j in range(8):
            a = dst + r * 128 + j * 16
            copy16(st, a ^ (((a >> 7) & 7) << 4), xv, (((c1 + r) if ok else 0) * cols + c0 + 8 * j) * 2, ok)


def emulate_sm90_consumer(x: torch.Tensor, w, bt: int, subs: int = 1, tma: bool = False,
                          cluster: int = 1) -> np.ndarray:
    """cuda/sparse24_gemm_sm90.cu: producer layout (``subs`` 64-column k blocks per stage; cp.async
    ``sparse24_gemm_sm90`` or, with ``tma``, ``sparse24_gemm_sm90_tma``'s tensor-map and bulk copies; with
    ``cluster`` > 1 ``sparse24_gemm_sm90_tma_mc``'s X boxes assembled from every CTA of the cluster), consumer
    A/metadata fragments, wgmma as four per-warp m16nBTk32 products with B read from the 128-byte-swizzled tile
    where the kernel's descriptor points (decoded by the ISA's field layout, :func:`isa_descriptor_address`),
    and the epilogue mapping."""
    dtype = x.dtype
    m, k = x.shape
    n = w.out_features
    a_off = subs * bt * 128
    e_off = a_off + subs * 8192
    xv, wv, wmeta = gbytes(x), gbytes(w.values), gbytes(w.meta)
    y = np.full((m, n), np.nan)
    kb_n = k // 64
    for n0, m0, blk0, boxes in sm90_ctas(m, n, bt, cluster):
        acc = np.zeros((2, 4, 32, bt // 2))
        for kt in range(kb_n // subs):
            st = np.zeros(e_off + subs * 1024, dtype=np.uint8)
            if tma:  # SUBS tensor-map boxes, then per block one bulk copy of its A slab and one of its metadata
                for h in range(subs):
                    for r0, row, rows in boxes:
                        tma_load_2d_sw128(st, h * bt * 128 + r0 * 128, xv, m, k, (kt * subs + h) * 64, row, rows)
                for b in range(8):
                    unit = (blk0 + b) * kb_n + subs * kt
                    copy16(st, a_off + b * 1024 * subs, wv, unit * 1024, nbytes=1024 * subs)
                    copy16(st, e_off + b * 128 * subs, wmeta, unit * 128, nbytes=128 * subs)
            else:
                load_x_tile_sm90(st, xv, bt, subs, m0, m, k, kt * 64 * subs)
                copy_block_slabs(st, a_off, wv, blk0, kb_n, subs * kt, 8, 1024 * subs, unit=1024)
                copy_block_slabs(st, e_off, wmeta, blk0, kb_n, subs * kt, 8, 128 * subs, unit=128)
            for cg in range(2):
                for wi in range(4):
                    blk = 4 * cg + wi
                    for s in range(2 * subs):
                        e = np.array([lds(st, e_off + blk * 128 * subs + (s >> 1) * 128 + lane * 4, 4)[0]
                                      for lane in range(32)])
                        a = np.stack([lds(st, a_off + blk * 1024 * subs + s * 512 + lane * 16, 16)
                                      for lane in range(32)])
                        desc = sm90_b_descriptor((s >> 1) * bt * 128 + (s & 1) * 64)
                        for j8 in range(bt // 8):
                            # B fragment of n8 block j8, read where the descriptor points
                            bfr = ldmatrix_x4(st, isa_descriptor_address(desc, 8 * j8 + (_LANES & 7), _LANES >> 3))
                            acc[cg, wi, :, 4 * j8:4 * j8 + 4] += isa_mma_sp(a, bfr, e, s & 1, dtype)
        scatter_sm90_tile(y, acc, bt, m0, n0)
    return y


def emulate_w4a16_prefill(x: torch.Tensor, w: W4A16Weight, cfg) -> np.ndarray:
    """cuda/w4a16_sparse24_gemm.cu ``w4a16_sparse24_prefill``, pre-epilogue values scattered to [M, N]."""
    dtype = x.dtype
    m, k = x.shape
    n, ng = w.out_features, w.ng
    bt, wr_n, wt_n = cfg.bt, cfg.wr, cfg.wt
    wm, wn = 128 // wr_n, bt // wt_n
    mi_n, ni_n = wm // 16, wn // 8
    q_bytes, e_bytes, s_unit = 8 * 512, 8 * 256, 32 * ng
    b_off = q_bytes + e_bytes + 8 * s_unit
    ku_n, kb_n = k // 128, k // 64
    xv, qv, ev, sv = gbytes(x), gbytes(w.qweight), gbytes(w.meta), gbytes(w.scales)
    y = np.full((m, n), np.nan)
    for n0, m0, blk0 in cta_tiles(m, n, 128, bt):
        acc = np.zeros((wr_n * wt_n, mi_n, ni_n, 32, 4))
        for ku in range(ku_n):
            st = np.zeros(b_off + bt * 256, dtype=np.uint8)
            copy_block_slabs(st, 0, qv, blk0, ku_n, ku, 8, 512)
            copy_block_slabs(st, q_bytes, ev, blk0, kb_n, 2 * ku, 8, 256, unit=128)
            copy_block_slabs(st, q_bytes + e_bytes, sv, blk0, ku_n, ku, 8, s_unit)
            for c in range(bt * 16):
                r, j = c >> 4, c & 15
                ok = m0 + r < m
                copy16(st, b_off + r * 256 + ((j ^ (r & 7)) << 4), xv,
                       ((m0 + r if ok else 0) * k + ku * 128 + j * 8) * 2, ok)
            for warp in range(wr_n * wt_n):
                wr, wt = warp // wt_n, warp % wt_n
                for s in range(4):
                    bfr = ldsm_x_frags(st, b_off, 256, wt * wn, s * 4, ni_n)
                    for mi in range(mi_n):
                        b = wr * mi_n + mi
                        word = np.array([lds(st, b * 512 + lane * 16, 16)[s] for lane in range(32)])
                        e = np.array([lds(st, q_bytes + b * 256 + (s >> 1) * 128 + lane * 4, 4)[0]
                                      for lane in range(32)])
                        scw = np.array([lds(st, q_bytes + e_bytes + b * s_unit + (lane >> 2) * 4 * ng, 4 * ng)
                                        [(s * ng) // 4] for lane in range(32)])
                        a = dequant_word(word, lo_pair(scw), hi_pair(scw), dtype)
                        for ni in range(ni_n):
                            acc[warp, mi, ni] += isa_mma_sp(a, bfr[ni], e, s & 1, dtype)
        scatter_mma_tile(y, acc, wt_n, wm, wn, m0, n0)
    return y


def emulate_w4a16_decode(x: torch.Tensor, w: W4A16Weight, nb: int, ksplit: int) -> np.ndarray:
    """``w4a16_sparse24_decode``: X slice staging, per-warp unit ranges and per-lane copies, intra-CTA and
    split-K reductions, epilogue indexing. Returns the pre-epilogue sums at [M, N]."""
    dtype = x.dtype
    m, k = x.shape
    n, ng = w.out_features, w.ng
    ntok = nb * 8
    ku_n, kb_n = k // 128, k // 64
    splits = math.ceil(ku_n / ksplit)
    xrow = ksplit * 256
    xv, qv, ev, sv = gbytes(x), gbytes(w.qweight), gbytes(w.meta), gbytes(w.scales)
    y = np.full((m, n), np.nan)
    for bx in range(w.n_pad // 128):
        n0 = bx * 128
        total = np.zeros(ntok * 128)
        for by in range(splits):
            ks0 = by * ksplit
            ks1 = min(ks0 + ksplit, ku_n)
            nks = ks1 - ks0
            xs = np.zeros(ntok * xrow, dtype=np.uint8)
            for c in range(ntok * nks * 16):
                r, j = c // (nks * 16), c % (nks * 16)
                ok = r < m
                copy16(xs, r * xrow + ((j ^ (r & 7)) << 4), xv, ((r if ok else 0) * k + ks0 * 128 + j * 8) * 2, ok)
            red = np.zeros((4, ntok, 132))
            for warp in range(8):
                wr, wk = warp & 1, warp >> 1
                w0, w1 = ks0 + (nks * wk) // 4, ks0 + (nks * (wk + 1)) // 4
                blk0 = (n0 >> 4) + wr * 4
                acc = np.zeros((4, nb, 32, 4))
                for ku in range(w0, w1):
                    kl = ku - ks0
                    for s in range(4):
                        bfr = ldsm_x_frags(xs, 0, xrow, 0, kl * 16 + s * 4, nb)
                        for b in range(4):
                            blk = blk0 + b
                            word = np.array([qv[(blk * ku_n + ku) * 512 + lane * 16 + s * 4:][:4].view(np.uint32)[0]
                                             for lane in range(32)])
                            e = np.array([ev[(blk * kb_n + 2 * ku + (s >> 1)) * 128 + lane * 4:][:4].view(np.uint32)[0]
                                          for lane in range(32)])
                            scw = np.array([sv[(blk * ku_n + ku) * 32 * ng + (lane >> 2) * 4 * ng
                                               + ((s * ng) // 4) * 4:][:4].view(np.uint32)[0] for lane in range(32)])
                            a = dequant_word(word, lo_pair(scw), hi_pair(scw), dtype)
                            for nbi in range(nb):
                                acc[b, nbi] += isa_mma_sp(a, bfr[nbi], e, s & 1, dtype)
                for b in range(4):
                    for nbi in range(nb):
                        for v in range(4):
                            r = wr * 64 + b * 16 + _G + 8 * (v >> 1)
                            tok = nbi * 8 + 2 * _T + (v & 1)
                            red[wk, tok, r] = acc[b, nbi, :, v]
            o = np.arange(ntok * 128)
            total += red[:, o >> 7, o & 127].sum(0)
        o = np.arange(ntok * 128)
        tok, r = o >> 7, o & 127
        ok = (tok < m) & (n0 + r < n)
        y[tok[ok], n0 + r[ok]] = total[ok]
    return y


def emulate_w4a16_sm90(x: torch.Tensor, w: W4A16Weight, bt: int, tma: bool = False, cluster: int = 1) -> np.ndarray:
    """``w4a16_sparse24_sm90``: producer layout (two 64-column X sub-tiles; with ``tma`` those of
    ``w4a16_sparse24_sm90_tma``: two tensor-map boxes and per block bulk copies of codes, metadata and scales;
    with ``cluster`` > 1 ``w4a16_sparse24_sm90_tma_mc``'s boxes from every CTA of the cluster),
    consumer dequantisation into the register A operand, the four k32 wgmmas per stage through the descriptor
    model, the shared epilogue."""
    dtype = x.dtype
    m, k = x.shape
    n, ng = w.out_features, w.ng
    sub, q_off = bt * 128, 2 * bt * 128
    e_off, s_off, s_unit = q_off + 4096, q_off + 4096 + 2048, 32 * ng
    ku_n, kb_n = k // 128, k // 64
    xv, qv, ev, sv = gbytes(x), gbytes(w.qweight), gbytes(w.meta), gbytes(w.scales)
    y = np.full((m, n), np.nan)
    for n0, m0, blk0, boxes in sm90_ctas(m, n, bt, cluster):
        acc = np.zeros((2, 4, 32, bt // 2))
        for ku in range(ku_n):
            st = np.zeros(s_off + 8 * s_unit, dtype=np.uint8)
            if tma:
                for h in range(2):
                    for r0, row, rows in boxes:
                        tma_load_2d_sw128(st, h * sub + r0 * 128, xv, m, k, ku * 128 + 64 * h, row, rows)
                for b in range(8):
                    blk = blk0 + b
                    copy16(st, q_off + b * 512, qv, (blk * ku_n + ku) * 512, nbytes=512)
                    copy16(st, e_off + b * 256, ev, (blk * kb_n + 2 * ku) * 128, nbytes=256)
                    copy16(st, s_off + b * s_unit, sv, (blk * ku_n + ku) * s_unit, nbytes=s_unit)
            else:
                load_x_tile_sm90(st, xv, bt, 2, m0, m, k, ku * 128)
                copy_block_slabs(st, q_off, qv, blk0, ku_n, ku, 8, 512)
                copy_block_slabs(st, e_off, ev, blk0, kb_n, 2 * ku, 8, 256, unit=128)
                copy_block_slabs(st, s_off, sv, blk0, ku_n, ku, 8, s_unit)
            for cg in range(2):
                for wi in range(4):
                    blk = 4 * cg + wi
                    q4 = np.stack([lds(st, q_off + blk * 512 + lane * 16, 16) for lane in range(32)])
                    e = [np.array([lds(st, e_off + blk * 256 + 128 * i + lane * 4, 4)[0] for lane in range(32)])
                         for i in range(2)]
                    sc = np.stack([lds(st, s_off + blk * s_unit + (lane >> 2) * 4 * ng, 4 * ng) for lane in range(32)])
                    for s in range(4):
                        scw = sc[:, ng - 1] if s >= 2 else sc[:, 0]
                        a = dequant_word(q4[:, s], lo_pair(scw), hi_pair(scw), dtype)
                        desc = sm90_b_descriptor((s >> 1) * sub + (s & 1) * 64)
                        for j8 in range(bt // 8):
                            bfr = ldmatrix_x4(st, isa_descriptor_address(desc, 8 * j8 + (_LANES & 7), _LANES >> 3))
                            acc[cg, wi, :, 4 * j8:4 * j8 + 4] += isa_mma_sp(a, bfr, e[s >> 1], s & 1, dtype)
        scatter_sm90_tile(y, acc, bt, m0, n0)
    return y


def _reference(x: torch.Tensor, dense: torch.Tensor) -> np.ndarray:
    return (x.double() @ dense.double().t()).numpy()


# ---------------------------------------------------------------------------------------------------------
# CPU tests: preparation and layouts
# ---------------------------------------------------------------------------------------------------------

def test_fragment_shuffle_round_trips_and_places_values_as_documented():
    v = torch.arange(256 * 128, dtype=torch.int64).reshape(256, 128)
    f = values_to_fragments(v)
    assert f.shape == (16, 4, 2, 32, 8)
    assert torch.equal(fragments_to_values(f), v)
    # spot checks of the documented element order e = 4hk + 2hr + p for lane 4g+t
    mt, kb, s, g, t = 3, 1, 1, 5, 2
    lane = 4 * g + t
    for e, (dr, dc) in enumerate([(0, 0), (0, 1), (8, 0), (8, 1), (0, 8), (0, 9), (8, 8), (8, 9)]):
        row, col = 16 * mt + g + dr, 32 * kb + 16 * s + 2 * t + dc
        assert f[mt, kb, s, lane, e] == v[row, col]


def test_int4_words_round_trip_and_nibble_order():
    codes = torch.randint(-8, 8, (32, 256), generator=_gen(1), dtype=torch.int64).to(torch.int8)
    words = codes_to_words(codes)
    assert words.shape == (2, 4, 32, 4) and words.dtype == torch.int32
    assert torch.equal(words_to_codes(words), codes)
    mt, ku, s, g, t = 1, 1, 2, 3, 1
    word = int(words[mt, ku, 4 * g + t, s]) & 0xFFFFFFFF
    expect = {0: (0, 0), 4: (0, 1), 1: (8, 0), 5: (8, 1), 2: (0, 8), 6: (0, 9), 3: (8, 8), 7: (8, 9)}
    for nib, (dr, dc) in expect.items():
        row, col = 16 * mt + g + dr, 64 * ku + 16 * s + 2 * t + dc
        assert ((word >> (4 * nib)) & 0xF) - 8 == int(codes[row, col])


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepare_sparse24_pads_and_decompresses_exactly(dtype):
    p = _packed(200, 192, seed=2)
    w = prepare_sparse24(p, dtype=dtype)
    assert w.n_pad == 256 and w.n_pad % ROW_PAD == 0
    assert w.values.shape == (16, 3, 2, 32, 8) and w.values.dtype == dtype
    assert torch.equal(w.to_dense(), p.to_dense().to(dtype).float())
    assert torch.equal(w.kept_values().float(), p.values.to(dtype).float())
    # the metadata is exactly sparse_meta's encoding of the padded indices
    idx = unpack_indices_24(p.indices, 192)
    pad = torch.tensor([0, 1], dtype=torch.uint8).repeat(48).expand(56, 96)
    assert torch.equal(w.meta, reorder_meta_for_mma(torch.cat([idx, pad])))
    assert fragments_to_values(w.values)[200:].count_nonzero() == 0


@pytest.mark.parametrize("group", [64, 128, 256])
def test_prepare_w4a16_matches_packed_dequantisation(group):
    p = _packed(136, 512, seed=3, group=group)
    w = prepare_w4a16(p, dtype=torch.float16)
    assert w.ng == (2 if group == 64 else 1)
    ref = p.to_dense()
    # the kernel's weight: fp16(code * fp16 scale); the PackedLinear reference is exact fp32 code * scale
    assert torch.allclose(w.to_dense(), ref, rtol=2 ** -10, atol=0)
    assert torch.equal(w.to_dense() == 0, ref == 0)


def test_w4a16_bits_per_weight_of_a_llama_shape_is_within_target():
    n, k = 256, 4096  # per-row cost only depends on K and G; rows already a multiple of 128 (no padding)
    p = _packed(n, k, seed=4, group=128, bias=False)
    w = prepare_w4a16(p, dtype=torch.float16)
    assert w.bits_per_weight() == pytest.approx(3.125)
    assert w.bits_per_weight() <= 3.25


def test_prepare_rejects_bad_weights():
    with pytest.raises(FormatError, match="multiple of 8"):
        prepare_sparse24(_packed(12, 128, seed=5))
    with pytest.raises(FormatError, match="multiple of 64"):
        prepare_sparse24(_packed(16, 96, seed=5))
    with pytest.raises(FormatError, match="prepare_w4a16"):
        prepare_sparse24(_packed(16, 128, seed=5, group=128))
    with pytest.raises(FormatError, match="2:4 \\+ INT4"):
        prepare_w4a16(_packed(16, 128, seed=5))
    with pytest.raises(FormatError, match="multiple of 128"):
        prepare_w4a16(_packed(16, 192, seed=5, group=64))
    with pytest.raises(FormatError, match="group size 32"):
        prepare_w4a16(_packed(16, 256, seed=5, group=32))
    with pytest.raises(FormatError, match="bfloat16 or float16"):
        prepare_sparse24(_packed(16, 128, seed=5), dtype=torch.float32)
    dense = pack_linear(torch.randn(16, 128), sparse=False)
    with pytest.raises(FormatError, match="dense"):
        prepare_sparse24(dense)


# ---------------------------------------------------------------------------------------------------------
# CPU tests: register-level emulation of the kernels against float64 products
# ---------------------------------------------------------------------------------------------------------

def test_isa_model_reproduces_a_dense_product():
    """Sanity of the emulator itself: pack one 16x32 2:4 tile by hand the ISA way and multiply."""
    g = _gen(6)
    a_dense = pack_linear(torch.randn(16, 64, generator=g), sparse=True).to_dense()[:, :32]
    b = torch.randn(32, 8, generator=g).to(torch.float16)
    w = prepare_sparse24_dense(torch.cat([a_dense, torch.zeros(16, 32)], 1).to(torch.float16))
    a_regs = w.values[0, 0, 0].contiguous().view(torch.int32).numpy().view(np.uint32)  # (32 lanes, 4)
    bits = b.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    b_regs = np.zeros((32, 4), dtype=np.uint32)
    for i in range(4):
        b_regs[:, i] = bits[2 * _T + 8 * i, _G] | (bits[2 * _T + 8 * i + 1, _G] << 16)
    d = isa_mma_sp(a_regs, b_regs, w.meta[0, 0].numpy().view(np.uint32), 0, torch.float16)
    ref = a_dense.to(torch.float16).double() @ b.double()
    for hr in range(2):
        for j in range(2):
            np.testing.assert_allclose(d[:, 2 * hr + j], ref.numpy()[_G + 8 * hr, 2 * _T + j], rtol=1e-12)


@pytest.mark.parametrize("cfg", [c for c in SPARSE24_TILES if c.stages == 4], ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_kernel_emulation(cfg, dtype):
    m = {"small": 20, "medium": 70, "large": 130}[cfg.name]
    p = _packed(136, 128, seed=7)
    w = prepare_sparse24(p, dtype=dtype)
    x = _x(m, 128, dtype, seed=8)
    got = emulate_sparse24(x, w, cfg)
    np.testing.assert_allclose(got, _reference(x, w.to_dense()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", SM90_CONFIGS, ids=lambda c: c.name)
def test_sm90_kernel_emulation(cfg):
    # a cluster kernel gets 3 weight tiles: the last cluster's second CTA is a padding CTA
    p = _packed(136 if cfg.cluster == 1 else 296, 256, seed=9)
    w = prepare_sparse24(p, dtype=torch.bfloat16)
    x = _x(cfg.bt + 3, 256, torch.bfloat16, seed=10)
    got = emulate_sm90_consumer(x, w, cfg.bt, cfg.subs, cfg.tma, cfg.cluster)
    np.testing.assert_allclose(got, _reference(x, w.to_dense()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [64, 128])
def test_w4a16_dequant_emulation_matches_codes_times_scales(dtype, group):
    p = _packed(16, 128, seed=11, group=group)
    w = prepare_w4a16(p, dtype=dtype)
    words = w.qweight[0, 0].numpy().view(np.uint32)  # (32 lanes, 4 steps)
    sc = w.scales[0, 0].contiguous().view(torch.int16).numpy().view(np.uint16)  # (8 g, NG, 2)
    kept = w.kept_dequantized()[:16, :64].numpy()
    for s in range(4):
        q = (s * w.ng) // 4
        scw = sc[_G, q, 0].astype(np.uint32) | (sc[_G, q, 1].astype(np.uint32) << 16)
        regs = dequant_word(words[:, s], lo_pair(scw), hi_pair(scw), dtype)
        for i in range(4):
            lo, hi = halves(regs[:, i])
            row = _G + 8 * (i % 2)
            col = 16 * s + 2 * _T + 8 * (i // 2)
            np.testing.assert_array_equal(u16_to_f64(lo, dtype), kept[row, col])
            np.testing.assert_array_equal(u16_to_f64(hi, dtype), kept[row, col + 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_prefill_emulation(dtype):
    p = _packed(136, 256, seed=12, group=64)
    w = prepare_w4a16(p, dtype=dtype)
    x = _x(70, 256, dtype, seed=13)
    got = emulate_w4a16_prefill(x, w, PREFILL_CONFIGS[1])
    np.testing.assert_allclose(got, _reference(x, w.to_dense()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tma,cluster", [(False, 1), (True, 1), (True, 2)], ids=["cp.async", "tma", "tma-mc"])
@pytest.mark.parametrize("dtype,group", [(torch.float16, 64), (torch.bfloat16, 128)])
def test_w4a16_sm90_emulation(dtype, group, tma, cluster):
    p = _packed(136 if cluster == 1 else 296, 256, seed=23, group=group)
    w = prepare_w4a16(p, dtype=dtype)
    x = _x(131, 256, dtype, seed=24)
    got = emulate_w4a16_sm90(x, w, 128, tma, cluster)
    np.testing.assert_allclose(got, _reference(x, w.to_dense()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,m,nb,ksplit", [(torch.float16, 5, 1, 3), (torch.bfloat16, 13, 2, 2)])
def test_w4a16_decode_emulation(dtype, m, nb, ksplit):
    p = _packed(136, 640, seed=14, group=128)  # 5 units: splits of 3+2 (or 2+2+1), uneven warp quarters
    w = prepare_w4a16(p, dtype=dtype)
    x = _x(m, 640, dtype, seed=15)
    got = emulate_w4a16_decode(x, w, nb, ksplit)
    np.testing.assert_allclose(got, _reference(x, w.to_dense()), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# CPU tests: fallbacks, argument checks, planning
# ---------------------------------------------------------------------------------------------------------

def _act_ref(y: torch.Tensor, activation: str) -> torch.Tensor:
    return apply_activation(y, activation)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_fallback_matches_float64(activation, dtype):
    p = _packed(72, 128, seed=16)
    w = prepare_sparse24(p, dtype=dtype)
    x = _x(9, 128, dtype, seed=17).reshape(3, 3, 128)
    y = sparse24_linear(x, w, activation=activation)
    assert y.shape == (3, 3, 72) and y.dtype == dtype
    ref = _act_ref(x.double().reshape(9, 128) @ w.to_dense().double().t() + p.bias.double(), activation)
    err = (y.reshape(9, 72).double() - ref).norm() / ref.norm()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    out = torch.full((3, 3, 72), float("nan"), dtype=dtype)
    assert sparse24_linear(x, w, activation=activation, out=out) is out
    assert torch.equal(out, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_fallback_matches_dequantized_reference(dtype):
    p = _packed(64, 256, seed=18, group=128)
    w = prepare_w4a16(p, dtype=dtype)
    x = _x(4, 256, dtype, seed=19)
    y = w4a16_linear(x, w, activation="silu")
    ref = torch.nn.functional.silu(x.double() @ p.to_dense().double().t() + p.bias.double())
    assert (y.double() - ref).norm() / ref.norm() < 1e-2


def test_argument_checks_name_the_constraint():
    w = prepare_sparse24(_packed(16, 128, seed=20), dtype=torch.bfloat16)
    x = _x(4, 128, torch.bfloat16, seed=21)
    with pytest.raises(FormatError, match="x has dtype float16, expected bfloat16"):
        sparse24_linear(x.half(), w)
    with pytest.raises(FormatError, match="in_features=128"):
        sparse24_linear(_x(4, 64, torch.bfloat16, 0), w)
    with pytest.raises(FormatError, match="contiguous"):
        sparse24_linear(torch.zeros(128, 4, dtype=torch.bfloat16).t(), w)
    with pytest.raises(FormatError, match="16-byte boundary"):
        sparse24_linear(torch.zeros(4 * 128 + 1, dtype=torch.bfloat16)[1:].reshape(4, 128), w)
    with pytest.raises(ConfigError, match="activation must be one of"):
        sparse24_linear(x, w, activation="tanh")
    with pytest.raises(ConfigError, match="kernel must be one of"):
        sparse24_linear(x, w, kernel="fast")
    with pytest.raises(FormatError, match="bias must be a float32 tensor of shape \\(16,\\)"):
        sparse24_linear(x, w, bias=torch.zeros(8))
    with pytest.raises(FormatError, match="out must be a bfloat16 tensor of shape \\(4, 16\\)"):
        sparse24_linear(x, w, out=torch.zeros(4, 8, dtype=torch.bfloat16))
    q = prepare_w4a16(_packed(16, 128, seed=22, group=128), dtype=torch.float16)
    with pytest.raises(FormatError, match="at most 16 tokens"):
        w4a16_linear(_x(17, 128, torch.float16, 0), q, kernel="decode")
    with pytest.raises(DeviceError, match="is on meta"):
        sparse24_linear(torch.zeros(4, 128, dtype=torch.bfloat16, device="meta"), w)


def test_decode_plan_covers_k_and_fits_shared_memory():
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (5120, 13824), (128, 128)]:
        for m in (1, 8, 9, 16):
            for limit in (232448, 166912, 101376):
                plan = plan_decode(m, n, k, 1, 132, limit)
                ku = k // 128
                assert plan.nb == (1 if m <= 8 else 2)
                assert plan.splits == math.ceil(ku / plan.ksplit) and (plan.splits - 1) * plan.ksplit < ku
                assert plan.smem + 128 <= limit and plan.stages in DECODE_STAGES
                assert plan.smem == decode_smem_bytes(plan.nb, 1, plan.stages, plan.ksplit)
    big = plan_decode(1, 4096, 4096, 1, 132, 232448)
    assert big.row_tiles * big.splits >= 132  # enough CTAs to stream from every SM
    with pytest.raises(FormatError):
        plan_decode(17, 128, 128, 1, 132, 232448)


@pytest.mark.parametrize("nx,ny", [(1, 1), (3, 1), (1, 11), (86, 64), (7, 9), (32, 8)])
def test_grouped_rasterisation_is_a_bijection(nx, ny):
    tiles = [tile_coords(pid, nx, ny) for pid in range(nx * ny)]
    assert sorted(tiles) == [(x, y) for x in range(nx) for y in range(ny)]
    if ny >= 8 and nx >= 2:  # the first CTAs share a band of token tiles
        assert {y for _, y in tiles[:16]} == set(range(8))


@pytest.mark.parametrize("nx,ny", [(1, 1), (3, 1), (2, 11), (86, 64), (7, 9), (33, 17)])
def test_cluster_rasterisation_pairs_token_tiles_and_covers_every_tile(nx, ny):
    """``sm90mc_*``: the CTAs of a cluster share their token tile and take neighbouring weight tiles; the grid
    covers every tile once, plus one padding CTA per token tile when nx is odd."""
    grid = -(-nx // 2) * 2 * ny
    tiles = [cluster_tile_coords(pid, nx, ny, 2) for pid in range(grid)]
    for c in range(0, grid, 2):
        (x0, y0), (x1, y1) = tiles[c], tiles[c + 1]
        assert y0 == y1 and x1 == x0 + 1 and x0 % 2 == 0
    real = [t for t in tiles if t[0] < nx]
    assert sorted(real) == [(x, y) for x in range(nx) for y in range(ny)]
    assert len(tiles) - len(real) == (nx % 2) * ny


DEVICES = {"sm_80": (166912, 108), "sm_86": (101376, 84), "sm_89": (101376, 128), "sm_90a": (232448, 132)}
THREADS = {"sparse24_gemm<": None, "sparse24_gemm_sm90": 384, "w4a16_sparse24_sm90": 384,
           "w4a16_sparse24_decode<": 256, "w4a16_sparse24_prefill<": 256}


def _check_plan(plan, arch, limit, m, n):
    from sparsert.runtime.kernel_build import check_arch

    assert plan.expr in plan.spec.name_expressions
    check_arch(plan.spec, arch)  # raises if the spec cannot be built for this device
    assert 0 < plan.smem <= limit - 128
    for prefix, threads in THREADS.items():
        if plan.expr.startswith(prefix) and threads:
            assert plan.block == (threads, 1, 1)
    if plan.decode is None:
        bt = int(plan.expr.split(", ")[2 if plan.expr.startswith("sparse24_gemm<") else 1])
        br = int(plan.expr.split(", ")[1]) if plan.expr.startswith("sparse24_gemm<") else 128
        cluster = 2 if "_mc<" in plan.expr else 1  # whole 2-CTA clusters: an odd tile count gets a padding CTA
        tiles = math.ceil(math.ceil(n / br) / cluster) * cluster
        assert plan.grid == (tiles * -(-m // bt), 1, 1)
        assert plan.tma_box_rows == (bt // cluster if "_tma" in plan.expr else 0)


@pytest.mark.parametrize("arch", list(DEVICES))
def test_launch_plans_pick_built_kernels_that_fit(arch):
    limit, sms = DEVICES[arch]
    for dtype in DTYPES:
        for m in (1, 8, 16, 17, 64, 65, 200, 256, 2048, 8192):
            for n, k in ((200, 384), (4096, 11008), (13824, 5120)):
                for kernel in SPARSE24_KERNELS:
                    if kernel.startswith("sm90") and arch != "sm_90a":
                        with pytest.raises(DeviceError, match="needs an sm_90a GPU"):
                            plan_sparse24(m, n, k, dtype, arch, limit, kernel)
                        continue
                    _check_plan(plan_sparse24(m, n, k, dtype, arch, limit, kernel), arch, limit, m, n)
                n_pad = -(-n // ROW_PAD) * ROW_PAD
                for ng in (1, 2):
                    for kernel in W4A16_KERNELS:
                        args = (m, n, n_pad, k - k % 128, dtype, ng, arch, limit, sms, kernel)
                        if kernel == "decode" and m > 16:
                            with pytest.raises(FormatError, match="at most 16 tokens"):
                                plan_w4a16(*args)
                            continue
                        if kernel.startswith("sm90") and arch != "sm_90a":
                            with pytest.raises(DeviceError, match="needs an sm_90a GPU"):
                                plan_w4a16(*args)
                            continue
                        plan = plan_w4a16(*args)
                        _check_plan(plan, arch, limit, m, n)
                        if plan.decode is not None:
                            assert plan.grid == (n_pad // 128, plan.decode.splits, 1)
    # auto on Hopper (the H200 run): the 256-token wgmma tile only for K >= 8192 from M >= 2048, mma.sp otherwise
    assert plan_sparse24(4096, 4096, 11008, torch.bfloat16, arch, limit).expr.startswith(
        "sparse24_gemm_sm90<0, 256," if arch == "sm_90a" else "sparse24_gemm<")
    assert plan_sparse24(4096, 4096, 4096, torch.bfloat16, arch, limit).expr.startswith("sparse24_gemm<")
    tile = choose_sparse24_tile(128, "medium" if arch == "sm_90a" else "large", limit)
    assert plan_sparse24(128, 4096, 4096, torch.bfloat16, arch, limit).expr == tile.expr(0)


def test_disabled_kernels_leave_the_dispatcher_and_benchmarks(monkeypatch):
    from sparsert.runtime.dispatch import our_backends
    from sparsert.runtime.sparse_gemm import kernel_enabled

    # variants never run on a GPU stay out of automatic choice unless asked for (the benchmarks ask)
    assert kernel_enabled("sm90_128") and kernel_enabled("sm90_256")
    assert not kernel_enabled("sm90tma_256") and not kernel_enabled("sm90_128_k128")
    assert kernel_enabled("sm90tma_256", include_unverified=True)
    monkeypatch.setenv("SPARSERT_ENABLE_UNVERIFIED_KERNELS", "1")
    assert kernel_enabled("sm90tma_256") and kernel_enabled("sm90_256_k128")
    monkeypatch.setenv("SPARSERT_DISABLE_KERNELS", " sm90tma, medium ,decode")
    assert not kernel_enabled("sm90tma_256") and not kernel_enabled("sm90tma_128_k128", include_unverified=True)
    assert kernel_enabled("sm90_256") and kernel_enabled("small") and not kernel_enabled("medium")
    names = {b.name for b in our_backends(None)}
    assert names == {"ours_sparse24_small", "ours_sparse24_large", "ours_w4a16_prefill"}


def test_k128_wgmma_tiles_need_k_multiple_of_128():
    for cfg in SM90_CONFIGS:
        plan = plan_sparse24(2048, 4096, 11008, torch.bfloat16, "sm_90a", 232448, cfg.name)
        assert plan.expr == cfg.expr(0) and plan.smem == cfg.smem_bytes()
        if cfg.subs == 2:
            with pytest.raises(FormatError, match=f"{cfg.name}.*K % 128 == 0, got K=320"):
                plan_sparse24(2048, 4096, 320, torch.bfloat16, "sm_90a", 232448, cfg.name)
        else:
            plan_sparse24(2048, 4096, 320, torch.bfloat16, "sm_90a", 232448, cfg.name)


def test_tile_configs_fit_the_devices_they_are_meant_for():
    sm86 = 101376
    assert any(c.name == "large" and c.smem_bytes() <= sm86 for c in SPARSE24_TILES)
    assert all(c.smem_bytes() <= 232448 - 1024 for c in SM90_CONFIGS)
    assert any(c.smem_bytes(2) <= sm86 for c in PREFILL_CONFIGS)
    assert min(DECODE_STAGES) >= 2


def test_plans_and_kernel_options_reject_bad_arguments():
    """The public plan functions and the linears' kernel options fail by name, on the CPU path too (a GPU would
    otherwise be the first to notice a K the chosen tile cannot take or a ring depth that was never built)."""
    bf = torch.bfloat16
    for call, why in (
        (lambda: plan_sparse24(64, 128, 128, torch.float32, "sm_90a", 232448), "dtype must be bfloat16 or float16"),
        (lambda: plan_sparse24(64, 128, 128, bf, "banana", 232448), "arch must look like"),
        (lambda: plan_sparse24(64, 128, 128, bf, "sm_90a", 232448, "sm90_bad"), "kernel must be one of"),
        (lambda: plan_sparse24(-1, 128, 128, bf, "sm_90a", 232448), "M must be a positive int"),
        (lambda: plan_w4a16(1, 128, 128, 128, bf, 1, "sm_90a", 232448, 132, "bogus"), "kernel must be one of"),
        (lambda: plan_w4a16(1, 128, 128, 128, bf, 1, "sm_90a", 232448, 132, "sm90_128_k128"), "kernel must be one"),
        (lambda: plan_decode(1, 100, 128, 1, 132, 232448), "padded rows must be a positive multiple of 128"),
        (lambda: plan_decode(1, 128, 0, 1, 132, 232448), "K must be a positive multiple of 128"),
        (lambda: plan_decode(1, 128, 128, 1, 132, 232448, ctas_per_sm=float("nan")), "finite number > 0"),
    ):
        with pytest.raises((FormatError, ConfigError), match=why):
            call()
    sp = prepare_sparse24(_packed(16, 64, seed=1), dtype=bf)
    q4 = prepare_w4a16(_packed(16, 128, seed=2, group=128), dtype=bf)
    with pytest.raises(FormatError, match=r"kernel 'sm90_128_k128' needs K % 128 == 0, got K=64"):
        sparse24_linear(_x(2, 64, bf, seed=3), sp, kernel="sm90_128_k128")
    with pytest.raises(ConfigError, match="stages must be one of"):
        w4a16_linear(_x(2, 128, bf, seed=3), q4, kernel="decode", decode_stages=99)
    with pytest.raises(ConfigError, match="decode_ctas_per_sm must be a finite number > 0"):
        w4a16_linear(_x(2, 128, bf, seed=3), q4, decode_ctas_per_sm=float("nan"))
    with pytest.raises(FormatError, match=r"weight must be a Sparse24Weight \(from prepare_sparse24\), got W4A16"):
        sparse24_linear(_x(2, 128, bf, seed=3), q4)
    with pytest.raises(FormatError, match="weight must be a W4A16Weight"):
        w4a16_linear(_x(2, 64, bf, seed=3), _packed(16, 64, seed=1))


@pytest.mark.parametrize("stages", DECODE_DEEP_STAGES)
def test_deep_decode_rings_only_on_request(stages):
    """The deeper rings are planned when asked for (fitting shared memory by shrinking the K slice) and never
    chosen by the default plan; an unknown depth is a ConfigError naming the choices."""
    plan = plan_decode(1, 13824, 5120, 1, 132, 232448, ctas_per_sm=1, stages=stages)
    assert plan.stages == stages and plan.smem + 128 <= 232448
    assert plan.ksplit * plan.splits >= 5120 // 128
    for m in (1, 9, 16):
        assert plan_decode(m, 13824, 5120, 1, 132, 232448, ctas_per_sm=0.5).stages in DECODE_STAGES
    with pytest.raises(ConfigError, match="stages must be one of"):
        plan_decode(1, 4096, 4096, 1, 132, 232448, stages=5)


# ---------------------------------------------------------------------------------------------------------
# GPU tests
# ---------------------------------------------------------------------------------------------------------

BOUND = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def _precompile_on_gpu():
    """On a GPU machine, build this file's kernels for the device in parallel once, before the first test."""
    from sparsert.runtime.device import get_device, probe_gpu
    from sparsert.runtime.sparse_gemm import precompile

    if probe_gpu()[0] and torch.cuda.is_available():
        precompile(get_device(0).arch)
    yield
GPU_SHAPES = [(1, 256, 256), (7, 200, 384), (16, 1024, 2048), (33, 136, 512), (130, 384, 640), (300, 520, 1024)]
SM90_GPU_SHAPES = [(1, 256, 256), (130, 384, 640), (300, 520, 1024), (600, 1024, 2048)]
W4A16_SM90_GPU_SHAPES = [(17, 256, 256, 128), (130, 384, 640, 64), (600, 1024, 2048, 128)]


def _gpu_case(m, n, k, dtype, seed, *, group=None, activation="none"):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    w = torch.randn(n, k, device=dev, generator=g)
    bias = torch.randn(n, device=dev, generator=g)
    p = pack_linear(w, sparse=True, int4_group_size=group, bias=bias)
    x = torch.randn(m, k, device=dev, generator=g).to(dtype)
    return p, x


def _check_gpu(y, x, dense, bias, activation, bound):
    assert bool(torch.isfinite(y).all()), "unwritten (NaN-poisoned) or non-finite outputs"
    ref = apply_activation(x.double() @ dense.double().t() + bias.double(), activation)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err <= bound, f"relative error {err:.3e} > {bound}"


def _skip_unless_sm90() -> None:
    from sparsert.runtime.device import get_device

    if get_device(0).arch != "sm_90a":
        pytest.skip(f"wgmma.sp needs sm_90a, this GPU is {get_device(0).arch}")


def _run_gpu(linear, prepare, kernel: str, m: int, n: int, k: int, dtype, seed: int, act: str, bound: float, *,
             group: int | None = None):
    """One kernel launch into a NaN-poisoned output, checked against the float64 reference on the prepared
    weight; returns (packed, x, prepared weight, y)."""
    p, x = _gpu_case(m, n, k, dtype, seed=seed, group=group)
    w = prepare(p, dtype=dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    y = linear(x, w, activation=act, out=out, kernel=kernel)
    torch.cuda.synchronize()
    _check_gpu(y, x, w.to_dense(), p.bias, act, bound)
    return p, x, w, y


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["small", "medium", "large", "auto"])
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
def test_gpu_sparse24(kernel, m, n, k, dtype):
    act = ["none", "relu", "silu", "gelu"][m % 4]
    _run_gpu(sparse24_linear, prepare_sparse24, kernel, m, n, k - k % 64, dtype, m * 7 + n, act, BOUND[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [c.name for c in SM90_CONFIGS if not c.tma])  # TMA: test_sparse_gemm_tma.py
@pytest.mark.parametrize("m,n,k", SM90_GPU_SHAPES)
def test_gpu_sparse24_sm90(kernel, m, n, k, dtype):
    run_sm90_case(kernel, m, n, k, dtype)


def run_sm90_case(kernel: str, m: int, n: int, k: int, dtype) -> None:
    """One wgmma 2:4 kernel case (also test_sparse_gemm_tma.py's): skipped below sm_90a."""
    _skip_unless_sm90()
    act = ["none", "gelu", "silu", "relu"][m % 4]
    _run_gpu(sparse24_linear, prepare_sparse24, kernel, m, n, k, dtype, m + n + 1, act, BOUND[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("m,n,k", [(1, 256, 256), (7, 200, 384), (9, 520, 1024), (16, 1024, 2048), (16, 4096, 4096)])
def test_gpu_w4a16_decode(m, n, k, group, dtype):
    _, x, w, y = _run_gpu(w4a16_linear, prepare_w4a16, "decode", m, n, k, dtype, m * 3 + k, "silu", 1e-2,
                          group=group)
    # the split-K counters are left at zero and the splits are summed in a fixed order: a second launch gives
    # the same bits
    again = w4a16_linear(x, w, activation="silu", kernel="decode")
    torch.cuda.synchronize()
    assert torch.equal(again, y)


@pytest.mark.gpu
@pytest.mark.parametrize("stages", DECODE_STAGES + DECODE_DEEP_STAGES)
@pytest.mark.parametrize("ctas_per_sm", [0.5, 1, 4])
def test_gpu_w4a16_decode_ring_depths(stages, ctas_per_sm):
    """Every ring depth, the deep ones (explicit only) included, with one split per tile (0.5, 1 on a small
    grid) and with many splits: 2 tokens, K = 3584 (28 units: uneven warp quarters)."""
    _run_gpu(functools.partial(w4a16_linear, decode_stages=stages, decode_ctas_per_sm=ctas_per_sm),
             prepare_w4a16, "decode", 2, 1536, 3584, torch.bfloat16, 31 + stages, "none", 1e-2, group=128)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("m,n,k", [(17, 256, 256), (130, 384, 640), (300, 520, 1024)])
def test_gpu_w4a16_prefill(m, n, k, group, dtype):
    act = ["none", "relu", "gelu"][m % 3]
    p, x, _, y = _run_gpu(w4a16_linear, prepare_w4a16, "prefill", m, n, k - k % 128, dtype, m * 5 + n, act, 1e-2,
                          group=group)
    # and against the PackedLinear's own (fp32) dequantisation
    _check_gpu(y, x, p.to_dense(), p.bias, act, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [c.name for c in W4A16_SM90_CONFIGS if not c.tma])
@pytest.mark.parametrize("m,n,k,group", W4A16_SM90_GPU_SHAPES)
def test_gpu_w4a16_sm90(kernel, m, n, k, group, dtype):
    run_w4a16_sm90_case(kernel, m, n, k, group, dtype)


def run_w4a16_sm90_case(kernel: str, m: int, n: int, k: int, group: int, dtype) -> None:
    """One wgmma W4A16 kernel case (also test_sparse_gemm_tma.py's): skipped below sm_90a."""
    _skip_unless_sm90()
    act = ["none", "relu", "gelu"][m % 3]
    _run_gpu(w4a16_linear, prepare_w4a16, kernel, m, n, k - k % 128, dtype, m * 11 + n, act, 1e-2, group=group)


@pytest.mark.gpu
def test_gpu_matches_cpu_fallback():
    p, x = _gpu_case(5, 136, 256, torch.float16, seed=99, group=128)
    w = prepare_w4a16(p, dtype=torch.float16)
    y_gpu = w4a16_linear(x, w).cpu().double()
    y_cpu = w4a16_linear(x.cpu(), w.to("cpu")).double()
    assert float((y_gpu - y_cpu).norm() / y_cpu.norm()) < 2e-3


# ---------------------------------------------------------------------------------------------------------
# tools/bench_kernels.py (CPU: the no-GPU path and the report logic)
# ---------------------------------------------------------------------------------------------------------

def _bench_module():
    from conftest import load_tool

    return load_tool("bench_kernels")


def test_bench_without_gpu_measures_nothing(tmp_path):
    from conftest import check_tool_measures_nothing_without_gpu

    check_tool_measures_nothing_without_gpu("bench_kernels", tmp_path)


def test_bench_runs_the_target_sizes_on_every_layer_first():
    """A run cut short by its time limit still has M = 2048 and M = 1 on every layer; every case runs once."""
    bench = _bench_module()
    order = bench.case_order(["7b", "13b"], [1, 16, 128, 2048, 8192, 512])
    assert len(order) == 6 * 6 and len(set(order)) == len(order)
    assert [c[4] for c in order[:12]] == [2048] * 6 + [1] * 6
    assert [c[4] for c in order[12:24]] == [8192] * 6 + [16] * 6
    assert [c[4] for c in order[24:]] == [128] * 6 + [512] * 6
    assert [(c[0], c[1], c[5]) for c in order[:6]] == [
        (model, layer, i) for i, (model, layer) in enumerate(
            [(m, lay) for m in ("7b", "13b") for lay, _, _ in bench.MODELS[m]], 1)]
    seeds = {(c[0], c[1]): c[5] for c in order}
    assert all(seeds[(c[0], c[1])] == c[5] for c in order) and sorted(seeds.values()) == list(range(1, 7))
    assert [c[4] for c in bench.case_order(["7b"], [16, 1])] == [1, 1, 1, 16, 16, 16]
    assert [c[4] for c in bench.case_order(["7b"], [512, 1, 512, 1])] == [1, 1, 1, 512, 512, 512]


def test_bench_report_targets_and_table():
    bench = _bench_module()
    base = {"model": "7b", "layer": "q/k/v/o", "N": 4096, "K": 4096, "dense_us": 100.0, "dense_bytes": 1.0,
            "ours24_us": 80.0, "ours24_err": 1e-3, "ours24_bytes": 1.0, "w4a16_err": 1e-2, "w4a16_bytes": 1.0,
            "w4a16_read_bytes": 6.3e6}
    rows = []
    for m, ours_best, w4_best in ((1, 50.0, 2.4), (16, 50.0, 30.0), (2048, 70.0, 60.0), (8192, 80.0, 80.0)):
        r = dict(base, M=m, flops=2.0 * m * 4096 * 4096, ours24_best="large", ours24_best_us=ours_best,
                 w4a16_us=w4_best * 1.1, w4a16_best="x", w4a16_best_us=w4_best, cslt_us=90.0,
                 dense_host_us=8.0 + m / 1024, ours24_host_us=30.0)
        rows.append(bench.evaluate(r, 3.35e12))
    assert "check_24" not in rows[0] and rows[2]["check_24"] == "PASS" and rows[3]["check_24"] == "FAIL"
    assert rows[0]["check_w4a16"] == "PASS"  # 41.7x dense, 6.3 MB in 2.4 us = 78% of 3.35 TB/s
    assert rows[0]["w4a16_roofline"] == pytest.approx(6.3e6 / 2.4e-6 / 3.35e12)
    assert rows[1]["check_w4a16"] == "FAIL"  # 3.3x < 4x
    assert rows[2]["check_w4a16"] == "PASS"  # 1.67x >= 1.5x at M = 2048
    assert "check_w4a16" not in rows[3]
    assert rows[2]["ours24_vs_cslt"] == pytest.approx(90.0 / 70.0)
    assert rows[2]["check_24_dispatch"] == "PASS" and rows[3]["check_24_dispatch"] == "FAIL"
    # a tuned cuSPARSELt call is the baseline when faster, and what the dispatcher can run beside ours
    tuned = bench.evaluate(dict(rows[3], cslt_tuned_us=60.0, cslt_tuned_err=1e-3), 3.35e12)
    assert tuned["ours24_vs_cslt"] == pytest.approx(60.0 / 80.0)
    assert tuned["dispatch24_speedup"] == pytest.approx(100 / 60) and tuned["check_24_dispatch"] == "PASS"
    wrong = bench.evaluate(dict(rows[3], cslt_tuned_us=10.0, cslt_tuned_err=0.5), 3.35e12)  # never counted
    assert wrong["ours24_vs_cslt"] == pytest.approx(90.0 / 80.0) and wrong["check_24_dispatch"] == "FAIL"
    # decode in a CUDA graph: 20x and 94% of the roofline pass; 13x at 63% fails on the roofline
    graph = dict(dense_graph_us=40.0, graph_weight_copies=17, graph_l2_ratio=2.1, w4a16_graph_err=3e-3)
    rows[0] = bench.evaluate(dict(rows[0], **graph, w4a16_graph_us=2.0), 3.35e12)
    rows[1] = bench.evaluate(dict(rows[1], **graph, w4a16_graph_us=3.0), 3.35e12)
    assert rows[0]["check_w4a16_graph"] == "PASS" and rows[1]["check_w4a16_graph"] == "FAIL"
    for bad in (dict(w4a16_graph_err=0.5), dict(graph_l2_ratio=1.5)):  # wrong result / weights may sit in L2
        assert bench.evaluate(dict(rows[0], **bad), 3.35e12)["check_w4a16_graph"] == "ERROR"
    assert rows[1]["w4a16_graph_roofline"] == pytest.approx(6.3e6 / 3e-6 / 3.35e12)
    memory = bench.model_memory(torch)
    assert memory["bits_per_weight"] == pytest.approx(3.125) and memory["check"] == "PASS"
    meta = {"device": "GPU", "arch": "sm_90a", "sms": 132, "commit": "abc", "torch": "2", "cusparselt": None,
            "peak_bw": 3.35e12, "peak_bw_source": "table", "copy_bw_measured": 2.9e12, "date": "now", "reps": 5}
    md = bench.to_markdown({"meta": meta, "rows": rows, "memory": memory,
                            "summary": bench.summarize(rows, memory)})
    table = [line for line in md.splitlines() if line.startswith("| 7b")]
    assert len(table) == 6 and all(line.count("|") == 26 for line in table[:4])
    assert all(line.count("|") == 13 for line in table[4:])
    assert "| 20.00x | 94% | 17 | 2.1 | 3.0e-03 | PASS |" in table[4]
    assert "3.125 bits/weight" in md and "'pass': 1, 'fail': 1" in md
    assert "the same decode targets in a CUDA graph: {'pass': 1, 'fail': 1, 'error': 0}" in md
    assert "Host time of one call" in md and "dense 8–16 us; ours 2:4 30–30 us" in md and "W4A16" not in \
        md.split("Host time of one call")[1].splitlines()[0]


def test_bench_clone_weight_copies_every_tensor():
    bench = _bench_module()
    w = prepare_w4a16(_packed(16, 128, seed=5, group=128), dtype=torch.bfloat16)
    c = bench.clone_weight(w)
    for name in ("qweight", "meta", "scales", "bias"):
        a, b = getattr(w, name), getattr(c, name)
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert (c.out_features, c.in_features, c.group_size) == (w.out_features, w.in_features, w.group_size)


def test_diagnose_sm90_without_gpu_and_its_table(tmp_path):
    """tools/diagnose_sm90.py: nothing measured without a GPU; its table has one line per measured row."""
    from conftest import check_tool_measures_nothing_without_gpu, load_tool

    check_tool_measures_nothing_without_gpu("diagnose_sm90", tmp_path)
    diag = load_tool("diagnose_sm90")
    rows = [{"shape": "7b down", "N": 4096, "K": 11008, "M": 8192, "kernel": "sparse24 sm90_256",
             "variant": "mma_only", "us": 900.0, "tflops": 820.0, "vs_dense": 1.02},
            {"shape": "7b down", "N": 4096, "K": 11008, "M": 8192, "kernel": "w4a16 sm90_128",
             "variant": "load_only", "error": "DeviceError: x"}]
    md = diag.to_markdown({"device": "H200", "arch": "sm_90a", "sms": 132, "date": "d", "reps": 3,
                           "stopped": "interrupted"}, rows)
    table = [line for line in md.splitlines() if line.startswith("| 7b")]
    assert len(table) == 2 and all(line.count("|") == 12 for line in table)
    assert "| 900.0 | 820 | 1.02x |" in table[0] and "DeviceError: x" in table[1] and "**stopped**" in md


def test_bench_notes_failures_but_stops_on_kernel_faults():
    bench = _bench_module()
    row = {}
    bench.note_failure(row, "ours24_small_note", ValueError("M too small"))
    assert row == {"ours24_small_note": "ValueError: M too small"}
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench.note_failure(row, "ours24_sm90tma_128_note", fault)
    assert "ours24_sm90tma_128_note" not in row


def test_bench_counts_cases_without_a_result_as_errors():
    """A covered case whose kernels all failed (or that faulted) is an ERROR in the summary, not left out."""
    bench = _bench_module()
    failed = [bench.evaluate({"model": "7b", "layer": "down", "N": 4096, "K": 11008, "M": m, "flops": 1.0,
                              "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}, 4.8e12)
              for m in (1, 128, 2048)]
    assert [r.get("check_w4a16") for r in failed] == ["ERROR", None, "ERROR"]
    assert [r.get("check_24") for r in failed] == [None, None, "ERROR"]
    summary = bench.summarize(failed, {"check": "PASS"})
    assert summary["sparse24_m>=2048"] == {"pass": 0, "fail": 0, "error": 1}
    assert summary["w4a16"] == {"pass": 0, "fail": 0, "error": 2}
    md = bench.to_markdown({"meta": {"device": "x", "arch": "sm_90a", "sms": 1, "commit": "c", "torch": "t",
                                     "cusparselt": None, "date": "d", "peak_bw": None, "peak_bw_source": "unknown",
                                     "copy_bw_measured": 1e12, "reps": 1, "stopped": "kernel fault at 7b down M=1"},
                            "rows": failed, "summary": summary,
                            "memory": {"bytes": 1, "weights": 1, "bits_per_weight": 3.1, "check": "PASS"}})
    assert "INCOMPLETE: kernel fault at 7b down M=1" in md and "illegal memory access" in md
