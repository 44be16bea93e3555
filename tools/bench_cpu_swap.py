"""Time swapped 2:4 (and 2:4 + INT4) linears on the CPU against dense torch, layer by layer and in a model.

    python tools/bench_cpu_swap.py [--threads 2] [--hidden 1024] [--layers 4] [--shapes 4096x4096,11008x4096]

Layer table: one linear ``[N, K]`` at M tokens, median time of ``--reps`` calls, for dense float32 and bf16
(``F.linear``), the CPU product a swapped layer runs (``runtime/sparse_cpu.py``, bf16 activations) and the GPU
kernels' torch fallback it replaced (``sparse_gemm.sparse24_linear`` / ``w4a16_linear`` on the CPU: the weight
decompressed per call). Model table: a random transformers Llama (``--hidden``, ``--layers``), KV-cached decode
ms/token (median of ``--steps``) and a ``--prefill``-token prefill, dense float32 and bf16 vs
``swap_sparse_linears(prune=True)`` 2:4 and 2:4 + INT4 g128, on the CPU product (the float32 model, and the
model cast to bf16 first) and (``backends=``) on the kernels' torch fallbacks, with the bits per weight the
swapped linears hold (``SwapReport``; on the CPU the host copy of the packed weight included where a format does
not share it). Ratios are to dense float32 in the same
run.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from sparsert.runtime import sparse_gemm
from sparsert.runtime.dispatch import OursSparse24, OursW4A16
from sparsert.runtime.linear_swap import swap_sparse_linears
from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.packed_linear import pack_linear
from sparsert.runtime.sparse_cpu import cpu_linear, prepare_cpu


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def layer_rows(shapes: list[tuple[int, int]], tokens: list[int], reps: int) -> list[list[str]]:
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k)
        w = w * nm_mask(w, 2, 4)
        wb = w.bfloat16()
        for int4 in (False, True):
            # kept values stored in bf16, as a bf16 model's swap packs them (a float32 model's: 17 bits, rounded in
            # the loop, about 2x slower at one token)
            packed = pack_linear(w, int4_group_size=128 if int4 else None, values_dtype=torch.bfloat16)
            ours = prepare_cpu(packed, torch.bfloat16)
            old = (sparse_gemm.prepare_w4a16(packed, dtype=torch.bfloat16) if int4
                   else sparse_gemm.prepare_sparse24(packed, dtype=torch.bfloat16))
            old_fn = sparse_gemm.w4a16_linear if int4 else sparse_gemm.sparse24_linear
            for m in tokens:
                x = torch.randn(m, k)
                xb = x.bfloat16()
                dense = _median_ms(functools.partial(F.linear, x, w), reps)
                dense_bf16 = _median_ms(functools.partial(F.linear, xb, wb), reps)
                cpu = _median_ms(functools.partial(cpu_linear, xb, ours), reps)
                fallback = _median_ms(functools.partial(old_fn, xb, old), max(1, reps // 4))
                rows.append([f"{n}x{k}", "2:4+int4 g128" if int4 else "2:4 (bf16 values)", str(m), f"{dense:.2f}",
                             f"{dense_bf16:.2f}", f"{cpu:.2f}", f"{fallback:.2f}", f"{cpu / dense:.2f}x",
                             f"{fallback / cpu:.1f}x"])
                print(" | ".join(rows[-1]), flush=True)
    return rows


def _llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=1000)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _model_times(model, prefill: int, steps: int) -> tuple[float, float]:
    ids = torch.randint(0, 1000, (1, prefill))
    with torch.no_grad():
        prefill_ms = _median_ms(lambda: model(ids, use_cache=True), 3)
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times) * 1e3, prefill_ms


def model_rows(hidden: int, layers: int, prefill: int, steps: int) -> list[list[str]]:
    base = _llama(hidden, layers)
    variants = {"dense fp32": base, "dense bf16": copy.deepcopy(base).to(torch.bfloat16)}
    bits = {"dense fp32": "32", "dense bf16": "16"}
    fallbacks = [OursSparse24("medium"), OursW4A16("prefill")]  # what a CPU swap ran before runtime/sparse_cpu.py
    for label, int4, backends in (("swapped 2:4 (bf16)", False, None), ("swapped 2:4+int4 g128 (bf16)", True, None),
                                  ("bf16 model, swapped 2:4", False, None),
                                  ("bf16 model, swapped 2:4+int4 g128", True, None),
                                  ("2:4 on the kernels' torch fallback", False, fallbacks),
                                  ("2:4+int4 on the kernels' torch fallback", True, fallbacks)):
        model = copy.deepcopy(base)
        if label.startswith("bf16 model"):  # cast before the swap: the kept values are packed in bf16
            model = model.to(torch.bfloat16)
        report = swap_sparse_linears(model, prune=True, int4=int4, group_size=128, dtype=torch.bfloat16,
                                     token_counts=None, backends=backends)
        variants[label] = model
        bits[label] = f"{report.bits_per_weight:.3f}"
    rows, ref = [], None
    for label, model in variants.items():
        slow = "fallback" in label  # 10x+ slower: fewer steps
        decode, pre = _model_times(model, prefill, max(4, steps // 4) if slow else steps)
        ref = ref or (decode, pre)
        rows.append([label, bits[label], f"{decode:.2f}", f"{decode / ref[0]:.2f}x", f"{pre:.1f}",
                     f"{pre / ref[1]:.2f}x"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="layer shapes NxK, comma-separated")
    parser.add_argument("--tokens", default="1,8,128", help="token counts of the layer table")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    tokens = [int(m) for m in args.tokens.split(",")]

    layers = layer_rows(shapes, tokens, args.reps)
    models = model_rows(args.hidden, args.layers, args.prefill, args.steps)
    print(f"\nCPU, {args.threads} threads, torch {torch.__version__}; median ms\n")
    print(_table(["layer N x K", "format", "M", "dense fp32", "dense bf16", "swapped (CPU product)",
                  "kernels' torch fallback", "swapped / dense fp32", "fallback / swapped"], layers))
    print(f"\nLlama, hidden {args.hidden}, {args.layers} layers: decode ms/token (median of {args.steps}), "
          f"prefill of {args.prefill} tokens\n")
    print(_table(["model", "linear bits/weight held", "decode ms/token", "vs dense fp32", "prefill ms",
                  "vs dense fp32"], models))


if __name__ == "__main__":
    main()
