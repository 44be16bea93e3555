"""sparsert.cuda: CUDA C++ kernel sources (``*.cu``), shipped as package data and compiled by NVRTC.

When the repository root is on ``sys.path`` (``python -m ...`` from the root) this folder is also importable
as the top-level ``cuda``, where it would shadow NVIDIA's ``cuda`` namespace package (``cuda.bindings``,
``cuda.core``). Extending ``__path__`` pkgutil-style lets both coexist.
"""

from __future__ import annotations

from importlib import resources
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)


def kernel_source(name: str) -> str:
    """Return the text of the kernel source file ``name`` (e.g. ``"sparse24_gemm.cu"``)."""
    return resources.files("sparsert.cuda").joinpath(name).read_text(encoding="utf-8")
