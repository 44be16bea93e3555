"""The training loop: 2:4 SR-STE (optionally INT4 QAT) or dense, with metrics, checkpoints and resume.

``train(TrainConfig(...)) -> TrainResult``. One run lives in one directory::

    <run_dir>/metrics.jsonl        one line per step and per evaluation (sparsert.train.metrics)
    <run_dir>/checkpoints/...      atomic checkpoints (sparsert.train.checkpoint), the newest two kept
    <run_dir>/artifact/            the compressed 2:4(+INT4) artifact, written at the end

Method: the block linears become :class:`~sparsert.train.sparse_linear.SparseLinear` layers trained with SR-STE
(Zhou et al., ICLR 2021) — forward with ``W ⊙ mask``, straight-through gradient plus ``λ (1 − mask) ⊙ W`` —
with masks recomputed from |W| every ``mask_refresh_interval`` optimizer steps and the flip rate of Hu et al.
(ICML 2024) logged at each refresh. With ``qat`` the kept values are fake-quantized to INT4 (groups along K)
in the forward pass, so the artifact holds exactly the weights the model was trained and evaluated with.
``dense`` trains the same model without masks (the baseline). AdamW (Loshchilov & Hutter 2019) with linear
warm-up and cosine decay, global gradient-norm clipping.

Issue-3 methods, each a :class:`TrainConfig` switch (``method`` sets their paper defaults):

- Hu et al., "Accelerating Transformer Pre-training with 2:4 Sparsity" (ICML 2024): transposable 2:4 masks,
  MVUE24 weight gradients, masked decay on the gradients after clipping and before the optimizer step, a mask
  refresh interval, flip rates per layer and overall (``flip_rate``, ``flip_rate_layers`` at every refresh),
  dense fine-tuning of the last fraction of steps, FFN-only sparsity.
- AST, Huang et al., "Pruning Large Language Models with Semi-Structural Adaptive Sparse Training" (AAAI
  2025): distillation from a dense teacher, adaptive masks (optionally Wanda-scored), the annealed decay, SLoRB.
- Schedules (:mod:`sparsert.train.schedules`): from-scratch N:M, gradual pruning (The Journey Matters, 2025),
  SPDF (Thangarasa et al. 2023); ``init_from`` starts from another run's weights.

The masks follow a :class:`~sparsert.train.sparsify.MaskController`. After dense fine-tuning (or for layers
trained dense with ``sparse_layers="ffn"``) the model as trained is not 2:4: the checkpoint keeps the last
sparse masks, the artifact re-applies them, and the final evaluation also reports the loss of that model
(``val_loss_sparse``). Layers never trained sparse (``sparse_layers="ffn"``: the attention linears) stay
dense in the artifact, as the paper deploys them.

Resume (``resume=True``) restores model, masks, optimizer, step and the data sampler's RNG, truncates the
metrics log back to the checkpoint, and continues bit for bit as if never stopped. The architecture comes
from the checkpoint; a config that differs from the checkpoint's is refused with the list of differences.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fnmatch
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sparsert.runtime.errors import ArtifactError, ConfigError, DataError, SparsertError, StoppedBySignal
from sparsert.runtime.linear_swap import outside_linears_note
from sparsert.runtime.model import DecoderLM, ModelConfig, model_config_from_preset, sparse_linear_names
from sparsert.runtime.moe_experts import EXPERT_PARAMS
from sparsert.runtime.tokenizer import ByteTokenizer, Tokenizer, tokenizer_from_dict
from sparsert.train.ast_distill import Teacher, check_same_tokenizer, distillation_loss
from sparsert.train.checkpoint import (
    Checkpoint,
    load_checkpoint,
    restore_optimizer,
)
from sparsert.train.data import Corpus, TokenData, load_corpus
from sparsert.train.distributed import (  # H11: multi-process training (DDP / FSDP2 under torchrun)
    entered_on_ranks,
    global_mean,
    global_means,
    init_distributed,
    is_main_process,
    local_rows,
    sync_masks,
    unwrap,
)
from sparsert.train.hf_train import (  # H11: sparsert train --model PATH (Hugging Face causal LMs)
    HF_DIR,
    HF_NOTE,
    NO_ROUTER_MESSAGE,
    PREFIX,
    HFCausalLM,
    build_hf_model,
    hf_model_config,
    hf_state,
    hf_tokenizer,
    is_hf_config,
    save_hf_run,
    take_router_aux_loss,
)
from sparsert.train.masked_decay import apply_masked_decay
from sparsert.train.metrics import METRICS_FILE
from sparsert.train.run_dir import check_artifact_target, find_resume_dir, new_run_dir, saved_config
from sparsert.train.sparsify import (
    DENSE_PHASES,
    MaskController,
    mask_sparsity,
    pruned_layer_selection,
    refresh_masks,
    sparse_modules,
    sparsify_model,
)
from sparsert.train.stop_signals import signal_name, stop_requests
from sparsert.train.train_config import (
    PATH_FIELDS,
    TrainConfig,
    config_differences,
    lr_at,
    quantization_record,
    sparsity_config,
    sparsity_record,
)


class TrainingDivergedError(SparsertError):
    """The loss or the gradient became non-finite; training stopped without writing a checkpoint."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    step: int
    final_val_loss: float
    final_val_ppl: float
    checkpoint: Path
    artifact: Path | None
    elapsed_s: float
    # Validation loss of the 2:4 model the artifact holds, when it differs from the trained model (after dense
    # fine-tuning, or with layers trained dense by --sparse-layers ffn); None otherwise.
    final_val_loss_sparse: float | None = None


def build_model(model_config: ModelConfig, cfg: TrainConfig) -> nn.Module:
    """A fresh DecoderLM (seeded by ``cfg.seed``), its block linears sparsified unless ``cfg.dense``.

    With ``sparse_layers="ffn"`` only the feed-forward linears train sparse; the attention linears become
    SparseLinears in dense mode (they carry a mask so a checkpoint says what compression keeps). ConfigError
    naming --sparsity / --group-size when a block linear's K is not a multiple of M / the QAT group size.
    """
    torch.manual_seed(cfg.seed)
    if is_hf_config(model_config):  # H11
        model = build_hf_model(model_config, cfg.router_aux_loss)
    elif cfg.router_aux_loss is not None:
        raise ConfigError(NO_ROUTER_MESSAGE)
    else:
        model = DecoderLM(model_config)
    scfg = sparsity_config(cfg)
    if scfg is not None:
        names = model.sparse_linear_names() if is_hf_config(model_config) else sparse_linear_names(model)  # H11
        sparse = _selected_layers(names, cfg, is_hf_config(model_config))
        _check_layer_k(model, sparse, cfg, is_hf_config(model_config))
        sparsify_model(model, scfg, sparse)
        # the layers trained dense carry a mask too (dense mode) when their K allows one; others stay nn.Linear
        sparsify_model(model, scfg, [n for n in names if n not in sparse and _k_divisible(model, n, cfg.m)],
                       dense=True)
        if cfg.sparse_gemm != "masked":
            use_sparse_gemms(model, sparse, cfg.sparse_gemm)
    return model


def _k_divisible(model: nn.Module, name: str, m: int) -> bool:
    k = getattr(model.get_submodule(name), "in_features", None)
    return not isinstance(k, int) or k % m == 0  # not an nn.Linear: sparsify_model says so


def _check_layer_k(model: nn.Module, names: list[str], cfg: TrainConfig, hf: bool) -> None:
    """ConfigError naming --sparsity or --group-size when the K (input features) of a layer to train 2:4 is not a
    multiple of M or of the INT4 group size; a Hugging Face model's layer by its transformers name, with the
    ``--keep-dense`` that would exempt it."""
    ks = {}
    for name in names:
        k = getattr(model.get_submodule(name), "in_features", None)
        if isinstance(k, int):  # else not an nn.Linear: sparsify_model says so
            ks[name.removeprefix(PREFIX) if hf else name] = k
    common = math.gcd(*ks.values()) if ks else 0
    bad = [name for name, k in ks.items() if k % cfg.m]
    if bad:
        name = bad[0]
        tail = "*." + name.rpartition(".")[2]
        if len(bad) == len(ks):
            hint = ""  # no --keep-dense helps: every layer is concerned
        elif all(fnmatch.fnmatchcase(n, tail) == (n in bad) for n in ks):
            hint = f"; --keep-dense '{tail}' trains {'it' if len(bad) == 1 else f'those {len(bad)}'} dense"
        elif len(bad) == 1:
            hint = f"; --keep-dense '{name}' trains it dense"
        else:
            hint = f"; {len(bad)} of the {len(ks)} layers are (--keep-dense PATTERN trains layers dense)"
        raise ConfigError(f"--sparsity {cfg.n}:{cfg.m}: layer {name} has K={ks[name]} input features, not a multiple "
                          f"of M={cfg.m}; M must divide the K of every layer trained {cfg.n}:{cfg.m} (their greatest "
                          f"common divisor is {common}){hint}")
    for name, k in ks.items():
        if cfg.qat and k % cfg.group_size:
            raise ConfigError(f"--group-size {cfg.group_size}: layer {name} has K={k} input features, not a "
                              "multiple of the INT4 group size; it must divide the K of every layer trained 2:4 "
                              f"(their greatest common divisor is {common})")


def check_sparse_gemm_device(gemm: str, device: torch.device) -> None:
    """``--sparse-gemm cusparselt`` needs a CUDA device and a torch with cuSPARSELt: ConfigError otherwise."""
    if gemm != "cusparselt":
        return
    if device.type != "cuda":
        raise ConfigError(f"--sparse-gemm cusparselt runs on a CUDA GPU; this run trains on {device.type} "
                          "(--device); use --sparse-gemm ours or masked there")
    from sparsert.runtime.cusparselt import cusparselt_status

    why = cusparselt_status()
    if why:
        raise ConfigError(f"--sparse-gemm cusparselt: {why}")


def use_sparse_gemms(model: nn.Module, names: list[str], gemm: str) -> None:
    """Let the sparse layers ``names`` train on the Hu recipe's 2:4 GEMMs (``SparseLinear.gemm``); ConfigError
    naming a layer whose dimensions the sparse GEMMs cannot take (multiples of 64)."""
    from sparsert.train.sparse24_training_linear import DIM_MULTIPLE

    modules = sparse_modules(model)
    for name in names:
        module = modules[name]
        for what, v in (("in_features", module.in_features), ("out_features", module.out_features)):
            if v % DIM_MULTIPLE:
                raise ConfigError(f"--sparse-gemm {gemm}: layer {name} has {what}={v}; the 2:4 GEMMs need "
                                  f"multiples of {DIM_MULTIPLE} (use --sparse-gemm masked for this model)")
        module.gemm = gemm


def sparse_layer_names(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Names of the SparseLinears of ``model`` that ``cfg`` trains sparse (all, or the FFN ones, minus the
    ``keep_dense`` patterns; a pattern may match only layers kept as plain linears, see :func:`build_model`)."""
    return _selected_layers(list(sparse_modules(model)), cfg, isinstance(unwrap(model), HFCausalLM), strict=False)


def _selected_layers(names: list[str], cfg: TrainConfig, hf: bool, *, strict: bool = True) -> list[str]:
    """:func:`~sparsert.train.sparsify.pruned_layer_selection` of ``names`` by ``cfg``; the layers of a Hugging Face
    model (``hf``: given by ``--model``, or by the ``--init-from`` run) are matched by their transformers names
    (``model.layers.0.mlp.up_proj``, without the ``hf.`` of the training module), as ``compress`` and
    ``sparsert.json`` name them."""
    prefix = PREFIX if hf else ""
    bare = {n: n.removeprefix(prefix) for n in names}
    chosen = set(pruned_layer_selection(list(bare.values()), cfg.sparse_layers, cfg.keep_dense, strict=strict))
    return [n for n in names if bare[n] in chosen]


def build_mask_controller(model: nn.Module, cfg: TrainConfig) -> MaskController:
    """The :class:`~sparsert.train.sparsify.MaskController` of a sparse run: ``cfg``'s schedule, refresh
    interval, sparse layers, and AST's adaptive masks (``method="ast"`` or ``wanda_score``)."""
    return MaskController(model, cfg.sparsity_schedule(), cfg.steps, sparse_names=sparse_layer_names(model, cfg),
                          refresh_interval=cfg.mask_refresh_interval, adaptive=cfg.method == "ast",
                          wanda=cfg.wanda_score)


def load_init_weights(model: nn.Module, source: str | Path | Checkpoint) -> Checkpoint:
    """Copy the weights of a sparsert checkpoint (``source``: a loaded one, or a run, checkpoints or step
    directory) into ``model``; its masks, if any, are not used (the caller recomputes masks from the weights).
    Returns the checkpoint. ArtifactError for a missing/corrupt checkpoint or one lacking a tensor of ``model``."""
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source, load_optimizer=False)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(".mask") or ".slorb." in name:
                continue
            src = ckpt.model_state.get(name)
            if src is None or tuple(src.shape) != tuple(tensor.shape):
                what = "has no tensor" if src is None else f"has shape {list(src.shape)} for"
                raise ArtifactError(f"--init-from {ckpt.path}: the checkpoint {what} '{name}' "
                                    f"(the model needs {list(tensor.shape)})")
            tensor.copy_(src.to(tensor.dtype))
    return ckpt


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(state)`` (strict), with an ArtifactError naming ``where`` and the first tensor that
    is missing, extra or of another shape instead of torch's list of every key. A checkpoint of an MoE model
    written before sparsert unfused experts (it holds ``experts.gate_up_proj`` as one 3-D tensor) is named so."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        if missing:
            what = f"lacks '{missing[0]}' ({len(missing)} tensor(s) of the model missing)"
        elif unexpected:
            what = f"has '{unexpected[0]}', which the model does not"
        else:
            what = f"has '{reshaped[0]}' of shape {list(state[reshaped[0]].shape)}, not {list(own[reshaped[0]].shape)}"
        fused = [k for k in unexpected if k.rsplit(".", 1)[-1] in EXPERT_PARAMS]
        hint = (f"; it holds fused MoE experts ('{fused[0]}'), written before sparsert trained experts as "
                "per-expert 2:4 layers: start a new run from the model directory") if fused else ""
        raise ArtifactError(f"{where}: the checkpoint {what}{hint}")
    model.load_state_dict(state)


def _check_tokenizer(state: dict, tokenizer: object, flag: str, where: Path) -> None:
    saved = state.get("tokenizer")
    if saved is None:
        return
    try:
        other = tokenizer_from_dict(saved)  # "byte", or "hf" for a run of `sparsert train --model`
    except ConfigError as exc:
        raise ConfigError(f"{flag} {where}: {exc}") from None
    check_same_tokenizer(other, tokenizer, f"{flag} {where}")


def load_teacher(path: str | Path, vocab_size: int, tokenizer: object, *, flag: str = "--teacher") -> Teacher:
    """The frozen dense distillation teacher (``--teacher``; AST's default one is ``--init-from``) from ``path``: a
    dense sparsert run/checkpoint directory (a built-in model, or a run of ``sparsert train --model HF_DIR``), or a
    Hugging Face causal-LM directory (through :func:`sparsert.train.hf_model.load_hf_causal_lm`).

    ConfigError when the teacher is 2:4 sparse, or its tokenizer or vocabulary differs from the student's
    (``vocab_size``, ``tokenizer``); ArtifactError for a missing or corrupt checkpoint. Messages start with
    ``flag`` and the path: ``"--init-from"`` when the teacher is the run's ``--init-from`` (AST's default).
    """
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{flag} {p}: path does not exist (expected a dense sparsert run or checkpoint, or a "
                            "Hugging Face model directory)")
    is_hf = p.is_dir() and (p / "config.json").is_file() and not (p / "checkpoints").exists() \
        and not (p / "state.json").exists()
    if is_hf:
        from sparsert.train.hf_model import load_hf_causal_lm  # noqa: PLC0415 - transformers is optional

        bundle = load_hf_causal_lm(p)
        if bundle.tokenizer is not None:
            check_same_tokenizer(bundle.tokenizer, tokenizer, f"{flag} {p}")
        module = bundle.model
    else:
        ckpt = load_checkpoint(p, load_optimizer=False)
        if ckpt.state.get("sparsity") is not None:
            if flag == "--init-from":
                raise ConfigError(f"--init-from {ckpt.path}: a sparse checkpoint cannot be the distillation "
                                  "teacher, and --method ast distils from --init-from unless --teacher is given: "
                                  "give --teacher with a dense run (trained with --dense) or a Hugging Face model "
                                  "directory, or --distill-beta 0")
            raise ConfigError(f"--teacher {ckpt.path}: a sparse checkpoint; the distillation teacher must be dense "
                              "(a run trained with --dense, or a Hugging Face model directory)")
        _check_tokenizer(ckpt.state, tokenizer, flag, ckpt.path)
        mc = ckpt.model_config
        module = build_hf_model(mc) if is_hf_config(mc) else DecoderLM(mc)  # an HF run: rebuilt from its directory
        load_model_state(module, {k: v.float() for k, v in ckpt.model_state.items()}, f"{flag} {ckpt.path}")
    try:
        return Teacher(module, vocab_size)
    except ConfigError as exc:  # its vocabulary differs from the student's
        raise ConfigError(f"{flag} {p}: {exc}") from None


def _check_resumed_layers(model: nn.Module, cfg: TrainConfig, ckpt: Checkpoint) -> None:
    """ConfigError when the layers a resumed run would train 2:4 are not those its checkpoint recorded (the same
    options choose other layers in this version of sparsert, e.g. a wider ``--sparse-layers ffn`` rule): resuming
    would silently switch layers between dense and 2:4 mid-run."""
    recorded = (ckpt.state.get("sparsity") or {}).get("layers")
    if not isinstance(recorded, list):
        return
    now = sparse_layer_names(model, cfg)
    if sorted(recorded) != sorted(now):
        changed = sorted(set(recorded) ^ set(now))
        raise ConfigError(f"cannot resume {ckpt.path}: it trained {len(recorded)} layers 2:4, but this version of "
                          f"sparsert chooses {len(now)} for the same options ({changed[0]} "
                          f"{'no longer' if changed[0] in recorded else 'now'} among them); finish it with the "
                          "version that started it, or start a new run")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (norm weights, biases and nothing else undecayed)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class StepResult:
    """Outcome of :func:`train_step`: the loss before the update, the gradient norm before clipping (nan
    when the loss was not finite) and the flip rate when masks were refreshed (else None)."""

    loss: float
    grad_norm: float
    flip_rate: float | None
    # Per-layer flip rates {layer: rate} of the refresh (None when none happened).
    flip_rate_layers: dict[str, float] | None = None
    # Distillation (AST): α·CE + β·T²·KL (the optimised loss, plus coef·router_aux_loss for a MoE model trained
    # with it) and the KL term; ``loss`` stays the cross-entropy.
    loss_total: float | None = None
    kl: float | None = None
    # The mask controller's report (None without one): phase of the next step, masks/modes changed.
    masks_changed: bool = False
    # Wall seconds of the mask work after the optimizer step (refresh, flip rates, rank sync); 0 when dense. On
    # a GPU it also holds the optimizer's queued kernels the refresh waits for (no extra sync is added for it).
    mask_seconds: float = 0.0
    # A MoE model's router load-balancing loss (unweighted; --router-aux-loss), None when the run adds none.
    router_aux_loss: float | None = None


@dataclass
class Distill:
    """What :func:`train_step` needs to distil: the frozen teacher and AST's α, β, T."""

    teacher: Teacher
    alpha: float = 0.33
    beta: float = 0.67
    temperature: float = 2.0


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               step: int, lr: float, grad_clip: float, sparse: bool, masks: MaskController | None = None,
               distill: Distill | None = None, masked_decay: float = 0.0,
               autocast: torch.dtype | None = None) -> StepResult:
    """One optimizer step on a batch (x, y int64 [B, T]).

    Loss: cross-entropy, or with ``distill`` AST's ``α·CE + β·T²·KL(p_teacher ‖ p_student)`` (Huang et al.
    2025), plus ``coef·aux`` when the model is a mixture of experts trained with its router load-balancing loss
    (:func:`~sparsert.train.hf_train.take_router_aux_loss`). Then backward, global-norm clipping, the masked
    decay ``g += masked_decay·(1 − m) ⊙ W`` on the sparse layers' gradients (Hu et al. 2024: after clipping,
    before the optimizer step), the AdamW update, and the masks: ``masks.after_step(step)`` when a
    :class:`MaskController` is given, else (``sparse``) the layers' own refresh due at ``step``. Stops before
    touching the weights when the loss or the gradient norm is not finite (the caller decides what to do).
    ``autocast``: run the model's (and the teacher's) forward under ``torch.autocast`` in that dtype
    (``--sparse-gemm ours|cusparselt``: the sparse GEMMs are bf16); the loss is then computed in float32 from the
    logits.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device_type=x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        logits = model(x)
        teacher_logits = distill.teacher(x) if distill is not None else None
    if autocast is not None:  # the loss in float32, outside the autocast region
        logits = logits.float()
        teacher_logits = None if teacher_logits is None else teacher_logits.float()
    if distill is not None:
        parts = distillation_loss(logits, teacher_logits, y, distill.alpha, distill.beta, distill.temperature)
        loss, watched = parts.total, [parts.ce, parts.total, parts.kl]
    else:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        watched = [loss]
    router = take_router_aux_loss(model)  # a MoE model's load-balancing loss, weighted into the objective
    if router is not None:
        coef, aux = router
        loss = loss + coef * aux.to(loss.device)
        watched.append(aux)
    optimizer.zero_grad(set_to_none=True)
    # Backward runs even on a non-finite loss (it only writes gradients): the loss, the distillation terms and
    # the gradient norm then reach the host in one transfer, the step's only device sync before the update.
    loss.backward()
    grad_norm_t = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(grad_norm_t, "full_tensor"):  # FSDP2: a replicated DTensor
        grad_norm_t = grad_norm_t.full_tensor()
    values = torch.stack([t.detach().float() for t in watched] + [grad_norm_t.detach().float().to(loss.device)])
    *losses, grad_norm = values.tolist()
    aux = losses.pop() if router is not None else None
    loss_value, total, kl = losses if distill is not None else (losses[0], None, None)
    # H11: the global batch's means, reduced before the finiteness test so every rank takes the same decision
    loss_value, total, kl, aux = global_means(loss_value, total, kl, aux)
    if total is not None and aux is not None:  # loss_total is the whole objective, router term included
        total += router[0] * aux
    check = total if distill is not None else loss_value
    if aux is not None and not math.isfinite(aux):
        check = aux
    if not math.isfinite(check):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(check, float("nan"), None, loss_total=total, kl=kl, router_aux_loss=aux)
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, grad_norm, None, loss_total=total, kl=kl, router_aux_loss=aux)
    if masked_decay:
        with local_rows(model):  # H11: under FSDP2, this rank's rows of W, its gradient and mask
            apply_masked_decay(model, masked_decay)
    optimizer.step()
    t0 = time.perf_counter()
    if masks is not None:
        update = sync_masks(model, lambda: masks.after_step(step))  # H11: the same masks on every rank
        return StepResult(loss_value, grad_norm, update.flip_rate, update.flip_rate_layers, total, kl,
                          update.changed, time.perf_counter() - t0, aux)
    if not sparse:
        return StepResult(loss_value, grad_norm, None, loss_total=total, kl=kl, router_aux_loss=aux)
    flip = sync_masks(model, lambda: refresh_masks(model, step))  # H11: the same masks on every rank
    layers = None
    if flip is not None:
        layers = {name: m.last_flip_rate for name, m in sparse_modules(model).items()
                  if not m.dense and step % m.config.mask_refresh_interval == 0}
    return StepResult(loss_value, grad_norm, flip, layers, total, kl, flip is not None, time.perf_counter() - t0,
                      aux)


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, batch_size: int, seq_len: int, max_batches: int) -> float:
    """Mean validation cross-entropy (nats/token) over the fixed validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data.val_batches(batch_size, seq_len, max_batches):
        logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return global_mean(total / max(count, 1))  # H11: ranks evaluate equal shares of every batch


def _rng_to_str(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _restore_rng(set_state, s: object, where: str) -> None:  # noqa: ANN001 - Generator.set_state or torch's
    try:
        set_state(torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8).clone())
    except (ValueError, TypeError, RuntimeError):
        raise ArtifactError(f"{where}: the saved RNG state is missing or invalid") from None


def _say(msg: str) -> None:
    if is_main_process():  # H11: rank 0 speaks for the run
        tqdm.write(msg, file=sys.stderr)


def _open_run(cfg: TrainConfig) -> tuple[Path, Checkpoint | None, Checkpoint | None, ModelConfig]:
    """(run directory, the checkpoint a resume continues, the one ``--init-from`` starts from, model config):
    a resumed run's saved config must equal ``cfg`` (ConfigError listing the differences); a new run's
    ``--out`` is checked before anything is loaded or written."""
    ckpt: Checkpoint | None = None
    init_ckpt: Checkpoint | None = None
    if cfg.resume:
        run_dir = find_resume_dir(cfg)
        ckpt = load_checkpoint(run_dir)
        saved = saved_config(ckpt, run_dir)
        if saved.hf_model is not None and not Path(saved.hf_model).is_dir():
            raise ConfigError(f"cannot resume {run_dir}: the Hugging Face model directory it was started from "
                              f"({saved.hf_model}) no longer exists; put it back at that path to resume")
        diffs = config_differences(saved, cfg)
        if saved.sparse_gemm != cfg.sparse_gemm and not diffs:
            _say(f"note: {run_dir} trained with --sparse-gemm {saved.sparse_gemm}; it continues with --sparse-gemm "
                 f"{cfg.sparse_gemm}")
        if diffs:
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from its checkpoint's ({'; '.join(diffs)}); "
                "resume without those options, or start a new run"
            )
        model_config = ckpt.model_config
        check_artifact_target(run_dir, cfg, model_config)
    else:
        run_dir = new_run_dir(cfg)  # a bad --out is refused now, before anything is loaded or written
        if cfg.init_from is not None:  # the architecture comes from the checkpoint the run starts from
            if not Path(cfg.init_from).exists():
                raise ArtifactError(f"--init-from {cfg.init_from}: checkpoint path does not exist (expected a "
                                    "sparsert run, its checkpoints/ or a step directory)")
            init_ckpt = load_checkpoint(cfg.init_from, load_optimizer=False)
            model_config = init_ckpt.model_config
        else:
            model_config = (hf_model_config(cfg.hf_model) if cfg.hf_model is not None  # H11: --model PATH
                            else model_config_from_preset(cfg.preset, cfg.arch))
    return run_dir, ckpt, init_ckpt, model_config


def _load_data(cfg: TrainConfig, tokenizer: Tokenizer, ckpt: Checkpoint | None,
               run_dir: Path) -> tuple[Corpus, TokenData, str]:
    """(corpus, its token data, the tokens' digest): DataError now, before anything is written, if the corpus
    cannot split or a split is too short for ``seq_len``; ConfigError when a resumed run's data changed."""
    corpus = load_corpus(cfg.data, max_bytes=cfg.max_data_bytes)
    try:  # fail now, before anything is written, if the corpus cannot split or a split is too short for seq_len
        data = TokenData.from_corpus(corpus, tokenizer)
        data.get_batch("train", 1, cfg.seq_len, generator=torch.Generator())
        next(iter(data.val_batches(1, cfg.seq_len, 1)))
    except DataError as exc:
        raise DataError(f"--data {cfg.data or '(the default corpus)'}: {exc}") from None
    data_digest = data.digest()
    if ckpt is not None and ckpt.state.get("data_digest", data_digest) != data_digest:
        raise ConfigError(f"cannot resume {run_dir}: its training data changed since the checkpoint (the tokens "
                          f"of {cfg.data or 'the default corpus'} differ from those it trained on); restore "
                          "the data, or start a new run")
    return corpus, data, data_digest


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as ``cfg`` says; see the module docstring. Returns the run's results.

    Raises ConfigError/DataError before anything is written for bad configs or data; ArtifactError for a
    corrupt checkpoint on resume; TrainingDivergedError (naming the step) when the loss turns non-finite.
    KeyboardInterrupt propagates after saying where the last complete checkpoint is and how to resume. SIGTERM or
    SIGUSR1 (a scheduler ending or warning the job; :mod:`~sparsert.train.stop_signals`) stops the loop after the
    step it arrives in: that step is checkpointed (on every rank at the same step) and StoppedBySignal is raised.
    """
    t_start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dctx = init_distributed(cfg.distributed, device=cfg.device)  # H11: DDP / FSDP2 under torchrun

    run_dir, ckpt, init_ckpt, model_config = _open_run(cfg)
    if cfg.seq_len > model_config.max_seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}")
    if cfg.slorb and is_hf_config(model_config):
        raise ConfigError("--slorb adds SLoRB weights beside every 2:4 layer, which the Hugging Face directory a "
                          "transformers model's run ends with cannot hold; it trains the built-in models only")

    tokenizer = hf_tokenizer(model_config) if is_hf_config(model_config) else ByteTokenizer()  # H11
    if ckpt is None and init_ckpt is not None:
        _check_tokenizer(init_ckpt.state, tokenizer, "--init-from", init_ckpt.path)
    if not isinstance(tokenizer, ByteTokenizer):  # a BPE tokenizer takes a while on a large corpus: say why
        _say(f"tokenizing {cfg.data or 'the default corpus'} with the model's tokenizer ...")
    corpus, data, data_digest = _load_data(cfg, tokenizer, ckpt, run_dir)
    data = dctx.shard_data(data, cfg.batch_size)  # H11: this rank's share of every global batch
    distill = None
    if cfg.distills:  # ConfigError here for a teacher whose vocabulary/tokenizer differs
        # AST's default teacher is --init-from: errors name the flag the user gave
        flag = "--init-from" if getattr(cfg, "_teacher_from_init", False) else "--teacher"
        distill = Distill(load_teacher(cfg.teacher, model_config.vocab_size, tokenizer, flag=flag),
                          cfg.distill_alpha, cfg.distill_beta, cfg.distill_temperature)

    model = build_model(model_config, cfg)  # ConfigError here for a K the sparsity/group size does not fit
    dctx.prepare(model)  # H11: to cuda:LOCAL_RANK under torchrun with GPUs; FSDP2's shard check
    check_sparse_gemm_device(cfg.sparse_gemm, dctx.device)
    if distill is not None:
        distill.teacher.module.to(dctx.device)
    scfg = sparsity_config(cfg)
    masks = build_mask_controller(model, cfg) if scfg is not None else None
    if ckpt is None:
        if init_ckpt is not None:
            load_init_weights(model, init_ckpt)
        if masks is not None:
            masks.begin(0, fresh=True)
    if cfg.slorb:
        from sparsert.train.slorb import attach_slorb  # noqa: PLC0415

        attach_slorb(model, cfg.slorb_k)  # S from the pruned weights (a resume overwrites it below)
    optimizer = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    mvue_gen = None
    if scfg is not None and cfg.mvue:
        # The masked path samples on the model's device; the sparse GEMMs only draw one seed per layer and step,
        # from a CPU generator, so that draw never waits for the GPU.
        gen_device = next(model.parameters()).device if cfg.sparse_gemm == "masked" else torch.device("cpu")
        mvue_gen = torch.Generator(device=gen_device).manual_seed(cfg.seed + 2)
        for module in sparse_modules(model).values():
            module.generator = mvue_gen
    start_step = 0
    metrics_offset = None
    if ckpt is not None:
        _check_resumed_layers(model, cfg, ckpt)
        load_model_state(model, ckpt.model_state, f"cannot resume {ckpt.path}")
        restore_optimizer(optimizer, model, ckpt)
        where = f"{ckpt.path}/state.json"
        _restore_rng(gen.set_state, ckpt.state.get("data_rng"), where)
        _restore_rng(torch.set_rng_state, ckpt.state.get("torch_rng"), where)
        if mvue_gen is not None:
            saved_on = ckpt.state.get("mvue_rng_device", "cpu")
            if saved_on == mvue_gen.device.type:
                _restore_rng(mvue_gen.set_state, ckpt.state.get("mvue_rng"), where)
            else:  # CPU and CUDA generators have different states (and draws): continue with a fresh stream
                mvue_gen.manual_seed(cfg.seed + 2 + ckpt.step)
                _say(f"note: resuming on {mvue_gen.device.type} a run checkpointed on {saved_on}: the MVUE24 "
                     "sampler continues with a new random stream")
        cuda_rng = ckpt.state.get("cuda_rng")
        if cuda_rng is not None and dctx.device.type == "cuda":  # dropout draws on the GPU (HF GPT-2)
            _restore_rng(lambda t: torch.cuda.set_rng_state(t, dctx.device), cuda_rng, where)
        start_step = ckpt.step
        metrics_offset = int(ckpt.state.get("metrics_offset", 0))
        if masks is not None:
            masks.load_state_dict(ckpt.state.get("masks") or {}, where)
            masks.begin(start_step, fresh=False)
    else:
        if init_ckpt is not None and "data_rng" in init_ckpt.state:  # continue the pre-training's data order
            _restore_rng(gen.set_state, init_ckpt.state["data_rng"], f"{init_ckpt.path}/state.json")
    run_dir = dctx.broadcast(run_dir)  # H11: rank 0's run directory (its timestamp) on every rank
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: expected a run directory, got a file")
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.out_dir is None:
        cfg = dataclasses.replace(cfg, out_dir=str(run_dir))
    for name in PATH_FIELDS:
        if getattr(cfg, name) is not None:
            cfg = dataclasses.replace(cfg, **{name: str(Path(getattr(cfg, name)).resolve())})

    base_state = {
        "model_config": model_config.to_dict(),
        "train_config": cfg.to_dict(),
        "sparsity": None if scfg is None else {**sparsity_record(cfg), "layers": sparse_layer_names(model, cfg)},
        "quantization": quantization_record(cfg),
        "tokenizer": tokenizer.to_dict(),
        "data_digest": data_digest,  # sha256 of the token streams: a resume on changed data is refused
        **hf_state(model_config),  # H11: {"hf_model": path} for a Hugging Face model
    }
    outside_note = outside_linears_note(getattr(model, "hf", model))  # HFCausalLM.hf; before FSDP2 shards them
    model, optimizer = dctx.wrap(model, optimizer, lambda m: build_optimizer(m, cfg))  # H11: DDP / FSDP2
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last_ckpt: Path | None = ckpt.path if ckpt is not None else None
    last_ckpt_step = start_step if ckpt is not None else None
    val_loss = float("nan")
    val_sparse: float | None = None
    sparsity = mask_sparsity(model)
    step = start_step
    last_flip: float | None = None

    def checkpoint(at: int) -> None:
        nonlocal last_ckpt, last_ckpt_step
        state = dict(base_state, data_rng=_rng_to_str(gen.get_state()), torch_rng=_rng_to_str(torch.get_rng_state()),
                     metrics_offset=metrics.offset(), tokens_seen=at * tokens_per_step)
        if mvue_gen is not None:
            state["mvue_rng"] = _rng_to_str(mvue_gen.get_state())
            state["mvue_rng_device"] = mvue_gen.device.type
        if dctx.device.type == "cuda":
            state["cuda_rng"] = _rng_to_str(torch.cuda.get_rng_state(dctx.device))
        if masks is not None:
            # layers training dense get the masks compression would keep (H11: on every rank)
            sync_masks(model, masks.prepare_checkpoint)
            state["masks"] = masks.state_dict()
        # H11: the full state, gathered from the ranks, written by rank 0
        last_ckpt = dctx.save_checkpoint(run_dir, at, model, optimizer, state, keep=cfg.keep_checkpoints)
        last_ckpt_step = at

    # A fresh run starts a new log (a run interrupted before its first checkpoint may have left one).
    metrics = dctx.metrics_log(run_dir / METRICS_FILE, truncate_to=0 if ckpt is None else metrics_offset)  # H11
    # Into a log file or pipe every redraw is kept: one frame per 30 s instead of ~10/s.
    live = sys.stderr.isatty() or "ipykernel" in sys.modules  # a terminal, or a notebook cell (not a tty)
    interval = {} if live else {"mininterval": 30.0, "maxinterval": 30.0}
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress or not dctx.is_main,  # H11
               unit="step", dynamic_ncols=True, desc=f"train {cfg.variant}", file=sys.stderr, **interval)
    handlers = contextlib.ExitStack()
    try:
        stop_signal = handlers.enter_context(stop_requests())  # SIGTERM / SIGUSR1: checkpoint this step, stop
        _say(f"run: {run_dir}" + (f" (resumed at step {start_step})" if ckpt is not None else ""))
        if corpus.skipped and dctx.is_main:
            shown = ", ".join(corpus.skipped[:5]) + (f" and {len(corpus.skipped) - 5} more" if len(corpus.skipped) > 5
                                                     else "")
            _say(f"note: --data {cfg.data}: left out {len(corpus.skipped)} file(s) that are not UTF-8 text: {shown}")
            if ckpt is None:
                metrics.write({"data_skipped": list(corpus.skipped)})
        if outside_note is not None and scfg is not None:
            _say(f"note: --model {cfg.hf_model}: {outside_note}")
        if scfg is not None and (cfg.n, cfg.m) != (2, 4):
            _say(f"note: the compressed artifact stores 2:4 sparsity only; this {cfg.n}:{cfg.m} run will end with "
                 "a checkpoint and no artifact")
        if scfg is not None and cfg.dense_finetune > 0 and cfg.sparsity_schedule().finetune_start(cfg.steps) \
                >= cfg.steps:  # e.g. --method hu's 1/6 of a short run
            _say(f"note: dense fine-tuning for the last {cfg.dense_finetune:.4g} of {cfg.steps} steps "
                 "(--dense-finetune) rounds down to 0 steps: this run trains no step dense (that takes --steps "
                 f"{math.ceil(1 / cfg.dense_finetune - 1e-9)} or more)")
        model.train()
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(cfg, step)
            x, y = data.get_batch("train", cfg.batch_size, cfg.seq_len, generator=gen)
            decay_now = cfg.masked_decay_at(step)
            if masks is not None and masks.phase_of(step) in DENSE_PHASES:
                decay_now = 0.0  # no masked decay while the sparse layers train dense
            step_sparsity = sparsity
            out = train_step(model, optimizer, x, y, step=step, lr=lr, grad_clip=cfg.grad_clip,
                             sparse=scfg is not None, masks=masks, distill=distill, masked_decay=decay_now,
                             autocast=None if cfg.sparse_gemm == "masked" else torch.bfloat16)
            for what, value in (("router load-balancing loss", out.router_aux_loss), ("loss", out.loss),
                                ("gradient norm", out.grad_norm)):
                if value is None:
                    continue
                if not math.isfinite(value):
                    raise TrainingDivergedError(_diverged_message(what, value, step, last_ckpt, last_ckpt_step))
            loss_value, flip = out.loss, out.flip_rate
            if out.masks_changed:
                sparsity = mask_sparsity(model)
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_step / dt,
                      "sparsity": step_sparsity}
            if masks is not None or scfg is not None:
                record["mask_refresh_share"] = out.mask_seconds / dt  # of this step's wall time
            if masks is not None:
                record["phase"] = masks.phase_of(step)
            if decay_now:
                record["decay"] = decay_now
            if out.loss_total is not None:
                record.update(loss_total=out.loss_total, kl=out.kl)
            if out.router_aux_loss is not None:
                record["router_aux_loss"] = out.router_aux_loss
            if flip is not None:
                record["flip_rate"] = flip
                if out.flip_rate_layers is not None:
                    record["flip_rate_layers"] = out.flip_rate_layers
            metrics.write(record)
            postfix = {"loss": f"{loss_value:.3f}", "tok/s": f"{tokens_per_step / dt:,.0f}"}
            last_flip = flip if flip is not None else last_flip
            if last_flip is not None:
                postfix["flip"] = f"{last_flip:.4f}"  # the latest refresh's
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                with masks.hooks_paused() if masks is not None else contextlib.nullcontext():
                    val_loss = evaluate(model, data, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
                    eval_record = {"step": step, "val_loss": val_loss, "val_ppl": _ppl(val_loss)}
                    if step == cfg.steps and masks is not None and masks.any_dense:
                        val_sparse = _evaluate_sparse(model, masks, data, cfg)
                        eval_record.update(val_loss_sparse=val_sparse, val_ppl_sparse=_ppl(val_sparse))
                metrics.write(eval_record)
                _say(f"step {step}: val loss {val_loss:.4f} (ppl {_ppl(val_loss):.2f})"
                     + (f"; 2:4 model {val_sparse:.4f}" if val_sparse is not None else ""))
            if step % cfg.ckpt_interval == 0 or step == cfg.steps:
                checkpoint(step)
            signum = dctx.max_over_ranks(stop_signal())  # H11: every rank stops after the same step
            if signum:
                if last_ckpt_step != step:
                    checkpoint(step)
                then = "write its artifact" if step == cfg.steps else "finish the run"
                message = (f"{signal_name(signum)} received: stopped after step {step} of {cfg.steps} with its "
                           f"checkpoint ({last_ckpt}); to {then}: sparsert train --resume --out {run_dir}")
                _say(message)
                raise StoppedBySignal(message, signum)
    except KeyboardInterrupt:
        bar.close()
        metrics.close()
        if last_ckpt is None:
            _say(f"interrupted at step {step}: no checkpoint was written yet, nothing to resume")
        else:
            _say(f"interrupted at step {step}: the last complete checkpoint is step {last_ckpt_step} ({last_ckpt}); "
                 f"resume with: sparsert train --resume --out {run_dir}")
        raise
    finally:
        bar.close()
        metrics.close()
        handlers.close()  # last: a signal until here is noted, not raised in the middle of closing

    if math.isnan(val_loss):
        # Resumed a run that had already finished: nothing trained, evaluate the final weights.
        with masks.hooks_paused() if masks is not None else contextlib.nullcontext():
            val_loss = evaluate(model, data, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
            if masks is not None and masks.any_dense:
                val_sparse = _evaluate_sparse(model, masks, data, cfg)
    if not dctx.is_main:  # H11: rank 0 alone writes the artifact and reports
        return TrainResult(run_dir, cfg.steps, val_loss, _ppl(val_loss), last_ckpt, None,
                           time.perf_counter() - t_start, val_sparse)
    artifact, note = _write_artifact(cfg, model_config, masks, last_ckpt, run_dir)
    elapsed = time.perf_counter() - t_start
    print(f"final val loss {val_loss:.4f} (ppl {_ppl(val_loss):.2f}) after {cfg.steps} steps, {elapsed:.0f} s")
    if val_sparse is not None:
        print(f"final val loss of the 2:4 model (what the artifact holds) {val_sparse:.4f} "
              f"(ppl {_ppl(val_sparse):.2f})")
    print(f"checkpoint: {last_ckpt}")
    if artifact is not None:
        print(f"artifact{note}: {artifact}")
    else:
        print(f"no artifact: the compressed format stores 2:4 sparsity, this run trained {cfg.n}:{cfg.m}")
    return TrainResult(run_dir, cfg.steps, val_loss, _ppl(val_loss), last_ckpt, artifact, elapsed, val_sparse)


def _write_artifact(cfg: TrainConfig, model_config: ModelConfig, masks: MaskController | None, last_ckpt: Path,
                    run_dir: Path) -> tuple[Path | None, str]:
    """The run's end product from its last checkpoint: ``<run>/artifact`` (2:4 or dense runs), ``<run>/hf``
    (Hugging Face models) or nothing (other N:M patterns); with a note on what it holds."""
    artifact: Path | None = None
    note = ""
    if is_hf_config(model_config):  # H11: a Hugging Face directory in place of the sparsert artifact
        artifact, note = save_hf_run(last_ckpt, run_dir / HF_DIR), HF_NOTE
    elif cfg.dense or (cfg.n, cfg.m) == (2, 4):
        from sparsert.train.compress import compress_checkpoint

        artifact = compress_checkpoint(last_ckpt, run_dir / "artifact",
                                       int4_group_size=cfg.group_size if cfg.qat else None)
        note = " (dense weights pruned one-shot to 2:4 by magnitude)" if cfg.dense else ""
        if masks is not None and masks.schedule.finetune_start(cfg.steps) < cfg.steps:
            note = " (dense fine-tuned weights with the last sparse masks re-applied)"
        if masks is not None and cfg.sparse_layers == "ffn":
            note += " (2:4 feed-forward linears; the attention linears, trained dense, stay dense)"
        if masks is not None and cfg.keep_dense:
            note += " (the layers --keep-dense names, trained dense, stay dense)"
    return artifact, note


def _evaluate_sparse(model: nn.Module, masks: MaskController, data: TokenData, cfg: TrainConfig) -> float:
    """Validation loss of the 2:4 model the artifact will hold (every layer masked; see
    :meth:`MaskController.sparse_view`)."""
    with entered_on_ranks(model, masks.sparse_view()):  # H11: sparse_view recomputes masks
        return evaluate(model, data, cfg.batch_size, cfg.seq_len, cfg.eval_batches)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 80.0))


def _diverged_message(what: str, value: float, step: int, last: Path | None, last_step: int | None) -> str:
    keep = (f"the last good checkpoint is step {last_step} ({last})" if last is not None
            else "no checkpoint had been written")
    return f"{what} became {value} at step {step}; training stopped and {keep}. Try a lower --lr"
