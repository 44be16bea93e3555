"""TMA tensor maps (``CUtensorMap``) for the Hopper kernels: encoded by the CUDA driver, kept in device memory.

A TMA load (``cp.async.bulk.tensor``) reads its source through a 128-byte tensor map that describes the global
tensor (address, shape, strides) and the box one instruction copies, with the shared-memory swizzle applied by
the copy engine. ``cuda/sparse24_gemm_sm90.cu``'s ``sparse24_gemm_sm90_tma`` takes the map's address in global
memory (the kernel fences the tensormap proxy before its first load), so a map is encoded once per
(device, address, shape, box) and reused: it depends on nothing else.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict

import torch

from sparsert.runtime.device import stream_capturing
from sparsert.runtime.errors import DeviceError, FormatError

MAP_BYTES = 128
SWIZZLE_BYTES = 128  # the 128-byte swizzle: a box row is exactly 128 bytes
_CACHE_LIMIT = 1024
_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
# Maps a CUDA graph captured: a replay reads them at the address captured, so they must outlive the LRU above
# (kept for the life of the process; one 128-byte map per captured launch shape). A map first encoded during a
# capture is written by a captured host-to-device copy, which every replay repeats: its pinned source is kept too.
_captured: dict[tuple, torch.Tensor] = {}
_captured_sources: dict[tuple, torch.Tensor] = {}
_lock = threading.Lock()


def encode_tiled_2d(ptr: int, rows: int, cols: int, dtype: torch.dtype, box_rows: int) -> bytes:
    """``cuTensorMapEncodeTiled`` for a row-major ``[rows, cols]`` bf16/fp16 tensor at device address ``ptr``.

    Layout conventions: dims ``{cols, rows}`` (innermost first), row stride ``2 * cols`` bytes, box
    ``{64, box_rows}`` elements (64 x 2 bytes = one 128-byte swizzled row in shared memory, chunk ``j`` of box row
    ``r`` at ``(j ^ (r % 8)) * 16``), elements outside the tensor read as zero, L2 promotion 256 B.
    Returns the 128 bytes of the map. Raises FormatError for shapes TMA cannot describe, DeviceError from
    the driver.
    """
    from sparsert.runtime.device import check_cuda, driver

    if dtype not in (torch.bfloat16, torch.float16):
        raise FormatError(f"tensor map: dtype must be bfloat16 or float16, got {dtype}")
    if ptr % 16 or cols % 8 or not 0 < rows < 2**32 or not 0 < cols < 2**32:
        raise FormatError(f"tensor map: a [{rows}, {cols}] tensor at {ptr:#x} needs a 16-byte aligned address and "
                          "cols % 8 == 0 (16-byte row stride)")
    if not 1 <= box_rows <= 256:
        raise FormatError(f"tensor map: box rows must be 1..256, got {box_rows}")
    drv = driver()
    kind = (drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 if dtype == torch.bfloat16
            else drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16)
    u32, u64 = drv.cuuint32_t, drv.cuuint64_t  # the binding takes its integer arrays as these, not ints
    try:
        tmap = check_cuda(drv.cuTensorMapEncodeTiled(
            kind, u32(2), ptr, [u64(cols), u64(rows)], [u64(cols * 2)], [u32(SWIZZLE_BYTES // 2), u32(box_rows)],
            [u32(1), u32(1)],
            drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
            drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
            drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE), "cuTensorMapEncodeTiled")
    except DeviceError:
        raise
    except Exception as exc:  # e.g. cuda.pathfinder's DynamicLibNotFoundError where there is no driver
        raise DeviceError(f"tensor map: the CUDA driver is not available ({type(exc).__name__}: {exc})") from None
    return ctypes.string_at(int(tmap.getPtr()), MAP_BYTES)


def device_tensor_map(x: torch.Tensor, box_rows: int) -> torch.Tensor:
    """The tensor map of a contiguous 2-D CUDA tensor ``x [rows, cols]`` (box ``{64, box_rows}``), as a uint8
    ``[128]`` tensor on ``x``'s device (torch allocations are 512-byte aligned: the map's 64 bytes hold).
    Cached by (device, address, shape, dtype, box): a map depends on nothing else, so a cached one stays right
    even after ``x`` is freed and its memory reused. A map a CUDA-graph capture used (or encoded: then its copy
    is part of the graph, and its pinned source is kept as well) lives as long as the process, since the
    graph's replays read it."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_contiguous():
        what = f"{list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise FormatError(f"tensor map: X must be a contiguous 2-D tensor, got {what}")
    key = (x.device.index, x.data_ptr(), tuple(x.shape), x.dtype, box_rows)
    capturing = stream_capturing()
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            if capturing:
                _captured[key] = hit
            return hit
    if not x.is_cuda:
        raise FormatError(f"tensor map: X must be on a CUDA device, got {x.device}")
    raw = encode_tiled_2d(x.data_ptr(), x.shape[0], x.shape[1], x.dtype, box_rows)
    # From pinned memory, non-blocking: stream-ordered before the launch without waiting for the stream to drain
    # (a pageable copy would); torch's pinned allocator keeps the host block until the copy has run.
    source = torch.frombuffer(bytearray(raw), dtype=torch.uint8).pin_memory()
    dev = source.to(x.device, non_blocking=True)
    with _lock:
        if capturing:  # the copy is a graph node now: its source must live as long as the graph may replay
            _captured[key], _captured_sources[key] = dev, source
        _cache[key] = dev
        while len(_cache) > _CACHE_LIMIT:
            _cache.popitem(last=False)
    return dev
