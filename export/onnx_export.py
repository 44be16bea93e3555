"""The checked ONNX export of an artifact (``sparsert export``): build, check, then publish.

:func:`export_artifact` writes the graph of :func:`sparsert.export.onnx_graph.build_onnx_model` to a temporary
directory beside the output and checks it there — ``onnx.checker`` full check on the written file, the sparsity
annotations against the weight values (:func:`sparsert.export.annotations.verify_sparsity_annotations`), and,
unless ``parity=False``, ONNX Runtime logits against the PyTorch reference
(:func:`sparsert.export.parity.check_parity`) — and renames it into place only when every check passes, so a
failed export leaves no output file. Before any of that, :func:`check_output` refuses an output that would
destroy something that is not an earlier export (see its docstring). See docs/ONNX.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from sparsert.export.annotations import verify_sparsity_annotations
from sparsert.export.onnx_graph import IR_VERSION, OPSET, build_onnx_model, save_onnx_model
from sparsert.export.onnx_runner import make_session
from sparsert.export.parity import ParityReport, check_parity
from sparsert.runtime.artifact import load_artifact
from sparsert.runtime.errors import ExportError, require_path


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
            lines.append("  parity vs PyTorch: skipped (--skip-parity); ONNX Runtime (CPU) loads the graph")
        else:
            p = self.parity
            level = "ORT default" if p.accuracy_level is None else p.accuracy_level
            # the accuracy level only acts on the fused INT4 MatMulNBits nodes: not worth a word without INT4
            where = (f"ONNX Runtime CPU, MatMulNBits accuracy level {level}" if sparse_int4 or dense_int4
                     else "ONNX Runtime CPU")
            lines.append(
                f"  parity vs PyTorch ({where}): "
                f"max abs error {p.max_abs_err:.3g}, max rel error {p.max_rel_err:.3g} over {len(p.checks)} "
                f"checks; tolerance {p.tolerance}: passed"
            )
        return "\n".join(lines)


def check_output(out: Path, artifact_path: str | Path) -> None:
    """Refuse (ExportError naming ``-o OUT``) an output path whose writing could destroy something else.

    Checked, in order: ``artifact_path`` is not empty; ``out`` is not an existing directory; it has a file
    name (not just ``.onnx``); its nearest existing ancestor is a directory (not a file); it does not lie
    inside the artifact directory ``artifact_path`` (symlinks resolved, so the artifact's own
    ``model.safetensors`` or ``config.json`` can never be replaced); if it exists, it is an ONNX model
    (:func:`is_onnx_model`: a previous export, which is replaced); its name ends in ``.onnx``. The external
    data file ``<out>.data`` that models over 2 GiB get beside ``out`` follows the same rules: it may not be a
    directory or lie inside the artifact, and if it exists it must be the external data of the ONNX model at
    ``out`` (one of its initializers names it).
    """
    require_path(artifact_path, "ARTIFACT", "the path of an artifact directory", ExportError)
    artifact_dir = Path(artifact_path).resolve()
    if out.is_dir():
        raise ExportError(f"-o {out} is a directory, expected an .onnx file path")
    if not out.name or out.name.lower() == ".onnx":
        raise ExportError(f"-o {out}: expected a file name such as model.onnx ('{out.name}' is only the suffix)"
                          if out.name else f"-o {out}: expected the path of an .onnx file")
    blocked = next((p for p in out.parents if p.exists() or p.is_symlink()), None)
    if blocked is not None and not blocked.is_dir():
        raise ExportError(f"-o {out}: {blocked} is not a directory, so nothing can be written under it")
    data = out.with_name(f"{out.name}.data")
    for path in (out, data):
        if path.resolve().is_relative_to(artifact_dir):
            raise ExportError(
                f"-o {out} is inside the artifact directory {artifact_path}: refusing to write into the "
                "artifact (choose a path outside it)"
            )
    if (out.exists() or out.is_symlink()) and not is_onnx_model(out):
        raise ExportError(
            f"-o {out} exists and is not an ONNX model: refusing to overwrite it (remove it or choose another "
            "path)"
        )
    if not out.name.lower().endswith(".onnx"):
        raise ExportError(f"-o {out}: expected a file name ending in .onnx")
    if data.is_dir():
        raise ExportError(f"-o {out}: {data} (where its external data would go) is a directory")
    if (data.exists() or data.is_symlink()) and not _uses_external_data(out, data.name):
        raise ExportError(
            f"-o {out}: {data} exists and is not the external data of an ONNX model at {out}: refusing to "
            "overwrite it (remove it or choose another path)"
        )


def is_onnx_model(path: Path) -> bool:
    """True when ``path`` is a regular file laid out as a serialized ONNX ``ModelProto``: a sequence of
    well-formed top-level protobuf fields up to the exact end of the file, among them ``ir_version`` (field 1,
    a varint > 0) and ``graph`` (field 7, length-delimited). Only the field headers are read (payloads are
    skipped by seeking), so this is cheap for any file size; text and other binary files fail it."""
    try:
        size = path.stat().st_size
        if not path.is_file() or size == 0:
            return False
        with open(path, "rb") as f:
            seen: set[int] = set()
            while f.tell() < size:
                key = _read_varint(f)
                field, wire = key >> 3, key & 7
                if field == 0:
                    return False
                if wire == 0:
                    value = _read_varint(f)
                    if field == 1 and value <= 0:
                        return False
                elif wire == 1:
                    f.seek(8, os.SEEK_CUR)
                elif wire == 2:
                    f.seek(_read_varint(f), os.SEEK_CUR)
                elif wire == 5:
                    f.seek(4, os.SEEK_CUR)
                else:  # 3/4 (groups: ModelProto has none), 6/7 (invalid)
                    return False
                if f.tell() > size:
                    return False
                seen.add(key)
    except (OSError, ValueError):
        return False
    return (1 << 3 | 0) in seen and (7 << 3 | 2) in seen


def _read_varint(f) -> int:  # noqa: ANN001 - a binary file
    result = shift = 0
    while True:
        byte = f.read(1)
        if not byte or shift > 63:
            raise ValueError("truncated or oversized varint")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7


def _uses_external_data(model_path: Path, location: str) -> bool:
    """True when ``model_path`` is an ONNX model with an initializer stored in the external file ``location``."""
    if not is_onnx_model(model_path):
        return False
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # protobuf DecodeError and friends  # noqa: BLE001
        return False
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            if any(e.key == "location" and e.value == location for e in init.external_data):
                return True
    return False


def export_artifact(
    artifact_path: str | Path,
    output: str | Path,
    *,
    with_kv_cache: bool = True,
    parity: bool = True,
    accuracy_level: int | None = 1,
) -> ExportResult:
    """Export ``artifact_path`` to ``output`` with every check; nothing is left at ``output`` on failure.

    ``output`` is first checked by :func:`check_output` (before the artifact is even loaded). Raises
    ArtifactError (bad artifact) or ExportError (refused output path, checker, annotation or parity failure,
    unwritable output), each with a one-line message.
    """
    require_path(output, "-o", "the path of an .onnx file", ExportError)
    out = Path(output)
    check_output(out, artifact_path)
    artifact = load_artifact(artifact_path)

    def verify(model: onnx.ModelProto) -> dict[str, dict]:
        layers = verify_sparsity_annotations(model)
        expected = set(artifact.sparsity.layers) if artifact.sparsity else set()
        annotated = {name for name, info in layers.items() if info["pattern"]}
        if annotated != expected:
            odd = sorted(annotated ^ expected)[0]
            raise ExportError(f"layer '{odd}': 2:4 annotation does not match the artifact's sparsity.layers")
        return layers

    return checked_export(out, lambda: build_onnx_model(artifact, with_kv_cache=with_kv_cache), verify,
                          lambda staged: check_parity(staged, artifact, accuracy_level=accuracy_level) if parity
                          else None, kv_cache=with_kv_cache)


def checked_export(out: Path, build: Callable[[], onnx.ModelProto],
                   verify: Callable[[onnx.ModelProto], dict[str, dict]], parity: Callable[[Path], ParityReport | None],
                   *, kv_cache: bool) -> ExportResult:
    """Build the model, run ``verify(model)`` (the annotations against the weights: returns the annotated layers),
    write it in a temporary directory beside ``out``, run ``onnx.checker`` (full check) and ``parity(written_path)``
    (ONNX Runtime against the reference; with no parity report, ONNX Runtime must still load the graph), then rename
    it (and its external data, if any) to ``out``; nothing is left at ``out`` on failure. An external-data model's
    weights are not read back into memory after the write, and the built model is released before ``parity`` runs,
    so the weights are not held twice (in memory and in ONNX Runtime)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc}") from None
    try:
        model = build()
        layers = verify(model)
        n_nodes, n_initializers = len(model.graph.node), len(model.graph.initializer)
        op_counts = dict(Counter(n.op_type for n in model.graph.node))
        staged = save_onnx_model(model, tmp / out.name, keep_data=False)
        del model
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ExportError(f"onnx.checker rejected the exported model: {first}") from None
        try:
            report = parity(staged)
            if report is None:  # parity skipped: a graph onnx.checker accepts may still use a kernel ORT lacks
                make_session(staged)
        except ExportError as exc:  # name the output the user gave, not the staging file
            raise ExportError(str(exc).replace(str(staged), str(out))) from None
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
        n_nodes=n_nodes,
        n_initializers=n_initializers,
        op_counts=op_counts,
        kv_cache=kv_cache,
        layers=layers,
        parity=report,
    )
