"""The checked ONNX export of an artifact (``sparsert export``): build, check, then publish.

:func:`export_artifact` writes the graph of :func:`sparsert.export.onnx_graph.build_onnx_model` to a temporary
directory beside the output and checks it there — ``onnx.checker`` full check on the written file, the sparsity
annotations against the weight values (:func:`sparsert.export.annotations.verify_sparsity_annotations`), and,
unless ``parity=False``, ONNX Runtime logits against the PyTorch reference
(:func:`sparsert.export.parity.check_parity`) — and renames it into place only when every check passes, so a
failed export leaves no output file. See docs/ONNX.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx

from sparsert.export.annotations import verify_sparsity_annotations
from sparsert.export.onnx_graph import IR_VERSION, OPSET, build_onnx_model, save_onnx_model
from sparsert.export.parity import ParityReport, check_parity
from sparsert.runtime.artifact import load_artifact
from sparsert.runtime.errors import ExportError


@dataclass
class ExportResult:
    """What :func:`export_artifact` wrote and measured."""

    path: Path
    file_bytes: int
    n_nodes: int
    n_initializers: int
    op_counts: dict[str, int]
    kv_cache: bool
    layers: dict[str, dict]  # read_sparsity_annotations(model)["layers"]
    parity: ParityReport | None  # None with parity=False

    def summary(self) -> str:
        """The lines ``sparsert export`` prints: file, graph size, linear weight kinds, checks and parity."""
        sparse_int4 = sum(1 for v in self.layers.values() if v["pattern"] and v["bits"] == 4)
        sparse_fp = sum(1 for v in self.layers.values() if v["pattern"] and v["bits"] is None)
        dense_int4 = sum(1 for v in self.layers.values() if not v["pattern"] and v["bits"] == 4)
        dense_fp = sum(1 for v in self.layers.values() if not v["pattern"] and v["bits"] is None)
        groups = sorted({v["group_size"] for v in self.layers.values() if v["group_size"]})
        parts = []
        if sparse_int4:
            parts.append(f"{sparse_int4} 2:4+INT4 (INT4 initializer -> DequantizeLinear block {groups} -> MatMul)")
        if sparse_fp:
            parts.append(f"{sparse_fp} 2:4 float32 (zeros stored in the MatMul weight)")
        if dense_int4:
            parts.append(f"{dense_int4} dense INT4")
        if dense_fp:
            parts.append(f"{dense_fp} dense float32")
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items(), key=lambda kv: -kv[1])[:6])
        lines = [
            f"wrote {self.path} ({self.file_bytes:,} bytes): opset {OPSET}, IR version {IR_VERSION}, "
            f"{self.n_nodes} nodes ({ops}, ...), {self.n_initializers} initializers, "
            f"KV cache {'yes' if self.kv_cache else 'no'}",
            f"  linear weights: {'; '.join(parts) or 'none'}",
            "  2:4 along axis 0 of each MatMul B verified against the annotations; onnx.checker full check passed",
        ]
        if self.parity is None:
            lines.append("  parity vs PyTorch: skipped (--skip-parity)")
        else:
            p = self.parity
            level = "ORT default" if p.accuracy_level is None else p.accuracy_level
            lines.append(
                f"  parity vs PyTorch (ONNX Runtime CPU, MatMulNBits accuracy level {level}): "
                f"max abs error {p.max_abs_err:.3g}, max rel error {p.max_rel_err:.3g} over {len(p.checks)} "
                f"checks; tolerance {p.tolerance}: passed"
            )
        return "\n".join(lines)


def export_artifact(
    artifact_path: str | Path,
    output: str | Path,
    *,
    with_kv_cache: bool = True,
    parity: bool = True,
    accuracy_level: int | None = 1,
) -> ExportResult:
    """Export ``artifact_path`` to ``output`` with every check; nothing is left at ``output`` on failure.

    Raises ArtifactError (bad artifact) or ExportError (checker, annotation or parity failure, unwritable
    output), each with a one-line message.
    """
    artifact = load_artifact(artifact_path)
    out = Path(output)
    if out.is_dir():
        raise ExportError(f"-o {out} is a directory, expected an .onnx file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc}") from None
    try:
        model = build_onnx_model(artifact, with_kv_cache=with_kv_cache)
        staged = save_onnx_model(model, tmp / out.name)
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ExportError(f"onnx.checker rejected the exported model: {first}") from None
        layers = verify_sparsity_annotations(model)
        expected = set(artifact.sparsity.layers) if artifact.sparsity else set()
        annotated = {name for name, info in layers.items() if info["pattern"]}
        if annotated != expected:
            odd = sorted(annotated ^ expected)[0]
            raise ExportError(f"layer '{odd}': 2:4 annotation does not match the artifact's sparsity.layers")
        report = check_parity(staged, artifact, accuracy_level=accuracy_level) if parity else None
        data = tmp / f"{out.name}.data"
        if data.exists():  # external data (models over 2 GiB): data first, so the .onnx never dangles
            os.replace(data, out.parent / data.name)
        os.replace(staged, out)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(
        path=out,
        file_bytes=out.stat().st_size,
        n_nodes=len(model.graph.node),
        n_initializers=len(model.graph.initializer),
        op_counts=dict(Counter(n.op_type for n in model.graph.node)),
        kv_cache=with_kv_cache,
        layers=layers,
        parity=report,
    )
