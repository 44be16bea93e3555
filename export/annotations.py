"""sparsert's sparsity annotation convention for ONNX models (there is no standard one).

ONNX IR version 10 added ``metadata_props`` (a list of string key/value pairs, ``StringStringEntryProto``)
to ``NodeProto`` and ``TensorProto`` besides ``ModelProto``; onnx 1.23 has them on all three. sparsert writes:

Model level (``ModelProto.metadata_props``):

=====================================  =======================================================================
key                                    value
=====================================  =======================================================================
``sparsert.format_version``            ``"1"`` — version of this convention
``sparsert.sparsity.pattern``          ``"2:4"`` or ``"none"``
``sparsert.sparsity.axis``             ``"0"`` — the axis of MatMul input B (``[K, N]``) along which groups run
``sparsert.quantization``              ``"int4"`` or ``"none"``
``sparsert.quantization.group_size``   group size along K as a decimal string (INT4 only)
``sparsert.model_config``              JSON of the model's ``ModelConfig.to_dict()``
``sparsert.kv_cache``                  ``"1"`` when the graph has ``past_*``/``present_*`` tensors, else ``"0"``
``sparsert.weights_sha256``            sha256 (64 lowercase hex digits) of the bytes of the artifact's
                                       ``model.safetensors`` the graph was exported from; ``generate --onnx``
                                       refuses a graph whose digest differs from the artifact's (exports made
                                       before this key existed lack it and run with a warning)
``sparsert.hf_model_type``            the transformers ``model_type`` of a Hugging Face directory's export
                                       (:mod:`sparsert.export.hf_export`), which has no
                                       ``sparsert.model_config``; its ``sparsert.weights_sha256`` hashes the
                                       directory's weights files
=====================================  =======================================================================

On every MatMul node whose B input is a linear weight of a transformer block, and on that weight's initializer
(the float ``[K, N]`` weight, or the INT4 ``[K, N]`` codes that feed a blocked ``DequantizeLinear``):

=====================================  =======================================================================
``sparsert.layer``                     source layer name in the artifact, e.g. ``"blocks.0.attn.q_proj"``
``sparsert.weight``                    name of the weight initializer (on the node only)
``sparsert.sparsity.pattern``          ``"2:4"`` — for every column n, every M consecutive rows along the axis
                                       hold at least M-N zeros (TensorRT's sparse-weight rule); absent for a
                                       linear the artifact stores dense
``sparsert.sparsity.axis``             ``"0"`` (with the pattern)
``sparsert.quantization.bits``         ``"4"`` (INT4 only)
``sparsert.quantization.group_size``   block size along axis 0 = the DequantizeLinear ``block_size`` (INT4 only)
``sparsert.quantization.scale``        name of the scale initializer ``[K/g, N]`` (INT4 only)
=====================================  =======================================================================

SLoRB terms (AST's ``y += S · groupsum_k(x)``, exported as ``Reshape [.., K/k, k] -> ReduceSum(axis=-1) ->
MatMul(·, Sᵀ [K/k, N]) -> Add``): the model gets ``sparsert.slorb.k`` (the group size ``k``, only when some
layer has SLoRB), and the term's MatMul node and its ``Sᵀ`` initializer get

=====================================  =======================================================================
``sparsert.slorb.layer``               the linear the term belongs to, e.g. ``"blocks.0.mlp.up_proj"``
``sparsert.slorb.k``                   group size ``k``
``sparsert.weight``                    name of the ``Sᵀ`` initializer (on the node only)
=====================================  =======================================================================

These nodes carry no ``sparsert.layer`` key, so :func:`read_sparsity_annotations` does not list them (the
SLoRB weight is dense); :func:`read_slorb_annotations` reads them back.

The annotation is informational: TensorRT detects 2:4 by inspecting the weight values, so the zeros must be
really there. :func:`verify_sparsity_annotations` checks that they are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sparsert.runtime.errors import ExportError

PREFIX = "sparsert."
FORMAT_VERSION = "1"

KEY_FORMAT_VERSION = "sparsert.format_version"
KEY_PATTERN = "sparsert.sparsity.pattern"
KEY_AXIS = "sparsert.sparsity.axis"
KEY_QUANTIZATION = "sparsert.quantization"
KEY_BITS = "sparsert.quantization.bits"
KEY_GROUP_SIZE = "sparsert.quantization.group_size"
KEY_SCALE = "sparsert.quantization.scale"
KEY_LAYER = "sparsert.layer"
KEY_WEIGHT = "sparsert.weight"
KEY_MODEL_CONFIG = "sparsert.model_config"
KEY_KV_CACHE = "sparsert.kv_cache"
KEY_WEIGHTS_SHA256 = "sparsert.weights_sha256"
KEY_SLORB_LAYER = "sparsert.slorb.layer"
KEY_SLORB_K = "sparsert.slorb.k"
KEY_HF_MODEL_TYPE = "sparsert.hf_model_type"


def set_metadata(proto: onnx.ModelProto | onnx.NodeProto | onnx.TensorProto, props: Mapping[str, str]) -> None:
    """Set (add or overwrite) string key/value pairs in ``proto.metadata_props``."""
    existing = {entry.key: entry for entry in proto.metadata_props}
    for key, value in props.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata value for {key!r} must be str, got {type(value).__name__}")
        if key in existing:
            existing[key].value = value
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value


def get_metadata(proto: onnx.ModelProto | onnx.NodeProto | onnx.TensorProto) -> dict[str, str]:
    """``proto.metadata_props`` as a dict."""
    return {entry.key: entry.value for entry in proto.metadata_props}


def model_annotations(
    *,
    pattern: str | None,
    quantization: str | None,
    group_size: int | None,
    model_config: Mapping | None,
    kv_cache: bool,
    slorb_k: int | None = None,
    weights_sha256: str | None = None,
) -> dict[str, str]:
    """Model-level properties of the convention; ``pattern``/``quantization`` None mean ``"none"``;
    ``slorb_k`` adds ``sparsert.slorb.k`` (SLoRB group size); ``weights_sha256`` adds
    ``sparsert.weights_sha256`` (see :func:`artifact_weights_sha256`)."""
    props = {
        KEY_FORMAT_VERSION: FORMAT_VERSION,
        KEY_PATTERN: pattern or "none",
        KEY_QUANTIZATION: quantization or "none",
        KEY_KV_CACHE: "1" if kv_cache else "0",
    }
    if pattern:
        props[KEY_AXIS] = "0"
    if quantization and group_size is not None:
        props[KEY_GROUP_SIZE] = str(group_size)
    if model_config is not None:
        props[KEY_MODEL_CONFIG] = json.dumps(dict(model_config), sort_keys=True)
    if slorb_k is not None:
        props[KEY_SLORB_K] = str(slorb_k)
    if weights_sha256 is not None:
        props[KEY_WEIGHTS_SHA256] = weights_sha256
    return props


def artifact_weights_sha256(artifact_dir: str | Path) -> str:
    """sha256 (lowercase hex) of the bytes of ``<artifact_dir>/model.safetensors``, read in 1 MiB chunks.

    This is what ``sparsert.weights_sha256`` records: it identifies the weights a graph was exported from, so
    ``generate --onnx`` can tell an export of this artifact from one of another artifact with the same model
    config. ExportError naming the file when it cannot be read.
    """
    from sparsert.runtime.artifact import WEIGHTS_NAME  # noqa: PLC0415 - keeps this module free of torch

    return files_sha256([Path(artifact_dir) / WEIGHTS_NAME])


def files_sha256(files: Sequence[str | Path]) -> str:
    """sha256 (lowercase hex) of the bytes of ``files`` one after the other, read in 1 MiB chunks (one file:
    that file's sha256). ExportError naming the file that cannot be read."""
    digest = hashlib.sha256()
    for file in files:
        try:
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError as exc:
            raise ExportError(f"cannot read {file} to compute its sha256: {exc.strerror or exc}") from None
    return digest.hexdigest()


def slorb_annotations(layer: str, k: int) -> dict[str, str]:
    """Properties for one SLoRB term's ``Sᵀ`` initializer (and, with ``sparsert.weight``, its MatMul node)."""
    return {KEY_SLORB_LAYER: layer, KEY_SLORB_K: str(k)}


def weight_annotations(
    layer: str, *, pattern: str | None = "2:4", group_size: int | None = None, scale: str | None = None
) -> dict[str, str]:
    """Properties for one linear weight initializer (and, with ``sparsert.weight`` added, its MatMul node).

    ``pattern`` None (a linear the artifact stores dense) leaves out the sparsity keys; ``group_size`` set
    marks an INT4 weight.
    """
    props = {KEY_LAYER: layer}
    if pattern is not None:
        props[KEY_PATTERN] = pattern
        props[KEY_AXIS] = "0"
    if group_size is not None:
        props[KEY_BITS] = "4"
        props[KEY_GROUP_SIZE] = str(group_size)
        if scale is not None:
            props[KEY_SCALE] = scale
    return props


def annotate_model(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    set_metadata(model, props)


def annotate_weight(
    node: onnx.NodeProto, initializer: onnx.TensorProto, props: Mapping[str, str]
) -> None:
    """Write ``props`` onto the weight initializer, and ``props`` + ``sparsert.weight`` onto the MatMul node."""
    set_metadata(initializer, props)
    set_metadata(node, {**props, KEY_WEIGHT: initializer.name})


def _parse_pattern(text: str, where: str) -> tuple[int, int]:
    try:
        n_str, m_str = text.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise ExportError(f"{where}: sparsity pattern {text!r} is not of the form 'N:M'") from None
    if not 0 < n < m:
        raise ExportError(f"{where}: sparsity pattern {text!r} needs 0 < N < M")
    return n, m


def _annotated_initializer(node: onnx.NodeProto, props: Mapping[str, str], inits: Mapping[str, onnx.TensorProto],
                           what: str, keys: tuple[str, ...]) -> str:
    """The name of the initializer an annotated node names in ``sparsert.weight``; ExportError naming the node
    when it is not in the graph or when node and initializer disagree on one of ``keys``."""
    where = f"node {node.name!r}"
    weight = props.get(KEY_WEIGHT)
    if weight is None or weight not in inits:
        raise ExportError(f"{where}: annotated {what} initializer {weight!r} is not in the graph")
    init_props = get_metadata(inits[weight])
    for key in keys:
        if props.get(key) != init_props.get(key):
            raise ExportError(
                f"{where}: annotation {key}={props.get(key)!r} disagrees with initializer {weight!r} "
                f"({init_props.get(key)!r})"
            )
    return weight


def _int_property(props: Mapping[str, str], key: str, where: str) -> int | None:
    if key not in props:
        return None
    try:
        return int(props[key])
    except ValueError:
        raise ExportError(f"{where}: annotation {key}={props[key]!r} is not an integer") from None


def read_sparsity_annotations(model: onnx.ModelProto) -> dict:
    """Read the convention back.

    Returns ``{"model": {key: value, ...}, "layers": {layer: {...}}}``. ``model`` holds the model's
    ``sparsert.*`` properties (``sparsert.model_config`` decoded from JSON). ``layers`` has one entry per
    annotated MatMul node: ``node`` (node name), ``initializer`` (weight initializer name), ``pattern``
    (``"2:4"``, or None for a weight stored dense), ``axis`` (int or None), ``bits`` (4 or None),
    ``group_size`` (int or None) and ``scale`` (scale initializer name or None).
    Raises ExportError when a node and its initializer disagree or an annotated initializer is missing.
    """
    model_props = {k: v for k, v in get_metadata(model).items() if k.startswith(PREFIX)}
    if KEY_MODEL_CONFIG in model_props:
        try:
            model_props[KEY_MODEL_CONFIG] = json.loads(model_props[KEY_MODEL_CONFIG])
        except ValueError:
            raise ExportError(f"model metadata {KEY_MODEL_CONFIG} is not valid JSON") from None
    inits = {init.name: init for init in model.graph.initializer}
    layers: dict[str, dict] = {}
    for node in model.graph.node:
        props = get_metadata(node)
        if KEY_LAYER not in props:
            continue
        where = f"node {node.name!r}"
        layer = props[KEY_LAYER]
        weight = _annotated_initializer(node, props, inits, "weight",
                                        (KEY_PATTERN, KEY_AXIS, KEY_LAYER, KEY_BITS, KEY_GROUP_SIZE))
        if layer in layers:
            raise ExportError(f"{where}: layer {layer!r} is annotated on two nodes")
        if KEY_PATTERN in props:
            _parse_pattern(props[KEY_PATTERN], where)
        layers[layer] = {
            "node": node.name,
            "initializer": weight,
            "pattern": props.get(KEY_PATTERN),
            "axis": _int_property(props, KEY_AXIS, where),
            "bits": _int_property(props, KEY_BITS, where),
            "group_size": _int_property(props, KEY_GROUP_SIZE, where),
            "scale": props.get(KEY_SCALE),
        }
    return {"model": model_props, "layers": layers}


def int4_codes_from_tensor(tensor: onnx.TensorProto) -> np.ndarray:
    """Decode an ONNX INT4 initializer (two per byte, first element in the low nibble) to int8 codes."""
    if tensor.data_type != onnx.TensorProto.INT4:
        raise ExportError(f"initializer {tensor.name!r}: expected INT4 data, got {tensor.data_type}")
    return numpy_helper.to_array(tensor).astype(np.int8)


def is_nm_along_axis(array: np.ndarray, n: int, m: int, axis: int) -> bool:
    """True iff every run of ``m`` consecutive entries along ``axis`` (for every other index) holds
    at most ``n`` non-zeros. The axis length must be a multiple of ``m``."""
    a = np.moveaxis(np.asarray(array), axis, 0)
    if a.shape[0] % m:
        return False
    groups = a.reshape(a.shape[0] // m, m, *a.shape[1:])
    return bool(((groups != 0).sum(axis=1) <= n).all())


def verify_sparsity_annotations(model: onnx.ModelProto) -> dict[str, dict]:
    """Check that every initializer annotated with a pattern really has it along its axis.

    Float weights are checked as stored; INT4 weights by their codes (a zero code dequantizes to 0 with a
    zero point of 0). Returns the ``layers`` dict of :func:`read_sparsity_annotations`; raises ExportError
    naming the first initializer that violates its annotation.
    """
    ann = read_sparsity_annotations(model)
    inits = {init.name: init for init in model.graph.initializer}
    for layer, info in ann["layers"].items():
        tensor = inits[info["initializer"]]
        if info["bits"] is not None and tensor.data_type != onnx.TensorProto.INT4:
            raise ExportError(f"initializer {tensor.name!r} ({layer}) is annotated INT4 but is not INT4 data")
        if info["pattern"] is None:
            continue
        n, m = _parse_pattern(info["pattern"], f"initializer {tensor.name!r}")
        if tensor.data_type == onnx.TensorProto.INT4:
            array = int4_codes_from_tensor(tensor)
        else:
            array = numpy_helper.to_array(tensor)
        if array.ndim != 2 or info["axis"] is None or not 0 <= info["axis"] < array.ndim:
            raise ExportError(
                f"initializer {tensor.name!r} ({layer}): expected a 2-D [K, N] weight with axis "
                f"{info['axis']}, got shape {list(array.shape)}"
            )
        if not is_nm_along_axis(array, n, m, info["axis"]):
            raise ExportError(
                f"initializer {tensor.name!r} ({layer}) is annotated {info['pattern']} along axis "
                f"{info['axis']} but its values are not (shape {list(array.shape)})"
            )
    return ann["layers"]


def read_slorb_annotations(model: onnx.ModelProto) -> dict[str, dict]:
    """The SLoRB terms of an exported graph: ``{layer: {"node", "initializer", "k"}}``.

    Checks each annotated MatMul against its ``Sᵀ`` initializer: both name the same layer and ``k``, and the
    initializer is a 2-D float ``[K/k, N]``. ExportError naming the node otherwise, or when a layer is
    annotated twice.
    """
    inits = {init.name: init for init in model.graph.initializer}
    out: dict[str, dict] = {}
    for node in model.graph.node:
        props = get_metadata(node)
        if KEY_SLORB_LAYER not in props:
            continue
        where = f"node {node.name!r}"
        weight = _annotated_initializer(node, props, inits, "SLoRB", (KEY_SLORB_LAYER, KEY_SLORB_K))
        layer = props[KEY_SLORB_LAYER]
        if layer in out:
            raise ExportError(f"{where}: SLoRB of layer {layer!r} is annotated on two nodes")
        try:
            k = int(props[KEY_SLORB_K])
        except (KeyError, ValueError):
            raise ExportError(f"{where}: {KEY_SLORB_K} is {props.get(KEY_SLORB_K)!r}, expected an integer") from None
        dims = list(inits[weight].dims)
        if len(dims) != 2 or inits[weight].data_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"initializer {weight!r} ({layer}): expected a float [K/k, N] SLoRB weight, got {dims}")
        out[layer] = {"node": node.name, "initializer": weight, "k": k}
    return out
