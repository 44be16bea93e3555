"""``sparsert train --model PATH``: tiny random Llama and GPT-2 directories (built from configs, with a byte-level
BPE trained on a few sentences; no downloads) trained 2:4 through the sparsert trainer, checkpointed, resumed,
and saved back as a directory transformers loads."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import tiny_qwen2_moe  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sparsert.runtime.errors import ArtifactError, ConfigError  # noqa: E402
from sparsert.runtime.hf_tokenizer import HFTokenizer  # noqa: E402
from sparsert.runtime.nm_mask import is_nm_sparse  # noqa: E402
from sparsert.train.ast_distill import Teacher, distillation_loss  # noqa: E402
from sparsert.train.checkpoint import load_checkpoint, write_json_atomic  # noqa: E402
from sparsert.train.compress import compress_checkpoint  # noqa: E402
from sparsert.train.distributed import decoder_blocks  # noqa: E402
from sparsert.train.hf_train import HFCausalLM, HFModelConfig, build_hf_model, save_hf_run  # noqa: E402
from sparsert.train.metrics import read_metrics  # noqa: E402
from sparsert.train.run_dir import load_train_config  # noqa: E402
from sparsert.train.sparse_linear import SparsityConfig  # noqa: E402
from sparsert.train.sparsify import sparsify_model  # noqa: E402
from sparsert.train.train_config import TrainConfig  # noqa: E402
from sparsert.train.trainer import Distill, load_teacher, train, train_step  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. Sparse models keep two of every four weights. "
        "Zwei von vier Gewichten bleiben übrig, the rest are zero. ")
MAX_POS = 128  # max_position_embeddings of the conftest models


@pytest.fixture(scope="module")
def hf(hf_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The llama, gpt2 and bert directories of tests/conftest.py and a ``corpus`` text file."""
    corpus = tmp_path_factory.mktemp("hf_train") / "corpus.txt"
    corpus.write_text(TEXT * 40, encoding="utf-8")
    return {**hf_model_dirs, "corpus": corpus}


def small(hf: dict[str, Path], arch: str, out: Path, **kw) -> TrainConfig:
    base = dict(hf_model=str(hf[arch]), data=str(hf["corpus"]), out_dir=str(out), steps=6, batch_size=4, seq_len=32,
                eval_interval=3, eval_batches=2, ckpt_interval=3, mask_refresh_interval=2, threads=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def _trained_model(run: Path) -> HFCausalLM:
    """The model of a run's last checkpoint as the trainer ran it (every block linear 2:4 with its mask)."""
    ckpt = load_checkpoint(run)
    model = build_hf_model(ckpt.model_config)
    sparsify_model(model, SparsityConfig(), model.sparse_linear_names())
    model.load_state_dict(ckpt.model_state)
    return model.eval()


def test_llama_trains_checkpoints_and_saves_a_2_4_hf_directory(hf: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(small(hf, "llama", run))
    losses = _losses(run)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    assert result.artifact == run / "hf"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "hf", "metrics.jsonl"]  # no sparsert artifact

    ckpt = load_checkpoint(run)
    assert ckpt.state["hf_model"] == str(hf["llama"].resolve())
    assert isinstance(ckpt.model_config, HFModelConfig) and ckpt.model_config.max_seq_len == MAX_POS
    assert ckpt.state["model_config"]["type"] == "hf" and ckpt.state["tokenizer"]["type"] == "hf"
    masks = [k for k in ckpt.model_state if k.endswith(".mask")]
    assert len(masks) == 2 * 7 and all(k.startswith("hf.model.layers.") for k in masks)

    out = run / "hf"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    tok = HFTokenizer(hf["llama"])
    x = torch.tensor(tok.encode(TEXT)[:24])[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, _trained_model(run)(x), atol=1e-5, rtol=1e-5)
    tensors = load_file(str(out / "model.safetensors"))
    for name in (k[len("hf."):-len(".mask")] for k in masks):
        w = tensors[f"{name}.weight"]
        assert is_nm_sparse(w, 2, 4) and (w == 0).float().mean().item() == pytest.approx(0.5), name
    for dense in ("model.embed_tokens.weight", "lm_head.weight"):
        assert (tensors[dense] == 0).float().mean().item() < 0.01, dense
    assert json.loads((out / "sparsert.json").read_text())["format"] == "sparsert-hf-checkpoint"
    saved_tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert saved_tok.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)

    with pytest.raises(ArtifactError, match=r"is a run of the Hugging Face model .*llama; the artifact format "
                                            r"describes the built-in architectures only; the run's hf/ directory"):
        compress_checkpoint(run, tmp_path / "artifact")


def test_gpt2_conv1d_layers_train_along_k_and_save_back_transposed(hf: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(small(hf, "gpt2", run, steps=4, eval_interval=4, ckpt_interval=4))
    losses = _losses(run)
    assert losses[-1] < losses[0], losses
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(run / "hf"), local_files_only=True).eval()
    layer = reloaded.get_submodule("transformer.h.0.mlp.c_fc")
    assert type(layer).__name__ == "Conv1D" and tuple(layer.weight.shape) == (64, 256)  # [in, out]
    assert is_nm_sparse(layer.weight.t(), 2, 4) and not is_nm_sparse(layer.weight, 2, 4)
    tok = HFTokenizer(hf["gpt2"])
    x = torch.tensor(tok.encode(TEXT)[:24])[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, _trained_model(run)(x), atol=1e-5, rtol=1e-5)


def test_resume_is_exact_and_refuses_a_changed_model_directory(hf: dict[str, Path], tmp_path: Path) -> None:
    model_dir = shutil.copytree(hf["llama"], tmp_path / "llama")
    a, b = tmp_path / "a", tmp_path / "b"
    train(small(hf, "llama", a, hf_model=str(model_dir)))
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_00000006")
    shutil.rmtree(b / "hf")
    write_json_atomic(b / "checkpoints" / "latest.json", {"step": 3, "dir": "step_00000003"})
    cfg = load_train_config(b)
    assert cfg.hf_model == str(model_dir.resolve()) and cfg.resume
    train(cfg)
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert cb.step == 6
    for name, t in ca.model_state.items():
        assert torch.equal(cb.model_state[name], t), name
    assert _losses(a) == _losses(b)
    ha, hb = (load_file(str(run / "hf" / "model.safetensors")) for run in (a, b))
    assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)

    moved = model_dir.rename(tmp_path / "llama-moved")
    with pytest.raises(ConfigError, match=r"cannot resume .*b: the Hugging Face model directory it was started "
                                          r"from \(.*llama\) no longer exists; put it back at that path"):
        train(load_train_config(b))
    moved.rename(model_dir)

    config = json.loads((model_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (model_dir / "config.json").write_text(json.dumps(config))
    write_json_atomic(b / "checkpoints" / "latest.json", {"step": 3, "dir": "step_00000003"})
    with pytest.raises(ConfigError, match=r"llama: config.json differs from the one this run was started with "
                                          r"\(rms_norm_eps: 1e-06 -> 0.001\)"):
        train(load_train_config(b))


def test_seq_len_is_capped_at_max_position_embeddings(hf: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"--seq-len 256 exceeds the model's max_seq_len {MAX_POS}"):
        train(small(hf, "gpt2", tmp_path / "run", seq_len=256))
    assert list(tmp_path.iterdir()) == []
    broken = tmp_path / "no-context"  # a config whose context is 0 had no limit at all
    broken.mkdir()
    config = json.loads((hf["llama"] / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 0}))
    with pytest.raises(ConfigError, match=r"no-context/config.json: max_position_embeddings must be a positive "
                                          r"integer \(the longest sequence the model takes\), got 0"):
        HFModelConfig.from_directory(broken)


def test_slorb_is_refused_before_training(hf: dict[str, Path], tmp_path: Path) -> None:
    """SLoRB's extra weights have no place in a transformers model's directory: refused up front, nothing written
    (it used to fail only when the finished run wrote its hf/)."""
    with pytest.raises(ConfigError, match=r"--slorb adds SLoRB weights .* it trains the built-in models only"):
        train(small(hf, "llama", tmp_path / "run", method="ast", distill_beta=0.0, slorb=True))
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_directory_that_is_not_a_causal_lm(hf: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    from sparsert.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", str(hf["bert"]), "--data", str(hf["corpus"]), "--steps", "2", "--no-progress"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {hf['bert'].resolve()}: not a causal language model (model_type 'bert' is an encoder; expected a "
        "decoder-only causal LM such as Llama, Mistral, Qwen2 or GPT-2)"]
    for args, message in (
        (["--preset", "small"], "error: --preset chooses a built-in model; with --model the model comes from the "
                                "Hugging Face directory"),
        (["--arch", "gpt2"], f"error: --model {hf['llama']}: --arch chooses the model too; the architecture and "
                             "weights come from the Hugging Face directory"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--model", str(hf["llama"]), *args, "--no-progress"])
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [message]
    assert list(tmp_path.iterdir()) == []


def test_default_run_directory_and_fsdp_units(hf: dict[str, Path]) -> None:
    from sparsert.train.hf_train import run_prefix

    cfg = TrainConfig(hf_model=str(hf["gpt2"]))
    assert run_prefix(cfg) == "hf-gpt2" and run_prefix(TrainConfig()) == "tiny"
    model = build_hf_model(HFModelConfig.from_directory(hf["gpt2"]))
    assert decoder_blocks(model) == list(model.hf.transformer.h)  # FSDP2 shards one unit per decoder block
    assert model.sparse_linear_names()[:2] == ["hf.transformer.h.0.attn.c_attn", "hf.transformer.h.0.attn.c_proj"]


def test_a_dense_hf_run_is_an_ast_teacher_for_a_student_with_its_tokenizer(hf: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    teacher_run = tmp_path / "teacher"
    train(small(hf, "llama", teacher_run, dense=True, steps=2, eval_interval=2, ckpt_interval=2))
    ckpt = load_checkpoint(teacher_run)
    assert ckpt.state["tokenizer"]["type"] == "hf" and ckpt.state["sparsity"] is None
    teacher = load_teacher(teacher_run, 320, HFTokenizer(hf["llama"]))
    trained = build_hf_model(ckpt.model_config)
    trained.load_state_dict(ckpt.model_state)
    x = torch.tensor(HFTokenizer(hf["llama"]).encode(TEXT)[:16])[None]
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), trained.eval()(x))  # the run's trained weights, not the directory's

    student = tmp_path / "student"
    train(small(hf, "llama", student, method="ast", teacher=str(teacher_run), steps=2, eval_interval=2,
                ckpt_interval=2))
    kls = [r["kl"] for r in read_metrics(student) if "kl" in r]
    assert len(kls) == 2 and all(kl > 0 for kl in kls)

    # A student with another tokenizer: refused before anything is written, naming both tokenizers.
    step_dir = ckpt.path
    message = (rf"--teacher {step_dir}: its tokenizer, 'hf' tokenizer of {hf['llama'].resolve()} \(300 tokens\), "
               r"differs from the student's, 'byte' tokenizer \(256 tokens\) \(its tokenizer is of type "
               r"'hf', the student's 'byte'\)")
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig(data=str(hf["corpus"]), out_dir=str(tmp_path / "byte"), method="ast",
                          teacher=str(teacher_run), steps=2, batch_size=4, seq_len=32, threads=1, progress=False))
    assert not (tmp_path / "byte").exists()


def test_ffn_only_run_saves_its_dense_trained_attention_as_trained(hf: dict[str, Path], tmp_path: Path) -> None:
    """--sparse-layers ffn: the attention linears train dense, so hf/ holds them as trained (no 2:4 zeros) and
    sparsert.json records them as dense, as the artifact of a built-in model keeps them; the FFN linears are 2:4."""
    run = tmp_path / "run"
    train(small(hf, "llama", run, sparse_layers="ffn"))
    layers = json.loads((run / "hf" / "sparsert.json").read_text())["sparse_layers"]
    tensors = load_file(str(run / "hf" / "model.safetensors"))
    ckpt = load_checkpoint(run)
    assert sum(".mlp." in n for n in layers) == 6 and sum(".self_attn." in n for n in layers) == 8
    for name, info in layers.items():
        w = tensors[f"{name}.weight"]
        if ".mlp." in name:
            assert not info["dense"] and is_nm_sparse(w, 2, 4), name
        else:
            assert info["dense"] and (w == 0).float().mean().item() < 0.01, name
            torch.testing.assert_close(w, ckpt.model_state[f"hf.{name}.weight"])
    if importlib.util.find_spec("onnxscript") is not None:  # the ONNX export keeps the dense layers dense
        from sparsert.export.hf_export import export_hf_model

        result, notes = export_hf_model(run / "hf", tmp_path / "model.onnx")
        assert not notes and result.parity.passed and set(result.layers) == set(layers)
        for name, info in result.layers.items():
            assert info["pattern"] == (None if ".self_attn." in name else "2:4"), name
        assert "6 2:4 float32 (zeros stored in the MatMul weight); 8 dense float32" in result.summary()


def test_fused_moe_experts_train_2_4(hf: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """A Qwen2-MoE whose experts are 3-D parameters (transformers 5) trains every expert 2:4 (unfused into
    per-expert linears, Hu et al. recipe with INT4 QAT) and saves them back fused, also when rebuilt from its
    checkpoint:
    transformers loads hf/ and every expert matrix is 2:4; the run prints no "stay dense" note."""
    model = tiny_qwen2_moe()
    src = tmp_path / "moe"
    model.save_pretrained(str(src))
    shutil.copy(hf["llama"] / "tokenizer.json", src)
    shutil.copy(hf["llama"] / "tokenizer_config.json", src)
    run = tmp_path / "run"
    cfg = small({**hf, "moe": src}, "moe", run, steps=2, eval_interval=2, ckpt_interval=2, method="hu",
                qat=True, group_size=32)
    train(cfg)
    assert "stay dense" not in capsys.readouterr().err
    state = load_checkpoint(run).model_state
    assert "hf.model.layers.0.mlp.experts.3.down_proj.mask" in state
    again = save_hf_run(run, tmp_path / "again")  # the model rebuilt from the checkpoint: same keys, same weights
    saved, rebuilt = load_file(run / "hf" / "model.safetensors"), load_file(again / "model.safetensors")
    assert saved.keys() == rebuilt.keys() and all(torch.equal(saved[k], rebuilt[k]) for k in saved)
    layers = json.loads((run / "hf" / "sparsert.json").read_text())["sparse_layers"]
    assert {f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(4)} <= set(layers)
    assert "model.layers.0.mlp.shared_expert_gate" not in layers
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(run / "hf")).eval()
    experts = loaded.model.layers[0].mlp.experts
    assert all(is_nm_sparse(w, 2, 4) for fused in (experts.gate_up_proj, experts.down_proj) for w in fused.detach())


def _moe_dir(hf: dict[str, Path], tmp_path: Path, **config) -> Path:
    """A tiny Qwen2-MoE directory (tests/conftest.py) with the llama tokenizer and ``config`` set on its config."""
    model = tiny_qwen2_moe()
    for key, value in config.items():
        setattr(model.config, key, value)
    src = tmp_path / "moe"
    model.save_pretrained(str(src))
    shutil.copy(hf["llama"] / "tokenizer.json", src)
    shutil.copy(hf["llama"] / "tokenizer_config.json", src)
    return src


def test_router_load_balancing_loss_is_in_the_objective(hf: dict[str, Path], tmp_path: Path) -> None:
    """--router-aux-loss COEF: the step's gradient is that of CE + COEF·aux (transformers' aux_loss of the same
    batch), the unweighted aux is logged, and an eval-mode forward computes none."""
    src = _moe_dir(hf, tmp_path)
    mc = HFModelConfig.from_directory(src)
    model = build_hf_model(mc, 0.5)
    assert model.router_aux_coef == 0.5
    sparsify_model(model, SparsityConfig(), model.sparse_linear_names())
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))

    out = reference.hf(input_ids=x, use_cache=False, output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
    (ce + 0.5 * out.aux_loss).backward()
    router = "hf.model.layers.0.mlp.gate.weight"
    expected = dict(reference.named_parameters())[router].grad
    assert expected.abs().sum() > 0

    params = dict(model.named_parameters())
    before = params[router].detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    result = train_step(model, optimizer, x, y, step=1, lr=1.0, grad_clip=1e9, sparse=False)
    assert result.router_aux_loss == pytest.approx(out.aux_loss.item(), rel=1e-5)
    assert result.loss == pytest.approx(ce.item(), rel=1e-5)  # the logged loss stays the cross-entropy
    torch.testing.assert_close(before - params[router].detach(), expected, rtol=1e-4, atol=1e-7)
    assert model.router_aux_loss is None  # taken by the step

    model.eval()
    model(x)
    assert model.router_aux_loss is None

    # distilling: loss_total (logged and plotted) is the whole objective, the weighted router term included
    model.train()
    teacher = Teacher(copy.deepcopy(reference.hf).eval(), mc.vocab_size)
    result = train_step(model, optimizer, x, y, step=2, lr=0.0, grad_clip=1e9, sparse=False,
                        distill=Distill(teacher))
    with torch.no_grad():
        parts = distillation_loss(model(x), teacher(x), y, 0.33, 0.67, 2.0)
    assert result.loss_total == pytest.approx(parts.total.item() + 0.5 * result.router_aux_loss, rel=1e-5)


def test_router_aux_loss_follows_the_model_config_and_is_logged(hf: dict[str, Path], tmp_path: Path) -> None:
    """No flag: the config's output_router_logits / router_aux_loss_coef decide, as in transformers' own loss;
    --router-aux-loss 0 turns it off; a model without routers refuses a positive weight, a preset any."""
    src = _moe_dir(hf, tmp_path, output_router_logits=True, router_aux_loss_coef=0.02)
    mc = HFModelConfig.from_directory(src)
    assert build_hf_model(mc).router_aux_coef == 0.02
    assert build_hf_model(mc, 0.0).router_aux_coef == 0.0
    run = tmp_path / "run"
    train(small({**hf, "moe": src}, "moe", run, steps=2, eval_interval=2, ckpt_interval=2))
    aux = [r["router_aux_loss"] for r in read_metrics(run) if "loss" in r]
    assert len(aux) == 2 and all(a > 0 for a in aux)
    assert build_hf_model(HFModelConfig.from_directory(hf["llama"])).router_aux_coef == 0.0

    for coef in (0.1, 0.0):  # 0 would turn off a loss the model does not have: refused as well
        with pytest.raises(ConfigError, match=rf"--router-aux-loss {coef:g}: --model .*llama \(LlamaForCausalLM\) "
                                              r"computes no router load-balancing loss"):
            build_hf_model(HFModelConfig.from_directory(hf["llama"]), coef)
    with pytest.raises(ConfigError, match="--router-aux-loss weights .* it needs --model"):
        TrainConfig(router_aux_loss=0.1)
    with pytest.raises(ConfigError, match=r"--router-aux-loss: expected a number >= 0, got -1"):
        small(hf, "llama", tmp_path / "bad", router_aux_loss=-1.0)
    with pytest.raises(ConfigError, match=r"--router-aux-loss: expected a number >= 0, got -1"):
        TrainConfig(init_from=str(tmp_path / "run"), router_aux_loss=-1.0)  # checked before the init run is read


def test_keep_dense_matches_transformers_layer_names(hf: dict[str, Path], tmp_path: Path) -> None:
    """--keep-dense takes the names transformers and sparsert.json use (no ``hf.`` prefix): the matching layers
    train dense and are recorded dense, the rest are 2:4 in hf/."""
    run = tmp_path / "run"
    train(small(hf, "llama", run, steps=2, eval_interval=2, ckpt_interval=2, keep_dense=("model.layers.0.*",)))
    layers = json.loads((run / "hf" / "sparsert.json").read_text())["sparse_layers"]
    assert len(layers) == 14
    assert all(info["dense"] == name.startswith("model.layers.0.") for name, info in layers.items())
    tensors = load_file(str(run / "hf" / "model.safetensors"))
    assert all(is_nm_sparse(tensors[f"{name}.weight"], 2, 4) != info["dense"] for name, info in layers.items())


def test_keep_dense_exempts_a_layer_whose_k_is_not_a_multiple_of_m(hf: dict[str, Path], tmp_path: Path) -> None:
    """A layer that cannot be 2:4 (K = 130) trains with --keep-dense as a plain linear and is saved as trained, as
    compress --keep-dense handles it; without the flag the refusal names it by its transformers name and says
    which --keep-dense would exempt it."""
    import transformers

    src = tmp_path / "oddk"
    config = transformers.AutoConfig.from_pretrained(str(hf["llama"]))
    config.intermediate_size, config.num_hidden_layers = 130, 1
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(src))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf["llama"] / name, src)
    dirs = {**hf, "oddk": src}
    with pytest.raises(ConfigError, match=r"^--sparsity 2:4: layer model\.layers\.0\.mlp\.down_proj has K=130 .* "
                                          r"--keep-dense '\*\.down_proj' trains it dense$"):
        train(small(dirs, "oddk", tmp_path / "refused", steps=2, eval_interval=2, ckpt_interval=2))
    assert not (tmp_path / "refused").exists()
    run = tmp_path / "run"
    train(small(dirs, "oddk", run, steps=2, eval_interval=2, ckpt_interval=2, keep_dense=("*.down_proj",)))
    layers = json.loads((run / "hf" / "sparsert.json").read_text())["sparse_layers"]
    assert len(layers) == 6 and not any(name.endswith("down_proj") for name in layers)
    trained = load_checkpoint(run).model_state["hf.model.layers.0.mlp.down_proj.weight"]
    saved = load_file(str(run / "hf" / "model.safetensors"))
    assert torch.equal(saved["model.layers.0.mlp.down_proj.weight"], trained)  # dense, as trained
    assert all(is_nm_sparse(saved[f"{name}.weight"], 2, 4) for name in layers)


def test_an_init_from_hf_run_takes_transformers_names_and_the_router_flag(hf: dict[str, Path], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """A run started --init-from a --model run trains the same Hugging Face model: --keep-dense matches
    transformers' names there too, and --router-aux-loss applies (0 turns the config's loss off); resuming a
    --model run with --router-aux-loss finds the run. A built-in --init-from run refuses the flag in one line."""
    from test_generate_cli import run_main

    src = _moe_dir(hf, tmp_path, output_router_logits=True, router_aux_loss_coef=0.02)
    first = tmp_path / "dense"
    train(small({**hf, "moe": src}, "moe", first, dense=True, steps=1, eval_interval=1, ckpt_interval=1))
    second = tmp_path / "second"
    cfg = TrainConfig(init_from=str(first), data=str(hf["corpus"]), out_dir=str(second), steps=2, batch_size=2,
                      seq_len=16, eval_interval=2, eval_batches=1, ckpt_interval=2, threads=1, progress=False,
                      keep_dense=("model.layers.0.self_attn.*",), router_aux_loss=0.0)
    train(cfg)
    records = [r for r in read_metrics(second) if "loss" in r]
    assert records and not any("router_aux_loss" in r for r in records)  # turned off
    state = load_checkpoint(second).state
    assert not any(".self_attn." in n for n in state["sparsity"]["layers"])
    assert "hf.model.layers.0.mlp.experts.0.down_proj" in state["sparsity"]["layers"]

    code, _, err = run_main(capsys, "train", "--resume", "--out", str(first), "--router-aux-loss", "0.5",
                            "--steps", "2", "--no-progress")
    assert code == 2 and "router_aux_loss: None -> 0.5" in err  # the run was found; the change is refused by name

    builtin = tmp_path / "builtin"
    train(TrainConfig(dense=True, data=str(hf["corpus"]), out_dir=str(builtin), steps=1, batch_size=2, seq_len=16,
                      eval_interval=1, eval_batches=1, ckpt_interval=1, threads=1, progress=False))
    code, _, err = run_main(capsys, "train", "--init-from", str(builtin), "--router-aux-loss", "0.1", "--out",
                            str(tmp_path / "refused"), "--steps", "1", "--no-progress")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --router-aux-loss weights the router "
                                                                 "load-balancing loss")
    assert not (tmp_path / "refused").exists()
