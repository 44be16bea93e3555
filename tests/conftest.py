"""Shared pytest setup: one torch thread, and the ``gpu`` marker.

Tests marked ``@pytest.mark.gpu`` run only where a CUDA device of sm_80 or newer is usable through
cuda-python (driver present, device found) and torch was built with CUDA; elsewhere they are skipped with
the reason (``no NVIDIA GPU/driver available (needs sm_80+)`` and the detail).
"""

from __future__ import annotations

import functools

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests use tiny tensors: one intra-op thread avoids OpenMP hand-off costs on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def gpu_status() -> tuple[bool, str]:
    """(usable, reason) for the GPU tests."""
    from sparsert.runtime.device import NO_GPU_MESSAGE, probe_gpu

    ok, reason = probe_gpu()
    if not ok:
        return False, reason
    import torch

    if not torch.cuda.is_available():
        return False, f"{NO_GPU_MESSAGE}: torch {torch.__version__} has no CUDA support"
    return True, reason


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    ok, reason = gpu_status()
    if ok:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(skip)
