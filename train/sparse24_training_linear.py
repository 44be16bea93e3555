"""The Hu et al. 2:4 training linear with all three GEMMs on the 2:4 sparse tensor cores.

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024, §4: with a
transposable 2:4 mask ``M`` (:mod:`sparsert.runtime.transposable_mask`) and MVUE24 (Chmiel et al., ICLR 2023;
:mod:`sparsert.train.mvue24`) a linear layer's training step runs its three GEMMs sparse. Tokens flattened
(``X [T, K]``, ``∇Z [T, N]``), ``W [N, K]``:

- forward ``Y = X·(W⊙M)ᵀ + b``: ``sparse24_linear(X, compress(W⊙M))`` (bias fused in the epilogue);
- ``∇X = ∇Z·(W⊙M)``: ``sparse24_linear(∇Z, compress((W⊙M)ᵀ))`` — ``(W⊙M)ᵀ [K, N]`` is 2:4 along N because
  the mask is transposable;
- ``∇W = MVUE24(∇Zᵀ)·X``: ``S = MVUE24(∇Zᵀ) [N, T]`` is 2:4 along T, so
  ``sparse24_linear(Xᵀ [K, T], S) = Xᵀ·Sᵀ = ∇Wᵀ [K, N]``, returned as the transposed view ``[N, K]``
  (autograd stores ``.grad`` contiguous, copying once);
- ``∇b = Σ_t ∇Z[t]`` (exact). Straight-through: the gradient reaches every entry of the dense ``W``, pruned
  ones included (masked decay is applied separately, :mod:`sparsert.train.masked_decay`).

``compress(W⊙M)`` and ``compress((W⊙M)ᵀ)`` are rebuilt on every forward (the weights change every optimizer
step) with ``runtime.kernels.prune_to_sparse24_weight``: a magnitude prune of an already-2:4 tensor keeps
exactly its non-zeros, so one kernel pass compresses it into the GEMM's operand layout. The mask itself is
refreshed only when asked (:meth:`Sparse24TrainingLinear.refresh_mask`; the paper refreshes every 40 steps).

``S`` comes from ``runtime.mvue24_kernel.mvue24_compress_t``, a fused sample-and-compress kernel (its torch
reference without a GPU) that draws with the law of :mod:`sparsert.train.mvue24`.

On CPU (or without a usable GPU) every GEMM runs through ``sparse24_linear``'s torch fallback: the same
function from the same prepared operands (fp32 accumulation of bf16/fp16 products), slow but exact.

``gemm="cusparselt"`` runs the same three products on NVIDIA's cuSPARSELt instead (through torch's binding,
:mod:`sparsert.runtime.cusparselt`, with the algorithm configuration searched once per shape): ``W⊙M`` and
``(W⊙M)ᵀ`` compressed by ``_cslt_compress``; forward ``(W⊙M)·Xᵀ`` and ``∇X = ((W⊙M)ᵀ·∇Zᵀ)ᵀ`` with the result
transposed by the library; ``∇W = S·X`` with the same MVUE24 sample ``S [N, T]`` (drawn by our kernel,
expanded to dense, compressed by cuSPARSELt). T is zero-padded to a multiple of 8 (64 for ``∇W``, whose
reduction it is). The bias is added in the activations' dtype (``ours`` adds it in fp32). This is the
library Hu et al.'s released code builds on (through torch's semi-structured tensors); it needs a CUDA build
of torch with cuSPARSELt.

Shapes: ``K % 64 == 0`` and ``N % 64 == 0`` (each is the reduction dimension of one sparse GEMM; the sparse
kernels' k tile is 64); T is zero-padded to a multiple of 64 for the weight-gradient GEMM (zero tokens
contribute nothing). Activations bf16/fp16; the weight may be fp32 (master weights), bf16 or fp16 and is cast
to the activation dtype before compression; ``∇W`` comes back in the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsert.runtime import cusparselt
from sparsert.runtime.errors import ConfigError, FormatError, dtype_name
from sparsert.runtime.kernels import prune_to_sparse24_weight, transposable_mask
from sparsert.runtime.mvue24_kernel import mvue24_compress_t, mvue24_sample_t
from sparsert.runtime.sparse_gemm import Sparse24Weight, sparse24_linear
from sparsert.runtime.transposable_mask import is_transposable_24

__all__ = [
    "COMPUTE_DTYPES",
    "GEMMS",
    "TOKEN_PAD",
    "Sparse24Operands",
    "Sparse24TrainingLinear",
    "Sparse24TrainingLinearFunction",
    "compress_masked_weight",
    "cslt_compress_grad",
    "cslt_compress_masked_weight",
    "mvue24_compress_grad",
    "mvue24_sample_dense_t",
    "sparse24_training_linear",
    "sparse24_weight_grad",
    "step_seed",
]

COMPUTE_DTYPES = (torch.bfloat16, torch.float16)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DIM_MULTIPLE = 64  # K and N: the reduction dimension of a sparse GEMM must be a multiple of the k tile
TOKEN_PAD = 64  # T is padded to this for the weight-gradient GEMM (T is its reduction dimension)
GEMMS = ("ours", "cusparselt")  # who runs the three sparse products: our kernels, or cuSPARSELt
_MASK64 = (1 << 64) - 1


def step_seed(seed: int, call: int) -> int:
    """A 63-bit seed for draw number ``call`` of a layer seeded ``seed`` (splitmix64 of the pair), so
    consecutive steps and neighbouring layers get unrelated random streams whatever the RNG's offset means."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(call) + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


# ---------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------


def _check_dims(n: int, k: int, fn: str) -> None:
    for name, v, why in (("in_features K", k, "forward"), ("out_features N", n, "input-gradient")):
        if v <= 0 or v % DIM_MULTIPLE:
            raise FormatError(f"{fn}: weight has shape ({n}, {k}); {name}={v} must be a positive multiple of "
                              f"{DIM_MULTIPLE} (the reduction dimension of the {why} 2:4 GEMM)")


def _check_operands(x, weight, mask, bias, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in COMPUTE_DTYPES:
        got = dtype_name(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise FormatError(f"{fn}: x must be a bfloat16 or float16 tensor (the sparse GEMMs' dtypes), got {got}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in WEIGHT_DTYPES:
        got = (f"{dtype_name(weight.dtype)} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor)
               else type(weight).__name__)
        raise FormatError(f"{fn}: weight must be a 2-D float32/bfloat16/float16 tensor [N, K], got {got}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise FormatError(f"{fn}: x has shape {tuple(x.shape)}; its last dimension must be in_features K={k}")
    _check_dims(n, k, fn)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n, k) or mask.dtype not in (torch.bool,
                                                                                                torch.uint8):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise FormatError(f"{fn}: mask must be a bool or uint8 tensor of shape ({n}, {k}), got {got}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise FormatError(f"{fn}: bias must be a tensor of shape ({n},), got {got}")
    for name, t in (("weight", weight), ("mask", mask), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise FormatError(f"{fn}: x is on {x.device} but {name} is on {t.device}")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (the GEMMs' vector loads): copied only when it is not."""
    t = t.contiguous()
    return t if t.numel() == 0 or t.data_ptr() % 16 == 0 else t.clone()


# ---------------------------------------------------------------------------------------------------------
# Operands
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Sparse24Operands:
    """The compressed masked weight of one step.

    Attributes:
        weight: ``W⊙M`` ``[N, K]`` as a :class:`Sparse24Weight` (2:4 along K) — forward ``Y = X·(W⊙M)ᵀ``.
        weight_t: ``(W⊙M)ᵀ`` ``[K, N]`` (2:4 along N, the mask being transposable) — ``∇X = ∇Z·(W⊙M)``;
            None when no input gradient is needed.
    """

    weight: Sparse24Weight
    weight_t: Sparse24Weight | None


@torch.no_grad()
def compress_masked_weight(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, *,
                           transposed: bool = True) -> Sparse24Operands:
    """``W⊙M`` (and ``(W⊙M)ᵀ``) compressed for the sparse GEMMs.

    Args:
        weight: float ``[N, K]`` (any float dtype; cast to ``dtype``), ``N % 64 == 0``, ``K % 64 == 0``.
        mask: bool/uint8 ``[N, K]``, 2:4 along K — and transposable (2:4 along N in ``mask.T``) when
            ``transposed``; not re-checked here (see :func:`sparse24_training_linear`).
        dtype: bfloat16 or float16, the activations' dtype.
        transposed: also build ``(W⊙M)ᵀ`` for the input-gradient GEMM.
    Returns:
        :class:`Sparse24Operands` on weight's device: one ``prune24_compress`` kernel pass per operand on a
        GPU (a magnitude prune of a 2:4 tensor keeps exactly its non-zeros), its CPU reference otherwise.
    """
    masked = _masked(weight, mask, dtype)
    ops_t = prune_to_sparse24_weight(masked.t().contiguous()) if transposed else None
    return Sparse24Operands(weight=prune_to_sparse24_weight(masked), weight_t=ops_t)


def _masked(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W⊙M`` in ``dtype``, ``[N, K]`` contiguous (detached)."""
    keep = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(keep, weight.detach().to(dtype), torch.zeros((), dtype=dtype, device=weight.device))


def check_gemm(gemm, name: str, *, usable: bool = True) -> str:
    """``gemm`` if it is one of :data:`GEMMS` (and, with ``usable``, can run here), else ConfigError naming
    the option."""
    if gemm not in GEMMS:
        raise ConfigError(f"{name}: gemm must be one of {', '.join(GEMMS)}, got {gemm!r}")
    why = cusparselt.cusparselt_status() if usable and gemm == "cusparselt" else ""
    if why:
        raise ConfigError(f"{name}: gemm='cusparselt' needs a CUDA build of torch with cuSPARSELt: {why}")
    return gemm


def _check_rng(seed, offset, fn: str) -> None:
    """The kernel's rule for both providers: ints in [0, 2⁶⁴), offset a multiple of 4."""
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2 ** 64:
            raise ConfigError(f"{fn}: {name} must be an int in [0, 2**64), got {v!r}")
    if offset % 4:
        raise ConfigError(f"{fn}: offset={offset} must be a multiple of 4 (the Philox stream serves groups in "
                          "blocks of four)")


def _check_grad(grad, fn: str) -> None:
    if not isinstance(grad, torch.Tensor) or grad.dim() != 2 or grad.dtype not in COMPUTE_DTYPES:
        got = f"{dtype_name(grad.dtype)} {tuple(grad.shape)}" if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise FormatError(f"{fn}: grad must be a 2-D bfloat16/float16 tensor [T, N], got {got}")
    t = grad.shape[0]
    if t == 0 or t % TOKEN_PAD:
        raise FormatError(f"{fn}: grad has T={t} tokens; T must be a positive multiple of {TOKEN_PAD} (pad with "
                          "zero tokens)")


@torch.no_grad()
def mvue24_compress_grad(grad: torch.Tensor, *, seed: int, offset: int = 0) -> Sparse24Weight:
    """``S = MVUE24(∇Zᵀ)`` compressed for the weight-gradient GEMM.

    Args:
        grad: ``∇Z [T, N]`` bf16/fp16, contiguous, ``T % 64 == 0``, ``N % 8 == 0``.
        seed, offset: the draw's random stream (the kernel's Philox key and the index of the first group in its
            stream: ints in [0, 2⁶⁴), offset a multiple of 4); the same pair gives the same ``S``.
    Returns:
        :class:`Sparse24Weight` with ``out_features = N``, ``in_features = T``: ``S [N, T]``, 2:4 along T, each
        group of four consecutive tokens of a column of ``∇Z`` replaced by its MVUE24 sample
        (``E[S] = ∇Zᵀ``), by the fused kernel ``runtime.mvue24_kernel.mvue24_compress_t`` (its torch
        reference without a GPU).
    """
    _check_grad(grad, "mvue24_compress_grad")
    _check_rng(seed, offset, "mvue24_compress_grad")
    return mvue24_compress_t(grad, seed=seed, offset=offset)


@torch.no_grad()
def mvue24_sample_dense_t(grad: torch.Tensor, *, seed: int, offset: int = 0) -> torch.Tensor:
    """The ``S`` of :func:`mvue24_compress_grad` (same arguments, same draw) as a dense ``[N, T]`` tensor in
    grad's dtype, zeros at the dropped entries, by ``runtime.mvue24_kernel.mvue24_sample_t`` (one pass on a GPU):
    the operand of the cuSPARSELt path, and a reference for checks."""
    _check_grad(grad, "mvue24_sample_dense_t")
    _check_rng(seed, offset, "mvue24_sample_dense_t")
    return mvue24_sample_t(grad, seed=seed, offset=offset)


@torch.no_grad()
def sparse24_weight_grad(grad_output: torch.Tensor, x: torch.Tensor, *, seed: int, offset: int = 0) -> torch.Tensor:
    """``∇W = MVUE24(∇Zᵀ)·X`` as one 2:4 sparse GEMM (Hu et al. 2024, §4.2).

    Args:
        grad_output: ``∇Z [T, N]`` bf16/fp16.
        x: ``X [T, K]`` in grad_output's dtype.
        seed, offset: the MVUE24 draw (:func:`mvue24_compress_grad`).
    Returns:
        ``[N, K]`` in grad_output's dtype, the transposed view of the GEMM's ``[K, N]`` output
        ``sparse24_linear(Xᵀ, S) = Xᵀ·Sᵀ``. T is zero-padded to a multiple of 64 (the padding contributes
        nothing). ``E[∇W] = ∇Zᵀ·X``.
    """
    fn = "sparse24_weight_grad"
    if grad_output.dim() != 2 or x.dim() != 2 or grad_output.shape[0] != x.shape[0]:
        raise FormatError(f"{fn}: grad_output {tuple(grad_output.shape)} and x {tuple(x.shape)} must be [T, N] "
                          "and [T, K]")
    if x.dtype != grad_output.dtype:
        raise FormatError(f"{fn}: x has dtype {dtype_name(x.dtype)}, expected grad_output's "
                          f"{dtype_name(grad_output.dtype)}")
    t, n = grad_output.shape
    k = x.shape[1]
    if t == 0:
        return torch.zeros(n, k, dtype=grad_output.dtype, device=grad_output.device)
    pad = (-t) % TOKEN_PAD
    if pad:
        grad_output = F.pad(grad_output, (0, 0, 0, pad))
        xt = x.new_zeros(k, t + pad)
        xt[:, :t].copy_(x.t())
    else:
        xt = x.t().contiguous()  # (K, T): the GEMM's activation operand, tokens = the weight-gradient's rows
    s = mvue24_compress_grad(_aligned(grad_output), seed=seed, offset=offset)  # (N, T), 2:4 along T
    return sparse24_linear(xt, s).t()  # (K, N) -> (N, K)


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------

class Sparse24TrainingLinearFunction(torch.autograd.Function):
    """``y = x·(W⊙M)ᵀ + b`` with the three GEMMs of forward and backward on 2:4 sparse GEMMs.

    ``apply(x [..., K] bf16/fp16, weight [N, K], bias [N] | None, mask [N, K] bool, seed, offset, mvue, gemm)``
    -> ``[..., N]`` in x's dtype. Backward: ``∇X = ∇Z·(W⊙M)`` (sparse, exact), ``∇W = MVUE24(∇Zᵀ)·X`` (sparse,
    :func:`sparse24_weight_grad` with ``seed``/``offset``; ``mvue=False``: the exact dense ``∇Zᵀ·X``),
    ``∇b = Σ_t ∇Z[t]``. ``gemm``: ``"ours"`` or ``"cusparselt"`` (see the module docstring). Arguments are not
    validated here: use :func:`sparse24_training_linear` or :class:`Sparse24TrainingLinear`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask, seed, offset, mvue, gemm):  # noqa: ANN001 - autograd signature
        with torch.autocast(device_type=x.device.type, enabled=False):
            need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            x2 = _aligned(x.reshape(-1, x.shape[-1]))
            y, ctx.weight_t = _forward_product(x2, weight, mask, bias, gemm, transposed=need_x)
        ctx.save_for_backward(x2 if need_w else None)
        ctx.x_shape, ctx.compute_dtype = tuple(x.shape), x.dtype
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.seed, ctx.offset, ctx.mvue, ctx.gemm = int(seed), int(offset), bool(mvue), gemm
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        (x2,) = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        cslt = ctx.gemm == "cusparselt"
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            g = _aligned(grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.compute_dtype))  # (T, N)
            if ctx.needs_input_grad[0]:
                gx = _cslt_tokens_mm(ctx.weight_t, g) if cslt else sparse24_linear(g, ctx.weight_t)  # (T, K)
                grad_x = gx.reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                if not ctx.mvue:
                    grad_w = g.t() @ x2
                elif cslt:
                    grad_w = _cslt_weight_grad(g, x2, seed=ctx.seed, offset=ctx.offset)
                else:
                    grad_w = sparse24_weight_grad(g, x2, seed=ctx.seed, offset=ctx.offset)  # (N, K) view of (K, N)
                if grad_w.dtype != ctx.weight_dtype:
                    grad_w = grad_w.to(ctx.weight_dtype, memory_format=torch.contiguous_format)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_b = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _forward_product(x2, weight, mask, bias, gemm: str, *, transposed: bool):
    """``(x2·(W⊙M)ᵀ + b`` ``[T, N]``, the compressed ``(W⊙M)ᵀ`` for ``∇X`` or None) on ``gemm``."""
    if gemm == "cusparselt":
        return _cslt_forward(x2, weight, mask, bias, transposed=transposed)
    ops = compress_masked_weight(weight, mask, x2.dtype, transposed=transposed)
    b32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    return sparse24_linear(x2, ops.weight, bias=b32), ops.weight_t


# ---------------------------------------------------------------------------------------------------------
# The three products on cuSPARSELt (gemm="cusparselt")
# ---------------------------------------------------------------------------------------------------------

def _pad_tokens(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """``t [T, C]`` with zero rows appended up to a multiple of ``multiple``."""
    pad = (-t.shape[0]) % multiple
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def _cslt_tokens_mm(a: cusparselt.CsltMatrix, t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``t [T, C] · Aᵀ (+ bias)`` for a compressed ``A [R, C]``: ``[T, R]`` in t's dtype, as ``(A·tᵀ)ᵀ`` (T padded
    to a multiple of 8 for the library, the padding cut off)."""
    if t.shape[0] == 0:
        return t.new_zeros(0, a.rows)
    tp = _pad_tokens(t, cusparselt.DIM_MULTIPLE)
    y = cusparselt.tuned()(a, tp.t(), bias=bias, transpose_result=True)
    return y[: t.shape[0]] if tp is not t else y


@torch.no_grad()
def cslt_compress_masked_weight(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, *,
                                transposed: bool = True) -> tuple[cusparselt.CsltMatrix, cusparselt.CsltMatrix | None]:
    """:func:`compress_masked_weight` for the cuSPARSELt path: ``(W⊙M [N, K], (W⊙M)ᵀ [K, N] or None)`` in
    ``dtype``, each compressed by cuSPARSELt (same arguments; CUDA only)."""
    masked = _masked(weight, mask, dtype)
    packed_t = cusparselt.compress(masked.t().contiguous(), name="(W⊙M)ᵀ") if transposed else None
    return cusparselt.compress(masked, name="W⊙M"), packed_t


@torch.no_grad()
def cslt_compress_grad(grad: torch.Tensor, *, seed: int, offset: int = 0) -> cusparselt.CsltMatrix:
    """:func:`mvue24_compress_grad` for the cuSPARSELt path: the same draw ``S = MVUE24(∇Zᵀ) [N, T]`` (``grad``
    ``[T, N]`` bf16/fp16, ``T % 64 == 0``), sampled dense by :func:`mvue24_sample_dense_t` and compressed by
    cuSPARSELt."""
    return cusparselt.compress(mvue24_sample_dense_t(grad, seed=seed, offset=offset), name="MVUE24(∇Zᵀ)")


def _cslt_forward(x2, weight, mask, bias, *, transposed: bool):
    """Forward of the cuSPARSELt path: ``(x2·(W⊙M)ᵀ + b, compressed (W⊙M)ᵀ or None)``. The bias is rounded to
    x's dtype first (the library adds it in that dtype; the ``ours`` path adds an fp32 bias)."""
    packed, packed_t = cslt_compress_masked_weight(weight, mask, x2.dtype, transposed=transposed)
    return _cslt_tokens_mm(packed, x2, None if bias is None else bias.detach()), packed_t


@torch.no_grad()
def _cslt_weight_grad(grad: torch.Tensor, x2: torch.Tensor, *, seed: int, offset: int) -> torch.Tensor:
    """``∇W = S·X`` on cuSPARSELt, with the MVUE24 sample ``S`` of :func:`cslt_compress_grad` (same draw as
    the ``ours`` path for the same seed/offset): ``[N, K]`` in grad's dtype. T (the product's reduction) is
    padded to a multiple of 64, so each distinct padded T is a problem of its own for the configuration search
    (training steps share one T)."""
    if grad.shape[0] == 0:
        return grad.new_zeros(grad.shape[1], x2.shape[1])
    gp, xp = _pad_tokens(grad, TOKEN_PAD), _pad_tokens(x2, TOKEN_PAD)
    return cusparselt.tuned()(cslt_compress_grad(_aligned(gp), seed=seed, offset=offset), xp)


def sparse24_training_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seed: int,
    offset: int = 0,
    mvue: bool = True,
    check_mask: bool = True,
    gemm: str = "ours",
) -> torch.Tensor:
    """``x·(W⊙M)ᵀ + b`` trained through 2:4 sparse GEMMs (Hu et al., ICML 2024; see the module docstring).

    Args:
        x: ``[..., K]`` bfloat16/float16 (under autocast a float32 ``x`` is cast to the autocast dtype).
        weight: ``[N, K]`` float32/bfloat16/float16 (the dense trained weight), ``N % 64 == 0``, ``K % 64 == 0``.
        mask: bool/uint8 ``[N, K]``, a transposable 2:4 mask (:func:`sparsert.runtime.kernels.transposable_mask`).
        bias: ``[N]`` or None.
        seed, offset: the MVUE24 draw of the weight gradient (:func:`mvue24_compress_grad`: ints in [0, 2⁶⁴),
            offset a multiple of 4).
        mvue: False computes the exact ``∇W = ∇Zᵀ·X`` with a dense GEMM instead.
        check_mask: verify that ``mask`` is transposable 2:4 (one reduction and a host sync; the module skips
            it, its mask being transposable by construction).
        gemm: ``"ours"`` (our kernels) or ``"cusparselt"`` (:mod:`sparsert.runtime.cusparselt`; CUDA only).
    Returns:
        ``[..., N]`` in x's dtype.
    """
    fn = "sparse24_training_linear"
    check_gemm(gemm, fn)
    x = _autocast_input(x)
    _check_operands(x, weight, mask, bias, fn)
    if check_mask and not is_transposable_24(mask):
        raise FormatError(f"{fn}: mask {tuple(mask.shape)} is not a transposable 2:4 mask (every aligned 4x4 block "
                          "needs two ones in each row and each column); build it with transposable_mask(weight)")
    return _apply(x, weight, bias, mask, seed, offset, mvue, gemm)


def _records_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _apply(x, weight, bias, mask, seed: int, offset: int, mvue: bool, gemm: str) -> torch.Tensor:
    """The autograd Function when a graph is recorded; otherwise the forward GEMM alone (no ``(W⊙M)ᵀ``)."""
    if _records_graph(x, weight, bias):
        return Sparse24TrainingLinearFunction.apply(x, weight, bias, mask, seed, offset, mvue, gemm)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        y, _ = _forward_product(_aligned(x.reshape(-1, x.shape[-1])), weight, mask, bias, gemm, transposed=False)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype in COMPUTE_DTYPES:
            return x.to(dtype)
    return x


# ---------------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------------

class Sparse24TrainingLinear(nn.Module):
    """A linear layer trained with the Hu et al. recipe on 2:4 sparse GEMMs.

    Parameters: ``weight`` ``[out, in]`` (dense, trained; fp32/bf16/fp16), ``bias`` ``[out]`` or None.
    Buffer ``mask``: uint8 ``[out, in]`` 0/1, a transposable 2:4 mask of |W| (Hu et al. 2024, the 90-pattern
    4x4 argmax, :func:`sparsert.runtime.kernels.transposable_mask`), recomputed by :meth:`refresh_mask`.
    ``forward(x [..., in] bf16/fp16) -> [..., out]``: :class:`Sparse24TrainingLinearFunction` with the MVUE24
    draw ``step_seed(seed, calls)``; ``calls`` counts the forwards that record a graph and is saved in the
    state dict (``_extra_state``), so a resumed run continues the same random stream.
    ``in_features`` and ``out_features`` must be multiples of 64. ``gemm``: who runs the three products,
    ``"ours"`` (default) or ``"cusparselt"`` (a CUDA build of torch with cuSPARSELt; checked at each forward,
    so a CPU-only machine can still build the module and load its state).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        seed: int = 0,
        mvue: bool = True,
        device=None,
        dtype: torch.dtype | None = None,
        weight: nn.Parameter | None = None,
        bias_param: nn.Parameter | None = None,
        name: str = "weight",
        gemm: str = "ours",
    ) -> None:
        super().__init__()
        self.gemm = check_gemm(gemm, name, usable=False)  # a CPU-only machine may still load its checkpoint
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{name}: seed must be a non-negative integer, got {seed!r}")
        if not isinstance(mvue, bool):
            raise ConfigError(f"{name}: mvue must be true or false, got {mvue!r}")
        self.in_features, self.out_features = in_features, out_features
        self.name = name
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        if tuple(weight.shape) != (out_features, in_features):
            raise FormatError(f"{name}: weight has shape {tuple(weight.shape)}, expected "
                              f"({out_features}, {in_features})")
        if weight.dtype not in WEIGHT_DTYPES:
            raise FormatError(f"{name}: weight dtype {dtype_name(weight.dtype)} is not float32, bfloat16 or float16")
        _check_dims(out_features, in_features, name)
        self.weight = weight
        if bias and bias_param is None:
            bias_param = nn.Parameter(torch.zeros(out_features, device=weight.device, dtype=weight.dtype))
        self.bias = bias_param if bias else None
        self.seed, self.calls, self.mvue = seed, 0, mvue
        self.last_flip_rate: float | None = None
        self.register_buffer("mask", self._compute_mask())

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, seed: int = 0, mvue: bool = True, name: str = "weight",
                    gemm: str = "ours") -> Sparse24TrainingLinear:
        """A layer sharing ``linear``'s weight and bias Parameters; mask from its current |W|."""
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None, seed=seed, mvue=mvue,
                   weight=linear.weight, bias_param=linear.bias, name=name, gemm=gemm)

    @torch.no_grad()
    def _compute_mask(self) -> torch.Tensor:
        w = self.weight.detach()
        w = w if w.is_contiguous() and w.data_ptr() % 16 == 0 else w.contiguous().clone()
        return transposable_mask(w).to(torch.uint8)

    @torch.no_grad()
    def refresh_mask(self) -> int:
        """Recompute the transposable mask from the current |W|; return how many entries changed and set
        :attr:`last_flip_rate` (changed / D, the flip rate of Hu et al.)."""
        new = self._compute_mask()
        flips = int((new != self.mask).sum())
        self.mask.copy_(new)
        self.last_flip_rate = flips / self.mask.numel()
        return flips

    def get_extra_state(self) -> dict:
        return {"seed": self.seed, "calls": self.calls}

    def set_extra_state(self, state: dict) -> None:
        self.seed, self.calls = int(state["seed"]), int(state["calls"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        check_gemm(self.gemm, self.name)
        _check_operands(x, self.weight, self.mask, self.bias, self.name)
        seed = step_seed(self.seed, self.calls)
        if _records_graph(x, self.weight, self.bias):
            self.calls += 1
        keep = self.mask.view(torch.bool)  # 0/1 by construction: a free view instead of a != 0 pass
        return _apply(x, self.weight, self.bias, keep, seed, 0, self.mvue, self.gemm)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mvue={self.mvue}, gemm={self.gemm}")
