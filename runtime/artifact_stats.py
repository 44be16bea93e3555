"""Size and sparsity statistics of a compressed artifact (what ``sparsert inspect`` prints).

Definitions (also in docs/FORMAT.md, "Statistics"):

- *linear weights*: the sparse linears of the model (:func:`sparse_linear_names`), whether packed or dense.
- a layer's *stored bytes*: the bytes of every tensor that stores it — values or qweight, indices, scales
  (or the dense ``weight``) — plus its bias and, for a SLoRB layer, its ``S`` [out, K/k] (AST's extra
  parameters: ``16/k`` bits per weight in float16, 1.0 at k = 16).
- *bits per weight* = stored bytes × 8 / (out × K): everything a layer costs, per original weight.
- *sparsity* = share of exact zeros in the decoded weight [out, K] (≥ 0.5 for 2:4; quantization may add
  zeros).
- linear-weights ratio vs FP32 (FP16) = 4 (2) bytes × (number of weights and biases of those layers) /
  their stored bytes.
- whole-model ratio vs FP32 (FP16) = 4 (2) bytes × number of model parameters (every linear counted at its
  dense size, SLoRB ``S`` included) / size on disk of ``model.safetensors`` (header included; config.json not
  counted).

The FP32/FP16 baseline of a linear is its dense weight and bias only: SLoRB's ``S`` adds to the stored bytes but
not to the baseline, since the dense model it approximates has no ``S``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sparsert.runtime.artifact import CONFIG_NAME, WEIGHTS_NAME, dtype_name, load_artifact, model_state_shapes
from sparsert.runtime.model import sparse_linear_names

#: Targets of a 2:4 + INT4 (group 128, fp16 scales) artifact: 2-bit index + 4-bit code per kept value is
#: 3 bits per original weight, plus 16 bits of scale per 128 weights = 3.125.
MAX_BITS_PER_WEIGHT_24_INT4 = 3.25
MIN_RATIO_VS_FP32_24_INT4 = 9.8


@dataclass
class LayerStats:
    """One sparse linear ``W [out_features, in_features]`` as stored."""

    name: str
    out_features: int
    in_features: int
    storage: str  # "2:4 float16", "2:4+int4 g128", "int4 g128", "dense float32"; "+slorb k16" with SLoRB
    sparsity: float
    stored_bytes: int  # SLoRB S included
    bias_count: int
    slorb_bytes: int = 0  # bytes of the SLoRB S [out, K/k] (0 without SLoRB)

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bytes * 8 / self.weights

    @property
    def ratio_vs_fp32(self) -> float:
        return 4 * (self.weights + self.bias_count) / self.stored_bytes

    @property
    def ratio_vs_fp16(self) -> float:
        return 2 * (self.weights + self.bias_count) / self.stored_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            weights=self.weights,
            bits_per_weight=self.bits_per_weight,
            ratio_vs_fp32=self.ratio_vs_fp32,
            ratio_vs_fp16=self.ratio_vs_fp16,
        )
        return d


@dataclass
class ArtifactStats:
    """Whole-artifact numbers; see the module docstring for exactly what each ratio counts."""

    path: str
    sparsity: dict | None
    quantization: dict | None
    dense_dtype: str
    file_bytes: int  # model.safetensors on disk
    config_bytes: int  # config.json on disk
    model_params: int  # every parameter, each linear at its dense size
    layers: list[LayerStats] = field(default_factory=list)
    slorb: dict | None = None  # config.json["slorb"]

    @property
    def slorb_bytes(self) -> int:
        return sum(layer.slorb_bytes for layer in self.layers)

    @property
    def linear_weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def linear_bytes(self) -> int:
        return sum(layer.stored_bytes for layer in self.layers)

    @property
    def linear_bits_per_weight(self) -> float:
        return self.linear_bytes * 8 / self.linear_weights

    @property
    def linear_sparsity(self) -> float:
        return sum(layer.sparsity * layer.weights for layer in self.layers) / self.linear_weights

    @property
    def linear_ratio_vs_fp32(self) -> float:
        return 4 * (self.linear_weights + sum(x.bias_count for x in self.layers)) / self.linear_bytes

    @property
    def linear_ratio_vs_fp16(self) -> float:
        return self.linear_ratio_vs_fp32 / 2

    @property
    def model_ratio_vs_fp32(self) -> float:
        return 4 * self.model_params / self.file_bytes

    @property
    def model_ratio_vs_fp16(self) -> float:
        return 2 * self.model_params / self.file_bytes

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "sparsity": self.sparsity,
            "quantization": self.quantization,
            "slorb": self.slorb,
            "dense_dtype": self.dense_dtype,
            "file_bytes": self.file_bytes,
            "config_bytes": self.config_bytes,
            "model_params": self.model_params,
            "model_ratio_vs_fp32": self.model_ratio_vs_fp32,
            "model_ratio_vs_fp16": self.model_ratio_vs_fp16,
            "linear_weights": self.linear_weights,
            "linear_bytes": self.linear_bytes,
            "linear_bits_per_weight": self.linear_bits_per_weight,
            "linear_sparsity": self.linear_sparsity,
            "linear_ratio_vs_fp32": self.linear_ratio_vs_fp32,
            "linear_ratio_vs_fp16": self.linear_ratio_vs_fp16,
            "slorb_bytes": self.slorb_bytes,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def artifact_stats(path: str | Path) -> ArtifactStats:
    """Load (and so validate) the artifact at ``path`` and measure it."""
    root = Path(path)
    art = load_artifact(root)
    layers = []
    for name in sparse_linear_names(art.model_config):
        if name in art.packed:
            p = art.packed[name]
            weight = p.to_dense()
            stored = sum(_nbytes(t) for t in p.tensors(name).values())
            bias_count = 0 if p.bias is None else p.bias.numel()
            g = f"int4 g{p.group_size}"
            if p.sparse:
                storage = f"2:4+{g}" if p.quantized else f"2:4 {dtype_name(p.values.dtype)}"
            else:
                storage = g if p.quantized else f"dense {dtype_name(p.weight.dtype)}"
        else:
            weight = art.dense[f"{name}.weight"]
            bias = art.dense.get(f"{name}.bias")
            stored = _nbytes(weight) + (0 if bias is None else _nbytes(bias))
            bias_count = 0 if bias is None else bias.numel()
            storage = f"dense {dtype_name(weight.dtype)}"
        slorb_s = art.dense.get(f"{name}.slorb.S") if art.slorb is not None else None
        slorb_bytes = 0 if slorb_s is None else _nbytes(slorb_s)
        if slorb_s is not None:
            stored += slorb_bytes
            storage += f"+slorb k{art.slorb.k}"
        out, k = weight.shape
        layers.append(
            LayerStats(
                name=name,
                out_features=out,
                in_features=k,
                storage=storage,
                sparsity=float((weight == 0).sum()) / weight.numel(),
                stored_bytes=stored,
                bias_count=bias_count,
                slorb_bytes=slorb_bytes,
            )
        )
    model_params = sum(math.prod(shape) for shape in model_state_shapes(art.model_config, art.slorb).values())
    return ArtifactStats(
        path=str(root),
        sparsity=art.sparsity.to_dict() if art.sparsity else None,
        quantization=art.quantization.to_dict() if art.quantization else None,
        dense_dtype=dtype_name(art.dense_dtype),
        file_bytes=(root / WEIGHTS_NAME).stat().st_size,
        config_bytes=(root / CONFIG_NAME).stat().st_size,
        model_params=model_params,
        layers=layers,
        slorb=art.slorb.to_dict() if art.slorb else None,
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_stats(stats: ArtifactStats) -> str:
    """A readable table: one row per sparse linear, then linear-weight totals and whole-model numbers."""
    q = stats.quantization
    kind = " + ".join(
        part
        for part in (
            "2:4" if stats.sparsity else "",
            f"INT4 g{q['group_size']}" if q else "",
            f"SLoRB k{stats.slorb['k']}" if stats.slorb else "",
        )
        if part
    ) or "dense"
    w = max([16] + [len(s.storage) for s in stats.layers])  # storage column ("2:4+int4 g128+slorb k16")
    head = f"{'layer':<28} {'shape':>12} {'storage':>{w}} {'sparsity':>9} {'bytes':>11} {'bits/w':>7} {'×fp32':>7}"
    lines = [
        f"artifact {stats.path}: {kind}, dense tensors {stats.dense_dtype}",
        "",
        head,
        "-" * len(head),
    ]
    for s in stats.layers:
        shape = f"{s.out_features}x{s.in_features}"
        lines.append(
            f"{s.name:<28} {shape:>12} {s.storage:>{w}} {s.sparsity:>8.1%} {s.stored_bytes:>11,} "
            f"{s.bits_per_weight:>7.3f} {s.ratio_vs_fp32:>7.2f}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"{'linear weights':<28} {f'{stats.linear_weights:,} w':>12} {'':>{w}} {stats.linear_sparsity:>8.1%} "
        f"{stats.linear_bytes:>11,} {stats.linear_bits_per_weight:>7.3f} {stats.linear_ratio_vs_fp32:>7.2f}"
    )
    lines += [
        "",
        f"linear weights: {stats.linear_bits_per_weight:.3f} bits/weight, "
        f"{stats.linear_ratio_vs_fp32:.2f}x smaller than FP32, {stats.linear_ratio_vs_fp16:.2f}x than FP16"
        + (f" (SLoRB S: {stats.slorb_bytes:,} bytes, {stats.slorb_bytes * 8 / stats.linear_weights:.3f} bits/weight)"
           if stats.slorb else ""),
        f"whole model:    {stats.model_params:,} parameters, model.safetensors {_human(stats.file_bytes)} "
        f"({stats.file_bytes:,} bytes; config.json {stats.config_bytes:,} bytes), "
        f"{stats.model_ratio_vs_fp32:.2f}x smaller than FP32, {stats.model_ratio_vs_fp16:.2f}x than FP16",
    ]
    return "\n".join(lines)


def stats_json(stats: ArtifactStats) -> str:
    """``stats.to_dict()`` as indented JSON."""
    return json.dumps(stats.to_dict(), indent=2)
