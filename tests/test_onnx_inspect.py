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
from sparsert.export.onnx_inspect import format_onnx_stats, onnx_weight_stats
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


def _save(tmp_path, name, nodes, inits, out="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    return path


def test_dequantized_weights_are_judged_by_what_they_dequantize_to(tmp_path):
    """Codes minus zero point: uint8 codes all 0 with zero point 128 are a dense weight; uint4 codes of 8 with
    zero point 8 are zeros (blocked along K of a Gemm transB=1 weight); a per-tensor scale has no axis; a Transpose
    after the DequantizeLinear and a Constant node are followed; an unnamed node is shown by its initializer."""
    rng = np.random.default_rng(0)
    dense_u8 = numpy_helper.from_array(np.zeros((8, 4), np.uint8), "codes_u8")
    u4 = rng.integers(9, 16, size=(4, 8)).astype(np.uint8)  # [N, K] for Gemm transB=1; none dequantizes to 0
    u4[:, 0::4] = u4[:, 1::4] = 8  # zero point 8: these dequantize to 0
    u4_init = helper.make_tensor("codes_u4", TensorProto.UINT4, [4, 8], u4.flatten().tolist())
    zp_u4 = helper.make_tensor("zp_u4", TensorProto.UINT4, [4, 1], [8] * 4)
    w_kn = rng.standard_normal((8, 4)).astype(np.float32)
    w_kn[2::4] = w_kn[3::4] = 0
    nodes = [
        helper.make_node("DequantizeLinear", ["codes_u8", "s", "zp_u8"], ["w1"]),  # per tensor: no axis
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="dense_u8"),
        helper.make_node("DequantizeLinear", ["codes_u4", "s_u4", "zp_u4"], ["w2"], axis=1, block_size=8),
        helper.make_node("Gemm", ["x", "w2"], ["h2"], name="sparse_u4", transB=1),
        helper.make_node("DequantizeLinear", ["codes_u4", "s_u4", "zp_u4"], ["w3"], axis=1, block_size=8),
        helper.make_node("Transpose", ["w3"], ["w3t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w3t"], ["h3"], name="dq_then_transpose"),
        helper.make_node("Constant", [], ["w4"], value=numpy_helper.from_array(w_kn, "const_w")),
        helper.make_node("MatMul", ["x", "w4"], ["h4"]),
        helper.make_node("Sum", ["h1", "h2", "h3", "h4"], ["y"]),
    ]
    inits = [dense_u8, numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "zp_u8"),
             u4_init, numpy_helper.from_array(np.full((4, 1), 0.1, np.float32), "s_u4"), zp_u4]
    stats = onnx_weight_stats(_save(tmp_path, "q.onnx", nodes, inits))
    got = {w.node or w.initializer: (w.k, w.n, w.storage, w.is_2_4, round(w.zeros, 2)) for w in stats.weights}
    assert got == {"dense_u8": (8, 4, "uint8", False, 0.0), "sparse_u4": (8, 4, "uint4", True, 0.5),
                   "dq_then_transpose": (8, 4, "uint4", True, 0.5), "const_w": (8, 4, "float32", True, 0.5)}
    assert "const_w " in format_onnx_stats(stats)


def test_broken_files_are_named(tmp_path, capsys):
    art = make_artifact(tmp_path / "art")
    assert run_main(capsys, "export", str(art), "-o", str(tmp_path / "m.onnx"), "--skip-parity")[0] == 0
    model = onnx.load(str(tmp_path / "m.onnx"))
    node = next(n for n in model.graph.node if get_metadata(n).get("sparsert.layer"))
    set_metadata(node, {"sparsert.sparsity.axis": "zero"})
    weight = get_metadata(node)["sparsert.weight"]
    set_metadata(next(t for t in model.graph.initializer if t.name == weight), {"sparsert.sparsity.axis": "zero"})
    onnx.save(model, str(tmp_path / "badaxis.onnx"))
    code, out, _ = run_main(capsys, "inspect", str(tmp_path / "badaxis.onnx"))  # reported, not a traceback
    assert code == 0 and "warning: the sparsity annotations disagree with the values" in out
    assert "annotation sparsert.sparsity.axis='zero' is not an integer" in out
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    w.raw_data = w.raw_data[:10]
    path = _save(tmp_path, "trunc.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])], [w])
    code, _, err = run_main(capsys, "inspect", str(path))
    assert code == 2 and "trunc.onnx: initializer 'w': its data cannot be read" in err
