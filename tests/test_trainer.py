"""The training loop: metrics, checkpoints, exact resume, refused config changes, divergence, QAT = artifact."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from sparsert.runtime.artifact import load_artifact
from sparsert.runtime.errors import ConfigError, DataError
from sparsert.train.checkpoint import load_checkpoint, write_json_atomic
from sparsert.train.metrics import TIMING_KEYS, read_metrics
from sparsert.train.run_dir import load_train_config
from sparsert.train.train_config import TrainConfig, lr_at
from sparsert.train.trainer import TrainingDivergedError, build_model, train


def small(corpus, out, **kw) -> TrainConfig:
    base = dict(data=str(corpus), out_dir=str(out), steps=8, batch_size=2, seq_len=32, eval_interval=4,
                eval_batches=2, ckpt_interval=4, mask_refresh_interval=2, threads=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_run_writes_metrics_checkpoints_and_artifact(corpus, tmp_path):
    result = train(small(corpus, tmp_path / "run"))
    run = tmp_path / "run"
    assert result.run_dir == run and result.checkpoint == run / "checkpoints" / "step_00000008"
    assert result.artifact == run / "artifact" and (run / "artifact" / "config.json").exists()
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["step"] for r in evals] == [4, 8]
    assert all(set(r) >= {"step", "loss", "lr", "tokens_per_s", "sparsity"} for r in steps)
    assert [r["step"] for r in steps if "flip_rate" in r] == [2, 4, 6, 8]  # refreshed every 2 steps
    assert all(0.0 <= r["mask_refresh_share"] < 1.0 for r in steps)
    share = {r["step"]: r["mask_refresh_share"] for r in steps}
    assert sum(share[s] for s in (2, 4, 6, 8)) > 0.0  # the refreshes take measurable time
    assert all(r["sparsity"] == 0.5 for r in steps)
    assert evals[-1]["val_loss"] == pytest.approx(result.final_val_loss)
    assert evals[-1]["val_ppl"] == pytest.approx(result.final_val_ppl)
    assert steps[-1]["loss"] < steps[0]["loss"]
    ck = load_checkpoint(run)
    assert ck.step == 8 and ck.state["sparsity"]["n"] == 2 and ck.state["quantization"] is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step_00000004",
                                                                        "step_00000008"]
    art = load_artifact(run / "artifact")
    for name, packed in art.packed.items():  # the artifact keeps exactly the trained masks' weights
        outside = (packed.to_dense() != 0) & ~ck.model_state[f"{name}.mask"].bool()
        assert not outside.any(), name


def test_resume_is_exact_and_drops_metrics_past_the_checkpoint(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(small(corpus, a))
    # b = a as it was after step 4: its checkpoint at step 4 published, a metrics log that ran on to step 8.
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_00000008")
    shutil.rmtree(b / "artifact")
    write_json_atomic(b / "checkpoints" / "latest.json", {"step": 4, "dir": "step_00000004"})

    cfg = load_train_config(b)
    assert cfg.resume and cfg.out_dir == str(b) and cfg.steps == 8
    train(cfg)
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert cb.step == 8
    for name, t in ca.model_state.items():
        assert torch.equal(cb.model_state[name], t), name
    for i, entry in ca.optimizer_state["state"].items():
        for key, value in entry.items():
            assert torch.equal(cb.optimizer_state["state"][i][key], value), (i, key)
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))
    assert cb.state["data_rng"] == ca.state["data_rng"]


def test_resume_refuses_when_the_options_now_choose_other_2_4_layers(corpus, tmp_path):
    """A run whose checkpoint recorded other 2:4 layers than the same options choose now (a run started by a
    version of sparsert with another --sparse-layers ffn rule) is not resumed with layers silently switched."""
    run = tmp_path / "run"
    train(small(corpus, run, steps=4, sparse_layers="ffn", ckpt_interval=2))
    shutil.rmtree(run / "artifact")
    write_json_atomic(run / "checkpoints" / "latest.json", {"step": 2, "dir": "step_00000002"})
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    state_file = run / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["sparsity"]["layers"] = state["sparsity"]["layers"][1:]  # as if it had trained one layer fewer 2:4
    write_json_atomic(state_file, state)
    with pytest.raises(ConfigError, match=r"cannot resume .*step_00000002: it trained 11 layers 2:4, but this version "
                                          r"of sparsert chooses 12 for the same options \(blocks\.0\.mlp\.gate_proj "
                                          r"now among them\); finish it with the version that started it"):
        train(load_train_config(run))


def test_resume_refuses_a_changed_config(corpus, tmp_path):
    train(small(corpus, tmp_path / "run", steps=4))
    cfg = dataclasses.replace(load_train_config(tmp_path / "run"), lr=0.01, steps=6)
    with pytest.raises(ConfigError, match=r"cannot resume .*run: the config differs from its checkpoint's "
                                          r"\(steps: 4 -> 6; lr: 0.003 -> 0.01\)"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"already holds a training run; continue it with --resume"):
        train(small(corpus, tmp_path / "run", steps=4))


def test_resume_refuses_changed_training_data(corpus, tmp_path):
    """Same path, other tokens: resuming would silently train (and validate) on another corpus."""
    data = tmp_path / "corpus.txt"
    data.write_text(corpus.read_text())
    train(small(data, tmp_path / "run", steps=4))
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    data.write_text(corpus.read_text()[:-500] + "appended text " * 40)
    cfg = dataclasses.replace(load_train_config(tmp_path / "run"), steps=4)
    with pytest.raises(ConfigError, match=r"cannot resume .*run: its training data changed since the checkpoint "
                                          r"\(the tokens of .*corpus.txt differ from those it trained on\)"):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before
    data.write_text(corpus.read_text())  # the same data again: the resume goes ahead
    train(cfg)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(corpus, tmp_path):
    cfg = small(corpus, tmp_path / "run", lr=1e30, warmup_steps=0, ckpt_interval=1, grad_clip=1e30)
    with pytest.raises(TrainingDivergedError, match=r"became (nan|inf) at step (\d+); training stopped and the "
                                                    r"last good checkpoint is step \d+ "):
        train(cfg)
    ck = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in ck.model_state.values())
    last = [r for r in read_metrics(tmp_path / "run") if "loss" in r][-1]
    assert last["step"] == ck.step  # nothing logged or saved for the failed step


LEFTOVER_LOG = '{"step": 1, "loss": 9.0, "lr": 0.003, "tokens_per_s": 1000.0, "sparsity": 0.5}\n'


def test_a_run_stopped_before_its_first_checkpoint_can_start_again(corpus, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002.tmp").mkdir(parents=True)  # the first checkpoint, half written
    (run / "metrics.jsonl").write_text(LEFTOVER_LOG)  # left by a run interrupted at step 1
    train(small(corpus, run, steps=2, eval_interval=2, ckpt_interval=2))
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2]
    assert read_metrics(run)[0]["loss"] != 9.0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step_00000002"]


@pytest.mark.parametrize(("files", "clashes"), [
    ({"metrics.jsonl": '{"epoch": 1, "acc": 0.5}\n'}, "metrics.jsonl"),  # someone else's metrics log
    ({"metrics.jsonl": '{"epoch": 1}\n', "artifact/weights.bin": "x", "notes.txt": "mine"},
     "metrics.jsonl, artifact"),
    ({"checkpoints/model.pt": "x"}, "checkpoints"),  # not a sparsert run's leftover
    ({"hf": "a file named hf"}, "hf"),
])
def test_a_new_run_refuses_an_out_dir_whose_run_files_are_not_its_own(corpus, tmp_path, files, clashes):
    run = tmp_path / "run"
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    with pytest.raises(ConfigError) as exc:
        train(small(corpus, run, steps=2))
    moved = " and ".join(clashes.split(", "))
    assert str(exc.value) == (
        f"--out {run}: it already holds {clashes}, not from an interrupted sparsert run, and a new run writes "
        f"metrics.jsonl, checkpoints/, artifact/ (or hf/) there: choose another --out, or move {moved} out of {run}")
    assert {str(p.relative_to(run)): p.read_text() for p in run.rglob("*") if p.is_file()} == files  # untouched


def test_a_new_run_leaves_other_files_in_its_out_dir_alone(corpus, tmp_path):
    """A log `tee` opened before the run, a .gitkeep, a report/ of an interrupted run, an empty artifact/ and
    the leftovers of a run stopped while its first checkpoint's directory was being swapped in."""
    run = tmp_path / "run"
    files = {"train.log": "tee", ".gitkeep": "", "report/summary.md": "# old", "metrics.jsonl": LEFTOVER_LOG}
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    (run / "artifact").mkdir()
    (run / "checkpoints" / ".step_00000002.0123456789ab.old").mkdir(parents=True)
    train(small(corpus, run, steps=2, eval_interval=2, ckpt_interval=2))
    assert all((run / name).read_text() == text for name, text in files.items() if name != "metrics.jsonl")
    assert (run / "artifact" / "config.json").is_file() and load_checkpoint(run).step == 2


def test_qat_forward_weights_are_the_artifact_weights(corpus, tmp_path):
    cfg = small(corpus, tmp_path / "run", steps=2, qat=True, group_size=128, eval_interval=2, ckpt_interval=2)
    train(cfg)
    ck = load_checkpoint(tmp_path / "run")
    assert ck.state["quantization"] == {"bits": 4, "group_size": 128, "method": "qat"}
    model = build_model(ck.model_config, cfg)
    model.load_state_dict(ck.model_state)
    art = load_artifact(tmp_path / "run" / "artifact")
    assert art.quantization is not None
    for name, packed in art.packed.items():
        assert torch.equal(packed.to_dense(), model.get_submodule(name).effective_weight()), name


def test_dense_run_has_no_masks_and_still_compresses(corpus, tmp_path):
    result = train(small(corpus, tmp_path / "run", steps=2, dense=True, eval_interval=2, ckpt_interval=2))
    ck = load_checkpoint(tmp_path / "run")
    assert ck.state["sparsity"] is None and not any(k.endswith(".mask") for k in ck.model_state)
    assert all(r["sparsity"] == 0.0 and "flip_rate" not in r for r in read_metrics(result.run_dir) if "loss" in r)
    assert (result.artifact / "model.safetensors").exists()


def test_bad_inputs_write_nothing(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'"):
        train(TrainConfig(preset="huge", data=str(corpus)))
    with pytest.raises(DataError, match=r"missing.txt: data path does not exist"):
        train(TrainConfig(data=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match=r"--seq-len 999 exceeds the model's max_seq_len 256"):
        train(TrainConfig(data=str(corpus), seq_len=999))
    with pytest.raises(ConfigError, match=r"cannot be combined with --dense"):
        TrainConfig(dense=True, qat=True)
    with pytest.raises(ConfigError, match=r"train config 'steps': expected a positive integer, got 0"):
        TrainConfig(steps=0)
    assert not (tmp_path / "runs").exists()


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 1) == pytest.approx(0.1) and lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.55) and lr_at(cfg, 100) == pytest.approx(0.1)
    lrs = [lr_at(cfg, s) for s in range(10, 101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:], strict=False))
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_a_run_that_is_not_2to4_says_up_front_it_gets_no_artifact(corpus, tmp_path, capsys):
    result = train(small(corpus, tmp_path / "run", steps=2, n=1, m=4))
    err = capsys.readouterr()
    assert "note: the compressed artifact stores 2:4 sparsity only; this 1:4 run will end with a checkpoint and " \
           "no artifact" in err.err
    assert result.artifact is None and "no artifact: the compressed format stores 2:4" in err.out


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"method": "hu"}, {"method": "ast", "qat": True, "distill_beta": 0.0}],
                         ids=["sr-ste", "hu", "ast-qat"])
def test_training_on_the_gpu_follows_the_cpu_run(corpus, tmp_path, kw):
    """--device cuda: the same run as on the CPU (same data order, masks refreshed, checkpoint, artifact), its
    losses within float rounding of the CPU run's; resumed on the CPU it finishes."""
    cpu = train(small(corpus, tmp_path / "cpu", device="cpu", **kw))
    gpu = train(small(corpus, tmp_path / "gpu", device="cuda", **kw))
    assert gpu.artifact is not None and load_artifact(gpu.artifact).packed
    lc = [r["loss"] for r in read_metrics(tmp_path / "cpu") if "loss" in r]
    lg = [r["loss"] for r in read_metrics(tmp_path / "gpu") if "loss" in r]
    assert len(lc) == len(lg) == 8
    assert max(abs(a - b) / abs(a) for a, b in zip(lc, lg, strict=True)) < 2e-2, (lc, lg)
    assert abs(gpu.final_val_loss - cpu.final_val_loss) / cpu.final_val_loss < 2e-2
    ck = load_checkpoint(tmp_path / "gpu")
    assert all(t.device.type == "cpu" for t in ck.model_state.values())  # checkpoints are device-free
    rewound = tmp_path / "gpu-resumed"
    shutil.copytree(tmp_path / "gpu", rewound)
    shutil.rmtree(rewound / "checkpoints" / "step_00000008")
    shutil.rmtree(rewound / "artifact")
    write_json_atomic(rewound / "checkpoints" / "latest.json", {"step": 4, "dir": "step_00000004"})
    resumed = train(dataclasses.replace(load_train_config(rewound), device="cpu"))
    assert resumed.artifact is not None
