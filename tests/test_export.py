"""ONNX export: graph validity, 2:4-along-axis-0 weight storage, INT4 blocked DequantizeLinear, annotations,
ONNX Runtime parity (full sequence, batch, KV cache), corrupted exports, and the ONNX Runtime Stepper."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from sparsert.export import annotations as ann
from sparsert.export import parity as parity_mod
from sparsert.export.onnx_export import checked_export, is_onnx_model
from sparsert.export.onnx_graph import (
    IR_VERSION,
    OPSET,
    build_onnx_model,
    export_onnx,
    int4_initializer,
    save_onnx_model,
)
from sparsert.export.onnx_runner import OnnxStepper, UnverifiedExportWarning, make_session, onnx_stepper
from sparsert.export.parity import FP32_TOLERANCE, INT4_INT8_TOLERANCE, check_parity
from sparsert.runtime.artifact import QuantizationInfo, SparsityInfo, load_artifact, save_artifact
from sparsert.runtime.errors import ConfigError, ExportError
from sparsert.runtime.generate import GenerationConfig, TorchStepper, generate_ids
from sparsert.runtime.model import DecoderLM, ModelConfig, sparse_linear_names
from sparsert.runtime.packed_linear import pack_linear
from sparsert.runtime.tokenizer import ByteTokenizer

GROUP = 16
MODES = ["fp32", "int4"]
ARCHS = ["llama", "gpt2"]


def make_artifact(path: Path, arch: str = "llama", mode: str = "int4", seed: int = 0,
                  dense_dtype: torch.dtype = torch.float32) -> Path:
    """A random tiny model (weights x10 for sharp, varied logits) saved as a 2:4 (+INT4) artifact.

    ``mode``: "fp32" (2:4 values), "int4" (2:4 + INT4, group 16), "int4-dense" (INT4 without 2:4) or
    "dense" (no packed linears).
    """
    torch.manual_seed(seed)
    config = ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=48)
    model = DecoderLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    sd = model.state_dict()
    names = sparse_linear_names(config)
    sparse = mode in ("fp32", "int4")
    group = GROUP if mode.startswith("int4") else None
    packed = {} if mode == "dense" else {
        n: pack_linear(sd[f"{n}.weight"], sparse=sparse, int4_group_size=group, bias=sd.get(f"{n}.bias"),
                       values_dtype=dense_dtype)
        for n in names
    }
    dense = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in packed}
    return save_artifact(
        path, model_config=config, tokenizer=ByteTokenizer(), packed=packed, dense=dense,
        sparsity=SparsityInfo(tuple(names)) if sparse else None,
        quantization=QuantizationInfo(tuple(names), group) if group else None,
        dense_dtype=dense_dtype,
    )


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("artifacts")
    return {(arch, mode): load_artifact(make_artifact(root / f"{arch}-{mode}", arch, mode))
            for arch in ARCHS for mode in MODES}


@pytest.fixture(scope="module")
def models(artifacts) -> dict:
    return {key: build_onnx_model(art) for key, art in artifacts.items()}


def weight_of_matmul(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[np.ndarray, onnx.TensorProto]:
    """The effective B [K, N] of a MatMul fed by an initializer or by DequantizeLinear(initializer)."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    b = node.input[1]
    if b in inits:
        return numpy_helper.to_array(inits[b]), inits[b]
    dq = producers[b]
    assert dq.op_type == "DequantizeLinear"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs["axis"] == 0 and len(dq.input) == 2  # no zero point (= 0)
    q, s = inits[dq.input[0]], inits[dq.input[1]]
    codes = numpy_helper.to_array(q).astype(np.float32)
    scales = numpy_helper.to_array(s)
    return codes * np.repeat(scales, attrs["block_size"], axis=0), q


# ----------------------------------------------------------------------------------------------------------
# Graph structure and weight storage


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_export_passes_full_check_and_stores_24_along_axis0(tmp_path, artifacts, arch, mode):
    art = artifacts[arch, mode]
    path = tmp_path / "m.onnx"
    model = export_onnx(art, path)
    onnx.checker.check_model(str(path), full_check=True)
    assert model.opset_import[0].version == 21 and model.ir_version == 10
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]  # no temp files left

    layers = ann.read_sparsity_annotations(onnx.load(str(path)))["layers"]
    assert set(layers) == set(sparse_linear_names(art.model_config))
    matmuls = {n.name: n for n in model.graph.node if n.op_type == "MatMul"}
    for name, info in layers.items():
        b, init = weight_of_matmul(model, matmuls[info["node"]])
        w = art.packed[name].to_dense()  # (N, K)
        np.testing.assert_array_equal(b, w.T.numpy())  # exact: same zeros, same dequantized values
        # 2:4 along axis 0 of B, checked directly: every 4 consecutive rows of every column hold <= 2 non-zeros
        k, n = b.shape
        assert ((b.reshape(k // 4, 4, n) != 0).sum(axis=1) <= 2).all()
        assert info["pattern"] == "2:4" and info["axis"] == 0
        if mode == "int4":
            assert init.data_type == TensorProto.INT4 and list(init.dims) == [k, n]
            assert len(init.raw_data) == (k * n + 1) // 2  # two codes per byte
            assert info["bits"] == 4 and info["group_size"] == GROUP
        else:
            assert init.data_type == TensorProto.FLOAT
            assert info["bits"] is None and info["group_size"] is None
    # every MatMul weight in the blocks is annotated; only lm_head and attention products are not
    unannotated = {n.name for n in matmuls.values() if not ann.get_metadata(n)}
    assert all(not name.startswith("blocks.") or ".attn/" in name for name in unannotated)
    assert len(unannotated) == 1 + 2 * art.model_config.n_layers  # lm_head + QK^T and PV per layer


def test_int4_initializer_packs_low_nibble_first():
    codes = np.array([[1, -2, 3], [-8, 7, 0], [5, -1, 2]], dtype=np.int8)  # 9 codes: odd count
    t = int4_initializer("w", codes)
    assert t.data_type == 22 and list(t.dims) == [3, 3]
    assert t.raw_data[0] == (1 & 0xF) | ((-2 & 0xF) << 4)
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), codes)
    with pytest.raises(ExportError, match="must be in"):
        int4_initializer("w", np.array([9], np.int8))


def test_annotation_read_back(artifacts, models):
    art, model = artifacts["llama", "int4"], models["llama", "int4"]
    got = ann.read_sparsity_annotations(model)
    props = got["model"]
    assert props["sparsert.format_version"] == "1"
    assert props["sparsert.sparsity.pattern"] == "2:4" and props["sparsert.sparsity.axis"] == "0"
    assert props["sparsert.quantization"] == "int4"
    assert props["sparsert.quantization.group_size"] == str(GROUP)
    assert props["sparsert.kv_cache"] == "1"
    assert props["sparsert.model_config"] == art.model_config.to_dict()
    q = got["layers"]["blocks.1.mlp.down_proj"]
    assert q["initializer"] == "blocks.1.mlp.down_proj.weight_q"
    assert q["scale"] == "blocks.1.mlp.down_proj.weight_scale"
    inits = {i.name: i for i in model.graph.initializer}
    assert ann.get_metadata(inits[q["initializer"]])["sparsert.layer"] == "blocks.1.mlp.down_proj"
    # survives serialization
    again = ann.read_sparsity_annotations(onnx.load_from_string(model.SerializeToString()))
    assert again == got
    assert ann.read_sparsity_annotations(models["gpt2", "fp32"])["model"]["sparsert.quantization"] == "none"


@pytest.mark.parametrize("mode", MODES)
def test_verifier_rejects_weights_that_are_not_24(models, mode):
    model = onnx.ModelProto()
    model.CopyFrom(models["llama", mode])
    assert len(ann.verify_sparsity_annotations(model)) == 14
    target = next(i for i in model.graph.initializer if i.name.startswith("blocks.0.attn.k_proj.weight"))
    if mode == "int4":
        codes = numpy_helper.to_array(target).astype(np.int8)
        codes[0:4, 0] = [1, 2, 3, 4]  # a full group along axis 0
        target.CopyFrom(int4_initializer(target.name, codes))
    else:
        w = numpy_helper.to_array(target).copy()
        w[0:4, 0] = 1.0
        target.CopyFrom(numpy_helper.from_array(w, target.name))
    ann.set_metadata(target, {"sparsert.layer": "blocks.0.attn.k_proj", "sparsert.sparsity.pattern": "2:4",
                              "sparsert.sparsity.axis": "0",
                              **({"sparsert.quantization.bits": "4", "sparsert.quantization.group_size":
                                  str(GROUP)} if mode == "int4" else {})})
    with pytest.raises(ExportError, match=r"blocks\.0\.attn\.k_proj.* annotated 2:4 along axis 0 but"):
        ann.verify_sparsity_annotations(model)


def test_read_back_rejects_node_initializer_disagreement(models):
    model = onnx.ModelProto()
    model.CopyFrom(models["gpt2", "fp32"])
    init = next(i for i in model.graph.initializer if i.name == "blocks.0.mlp.up_proj.weight_t")
    ann.set_metadata(init, {"sparsert.sparsity.axis": "1"})
    with pytest.raises(ExportError, match="disagrees with initializer 'blocks.0.mlp.up_proj.weight_t'"):
        ann.read_sparsity_annotations(model)


@pytest.mark.parametrize("mode", ["int4-dense", "dense"])
def test_export_of_artifacts_without_24(tmp_path, mode):
    art = load_artifact(make_artifact(tmp_path / "a", "gpt2", mode, dense_dtype=torch.float16))
    model = build_onnx_model(art)
    onnx.checker.check_model(model, full_check=True)
    layers = ann.verify_sparsity_annotations(model)
    assert all(info["pattern"] is None for info in layers.values())
    assert all(info["bits"] == (4 if mode == "int4-dense" else None) for info in layers.values())
    assert ann.read_sparsity_annotations(model)["model"]["sparsert.sparsity.pattern"] == "none"
    assert check_parity(model, art, threads=1).passed


# ----------------------------------------------------------------------------------------------------------
# Parity


def test_stepper_names_a_hand_edited_graph_io(models, tmp_path):
    """A graph whose inputs/outputs are not what sparsert export writes fails when the stepper opens it, by name."""
    model = models[next(iter(models))]
    edits = {
        "no-present": (lambda m: m.graph.output.remove(next(o for o in m.graph.output
                                                            if o.name.startswith("present_"))),
                       r"input 'past_\w+' has no matching 'present_\w+' output"),
        "renamed-logits": (lambda m: setattr(next(o for o in m.graph.output if o.name == "logits"), "name", "out"),
                           "graph has no 'logits' output"),
    }
    for name, (edit, why) in edits.items():
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        if name == "renamed-logits":  # the producing node must follow the rename
            node = next(n for n in bad.graph.node if "logits" in n.output)
            node.output[list(node.output).index("logits")] = "out"
        edit(bad)
        path = tmp_path / f"{name}.onnx"
        save_onnx_model(bad, path)
        with pytest.raises(ExportError, match=why):
            OnnxStepper(path)


def test_parity_rejects_bad_prompts_and_tolerances(artifacts, models):
    key = next(iter(models))
    for prompts, why in (([], "non-empty sequence of bytes"), (b"abc", "non-empty sequence of bytes"),
                         (["text"], "prompts must be bytes"), ([b"\xff\xfe"], "is not UTF-8")):
        with pytest.raises(ExportError, match=why):
            check_parity(models[key], artifacts[key], prompts=prompts, threads=1)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ExportError, match="rtol must be a finite number >= 0"):
            parity_mod.Tolerance(rtol=bad, atol=0.0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_parity_within_fp32_tolerance(artifacts, models, arch, mode):
    report = check_parity(models[arch, mode], artifacts[arch, mode], threads=1)
    assert report.passed and report.tolerance == FP32_TOLERANCE
    assert report.max_rel_err < 1e-5  # measured ~1e-6: reduction order only
    modes = [c.mode for c in report.checks]
    assert modes[:4] == ["full", "full", "full", "batch"]
    assert sum(m.startswith("kv-cache") for m in modes) == 3  # prefix, 2-token step, 1-token step
    assert max(len(c.prompt) for c in report.checks) >= 48  # the long prompt covers every position


def test_int4_is_fused_into_matmulnbits_with_pinned_accuracy_level(tmp_path, models):
    import onnxruntime as ort

    model = models["llama", "int4"]
    for level, expected in ((1, 1), (None, 4)):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "opt.onnx")
        options.log_severity_level = 3
        if level is not None:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        fused = [n for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node if n.op_type == "MatMulNBits"]
        assert len(fused) == 14
        levels = {a.i for n in fused for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {expected}


def test_parity_with_ort_default_accuracy_level_uses_looser_bound(artifacts, models):
    art = artifacts["gpt2", "int4"]
    report = check_parity(models["gpt2", "int4"], art, accuracy_level=None, threads=1)
    assert report.tolerance == INT4_INT8_TOLERANCE and report.passed
    assert report.max_rel_err > 1e-4  # int8 activations really are in play
    pinned = check_parity(models["gpt2", "int4"], art, accuracy_level=1, threads=1)
    assert pinned.max_abs_err < report.max_abs_err / 100


@pytest.mark.parametrize("mode", MODES)
def test_corrupted_export_fails_parity(artifacts, models, mode):
    model = onnx.ModelProto()
    model.CopyFrom(models["llama", mode])
    target = next(i for i in model.graph.initializer if i.name.startswith("blocks.1.mlp.up_proj.weight"))
    if mode == "int4":
        codes = numpy_helper.to_array(target).astype(np.int8)
        r, c = np.argwhere(codes != 0)[0]
        codes[r, c] = -codes[r, c] if codes[r, c] != -8 else 7  # flip one kept weight's sign
        target.CopyFrom(int4_initializer(target.name, codes))
    else:
        w = numpy_helper.to_array(target).copy()
        r, c = np.argwhere(w != 0)[0]
        w[r, c] = -w[r, c]
        target.CopyFrom(numpy_helper.from_array(w, target.name))
    with pytest.raises(ExportError, match=r"ONNX parity failed \(full, prompt b'Hello, world!'\): max abs error "
                                          r"\S+, max rel error \S+ .* exceeds tolerance atol 1e-05 \+ rtol 0.0001"):
        check_parity(model, artifacts["llama", mode], threads=1)
    report = check_parity(model, artifacts["llama", mode], threads=1, raise_on_failure=False)
    assert not report.passed and report.max_rel_err > 1e-3


def test_no_kv_cache_export(tmp_path, artifacts):
    art = artifacts["gpt2", "int4"]
    model = build_onnx_model(art, with_kv_cache=False)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input_ids"]
    assert [o.name for o in model.graph.output] == ["logits"]
    report = check_parity(model, art, threads=1)
    assert report.passed and not any(c.mode.startswith("kv-cache") for c in report.checks)


# ----------------------------------------------------------------------------------------------------------
# Generation through ONNX Runtime


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_stepper_greedy_equals_torch_stepper(tmp_path, artifacts, arch):
    art = artifacts[arch, "int4"]
    export_onnx(art, tmp_path / "kv.onnx")
    export_onnx(art, tmp_path / "nokv.onnx", with_kv_cache=False)
    prompt = list(b"def main():\n")
    cfg = GenerationConfig(max_new_tokens=20)
    want = generate_ids(TorchStepper(art.build_model()), prompt, cfg)
    assert len(set(want)) > 3  # not a degenerate constant output
    stepper = OnnxStepper(tmp_path / "kv.onnx", threads=1)
    assert stepper.kv_cache and stepper.max_seq_len == 48
    assert generate_ids(stepper, prompt, cfg) == want
    assert generate_ids(stepper, prompt, cfg) == want  # reset between runs
    assert generate_ids(OnnxStepper(tmp_path / "nokv.onnx", threads=1), prompt, cfg) == want
    sampled = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=20, seed=3)
    assert generate_ids(stepper, prompt, sampled) == generate_ids(TorchStepper(art.build_model()), prompt, sampled)
    # the context limit is enforced
    stepper.reset()
    with pytest.raises(ConfigError, match="exceeds the model's max_seq_len=48"):
        stepper.step(list(range(49)))


@pytest.mark.parametrize("mode", ["fp32", "int4"])
def test_export_summary_names_the_accuracy_level_only_with_int4(tmp_path, mode):
    """The MatMulNBits accuracy level acts on fused INT4 weights only; a float export's parity line omits it."""
    from sparsert.export.onnx_export import export_artifact

    art = make_artifact(tmp_path / "a", "llama", mode)
    summary = export_artifact(art, tmp_path / "m.onnx").summary()
    parity = next(line for line in summary.splitlines() if "parity vs PyTorch" in line)
    if mode == "int4":
        assert "(ONNX Runtime CPU, MatMulNBits accuracy level 1)" in parity
    else:
        assert "(ONNX Runtime CPU):" in parity and "MatMulNBits" not in summary


def test_onnx_stepper_bad_files(tmp_path, artifacts):
    with pytest.raises(ExportError, match="does not exist"):
        OnnxStepper(tmp_path / "missing.onnx")
    with pytest.raises(ExportError, match="is a directory, expected an .onnx file"):
        OnnxStepper(tmp_path)
    with pytest.raises(ExportError, match="is a directory, expected an .onnx file"):
        make_session(tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf \xff\xff")
    with pytest.raises(ExportError, match="junk.onnx"):
        OnnxStepper(tmp_path / "junk.onnx")
    with pytest.raises(ExportError, match="junk.onnx"):
        make_session(tmp_path / "junk.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ExportError, match=r"ONNX model .*empty\.onnx is an empty file \(0 bytes\), not an ONNX model"):
        OnnxStepper(tmp_path / "empty.onnx")
    (tmp_path / "text.onnx").write_text("hello\n")  # onnx.load reads it as a model without metadata
    with pytest.raises(ExportError, match=r"ONNX model .*text\.onnx is not a valid ONNX model file"):
        OnnxStepper(tmp_path / "text.onnx")


def test_save_is_atomic_and_supports_external_data(tmp_path, artifacts, models):
    model = models["llama", "fp32"]
    with pytest.raises(ExportError, match="is a directory"):
        save_onnx_model(model, tmp_path)
    path = save_onnx_model(model, tmp_path / "ext" / "m.onnx", external_data=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.stat().st_size < 100_000 < (path.parent / "m.onnx.data").stat().st_size
    assert check_parity(path, artifacts["llama", "fp32"], threads=1).passed


def test_a_model_over_the_protobuf_limit_gets_external_data_and_keeps_its_bytes(tmp_path, artifacts, models,
                                                                                  monkeypatch):
    """The automatic choice (the limit lowered to 4 KiB here): initializers summed before ByteSize, which protobuf
    refuses past 2 GiB; the model in memory still holds every initializer's bytes after the save."""
    import sparsert.export.onnx_graph as onnx_graph_mod

    model = models["llama", "fp32"]
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    monkeypatch.setattr(onnx_graph_mod, "_PROTOBUF_LIMIT", 4096)
    assert onnx_graph_mod.too_big_for_protobuf(model)
    path = save_onnx_model(model, tmp_path / "auto" / "m.onnx")
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    for t in model.graph.initializer:
        assert t.data_location == onnx.TensorProto.DEFAULT
        np.testing.assert_array_equal(numpy_helper.to_array(t), before[t.name])
    assert check_parity(path, artifacts["llama", "fp32"], threads=1).passed


def test_keep_data_false_leaves_the_weights_in_the_file_only(tmp_path, artifacts, models):
    """checked_export's save: the bytes an external-data save moves to the file are not read back into memory."""
    model = onnx.ModelProto()
    model.CopyFrom(models["llama", "fp32"])
    path = save_onnx_model(model, tmp_path / "m.onnx", external_data=True, keep_data=False)
    big = [t for t in model.graph.initializer if t.external_data]
    assert big and all(not t.raw_data for t in big)
    assert check_parity(path, artifacts["llama", "fp32"], threads=1).passed


def test_a_failed_external_data_save_leaves_the_model_whole(tmp_path, models, monkeypatch):
    """The disk fills after the first tensor is written: an ExportError, nothing at the path, and the model in
    memory still holds every initializer inline. Tiny tensors (no data file at all) save with external_data too."""
    from onnx import external_data_helper

    model = models["gpt2", "fp32"]
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    write, calls = external_data_helper.save_external_data, []

    def disk_full_after_one(tensor, base_path):
        calls.append(tensor.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        write(tensor, base_path)

    monkeypatch.setattr(external_data_helper, "save_external_data", disk_full_after_one)
    with pytest.raises(ExportError, match="No space left on device"):
        save_onnx_model(model, tmp_path / "full" / "m.onnx", external_data=True)
    monkeypatch.undo()
    assert len(calls) == 2 and list((tmp_path / "full").iterdir()) == []
    for t in model.graph.initializer:
        assert t.data_location == onnx.TensorProto.DEFAULT and not t.external_data
        np.testing.assert_array_equal(numpy_helper.to_array(t), before[t.name])
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    tiny = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w]))
    path = save_onnx_model(tiny, tmp_path / "tiny" / "t.onnx", external_data=True)
    assert [p.name for p in path.parent.iterdir()] == ["t.onnx"]


def test_strict_tolerance_makes_parity_fail(monkeypatch, artifacts, models):
    """The bound is applied: a zero tolerance fails on honest float rounding."""
    monkeypatch.setattr(parity_mod, "FP32_TOLERANCE", parity_mod.Tolerance(rtol=0.0, atol=0.0))
    with pytest.raises(ExportError, match="exceeds tolerance atol 0 \\+ rtol 0"):
        check_parity(models["llama", "fp32"], artifacts["llama", "fp32"], threads=1)


def test_export_records_the_weights_digest_and_onnx_stepper_checks_it(tmp_path, artifacts, models):
    """sparsert.weights_sha256 = sha256 of the artifact's model.safetensors; onnx_stepper refuses a graph of
    another artifact with the same config (fp32 vs int4 of one arch share it) and warns on a graph without it."""
    art, other = artifacts["llama", "int4"], artifacts["llama", "fp32"]
    assert art.model_config == other.model_config
    digest = hashlib.sha256((art.path / "model.safetensors").read_bytes()).hexdigest()
    assert ann.get_metadata(models["llama", "int4"])[ann.KEY_WEIGHTS_SHA256] == digest
    assert ann.read_sparsity_annotations(models["llama", "int4"])["model"][ann.KEY_WEIGHTS_SHA256] == digest
    save_onnx_model(models["llama", "fp32"], tmp_path / "other.onnx")
    with pytest.raises(ExportError, match=r"was exported from another artifact \(weights digest [0-9a-f]{16}\), "
                                          rf"not {art.path} \(weights digest {digest[:16]}\)"):
        with onnx_stepper(art, tmp_path / "other.onnx"):
            pass
    save_onnx_model(models["llama", "int4"], tmp_path / "own.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedExportWarning)  # its own export: no warning
        with onnx_stepper(art, tmp_path / "own.onnx") as stepper:
            assert stepper.metadata[ann.KEY_WEIGHTS_SHA256] == digest
    legacy = onnx.ModelProto()
    legacy.CopyFrom(models["llama", "int4"])
    props = [(p.key, p.value) for p in legacy.metadata_props if p.key != ann.KEY_WEIGHTS_SHA256]
    del legacy.metadata_props[:]
    ann.set_metadata(legacy, dict(props))
    save_onnx_model(legacy, tmp_path / "legacy.onnx")
    with pytest.warns(UnverifiedExportWarning, match="cannot be verified to hold the weights of"):
        with onnx_stepper(art, tmp_path / "legacy.onnx") as stepper:
            assert stepper.step([1, 2, 3]).shape == (art.model_config.vocab_size,)


def test_is_onnx_model(tmp_path, models):
    save_onnx_model(models["gpt2", "fp32"], tmp_path / "m.onnx")
    assert is_onnx_model(tmp_path / "m.onnx")
    save_onnx_model(models["gpt2", "fp32"], tmp_path / "ext" / "m.onnx", external_data=True)
    assert is_onnx_model(tmp_path / "ext" / "m.onnx") and not is_onnx_model(tmp_path / "ext" / "m.onnx.data")
    for name, data in [("empty", b""), ("text", b"previous"), ("corpus", b"hello world\n" * 100),
                       ("truncated", (tmp_path / "m.onnx").read_bytes()[:-7]),
                       ("no-graph", (tmp_path / "m.onnx").read_bytes()[:2])]:  # ir_version only
        (tmp_path / name).write_bytes(data)
        assert not is_onnx_model(tmp_path / name), name
    assert not is_onnx_model(tmp_path) and not is_onnx_model(tmp_path / "missing.onnx")


def test_a_graph_onnx_runtime_cannot_load_is_not_written_even_without_parity(tmp_path: Path) -> None:
    """--skip-parity skips the logits, not the load: a graph onnx.checker accepts but ONNX Runtime has no kernel
    for (a bfloat16 Mul, as Falcon's ALiBi traces before the export rewrites it) is refused naming the output, and
    nothing is written."""
    def build() -> onnx.ModelProto:
        x = onnx.helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])
        y = onnx.helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Mul", ["x", "x"], ["y"])], "g", [x], [y])
        return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                      ir_version=IR_VERSION)

    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=rf"ONNX Runtime cannot load {out}: .*Mul"):
        checked_export(out, build, lambda model: {}, lambda staged: None, kv_cache=False)
    assert list(tmp_path.iterdir()) == []
