"""``sparsert inspect model.onnx``: which MatMul / Gemm weights of an ONNX graph TensorRT can run on 2:4 sparse
tensor cores, and whether sparsert's annotations agree with the values.

TensorRT (``BuilderFlag.SPARSE_WEIGHTS``) looks at the values of constant weights: a ``MatMul`` / ``Gemm`` whose
``B`` is a constant ``[K, N]`` with at least two zeros in every four consecutive entries along K (axis 0) is
eligible. :func:`onnx_weight_stats` lists every such constant ``B`` of any ONNX model (sparsert's exports or
another tool's), in graph order:

- ``B`` read from an initializer or ``Constant`` node directly, through a 2-D ``Transpose``
  (``MatMul(x, Transpose(W))``), with ``Gemm(transB=1)`` taken into account, or through a ``DequantizeLinear``
  of integer codes (per tensor, per axis or blocked): the pattern is checked on the codes minus their zero
  point, the entries that dequantize to 0; a ``MatMul`` inside an ``If`` / ``Loop`` body is not listed;
- its shape ``[K, N]``, fraction of zeros, whether it is 2:4 along K, its storage (``float32``, ``int4`` ...),
  and the ``sparsert.layer`` / ``sparsert.sparsity.pattern`` annotations when the graph has them.

A graph whose annotations disagree with its values (:func:`sparsert.export.annotations.verify_sparsity_annotations`)
is reported, not refused: inspecting is how such a file is found.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sparsert.export import annotations as ann
from sparsert.runtime.errors import ExportError

_STORAGE = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
            onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT4: "int4", onnx.TensorProto.INT8: "int8",
            onnx.TensorProto.UINT4: "uint4", onnx.TensorProto.UINT8: "uint8"}


@dataclass
class OnnxWeight:
    node: str
    op: str
    initializer: str
    k: int
    n: int
    storage: str  # float32, int4, ...
    zeros: float  # fraction of zero entries (codes for quantized weights)
    is_2_4: bool  # at least two zeros in every four along K
    layer: str | None  # sparsert.layer annotation
    annotated: str | None  # sparsert.sparsity.pattern annotation


@dataclass
class OnnxStats:
    path: str
    weights: list[OnnxWeight] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # the model's sparsert.* properties
    annotation_error: str | None = None  # what verify_sparsity_annotations found wrong, if anything

    @property
    def sparse_share(self) -> float:
        """Share of the constant MatMul/Gemm weight entries that sit in 2:4 weights."""
        total = sum(w.k * w.n for w in self.weights)
        return sum(w.k * w.n for w in self.weights if w.is_2_4) / total if total else 0.0


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _to_array(tensor: onnx.TensorProto) -> np.ndarray:
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as exc:  # raw_data that does not fit dims and dtype
        raise ExportError(f"initializer {tensor.name!r}: its data cannot be read ({exc})") from None


def _zero_relative_codes(node: onnx.NodeProto, codes: np.ndarray, inits: dict[str, onnx.TensorProto]
                         ) -> np.ndarray | None:
    """A ``DequantizeLinear``'s integer codes minus its zero point (broadcast per tensor, per axis or per block),
    so that exactly the entries that dequantize to 0 are 0; None when the zero point is not a constant."""
    codes = codes.astype(np.int32)
    if len(node.input) < 3 or not node.input[2]:
        return codes
    if node.input[2] not in inits:
        return None
    zp = _to_array(inits[node.input[2]]).astype(np.int32)
    axis = _attr(node, "axis", 1) % codes.ndim
    if zp.size == 1:
        return codes - zp.reshape(())
    if zp.ndim == 1 and zp.shape[0] == codes.shape[axis]:
        return codes - np.expand_dims(zp, 1 - axis)
    if zp.ndim == codes.ndim:
        block = _attr(node, "block_size", 0)
        if block > 0:
            full = np.repeat(zp, block, axis=axis)
            if full.shape[axis] >= codes.shape[axis]:
                return codes - np.take(full, range(codes.shape[axis]), axis=axis)
    return None


def _constant(name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto],
              through_dequantize: bool, depth: int = 0) -> tuple[np.ndarray, onnx.TensorProto] | None:
    """The value of ``name`` and the tensor it comes from, when it is a constant: an initializer, a ``Constant``
    node's tensor, a 2-D ``Transpose`` of a constant, or (``through_dequantize``) a ``DequantizeLinear`` of
    constant codes, given as codes minus zero point. None otherwise."""
    if name in inits:
        tensor = inits[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data:
            return None
        return _to_array(tensor), tensor
    node = producers.get(name)
    if node is None or depth > 3:
        return None
    if node.op_type == "Constant":
        tensor = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        return (_to_array(tensor), tensor) if tensor is not None else None
    if node.op_type == "Transpose":
        inner = _constant(node.input[0], inits, producers, through_dequantize, depth + 1)
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if inner is None or inner[0].ndim != 2 or perm != [1, 0]:
            return None
        return inner[0].T, inner[1]
    if node.op_type == "DequantizeLinear" and through_dequantize:
        inner = _constant(node.input[0], inits, producers, through_dequantize, depth + 1)
        if inner is None:
            return None
        relative = _zero_relative_codes(node, inner[0], inits)
        return (relative, inner[1]) if relative is not None else None
    return None


def constant_b(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto],
               *, through_dequantize: bool = True) -> tuple[np.ndarray, onnx.TensorProto] | None:
    """The constant ``B [K, N]`` a ``MatMul`` / ``Gemm`` node multiplies by and the tensor holding it (None when
    ``B`` is not a 2-D constant): see :func:`_constant` (a ``DequantizeLinear``'s codes come back minus their zero
    point, so the zeros are the entries that dequantize to 0); ``Gemm(transB=1)`` is undone. ExportError naming
    an initializer whose data cannot be read."""
    if len(node.input) < 2:
        return None
    found = _constant(node.input[1], inits, producers, through_dequantize)
    if found is None or found[0].ndim != 2:
        return None
    array, tensor = found
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        array = array.T
    return array, tensor


def onnx_weight_stats(path: str | Path) -> OnnxStats:
    """The constant MatMul / Gemm weights of the ONNX model at ``path`` (external data loaded from beside it).
    ExportError naming the file when it is not a readable ONNX model."""
    from sparsert.export.onnx_export import is_onnx_model  # noqa: PLC0415 - onnx_export is heavier

    p = Path(path)
    if not p.is_file() or not is_onnx_model(p):
        raise ExportError(f"{p}: not an ONNX model file")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # noqa: BLE001 - protobuf and external-data errors
        raise ExportError(f"{p}: cannot be read as an ONNX model ({str(exc).splitlines()[0] if str(exc) else exc})"
                          ) from None
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    stats = OnnxStats(str(p), metadata={k: v for k, v in ann.get_metadata(model).items() if k.startswith(ann.PREFIX)})
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        try:
            found = constant_b(node, inits, producers)
        except ExportError as exc:
            raise ExportError(f"{p}: {exc}") from None
        if found is None:
            continue
        array, tensor = found
        k, n = array.shape
        props = ann.get_metadata(node)
        stats.weights.append(OnnxWeight(
            node=node.name, op=node.op_type, initializer=tensor.name, k=k, n=n,
            storage=_STORAGE.get(tensor.data_type, onnx.TensorProto.DataType.Name(tensor.data_type).lower()),
            zeros=float((array == 0).mean()) if array.size else 0.0,
            is_2_4=ann.is_nm_along_axis(array, 2, 4, axis=0),
            layer=props.get(ann.KEY_LAYER), annotated=props.get(ann.KEY_PATTERN)))
    try:
        ann.verify_sparsity_annotations(model)
    except ExportError as exc:
        stats.annotation_error = str(exc)
    return stats


def format_onnx_stats(stats: OnnxStats) -> str:
    width = max([len(w.layer or w.node or w.initializer) for w in stats.weights] + [15])
    lines = [f"{stats.path}: {len(stats.weights)} MatMul/Gemm weights are constants", "",
             f"{'layer (or node)':<{width}} {'op':>6} {'B [K, N]':>14} {'storage':>8} {'zeros':>7} {'2:4':>4} "
             f"{'annotated':>9}"]
    for w in stats.weights:
        name = w.layer or w.node or w.initializer
        lines.append(f"{name:<{width}} {w.op:>6} {f'{w.k}x{w.n}':>14} {w.storage:>8} {w.zeros:>7.1%} "
                     f"{'yes' if w.is_2_4 else 'no':>4} {w.annotated or '-':>9}")
    eligible = sum(w.is_2_4 for w in stats.weights)
    lines += ["", f"{eligible} of {len(stats.weights)} weights are 2:4 along K (axis 0 of B: what TensorRT's "
                  f"SPARSE_WEIGHTS runs on sparse tensor cores), {stats.sparse_share:.1%} of the weight entries"]
    if stats.annotation_error is not None:
        lines.append(f"warning: the sparsity annotations disagree with the values: {stats.annotation_error}")
    elif any(w.annotated for w in stats.weights):
        lines.append("sparsert's sparsity annotations agree with the values")
    return "\n".join(lines)


def onnx_stats_json(stats: OnnxStats) -> str:
    return json.dumps({**asdict(stats), "sparse_share": stats.sparse_share}, indent=1)
