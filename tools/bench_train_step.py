"""Whole-model training step on a GPU: dense vs the Hu et al. recipe with each ``--sparse-gemm``.

What ``sparsert train --method hu --sparse-gemm ours|cusparselt`` buys end to end, beside the FFN-only number of
``bench_ffn_train_step.py`` (issue 3): one ``train.trainer.train_step`` (forward, loss, backward, clipping, masked
decay, AdamW) of a Llama-style DecoderLM, variants built from the same seed and interleaved step by step:

* ``dense fp32`` and ``dense bf16`` — ``--dense`` (the bf16 one under the same autocast as the sparse GEMMs: the
  fair baseline of the last two rows);
* ``hu masked`` — ``--method hu`` as trained by default (float32 matmuls on W⊙M);
* ``hu ours`` / ``hu cusparselt`` — ``--method hu --sparse-gemm ours|cusparselt`` (bf16 autocast).

The Hu recipe trains the feed-forward linears 2:4 (its default); mask refreshes (every 40 steps) are not in the
timed steps. Reported: median ms per step and the ratio to ``dense bf16`` (> 1 = faster). Without a GPU it
prints ``no GPU: nothing measured`` and exits 0 (it never estimates); ``--device cpu`` runs a tiny smoke
configuration through the kernels' torch fallbacks (nothing it prints is a GPU number).

    python tools/bench_train_step.py [--d-model 2048] [--ffn 5632] [--layers 4] [--heads 16] [--seq-len 1024]
        [--batch-size 8] [--repeats 10] [--warmup 3] [--device cuda] [--out train_step.md]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

DENSE_BF16 = "dense bf16"


def default_model():
    """The measured model: Llama-style, d 2048, ffn 5632 (both multiples of 64), 4 blocks, 1024 positions."""
    from sparsert.runtime.model import ModelConfig

    return ModelConfig(vocab_size=32000, d_model=2048, n_layers=4, n_heads=16, ffn_dim=5632, max_seq_len=1024)


@dataclass
class BenchConfig:
    model: object = field(default_factory=default_model)  # a sparsert.runtime.model.ModelConfig
    batch_size: int = 8
    repeats: int = 10
    warmup: int = 3
    device: str = "cuda"


def variants(device: str) -> dict[str, dict]:
    """name -> (TrainConfig overrides, autocast dtype or None); cuSPARSELt only where it can run."""
    from sparsert.runtime.cusparselt import cusparselt_status

    out = {"dense fp32": (dict(dense=True), None), DENSE_BF16: (dict(dense=True), torch.bfloat16),
           "hu masked": (dict(method="hu"), None), "hu ours": (dict(method="hu", sparse_gemm="ours"), torch.bfloat16)}
    if device == "cuda" and not cusparselt_status():
        out["hu cusparselt"] = (dict(method="hu", sparse_gemm="cusparselt"), torch.bfloat16)
    return out


def make_step(cfg: BenchConfig, overrides: dict, autocast):
    """A zero-argument callable running one ``train_step`` of a fresh model of ``cfg`` (same seed for all)."""
    from sparsert.train.sparsify import sparse_modules
    from sparsert.train.train_config import TrainConfig
    from sparsert.train.trainer import build_model, build_optimizer, train_step

    mc = cfg.model
    tc = TrainConfig(seq_len=mc.max_seq_len, batch_size=cfg.batch_size, threads=None, progress=False, **overrides)
    model = build_model(mc, tc).to(cfg.device)
    gen_device = cfg.device if tc.sparse_gemm == "masked" else "cpu"  # as the trainer makes it
    gen = torch.Generator(device=gen_device).manual_seed(2)
    for module in sparse_modules(model).values():
        module.generator = gen
    optimizer = build_optimizer(model, tc)
    g = torch.Generator(device=cfg.device).manual_seed(1)
    x, y = (torch.randint(0, mc.vocab_size, (cfg.batch_size, mc.max_seq_len), generator=g, device=cfg.device)
            for _ in range(2))
    decay = tc.masked_decay_at(1)

    def step():
        out = train_step(model, optimizer, x, y, step=1, lr=1e-4, grad_clip=1.0, sparse=False,
                         masked_decay=decay, autocast=autocast)
        if not out.loss == out.loss:
            raise RuntimeError("non-finite loss")
    return step


def time_steps(steps: dict, cfg: BenchConfig) -> dict[str, float]:
    """Median ms per step of each variant, interleaved round by round after ``warmup`` steps each (the FFN
    benchmark's protocol)."""
    from bench_ffn_train_step import StepTimer, interleaved_medians

    med = interleaved_medians(steps, StepTimer(cfg.device), cfg.warmup, cfg.repeats)
    return {name: t * 1e3 for name, t in med.items()}


def to_markdown(cfg: BenchConfig, ms: dict[str, float], notes: dict[str, str], meta: str) -> str:
    base, mc = ms.get(DENSE_BF16), cfg.model
    lines = ["# Whole-model training step: dense vs the Hu recipe on each --sparse-gemm", "", f"- {meta}",
             f"- Llama DecoderLM d={mc.d_model}, ffn={mc.ffn_dim}, {mc.n_layers} layers, {mc.n_heads} heads, "
             f"{cfg.batch_size}x{mc.max_seq_len} tokens, vocab {mc.vocab_size}; median of {cfg.repeats} steps after "
             f"{cfg.warmup}, variants interleaved; ratio = dense bf16 time / variant time", "",
             "| variant | ms/step | ratio to dense bf16 | note |", "|---|---|---|---|"]
    for name in [*ms, *(n for n in notes if n not in ms)]:
        t = ms.get(name)
        ratio = f"{base / t:.3f}x" if t and base else "–"
        lines.append(f"| {name} | {f'{t:.2f}' if t else '–'} | {ratio} | {notes.get(name, '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d, m = BenchConfig(), default_model()
    for flag, value, what in (("--d-model", m.d_model, "model width"), ("--ffn", m.ffn_dim, "feed-forward width"),
                              ("--layers", m.n_layers, "blocks"), ("--heads", m.n_heads, "attention heads"),
                              ("--seq-len", m.max_seq_len, "tokens per sequence"),
                              ("--batch-size", d.batch_size, "sequences per step"),
                              ("--repeats", d.repeats, "timed steps per variant"),
                              ("--warmup", d.warmup, "untimed steps per variant first")):
        ap.add_argument(flag, type=int, default=value, help=what)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=d.device,
                    help="cuda (the measurement) or cpu (a tiny smoke run through the torch fallbacks)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    for flag, v in (("--d-model", args.d_model), ("--ffn", args.ffn)):
        if v <= 0 or v % 64:
            print(f"error: {flag} must be a positive multiple of 64 (the 2:4 GEMMs' k tile), got {v}", file=sys.stderr)
            return 2
    try:
        model = replace(m, d_model=args.d_model, ffn_dim=args.ffn, n_layers=args.layers, n_heads=args.heads,
                        max_seq_len=args.seq_len)
    except ValueError as exc:  # ModelConfig names the field
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = BenchConfig(model=model, batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup,
                      device=args.device)
    if cfg.device == "cpu":  # a smoke configuration: the torch fallbacks of the sparse GEMMs are slow
        cfg = BenchConfig(model=replace(m, vocab_size=256, d_model=128, n_layers=2, n_heads=4, ffn_dim=384,
                                        max_seq_len=64),
                          batch_size=2, repeats=max(1, min(args.repeats, 2)), warmup=0, device="cpu")
        meta = "device: cpu (torch fallbacks; not a GPU measurement)"
    else:
        from sparsert.runtime.device import probe_gpu

        ok, why = probe_gpu()
        if not (ok and torch.cuda.is_available()):
            print(f"no GPU: nothing measured ({why or 'torch sees no CUDA device'})")
            return 0
        meta = f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}"
    steps, notes = {}, {}
    for name, (overrides, autocast) in variants(cfg.device).items():
        try:
            steps[name] = make_step(cfg, overrides, autocast)
            steps[name]()  # builds kernels, searches cuSPARSELt configurations: outside the timing
        except Exception as exc:  # a variant that cannot run is reported, the others still measured
            steps.pop(name, None)
            notes[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    ms = time_steps(steps, cfg)
    text = to_markdown(cfg, ms, notes, meta)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
