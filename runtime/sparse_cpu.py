"""2:4 and 2:4+INT4 linear products on the CPU, read straight from the stored tensors: what a swapped layer
(:class:`~sparsert.runtime.dispatch.SparseLinearGPU`) runs when it lives on the CPU.

The GPU kernels' torch fallbacks (``sparse_gemm._fallback``) decompress the whole weight on every call. That is
the right reference for the kernels' tests, but on a decode step (one token) the decompression costs 10-15x the
product itself. Here a numba loop walks each row's kept values and their 2-bit indices and multiplies them with
the input columns they select: about half the multiply-adds of the dense product, and no dense weight built.
For more than :data:`DIRECT_MAX_TOKENS` tokens a compiled pass decompresses the weight, one block of rows (about
4 MB of float32) at a time, and torch's float32 matmul multiplies each block (the decompression is then small next
to the product, and no dense copy of the whole weight is ever held).

The function computed is the GPU kernels' (``sparse_gemm.sparse24_linear`` / ``w4a16_linear``), so a model checked
on the CPU computes what it will compute on the GPU: ``y = x @ W^T + bias`` with x already rounded to ``dtype``
(bf16 or fp16), fp32 accumulation, and W's kept values as the kernels see them: the stored values rounded to
``dtype`` (2:4), or ``round_dtype(code * round_dtype(scale))`` (2:4 + INT4, the kernels' register
dequantisation). The rounding is round-to-nearest-even, done on float32 bits; products ``code * scale`` are exact
in float32 (at most 15 significant bits).

The prepared weight (:class:`CpuPackedWeight`) holds the stored tensors themselves, shared with the
:class:`~sparsert.runtime.packed_linear.PackedLinear` where their dtype allows: ``indices`` uint8
``[N, ceil(K/8)]`` and either ``values`` (the kept values as stored, float32/fp16/bf16 ``[N, K/2]``, rounded to
``dtype`` in the loop) or ``qweight`` uint8 ``[N, K/4]`` + ``scales`` (their fp16/bf16 bits, int16 ``[N, K/g]``,
rounded to ``dtype`` in the loop): 9 bits per weight for 2:4 with 16-bit values (17 with float32 ones), 3.125 for
2:4 + INT4 g128.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from sparsert.runtime import cpu_jit
from sparsert.runtime.cpu_jit import cpu_kernel, f32_as_u32, numba_available, u32_as_f32
from sparsert.runtime.errors import FormatError
from sparsert.runtime.int4 import unpack_int4
from sparsert.runtime.packed_linear import PackedLinear
from sparsert.runtime.sparse24 import decompress_24

__all__ = ["CpuPackedWeight", "prepare_cpu", "cpu_linear", "DIRECT_MAX_TOKENS", "CPU_DTYPES"]

CPU_DTYPES = (torch.bfloat16, torch.float16)
DIRECT_MAX_TOKENS = 8  # up to this many tokens the sparse loop; above, decompress once and matmul
_PARALLEL_MIN_WEIGHTS = 1 << 18  # below this many weights per call, one thread (a pool round trip costs ~50 us)
_FP16 = 1  # dtype codes the loops take
_BF16 = 0


@dataclass
class CpuPackedWeight:
    """A 2:4 (optionally INT4) weight ``W [out_features, in_features]`` prepared for :func:`cpu_linear`.

    Attributes:
        dtype: bf16 or fp16, the activation dtype the product rounds x and the kept values to.
        indices: uint8 ``[N, ceil(K/8)]``, the stored 2-bit indices (:mod:`sparsert.runtime.sparse24`).
        values: float32/fp16/bf16 ``[N, K/2]``, the kept values as stored (2:4 without INT4), else None.
        qweight: uint8 ``[N, ceil(K/4)]``, packed INT4 codes of the kept values (:mod:`.int4`), else None.
        scales: int16 ``[N, K/g]``, the scales' bits in ``scales_dtype`` (INT4), else None.
        scales_dtype: fp16 or bf16: the stored scales' dtype (the loops round them to ``dtype`` as the GPU
            preparation does), else None.
        group_size: the INT4 group along the original K (g), else None.
        bias: fp32 ``[N]`` or None.
    """

    out_features: int
    in_features: int
    dtype: torch.dtype
    indices: torch.Tensor
    values: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    scales_dtype: torch.dtype | None = None
    group_size: int | None = None
    bias: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.qweight is not None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_loops"}  # views of this process's memory

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def nbytes(self) -> int:
        """Bytes of the weight tensors (bias excluded)."""
        held = (self.indices, self.values, self.qweight, self.scales)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def kept_values(self) -> torch.Tensor:
        """float32 ``[N, K/2]``: the kept values as the product uses them (rounded to ``dtype``)."""
        if not self.quantized:
            return self.values.to(self.dtype).float()
        codes = unpack_int4(self.qweight, self.in_features // 2).float()
        scale = self.scales.view(self.scales_dtype).to(self.dtype).float()
        per_kept = scale.repeat_interleave(int(self.group_size) // 2, dim=1)
        return (codes * per_kept).to(self.dtype).float()

    def to_dense(self) -> torch.Tensor:
        """float32 ``[N, K]``, the weight the product uses (torch ops; the reference for the compiled loops)."""
        return decompress_24(self.kept_values(), self.indices, self.in_features)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 tensor's bits as int16 (numba reads no 16-bit floats; the loops take them as uint16)."""
    return t.contiguous().view(torch.int16)


def prepare_cpu(packed: PackedLinear, dtype: torch.dtype = torch.bfloat16, *, name: str = "weight") -> CpuPackedWeight:
    """PackedLinear (2:4, optionally INT4; on the CPU) -> :class:`CpuPackedWeight` for activations of ``dtype``.

    Shares ``packed``'s indices, kept values, codes and fp16/bf16 scales (the loops round values and scales to
    ``dtype`` as the GPU kernels' preparation does; float32 scales are rounded here). FormatError for a dense
    layer or a dtype other than bf16/fp16.
    """
    if dtype not in CPU_DTYPES:
        raise FormatError(f"prepare_cpu: {name}: dtype must be bfloat16 or float16, got {dtype}")
    if not isinstance(packed, PackedLinear) or not packed.sparse:
        raise FormatError(f"prepare_cpu: {name} must be a 2:4 PackedLinear")
    packed.validate(name)
    if packed.quantized and int(packed.group_size) % 4:
        raise FormatError(f"prepare_cpu: {name}: INT4 group size must be a multiple of 4 (whole groups of four "
                          f"columns), got {packed.group_size}")
    cpu = torch.device("cpu")
    bias = None if packed.bias is None else packed.bias.to(cpu, torch.float32).contiguous()
    common = dict(out_features=packed.out_features, in_features=packed.in_features, dtype=dtype,
                  indices=packed.indices.to(cpu).contiguous(), bias=bias)
    if packed.quantized:
        scales = packed.scales.to(cpu)
        if scales.dtype not in CPU_DTYPES:  # float32 scales: rounded to dtype here, once
            scales = scales.to(dtype)
        return CpuPackedWeight(**common, qweight=packed.qweight.to(cpu).contiguous(), scales=_bits(scales),
                               scales_dtype=scales.dtype, group_size=int(packed.group_size))
    return CpuPackedWeight(**common, values=packed.values.to(cpu).contiguous())


# ---------------------------------------------------------------------------------------------------------
# Compiled loops
# ---------------------------------------------------------------------------------------------------------


def _stored(values, lut, n, j):  # noqa: ANN001 - numba helper (specialised per dtype below)
    """Kept value ``j`` of row ``n`` as stored, float32: ``values`` float32 itself, or uint16 bits through ``lut``."""
    return values[n, j] if values.dtype == np.float32 else lut[values[n, j]]


if cpu_jit.numba is not None:  # registered whenever numba imports (SPARSERT_NO_NUMBA only skips the loops)
    from numba.core import types as _nb_types
    from numba.extending import overload

    @overload(_stored, inline="always")
    def _stored_compiled(values, lut, n, j):  # noqa: ANN001, ANN202 - chosen when the loop is compiled
        if values.dtype == _nb_types.float32:
            return lambda values, lut, n, j: values[n, j]
        return lambda values, lut, n, j: lut[values[n, j]]


def _kept(values, lut, rounds, dt, n, j):  # noqa: ANN001 - numba helper
    """Kept value ``j`` of row ``n`` as the product uses it: the stored value, rounded to ``dtype`` when it is
    stored in another dtype (``rounds``)."""
    v = _stored(values, lut, n, j)
    return _round_to_dtype(v, dt) if rounds else v


def _round_to_dtype(v, dt):  # noqa: ANN001 - numba helper
    """float32 ``v`` rounded to bf16 (``dt`` 0) or fp16 (1) precision, round-to-nearest-even, as float32."""
    b = f32_as_u32(v)
    if dt == 0:
        if (b & 0x7F800000) == 0x7F800000:  # NaN/Inf stay
            return v
        return u32_as_f32(np.uint32((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000))
    a = abs(v)
    if a >= 6.103515625e-05:  # fp16 normal range: 11 significant bits
        if a < 65520.0:
            return u32_as_f32(np.uint32((b + 0x0FFF + ((b >> 13) & 1)) & 0xFFFFE000))
        return v if v != v else (np.float32(np.inf) if v > 0 else np.float32(-np.inf))
    return np.float32(np.rint(np.float64(v) * 16777216.0) / 16777216.0)  # fp16 subnormals: multiples of 2^-24


def _int4_table(scale, dt, table):  # noqa: ANN001 - numba helper
    """``table[c] = round_dtype(code(c) * scale)`` for the 16 nibbles c (code = c, or c - 16 from 8 up); the
    product is exact in float32, so this is one rounding."""
    if dt == 0:  # bf16 scale: a NaN/Inf product keeps its zero low half, so no special case (and no branch)
        for c in range(16):
            b = f32_as_u32(np.float32(c - 16 if c >= 8 else c) * scale)
            table[c] = u32_as_f32(np.uint32((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000))
    else:
        for c in range(16):
            table[c] = _round_to_dtype(np.float32(c - 16 if c >= 8 else c) * scale, dt)


# The loops below take a row range [r0, r1) (rows split across threads) and, for each group of four columns g,
# its two kept values (kept values 2g and 2g + 1) and their 2-bit indices: byte g // 2 of the row's indices, bits
# 4 (g % 2) .. 4 (g % 2) + 3. INT4 codes of kept values 2g and 2g + 1 are byte g of qweight (low, high nibble);
# an INT4 group spans ``gk`` kept values (gk even), i.e. gk / 2 groups of four.


def _product_rows_24(xt, values, lut, rounds, indices, dt, bias, y, r0, r1):  # noqa: ANN001
    """2:4: ``y[n, :] = sum over kept values w of w * xt[its column, :] (+ bias[n])``; xt float32 ``[K, M]``,
    values float32 or uint16 bits ``[N, K/2]`` (see :func:`_kept`), bias float32 ``[N]`` or empty, y float32
    ``[N, M]``."""
    groups, m_count = xt.shape[0] // 4, xt.shape[1]
    acc = np.empty(m_count, np.float32)
    for n in range(r0, r1):
        if m_count == 1:
            s = np.float32(0.0)
            for g in range(groups):
                b = indices[n, g >> 1] >> ((g & 1) * 4)
                s += (_kept(values, lut, rounds, dt, n, 2 * g) * xt[4 * g + (b & 3), 0]
                      + _kept(values, lut, rounds, dt, n, 2 * g + 1) * xt[4 * g + ((b >> 2) & 3), 0])
            y[n, 0] = s + bias[n] if bias.shape[0] else s
        else:
            acc[:] = 0.0
            for g in range(groups):
                b = indices[n, g >> 1] >> ((g & 1) * 4)
                c0, c1 = 4 * g + (b & 3), 4 * g + ((b >> 2) & 3)
                w0 = _kept(values, lut, rounds, dt, n, 2 * g)
                w1 = _kept(values, lut, rounds, dt, n, 2 * g + 1)
                for m in range(m_count):
                    acc[m] += w0 * xt[c0, m] + w1 * xt[c1, m]
            y[n, :] = acc
            if bias.shape[0]:
                y[n, :] += bias[n]


def _product_rows_int4(xt, qweight, scales, indices, scale_lut, gk, dt, bias, y, r0, r1):  # noqa: ANN001
    """2:4 + INT4: as :func:`_product_rows_24`, the kept values ``round_dtype(code * round_dtype(scale))``;
    qweight uint8 ``[N, K/4]``, scales uint16 ``[N, K/(2 gk)]`` (bits whose values ``scale_lut`` gives)."""
    m_count, per_group = xt.shape[1], gk // 2
    table = np.zeros(16, np.float32)
    acc = np.empty(m_count, np.float32)
    for n in range(r0, r1):
        s = np.float32(0.0)
        acc[:] = 0.0
        for q in range(scales.shape[1]):
            _int4_table(_round_to_dtype(scale_lut[scales[n, q]], dt), dt, table)
            if m_count == 1:
                for g in range(q * per_group, (q + 1) * per_group):
                    b = indices[n, g >> 1] >> ((g & 1) * 4)
                    code = qweight[n, g]
                    s += table[code & 15] * xt[4 * g + (b & 3), 0] + table[code >> 4] * xt[4 * g + ((b >> 2) & 3), 0]
            else:
                for g in range(q * per_group, (q + 1) * per_group):
                    b = indices[n, g >> 1] >> ((g & 1) * 4)
                    c0, c1 = 4 * g + (b & 3), 4 * g + ((b >> 2) & 3)
                    code = qweight[n, g]
                    w0, w1 = table[code & 15], table[code >> 4]
                    for m in range(m_count):
                        acc[m] += w0 * xt[c0, m] + w1 * xt[c1, m]
        if m_count == 1:
            y[n, 0] = s + bias[n] if bias.shape[0] else s
        else:
            y[n, :] = acc
            if bias.shape[0]:
                y[n, :] += bias[n]


def _dense_rows_24(values, lut, rounds, indices, dt, dense, r0, r1):  # noqa: ANN001
    """2:4: rows ``r0 <= n < r1`` of the weight as dense float32 into ``dense [N, K]``."""
    for n in range(r0, r1):
        dense[n, :] = 0.0
        for g in range(dense.shape[1] // 4):
            b = indices[n, g >> 1] >> ((g & 1) * 4)
            dense[n, 4 * g + (b & 3)] = _kept(values, lut, rounds, dt, n, 2 * g)
            dense[n, 4 * g + ((b >> 2) & 3)] = _kept(values, lut, rounds, dt, n, 2 * g + 1)


def _dense_rows_int4(qweight, scales, indices, scale_lut, gk, dt, dense, r0, r1):  # noqa: ANN001
    """2:4 + INT4: rows ``r0 <= n < r1`` of the weight as dense float32 into ``dense [N, K]``."""
    per_group = gk // 2
    table = np.zeros(16, np.float32)
    for n in range(r0, r1):
        dense[n, :] = 0.0
        for q in range(scales.shape[1]):
            _int4_table(_round_to_dtype(scale_lut[scales[n, q]], dt), dt, table)
            for g in range(q * per_group, (q + 1) * per_group):
                b = indices[n, g >> 1] >> ((g & 1) * 4)
                code = qweight[n, g]
                dense[n, 4 * g + (b & 3)] = table[code & 15]
                dense[n, 4 * g + ((b >> 2) & 3)] = table[code >> 4]


_kept = cpu_kernel(_kept, inline=True)
_round_to_dtype = cpu_kernel(_round_to_dtype, inline=True)
_int4_table = cpu_kernel(_int4_table, inline=True)
_product_rows_24 = cpu_kernel(_product_rows_24)
_product_rows_int4 = cpu_kernel(_product_rows_int4)
_dense_rows_24 = cpu_kernel(_dense_rows_24)
_dense_rows_int4 = cpu_kernel(_dense_rows_int4)

# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

_LUTS: dict[torch.dtype, np.ndarray] = {}
_POOL: ThreadPoolExecutor | None = None
_POOL_PID = 0
_POOL_LOCK = threading.Lock()
_BLOCK = threading.local()
_NO_BIAS = np.zeros(0, np.float32)

_BLOCK_FLOATS = 1 << 20  # rows decompressed at a time for M > DIRECT_MAX_TOKENS: about 4 MB of float32


def _lut(dtype: torch.dtype) -> np.ndarray:
    """float32 [65536]: the value of every ``dtype`` bit pattern."""
    if dtype not in _LUTS:
        patterns = torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.int16))
        _LUTS[dtype] = patterns.view(dtype).float().numpy()
    return _LUTS[dtype]


def _pool(threads: int) -> ThreadPoolExecutor:
    """The worker threads (grown to ``threads``; made again in a forked child, which inherits no threads)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid() or _POOL._max_workers < threads:  # noqa: SLF001
            _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sparsert-cpu"), os.getpid()
        return _POOL


def _run_rows(kernel, n: int, k: int, m: int, *args) -> None:  # noqa: ANN001
    """``kernel(*args, r0, r1)`` over all ``n`` rows, split across torch's intra-op thread count when the call is
    large enough to pay for it (the loops release the GIL)."""
    threads = min(torch.get_num_threads(), max(1, n // 16))
    if threads <= 1 or n * k * max(1, min(m, 8)) < _PARALLEL_MIN_WEIGHTS:
        kernel(*args, 0, n)
        return
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [_pool(threads).submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(threads)]
    for f in futures:
        f.result()


def _loops(weight: CpuPackedWeight, product: bool, rows: slice | None = None) -> tuple:
    """The compiled loop for ``weight``'s format (the product or the dense weight) and its leading arguments, for
    the weight's ``rows`` (the loop's row 0 is the first of them; all rows: kept on the weight for its next call)."""
    if rows is None:
        # Kept with the addresses it was made for: torch may move a tensor's storage (share_memory_() when the
        # weight is sent to another process), and a numpy view of the old storage would read freed memory.
        where = tuple(t.data_ptr() for t in (weight.indices, weight.values, weight.qweight, weight.scales)
                      if t is not None)
        cached = weight.__dict__.get("_loops")
        if cached is None or cached[0] != where:
            cached = weight.__dict__["_loops"] = (where, {})
        if product not in cached[1]:
            cached[1][product] = _loops(weight, product, slice(None))
        return cached[1][product]
    dt = _FP16 if weight.dtype == torch.float16 else _BF16
    indices = weight.indices.numpy()[rows]
    if weight.quantized:
        scales = weight.scales.numpy().view(np.uint16)[rows]
        args = (weight.qweight.numpy()[rows], scales, indices, _lut(weight.scales_dtype), int(weight.group_size) // 2,
                dt)
        return (_product_rows_int4 if product else _dense_rows_int4), args
    values = weight.values
    if values.dtype == torch.float32:
        args = (values.numpy()[rows], _lut(weight.dtype))
    else:
        args = (values.view(torch.int16).numpy().view(np.uint16)[rows], _lut(values.dtype))
    args += (values.dtype != weight.dtype, indices, dt)
    return (_product_rows_24 if product else _dense_rows_24), args


def dense_weight_cpu(weight: CpuPackedWeight) -> torch.Tensor:
    """float32 ``[N, K]``: the weight the product uses (compiled when numba is available)."""
    if not numba_available():
        return weight.to_dense()
    n, k = weight.out_features, weight.in_features
    dense = np.empty((n, k), np.float32)
    loop, args = _loops(weight, product=False)
    _run_rows(loop, n, k, 1, *args, dense)
    return torch.from_numpy(dense)


def _block_buffer(size: int) -> np.ndarray:
    """This thread's float32 buffer for one block of decompressed rows (reused: fresh pages cost more to fault in
    than the decompression that fills them)."""
    held = getattr(_BLOCK, "buffer", None)
    if held is None or held.size < size:
        held = _BLOCK.buffer = np.empty(size, np.float32)
    return held[:size]


def _product_by_blocks(xf: torch.Tensor, weight: CpuPackedWeight) -> torch.Tensor:
    """``xf [M, K] @ W^T`` (float32): W decompressed one block of rows at a time (:data:`_BLOCK_FLOATS`)."""
    m, n, k = xf.shape[0], weight.out_features, weight.in_features
    rows = max(16, _BLOCK_FLOATS // k)
    yt = xf.new_empty(n, m)  # Y^T: each block's product is a contiguous run of its rows
    buffer = _block_buffer(min(rows, n) * k)
    xt = xf.t()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        block = buffer[: (r1 - r0) * k].reshape(r1 - r0, k)
        loop, args = _loops(weight, product=False, rows=slice(r0, r1))
        _run_rows(loop, r1 - r0, k, 1, *args, block)
        torch.mm(torch.from_numpy(block), xt, out=yt[r0:r1])
    return yt.t().contiguous()


def cpu_linear(x: torch.Tensor, weight: CpuPackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` (CPU, float; rounded to ``weight.dtype`` first) -> ``x @ W^T + bias`` as ``[M, N]`` in
    ``weight.dtype``, fp32 accumulation (see the module docstring). ``bias``: fp32 ``[N]``, default the weight's."""
    if x.dim() != 2 or x.shape[1] != weight.in_features or not x.is_floating_point() or x.device.type != "cpu":
        raise FormatError(f"cpu_linear: x must be a floating CPU tensor [M, {weight.in_features}], got {x.dtype} "
                          f"{list(x.shape)} on {x.device}")
    bias = weight.bias if bias is None else bias
    m, n, k = x.shape[0], weight.out_features, weight.in_features
    xf = x.detach().to(weight.dtype).float()  # not differentiable here (SparseLinearGPU adds the gradient)
    if 0 < m <= DIRECT_MAX_TOKENS and numba_available():
        xt = (xf.view(k, 1) if m == 1 else xf.t().contiguous()).numpy()  # [K, M]: a column's tokens contiguous
        yt = np.empty((n, m), np.float32)
        loop, args = _loops(weight, product=True)
        _run_rows(loop, n, k, m, xt, *args, _NO_BIAS if bias is None else bias.detach().float().numpy(), yt)
        y = torch.from_numpy(yt)
        return (y.view(1, n) if m == 1 else y.t().contiguous()).to(weight.dtype)
    with torch.autocast("cpu", enabled=False):  # float32 products, whatever autocast region the caller is in
        if m == 0:
            y = xf.new_zeros(0, n)
        elif numba_available():
            y = _product_by_blocks(xf, weight)
        else:
            y = xf @ weight.to_dense().t()
        if bias is not None:
            y = y + bias
        return y.to(weight.dtype)
