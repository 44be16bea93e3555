"""Launch wrappers for the utility kernels in ``cuda/`` (2:4 prune/compress/decompress, transposable masks).

Each wrapper checks its arguments first (dtype, contiguity, alignment, shape constraints; a FormatError names
the argument and the constraint), then runs the CUDA kernel when the input lives on a CUDA device of sm_80+
with a working driver, and otherwise a torch reference (the CPU fallback). The references are the
definitions the kernels are tested against.

Kernel specs are registered here (``register_kernel``) so ``kernel_build.all_kernel_specs()`` finds them.
"""

from __future__ import annotations

import torch

from sparsert.runtime.device import gpu_available
from sparsert.runtime.errors import FormatError, dtype_name
from sparsert.runtime.kernel_build import KernelSpec, load_kernel, register_kernel
from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.sparse24 import compress_24, expand_index_pairs, unpack_indices_24
from sparsert.runtime.sparse_meta import META_COLS, META_ROWS, meta_shape, reorder_meta_for_mma, unreorder_meta
from sparsert.runtime.transposable_mask import TRANSPOSABLE_PATTERNS_24, transposable_24_mask

PRUNE24_SPEC = register_kernel("prune24", KernelSpec(
    source="prune24.cu",
    name_expressions=(
        "prune24_compress<unsigned short, false>", "prune24_compress<unsigned short, true>",
        "prune24_compress<unsigned int, false>",
        "prune24_decompress<unsigned short>", "prune24_decompress<unsigned int>",
    ),
))
TRANSPOSABLE_MASK_SPEC = register_kernel("transposable_mask", KernelSpec(
    source="transposable_mask.cu",
    name_expressions=(
        "transposable_mask24<float>", "transposable_mask24<bf16_bits>", "transposable_mask24<f16_bits>",
    ),
))

_PRUNE_DTYPES = {torch.bfloat16: "unsigned short", torch.float16: "unsigned short", torch.float32: "unsigned int"}
_MASK_DTYPES = {torch.float32: "float", torch.bfloat16: "bf16_bits", torch.float16: "f16_bits"}


# ---------------------------------------------------------------------------------------------------------
# Argument checks (shared by the kernel and the fallback, so both reject the same inputs)
# ---------------------------------------------------------------------------------------------------------

def _check_tensor(t, name: str, fn: str, *, dtypes, dim: int, align: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise FormatError(f"{fn}: {name} has dtype {dtype_name(t.dtype)}, expected one of {allowed}")
    if t.dim() != dim:
        raise FormatError(f"{fn}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise FormatError(f"{fn}: {name} must be contiguous (row-major), got strides {tuple(t.stride())} "
                          f"for shape {tuple(t.shape)}")
    if t.numel() and t.data_ptr() % align:
        raise FormatError(f"{fn}: {name} must start on a {align}-byte boundary (vector loads), its address is "
                          f"{t.data_ptr()} (offset views of a larger tensor are not aligned; pass .clone())")


def _check_tiles(m: int, k: int, name: str, fn: str) -> None:
    if m <= 0 or m % META_ROWS:
        raise FormatError(f"{fn}: {name} has {m} rows; rows must be a positive multiple of {META_ROWS} "
                          f"(one mma.sp tile)")
    if k <= 0 or k % META_COLS:
        raise FormatError(f"{fn}: {name} has K={k}; K must be a positive multiple of {META_COLS} "
                          f"(one metadata block)")


def _same_device(fn: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise FormatError(f"{fn}: tensors are on different devices: {devices}")


def _use_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda and gpu_available()


def _prune_grid(m: int, k: int) -> tuple[int, int]:
    warps = (m // META_ROWS) * (k // META_COLS)
    return (warps + 3) // 4, 128


# ---------------------------------------------------------------------------------------------------------
# 2:4 prune + compress into the GEMM layout, and decompress
# ---------------------------------------------------------------------------------------------------------

def prune24_reference(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU reference of :func:`prune24_compress`: ``nm_mask`` (top-2 |w|, ties to the lower column), then
    ``compress_24`` and :func:`~sparsert.runtime.sparse_meta.reorder_meta_for_mma`.

    ``dense [M, K]`` (``M % 16 == 0``, ``K % 64 == 0``) -> (values ``[M, K/2]`` in ``dense.dtype``, kept values in
    K order; meta int32 ``[M/16, K/64, 32]``). A NaN has no magnitude order: refused with its position (the
    CUDA kernel, which does not check to stay sync-free, ranks it above every number)."""
    bad = torch.isnan(dense)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise FormatError(f"dense holds NaN (first at row {r}, column {c}): it cannot be pruned by magnitude")
    mask = nm_mask(dense, 2, 4, name="dense")
    values, packed = compress_24(torch.where(mask, dense, torch.zeros((), dtype=dense.dtype)), name="dense")
    return values, reorder_meta_for_mma(unpack_indices_24(packed, dense.shape[1]), name="dense indices")


VALUE_LAYOUTS = ("rows", "fragments")


def values_shape(m: int, k: int, layout: str) -> tuple[int, ...]:
    """Shape of the kept values: ``[M, K/2]`` (``rows``) or ``[M/16, K/64, 2, 32, 8]`` (``fragments``)."""
    return (m, k // 2) if layout == "rows" else (m // 16, k // 64, 2, 32, 8)


def prune24_compress(
    dense: torch.Tensor, *, layout: str = "rows", out_values: torch.Tensor | None = None,
    out_meta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``dense`` to 2:4 along K by magnitude and compress it into the sparse GEMM's operand layout.

    Args:
        dense: ``[M, K]`` bf16/fp16/fp32, contiguous, 16-byte aligned; ``M % 16 == 0``, ``K % 64 == 0``.
        layout: ``"rows"``: values ``[M, K/2]`` in K order (the two largest-|w| entries of each group of 4, in
            column order; runtime/sparse24.py's layout). ``"fragments"`` (bf16/fp16): the same values in
            ``sparse24_gemm.cu``'s A-fragment order ``[M/16, K/64, 2, 32, 8]``
            (``sparse_gemm.values_to_fragments``), ready for the GEMM.
        out_values, out_meta: optional preallocated outputs (same device; shapes/dtypes below).
    Returns:
        ``values`` (dense.dtype, per ``layout``) and ``meta`` int32 ``[M/16, K/64, 32]``
        (runtime/sparse_meta.py). On a CUDA tensor with a usable GPU the ``prune24_compress`` kernel computes
        both in one pass; otherwise :func:`prune24_reference`.
    """
    fn = "prune24_compress"
    if layout not in VALUE_LAYOUTS:
        raise FormatError(f"{fn}: layout must be one of {', '.join(VALUE_LAYOUTS)}, got {layout!r}")
    dtypes = _PRUNE_DTYPES if layout == "rows" else {t: n for t, n in _PRUNE_DTYPES.items() if t != torch.float32}
    _check_tensor(dense, "dense", fn, dtypes=dtypes, dim=2, align=16)
    m, k = dense.shape
    _check_tiles(m, k, "dense", fn)
    vshape = values_shape(m, k, layout)
    if out_values is not None:
        _check_tensor(out_values, "out_values", fn, dtypes=(dense.dtype,), dim=len(vshape), align=16)
        if tuple(out_values.shape) != vshape:
            raise FormatError(f"{fn}: out_values has shape {tuple(out_values.shape)}, expected {vshape}")
    if out_meta is not None:
        _check_tensor(out_meta, "out_meta", fn, dtypes=(torch.int32,), dim=3, align=16)
        if tuple(out_meta.shape) != meta_shape(m, k):
            raise FormatError(f"{fn}: out_meta has shape {tuple(out_meta.shape)}, expected {meta_shape(m, k)}")
    if not _use_kernel(dense):
        values, meta = prune24_reference(dense)
        if layout == "fragments":
            from sparsert.runtime.sparse_gemm import values_to_fragments

            values = values_to_fragments(values)
        if out_values is not None:
            out_values.copy_(values)
            values = out_values
        if out_meta is not None:
            out_meta.copy_(meta)
            meta = out_meta
        return values, meta
    values = out_values if out_values is not None else torch.empty(vshape, dtype=dense.dtype, device=dense.device)
    meta = out_meta if out_meta is not None else torch.empty(meta_shape(m, k), dtype=torch.int32,
                                                             device=dense.device)
    _same_device(fn, dense=dense, out_values=values, out_meta=meta)
    expr = f"prune24_compress<{_PRUNE_DTYPES[dense.dtype]}, {'true' if layout == 'fragments' else 'false'}>"
    kernel = load_kernel(PRUNE24_SPEC, expr, dense.device.index)
    grid, block = _prune_grid(m, k)
    kernel(grid, block, dense, values, meta, m, k)
    return values, meta


def prune_to_sparse24_weight(dense: torch.Tensor, bias: torch.Tensor | None = None):
    """Magnitude-prune a bf16/fp16 ``[N, K]`` weight straight into a ``sparse_gemm.Sparse24Weight`` (one kernel
    pass on the GPU): rows padded with zeros to ``sparse_gemm.ROW_PAD`` (zero rows keep columns (0, 1), the
    padding convention of ``prepare_sparse24``), ``K % 64 == 0``."""
    from sparsert.runtime.sparse_gemm import ROW_PAD, Sparse24Weight

    _check_tensor(dense, "dense", "prune_to_sparse24_weight", dtypes={torch.bfloat16: 0, torch.float16: 1},
                  dim=2, align=16)
    n, k = dense.shape
    n_pad = -(-n // ROW_PAD) * ROW_PAD
    src = dense if n == n_pad else torch.cat([dense, dense.new_zeros(n_pad - n, k)])
    values, meta = prune24_compress(src, layout="fragments")
    b = None if bias is None else bias.to(device=dense.device, dtype=torch.float32).contiguous()
    return Sparse24Weight(out_features=n, in_features=k, values=values, meta=meta, bias=b)


def decompress24_reference(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """CPU reference of :func:`prune24_decompress` (any device, any dtype): ``values [M, K/2]`` (kept values in
    K order) and ``meta`` int32 ``[M/16, K/64, 32]`` (:mod:`sparsert.runtime.sparse_meta` layout) -> the dense
    ``[M, K]`` in ``values.dtype``, each kept value at the column its metadata names, zeros elsewhere. Metadata
    that is not a valid 2:4 pattern (two strictly increasing indices per group) is a FormatError."""
    m = values.shape[0]
    return expand_index_pairs(values, unreorder_meta(meta, m, k).reshape(m, k // 4, 2), k, "meta")


def prune24_decompress(
    values: torch.Tensor, meta: torch.Tensor, k: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Expand ``(values [M, K/2], meta int32 [M/16, K/64, 32])`` back to the dense ``[M, K]`` (zeros elsewhere).

    Same constraints as :func:`prune24_compress`; ``out`` optionally receives the result.
    """
    fn = "prune24_decompress"
    _check_tensor(values, "values", fn, dtypes=_PRUNE_DTYPES, dim=2, align=16)
    _check_tensor(meta, "meta", fn, dtypes=(torch.int32,), dim=3, align=16)
    m = values.shape[0]
    _check_tiles(m, k, "values", fn)
    if tuple(values.shape) != (m, k // 2):
        raise FormatError(f"{fn}: values has shape {tuple(values.shape)}, expected {(m, k // 2)} for K={k}")
    if tuple(meta.shape) != meta_shape(m, k):
        raise FormatError(f"{fn}: meta has shape {tuple(meta.shape)}, expected {meta_shape(m, k)}")
    _same_device(fn, values=values, meta=meta)
    if out is not None:
        _check_tensor(out, "out", fn, dtypes=(values.dtype,), dim=2, align=16)
        if tuple(out.shape) != (m, k):
            raise FormatError(f"{fn}: out has shape {tuple(out.shape)}, expected {(m, k)}")
        _same_device(fn, values=values, out=out)
    if not _use_kernel(values):
        dense = decompress24_reference(values, meta, k)
        if out is not None:
            out.copy_(dense)
            return out
        return dense
    dense = out if out is not None else torch.empty(m, k, dtype=values.dtype, device=values.device)
    kernel = load_kernel(PRUNE24_SPEC, f"prune24_decompress<{_PRUNE_DTYPES[values.dtype]}>", values.device.index)
    grid, block = _prune_grid(m, k)
    kernel(grid, block, values, meta, dense, m, k)
    return dense


# ---------------------------------------------------------------------------------------------------------
# Transposable 2:4 masks (90-pattern argmax per 4x4 block)
# ---------------------------------------------------------------------------------------------------------

ROW_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def transposable_pattern_words() -> tuple[int, ...]:
    """The 90 patterns of ``TRANSPOSABLE_PATTERNS_24`` (runtime/transposable_mask.py, same order) as the
    kernel's table words: row ``r``'s column pair, as an index into :data:`ROW_PAIRS`, in bits 4r..4r+3."""
    words = []
    for pattern in TRANSPOSABLE_PATTERNS_24:
        word = 0
        for r in range(4):
            cols = tuple(int(c) for c in pattern[r].nonzero().flatten())
            word |= ROW_PAIRS.index(cols) << (4 * r)
        words.append(word)
    return tuple(words)


def transposable_mask(weight: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Transposable 2:4 mask of ``weight [R, C]``: per 4x4 block the pattern (two ones in every row and
    column) maximising the kept sum of |w|, so the mask is 2:4 along K for ``W`` and for ``W^T``.

    Args:
        weight: fp32/bf16/fp16 ``[R, C]``, contiguous, ``R % 4 == 0``, ``C % 4 == 0``, 16-byte aligned (fp32)
            or 8-byte aligned (16-bit).
        out: optional uint8 ``[R, C]`` (contiguous, 4-byte aligned) receiving the mask as 0/1.
    Returns:
        bool ``[R, C]`` on weight's device: the CUDA kernel on a usable GPU (float32 scores summed as
        ``((s0 + s1) + s2) + s3``, ``s_r = |a| + |b|``, compared with their low 6 mantissa bits cleared, first
        maximum in the order of ``TRANSPOSABLE_PATTERNS_24``: the same mask as the CPU loop of
        runtime/transposable_mask_cpu.py), otherwise ``transposable_24_mask`` of runtime/transposable_mask.py
        (Hu et al., ICML 2024). Both are tested against the literal reference
        ``transposable_24_mask_reference`` (equal up to near-ties).
    """
    fn = "transposable_mask"
    align = 16 if weight.dtype == torch.float32 else 8
    _check_tensor(weight, "weight", fn, dtypes=_MASK_DTYPES, dim=2, align=align)
    r, c = weight.shape
    if r == 0 or r % 4 or c == 0 or c % 4:
        raise FormatError(f"{fn}: weight has shape {(r, c)}; both dimensions must be positive multiples of 4 "
                          "(4x4 blocks)")
    if out is not None:
        _check_tensor(out, "out", fn, dtypes=(torch.uint8,), dim=2, align=4)
        if tuple(out.shape) != (r, c):
            raise FormatError(f"{fn}: out has shape {tuple(out.shape)}, expected {(r, c)}")
        _same_device(fn, weight=weight, out=out)
    if not _use_kernel(weight):
        mask = transposable_24_mask(weight, name="weight")
        if out is not None:
            out.copy_(mask)
            return out.view(torch.bool)
        return mask
    mask = out if out is not None else torch.empty(r, c, dtype=torch.uint8, device=weight.device)
    kernel = load_kernel(TRANSPOSABLE_MASK_SPEC, f"transposable_mask24<{_MASK_DTYPES[weight.dtype]}>",
                         weight.device.index)
    blocks = (r // 4) * (c // 4)
    kernel((blocks + 255) // 256, 256, weight, mask, r, c)
    return mask.view(torch.bool)
