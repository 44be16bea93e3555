"""Validation loss of dense vs SR-STE 2:4 vs SR-STE 2:4 + INT4 QAT at equal training tokens.

Trains the three variants of the same model (tiny preset by default) on the default corpus with identical
settings (steps, batch, sequence length, learning-rate schedule, seed, data order), then compares validation
cross-entropy on the same fixed validation batches. Targets (issue 2): SR-STE 2:4 within 5% of dense,
2:4 + INT4 QAT within 7%.

Two numbers per run:
- ``val loss``: the trained model as trained — for QAT with its fake-quantized weights, which are exactly the
  artifact's INT4 weights (the PASS/FAIL column uses this);
- ``artifact val loss``: the compressed artifact loaded back (``load_artifact(...).build_model()``), which also
  stores embeddings/norms/lm_head in fp16; for the dense run this is the dense model pruned one-shot to 2:4 by
  magnitude — a baseline showing what training with SR-STE buys.

    python tools/bench_quality.py                 # the full comparison (the default run's steps)
    python tools/bench_quality.py --steps 50      # a quick check within a time budget
    python tools/bench_quality.py --reuse dense=runs/a --reuse sr-ste=runs/b   # evaluate finished runs instead

``--reuse RUN=DIR`` (RUN one of dense, sr-ste, qat) evaluates a finished run directory (its final checkpoint and
artifact) instead of training that variant, e.g. to re-evaluate runs trained in parallel; the table then shows
each run's own step count and tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import torch

from sparsert.runtime.artifact import load_artifact
from sparsert.runtime.fileio import write_atomic
from sparsert.runtime.tokenizer import ByteTokenizer
from sparsert.train.data import TokenData, load_corpus
from sparsert.train.run_dir import load_train_config
from sparsert.train.train_config import TrainConfig
from sparsert.train.trainer import evaluate, train

TARGETS = {"sr-ste 2:4": 1.05, "sr-ste 2:4 + int4 qat": 1.07}
REUSE_KEYS = {"dense": "dense", "sr-ste 2:4": "sr-ste", "sr-ste 2:4 + int4 qat": "qat"}


def main() -> None:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per run (default {d.steps})")
    ap.add_argument("--preset", default=d.preset)
    ap.add_argument("--data", default=None, help="corpus (default: the built-in default corpus)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--mask-refresh", type=int, default=d.mask_refresh_interval)
    ap.add_argument("--group-size", type=int, default=d.group_size)
    ap.add_argument("--eval-batches", type=int, default=64, help="validation batches for the final numbers")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for the three runs (default runs/bench-quality-<time>)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--reuse", action="append", default=[], metavar="RUN=DIR",
                    help="evaluate this finished run dir for RUN (dense, sr-ste or qat) instead of training it")
    args = ap.parse_args()
    reuse = dict(item.split("=", 1) for item in args.reuse)
    unknown = set(reuse) - set(REUSE_KEYS.values())
    if unknown:
        ap.error(f"--reuse: unknown run {sorted(unknown)}; choose from {sorted(REUSE_KEYS.values())}")

    out = Path(args.out or f"runs/bench-quality-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    common = dict(preset=args.preset, data=args.data, steps=args.steps, batch_size=args.batch_size,
                  seq_len=args.seq_len, lr=args.lr, mask_refresh_interval=args.mask_refresh,
                  group_size=args.group_size, seed=args.seed, threads=args.threads,
                  eval_interval=max(args.steps // 4, 1), ckpt_interval=args.steps, progress=not args.no_progress)
    variants = {
        "dense": dict(dense=True),
        "sr-ste 2:4": dict(),
        "sr-ste 2:4 + int4 qat": dict(qat=True),
    }
    data = TokenData.from_corpus(load_corpus(args.data), ByteTokenizer())
    rows = []
    for name, extra in variants.items():
        run_name = name.replace(" ", "").replace(":", "").replace("+", "-")
        if REUSE_KEYS[name] in reuse:
            run_dir = Path(reuse[REUSE_KEYS[name]])
            cfg = load_train_config(run_dir)
            result = SimpleNamespace(checkpoint=run_dir, artifact=run_dir / "artifact", run_dir=run_dir)
            seconds = float("nan")
        else:
            cfg = TrainConfig(**common, **extra, out_dir=str(out / run_name))
            t0 = time.perf_counter()
            result = train(cfg)
            seconds = time.perf_counter() - t0
        model = _trained_model(result, cfg)
        val = evaluate(model, data, args.batch_size, args.seq_len, args.eval_batches)
        art_model = load_artifact(result.artifact).build_model()
        art_val = evaluate(art_model, data, args.batch_size, args.seq_len, args.eval_batches)
        rows.append({"run": name, "steps": cfg.steps, "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
                     "val_loss": val, "val_ppl": math.exp(val), "artifact_val_loss": art_val,
                     "seconds": seconds, "run_dir": str(result.run_dir)})

    dense = rows[0]["val_loss"]
    val_tokens = sum(y.numel() for _, y in data.val_batches(args.batch_size, args.seq_len, args.eval_batches))
    print()
    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, validation on {val_tokens:,} tokens")
    print()
    print("| run | train tokens | val loss | val ppl | ratio to dense | target | result | artifact val loss | time |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        r["ratio_to_dense"] = r["val_loss"] / dense
        target = TARGETS.get(r["run"])
        r["target"] = target
        r["pass"] = None if target is None else r["ratio_to_dense"] <= target
        verdict = "baseline" if target is None else ("PASS" if r["pass"] else "FAIL")
        tgt = "-" if target is None else f"<= {target:.2f}"
        print(f"| {r['run']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | "
              f"{r['ratio_to_dense']:.4f} | {tgt} | {verdict} | {r['artifact_val_loss']:.4f} | {r['seconds']:.0f} s |")
    if args.json:
        write_atomic(Path(args.json), json.dumps(rows, indent=2) + "\n")


def _trained_model(result, cfg: TrainConfig) -> torch.nn.Module:
    """The final trained model (sparse layers in eval mode use W ⊙ mask, fake-quantized under QAT)."""
    from sparsert.train.checkpoint import load_checkpoint
    from sparsert.train.trainer import build_model

    ck = load_checkpoint(result.checkpoint, load_optimizer=False)
    model = build_model(ck.model_config, cfg)
    model.load_state_dict(ck.model_state)
    return model.eval()


if __name__ == "__main__":
    main()
