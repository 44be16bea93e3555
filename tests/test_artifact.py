"""The compressed artifact: save/load round trips, the reference model, validation of bad files, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsert.runtime import artifact as artifact_mod
from sparsert.runtime.artifact import (
    QuantizationInfo,
    SparsityInfo,
    expected_tensors,
    load_artifact,
    save_artifact,
)
from sparsert.runtime.errors import ArtifactError
from sparsert.runtime.int4 import fake_quantize_int4
from sparsert.runtime.model import DecoderLM, ModelConfig, sparse_linear_names
from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.packed_linear import pack_linear
from sparsert.runtime.tokenizer import ByteTokenizer

GROUP = 128
L0 = "blocks.0.attn.q_proj"


def tiny_config(arch: str = "llama") -> ModelConfig:
    # K (d_model=128, ffn_dim=256) is a multiple of the INT4 group size 128.
    return ModelConfig(arch=arch, d_model=128, n_layers=1, n_heads=4, ffn_dim=256, max_seq_len=16)


def build_parts(config: ModelConfig, mode: str, seed: int = 0) -> dict:
    """Random model -> save_artifact keyword arguments; ``mode`` in {"fp32", "fp16", "int4", "dense"}."""
    torch.manual_seed(seed)
    model = DecoderLM(config)
    sd = model.state_dict()
    names = sparse_linear_names(config)
    dtype = torch.float16 if mode == "fp16" else torch.float32
    if mode == "dense":
        packed, sparsity, quantization = {}, None, None
    else:
        group = GROUP if mode == "int4" else None
        packed = {
            n: pack_linear(sd[f"{n}.weight"], int4_group_size=group, bias=sd.get(f"{n}.bias"), values_dtype=dtype)
            for n in names
        }
        sparsity = SparsityInfo(tuple(names))
        quantization = QuantizationInfo(tuple(names), GROUP) if mode == "int4" else None
    dense = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in packed}
    return dict(
        model_config=config,
        tokenizer=ByteTokenizer(),
        packed=packed,
        dense=dense,
        sparsity=sparsity,
        quantization=quantization,
        dense_dtype=dtype,
        producer={"source": {"checkpoint": "test", "step": 0}},
        _state=sd,
    )


def write(path: Path, parts: dict) -> Path:
    return save_artifact(path, **{k: v for k, v in parts.items() if not k.startswith("_")})


@pytest.fixture(scope="module")
def int4_parts() -> dict:
    return build_parts(tiny_config(), "int4")


@pytest.fixture()
def int4_dir(tmp_path: Path, int4_parts: dict) -> Path:
    return write(tmp_path / "art", int4_parts)


# ----------------------------------------------------------------------------------------------------------
# Round trips and the reference model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["fp32", "fp16", "int4"])
def test_round_trip_is_exact(tmp_path: Path, arch: str, mode: str) -> None:
    parts = build_parts(tiny_config(arch), mode)
    art = load_artifact(write(tmp_path / "a", parts))
    assert set(art.packed) == set(parts["packed"])
    for name, original in parts["packed"].items():
        loaded = art.packed[name]
        expected = original.tensors(name)
        got = loaded.tensors(name)
        assert got.keys() == expected.keys()
        for key in expected:
            want = expected[key]
            assert got[key].dtype == (want.dtype if not key.endswith(".values") else parts["dense_dtype"])
            assert torch.equal(got[key], want), key
        assert torch.equal(loaded.to_dense(), original.to_dense())
        assert loaded.group_size == (GROUP if mode == "int4" else None)
    for key, t in parts["dense"].items():
        assert torch.equal(art.dense[key], t.to(parts["dense_dtype"])), key
    assert art.sparsity == parts["sparsity"] and art.quantization == parts["quantization"]
    assert art.dense_dtype == parts["dense_dtype"]
    assert art.producer["source"] == {"checkpoint": "test", "step": 0}
    assert "sparsert_version" in art.producer
    assert isinstance(art.tokenizer, ByteTokenizer)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["fp16", "int4", "dense"])
def test_build_model_matches_masked_dense_reference(tmp_path: Path, arch: str, mode: str) -> None:
    config = tiny_config(arch)
    parts = build_parts(config, mode)
    model = load_artifact(write(tmp_path / "a", parts)).build_model()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())

    # Independent reference: W ⊙ top-2 mask, rounded to the stored dtype or fake-quantized to INT4.
    sd = dict(parts["_state"])
    dtype = parts["dense_dtype"]
    for key in list(sd):
        sd[key] = sd[key].to(dtype).float()
    if mode != "dense":
        for name in sparse_linear_names(config):
            w = parts["_state"][f"{name}.weight"]
            masked = w * nm_mask(w)
            sd[f"{name}.weight"] = (
                fake_quantize_int4(masked, GROUP) if mode == "int4" else masked.to(dtype).float()
            )
            if f"{name}.bias" in sd:
                sd[f"{name}.bias"] = parts["_state"][f"{name}.bias"]
    ref = DecoderLM(config)
    ref.load_state_dict(sd)
    ref.eval()
    for key, t in model.state_dict().items():
        assert torch.equal(t, ref.state_dict()[key]), key
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=1e-6)


def test_expected_tensors_match_packed_linear_names(int4_parts: dict) -> None:
    specs = expected_tensors(tiny_config(), int4_parts["sparsity"], int4_parts["quantization"], torch.float32)
    assert specs[f"{L0}.indices"].shape == (128, 16) and specs[f"{L0}.indices"].dtype == torch.uint8
    assert specs[f"{L0}.qweight"].shape == (128, 32)
    assert specs[f"{L0}.scales"].shape == (128, 1) and specs[f"{L0}.scales"].dtype == torch.float16
    assert specs["blocks.0.mlp.down_proj.qweight"].shape == (128, 64)
    assert specs["blocks.0.mlp.down_proj.scales"].shape == (128, 2)
    assert f"{L0}.weight" not in specs and "lm_head.weight" in specs
    packed_names = {k for n, p in int4_parts["packed"].items() for k in p.tensors(n)}
    assert packed_names == {k for k in specs if k.rpartition(".")[0] in int4_parts["packed"]}


# ----------------------------------------------------------------------------------------------------------
# Validation of bad files


def edit_config(root: Path, fn) -> None:
    file = root / "config.json"
    config = json.loads(file.read_text())
    fn(config)
    file.write_text(json.dumps(config))


def edit_tensors(root: Path, fn) -> None:
    file = root / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


def test_missing_directory_and_files(tmp_path: Path, int4_dir: Path) -> None:
    with pytest.raises(ArtifactError, match=r"artifact .*nope does not exist"):
        load_artifact(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"is not a directory"):
        load_artifact(tmp_path / "file")
    (int4_dir / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"model\.safetensors is missing"):
        load_artifact(int4_dir)
    (int4_dir / "config.json").unlink()
    with pytest.raises(ArtifactError, match=r"config\.json is missing"):
        load_artifact(int4_dir)


def test_bad_json(int4_dir: Path) -> None:
    (int4_dir / "config.json").write_text('{"format": "sparsert-artifact",')
    with pytest.raises(ArtifactError, match=r"config\.json is not valid JSON: .*line 1"):
        load_artifact(int4_dir)
    (int4_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"config\.json: expected a JSON object, got list"):
        load_artifact(int4_dir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format="onnx"), r"unknown format 'onnx', expected 'sparsert-artifact'"),
        (lambda c: c.update(format_version=2), r"unsupported format_version 2 \(this sparsert reads version 1\)"),
        (lambda c: c.update(format_version="1"), r"unsupported format_version '1'"),
        (lambda c: c.pop("dense_dtype"), r"missing field 'dense_dtype'"),
        (lambda c: c.update(extra=1), r"unknown field 'extra'"),
        (lambda c: c.update(dense_dtype="bfloat16"), r"dense_dtype: expected one of float32, float16, got 'bfloat16'"),
        (lambda c: c.update(dense_dtype=["float32"]), r"dense_dtype: expected one of float32, float16, got \['fl"),
        (lambda c: c["model"].update(n_heads=3), r"field 'model': model config field 'd_model'"),
        (lambda c: c["model"].update(vocab_size=512), r"tokenizer vocab_size 256 does not match model vocab_size 512"),
        (lambda c: c["tokenizer"].update(type="bpe"), r"field 'tokenizer': .*unknown type 'bpe'"),
        (lambda c: c["sparsity"].update(n=4, m=8), r"sparsity\.n: expected 2, got 4"),
        (lambda c: c["sparsity"].update(axis="out_features"), r"sparsity\.axis: expected 'in_features'"),
        (lambda c: c["sparsity"]["layers"].append("lm_head"), r"layers names 'lm_head', which is not a sparse"),
        (lambda c: c["sparsity"]["layers"].append(L0), rf"layer '{L0}' is listed twice"),
        (lambda c: c["quantization"].update(bits=8), r"quantization\.bits: expected 4, got 8"),
        (lambda c: c["quantization"].update(group_size=96), r"group_size 96 does not divide K=128 of layer"),
        (lambda c: c["quantization"].update(group_size=0), r"group_size: expected a positive integer, got 0"),
    ],
)
def test_bad_config_fields(int4_dir: Path, edit, message: str) -> None:
    edit_config(int4_dir, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(int4_dir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["model"].update(n_layers=400000),
         r"config\.json: model\.n_layers=400000 but .*model\.safetensors holds blocks 0\.\.0 \(1 layer\)$"),
        (lambda c: c["model"].update(n_layers=10**12), r"model\.n_layers=1000000000000 but .*holds blocks 0\.\.0"),
        (lambda c: c["model"].update(d_model=2**40),
         r"config\.json: model\.d_model=1099511627776 but .*model\.safetensors holds tok_emb\.weight \[256, 128\]"),
        (lambda c: c["model"].update(ffn_dim=10**12),
         r"model\.ffn_dim=1000000000000 but .*holds blocks\.0\.mlp\.up_proj with 256 output rows"),
    ],
)
def test_size_fields_are_checked_against_the_weights_before_building(int4_dir: Path, edit, message: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A huge n_layers (or d_model, ffn_dim) in config.json fails at once, naming the file and the field,
    before anything of that size is built (layer name lists, the meta-device model of expected shapes)."""

    def too_early(*args, **kwargs):
        raise AssertionError("built something of the config's sizes before checking them against the weights")

    edit_config(int4_dir, edit)
    monkeypatch.setattr(artifact_mod, "sparse_linear_names", too_early)
    monkeypatch.setattr(artifact_mod, "model_state_shapes", too_early)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(int4_dir)


def test_sizes_without_a_tensor_to_check_them_fail_cleanly(int4_dir: Path) -> None:
    # tok_emb.weight absent, so d_model is only seen by the expected-shapes model: an overflow there is one line
    edit_config(int4_dir, lambda c: c["model"].update(d_model=2**60))
    edit_tensors(int4_dir, lambda t: t.pop("tok_emb.weight"))
    with pytest.raises(ArtifactError, match=r"config\.json: field 'model': model config sizes are too large"):
        load_artifact(int4_dir)


def test_build_model_out_of_memory_names_max_seq_len(int4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A llama max_seq_len has no tensor to be checked against; its RoPE tables are allocated by build_model."""
    edit_config(int4_dir, lambda c: c["model"].update(max_seq_len=10**12))
    art = load_artifact(int4_dir)  # the weights fit the config: inspect works

    def no_memory(config):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 8000000000000 bytes.")

    monkeypatch.setattr(artifact_mod, "DecoderLM", no_memory)
    with pytest.raises(ArtifactError, match=r"config\.json: cannot build the model in memory "
                       r"\(max_seq_len=1000000000000, .*can't allocate memory"):
        art.build_model()


def test_not_an_artifact_says_what_it_is(tmp_path: Path, int4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    int4_dir.rename(run / "artifact")
    with pytest.raises(ArtifactError, match=rf"^{run} is not an artifact \({run / 'config.json'} is missing\); it "
                       rf"looks like a training run directory: its artifact is {run / 'artifact'}$"):
        load_artifact(run)
    step = run / "checkpoints" / "step_00000004"
    step.mkdir()
    (step / "state.json").write_text("{}")
    with pytest.raises(ArtifactError, match=rf"^{step} is not an artifact .*; it looks like a training checkpoint: "
                       rf"make an artifact of it with: sparsert compress {step} -o ARTIFACT$"):
        load_artifact(step)
    hf = run / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(ArtifactError, match=rf"^{hf} is a Hugging Face model directory \(config\.json has "
                       r"model_type/architectures 'llama'\), not a sparsert artifact: load it with transformers"):
        load_artifact(hf)
    monkeypatch.chdir(run / "artifact")  # "" must not be read as the current directory (a valid artifact)
    with pytest.raises(ArtifactError, match=r"^artifact: expected the path of an artifact directory, got ''$"):
        load_artifact("")


def test_truncated_safetensors(int4_dir: Path) -> None:
    file = int4_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"model\.safetensors is corrupt or truncated"):
        load_artifact(int4_dir)
    file.write_bytes(b"")
    with pytest.raises(ArtifactError, match=r"model\.safetensors is corrupt or truncated"):
        load_artifact(int4_dir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop(f"{L0}.scales"),
            rf"missing tensor '{L0}\.scales' \(expected float16 \[128, 1\]\)",
        ),
        (lambda t: t.pop("tok_emb.weight"), r"missing tensor 'tok_emb\.weight' \(expected float32 \[256, 128\]\)"),
        (lambda t: t.update(extra=torch.zeros(1)), r"unexpected tensor 'extra'"),
        (
            lambda t: t.update({f"{L0}.values": torch.zeros(128, 64)}),
            rf"unexpected tensor '{L0}\.values'",
        ),
        (
            lambda t: t.update({f"{L0}.qweight": t[f"{L0}.qweight"][:, :-1].contiguous()}),
            rf"tensor '{L0}\.qweight' is uint8 \[128, 31\], expected uint8 \[128, 32\]",
        ),
        (
            lambda t: t.update({f"{L0}.scales": t[f"{L0}.scales"].float()}),
            rf"tensor '{L0}\.scales' is float32 \[128, 1\], expected float16 \[128, 1\]",
        ),
        (
            lambda t: t.update({"norm_f.weight": t["norm_f.weight"].half()}),
            r"tensor 'norm_f\.weight' is float16 \[128\], expected float32 \[128\]",
        ),
        (
            lambda t: t[f"{L0}.scales"].__setitem__((3, 0), float("nan")),
            rf"tensor '{L0}\.scales' holds non-finite values",
        ),
        (
            lambda t: t[f"{L0}.scales"].__setitem__((3, 0), float("inf")),
            rf"tensor '{L0}\.scales' holds non-finite values",
        ),
        (
            lambda t: t[f"{L0}.scales"].__setitem__((3, 0), -0.5),
            rf"tensor '{L0}\.scales' holds negative scales",
        ),
        (
            lambda t: t["lm_head.weight"].__setitem__((0, 0), float("nan")),
            r"tensor 'lm_head\.weight' holds non-finite values",
        ),
    ],
)
def test_bad_tensors(int4_dir: Path, edit, message: str) -> None:
    edit_tensors(int4_dir, edit)
    with pytest.raises(ArtifactError, match=r"model\.safetensors: " + message):
        load_artifact(int4_dir)


def set_group_pair(root: Path, row: int, byte_index: int, low_nibble: int) -> None:
    """Overwrite the low nibble (the first group's two indices) of one indices byte of layer L0."""

    def edit(t: dict) -> None:
        b = t[f"{L0}.indices"][row, byte_index]
        t[f"{L0}.indices"][row, byte_index] = (b & 0xF0) | low_nibble

    edit_tensors(root, edit)


@pytest.mark.parametrize(("nibble", "pair"), [(0b0101, "1, 1"), (0b0011, "3, 0"), (0b0010, "2, 0")])
def test_indices_that_do_not_decode_to_24(int4_dir: Path, nibble: int, pair: str) -> None:
    # Byte 2 of a row holds groups 4 and 5; its low nibble is group 4: first index | second index << 2.
    set_group_pair(int4_dir, 5, 2, nibble)
    with pytest.raises(
        ArtifactError,
        match=rf"model\.safetensors: tensor '{L0}\.indices' does not decode to a valid 2:4 pattern: "
        rf"row 5, group 4 has indices \({pair}\), expected two strictly increasing indices",
    ):
        load_artifact(int4_dir)


def test_rewritten_but_valid_indices_still_load(int4_dir: Path) -> None:
    set_group_pair(int4_dir, 5, 2, 0b1110)  # (2, 3): a valid pair
    assert load_artifact(int4_dir).packed[L0].to_dense().shape == (128, 128)


# ----------------------------------------------------------------------------------------------------------
# Atomic, careful writes


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_save_replaces_an_existing_artifact(tmp_path: Path, int4_parts: dict) -> None:
    target = write(tmp_path / "art", int4_parts)
    fp16 = build_parts(tiny_config(), "fp16", seed=3)
    write(target, fp16)
    art = load_artifact(target)
    assert art.quantization is None and art.dense_dtype == torch.float16
    assert leftovers(tmp_path) == []


def test_save_refuses_to_overwrite_other_things(tmp_path: Path, int4_parts: dict) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(ArtifactError, match=r"refusing to overwrite .*notes: the directory is not empty and is not"):
        write(other, int4_parts)
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ArtifactError, match=r"refusing to overwrite .*file: it exists and is not an artifact"):
        write(file, int4_parts)
    assert file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    load_artifact(write(empty, int4_parts))
    (empty / "notes.txt").write_text("mine")  # an artifact with a file of the user's: not deleted with it
    with pytest.raises(ArtifactError, match=r"refusing to overwrite .*empty: it holds notes.txt, which is not part"):
        write(empty, int4_parts)
    assert (empty / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


def test_invalid_inputs_write_nothing(tmp_path: Path, int4_parts: dict) -> None:
    parts = dict(int4_parts)
    parts["packed"] = {k: v for k, v in parts["packed"].items() if k != L0}
    with pytest.raises(ArtifactError, match=rf"packed layer '{L0}' is listed in sparsity/quantization layers but not"):
        write(tmp_path / "out", parts)
    parts = dict(int4_parts)
    parts["dense"] = {k: v for k, v in parts["dense"].items() if k != "norm_f.weight"}
    with pytest.raises(ArtifactError, match=r"missing tensor 'norm_f\.weight'"):
        write(tmp_path / "out", parts)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_nothing(tmp_path: Path, int4_parts: dict, monkeypatch) -> None:
    def failing_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(artifact_mod, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path / "out", int4_parts)
    assert list(tmp_path.iterdir()) == []


def test_failed_replace_keeps_the_old_artifact(tmp_path: Path, int4_parts: dict, monkeypatch) -> None:
    target = write(tmp_path / "art", int4_parts)
    before = (target / "model.safetensors").read_bytes()

    def failing_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_mod, "save_file", failing_save_file)
    with pytest.raises(KeyboardInterrupt):
        write(target, build_parts(tiny_config(), "fp16"))
    assert (target / "model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == []
    assert oct(os.stat(target / "model.safetensors").st_mode & 0o777) == "0o644"


def test_mixed_layer_kinds_round_trip_and_stats(tmp_path: Path) -> None:
    """Per layer: 2:4 only, 2:4 + INT4, INT4 only, or left dense; each decodes to its own reference."""
    from sparsert.runtime.artifact_stats import artifact_stats

    config = tiny_config()
    torch.manual_seed(0)
    sd = DecoderLM(config).state_dict()
    names = sparse_linear_names(config)  # q, k, v, o, gate, up, down
    kinds = {names[0]: "24", names[1]: "24q", names[2]: "q", names[3]: "dense"}
    kinds.update({n: "24q" for n in names[4:]})
    packed = {
        n: pack_linear(sd[f"{n}.weight"], sparse="24" in kind, int4_group_size=GROUP if "q" in kind else None)
        for n, kind in kinds.items()
        if kind != "dense"
    }
    dense = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in packed}
    path = save_artifact(
        tmp_path / "mixed",
        model_config=config,
        tokenizer=ByteTokenizer(),
        packed=packed,
        dense=dense,
        sparsity=SparsityInfo(tuple(n for n, k in kinds.items() if "24" in k)),
        quantization=QuantizationInfo(tuple(n for n, k in kinds.items() if "q" in k), GROUP),
    )
    art = load_artifact(path)
    assert set(art.packed) == set(packed) and f"{names[3]}.weight" in art.dense
    for name, original in packed.items():
        assert torch.equal(art.packed[name].to_dense(), original.to_dense()), name
    w = sd[f"{names[2]}.weight"]
    assert torch.equal(art.packed[names[2]].to_dense(), fake_quantize_int4(w, GROUP))  # INT4 only: not pruned

    stats = {s.name: s for s in artifact_stats(path).layers}
    assert stats[names[0]].storage == "2:4 float32" and stats[names[0]].bits_per_weight == 17.0
    assert stats[names[1]].storage == "2:4+int4 g128" and stats[names[1]].bits_per_weight == 3.125
    assert stats[names[2]].storage == "int4 g128" and stats[names[2]].bits_per_weight == 4.125
    assert stats[names[3]].storage == "dense float32" and stats[names[3]].bits_per_weight == 32.0
    assert stats[names[3]].sparsity == 0.0 and stats[names[0]].sparsity == 0.5


def test_write_errors_name_the_target_not_the_temporary(tmp_path, monkeypatch, int4_parts):
    """A failed atomic write (e.g. a read-only file system) reports the path the caller asked for, not the hidden
    temporary file or staging folder, and leaves no temporary behind."""
    import errno
    import tempfile

    from sparsert.runtime import fileio

    def refuse(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    with monkeypatch.context() as m:
        m.setattr(fileio.os, "replace", refuse)
        with pytest.raises(OSError) as exc:
            fileio.write_atomic(tmp_path / "out.json", "{}")
    assert exc.value.filename == str(tmp_path / "out.json") and exc.value.errno == errno.EROFS
    assert list(tmp_path.iterdir()) == []

    def no_mkdtemp(**kw):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(kw["dir"]) / ".art.x.tmp"))

    monkeypatch.setattr(tempfile, "mkdtemp", no_mkdtemp)
    with pytest.raises(OSError) as exc:
        write(tmp_path / "art", int4_parts)
    assert exc.value.filename == str(tmp_path / "art")
