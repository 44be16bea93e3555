"""The compressed artifact: a directory with ``config.json`` and ``model.safetensors`` (see docs/FORMAT.md).

``config.json`` describes the architecture (:class:`ModelConfig`), the tokenizer, which linears are 2:4 sparse
and which are INT4 quantized, the dtype of the dense tensors, and who produced the artifact.
``model.safetensors`` holds, for every *packed* linear ``<name>`` (a layer listed under ``sparsity.layers`` or
``quantization.layers``), the tensors of :meth:`PackedLinear.tensors` (``<name>.indices``, ``.values`` or
``.qweight`` + ``.scales``, ``.bias``), and every other tensor of the model's state dict dense under its
module name. Tensor names, shapes and dtypes follow from the config alone (:func:`expected_tensors`).
An optional ``slorb`` field (:class:`SLoRBInfo`) adds a SLoRB term (AST, Huang et al. 2025) to the listed
linears, its ``S [out, K/k]`` stored dense as ``<name>.slorb.S``; artifacts without it are unchanged.

:func:`save_artifact` validates what it is given, writes into a temporary sibling directory and renames it
into place, so a reader never sees a half-written artifact. :func:`load_artifact` validates everything and
raises one :class:`ArtifactError` naming the file/tensor and what was expected for the *first* problem.
:meth:`Artifact.build_model` is the PyTorch reference path: a float32 :class:`DecoderLM` holding the
decompressed (and dequantized) weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sparsert
from sparsert.runtime.errors import ArtifactError, ConfigError, SparsertError, require_path
from sparsert.runtime.fileio import foreign_entry, replace_dir
from sparsert.runtime.model import DecoderLM, ModelConfig, add_slorb, sparse_linear_names
from sparsert.runtime.packed_linear import PackedLinear
from sparsert.runtime.sparse24 import packed_indices_width, validate_indices_24
from sparsert.runtime.tokenizer import Tokenizer, tokenizer_from_dict

FORMAT = "sparsert-artifact"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INT4_METHOD = "int4-symmetric-group"

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()} | {torch.uint8: "uint8"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the names used in config.json and in error messages)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class SparsityInfo:
    """``config.json["sparsity"]``: which linears are stored 2:4 compressed (groups of four along K)."""

    layers: tuple[str, ...]
    pattern: str = "2:4"
    n: int = 2
    m: int = 4
    axis: str = "in_features"

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "n": self.n, "m": self.m, "axis": self.axis, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: object, where: str = "sparsity") -> SparsityInfo:
        """Parse and validate; only the 2:4 pattern along ``in_features`` is part of format version 1."""
        d = _object(d, where)
        _keys(d, where, {"pattern", "n", "m", "axis", "layers"})
        expected = {"pattern": "2:4", "n": 2, "m": 4, "axis": "in_features"}
        for key, value in expected.items():
            if d[key] != value or type(d[key]) is not type(value):
                raise ArtifactError(f"{where}.{key}: expected {value!r}, got {d[key]!r}")
        return cls(layers=_layer_list(d["layers"], f"{where}.layers"))


@dataclass(frozen=True)
class QuantizationInfo:
    """``config.json["quantization"]``: which linears are INT4 quantized (symmetric, groups along K).

    A group covers ``group_size`` columns of the original K; for 2:4 layers that is ``group_size / 2`` kept
    values. Scales are ``absmax / 7`` rounded to fp16 (see :mod:`sparsert.runtime.int4`).
    """

    layers: tuple[str, ...]
    group_size: int = 128
    method: str = INT4_METHOD
    bits: int = 4
    scale_dtype: str = "float16"

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "scale_dtype": self.scale_dtype,
            "layers": list(self.layers),
        }

    @classmethod
    def from_dict(cls, d: object, where: str = "quantization") -> QuantizationInfo:
        d = _object(d, where)
        _keys(d, where, {"method", "bits", "group_size", "scale_dtype", "layers"})
        for key, value in {"method": INT4_METHOD, "bits": 4, "scale_dtype": "float16"}.items():
            if d[key] != value or type(d[key]) is not type(value):
                raise ArtifactError(f"{where}.{key}: expected {value!r}, got {d[key]!r}")
        g = d["group_size"]
        if type(g) is not int or g <= 0:
            raise ArtifactError(f"{where}.group_size: expected a positive integer, got {g!r}")
        return cls(layers=_layer_list(d["layers"], f"{where}.layers"), group_size=g)


@dataclass(frozen=True)
class SLoRBInfo:
    """``config.json["slorb"]`` (optional): the listed linears compute ``y = x Wᵀ (+ b) + S · groupsum_k(x)``.

    SLoRB of AST (Huang et al., "Pruning Large Language Models with Semi-Structural Adaptive Sparse
    Training", AAAI 2025, §3.4): ``groupsum_k`` sums each group of ``k`` consecutive inputs; ``S [out, K/k]`` is
    stored dense (``dense_dtype``) as ``<name>.slorb.S``. ``k`` divides every listed layer's K.
    """

    k: int
    layers: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"k": self.k, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: object, where: str = "slorb") -> SLoRBInfo:
        d = _object(d, where)
        _keys(d, where, {"k", "layers"})
        k = d["k"]
        if type(k) is not int or k <= 0:
            raise ArtifactError(f"{where}.k: expected a positive integer, got {k!r}")
        return cls(k=k, layers=_layer_list(d["layers"], f"{where}.layers"))


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)} {list(self.shape)}"


@dataclass
class Artifact:
    """A loaded, validated artifact.

    ``packed`` maps each packed linear (listed under ``sparsity.layers`` or ``quantization.layers``) to its
    :class:`PackedLinear` (bias included); ``dense`` holds every other tensor of the model's state dict, in
    ``dense_dtype`` (embeddings, norms, ``lm_head``, position embeddings, linears left uncompressed, SLoRB
    ``<name>.slorb.S`` [out, K/k] when ``slorb`` is set).
    """

    path: Path
    model_config: ModelConfig
    tokenizer: Tokenizer
    packed: dict[str, PackedLinear]
    dense: dict[str, torch.Tensor]
    sparsity: SparsityInfo | None
    quantization: QuantizationInfo | None
    dense_dtype: torch.dtype
    producer: dict = field(default_factory=dict)
    slorb: SLoRBInfo | None = None  # SLoRB terms; their S tensors are in ``dense`` as ``<name>.slorb.S``

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's float32 state dict with every packed weight decompressed and dequantized."""
        sd: dict[str, torch.Tensor] = {}
        for name, layer in self.packed.items():
            sd[f"{name}.weight"] = layer.to_dense()
            if layer.bias is not None:
                sd[f"{name}.bias"] = layer.bias.float()
        for name, t in self.dense.items():
            sd[name] = t.float() if t.is_floating_point() else t
        return sd

    def build_model(self) -> DecoderLM:
        """A float32 :class:`DecoderLM` in eval mode holding the decompressed weights (the reference path).

        ArtifactError naming ``config.json``'s ``max_seq_len`` when the model cannot be allocated: every weight
        was checked against ``model.safetensors`` at load, but the RoPE tables [max_seq_len, head_dim] of a
        llama model depend on ``max_seq_len`` alone."""
        # Built on the CPU rather than the meta device: the RoPE tables are non-persistent buffers that the
        # constructor computes and the state dict does not carry.
        try:
            model = DecoderLM(self.model_config)
        except (RuntimeError, MemoryError) as exc:
            text = str(exc).strip()
            if not isinstance(exc, MemoryError) and "alloc" not in text and "overflow" not in text:
                raise
            c = self.model_config
            first = text.splitlines()[0] if text else type(exc).__name__
            raise ArtifactError(
                f"{self.path / CONFIG_NAME}: cannot build the model in memory (max_seq_len={c.max_seq_len}, "
                f"d_model={c.d_model}, n_layers={c.n_layers}): {first[:200]}"
            ) from None
        if self.slorb is not None:
            add_slorb(model, self.slorb.layers, self.slorb.k)
        model.load_state_dict(self.state_dict(), strict=True, assign=True)
        return model.float().eval()


# ----------------------------------------------------------------------------------------------------------
# Expected contents


def model_state_shapes(config: ModelConfig, slorb: SLoRBInfo | None = None) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of ``DecoderLM(config)`` (with ``slorb``'s terms added: ``<name>.slorb.S``
    [out, K/k] after the layer's weight and bias), from a model on the meta device (no memory)."""
    key = json.dumps([config.to_dict(), slorb.to_dict() if slorb else None], sort_keys=True)
    if key not in _SHAPES_CACHE:
        try:
            with torch.device("meta"):
                model = DecoderLM(config)
                if slorb is not None:
                    add_slorb(model, slorb.layers, slorb.k)
        except RuntimeError as exc:  # sizes whose element counts overflow int64 (absurd config values)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"model config sizes are too large to describe a model ({first})") from None
        _SHAPES_CACHE[key] = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return _SHAPES_CACHE[key]


_SHAPES_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def expected_tensors(
    model_config: ModelConfig,
    sparsity: SparsityInfo | None,
    quantization: QuantizationInfo | None,
    dense_dtype: torch.dtype,
    slorb: SLoRBInfo | None = None,
) -> dict[str, TensorSpec]:
    """Every tensor ``model.safetensors`` must hold, in state-dict order, with its shape and dtype.

    For a linear ``<name>`` with weight [out, K] and INT4 group size g:

    - 2:4: ``<name>.indices`` uint8 [out, ceil(K/8)];
      then ``<name>.values`` dense_dtype [out, K/2], or with INT4 ``<name>.qweight`` uint8 [out, K/4] and
      ``<name>.scales`` float16 [out, K/g];
    - INT4 without 2:4: ``<name>.qweight`` uint8 [out, K/2] and ``<name>.scales`` float16 [out, K/g];
    - a packed linear's bias ``<name>.bias`` float32 [out];
    - with ``slorb``: ``<name>.slorb.S`` dense_dtype [out, K/k] for each listed layer;
    - everything else (including linears that are neither) dense under its state-dict name, in dense_dtype.
    """
    sparse = set(sparsity.layers) if sparsity else set()
    quant = set(quantization.layers) if quantization else set()
    shapes = model_state_shapes(model_config, slorb)
    specs: dict[str, TensorSpec] = {}
    for key, shape in shapes.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in sparse and prefix not in quant:
            specs[key] = TensorSpec(shape, dense_dtype)
        elif leaf == "bias":
            specs[key] = TensorSpec(shape, torch.float32)
        else:
            out, k = shape
            if prefix in sparse:
                specs[f"{prefix}.indices"] = TensorSpec((out, packed_indices_width(k)), torch.uint8)
            if prefix in quant:
                stored = k // 2 if prefix in sparse else k
                specs[f"{prefix}.qweight"] = TensorSpec((out, (stored + 1) // 2), torch.uint8)
                specs[f"{prefix}.scales"] = TensorSpec((out, k // quantization.group_size), torch.float16)
            else:
                specs[f"{prefix}.values"] = TensorSpec((out, k // 2), dense_dtype)
    return specs


# ----------------------------------------------------------------------------------------------------------
# Validation shared by save and load


def _object(d: object, where: str) -> dict:
    if not isinstance(d, dict):
        raise ArtifactError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return d


def _keys(d: dict, where: str, required: set[str], optional: set[str] = frozenset()) -> None:
    missing = sorted(required - set(d))
    if missing:
        raise ArtifactError(f"{where}: missing field '{missing[0]}'")
    unknown = sorted(set(d) - required - optional)
    if unknown:
        raise ArtifactError(f"{where}: unknown field '{unknown[0]}'")


def _layer_list(layers: object, where: str) -> tuple[str, ...]:
    if not isinstance(layers, (list, tuple)) or not all(isinstance(x, str) for x in layers):
        raise ArtifactError(f"{where}: expected a list of layer names")
    seen = set()
    for name in layers:
        if name in seen:
            raise ArtifactError(f"{where}: layer '{name}' is listed twice")
        seen.add(name)
    return tuple(layers)


def _check_layers(
    config: ModelConfig,
    sparsity: SparsityInfo | None,
    quantization: QuantizationInfo | None,
    where: str,
    slorb: SLoRBInfo | None = None,
) -> None:
    known = sparse_linear_names(config)
    shapes = model_state_shapes(config)
    lists = ((slorb, "slorb", "leave out the slorb field for no SLoRB"),
             (sparsity, "sparsity", "use null for no sparsity"),
             (quantization, "quantization", "use null for no quantization"))
    for info, key, hint in lists:
        if info is None:
            continue
        if not info.layers:
            raise ArtifactError(f"{where}: {key}.layers is empty ({hint})")
        for name in info.layers:
            if name not in known:
                raise ArtifactError(
                    f"{where}: {key}.layers names '{name}', which is not a sparse linear of this model "
                    f"(expected names like '{known[0]}')"
                )
            k = shapes[f"{name}.weight"][1]
            if key == "slorb" and k % info.k:
                raise ArtifactError(f"{where}: slorb.k {info.k} does not divide K={k} of layer '{name}'")
            if key == "sparsity" and k % 4:
                raise ArtifactError(f"{where}: layer '{name}' has K={k}, not divisible by 4 as 2:4 needs")
            if key == "quantization":
                g = info.group_size
                if k % g:
                    raise ArtifactError(
                        f"{where}: quantization.group_size {g} does not divide K={k} of layer '{name}'"
                    )
                if sparsity is not None and name in sparsity.layers and g % 4:
                    raise ArtifactError(
                        f"{where}: quantization.group_size {g} must be a multiple of 4 for the 2:4 layer '{name}'"
                    )


def _check_tensors(
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    sparsity: SparsityInfo | None,
    quantization: QuantizationInfo | None,
    dense_dtype: torch.dtype,
    where: str,
    slorb: SLoRBInfo | None = None,
) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
    """Check names, shapes, dtypes and contents; split into (packed layers, dense tensors)."""
    specs = expected_tensors(config, sparsity, quantization, dense_dtype, slorb)
    for name, spec in specs.items():
        if name not in tensors:
            raise ArtifactError(f"{where}: missing tensor '{name}' (expected {spec})")
    extra = [name for name in tensors if name not in specs]
    if extra:
        raise ArtifactError(f"{where}: unexpected tensor '{sorted(extra)[0]}' (not part of this model/config)")
    for name, spec in specs.items():
        t = tensors[name]
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            got = f"{dtype_name(t.dtype)} {list(t.shape)}"
            raise ArtifactError(f"{where}: tensor '{name}' is {got}, expected {spec}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{where}: tensor '{name}' holds non-finite values (NaN or Inf)")
        if name.endswith(".scales") and bool((t < 0).any()):
            raise ArtifactError(f"{where}: tensor '{name}' holds negative scales (expected absmax/7 >= 0)")

    layers = list(dict.fromkeys((sparsity.layers if sparsity else ()) + (quantization.layers if quantization else ())))
    shapes = model_state_shapes(config)
    packed: dict[str, PackedLinear] = {}
    for name in sparse_linear_names(config):
        if name not in layers:
            continue
        out, k = shapes[f"{name}.weight"]
        if sparsity is not None and name in sparsity.layers:
            try:
                validate_indices_24(tensors[f"{name}.indices"], k, name=f"tensor '{name}.indices'")
            except SparsertError as exc:
                raise ArtifactError(f"{where}: {exc}") from None
        g = quantization.group_size if quantization is not None and name in quantization.layers else None
        packed[name] = PackedLinear.from_tensors(name, tensors, out, k, g)
    owned = {n for name in packed for n in packed[name].tensors(name)}
    dense = {name: tensors[name] for name in specs if name not in owned}
    return packed, dense


# ----------------------------------------------------------------------------------------------------------
# Saving


def is_artifact_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` declares the sparsert artifact format (cheap: the
    rest of the artifact is not validated)."""
    return Path(path).is_dir() and _is_artifact_dir(Path(path))


def _is_artifact_dir(path: Path) -> bool:
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def is_hf_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` is a Hugging Face model config (a ``model_type`` or
    ``architectures`` key and no sparsert ``format``; cheap: nothing else is read)."""
    try:
        config = json.loads((Path(path) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and _is_hf_config(config)


def _is_hf_config(config: dict) -> bool:
    return config.get("format") is None and ("model_type" in config or "architectures" in config)


def _check_target(path: Path) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir() or path.is_symlink():
        raise ArtifactError(f"refusing to overwrite {path}: it exists and is not an artifact directory")
    if any(path.iterdir()) and not _is_artifact_dir(path):
        raise ArtifactError(
            f"refusing to overwrite {path}: the directory is not empty and is not a sparsert artifact "
            f"(no {CONFIG_NAME} with format '{FORMAT}')"
        )
    foreign = foreign_entry(path, frozenset({CONFIG_NAME, WEIGHTS_NAME}))
    if foreign is not None:
        raise ArtifactError(f"refusing to overwrite {path}: it holds {foreign}, which is not part of a sparsert "
                            "artifact (replacing the artifact would delete it); move it out or choose another path")


def _as_dtype(value: torch.dtype | str, what: str) -> torch.dtype:
    if isinstance(value, str):
        if value not in DTYPES:
            raise ArtifactError(f"{what}: expected one of {', '.join(DTYPES)}, got {value!r}")
        return DTYPES[value]
    if not isinstance(value, torch.dtype) or value not in _DTYPE_NAMES or value == torch.uint8:
        raise ArtifactError(f"{what}: expected torch.float32 or torch.float16, got {value!r}")
    return value


def _storable(t: torch.Tensor, dtype: torch.dtype | None, seen: set[int]) -> torch.Tensor:
    t = t.detach().to("cpu", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    t = t.contiguous()
    # safetensors refuses tensors that share storage or view part of a larger one.
    if t.untyped_storage().data_ptr() in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    seen.add(t.untyped_storage().data_ptr())
    return t


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_artifact(
    path: str | Path,
    *,
    model_config: ModelConfig,
    tokenizer: Tokenizer,
    packed: dict[str, PackedLinear],
    dense: dict[str, torch.Tensor],
    sparsity: SparsityInfo | None,
    quantization: QuantizationInfo | None,
    producer: dict | None = None,
    dense_dtype: torch.dtype | str = torch.float32,
    slorb: SLoRBInfo | None = None,
) -> Path:
    """Write an artifact directory at ``path`` and return it.

    Args:
        packed: the packed linears by module name (from :func:`pack_linear`); their set must equal the union
            of ``sparsity.layers`` and ``quantization.layers``. Unquantized 2:4 values are cast to
            ``dense_dtype``; biases are stored as float32.
        dense: every other state-dict tensor of the model under its name; floating tensors are cast to
            ``dense_dtype`` (float32 or float16).
        producer: extra provenance (e.g. ``{"source": {"checkpoint": ..., "step": ...}}``); the sparsert
            version is added.
        slorb: SLoRB terms of the listed layers; each ``S`` comes through ``dense`` as ``<name>.slorb.S``
            [out, K/k] and is stored in ``dense_dtype``. None (default) writes no ``slorb`` field.
    Raises:
        ArtifactError when the inputs do not form a valid artifact (the same checks as :func:`load_artifact`),
        or when ``path`` exists and is not an artifact directory (an existing artifact is replaced).
    Nothing is left at ``path`` (nor in a temporary directory) when writing fails.
    """
    path = Path(path)
    dense_dtype = _as_dtype(dense_dtype, "dense_dtype")
    where = f"artifact {path}"
    _check_layers(model_config, sparsity, quantization, where, slorb)
    layers = set(sparsity.layers if sparsity else ()) | set(quantization.layers if quantization else ())
    if set(packed) != layers:
        odd = sorted(set(packed) ^ layers)[0]
        raise ArtifactError(
            f"{where}: packed layer '{odd}' " + ("is not listed in sparsity/quantization layers" if odd in packed
                                               else "is listed in sparsity/quantization layers but not given")
        )
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in packed.items():
        for key, t in layer.tensors(name).items():
            leaf = key.rpartition(".")[2]
            dtype = dense_dtype if leaf in ("values", "weight") else torch.float32 if leaf == "bias" else None
            tensors[key] = _storable(t, dtype, seen)
    for key, t in dense.items():
        if key in tensors:
            raise ArtifactError(f"{where}: tensor '{key}' is given both in packed and in dense")
        # A packed layer's bias may come through ``dense`` (PackedLinear without bias); it is stored float32.
        dtype = torch.float32 if key.endswith(".bias") and key.rpartition(".")[0] in layers else dense_dtype
        tensors[key] = _storable(t, dtype, seen)
    _check_tensors(tensors, model_config, sparsity, quantization, dense_dtype, where, slorb)

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_config.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "sparsity": sparsity.to_dict() if sparsity else None,
        "quantization": quantization.to_dict() if quantization else None,
        "dense_dtype": dtype_name(dense_dtype),
        "producer": {"sparsert_version": sparsert.__version__, **(producer or {})},
    }
    if slorb is not None:  # optional: an artifact without SLoRB stays exactly as before
        config["slorb"] = slorb.to_dict()
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:  # name the artifact the caller asked for, not the hidden staging folder (chained)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "sparsert_format": FORMAT})
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            os.chmod(tmp / name, 0o644)
            _fsync(tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp creates it 0700
        _check_target(path)  # may have changed while we wrote
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------------------
# Loading


def read_config(path: str | Path) -> dict:
    """Read and validate ``<path>/config.json`` of an artifact; returns the parsed JSON object."""
    require_path(path, "artifact", "the path of an artifact directory", ArtifactError)
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"artifact {root} does not exist")
    if not root.is_dir():
        raise ArtifactError(f"artifact {root} is not a directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    file = root / CONFIG_NAME
    if not file.is_file():
        if (root / "artifact" / CONFIG_NAME).is_file():
            raise ArtifactError(f"{root} is not an artifact ({file} is missing); it looks like a training run "
                                f"directory: its artifact is {root / 'artifact'}")
        if (root / "state.json").is_file() or (root / "latest.json").is_file():  # a checkpoint step, checkpoints/
            raise ArtifactError(f"{root} is not an artifact ({file} is missing); it looks like a training "
                                f"checkpoint: make an artifact of it with: sparsert compress {root} -o ARTIFACT")
        raise ArtifactError(f"{file} is missing (not a sparsert artifact?)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file} is not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{file} cannot be read: {exc}") from None
    config = _object(config, str(file))
    if _is_hf_config(config):
        kind = config.get("model_type") or config.get("architectures")
        raise ArtifactError(
            f"{root} is a Hugging Face model directory ({CONFIG_NAME} has model_type/architectures {kind!r}), not "
            "a sparsert artifact: load it with transformers (AutoModelForCausalLM.from_pretrained) and serve its 2:4 "
            "linears with sparsert.runtime.linear_swap.swap_sparse_linears, or run it with sparsert generate; "
            "sparsert artifacts are the <run>/artifact directories of runs of the built-in models"
        )
    if config.get("format") != FORMAT:
        raise ArtifactError(f"{file}: unknown format {config.get('format')!r}, expected '{FORMAT}'")
    version = config.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:
        raise ArtifactError(
            f"{file}: unsupported format_version {version!r} (this sparsert reads version {FORMAT_VERSION})"
        )
    _keys(
        config,
        str(file),
        {"format", "format_version", "model", "tokenizer", "sparsity", "quantization", "dense_dtype"},
        {"producer", "slorb"},
    )
    return config


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def _safetensors_shapes(weights: Path) -> dict[str, list]:
    """Tensor name -> shape from a safetensors file's header (``safe_open`` maps the file and parses the header
    only; no tensor is read). ArtifactError when the header is unreadable."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:  # safetensors' SafetensorError, or OSError
        raise ArtifactError(f"{weights} is corrupt or truncated: {exc}") from None


def _blocks_text(blocks: set[int]) -> str:
    if not blocks:
        return "no blocks.* tensors"
    top = max(blocks)
    if len(blocks) == top + 1:
        return f"blocks 0..{top} ({top + 1} layer{'s' if top else ''})"
    shown = ", ".join(str(i) for i in sorted(blocks)[:8]) + (", ..." if len(blocks) > 8 else "")
    return f"blocks {shown} (not numbered 0..{len(blocks) - 1})"


def check_model_sizes(config: ModelConfig, shapes: dict[str, list], file: Path, weights: Path,
                      prefix: str = "model") -> None:
    """The size fields of ``config.json``'s model against the tensors ``model.safetensors`` holds (names and
    shapes from its header), before anything proportional to them is built: ``n_layers`` against the
    ``blocks.<i>.`` tensors, ``vocab_size`` and ``d_model`` against ``tok_emb.weight``, ``ffn_dim`` against the
    first block's ``mlp.up_proj`` (output rows, however it is stored), gpt2's ``max_seq_len`` against
    ``pos_emb.weight``. Everything else is checked tensor by tensor afterwards (:func:`_check_tensors`).
    ``file`` (the config's file, whose model object is ``prefix``) and ``weights`` are named in the
    ArtifactError. Training checkpoints, which use the same tensor names, are checked with it too
    (``sparsert.train.checkpoint``)."""
    blocks = {int(m.group(1)) for name in shapes if (m := _BLOCK_KEY.match(name))}
    n = config.n_layers
    if len(blocks) != n or max(blocks, default=-1) != n - 1:
        raise ArtifactError(f"{file}: {prefix}.n_layers={n} but {weights} holds {_blocks_text(blocks)}")

    def rows(name: str) -> int | None:
        shape = shapes.get(name)
        return shape[0] if isinstance(shape, list) and shape and isinstance(shape[0], int) else None

    emb = shapes.get("tok_emb.weight")  # missing or not 2-D: reported by the tensor check, in its words
    if isinstance(emb, list) and len(emb) == 2:
        for field_name, want, got in (("vocab_size", config.vocab_size, emb[0]),
                                      ("d_model", config.d_model, emb[1])):
            if got != want:
                raise ArtifactError(f"{file}: {prefix}.{field_name}={want} but {weights} holds tok_emb.weight {emb}")
    up = next((r for leaf in ("weight", "values", "qweight", "indices")
               if (r := rows(f"blocks.0.mlp.up_proj.{leaf}")) is not None), None)
    if up is not None and up != config.ffn_dim:
        raise ArtifactError(f"{file}: {prefix}.ffn_dim={config.ffn_dim} but {weights} holds blocks.0.mlp.up_proj "
                            f"with {up} output rows")
    pos = rows("pos_emb.weight")
    if config.arch == "gpt2" and pos is not None and pos != config.max_seq_len:
        raise ArtifactError(f"{file}: {prefix}.max_seq_len={config.max_seq_len} but {weights} holds pos_emb.weight "
                            f"with {pos} rows")


def load_artifact(path: str | Path) -> Artifact:
    """Load and validate an artifact directory; the first problem found raises :class:`ArtifactError`.

    Checks, in order: the directory and both files exist; config.json is valid JSON with the known format
    and format_version and well-formed fields; the listed layers are sparse linears of the model; the
    safetensors file is readable (not truncated); the model's size fields match the tensors its header lists
    (``n_layers``, ``vocab_size``, ``d_model``, ``ffn_dim``: checked before anything of those sizes is built);
    it holds exactly the expected tensor names with the
    expected shapes and dtypes; floating tensors are finite and scales non-negative; every indices tensor
    decodes to a valid 2:4 pattern.
    """
    config = read_config(path)  # before Path(): an empty path is refused, not read as the current directory
    root = Path(path)
    file = root / CONFIG_NAME
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (SparsertError, TypeError) as exc:
        raise ArtifactError(f"{file}: field 'model': {exc}") from None
    try:
        tokenizer = tokenizer_from_dict(config["tokenizer"])
    except SparsertError as exc:
        raise ArtifactError(f"{file}: field 'tokenizer': {exc}") from None
    if getattr(tokenizer, "vocab_size", None) != model_config.vocab_size:
        raise ArtifactError(
            f"{file}: tokenizer vocab_size {tokenizer.vocab_size} does not match model vocab_size "
            f"{model_config.vocab_size}"
        )
    sparsity = None if config["sparsity"] is None else SparsityInfo.from_dict(config["sparsity"], f"{file}: sparsity")
    quantization = (
        None
        if config["quantization"] is None
        else QuantizationInfo.from_dict(config["quantization"], f"{file}: quantization")
    )
    if not isinstance(config["dense_dtype"], str) or config["dense_dtype"] not in DTYPES:
        raise ArtifactError(
            f"{file}: dense_dtype: expected one of {', '.join(DTYPES)}, got {config['dense_dtype']!r}"
        )
    dense_dtype = DTYPES[config["dense_dtype"]]
    producer = config.get("producer", {})
    if not isinstance(producer, dict):
        raise ArtifactError(f"{file}: producer: expected a JSON object, got {type(producer).__name__}")
    slorb = None if config.get("slorb") is None else SLoRBInfo.from_dict(config["slorb"], f"{file}: slorb")
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing")
    # Before anything of the config's sizes is built (layer lists, shapes): n_layers=400000 must fail here, fast
    check_model_sizes(model_config, _safetensors_shapes(weights), file, weights)
    try:
        model_state_shapes(model_config)
    except ConfigError as exc:
        raise ArtifactError(f"{file}: field 'model': {exc}") from None
    _check_layers(model_config, sparsity, quantization, str(file), slorb)

    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own SafetensorError (not exported) or OSError
        raise ArtifactError(f"{weights} is corrupt or truncated: {exc}") from None
    packed, dense = _check_tensors(tensors, model_config, sparsity, quantization, dense_dtype, str(weights), slorb)
    return Artifact(
        path=root,
        model_config=model_config,
        tokenizer=tokenizer,
        packed=packed,
        dense=dense,
        sparsity=sparsity,
        quantization=quantization,
        dense_dtype=dense_dtype,
        producer=producer,
        slorb=slorb,
    )
