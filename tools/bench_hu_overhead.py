"""CPU training-step cost of the Hu et al. 2:4 recipe (transposable masks + MVUE24 + masked decay) vs dense.

Hu, Zhao, Xu, Chen, Zhu, "Accelerating Transformer Pre-training with 2:4 Sparsity", ICML 2024. Issue-3 target:
on CPU a step with transposable masks and MVUE costs at most 1.3x a dense step (on CPU nothing runs on sparse
tensor cores, so this measures the recipe's overhead: mask application, MVUE24 sampling of the output
gradient, masked decay, and the transposable-mask refresh amortised over its interval).

Each variant runs the trainer's own step (:func:`sparsert.train.trainer.train_step` with the run's
:class:`~sparsert.train.sparsify.MaskController` and masked decay): forward, loss, backward, clipping, masked
decay, AdamW, and the mask refresh when due. Variants:

- ``dense``: the same model without masks (the reference);
- ``sr-ste 2:4``: SR-STE, refresh every 10 steps (the default method);
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
import time

import torch

from sparsert.runtime.model import model_config_from_preset
from sparsert.train.trainer import TrainConfig, build_mask_controller, build_model, build_optimizer, train_step

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
    mc = model_config_from_preset(args.preset)
    runs = {}
    for name, cfg in variants.items():
        model = build_model(mc, cfg)
        masks = None
        if not cfg.dense:
            masks = build_mask_controller(model, cfg)
            masks.begin(0, fresh=True)
            gen = torch.Generator().manual_seed(0)
            for module in masks.layers.values():
                module.generator = gen
        runs[name] = (model, build_optimizer(model, cfg), masks, cfg)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, mc.vocab_size, (args.batch_size, args.seq_len), generator=g),
                torch.randint(0, mc.vocab_size, (args.batch_size, args.seq_len), generator=g)) for _ in range(4)]

    samples: dict[str, list[float]] = {name: [] for name in runs}
    step = 0
    for rep in range(args.warmup + args.repeats):
        order = list(runs)
        order = order[rep % len(order):] + order[:rep % len(order)]  # rotate who goes first
        for name in order:
            model, opt, masks, cfg = runs[name]
            t0 = time.perf_counter()
            for i in range(args.block):
                x, y = batches[(step + i) % len(batches)]
                s = step + i + 1
                train_step(model, opt, x, y, step=s, lr=1e-4, grad_clip=1.0, sparse=masks is not None, masks=masks,
                           masked_decay=cfg.masked_decay_at(s))
            if rep >= args.warmup:
                samples[name].append((time.perf_counter() - t0) / args.block)
        step += args.block

    tokens = args.batch_size * args.seq_len
    dense = statistics.median(samples["dense"])
    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, {args.threads} threads, "
          f"median of {args.repeats} blocks of {args.block} steps (mask refresh: sr-ste every 10, hu every 40)")
    print()
    print("| variant | ms / step | tokens/s | ratio to dense |")
    print("|---|---:|---:|---:|")
    for name, times in samples.items():
        t = statistics.median(times)
        print(f"| {name} | {t * 1e3:.1f} | {tokens / t:,.0f} | {t / dense:.3f}x |")
    ratio = statistics.median(samples["hu 2:4 all linears"]) / dense
    print()
    print(f"Hu 2:4 (transposable + MVUE24 + masked decay, all linears) step / dense step = {ratio:.3f} "
          f"(target <= {TARGET}): {'PASS' if ratio <= TARGET else 'FAIL'}")


if __name__ == "__main__":
    main()
