"""ONNX Runtime execution of an exported sparsert graph: session setup and a generation :class:`Stepper`
(:class:`OnnxStepper`; :func:`onnx_stepper` opens one for an artifact, on its exported file or a temporary one).

Sessions run on the CPU execution provider with all graph optimisations on. ONNX Runtime then fuses each
INT4 ``DequantizeLinear -> MatMul`` pair into ``com.microsoft.MatMulNBits``; its ``accuracy_level`` says in
which type the product is computed (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 — ORT's CPU default for the
fused node is 4, which quantizes the *activations* to int8 per block). sparsert pins it to 1 by default
through the session option ``session.qdq_matmulnbits_accuracy_level``, so the INT4 graph computes exactly
``x @ (codes * scale)`` in fp32 and matches the PyTorch reference to fp32 rounding; pass
``accuracy_level=None`` to keep ORT's default (faster on large models, ~1e-2 relative error on logits).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from sparsert.export.annotations import (
    KEY_HF_MODEL_TYPE,
    KEY_MODEL_CONFIG,
    KEY_WEIGHTS_SHA256,
    artifact_weights_sha256,
    get_metadata,
)
from sparsert.runtime.errors import ConfigError, ExportError, require_path

if TYPE_CHECKING:
    from sparsert.runtime.artifact import Artifact

ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"
DEFAULT_ACCURACY_LEVEL = 1


class UnverifiedExportWarning(UserWarning):
    """``--onnx`` names a graph exported before sparsert recorded ``sparsert.weights_sha256``: whether it holds
    the artifact's weights cannot be checked (``sparsert generate`` prints it as one ``warning:`` line)."""


def _check_model_file(path: Path) -> None:
    """ExportError unless ``path`` is an existing regular file (a directory or a missing path is named as such)."""
    if path.is_dir():
        raise ExportError(f"ONNX model {path} is a directory, expected an .onnx file")
    if not path.is_file():
        raise ExportError(f"ONNX model {path} does not exist")


def make_session(
    model: str | Path | onnx.ModelProto | bytes,
    *,
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL,
    threads: int | None = None,
):
    """An ``onnxruntime.InferenceSession`` on the CPU EP with graph optimisations on.

    ``accuracy_level``: MatMulNBits compute type for fused INT4 weights (see the module docstring);
    ``None`` leaves ORT's default. ``threads``: intra-op threads (None = ORT's default, all cores).
    Raises ExportError when the model cannot be loaded.
    """
    import onnxruntime as ort

    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level must be one of 0..4 or None, got {accuracy_level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer it prunes
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if accuracy_level is not None:
        options.add_session_config_entry(ACCURACY_LEVEL_KEY, str(accuracy_level))
    if isinstance(model, onnx.ModelProto):
        source, what = model.SerializeToString(), "the ONNX model"
    elif isinstance(model, bytes):
        source, what = model, "the ONNX model"
    else:
        path = Path(model)
        _check_model_file(path)
        source, what = str(path), str(path)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... classes
        missing = _missing_external_data(Path(source)) if isinstance(source, str) else None
        if missing is not None:
            raise ExportError(f"ONNX Runtime cannot load {what}: its external data file {missing} is missing (it "
                              "must lie beside the model, as export writes it)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX Runtime cannot load {what}: {first}") from None


def _missing_external_data(path: Path) -> Path | None:
    """The first external-data file the ONNX model at ``path`` names that does not exist beside it, or None."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not readable as ONNX: ORT's own message says more
        return None
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and not (path.parent / entry.value).is_file():
                return path.parent / entry.value
    return None


def empty_past(session, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length ``past_*`` feeds [batch, n_heads, 0, head_dim] float32 for every past input."""
    feeds = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past_"):
            _, heads, _, head_dim = inp.shape
            feeds[inp.name] = np.zeros((batch, heads, 0, head_dim), np.float32)
    return feeds


def run_logits(session, input_ids: np.ndarray, past: dict[str, np.ndarray] | None = None):
    """Run one step: ``input_ids`` int64 [B, T] (+ past tensors) -> (logits float32 [B, T, V],
    present tensors renamed to their ``past_*`` input names for the next step; {} without a KV cache)."""
    feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)}
    if past:
        feeds.update(past)
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, feeds)
    presents = {
        name.replace("present_", "past_", 1): value
        for name, value in zip(names, outputs, strict=True)
        if name.startswith("present_")
    }
    return outputs[names.index("logits")], presents


def check_graph_io(session, path: str | Path) -> None:
    """The inputs and outputs ``sparsert export`` writes: ``input_ids`` (the only non-cache input), ``logits``,
    and for every ``past_X`` input a ``present_X`` output (and no present without its past). An ExportError
    names the first mismatch, so a hand-edited graph fails here rather than inside ONNX Runtime's run."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    others = [n for n in inputs if not n.startswith("past_")]
    if others != ["input_ids"]:
        raise ExportError(f"{path}: graph inputs {others} besides the past_* cache, expected exactly ['input_ids'] "
                          "(not a sparsert export)")
    if "logits" not in outputs:
        raise ExportError(f"{path}: graph has no 'logits' output (outputs {outputs}; not a sparsert export)")
    pasts = {n[len("past_"):] for n in inputs if n.startswith("past_")}
    presents = {n[len("present_"):] for n in outputs if n.startswith("present_")}
    for name in sorted(pasts ^ presents):
        have, lacks = ("past_", "present_") if name in pasts else ("present_", "past_")
        raise ExportError(f"{path}: {'input' if have == 'past_' else 'output'} '{have}{name}' has no matching "
                          f"'{lacks}{name}' {'output' if have == 'past_' else 'input'} (not a sparsert export)")


class OnnxStepper:
    """:class:`sparsert.runtime.generate.Stepper` over an exported graph with ONNX Runtime (batch 1).

    With a KV-cache graph each ``step(ids)`` feeds only the new ids with the cached ``present_*`` tensors
    (float32 [1, n_heads, past_seq, head_dim]) of the previous step as ``past_*``. A graph exported with
    ``--no-kv-cache`` is run on the whole sequence each step (correct, slower).
    ``max_seq_len`` comes from the model's ``sparsert.model_config`` metadata; ``metadata`` holds all of the
    model-level metadata (``sparsert.weights_sha256`` among it, for :func:`onnx_stepper`'s check). The export
    of a Hugging Face directory (``sparsert.hf_model_type``, no model config) takes ``max_seq_len`` and
    ``vocab_size`` (the tokenizer's size: ids must be below it and the logits are cut to it) from the caller.
    """

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL,
        threads: int | None = None,
        max_seq_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        from sparsert.export.onnx_export import is_onnx_model  # noqa: PLC0415 - onnx_export imports this module

        path = Path(onnx_path)
        _check_model_file(path)
        if path.stat().st_size == 0:
            raise ExportError(f"ONNX model {path} is an empty file (0 bytes), not an ONNX model")
        if not is_onnx_model(path):
            raise ExportError(f"ONNX model {path} is not a valid ONNX model file (expected an export written by "
                              "sparsert export)")
        try:
            header = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf DecodeError and friends
            raise ExportError(f"{path} is not a readable ONNX model: {exc}") from None
        self.metadata = get_metadata(header)
        config = self.metadata.get(KEY_MODEL_CONFIG)
        self.model_config: dict | None = None
        if config is None and KEY_HF_MODEL_TYPE in self.metadata:  # a Hugging Face export: the caller knows
            if max_seq_len is None or vocab_size is None:
                raise ExportError(f"{path} is the export of a Hugging Face model directory; run it with that "
                                  "directory (sparsert generate HF_DIR --backend onnx --onnx FILE)")
            self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        elif config is None:
            raise ExportError(f"{path} has no '{KEY_MODEL_CONFIG}' metadata (not exported by sparsert export)")
        else:
            try:
                self.model_config = json.loads(config)
                self.max_seq_len = int(self.model_config["max_seq_len"])
                self.vocab_size = int(self.model_config["vocab_size"])
            except (ValueError, TypeError, KeyError):
                raise ExportError(f"{path}: '{KEY_MODEL_CONFIG}' metadata is not a valid model config") from None
        self.path = path
        self.session = make_session(path, accuracy_level=accuracy_level, threads=threads)
        check_graph_io(self.session, path)
        self.kv_cache = any(i.name.startswith("past_") for i in self.session.get_inputs())
        self.reset()

    def reset(self) -> None:
        self._past = empty_past(self.session) if self.kv_cache else {}
        self._ids: list[int] = []

    @property
    def length(self) -> int:
        """Number of positions fed since the last :meth:`reset`."""
        return len(self._ids)

    def step(self, ids: list[int]) -> np.ndarray:
        """Feed ``ids`` after those already fed; returns the last position's logits float32 [V]."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ConfigError("OnnxStepper.step: no token ids given")
        if len(self._ids) + len(ids) > self.max_seq_len:
            raise ConfigError(
                f"sequence of {len(self._ids) + len(ids)} positions exceeds the model's max_seq_len="
                f"{self.max_seq_len}"
            )
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ConfigError(f"token id {bad[0]} is out of range 0..{self.vocab_size - 1}")
        self._ids += ids
        if self.kv_cache:
            logits, self._past = run_logits(self.session, np.array([ids], np.int64), self._past)
        else:
            logits, _ = run_logits(self.session, np.array([self._ids], np.int64))
        return logits[0, -1, : self.vocab_size]  # a Hugging Face embedding may have rows beyond the tokenizer


@contextmanager
def onnx_stepper(artifact: Artifact, onnx_path: str | Path | None = None) -> Iterator[OnnxStepper]:
    """An :class:`OnnxStepper` for ``artifact``: on ``onnx_path``, or without it on a graph exported to a
    temporary directory, removed on exit.

    ``onnx_path`` must be a graph ``sparsert export`` wrote from this very artifact. Checked, in order: it is
    an existing file (not a directory) that parses as an ONNX model with sparsert's ``sparsert.model_config``
    metadata; that config equals the artifact's; and its ``sparsert.weights_sha256`` equals the sha256 of the
    artifact's ``model.safetensors`` (hashed once per call) — so an export of another artifact of the same
    architecture is refused too. Each failure is an ExportError naming both paths. A graph exported before
    the digest was recorded (no ``sparsert.weights_sha256``) is used with an :class:`UnverifiedExportWarning`.
    """
    if onnx_path is not None:
        require_path(onnx_path, "--onnx", "the path of an .onnx file", ExportError)
        stepper = OnnxStepper(onnx_path)
        if stepper.model_config != artifact.model_config.to_dict():
            raise ExportError(f"--onnx {onnx_path} was exported from a different model than {artifact.path} "
                              "(its sparsert.model_config metadata differs)")
        recorded = stepper.metadata.get(KEY_WEIGHTS_SHA256)
        if recorded is None:
            warnings.warn(
                f"--onnx {onnx_path} has no '{KEY_WEIGHTS_SHA256}' metadata (exported by an older sparsert), so "
                f"it cannot be verified to hold the weights of {artifact.path}; re-export it with "
                f"`sparsert export {artifact.path} -o {onnx_path}`",
                UnverifiedExportWarning,
                stacklevel=3,
            )
        else:
            actual = artifact_weights_sha256(artifact.path)
            if recorded != actual:
                raise ExportError(
                    f"--onnx {onnx_path} was exported from another artifact (weights digest {recorded[:16]}), "
                    f"not {artifact.path} (weights digest {actual[:16]}): export this artifact with "
                    f"`sparsert export {artifact.path} -o FILE` and pass --onnx FILE"
                )
        yield stepper
        return
    from sparsert.export.onnx_graph import export_onnx  # noqa: PLC0415 - the graph builder only when needed

    tmp = Path(tempfile.mkdtemp(prefix="sparsert-generate-"))
    try:
        path = tmp / "model.onnx"
        export_onnx(artifact, path)
        yield OnnxStepper(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
