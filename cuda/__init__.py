"""sparsert.cuda: CUDA C++ kernel sources (``*.cu``), shipped as package data and compiled by NVRTC.

When the repository root is on ``sys.path`` (``python -m ...`` from the root) this folder is also importable
as the top-level ``cuda``, where it would shadow NVIDIA's ``cuda`` namespace package (``cuda.bindings``,
``cuda.core``). Extending ``__path__`` pkgutil-style lets both coexist.
"""

from __future__ import annotations

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
