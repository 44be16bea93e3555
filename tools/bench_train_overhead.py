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
from sparsert.train.sparsify import refresh_masks
from sparsert.train.trainer import TrainConfig, build_mask_controller, build_model, build_optimizer, train_step

TARGET = 1.2


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
                       mask_refresh_interval=args.mask_refresh, group_size=args.group_size, progress=False)
    variants = {"dense": TrainConfig(**{**base.to_dict(), "dense": True}), "sr-ste 2:4": base}
    if not args.no_qat:
        variants["sr-ste 2:4 + int4 qat"] = TrainConfig(**{**base.to_dict(), "qat": True})
    mc = model_config_from_preset(args.preset)
    runs = {}
    for name, cfg in variants.items():
        model = build_model(mc, cfg)
        # The same mask controller train() uses (refresh interval, flip-rate bookkeeping).
        masks = None if cfg.dense else build_mask_controller(model, cfg)
        if masks is not None:
            masks.begin(0, fresh=True)
        runs[name] = (model, build_optimizer(model, cfg), masks)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, mc.vocab_size, (args.batch_size, args.seq_len), generator=g),
                torch.randint(0, mc.vocab_size, (args.batch_size, args.seq_len), generator=g)) for _ in range(4)]

    samples: dict[str, list[float]] = {name: [] for name in runs}
    step = 0
    for rep in range(args.warmup + args.repeats):
        order = list(runs)
        order = order[rep % len(order):] + order[:rep % len(order)]  # rotate who goes first
        for name in order:
            model, opt, masks = runs[name]
            t0 = time.perf_counter()
            for i in range(block):
                x, y = batches[(step + i) % len(batches)]
                train_step(model, opt, x, y, step=step + i + 1, lr=1e-4, grad_clip=1.0, sparse=masks is not None,
                           masks=masks)
            if rep >= args.warmup:
                samples[name].append((time.perf_counter() - t0) / block)
        step += block

    sparse_model = runs["sr-ste 2:4"][0]
    refresh = []
    for _ in range(5):
        t0 = time.perf_counter()
        refresh_masks(sparse_model)
        refresh.append(time.perf_counter() - t0)

    tokens = args.batch_size * args.seq_len
    dense = statistics.median(samples["dense"])
    print(f"preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, {args.threads} threads, "
          f"mask refresh every {args.mask_refresh} steps, median of {args.repeats} blocks of {block} steps")
    print()
    print("| variant | ms / step | tokens/s | ratio to dense |")
    print("|---|---:|---:|---:|")
    for name, times in samples.items():
        t = statistics.median(times)
        print(f"| {name} | {t * 1e3:.1f} | {tokens / t:,.0f} | {t / dense:.3f}x |")
    ratio = statistics.median(samples["sr-ste 2:4"]) / dense
    r_ms = statistics.median(refresh) * 1e3
    print()
    print(f"mask refresh of all layers: {r_ms:.1f} ms ({r_ms / args.mask_refresh:.2f} ms/step amortised)")
    print(f"SR-STE 2:4 step / dense step = {ratio:.3f} (target <= {TARGET}): {'PASS' if ratio <= TARGET else 'FAIL'}")


if __name__ == "__main__":
    main()
