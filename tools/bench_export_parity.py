"""Measure ONNX export parity and CPU decode speed: PyTorch reference vs ONNX Runtime (MatMulNBits accuracy
level 1 = fp32, and ORT's default level 4 = int8 activations).

    python tools/bench_export_parity.py [ARTIFACT ...] [--hf HF_DIR ...] [--tokens 64] [--threads N]

Without artifacts it builds random 2:4+INT4 (group 128) artifacts of the ``tiny`` preset, Llama and GPT-2
style, with the model's own init (std 0.02). Prints a markdown table: max abs / rel logit error of each ORT
setting against the reference (see export/parity.py for the measure) and greedy decode tokens/s. ``--hf``
adds Hugging Face directories sparsert wrote (``compress HF_DIR -o OUT``), exported with the KV cache
(export/hf_export.py) and measured against transformers (decode: ``HFStepper``, float32 on the CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sparsert.export.onnx_graph import export_onnx
from sparsert.export.onnx_runner import OnnxStepper
from sparsert.export.parity import check_parity
from sparsert.runtime.artifact import QuantizationInfo, SparsityInfo, load_artifact, save_artifact
from sparsert.runtime.generate import GenerationConfig, TorchStepper, generate_ids
from sparsert.runtime.model import DecoderLM, model_config_from_preset, sparse_linear_names
from sparsert.runtime.packed_linear import pack_linear
from sparsert.runtime.tokenizer import ByteTokenizer

PROMPT = b"def fibonacci(n):\n    "


def random_artifact(path: Path, arch: str, group: int = 128) -> Path:
    torch.manual_seed(0)
    config = model_config_from_preset("tiny", arch)
    sd = DecoderLM(config).state_dict()
    names = sparse_linear_names(config)
    packed = {n: pack_linear(sd[f"{n}.weight"], int4_group_size=group, bias=sd.get(f"{n}.bias")) for n in names}
    dense = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in packed}
    return save_artifact(path, model_config=config, tokenizer=ByteTokenizer(), packed=packed, dense=dense,
                         sparsity=SparsityInfo(tuple(names)), quantization=QuantizationInfo(tuple(names), group))


def tokens_per_s(stepper, prompt: list[int], n: int) -> float:
    cfg = GenerationConfig(max_new_tokens=n)
    generate_ids(stepper, prompt, GenerationConfig(max_new_tokens=4))  # warm-up
    start = time.perf_counter()
    out = generate_ids(stepper, prompt, cfg)
    return len(out) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="*", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for ORT and torch")
    parser.add_argument("--hf", type=Path, action="append", default=[], help="a Hugging Face directory sparsert wrote")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.artifacts or ([] if args.hf else [random_artifact(Path(tmp) / a, a) for a in ("llama", "gpt2")])
        print("| artifact | arch | quant | ORT level | max abs err | max rel err | bound (worst) | torch tok/s "
              "| ORT tok/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for path in paths:
            art = load_artifact(path)
            onnx_path = Path(tmp) / f"{path.name}.onnx"
            export_onnx(art, onnx_path)
            prompt = art.tokenizer.encode(PROMPT.decode())
            torch_tps = tokens_per_s(TorchStepper(art.build_model()), prompt, args.tokens)
            quant = f"int4 g{art.quantization.group_size}" if art.quantization else "fp32"
            for level in (1, None):
                report = check_parity(onnx_path, art, accuracy_level=level, threads=args.threads,
                                      raise_on_failure=False)
                ort_tps = tokens_per_s(OnnxStepper(onnx_path, accuracy_level=level, threads=args.threads),
                                       prompt, args.tokens)
                w = report.worst
                print(f"| {path.name} | {art.model_config.arch} | {quant} | {'default (4)' if level is None else level}"
                      f" | {report.max_abs_err:.3g} | {report.max_rel_err:.3g} | {w.bound:.3g}"
                      f"{'' if report.passed else ' FAIL'} | {torch_tps:.0f} | {ort_tps:.0f} |")
        for path in args.hf:
            hf_rows(path, Path(tmp), args.tokens, args.threads)


def hf_rows(path: Path, tmp: Path, tokens: int, threads: int | None) -> None:
    """The table rows of one Hugging Face directory: exported with the KV cache, against transformers."""
    import numpy as np

    from sparsert.export.hf_export import export_hf_model, parity_prompt_ids
    from sparsert.export.parity import compare_logits
    from sparsert.runtime.hf_stepper import HFStepper
    from sparsert.train.hf_model import load_hf_causal_lm
    from sparsert.train.hf_train import hf_model_config

    onnx_path = tmp / f"{path.name}-hf.onnx"
    result, _ = export_hf_model(path, onnx_path, parity=False)
    bundle, context = load_hf_causal_lm(path), hf_model_config(path).max_seq_len
    model, tok = bundle.model, bundle.tokenizer

    def reference(ids: list[list[int]]) -> np.ndarray:
        with torch.inference_mode():
            return model(input_ids=torch.tensor(ids), use_cache=False).logits.double().numpy()

    prompt_ids = parity_prompt_ids(tok, model.get_output_embeddings().weight.shape[0], context)
    quantized = any(info["bits"] for info in result.layers.values())
    prompt = tok.encode(PROMPT.decode())
    torch_tps = tokens_per_s(HFStepper(model, context, tok.vocab_size), prompt, tokens)
    for level in (1, None):
        report = compare_logits(onnx_path, reference, prompt_ids, quantized=quantized, accuracy_level=level,
                                threads=threads, raise_on_failure=False)
        ort_tps = tokens_per_s(OnnxStepper(onnx_path, accuracy_level=level, threads=threads, max_seq_len=context,
                                           vocab_size=tok.vocab_size), prompt, tokens)
        w = report.worst
        print(f"| {path.name} (HF) | {model.config.model_type} | {'int4' if quantized else 'fp32'} | "
              f"{'default (4)' if level is None else level} | {report.max_abs_err:.3g} | {report.max_rel_err:.3g} | "
              f"{w.bound:.3g}{'' if report.passed else ' FAIL'} | {torch_tps:.0f} | {ort_tps:.0f} |")


if __name__ == "__main__":
    main()
