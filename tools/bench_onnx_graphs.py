"""Time exported ONNX graphs in ONNX Runtime (CPU): prefill and KV-cached decode, side by side.

    python tools/bench_onnx_graphs.py OLD.onnx NEW.onnx [--prefill 128] [--decode 32] [--threads 2]

Each graph (from ``sparsert export``, with a KV cache) runs the same random prompt: the prefill of ``--prefill``
tokens (median of ``--reps``), then ``--decode`` single-token steps on its cache (median per step). The table
gives each graph's file size (with its external data), times and ratios to the first graph, all in one run; the
sessions use sparsert's own settings (``MatMulNBits`` accuracy level 1).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from sparsert.export.onnx_runner import empty_past, make_session, run_logits


def _graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(path: Path, prompt: np.ndarray, decode: int, reps: int, threads: int) -> dict:
    session = make_session(path, threads=threads)
    if not any(i.name.startswith("past_") for i in session.get_inputs()):
        raise SystemExit(f"{path}: no KV cache inputs (export it with its KV cache)")
    run_logits(session, prompt, empty_past(session))  # warm-up
    prefill = _time(lambda: run_logits(session, prompt, empty_past(session)), reps)
    logits, past = run_logits(session, prompt, empty_past(session))
    token = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
    steps = []
    for _ in range(decode):
        start = time.perf_counter()
        logits, past = run_logits(session, token, past)
        steps.append(time.perf_counter() - start)
        token = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
    return {"bytes": _graph_bytes(path), "prefill_s": prefill, "decode_s": statistics.median(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--prefill", type=int, default=128, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=32, help="cached single-token steps")
    parser.add_argument("--reps", type=int, default=5, help="prefill repetitions (median)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--vocab", type=int, default=256, help="prompt ids are drawn below this")
    args = parser.parse_args()
    prompt = np.random.default_rng(0).integers(0, args.vocab, size=(1, args.prefill), dtype=np.int64)
    rows = [(p, bench(p, prompt, args.decode, args.reps, args.threads)) for p in args.graphs]
    base = rows[0][1]
    print(f"ONNX Runtime CPU, {args.threads} threads; prefill {args.prefill} tokens, decode median of {args.decode} "
          "steps; ratios: first graph / this graph")
    print("| graph | size (MB) | prefill (ms) | prefill speed-up | decode (ms/token) | decode speed-up | size ratio |")
    print("|---|---|---|---|---|---|---|")
    for path, r in rows:
        print(f"| {path} | {r['bytes'] / 1e6:.1f} | {1e3 * r['prefill_s']:.1f} | "
              f"{base['prefill_s'] / r['prefill_s']:.2f}x | {1e3 * r['decode_s']:.2f} | "
              f"{base['decode_s'] / r['decode_s']:.2f}x | {base['bytes'] / r['bytes']:.2f}x |")


if __name__ == "__main__":
    main()
