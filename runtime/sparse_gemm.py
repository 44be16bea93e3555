"""Launch wrappers for the 2:4 sparse GEMMs in ``cuda/``: weight preparation, argument checks, torch fallbacks.

Three kernel files (see their headers for the exact fragment layouts):

* ``sparse24_gemm.cu`` — 2:4 bf16/fp16 GEMM on ``mma.sp::ordered_metadata.m16n8k32`` (sm_80+): tiles
  ``large`` (128 features x 128 tokens), ``medium`` (64 x 64), ``small`` (64 x 16).
* ``sparse24_gemm_sm90.cu`` — the same product on Hopper's ``wgmma.mma_async.sp`` (sm_90a), 128 features x
  128 or 256 tokens per CTA, warp-specialised cp.async producer + two consumer warpgroups; 64-column k tiles
  (``sm90_128``, ``sm90_256``) or 128-column ones (``sm90_128_k128``, ``sm90_256_k128``); the ``sm90tma_*``
  variants fill the same stages with TMA (``runtime/tensor_map.py``) instead of cp.async, and the ``sm90mc_*``
  ones run as 2-CTA clusters whose CTAs (neighbouring weight tiles, same tokens) share every X box by multicast.
* ``w4a16_sparse24_gemm.cu`` — 2:4 + INT4 (W4A16, after Sparse-Marlin): ``decode`` (M <= 16, split-K,
  memory-bound) and ``prefill`` (large M).

All compute ``Y[M, N] = act(X[M, K] @ W^T + bias)`` with fp32 accumulation, ``W [N, K]`` 2:4 along K (the
MMA's sparse A operand; the kernels form ``Y^T = W X^T`` and transpose in the epilogue), X and Y row-major
bf16 or fp16, bias fp32 ``[N]``, activation ``none | relu | silu | gelu`` (gelu = erf form).

Prepared weights (:func:`prepare_sparse24`, :func:`prepare_w4a16`) hold the weight in the kernels' layouts,
rows padded with zeros to a multiple of :data:`ROW_PAD`; the metadata is exactly
:func:`sparsert.runtime.sparse_meta.reorder_meta_for_mma` of the (padded) 2:4 indices. Every wrapper checks
its arguments before launching (a :class:`FormatError` names the tensor and the constraint), runs the CUDA
kernel when X is on a usable GPU (sm_80+) and otherwise a torch fallback that computes the same function from
the prepared tensors (decompressed exactly as the kernel sees them: W4A16 weights are ``round(code * scale)``
in the activation dtype, as the kernel's register dequantisation produces them).
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
from dataclasses import dataclass, replace
from typing import ClassVar, TypeVar

import numpy as np
import torch

from sparsert.runtime.device import gpu_available
from sparsert.runtime.errors import ConfigError, DeviceError, FormatError, dtype_name
from sparsert.runtime.int4 import unpack_int4
from sparsert.runtime.kernel_build import KernelSpec, load_kernel, register_kernel
from sparsert.runtime.kernels import decompress24_reference
from sparsert.runtime.packed_linear import PackedLinear
from sparsert.runtime.sparse24 import compress_24, unpack_indices_24
from sparsert.runtime.sparse_meta import reorder_meta_for_mma

ROW_PAD = 128  # prepared weights have out_features padded to this (the largest CTA row tile)
ACTIVATIONS = {"none": 0, "relu": 1, "silu": 2, "gelu": 3}
DTYPES = {torch.bfloat16: 0, torch.float16: 1}
_DT_NAME = {torch.bfloat16: "bfloat16", torch.float16: "float16"}

# ---------------------------------------------------------------------------------------------------------
# Kernel configurations and specs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """One ``sparse24_gemm`` instantiation: BR features x BT tokens per CTA, WR x WT warps, ring depth."""

    name: str
    br: int
    bt: int
    wr: int
    wt: int
    stages: int

    @property
    def threads(self) -> int:
        return self.wr * self.wt * 32

    def smem_bytes(self) -> int:
        stage = self.br // 16 * (1024 + 128) + self.bt * 128
        return max(self.stages * stage, self.bt * (self.br + 8) * 2)

    def expr(self, dt: int) -> str:
        return f"sparse24_gemm<{dt}, {self.br}, {self.bt}, {self.wr}, {self.wt}, {self.stages}>"


SPARSE24_TILES = (
    TileConfig("large", 128, 128, 2, 4, 4),
    TileConfig("large", 128, 128, 2, 4, 3),  # devices with < 100 KB of shared memory per block (sm_86/89)
    TileConfig("medium", 64, 64, 2, 2, 4),
    TileConfig("small", 64, 16, 4, 1, 4),
)


def _sm90_prefix(tma: bool, cluster: int) -> str:
    """``sm90`` (cp.async producer), ``sm90tma`` (TMA) or ``sm90mc`` (TMA, X boxes multicast in a 2-CTA cluster)."""
    return "sm90mc" if cluster > 1 else "sm90tma" if tma else "sm90"


class _Sm90Tile:
    """What the wgmma configs share (their ``bt`` tokens per CTA, ``tma`` producer and ``cluster`` size)."""

    bt: int
    tma: bool
    cluster: int

    @property
    def tma_box_rows(self) -> int:
        """Rows of each X box the kernel's tensor map describes (0: no tensor map)."""
        return self.bt // self.cluster if self.tma else 0

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        """1-D grid: ceil(N/128) weight tiles rounded up to whole clusters (the kernels' padding CTAs) x
        ceil(M/BT) token tiles."""
        return (_tiles(_tiles(n, 128), self.cluster) * self.cluster * _tiles(m, self.bt), 1, 1)


@dataclass(frozen=True)
class Sm90Config(_Sm90Tile):
    """One wgmma 2:4 instantiation: 128 features x BT tokens, ``stages``-deep ring of k tiles of ``64 * subs``
    columns, filled by cp.async (``sparse24_gemm_sm90``) or by TMA (``tma``: ``sparse24_gemm_sm90_tma``;
    ``cluster=2``: ``sparse24_gemm_sm90_tma_mc``, two CTAs on neighbouring weight tiles share each X box by
    multicast); ``name`` is its ``kernel=`` choice."""

    bt: int
    stages: int
    subs: int = 1
    tma: bool = False
    cluster: int = 1

    @property
    def name(self) -> str:
        return f"{_sm90_prefix(self.tma, self.cluster)}_{self.bt}" + ("" if self.subs == 1 else f"_k{64 * self.subs}")

    def smem_bytes(self) -> int:
        return 1024 + self.stages * self.subs * (self.bt * 128 + 9216) + self.stages * 16

    def expr(self, dt: int) -> str:
        if self.tma:
            mc = "_mc" if self.cluster > 1 else ""
            return f"sparse24_gemm_sm90_tma{mc}<{dt}, {self.bt}, {self.stages}, {self.subs}>"
        tail = "" if self.subs == 1 else f", {self.subs}"
        return f"sparse24_gemm_sm90<{dt}, {self.bt}, {self.stages}{tail}>"


SM90_CONFIGS = (Sm90Config(128, 8), Sm90Config(256, 5), Sm90Config(128, 4, 2), Sm90Config(256, 2, 2),
                Sm90Config(128, 8, 1, True), Sm90Config(256, 5, 1, True), Sm90Config(128, 4, 2, True),
                Sm90Config(256, 2, 2, True), Sm90Config(128, 8, 1, True, 2), Sm90Config(256, 5, 1, True, 2),
                Sm90Config(256, 2, 2, True, 2))
SM90_BY_NAME = {c.name: c for c in SM90_CONFIGS}


@dataclass(frozen=True)
class PrefillConfig:
    """One ``w4a16_sparse24_prefill`` instantiation (128 features x BT tokens, WR x WT warps)."""

    bt: int
    wr: int
    wt: int
    stages: int

    def smem_bytes(self, ng: int) -> int:
        stage = 8 * (512 + 256 + 32 * ng) + self.bt * 256
        return max(self.stages * stage, self.bt * (128 + 8) * 2)

    def expr(self, dt: int, ng: int) -> str:
        return f"w4a16_sparse24_prefill<{dt}, {self.bt}, {self.wr}, {self.wt}, {self.stages}, {ng}>"


PREFILL_CONFIGS = (PrefillConfig(128, 2, 4, 3), PrefillConfig(64, 2, 4, 4))


@dataclass(frozen=True)
class W4A16Sm90Config(_Sm90Tile):
    """One ``w4a16_sparse24_sm90`` instantiation (wgmma.sp, 128 features x BT tokens, 128-column k tiles;
    ``tma``: ``w4a16_sparse24_sm90_tma``, the stages filled by TMA; ``cluster=2``: ``w4a16_sparse24_sm90_tma_mc``,
    X boxes multicast in a 2-CTA cluster); ``name`` is its ``kernel=`` choice."""

    bt: int
    stages: int
    tma: bool = False
    cluster: int = 1

    @property
    def name(self) -> str:
        return f"{_sm90_prefix(self.tma, self.cluster)}_{self.bt}"

    def stage_bytes(self, ng: int) -> int:
        raw = 2 * self.bt * 128 + 8 * (512 + 256 + 32 * ng)
        return (raw + 1023) // 1024 * 1024

    def smem_bytes(self, ng: int) -> int:
        return 1024 + self.stages * self.stage_bytes(ng) + self.stages * 16

    def expr(self, dt: int, ng: int) -> str:
        kind = ("_tma_mc" if self.cluster > 1 else "_tma") if self.tma else ""
        return f"w4a16_sparse24_sm90{kind}<{dt}, {self.bt}, {self.stages}, {ng}>"


W4A16_SM90_CONFIGS = (W4A16Sm90Config(128, 5), W4A16Sm90Config(256, 3), W4A16Sm90Config(128, 5, True),
                      W4A16Sm90Config(256, 3, True), W4A16Sm90Config(128, 5, True, 2),
                      W4A16Sm90Config(256, 3, True, 2))
W4A16_SM90_BY_NAME = {c.name: c for c in W4A16_SM90_CONFIGS}
DECODE_MAX_M = 16
DECODE_STAGES = (3, 2)  # ring depths the plan picks from by itself (deepest that fits)
# Deeper rings, built and chosen only on request (decode_stages=): a warp of a one-CTA-per-SM plan then has its
# next 3-5 units in flight instead of 1-2 (the H200 decode times look latency-bound). Not measured yet.
DECODE_DEEP_STAGES = (6, 4)
DECODE_STATIC_SMEM = 128  # the kernel's one static __shared__ int, rounded up


def decode_expr(dt: int, nb: int, ng: int, stages: int) -> str:
    return f"w4a16_sparse24_decode<{dt}, {nb}, {ng}, {stages}>"


def decode_smem_bytes(nb: int, ng: int, stages: int, ksplit: int) -> int:
    """Dynamic shared memory of the decode kernel for ``ksplit`` 128-column units per CTA."""
    ntok = nb * 8
    staged = ntok * ksplit * 256 + 8 * stages * 4 * (768 + 128 * ng)
    return max(staged, 4 * ntok * 132 * 4)


# One spec per (kernel family, dtype), so a launch compiles only the instantiations it can use.
SPARSE24_SPECS = {dt: register_kernel(f"sparse24_gemm_{name}", KernelSpec(
    source="sparse24_gemm.cu",
    name_expressions=tuple(c.expr(dt) for c in SPARSE24_TILES),
    ptx_must_contain=("mma.sp::ordered_metadata",),
)) for dt, name in ((0, "bf16"), (1, "f16"))}
SM90_SPECS = {dt: register_kernel(f"sparse24_gemm_sm90_{name}", KernelSpec(
    source="sparse24_gemm_sm90.cu",
    name_expressions=tuple(c.expr(dt) for c in SM90_CONFIGS)
    + tuple(c.expr(dt, ng) for ng in (1, 2) for c in W4A16_SM90_CONFIGS),
    archs=("sm_90a",),
    ptx_must_contain=("wgmma.mma_async.sp",),
)) for dt, name in ((0, "bf16"), (1, "f16"))}
PREFILL_SPECS = {dt: register_kernel(f"w4a16_prefill_{name}", KernelSpec(
    source="w4a16_sparse24_gemm.cu",
    name_expressions=tuple(c.expr(dt, ng) for ng in (1, 2) for c in PREFILL_CONFIGS),
    ptx_must_contain=("mma.sp::ordered_metadata",),
)) for dt, name in ((0, "bf16"), (1, "f16"))}
DECODE_SPECS = {(dt, st): register_kernel(f"w4a16_decode_{name}_s{st}", KernelSpec(
    source="w4a16_sparse24_gemm.cu",
    name_expressions=tuple(decode_expr(dt, nb, ng, st) for nb in (1, 2) for ng in (1, 2)),
    ptx_must_contain=("mma.sp::ordered_metadata",),
)) for dt, name in ((0, "bf16"), (1, "f16")) for st in DECODE_STAGES + DECODE_DEEP_STAGES}


def all_specs() -> list[KernelSpec]:
    """Every kernel spec this module launches."""
    return [*SPARSE24_SPECS.values(), *SM90_SPECS.values(), *PREFILL_SPECS.values(), *DECODE_SPECS.values()]


def precompile(arch: str, *, workers: int = 8) -> int:
    """Build (or fetch from the on-disk cache) every spec of this module that targets ``arch``, on
    ``workers`` threads (NVRTC runs without the GIL), so first launches do not pay the compile serially.
    Returns the number of specs built."""
    from concurrent.futures import ThreadPoolExecutor

    from sparsert.runtime.kernel_build import check_arch, compile_kernel

    todo = []
    for spec in all_specs():
        try:
            check_arch(spec, arch)
        except DeviceError:
            continue
        todo.append(spec)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda sp: compile_kernel(sp, arch, want=("cubin",)), todo))
    return len(todo)


# ---------------------------------------------------------------------------------------------------------
# Prepared weights
# ---------------------------------------------------------------------------------------------------------


def _pad_rows(n: int) -> int:
    return (n + ROW_PAD - 1) // ROW_PAD * ROW_PAD


def _check_weight_dims(n: int, k: int, k_multiple: int, name: str) -> None:
    if n <= 0 or n % 8:
        raise FormatError(f"{name}: out_features N={n} must be a positive multiple of 8 (16-byte output rows)")
    if k <= 0 or k % k_multiple:
        raise FormatError(f"{name}: in_features K={k} must be a positive multiple of {k_multiple} "
                          f"(the kernel's k tile)")


def _padded_indices(idx: torch.Tensor, n_pad: int) -> torch.Tensor:
    """uint8 [N, K/2] indices -> [Npad, K/2]; padding rows keep columns (0, 1) of every group (valid
    ordered metadata, values zero)."""
    n, half = idx.shape
    if n == n_pad:
        return idx
    pad = torch.tensor([0, 1], dtype=torch.uint8, device=idx.device).repeat(half // 2).expand(n_pad - n, half)
    return torch.cat([idx, pad], dim=0)


def _pad_zero_rows(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    if t.shape[0] == n_pad:
        return t
    return torch.cat([t, t.new_zeros((n_pad - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


def values_to_fragments(values: torch.Tensor) -> torch.Tensor:
    """Kept values ``[Npad, K/2]`` -> the mma.sp A-fragment order ``[Npad/16, K/64, 2, 32, 8]``.

    Element ``[mt, kb, s, 4g+t, e]`` is kept value ``(row 16mt + g + 8*hr, column 32kb + 16s + 8hk + 2t + p)``
    with ``e = 4hk + 2hr + p`` (PTX ISA m16n8k16 A fragment on the 16x16 compressed tile of k32 step s).
    """
    n, half = values.shape
    v = values.reshape(n // 16, 2, 8, half // 32, 2, 2, 4, 2)  # (mt, hr, g, kb, s, hk, t, p)
    return v.permute(0, 3, 4, 2, 6, 5, 1, 7).reshape(n // 16, half // 32, 2, 32, 8).contiguous()


def fragments_to_values(frag: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`values_to_fragments`: ``[Npad/16, K/64, 2, 32, 8]`` -> ``[Npad, K/2]``."""
    mt, kb = frag.shape[:2]
    f = frag.reshape(mt, kb, 2, 8, 4, 2, 2, 2)  # (mt, kb, s, g, t, hk, hr, p)
    return f.permute(0, 6, 3, 1, 2, 5, 4, 7).reshape(mt * 16, kb * 32).contiguous()


def codes_to_words(codes: torch.Tensor) -> torch.Tensor:
    """Kept INT4 codes int8 ``[Npad, K/2]`` in [-8, 7] -> int32 words ``[Npad/16, K/128, 32, 4]``.

    Word ``[mt, ku, 4g+t, s]`` packs 8 codes in offset binary (code + 8), nibble ``n = 4p + 2hk + hr`` =
    code of ``(row 16mt + g + 8hr, kept column 64ku + 16s + 8hk + 2t + p)``, so the nibble pair (n, n+4) is
    A register ``2hk + hr`` of the k32 step (see cuda/w4a16_sparse24_gemm.cu).
    """
    n, half = codes.shape
    off = (codes.to(torch.int64) + 8).reshape(n // 16, 2, 8, half // 64, 4, 2, 4, 2)  # (mt,hr,g,ku,s,hk,t,p)
    off = off.permute(0, 3, 2, 6, 4, 7, 5, 1).reshape(n // 16, half // 64, 32, 4, 8)  # (..., lane, s, nibble)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * 4
    words = (off << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def words_to_codes(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`codes_to_words`: int32 ``[Npad/16, K/128, 32, 4]`` -> int8 ``[Npad, K/2]``."""
    mt, ku = words.shape[:2]
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, device=words.device, dtype=torch.int64) * 4
    nib = (w.unsqueeze(-1) >> shifts) & 0xF  # (mt, ku, lane, s, n)
    nib = nib.reshape(mt, ku, 8, 4, 4, 2, 2, 2)  # (mt, ku, g, t, s, p, hk, hr)
    codes = nib.permute(0, 7, 2, 1, 4, 6, 3, 5).reshape(mt * 16, ku * 64) - 8
    return codes.to(torch.int8)


def _scale_subgroups(group_size: int) -> int:
    """NG: scale entries per row per 128-column unit (128/G for G in {64}, 1 for G a multiple of 128)."""
    if group_size % 128 == 0:
        return 1
    if group_size == 64:
        return 2
    raise FormatError(f"INT4 group size {group_size} is not supported by the W4A16 kernels: use 64 or a "
                      "multiple of 128 (a k32 step must not straddle two scale groups)")


def scales_to_units(scales: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Scales ``[Npad, K/G]`` -> ``[Npad/16, K/128, 8, NG, 2]``: ``[mt, ku, g, q, hr]`` = scale of row
    ``16mt + g + 8hr`` for the group holding column ``128ku + q*128/NG``."""
    ng = _scale_subgroups(group_size)
    n = scales.shape[0]
    ku = k // 128
    cols = torch.arange(ku * ng, device=scales.device) * (128 // ng)
    per_unit = scales[:, cols // group_size]  # (Npad, KU*NG)
    s = per_unit.reshape(n // 16, 2, 8, ku, ng).permute(0, 3, 2, 4, 1)  # (mt, ku, g, q, hr)
    return s.contiguous()


def _unit_scales_per_kept(units: torch.Tensor) -> torch.Tensor:
    """``[Npad/16, K/128, 8, NG, 2]`` -> the scale each kept value uses ``[Npad, K/2]``."""
    mt, ku, _, ng, _ = units.shape
    per_row = units.permute(0, 4, 2, 1, 3).reshape(mt * 16, ku, ng)  # (row, ku, q)
    step = torch.arange(64, device=units.device) // 16  # k32 step of each kept column within a unit
    q = step * ng // 4
    return per_row[:, :, q].reshape(mt * 16, ku * 64)


_W = TypeVar("_W", bound="_PreparedWeight")


class _PreparedWeight:
    """What the prepared weights share: their device tensors are the fields named in ``_TENSORS`` (the first one's
    leading dimension counts 16-row blocks of the padded weight), ``_DTYPE_FIELD`` holds the activation dtype,
    and ``bias`` is fp32 ``[out_features]`` or None."""

    _TENSORS: ClassVar[tuple[str, ...]]
    _DTYPE_FIELD: ClassVar[str]
    bias: torch.Tensor | None

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self._TENSORS]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self._DTYPE_FIELD).dtype

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device

    @property
    def n_pad(self) -> int:
        return self._tensors()[0].shape[0] * 16

    def to(self: _W, device) -> _W:
        """A copy with every tensor (bias included) on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in self._TENSORS}
        return replace(self, **moved, bias=None if self.bias is None else self.bias.to(device))

    def nbytes(self) -> int:
        """Device bytes of the prepared tensors (padding included, bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())


@dataclass
class Sparse24Weight(_PreparedWeight):
    """A 2:4 weight ``W [out_features, in_features]`` in the bf16/fp16 sparse GEMMs' layout.

    Attributes:
        values: ``dtype [Npad/16, K/64, 2, 32, 8]`` kept values in A-fragment order
            (:func:`values_to_fragments`), rows ``>= out_features`` zero.
        meta: int32 ``[Npad/16, K/64, 32]`` = ``reorder_meta_for_mma`` of the padded indices.
        bias: fp32 ``[out_features]`` or None.
    """

    _TENSORS: ClassVar[tuple[str, ...]] = ("values", "meta")
    _DTYPE_FIELD: ClassVar[str] = "values"

    out_features: int
    in_features: int
    values: torch.Tensor
    meta: torch.Tensor
    bias: torch.Tensor | None = None

    def kept_values(self) -> torch.Tensor:
        """Kept values ``[out_features, K/2]`` in K order (the prepared dtype)."""
        return fragments_to_values(self.values)[: self.out_features]

    def to_dense(self) -> torch.Tensor:
        """float32 ``[out_features, in_features]`` decompressed from the prepared tensors."""
        kept = fragments_to_values(self.values).float()  # (Npad, K/2)
        return decompress24_reference(kept, self.meta, self.in_features)[: self.out_features]


@dataclass
class W4A16Weight(_PreparedWeight):
    """A 2:4 + INT4 weight in the W4A16 kernels' layout.

    Attributes:
        qweight: int32 ``[Npad/16, K/128, 32, 4]`` (:func:`codes_to_words`).
        meta: int32 ``[Npad/16, K/64, 32]`` (``reorder_meta_for_mma``).
        scales: ``dtype [Npad/16, K/128, 8, NG, 2]`` (:func:`scales_to_units`), in the activation dtype.
        group_size: INT4 group along the original K (64 or a multiple of 128).
        bias: fp32 ``[out_features]`` or None.
    """

    _TENSORS: ClassVar[tuple[str, ...]] = ("qweight", "meta", "scales")
    _DTYPE_FIELD: ClassVar[str] = "scales"

    out_features: int
    in_features: int
    group_size: int
    qweight: torch.Tensor
    meta: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def ng(self) -> int:
        return self.scales.shape[3]

    def kept_dequantized(self) -> torch.Tensor:
        """float32 ``[Npad, K/2]``: ``round_dtype((code) * scale)``, what the kernel feeds the tensor cores."""
        codes = words_to_codes(self.qweight).float()
        scale = _unit_scales_per_kept(self.scales).float()
        return (codes * scale).to(self.dtype).float()

    def to_dense(self) -> torch.Tensor:
        """float32 ``[out_features, in_features]``, decompressed exactly as the kernel sees the weight."""
        return decompress24_reference(self.kept_dequantized(), self.meta, self.in_features)[: self.out_features]

    def bits_per_weight(self) -> float:
        """Device bytes of the prepared weight (padding included) x 8 / (out_features x in_features)."""
        return self.nbytes() * 8 / (self.out_features * self.in_features)


def _check_dtype(dtype: torch.dtype, fn: str) -> int:
    if dtype not in DTYPES:
        raise FormatError(f"{fn}: dtype must be bfloat16 or float16, got {dtype}")
    return DTYPES[dtype]


def _check_weight_type(weight, cls, fn: str, prepare: str) -> None:
    if not isinstance(weight, cls):
        raise FormatError(f"{fn}: weight must be a {cls.__name__} (from {prepare}), got {type(weight).__name__}")


def _check_packed(packed, fn: str, name: str) -> None:
    if not isinstance(packed, PackedLinear):
        raise FormatError(f"{fn}: {name} must be a PackedLinear (sparsert.runtime.packed_linear.pack_linear), got "
                          f"{type(packed).__name__}")


def prepare_sparse24(packed: PackedLinear, *, dtype: torch.dtype = torch.bfloat16, device=None,
                     name: str = "weight") -> Sparse24Weight:
    """PackedLinear (2:4, not quantized) -> :class:`Sparse24Weight` on ``device`` (default: where it lives).

    Requires ``out_features % 8 == 0`` and ``in_features % 64 == 0``. Values are cast to ``dtype``.
    """
    fn = "prepare_sparse24"
    _check_dtype(dtype, fn)
    _check_packed(packed, fn, name)
    if not packed.sparse or packed.values is None:
        what = "INT4-quantized (use prepare_w4a16)" if packed.quantized else "dense"
        raise FormatError(f"{fn}: {name} is {what}; expected a 2:4 PackedLinear with kept values")
    n, k = packed.out_features, packed.in_features
    _check_weight_dims(n, k, 64, name)
    packed.validate(name)
    dev = torch.device(device) if device is not None else packed.values.device
    n_pad = _pad_rows(n)
    idx = _padded_indices(unpack_indices_24(packed.indices.to(dev), k), n_pad)
    vals = _pad_zero_rows(packed.values.to(dev, dtype), n_pad)
    bias = None if packed.bias is None else packed.bias.to(dev, torch.float32).contiguous()
    return Sparse24Weight(out_features=n, in_features=k, values=values_to_fragments(vals),
                          meta=reorder_meta_for_mma(idx, name=f"{name}.indices"), bias=bias)


def prepare_sparse24_dense(weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                           dtype: torch.dtype | None = None, name: str = "weight") -> Sparse24Weight:
    """A dense ``[N, K]`` tensor that is already 2:4 along K -> :class:`Sparse24Weight` (same device)."""
    if weight.dim() != 2:
        raise FormatError(f"prepare_sparse24_dense: {name} must be 2-D [N, K], got {tuple(weight.shape)}")
    dtype = dtype or (weight.dtype if weight.dtype in DTYPES else torch.bfloat16)
    values, indices = compress_24(weight.to(dtype), name=name)
    packed = PackedLinear(out_features=weight.shape[0], in_features=weight.shape[1], indices=indices,
                          values=values, bias=None if bias is None else bias.float())
    return prepare_sparse24(packed, dtype=dtype, name=name)


def prepare_w4a16(packed: PackedLinear, *, dtype: torch.dtype = torch.float16, device=None,
                  name: str = "weight") -> W4A16Weight:
    """PackedLinear (2:4 + INT4) -> :class:`W4A16Weight` for activations of ``dtype``.

    Requires ``out_features % 8 == 0``, ``in_features % 128 == 0``, group size 64 or a multiple of 128.
    Scales are converted from fp16 to ``dtype`` (exact for fp16; bf16 rounds them to 8 bits of mantissa).
    """
    fn = "prepare_w4a16"
    _check_dtype(dtype, fn)
    _check_packed(packed, fn, name)
    if not (packed.sparse and packed.quantized):
        raise FormatError(f"{fn}: {name} must be a 2:4 + INT4 PackedLinear (indices, qweight, scales)")
    n, k, gs = packed.out_features, packed.in_features, packed.group_size
    _check_weight_dims(n, k, 128, name)
    packed.validate(name)
    ng = _scale_subgroups(int(gs))
    dev = torch.device(device) if device is not None else packed.qweight.device
    n_pad = _pad_rows(n)
    codes = _pad_zero_rows(unpack_int4(packed.qweight.to(dev), k // 2), n_pad)
    idx = _padded_indices(unpack_indices_24(packed.indices.to(dev), k), n_pad)
    scales = _pad_zero_rows(packed.scales.to(dev).to(dtype), n_pad)
    units = scales_to_units(scales, int(gs), k)
    assert units.shape[3] == ng
    bias = None if packed.bias is None else packed.bias.to(dev, torch.float32).contiguous()
    return W4A16Weight(out_features=n, in_features=k, group_size=int(gs), qweight=codes_to_words(codes),
                       meta=reorder_meta_for_mma(idx, name=f"{name}.indices"), scales=units, bias=bias)


# ---------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------


def _check_activation(activation: str, fn: str) -> int:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{fn}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _check_input(x, weight, fn: str) -> tuple[torch.Tensor, int]:
    """Validate X; return it flattened to [M, K] and M."""
    if not isinstance(x, torch.Tensor):
        raise FormatError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != weight.dtype:
        raise FormatError(f"{fn}: x has dtype {dtype_name(x.dtype)}, expected "
                          f"{_DT_NAME[weight.dtype]} (the dtype the weight was prepared for)")
    if x.dim() < 1 or x.shape[-1] != weight.in_features:
        raise FormatError(f"{fn}: x has shape {tuple(x.shape)}; its last dimension must be in_features="
                          f"{weight.in_features}")
    if not x.is_contiguous():
        raise FormatError(f"{fn}: x must be contiguous (row-major [M, K]), got strides {tuple(x.stride())} "
                          f"for shape {tuple(x.shape)}")
    if x.numel() and x.data_ptr() % 16:
        raise FormatError(f"{fn}: x must start on a 16-byte boundary (cp.async), its address is "
                          f"{x.data_ptr()} (an offset view? pass .clone())")
    if x.device != weight.device:
        raise DeviceError(f"{fn}: x is on {x.device} but the weight is on {weight.device}")
    return x.reshape(-1, weight.in_features), x.numel() // weight.in_features


def _check_bias(bias, weight, fn: str) -> torch.Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32 or tuple(bias.shape) != (
            weight.out_features,):
        raise FormatError(f"{fn}: bias must be a float32 tensor of shape ({weight.out_features},), got "
                          f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
    if not bias.is_contiguous() or bias.device != weight.device:
        raise FormatError(f"{fn}: bias must be contiguous and on {weight.device}")
    return bias


def _check_out(out, shape: tuple[int, ...], weight, fn: str) -> torch.Tensor | None:
    if out is None:
        return None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != weight.dtype:
        raise FormatError(f"{fn}: out must be a {_DT_NAME[weight.dtype]} tensor of shape {shape}, got "
                          f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    if not out.is_contiguous() or (out.numel() and out.data_ptr() % 16) or out.device != weight.device:
        raise FormatError(f"{fn}: out must be contiguous, 16-byte aligned and on {weight.device}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Torch fallbacks (also the references the GPU tests compare against, in float64 there)
# ---------------------------------------------------------------------------------------------------------


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The epilogue activation in torch (gelu = erf form, as the kernels)."""
    if activation == "relu":
        return torch.relu(y)
    if activation == "silu":
        return torch.nn.functional.silu(y)
    if activation == "gelu":
        return torch.nn.functional.gelu(y)
    return y


def _fallback(x2: torch.Tensor, dense: torch.Tensor, bias, activation: str, dtype) -> torch.Tensor:
    y = x2.float() @ dense.to(x2.device).t()
    if bias is not None:
        y = y + bias.to(y.device)
    return apply_activation(y, activation).to(dtype)


def _run_linear(fn: str, x, weight: _PreparedWeight, bias, activation: str, out, kernel: str,
                kernels: tuple[str, ...], launch, max_m: int | None = None) -> torch.Tensor:
    """The body both linears share: check the arguments (naming ``fn``), then either the torch fallback (x not on
    a usable GPU) or ``launch(x2 [M, K], M, activation code, bias or NULL, y [..., N], device index)`` into
    ``out`` or a new tensor. ``max_m``: the most tokens ``kernel`` handles (a FormatError above it)."""
    act = _check_activation(activation, fn)
    if kernel not in kernels:
        raise ConfigError(f"{fn}: kernel must be one of {', '.join(kernels)}, got {kernel!r}")
    x2, m = _check_input(x, weight, fn)
    bias = _check_bias(bias if bias is not None else weight.bias, weight, fn)
    out_shape = tuple(x.shape[:-1]) + (weight.out_features,)
    out = _check_out(out, out_shape, weight, fn)
    if max_m is not None and m > max_m:
        raise FormatError(f"{fn}: the {kernel} kernel handles at most {max_m} tokens, x has M={m}")
    if not (x.is_cuda and gpu_available()):
        y = _fallback(x2, weight.to_dense(), bias, activation, x.dtype).reshape(out_shape)
        if out is not None:
            out.copy_(y)
            return out
        return y
    y = out if out is not None else torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if m:
        launch(x2, m, act, bias if bias is not None else _null(), y, x.device.index or 0)
    return y


# ---------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------

_ATTR_LOCK = threading.Lock()
_SMEM_SET: dict[tuple, int] = {}
_SMEM_LIMIT: dict[int, int] = {}


def max_smem_per_block(device_index: int) -> int:
    """Opt-in dynamic shared memory per block of a device (bytes)."""
    if device_index not in _SMEM_LIMIT:
        from sparsert.runtime.device import check_cuda, driver

        drv = driver()
        dev = check_cuda(drv.cuDeviceGet(device_index), "cuDeviceGet")
        val = check_cuda(drv.cuDeviceGetAttribute(
            drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev),
            "cuDeviceGetAttribute(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)")
        _SMEM_LIMIT[device_index] = int(val)
    return _SMEM_LIMIT[device_index]


def _ensure_smem(kernel, nbytes: int, device_index: int) -> None:
    """Raise the kernel's dynamic shared memory limit to ``nbytes`` (needed above 48 KB)."""
    key = (id(kernel), device_index)
    with _ATTR_LOCK:
        if _SMEM_SET.get(key, 0) >= nbytes:
            return
    from sparsert.runtime.device import check_cuda, driver

    drv = driver()
    attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    handle = kernel.kernel.handle
    if type(handle).__name__ == "CUkernel":
        dev = check_cuda(drv.cuDeviceGet(device_index), "cuDeviceGet")
        check_cuda(drv.cuKernelSetAttribute(attr, nbytes, handle, dev), f"cuKernelSetAttribute({kernel.name})")
    else:
        check_cuda(drv.cuFuncSetAttribute(handle, attr, nbytes), f"cuFuncSetAttribute({kernel.name})")
    with _ATTR_LOCK:
        _SMEM_SET[key] = nbytes


def _launch(spec: KernelSpec, expr: str, device_index: int, grid, block, smem: int, *args) -> None:
    kernel = load_kernel(spec, expr, device_index)
    if smem > 48 * 1024:
        _ensure_smem(kernel, smem, device_index)
    kernel(grid, block, *args, shmem=smem)


# Variants built and checked on CPU (NVRTC/ptxas, emulation) but not yet run on a GPU: the dispatcher leaves
# them out unless $SPARSERT_ENABLE_UNVERIFIED_KERNELS=1 (a kernel that traps would take the user's CUDA
# context down); the benchmarks and the GPU tests run them. Remove a name once a GPU run has passed it.
UNVERIFIED_KERNELS = ("sm90tma_", "sm90mc_", "sm90_128_k128", "sm90_256_k128")


def kernel_enabled(name: str, *, include_unverified: bool = False) -> bool:
    """Whether automatic kernel choice (the dispatcher; the benchmarks with ``include_unverified``) may use
    variant ``name``. False when ``$SPARSERT_DISABLE_KERNELS`` (comma-separated prefixes: ``sm90tma`` disables
    every TMA variant, ``sm90_128`` also ``sm90_128_k128``) matches it, and for the
    :data:`UNVERIFIED_KERNELS` unless ``include_unverified`` or ``$SPARSERT_ENABLE_UNVERIFIED_KERNELS=1``. A
    call that names a kernel explicitly runs it regardless. tools/gpu_session.sh disables the TMA variants
    when their GPU tests fail."""
    disabled = [p.strip() for p in os.environ.get("SPARSERT_DISABLE_KERNELS", "").split(",") if p.strip()]
    if any(name.startswith(p) for p in disabled):
        return False
    if include_unverified or os.environ.get("SPARSERT_ENABLE_UNVERIFIED_KERNELS", "") not in ("", "0"):
        return True
    return not any(name.startswith(p) for p in UNVERIFIED_KERNELS)


def _x_operand(x2: torch.Tensor, plan: LaunchPlan):
    """The kernel's X argument: the tensor itself, or for a TMA kernel the device address of X's tensor map."""
    if not plan.tma_box_rows:
        return x2
    from sparsert.runtime.tensor_map import device_tensor_map

    tmap = device_tensor_map(x2, plan.tma_box_rows)
    # the map may later be evicted from its cache: its memory must not be reused while this launch reads it
    tmap.record_stream(torch.cuda.current_stream(x2.device))
    return np.uint64(tmap.data_ptr())


def _tiles(extent: int, tile: int) -> int:
    return (extent + tile - 1) // tile


def tile_coords(pid: int, nx: int, ny: int, group: int = 8) -> tuple[int, int]:
    """The kernels' grouped rasterisation of a 1-D grid (``tile_coords`` in the .cu files): CTA ``pid`` ->
    (weight tile x, token tile y); consecutive CTAs sweep the weight tiles for a band of ``group`` token
    tiles so that both operands of the CTAs resident at once stay in L2."""
    per_group = group * nx
    gid, r = divmod(pid, per_group)
    first_y = gid * group
    gsize = min(ny - first_y, group)
    return r // gsize, first_y + r % gsize


def cluster_tile_coords(pid: int, nx: int, ny: int, cluster: int, group: int = 8) -> tuple[int, int]:
    """``cta_setup``'s rasterisation for clusters of ``cluster`` CTAs (the ``sm90mc_*`` kernels): the cluster
    ``pid // cluster`` is placed by :func:`tile_coords` over ``ceil(nx / cluster)`` x ``ny`` cluster tiles and
    its CTA of rank ``pid % cluster`` takes weight tile ``cluster * x + rank`` (>= nx: a padding CTA)."""
    cx, y = tile_coords(pid // cluster, _tiles(nx, cluster), ny, group)
    return cx * cluster + pid % cluster, y


def _null() -> np.uint64:
    return np.uint64(0)


def _arch(device_index: int) -> str:
    from sparsert.runtime.device import get_device

    return get_device(device_index).arch


def _sm_count(device_index: int) -> int:
    from sparsert.runtime.device import get_device

    return get_device(device_index).sm_count


# ---------------------------------------------------------------------------------------------------------
# bf16/fp16 2:4 GEMM
# ---------------------------------------------------------------------------------------------------------

SPARSE24_KERNELS = ("auto", "small", "medium", "large", *(c.name for c in SM90_CONFIGS))


def choose_sparse24_tile(m: int, kernel: str, smem_limit: int) -> TileConfig:
    """The ``sparse24_gemm`` instantiation for ``m`` tokens (``kernel`` = auto/small/medium/large)."""
    name = kernel
    if kernel == "auto":
        name = "small" if m <= 16 else "medium" if m <= 64 else "large"
    fits = [c for c in SPARSE24_TILES if c.name == name and c.smem_bytes() <= smem_limit]
    if not fits:
        raise DeviceError(f"sparse24_gemm: no {name} tile fits {smem_limit} bytes of shared memory per block")
    return max(fits, key=lambda c: c.stages)


@dataclass(frozen=True)
class LaunchPlan:
    """Which kernel a call launches and how: spec, name expression, grid, block, dynamic shared memory."""

    spec: KernelSpec
    expr: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int
    decode: DecodePlan | None = None
    tma_box_rows: int = 0  # > 0: the kernel reads X through a tensor map with boxes of this many rows


def _check_plan_args(fn: str, m: int, n: int, k: int, dtype: torch.dtype, arch: str, kernel: str,
                     kernels: tuple[str, ...]) -> int:
    """The plan functions' own argument checks (they are public and pure); returns the dtype code."""
    for name, v in (("M", m), ("N", n), ("K", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise FormatError(f"{fn}: {name} must be a positive int, got {v!r}")
    dt = _check_dtype(dtype, fn)
    if not isinstance(arch, str) or not re.fullmatch(r"sm_\d+a?", arch):
        raise ConfigError(f"{fn}: arch must look like 'sm_80' or 'sm_90a', got {arch!r}")
    if kernel not in kernels:
        raise ConfigError(f"{fn}: kernel must be one of {', '.join(kernels)}, got {kernel!r}")
    return dt


def check_sparse24_kernel_k(kernel: str, k: int, fn: str = "sparse24_linear") -> None:
    """The wgmma tiles' K constraint (64-column k blocks, 128 for the ``_k128`` tiles), checked before launch and
    before the CPU fallback alike."""
    cfg = SM90_BY_NAME.get(kernel)
    if cfg is not None and k % (64 * cfg.subs):
        raise FormatError(f"{fn}: kernel {kernel!r} needs K % {64 * cfg.subs} == 0, got K={k}")


@functools.lru_cache(maxsize=4096, typed=True)  # pure; called on every launch, so a hit saves ~3 us of host time
def plan_sparse24(m: int, n: int, k: int, dtype: torch.dtype, arch: str, smem_limit: int,
                  kernel: str = "auto") -> LaunchPlan:
    """Kernel choice for ``sparse24_linear`` (pure: no device needed). auto: the mma.sp tile for M (small <= 16
    < medium <= 64 < large); on sm_90a, from the H200 run in bench/RESULTS.md (2026-12-04: the best kernel of
    30 Llama cases), ``small`` up to 16 tokens, the 256-token wgmma tile for K >= 8192 from M >= 2048, and
    ``medium`` otherwise (at M = 128 ``large`` was 1.2-2.5x slower than ``medium``: too few tiles for 132
    SMs)."""
    dt = _check_plan_args("plan_sparse24", m, n, k, dtype, arch, kernel, SPARSE24_KERNELS)
    if kernel == "auto" and arch == "sm_90a" and m > 16:
        kernel = "sm90_256" if m >= 2048 and k >= 8192 else "medium"
    if kernel.startswith("sm90"):
        if arch != "sm_90a":
            raise DeviceError(f"sparse24_linear: kernel {kernel!r} needs an sm_90a GPU (Hopper), this one is "
                              f"{arch}")
        cfg = SM90_BY_NAME[kernel]
        check_sparse24_kernel_k(kernel, k)
        return LaunchPlan(SM90_SPECS[dt], cfg.expr(dt), cfg.grid(m, n), (384, 1, 1), cfg.smem_bytes(),
                          tma_box_rows=cfg.tma_box_rows)
    cfg = choose_sparse24_tile(m, kernel, smem_limit)
    return LaunchPlan(SPARSE24_SPECS[dt], cfg.expr(dt), (_tiles(n, cfg.br) * _tiles(m, cfg.bt), 1, 1),
                      (cfg.threads, 1, 1), cfg.smem_bytes())


def sparse24_linear(x: torch.Tensor, weight: Sparse24Weight, *, bias: torch.Tensor | None = None,
                    activation: str = "none", out: torch.Tensor | None = None,
                    kernel: str = "auto") -> torch.Tensor:
    """``act(x @ W^T + bias)`` with the 2:4 weight on the sparse tensor cores.

    Args:
        x: ``[..., K]`` bf16/fp16 (the weight's dtype), contiguous, 16-byte aligned.
        weight: from :func:`prepare_sparse24`; its ``bias`` is used unless ``bias`` is given.
        activation: none | relu | silu | gelu.
        out: optional ``[..., N]`` output (contiguous, aligned).
        kernel: auto | small | medium | large (mma.sp tiles) | sm90_128 | sm90_256 | sm90_128_k128 |
            sm90_256_k128 and the same with ``sm90tma_`` (TMA producer), sm90mc_128 | sm90mc_256 | sm90mc_256_k128
            (TMA, 2-CTA clusters sharing X) (wgmma, sm_90a only; the _k128 ones need K % 128 == 0); see
            :func:`plan_sparse24`.
    Returns:
        ``[..., N]`` in x's dtype. Without a usable GPU: the torch fallback (same math from the prepared
        tensors: fp32 accumulation of the bf16/fp16 products).
    """
    _check_weight_type(weight, Sparse24Weight, "sparse24_linear", "prepare_sparse24")
    check_sparse24_kernel_k(kernel, weight.in_features)

    def launch(x2: torch.Tensor, m: int, act: int, b, y: torch.Tensor, dev: int) -> None:
        n, k = weight.out_features, weight.in_features
        plan = plan_sparse24(m, n, k, x.dtype, _arch(dev), max_smem_per_block(dev), kernel)
        _launch(plan.spec, plan.expr, dev, plan.grid, plan.block, plan.smem,
                _x_operand(x2, plan), weight.values, weight.meta, b, y, m, n, k, act)

    return _run_linear("sparse24_linear", x, weight, bias, activation, out, kernel, SPARSE24_KERNELS, launch)


# ---------------------------------------------------------------------------------------------------------
# W4A16 2:4 GEMM
# ---------------------------------------------------------------------------------------------------------

W4A16_KERNELS = ("auto", "decode", "prefill", *(c.name for c in W4A16_SM90_CONFIGS))


@dataclass(frozen=True)
class DecodePlan:
    """Grid of the decode kernel: ``splits`` CTAs along K per 128-row tile, ``ksplit`` units each."""

    nb: int
    stages: int
    ksplit: int
    splits: int
    row_tiles: int
    smem: int


def plan_decode(m: int, n_pad: int, k: int, ng: int, sm_count: int, smem_limit: int, *,
                ctas_per_sm: float = 2, stages: int | None = None) -> DecodePlan:
    """Split-K plan for ``m <= 16`` tokens: about ``ctas_per_sm`` CTAs per SM (below 1: fewer CTAs than SMs,
    e.g. one split per 128-row tile and no split-K fix-up when the tiles alone fill the GPU), each CTA's X slice
    and warp rings within the device's shared memory; ring depth ``stages`` (one of :data:`DECODE_STAGES` or, on
    request only, :data:`DECODE_DEEP_STAGES`) or, when None, the deepest of :data:`DECODE_STAGES` that fits."""
    if not 1 <= m <= DECODE_MAX_M:
        raise FormatError(f"w4a16 decode handles 1..{DECODE_MAX_M} tokens, got M={m}")
    _check_decode_options(ctas_per_sm, stages)
    for name, v in (("padded rows", n_pad), ("K", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 128:
            raise FormatError(f"w4a16 decode: {name} must be a positive multiple of 128, got {v!r}")
    if isinstance(sm_count, bool) or not isinstance(sm_count, int) or sm_count <= 0:
        raise ConfigError(f"w4a16 decode: sm_count must be a positive int, got {sm_count!r}")
    nb = 1 if m <= 8 else 2
    ku = k // 128
    row_tiles = n_pad // 128
    want = max(1, min(ku, math.ceil(ctas_per_sm * sm_count / row_tiles)))
    ksplit = math.ceil(ku / want)
    limit = smem_limit - DECODE_STATIC_SMEM
    for st in DECODE_STAGES if stages is None else (stages,):
        ks = ksplit
        while ks > 1 and decode_smem_bytes(nb, ng, st, ks) > limit:
            ks = math.ceil(ks / 2)
        if decode_smem_bytes(nb, ng, st, ks) <= limit:
            splits = math.ceil(ku / ks)
            return DecodePlan(nb, st, ks, splits, row_tiles, decode_smem_bytes(nb, ng, st, ks))
    raise DeviceError(f"w4a16 decode: no configuration fits {smem_limit} bytes of shared memory per block")


def _check_decode_options(ctas_per_sm, stages) -> None:
    """``decode_ctas_per_sm`` (a finite number > 0) and ``decode_stages`` (None or a built ring depth)."""
    if isinstance(ctas_per_sm, bool) or not isinstance(ctas_per_sm, (int, float)) or not math.isfinite(ctas_per_sm) \
            or ctas_per_sm <= 0:
        raise ConfigError(f"w4a16 decode: decode_ctas_per_sm must be a finite number > 0, got {ctas_per_sm!r}")
    if stages is not None and (isinstance(stages, bool) or stages not in DECODE_STAGES + DECODE_DEEP_STAGES):
        raise ConfigError(f"w4a16 decode: stages must be one of {DECODE_STAGES + DECODE_DEEP_STAGES}, got "
                          f"{stages!r}")


_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}
_COUNTERS_LOCK = threading.Lock()


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tile counters for the split-K fix-up, one buffer per (device, stream); every launch
    leaves them zero again."""
    stream = torch.cuda.current_stream(device).cuda_stream
    key = (device.index or 0, stream)
    with _COUNTERS_LOCK:
        buf = _COUNTERS.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
            _COUNTERS[key] = buf
        return buf


@functools.lru_cache(maxsize=4096, typed=True)  # pure; called on every launch, so a hit saves ~3 us of host time
def plan_w4a16(m: int, n: int, n_pad: int, k: int, dtype: torch.dtype, ng: int, arch: str, smem_limit: int,
               sm_count: int, kernel: str = "auto", decode_ctas_per_sm: float = 2,
               decode_stages: int | None = None) -> LaunchPlan:
    """Kernel choice for ``w4a16_linear`` (pure). auto: decode for M <= 16; on sm_90a the 128-token wgmma kernel
    from M >= 128; else the mma.sp prefill tile that fits shared memory."""
    dt = _check_plan_args("plan_w4a16", m, n, k, dtype, arch, kernel, W4A16_KERNELS)
    if kernel == "decode" and m > DECODE_MAX_M:
        raise FormatError(f"w4a16_linear: the decode kernel handles at most {DECODE_MAX_M} tokens, x has M={m}")
    if kernel == "decode" or (kernel == "auto" and m <= DECODE_MAX_M):
        d = plan_decode(m, n_pad, k, ng, sm_count, smem_limit, ctas_per_sm=decode_ctas_per_sm,
                        stages=decode_stages)
        return LaunchPlan(DECODE_SPECS[(dt, d.stages)], decode_expr(dt, d.nb, ng, d.stages),
                          (d.row_tiles, d.splits, 1), (256, 1, 1), d.smem, decode=d)
    if kernel == "auto" and arch == "sm_90a" and m >= 128:
        kernel = "sm90_128"  # the H200 run (bench/RESULTS.md): best or within 3% of the best at every M >= 128
    if kernel.startswith("sm90"):
        if arch != "sm_90a":
            raise DeviceError(f"w4a16_linear: kernel {kernel!r} needs an sm_90a GPU (Hopper), this one is {arch}")
        cfg9 = W4A16_SM90_BY_NAME[kernel]
        return LaunchPlan(SM90_SPECS[dt], cfg9.expr(dt, ng), cfg9.grid(m, n), (384, 1, 1), cfg9.smem_bytes(ng),
                          tma_box_rows=cfg9.tma_box_rows)
    fits = [c for c in PREFILL_CONFIGS if c.smem_bytes(ng) <= smem_limit]
    if not fits:
        raise DeviceError(f"w4a16_linear: no prefill tile fits {smem_limit} bytes of shared memory per block")
    cfg = fits[0]
    return LaunchPlan(PREFILL_SPECS[dt], cfg.expr(dt, ng), (_tiles(n, 128) * _tiles(m, cfg.bt), 1, 1),
                      (cfg.wr * cfg.wt * 32, 1, 1), cfg.smem_bytes(ng))


def w4a16_linear(x: torch.Tensor, weight: W4A16Weight, *, bias: torch.Tensor | None = None,
                 activation: str = "none", out: torch.Tensor | None = None,
                 kernel: str = "auto", decode_ctas_per_sm: float = 2,
                 decode_stages: int | None = None) -> torch.Tensor:
    """``act(x @ dequant(W)^T + bias)`` with the 2:4 + INT4 weight (W4A16).

    Args:
        x: ``[..., K]`` bf16/fp16 (the dtype the weight was prepared for), contiguous, 16-byte aligned.
        weight: from :func:`prepare_w4a16`.
        kernel: auto | decode (M <= 16, split-K mma.sp) | prefill (mma.sp tiles) | sm90_128 | sm90_256 |
            sm90tma_128 | sm90tma_256 | sm90mc_128 | sm90mc_256
            (wgmma.sp, sm_90a only); see :func:`plan_w4a16`.
        decode_ctas_per_sm, decode_stages: the decode split-K plan's target CTAs per SM and ring depth
            (:func:`plan_decode`; None = deepest that fits).
    Returns:
        ``[..., N]`` in x's dtype. Without a usable GPU: the torch fallback on ``weight.to_dense()``.
    """
    _check_weight_type(weight, W4A16Weight, "w4a16_linear", "prepare_w4a16")
    _check_decode_options(decode_ctas_per_sm, decode_stages)

    def launch(x2: torch.Tensor, m: int, act: int, b, y: torch.Tensor, dev: int) -> None:
        n, k = weight.out_features, weight.in_features
        plan = plan_w4a16(m, n, weight.n_pad, k, x.dtype, weight.ng, _arch(dev), max_smem_per_block(dev),
                          _sm_count(dev), kernel, decode_ctas_per_sm, decode_stages)
        if plan.decode is not None:
            d = plan.decode
            counters = _split_counters(x.device, d.row_tiles)
            ws = (torch.empty(d.splits * d.row_tiles * d.nb * 8 * 128, dtype=torch.float32, device=x.device)
                  if d.splits > 1 else counters)
            _launch(plan.spec, plan.expr, dev, plan.grid, plan.block, plan.smem, x2, weight.qweight, weight.meta,
                    weight.scales, b, y, ws, counters, m, n, k, d.ksplit, act)
            return
        _launch(plan.spec, plan.expr, dev, plan.grid, plan.block, plan.smem,
                _x_operand(x2, plan), weight.qweight, weight.meta, weight.scales, b, y, m, n, k, act)

    return _run_linear("w4a16_linear", x, weight, bias, activation, out, kernel, W4A16_KERNELS, launch,
                       max_m=DECODE_MAX_M if kernel == "decode" else None)
