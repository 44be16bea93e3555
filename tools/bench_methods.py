"""Quality of the 2:4 methods at equal tokens after the same dense pre-training (issue 3), on the default corpus.

1. Pre-train a dense model (tiny preset by default) for ``--pretrain-steps`` steps, once.
2. From that checkpoint, train every method for ``--steps`` more steps with identical settings (batch, sequence
   length, learning-rate schedule peaking at ``--lr``, seed, data order continued from the pre-training):

   - ``dense (continued)``: the reference;
   - ``SR-STE 2:4`` (Zhou et al. 2021), masks from the dense weights, refreshed every step;
   - ``Hu recipe 2:4`` (Hu et al. 2024): transposable masks, MVUE24, masked decay, refresh 40, dense fine-tuning
     of the last 1/6 (the artifact re-applies the last masks), on ``--hu-sparse-layers`` (default ``all``, so
     every row prunes the same layers; the paper's ``ffn`` leaves attention dense until compression);
   - ``AST 2:4`` (Huang et al. 2025): initialised from the pre-trained dense model and distilled from the dense
     reference (the ``dense (continued)`` row: as in the paper, the teacher is the dense model the sparse one is
     compared with), adaptive masks every step, annealed decay; ``AST 2:4 + INT4`` with quantization-aware
     training; and ``AST 2:4, pre-trained teacher`` distilled from the pre-trained checkpoint instead (the
     weaker teacher ``sparsert train --method ast --init-from RUN`` uses by default);
   - ``one-shot magnitude / Wanda / SparseGPT``: the dense continued model pruned once (``compress --prune``,
     calibration from the train split), no training;
   - ``magnitude one-shot + fine-tune``: the pre-trained model pruned once by magnitude, then fine-tuned with
     the mask fixed (decay 0, no refresh; NVIDIA ASP's recipe).

Every number is the validation cross-entropy on the same fixed ``--eval-batches`` validation batches. ``val loss
(trained)`` is the model as trained (dense after the Hu recipe's dense fine-tuning); ``val loss (2:4
artifact)`` loads the compressed artifact back — the deployable 2:4 model (fp16 values, INT4 with QAT) — and
is what the ratio to dense and the PASS/FAIL use (targets: AST <= 1.02, AST + INT4 <= 1.03).

With ``--hu-from-scratch`` the Hu recipe is also pre-trained from scratch for pre-training + method steps (the
paper's setting: 2:4 pre-training at equal tokens to the dense reference). Also writes the Hu runs' flip-rate
curves (``hu_flip_rate.png``, via :func:`sparsert.train.report.plot_flip_rate`)
and reports their peak/final ratio (target >= 10x), and saves the table to ``results.md`` / ``results.json``.

    python tools/bench_methods.py                                  # the full comparison
    python tools/bench_methods.py --pretrain-steps 10 --steps 10 --batch-size 2 --seq-len 32 --eval-batches 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime
from pathlib import Path

import torch

from sparsert.runtime.artifact import load_artifact
from sparsert.runtime.fileio import write_atomic
from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.tokenizer import ByteTokenizer
from sparsert.train.checkpoint import load_checkpoint
from sparsert.train.compress import compress_checkpoint
from sparsert.train.data import TokenData, load_corpus
from sparsert.train.masked_decay import DEFAULT_MASKED_DECAY
from sparsert.train.report import load_run, plot_flip_rate, summarize_run
from sparsert.train.run_dir import load_train_config
from sparsert.train.sparsify import sparse_modules
from sparsert.train.train_config import TrainConfig
from sparsert.train.trainer import build_model, evaluate, sparse_layer_names, train

TARGETS = {"ast": 1.02, "ast-int4": 1.03}
FLIP_TARGET = 10.0
DENSE_REFERENCE = "<the dense (continued) run>"  # placeholder resolved once that run exists
TRAINED = ("dense", "srste", "hu", "ast", "ast-int4", "ast-pre", "oneshot-ft")
ONESHOT = ("magnitude", "wanda", "sparsegpt")
LABELS = {
    "dense": "dense (continued)", "srste": "SR-STE 2:4", "hu": "Hu recipe 2:4", "ast": "AST 2:4",
    "ast-int4": "AST 2:4 + INT4", "ast-pre": "AST 2:4, pre-trained teacher",
    "magnitude": "one-shot magnitude 2:4", "wanda": "one-shot Wanda 2:4",
    "sparsegpt": "one-shot SparseGPT 2:4", "oneshot-ft": "magnitude one-shot + fine-tune 2:4 (fixed mask)",
    "hu-scratch": "Hu recipe 2:4 pre-trained from scratch (pre-training + method steps)",
}


def main() -> None:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=d.steps, help=f"dense pre-training steps (default {d.steps})")
    ap.add_argument("--steps", type=int, default=600, help="steps of every method after pre-training (default 600)")
    ap.add_argument("--preset", default=d.preset)
    ap.add_argument("--data", default=None, help="corpus (default: the built-in default corpus)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--pretrain-lr", type=float, default=d.lr, help=f"pre-training peak lr (default {d.lr})")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak lr of every method after pre-training (default 1e-3)")
    ap.add_argument("--hu-sparse-layers", choices=("all", "ffn"), default="all",
                    help="layers the Hu recipe trains 2:4 (default all, like every other row; the paper: ffn)")
    ap.add_argument("--hu-masked-decay", type=float, default=None, help="the Hu recipe's masked decay (default 6e-5)")
    ap.add_argument("--hu-from-scratch", action="store_true",
                    help="also pre-train the Hu recipe from scratch for pre-training + method steps (the paper's "
                         "setting, equal tokens to the dense reference); its flip rate is plotted too")
    ap.add_argument("--eval-batches", type=int, default=64, help="validation batches for every number")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated subset of {','.join(TRAINED + ONESHOT)} (dense always runs)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for all runs (default runs/bench-methods-<time>)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    chosen = set(TRAINED + ONESHOT) if args.only is None else {s.strip() for s in args.only.split(",")} | {"dense"}
    unknown = sorted(chosen - set(TRAINED + ONESHOT))
    if unknown:
        ap.error(f"--only: unknown method {unknown[0]!r}")

    out = Path(args.out or f"runs/bench-methods-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    data = TokenData.from_corpus(load_corpus(args.data), ByteTokenizer())

    def val(model: torch.nn.Module) -> float:
        return evaluate(model, data, args.batch_size, args.seq_len, args.eval_batches)

    common = dict(preset=args.preset, data=args.data, batch_size=args.batch_size, seq_len=args.seq_len,
                  seed=args.seed, threads=args.threads, eval_batches=args.eval_batches, progress=not args.no_progress)
    t0 = time.perf_counter()
    pre = train(TrainConfig(**common, dense=True, steps=args.pretrain_steps, lr=args.pretrain_lr,
                            eval_interval=args.pretrain_steps, ckpt_interval=args.pretrain_steps,
                            out_dir=str(out / "pretrain")))
    pre_s = time.perf_counter() - t0
    after = dict(common, steps=args.steps, lr=args.lr, init_from=str(pre.run_dir), eval_interval=args.steps,
                 ckpt_interval=args.steps)
    configs = {
        "dense": dict(dense=True),
        "srste": dict(),
        "hu": dict(method="hu", sparse_layers=args.hu_sparse_layers, masked_decay=args.hu_masked_decay),
        "ast": dict(method="ast", teacher=DENSE_REFERENCE),
        "ast-int4": dict(method="ast", qat=True, teacher=DENSE_REFERENCE),
        "ast-pre": dict(method="ast"),  # teacher: the init, the pre-trained checkpoint
        # ASP: prune once (magnitude masks of the pre-trained weights), keep the mask, fine-tune without decay
        "oneshot-ft": dict(decay=0.0, mask_refresh_interval=args.steps + 1),
    }
    rows: list[dict] = []
    results = {}
    for key, extra in configs.items():
        if key not in chosen:
            continue
        if extra.get("teacher") == DENSE_REFERENCE:  # dense always runs, first
            extra = dict(extra, teacher=str(results["dense"].run_dir))
        t1 = time.perf_counter()
        result = train(TrainConfig(**after, **extra, out_dir=str(out / key)))
        seconds = time.perf_counter() - t1
        results[key] = result
        art_val = val(load_artifact(result.artifact).build_model()) if key != "dense" else None
        rows.append({"key": key, "method": LABELS[key], "steps": args.steps,
                     "val_loss_trained": result.final_val_loss, "val_loss_artifact": art_val, "seconds": seconds})

    if args.hu_from_scratch:
        t1 = time.perf_counter()
        total = args.pretrain_steps + args.steps
        result = train(TrainConfig(**common, method="hu", sparse_layers=args.hu_sparse_layers,
                                   masked_decay=args.hu_masked_decay, steps=total, lr=args.pretrain_lr,
                                   eval_interval=total, ckpt_interval=total, out_dir=str(out / "hu-scratch")))
        results["hu-scratch"] = result
        rows.append({"key": "hu-scratch", "method": LABELS["hu-scratch"], "steps": total,
                     "val_loss_trained": result.final_val_loss,
                     "val_loss_artifact": val(load_artifact(result.artifact).build_model()),
                     "seconds": time.perf_counter() - t1})

    dense_ckpt = results["dense"].checkpoint
    for method in ONESHOT:
        if method not in chosen:
            continue
        t1 = time.perf_counter()
        kw = {"calib_data": args.data} if method != "magnitude" else {}
        art = compress_checkpoint(dense_ckpt, out / f"oneshot-{method}", prune=method, **kw)
        seconds = time.perf_counter() - t1
        rows.append({"key": method, "method": LABELS[method], "steps": 0, "val_loss_trained": None,
                     "val_loss_artifact": val(load_artifact(art).build_model()), "seconds": seconds})

    order = list(LABELS)
    rows.sort(key=lambda r: order.index(r["key"]))
    dense_loss = next(r["val_loss_trained"] for r in rows if r["key"] == "dense")
    for r in rows:
        loss = r["val_loss_trained"] if r["key"] == "dense" else r["val_loss_artifact"]
        r["ratio_to_dense"] = loss / dense_loss
        target = TARGETS.get(r["key"])
        r["target"] = target
        r["pass"] = None if target is None else r["ratio_to_dense"] <= target

    repruned = None
    if "hu" in results:  # the other choice for the artifact after dense fine-tuning: magnitude re-pruning
        repruned = val(_magnitude_repruned(results["hu"].run_dir))

    flips = {}
    runs = [load_run(results[k].run_dir, name=LABELS[k]) for k in ("hu", "hu-scratch") if k in results]
    png = plot_flip_rate(runs) if runs else None
    if png is not None:
        write_atomic(out / "hu_flip_rate.png", png)
    for key, run in zip([k for k in ("hu", "hu-scratch") if k in results], runs, strict=True):
        s = summarize_run(run)
        flips[key] = {"peak": s.flip_peak, "peak_step": s.flip_peak_step, "final": s.flip_final,
                      "peak_over_final": s.flip_peak_over_final, "png": str(out / "hu_flip_rate.png") if png else None}

    tokens = args.batch_size * args.seq_len
    lines = [
        f"preset {args.preset}, default corpus" if args.data is None else f"preset {args.preset}, corpus {args.data}",
        f"dense pre-training: {args.pretrain_steps} steps ({args.pretrain_steps * tokens:,} tokens, lr "
        f"{args.pretrain_lr:g}, {pre_s:.0f} s), val loss {pre.final_val_loss:.4f}; then every method "
        f"{args.steps} steps ({args.steps * tokens:,} tokens, batch {args.batch_size} x {args.seq_len}, "
        f"lr {args.lr:g})",
        f"validation: {args.eval_batches} fixed batches of {args.batch_size} x {args.seq_len}; "
        f"Hu recipe on {args.hu_sparse_layers} block linears, masked decay "
        f"{DEFAULT_MASKED_DECAY if args.hu_masked_decay is None else args.hu_masked_decay:g}",
        "",
        "| method | steps after pre-training | val loss (trained) | val loss (2:4 artifact) | ratio to dense | target |"
        " result | time |",
        "|---|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in rows:
        trained = "—" if r["val_loss_trained"] is None else f"{r['val_loss_trained']:.4f}"
        artifact = "—" if r["val_loss_artifact"] is None else f"{r['val_loss_artifact']:.4f}"
        target = "—" if r["target"] is None else f"≤ {r['target']:.2f}"
        result = "—" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        lines.append(f"| {r['method']} | {r['steps']} | {trained} | {artifact} | {r['ratio_to_dense']:.4f} | "
                     f"{target} | {result} | {r['seconds']:.0f} s |")
    if repruned is not None:
        hu = next(r for r in rows if r["key"] == "hu")
        lines += ["", f"Hu recipe after dense fine-tuning: dense model {hu['val_loss_trained']:.4f}; 2:4 with the last "
                      f"sparse masks re-applied (the artifact) {hu['val_loss_artifact']:.4f}; 2:4 by magnitude "
                      f"re-pruning of the fine-tuned weights {repruned:.4f}"]
    for key, flip in flips.items():
        if flip["peak"] is not None:
            ratio = flip["peak_over_final"]
            verdict = "PASS" if ratio is not None and ratio >= FLIP_TARGET else "FAIL"
            lines += ["", f"{LABELS[key]} flip rate: peak {flip['peak']:.4g} at step {flip['peak_step']}, final (end "
                          f"of sparse training) {flip['final']:.4g}, peak/final {_fmt_ratio(ratio)} (target >= "
                          f"{FLIP_TARGET:g}x): {verdict}; plot: {flip['png']}"]
        else:
            lines += ["", f"{LABELS[key]} flip rate: no mask refresh during its sparse phase (refresh every 40 "
                          "steps); run more --steps"]
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.md", text + "\n")
    summary = {"args": vars(args), "rows": rows, "flip_rate": flips, "hu_val_loss_magnitude_repruned": repruned,
               "pretrain_val_loss": pre.final_val_loss}
    write_atomic(out / "results.json", json.dumps(summary, indent=2, default=_json_default) + "\n")


@torch.no_grad()
def _magnitude_repruned(run_dir: Path) -> torch.nn.Module:
    """The run's final weights with every trained-sparse block linear pruned to 2:4 by magnitude (float32,
    masks applied; layers the run trained dense stay dense, as in its artifact)."""
    cfg = load_train_config(run_dir)
    ck = load_checkpoint(run_dir, load_optimizer=False)
    model = build_model(ck.model_config, cfg)
    model.load_state_dict(ck.model_state)
    layers = sparse_modules(model)
    for module in (layers[name] for name in sparse_layer_names(model, cfg)):
        module.mask.copy_(nm_mask(module.weight, 2, 4).to(module.mask.dtype))
        module.dense = False
    return model.eval()


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    return "∞" if math.isinf(ratio) else f"{ratio:.1f}x"


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


if __name__ == "__main__":
    main()
