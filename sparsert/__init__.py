"""sparsert: a runtime and toolkit for N:M (2:4) sparse, INT4-quantized transformer models."""

__version__ = "0.1.0"
