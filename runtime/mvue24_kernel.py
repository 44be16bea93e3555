"""MVUE24 of the output gradient, written straight into the 2:4 sparse GEMM's operand (``cuda/mvue24_compress.cu``).

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024, §4.2 (after
Chmiel et al., "Minimum Variance Unbiased N:M Sparsity for the Neural Gradients", ICLR 2023): the weight gradient
``∇W = ∇Zᵀ · X`` samples ``∇Zᵀ [N, T]`` 2:4 along the token dimension T with MVUE24, so that GEMM runs on the
sparse tensor cores. :func:`mvue24_compress_t` does the sampling and the compression in one pass: it reads
``∇Z [T, N]`` (token-major, as autograd hands it over) and returns a
:class:`~sparsert.runtime.sparse_gemm.Sparse24Weight` with ``out_features = N``, ``in_features = T``, so
``sparse24_linear(Xᵀ, op)`` (``Xᵀ`` contiguous ``[K, T]``) gives ``∇Wᵀ [K, N]``. :func:`mvue24_sample_t` draws
the same sample as a dense ``[N, T]`` tensor (one read of ``∇Z``, one write), for GEMM libraries that compress
their own operand (cuSPARSELt).

The law is train/mvue24.py's (that module is the training-side CPU implementation; ``runtime`` does not import
``train``, so the sampler is restated here and the tests check the two agree draw for draw): per group of four
tokens of one column, the first survivor ``i1`` with probability ``|x_i| / S``, the second among the rest with
probability ``|x_j| / (S − |x_i1|)``, both from one uniform (the first draw's residual drives the second);
survivors divided by their inclusion probability ``π_j``, i.e. written as ``sign(x_j) · S · (1 / D_j)`` with
``D_j = 1 + Σ_{i≠j} r_i``, ``r_i = |x_i| / Σ_{k≠i} |x_k|``. Float32 arithmetic, one operation at a time in the
kernel's order (no fused multiply-add), rounded once to the GEMM dtype. Zero groups stay zero; a lone non-zero
is kept unscaled; a group whose magnitude sum is not finite becomes NaN in columns 0 and 1 (non-finite
gradients stay visible to loss scaling); as in train/mvue24.py, pair sums are floored at the smallest normal
float, so only groups of subnormals (pair sums below 1.2e-38) get approximate inclusion probabilities.
Stored columns: the non-zeros, filled up to two with the lowest free columns (``runtime/sparse24.compress_24``'s
rule); padding rows ``N .. Npad−1`` are zero with columns (0, 1).

Random numbers: Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; the generator behind cuRAND and PyTorch's CUDA RNG), stateless: group ``(q, n)`` (tokens
``4q .. 4q+3`` of column ``n``) has index ``g = q·N + n`` and takes word ``g % 4`` of Philox with counter
``(c mod 2³², c div 2³², 0, 0)``, ``c = offset/4 + g div 4``, and key ``(seed mod 2³², seed div 2³²)``; its
uniform is ``(word >> 8) · 2⁻²⁴`` in [0, 1). A call consumes ``T·N/4`` indices from ``offset`` (a multiple of 4),
so the rows ``T0..T1`` of a larger gradient sampled with ``offset + T0·N/4`` draw exactly what they draw inside
the whole. :func:`philox4x32_10` and :func:`mvue24_uniforms` compute the same numbers in torch integer ops
(every product split into 16-bit halves, nothing overflows int64).
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from sparsert.runtime.errors import ConfigError, DeviceError, FormatError
from sparsert.runtime.kernel_build import KernelSpec, load_kernel, register_kernel
from sparsert.runtime.kernels import _check_tensor, _same_device, _use_kernel
from sparsert.runtime.packed_linear import PackedLinear
from sparsert.runtime.sparse24 import compress_24
from sparsert.runtime.sparse_gemm import ROW_PAD, Sparse24Weight, prepare_sparse24
from sparsert.runtime.sparse_meta import meta_shape

__all__ = ["MVUE24_SPEC", "philox4x32_10", "mvue24_uniforms", "mvue24_sample_t_reference",
           "mvue24_compress_t_reference", "mvue24_compress_t", "mvue24_sample_t"]

MVUE24_SPEC = register_kernel("mvue24_compress", KernelSpec(
    source="mvue24_compress.cu",
    name_expressions=("mvue24_compress<bf16_bits>", "mvue24_compress<f16_bits>", "mvue24_sample_dense<bf16_bits>",
                      "mvue24_sample_dense<f16_bits>"),
))
_KERNEL_TYPES = {torch.bfloat16: "bf16_bits", torch.float16: "f16_bits"}
TILE_ROWS = 128  # rows (columns of ∇Z) per CTA: 8 metadata blocks
TILE_TOKENS = 64  # tokens per CTA: one metadata block column
THREADS = 128

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments
_MASK32 = 0xFFFFFFFF
_TINY = torch.finfo(torch.float32).tiny
_BELOW_ONE = 1.0 - 2.0 ** -24


# ---------------------------------------------------------------------------------------------------------
# Philox-4x32-10 in torch integer ops
# ---------------------------------------------------------------------------------------------------------

def _mulhilo32(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of ``m · x`` for a 32-bit constant ``m`` and int64 ``x`` in [0, 2³²), from two
    products of at most 48 bits (no int64 overflow)."""
    p_lo = (x & 0xFFFF) * m
    p_hi = (x >> 16) * m  # m·x = p_hi·2¹⁶ + p_lo
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32_10(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox-4x32-10 (Random123's ``philox4x32_R(10, ...)``) of int64 ``counter [..., 4]`` (words in [0, 2³²))
    under ``key = (k0, k1)`` (Python ints in [0, 2³²)) -> int64 ``[..., 4]`` words in [0, 2³²), on counter's
    device."""
    if not isinstance(counter, torch.Tensor) or counter.dtype != torch.int64 or counter.dim() == 0 \
            or counter.shape[-1] != 4:
        raise FormatError(f"philox4x32_10: counter must be an int64 tensor [..., 4], got "
                          f"{getattr(counter, 'dtype', type(counter).__name__)} {tuple(getattr(counter, 'shape', ()))}")
    k0, k1 = (int(k) for k in key)
    if not (0 <= k0 <= _MASK32 and 0 <= k1 <= _MASK32):
        raise ConfigError(f"philox4x32_10: key words must be in [0, 2**32), got {key}")
    c0, c1, c2, c3 = counter.unbind(-1)
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W[0]) & _MASK32
            k1 = (k1 + PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


def _check_rng(seed, offset, groups: int, fn: str) -> tuple[int, int]:
    values = []
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool):
            raise ConfigError(f"{fn}: {name} must be an int, got bool")
        try:
            v = operator.index(v)
        except TypeError:
            raise ConfigError(f"{fn}: {name} must be an int, got {type(v).__name__}") from None
        if not 0 <= v < 2**64:
            raise ConfigError(f"{fn}: {name}={v} must be in [0, 2**64)")
        values.append(v)
    seed, offset = values
    if offset % 4:
        raise ConfigError(f"{fn}: offset={offset} must be a multiple of 4 (one Philox block serves four groups)")
    if offset + groups > 2**64:
        raise ConfigError(f"{fn}: offset={offset} + {groups} groups runs past the 2**64 Philox counters")
    return seed, offset


def mvue24_uniforms(tokens: int, n: int, *, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """The uniforms MVUE24 draws for a ``∇Z [tokens, n]``: float32 ``[tokens/4, n]``, entry ``[q, c]`` for the
    group of tokens ``4q .. 4q+3`` of column ``c`` (module docstring), each in [0, 1) with 24 random bits.

    ``tokens % 4 == 0``, ``n % 4 == 0``; ``seed``, ``offset`` as for :func:`mvue24_compress_t`.
    """
    fn = "mvue24_uniforms"
    if tokens <= 0 or tokens % 4 or n <= 0 or n % 4:
        raise FormatError(f"{fn}: tokens={tokens} and n={n} must be positive multiples of 4")
    seed, offset = _check_rng(seed, offset, tokens // 4 * n, fn)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    q = torch.arange(tokens // 4, dtype=torch.int64, device=dev).view(-1, 1)
    k = torch.arange(n // 4, dtype=torch.int64, device=dev).view(1, -1)
    c = (q * (n // 4) + k) + offset // 4  # < 2**62
    zeros = torch.zeros_like(c)
    words = philox4x32_10(torch.stack([c & _MASK32, c >> 32, zeros, zeros], dim=-1), (seed & _MASK32, seed >> 32))
    return ((words >> 8).to(torch.float32) * 2.0 ** -24).reshape(tokens // 4, n)


# ---------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------

def _check_grad(grad, fn: str) -> tuple[int, int]:
    _check_tensor(grad, "grad", fn, dtypes=_KERNEL_TYPES, dim=2, align=8)
    t, n = grad.shape
    if t <= 0 or t % TILE_TOKENS:
        raise FormatError(f"{fn}: grad [T, N] has T={t} tokens; T must be a positive multiple of {TILE_TOKENS} "
                          "(one metadata block of the [N, T] operand): pad it with zero tokens, which add nothing "
                          "to the weight gradient")
    if n <= 0 or n % 8:
        raise FormatError(f"{fn}: grad [T, N] has N={n} columns; N must be a positive multiple of 8 (the sparse "
                          "GEMM's 16-byte output rows)")
    return t, n


# ---------------------------------------------------------------------------------------------------------
# Torch reference (and CPU fallback)
# ---------------------------------------------------------------------------------------------------------

def _sample(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """MVUE24 of ``x [T, N]`` (bf16/fp16) along T, group ``(q, n)`` drawn with ``u[q, n]`` (float32
    ``[T/4, N]``) -> ``[T, N]`` in x's dtype. The kernel's ``mvue24_group``, operation for operation."""
    t_len, n = x.shape
    xf = x.reshape(t_len // 4, 4, n).float()
    a0, a1, a2, a3 = xf.abs().unbind(1)  # each [T/4, N]
    c1 = a0 + a1
    c2 = c1 + a2
    s = c2 + a3
    # First draw: i1 = the first j with t < c_j.
    t = u * s
    l0, l1, l2 = t < a0, t < c1, t < c2
    i1 = 3 - (l0.to(torch.int8) + l1.to(torch.int8) + l2.to(torch.int8))
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    # Running sums without entry i1, and L1 = c_{i1-1}.
    d0 = torch.where(l0, zero, a0)
    d1 = torch.where(l0, a1, torch.where(l1, a0, c1))
    d2 = torch.where(l0, a1 + a2, torch.where(l1, a0 + a2, torch.where(l2, c1, c2)))
    s2 = torch.where(l2, d2 + a3, c2)
    lo = torch.where(l0, zero, torch.where(l1, a0, torch.where(l2, c1, c2)))
    # Second draw from the residual of the first.
    w = (s - s2).clamp(min=_TINY)
    t2 = ((t - lo) / w).clamp(0.0, _BELOW_ONE) * s2
    m0, m1, m2, has2 = t2 < d0, t2 < d1, t2 < d2, t2 < s2
    i2 = 3 - (m0.to(torch.int8) + m1.to(torch.int8) + m2.to(torch.int8))
    # D_j from pair sums (never S − a_j), survivors S · (1/D_j).
    p01 = c1.clamp(min=_TINY)
    p23 = (a2 + a3).clamp(min=_TINY)
    r0, r1, r2, r3 = a0 / (a1 + p23), a1 / (a0 + p23), a2 / (a3 + p01), a3 / (a2 + p01)
    n01 = (r0 + r1) + 1.0
    n23 = (r2 + r3) + 1.0
    dd = torch.stack([r1 + n23, r0 + n23, r3 + n01, r2 + n01], dim=1)  # [T/4, 4, N]
    scaled = torch.div(torch.ones((), dtype=torch.float32, device=x.device), dd) * s.unsqueeze(1)
    j = torch.arange(4, device=x.device, dtype=torch.int8).view(1, 4, 1)
    kept = (j == i1.unsqueeze(1)) | (has2.unsqueeze(1) & (j == i2.unsqueeze(1)))
    out = torch.where(kept, scaled * torch.sign(xf), zero).to(x.dtype)
    zero16 = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.where(out != 0, out, zero16)  # -0 -> +0
    bad = ~torch.isfinite(s)  # inf/NaN in the group: NaN in columns 0, 1
    if bool(bad.any()):
        nan_cols = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device=x.device).view(1, 4, 1)
        nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)  # torch's NaN bits in this dtype
        out = torch.where(bad.unsqueeze(1), torch.where(nan_cols, nan, zero16), out)
    return out.reshape(t_len, n)


def mvue24_sample_t_reference(grad: torch.Tensor, *, seed: int, offset: int = 0) -> torch.Tensor:
    """The sampled operand ``MVUE24(∇Zᵀ)`` as a dense tensor: ``grad [T, N]`` bf16/fp16 (checked as
    :func:`mvue24_compress_t` checks it) -> ``[N, T]`` in grad's dtype, at most two non-zeros per group of four
    consecutive tokens, ``E[out] = ∇Zᵀ`` (up to the rounding to grad's dtype). Torch ops on grad's device."""
    fn = "mvue24_sample_t_reference"
    t, n = _check_grad(grad, fn)
    seed, offset = _check_rng(seed, offset, t // 4 * n, fn)
    u = mvue24_uniforms(t, n, seed=seed, offset=offset, device=grad.device)
    return _sample(grad, u).t().contiguous()


def mvue24_compress_t_reference(grad: torch.Tensor, *, seed: int, offset: int = 0) -> Sparse24Weight:
    """Torch reference of :func:`mvue24_compress_t` (also its fallback without a GPU):
    :func:`mvue24_sample_t_reference`, ``compress_24`` (its column choice) and ``prepare_sparse24`` (rows padded
    to ``ROW_PAD``, A-fragment order, mma.sp metadata). Compressed on the int16 bit patterns, so NaN payloads
    pass through unchanged (torch's bfloat16 ``gather`` rewrites them)."""
    name = "MVUE24(grad)^T"
    dense_t = mvue24_sample_t_reference(grad, seed=seed, offset=offset)  # -0 is already +0: bits != 0 <=> x != 0
    values, indices = compress_24(dense_t.view(torch.int16), name=name)
    packed = PackedLinear(out_features=dense_t.shape[0], in_features=dense_t.shape[1], indices=indices,
                          values=values.view(grad.dtype))
    return prepare_sparse24(packed, dtype=grad.dtype, name=name)


# ---------------------------------------------------------------------------------------------------------
# The fused kernel
# ---------------------------------------------------------------------------------------------------------

def mvue24_compress_t(
    grad: torch.Tensor, *, seed: int, offset: int = 0, out_values: torch.Tensor | None = None,
    out_meta: torch.Tensor | None = None,
) -> Sparse24Weight:
    """MVUE24 of ``∇Zᵀ`` along the tokens, straight into the 2:4 sparse GEMM operand (Hu et al., ICML 2024).

    Args:
        grad: ``∇Z [T, N]`` bf16/fp16, contiguous (token-major), 8-byte aligned; ``T % 64 == 0``, ``N % 8 == 0``.
            Finite entries (a group holding inf/NaN is stored as NaN in columns 0, 1).
        seed: Philox key, an int in [0, 2⁶⁴).
        offset: index of the first group in the Philox stream (a multiple of 4; a call uses ``T·N/4``).
        out_values, out_meta: optional preallocated outputs on grad's device: ``[Npad/16, T/64, 2, 32, 8]`` in
            grad's dtype and int32 ``[Npad/16, T/64, 32]`` (``Npad`` = N rounded up to ``ROW_PAD``).
    Returns:
        :class:`Sparse24Weight` with ``out_features = N``, ``in_features = T``: the sampled ``[N, T]`` operand
        (at most two non-zeros per four consecutive tokens, ``E = ∇Zᵀ``) as kept values in A-fragment order and
        mma.sp metadata, rows padded to ``ROW_PAD``; no bias. On a CUDA tensor with a usable GPU the
        ``mvue24_compress`` kernel (one read of ∇Z, one write of the operand); otherwise
        :func:`mvue24_compress_t_reference`, which gives the same bits.
    Raises:
        FormatError for a bad ``grad`` or output, ConfigError for a bad ``seed``/``offset``.
    """
    fn = "mvue24_compress_t"
    t, n = _check_grad(grad, fn)
    seed, offset = _check_rng(seed, offset, t // 4 * n, fn)
    n_pad = -(-n // ROW_PAD) * ROW_PAD
    vshape = (n_pad // 16, t // 64, 2, 32, 8)
    if out_values is not None:
        _check_tensor(out_values, "out_values", fn, dtypes=(grad.dtype,), dim=5, align=16)
        if tuple(out_values.shape) != vshape:
            raise FormatError(f"{fn}: out_values has shape {tuple(out_values.shape)}, expected {vshape}")
        _same_device(fn, grad=grad, out_values=out_values)
    if out_meta is not None:
        _check_tensor(out_meta, "out_meta", fn, dtypes=(torch.int32,), dim=3, align=16)
        if tuple(out_meta.shape) != meta_shape(n_pad, t):
            raise FormatError(f"{fn}: out_meta has shape {tuple(out_meta.shape)}, expected {meta_shape(n_pad, t)}")
        _same_device(fn, grad=grad, out_meta=out_meta)
    if not _use_kernel(grad):
        ref = mvue24_compress_t_reference(grad, seed=seed, offset=offset)
        if out_values is not None:
            ref.values = out_values.copy_(ref.values)
        if out_meta is not None:
            ref.meta = out_meta.copy_(ref.meta)
        return ref
    if n_pad % TILE_ROWS:
        raise DeviceError(f"{fn}: the kernel tiles {TILE_ROWS} rows per CTA but ROW_PAD={ROW_PAD}")
    values = out_values if out_values is not None else torch.empty(vshape, dtype=grad.dtype, device=grad.device)
    meta = out_meta if out_meta is not None else torch.empty(meta_shape(n_pad, t), dtype=torch.int32,
                                                             device=grad.device)
    kernel = load_kernel(MVUE24_SPEC, f"mvue24_compress<{_KERNEL_TYPES[grad.dtype]}>", grad.device.index)
    grid = (n_pad // TILE_ROWS) * (t // TILE_TOKENS)
    kernel(grid, THREADS, grad, values, meta, n, n_pad, t, np.uint64(seed), np.uint64(offset))
    return Sparse24Weight(out_features=n, in_features=t, values=values, meta=meta, bias=None)


def mvue24_sample_t(grad: torch.Tensor, *, seed: int, offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """The draw of :func:`mvue24_compress_t` (same ``grad``, ``seed``, ``offset``, same bits) as the dense sample.

    Args:
        grad: ``∇Z [T, N]`` bf16/fp16 as for :func:`mvue24_compress_t` (``T % 64 == 0``, ``N % 8 == 0``).
        seed, offset: as for :func:`mvue24_compress_t`.
        out: optional ``[N, T]`` output in grad's dtype on grad's device, contiguous, 16-byte aligned.
    Returns:
        ``S = MVUE24(∇Zᵀ)`` ``[N, T]`` in grad's dtype, row-major: at most two non-zeros per four consecutive
        tokens, at the compressed operand's columns (a non-finite group: NaN in its first two columns). On a CUDA
        tensor with a usable GPU the ``mvue24_sample_dense`` kernel; otherwise
        :func:`mvue24_sample_t_reference`, which gives the same bits.
    """
    fn = "mvue24_sample_t"
    t, n = _check_grad(grad, fn)
    seed, offset = _check_rng(seed, offset, t // 4 * n, fn)
    if out is not None:
        _check_tensor(out, "out", fn, dtypes=(grad.dtype,), dim=2, align=16)
        if tuple(out.shape) != (n, t):
            raise FormatError(f"{fn}: out has shape {tuple(out.shape)}, expected {(n, t)}")
        _same_device(fn, grad=grad, out=out)
        g0, o0 = grad.data_ptr(), out.data_ptr()
        if g0 < o0 + out.numel() * out.element_size() and o0 < g0 + grad.numel() * grad.element_size():
            raise FormatError(f"{fn}: out overlaps grad in memory (the kernel reads grad while it writes out)")
    if not _use_kernel(grad):
        ref = mvue24_sample_t_reference(grad, seed=seed, offset=offset)
        return ref if out is None else out.copy_(ref)
    dense = out if out is not None else torch.empty(n, t, dtype=grad.dtype, device=grad.device)
    n_pad = -(-n // TILE_ROWS) * TILE_ROWS  # the grid covers whole row tiles; rows >= N are not written
    kernel = load_kernel(MVUE24_SPEC, f"mvue24_sample_dense<{_KERNEL_TYPES[grad.dtype]}>", grad.device.index)
    kernel((n_pad // TILE_ROWS) * (t // TILE_TOKENS), THREADS, grad, dense, n, n_pad, t, np.uint64(seed),
           np.uint64(offset))
    return dense
