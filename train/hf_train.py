"""``sparsert train --model PATH``: train a local Hugging Face causal LM 2:4 sparse with the sparsert trainer.

The trainer runs the same loop as for its built-in architectures; this module supplies the HF pieces:

- :class:`HFModelConfig` stands in for :class:`~sparsert.runtime.model.ModelConfig`: the model directory
  (absolute path), its ``model_type``, ``max_seq_len`` (``max_position_embeddings``, which caps
  ``--seq-len``), ``vocab_size`` and the full ``config.json``. A checkpoint of such a run stores it as
  ``state["model_config"] = {"type": "hf", ...}`` and marks itself with ``state["hf_model"] = path``;
  :func:`sparsert.train.checkpoint.load_checkpoint` then validates the masks and dtypes but not the shapes of a
  preset, and the trainer resumes it by rebuilding the model from the same directory (refused with the list of
  keys when its ``config.json`` changed since).
- :class:`HFCausalLM` is the module trained: the ``transformers`` model as submodule ``hf`` (state-dict names
  ``hf.<transformers name>``), ``forward(input_ids) -> logits`` through
  :func:`sparsert.train.hf_model.hf_forward`. GPT-2's ``Conv1D`` block layers are turned into ``nn.Linear``
  (``Wᵀ``) when it is built, so its block linears (:meth:`HFCausalLM.sparse_linear_names`) can be swapped for
  SparseLinears along K like any other; embeddings, norms and ``lm_head`` stay dense.
- The tokenizer is the model directory's (:class:`~sparsert.runtime.hf_tokenizer.HFTokenizer`).
- At the end, :func:`save_hf_run` writes ``<run_dir>/hf``: a directory ``transformers`` loads as is, with the
  dense weights carrying the 2:4 zeros (:func:`sparsert.train.hf_model.save_hf_checkpoint`), instead of the
  sparsert artifact, whose format describes the built-in architectures only.

The sparse training itself (SR-STE, Zhou et al., ICLR 2021, and the other methods of the trainer) is unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsert.runtime.errors import ArtifactError, ConfigError
from sparsert.runtime.hf_tokenizer import HFTokenizer
from sparsert.runtime.moe_experts import unfuse_experts
from sparsert.train.distributed import unwrap
from sparsert.train.hf_model import (
    TOKENIZER_FILES,
    conv1d_to_linear,
    has_tokenizer_files,
    hf_forward,
    hf_sparse_linear_names,
    load_hf_causal_lm,
    load_hf_config,
    save_hf_checkpoint,
)
from sparsert.train.sparse_linear import SparsityConfig

NO_ROUTER_MESSAGE = ("--router-aux-loss weights the router load-balancing loss of a mixture-of-experts Hugging Face "
                     "model; it needs --model (or --init-from a run of one): the built-in architectures have no router")
HF_TYPE = "hf"
HF_STATE_KEY = "hf_model"  # state.json key marking a checkpoint of a Hugging Face model (its directory)
HF_DIR = "hf"  # <run_dir>/hf: the trained model as a Hugging Face directory
PREFIX = "hf."  # state-dict prefix of the transformers model inside HFCausalLM
NO_POSITION_LIMIT = 2**31 - 1
# What the trainer prints about <run_dir>/hf (it takes the place of the sparsert artifact).
HF_NOTE = (" (a Hugging Face model directory for transformers: dense weights carrying the 2:4 zeros; the sparsert "
           "artifact format describes the built-in architectures only; sparsert generate, export and inspect take "
           "this directory, and sparsert.runtime.linear_swap.swap_sparse_linears runs its 2:4 linears on sparsert's "
           "formats and kernels)")
# config.json keys that change with the transformers version or the save, not with the architecture.
_VOLATILE_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
                  "_attn_implementation_autoset")


def _config_json(config: Any) -> dict:
    return json.loads(config.to_json_string(use_diff=False))


@dataclass(frozen=True)
class HFModelConfig:
    """The architecture of a run on a local Hugging Face causal LM (what ModelConfig is for a preset).

    path: the model directory, absolute. model_type: ``config.model_type``. max_seq_len: the longest sequence
    the model takes (``max_position_embeddings``; 2³¹−1 when the config sets none). vocab_size: rows of the
    embedding (``config.vocab_size``). config: ``config.json`` as a dict (every key, defaults included).
    """

    path: str
    model_type: str
    max_seq_len: int
    vocab_size: int
    config: dict

    def to_dict(self) -> dict:
        return {"type": HF_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: object, where: str = "model_config") -> HFModelConfig:
        """Rebuild from :meth:`to_dict`; ConfigError naming ``where`` and the field for anything malformed."""
        if not isinstance(d, dict) or d.get("type") != HF_TYPE:
            raise ConfigError(f"{where}: expected a Hugging Face model config {{\"type\": \"hf\", ...}}, got {d!r}")
        fields = {"path": str, "model_type": str, "max_seq_len": int, "vocab_size": int, "config": dict}
        for name, kind in fields.items():
            value = d.get(name)
            if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value <= 0):
                expected = "positive integer" if kind is int else kind.__name__
                raise ConfigError(f"{where}: field '{name}' must be a {expected}, got {value!r}")
        unknown = sorted(set(d) - set(fields) - {"type"})
        if unknown:
            raise ConfigError(f"{where}: unknown field '{unknown[0]}'")
        return cls(**{name: d[name] for name in fields})

    @classmethod
    def from_directory(cls, path: str | Path) -> HFModelConfig:
        """The config of a local causal-LM directory; ConfigError (from
        :func:`sparsert.train.hf_model.load_hf_config`) when it is missing or not a decoder-only causal LM."""
        p = Path(path).resolve()
        config = load_hf_config(p)
        key = next((k for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None) is not None),
                   None)
        limit = None if key is None else getattr(config, key)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ConfigError(f"{p / 'config.json'}: {key} must be a positive integer (the longest sequence the model "
                              f"takes), got {limit!r}")
        return cls(path=str(p), model_type=str(config.model_type),
                   max_seq_len=int(limit) if isinstance(limit, int) and limit > 0 else NO_POSITION_LIMIT,
                   vocab_size=int(config.vocab_size), config=_config_json(config))

    def differences(self, other: HFModelConfig) -> list[str]:
        """``key: ours -> theirs`` for every architecture key of ``config.json`` that differs."""
        a = {k: v for k, v in self.config.items() if k not in _VOLATILE_KEYS}
        b = {k: v for k, v in other.config.items() if k not in _VOLATILE_KEYS}
        return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def is_hf_config(model_config: object) -> bool:
    return isinstance(model_config, HFModelConfig)


def hf_model_config(path: str | Path) -> HFModelConfig:
    """:meth:`HFModelConfig.from_directory` (the model config of ``sparsert train --model PATH``)."""
    return HFModelConfig.from_directory(path)


def hf_model_config_from_state(state: dict, where: str) -> HFModelConfig:
    """The HFModelConfig of a checkpoint's state.json (``where`` names it in errors): ArtifactError when
    ``model_config`` is malformed or does not name the directory of ``state["hf_model"]``."""
    try:
        mc = HFModelConfig.from_dict(state.get("model_config"), f"{where}: model_config")
    except ConfigError as exc:
        raise ArtifactError(str(exc)) from None
    if mc.path != state.get(HF_STATE_KEY):
        raise ArtifactError(f"{where}: '{HF_STATE_KEY}' is {state.get(HF_STATE_KEY)!r} but model_config names "
                            f"{mc.path!r}")
    return mc


def check_hf_fields(cfg: Any) -> None:
    """ConfigError when a TrainConfig's ``hf_model`` (``--model``) is combined with options that choose the model
    another way (``arch``, ``init_from``), or its ``router_aux_loss`` is given without one or is not a number
    ``>= 0``."""
    coef = getattr(cfg, "router_aux_loss", None)
    if coef is not None and (isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef)
                             or coef < 0):
        raise ConfigError(f"--router-aux-loss: expected a number >= 0, got {coef!r}")
    if cfg.hf_model is None:
        # with --init-from the model is the init run's, a Hugging Face model or not: build_model decides then
        if coef is not None and getattr(cfg, "init_from", None) is None:
            raise ConfigError(NO_ROUTER_MESSAGE)
        return
    for name, flag in (("arch", "--arch"), ("init_from", "--init-from")):
        if getattr(cfg, name, None) is not None:
            raise ConfigError(f"--model {cfg.hf_model}: {flag} chooses the model too; the architecture and weights "
                              "come from the Hugging Face directory")


def run_prefix(cfg: Any) -> str:
    """First part of a run directory's default name: ``hf-<model directory name>`` with ``--model``, else the
    preset (``runs/<prefix>-<variant>-<timestamp>``)."""
    return f"hf-{Path(cfg.hf_model).resolve().name}" if cfg.hf_model is not None else cfg.preset


def hf_state(model_config: object) -> dict:
    """The state.json entries marking a checkpoint of a Hugging Face model: ``{"hf_model": path}`` (empty for
    a built-in architecture)."""
    return {HF_STATE_KEY: model_config.path} if is_hf_config(model_config) else {}


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM as a sparsert training model.

    ``forward(input_ids int64 [B, T]) -> logits float32 [B, T, V]`` (no KV cache; :func:`hf_forward`).
    The transformers model is the submodule ``hf``; ``config`` is the run's :class:`HFModelConfig`.

    ``router_aux_coef`` > 0 (a mixture-of-experts model): in training mode the forward also asks the model for its
    router load-balancing loss (Switch Transformer's ``N·Σᵢ fᵢ·Pᵢ`` over the layers, Fedus et al., JMLR 2022, as
    Mixtral and the other transformers MoE models compute it) and keeps it, a float32 scalar tensor, in
    ``router_aux_loss`` until :func:`take_router_aux_loss` takes it; the trainer adds ``router_aux_coef`` times it
    to the objective, as transformers' own loss does when ``output_router_logits`` is set.
    """

    def __init__(self, hf: nn.Module, config: HFModelConfig, router_aux_coef: float = 0.0) -> None:
        super().__init__()
        self.hf = hf
        self.config = config
        self.router_aux_coef = router_aux_coef
        self.router_aux_loss: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.training and self.router_aux_coef > 0:
            out = self.hf(input_ids=input_ids, use_cache=False, output_router_logits=True)
            self.router_aux_loss = None if out.aux_loss is None else out.aux_loss.float()
            return out.logits.float()
        self.router_aux_loss = None
        return hf_forward(self.hf, input_ids)

    def sparse_linear_names(self) -> list[str]:
        """Names (in this module) of the linear layers inside the decoder blocks, in module order:
        ``hf.model.layers.{i}.self_attn.q_proj`` ... (Llama), ``hf.transformer.h.{i}.mlp.c_fc`` ... (GPT-2)."""
        return [PREFIX + name for name in hf_sparse_linear_names(self.hf)]


def take_router_aux_loss(model: nn.Module) -> tuple[float, torch.Tensor] | None:
    """``(coefficient, loss)`` of the router load-balancing loss the last training forward of ``model`` (an
    :class:`HFCausalLM`, possibly inside DDP) computed, which it then drops; None for any other model or when the
    run has no such loss."""
    inner = unwrap(model)
    loss = getattr(inner, "router_aux_loss", None)
    if loss is None:
        return None
    inner.router_aux_loss = None
    return inner.router_aux_coef, loss


def router_aux_coefficient(hf: nn.Module, requested: float | None, where: str) -> float:
    """The weight of the router load-balancing loss in training the transformers model ``hf``: ``requested``
    (``--router-aux-loss``), or when None the model config's ``router_aux_loss_coef`` if its
    ``output_router_logits`` is true (what transformers' own training loss adds), else 0. ConfigError naming
    ``where`` when a positive weight is asked of a model whose forward computes no such loss (no router)."""
    accepts = "output_router_logits" in inspect.signature(hf.forward).parameters
    if requested is None:
        config = hf.config
        if not (accepts and getattr(config, "output_router_logits", False)):
            return 0.0
        return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    if not accepts or (requested > 0 and not _returns_router_aux_loss(hf)):
        raise ConfigError(f"--router-aux-loss {requested:g}: {where} ({type(hf).__name__}) computes no router "
                          "load-balancing loss (not a mixture-of-experts model, or one transformers gives none); "
                          "leave the flag out")
    return float(requested)


@torch.no_grad()
def _returns_router_aux_loss(hf: nn.Module) -> bool:
    """Whether the model's forward gives an ``aux_loss`` when asked for its router logits (some MoE models, e.g.
    HunYuan-MoE, return None): one forward of two tokens in eval mode."""
    was_training = hf.training
    hf.eval()
    try:
        ids = torch.zeros(1, 2, dtype=torch.long, device=next(hf.parameters()).device)
        return getattr(hf(input_ids=ids, use_cache=False, output_router_logits=True), "aux_loss", None) is not None
    finally:
        hf.train(was_training)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars (loading / writing weights) off inside: the trainer reports progress."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def build_hf_model(model_config: HFModelConfig, router_aux_loss: float | None = None) -> HFCausalLM:
    """Load the model of ``model_config.path`` (float32, train mode) as an :class:`HFCausalLM`, its fused MoE
    experts unfused into per-expert linears and its GPT-2 ``Conv1D`` block layers turned into ``nn.Linear``;
    ``router_aux_loss`` as in :func:`router_aux_coefficient`. The
    directory's config must still be the recorded one (ConfigError listing the keys that changed); ArtifactError for
    missing or unreadable weights."""
    with _no_progress_bars():
        bundle = load_hf_causal_lm(model_config.path, load_tokenizer=False)
    current = HFModelConfig.from_directory(model_config.path)
    diffs = model_config.differences(current)
    if diffs:
        raise ConfigError(f"{model_config.path}: config.json differs from the one this run was started with "
                          f"({'; '.join(diffs[:5])}); restore it or start a new run")
    hf = bundle.model
    unfuse_experts(hf)
    conv1d_to_linear(hf, hf_sparse_linear_names(hf))
    hf.train()
    coef = router_aux_coefficient(hf, router_aux_loss, f"--model {model_config.path}")
    return HFCausalLM(hf, model_config, coef)


def hf_tokenizer(model_config: HFModelConfig) -> HFTokenizer:
    """The tokenizer of the model directory; ConfigError when the directory has none."""
    p = Path(model_config.path)
    if not has_tokenizer_files(p):
        raise ConfigError(f"--model {p}: no tokenizer in the model directory (expected one of "
                          f"{', '.join(TOKENIZER_FILES)}); the corpus is tokenised with the model's own tokenizer")
    tok = HFTokenizer(p)
    if tok.vocab_size > model_config.vocab_size:
        raise ConfigError(f"--model {p}: the tokenizer has {tok.vocab_size} tokens but the model's embedding has "
                          f"only {model_config.vocab_size} rows")
    return tok


@torch.no_grad()
def save_hf_run(checkpoint: Any, out_dir: str | Path) -> Path:
    """Write the Hugging Face directory of a run from its checkpoint (a loaded
    :class:`~sparsert.train.checkpoint.Checkpoint` of an HF run, or a path to one) to ``out_dir``, replacing it.

    It holds the same weights as the sparsert artifact of a built-in model would: the model is rebuilt from
    the checkpoint's directory, every block linear becomes a SparseLinear with the run's N:M (2:4 for a dense
    run), INT4 and transposable settings, loaded with the checkpoint's weights and masks (a layer without a
    mask — a ``--dense`` run — gets the magnitude mask of its trained weights), and saved as ``W ⊙ mask``
    (fake-quantized to INT4 with QAT): dense weights carrying the N:M zeros, in the layout ``transformers``
    loads. Layers the run trained dense (not in the checkpoint's ``sparsity.layers``: the attention linears of
    ``--sparse-layers ffn``, ``--keep-dense``) are saved as trained and recorded as dense in ``sparsert.json``, as
    the artifact of a built-in model keeps them (a layer whose K is not a multiple of M, which only ``--keep-dense``
    lets train, is saved as trained and not recorded); the rest in the layout ``transformers``
    loads (:func:`sparsert.train.hf_model.save_hf_checkpoint`, through a temporary directory). The tokenizer
    is the model directory's. Returns ``out_dir``.
    """
    from sparsert.train.checkpoint import Checkpoint, load_checkpoint
    from sparsert.train.sparsify import sparse_modules, sparsify_model

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, load_optimizer=False)
    mc = ckpt.model_config
    if not is_hf_config(mc):
        raise ConfigError(f"{ckpt.path}: not a checkpoint of a Hugging Face model (no '{HF_STATE_KEY}')")
    model = build_hf_model(mc)
    sparsity = ckpt.state.get("sparsity") or {}
    quant = ckpt.state.get("quantization")
    scfg = SparsityConfig(n=sparsity.get("n", 2), m=sparsity.get("m", 4),
                          qat_group_size=quant.get("group_size") if isinstance(quant, dict) else None,
                          transposable=bool(sparsity.get("transposable", False)))
    # a layer whose K no N:M group divides was trained dense (--keep-dense): it stays a plain linear
    sparsify_model(model, scfg, [n for n in model.sparse_linear_names()
                                 if model.get_submodule(n).in_features % scfg.m == 0])
    own = model.state_dict()
    state = ckpt.model_state
    missing = sorted(k for k in own if k not in state and not k.endswith(".mask"))
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        what = f"lacks '{missing[0]}'" if missing else f"has '{unexpected[0]}', which the model does not"
        raise ArtifactError(f"{ckpt.path}: the checkpoint {what} (model {mc.path})")
    model.load_state_dict({k: state[k].to(v.dtype) if k in state else v for k, v in own.items()})
    listed = sparsity.get("layers")
    for name, module in sparse_modules(model).items():
        if isinstance(listed, list) and name not in listed:
            module.dense = True  # trained dense (--sparse-layers ffn: the attention linears): saved as trained
        elif f"{name}.mask" not in state:
            module.refresh_mask()  # one-shot magnitude N:M of the trained weights
    with _no_progress_bars():
        return save_hf_checkpoint(model.hf, hf_tokenizer(mc), out_dir, overwrite=True, consume=True)


@torch.no_grad()
def save_dense_hf_run(checkpoint: Any, out_dir: str | Path) -> Path:
    """Write the weights of a ``--dense`` run's checkpoint (a loaded
    :class:`~sparsert.train.checkpoint.Checkpoint` of an HF run, or a path to one) as trained, unpruned, as a plain
    Hugging Face directory (the model directory's tokenizer, experts fused back, no ``sparsert.json``) at ``out_dir``,
    replacing it; for one-shot pruning (``sparsert compress RUN``). The run's own ``hf/`` holds the magnitude 2:4
    of these weights instead (:func:`save_hf_run`). ConfigError for a run that trained 2:4 masks. Returns
    ``out_dir``."""
    from sparsert.train.checkpoint import Checkpoint, load_checkpoint

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, load_optimizer=False)
    mc = ckpt.model_config
    if not is_hf_config(mc):
        raise ConfigError(f"{ckpt.path}: not a checkpoint of a Hugging Face model (no '{HF_STATE_KEY}')")
    if ckpt.state.get("sparsity"):
        raise ConfigError(f"{ckpt.path}: the run trained 2:4 masks; its weights are saved with them (save_hf_run)")
    model = build_hf_model(mc)
    own = model.state_dict()
    state = ckpt.model_state
    if own.keys() != state.keys():
        missing = sorted(own.keys() - state.keys())
        what = f"lacks '{missing[0]}'" if missing else f"has '{sorted(state.keys() - own.keys())[0]}', which the " \
                                                      "model does not"
        raise ArtifactError(f"{ckpt.path}: the checkpoint {what} (model {mc.path})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    with _no_progress_bars():
        return save_hf_checkpoint(model.hf, hf_tokenizer(mc), out_dir, overwrite=True, record=False)

