"""Compression benchmark: bits per weight and compression ratios of dense, 2:4 fp16 and 2:4 + INT4 artifacts.

For a model preset (random weights: sizes do not depend on values) and for one Llama-2-7B-shaped block
(d_model 4096, ffn 11008, 32 heads: four 4096x4096 attention projections and three 4096<->11008 MLP
projections, 202 M linear weights, generated and packed one layer at a time so the 7B model is never
allocated), this writes real artifacts with :func:`save_artifact`, measures them with :func:`artifact_stats`
(the numbers ``sparsert inspect`` prints) and checks the 2:4 + INT4 g128 rows against the targets:
linear weights <= 3.25 bits/weight and >= 9.8x smaller than FP32. Existing artifacts can be measured too.

    python tools/bench_compression.py                     # tiny preset + the 7B-shaped block
    python tools/bench_compression.py --preset small --no-7b
    python tools/bench_compression.py --artifact runs/x/artifact

Exit code 1 when a 2:4 + INT4 row misses a target. The 7B block's dense FP32 row is not written (800 MB):
dense FP32 is 32 bits/weight and 1.00x by definition.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsert.runtime.artifact import QuantizationInfo, SparsityInfo, model_state_shapes, save_artifact
from sparsert.runtime.artifact_stats import (
    MAX_BITS_PER_WEIGHT_24_INT4,
    MIN_RATIO_VS_FP32_24_INT4,
    ArtifactStats,
    artifact_stats,
)
from sparsert.runtime.model import DecoderLM, ModelConfig, model_config_from_preset, sparse_linear_names
from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.packed_linear import pack_linear
from sparsert.runtime.tokenizer import ByteTokenizer

GROUP = 128
LLAMA2_7B_BLOCK = ModelConfig(arch="llama", vocab_size=256, d_model=4096, n_layers=1, n_heads=32, ffn_dim=11008,
                              max_seq_len=16)
VARIANTS = ("dense fp32", "2:4 fp16", f"2:4+INT4 g{GROUP}")


def _write(out: Path, config: ModelConfig, variant: str, packed: dict, dense: dict) -> Path:
    names = tuple(packed)
    return save_artifact(
        out,
        model_config=config,
        tokenizer=ByteTokenizer(),
        packed=packed,
        dense=dense,
        sparsity=SparsityInfo(names) if names else None,
        quantization=QuantizationInfo(names, GROUP) if "INT4" in variant else None,
        dense_dtype="float32" if variant == "dense fp32" else "float16",
        producer={"source": {"benchmark": "tools/bench_compression.py"}},
    )


def build_preset_artifacts(preset: str, root: Path) -> dict[str, Path]:
    """Three artifacts of a random-init model of ``preset``, magnitude-pruned to 2:4 for the sparse ones."""
    config = model_config_from_preset(preset)
    torch.manual_seed(0)
    state = DecoderLM(config).state_dict()
    names = sparse_linear_names(config)
    paths = {}
    for variant in VARIANTS:
        if variant == "dense fp32":
            packed = {}
        else:
            group = GROUP if "INT4" in variant else None
            packed = {
                n: pack_linear(state[f"{n}.weight"], int4_group_size=group, bias=state.get(f"{n}.bias"),
                               values_dtype=torch.float16, name=n)
                for n in names
            }
        dense = {k: v for k, v in state.items() if k.rpartition(".")[0] not in packed}
        paths[variant] = _write(root / f"{preset}-{variant.replace(' ', '_')}", config, variant, packed, dense)
    return paths


def build_7b_block_artifacts(root: Path) -> dict[str, Path]:
    """2:4 fp16 and 2:4 + INT4 artifacts of one Llama-2-7B-shaped block, one layer in memory at a time."""
    config = LLAMA2_7B_BLOCK
    shapes = model_state_shapes(config)
    names = sparse_linear_names(config)
    gen = torch.Generator().manual_seed(0)
    packed: dict[str, dict] = {"2:4 fp16": {}, f"2:4+INT4 g{GROUP}": {}}
    for n in names:
        w = torch.randn(shapes[f"{n}.weight"], generator=gen) * 0.02
        mask = nm_mask(w)
        packed["2:4 fp16"][n] = pack_linear(w, mask=mask, values_dtype=torch.float16, name=n)
        packed[f"2:4+INT4 g{GROUP}"][n] = pack_linear(w, mask=mask, int4_group_size=GROUP, name=n)
        del w, mask
    dense = {k: torch.randn(s, generator=gen) * 0.02 if k.endswith("emb.weight") or k == "lm_head.weight"
             else torch.ones(s) for k, s in shapes.items() if k.rpartition(".")[0] not in names}
    return {v: _write(root / f"llama2-7b-block-{i}", config, v, packed[v], dense) for i, v in enumerate(packed)}


def _verdict(variant: str, s: ArtifactStats) -> str:
    if "INT4" not in variant or f"g{GROUP}" not in variant:
        return ""
    ok = s.linear_bits_per_weight <= MAX_BITS_PER_WEIGHT_24_INT4 and s.linear_ratio_vs_fp32 >= MIN_RATIO_VS_FP32_24_INT4
    return "PASS" if ok else "FAIL"


def _row(model: str, variant: str, s: ArtifactStats | None) -> tuple[str, str]:
    if s is None:  # dense FP32 by definition
        return f"| {model} | {variant} | 32.000 | 1.00 | 0.50 | (not written) | 1.00 | |", ""
    verdict = _verdict(variant, s)
    return (
        f"| {model} | {variant} | {s.linear_bits_per_weight:.3f} | {s.linear_ratio_vs_fp32:.2f} | "
        f"{s.linear_ratio_vs_fp16:.2f} | {s.file_bytes / 2**20:.2f} MiB | {s.model_ratio_vs_fp32:.2f} | {verdict} |",
        verdict,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="model preset to build (default: tiny)")
    parser.add_argument("--no-7b", action="store_true", help="skip the Llama-2-7B-shaped block")
    parser.add_argument("--artifact", action="append", default=[], help="also measure this artifact (repeatable)")
    parser.add_argument("--keep", type=Path, default=None, help="write the artifacts here instead of a temp dir")
    args = parser.parse_args(argv)

    rows, verdicts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        for variant, path in build_preset_artifacts(args.preset, root).items():
            rows.append(_row(f"{args.preset} preset", variant, artifact_stats(path)))
        if not args.no_7b:
            rows.append(_row("Llama-2-7B block", "dense fp32", None))
            for variant, path in build_7b_block_artifacts(root).items():
                rows.append(_row("Llama-2-7B block", variant, artifact_stats(path)))
        for path in args.artifact:
            s = artifact_stats(path)
            q = s.quantization
            variant = ("2:4" if s.sparsity else "dense") + (f"+INT4 g{q['group_size']}" if q else f" {s.dense_dtype}")
            rows.append(_row(path, variant, s))
        elapsed = time.perf_counter() - t0

    print("| model | variant | linear bits/weight | linear ×FP32 | linear ×FP16 | model.safetensors | model ×FP32 "
          f"| ≤{MAX_BITS_PER_WEIGHT_24_INT4} b/w, ≥{MIN_RATIO_VS_FP32_24_INT4}× |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for line, verdict in rows:
        print(line)
        verdicts.append(verdict)
    print(f"\nlinear = the block linears (values/qweight + indices + scales + bias); model = all parameters vs the "
          f"model.safetensors size on disk. {elapsed:.1f} s.")
    return 1 if "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
