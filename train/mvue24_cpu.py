"""MVUE24 sampling of one block of groups on CPU as one compiled loop (numba), draw for draw train/mvue24.py's.

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024, §4.2 (after
Chmiel et al., ICLR 2023). :func:`sparsert.train.mvue24._sample_block` computes the sampler as ~70 elementwise
torch passes over per-group rows; this module runs the same float32 operations in the same order, one group at a
time, in a loop LLVM vectorises (AVX2/AVX-512): the outputs are bit-identical (no fused multiply-add, no fast-math)
and the Hu recipe's weight-gradient sampling gets about 7× cheaper on one core. The torch version stays the
reference and the fallback when numba is missing (``available()`` says which runs).
"""

from __future__ import annotations

import numpy as np
import torch

from sparsert.runtime.cpu_jit import cpu_kernel, numba_available

__all__ = ["available", "sample_block_cpu"]

_TINY = np.float32(np.finfo(np.float32).tiny)
_BELOW_ONE = np.float32(1.0 - 2.0 ** -24)


def available() -> bool:
    """True when the compiled sampler can run (:func:`~sparsert.runtime.cpu_jit.numba_available`)."""
    return numba_available()


def _sample_rows(x0r, x1r, x2r, x3r, u, y0r, y1r, y2r, y3r):  # noqa: ANN001, PLR0913 - numba kernel
    """One row of groups: entry j of group c is ``xjr[c]``, its uniform ``u[c]``, its output ``yjr[c]`` (1-D
    contiguous float32 arrays, one per entry, so the loop vectorises). The statements follow
    train/mvue24._sample_block one operation at a time; see its comments for the why."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    tiny = _TINY
    below = _BELOW_ONE
    for c in range(u.shape[0]):
        x0 = x0r[c]
        x1 = x1r[c]
        x2 = x2r[c]
        x3 = x3r[c]
        a0 = abs(x0)
        a1 = abs(x1)
        a2 = abs(x2)
        a3 = abs(x3)
        c1 = a0 + a1
        c2 = c1 + a2
        s = c2 + a3
        t = u[c] * s
        k0 = one if t < a0 else zero  # first draw: l_j = [t < c_j]
        k1 = one if t < c1 else zero
        k2 = one if t < c2 else zero
        o1 = one if t >= c1 else zero
        o2 = one if t >= c2 else zero
        n1 = o1 + k0
        n2 = o2 + k1
        d0 = a0 - a0 * k0  # running sums without the first pick
        d1 = d0 + a1 * n1
        d2 = d1 + a2 * n2
        s2 = d2 + a3 * k2
        lo = d0 + a1 * o1
        lo = lo + a2 * o2
        ai = s - s2
        ai = tiny if ai < tiny else ai  # clamps as torch does: NaN stays NaN
        v = (t - lo) / ai  # the first draw's residual: the second uniform
        v = zero if v < zero else v
        v = below if v > below else v
        t2 = v * s2
        m0 = one if t2 < d0 else zero
        m1 = one if t2 < d1 else zero
        m2 = one if t2 < d2 else zero
        m3 = one if t2 < s2 else zero
        kk0 = k0 + m0
        kk1 = k1 + m1
        kk2 = k2 + m2
        kk3 = (m3 + one) - kk2
        kk2 = kk2 - kk1
        kk1 = kk1 - kk0
        p23 = a2 + a3
        p23 = tiny if p23 < tiny else p23
        p01 = tiny if c1 < tiny else c1
        r0 = a0 / (a1 + p23)
        r1 = a1 / (a0 + p23)
        r2 = a2 / (a3 + p01)
        r3 = a3 / (a2 + p01)
        e1 = (r0 + r1) + one
        e2 = (r2 + r3) + one
        w0 = kk0 / (r1 + e2) * s
        w1 = kk1 / (r0 + e2) * s
        w2 = kk2 / (r3 + e1) * s
        w3 = kk3 / (r2 + e1) * s
        # torch.sign(x)·w: sign is +1, -1, or +0 for ±0 and NaN (so the output is +0 there unless w is NaN)
        y0r[c] = w0 if x0 > zero else (-w0 if x0 < zero else zero * w0)
        y1r[c] = w1 if x1 > zero else (-w1 if x1 < zero else zero * w1)
        y2r[c] = w2 if x2 > zero else (-w2 if x2 < zero else zero * w2)
        y3r[c] = w3 if x3 > zero else (-w3 if x3 < zero else zero * w3)


def _sample_block_c(x, u, out):  # noqa: ANN001 - numba kernel
    for b in range(x.shape[0]):
        _sample_rows(x[b, 0], x[b, 1], x[b, 2], x[b, 3], u[b], out[b, 0], out[b, 1], out[b, 2], out[b, 3])


_sample_rows = cpu_kernel(_sample_rows)
_sample_block_c = cpu_kernel(_sample_block_c)


def sample_block_cpu(x: torch.Tensor, out: torch.Tensor, u: torch.Tensor) -> None:
    """MVUE24 of ``x`` float32 [m, 4, c] into ``out`` float32 [m, 4, c], with ``u`` float32 [m, c] (one uniform
    per group). Any strides (non-contiguous operands go through contiguous copies); ``out`` must not overlap
    ``x`` or ``u``. Same result, bit for bit, as :func:`sparsert.train.mvue24._sample_block` on the same uniforms
    (NaN outputs may differ in their sign bit).
    """
    if x.dtype != torch.float32 or out.dtype != torch.float32 or u.dtype != torch.float32:
        raise ValueError(f"sample_block_cpu: float32 operands expected, got {x.dtype}, {out.dtype}, {u.dtype}")
    if any(t.device.type != "cpu" for t in (x, out, u)):
        raise ValueError("sample_block_cpu: CPU tensors expected")
    if x.dim() != 3 or x.shape[1] != 4 or out.shape != x.shape or u.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"sample_block_cpu: x [m, 4, c], out [m, 4, c] and u [m, c] expected, got x "
                         f"{tuple(x.shape)}, out {tuple(out.shape)}, u {tuple(u.shape)}")
    direct = out.is_contiguous()
    y = out if direct else torch.empty(out.shape, dtype=torch.float32)
    _sample_block_c(x.contiguous().numpy(), u.contiguous().numpy(), y.numpy())
    if not direct:
        out.copy_(y)
