"""CPU training-step cost of the Hu et al. 2:4 recipe (transposable masks + MVUE24 + masked decay) vs dense.

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024. Issue-3 target:
on CPU a step with transposable masks and MVUE costs at most 1.3x a dense step (on CPU nothing runs on sparse
tensor cores, so this measures the recipe's overhead: mask application, MVUE24 sampling of the output
gradient, masked decay, and the transposable-mask refresh amortised over its interval).

Each variant runs the trainer's own step (:func:`sparsert.train.trainer.train_step` with the run's
:class:`~sparsert.train.sparsify.MaskController` and masked decay): forward, loss, backward, clipping, masked
decay, AdamW, and the mask refresh when due. Variants:

- ``dense``: the same model without masks (the reference);
- ``sr-ste 2:4``: SR-STE with its defaults (the default method);
- ``hu 2:4 all linears``: transposable masks + MVUE24 + masked decay on every block linear, refresh every 40;
- ``hu recipe (ffn only)``: the same on the FFN linears only (the recipe's default, attention dense).

Variants are interleaved block by block so machine-load drift hits them alike; one sample is a block of
``--block`` consecutive steps (default 40, the Hu refresh interval, so every Hu sample holds exactly one
refresh). After ``--warmup`` blocks, the median per-step time of ``--repeats`` blocks is reported with the
ratio to dense; PASS/FAIL for ``hu 2:4 all linears`` <= 1.3x.

    python tools/bench_hu_overhead.py                    # tiny preset, batch 16 x 128, 2 threads
    python tools/bench_hu_overhead.py --repeats 3 --block 10 --threads 1   # a quick check
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_train_overhead import print_table, time_variants  # tools/ is on sys.path when run as a script

from sparsert.train.train_config import TrainConfig

TARGET = 1.3


def main() -> None:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=d.preset)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--block", type=int, default=40, help="steps per sample (default 40, the Hu refresh interval)")
    ap.add_argument("--warmup", type=int, default=1, help="blocks discarded per variant")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks per variant")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    total = (args.warmup + args.repeats) * args.block
    common = dict(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, steps=total + 1,
                  progress=False)
    variants = {
        "dense": TrainConfig(**common, dense=True),
        "sr-ste 2:4": TrainConfig(**common),
        "hu 2:4 all linears": TrainConfig(**common, method="hu", sparse_layers="all", dense_finetune=0.0),
        "hu recipe (ffn only)": TrainConfig(**common, method="hu", dense_finetune=0.0),
    }
    samples = time_variants(variants, args.block, args.warmup, args.repeats)

    refresh = {name: cfg.mask_refresh_interval for name, cfg in variants.items() if not cfg.dense}
    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, {args.threads} threads, "
          f"median of {args.repeats} blocks of {args.block} steps (mask refresh every: {refresh})")
    print()
    dense = print_table(samples, args.batch_size * args.seq_len)
    ratio = statistics.median(samples["hu 2:4 all linears"]) / dense
    print()
    print(f"Hu 2:4 (transposable + MVUE24 + masked decay, all linears) step / dense step = {ratio:.3f} "
          f"(target <= {TARGET}): {'PASS' if ratio <= TARGET else 'FAIL'}")


if __name__ == "__main__":
    main()
