"""sparsert.cuda: CUDA C++ kernel sources (``*.cu``), shipped as package data and compiled by NVRTC."""

from __future__ import annotations

from importlib import resources


def kernel_source(name: str) -> str:
    """Return the text of the kernel source file ``name`` (e.g. ``"sparse24_gemm.cu"``)."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
