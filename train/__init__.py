"""sparsert.train: 2:4 sparse (and INT4 quantization-aware) training built on sparsert.runtime."""
