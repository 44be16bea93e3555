"""Mask refresh cost on one CPU core: transposable 2:4 (90-pattern argmax) vs the plain 1-D 2:4 mask.

Issue 3 target: a transposable mask refresh (Hu et al., ICML 2024) of a 4096×4096 weight in under 50 ms on
one CPU core. Rows:

- ``transposable``: :func:`sparsert.runtime.transposable_mask.transposable_24_mask` (on CPU the numba loop of
  :mod:`sparsert.runtime.transposable_mask_cpu`, the CUDA kernel's scores) — the row the target applies to;
- ``transposable torch``: the same function's torch path (45-row ±1 matmul and an integer-packed argmax,
  chunked to stay in cache), what runs without numba;
- ``transposable-ref``: the literal ``patterns[90×16] · |W_blocks|`` + argmax
  (:func:`~sparsert.runtime.transposable_mask.transposable_24_mask_reference`), for comparison;
- ``nm_mask 1-D``: :func:`sparsert.runtime.nm_mask.nm_mask` (top-2 of 4 along K, not transposable; SR-STE's
  per-step mask; on CPU the numba loop of :mod:`sparsert.runtime.nm_mask_cpu`), and ``nm_mask 1-D torch``.

Each is timed ``--repeats`` times after a warm-up with ``torch.set_num_threads(1)``: median and min wall
time, and min CPU time of the thread (less sensitive to other processes on a shared machine). PASS/FAIL
judges the median wall time. The results are checked (valid masks, fast path scoring as well as the
reference).

Usage: ``python tools/bench_mask_refresh.py [--sizes 4096x4096,768x3072] [--repeats 7] [--target-ms 50]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.transposable_mask import (
    is_transposable_24,
    transposable_24_mask,
    transposable_24_mask_reference,
)


def _torch_path(fn, *args):  # noqa: ANN001, ANN002, ANN202
    """``fn(*args)`` under ``SPARSERT_NO_NUMBA=1``: the torch paths, what runs without numba."""
    previous = os.environ.get("SPARSERT_NO_NUMBA")
    os.environ["SPARSERT_NO_NUMBA"] = "1"
    try:
        return fn(*args)
    finally:
        if previous is None:
            del os.environ["SPARSERT_NO_NUMBA"]
        else:
            os.environ["SPARSERT_NO_NUMBA"] = previous


def _time(fn, repeats: int) -> tuple[float, float, float]:  # noqa: ANN001
    """(median wall ms, min wall ms, min CPU ms of this thread) over ``repeats`` runs after a warm-up."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(wall), min(wall), min(cpu)


def _kept(w: torch.Tensor, m: torch.Tensor) -> float:
    return float((w.abs().double() * m).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096x4096,768x3072", help="comma-separated OUTxK shapes")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--target-ms", type=float, default=50.0, help="target for the transposable row (median)")
    ap.add_argument("--no-reference", action="store_true", help="skip the slow literal 90-pattern argmax")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}, "
          f"load average {load:.2f} on {os.cpu_count()} CPUs")
    header = (f"| {'method':<18} | {'shape':>10} | {'median ms':>9} | {'min ms':>7} | {'cpu ms':>7} | {'target':>8} "
              f"| {'result':<6} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    failed = False
    notes = []
    for size in args.sizes.split(","):
        out, k = (int(v) for v in size.lower().split("x"))
        w = torch.randn(out, k)
        rows = [("transposable", lambda w=w: transposable_24_mask(w), True),
                ("transposable torch", lambda w=w: _torch_path(transposable_24_mask, w), False)]
        if not args.no_reference:
            rows.append(("transposable-ref", lambda w=w: transposable_24_mask_reference(w), False))
        rows.append(("nm_mask 1-D", lambda w=w: nm_mask(w, 2, 4), False))
        rows.append(("nm_mask 1-D torch", lambda w=w: _torch_path(nm_mask, w, 2, 4), False))
        for name, fn, has_target in rows:
            med, best, cpu = _time(fn, args.repeats)
            if has_target and (out, k) == (4096, 4096):
                ok = med < args.target_ms
                failed |= not ok
                target, result = f"< {args.target_ms:g}", "PASS" if ok else "FAIL"
            else:
                target, result = "-", "-"
            print(f"| {name:<18} | {size:>10} | {med:9.1f} | {best:7.1f} | {cpu:7.1f} | {target:>8} | {result:<6} |")
        # correctness of what was timed
        fast = transposable_24_mask(w)
        assert is_transposable_24(fast), "transposable mask is not 2:4 along both dimensions"
        if not args.no_reference:
            ref = transposable_24_mask_reference(w)
            assert abs(_kept(w, fast) - _kept(w, ref)) <= 1e-5 * _kept(w, ref), "fast path scores below the reference"
        kept_t, kept_1d = _kept(w, fast), _kept(w, nm_mask(w))
        notes.append(f"{size}: masks checked; transposable keeps {kept_t / kept_1d:.4f} of the 1-D mask's Σ|W|")
    print("\n".join(notes))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
