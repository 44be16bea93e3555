"""GPU device, streams and memory for the sparsert runtime, on cuda-python (cuda.core + cuda.bindings).

* :func:`gpu_available` / :func:`probe_gpu`: is there a driver and an NVIDIA GPU of sm_80 or newer (never
  raises); :func:`get_device` returns a :class:`GpuDevice` or raises :class:`DeviceError` with the reason.
* :class:`MemoryPool`: stream-ordered allocations from the driver's memory pool (cuda.core
  ``DeviceMemoryResource``, i.e. ``cuMemAllocAsync``/``cuMemFreeAsync``) with current/peak statistics.
* :class:`WorkspaceArena`: one pool allocation carved by a bump allocator and reset once per inference step.
* :func:`as_torch` / :func:`from_torch`: zero-copy exchange with torch CUDA tensors (CUDA array interface).
* :func:`check_cuda`: every failed driver call raises DeviceError naming the call, the code and its name.

The runtime shares the device's *primary* context with torch (both cuda.core and the CUDA runtime use it), so
pointers move freely between torch tensors and our kernels. Kernels are launched on torch's current stream
unless told otherwise (:func:`stream_for`).

The repository folder ``cuda/`` extends its ``__path__`` pkgutil-style, so even when the repository root is
on ``sys.path`` it does not hide NVIDIA's ``cuda.bindings`` / ``cuda.core``.
"""

from __future__ import annotations

import importlib
import math
import os
import threading
from dataclasses import dataclass, field

from sparsert.runtime.errors import DeviceError

MIN_COMPUTE_CAPABILITY = (8, 0)
NO_GPU_MESSAGE = "no NVIDIA GPU/driver available (needs sm_80+)"
_ALIGN = 256  # bytes; every arena slice starts on this boundary (cp.async / 16-byte vector loads need >= 16)


# ---------------------------------------------------------------------------------------------------------
# Imports of NVIDIA's cuda.* packages
# ---------------------------------------------------------------------------------------------------------

def import_cuda_module(name: str):
    """Import one of NVIDIA's ``cuda.*`` modules; raises ImportError when cuda-python is not installed."""
    return importlib.import_module(name)


class _CoreNamespace:
    """cuda.core's public names, whether they live in ``cuda.core`` or (older releases) ``cuda.core.experimental``."""

    def __init__(self):
        core = import_cuda_module("cuda.core")
        if not hasattr(core, "Device"):
            core = import_cuda_module("cuda.core.experimental")
        self.module = core
        for name in ("Device", "Stream", "LaunchConfig", "launch", "ObjectCode", "Buffer",
                     "DeviceMemoryResource"):
            setattr(self, name, getattr(core, name, None))


_CORE: _CoreNamespace | None = None


def cuda_core() -> _CoreNamespace:
    """The cuda.core namespace (Device, Stream, LaunchConfig, launch, ObjectCode, Buffer, DeviceMemoryResource)."""
    global _CORE
    if _CORE is None:
        try:
            _CORE = _CoreNamespace()
        except ImportError as exc:
            raise DeviceError(f"cuda.core is not installed (pip install 'sparsert[cuda]'): {exc}") from None
    return _CORE


def driver():
    """``cuda.bindings.driver`` (DeviceError when cuda-python is missing)."""
    try:
        return import_cuda_module("cuda.bindings.driver")
    except ImportError as exc:
        raise DeviceError(f"cuda-python is not installed (pip install 'sparsert[cuda]'): {exc}") from None


def _error_name(drv, err) -> str:
    try:
        return drv.CUresult(int(err)).name
    except Exception:
        return "UNKNOWN_ERROR"


def check_cuda(result, call: str):
    """Check a ``cuda.bindings.driver`` result tuple ``(CUresult, *values)``.

    Returns the values (one value unwrapped, several as a tuple, none as None); raises DeviceError
    ``"<call> failed: CUDA error <code> <NAME>: <description>"`` otherwise.
    """
    drv = driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name, desc = _error_name(drv, err), "?"
        try:
            e, d = drv.cuGetErrorString(err)
            if int(e) == 0:
                desc = d.decode() if isinstance(d, bytes) else str(d)
        except Exception:  # needs libcuda; the code and its name are what matter
            pass
        raise DeviceError(f"{call} failed: CUDA error {int(err)} {name}: {desc}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# Errors after which the CUDA context is unusable: every later call in the process fails the same way
# (CUDA runtime API, cudaErrorIllegalAddress .. cudaErrorLaunchFailure), as driver names and as torch words them.
STICKY_CUDA_ERRORS = ("CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_HARDWARE_STACK_ERROR",
                      "CUDA_ERROR_ILLEGAL_INSTRUCTION", "CUDA_ERROR_MISALIGNED_ADDRESS",
                      "CUDA_ERROR_INVALID_ADDRESS_SPACE", "CUDA_ERROR_INVALID_PC", "CUDA_ERROR_LAUNCH_FAILED",
                      "illegal memory access", "illegal instruction", "misaligned address",
                      "invalid program counter", "unspecified launch failure", "hardware stack error")


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """True for an error after which no CUDA call in this process can succeed (a kernel fault): retrying
    with another kernel is pointless, and the fault must be reported, not absorbed."""
    text = str(exc)
    return any(marker in text for marker in STICKY_CUDA_ERRORS)


# ---------------------------------------------------------------------------------------------------------
# Device discovery
# ---------------------------------------------------------------------------------------------------------

_PROBE: tuple[bool, str] | None = None
_PROBE_LOCK = threading.Lock()


def probe_gpu() -> tuple[bool, str]:
    """(usable, reason): whether device 0 is an NVIDIA GPU of sm_80+ with a working driver. Never raises.

    Set ``SPARSERT_DISABLE_GPU=1`` to force the CPU paths.
    """
    global _PROBE
    with _PROBE_LOCK:
        if _PROBE is None:
            _PROBE = _probe()
        return _PROBE


def _probe() -> tuple[bool, str]:
    if os.environ.get("SPARSERT_DISABLE_GPU", "") not in ("", "0"):
        return False, f"{NO_GPU_MESSAGE}: disabled by SPARSERT_DISABLE_GPU"
    try:
        drv = driver()
    except DeviceError as exc:
        return False, f"{NO_GPU_MESSAGE}: {exc}"
    try:
        check_cuda(drv.cuInit(0), "cuInit")
        count = check_cuda(drv.cuDeviceGetCount(), "cuDeviceGetCount")
        if not count:
            return False, f"{NO_GPU_MESSAGE}: the driver reports no CUDA device"
        dev = check_cuda(drv.cuDeviceGet(0), "cuDeviceGet")
        cc = _compute_capability(drv, dev)
    except DeviceError as exc:
        return False, f"{NO_GPU_MESSAGE}: {exc}"
    except Exception as exc:  # e.g. cuda.pathfinder cannot find libcuda.so
        if type(exc).__name__ == "DynamicLibNotFoundError":  # its text is a paragraph of install advice
            return False, f"{NO_GPU_MESSAGE}: the NVIDIA driver library (libcuda) was not found"
        return False, f"{NO_GPU_MESSAGE}: {type(exc).__name__}: {exc}"
    if cc < MIN_COMPUTE_CAPABILITY:
        return False, unsupported_arch_message(cc)
    return True, f"sm_{cc[0]}{cc[1]}"


def _compute_capability(drv, dev) -> tuple[int, int]:
    attr = drv.CUdevice_attribute
    major = check_cuda(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
                       "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)")
    minor = check_cuda(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
                       "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)")
    return int(major), int(minor)


def unsupported_arch_message(cc: tuple[int, int]) -> str:
    return f"GPU sm_{cc[0]}{cc[1]} is not supported (needs sm_80 or newer)"


def gpu_available() -> bool:
    """True when an NVIDIA GPU of sm_80 or newer and its driver are usable (never raises)."""
    return probe_gpu()[0]


def arch_for_capability(cc: tuple[int, int]) -> str:
    """Kernel target for a compute capability: ``sm_90a`` on Hopper (wgmma), else ``sm_<major><minor>``."""
    return "sm_90a" if tuple(cc) == (9, 0) else f"sm_{cc[0]}{cc[1]}"


@dataclass
class GpuDevice:
    """One CUDA device as the runtime sees it.

    Attributes:
        index: device ordinal. name: marketing name. compute_capability: (major, minor).
        arch: kernel build target (:func:`arch_for_capability`). sm_count: multiprocessors.
        total_memory: bytes of device memory. core: the ``cuda.core.Device``.
    """

    index: int
    name: str
    compute_capability: tuple[int, int]
    arch: str
    sm_count: int
    total_memory: int
    core: object = field(repr=False)
    _pool: MemoryPool | None = field(default=None, repr=False)
    _context: int = field(default=0, repr=False)  # the primary context's handle, known after set_current

    def set_current(self) -> None:
        """Make this device's primary context current on the calling thread (what torch uses too)."""
        try:
            self.core.set_current()
        except Exception as exc:
            raise DeviceError(f"cannot make device {self.index} ({self.name}) current: {exc}") from None
        self._context = int(check_cuda(driver().cuCtxGetCurrent(), "cuCtxGetCurrent"))

    def ensure_current(self) -> None:
        """Make this device's primary context current on the calling thread unless it already is.

        Launches need it on every thread: torch runs autograd's backward on its own worker threads, where no
        driver context is current (pytorch/pytorch#124565), and a thread may hold another device's context.
        """
        current = int(check_cuda(driver().cuCtxGetCurrent(), "cuCtxGetCurrent"))
        if current == 0 or current != self._context:
            self.set_current()

    def sync(self) -> None:
        """Wait for all work on the device; raises DeviceError if a kernel failed."""
        self.set_current()
        check_cuda(driver().cuCtxSynchronize(), "cuCtxSynchronize")

    def current_stream(self):
        """torch's current stream on this device, as a cuda.core Stream (what our launches use by default)."""
        return stream_for(None, self.index)

    def new_stream(self):
        """A new non-blocking cuda.core Stream on this device."""
        self.set_current()
        try:
            return self.core.create_stream()
        except Exception as exc:
            raise DeviceError(f"cannot create a stream on device {self.index} ({self.name}): {exc}") from None

    @property
    def pool(self) -> MemoryPool:
        """The runtime's stream-ordered memory pool on this device (created on first use)."""
        if self._pool is None:
            self._pool = MemoryPool(self)
        return self._pool

    def free_and_total_memory(self) -> tuple[int, int]:
        """(free, total) device memory in bytes, from ``cuMemGetInfo``."""
        self.set_current()
        return check_cuda(driver().cuMemGetInfo(), "cuMemGetInfo")


_DEVICES: dict[int, GpuDevice] = {}


def get_device(index: int = 0) -> GpuDevice:
    """The :class:`GpuDevice` for ``index``.

    Raises:
        DeviceError: ``"no NVIDIA GPU/driver available (needs sm_80+): <reason>"`` without a usable driver
        or device, ``"GPU sm_75 is not supported (needs sm_80 or newer)"`` on an older GPU.
    """
    if index in _DEVICES:
        return _DEVICES[index]
    ok, reason = probe_gpu()
    if not ok and not reason.startswith("GPU sm_"):
        raise DeviceError(reason)
    drv = driver()
    count = check_cuda(drv.cuDeviceGetCount(), "cuDeviceGetCount")
    if not 0 <= index < count:
        raise DeviceError(f"device index {index} out of range: {count} CUDA device(s) present")
    handle = check_cuda(drv.cuDeviceGet(index), "cuDeviceGet")
    cc = _compute_capability(drv, handle)
    if cc < MIN_COMPUTE_CAPABILITY:
        raise DeviceError(unsupported_arch_message(cc))
    raw_name = check_cuda(drv.cuDeviceGetName(256, handle), "cuDeviceGetName")
    name = raw_name.split(b"\0", 1)[0].decode() if isinstance(raw_name, bytes) else str(raw_name)
    sms = check_cuda(drv.cuDeviceGetAttribute(
        drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, handle), "cuDeviceGetAttribute(SM count)")
    total = check_cuda(drv.cuDeviceTotalMem(handle), "cuDeviceTotalMem")
    core = cuda_core().Device(index)
    dev = GpuDevice(index=index, name=name, compute_capability=cc, arch=arch_for_capability(cc),
                    sm_count=int(sms), total_memory=int(total), core=core)
    dev.set_current()
    _DEVICES[index] = dev
    return dev


# ---------------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------------

_STREAMS: dict[int, object] = {}


def stream_for(stream=None, device_index: int = 0):
    """A cuda.core Stream for ``stream``: a cuda.core Stream (returned as is), a ``torch.cuda.Stream``, a raw
    ``cudaStream_t`` handle (int) or None (torch's current stream on ``device_index``)."""
    core = cuda_core()
    if core.Stream is not None and isinstance(stream, core.Stream):
        return stream
    if stream is None:
        import torch

        handle = torch.cuda.current_stream(device_index).cuda_stream
    elif isinstance(stream, int):
        handle = stream
    elif hasattr(stream, "cuda_stream"):
        handle = stream.cuda_stream
    else:
        raise DeviceError(f"stream must be a cuda.core Stream, a torch.cuda.Stream, a handle or None, "
                          f"got {type(stream).__name__}")
    if handle not in _STREAMS:
        _STREAMS[handle] = _wrap_stream(core, int(handle), device_index)
    return _STREAMS[handle]


class _ForeignStream:
    """``__cuda_stream__`` exporter for a raw handle (older cuda.core without ``Stream.from_handle``)."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def _wrap_stream(core, handle: int, device_index: int):
    try:
        if handle == 0 and getattr(core.module, "LEGACY_DEFAULT_STREAM", None) is not None:
            return core.module.LEGACY_DEFAULT_STREAM
        if hasattr(core.Stream, "from_handle"):
            return core.Stream.from_handle(handle)
        return core.Device(device_index).create_stream(_ForeignStream(handle))
    except Exception as exc:
        raise DeviceError(f"cannot wrap CUDA stream {handle:#x} for cuda.core: {exc}") from None


def check_last_launch(kernel_name: str, stream=None) -> None:
    """After a launch. Launch errors (bad configuration, missing kernel) are raised by the driver call itself;
    with ``SPARSERT_SYNC_LAUNCHES=1`` this also waits for the kernel and reports execution errors (illegal
    address, ...) with the kernel's name. Off by default: a sync per launch would serialise the host. Skipped
    while the launch's ``stream`` (a cuda.core Stream; None: torch's current stream) captures a CUDA graph (a
    synchronisation would invalidate the capture; the kernel has not run yet anyway)."""
    if os.environ.get("SPARSERT_SYNC_LAUNCHES", "") in ("", "0"):
        return
    if stream_capturing(stream):
        return
    check_cuda(driver().cuCtxSynchronize(), f"{kernel_name} (cuCtxSynchronize after launch)")


def stream_capturing(stream=None) -> bool:
    """Whether ``stream`` (cuda.core Stream, or None for torch's current stream) is capturing a CUDA graph;
    False without CUDA."""
    import torch

    if stream is not None:
        try:
            drv = driver()
            status = check_cuda(drv.cuStreamIsCapturing(stream.handle), "cuStreamIsCapturing")
            return status != drv.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE
        except Exception:  # a driver without the query (the test suite's fake one): ask torch about its stream
            pass
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------

class DeviceBuffer:
    """A device allocation from a :class:`MemoryPool`: ``ptr`` (int), ``nbytes``; ``close()`` frees it
    stream-ordered. Also freed when garbage collected (by cuda.core's Buffer)."""

    def __init__(self, buffer, nbytes: int, pool: MemoryPool):
        self.buffer = buffer
        self.nbytes = nbytes
        self.pool = pool
        self.ptr = int(buffer.handle)
        self.device_index = pool.device.index
        self._closed = False

    def close(self, stream=None) -> None:
        if self._closed:
            return
        self._closed = True
        self.pool._release(self)
        self.buffer.close(stream_for(stream, self.device_index))

    @property
    def closed(self) -> bool:
        return self._closed

    def __del__(self):
        if not getattr(self, "_closed", True):
            self._closed = True
            try:
                self.pool._release(self)
            except Exception:
                pass


@dataclass
class MemoryStats:
    """Pool statistics in bytes: live allocations now and at most since the last reset."""

    current_bytes: int = 0
    peak_bytes: int = 0
    allocations: int = 0
    frees: int = 0


class MemoryPool:
    """Stream-ordered allocator on one device (the driver's default memory pool through cuda.core
    ``DeviceMemoryResource``) that keeps current/peak byte counts of its live allocations."""

    def __init__(self, device: GpuDevice):
        self.device = device
        device.set_current()
        try:
            self.resource = cuda_core().DeviceMemoryResource(device.index)
        except Exception as exc:
            raise DeviceError(f"cannot create a memory pool on device {device.index}: {exc}") from None
        self._stats = MemoryStats()
        self._lock = threading.Lock()

    def allocate(self, nbytes: int, stream=None) -> DeviceBuffer:
        """Allocate ``nbytes`` (> 0) ordered on ``stream`` (default: torch's current stream)."""
        if int(nbytes) <= 0:
            raise DeviceError(f"allocation size must be positive, got {nbytes}")
        self.device.set_current()
        try:
            buf = self.resource.allocate(int(nbytes), stream=stream_for(stream, self.device.index))
        except Exception as exc:
            free, total = self.device.free_and_total_memory()
            raise DeviceError(f"allocating {int(nbytes)} bytes on {self.device.name} failed ({exc}); "
                              f"{free} of {total} bytes free, pool holds {self._stats.current_bytes}") from None
        with self._lock:
            self._stats.current_bytes += int(nbytes)
            self._stats.peak_bytes = max(self._stats.peak_bytes, self._stats.current_bytes)
            self._stats.allocations += 1
        return DeviceBuffer(buf, int(nbytes), self)

    def _release(self, buf: DeviceBuffer) -> None:
        with self._lock:
            self._stats.current_bytes -= buf.nbytes
            self._stats.frees += 1

    def stats(self) -> MemoryStats:
        """A copy of the current statistics."""
        with self._lock:
            return MemoryStats(**vars(self._stats))

    def reset_peak(self) -> None:
        with self._lock:
            self._stats.peak_bytes = self._stats.current_bytes


class WorkspaceArena:
    """Bump allocator over one pool allocation, for per-step scratch memory during inference.

    ``take(nbytes)`` returns a pointer aligned to 256 bytes; ``tensor(shape, dtype)`` a torch view of a
    fresh slice; ``reset()`` (once per step, after the step's kernels are enqueued on the same stream) makes
    the whole arena free again. Exceeding ``capacity`` raises DeviceError naming the sizes.
    """

    def __init__(self, capacity: int, device: GpuDevice | None = None, stream=None):
        self.device = device or get_device(0)
        self.capacity = int(capacity)
        self.buffer = self.device.pool.allocate(self.capacity, stream=stream)
        self.offset = 0
        self.peak = 0

    def take(self, nbytes: int) -> int:
        start = -(-self.offset // _ALIGN) * _ALIGN
        end = start + int(nbytes)
        if end > self.capacity:
            raise DeviceError(f"workspace arena of {self.capacity} bytes is full: {self.offset} used, "
                              f"{int(nbytes)} more requested; create it with a larger capacity")
        self.offset = end
        self.peak = max(self.peak, end)
        return self.buffer.ptr + start

    def tensor(self, shape, dtype):
        """A torch tensor (zero-copy, contiguous) of ``shape``/``dtype`` carved from the arena."""
        shape = tuple(int(s) for s in shape)
        nbytes = max(math.prod(shape) * dtype.itemsize, 1)
        ptr = self.take(nbytes)
        return _torch_from_pointer(ptr, nbytes, shape, dtype, self.device.index, owner=self.buffer)

    def reset(self) -> None:
        self.offset = 0

    def close(self) -> None:
        self.buffer.close()


class _CudaArrayInterface:
    """Minimal ``__cuda_array_interface__`` (v3) exporter over raw device bytes; keeps ``owner`` alive."""

    def __init__(self, ptr: int, nbytes: int, owner):
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None,
            "stream": None,
        }


def _torch_from_pointer(ptr: int, nbytes: int, shape: tuple[int, ...], dtype, device_index: int, owner):
    import torch

    raw = torch.as_tensor(_CudaArrayInterface(ptr, nbytes, owner), device=f"cuda:{device_index}")
    return raw.view(dtype)[:math.prod(shape)].view(shape)


def as_torch(buffer: DeviceBuffer, shape, dtype, offset: int = 0):
    """Zero-copy torch view of a :class:`DeviceBuffer` (or a cuda.core ``Buffer``).

    Args:
        shape: tuple of ints; dtype: torch dtype; offset: byte offset into the buffer (multiple of the
            element size). The view keeps the buffer alive.
    Raises:
        DeviceError when the view would not fit in the buffer or is misaligned.
    """
    shape = tuple(int(s) for s in shape)
    itemsize = dtype.itemsize
    numel = math.prod(shape)
    if isinstance(buffer, DeviceBuffer):
        ptr, size, dev, owner = buffer.ptr, buffer.nbytes, buffer.device_index, buffer
        if buffer.closed:
            raise DeviceError("as_torch: the buffer has been freed")
    else:
        ptr, size, dev, owner = int(buffer.handle), int(buffer.size), int(buffer.device_id), buffer
    if offset < 0 or offset % itemsize:
        raise DeviceError(f"as_torch: offset {offset} is not a non-negative multiple of {itemsize} ({dtype})")
    if offset + numel * itemsize > size:
        raise DeviceError(f"as_torch: {shape} {dtype} at offset {offset} needs {offset + numel * itemsize} "
                          f"bytes, the buffer has {size}")
    return _torch_from_pointer(ptr + offset, max(numel * itemsize, itemsize), shape, dtype, dev, owner)


@dataclass
class DeviceView:
    """A torch CUDA tensor seen as raw device memory (zero-copy; holds a reference to the tensor)."""

    ptr: int
    nbytes: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: object
    device_index: int
    owner: object = field(repr=False)

    def buffer(self):
        """A non-owning cuda.core ``Buffer`` over the same memory (keeps the tensor alive)."""
        return cuda_core().Buffer.from_handle(self.ptr, self.nbytes, owner=self.owner)


def from_torch(tensor) -> DeviceView:
    """Expose a torch CUDA tensor to the runtime without copying.

    Raises:
        DeviceError when ``tensor`` is not a torch tensor on a CUDA device.
    """
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise DeviceError(f"from_torch expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cuda":
        raise DeviceError(f"from_torch expects a CUDA tensor, got one on {tensor.device}")
    nbytes = tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
    return DeviceView(ptr=int(tensor.data_ptr()), nbytes=int(nbytes), shape=tuple(tensor.shape),
                      strides=tuple(tensor.stride()), dtype=tensor.dtype, device_index=tensor.device.index or 0,
                      owner=tensor)


def require_gpu(what: str) -> GpuDevice:
    """get_device(0) with ``what`` prepended to the error, for entry points that cannot run on the CPU."""
    try:
        return get_device(0)
    except DeviceError as exc:
        raise DeviceError(f"{what} needs a GPU: {exc}") from None
