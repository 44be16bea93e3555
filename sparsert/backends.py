"""Generation backends by name: ``make_stepper(artifact, "torch" | "onnx" | "runtime")`` -> a Stepper, and
``make_hf_stepper(path, "torch" | "onnx" | "runtime")`` for a Hugging Face model directory.

Each backend's stepper lives with its backend — :class:`sparsert.runtime.generate.TorchStepper` (PyTorch
reference, CPU), :class:`sparsert.runtime.gpu_backend.GpuStepper` (sparsert's GPU runtime) and
:class:`sparsert.export.onnx_runner.OnnxStepper` (ONNX Runtime, opened by
:func:`sparsert.export.onnx_runner.onnx_stepper`). Choosing among all three needs both ``runtime`` and
``export``, and ``runtime`` never imports ``export``, so the choice sits here, above both (like the CLI, which
calls it). Each backend is imported only when chosen: ``--backend torch`` loads neither ONNX nor CUDA.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparsert.runtime.artifact import Artifact
    from sparsert.runtime.generate import Stepper

BACKENDS = ("torch", "onnx", "runtime")


@contextmanager
def make_stepper(artifact: Artifact, backend: str, onnx_path: str | Path | None = None, *,
                 cuda_graph: bool = False) -> Iterator[Stepper]:
    """Yield a :class:`~sparsert.runtime.generate.Stepper` for ``artifact`` (a loaded
    :class:`~sparsert.runtime.artifact.Artifact`) on ``backend``, one of :data:`BACKENDS`; ``onnx_path``: with
    ``"onnx"``, an exported graph of this artifact (default: one exported to a temporary file); ``cuda_graph``:
    with ``"runtime"``, replay each decode step as one CUDA graph. Temporary files are removed on exit.
    ConfigError for an unknown backend (or ``cuda_graph`` on another), DeviceError when the GPU runtime cannot
    load. Without a usable GPU (or with a torch built without CUDA) ``"runtime"`` runs its CPU fallback,
    ``GpuStepper(artifact, device="cpu")``, with a :class:`RuntimeNote` (``cuda_graph`` is then a DeviceError)."""
    from sparsert.runtime.errors import ConfigError, DeviceError  # noqa: PLC0415 - keep `import` light

    if cuda_graph and backend != "runtime":
        raise ConfigError(f"--cuda-graph applies only to --backend runtime (got --backend {backend})")
    if backend == "torch":
        from sparsert.runtime.generate import TorchStepper  # noqa: PLC0415

        yield TorchStepper(artifact.build_model())
    elif backend == "onnx":
        from sparsert.export.onnx_runner import onnx_stepper  # noqa: PLC0415

        with onnx_stepper(artifact, onnx_path) as stepper:
            yield stepper
    elif backend == "runtime":
        on_gpu = _runtime_on_gpu(cuda_graph)
        try:
            from sparsert.runtime.gpu_backend import GpuStepper  # noqa: PLC0415
        except ImportError as exc:
            raise DeviceError(f"--backend runtime is unavailable: {exc}") from None
        if not on_gpu:  # the layers decide their (one) CPU backend at their first call, not for every bucket now
            yield GpuStepper(artifact, device="cpu", tune=False)
            return
        stepper = GpuStepper(artifact, cuda_graph=cuda_graph)
        if cuda_graph:
            stepper.capture_decode_graph()  # before any timing: the first token does not pay for the capture
        yield stepper
    else:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


class RuntimeNote(UserWarning):
    """What ``--backend runtime`` did instead of what was asked (the CLI prints it as a ``note:`` line)."""


def _runtime_on_gpu(cuda_graph: bool) -> bool:
    """True when ``--backend runtime`` can run on a GPU; otherwise a :class:`RuntimeNote` saying why it runs on the
    CPU (its CPU fallback), or a DeviceError for ``--cuda-graph``, which needs the GPU."""
    import torch  # noqa: PLC0415

    from sparsert.runtime.device import NO_GPU_MESSAGE, probe_gpu  # noqa: PLC0415
    from sparsert.runtime.errors import DeviceError  # noqa: PLC0415

    usable, reason = probe_gpu()
    if usable and not torch.cuda.is_available():
        usable, reason = False, (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
                                 else f"this torch ({torch.__version__}) cannot use the GPU: "
                                      "torch.cuda.is_available() is False")
    if usable:
        return True
    detail = reason.removeprefix(NO_GPU_MESSAGE).lstrip(": ")  # probe_gpu's preamble says what this does
    if cuda_graph:
        raise DeviceError(f"--cuda-graph needs a usable NVIDIA GPU (sm_80 or newer): {detail}; leave it out to run "
                          "--backend runtime on the CPU")
    warnings.warn(RuntimeNote(f"no usable GPU ({detail}): --backend runtime runs on the CPU, its 2:4 layers packed "
                              "as on the GPU and multiplied by compiled CPU loops with the kernels' rounding "
                              "(bf16 activations)"), stacklevel=4)  # the caller's `with`
    return False


@contextmanager
def make_hf_stepper(path: str | Path, backend: str, onnx_path: str | Path | None = None, *,
                    cuda_graph: bool = False) -> Iterator[tuple[Stepper, object]]:
    """Yield ``(stepper, tokenizer)`` for the local Hugging Face causal-LM directory ``path`` (e.g. the ``<run>/hf``
    of ``sparsert train --model``): ``"torch"`` runs it with transformers on the CPU in float32 (the reference);
    ``"onnx"`` runs ``sparsert export``'s logits graph of it with ONNX Runtime (``onnx_path``, or exported to a
    temporary file; :func:`sparsert.export.hf_export.hf_onnx_stepper`); ``"runtime"`` loads it on the GPU, swaps
    its 2:4 linears (those its ``sparsert.json`` records, INT4 where they trained with QAT; packed from the
    float32 weights, bf16 activations) for sparsert's kernels
    (:func:`sparsert.train.hf_model.swap_saved_sparse_layers`) and runs the rest in bf16. ConfigError for
    ``cuda_graph`` (a transformers model decodes eagerly) or a directory without a tokenizer; DeviceError when
    the GPU runtime cannot run. Without a usable GPU (or with a torch built without CUDA) ``"runtime"`` runs on
    the CPU, with a :class:`RuntimeNote`: the swapped layers on the compiled CPU product, the rest in float32."""
    from sparsert.runtime.errors import ConfigError  # noqa: PLC0415

    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if cuda_graph:
        raise ConfigError(f"--cuda-graph: {path} is a Hugging Face model directory, which decodes eagerly (the CUDA "
                          "graph runs sparsert artifacts' decode step)")
    import torch  # noqa: PLC0415

    from sparsert.runtime.hf_stepper import HFStepper  # noqa: PLC0415
    from sparsert.runtime.linear_swap import NothingToSwapError  # noqa: PLC0415
    from sparsert.train.hf_model import (  # noqa: PLC0415
        SPARSERT_FILE,
        has_tokenizer_files,
        load_hf_causal_lm,
        saved_sparse_layers,
        swap_saved_sparse_layers,
    )
    from sparsert.train.hf_train import hf_model_config  # noqa: PLC0415

    if not has_tokenizer_files(path):  # before the model is loaded
        raise ConfigError(f"{path}: no tokenizer files in the model directory, so the prompt cannot be encoded")
    config = hf_model_config(path)
    limit = config.max_seq_len
    on_gpu = backend == "runtime" and _runtime_on_gpu(False)  # the note after the directory's own checks
    if backend == "onnx":
        from sparsert.export.hf_export import hf_onnx_stepper  # noqa: PLC0415
        from sparsert.runtime.hf_tokenizer import HFTokenizer  # noqa: PLC0415

        tokenizer = HFTokenizer(path)
        if tokenizer.vocab_size > config.vocab_size:
            raise ConfigError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                              f"only {config.vocab_size} rows")
        with hf_onnx_stepper(path, onnx_path, max_seq_len=limit, vocab_size=tokenizer.vocab_size) as stepper:
            yield stepper, tokenizer
        return
    bundle = load_hf_causal_lm(path)  # float32: the 2:4 layers are packed from the weights as stored
    model = bundle.model
    if backend == "runtime":
        if on_gpu:
            model = model.to("cuda")
        try:  # on the CPU one backend (the CPU product): each layer decides at its first call, nothing to tune now
            swap_saved_sparse_layers(model, path, dtype=torch.bfloat16,
                                     **({} if on_gpu else {"token_counts": None}))
        except NothingToSwapError:
            if saved_sparse_layers(path) is not None:
                raise
            raise ConfigError(f"{path} is a Hugging Face model directory without {SPARSERT_FILE} and no linear weight "
                              "that is 2:4 along K: nothing for --backend runtime's 2:4 kernels to run; prune it first "
                              f"with: sparsert compress {path} -o OUT") from None
        if on_gpu:
            model = model.to(torch.bfloat16)  # the rest of the model (the swapped layers keep their formats)
    yield HFStepper(model, limit, bundle.tokenizer.vocab_size), bundle.tokenizer
