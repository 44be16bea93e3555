"""MVUE24: an unbiased stochastic 2:4 sparsifier, and a sparse linear whose weight gradient uses it.

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024, §4.2, after
Chmiel, Hubara, Banner, Soudry, "Minimum Variance Unbiased N:M Sparsity for the Neural Gradients", ICLR 2023.
In the weight-gradient GEMM ``∇W = ∇Zᵀ · X`` the output gradient ``∇Zᵀ [N, T]`` is made 2:4 along the
token dimension T (its last dimension, the GEMM's reduction dimension), so this GEMM can run on sparse
tensor cores too. Deterministic top-2 would bias the gradient; MVUE24 samples two of each four instead:

- the first survivor ``i`` with probability ``p_i = |x_i| / S`` (``S = Σ |x|`` of the group),
- the second ``j ≠ i`` with probability ``|x_j| / (S − |x_i|)``,
- every survivor is divided by its inclusion probability
  ``π_j = p_j + Σ_{i≠j} p_i · |x_j| / (S − |x_i|)``, so ``E[out] = x`` exactly.

Zero groups stay zero; a group with a single non-zero keeps it unscaled (``π = 1``). Every group of the
output has at most two non-zeros, so it is a valid 2:4 operand.

How it is computed (CPU cost matters: this runs on every weight gradient of the Hu recipe):

- In the natural layout. The gradient ``∇Z [T, N]`` is contiguous with the token dimension first, so it is
  viewed as ``[T/4, 4, N]`` and entry ``j`` of every group is the strided slice ``[:, j, :]`` — no transpose.
- Closed form, elementwise, float32: both draws are inverse-CDF draws against the running sums of the group
  (three additions, not ``cumsum``), with 0/1 float masks from comparisons; the output of a kept entry is
  ``x_j / π_j = sign(x_j) · S / (1 + Σ_{i≠j} r_i)``, ``r_i = |x_i| / Σ_{k≠i} |x_k|``, every "sum of the
  others" formed from pair sums (never ``S − |x_i|``, which cancels when one entry dominates).
- One uniform per group. Given the first pick ``i``, the first draw's position is uniform on ``i``'s
  interval, so its residual is an independent uniform for the second draw: one inverse-CDF draw of the
  ordered pair, the same law as two independent draws (up to float32 resolution, as for any 24-bit
  uniform), at half the cost of the random numbers (two uniforms were a quarter of the sampler's CPU time).
- On CPU the groups are processed in blocks of about 64k that reuse one per-thread scratch buffer (22 floats
  per group), so no temporary is allocated or page-faulted per call and the working set stays in cache;
  :func:`mvue24_weight_grad` feeds each sampled block straight into its share of the weight-gradient GEMM.
- On CPU each block is sampled by :mod:`sparsert.train.mvue24_cpu`, the same float32 operations in the same
  order compiled into one vectorised loop by numba (bit-identical, ~7× faster); :func:`_sample_block`, the
  elementwise torch version below, is the reference and runs elsewhere (and on CPU when numba is missing).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparsert.runtime.errors import FormatError
from sparsert.train import mvue24_cpu

__all__ = ["mvue24", "mvue24_with_mask", "mvue24_weight_grad", "inclusion_probabilities_24", "SparseLinearMVUE",
           "sparse_linear_mvue"]

# _OTHERS[i, j] = 1 for j != i: (|x| @ _OTHERS)[i] = Σ_{j≠i} |x_j| without the cancellation of S − |x_i|.
_OTHERS = 1.0 - torch.eye(4)
_TINY = torch.finfo(torch.float32).tiny
_BELOW_ONE = 1.0 - 2.0 ** -24  # the largest float32 below 1
_CPU_BLOCK_GROUPS = 1 << 16  # groups per block on CPU: 5.8 MB of scratch, cache-resident
_CPU_MAX_COLS = 8192  # wider rows are split into column blocks
_CPU_MIN_ROWS = 64  # >= 256 tokens per block, so the fused block GEMMs of mvue24_weight_grad stay efficient
_DEVICE_BLOCK_GROUPS = 1 << 22  # off CPU: 350 MB of scratch at most
# float32 scratch values per group: a, o, k (4 each) and 10 group-level rows; the uniform is drawn into the row
# that becomes t = u·S, and a sampled block for the fused GEMM reuses a's memory (r = a/o is dead by then)
_SCRATCH_PER_GROUP = 22
_scratch = threading.local()


class _Views(NamedTuple):
    """Views of the scratch for one block of m x c groups (see _sample_block). The per-entry buffers are
    member-major, [4, m, c], so entry j of every group (``a[j]``) is contiguous."""

    a: torch.Tensor  # [4, m, c]
    o: torch.Tensor  # [4, m, c]
    k: torch.Tensor  # [4, m, c]
    a_: tuple[torch.Tensor, ...]  # a[j] for j = 0..3, each [m, c]
    o_: tuple[torch.Tensor, ...]
    k_: tuple[torch.Tensor, ...]
    rows: tuple[torch.Tensor, ...]  # 10 x [m, c]
    u: torch.Tensor  # [m, c], the row of t
    block: torch.Tensor  # [m, 4, c], a's memory


def _check(x: torch.Tensor, name: str, dim: int) -> int:
    """Validate ``x`` for MVUE24 along ``dim``; return ``dim`` made non-negative."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise FormatError(f"{name}: MVUE24 needs a tensor with at least one dimension, got {shape}")
    if not -x.dim() <= dim < x.dim():
        raise FormatError(f"{name}: MVUE24 along dimension {dim}, but the tensor has shape {tuple(x.shape)}")
    d = dim % x.dim()
    if x.shape[d] % 4 != 0:
        which = "last dimension" if d == x.dim() - 1 else f"dimension {d}"
        raise FormatError(f"{name}: MVUE24 needs a tensor whose {which} is divisible by 4, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise FormatError(f"{name}: MVUE24 needs a floating-point tensor, got {x.dtype}")
    return d


def inclusion_probabilities_24(a: torch.Tensor) -> torch.Tensor:
    """Inclusion probabilities of MVUE24's two-draw sampling without replacement.

    ``a``: float32 [G, 4], non-negative magnitudes. Returns float32 [G, 4]: ``π_j`` for entries with
    ``a_j > 0`` (in (0, 1], summing to 2 over a group with at least two non-zeros, 1 for a lone non-zero);
    0 where ``a_j == 0``. Closed form: ``π_j = (a_j / S)·(1 + Σ_{i≠j} r_i)`` with ``r_i = a_i / (S − a_i)``
    (``0`` when ``S − a_i = 0``). Both ``S − a_i`` and ``Σ_{i≠j}`` are summed over the other three entries
    (a matmul with ``1 − I``), never subtracted, so a dominant entry cannot cancel the others away.
    """
    rest = a @ _OTHERS.to(a.device, a.dtype)  # (G, 4): S - a_i without cancellation
    r = torch.where(rest > 0, a / rest, torch.zeros_like(a))
    total = a.sum(-1, keepdim=True)
    pi = a / total * (1 + r @ _OTHERS.to(a.device, a.dtype))  # Σ_{i≠j} r_i, again without cancellation
    return torch.where(a > 0, pi.clamp(max=1.0), torch.zeros_like(pi))


def _scratch_buffer(numel: int, device: torch.device) -> tuple[torch.Tensor, dict | None]:
    """A float32 scratch vector of ``numel`` values and the cache for its block views (None: do not cache).

    On CPU one buffer per thread is kept and grown between calls (fresh large allocations are page-faulted
    on every call and cost as much as the sampling itself); it holds at most 22 floats per group of the
    largest block (5.8 MB by default). Elsewhere, and in inference mode (whose tensors cannot be updated in
    place outside it), the buffer is a fresh tensor.
    """
    if device.type != "cpu" or torch.is_inference_mode_enabled():
        return torch.empty(numel, dtype=torch.float32, device=device), None
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        _scratch.buf, _scratch.views = buf, {}
    return buf[:numel], _scratch.views


def _block_views(scratch: torch.Tensor, m: int, c: int, cache: dict | None) -> _Views:
    """The scratch views of an m x c block (memoised in ``cache``: a block takes ~50 tensor views)."""
    key = (m, c)
    if cache is not None and key in cache:
        return cache[key]
    g = m * c
    a, o, k = (scratch[i * 4 * g:(i + 1) * 4 * g].view(4, m, c) for i in range(3))
    rows = scratch[12 * g:22 * g].view(10, m, c).unbind(0)
    views = _Views(a, o, k, a.unbind(0), o.unbind(0), k.unbind(0), rows, rows[3], scratch[:4 * g].view(m, 4, c))
    if cache is not None:
        if len(cache) >= 64:
            cache.clear()
        cache[key] = views
    return views


def _sample_block(x: torch.Tensor, out: torch.Tensor, v: _Views) -> None:
    """MVUE24 of one block of groups, written into ``out``.

    ``x`` float32 [m, 4, c] (any strides; entry ``j`` of group ``(row, col)`` at ``x[row, j, col]``), ``out``
    float32 [m, 4, c] (may be ``v.block``: it shares ``v.a``'s memory and is written after a's last use),
    ``v`` the block's scratch views with ``v.u`` float32 [m, c] holding one uniform in [0, 1) per group.
    Every temporary is a contiguous [m, c] row (one value per group) or a member-major [4, m, c] buffer of
    the scratch; all arithmetic is elementwise, on 0/1 float masks (float comparisons into float outputs
    are as fast as additions on CPU; bool masks and ``torch.where`` are several times slower).
    """
    a, o, k = v.a, v.o, v.k
    a0, a1, a2, a3 = v.a_
    o0, o1, o2, o3 = v.o_
    k0, k1, k2, k3 = v.k_
    c1, c2, s, t, n1, n2, d0, d1, d2, s2 = v.rows
    torch.abs(x, out=a.transpose(0, 1))
    # Running sums c_0 = a_0, c_1, c_2, c_3 = S. Additions of non-negative floats are monotone and a zero entry
    # leaves the sum unchanged, so entry j owns the interval [c_{j-1}, c_j), empty for a zero.
    torch.add(a0, a1, out=c1)
    torch.add(c1, a2, out=c2)
    torch.add(c2, a3, out=s)
    # First draw (inverse CDF): i1 = the first j with t < c_j, t = u·S < S. l_j = [t < c_j] is a step 0 -> 1
    # at i1 (kept in k0..k2; l_3 = 1).
    t.mul_(s)  # t = u·S: the uniform was drawn into this row
    torch.lt(t, a0, out=k0)
    torch.lt(t, c1, out=k1)
    torch.lt(t, c2, out=k2)
    # Second draw among the other three: running sums d of a with a_{i1} multiplied by 0 (removed exactly).
    # n_j = [j != i1] = [t >= c_j] + [t < c_{j-1}] (disjoint); n_0 = 1 - l_0 and n_3 = l_2 enter addcmul directly.
    torch.ge(t, c1, out=o1)
    torch.ge(t, c2, out=o2)
    torch.add(o1, k0, out=n1)
    torch.add(o2, k1, out=n2)
    torch.addcmul(a0, a0, k0, value=-1, out=d0)
    torch.addcmul(d0, a1, n1, out=d1)
    torch.addcmul(d1, a2, n2, out=d2)
    torch.addcmul(d2, a3, k2, out=s2)
    # Its uniform is the first one's residual: given i1, t is uniform on i1's interval [L1, L1 + a_{i1}), so
    # v = (t - L1) / a_{i1} is uniform on [0, 1) and independent of i1 (the inverse CDF of the ordered pair).
    # L1 = Σ_{j<i1} a_j is summed exactly like c_{i1-1} (so t - L1 >= 0); a_{i1} is taken as S - S2, floored
    # at the smallest normal float; v is clamped below 1, so t2 = v·S2 < S2 always picks a non-zero entry
    # other than i1, and S2 = 0 (i1 the only non-zero) gives t2 = 0: no second draw. Rounding moves the pair
    # probabilities by O(2^-24), as the 24-bit resolution of the uniform does.
    torch.addcmul(d0, a1, o1, out=o0).addcmul_(a2, o2)  # L1 (o1, o2 = [t >= c_1], [t >= c_2])
    torch.sub(s, s2, out=o3).clamp_(min=_TINY)  # a_{i1}
    t.sub_(o0).div_(o3).clamp_(0.0, _BELOW_ONE).mul_(s2)  # t2
    torch.lt(t, d0, out=o0)
    torch.lt(t, d1, out=o1)
    torch.lt(t, d2, out=o2)
    torch.lt(t, s2, out=o3)
    # Kept count per entry, the increments of both steps: k_j = (l_j + m_j) - (l_{j-1} + m_{j-1}).
    torch.add(o3, 1, out=k3)
    k[:3].add_(o[:3])
    k3.sub_(k2)
    k2.sub_(k1)
    k1.sub_(k0)
    # Inclusion probabilities in closed form: o_j = Σ_{i≠j} a_i from pair sums (never S - a_j, which cancels),
    # r = a / o, D_j = 1 + Σ_{i≠j} r_i = π_j·S / a_j. The pair sums are floored at the smallest normal float,
    # so a zero group gives r = 0 (not 0/0); only groups whose pairs both sum below 1.2e-38 are affected. A
    # lone non-zero i gets r_i = a_i/tiny (huge or inf), which only the zero entries' D reads.
    torch.add(a2, a3, out=n1).clamp_(min=_TINY)
    c1.clamp_(min=_TINY)
    torch.add(a1, n1, out=o0)
    torch.add(a0, n1, out=o1)
    torch.add(a3, c1, out=o2)
    torch.add(a2, c1, out=o3)
    r0, r1, r2, r3 = v.a_
    a.div_(o)
    torch.add(r0, r1, out=n1).add_(1)
    torch.add(r2, r3, out=n2).add_(1)
    torch.add(r1, n2, out=o0)
    torch.add(r0, n2, out=o1)
    torch.add(r3, n1, out=o2)
    torch.add(r2, n1, out=o3)
    # out_j = x_j·k_j/π_j = sign(x_j)·k_j·S/D_j: 0 wherever k_j = 0 or x_j = 0 (D_j >= 1 or inf, never NaN).
    k.div_(o).mul_(s)
    torch.sign(x, out=out)
    out.mul_(k.transpose(0, 1))


def _block_shape(b: int, c: int, device: torch.device) -> tuple[int, int]:
    """(rows, cols) of the blocks over a [b, 4, c] grouped tensor, in equal blocks. On CPU about 64k groups,
    at least 64 rows (or all) and at most 8192 columns unless there are fewer rows; elsewhere up to 4M
    groups per block (few kernel launches, bounded scratch memory)."""
    if device.type == "cpu":
        budget, max_cols, min_rows = _CPU_BLOCK_GROUPS, _CPU_MAX_COLS, _CPU_MIN_ROWS
    else:
        budget, max_cols, min_rows = _DEVICE_BLOCK_GROUPS, _DEVICE_BLOCK_GROUPS, 1
    cap = max(max_cols, budget // b)
    cols = -(-c // -(-c // cap))  # equal column blocks of at most cap
    rows = min(b, max(min_rows, budget // cols))
    return -(-b // max(1, round(b / rows))), cols  # equal row blocks, no sliver of a block at the end


def _sampled_blocks(
    x3: torch.Tensor, generator: torch.Generator | None, out: torch.Tensor | None = None
) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """Sample the groups of ``x3`` float32 [B, 4, C] (group ``(b, c)`` = ``x3[b, :, c]``) block by block.

    Yields ``(r0, m, c0, w, block)`` per block of rows ``r0:r0+m`` and columns ``c0:c0+w``: ``block`` float32
    [m, 4, w], the block of ``out`` (float32 [B, 4, C]) when given, else scratch valid until the next
    iteration. Each block draws its uniforms, one per group ``[m, w]``, in one call; the blocking depends
    only on the shape and the device, so a generator seed gives the same samples on every call.
    """
    b, _, c = x3.shape
    rows, cols = _block_shape(b, c, x3.device)
    scratch, cache = _scratch_buffer(_SCRATCH_PER_GROUP * rows * cols, x3.device)
    compiled = x3.device.type == "cpu" and mvue24_cpu.available()  # the same draws, bit for bit
    for r0 in range(0, b, rows):
        m = min(rows, b - r0)
        for c0 in range(0, c, cols):
            w = min(cols, c - c0)
            views = _block_views(scratch, m, w, cache)
            views.u.uniform_(generator=generator)
            block = views.block if out is None else out[r0:r0 + m, :, c0:c0 + w]
            if compiled:
                mvue24_cpu.sample_block_cpu(x3[r0:r0 + m, :, c0:c0 + w], block, views.u)
            else:
                _sample_block(x3[r0:r0 + m, :, c0:c0 + w], block, views)
            yield r0, m, c0, w, block


def mvue24_with_mask(
    x: torch.Tensor, generator: torch.Generator | None = None, name: str = "x", dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """MVUE24 in groups of four consecutive entries along ``dim``; also returns which entries survived.

    Args:
        x: float [..., L, ...] with ``L = x.shape[dim]``, ``L % 4 == 0`` (any float dtype; computed in
            float32; any strides). Groups run along ``dim``: ``dim=-1`` for ``∇Zᵀ [N, T]``, ``dim=0`` for
            the gradient in its natural layout ``∇Z [T, N]`` (the fast case: no transpose).
        generator: torch.Generator for reproducible sampling (on ``x``'s device); None = global RNG. One
            uniform per group, drawn block by block (one call per block of groups); the same seed and shape
            give the same samples.
        name: how errors call ``x``.
        dim: the dimension the groups of four run along.
    Returns:
        ``(out, kept)``: ``out`` same shape and dtype as ``x``, the two drawn entries of each group divided
        by their inclusion probability and zeros elsewhere (``E[out] = x``); ``kept`` bool, same shape, True
        at the drawn non-zero entries: exactly two per group of four when the group has two or more
        non-zeros, one for a lone non-zero, none for a zero group (drawing stops at zeros: they would
        contribute nothing).
    """
    d = _check(x, name, dim)
    out = _mvue24(x.detach(), generator, d)
    return out, out != 0  # a kept non-zero x_j gives |x_j / π_j| >= |x_j| > 0; everything else is exactly 0


def mvue24(x: torch.Tensor, generator: torch.Generator | None = None, name: str = "x", dim: int = -1) -> torch.Tensor:
    """MVUE24 along ``dim`` of ``x`` (see :func:`mvue24_with_mask`); returns ``out`` only.

    float [..., L, ...], ``L % 4 == 0`` -> same shape and dtype, at most two non-zeros per group of four
    consecutive entries along ``dim``, ``E[mvue24(x)] = x``.
    """
    return _mvue24(x.detach(), generator, _check(x, name, dim))


def _mvue24(x: torch.Tensor, generator: torch.Generator | None, d: int) -> torch.Tensor:
    shape = x.shape
    if x.numel() == 0:
        return x.clone()
    inner = math.prod(shape[d + 1:])
    if inner == 1:  # groups along the last (contiguous) dimension: entry j of every group as row j
        x3 = x.reshape(-1, 4).t().unsqueeze(0)  # (1, 4, G), a strided view when x is contiguous
    else:
        x3 = x.reshape(-1, 4, inner)  # (B, 4, C): groups of 4 along d, no copy when x is contiguous
    x3 = x3 if x3.dtype == torch.float32 else x3.float()
    if x3.device.type == "cpu" and x3.stride(2) != 1:
        x3 = x3.contiguous()  # member-major rows, once, for the compiled sampler (groups along the last dim)
    out3 = torch.empty(x3.shape, dtype=torch.float32, device=x3.device)
    for _ in _sampled_blocks(x3, generator, out3):
        pass
    out = out3[0].t() if inner == 1 else out3
    return out.reshape(shape).to(x.dtype)


def mvue24_weight_grad(
    grad_output: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The MVUE24 weight gradient of a linear layer: ``∇W = MVUE24(∇Zᵀ) · X`` (Hu et al. 2024).

    ``grad_output`` float [T, N] (``∇Z``, tokens first), ``x`` float [T, K] (the layer input) -> float [N, K]
    in ``grad_output``'s dtype. ``∇Z`` is sampled 2:4 along T in its natural layout, with the same draws as
    ``mvue24(grad_output, generator, dim=0)``; T is zero-padded to a multiple of 4 (the padding contributes
    nothing). Unbiased: ``E[∇W] = ∇Zᵀ · X``. On CPU each block of sampled tokens goes straight into its
    share of the GEMM (``∇W[cols] += blockᵀ · X[tokens]``, float32) while it is still in cache, and the
    sampled ``∇Z`` is never materialised.
    """
    if grad_output.dim() != 2 or x.dim() != 2 or grad_output.shape[0] != x.shape[0]:
        raise FormatError(f"MVUE24 weight gradient: grad_output {tuple(grad_output.shape)} and input"
                          f" {tuple(x.shape)} must be [T, N] and [T, K]")
    pad = (-grad_output.shape[0]) % 4
    if pad:
        grad_output = F.pad(grad_output, (0, 0, 0, pad))
        x = F.pad(x, (0, 0, 0, pad))
    _check(grad_output, "grad_output", 0)
    device = grad_output.device
    if device.type != "cpu" or grad_output.numel() == 0:
        g = mvue24(grad_output, generator, name="grad_output", dim=0)  # (T, N), 2:4 along T
        return g.t() @ x.to(g.dtype)
    t, n = grad_output.shape
    g3 = grad_output.detach().reshape(t // 4, 4, n)  # (T/4, 4, N): token groups, no copy
    g3 = g3 if g3.dtype == torch.float32 else g3.float()
    grad_w = torch.empty(n, x.shape[1], dtype=torch.float32, device=device)
    x = x.detach()
    for r0, m, c0, w, block in _sampled_blocks(g3, generator):
        xs = x[4 * r0:4 * (r0 + m)]  # (4m, K): this block's tokens
        xs = xs if xs.dtype == torch.float32 else xs.float()
        sampled_t = block.view(4 * m, w).t()  # (w, 4m): the GEMM reads it transposed in place
        if r0 == 0:
            torch.mm(sampled_t, xs, out=grad_w[c0:c0 + w])
        else:
            grad_w[c0:c0 + w].addmm_(sampled_t, xs)
    return grad_w.to(grad_output.dtype)


class SparseLinearMVUE(torch.autograd.Function):
    """``y = F.linear(x, W ⊙ mask, b)`` whose weight gradient samples ∇Z with MVUE24 (Hu et al. 2024).

    Forward: ``x`` float [..., K], ``weight`` [N, K], ``mask`` [N, K] bool or 0/1, ``bias`` [N] or None
    -> ``y`` [..., N].
    Backward, with the tokens flattened (``X [T, K]``, ``∇Z [T, N]``):

    - ``∇X = ∇Z · (W ⊙ mask)`` (exact; with a transposable mask this GEMM is 2:4 too),
    - ``∇W = MVUE24(∇Zᵀ) · X``: ``∇Zᵀ [N, T]`` sampled 2:4 along T, the token dimension (zero-padded to a
      multiple of 4 tokens; padding contributes nothing), computed by :func:`mvue24_weight_grad` on ``∇Z``
      in its natural layout. Straight-through: the gradient goes to the dense ``W`` for every entry, pruned
      ones included (masked decay is applied separately). Unbiased: ``E[∇W] = ∇Zᵀ · X``.
    - ``∇b = Σ_t ∇Z[t]`` (exact).
    ``mvue=False`` gives the exact ``∇W = ∇Zᵀ · X`` (for comparison and dense fine-tuning).
    """

    @staticmethod
    def forward(ctx, x, weight, mask, bias, generator, mvue):  # noqa: ANN001 - autograd signature
        w_kept = weight * mask
        ctx.save_for_backward(x, w_kept)
        ctx.has_bias = bias is not None
        ctx.generator = generator
        ctx.mvue = bool(mvue)
        return F.linear(x, w_kept, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        x, w_kept = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (T, N)
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ w_kept.to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])  # (T, K)
            if ctx.mvue:
                grad_w = mvue24_weight_grad(g2, x2, ctx.generator)
            else:
                grad_w = g2.t() @ x2.to(g2.dtype)
            grad_w = grad_w.to(w_kept.dtype)  # (N, K)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, None, grad_b, None, None


def sparse_linear_mvue(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    mvue: bool = True,
) -> torch.Tensor:
    """``x @ (weight ⊙ mask)ᵀ + bias`` with the MVUE24 weight gradient of :class:`SparseLinearMVUE`.

    ``x`` float [..., K]; ``weight`` float [N, K]; ``mask`` bool or 0/1 [N, K]; ``bias`` [N] or None;
    ``generator`` seeds the gradient sampling (None = global RNG). Returns float [..., N].
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise FormatError(
            f"sparse_linear_mvue: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} (x[..., K], W[N, K])"
        )
    if mask.shape != weight.shape:
        raise FormatError(f"sparse_linear_mvue: mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
    return SparseLinearMVUE.apply(x, weight, mask, bias, generator, mvue)
