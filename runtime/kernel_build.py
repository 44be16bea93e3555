"""Build the CUDA C++ kernels in ``cuda/`` with NVRTC, with an on-disk cache; load them through cuda.core.

Two modes:

* **compile-only** (:func:`compile_kernel`): NVRTC through ``cuda.bindings.nvrtc`` for any architecture in
  :data:`KERNEL_ARCHS`; needs no GPU and no driver (the CPU test suite compiles every kernel this way and
  reads ptxas' register and spill report).
* **load** (:func:`load_kernel`): the cubin for the current device's architecture, loaded with cuda.core
  (``ObjectCode.from_cubin`` / ``get_kernel``) and wrapped in a :class:`LaunchableKernel`.

Kernel sources must be self-contained: NVRTC is the only CUDA component CI installs, so no ``<cuda_fp16.h>``,
``<cuda_bf16.h>`` or ``<stdint.h>`` (use ``unsigned short`` storage and PTX ``cvt``); local
``#include "name.cuh"`` files from ``cuda/`` are allowed and hashed into the cache key.

Every kernel file declares its :class:`KernelSpec` objects with :func:`register_kernel` in the Python module
that launches it (``runtime/kernels.py``, ``runtime/sparse_gemm.py``); :func:`all_kernel_specs` imports those
modules and returns the registry, so the tests compile every kernel for every architecture.

The cache (``$SPARSERT_CACHE_DIR`` or ``~/.cache/sparsert/kernels``) holds one file per (source + included
headers, architecture, options, name expressions, NVRTC version), named by the sha256 of those; entries are
written to a temporary file and renamed (safe under concurrent processes) and carry a sha256 of their
content, so a truncated or corrupt entry is detected, removed and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsert.runtime.device import import_cuda_module
from sparsert.runtime.errors import DeviceError
from sparsert.runtime.fileio import write_atomic

KERNEL_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a")
# Modules whose import registers kernel specs (each calls register_kernel at import time).
SPEC_MODULES = ("sparsert.runtime.kernels", "sparsert.runtime.sparse_gemm", "sparsert.runtime.mvue24_kernel")
_CACHE_FORMAT = 2  # 2: registers and stack frames read from the cubin, log_missing
_MAGIC = b"SPARSERT-KCACHE\x01"
_BASE_OPTIONS = ("-std=c++17", "-Xptxas=-v")


@dataclass(frozen=True)
class KernelSpec:
    """One compilation unit: a ``.cu`` file in ``cuda/`` and the kernels to instantiate from it.

    Attributes:
        source: file name in ``cuda/`` (e.g. ``"prune24.cu"``).
        name_expressions: C++ names of the ``__global__`` functions to export, template arguments
            included (e.g. ``"prune24_compress<__nv_bfloat16>"``); NVRTC lowers them to mangled names.
        options: extra NVRTC options (e.g. ``("-DTILE_M=128",)``); ``-arch``, ``-std=c++17``, ``-Xptxas=-v``
            and the include path are added by the builder.
        archs: architectures this unit builds for (a wgmma kernel: ``("sm_90a",)``).
        ptx_must_contain: substrings the generated PTX must contain for every arch (checked by the tests),
            e.g. ``("mma.sp",)`` for a sparse tensor-core kernel.
    """

    source: str
    name_expressions: tuple[str, ...]
    options: tuple[str, ...] = ()
    archs: tuple[str, ...] = KERNEL_ARCHS
    ptx_must_contain: tuple[str, ...] = ()


@dataclass
class CompiledKernel:
    """NVRTC output for one :class:`KernelSpec` and architecture.

    ``registers`` and ``stack_frame`` (bytes of local-memory frame per thread; spills live there) are read
    from the cubin's ``.nv.info`` attributes (:mod:`sparsert.runtime.cubin_info`), the values the driver
    loads; ``spill_stores``/``spill_loads`` (bytes, summed over all kernels) come from ptxas' ``-v`` report in
    ``log``. ``log_missing`` names the kernels the log has no ptxas report for (an incomplete log: its
    warnings cannot be trusted for them). Dicts are keyed by name expression; ``lowered_names`` maps each name
    expression to its mangled symbol in the cubin.
    """

    arch: str
    ptx: str
    cubin: bytes
    log: str
    spill_stores: int
    spill_loads: int
    registers: dict[str, int]
    lowered_names: dict[str, str]
    stack_frame: dict[str, int] = field(default_factory=dict)
    log_missing: tuple[str, ...] = ()
    from_cache: bool = False
    cache_path: Path | None = None


_REGISTRY: dict[str, KernelSpec] = {}
_LOCK = threading.Lock()


class BuildGate:
    """Builds run side by side (:meth:`shared`) except a rebuild after an incomplete log (:meth:`exclusive`),
    which waits for the running builds to finish and holds new ones back until it is done (writers first, so a
    stream of builds cannot starve it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._exclusive and not self._running)
            finally:  # also when the wait is interrupted (Ctrl-C): held-back builds must not wait for ever
                self._waiting -= 1
                self._cond.notify_all()
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


_BUILD_GATE = BuildGate()
_LOADED: dict[tuple, LaunchableKernel] = {}


def register_kernel(key: str, spec: KernelSpec) -> KernelSpec:
    """Add ``spec`` to the registry under ``key`` (unique; re-registering the same spec is a no-op)."""
    with _LOCK:
        old = _REGISTRY.get(key)
        if old is not None and old != spec:
            raise DeviceError(f"kernel spec {key!r} registered twice with different contents")
        _REGISTRY[key] = spec
    return spec


def all_kernel_specs() -> dict[str, KernelSpec]:
    """Every registered kernel spec (imports :data:`SPEC_MODULES` first; a module not written yet is skipped)."""
    for module in SPEC_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return dict(_REGISTRY)


def kernel_dir() -> Path:
    """The folder holding the ``.cu`` sources (the ``sparsert.cuda`` package)."""
    spec = importlib.util.find_spec("sparsert.cuda")
    if spec is None or not spec.submodule_search_locations:
        raise DeviceError("the kernel sources (package sparsert.cuda) are not installed")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def cache_dir() -> Path:
    """``$SPARSERT_CACHE_DIR`` if set, else ``~/.cache/sparsert/kernels``."""
    env = os.environ.get("SPARSERT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sparsert" / "kernels"


_ARCH_RE = re.compile(r"^sm_(\d+)(a?)$")


def check_arch(spec: KernelSpec, arch: str) -> None:
    """Raise DeviceError unless ``spec`` can be built for ``arch``.

    A spec listing ``"sm_80"`` is generic (plain ``mma.sp``) and builds for any ``sm_XY`` with XY >= 80 (a
    newer GPU's own target too); any other spec (e.g. wgmma, ``archs=("sm_90a",)``) only for its listed archs.
    """
    m = _ARCH_RE.match(arch) if isinstance(arch, str) else None
    if m is None or int(m.group(1)) < 80:
        raise DeviceError(f"unsupported kernel architecture {arch!r}; expected sm_80 or newer, e.g. {KERNEL_ARCHS}")
    if arch in spec.archs or "sm_80" in spec.archs:
        return
    raise DeviceError(f"cuda/{spec.source} is not built for {arch} (it supports {', '.join(spec.archs)})")


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library in use."""
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    _check_nvrtc(err, "nvrtcVersion")
    return int(major), int(minor)


def _nvrtc():
    try:
        return import_cuda_module("cuda.bindings.nvrtc")
    except ImportError as exc:
        raise DeviceError(
            "NVRTC is not available: install the 'cuda' extra (cuda-python, nvidia-cuda-nvrtc) "
            f"to build kernels ({exc})"
        ) from None


def _check_nvrtc(err, call: str, prog=None) -> None:
    nvrtc = _nvrtc()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        text = msg.decode() if isinstance(msg, bytes) else str(msg)
        raise DeviceError(f"{call} failed: {int(err)} {text}")


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def _read_source(source: str, kdir: Path) -> tuple[str, dict[str, str]]:
    """Source text and the text of every local header it includes (recursively), by file name."""
    path = kdir / source
    if not path.is_file():
        raise DeviceError(f"kernel source cuda/{source} not found in {kdir}")
    text = path.read_text(encoding="utf-8")
    headers: dict[str, str] = {}
    todo = _INCLUDE_RE.findall(text)
    while todo:
        name = todo.pop()
        if name in headers:
            continue
        hpath = kdir / name
        if not hpath.is_file():
            raise DeviceError(f"cuda/{source} includes \"{name}\", which is not in {kdir}")
        headers[name] = hpath.read_text(encoding="utf-8")
        todo.extend(_INCLUDE_RE.findall(headers[name]))
    return text, headers


def _cache_key(spec: KernelSpec, arch: str, text: str, headers: dict[str, str], version) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "format": _CACHE_FORMAT, "arch": arch, "options": list(_BASE_OPTIONS) + list(spec.options),
        "names": list(spec.name_expressions), "nvrtc": list(version), "source": spec.source,
    }, sort_keys=True).encode())
    h.update(text.encode())
    for name in sorted(headers):
        h.update(name.encode() + b"\0" + headers[name].encode())
    return h.hexdigest()


def _encode_entry(key: str, ck: CompiledKernel) -> bytes:
    ptx = ck.ptx.encode()
    header = json.dumps({
        "key": key, "arch": ck.arch, "log": ck.log, "spill_stores": ck.spill_stores,
        "spill_loads": ck.spill_loads, "registers": ck.registers, "lowered_names": ck.lowered_names,
        "stack_frame": ck.stack_frame, "log_missing": list(ck.log_missing), "ptx_len": len(ptx),
        "cubin_len": len(ck.cubin),
    }).encode()
    body = struct.pack("<I", len(header)) + header + ptx + ck.cubin
    return _MAGIC + hashlib.sha256(body).digest() + body


def _decode_entry(data: bytes, key: str) -> CompiledKernel | None:
    """Parse a cache entry; None when it is truncated, corrupt or for another key."""
    head = len(_MAGIC) + 32
    if len(data) < head + 4 or not data.startswith(_MAGIC):
        return None
    digest, body = data[len(_MAGIC):head], data[head:]
    if hashlib.sha256(body).digest() != digest:
        return None
    try:
        (hlen,) = struct.unpack("<I", body[:4])
        meta = json.loads(body[4:4 + hlen])
        rest = body[4 + hlen:]
        if meta["key"] != key or len(rest) != meta["ptx_len"] + meta["cubin_len"]:
            return None
        return CompiledKernel(
            arch=meta["arch"], ptx=rest[:meta["ptx_len"]].decode(), cubin=bytes(rest[meta["ptx_len"]:]),
            log=meta["log"], spill_stores=meta["spill_stores"], spill_loads=meta["spill_loads"],
            registers=meta["registers"], lowered_names=meta["lowered_names"],
            stack_frame=meta["stack_frame"], log_missing=tuple(meta["log_missing"]), from_cache=True,
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error):  # TypeError: a field of the wrong type
        return None


_FUNC_RE = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REG_RE = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str, lowered_names: dict[str, str]) -> tuple[int, int, dict, dict]:
    """(spill stores, spill loads, registers, stack frame) from ptxas ``-v`` output, keyed by name expression."""
    by_symbol = {v: k for k, v in lowered_names.items()}
    stores = loads = 0
    registers: dict[str, int] = {}
    stack: dict[str, int] = {}
    current = None
    for line in log.splitlines():
        m = _FUNC_RE.search(line)
        if m:
            current = by_symbol.get(m.group(1), m.group(1))
            continue
        m = _SPILL_RE.search(line)
        if m:
            stores += int(m.group(2))
            loads += int(m.group(3))
            if current is not None:
                stack[current] = int(m.group(1))
            continue
        m = _REG_RE.search(line)
        if m and current is not None:
            registers[current] = int(m.group(1))
    return stores, loads, registers, stack


def _cubin_resources(cubin: bytes) -> dict | None:
    """The cubin's per-kernel resources, or None without pyelftools (the ``cuda`` extra installs it): the
    values then come from ptxas' log alone, as before."""
    try:
        from sparsert.runtime.cubin_info import kernel_resources
    except ImportError:
        return None
    return kernel_resources(cubin)


def _by_expression(resources: dict, lowered: dict[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """(registers, stack frame bytes) by name expression from :func:`_cubin_resources`' per-symbol values."""
    regs = {e: resources[s].registers for e, s in lowered.items() if s in resources}
    return regs, {e: resources[s].frame_bytes for e, s in lowered.items() if s in resources}


def _compile_nvrtc(spec: KernelSpec, arch: str, text: str, kdir: Path, want_cubin: bool) -> CompiledKernel:
    nvrtc = _nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(text.encode(), spec.source.encode(), 0, [], [])
    _check_nvrtc(err, "nvrtcCreateProgram")
    try:
        for expr in spec.name_expressions:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, expr.encode())
            _check_nvrtc(err, f"nvrtcAddNameExpression({expr})")
        options = [f"-arch={arch}", *_BASE_OPTIONS, f"--include-path={kdir}", *spec.options]
        opts = [o.encode() for o in options]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check_nvrtc(err, "nvrtcGetProgramLogSize")
        buf = b" " * size
        (err,) = nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.rstrip(b"\0 ").decode(errors="replace")
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            names = ", ".join(spec.name_expressions)
            raise DeviceError(
                f"NVRTC could not compile cuda/{spec.source} [{names}] for {arch} "
                f"(options: {' '.join(options)}):\n{log}"
            )
        err, size = nvrtc.nvrtcGetPTXSize(prog)
        _check_nvrtc(err, "nvrtcGetPTXSize")
        buf = b" " * size
        (err,) = nvrtc.nvrtcGetPTX(prog, buf)
        _check_nvrtc(err, "nvrtcGetPTX")
        ptx = buf.rstrip(b"\0").decode()
        cubin = b""
        if want_cubin:
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            _check_nvrtc(err, "nvrtcGetCUBINSize")
            cbuf = b" " * size
            (err,) = nvrtc.nvrtcGetCUBIN(prog, cbuf)
            _check_nvrtc(err, "nvrtcGetCUBIN")
            cubin = bytes(cbuf)
        lowered = {}
        for expr in spec.name_expressions:
            err, name = nvrtc.nvrtcGetLoweredName(prog, expr.encode())
            _check_nvrtc(err, f"nvrtcGetLoweredName({expr})")
            lowered[expr] = name.decode() if isinstance(name, bytes) else str(name)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    stores, loads, log_regs, log_stack = parse_ptxas_log(log, lowered)
    regs, stack = log_regs, log_stack
    resources = _cubin_resources(cubin) if cubin else None
    if resources is not None:
        regs, stack = _by_expression(resources, lowered)
    missing = tuple(e for e in spec.name_expressions if e not in log_regs)
    return CompiledKernel(arch=arch, ptx=ptx, cubin=cubin, log=log, spill_stores=stores, spill_loads=loads,
                          registers=regs, lowered_names=lowered, stack_frame=stack, log_missing=missing)


def compile_kernel(
    spec: KernelSpec,
    arch: str,
    *,
    want: tuple[str, ...] = ("cubin", "ptx"),
    cache: Path | str | None = None,
    use_cache: bool = True,
    kernel_dir_override: Path | str | None = None,
) -> CompiledKernel:
    """Compile ``spec`` for ``arch`` with NVRTC (no GPU needed), through the on-disk cache.

    Args:
        spec: the compilation unit.
        arch: ``"sm_XY"``/``"sm_XYa"`` accepted by :func:`check_arch` (normally one of :data:`KERNEL_ARCHS`
            or ``"sm_90"``).
        want: what the result must hold: ``"ptx"`` and/or ``"cubin"``.
        cache: cache folder (default :func:`cache_dir`).
        use_cache: False compiles afresh and does not touch the cache.
        kernel_dir_override: read sources from this folder instead of ``cuda/`` (tests).
    Raises:
        DeviceError: unknown arch, missing source, NVRTC unavailable, or a compile error (the message names
        the source file and the kernels and holds the full compiler log).
    """
    check_arch(spec, arch)
    bad = set(want) - {"ptx", "cubin"}
    if bad:
        raise DeviceError(f"want must name 'ptx' and/or 'cubin', got {sorted(bad)}")
    kdir = Path(kernel_dir_override) if kernel_dir_override is not None else kernel_dir()
    text, headers = _read_source(spec.source, kdir)
    key = _cache_key(spec, arch, text, headers, nvrtc_version())
    path = Path(cache if cache is not None else cache_dir()) / f"{Path(spec.source).stem}.{arch}.{key[:40]}.bin"
    if use_cache and path.is_file():
        try:
            entry = _decode_entry(path.read_bytes(), key)
        except OSError:
            entry = None
        if entry is not None and ("cubin" not in want or entry.cubin):
            entry.cache_path = path
            resources = _cubin_resources(entry.cubin) if entry.cubin else None
            if resources is not None:  # the cubin's values, whichever process (with or without pyelftools) wrote it
                entry.registers, entry.stack_frame = _by_expression(resources, entry.lowered_names)
            return entry
        path.unlink(missing_ok=True)  # corrupt, truncated or without the wanted cubin: rebuild
    with _BUILD_GATE.shared():
        compiled = _compile_nvrtc(spec, arch, text, kdir, want_cubin=True)
    if compiled.log_missing:
        # NVRTC 13.0 on the H200 machine once returned a log lacking one kernel's ptxas report while 16 builds
        # ran in parallel; the same unit built alone reported it. One rebuild, with no other build running, for
        # a complete log; the registers and frames are the cubin's either way.
        with _BUILD_GATE.exclusive():
            again = _compile_nvrtc(spec, arch, text, kdir, want_cubin=True)
        if len(again.log_missing) < len(compiled.log_missing):
            compiled = again
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, _encode_entry(key, compiled))
            compiled.cache_path = path
        except OSError:
            pass  # a read-only cache folder must not stop the build
    return compiled


def kernel_symbol_mapping(compiled: CompiledKernel) -> dict[str, bytes]:
    """``ObjectCode.from_cubin``'s ``symbol_mapping``: name expression -> lowered (mangled) name as bytes."""
    return {expr: name.encode() for expr, name in compiled.lowered_names.items()}


class LaunchableKernel:
    """A loaded kernel: ``kernel(grid, block, *args, shmem=0, stream=None)`` launches it with cuda.core.

    ``args`` are torch tensors (passed as device pointers), Python ints (passed as int32 unless wrapped in a
    numpy scalar), Python floats (float32) or numpy scalars. ``stream`` is a :class:`cuda.core.Stream`, a
    ``torch.cuda.Stream`` or None (torch's current stream on the kernel's device).
    """

    def __init__(self, kernel, name: str, arch: str, device_index: int, registers: int | None, module=None):
        self.kernel = kernel
        self.module = module  # the cuda.core ObjectCode: keeps the loaded library alive as long as the kernel
        self.name = name
        self.arch = arch
        self.device_index = device_index
        self.registers = registers

    def __call__(self, grid, block, *args, shmem: int = 0, stream=None) -> None:
        from sparsert.runtime.device import check_last_launch, cuda_core, get_device, stream_for

        core = cuda_core()
        get_device(self.device_index).ensure_current()  # e.g. autograd's backward thread has no context
        packed = []
        for i, a in enumerate(args):
            if hasattr(a, "data_ptr"):  # torch tensor
                packed.append(np.uint64(a.data_ptr()))
            elif isinstance(a, bool):
                packed.append(np.int32(int(a)))
            elif isinstance(a, int):
                if not -(2**31) <= a < 2**31:
                    raise DeviceError(f"{self.name}: argument {i} = {a} does not fit an int32 kernel parameter "
                                      "(pass a numpy scalar of the parameter's type)")
                packed.append(np.int32(a))
            elif isinstance(a, float):
                packed.append(np.float32(a))
            else:
                packed.append(a)
        try:
            config = core.LaunchConfig(grid=grid, block=block, shmem_size=shmem)
            launch_stream = stream_for(stream, self.device_index)
            core.launch(launch_stream, config, self.kernel, *packed)
        except DeviceError:
            raise
        except Exception as exc:  # cuda.core's CUDAError carries the driver's code and message
            raise DeviceError(f"launching {self.name} ({self.arch}, grid {grid}, block {block}, shmem {shmem}) "
                              f"failed: {exc}") from None
        check_last_launch(self.name, launch_stream)


def load_kernel(spec: KernelSpec, name_expression: str, device=None) -> LaunchableKernel:
    """Compile (or fetch from the cache) ``spec`` for ``device``'s architecture and return a launchable kernel.

    Args:
        device: a :class:`sparsert.runtime.device.GpuDevice`, a device index or None (device 0).
    Raises:
        DeviceError: no usable GPU, unsupported architecture, compile or load failure.
    """
    from sparsert.runtime.device import GpuDevice, cuda_core, get_device

    dev = device if isinstance(device, GpuDevice) else get_device(0 if device is None else int(device))
    key = (dev.index, spec, name_expression)
    with _LOCK:  # every launch comes through here: a loaded kernel is returned before any other work
        loaded = _LOADED.get(key)
    if loaded is not None:
        return loaded
    if name_expression not in spec.name_expressions:
        raise DeviceError(f"{name_expression!r} is not one of cuda/{spec.source}'s kernels "
                          f"{spec.name_expressions}")
    arch = dev.arch
    try:
        check_arch(spec, arch)
    except DeviceError:
        raise DeviceError(f"cuda/{spec.source} has no build for {dev.name} ({dev.arch}); it supports "
                          f"{', '.join(spec.archs)}") from None
    compiled = compile_kernel(spec, arch, want=("cubin",))
    dev.set_current()
    core = cuda_core()
    try:
        # cuda.core hands the mapped name to the driver as a C string: the values must be bytes (a str fails
        # with "expected bytes, str found"); the cache keeps them as str (JSON).
        obj = core.ObjectCode.from_cubin(compiled.cubin, symbol_mapping=kernel_symbol_mapping(compiled))
        kernel = obj.get_kernel(name_expression)
    except Exception as exc:  # cuda.core raises CUDAError/RuntimeError with the driver's message
        raise DeviceError(f"loading {name_expression} from cuda/{spec.source} ({arch}) on {dev.name} "
                          f"failed: {exc}") from None
    loaded = LaunchableKernel(kernel, name_expression, arch, dev.index, compiled.registers.get(name_expression),
                              module=obj)
    with _LOCK:
        _LOADED[key] = loaded
    return loaded
