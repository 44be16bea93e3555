"""Training-step cost on CPU: dense vs SR-STE 2:4 vs SR-STE 2:4 + INT4 QAT, same model, same batches.

Each variant runs the trainer's own step (:func:`sparsert.train.trainer.train_step`: forward, loss, backward,
clipping, AdamW, mask refresh when due). Variants are interleaved block by block so machine-load drift hits
them alike; one sample is a block of ``--block`` consecutive steps (default: the mask refresh interval, so every
sample contains exactly one refresh and its cost is amortised as in training). After ``--warmup`` blocks, the
median per-step time of ``--repeats`` blocks is reported with the ratio to dense (target: SR-STE ≤ 1.2×).

    python tools/bench_train_overhead.py                  # tiny preset, batch 16 x 128, 2 threads
    python tools/bench_train_overhead.py --mask-refresh 1 # refresh every step (SR-STE's original schedule)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsert.runtime.model import model_config_from_preset
from sparsert.train.train_config import TrainConfig
from sparsert.train.trainer import build_mask_controller, build_model, build_optimizer, train_step

TARGET = 1.2


def time_variants(variants: dict[str, TrainConfig], block: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Per-step seconds of each variant: ``repeats`` samples of ``block`` consecutive trainer steps, after
    ``warmup`` discarded blocks. Variants run interleaved (the first one rotating) on the same 4 random batches,
    each with the mask controller and masked decay train() would use. All configs must share the model shape."""
    first = next(iter(variants.values()))
    mc = model_config_from_preset(first.preset)
    runs = {}
    for name, cfg in variants.items():
        model = build_model(mc, cfg)
        masks = None
        if not cfg.dense:
            masks = build_mask_controller(model, cfg)
            masks.begin(0, fresh=True)
            gen = torch.Generator().manual_seed(0)  # MVUE24's sampler, when on
            for module in masks.layers.values():
                module.generator = gen
        runs[name] = (model, build_optimizer(model, cfg), masks, cfg)
    g = torch.Generator().manual_seed(0)
    shape = (first.batch_size, first.seq_len)
    batches = [tuple(torch.randint(0, mc.vocab_size, shape, generator=g) for _ in range(2)) for _ in range(4)]
    samples: dict[str, list[float]] = {name: [] for name in runs}
    step = 0
    for rep in range(warmup + repeats):
        order = list(runs)
        order = order[rep % len(order):] + order[:rep % len(order)]  # rotate who goes first
        for name in order:
            model, opt, masks, cfg = runs[name]
            t0 = time.perf_counter()
            for i in range(block):
                x, y = batches[(step + i) % len(batches)]
                s = step + i + 1
                train_step(model, opt, x, y, step=s, lr=1e-4, grad_clip=1.0, sparse=masks is not None, masks=masks,
                           masked_decay=cfg.masked_decay_at(s))
            if rep >= warmup:
                samples[name].append((time.perf_counter() - t0) / block)
        step += block
    return samples


def print_table(samples: dict[str, list[float]], tokens_per_step: int) -> float:
    """Print the markdown table (ms/step, tokens/s, ratio to the ``dense`` variant); return dense's median."""
    dense = statistics.median(samples["dense"])
    print("| variant | ms / step | tokens/s | ratio to dense |")
    print("|---|---:|---:|---:|")
    for name, times in samples.items():
        t = statistics.median(times)
        print(f"| {name} | {t * 1e3:.1f} | {tokens_per_step / t:,.0f} | {t / dense:.3f}x |")
    return dense


def main() -> None:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=d.preset)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--mask-refresh", type=int, default=d.mask_refresh_interval)
    ap.add_argument("--group-size", type=int, default=d.group_size)
    ap.add_argument("--block", type=int, default=None, help="steps per sample (default: --mask-refresh)")
    ap.add_argument("--warmup", type=int, default=2, help="blocks discarded per variant")
    ap.add_argument("--repeats", type=int, default=7, help="timed blocks per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-qat", action="store_true", help="skip the INT4 QAT variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    block = args.block or args.mask_refresh

    base = TrainConfig(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len,
                       steps=(2 + args.warmup + args.repeats) * block, mask_refresh_interval=args.mask_refresh,
                       group_size=args.group_size, progress=False)
    variants = {"dense": TrainConfig(**{**base.to_dict(), "dense": True}), "sr-ste 2:4": base}
    if not args.no_qat:
        variants["sr-ste 2:4 + int4 qat"] = TrainConfig(**{**base.to_dict(), "qat": True})
    samples = time_variants(variants, block, args.warmup, args.repeats)

    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, {args.threads} threads, "
          f"mask refresh every {args.mask_refresh} steps, median of {args.repeats} blocks of {block} steps")
    print()
    dense = print_table(samples, args.batch_size * args.seq_len)
    ratio = statistics.median(samples["sr-ste 2:4"]) / dense
    print()
    print(f"SR-STE 2:4 step / dense step = {ratio:.3f} (target <= {TARGET}): {'PASS' if ratio <= TARGET else 'FAIL'}")


if __name__ == "__main__":
    main()
