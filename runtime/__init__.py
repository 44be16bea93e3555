"""sparsert.runtime: the core — tensor formats, models, artifacts, device memory and kernels.

The runtime never imports :mod:`sparsert.train` or :mod:`sparsert.export`.
"""
