"""Hugging Face causal LMs as 2:4 sparse training targets: load, sparsify, run, save back.

Flow (issue 3, item 6)::

    bundle = load_hf_causal_lm("path/to/llama")         # local directory only, float32, tokenizer if present
    names = sparsify_hf_model(bundle.model, SparsityConfig())   # block linears -> SparseLinear (SR-STE)
    logits = hf_forward(bundle.model, input_ids)         # [B, T, V] float32
    ...train...
    save_hf_checkpoint(bundle.model, bundle.tokenizer, "out/")  # plain HF dir, 2:4 zeros in dense weights

Supported: decoder-only causal LMs whose decoder blocks form one ``nn.ModuleList`` (Llama, Mistral, Qwen2,
GPT-2, GPT-NeoX, Phi, ...; tested on Llama, Qwen2 and GPT-2). The sparse linears are every linear layer inside
the decoder blocks (:func:`hf_sparse_linear_names`); embeddings, norms and ``lm_head`` stay dense, as in
Hu et al. (ICML 2024) and the AST paper (Huang et al., AAAI 2025), which leave them dense too.

GPT-2 stores its block linears as ``transformers.pytorch_utils.Conv1D`` with the weight transposed,
``[in, out]`` (``y = x @ W + b``). :func:`sparsify_hf_model` first turns each such layer into an
``nn.Linear`` holding ``Wᵀ [out, in]``, so the N:M groups of :class:`~sparsert.train.sparse_linear.SparseLinear`
run along the input dimension K like every other sparse linear in sparsert; :func:`save_hf_checkpoint`
transposes them back, so the saved Conv1D weights ``[in, out]`` have 2 non-zeros in every 4 consecutive
*rows* (the input dimension).

Mixture-of-experts models (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, ... in transformers 5) hold their experts as
fused 3-D parameters, which no linear layer reaches. :func:`sparsify_hf_model` (and the callers that load a
model to train, prune or serve it) first turns them into per-expert ``nn.Linear`` layers
(:func:`sparsert.runtime.moe_experts.unfuse_experts`, ``model.layers.0.mlp.experts.3.gate_up_proj``), so the
experts are sparsified like any other MLP linear; :func:`folded_state_dict` stacks them back into the fused
layout transformers loads. The routers and the scalar gates beside the experts (``mlp.gate``,
``shared_expert_gate``) stay dense: they are a few weights that decide where every token goes.

``transformers`` is optional (the ``hf`` extra) and imported lazily.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsert.runtime.errors import ArtifactError, ConfigError
from sparsert.runtime.fileio import replace_dir
from sparsert.runtime.hf_tokenizer import HFTokenizer, import_transformers
from sparsert.runtime.moe_experts import (
    expert_weight,
    fused_expert_state,
    fused_experts_modules,
    refuse_experts,
    unfuse_experts,
    unfused_experts_of,
)
from sparsert.train.sparse_linear import SparseLinear, SparsityConfig
from sparsert.train.sparsify import sparsify_model

# Where common architectures keep their decoder blocks (tried before a generic search).
_BLOCK_LISTS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "transformer.blocks",
                "transformer.layers")
_ATTENTION_WORDS = ("attn", "attention")
_ROUTER_NAMES = ("gate", "router")  # a linear named so (or "..._gate") routes tokens: kept dense
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                    "vocab.txt")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# Attribute set on the model: names of block linears that were transformers Conv1D ([in, out]) layers.
TRANSPOSED_ATTR = "sparsert_conv1d_names"
SPARSERT_FILE = "sparsert.json"


@dataclass
class HFModelBundle:
    """A loaded Hugging Face causal LM: the ``transformers`` model (``PreTrainedModel``, eval mode), its
    tokenizer (:class:`HFTokenizer`, or None when the directory has no tokenizer files), its config
    (``PretrainedConfig``) and the directory it came from."""

    model: nn.Module
    tokenizer: HFTokenizer | None
    config: Any
    path: Path | None = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_config_json(p: Path) -> dict:
    if not p.exists():
        raise ConfigError(f"{p}: Hugging Face model directory does not exist")
    if not p.is_dir():
        raise ConfigError(f"{p}: expected a Hugging Face model directory, got a file")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{p}: no config.json, not a Hugging Face model directory (expected save_pretrained output)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{cfg_file}: not a readable JSON file ({_first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object")
    return raw


def check_causal_lm_config(config: Any, where: str = "model") -> None:
    """Raise ConfigError unless ``config`` (a transformers ``PretrainedConfig``) describes a decoder-only
    causal LM: encoder-decoder models, encoders (BERT, RoBERTa, ...) and model types without a causal-LM head
    are refused with a one-line message."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    expected = "expected a decoder-only causal LM such as Llama, Mistral, Qwen2 or GPT-2"
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{where}: not a causal language model (model_type '{model_type}' is an encoder-decoder; "
                          f"{expected})")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{where}: not a causal language model (model_type '{model_type}' has no causal-LM head; "
                          f"{expected})")
    # BERT-like encoders also register an "LMHead" causal class, usable only when configured as a decoder.
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ConfigError(f"{where}: not a causal language model (model_type '{model_type}' is an encoder; "
                          f"{expected})")


def load_hf_config(path: str | Path) -> Any:
    """The ``PretrainedConfig`` of a local causal-LM directory, checked by :func:`check_causal_lm_config`.

    ConfigError for a missing directory, a directory without ``config.json``, an unknown model type or a
    model that is not a decoder-only causal LM.
    """
    p = Path(path)
    raw = _read_config_json(p)
    transformers = import_transformers("loading a Hugging Face model")
    if "model_type" not in raw:
        raise ConfigError(f"{p / 'config.json'}: no 'model_type', not a Hugging Face model config")
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - config classes validate with their own error types (huggingface_hub's)
        cause = exc.__cause__ if exc.__cause__ is not None else exc  # the validator's own message
        raise ConfigError(f"{p}: cannot read the model config ({_first_line(cause)})") from None
    check_causal_lm_config(config, str(p))
    _check_routing(config, p / "config.json")
    return config


EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k")


def _check_routing(config: Any, where: Path) -> None:
    """ConfigError when a mixture-of-experts config routes each token to more experts than it has (the router's
    top-k would fail deep inside the forward)."""
    def first_int(keys: tuple[str, ...]) -> tuple[str, int] | None:
        for key in keys:
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return key, value
        return None

    experts, top_k = first_int(EXPERT_COUNT_KEYS), first_int(TOP_K_KEYS)
    # one expert means no router in several families (Jamba's num_experts=1 is a dense MLP)
    if experts is not None and top_k is not None and experts[1] > 1 and top_k[1] > experts[1]:
        raise ConfigError(f"{where}: {top_k[0]} {top_k[1]} exceeds {experts[0]} {experts[1]} (each token is routed to "
                          "that many distinct experts)")


def hf_directory_block_linears(path: str | Path) -> dict[str, bool]:
    """:func:`hf_sparse_linear_names` of the model in directory ``path`` (MoE experts unfused), each with whether
    the layer is a transformers ``Conv1D`` (GPT-2; its weight stored ``[K, out]``), without reading its weights:
    the model is built from its config on the meta device. ConfigError as :func:`load_hf_config`, and for a
    config transformers cannot build a model from."""
    model = meta_causal_lm(path)
    unfuse_experts(model)
    return block_linears(model)


def block_linears(model: nn.Module) -> dict[str, bool]:
    """:func:`hf_sparse_linear_names` of ``model`` (experts unfused first, if any), each with whether the layer is
    a transformers ``Conv1D`` (its weight ``[K, out]``)."""
    return {name: _is_conv1d(model.get_submodule(name)) for name in hf_sparse_linear_names(model)}


def meta_causal_lm(path: str | Path) -> nn.Module:
    """The model of directory ``path`` built from its ``config.json`` on the meta device (shapes, no weights).
    ConfigError as :func:`load_hf_config`, and for a config transformers cannot build a model from."""
    config = load_hf_config(path)
    transformers = import_transformers("loading a Hugging Face model")
    try:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: cannot build the model from its config.json ({_first_line(exc)})") from None


def has_tokenizer_files(path: str | Path) -> bool:
    """True when the model directory ``path`` holds one of :data:`TOKENIZER_FILES`."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def _dtype_kwarg(transformers: Any) -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_hf_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32,
                      load_tokenizer: bool = True) -> HFModelBundle:
    """Load the local Hugging Face causal LM directory ``path`` (never downloads).

    The model comes back in ``dtype`` (float32 default, for training) and eval mode; its tokenizer is
    loaded when the directory holds tokenizer files (else ``tokenizer`` is None). Raises ConfigError for a
    directory that is missing, has no ``config.json``, or is not a decoder-only causal LM; ArtifactError when
    the weights are absent, unreadable, do not cover the model (missing or mis-shaped tensors, which
    transformers would otherwise initialise at random) or hold NaN or infinity.
    """
    p = Path(path)
    config = load_hf_config(p)
    transformers = import_transformers("loading a Hugging Face model")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise ArtifactError(f"{p}: no model weights (expected one of {', '.join(_WEIGHT_FILES)})")
    # Mis-shaped tensors are let through and reported below, naming the tensor and both shapes (transformers raises
    # on them with "see the above report!" after a table on stderr, kept quiet here).
    kwargs = {"local_files_only": True, "output_loading_info": True, "ignore_mismatched_sizes": True,
              _dtype_kwarg(transformers): dtype}
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _load_report() as report:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(str(p), config=config, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ArtifactError(f"{p}: cannot load the model weights ({_conversion_error(report) or _first_line(exc)})"
                            ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = list(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)  # a set: the first named is the same each time
    if missing:
        raise ArtifactError(f"{p}: the weights lack {len(missing)} tensor(s) of the model, e.g. '{missing[0]}'")
    if mismatched:
        first = mismatched[0]
        if isinstance(first, (tuple, list)) and len(first) == 3:
            name, stored, expected = first[0], list(first[1]), list(first[2])
            what = f"'{name}' is {stored} in the weights but {expected} by config.json"
        else:
            what = f"e.g. '{first[0] if isinstance(first, (tuple, list)) else first}'"
        raise ArtifactError(f"{p}: config.json does not match the weights: {len(mismatched)} tensor(s) of another "
                            f"shape, {what}")
    with torch.no_grad():  # NaN weights would load, then give NaN logits or fail a later check misleadingly
        for name, t in model.named_parameters():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"{p}: the model's tensor '{name}' holds non-finite values (NaN or infinity)")
    tokenizer = None
    if load_tokenizer and has_tokenizer_files(p):
        tokenizer = HFTokenizer(p)
        n_emb = model.get_input_embeddings().weight.shape[0]
        if tokenizer.vocab_size > n_emb:
            raise ConfigError(f"{p}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding "
                              f"has only {n_emb} rows")
    return HFModelBundle(model=model, tokenizer=tokenizer, config=config, path=p)


@contextlib.contextmanager
def _load_report() -> Iterator[list[str]]:
    """Keep (instead of printing) the load report transformers logs while loading weights: a list of its messages.
    A weight conversion that fails (stored expert tensors that do not stack, for one) raises only "see the above
    report"; :func:`_conversion_error` takes the tensor and the cause from it."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    log = logging.getLogger("transformers.modeling_utils")  # the logger from_pretrained reports on
    handler, level, propagate = Keep(logging.WARNING), log.level, log.propagate
    log.setLevel(logging.WARNING)
    log.propagate = False
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def _conversion_error(report: list[str]) -> str | None:
    """``cannot build 'tensor' from the stored tensors: cause`` from a load report with a failed conversion."""
    for message in report:
        key = re.search(r"^(\S+)\s*\|\s*CONVERSION", message, re.M)
        if key is None:
            continue
        cause = re.search(r"^\w*(?:Error|Exception): (.+)$", message, re.M)
        return (f"cannot build '{key.group(1)}' from the stored tensors: "
                f"{cause.group(1) if cause else 'the conversion failed'}")
    return None


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks: ``model.layers`` (Llama, Mistral, Qwen2),
    ``transformer.h`` (GPT-2), ...; else the first ModuleList with ``config.num_hidden_layers`` entries.
    ConfigError when there is none."""
    n = _num_layers(model)
    for name in _BLOCK_LISTS:
        try:
            blocks = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and (n is None or len(blocks) == n):
            return name, blocks
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and n is not None and len(module) == n:
            return name, module
    raise ConfigError(f"{type(model).__name__}: cannot find the decoder blocks (a ModuleList of "
                      f"{n if n is not None else 'num_hidden_layers'} layers)")


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def _is_block_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, SparseLinear)) or _is_conv1d(module)


def _is_router(rel_name: str, module: nn.Module) -> bool:
    """A MoE router or scalar gate: a linear named ``gate``/``router``/``*_gate``, or inside a module so named
    (HunYuan's ``mlp.gate.wg``), narrower than its input (a gated MLP's ``gate`` projection, wider than its input,
    is not one)."""
    parts = rel_name.lower().split(".")
    if not any(p in _ROUTER_NAMES or p.endswith("_gate") for p in parts):
        return False
    out, k = module.weight.shape if not _is_conv1d(module) else module.weight.shape[::-1]
    return out < k


def hf_sparse_linear_names(model: nn.Module, include_attention: bool = True, include_mlp: bool = True) -> list[str]:
    """Qualified names of the linear layers inside the decoder blocks, block by block in module order.

    A layer is an attention layer when a module on its path inside the block has "attn" or "attention" in
    its name (``self_attn.q_proj``, ``attn.c_attn``); every other block linear counts as MLP
    (``mlp.gate_proj``, ``mlp.c_fc``, an unfused expert's ``mlp.experts.3.down_proj``). ``nn.Linear``,
    transformers ``Conv1D`` and already-swapped ``SparseLinear`` layers are listed; embeddings, norms,
    ``lm_head`` and MoE routers (a linear named ``gate``, ``router`` or ``*_gate`` with fewer outputs than
    inputs, such as Qwen2-MoE's ``shared_expert_gate``) never are. Fused experts are listed only once unfused
    (:func:`unfuse_experts`).
    """
    if not (include_attention or include_mlp):
        raise ConfigError("hf sparse linears: include_attention and include_mlp are both off, nothing to sparsify")
    prefix, blocks = find_decoder_blocks(model)
    names = []
    for i, block in enumerate(blocks):
        for rel, module in block.named_modules():
            if not rel or not _is_block_linear(module) or _is_router(rel, module):
                continue
            path = rel.split(".")[:-1]
            is_attention = any(w in part.lower() for part in path for w in _ATTENTION_WORDS)
            if (include_attention if is_attention else include_mlp):
                names.append(f"{prefix}.{i}.{rel}")
    return names


def conv1d_to_linear(model: nn.Module, names: list[str]) -> list[str]:
    """Replace each named transformers ``Conv1D`` (weight ``[in, out]``) by an ``nn.Linear`` with weight
    ``Wᵀ [out, in]`` and the same bias Parameter; same outputs up to float rounding. The converted names
    are recorded on the model (attribute ``sparsert_conv1d_names``) so :func:`save_hf_checkpoint` restores
    the Conv1D layout. Returns the names converted."""
    converted = []
    for name in names:
        module = model.get_submodule(name)
        if not _is_conv1d(module):
            continue
        w = module.weight  # [in, out]
        linear = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w.t())
        linear.weight.requires_grad_(w.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        model.set_submodule(name, linear)
        converted.append(name)
    if converted:
        known = set(getattr(model, TRANSPOSED_ATTR, ()))
        setattr(model, TRANSPOSED_ATTR, sorted(known | set(converted)))
    return converted


def sparsify_hf_model(
    model: nn.Module,
    cfg: SparsityConfig | None = None,
    names: list[str] | None = None,
    *,
    include_attention: bool = True,
    include_mlp: bool = True,
    dense: bool = False,
) -> list[str]:
    """Swap the block linears of a transformers causal LM for :class:`SparseLinear` (SR-STE, Zhou et al.,
    ICLR 2021) in place, through :func:`sparsert.train.sparsify.sparsify_model`.

    ``names`` defaults to :func:`hf_sparse_linear_names` (with the include flags). Fused MoE experts are unfused
    (:func:`unfuse_experts`) and GPT-2 Conv1D layers converted to ``nn.Linear`` first (:func:`conv1d_to_linear`),
    so every mask is ``[out, K]`` with its N:M groups along the input dimension K. Returns the names swapped.
    FormatError (naming the layer) when a
    layer's input dimension is not divisible by M.
    """
    unfuse_experts(model)
    if names is None:
        names = hf_sparse_linear_names(model, include_attention, include_mlp)
    names = list(names)
    conv1d_to_linear(model, names)
    return sparsify_model(model, cfg if cfg is not None else SparsityConfig(), names, dense=dense)


def hf_forward(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a transformers causal LM: input_ids int64 [B, T] -> float32 [B, T, V] (no KV cache)."""
    return model(input_ids=input_ids, use_cache=False).logits.float()


def folded_state_dict(model: nn.Module, *, consume: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict in plain transformers layout, ready for ``save_pretrained``.

    Each SparseLinear contributes ``<name>.weight`` = the weight its forward pass uses (``W ⊙ mask``,
    INT4 fake-quantized when trained with QAT; plain ``W`` for a layer in dense mode), float ``[out, K]``,
    and no ``.mask``; layers converted from Conv1D are transposed back to ``[K, out]``, and unfused experts
    stacked back into their fused parameters (:func:`~sparsert.runtime.moe_experts.fused_expert_state`). Other
    tensors are the model's own (shared tensors, e.g. tied embeddings, stay shared). ``consume``: each folded
    weight also replaces the layer's own (its values outside the mask are lost), so the model and the state do not
    hold two copies of the sparse weights; for a model saved and then dropped.
    """
    state = model.state_dict()
    transposed = set(getattr(model, TRANSPOSED_ATTR, ()))
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            state.pop(f"{name}.mask", None)
            w = module.effective_weight()
            if consume:
                state[f"{name}.weight"] = module.weight.data = w  # the state's old reference goes first
        elif isinstance(module, nn.Linear) and name in transposed:
            w = module.weight.detach()
        else:
            continue
        state[f"{name}.weight"] = w.t().contiguous() if name in transposed else w
    return fused_expert_state(state, unfused_experts_of(model))


def _save_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.save_pretrained).parameters
    return {"safe_serialization": True} if "safe_serialization" in params else {}


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def saved_sparse_layers(path: str | Path) -> dict[str, dict] | None:
    """The sparse layers the ``sparsert.json`` of a directory :func:`save_hf_checkpoint` wrote records: layer name
    -> ``{"n", "m", "dense", "qat_group_size", "transposed"}``; None when the directory has no such file.
    ArtifactError naming the file when it is malformed."""
    file = Path(path) / SPARSERT_FILE
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        layers = meta["sparse_layers"]
        if meta.get("format") != "sparsert-hf-checkpoint" or not isinstance(layers, dict):
            raise ValueError("not a sparsert-hf-checkpoint file")
        if meta.get("version", 1) != 1:
            raise ValueError(f"version {meta['version']!r}; this sparsert reads version 1")
        for name, info in layers.items():
            if not isinstance(info, dict):
                raise ValueError(f"layer {name!r}: expected an object with n, m, dense and qat_group_size, got "
                                 f"{type(info).__name__}")
            n, m, group = info["n"], info["m"], info["qat_group_size"]
            if not (_positive_int(n) and _positive_int(m) and isinstance(info["dense"], bool)
                    and (group is None or _positive_int(group))):
                raise ValueError(f"layer {name!r}: n, m, dense or qat_group_size of the wrong type or not positive")
            if n > m or not isinstance(info.get("transposed", False), bool):
                raise ValueError(f"layer {name!r}: n {n} exceeds m {m}" if n > m
                                 else f"layer {name!r}: 'transposed' must be true or false")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{file}: not a valid sparsert layer record ({_first_line(exc)})") from None
    return layers


def served_as_2_4(info: dict) -> bool:
    """Whether a layer :func:`saved_sparse_layers` records is one sparsert serves as 2:4: trained sparse (not
    dense) with at most 2 of every 4 weights kept."""
    return not info["dense"] and info["m"] == 4 and info["n"] <= 2


def _experts_to_serve(model: nn.Module, layers: dict[str, dict] | None) -> list[str]:
    """The model's fused experts modules with an expert the record serves as 2:4 (without a record: with an expert
    matrix that is 2:4 along K); the others, dense, are better left to transformers' fused kernels."""
    from sparsert.runtime.nm_mask import is_nm_sparse

    found = []
    for name, layout in fused_experts_modules(model).items():
        if layers is not None:
            if any(n.startswith(f"{name}.") and served_as_2_4(info) for n, info in layers.items()):
                found.append(name)
            continue
        module = model.get_submodule(name)
        if any((w := expert_weight(module, layout, param, e)).shape[1] % 4 == 0 and is_nm_sparse(w, 2, 4)
               for param in layout.params for e in range(layout.num_experts)):
            found.append(name)
    return found


def swap_saved_sparse_layers(model: nn.Module, path: str | Path, **swap_options: Any):
    """:func:`sparsert.runtime.linear_swap.swap_sparse_linears` on a model loaded from ``path``: the layers its
    ``sparsert.json`` records as trained 2:4 (not the ones trained dense), INT4 with their QAT group where they
    trained with QAT (the saved weights are the dequantized codes, so quantizing them again gives the same
    codes); without the file, every linear whose weight is 2:4. Fused MoE experts modules holding an expert the
    file records as 2:4 (without it: a 2:4 expert) are unfused first (:func:`~sparsert.runtime.moe_experts.
    unfuse_experts`), so 2:4 experts are served as 2:4 too; the others stay fused, on transformers' kernels.
    Every group of layers is checked before the first is swapped: an error leaves the model as it was. Returns
    the (merged) SwapReport."""
    from sparsert.runtime.linear_swap import SwapReport, check_swap, swap_sparse_linears

    layers = saved_sparse_layers(path)
    experts = _experts_to_serve(model, layers)
    unfuse_experts(model, experts)  # 2:4 experts become linear layers the swap reaches
    swapped = False
    try:
        if layers is None:
            report = swap_sparse_linears(model, **swap_options)
            swapped = True
            return report
        groups: dict[int | None, list[str]] = {}
        for name, info in layers.items():
            if served_as_2_4(info):
                groups.setdefault(info["qat_group_size"], []).append(name)
        if not groups:
            raise ConfigError(f"{Path(path) / SPARSERT_FILE}: no layer was trained 2:4 (nothing for sparsert's 2:4 "
                              "kernels to run)")
        options = {g: {"int4": True, "group_size": g} if g is not None else {} for g in groups}
        for group, names in groups.items():
            check_swap(model, names, **options[group], prune=swap_options.get("prune", False))
        merged = SwapReport()
        for group, names in groups.items():
            merged.add(swap_sparse_linears(model, names, **options[group], **swap_options))
            swapped = True
        return merged
    finally:
        if not swapped:  # nothing was swapped: the experts go back into their fused tensors
            refuse_experts(model, experts)


def save_hf_checkpoint(model: nn.Module, tokenizer: HFTokenizer | Any | None, out_dir: str | Path, *,
                       overwrite: bool = False, dtype: torch.dtype | None = None, record: bool = True,
                       consume: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face directory that ``transformers`` loads as is.

    The weights are :func:`folded_state_dict` (dense tensors carrying the 2:4 zeros, masks folded in,
    GPT-2's Conv1D layout restored) saved by ``save_pretrained`` as safetensors; ``sparsert.json`` records
    the sparse layers and their N:M pattern. ``tokenizer`` may be an :class:`HFTokenizer`, a transformers
    tokenizer or None. The directory is written under a temporary name beside ``out_dir`` and renamed into
    place, so a failure leaves no half-written checkpoint. ``dtype``: the saved floating tensors' dtype (default:
    the model's), folded in the model's own precision first. ``record=False`` writes no ``sparsert.json`` (a
    plain transformers directory, for a model with no sparse layer). ``consume=True`` folds the masks into the
    model's own weights as it goes (:func:`folded_state_dict`), for a model dropped after the save: the sparse weights
    are not held twice. ConfigError when ``out_dir`` exists and
    ``overwrite`` is False; ArtifactError when writing fails. Returns ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and not (overwrite and out.is_dir()):
        what = "is a file" if out.is_file() else "already exists (pass overwrite=True to replace it)"
        raise ConfigError(f"{out}: output directory {what}")
    hf_tok = tokenizer.hf if isinstance(tokenizer, HFTokenizer) else tokenizer
    if hf_tok is not None and not hasattr(hf_tok, "save_pretrained"):
        raise ConfigError(f"save_hf_checkpoint: tokenizer {type(tokenizer).__name__} is not a Hugging Face "
                          "tokenizer (expected HFTokenizer, a transformers tokenizer or None)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = folded_state_dict(model, consume=consume)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.save_pretrained(str(tmp), state_dict=state, **_save_kwargs(model))
        if dtype is not None:  # save_pretrained writes the model's own dtype: config.json must name the stored one
            config_file = tmp / "config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or [_dtype_kwarg(import_transformers())]
            config.update({k: str(dtype).removeprefix("torch.") for k in keys})
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if hf_tok is not None:
            hf_tok.save_pretrained(str(tmp))
        layers = {}
        for name, module in model.named_modules():
            if isinstance(module, SparseLinear):
                c = module.config
                layers[name] = {"n": c.n, "m": c.m, "dense": module.dense, "qat_group_size": c.qat_group_size,
                                "transposed": name in set(getattr(model, TRANSPOSED_ATTR, ()))}
        meta = {"format": "sparsert-hf-checkpoint", "version": 1, "sparse_layers": layers}
        if record:
            (tmp / SPARSERT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"{out}: cannot write the Hugging Face checkpoint ({_first_line(exc)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
