"""Atomic, self-describing, resumable training checkpoints.

Layout (``docs/ARCHITECTURE.md`` / the checkpoint contract)::

    <run_dir>/checkpoints/
        step_00000100/
            model.safetensors       model state dict: float weights under their module names; for each sparse
                                    linear a uint8 0/1 ``<name>.mask`` [out, K]
            optimizer.safetensors   optimizer tensors flattened as ``<param name>.<key>`` (AdamW: ``exp_avg``,
                                    ``exp_avg_sq``, ``step``); metadata ``param_groups`` (JSON, params by
                                    name) and ``scalars`` (JSON, non-tensor per-parameter state)
            state.json              {"format": "sparsert-checkpoint", "version": 1, "step": 100,
                                     "model_config": {...}, "train_config": {...}, "sparsity": {...}|null,
                                     "quantization": {...}|null, ... whatever else the trainer needs to resume}
        latest.json                 {"step": 100, "dir": "step_00000100"}

Atomicity: a checkpoint is written into ``step_X.tmp/`` (every file fsynced), renamed to ``step_X`` and only
then published by replacing ``latest.json`` (temp file + ``os.replace``). A crash or Ctrl-C at any moment
leaves ``latest.json`` pointing at a complete checkpoint. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsert.runtime.artifact import check_model_sizes, model_state_shapes
from sparsert.runtime.errors import ArtifactError, ConfigError, SparsertError
from sparsert.runtime.fileio import fsync_dir, replace_dir, write_atomic
from sparsert.runtime.model import ModelConfig, sparse_linear_names

FORMAT = "sparsert-checkpoint"
VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


@dataclass
class Checkpoint:
    """A loaded, validated checkpoint.

    path: the step directory. model_state: tensors of model.safetensors (masks uint8 [out, K]).
    optimizer_state: a ``torch.optim.Optimizer.state_dict()``-style dict (parameter indices in the order of
    ``optimizer_param_names``), or None when not loaded. state: the whole state.json.
    """

    path: Path
    step: int
    model_config: ModelConfig  # an HFModelConfig (sparsert.train.hf_train) when state["hf_model"] is set
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    state: dict
    optimizer_param_names: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: object) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`sparsert.runtime.fileio.write_atomic`)."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def _model_tensors(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in (model.state_dict() if state is None else state).items():
        t = t.detach().cpu()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        out[name] = t.contiguous().clone()  # clone: safetensors refuses tensors that share storage
    return out


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ConfigError(f"checkpoint: the optimizer holds a parameter of shape {list(p.shape)} that is not "
                                  "in the model (expected an optimizer over this model's parameters)")
            names.append(by_id[id(p)])
    return names


def _optimizer_payload(model: nn.Module, optimizer: torch.optim.Optimizer,
                       sd: dict | None = None) -> tuple[dict, dict[str, str]]:
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict() if sd is None else sd
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entry in sd["state"].items():
        pname = names[index]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pname}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(pname, {})[key] = value
    groups = []
    for group in sd["param_groups"]:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [names[i] for i in group["params"]]
        groups.append(g)
    metadata = {
        "format": "sparsert-optimizer",
        "optimizer": type(optimizer).__name__,
        "param_groups": json.dumps(groups),
        "scalars": json.dumps(scalars),
    }
    return tensors, metadata


def save_checkpoint(
    run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, *, keep: int = 2,
    model_state: dict[str, torch.Tensor] | None = None, optimizer_state: dict | None = None,
) -> Path:
    """Write checkpoint ``step`` of ``model`` and ``optimizer`` under ``run_dir/checkpoints`` atomically.

    ``state`` must hold ``model_config`` (a dict) and may hold anything JSON-serialisable the trainer needs
    (``train_config``, ``sparsity``, ``quantization``, RNG states, metrics offset); ``format``, ``version`` and
    ``step`` are added. Publishes ``latest.json`` after the step directory is complete, then deletes all but
    the newest ``keep`` checkpoints and any leftover temporary directories. Returns the step directory.
    ConfigError (and nothing left on disk) when ``state`` lacks ``model_config`` or ``optimizer`` holds a
    parameter that is not in ``model``.

    ``model_state`` / ``optimizer_state``: full CPU copies of ``model.state_dict()`` / ``optimizer.state_dict()``
    to write instead of the live ones — a sharded (FSDP2) model's state gathered by
    :func:`sparsert.train.distributed.gather_full_state`; parameter names still come from ``model``/``optimizer``.
    """
    if "model_config" not in state:
        raise ConfigError("save_checkpoint: state must contain 'model_config' (the model's config as a dict)")
    ckpt_root = Path(run_dir) / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = ckpt_root / name
    tmp = ckpt_root / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(_model_tensors(model, model_state), str(tmp / MODEL_FILE), metadata={"format": FORMAT})
        opt_tensors, opt_meta = _optimizer_payload(model, optimizer, optimizer_state)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE), metadata=opt_meta)
        full_state = {"format": FORMAT, "version": VERSION, "step": int(step)}
        full_state.update({k: v for k, v in state.items() if k not in full_state})
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(full_state, f, indent=2)
            f.write("\n")
        for fname in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
            _fsync_file(tmp / fname)
        fsync_dir(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(ckpt_root / LATEST, {"step": int(step), "dir": name})
    _prune(ckpt_root, keep=keep, current=name)
    return final


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete step directories under ``ckpt_root`` as (step, path), oldest first."""
    out = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def _is_scratch(name: str) -> bool:
    """A name :func:`save_checkpoint` writes on the way to a checkpoint: ``step_N.tmp`` being filled, a step
    directory moved aside (``.step_N.<hex>.old``, :func:`~sparsert.runtime.fileio.replace_dir`), latest.json's
    temporary file (``.latest.json.<hex>.tmp``)."""
    return name.endswith((".tmp", ".old"))


def holds_no_checkpoint(ckpt_root: Path) -> bool:
    """Whether the directory ``ckpt_root`` holds only what a run leaves before its first checkpoint is published
    (no ``latest.json``; step directories and :func:`save_checkpoint`'s scratch names), so a new run may
    start over it."""
    return all(p.name != LATEST and (_is_scratch(p.name) or (_STEP_DIR.match(p.name) and p.is_dir()))
               for p in ckpt_root.iterdir())


def _prune(ckpt_root: Path, *, keep: int, current: str) -> None:
    for p in ckpt_root.iterdir():
        if p.is_dir() and _is_scratch(p.name):
            shutil.rmtree(p, ignore_errors=True)
    complete = list_checkpoints(ckpt_root)
    for _, p in complete[: max(0, len(complete) - max(keep, 1))]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file is missing") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The step directory that ``path`` designates: a step directory itself, a checkpoints directory (its
    ``latest.json``) or a run directory (its ``checkpoints/latest.json``). ArtifactError when there is none."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: checkpoint path does not exist")
    if not path.is_dir():
        raise ArtifactError(f"{path}: expected a run, checkpoints or step directory, got a file")
    if (path / STATE_FILE).exists() or _STEP_DIR.match(path.name):
        return path
    ckpt_root = path if (path / LATEST).exists() or path.name == CHECKPOINTS else path / CHECKPOINTS
    latest = ckpt_root / LATEST
    if not latest.exists():
        if not ckpt_root.is_dir():
            raise ArtifactError(f"{path}: no checkpoint found (expected {CHECKPOINTS}/{LATEST} or a step_* directory)")
        raise ArtifactError(f"{latest}: no complete checkpoint has been written yet ({LATEST} is missing)")
    info = _read_json(latest)
    step, name = info.get("step"), info.get("dir")
    if not isinstance(step, int) or not isinstance(name, str) or name != step_dir_name(step):
        raise ArtifactError(f"{latest}: expected {{\"step\": N, \"dir\": \"step_0000000N\"}}, got {json.dumps(info)}")
    target = ckpt_root / name
    if not target.is_dir():
        raise ArtifactError(f"{latest}: points to {name}, which does not exist")
    return target


def expected_model_shapes(config: ModelConfig, sparse: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor model.safetensors must hold for ``config`` (float32 weights;
    with ``sparse``, a uint8 ``<name>.mask`` for each sparse linear)."""
    shapes = {name: (shape, torch.float32) for name, shape in model_state_shapes(config).items()}
    if sparse:
        for name in sparse_linear_names(config):
            shapes[f"{name}.mask"] = (shapes[f"{name}.weight"][0], torch.uint8)
    return shapes


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise ArtifactError(f"{path}: file is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError (an Exception subclass)
        raise ArtifactError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    return tensors, metadata


def _validate_model_state(path: Path, tensors: dict[str, torch.Tensor], config: ModelConfig, sparsity: dict | None):
    expected = expected_model_shapes(config, sparse=sparsity is not None)
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            raise ArtifactError(f"{path}: missing tensor '{name}' (expected shape {list(shape)})")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ArtifactError(
                f"{path}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)} for the model config"
            )
        if t.dtype != dtype:
            raise ArtifactError(f"{path}: tensor '{name}' has dtype {t.dtype}, expected {dtype}")
    from sparsert.train.slorb import slorb_from_state  # SLoRB's extra S tensors (optional)

    found = slorb_from_state(tensors, config, str(path))
    for name in found[1] if found else ():
        t = tensors[f"{name}.slorb.S"]
        if t.dtype != torch.float32:
            raise ArtifactError(f"{path}: tensor '{name}.slorb.S' has dtype {t.dtype}, expected torch.float32")
        expected[f"{name}.slorb.S"] = (tuple(t.shape), torch.float32)
    for name in tensors:
        if name not in expected:
            raise ArtifactError(f"{path}: unexpected tensor '{name}' (not part of the model config)")
    if sparsity is not None:
        n, m = sparsity.get("n"), sparsity.get("m")
        for name in sparse_linear_names(config):
            mask = tensors[f"{name}.mask"]
            if int(mask.max()) > 1:
                raise ArtifactError(f"{path}: mask '{name}.mask' holds values other than 0 and 1")
            per_group = mask.reshape(mask.shape[0], -1, m).sum(-1)
            if bool((per_group != n).any()):
                raise ArtifactError(f"{path}: mask '{name}.mask' is not {n}:{m} along K")


def _validate_hf_model_state(path: Path, tensors: dict[str, torch.Tensor], sparsity: dict | None) -> None:
    """A Hugging Face model's state has no preset to check shapes against (the trainer loads it strictly into the
    model rebuilt from its directory): check that weights are float and each ``<name>.mask`` is a uint8 0/1
    N:M mask of its ``<name>.weight``'s shape."""
    for name, t in tensors.items():
        if name.endswith(".mask"):
            weight = tensors.get(name[: -len(".mask")] + ".weight")
            if weight is None or tuple(weight.shape) != tuple(t.shape) or t.dim() != 2:
                raise ArtifactError(f"{path}: mask '{name}' has no weight of its shape {list(t.shape)}")
            if t.dtype != torch.uint8 or int(t.max()) > 1:
                raise ArtifactError(f"{path}: mask '{name}' must hold uint8 0/1 values")
            if sparsity is not None:
                n, m = sparsity["n"], sparsity["m"]
                if t.shape[1] % m or bool((t.reshape(t.shape[0], -1, m).sum(-1) != n).any()):
                    raise ArtifactError(f"{path}: mask '{name}' is not {n}:{m} along K")
        elif not t.is_floating_point():
            raise ArtifactError(f"{path}: tensor '{name}' has dtype {t.dtype}, expected a float dtype")


def _load_optimizer(path: Path, param_shapes: dict[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
    tensors, metadata = _load_safetensors(path)
    try:
        groups = json.loads(metadata["param_groups"])
        scalars = json.loads(metadata.get("scalars", "{}"))
    except KeyError:
        raise ArtifactError(f"{path}: metadata 'param_groups' is missing") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise ArtifactError(f"{path}: metadata 'param_groups' must be a list of groups with 'params'")
    names: list[str] = [n for g in groups for n in g["params"]]
    for n in names:
        if n not in param_shapes:
            raise ArtifactError(f"{path}: optimizer state refers to unknown parameter '{n}'")
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        pname, _, skey = key.rpartition(".")
        if pname not in index:
            raise ArtifactError(f"{path}: tensor '{key}' belongs to no parameter of the optimizer")
        if t.dim() > 0 and tuple(t.shape) != param_shapes[pname]:
            raise ArtifactError(
                f"{path}: tensor '{key}' has shape {list(t.shape)}, expected {list(param_shapes[pname])}"
            )
        state.setdefault(index[pname], {})[skey] = t
    for pname, entries in scalars.items():
        if pname not in index:
            raise ArtifactError(f"{path}: scalar state refers to unknown parameter '{pname}'")
        state.setdefault(index[pname], {}).update(entries)
    torch_groups, start = [], 0
    for g in groups:
        tg = {k: v for k, v in g.items() if k != "params"}
        tg["params"] = list(range(start, start + len(g["params"])))
        start += len(g["params"])
        torch_groups.append(tg)
    return {"state": state, "param_groups": torch_groups}, names


def load_checkpoint(path: str | Path, *, load_optimizer: bool = True) -> Checkpoint:
    """Load and validate a checkpoint. ``path``: run directory, its checkpoints directory or a step directory.

    Raises ArtifactError naming the file for: a missing directory or file, bad JSON, a wrong format/version,
    a corrupt or truncated safetensors file, missing/unexpected tensors, shapes or dtypes that do not match the
    model config, masks that are not N:M, optimizer state that does not match the parameters.
    """
    step_dir = resolve_checkpoint_dir(path)
    state_path = step_dir / STATE_FILE
    state = _read_json(state_path)
    if state.get("format") != FORMAT:
        raise ArtifactError(f"{state_path}: 'format' is {state.get('format')!r}, expected {FORMAT!r}")
    if state.get("version") != VERSION:
        raise ArtifactError(f"{state_path}: unsupported checkpoint version {state.get('version')!r} "
                            f"(this sparsert reads version {VERSION})")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ArtifactError(f"{state_path}: 'step' must be a non-negative integer, got {step!r}")
    named = re.fullmatch(r"step_(\d+)", step_dir.name)
    if named and int(named.group(1)) != step:
        raise ArtifactError(f"{state_path}: 'step' is {step} but its directory is {step_dir.name} (a state.json "
                            "copied from another checkpoint?)")
    hf = state.get("hf_model") is not None  # a Hugging Face model's run (sparsert.train.hf_train)
    if hf:
        from sparsert.train.hf_train import hf_model_config_from_state

        model_config = hf_model_config_from_state(state, str(state_path))
    else:
        try:
            model_config = ModelConfig.from_dict(state.get("model_config"))
        except SparsertError as exc:
            raise ArtifactError(f"{state_path}: {exc}") from None
    sparsity = state.get("sparsity")
    if sparsity is not None and not (isinstance(sparsity, dict) and isinstance(sparsity.get("n"), int)
                                     and isinstance(sparsity.get("m"), int) and 0 < sparsity["n"] < sparsity["m"]):
        raise ArtifactError(f"{state_path}: 'sparsity' must be null or {{\"n\": N, \"m\": M}}, got {sparsity!r}")

    model_path = step_dir / MODEL_FILE
    model_state, _ = _load_safetensors(model_path)
    if hf:
        _validate_hf_model_state(model_path, model_state, sparsity)
    else:
        # Before the expected shapes are built from the config: n_layers=400000 in state.json must fail here, fast
        check_model_sizes(model_config, {n: list(t.shape) for n, t in model_state.items()}, state_path, model_path,
                          "model_config")
        _validate_model_state(model_path, model_state, model_config, sparsity)

    optimizer_state, names = None, []
    if load_optimizer:
        param_shapes = {n: tuple(t.shape) for n, t in model_state.items() if not n.endswith(".mask")}
        optimizer_state, names = _load_optimizer(step_dir / OPTIMIZER_FILE, param_shapes)
    return Checkpoint(step_dir, step, model_config, model_state, optimizer_state, state, names)


def restore_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, ckpt: Checkpoint) -> None:
    """Load ``ckpt``'s optimizer state into ``optimizer`` after checking that its parameters are, in order,
    the ones the checkpoint was saved with. ArtifactError otherwise."""
    if ckpt.optimizer_state is None:
        raise ArtifactError(f"{ckpt.path}: optimizer state was not loaded")
    names = _param_names(model, optimizer)
    if names != ckpt.optimizer_param_names:
        raise ArtifactError(
            f"{ckpt.path / OPTIMIZER_FILE}: optimizer parameters do not match the model "
            f"({len(ckpt.optimizer_param_names)} saved, {len(names)} now)"
        )
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved = [len(g["params"]) for g in ckpt.optimizer_state["param_groups"]]
    if sizes != saved:
        raise ArtifactError(f"{ckpt.path / OPTIMIZER_FILE}: parameter groups {saved} do not match {sizes}")
    optimizer.load_state_dict(ckpt.optimizer_state)
