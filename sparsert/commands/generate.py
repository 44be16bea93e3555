"""``sparsert generate ARTIFACT --prompt TEXT``: text from a compressed artifact with a KV cache.

Backends (all run the same loop, :func:`sparsert.runtime.generate.generate_ids`, so one seed gives the same
tokens wherever the logits agree):

- ``torch``   the PyTorch reference (:meth:`Artifact.build_model` + :class:`TorchStepper`), CPU;
- ``onnx``    ONNX Runtime CPU (:class:`sparsert.export.onnx_runner.OnnxStepper`) on ``--onnx PATH`` or, without
              it, on a graph exported to a temporary file for this run. ``--onnx PATH`` must be an export of
              this very artifact: its model config and its recorded sha256 of the artifact's
              ``model.safetensors`` must match (an export without the digest runs with a ``warning:`` line);
- ``runtime`` sparsert's GPU runtime (``sparsert.runtime.gpu_backend.GpuStepper``) on an NVIDIA GPU; without one
              (or with a torch built without CUDA), its CPU fallback with a ``note:`` line: the same packed formats
              and GEMM rounding, on compiled CPU loops (``--cuda-graph`` then is an error).

ARTIFACT may also be a Hugging Face model directory (the ``<run>/hf`` of ``sparsert train --model``): ``torch``
runs it with transformers on the CPU, ``runtime`` on the GPU (or, as above, the CPU) with its 2:4 linears swapped
for sparsert's kernels (:func:`sparsert.backends.make_hf_stepper`).

:func:`sparsert.backends.make_stepper` opens the chosen one. The prompt and its continuation go to stdout;
token count and speed to stderr.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings

import click

from sparsert.backends import BACKENDS, make_hf_stepper, make_stepper
from sparsert.commands import option_given


@click.command("generate")
@click.argument("artifact", type=str)
@click.option("--prompt", required=True, type=str, help="Text to continue (must not be empty).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Tokens to generate (> 0).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy; > 0 samples.")
@click.option("--top-k", type=int, default=None, help="Sample only among the K most likely tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling draws.")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True,
              help="torch: PyTorch reference (CPU); onnx: ONNX Runtime (CPU); runtime: sparsert GPU runtime (its CPU "
                   "fallback, with a note, without a GPU).")
@click.option("--onnx", "onnx_path", type=str, default=None,
              help="With --backend onnx: an ONNX file from `sparsert export` (default: export to a temp file).")
@click.option("--cuda-graph", is_flag=True,
              help="With --backend runtime: replay each decode step as one CUDA graph (no per-layer launch cost).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token ids, timing).")
def command(artifact: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
            backend: str, onnx_path: str | None, cuda_graph: bool, as_json: bool) -> None:
    """Generate a continuation of --prompt from ARTIFACT (greedy by default): a sparsert artifact, or a Hugging Face
    model directory such as the <run>/hf of `sparsert train --model`."""
    from sparsert.runtime.errors import ConfigError, require_path
    from sparsert.runtime.generate import GenerationConfig, generate_ids

    if not prompt:
        raise ConfigError("--prompt is empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # bytes the locale could not decode reach Python as lone surrogates
        raise ConfigError(f"--prompt is not valid UTF-8 text (an undecodable byte at character {exc.start})") from None
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    if onnx_path is not None and backend != "onnx":
        raise ConfigError(f"--onnx applies only to --backend onnx (got --backend {backend})")
    require_path(onnx_path, "--onnx", "the path of an .onnx file")
    if temperature == 0:
        ctx = click.get_current_context()
        sampling = [f for f, name in (("--top-k", "top_k"), ("--seed", "seed")) if option_given(ctx, name)]
        if sampling:
            raise ConfigError(f"{', '.join(sampling)} only {'acts' if len(sampling) == 1 else 'act'} when sampling; "
                              "add --temperature > 0 (the default, 0, decodes greedily)")
    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        with _open(artifact, backend, onnx_path, cuda_graph) as (stepper, tokenizer):
            prompt_ids = tokenizer.encode(prompt)
            start = time.perf_counter()
            ids = generate_ids(stepper, prompt_ids, cfg)
            seconds = time.perf_counter() - start
            context = stepper.max_seq_len
            device = str(getattr(stepper, "device", "cpu"))  # where it ran: runtime may fall back to the CPU
    text = tokenizer.decode(ids)
    # generate_ids stops early when prompt + generated tokens fill the model's context
    stop = "max_new_tokens" if len(ids) == max_new_tokens else "context"
    if as_json:
        click.echo(json.dumps({"backend": backend, "device": device, "prompt": prompt, "text": text, "ids": ids,
                               "seconds": round(seconds, 4), "stop": stop}))
        return
    if stop == "context":
        click.echo(f"note: stopped after {len(ids)} of --max-new-tokens {max_new_tokens}: the prompt "
                   f"({len(prompt_ids)} tokens) and the generated tokens fill the model's context of {context}",
                   err=True)
    click.echo(prompt + text)
    click.echo(f"[{backend}, {device}] {len(ids)} tokens in {seconds:.2f} s "
               f"({len(ids) / max(seconds, 1e-9):.1f} tokens/s)", err=True)


@contextlib.contextmanager
def _open(path: str, backend: str, onnx_path: str | None, cuda_graph: bool):
    """(stepper, tokenizer) of a sparsert artifact, or of a Hugging Face model directory (``<run>/hf``)."""
    from sparsert.runtime.artifact import is_hf_model_dir, load_artifact

    if is_hf_model_dir(path):
        with make_hf_stepper(path, backend, onnx_path, cuda_graph=cuda_graph) as opened:
            yield opened
        return
    art = load_artifact(path)
    with make_stepper(art, backend, onnx_path, cuda_graph=cuda_graph) as stepper:
        yield stepper, art.tokenizer


def _one_line_warnings(show):  # noqa: ANN001, ANN202 - warnings.showwarning's signature
    """A ``warnings.showwarning`` that prints sparsert's own warnings (an ``--onnx`` export that cannot be
    verified) as one ``warning: ...`` line on stderr, the export's notes as ``note: ...`` as ``sparsert export``
    prints them, and passes any other warning to ``show``."""

    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if category.__module__.startswith("sparsert."):
            click.echo(f"{'note' if category.__name__.endswith('Note') else 'warning'}: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning
