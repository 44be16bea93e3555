"""Checkpoints: round trip, atomic publication, pruning, and clear errors for missing/corrupt files."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsert.train.checkpoint as ckpt_mod
from sparsert.runtime.errors import ArtifactError, ConfigError
from sparsert.runtime.model import DecoderLM, ModelConfig
from sparsert.train.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from sparsert.train.run_dir import load_train_config
from sparsert.train.sparse_linear import SparsityConfig
from sparsert.train.sparsify import sparsify_model

CONFIG = ModelConfig(d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16)
STATE = {"model_config": CONFIG.to_dict(), "train_config": {"lr": 1e-3}, "sparsity": {"n": 2, "m": 4},
         "quantization": None, "data_rng": "abc"}


def trained(seed: int = 0, sparse: bool = True):
    torch.manual_seed(seed)
    model = DecoderLM(CONFIG)
    if sparse:
        sparsify_model(model, SparsityConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randint(0, 256, (2, 8))).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.fixture
def run(tmp_path):
    model, opt = trained()
    save_checkpoint(tmp_path, 5, model, opt, STATE)
    return tmp_path, model, opt


def test_round_trip_restores_model_and_optimizer(run):
    run_dir, model, opt = run
    step_dir = run_dir / "checkpoints" / "step_00000005"
    assert sorted(p.name for p in step_dir.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text()) == {"step": 5, "dir": "step_00000005"}
    for where in (run_dir, run_dir / "checkpoints", step_dir):
        assert load_checkpoint(where).path == step_dir
    ck = load_checkpoint(run_dir)
    assert ck.step == 5 and ck.model_config == CONFIG and ck.state["data_rng"] == "abc"
    assert ck.state["format"] == "sparsert-checkpoint" and ck.state["version"] == 1
    mask = ck.model_state["blocks.0.attn.q_proj.mask"]
    assert mask.dtype == torch.uint8 and mask.shape == (32, 32)
    for name, t in model.state_dict().items():
        assert torch.equal(ck.model_state[name], t), name

    model2, opt2 = trained(seed=1)
    model2.load_state_dict(ck.model_state)
    restore_optimizer(opt2, model2, ck)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"][0]["lr"] == s2["param_groups"][0]["lr"]
    for i, entry in s1["state"].items():
        for key, value in entry.items():
            assert torch.equal(s2["state"][i][key], value), (i, key)


def test_keeps_the_newest_two_and_leaves_no_temporaries(run):
    run_dir, model, opt = run
    for step in (10, 15):
        save_checkpoint(run_dir, step, model, opt, STATE)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest.json", "step_00000010", "step_00000015"]
    assert load_checkpoint(run_dir).step == 15


def test_a_failed_save_leaves_the_previous_checkpoint_published(run, monkeypatch):
    run_dir, model, opt = run

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_file", crash)  # interrupt while writing the new step directory
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run_dir, 10, model, opt, STATE)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest.json", "step_00000005"]
    assert load_checkpoint(run_dir).step == 5


def test_inconsistent_save_arguments_are_refused_and_leave_nothing(run):
    run_dir, model, opt = run
    with pytest.raises(ConfigError, match=r"save_checkpoint: state must contain 'model_config'"):
        save_checkpoint(run_dir, 10, model, opt, {"sparsity": None})
    stray = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 5))], lr=1e-3)
    with pytest.raises(ConfigError, match=r"the optimizer holds a parameter of shape \[3, 5\] that is not in the "
                                          r"model"):
        save_checkpoint(run_dir, 10, model, stray, STATE)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest.json", "step_00000005"]


def test_missing_paths(tmp_path):
    with pytest.raises(ArtifactError, match=r"nope: checkpoint path does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(ArtifactError, match=r"no checkpoint found"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ArtifactError, match=r"latest.json: no complete checkpoint has been written yet"):
        load_checkpoint(tmp_path)


def test_latest_json_errors(run):
    run_dir, _, _ = run
    latest = run_dir / "checkpoints" / "latest.json"
    latest.write_text('{"step": 7, "dir": "step_00000007"}')
    with pytest.raises(ArtifactError, match=r"latest.json: points to step_00000007, which does not exist"):
        load_checkpoint(run_dir)
    latest.write_text('{"step": ')
    with pytest.raises(ArtifactError, match=r"latest.json: not valid JSON"):
        load_checkpoint(run_dir)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_truncated_or_garbage_safetensors(run, name):
    path = run[0] / "checkpoints" / "step_00000005" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"step_00000005/{name}: corrupt or truncated safetensors file"):
        load_checkpoint(run[0])
    path.write_bytes(b"\x00garbage" * 3)
    with pytest.raises(ArtifactError, match=rf"{name}: corrupt or truncated safetensors file"):
        load_checkpoint(run[0])
    path.unlink()
    with pytest.raises(ArtifactError, match=rf"{name}: file is missing"):
        load_checkpoint(run[0])


def _rewrite_model(run_dir, edit):
    path = run_dir / "checkpoints" / "step_00000005" / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor(run):
    _rewrite_model(run[0], lambda t: t.pop("blocks.0.mlp.up_proj.weight"))
    with pytest.raises(ArtifactError, match=r"model.safetensors: missing tensor 'blocks.0.mlp.up_proj.weight' "
                                            r"\(expected shape \[64, 32\]\)"):
        load_checkpoint(run[0])


def test_missing_mask_of_a_sparse_checkpoint(run):
    _rewrite_model(run[0], lambda t: t.pop("blocks.0.attn.v_proj.mask"))
    with pytest.raises(ArtifactError, match=r"missing tensor 'blocks.0.attn.v_proj.mask'"):
        load_checkpoint(run[0])


def test_shape_mismatch_with_the_model_config(run):
    state_path = run[0] / "checkpoints" / "step_00000005" / "state.json"
    state = json.loads(state_path.read_text())
    state["model_config"]["ffn_dim"] = 128
    state_path.write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match=r"state\.json: model_config\.ffn_dim=128 but .*model\.safetensors holds "
                                            r"blocks\.0\.mlp\.up_proj with 64 output rows"):
        load_checkpoint(run[0])
    state["model_config"]["ffn_dim"] = 64
    state_path.write_text(json.dumps(state))
    _rewrite_model(run[0], lambda t: t.update({"blocks.0.mlp.gate_proj.weight": torch.zeros(64, 16)}))
    with pytest.raises(ArtifactError, match=r"tensor 'blocks.0.mlp.gate_proj.weight' has shape \[64, 16\], "
                                            r"expected \[64, 32\] for the model config"):
        load_checkpoint(run[0])


def test_mask_that_is_not_2_4(run):
    def bad(t):
        t["blocks.0.attn.k_proj.mask"][0, :4] = 1
    _rewrite_model(run[0], bad)
    with pytest.raises(ArtifactError, match=r"mask 'blocks.0.attn.k_proj.mask' is not 2:4 along K"):
        load_checkpoint(run[0])


def test_bad_state_json(run):
    state_path = run[0] / "checkpoints" / "step_00000005" / "state.json"
    text = state_path.read_text()
    state_path.write_text(text[:-20])
    with pytest.raises(ArtifactError, match=r"step_00000005/state.json: not valid JSON"):
        load_checkpoint(run[0])
    state = json.loads(text)
    state["model_config"]["n_heads"] = "two"
    state_path.write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match=r"state.json: model config field 'n_heads': expected an integer"):
        load_checkpoint(run[0])
    state_path.write_text(json.dumps(dict(json.loads(text), version=99)))
    with pytest.raises(ArtifactError, match=r"unsupported checkpoint version 99"):
        load_checkpoint(run[0])
    state_path.write_text(json.dumps(dict(json.loads(text), step=99)))
    with pytest.raises(ArtifactError, match=r"state.json: 'step' is 99 but its directory is step_00000005"):
        load_checkpoint(run[0])
    state = json.loads(text)
    del state["train_config"]  # a resume would otherwise train the default config from this step
    state_path.write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match=r"state.json: no train_config .* cannot be resumed"):
        load_train_config(run[0])
    for field, value, disagreement in (  # hand edits the resume would otherwise train on, or misreport
        ("dense", True, "sparsity: recorded 2:4, train_config dense"),
        ("n", 1, "sparsity.n: recorded 2, train_config 1"),
        ("qat", True, "quantization: recorded none, train_config INT4 group 128"),
    ):
        state = json.loads(text)
        state["train_config"][field] = value
        state_path.write_text(json.dumps(state))
        with pytest.raises(ArtifactError, match=rf"state.json: train_config disagrees with the checkpoint's own "
                                                rf"records \({disagreement}\): the file was edited or damaged"):
            load_train_config(run[0])
    state_path.write_text(text)
    assert load_train_config(run[0]).resume


@pytest.mark.parametrize("field,value,message", [
    ("n_layers", 400000, r"state\.json: model_config\.n_layers=400000 but .*model\.safetensors holds blocks 0\.\.0 "
                         r"\(1 layer\)$"),
    ("ffn_dim", 10**9, r"state\.json: model_config\.ffn_dim=1000000000 but .*holds blocks\.0\.mlp\.up_proj"),
])
def test_huge_sizes_in_state_json_fail_before_anything_of_their_size_is_built(run, field, value, message,
                                                                             monkeypatch):
    """``sparsert compress`` (and --resume) load checkpoints: a state.json whose model sizes disagree with its
    weights fails at once, naming both files, instead of building a model description of those sizes."""
    def too_early(*args, **kwargs):
        raise AssertionError("built the expected shapes before checking the sizes against the weights")

    monkeypatch.setattr(ckpt_mod, "expected_model_shapes", too_early)
    state_path = run[0] / "checkpoints" / "step_00000005" / "state.json"
    state = json.loads(state_path.read_text())
    state["model_config"][field] = value
    state_path.write_text(json.dumps(state))
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError, match=message):
        load_checkpoint(run[0])
    assert time.perf_counter() - t0 < 10


def test_optimizer_state_for_another_model_is_refused(run):
    run_dir, _, _ = run
    ck = load_checkpoint(run_dir)
    other = DecoderLM(CONFIG)
    sparsify_model(other, SparsityConfig())
    opt = torch.optim.AdamW([p for n, p in other.named_parameters() if "norm" not in n], lr=1e-3)
    with pytest.raises(ArtifactError, match=r"optimizer parameters do not match the model"):
        restore_optimizer(opt, other, ck)


def test_dense_checkpoint_has_no_masks(tmp_path):
    model, opt = trained(sparse=False)
    save_checkpoint(tmp_path, 1, model, opt, dict(STATE, sparsity=None))
    ck = load_checkpoint(tmp_path)
    assert not any(k.endswith(".mask") for k in ck.model_state)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000001")
    with pytest.raises(ArtifactError, match=r"points to step_00000001, which does not exist"):
        load_checkpoint(tmp_path)
