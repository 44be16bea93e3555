"""sparsert.export: ONNX export with 2:4 / INT4 weights, sparsity annotations and parity checks."""
