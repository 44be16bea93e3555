"""cuSPARSELt 2:4 GEMMs through torch's binding, with the algorithm configuration searched per problem.

NVIDIA's cuSPARSELt (deployment.md) is reached through torch's private ops: ``torch._cslt_compress`` packs a
2:4 matrix, ``torch._cslt_sparse_mm`` multiplies it. Called plainly, ``_cslt_sparse_mm`` runs algorithm
configuration 0, which on an H200 never beat dense cuBLAS (0.15–0.85×, bench/RESULTS.md); with the
configuration ``cusparseLtMatmulSearch`` picks for the problem it reached 1.34–1.45× at M = 8192. So every
product here runs with a searched :class:`CsltConfig`, found once per problem (:func:`problem_key`) and kept
for the process and in a JSON file per device (:class:`TunedCusparselt`, :func:`cusparselt_cache_path`).

Operands, as torch's binding defines them: ``A`` 2:4 sparse ``[m, k]`` (2:4 along k), a :class:`CsltMatrix`
made by :func:`compress` from a dense row-major bf16/fp16 tensor; ``B`` dense ``[k, n]`` in A's dtype —
contiguous, or the transposed view of a contiguous ``[n, k]`` tensor; ``A·B`` comes back ``[m, n]`` row-major,
or ``[n, m]`` row-major with ``transpose_result=True`` (``(A·B)ᵀ``, which is how ``x @ Wᵀ`` is computed as
``W·xᵀ``). ``bias`` ``[m]`` is cast to A's dtype and added to each of the m rows of ``A·B``. cuSPARSELt needs
every dimension a multiple of 8 for 16-bit types (callers pad; checked here).

A search costs roughly as much as timing every configuration on the problem a few times (tens of
milliseconds to a few seconds for large GEMMs); its result only chooses a kernel, never changes the math.
A configuration found for one token count serves its whole power-of-two bucket; if it fails on another count
of the bucket, that exact count is searched on its own. Torch applies a searched split-K mode only together
with a split-K factor above 1 (so a mode the library reports for ``split_k == 1`` is its own default anyway).
"""

from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsert.runtime.device import is_sticky_cuda_error
from sparsert.runtime.errors import DeviceError, FormatError, dtype_name
from sparsert.runtime.fileio import user_cache_file, write_atomic

__all__ = ["CsltConfig", "CsltMatrix", "TunedCusparselt", "compress", "cusparselt_status", "problem_key",
           "search_config", "sparse_mm", "tuned"]

DTYPES = (torch.bfloat16, torch.float16)
DIM_MULTIPLE = 8  # every dimension, for 16-bit operands
MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class CsltConfig:
    """A cuSPARSELt algorithm configuration: ``alg_id`` (CUSPARSELT_MATMUL_ALG_CONFIG_ID), ``split_k`` and
    ``split_k_mode`` (cusparseLtSplitKMode_t: 1 one kernel, 2 two kernels, ...; -1 the library's choice). The
    default is what a plain ``_cslt_sparse_mm`` call runs."""

    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = -1


@dataclass(frozen=True)
class CsltMatrix:
    """A 2:4 matrix compressed by cuSPARSELt: ``packed`` (torch's opaque buffer of kept values and metadata),
    its logical ``rows`` × ``cols`` (2:4 along cols) and ``dtype`` (bf16/fp16), and a ``name`` for messages."""

    packed: torch.Tensor
    rows: int
    cols: int
    dtype: torch.dtype
    name: str = "A"

    def describe(self) -> str:
        return f"{self.name} ({dtype_name(self.dtype)} [{self.rows}, {self.cols}])"

    def nbytes(self) -> int:
        """Device bytes of the compressed buffer."""
        return self.packed.numel() * self.packed.element_size()


@functools.lru_cache(maxsize=1)
def cusparselt_status() -> str:
    """'' when torch's cuSPARSELt ops can run here (torch built with cuSPARSELt, device 0 of compute
    capability 8.0 or newer), else why not. Probed once per process."""
    if not all(hasattr(torch, op) for op in ("_cslt_compress", "_cslt_sparse_mm")):
        return f"torch {torch.__version__} has no torch._cslt_compress / torch._cslt_sparse_mm"
    try:
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} sees no CUDA device (cuSPARSELt runs on sm_80 and newer GPUs)"
        if not torch.backends.cusparselt.is_available():
            return f"torch {torch.__version__} was built without cuSPARSELt"
        cc = tuple(torch.cuda.get_device_capability(0))
        if cc < MIN_CAPABILITY:
            return f"cuSPARSELt needs compute capability 8.0 or newer, device 0 has {cc[0]}.{cc[1]}"
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
        elif "split_k_one_kernel" in args:  # older torch: a flag, true unless two kernels were chosen
            kw["split_k_one_kernel"] = config.split_k_mode != 2
    return kw



def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def check_dense_operand(b: torch.Tensor, what: str = "dense operand B") -> torch.Tensor:
    """``b`` as cuSPARSELt reads it: a 2-D bf16/fp16 ``[k, n]``, both dimensions positive multiples of 8,
    contiguous or the transpose of a contiguous ``[n, k]`` (returned as is); other strides are copied
    contiguous. FormatError naming ``what`` otherwise."""
    if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype not in DTYPES:
        got = f"{dtype_name(b.dtype)} {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
        raise FormatError(f"cuSPARSELt: {what} must be a 2-D bfloat16/float16 tensor [k, n], got {got}")
    k, n = b.shape
    if k == 0 or n == 0 or k % DIM_MULTIPLE or n % DIM_MULTIPLE:
        raise FormatError(f"cuSPARSELt: {what} has shape ({k}, {n}); both dimensions must be positive multiples "
                          f"of {DIM_MULTIPLE} (pad the tokens)")
    if b.is_contiguous() or b.t().is_contiguous():
        return b
    return b.contiguous()


def _check_product(a: CsltMatrix, b: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                          torch.Tensor | None]:
    """B (see :func:`check_dense_operand`) and bias (cast to A's dtype, contiguous) for ``A·B``, checked
    against A: same dtype, B's k = A's cols, bias of A's rows."""
    if not isinstance(a, CsltMatrix):
        raise FormatError(f"cuSPARSELt: A must be a CsltMatrix made by compress(), got {type(a).__name__}")
    b = check_dense_operand(b)
    if b.dtype != a.dtype:
        raise FormatError(f"cuSPARSELt: dense operand B is {dtype_name(b.dtype)} but {a.describe()} is "
                          f"{dtype_name(a.dtype)}; both must have one dtype")
    if b.shape[0] != a.cols:
        raise FormatError(f"cuSPARSELt: dense operand B has shape {tuple(b.shape)}; its rows must be the columns "
                          f"of {a.describe()}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.numel() != a.rows:
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise FormatError(f"cuSPARSELt: bias must hold one value per row of {a.describe()}, got {got}")
        bias = bias.reshape(-1).to(a.dtype).contiguous()
    return b, bias


def compress(dense: torch.Tensor, name: str = "weight") -> CsltMatrix:
    """``torch._cslt_compress`` of ``dense`` (bf16/fp16 ``[m, k]`` on a CUDA device, 2:4 along k: at most two
    non-zeros in every aligned group of four — cuSPARSELt keeps two entries per group, so a denser group
    would lose values silently; not re-checked here), m and k positive multiples of 8. Returns the
    :class:`CsltMatrix` that :func:`sparse_mm` takes as ``A``."""
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2 or dense.dtype not in DTYPES:
        got = (f"{dtype_name(dense.dtype)} {tuple(dense.shape)}" if isinstance(dense, torch.Tensor)
               else type(dense).__name__)
        raise FormatError(f"cuSPARSELt: {name} must be a 2-D bfloat16/float16 tensor [m, k], got {got}")
    m, k = dense.shape
    if m % DIM_MULTIPLE or k % DIM_MULTIPLE or m == 0 or k == 0:
        raise FormatError(f"cuSPARSELt: {name} has shape ({m}, {k}); both dimensions must be positive multiples "
                          f"of {DIM_MULTIPLE}")
    _require()
    try:
        packed = torch._cslt_compress(dense.contiguous())
    except RuntimeError as exc:  # e.g. a CPU tensor: name it instead of torch's internals
        raise DeviceError(f"cuSPARSELt could not compress {name} ({dtype_name(dense.dtype)} ({m}, {k}) on "
                          f"{dense.device}): {_first_line(exc)}") from exc
    return CsltMatrix(packed, int(m), int(k), dense.dtype, name)


def problem_key(a: CsltMatrix, b: torch.Tensor, bias: torch.Tensor | None, transpose_result: bool, *,
                exact: bool = False) -> tuple:
    """What a searched configuration is valid for: A's rows and columns, B's columns n rounded up to a power
    of two (token counts vary call to call; one search serves a bucket) or n itself with ``exact``, the
    dtype, B's layout, the output layout, whether a bias is fused, and the device."""
    n = int(b.shape[1])
    return (a.rows, a.cols, n if exact else 1 << max(n - 1, 0).bit_length(), exact, a.dtype,
            bool(b.is_contiguous()), bool(transpose_result), bias is not None, b.device.index)


def search_config(a: CsltMatrix, b: torch.Tensor, *, bias: torch.Tensor | None = None,
                  transpose_result: bool = False) -> CsltConfig:
    """The configuration ``cusparseLtMatmulSearch`` finds fastest for ``A·B`` on these operands (it runs the
    product with each configuration; the operands are not modified). Uses ``torch._C._cusparselt.mm_search``
    (configuration id and split-K) where torch has it, else ``torch._cslt_sparse_mm_search`` (id only)."""
    b, bias = _check_product(a, b, bias)
    return _search(a, b, bias, transpose_result)


def _search(a: CsltMatrix, b: torch.Tensor, bias: torch.Tensor | None, transpose_result: bool) -> CsltConfig:
    """:func:`search_config` on operands :func:`_check_product` has passed."""
    _require()
    binding = getattr(torch._C, "_cusparselt", None)
    try:
        if binding is not None and hasattr(binding, "mm_search"):
            found = binding.mm_search(a.packed, b, bias, None, None, transpose_result)
            alg_id, split_k, mode = int(found[0]), int(found[1]), found[2]
            # older torch reports split_k_one_kernel (a flag) where newer reports the mode
            mode = (1 if mode else 2) if isinstance(mode, bool) else int(mode)
            config = CsltConfig(alg_id, split_k, mode)
        elif hasattr(torch, "_cslt_sparse_mm_search"):
            config = CsltConfig(int(torch._cslt_sparse_mm_search(a.packed, b, bias=bias,
                                                                 transpose_result=transpose_result)))
        else:
            config = CsltConfig()
    except RuntimeError as exc:
        raise DeviceError(f"cuSPARSELt configuration search for {a.describe()} times B {dtype_name(b.dtype)} "
                          f"{tuple(b.shape)} on {b.device} failed: {_first_line(exc)}") from exc
    try:
        config_kwargs(config)
    except DeviceError:  # found by a search this torch's matmul cannot replay: keep what it can
        config = CsltConfig(alg_id=config.alg_id)
    return config


def sparse_mm(a: CsltMatrix, b: torch.Tensor, *, bias: torch.Tensor | None = None, transpose_result: bool = False,
              config: CsltConfig | None = None) -> torch.Tensor:
    """``A·B (+ bias per row)`` with one configuration (default: configuration 0): ``[m, n]``, or ``[n, m]``
    with ``transpose_result``, in A's dtype. See the module docstring for the operands."""
    b, bias = _check_product(a, b, bias)
    return _run(a, b, bias, transpose_result, config or CsltConfig())


def _run(a: CsltMatrix, b: torch.Tensor, bias: torch.Tensor | None, transpose_result: bool,
         config: CsltConfig) -> torch.Tensor:
    """:func:`sparse_mm` on operands :func:`_check_product` has passed."""
    _require()
    try:
        return torch._cslt_sparse_mm(a.packed, b, bias=bias, transpose_result=transpose_result,
                                     **config_kwargs(config))
    except RuntimeError as exc:
        raise DeviceError(f"cuSPARSELt product of {a.describe()} and B {dtype_name(b.dtype)} {tuple(b.shape)} on "
                          f"{b.device} ({config}) failed: {_first_line(exc)}") from exc


CACHE_FORMAT = 1


def cusparselt_cache_path(device_name: str) -> Path:
    """``$SPARSERT_CUSPARSELT_CACHE`` if set, else ``~/.cache/sparsert/cusparselt/<device name>.json`` (beside
    the kernel cache when ``$SPARSERT_CACHE_DIR`` is set)."""
    env = os.environ.get("SPARSERT_CUSPARSELT_CACHE")
    return Path(env) if env else user_cache_file("cusparselt", device_name)


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # the name only labels the cache file
        return "cuda"


class TunedCusparselt:
    """:func:`sparse_mm` with the configuration searched once per :func:`problem_key` and remembered (thread
    safe; one instance per process is :func:`tuned`). ``configs`` maps the keys (as strings) to what was
    found. With ``persist`` the configurations are also kept in a JSON file per device (``path``, default
    :func:`cusparselt_cache_path`; ``{"format", "device", "torch", "cusparselt", "configs"}``, written
    atomically after each search), so a new process does not search again; a file for another device, torch
    or cuSPARSELt version, or an unreadable one, is ignored (and replaced on the next save)."""

    def __init__(self, path: Path | str | None = None, *, persist: bool = True) -> None:
        self.configs: dict[str, CsltConfig] = {}
        self.persist = persist
        self._path = None if path is None else Path(path)
        self._loaded: set[torch.device] = set()  # devices whose cache file has been read
        self._lock = threading.Lock()

    def _file(self, device: torch.device) -> Path | None:
        if not self.persist:
            return None
        return self._path if self._path is not None else cusparselt_cache_path(_device_name(device))

    @staticmethod
    def _header(device: torch.device) -> dict:
        try:
            version = torch.backends.cusparselt.version()
        except Exception:
            version = None
        return {"format": CACHE_FORMAT, "device": _device_name(device), "torch": torch.__version__,
                "cusparselt": version}

    def _load(self, device: torch.device) -> None:
        """Merge ``device``'s cache file's configurations (once per device and process; the lock is held)."""
        if device in self._loaded:
            return
        self._loaded.add(device)
        file = self._file(device)
        if file is None:
            return
        try:
            data = json.loads(file.read_text())
            if {k: data.get(k) for k in self._header(device)} != self._header(device):
                return
            for key, c in data["configs"].items():
                self.configs.setdefault(str(key), CsltConfig(*(int(v) for v in c)))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a missing or corrupt cache is only a lost optimisation: search again

    def _save(self, device: torch.device) -> None:
        """Write the configurations to ``device``'s cache file, if any (the lock is held)."""
        file = self._file(device)
        if file is None:
            return
        data = {**self._header(device), "configs": {k: [c.alg_id, c.split_k, c.split_k_mode]
                                                    for k, c in sorted(self.configs.items())}}
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(file, json.dumps(data, indent=1))
        except OSError:
            pass  # an unwritable cache folder must not stop the product

    def _config(self, key: tuple, a: CsltMatrix, b: torch.Tensor, bias,
                transpose_result: bool) -> tuple[CsltConfig, bool]:
        """(the configuration for ``key``, whether it was searched on these very operands now)."""
        name = str(key)
        with self._lock:
            self._load(b.device)
            found = self.configs.get(name)
        if found is not None:
            return found, False
        found = _search(a, b, bias, transpose_result)
        with self._lock:
            found = self.configs.setdefault(name, found)
            self._save(b.device)
        return found, True

    def config_for(self, a: CsltMatrix, b: torch.Tensor, bias: torch.Tensor | None = None,
                   transpose_result: bool = False) -> CsltConfig:
        """The configuration for this product's bucket (searched on these operands if it is new)."""
        b, bias = _check_product(a, b, bias)
        return self._config(problem_key(a, b, bias, transpose_result), a, b, bias, transpose_result)[0]

    def __call__(self, a: CsltMatrix, b: torch.Tensor, *, bias: torch.Tensor | None = None,
                 transpose_result: bool = False) -> torch.Tensor:
        b, bias = _check_product(a, b, bias)
        key = problem_key(a, b, bias, transpose_result)
        config, fresh = self._config(key, a, b, bias, transpose_result)
        try:
            return _run(a, b, bias, transpose_result, config)
        except DeviceError as exc:
            if fresh or is_sticky_cuda_error(exc):  # searched on these very operands, or the context is lost
                raise
        # a configuration found for another token count of the bucket: search this count on its own
        exact, _ = self._config(problem_key(a, b, bias, transpose_result, exact=True), a, b, bias, transpose_result)
        return _run(a, b, bias, transpose_result, exact)


_TUNED = TunedCusparselt()


def tuned() -> TunedCusparselt:
    """The process's :class:`TunedCusparselt`."""
    return _TUNED
