"""Parity of an exported graph: ONNX Runtime (CPU) logits against the PyTorch reference of the same artifact.

The reference is :meth:`Artifact.build_model` — a float32 :class:`DecoderLM` holding the decompressed and
dequantized weights — run on the full sequence without a cache. The ONNX model is run

- ``full``: on each fixed prompt in one call (batch 1, empty past);
- ``batch``: on the first two prompts cut to a common length, as one batch of 2;
- ``kv-cache`` (KV-cache graphs only): on the longest prompt fed in three calls — the prefix with an empty
  past, then two tokens (a multi-token step after a past, which exercises the causal mask with an offset),
  then the last token (single-token decode) — each call's logits compared with the full-sequence
  reference at the same positions.

Error measure per check: ``max_abs = max |onnx - ref|`` over all logits, and ``rel = max_abs / max |ref|``
(relative to the logit scale; element-wise relative error is meaningless near zero). A check passes when
``max_abs <= atol + rtol * max |ref|``.

Tolerances (:func:`default_tolerance`):

- ``FP32_TOLERANCE`` (rtol 1e-4, atol 1e-5) for every graph that computes in fp32: dense float 2:4 weights,
  and INT4 weights with the ``MatMulNBits`` accuracy level pinned to 1 (fp32; the default of
  :func:`check_parity`). Dequantization ``code * scale`` is exact in fp32 (a 4-bit integer times an fp16
  scale has at most 15 significant bits), so the only differences are summation order and fused kernels
  (ORT's GEMM, softmax, tanh/erf approximations) — measured 4e-7 .. 5e-6 relative on test models, so 1e-4
  leaves 20x or more of margin while a single flipped or mis-placed weight is far above it.
- ``INT4_INT8_TOLERANCE`` (rtol 5e-2, atol 1e-3) for INT4 graphs run with ORT's default accuracy level
  (``accuracy_level=None`` -> 4): the fused node quantizes activations to int8 per block before the
  product. Measured ~4e-3 relative on a (briefly) trained tiny model and ~1e-2 on random tiny models; the
  error grows with activation outliers (random models with 10x weights reach 3e-2 .. 1.3e-1 and fail),
  which is why the fp32 level is the default (numbers in docs/ONNX.md, tools/bench_export_parity.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from sparsert.export.onnx_runner import DEFAULT_ACCURACY_LEVEL, empty_past, make_session, run_logits
from sparsert.runtime.artifact import Artifact
from sparsert.runtime.errors import ExportError

DEFAULT_PROMPTS: tuple[bytes, ...] = (
    b"Hello, world!",
    b"def add(a, b):\n    return a + b\n",
    # Long enough to cover many RoPE / learned positions (cut to max_seq_len).
    b"import os\nimport sys\n\n\nclass Config:\n    \"\"\"Settings read from the environment.\"\"\"\n\n"
    b"    def __init__(self, name: str = 'sparsert') -> None:\n        self.name = name\n"
    b"        self.debug = os.environ.get('DEBUG', '0') == '1'\n",
)


@dataclass(frozen=True)
class Tolerance:
    """Pass iff ``max |onnx - ref| <= atol + rtol * max |ref|``."""

    rtol: float
    atol: float

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ExportError(f"parity tolerance {name} must be a finite number >= 0, got {v!r}")

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale

    def __str__(self) -> str:
        return f"atol {self.atol:g} + rtol {self.rtol:g} * max|logit|"


FP32_TOLERANCE = Tolerance(rtol=1e-4, atol=1e-5)
INT4_INT8_TOLERANCE = Tolerance(rtol=5e-2, atol=1e-3)


def default_tolerance(quantized: bool, accuracy_level: int | None) -> Tolerance:
    """fp32 bound unless INT4 weights run through MatMulNBits with activation quantization (level 4/None)."""
    if quantized and accuracy_level not in (0, 1):
        return INT4_INT8_TOLERANCE
    return FP32_TOLERANCE


@dataclass(frozen=True)
class ParityCheck:
    """One comparison: ``mode`` is ``full``, ``batch`` or ``kv-cache``."""

    mode: str
    prompt: bytes
    max_abs_err: float
    max_ref: float
    bound: float

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / max(self.max_ref, 1e-30)

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_err <= self.bound)  # NaN fails


@dataclass
class ParityReport:
    tolerance: Tolerance
    accuracy_level: int | None
    checks: list[ParityCheck] = field(default_factory=list)

    @property
    def worst(self) -> ParityCheck:
        """The check closest to (or furthest past) its bound."""
        return max(self.checks, key=lambda c: np.inf if not c.passed else c.max_abs_err / c.bound)

    @property
    def max_abs_err(self) -> float:
        return max(c.max_abs_err for c in self.checks)

    @property
    def max_rel_err(self) -> float:
        return max(c.rel_err for c in self.checks)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def summary(self) -> str:
        w = self.worst
        return (
            f"max abs error {self.max_abs_err:.3g}, max rel error {self.max_rel_err:.3g} over {len(self.checks)} "
            f"checks (tolerance {self.tolerance}; worst: {w.mode} {w.max_abs_err:.3g} <= {w.bound:.3g})"
        )


def _prompt_ids(prompt: bytes, artifact: Artifact) -> list[int]:
    if not isinstance(prompt, bytes):
        raise ExportError(f"parity check: prompts must be bytes (UTF-8 text), got {type(prompt).__name__}")
    try:
        text = prompt.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExportError(f"parity check: prompt {prompt[:40]!r} is not UTF-8 ({exc.reason} at byte "
                          f"{exc.start})") from None
    ids = artifact.tokenizer.encode(text)[: artifact.model_config.max_seq_len]
    if not ids:
        raise ExportError("parity check: empty prompt")
    return ids


def check_parity(
    onnx_model: str | Path | onnx.ModelProto,
    artifact: Artifact,
    *,
    prompts: Sequence[bytes] = DEFAULT_PROMPTS,
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL,
    tolerance: Tolerance | None = None,
    threads: int | None = None,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Compare ONNX Runtime and PyTorch logits on ``prompts`` (see the module docstring).

    Args:
        onnx_model: path of the exported model, or the model in memory.
        accuracy_level: MatMulNBits accuracy level pinned for the session (None = ORT's default, 4).
        tolerance: default from :func:`default_tolerance` for the artifact's quantization and level.
    Returns the report; raises ExportError naming the prompt, mode, max abs/rel error and the tolerance for
    the first failing check (unless ``raise_on_failure`` is False).
    """
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise ExportError(f"parity check: prompts must be a non-empty sequence of bytes, got {prompts!r:.60}")
    model = artifact.build_model()

    def reference(ids: list[list[int]]) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.tensor(ids, dtype=torch.int64)).double().numpy()  # (B, T, V)

    return compare_logits(onnx_model, reference, {p: _prompt_ids(p, artifact) for p in prompts},
                          quantized=artifact.quantization is not None, accuracy_level=accuracy_level,
                          tolerance=tolerance, threads=threads, raise_on_failure=raise_on_failure)


def reference_batches(prompt_ids: Mapping[bytes, list[int]]) -> list[list[list[int]]]:
    """Every input :func:`compare_logits` asks its reference for: each prompt alone (``[ids]``), then, with two
    prompts or more, the first two cut to the shorter one's length as a batch of 2."""
    all_ids = list(prompt_ids.values())
    batches = [[ids] for ids in all_ids]
    if len(all_ids) >= 2:
        n = min(len(all_ids[0]), len(all_ids[1]))
        batches.append([all_ids[0][:n], all_ids[1][:n]])
    return batches


def compare_logits(
    onnx_model: str | Path | onnx.ModelProto,
    reference: Callable[[list[list[int]]], np.ndarray],
    prompt_ids: Mapping[bytes, list[int]],
    *,
    quantized: bool,
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL,
    tolerance: Tolerance | None = None,
    threads: int | None = None,
    raise_on_failure: bool = True,
) -> ParityReport:
    """The checks of :func:`check_parity` for any PyTorch reference: ``reference(ids)`` maps token ids
    ``[B][T]`` to float64 logits ``[B, T, V]``; ``prompt_ids``: prompt -> its token ids (non-empty, each at
    most the model's context). The KV-cache check runs when the graph has ``past_*`` inputs."""
    tolerance = tolerance or default_tolerance(quantized, accuracy_level)
    session = make_session(onnx_model, accuracy_level=accuracy_level, threads=threads)
    kv = any(i.name.startswith("past_") for i in session.get_inputs())
    report = ParityReport(tolerance=tolerance, accuracy_level=accuracy_level)

    def compare(mode: str, prompt: bytes, got: np.ndarray, ref: np.ndarray) -> None:
        if got.shape != ref.shape:
            raise ExportError(
                f"ONNX parity ({mode}, prompt {prompt[:40]!r}): logits shape {list(got.shape)}, "
                f"reference {list(ref.shape)}"
            )
        err = float(np.abs(got.astype(np.float64) - ref).max())
        scale = float(np.abs(ref).max())
        err = err if np.isfinite(got).all() else float("nan")
        report.checks.append(ParityCheck(mode, prompt, err, scale, tolerance.bound(scale)))

    def run(ids, past=None):
        ids = np.asarray(ids, np.int64)
        return run_logits(session, ids, past if past is not None else (empty_past(session, len(ids)) if kv else None))

    prompts, all_ids = list(prompt_ids), list(prompt_ids.values())
    for prompt, ids in zip(prompts, all_ids, strict=True):
        compare("full", prompt, run([ids])[0], reference([ids]))
    batches = reference_batches(prompt_ids)
    if len(batches) > len(all_ids):
        batch = batches[-1]
        compare("batch", prompts[0] + b" | " + prompts[1], run(batch)[0], reference(batch))
    if kv:
        i_long = max(range(len(all_ids)), key=lambda i: len(all_ids[i]))
        ids, prompt = all_ids[i_long], prompts[i_long]
        if len(ids) >= 4:
            ref = reference([ids])
            cut = [0, len(ids) - 3, len(ids) - 1, len(ids)]
            past = None
            for a, b in zip(cut, cut[1:], strict=False):
                logits, past = run([ids[a:b]], past)
                compare(f"kv-cache positions {a}..{b - 1}", prompt, logits, ref[:, a:b])

    if raise_on_failure and not report.passed:
        bad = next(c for c in report.checks if not c.passed)
        raise ExportError(
            f"ONNX parity failed ({bad.mode}, prompt {bad.prompt[:40]!r}): max abs error {bad.max_abs_err:.3g}, "
            f"max rel error {bad.rel_err:.3g} (max |logit| {bad.max_ref:.3g}) exceeds tolerance {tolerance} "
            f"= {bad.bound:.3g}"
        )
    return report
