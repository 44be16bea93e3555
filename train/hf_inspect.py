"""``sparsert inspect HF_DIR``: what a Hugging Face directory written by sparsert (``train --model``'s ``hf/``,
``compress HF_DIR -o OUT``) holds, and what its 2:4 layers take when sparsert serves them; for a directory sparsert
did not write (a 2:4 checkpoint from elsewhere, or a dense one), which of its block linears are 2:4 along K.

The layers come from the directory's ``sparsert.json`` (:func:`sparsert.train.hf_model.saved_sparse_layers`);
their weights are read from its safetensors files (``model.safetensors`` or a sharded index), one tensor at a
time, without building the model. For each recorded layer: shape ``[out, K]`` (a GPT-2 ``Conv1D`` weight is
stored ``[K, out]``), the fraction of zeros, whether it is 2:4 along K, and the bits per weight of the format
:func:`sparsert.runtime.linear_swap.swap_sparse_linears` packs it into: 2:4 values in 16 bits + 2-bit indices =
9 bits per original weight, or with INT4 (group ``g``) 4-bit codes + 2-bit indices + a 16-bit scale per ``g``
columns = 3 + 16/g bits (rows padded to the kernels' 128-row tiles not counted).

A mixture-of-experts directory records its experts as per-expert layers (``mlp.experts.3.gate_up_proj``,
:mod:`sparsert.runtime.moe_experts`), which transformers stores in its own checkpoint layout, split or renamed per
architecture. The two common ones are read tensor by tensor too (:func:`expert_tensor_names`): ``gate_proj`` and
``up_proj`` per expert beside ``down_proj`` (Qwen2/3-MoE, OLMoE, DeepSeek, GLM-4-MoE, ...), and Mixtral's
``block_sparse_moe.experts.<e>.w1`` / ``w3`` / ``w2``; a ``gate_up_proj`` layer's statistics are those of its gate
and up rows together (zeros and 2:4 along K are per row, so their order does not matter). For any other layout
(experts stored fused, e.g. GPT-OSS) the model is loaded through transformers and unfused once (in the stored
dtype: as much memory as the weights take on disk), and the recorded layers' weights are taken from it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sparsert.runtime.errors import ArtifactError
from sparsert.runtime.linear_swap import weight_nk
from sparsert.runtime.moe_experts import unfuse_experts
from sparsert.runtime.nm_mask import is_nm_sparse
from sparsert.train.hf_model import (
    SPARSERT_FILE,
    block_linears,
    load_hf_causal_lm,
    load_hf_config,
    meta_causal_lm,
    saved_sparse_layers,
    served_as_2_4,
)


@dataclass
class HFLayerStats:
    name: str
    out_features: int
    in_features: int
    recorded: str  # "2:4", "2:4+int4 g128", "dense" (trained dense), or another N:M
    zeros: float  # fraction of zero weights
    is_2_4: bool
    served_bits: float  # bits per weight when served (16 for a layer that stays dense)


@dataclass
class HFDirStats:
    """``total_weights``: elements of every tensor in the weights files (recorded layers included)."""

    path: str
    layers: list[HFLayerStats] = field(default_factory=list)
    total_weights: int = 0
    # False for a directory sparsert did not write (no sparsert.json): its layers are every block linear
    recorded: bool = True

    @property
    def recorded_share(self) -> float:
        """The recorded layers' share of all the weights."""
        weights = sum(layer.out_features * layer.in_features for layer in self.layers)
        return weights / self.total_weights if self.total_weights else 0.0

    @property
    def served_bits_per_weight(self) -> float:
        """Over the recorded layers, bits per weight as sparsert serves them (dense layers at 16)."""
        weights = sum(layer.out_features * layer.in_features for layer in self.layers)
        bits = sum(layer.served_bits * layer.out_features * layer.in_features for layer in self.layers)
        return bits / weights if weights else 0.0


def served_bits(recorded_group: int | None) -> float:
    """Bits per original weight of a 2:4 layer as served: 9, or 3 + 16/g with INT4 group ``g``."""
    return 9.0 if recorded_group is None else 3.0 + 16.0 / recorded_group


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return {name: path / file for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{index}: not a valid safetensors index ({exc})") from None
    single = path / "model.safetensors"
    if not single.is_file():
        raise ArtifactError(f"{path}: no model.safetensors (or sharded index); sparsert inspects safetensors weights")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has keys(), not iteration
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtifactError(f"{single}: cannot be read as safetensors ({exc})") from None


def _tensor_shapes(files: dict[str, Path]) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors headers (no tensor is read)."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({name: list(f.get_slice(name).get_shape()) for name in f.keys()})  # noqa: SIM118
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ArtifactError(f"{file}: cannot be read as safetensors ({exc})") from None
    return shapes


def _tensor(files: dict[str, Path], name: str) -> torch.Tensor:
    if name not in files:
        raise ArtifactError(f"{SPARSERT_FILE} records layer '{name[: -len('.weight')]}', but the weights have no "
                            f"tensor '{name}'")
    with safe_open(str(files[name]), framework="pt") as f:
        return f.get_tensor(name)


def _weights_from_model(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The recorded layers' weights ``[out, K]`` from the model transformers loads (experts unfused), in the dtype
    the directory stores (half the memory of float32 for a bfloat16 directory)."""
    config = load_hf_config(path)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
    dtype = stored if stored in (torch.float16, torch.bfloat16) else torch.float32
    model = load_hf_causal_lm(path, dtype=dtype, load_tokenizer=False).model
    unfuse_experts(model)
    return {name: weight_nk(model.get_submodule(name)).detach() for name in names}  # names checked by hf_dir_stats


EXPERT_ON_DISK = {
    # unfused layer -> on-disk per-expert tensors whose rows it holds: (transformers' split names, Mixtral's)
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "up_proj": (("up_proj",), ("w3",)),
    "down_proj": (("down_proj",), ("w2",)),
}


def expert_tensor_names(name: str, files: dict[str, Path]) -> list[str] | None:
    """The tensors of ``files`` that hold the recorded expert layer ``name`` (``<module>.experts.<e>.<param>``)
    in one of the per-expert on-disk layouts of the module docstring, each ``[out_i, K]`` (the layer's rows split
    between them); None when none of those layouts has them."""
    prefix, _, param = name.rpartition(".")
    if param not in EXPERT_ON_DISK or ".experts." not in prefix:
        return None
    split, mixtral = EXPERT_ON_DISK[param]
    mixtral_prefix = prefix.replace(".mlp.experts.", ".block_sparse_moe.experts.")
    for where, parts in ((prefix, split), (mixtral_prefix, mixtral)):
        names = [f"{where}.{part}.weight" for part in parts]
        if all(n in files for n in names):
            return names
    return None


def _fits_hidden_size(on_disk: dict[str, list[str] | None], shapes: dict[str, list[int]], hidden: object) -> bool:
    """Whether the per-expert tensors found for the recorded experts have the shapes their names promise: 2-D, the
    same for every expert of a module, ``gate_up_proj`` / ``up_proj`` reading ``hidden`` (the model's hidden
    size, their K), ``down_proj`` writing it (otherwise transformers loads the model, and names what does not
    fit)."""
    per_module: dict[tuple[str, str], list[list[int]]] = {}  # every expert of a module: the same shapes
    for name, names in on_disk.items():
        if names is None:
            continue
        dims = [shapes.get(n, []) for n in names]
        if any(len(d) != 2 for d in dims) or len({d[1] for d in dims}) != 1:
            return False
        module, _, param = name.rpartition(".")
        if per_module.setdefault((module.rpartition(".")[0], param), dims) != dims:
            return False
        if isinstance(hidden, int) and (dims[0][0] if name.endswith(".down_proj") else dims[0][1]) != hidden:
            return False
    return True


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_expert_count(path: Path, expert_layers: list[str], files: dict[str, Path]) -> None:
    """ArtifactError when the weights hold per-expert tensors for some experts of a module but not for all the
    experts config.json gives it (a module stored fused, or in another layout, has none found and is not judged)."""
    by_module: dict[str, list[tuple[str, bool]]] = {}
    for name in expert_layers:  # <module>.<e>.<param>
        held = f"{name}.weight" in files or expert_tensor_names(name, files) is not None
        by_module.setdefault(name.rsplit(".", 2)[0], []).append((name, held))
    for module, entries in by_module.items():
        missing = [name for name, held in entries if not held]
        if missing and len(missing) < len(entries):
            experts = len({name.rsplit(".", 2)[1] for name, _ in entries})
            raise ArtifactError(f"{path}: config.json does not match the weights: it gives {module} {experts} experts, "
                                f"but the weights hold no tensor for {missing[0]}")


def _check_config_shapes(path: Path, shapes: dict[str, list[int]], meta: nn.Module) -> None:
    """ArtifactError when a stored tensor's shape is not the one the model ``config.json`` describes (``meta``,
    built on the meta device) has under that name (transformers would refuse to load the directory)."""
    expected = {name: list(t.shape) for name, t in meta.state_dict().items()}
    bad = sorted(name for name, shape in shapes.items() if name in expected and expected[name] != shape)
    if bad:
        raise ArtifactError(f"{path}: config.json does not match the weights: {len(bad)} tensor(s) of another shape, "
                            f"'{bad[0]}' is {shapes[bad[0]]} in the weights but {expected[bad[0]]} by config.json")


def hf_dir_stats(path: str | Path) -> HFDirStats:
    """The statistics of a Hugging Face directory: of the layers its ``sparsert.json`` records, or for a directory
    sparsert did not write (a plain transformers checkpoint, possibly 2:4 from elsewhere) of every block linear,
    each served as 2:4 when its weight is 2:4 along K (as :func:`~sparsert.runtime.linear_swap.swap_sparse_linears`
    does) and else dense. ConfigError for a directory that is not a causal LM, ArtifactError for unreadable
    weights."""
    p = Path(path)
    layers = saved_sparse_layers(p)
    recorded = layers is not None
    meta = meta_causal_lm(p)  # what config.json describes: the weights must fit it, as transformers requires
    files = _weight_files(p)
    shapes = _tensor_shapes(files)
    _check_config_shapes(p, shapes, meta)
    _check_expert_count(p, unfuse_experts(meta), files)
    if layers is None:
        layers = {name: {"n": 2, "m": 4, "dense": True, "qat_group_size": None, "transposed": conv1d}
                  for name, conv1d in block_linears(meta).items()}
    for name in layers:
        if not isinstance(getattr(_submodule(meta, name), "weight", None), torch.Tensor):
            raise ArtifactError(f"{p / SPARSERT_FILE} records layer '{name}', which the model its config.json "
                                "describes does not have")
    stats = HFDirStats(str(p), total_weights=sum(math.prod(shape) for shape in shapes.values()), recorded=recorded)
    loaded = None
    on_disk = {name: expert_tensor_names(name, files) for name in layers if f"{name}.weight" not in files}
    if on_disk and not _fits_hidden_size(on_disk, shapes, getattr(meta.config, "hidden_size", None)):
        on_disk = dict.fromkeys(on_disk)  # not the layout assumed: transformers reads it
    if any(names is None for names in on_disk.values()):  # experts in another layout: transformers reads it
        loaded = _weights_from_model(p, list(layers))
    for name, info in layers.items():
        if loaded is not None:
            w = loaded[name]
        elif name in on_disk:
            w = torch.cat([_tensor(files, n) for n in on_disk[name]])
        else:
            w = _tensor(files, f"{name}.weight")
            if w.dim() != 2:
                raise ArtifactError(f"{p}: the weight of {name} is {w.dim()}-D, expected a linear layer's [out, K]")
            w = w.t() if info.get("transposed") else w
        out, k = w.shape
        described = list(weight_nk(meta.get_submodule(name)).shape)
        if described != [out, k]:
            raise ArtifactError(f"{p}: config.json does not match the weights: layer '{name}' is {[out, k]} in the "
                                f"weights but {described} by config.json")
        two_four = is_nm_sparse(w, 2, 4)
        pattern = "dense" if info["dense"] else f"{info['n']}:{info['m']}"
        group = info["qat_group_size"]
        if stats.recorded and group is not None and k % group:
            raise ArtifactError(f"{p / SPARSERT_FILE}: layer {name!r} records INT4 group size {group}, which does not "
                                f"divide its K={k} (groups run along K); the file was edited or damaged")
        if not stats.recorded:
            recorded, bits = "-", served_bits(None) if two_four else 16.0
        elif served_as_2_4(info):
            recorded, bits = pattern if group is None else f"{pattern}+int4 g{group}", served_bits(group)
        else:
            recorded, bits = pattern, 16.0
        zeros = float((w == 0).float().mean()) if w.numel() else 0.0
        stats.layers.append(HFLayerStats(name, out, k, recorded, zeros, two_four, bits))
    return stats


def format_hf_stats(stats: HFDirStats) -> str:
    if stats.recorded:
        head = f"{stats.path}: a Hugging Face directory written by sparsert ({len(stats.layers)} recorded layers)"
    else:
        found = sum(layer.is_2_4 for layer in stats.layers)
        head = (f"{stats.path}: a Hugging Face directory sparsert did not write (no {SPARSERT_FILE}); {found} of its "
                f"{len(stats.layers)} block linears are 2:4 along K")
    lines = [head, "",
             f"{'layer':<48} {'shape':>14} {'recorded':>14} {'zeros':>7} {'2:4':>4} {'bits/w served':>14}"]
    for layer in stats.layers:
        shape = f"{layer.out_features}x{layer.in_features}"
        lines.append(f"{layer.name:<48} {shape:>14} {layer.recorded:>14} {layer.zeros:>7.1%} "
                     f"{'yes' if layer.is_2_4 else 'no':>4} {layer.served_bits:>14.3f}")
    broken = [layer.name for layer in stats.layers if layer.served_bits < 16 and not layer.is_2_4]  # served as 2:4
    what = "recorded layers" if stats.recorded else "block linears"
    if stats.layers:
        lines += ["", f"{what} served at {stats.served_bits_per_weight:.3f} bits/weight "
                      f"({16 / stats.served_bits_per_weight:.2f}x smaller than 16-bit dense)"]
    else:
        lines += ["", f"no {what}: every weight stays as stored"]
    if stats.total_weights and stats.layers:
        unrecorded = ", layers not recorded" if stats.recorded else ""
        lines.append(f"they hold {stats.recorded_share:.1%} of the directory's {stats.total_weights:,} weights; the "
                     f"rest (embeddings, norms, the head, MoE routers{unrecorded}) stays as stored")
    if not stats.recorded and any(layer.is_2_4 for layer in stats.layers):
        lines.append(f"sparsert compress {stats.path} -o OUT records the 2:4 ones in {SPARSERT_FILE} (magnitude "
                     "pruning keeps a 2:4 weight's zeros; --keep-dense keeps the others dense) for export and serving")
    if broken:
        lines.append(f"warning: {len(broken)} layer(s) recorded as 2:4 are not 2:4 along K, e.g. {broken[0]}")
    return "\n".join(lines)


def hf_stats_json(stats: HFDirStats) -> str:
    return json.dumps({**asdict(stats), "served_bits_per_weight": stats.served_bits_per_weight,
                       "recorded_share": stats.recorded_share}, indent=1)
