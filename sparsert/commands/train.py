"""``sparsert train``: train a 2:4 sparse model (SR-STE, the Hu et al. recipe or AST; optionally INT4 QAT) or a
dense baseline.

A thin click layer over :func:`sparsert.train.trainer.train`: each flag maps to a
:class:`~sparsert.train.train_config.TrainConfig` field and shows that field's default (for the fields a
``--method`` sets, the default of each method). With ``--resume`` the run's saved config is used and only the
flags given on the command line override it (a real difference is refused by the trainer, listing it).
"""

from __future__ import annotations

import dataclasses
import re

import click

from sparsert.commands import option_given
from sparsert.runtime.errors import ConfigError
from sparsert.train.distributed import close_distributed, torchrun_env  # H11
from sparsert.train.run_dir import find_resume_dir, load_train_config
from sparsert.train.train_config import METHOD_DEFAULTS, METHODS, SCHEDULES, SPARSE_GEMMS, TrainConfig
from sparsert.train.trainer import train

_D = TrainConfig  # the defaults shown in --help are TrainConfig's own

# CLI parameter name -> TrainConfig field (when they differ); "sparsity" maps to n and m.
_FIELD = {"out": "out_dir", "mask_refresh": "mask_refresh_interval"}
_FLAG = {
    "out_dir": "--out", "mask_refresh_interval": "--mask-refresh", "n": "--sparsity", "m": "--sparsity",
    "qat": "--qat", "progress": "--no-progress", "decay_warmup": "--decay-warmup",
    "hf_model": "--model",  # H11
}


# Flags that only act in some runs: (option names, does the run use them?, what they need). A flag given where it
# has no effect is refused, as --prune-start without --schedule gradual is, instead of being silently ignored.
_INERT_UNLESS = (
    (("group_size",), lambda c: c.qat, "with --qat (the INT4 group size)"),
    (("slorb_k",), lambda c: c.slorb, "with --slorb (the SLoRB group size)"),
    (("decay_max", "decay_warmup"), lambda c: c.method == "ast" and not c.dense,
     "with --method ast (AST's annealed decay)"),
    (("distill_alpha", "distill_beta", "distill_temperature"),
     lambda c: (c.teacher is not None or c.method == "ast") and not c.dense,  # ast: --distill-beta 0 = no teacher
     "when distilling from a teacher (--teacher, or --method ast)"),
    (("mask_refresh",), lambda c: not c.dense, "in sparse training (a --dense run has no masks)"),
)


def _refuse_inert_flags(ctx: click.Context, cfg: TrainConfig) -> None:
    for names, used, when in _INERT_UNLESS:
        given = [f"--{n.replace('_', '-')}" for n in names if option_given(ctx, n)]
        if given and not used(cfg):
            them = "it" if len(given) == 1 else "them"
            raise ConfigError(f"{', '.join(given)}: only used {when}; this run would ignore {them}")


def _by_method(field: str, fmt: str = "{}") -> str:
    """``--help`` default text of a field each --method sets, e.g. ``sr-ste: 1, hu: 40, ast: 1``."""
    def show(v: object) -> str:
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, float) and abs(v - 1 / 6) < 1e-12:
            return "1/6"
        return f"{v:g}" if isinstance(v, float) else fmt.format(v)
    return ", ".join(f"{m}: {show(METHOD_DEFAULTS[m][field])}" for m in METHODS)


def _flag(field: str) -> str:
    return _FLAG.get(field, "--" + field.replace("_", "-"))


def parse_sparsity(text: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M) with integers 0 < N < M; ConfigError naming --sparsity otherwise."""
    parts = text.split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--sparsity: expected N:M with integers 0 < N < M (e.g. 2:4), got {text!r}") from None
    if not 0 < n < m:
        raise ConfigError(f"--sparsity: expected N:M with integers 0 < N < M (e.g. 2:4), got {text!r}")
    return n, m


def _config_error(exc: ConfigError) -> ConfigError:
    """Rewrite ``train config 'field'`` in a TrainConfig message as the flag a CLI user typed."""
    return ConfigError(re.sub(r"train config '(\w+)'", lambda m: _flag(m.group(1)), str(exc)))


@click.command("train")
@click.option("--preset", metavar="NAME", default=_D.preset, show_default=True,
              help="Model size preset (tiny, small, base).")
# --- H11: Hugging Face models and multi-process training ---
@click.option("--model", "hf_model", metavar="PATH", type=str, default=None,
              help="Train a local Hugging Face causal LM directory (Llama, Mistral, Qwen2, GPT-2, ...) instead of a "
                   "preset: its tokenizer tokenises --data, its decoder-block linears train sparse, MoE experts "
                   "(Mixtral, Qwen2-MoE, ...) as per-expert linears (embeddings, lm_head and routers stay dense), "
                   "--seq-len may not exceed its max_position_embeddings, and the run ends "
                   "with <run>/hf, a directory transformers loads (dense weights carrying the 2:4 zeros), in "
                   "place of the sparsert artifact (whose format describes the built-in architectures only).")
@click.option("--distributed", type=click.Choice(["ddp", "fsdp"]), default=None,
              help="Train on several processes started by torchrun (torchrun --nproc-per-node N -m sparsert train "
                   "--distributed ddp ...): ddp replicates the model on every rank, fsdp shards it (FSDP2, dim 0). "
                   "--batch-size is the global batch, split evenly across the ranks; nccl on GPUs, gloo on CPU. "
                   "Under torchrun without this flag: ddp.")
@click.option("--router-aux-loss", type=float, default=None, metavar="COEF",
              show_default="the model config's router_aux_loss_coef when its output_router_logits is true, else 0",
              help="With --model on a mixture-of-experts model (Mixtral, Qwen2-MoE, ...): add COEF times its router "
                   "load-balancing loss (Switch Transformer's, as transformers computes it) to the training loss, "
                   "logged unweighted as router_aux_loss in metrics.jsonl. 0 turns it off.")
# --- end H11 ---
@click.option("--arch", type=click.Choice(["llama", "gpt2"]), default=None,
              help="Architecture (default: the preset's, llama).")
@click.option("--data", metavar="PATH", type=str, default=None,
              help="Text file, folder of text files or JSONL file with a 'text' field "
                   "(default: the Python standard library's sources).")
@click.option("--out", metavar="DIR", type=str, default=None,
              help="Run directory; its metrics.jsonl, checkpoints/, artifact/ and hf/ must be absent (or left by a "
                   "run stopped before its first checkpoint); a run with a checkpoint is continued with --resume "
                   "(default: runs/<preset>-<sparseNM[-hu|-ast|...][-int4]|dense>-<timestamp>, e.g. "
                   "runs/tiny-sparse24-20261205-090312; with --model: runs/hf-<model dir>-...).")
@click.option("--steps", type=int, default=_D.steps, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=_D.batch_size, show_default=True, help="Sequences per step.")
@click.option("--seq-len", type=int, default=_D.seq_len, show_default=True, help="Tokens per sequence.")
@click.option("--lr", type=float, default=_D.lr, show_default=True,
              help="Peak learning rate (AdamW; 5% linear warm-up, cosine decay to 10%).")
@click.option("--weight-decay", type=float, default=_D.weight_decay, show_default=True,
              help="AdamW weight decay on 2-D weights.")
@click.option("--dense", is_flag=True, help="Train the same model densely (the baseline; no masks).")
@click.option("--sparsity", metavar="N:M", default="2:4", show_default=True,
              help="N:M pattern along K for the block linears.")
@click.option("--decay", type=float, default=None, show_default="2e-4 for sr-ste without masked decay, else 0",
              help="SR-STE decay λ on the pruned weights' gradient (0 = plain STE).")
@click.option("--mask-refresh", type=int, default=None, show_default=_by_method("mask_refresh_interval"),
              help="Recompute the masks from the weights every this many steps.")
@click.option("--method", type=click.Choice(METHODS), default=_D.method, show_default=True,
              help="Sparse training recipe; it sets the defaults of the flags below marked 'sr-ste: ..., hu: ..., "
                   "ast: ...'. sr-ste: SR-STE (Zhou et al. 2021). hu: Hu et al. 2024 2:4 pre-training (transposable "
                   "masks, MVUE24, masked decay, refresh 40, dense fine-tuning of the last 1/6, FFN linears only). "
                   "ast: Adaptive Sparse Trainer (Huang et al. 2025: distillation from --teacher, adaptive masks "
                   "recomputed every step, annealed decay).")
@click.option("--transposable/--no-transposable", "transposable", default=None,
              show_default=_by_method("transposable"),
              help="Transposable 2:4 masks: the best of the 90 4x4 patterns per block, 2:4 along K for W and W^T.")
@click.option("--mvue/--no-mvue", "mvue", default=None, show_default=_by_method("mvue"),
              help="MVUE24-sample the output gradient of the weight-gradient GEMM (unbiased 2:4).")
@click.option("--masked-decay", metavar="ALPHA", type=float, default=None,
              show_default=_by_method("masked_decay", "{:g}"),
              help="Masked decay g += ALPHA*(1-m)*W on the gradients, after clipping, before the optimizer step "
                   "(turns SR-STE's --decay default to 0).")
@click.option("--dense-finetune", metavar="FRACTION", type=float, default=None,
              show_default=_by_method("dense_finetune") + "; spdf: 1/6; 0 with --qat",
              help="Train every layer dense for this last fraction of the steps (masked decay off); the artifact "
                   "re-applies the last sparse masks to the fine-tuned weights.")
@click.option("--sparse-layers", type=click.Choice(["all", "ffn"]), default=None,
              show_default=_by_method("sparse_layers") + "; all with --qat",
              help="Which block linears train 2:4: all, or the feed-forward ones only (the others train dense and "
                   "stay dense in the artifact).")
@click.option("--keep-dense", "keep_dense", metavar="PATTERN", multiple=True,
              help="Train the block linears whose module name matches this shell pattern dense, and keep them dense "
                   "in the artifact (repeatable): e.g. 'blocks.0.*', or with --model transformers' names such as "
                   "'model.layers.0.*'. A pattern matching no layer is refused. Not with --qat or --slorb.")
@click.option("--sparse-gemm", type=click.Choice(SPARSE_GEMMS), default=_D.sparse_gemm, show_default=True,
              help="How --method hu's sparse layers compute while training. masked: matmuls on W*mask in float32 "
                   "(any device). ours / cusparselt: the recipe's three 2:4 sparse GEMMs (forward, input gradient, "
                   "MVUE24 weight gradient) under bf16 autocast, on our kernels (their exact but slow torch "
                   "fallback on a CPU) or on cuSPARSELt (CUDA torch only). Layer sizes must be multiples of 64.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_D.schedule, show_default=True,
              help="from-scratch: 2:4 from the first step. gradual: dense, then pruning to 2:4 between "
                   "--prune-start and --prune-end (The Journey Matters, 2025). spdf: sparse, then dense "
                   "fine-tuning (--dense-finetune, default 1/6).")
@click.option("--prune-start", metavar="FRACTION", type=float, default=_D.prune_start, show_default=True,
              help="gradual: fraction of the steps where pruning starts.")
@click.option("--prune-end", metavar="FRACTION", type=float, default=_D.prune_end, show_default=True,
              help="gradual: fraction of the steps where the masks reach exactly N:M.")
@click.option("--prune-interval", metavar="STEPS", type=int, default=None,
              show_default="100, or a tenth of the pruning window when shorter",
              help="gradual: steps between pruning events (each removes a constant share of what is left).")
@click.option("--init-from", metavar="CHECKPOINT", type=str, default=None,
              help="Start from the weights of a sparsert run/checkpoint (e.g. a dense pre-training) and continue "
                   "its data order; masks are computed from those weights.")
@click.option("--teacher", metavar="PATH", type=str, default=None, show_default="--init-from with --method ast",
              help="Dense teacher for distillation: a dense sparsert run/checkpoint or a Hugging Face model "
                   "directory with the same tokenizer.")
@click.option("--distill-alpha", type=float, default=_D.distill_alpha, show_default=True,
              help="Weight of the cross-entropy in alpha*CE + beta*T^2*KL.")
@click.option("--distill-beta", type=float, default=_D.distill_beta, show_default=True,
              help="Weight of the teacher KL term (0 = no distillation).")
@click.option("--distill-temperature", type=float, default=_D.distill_temperature, show_default=True,
              help="Distillation temperature T.")
@click.option("--decay-max", type=float, default=_D.decay_max, show_default=True,
              help="ast: the annealed masked decay's maximum lambda_max.")
@click.option("--decay-warmup", metavar="STEPS", type=int, default=None, show_default="a quarter of --steps",
              help="ast: steps over which the decay rises linearly to --decay-max.")
@click.option("--wanda-score", is_flag=True,
              help="Score masks by Wanda's |W|*||X|| (input-channel norms collected between refreshes).")
@click.option("--slorb", is_flag=True,
              help="AST's SLoRB extra parameters: y += S*groupsum_k(x), S initialised to the pruned weights' group "
                   "means (adds 1/k of each layer's weights; stored dense in the artifact; built-in models only, "
                   "not --model).")
@click.option("--slorb-k", type=int, default=_D.slorb_k, show_default=True, help="SLoRB group size k along K.")
@click.option("--qat", "--int4", "qat", is_flag=True,
              help="INT4 quantization-aware training of the kept values (fake quantization, STE).")
@click.option("--group-size", type=int, default=_D.group_size, show_default=True,
              help="INT4 group size along K for --qat.")
@click.option("--eval-interval", type=int, default=_D.eval_interval, show_default=True,
              help="Evaluate validation loss every this many steps (and at the end).")
@click.option("--eval-batches", type=int, default=_D.eval_batches, show_default=True,
              help="Validation batches per evaluation.")
@click.option("--ckpt-interval", type=int, default=_D.ckpt_interval, show_default=True,
              help="Checkpoint every this many steps (and at the end); the newest two are kept.")
@click.option("--seed", type=int, default=_D.seed, show_default=True, help="Seed of the model init and data order.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out (default: the newest matching run under runs/) from its last checkpoint.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              show_default="$SPARSERT_DEVICE, else auto",
              help="Where to train: auto takes the GPU when torch sees one (under torchrun: each rank's own), "
                   "else the CPU. Not part of the run's config: a run may resume on another device.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--no-progress", "no_progress", is_flag=True, help="No progress bar.")
@click.pass_context
def command(ctx: click.Context, **opts: object) -> None:
    """Train a 2:4 sparse transformer (SR-STE, the Hu et al. recipe, or AST; or --dense), then compress it to
    an artifact.

    With no options this runs the built-in default: the tiny preset on the default corpus, 2:4 SR-STE, about 3 to
    12 minutes on a 2-core CPU (bench/RESULTS.md). Writes metrics.jsonl, checkpoints/ and artifact/ (hf/ with
    --model; none for a pattern other than 2:4) in the run directory and prints where the artifact is.

    \b
    Recipes:
      sparsert train --method hu                   Hu et al. 2024 2:4 pre-training recipe
      sparsert train --method ast --init-from RUN  AST from a dense run (also the teacher)
      sparsert train --schedule gradual            dense, then gradual pruning to 2:4
    """
    values: dict[str, object] = {}
    given: set[str] = set()
    for name, value in opts.items():
        if name == "sparsity" or (name == "device" and value is None):  # device: TrainConfig's default
            continue
        field = "progress" if name == "no_progress" else _FIELD.get(name, name)
        values[field] = (not value) if name == "no_progress" else value
        if option_given(ctx, name):
            given.add(field)
    n, m = parse_sparsity(str(opts["sparsity"]))
    values.update(n=n, m=m)
    if option_given(ctx, "sparsity"):
        if opts["dense"]:
            raise ConfigError("--sparsity sets the pattern of a sparse run; it cannot be combined with --dense")
        given.update({"n", "m"})

    if opts["hf_model"] is not None and option_given(ctx, "preset"):  # H11
        raise ConfigError("--preset chooses a built-in model; with --model the model comes from the Hugging Face "
                          "directory")
    stray = [f"--{o.replace('_', '-')}" for o in ("prune_start", "prune_end", "prune_interval") if option_given(ctx, o)]
    if stray and opts["schedule"] != "gradual":
        raise ConfigError(f"{', '.join(stray)} {'sets' if len(stray) == 1 else 'set'} the gradual schedule's "
                          "pruning; add --schedule gradual "
                          f"(this run's schedule is {opts['schedule']})")
    if opts["init_from"] is not None:
        shaping = [f"--{o}" for o in ("preset", "arch") if option_given(ctx, o)]
        if shaping:
            verb = "choose" if len(shaping) > 1 else "chooses"
            raise ConfigError(f"{' and '.join(shaping)} {verb} a built-in model; with --init-from the model is "
                              f"the one in {opts['init_from']} (leave {' and '.join(shaping)} out)")
    try:
        if opts["resume"]:
            # only to find the run: --sparse-gemm and --router-aux-loss are checked against the saved recipe (and
            # its --model) once merged with it
            probe = TrainConfig(**{k: v for k, v in values.items() if k not in ("sparse_gemm", "router_aux_loss")})
            run_dir = find_resume_dir(probe)
            saved = load_train_config(run_dir)
            cfg = dataclasses.replace(saved, **{k: values[k] for k in given if k != "out_dir"})
            if "distributed" not in given and torchrun_env() is None:  # H11: resume a multi-rank run on one
                cfg = dataclasses.replace(cfg, distributed=None)
        else:
            cfg = TrainConfig(**values)
    except ConfigError as exc:
        raise _config_error(exc) from None
    _refuse_inert_flags(ctx, cfg)
    try:
        train(cfg)
    finally:
        close_distributed()  # H11: leave the process group torchrun started
