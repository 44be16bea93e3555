"""Compile CPU loops with numba: the options every sparsert CPU kernel shares, and a cache that may be absent.

Used by :mod:`sparsert.runtime.nm_mask_cpu`, :mod:`sparsert.runtime.transposable_mask_cpu` and
:mod:`sparsert.train.mvue24_cpu`. Each kernel is compiled on first use and cached on disk (next to its source, or
in numba's user-wide cache when that folder is read-only); where no cache folder is writable at all, it is
compiled in memory per process instead of failing the import.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

numba = None
if os.environ.get("SPARSERT_NO_NUMBA", "") != "1":  # set before the import: numba is not even imported
    try:
        import numba
    except Exception:  # noqa: BLE001 - a missing or broken numba install: every caller keeps a torch path
        numba = None

__all__ = ["numba_available", "cpu_kernel", "u32_as_f32", "f32_as_u32"]

_OPTIONS = dict(nogil=True, boundscheck=False, error_model="numpy")


def numba_available() -> bool:
    """True when compiled CPU loops can run: numba imports and ``SPARSERT_NO_NUMBA`` is not set to 1."""
    return numba is not None and os.environ.get("SPARSERT_NO_NUMBA", "") != "1"


def cpu_kernel(fn: Callable, *, inline: bool = False) -> Callable:
    """``fn`` compiled by numba (no bounds checks, no Python division errors, GIL released), cached on disk
    when a cache folder is writable; ``inline`` marks a helper to inline into its callers. Without numba,
    ``fn`` is returned unchanged (callers check :func:`numba_available` before using it)."""
    if numba is None:
        return fn
    if inline:
        return numba.njit(inline="always")(fn)
    try:
        return numba.njit(cache=True, **_OPTIONS)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available": compile in memory instead
        return numba.njit(cache=False, **_OPTIONS)(fn)


def _bitcast(to_float: bool) -> Callable:
    """A numba intrinsic reinterpreting a 32-bit scalar's bits (uint32 <-> float32); plain numpy without numba."""
    if numba is None:
        if to_float:
            return lambda u: np.uint32(u).view(np.float32)
        return lambda v: np.float32(v).view(np.uint32)
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    source, target, llvm_target = ((types.uint32, types.float32, ir.FloatType()) if to_float
                                   else (types.float32, types.uint32, ir.IntType(32)))

    def cast(typingctx, value):  # noqa: ANN001, ANN202, ARG001 - numba's intrinsic signature
        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            return builder.bitcast(args[0], llvm_target)

        return target(source), codegen

    cast.__name__ = "u32_as_f32" if to_float else "f32_as_u32"
    return intrinsic(cast)


u32_as_f32 = _bitcast(True)  # uint32 bits -> the float32 they encode (inside compiled loops)
f32_as_u32 = _bitcast(False)  # float32 -> its uint32 bits
