"""Decode speed of `sparsert generate --backend runtime`: eager vs CUDA-graph decode, against dense bf16 torch.

A random Llama-style model (default d = 1024, 8 layers, FFN 2816: 100 M linear weights, context 512) is packed
2:4 + INT4 (group 128) into an artifact, loaded by :class:`sparsert.runtime.gpu_backend.GpuStepper` (everything
outside the sparse linears in bf16) once eagerly and once with ``cuda_graph=True``, and both generate the same
greedy continuation of a random prompt. The baseline is the same (dequantized, 2:4-zeroed) model as a dense
bf16 torch module on the GPU, eagerly and with its decode steps in a CUDA graph
(:class:`~sparsert.runtime.gpu_backend.DecodeGraph`, the runtime's own mechanism), so the graph rows compare
kernels with kernels. Reported per mode: milliseconds per generated token (prompt excluded; best of two runs),
tokens/s and the speed-up over the eager runtime, and for how many tokens the runtime's graph continuation
equals its eager one. A graph step attends over the whole context (masked), an eager one over the tokens so
far: at this context that costs the graph rows a little.

Two more rows (unless ``--no-hf``) time the same shapes as a ``transformers`` Llama (random weights, bf16, eager,
its own KV cache), dense and after :func:`sparsert.runtime.linear_swap.swap_sparse_linears` (pruned to 2:4,
INT4 g128): the path a user serving a Hugging Face model takes. Each row is printed when measured, and the
table is rewritten after each, so a time limit loses only the rows not yet run.

Without a GPU it prints ``no GPU: nothing measured`` and exits 0.

    python tools/bench_generate.py --out bench/generate.md [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/generate.md"), help="markdown table")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=512, help="the model's context (>= prompt + new)")
    parser.add_argument("--no-hf", action="store_true", help="leave out the transformers rows")
    args = parser.parse_args(argv)
    from bench_kernels import cuda_torch

    torch = cuda_torch()
    if torch is None:
        return 0
    return bench(torch, args)


def build_artifact(torch, args, path: Path):
    """The random model, packed 2:4 + INT4 into an artifact at ``path`` (returned loaded)."""
    from sparsert.runtime.artifact import QuantizationInfo, SparsityInfo, load_artifact, save_artifact
    from sparsert.runtime.model import DecoderLM, ModelConfig, sparse_linear_names
    from sparsert.runtime.packed_linear import pack_linear
    from sparsert.runtime.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    config = ModelConfig(arch="llama", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                         ffn_dim=args.ffn, max_seq_len=max(args.max_seq_len, args.prompt_len + args.new_tokens))
    sd = DecoderLM(config).state_dict()
    names = sparse_linear_names(config)
    packed = {n: pack_linear(sd[f"{n}.weight"], int4_group_size=128) for n in names}
    dense = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in packed}
    save_artifact(path, model_config=config, tokenizer=ByteTokenizer(), packed=packed, dense=dense,
                  sparsity=SparsityInfo(tuple(names)), quantization=QuantizationInfo(tuple(names), 128))
    return load_artifact(path)


class GraphedTorchStepper:
    """A plain torch DecoderLM on the GPU: eager prefill (TorchStepper), decode steps from a DecodeGraph."""

    def __init__(self, model, device) -> None:
        from sparsert.runtime.generate import TorchStepper
        from sparsert.runtime.gpu_backend import DecodeGraph

        self.eager = TorchStepper(model)
        self.graph = DecodeGraph(model, self.eager.cache, device)
        self.max_seq_len = self.eager.max_seq_len

    def reset(self) -> None:
        self.eager.reset()

    def step(self, ids: list[int]):
        import torch

        if len(ids) == 1 and self.eager.cache.length > 0:
            with torch.inference_mode():
                return self.graph.step(ids[0])
        return self.eager.step(ids)


def hf_model(torch, args, max_seq_len: int):
    """A random transformers Llama with the benchmark's shapes, bf16 on the GPU (None without transformers)."""
    try:
        import transformers
    except ImportError:
        return None
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=args.d_model, intermediate_size=args.ffn,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.heads, max_position_embeddings=max_seq_len)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()


def time_decode(torch, stepper, prompt: list[int], new_tokens: int, runs: int = 2) -> tuple[float, list[int]]:
    """Milliseconds per generated token after the prompt (greedy; best of ``runs``), and the tokens."""
    from sparsert.runtime.generate import GenerationConfig, generate_ids

    generate_ids(stepper, prompt, GenerationConfig(max_new_tokens=4))  # warm-up (capture, kernel loads)
    best = float("inf")
    for _ in range(runs):
        torch.cuda.synchronize()
        stepper.reset()
        logits = stepper.step(prompt)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = []
        for _ in range(new_tokens):
            token = int(logits.argmax())  # a host read per token, as generate_ids does
            tokens.append(token)
            logits = stepper.step([token])
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) * 1e3 / new_tokens)
    return best, tokens


def bench(torch, args) -> int:
    from sparsert.runtime.device import get_device
    from sparsert.runtime.generate import TorchStepper
    from sparsert.runtime.gpu_backend import GpuStepper

    dev = get_device(0)
    prompt = torch.randint(0, 256, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        art = build_artifact(torch, args, Path(tmp) / "artifact")
        print(f"artifact built in {time.time() - t0:.1f}s", flush=True)
        rows = []
        tokens = {}
        meta = {"device": dev.name, "arch": dev.arch, "d_model": args.d_model, "layers": args.layers,
                "ffn": args.ffn, "max_seq_len": art.model_config.max_seq_len, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "graph_tokens_equal_eager": None,
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

        def record(mode: str, ms: float) -> None:
            rows.append({"mode": mode, "ms_per_token": ms})
            eager = rows[0]["ms_per_token"]
            for r in rows:
                r["tokens_per_s"] = 1e3 / r["ms_per_token"]
                r["vs_runtime_eager"] = eager / r["ms_per_token"]
            print(f"{mode}: {ms:.3f} ms/token", flush=True)
            write_tables(args.out, meta, rows)
        for mode, graph in (("sparsert runtime (eager)", False), ("sparsert runtime (CUDA graph)", True)):
            stepper = GpuStepper(art, tune=False, cuda_graph=graph, dense_dtype=torch.bfloat16)
            stepper.tune([1, args.prompt_len])
            if graph:
                stepper.capture_decode_graph()
            ms, tokens[graph] = time_decode(torch, stepper, prompt, args.new_tokens)
            if graph:
                meta["graph_tokens_equal_eager"] = next(
                    (i for i, (a, b) in enumerate(zip(tokens[True], tokens[False], strict=True)) if a != b),
                    args.new_tokens)
            record(mode, ms)
            stepper = None
            torch.cuda.empty_cache()
        dense = art.build_model().to(device="cuda", dtype=torch.bfloat16)
        for mode, stepper in (("torch dense bf16 (eager)", TorchStepper(dense)),
                              ("torch dense bf16 (CUDA graph)", GraphedTorchStepper(dense, torch.device("cuda")))):
            ms, _ = time_decode(torch, stepper, prompt, args.new_tokens)
            record(mode, ms)
        dense = stepper = None
        torch.cuda.empty_cache()
        model = None if args.no_hf else hf_model(torch, args, art.model_config.max_seq_len)
        if model is not None:
            from sparsert.runtime.hf_stepper import HFStepper
            from sparsert.runtime.linear_swap import swap_sparse_linears

            ms, _ = time_decode(torch, HFStepper(model, art.model_config.max_seq_len), prompt, args.new_tokens)
            record("transformers dense bf16 (eager)", ms)
            report = swap_sparse_linears(model, prune=True, int4=True, token_counts=[1, args.prompt_len])
            meta["hf_swap"] = report.summary()
            ms, _ = time_decode(torch, HFStepper(model, art.model_config.max_seq_len), prompt, args.new_tokens)
            record("transformers + swap_sparse_linears 2:4+INT4 (eager)", ms)
            model = None
            torch.cuda.empty_cache()
    print(to_markdown(meta, rows))
    return 0


def write_tables(out: Path, meta: dict, rows: list[dict]) -> None:
    from sparsert.runtime.fileio import write_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, to_markdown(meta, rows))
    write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1))


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# sparsert generate: decode speed (tools/bench_generate.py)", "",
        f"- device: {meta['device']} ({meta['arch']}); {meta['date']}",
        f"- random Llama-style model, d = {meta['d_model']}, {meta['layers']} layers, FFN {meta['ffn']}, context "
        f"{meta['max_seq_len']}, linears 2:4 + INT4 (g128), the rest bf16; batch 1, greedy; prompt "
        f"{meta['prompt_len']} tokens, then {meta['new_tokens']} generated (timed, host argmax per token "
        "included; best of 2 runs)",
        f"- CUDA-graph tokens equal to the eager runtime's: the first {meta['graph_tokens_equal_eager']} of "
        f"{meta['new_tokens']} (the graph's attention sums over the masked whole cache: rounding-level logit "
        "differences can flip a near-tie of a random model)",
        f"- transformers rows: a random Llama of the same shapes (its own attention and KV cache, bf16); swap: "
        f"{meta.get('hf_swap', 'not run')}",
        "", "| mode | ms / token | tokens/s | vs runtime eager |", "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['ms_per_token']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['vs_runtime_eager']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
