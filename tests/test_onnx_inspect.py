"""`sparsert inspect model.onnx`: the constant MatMul/Gemm weights of any ONNX graph, whether each is 2:4 along K
(what TensorRT's sparse tactics need), and whether sparsert's annotations agree with the values."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_generate_cli import make_artifact, run_main

from sparsert.export.annotations import get_metadata, set_metadata
from sparsert.export.onnx_inspect import onnx_weight_stats
from sparsert.runtime.errors import ExportError


def _graph(tmp_path):
    """x [1, 8] -> MatMul(W1 [8, 8], 2:4 along K) -> MatMul(Transpose(W2 [4, 8])) -> Gemm(W3 [4, 8], transB=1):
    one 2:4 weight, one dense behind a Transpose, one 2:4 along K only once transB is undone."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    w1[0::4] = w1[1::4] = 0  # two zeros in every four rows of each column
    w2 = rng.standard_normal((4, 8)).astype(np.float32)  # [N, K] behind a Transpose: dense
    w3 = rng.standard_normal((4, 8)).astype(np.float32)  # Gemm transB=1: [N, K]; zeros along K
    w3[:, 2::4] = w3[:, 3::4] = 0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Transpose", ["w2"], ["w2t"], name="t2", perm=[1, 0]),
             helper.make_node("MatMul", ["h1", "w2t"], ["h2"], name="mm2"),
             helper.make_node("Gemm", ["h1", "w3"], ["y"], name="gemm3", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("h2", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    return path


def test_any_graph_transposes_and_gemm_trans_b(tmp_path, capsys):
    stats = onnx_weight_stats(_graph(tmp_path))
    got = [(w.node, w.k, w.n, w.is_2_4, w.storage) for w in stats.weights]
    assert got == [("mm1", 8, 8, True, "float32"), ("mm2", 8, 4, False, "float32"), ("gemm3", 8, 4, True, "float32")]
    assert stats.sparse_share == pytest.approx((64 + 32) / (64 + 32 + 32)) and stats.annotation_error is None
    code, out, _ = run_main(capsys, "inspect", str(tmp_path / "g.onnx"))
    assert code == 0 and "2 of 3 weights are 2:4 along K" in out and "annotations" not in out
    code, out, _ = run_main(capsys, "inspect", str(tmp_path / "g.onnx"), "--json")
    assert code == 0 and [w["is_2_4"] for w in json.loads(out)["weights"]] == [True, False, True]


def test_sparsert_export_and_annotations_that_disagree(tmp_path, capsys):
    art = make_artifact(tmp_path / "art")
    code, _, err = run_main(capsys, "export", str(art), "-o", str(tmp_path / "m.onnx"), "--skip-parity")
    assert code == 0, err
    stats = onnx_weight_stats(tmp_path / "m.onnx")
    annotated = [w for w in stats.weights if w.annotated]
    assert len(annotated) == 14 and all(w.is_2_4 and w.storage == "int4" and w.layer for w in annotated)
    assert stats.metadata["sparsert.sparsity.pattern"] == "2:4"
    code, out, _ = run_main(capsys, "inspect", str(tmp_path / "m.onnx"))
    assert code == 0 and "sparsert's sparsity annotations agree with the values" in out
    # one group of four along K given four non-zero codes: the annotation no longer holds; reported, not refused
    model = onnx.load(str(tmp_path / "m.onnx"))
    init = next(t for t in model.graph.initializer if t.name.endswith("up_proj.weight_q"))
    props = get_metadata(init)
    codes = numpy_helper.to_array(init).copy()
    codes[0:4, 0] = 1
    init.CopyFrom(helper.make_tensor(init.name, TensorProto.INT4, list(codes.shape), codes.flatten().tolist()))
    set_metadata(init, props)
    onnx.save(model, str(tmp_path / "bad.onnx"))
    code, out, _ = run_main(capsys, "inspect", str(tmp_path / "bad.onnx"))
    assert code == 0 and "warning: the sparsity annotations disagree with the values" in out
    assert "up_proj.weight_q" in out


def test_not_an_onnx_file(tmp_path, capsys):
    (tmp_path / "x.onnx").write_text("hello")
    with pytest.raises(ExportError, match=r"x\.onnx: not an ONNX model file"):
        onnx_weight_stats(tmp_path / "x.onnx")
    code, _, err = run_main(capsys, "inspect", str(tmp_path / "x.onnx"))
    assert code == 2 and "not an ONNX model file" in err
