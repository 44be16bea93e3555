"""Per-shape choice of the GEMM implementation for a sparse linear, by measured time, cached.

For ``y = x @ W^T (+ b)`` with a 2:4 (optionally INT4) weight ``W [N, K]`` and ``x [M, K]``, the candidates are
backends (:class:`GemmBackend`): our kernels (``runtime/sparse_gemm.py``: mma.sp / wgmma.sp 2:4, W4A16),
cuSPARSELt through torch (``torch._cslt_compress`` / ``torch._cslt_sparse_mm``, when torch has it) and dense
cuBLAS (``F.linear`` on the decompressed weight, only when dense copies are allowed: it costs 16 bits per
weight). :class:`Dispatcher` times every candidate that prepared successfully on fresh random input of the
problem's shape (CUDA events, warm-up, median of repeats, the L2 emptied before each: a model's layer reads its
weight from HBM), first rejects any whose output differs from an fp32 reference by more than the dtype's
tolerance (a wrong kernel is never chosen), and remembers the winner per problem key in memory and in a JSON
file per device (atomic writes).

The problem key is ``"{kind}|{dtype}|N={n}|K={k}|M={bucket}"``: M is rounded up to a power of two
(:func:`m_bucket`), so a 7B model's 224 linears share 7 shapes and a handful of buckets.
:class:`SparseLinearGPU` is the ``nn.Module`` that uses it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsert.runtime.device import is_sticky_cuda_error
from sparsert.runtime.errors import DeviceError, FormatError, dtype_name
from sparsert.runtime.fileio import user_cache_file, write_atomic
from sparsert.runtime.nm_mask import is_nm_sparse
from sparsert.runtime.packed_linear import PackedLinear, pack_linear

DISPATCH_FORMAT = 2  # 2: timed with the L2 emptied before each call (format 1 files are measured again)
# Relative error (||y - ref|| / ||ref||) a candidate may show against the fp32 reference on the same input.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def m_bucket(m: int) -> int:
    """Smallest power of two >= m (m >= 1): the token-count bucket a dispatch decision covers."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise FormatError(f"token count must be a positive int, got {m!r}")
    return 1 << (m - 1).bit_length()


def problem_key(kind: str, dtype: torch.dtype, n: int, k: int, m: int) -> str:
    return f"{kind}|{dtype_name(dtype)}|N={n}|K={k}|M={m_bucket(m)}"


def dispatch_cache_path(device_name: str) -> Path:
    """``$SPARSERT_DISPATCH_CACHE`` if set, else ``~/.cache/sparsert/dispatch/<device name>.json``."""
    env = os.environ.get("SPARSERT_DISPATCH_CACHE")
    return Path(env) if env else user_cache_file("dispatch", device_name)


@functools.lru_cache(maxsize=1)
def kernel_sources_digest() -> str:
    """sha256 (first 16 hex digits) of every kernel source in ``cuda/`` (computed once per process: the
    dispatcher's header needs it at every save)."""
    from sparsert.runtime.kernel_build import kernel_dir

    h = hashlib.sha256()
    for path in sorted(kernel_dir().glob("*.cu*")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A float32 buffer of twice the device's L2 size: reading it before a timed call evicts what earlier calls
    left in the L2 (with clean lines, so the call pays no write-backs), as a model's decode step finds it."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size or (64 << 20)
    return torch.zeros(2 * l2 // 4 + 1024, dtype=torch.float32, device=device)


def _l2_flush_buffer_if_room(device: torch.device) -> torch.Tensor | None:
    """:func:`l2_flush_buffer`, or None when the device has no room for it (then calls are timed without it:
    an out-of-memory here must not reject every candidate and leave a layer on the dense fallback)."""
    try:
        return l2_flush_buffer(device)
    except torch.cuda.OutOfMemoryError:
        return None


def time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10, *, cuda: bool = True,
            flush: torch.Tensor | None = None) -> float:
    """Median time of ``fn()`` in milliseconds after warm-up: CUDA events on the current stream, or the host
    clock for CPU work (``cuda=False``). ``flush`` (CUDA): a buffer read before each timed call
    (:func:`l2_flush_buffer`), so the weights come from HBM as in a model, not from the previous call's L2."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            if flush is not None:
                flush.amax()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass
class Choice:
    """A dispatch decision: the chosen backend, every candidate's median time (ms) and the rejected ones."""

    name: str
    times_ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


def cpu_dispatcher() -> Dispatcher:
    """The dispatcher of layers on the CPU: one candidate per layer (:class:`CpuPacked`), nothing to time or keep."""
    return Dispatcher("cpu", persist=False, warmup=0, reps=1)


class Dispatcher:
    """Measured choice among callables per problem key, cached in memory and in ``path`` (JSON).

    The file holds ``{"format": 2, "device": name, "torch": version, "kernels": digest, "choices": {key:
    Choice}}``; a file for another device, torch version, kernel sources (digest of ``cuda/*.cu*``) or format
    is ignored (and replaced on the next save), so a changed kernel is validated and measured again.
    """

    def __init__(self, device_name: str, path: Path | str | None = None, *, warmup: int = 3, reps: int = 10,
                 persist: bool = True):
        self.device_name = device_name
        self.path = Path(path) if path is not None else dispatch_cache_path(device_name)
        self.warmup, self.reps, self.persist = warmup, reps, persist
        self.choices: dict[str, Choice] = {}
        self._lock = threading.Lock()
        self._load()

    def _header(self) -> dict:
        return {"format": DISPATCH_FORMAT, "device": self.device_name, "torch": torch.__version__,
                "kernels": kernel_sources_digest()}

    def _load(self) -> None:
        if not self.persist or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            if {k: data.get(k) for k in self._header()} != self._header():
                return
            for key, c in data["choices"].items():
                self.choices[key] = Choice(name=c["name"], times_ms=dict(c.get("times_ms", {})),
                                           rejected=dict(c.get("rejected", {})))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.choices = {}  # a corrupt cache file is only a lost optimisation: re-measure

    def save(self) -> None:
        """Write the cache file atomically (temporary file in the same folder, then rename)."""
        if not self.persist:
            return
        data = {**self._header(), "choices": {k: asdict(c) for k, c in sorted(self.choices.items())}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(data, indent=1))
        except OSError:
            pass  # the cache is only an optimisation: an unwritable folder must not stop inference

    def lookup(self, key: str) -> Choice | None:
        return self.choices.get(key)

    def choose(
        self,
        key: str,
        candidates: dict[str, Callable[[], torch.Tensor]],
        reference: torch.Tensor | None = None,
        tolerance: float = 1e-2,
    ) -> Choice:
        """The fastest correct candidate for ``key`` (cached if a cached winner is still a candidate).

        Args:
            candidates: name -> zero-argument callable computing the product on fixed inputs.
            reference: the fp32 result those inputs must give; a candidate further than ``tolerance``
                (relative Frobenius error) or raising is rejected with the reason.
        Raises:
            DeviceError when every candidate is rejected.
        """
        with self._lock:
            cached = self.choices.get(key)
            if cached is not None and cached.name in candidates:
                return cached
        times: dict[str, float] = {}
        rejected: dict[str, str] = {}
        flush_for = functools.cache(_l2_flush_buffer_if_room)  # one buffer per device, made at its first use
        for name, fn in candidates.items():
            try:
                out = fn()
                on_gpu = isinstance(out, torch.Tensor) and out.is_cuda
                if on_gpu:
                    torch.cuda.synchronize(out.device)
                if reference is not None:
                    err = _rel_error(out, reference)
                    if not err <= tolerance:  # also catches NaN
                        rejected[name] = f"relative error {err:.3g} > {tolerance:g}"
                        continue
                flush = flush_for(out.device) if on_gpu else None
                times[name] = time_ms(fn, self.warmup, self.reps, cuda=on_gpu, flush=flush)
            except Exception as exc:  # a backend that cannot run this shape is not a candidate for it
                if is_sticky_cuda_error(exc):  # a kernel fault: every later CUDA call would fail too
                    raise DeviceError(f"{name} faulted while being measured for {key}: {exc}") from exc
                rejected[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if not times:
            raise DeviceError(f"no GEMM backend could run {key}: " +
                              "; ".join(f"{n}: {r}" for n, r in rejected.items()))
        choice = Choice(name=min(times, key=times.get), times_ms=times, rejected=rejected)
        with self._lock:
            self.choices[key] = choice
        self.save()
        return choice


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float().reshape(ref.shape)
    denom = float(ref.float().norm())
    return float((out - ref.float()).norm()) / max(denom, 1e-30)


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------

class GemmBackend:
    """One way to compute ``x [M, K] @ W^T + b`` for a packed linear on the GPU.

    ``prepare`` builds the device state (or raises when the backend cannot serve this layer: dtype, shape,
    missing library); backends with the same ``state_key`` share one prepared state (e.g. the tile variants
    of one kernel). ``run`` computes ``[M, N]`` in the activation dtype; ``nbytes`` is the device memory of
    the state's weight tensors (bias excluded).
    """

    name = "backend"
    state_key = "backend"

    def prepare(self, packed: PackedLinear, device: torch.device, dtype: torch.dtype):
        raise NotImplementedError

    def run(self, state, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, state) -> int:
        if hasattr(state, "nbytes") and callable(state.nbytes):
            return int(state.nbytes())
        return _tensor_bytes(state)

    def dense(self, state, packed: PackedLinear, dtype: torch.dtype) -> torch.Tensor:
        """float32 ``[N, K]``: the weight ``run`` multiplies by: a prepared weight's own decompression (rounded to
        the activation dtype as the kernels see it), a dense state itself, else the packed weight rounded to
        ``dtype`` (cuSPARSELt's compressed buffer)."""
        if isinstance(state, torch.Tensor):
            if tuple(state.shape) == (packed.out_features, packed.in_features):
                return state.float()
            return packed.to_dense().to(dtype).float()
        if callable(getattr(state, "to_dense", None)):
            return state.to_dense()
        return packed.to_dense().to(dtype).float()


def _tensors_of(obj) -> list[torch.Tensor]:
    """The tensors a backend state holds (a tensor, a dataclass of tensors, or containers of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_of(v)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for f in obj.__dataclass_fields__ for t in _tensors_of(getattr(obj, f))]
    return []


def _tensor_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors_of(obj))


def dense_weight(packed: PackedLinear, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``packed.to_dense()`` (dequantized, decompressed): ``[out_features, in_features]`` contiguous, row-major
    (``nn.Linear`` layout), on ``device`` in ``dtype``."""
    return packed.to_dense().to(device=device, dtype=dtype).contiguous()


class DenseCublas(GemmBackend):
    """cuBLAS through ``F.linear`` on the decompressed (and dequantized) weight: 16 bits per weight."""

    name = state_key = "dense_cublas"

    def prepare(self, packed, device, dtype):
        return dense_weight(packed, device, dtype)

    def run(self, state, x, bias):
        return F.linear(x, state, None if bias is None else bias.to(x.dtype))


class Cusparselt(GemmBackend):
    """cuSPARSELt 2:4 through torch (``runtime/cusparselt.py``), bf16/fp16, with the algorithm configuration
    searched per problem (configuration 0, what a plain call runs, never beat dense on an H200)."""

    name = state_key = "cusparselt"

    @staticmethod
    def available() -> bool:
        from sparsert.runtime.cusparselt import cusparselt_status

        return not cusparselt_status()

    def prepare(self, packed, device, dtype):
        from sparsert.runtime import cusparselt

        why = cusparselt.cusparselt_status()
        if why:
            raise DeviceError(why)
        if dtype not in (torch.bfloat16, torch.float16):
            raise DeviceError(f"cuSPARSELt backend supports bf16/fp16, not {dtype}")
        if packed.quantized:
            raise DeviceError("cuSPARSELt has no INT4 weight path (it would hold 16-bit values)")
        return cusparselt.compress(dense_weight(packed, device, dtype), name="dense weight")

    def run(self, state, x, bias):
        from sparsert.runtime.cusparselt import tuned

        # cuSPARSELt's dense operand wants its dimensions in multiples of 8 for 16-bit types (torch's own
        # semi-structured wrapper pads them too): a bucket is timed at a power of two, then runs any M in it.
        m = x.shape[0]
        pad = -m % 8
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        y = tuned()(state, x.t(), bias=bias, transpose_result=True)
        return y[:m] if pad else y


class OursSparse24(GemmBackend):
    """Our bf16/fp16 2:4 GEMM (``sparse_gemm.sparse24_linear``) with one tile variant: ``small``, ``medium``,
    ``large`` (mma.sp, sm_80+) or one of ``sparse_gemm.SM90_CONFIGS`` (wgmma.sp, sm_90a: ``sm90_128``,
    ``sm90_256``, the 128-column k tiles ``sm90_128_k128`` / ``sm90_256_k128``, which need K % 128 == 0 and
    are rejected for other layers, and the same four with a TMA producer, ``sm90tma_*``)."""

    state_key = "ours_sparse24"

    def __init__(self, variant: str):
        self.variant = variant
        self.name = f"ours_sparse24_{variant}"

    def prepare(self, packed, device, dtype):
        from sparsert.runtime import sparse_gemm

        if packed.quantized:
            raise DeviceError("an INT4 layer runs on the W4A16 kernel")
        return sparse_gemm.prepare_sparse24(packed, dtype=dtype, device=device)

    def run(self, state, x, bias):
        from sparsert.runtime import sparse_gemm

        return sparse_gemm.sparse24_linear(x, state, bias=bias, kernel=self.variant)


class OursW4A16(GemmBackend):
    """Our 2:4 + INT4 GEMM (``sparse_gemm.w4a16_linear``): ``decode`` (M <= 16, split-K), ``prefill`` (mma.sp,
    sm_80+) or one of ``sparse_gemm.W4A16_SM90_CONFIGS`` (wgmma.sp, sm_90a: ``sm90_128`` / ``sm90_256``, with a
    TMA producer ``sm90tma_128`` / ``sm90tma_256``)."""

    state_key = "ours_w4a16"

    def __init__(self, variant: str):
        self.variant = variant
        self.name = f"ours_w4a16_{variant}"

    def prepare(self, packed, device, dtype):
        from sparsert.runtime import sparse_gemm

        if not packed.quantized:
            raise DeviceError("the W4A16 kernel needs an INT4 layer")
        return sparse_gemm.prepare_w4a16(packed, dtype=dtype, device=device)

    def run(self, state, x, bias):
        from sparsert.runtime import sparse_gemm

        if self.variant == "decode" and x.shape[0] > sparse_gemm.DECODE_MAX_M:
            raise DeviceError(f"decode variant handles at most {sparse_gemm.DECODE_MAX_M} tokens")
        return sparse_gemm.w4a16_linear(x, state, bias=bias, kernel=self.variant)


class CpuPacked(GemmBackend):
    """The CPU product of ``runtime/sparse_cpu.py``: compiled loops over the stored 2:4 (and INT4) tensors, shared
    with the PackedLinear, computing the GPU kernels' function (x and the kept values rounded to the activation
    dtype, fp32 accumulation); no dense copy of the weight is held (above 8 tokens it is decompressed block by
    block per call). 3.125 bits per weight for 2:4 + INT4 g128; 9 for 2:4 with 16-bit kept values, 17 with
    float32 ones (rounded in the loop)."""

    name = state_key = "cpu_packed"

    def prepare(self, packed, device, dtype):
        from sparsert.runtime import sparse_cpu

        if torch.device(device).type != "cpu":
            raise DeviceError("the CPU product runs on the CPU only")
        if dtype not in sparse_cpu.CPU_DTYPES:
            raise DeviceError(f"the CPU product takes bf16/fp16 activations, not {dtype}")
        return sparse_cpu.prepare_cpu(packed, dtype)

    def run(self, state, x, bias):
        from sparsert.runtime.sparse_cpu import cpu_linear

        return cpu_linear(x, state, bias)

    def dense(self, state, packed, dtype):
        from sparsert.runtime.sparse_cpu import dense_weight_cpu

        return dense_weight_cpu(state)


def our_backends(device: torch.device | None = None) -> list[GemmBackend]:
    """Our kernels' backends (``runtime/sparse_gemm.py``), the wgmma variants only on an sm_90a device, none
    that ``$SPARSERT_DISABLE_KERNELS`` names (:func:`sparse_gemm.kernel_enabled`)."""
    try:
        from sparsert.runtime import sparse_gemm
    except ImportError:
        return []
    variants = ["small", "medium", "large"]
    w4a16 = ["decode", "prefill"]
    if device is not None and device.type == "cuda":
        from sparsert.runtime.device import get_device

        if get_device(device.index or 0).arch == "sm_90a":
            variants += [c.name for c in sparse_gemm.SM90_CONFIGS]
            w4a16 += [c.name for c in sparse_gemm.W4A16_SM90_CONFIGS]
    return ([OursSparse24(v) for v in variants if sparse_gemm.kernel_enabled(v)]
            + [OursW4A16(v) for v in w4a16 if sparse_gemm.kernel_enabled(v)])


def default_backends(device: torch.device | None = None, *, allow_dense: bool = False) -> list[GemmBackend]:
    """Our kernels, cuSPARSELt when torch has it, and dense cuBLAS when ``allow_dense``; on the CPU our CPU
    product (:class:`CpuPacked`) in place of the kernels' torch fallbacks (they decompress the weight per call)."""
    if device is not None and torch.device(device).type == "cpu":
        return [CpuPacked()] + ([DenseCublas()] if allow_dense else [])
    backends = our_backends(device)
    if Cusparselt.available():
        backends.append(Cusparselt())
    if allow_dense:
        backends.append(DenseCublas())
    return backends


# ---------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------

class _PackedProduct(torch.autograd.Function):
    """``layer._run(name, x2)`` with a gradient to ``x2``: ``dX = dY @ W`` on the layer's weight, decompressed for
    the backward pass (the packed weight itself is frozen: it gets no gradient). Our kernels and the CPU product
    write their output outside autograd, so without this a swapped layer would cut the graph."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: SparseLinearGPU, name: str) -> torch.Tensor:  # noqa: ANN001
        ctx.layer, ctx.name = layer, name
        return layer._run(name, x2)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # noqa: ANN205
        layer = ctx.layer
        backend = layer.backends[ctx.name]
        w = backend.dense(layer.states[backend.state_key], layer.packed, layer.dtype).to(grad_y.device)  # [N, K]
        with torch.autocast(grad_y.device.type, enabled=False):
            return (grad_y.float() @ w).to(grad_y.dtype), None, None


class SparseLinearGPU(nn.Module):
    """``nn.Linear`` replacement for a 2:4 (optionally INT4) packed weight on the GPU, dispatching per token
    count among the backends that could prepare the layer.

    ``forward(x [..., K]) -> [..., N]``: x is rounded to the GEMM dtype (``dtype``), the product accumulates
    in fp32 and comes back in x's dtype; gradients flow to x (``dX = dY @ W``), none to the packed weight,
    which is frozen. On the CPU the backend is the compiled CPU product (:class:`CpuPacked`). :meth:`tune`
    measures the given token counts now (the GpuStepper does it at load) and then :meth:`drop_unused` frees every
    backend state no tuned bucket chose, so only the chosen formats stay on the device. A bucket seen later picks
    among the states still held.

    Args:
        packed: the layer's :class:`PackedLinear` (host tensors).
        device: a CUDA device. dtype: bf16 or fp16 activations (fp32 works with cuBLAS only).
        dispatcher: shared :class:`Dispatcher` (one per device).
        backends: candidates (default :func:`default_backends`).
        allow_dense: offer dense cuBLAS (16 bits per weight) as a candidate.
        source_dtype, source_transposed: the dtype and layout (``[K, out]`` for a transformers ``Conv1D``) of the
            layer it replaces, in which ``state_dict()`` holds ``weight`` (:meth:`served_weight`).
    """

    def __init__(self, packed: PackedLinear, *, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                 dispatcher: Dispatcher, backends: list[GemmBackend] | None = None, allow_dense: bool = False,
                 name: str = "linear", source_dtype: torch.dtype = torch.float32, source_transposed: bool = False):
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.kind = "w4a16_24" if packed.quantized and packed.sparse else ("sparse24" if packed.sparse else "dense")
        self.dtype, self.device, self.name = dtype, torch.device(device), name
        self.source_dtype, self.source_transposed = source_dtype, source_transposed
        self.dispatcher = dispatcher
        self._candidates = backends if backends is not None else default_backends(self.device,
                                                                                   allow_dense=allow_dense)
        self.register_buffer("bias", None, persistent=False)
        self.chosen: dict[int, str] = {}
        self._ref_weight: torch.Tensor | None = None
        self._prepare(packed)

    def _prepare(self, packed: PackedLinear) -> None:
        """Hold ``packed`` (host copy: the source for references, re-preparation and ``state_dict``) and prepare
        each candidate backend's state for it."""
        self.packed = packed
        self.bias = None if packed.bias is None else packed.bias.to(device=self.device, dtype=torch.float32)
        self.states: dict[str, object] = {}  # state_key -> prepared weight
        self.backends: dict[str, GemmBackend] = {}  # backend name -> backend (its state in states)
        self.prepare_errors: dict[str, str] = {}
        for backend in self._candidates:
            if backend.state_key not in self.states:
                if backend.state_key in self.prepare_errors:
                    continue
                try:
                    self.states[backend.state_key] = backend.prepare(packed, self.device, self.dtype)
                except Exception as exc:
                    self.prepare_errors[backend.state_key] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
            self.backends[backend.name] = backend
        if not self.backends:
            # Last resort, so a layer always runs: the decompressed weight through cuBLAS (16 bits/weight).
            fallback = DenseCublas()
            self.states[fallback.state_key] = fallback.prepare(packed, self.device, self.dtype)
            self.backends[fallback.name] = fallback

    def served_weight(self) -> torch.Tensor:
        """The weight this layer computes with, dense, on the CPU: 2:4 zeros in place, INT4 values dequantized;
        ``[out, K]`` (``[K, out]`` for a layer swapped from transformers' ``Conv1D``) in the swapped layer's
        dtype (``source_dtype``)."""
        w = self.packed.to_dense().to(self.source_dtype)
        return w.t().contiguous() if self.source_transposed else w

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001, ANN202 - nn.Module's signature
        """``state_dict()`` holds ``weight`` (:meth:`served_weight`) and ``bias`` as the layer it replaced did, so
        a swapped model saves (``save_pretrained``, ``torch.save``) to a dense checkpoint carrying the 2:4 zeros."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.served_weight()
        if self.packed.bias is not None:
            destination[prefix + "bias"] = self.packed.bias.to(self.source_dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001, ANN202
                              unexpected_keys, error_msgs):
        """``load_state_dict``: a ``weight`` (and ``bias``) as :meth:`_save_to_state_dict` writes them; a weight
        other than the one held is packed again (2:4, INT4 with the layer's group size) and the layer prepared and
        tuned again for the token buckets it had decided. A weight that is not 2:4 along K is an error."""
        own = {prefix + "weight", prefix + "bias"}
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k not in own}, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys, error_msgs)
        weight, bias = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
        if weight is None:
            missing_keys.append(prefix + "weight")
        if self.packed.bias is not None and bias is None:
            missing_keys.append(prefix + "bias")
        elif self.packed.bias is None and bias is not None:
            unexpected_keys.append(prefix + "bias")
            bias = None
        if weight is None and bias is None:
            return
        problem = self._loaded_weight_problem(weight, bias)
        if problem is not None:
            error_msgs.append(f"{prefix}{'weight' if weight is not None else 'bias'}: {problem}")
            return
        # a key left out keeps what the layer holds, as nn.Linear's parameters would
        b = self.packed.bias if bias is None else bias.detach().to("cpu", torch.float32)
        same_bias = b is None or torch.equal(b, self.packed.bias)
        same_weight = weight is None or torch.equal(weight.detach().cpu().to(self.source_dtype), self.served_weight())
        if same_bias and same_weight:
            return  # what the layer holds already: keep the prepared, tuned formats
        if weight is None:
            w = self.packed.to_dense()
        else:
            w = (weight.t() if self.source_transposed else weight).detach().to("cpu", torch.float32)
        try:
            values_dtype = self.packed.values.dtype if self.packed.values is not None else torch.float32
            packed = pack_linear(w, sparse=self.packed.sparse, int4_group_size=self.packed.group_size, bias=b,
                                 values_dtype=values_dtype, name=f"{prefix}weight")
        except FormatError as exc:
            error_msgs.append(str(exc))
            return
        buckets = list(self.chosen)
        self.chosen, self._ref_weight = {}, None
        self._prepare(packed)
        if buckets:
            self.tune(buckets)
            self.drop_unused()

    def _loaded_weight_problem(self, weight: object, bias: object) -> str | None:
        shape = [self.in_features, self.out_features] if self.source_transposed else [self.out_features,
                                                                                     self.in_features]
        if bias is not None and (not isinstance(bias, torch.Tensor) or list(bias.shape) != [self.out_features]):
            got = list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            return f"its bias must be a tensor [{self.out_features}], got {got}"
        if weight is None:
            return None
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or list(weight.shape) != shape:
            got = f"{weight.dtype} {list(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
            return f"expected a floating tensor {shape} for {self.name}, got {got}"
        w = weight.t() if self.source_transposed else weight
        if self.packed.sparse and not is_nm_sparse(w.detach().cpu(), 2, 4):
            return (f"{self.name} holds a 2:4 weight, and this one is not 2:4 along K; prune it first "
                    "(sparsert.runtime.nm_mask.nm_mask) or load it into the model before swapping")
        return None

    def key(self, m: int) -> str:
        return problem_key(self.kind, self.dtype, self.out_features, self.in_features, m)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        w = self._ref_weight  # a local: another thread deciding a bucket may drop the attribute meanwhile
        if w is None:  # kept only while deciding (:meth:`tune`; a later single bucket frees it)
            w = self._ref_weight = dense_weight(self.packed, self.device, torch.float32)
        y = x.float() @ w.t()
        return y if self.bias is None else y + self.bias

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        backend = self.backends[name]
        return backend.run(self.states[backend.state_key], x, self.bias)  # fp32 bias, also after .to() (_apply)

    def _choose(self, m: int, *, keep_reference: bool = False) -> str:
        bucket = m_bucket(m)
        if bucket in self.chosen:
            return self.chosen[bucket]
        cached = self.dispatcher.lookup(self.key(bucket))
        if cached is not None and cached.name in self.backends:
            name = cached.name
        else:
            x = torch.randn(bucket, self.in_features, device=self.device).to(self.dtype)
            cands = {n: (lambda n=n: self._run(n, x)) for n in self.backends}
            try:
                name = self.dispatcher.choose(self.key(bucket), cands, self._reference(x),
                                              TOLERANCE.get(self.dtype, 1e-2)).name
            except DeviceError as exc:
                if is_sticky_cuda_error(exc):
                    raise
                # Every sparse backend failed or was wrong for this shape: run it correctly, if slowly.
                warnings.warn(f"{self.name}: {exc}; falling back to dense cuBLAS for M={bucket}", stacklevel=2)
                fallback = DenseCublas()
                if fallback.state_key not in self.states:
                    self.states[fallback.state_key] = fallback.prepare(self.packed, self.device, self.dtype)
                self.backends[fallback.name] = fallback
                name = fallback.name
        self.chosen[bucket] = name
        if not keep_reference:  # a bucket first seen at run time must not leave an fp32 copy of the weight behind
            self._ref_weight = None
        return name

    def tune(self, token_counts) -> dict[int, str]:
        """Decide the backend for each token count's bucket now; returns {bucket: backend}. The fp32 reference
        weight the decisions compare against is kept for :meth:`drop_unused` to free."""
        return {m_bucket(m): self._choose(m, keep_reference=True) for m in token_counts}

    def drop_unused(self) -> None:
        """Free every prepared state that no decided bucket's backend uses (and the backends on it)."""
        self._ref_weight = None
        if not self.chosen:
            return
        keep = {self.backends[n].state_key for n in self.chosen.values()}
        for key in list(self.states):
            if key not in keep:
                del self.states[key]
        self.backends = {n: b for n, b in self.backends.items() if b.state_key in keep}

    def weight_nbytes(self) -> int:
        """Device bytes of the weight formats currently held (bias excluded). On the CPU, where the host copy of
        the packed weight is held in the same memory, its tensors count too, once (a format may share them)."""
        by_key = {b.state_key: b for b in self.backends.values()}
        held = sum(by_key[k].nbytes(s) for k, s in self.states.items() if k in by_key)
        if self.device.type != "cpu":
            return held
        shared = {t.untyped_storage().data_ptr() for s in self.states.values() for t in _tensors_of(s)}
        return held + sum(t.numel() * t.element_size() for t in self.packed.weight_tensors()
                          if t.untyped_storage().data_ptr() not in shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
            what = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise FormatError(f"{self.name}: input must be a floating tensor [..., {self.in_features}], got {what}")
        if x.shape[-1] != self.in_features:
            raise FormatError(f"{self.name}: input has {x.shape[-1]} features, expected {self.in_features}")
        if x.device.type != self.device.type or self.device.index not in (None, x.device.index):
            # the prepared formats stay where they were built (.to() does not move them)
            raise FormatError(f"{self.name}: input is on {x.device}, the layer's weights on {self.device}; build "
                              "(or swap) the layer where it will run")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        if x2.shape[0] == 0:  # no tokens: nothing to dispatch
            return x.new_empty(*lead, self.out_features)
        name = self._choose(x2.shape[0])
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _PackedProduct.apply(x2, self, name)
        else:
            y = self._run(name, x2)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        """``.to()``/``.half()``/...: a cast of the model must not round the fp32 bias the kernels take; it is
        restored from the packed weight (the prepared formats are not module state and stay as built)."""
        super()._apply(fn, recurse)
        self.source_dtype = fn(torch.empty(0, dtype=self.source_dtype)).dtype  # state_dict follows a cast
        if self.bias is not None and self.bias.dtype != torch.float32 and self.packed.bias is not None:
            self.bias = self.packed.bias.to(device=self.bias.device, dtype=torch.float32)
        return self

    def __getattr__(self, name: str):
        if name == "weight":  # code written for nn.Linear that reads the weight itself cannot run this layer
            raise AttributeError(f"{self.name}: a SparseLinearGPU holds its weight packed and has no .weight; the "
                                 "code around it reads one, so leave this layer dense (swap_sparse_linears(names=...))")
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"backends={sorted(self.backends)}")
