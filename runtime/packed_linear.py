"""A linear layer's weight in its stored form: 2:4 compressed, optionally INT4-quantized.

Composition order: 2:4 first (keep two of every four along K), then INT4 on the kept values only.
An INT4 group covers ``group_size`` columns of the original K, i.e. ``group_size / 2`` kept values, so the
dequantized dense weight equals ONNX's blocked DequantizeLinear over the dense ``[K, N]`` weight with
``block_size = group_size`` (pruned positions hold code 0).

Stored tensors of a layer ``prefix`` (shapes for W [out, K], group size g):

=====================  ==================  ===============================================================
name                   dtype / shape       when
=====================  ==================  ===============================================================
``prefix.indices``     uint8 [out, K/8]    2:4 layers (``ceil(K/8)``; see :mod:`sparsert.runtime.sparse24`)
``prefix.values``      fp16/fp32 [out,K/2] 2:4 layers without INT4: the kept values
``prefix.qweight``     uint8 [out, K/4]    2:4 + INT4: kept values' codes, packed (see :mod:`.int4`)
                       uint8 [out, K/2]    dense + INT4: all codes, packed
``prefix.scales``      fp16 [out, K/g]     INT4 layers
``prefix.weight``      fp16/fp32 [out, K]  dense, unquantized layers
``prefix.bias``        fp32 [out]          layers with a bias
=====================  ==================  ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsert.runtime.errors import FormatError, dtype_name
from sparsert.runtime.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from sparsert.runtime.nm_mask import is_nm_sparse, nm_mask
from sparsert.runtime.sparse24 import (
    compress_24,
    decompress_24,
    packed_indices_width,
    unpack_indices_24,
    validate_indices_24,
)


@dataclass
class PackedLinear:
    """One linear weight ``W [out_features, in_features]`` in stored form (see the module docstring)."""

    out_features: int
    in_features: int
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    group_size: int | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def sparse(self) -> bool:
        return self.indices is not None

    @property
    def quantized(self) -> bool:
        return self.qweight is not None

    def validate(self, name: str = "weight") -> None:
        """Check the stored tensors against the layout table above (names ``{name}.indices`` etc. in errors):
        shapes follow ``out_features`` x ``in_features``, dtypes, a positive group size dividing K, finite and
        non-negative scales (values may hold NaN/Inf: they propagate, as in any product). Raises FormatError;
        cheap enough to run before every prepare."""
        out, k = self.out_features, self.in_features
        if not (isinstance(out, int) and isinstance(k, int)) or out <= 0 or k <= 0:
            raise FormatError(f"{name}: out_features/in_features must be positive ints, got {out!r} x {k!r}")

        def need(field: str, shape: tuple[int, ...], kinds: tuple[torch.dtype, ...], finite: bool = False) -> None:
            t = getattr(self, field)
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"{name}.{field} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape or t.dtype not in kinds:
                allowed = "/".join(dtype_name(d) for d in kinds)
                raise FormatError(f"{name}.{field} is {dtype_name(t.dtype)} {list(t.shape)}, "
                                  f"expected {allowed} {list(shape)} for a [{out}, {k}] weight")
            if finite and not bool(torch.isfinite(t).all()):
                raise FormatError(f"{name}.{field} holds non-finite values (NaN or Inf)")

        floats = (torch.float32, torch.float16, torch.bfloat16)
        stored = k // 2 if self.sparse else k
        if self.sparse:
            if k % 4:
                raise FormatError(f"{name}: in_features={k} must be a multiple of 4 for a 2:4 layer")
            need("indices", (out, packed_indices_width(k)), (torch.uint8,))
            validate_indices_24(self.indices, k, name=f"{name}.indices")
        if self.quantized:
            gs = self.group_size
            if not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0 or k % gs:
                raise FormatError(f"{name}: INT4 group size must be a positive int dividing in_features={k}, "
                                  f"got {gs!r}")
            need("qweight", (out, (stored + 1) // 2), (torch.uint8,))
            need("scales", (out, k // gs), floats, finite=True)
            if bool((self.scales < 0).any()):
                raise FormatError(f"{name}.scales holds negative scales (expected absmax/7 >= 0)")
        elif self.sparse:
            need("values", (out, stored), floats)  # NaN/Inf pass through (a gradient operand may carry them)
        else:
            need("weight", (out, k), floats)
        if self.bias is not None:
            need("bias", (out,), floats)

    def kept_values(self) -> torch.Tensor:
        """The stored values (dequantized if INT4) as float32: [out, K/2] for 2:4 layers, else [out, K]."""
        if self.quantized:
            width = self.in_features // 2 if self.sparse else self.in_features
            codes = unpack_int4(self.qweight, width)
            group = self.group_size // 2 if self.sparse else self.group_size
            return dequantize_int4(codes, self.scales, group)
        stored = self.values if self.sparse else self.weight
        return stored.float()

    def to_dense(self) -> torch.Tensor:
        """Dense float32 weight [out_features, in_features]; pruned positions are exactly zero."""
        kept = self.kept_values()
        if self.sparse:
            return decompress_24(kept, self.indices, self.in_features)
        return kept

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored tensors under their artifact names ``{prefix}.{indices,values,qweight,scales,...}``."""
        fields = ("indices", "values", "qweight", "scales", "weight", "bias")
        return {f"{prefix}.{f}": getattr(self, f).contiguous() for f in fields if getattr(self, f) is not None}

    def weight_tensors(self) -> list[torch.Tensor]:
        """The stored weight tensors that are present (indices, values, qweight, scales, weight; no bias)."""
        fields = ("indices", "values", "qweight", "scales", "weight")
        return [t for f in fields if (t := getattr(self, f)) is not None]

    def nbytes(self) -> int:
        """Bytes of the stored weight tensors (bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self.weight_tensors())

    @classmethod
    def from_tensors(
        cls,
        prefix: str,
        tensors: dict[str, torch.Tensor],
        out_features: int,
        in_features: int,
        group_size: int | None = None,
    ) -> PackedLinear:
        """Collect the tensors of ``prefix`` from ``tensors`` (shapes are checked by the artifact loader)."""

        def get(field: str) -> torch.Tensor | None:
            return tensors.get(f"{prefix}.{field}")

        return cls(
            out_features=out_features,
            in_features=in_features,
            indices=get("indices"),
            values=get("values"),
            qweight=get("qweight"),
            scales=get("scales"),
            group_size=group_size if get("qweight") is not None else None,
            weight=get("weight"),
            bias=get("bias"),
        )


def pack_linear(
    weight: torch.Tensor,
    *,
    sparse: bool = True,
    int4_group_size: int | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    values_dtype: torch.dtype = torch.float32,
    name: str = "weight",
) -> PackedLinear:
    """Pack ``weight [out, K]`` (float) into its stored form.

    Args:
        sparse: apply 2:4 along K: ``mask`` (bool [out, K], 2:4) if given, else top-2 |W| of every four.
        int4_group_size: quantize (the kept values) to INT4 with this group size along the original K;
            for 2:4 layers it must be a multiple of 4 so no group of four straddles two INT4 groups.
        values_dtype: dtype of stored unquantized values (float32 or float16).
    Returns:
        PackedLinear whose ``to_dense()`` is ``dequant(quant(W ⊙ mask))`` (or ``W ⊙ mask`` without INT4).
    """
    if weight.dim() != 2:
        raise FormatError(f"{name} must be 2-D [out, K], got shape {tuple(weight.shape)}")
    if values_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FormatError(f"{name}: values_dtype must be float32, float16 or bfloat16, got {values_dtype!r}")
    out, k = weight.shape
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise FormatError(f"{name} holds non-finite values (NaN or Inf); cannot pack it")
    packed = PackedLinear(out_features=out, in_features=k)
    if bias is not None:
        packed.bias = bias.detach().float().contiguous()
    if sparse:
        if mask is None:
            mask = nm_mask(w, 2, 4, name=name)
        elif mask.shape != w.shape:
            raise FormatError(f"mask for {name} has shape {tuple(mask.shape)}, expected {(out, k)}")
        elif k % 4:
            raise FormatError(f"{name} of shape {(out, k)}: K={k} is not divisible by 4 (2:4 groups along K)")
        elif not is_nm_sparse(mask.to(torch.bool), 2, 4):
            raise FormatError(f"mask for {name} is not 2:4 along K (a group of four keeps more than two)")
        w = w * mask.to(torch.bool)
    if int4_group_size is not None:
        if sparse and int4_group_size % 4:
            raise FormatError(f"INT4 group size {int4_group_size} must be a multiple of 4 for 2:4 layers")
        codes, scales = quantize_int4(w, int4_group_size, torch.float16, name)
        packed.scales, packed.group_size = scales, int4_group_size
        if sparse:
            # The kept codes are the codes at the kept positions of the masked weight.
            _, packed.indices = compress_24(w, name)
            idx = unpack_indices_24(packed.indices, k).long().reshape(out, k // 4, 2)
            codes = torch.gather(codes.reshape(out, k // 4, 4), -1, idx).reshape(out, k // 2)
        packed.qweight = pack_int4(codes)
    elif sparse:
        packed.values, packed.indices = compress_24(w.to(values_dtype), name)
    else:
        packed.weight = w.to(values_dtype).contiguous()
    return packed
