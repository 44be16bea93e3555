"""runtime/cpu_jit.py: numba-compiled CPU loops, with and without a writable cache, and the opt-out switch."""

from __future__ import annotations

import numpy as np
import pytest

from sparsert.runtime import cpu_jit


def test_a_kernel_without_a_cache_location_still_compiles():
    if cpu_jit.numba is None:
        pytest.skip("numba is not installed")
    namespace: dict = {}
    # source without a file: numba has nowhere to cache it and refuses cache=True with a RuntimeError
    exec("def add_one(a):\n    for i in range(a.shape[0]):\n        a[i] += 1\n", namespace)
    kernel = cpu_jit.cpu_kernel(namespace["add_one"])
    a = np.zeros(5, dtype=np.float32)
    kernel(a)
    assert a.tolist() == [1.0] * 5
    assert hasattr(kernel, "py_func")  # compiled, not the Python function


def test_sparsert_no_numba_switches_the_compiled_paths_off(monkeypatch):
    from sparsert.runtime import nm_mask_cpu, transposable_mask_cpu
    from sparsert.train import mvue24_cpu

    monkeypatch.setenv("SPARSERT_NO_NUMBA", "1")
    assert not any(m.available() for m in (nm_mask_cpu, transposable_mask_cpu, mvue24_cpu))
    monkeypatch.setenv("SPARSERT_NO_NUMBA", "0")
    assert all(m.available() for m in (nm_mask_cpu, transposable_mask_cpu, mvue24_cpu)) == (cpu_jit.numba is not None)
