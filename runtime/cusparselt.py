"""cuSPARSELt 2:4 GEMMs through torch's binding, with the algorithm configuration searched per problem.

NVIDIA's cuSPARSELt (deployment.md) is reached through torch's private ops: ``torch._cslt_compress`` packs a
2:4 matrix, ``torch._cslt_sparse_mm`` multiplies it. Called plainly, ``_cslt_sparse_mm`` runs algorithm
configuration 0, which on an H200 never beat dense cuBLAS (0.15–0.85×, bench/RESULTS.md); with the
configuration ``cusparseLtMatmulSearch`` picks for the problem it reached 1.34–1.45× at M = 8192. So every
product here runs with a searched :class:`CsltConfig`, found once per problem (:func:`problem_key`) and kept
for the process (:class:`TunedCusparselt`).

Operands, as torch's binding defines them: ``A`` 2:4 sparse ``[m, k]`` (2:4 along k, compressed by
:func:`compress` from a dense row-major bf16/fp16 tensor), ``B`` dense ``[k, n]`` — contiguous, or the
transposed view of a contiguous ``[n, k]`` tensor — in A's dtype; ``A·B`` comes back ``[m, n]`` row-major,
or ``[n, m]`` row-major with ``transpose_result=True`` (``(A·B)ᵀ``, which is how ``x @ Wᵀ`` is computed as
``W·xᵀ``). ``bias`` ``[m]`` in A's dtype is added to each of the m rows of ``A·B``. cuSPARSELt needs every
dimension a multiple of 8 for 16-bit types (callers pad).

A search costs roughly as much as timing every configuration on the problem a few times (tens of
milliseconds to a few seconds for large GEMMs); its result only chooses a kernel, never changes the math.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch

from sparsert.runtime.errors import DeviceError, FormatError

__all__ = ["CsltConfig", "TunedCusparselt", "compress", "cusparselt_status", "problem_key", "search_config",
           "sparse_mm", "tuned"]

DTYPES = (torch.bfloat16, torch.float16)
DIM_MULTIPLE = 8  # every dimension, for 16-bit operands


@dataclass(frozen=True)
class CsltConfig:
    """A cuSPARSELt algorithm configuration: ``alg_id`` (CUSPARSELT_MATMUL_ALG_CONFIG_ID), ``split_k`` and
    ``split_k_mode`` (-1: the library's choice; torch versions whose binding takes a ``split_k_one_kernel`` flag
    get ``split_k_mode > 0``). The default is what a plain ``_cslt_sparse_mm`` call runs."""

    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = -1


def cusparselt_status() -> str:
    """'' when torch's cuSPARSELt ops can run here (CUDA device, torch built with cuSPARSELt), else why not."""
    if not all(hasattr(torch, op) for op in ("_cslt_compress", "_cslt_sparse_mm")):
        return f"torch {torch.__version__} has no torch._cslt_compress / torch._cslt_sparse_mm"
    try:
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} sees no CUDA device (cuSPARSELt runs on sm_80 and newer GPUs)"
        if not torch.backends.cusparselt.is_available():
            return f"torch {torch.__version__} was built without cuSPARSELt"
    except Exception as exc:  # a broken CUDA install reports through here
        return f"cuSPARSELt unusable: {type(exc).__name__}: {str(exc)[:160]}"
    return ""


def _require() -> None:
    why = cusparselt_status()
    if why:
        raise DeviceError(why)


@functools.lru_cache(maxsize=1)
def _mm_arguments() -> frozenset[str]:
    """Argument names of this torch's ``aten::_cslt_sparse_mm`` (they changed across releases)."""
    schemas = torch._C._jit_get_schemas_for_operator("aten::_cslt_sparse_mm")
    return frozenset(a.name for s in schemas for a in s.arguments)


def config_kwargs(config: CsltConfig, arguments: frozenset[str] | None = None) -> dict:
    """The keyword arguments of ``torch._cslt_sparse_mm`` that select ``config``, for the argument names this
    torch accepts (``arguments``; default: this torch's schema). A configuration this torch cannot express
    (split-K on a torch without ``split_k``) raises DeviceError rather than running another one."""
    args = _mm_arguments() if arguments is None else arguments
    kw = {}
    if config.alg_id or "alg_id" in args:
        if "alg_id" not in args:
            raise DeviceError(f"torch {torch.__version__}'s _cslt_sparse_mm takes no alg_id (config {config})")
        kw["alg_id"] = int(config.alg_id)
    if config.split_k != 1 or config.split_k_mode != -1:
        if "split_k" not in args:
            raise DeviceError(f"torch {torch.__version__}'s _cslt_sparse_mm takes no split_k (config {config})")
        kw["split_k"] = int(config.split_k)
        if "split_k_mode" in args:
            kw["split_k_mode"] = int(config.split_k_mode)
        elif "split_k_one_kernel" in args:
            kw["split_k_one_kernel"] = config.split_k_mode > 0
    return kw


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_dense_operand(b: torch.Tensor, what: str = "dense operand B") -> torch.Tensor:
    """``b`` as cuSPARSELt reads it: contiguous ``[k, n]`` or the transpose of a contiguous ``[n, k]`` (returned
    as is); any other strides are copied contiguous. FormatError for a non-2-D or non-bf16/fp16 tensor."""
    if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype not in DTYPES:
        got = f"{_dt(b.dtype)} {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
        raise FormatError(f"cuSPARSELt: {what} must be a 2-D bfloat16/float16 tensor [k, n], got {got}")
    if b.is_contiguous() or b.t().is_contiguous():
        return b
    return b.contiguous()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def compress(dense: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """``torch._cslt_compress`` of ``dense`` (bf16/fp16 ``[m, k]`` on a CUDA device, 2:4 along k: at most two
    non-zeros in every aligned group of four — cuSPARSELt keeps two entries per group, so a denser group
    would lose values silently; not re-checked here), m and k multiples of 8. Returns the opaque cuSPARSELt
    buffer (values and metadata) that :func:`sparse_mm` takes as ``A``."""
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2 or dense.dtype not in DTYPES:
        got = f"{_dt(dense.dtype)} {tuple(dense.shape)}" if isinstance(dense, torch.Tensor) else type(dense).__name__
        raise FormatError(f"cuSPARSELt: {name} must be a 2-D bfloat16/float16 tensor [m, k], got {got}")
    m, k = dense.shape
    if m % DIM_MULTIPLE or k % DIM_MULTIPLE or m == 0 or k == 0:
        raise FormatError(f"cuSPARSELt: {name} has shape ({m}, {k}); both dimensions must be positive multiples "
                          f"of {DIM_MULTIPLE}")
    _require()
    try:
        return torch._cslt_compress(dense.contiguous())
    except RuntimeError as exc:  # e.g. a CPU tensor: name it instead of torch's internals
        raise DeviceError(f"cuSPARSELt could not compress {name} ({_dt(dense.dtype)} ({m}, {k}) on "
                          f"{dense.device}): {_first_line(exc)}") from exc


def problem_key(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, transpose_result: bool) -> tuple:
    """What a searched configuration is valid for: A's rows m, the reduction k, B's columns n rounded up to a
    power of two (token counts vary call to call; one search serves a bucket), the dtype, B's layout, the
    output layout, whether a bias is fused, and the device."""
    k, n = b.shape
    return (int(a.shape[0]), int(k), 1 << max(int(n) - 1, 0).bit_length(), b.dtype, bool(b.is_contiguous()),
            bool(transpose_result), bias is not None, b.device.index)


def search_config(a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None = None,
                  transpose_result: bool = False) -> CsltConfig:
    """The configuration ``cusparseLtMatmulSearch`` finds fastest for ``A·B`` on these operands (it runs the
    product with each configuration; the operands are not modified). Uses ``torch._C._cusparselt.mm_search``
    (configuration id and split-K) where torch has it, else ``torch._cslt_sparse_mm_search`` (id only)."""
    _require()
    b = check_dense_operand(b)
    binding = getattr(torch._C, "_cusparselt", None)
    try:
        if binding is not None and hasattr(binding, "mm_search"):
            found = binding.mm_search(a, b, bias, None, None, transpose_result)
            alg_id, split_k, mode = int(found[0]), int(found[1]), found[2]
            mode = (1 if mode else -1) if isinstance(mode, bool) else int(mode)
            config = CsltConfig(alg_id, split_k, mode)
        elif hasattr(torch, "_cslt_sparse_mm_search"):
            config = CsltConfig(int(torch._cslt_sparse_mm_search(a, b, bias=bias,
                                                                 transpose_result=transpose_result)))
        else:
            config = CsltConfig()
    except RuntimeError as exc:
        raise DeviceError(f"cuSPARSELt configuration search for A {tuple(a.shape)} and B {_dt(b.dtype)} "
                          f"{tuple(b.shape)} on {b.device} failed: {_first_line(exc)}") from exc
    try:
        config_kwargs(config)
    except DeviceError:  # found by a search this torch's matmul cannot replay: keep what it can
        config = CsltConfig(alg_id=config.alg_id)
    return config


def sparse_mm(a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None = None, transpose_result: bool = False,
              config: CsltConfig | None = None) -> torch.Tensor:
    """``A·B (+ bias per row)`` with one configuration (default: configuration 0): ``[m, n]``, or ``[n, m]``
    with ``transpose_result``, in B's dtype. See the module docstring for the operands."""
    _require()
    b = check_dense_operand(b)
    if bias is not None:
        bias = bias.to(b.dtype).contiguous()
    try:
        return torch._cslt_sparse_mm(a, b, bias=bias, transpose_result=transpose_result,
                                     **config_kwargs(config or CsltConfig()))
    except RuntimeError as exc:
        raise DeviceError(f"cuSPARSELt product of A {tuple(a.shape)} and B {_dt(b.dtype)} {tuple(b.shape)} on "
                          f"{b.device} ({config or CsltConfig()}) failed: {_first_line(exc)}") from exc


class TunedCusparselt:
    """:func:`sparse_mm` with the configuration searched once per :func:`problem_key` and remembered (thread
    safe; one instance per process is :func:`tuned`). ``configs`` maps keys to what was found."""

    def __init__(self) -> None:
        self.configs: dict[tuple, CsltConfig] = {}
        self._lock = threading.Lock()

    def config_for(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                   transpose_result: bool = False) -> CsltConfig:
        b = check_dense_operand(b)
        key = problem_key(a, b, bias, transpose_result)
        with self._lock:
            found = self.configs.get(key)
        if found is None:
            bias_c = None if bias is None else bias.to(b.dtype).contiguous()
            found = search_config(a, b, bias=bias_c, transpose_result=transpose_result)
            with self._lock:
                found = self.configs.setdefault(key, found)
        return found

    def __call__(self, a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None = None,
                 transpose_result: bool = False) -> torch.Tensor:
        config = self.config_for(a, b, bias, transpose_result)
        return sparse_mm(a, b, bias=bias, transpose_result=transpose_result, config=config)


_TUNED = TunedCusparselt()


def tuned() -> TunedCusparselt:
    """The process's :class:`TunedCusparselt`."""
    return _TUNED
