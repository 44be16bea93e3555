"""Issue-3 training methods in the trainer: the Hu et al. recipe, AST, schedules, QAT with every method, resume."""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil

import pytest
import torch

import sparsert.train.trainer as trainer_mod
from sparsert.runtime.artifact import load_artifact
from sparsert.runtime.errors import ArtifactError, ConfigError
from sparsert.runtime.model import DecoderLM, ModelConfig, model_config_from_preset, sparse_linear_names
from sparsert.runtime.nm_mask import is_nm_sparse, nm_mask
from sparsert.runtime.transposable_mask import is_transposable_24
from sparsert.train.ast_distill import Teacher
from sparsert.train.checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from sparsert.train.masked_decay import DEFAULT_MASKED_DECAY
from sparsert.train.metrics import TIMING_KEYS, read_metrics
from sparsert.train.run_dir import load_train_config
from sparsert.train.sparsify import sparse_modules
from sparsert.train.train_config import TrainConfig
from sparsert.train.trainer import (
    Distill,
    TrainingDivergedError,
    build_mask_controller,
    build_model,
    build_optimizer,
    load_teacher,
    train,
    train_step,
)

torch.set_num_threads(1)

FFN = [n for n in sparse_linear_names(model_config_from_preset("tiny")) if ".mlp." in n]


@pytest.fixture(scope="module")
def dense_run(corpus, tmp_path_factory):
    """A short dense pre-training: the init and the teacher of the AST tests."""
    out = tmp_path_factory.mktemp("dense") / "run"
    train(small(corpus, out, dense=True, steps=4))
    return out


def small(corpus, out, **kw) -> TrainConfig:
    base = dict(data=str(corpus), out_dir=str(out), steps=8, batch_size=2, seq_len=32, eval_interval=4,
                eval_batches=2, ckpt_interval=4, threads=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def steps_of(run) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


# ------------------------------------------------------------------------------------------------ config

def test_methods_fill_in_their_paper_defaults():
    hu = TrainConfig(method="hu")
    assert (hu.transposable, hu.mvue, hu.masked_decay, hu.decay, hu.mask_refresh_interval, hu.dense_finetune,
            hu.sparse_layers) == (True, True, DEFAULT_MASKED_DECAY, 0.0, 40, pytest.approx(1 / 6), "ffn")
    assert hu.variant == "sparse24-hu"
    srste = TrainConfig()
    assert (srste.decay, srste.masked_decay, srste.mask_refresh_interval, srste.transposable) == (2e-4, 0.0, 1, False)
    assert TrainConfig(masked_decay=1e-4).decay == 0.0  # SR-STE's own decay is off under masked decay
    ast = TrainConfig(method="ast", teacher="t", steps=400)
    assert (ast.decay, ast.masked_decay, ast.mask_refresh_interval, ast.decay_warmup, ast.distill_alpha,
            ast.distill_beta, ast.distill_temperature) == (0.0, 0.0, 1, 100, 0.33, 0.67, 2.0)
    assert TrainConfig(method="ast", init_from="ckpt").teacher == "ckpt"  # the dense init is the teacher
    hu_qat = TrainConfig(method="hu", qat=True)  # QAT trains what the 2:4 INT4 artifact stores
    assert (hu_qat.dense_finetune, hu_qat.sparse_layers, hu_qat.transposable, hu_qat.mvue) == (0.0, "all", True, True)
    assert TrainConfig(schedule="spdf").dense_finetune == pytest.approx(1 / 6)
    gradual = TrainConfig(schedule="gradual", steps=1200)
    assert gradual.prune_interval == 60  # a tenth of the 600-step window (at most 100)
    assert TrainConfig.from_dict(hu.to_dict()) == hu  # resolved values survive the checkpoint round trip


@pytest.mark.parametrize(("kw", "message"), [
    (dict(method="hu", qat=True, dense_finetune=0.2), r"dense fine-tuning .* cannot be combined with --qat"),
    (dict(qat=True, sparse_layers="ffn"), r"use --sparse-layers all and no --keep-dense with --qat"),
    (dict(qat=True, keep_dense=["blocks.0.*"]), r"use --sparse-layers all and no --keep-dense with --qat"),
    (dict(slorb=True, keep_dense=("blocks.0.*",)), r"--slorb .* --sparse-layers all and no --keep-dense"),
    (dict(dense=True, keep_dense=("blocks.0.*",)), r"'keep_dense' applies to sparse training"),
    (dict(keep_dense=("",)), r"'keep_dense': expected a list of layer name patterns"),
    (dict(method="ast"), r"--method ast distils from a dense teacher: give --teacher PATH"),
    (dict(method="ast", teacher="t", masked_decay=1e-4), r"AST decays with the annealed --decay-max"),
    (dict(decay=2e-4, masked_decay=6e-5), r"both decay the pruned weights; set one of them to 0"),
    (dict(dense=True, method="hu"), r"train config 'method' applies to sparse training"),
    (dict(dense=True, schedule="gradual"), r"'schedule' applies to sparse training"),
    (dict(transposable=True, n=1, m=4), r"--transposable masks are 2:4 only, got --sparsity 1:4"),
    (dict(method="fancy"), r"'method': expected one of sr-ste, hu, ast, got 'fancy'"),
    (dict(schedule="gradual", prune_start=0.8, prune_end=0.5),
     r"^train config 'prune_start' 0.8 must be before train config 'prune_end' 0.5 \(the fractions of the steps"),
    (dict(schedule="gradual", dense_finetune=0.5), r"^train config 'prune_end' 0.75: pruning must end by the start of "
                                                   r"dense fine-tuning, at 0.5 of the steps \(train config "
                                                   r"'dense_finetune' 0.5\)"),
    (dict(schedule="spdf", dense_finetune=0.0), r"--schedule spdf is sparse training followed by dense fine-tuning; "
                                                r"train config 'dense_finetune' 0 leaves none"),
    (dict(out_dir=""), r"^train config 'out_dir': expected a run directory path, got ''$"),
    (dict(dense_finetune=1.0), r"'dense_finetune': expected a fraction below 1"),
    (dict(distill_temperature=0.0), r"'distill_temperature': expected a number > 0"),
    (dict(prune_interval=0), r"'prune_interval': expected a positive integer, got 0"),
    (dict(sparse_layers="attn"), r"'sparse_layers': expected 'all' or 'ffn'"),
    (dict(qat="no"), r"'qat': expected true or false, got 'no'"),  # a truthy string must not switch QAT on
    (dict(dense="false"), r"'dense': expected true or false"),
    (dict(resume=1), r"'resume': expected true or false"),
    (dict(data=5), r"'data': expected a path"),
    (dict(data=""), r"'data': expected a path"),
])
def test_bad_method_configs_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)


def test_keep_dense_layers_train_dense_and_stay_dense_in_the_artifact(corpus, tmp_path):
    """--keep-dense 'blocks.0.*' '*.down_proj': those layers train dense (no mask refresh, full sparsity share) and
    the artifact stores them dense; the rest train and pack 2:4. The saved config resumes as given."""
    run = tmp_path / "run"
    cfg = small(corpus, run, steps=4, eval_interval=4, ckpt_interval=4, mask_refresh_interval=2,
                keep_dense=("blocks.0.*", "*.down_proj"))
    result = train(cfg)
    names = sparse_linear_names(model_config_from_preset("tiny"))
    sparse = [n for n in names if not n.startswith("blocks.0.") and not n.endswith(".down_proj")]
    art = load_artifact(result.artifact)
    assert sorted(art.packed) == sorted(sparse) and all(f"{n}.weight" in art.dense for n in set(names) - set(sparse))
    assert all(is_nm_sparse(layer.to_dense()) for layer in art.packed.values())
    refreshes = [r for r in steps_of(run) if "flip_rate_layers" in r]
    assert refreshes and all(sorted(r["flip_rate_layers"]) == sorted(sparse) for r in refreshes)
    assert load_train_config(run).keep_dense == ("*.down_proj", "blocks.0.*")  # sorted: the order does not matter
    with pytest.raises(ConfigError, match=r"--keep-dense 'blocks\.9\.\*': matches none of the 28 layers to make "
                                          r"2:4 \(module names such as 'blocks\.0\.attn\.q_proj'"):
        train(small(corpus, tmp_path / "bad", keep_dense=("blocks.9.*",)))
    assert not (tmp_path / "bad").exists()  # refused before the run directory is made


# ------------------------------------------------------------------------------------------- Hu et al.

def test_hu_recipe_logs_flip_rates_per_layer_switches_to_dense_and_keeps_a_24_artifact(corpus, tmp_path):
    run = tmp_path / "run"
    result = train(small(corpus, run, method="hu", steps=12, mask_refresh_interval=2, eval_interval=12,
                         ckpt_interval=12))
    records = steps_of(run)
    # dense fine-tuning for the last 1/6 = 2 of 12 steps; masked decay only while sparse
    assert [r["phase"] for r in records] == ["sparse"] * 10 + ["dense_finetune"] * 2
    assert all(r["decay"] == DEFAULT_MASKED_DECAY for r in records[:10]) and "decay" not in records[-1]
    assert [r["sparsity"] for r in records[-2:]] == [0.0, 0.0]
    ffn, attn = 3 * 128 * 384, 4 * 128 * 128  # per block of the tiny llama: FFN 2:4, attention dense
    assert records[0]["sparsity"] == pytest.approx(0.5 * ffn / (ffn + attn))
    refreshes = [r for r in records if "flip_rate" in r]
    assert [r["step"] for r in refreshes] == [2, 4, 6, 8]  # none once the next step is dense
    for r in refreshes:
        layers = r["flip_rate_layers"]
        assert sorted(layers) == sorted(FFN)  # FFN linears only
        assert all(0.0 <= v <= 1.0 for v in layers.values())
        assert min(layers.values()) <= r["flip_rate"] <= max(layers.values())  # a weighted mean of them
    assert refreshes[0]["flip_rate"] > refreshes[-1]["flip_rate"]

    ck = load_checkpoint(run)
    assert ck.state["sparsity"]["method"] == "hu" and ck.state["sparsity"]["layers"] == FFN
    assert "mvue_rng" in ck.state
    art = load_artifact(result.artifact)
    for name in sparse_linear_names(ck.model_config):
        mask = ck.model_state[f"{name}.mask"].bool()
        w = ck.model_state[f"{name}.weight"]
        if name not in FFN:  # trained dense: stays dense in the artifact (its checkpoint mask is unused)
            assert torch.equal(mask, nm_mask(w)), name
            assert name not in art.packed and torch.equal(art.dense[f"{name}.weight"], w.half()), name
            continue
        assert is_transposable_24(mask), name  # the last trained (transposable) masks
        assert bool((w[~mask] != 0).any()), name  # dense fine-tuning trained the pruned weights too
        dense = art.packed[name].to_dense()
        assert is_nm_sparse(dense, 2, 4) and not bool((dense[~mask] != 0).any()), name
        assert torch.allclose(dense, (w * mask).half().float()), name
    assert art.sparsity.layers == tuple(FFN)
    evals = [r for r in read_metrics(run) if "val_loss" in r]
    assert evals[-1]["val_loss_sparse"] == pytest.approx(result.final_val_loss_sparse)
    assert result.final_val_loss_sparse != result.final_val_loss


def test_flip_rate_is_the_changed_share_of_the_masks(corpus, tmp_path):
    cfg = small(corpus, tmp_path / "run", method="hu", sparse_layers="all", mask_refresh_interval=1)
    model = build_model(model_config_from_preset("tiny"), cfg)
    masks = build_mask_controller(model, cfg)
    masks.begin(0, fresh=True)
    before = {n: m.mask.clone() for n, m in sparse_modules(model).items()}
    with torch.no_grad():
        for m in sparse_modules(model).values():
            m.weight.add_(torch.randn_like(m.weight) * 0.05)
    update = masks.after_step(1)
    changed = total = 0
    for name, m in sparse_modules(model).items():
        diff = int((m.mask != before[name]).sum())
        assert update.flip_rate_layers[name] == pytest.approx(diff / m.mask.numel())
        assert is_transposable_24(m.mask)
        changed, total = changed + diff, total + m.mask.numel()
    assert update.flip_rate == pytest.approx(changed / total) and update.flip_rate > 0


def test_transposable_flag_alone_gives_transposable_masks_everywhere(corpus, tmp_path):
    train(small(corpus, tmp_path / "run", transposable=True, steps=4, mask_refresh_interval=2, eval_interval=4))
    ck = load_checkpoint(tmp_path / "run")
    masks = [ck.model_state[f"{n}.mask"] for n in sparse_linear_names(ck.model_config)]
    assert all(is_transposable_24(m) for m in masks)
    assert not ck.state["sparsity"]["mvue"] and ck.state["train_config"]["decay"] == 2e-4


def _twin_step(corpus, tmp_path, **kw):
    """Two identical sparse models stepped on the same batch with train_step, the second with ``kw``;
    returns (model_a, model_b, weights before the step)."""
    cfg = small(corpus, tmp_path / "x", mask_refresh_interval=1000, decay=0.0)
    model = build_model(model_config_from_preset("tiny"), cfg)
    twin = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (2, 32), generator=g)
    y = torch.randint(0, 256, (2, 32), generator=g)
    base = dict(step=1, lr=1e-3, grad_clip=0.01, sparse=True)  # clipped: the decay must come after clipping
    train_step(model, build_optimizer(model, cfg), x, y, **base)
    train_step(twin, build_optimizer(twin, cfg), x, y, **base, **kw)
    return model, twin, before


def test_masked_decay_is_added_to_the_gradients_of_the_pruned_weights(corpus, tmp_path):
    a, b, before = _twin_step(corpus, tmp_path, masked_decay=0.5)
    for name, m in sparse_modules(a).items():
        mb = sparse_modules(b)[name]
        expected = 0.5 * (1 - m.mask.float()) * before[f"{name}.weight"]
        assert torch.allclose(mb.weight.grad - m.weight.grad, expected, atol=1e-6), name
    assert torch.equal(a.lm_head.weight.grad, b.lm_head.weight.grad)  # dense layers untouched


def test_mvue_samples_the_weight_gradient_from_the_layer_generator(corpus, tmp_path):
    cfg = small(corpus, tmp_path / "x", mvue=True, mask_refresh_interval=1000)
    model = build_model(model_config_from_preset("tiny"), cfg)
    layer = sparse_modules(model)["blocks.0.mlp.up_proj"]
    x = torch.randn(2, 16, layer.in_features)
    grads = []
    for seed in (0, 0, 1):
        layer.generator = torch.Generator().manual_seed(seed)
        layer.weight.grad = None
        layer(x).square().sum().backward()
        grads.append(layer.weight.grad.clone())
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])
    exact = torch.autograd.grad(torch.nn.functional.linear(x, layer.weight * layer.mask, layer.bias).square().sum(),
                                layer.weight)[0]
    assert not torch.allclose(grads[0], exact)  # sampled
    assert bool((grads[0][layer.mask == 0] != 0).any())  # straight-through: pruned weights get gradients too


# -------------------------------------------------------------------------------------------------- AST

def test_ast_distils_from_the_teacher(corpus, tmp_path, dense_run):
    teacher = load_teacher(dense_run, 256, trainer_mod.ByteTokenizer())
    cfg = small(corpus, tmp_path / "x", method="ast", teacher=str(dense_run))
    model = build_model(model_config_from_preset("tiny"), cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 32), generator=g)
    y = torch.randint(0, 256, (2, 32), generator=g)
    grads, outs = [], []
    for beta in (0.67, 0.0):
        m = copy.deepcopy(model)
        out = train_step(m, build_optimizer(m, cfg), x, y, step=1, lr=1e-3, grad_clip=1e9, sparse=True,
                         distill=Distill(teacher, 0.33, beta, 2.0))
        grads.append(m.lm_head.weight.grad.clone())
        outs.append(out)
    assert not torch.allclose(grads[0], grads[1])  # the KL term changes the gradients
    assert outs[0].loss == pytest.approx(outs[1].loss)  # the logged loss is the cross-entropy
    assert outs[0].loss_total == pytest.approx(0.33 * outs[0].loss + 0.67 * 4 * outs[0].kl, rel=1e-5)
    assert outs[0].kl > 0 and outs[1].loss_total == pytest.approx(0.33 * outs[1].loss, rel=1e-5)


def test_ast_run_from_a_dense_checkpoint(corpus, tmp_path, dense_run):
    run = tmp_path / "run"
    result = train(small(corpus, run, method="ast", init_from=str(dense_run), wanda_score=True,
                         mask_refresh_interval=4, steps=6, decay_warmup=6, eval_interval=6, ckpt_interval=6))
    records = steps_of(run)
    fresh = steps_of(dense_run)[0]["loss"]
    assert records[0]["loss"] < fresh - 0.5  # started from the dense weights, not a random init
    assert [r["step"] for r in records if "flip_rate" in r] == [4]
    assert all(set(r) >= {"loss_total", "kl", "decay"} for r in records)
    assert [r["decay"] for r in records[:3]] == pytest.approx([1e-4 / 6, 2e-4 / 6, 3e-4 / 6])  # λ(t) warm-up
    ck = load_checkpoint(run)
    assert ck.state["train_config"]["teacher"] == str(dense_run.resolve())
    # Wanda's activation statistics of steps 5 and 6 (since the refresh at step 4) are checkpointed
    assert sorted(ck.state["masks"]["wanda_sumsq"]) == sorted(sparse_linear_names(ck.model_config))
    assert result.artifact is not None and result.final_val_loss_sparse is None


def test_ast_with_slorb_trains_and_compresses_the_extra_parameters(corpus, tmp_path, dense_run):
    run = tmp_path / "run"
    result = train(small(corpus, run, method="ast", init_from=str(dense_run), slorb=True, steps=2, eval_interval=2,
                         ckpt_interval=2))
    ck = load_checkpoint(run)
    names = sparse_linear_names(ck.model_config)
    init = load_checkpoint(dense_run).model_state
    for name in names:
        s = ck.model_state[f"{name}.slorb.S"]
        assert s.shape == (init[f"{name}.weight"].shape[0], init[f"{name}.weight"].shape[1] // 16)
    art = load_artifact(result.artifact)
    assert art.slorb is not None and art.slorb.k == 16 and sorted(art.slorb.layers) == sorted(names)
    with pytest.raises(ConfigError, match=r"--slorb .* needs --schedule from-scratch"):
        TrainConfig(slorb=True, schedule="spdf")


def _checkpoint_with_vocab(path, vocab_size: int):
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64)
    model = DecoderLM(cfg)
    save_checkpoint(path, 1, model, torch.optim.AdamW(model.parameters()), {"model_config": cfg.to_dict(),
                                                                            "sparsity": None})


def test_teacher_with_another_vocabulary_is_refused_before_anything_is_written(corpus, tmp_path):
    _checkpoint_with_vocab(tmp_path / "teacher", 300)
    with pytest.raises(ConfigError, match=rf"^--teacher {tmp_path / 'teacher'}: teacher vocabulary has 300 tokens "
                                          r"but the student's has 256"):
        load_teacher(tmp_path / "teacher", 256, trainer_mod.ByteTokenizer())
    with pytest.raises(ConfigError, match=r"vocabulary has 300 tokens"):
        train(small(corpus, tmp_path / "run", method="ast", teacher=str(tmp_path / "teacher")))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ArtifactError, match=r"does not exist"):
        train(small(corpus, tmp_path / "run", method="ast", teacher=str(tmp_path / "missing")))


def test_a_sparse_teacher_or_a_foreign_tokenizer_is_refused(corpus, tmp_path, dense_run):
    train(small(corpus, tmp_path / "sparse", steps=2, eval_interval=2, ckpt_interval=2))
    with pytest.raises(ConfigError, match=r"a sparse checkpoint; the distillation teacher must be dense"):
        load_teacher(tmp_path / "sparse", 256, trainer_mod.ByteTokenizer())

    class OtherTokenizer:
        vocab_size = 256

        def encode(self, text: str) -> list[int]:
            return [b ^ 1 for b in text.encode()]

    with pytest.raises(ConfigError, match=r"its tokenizer, 'byte' tokenizer \(256 tokens\), differs from the "
                                          r"student's, OtherTokenizer \(256 tokens\) \(its tokenizer is of "
                                          r"type 'byte', the student's 'OtherTokenizer'\)"):
        load_teacher(dense_run, 256, OtherTokenizer())
    assert isinstance(load_teacher(dense_run, 256, trainer_mod.ByteTokenizer()), Teacher)


# ------------------------------------------------------------------------------------------- schedules

def test_gradual_schedule_prunes_between_the_fractions_and_ends_exactly_24(corpus, tmp_path):
    run = tmp_path / "run"
    train(small(corpus, run, schedule="gradual", steps=16, prune_interval=2, eval_interval=16, ckpt_interval=16))
    records = steps_of(run)
    phases = [r["phase"] for r in records]
    assert phases == ["dense"] * 4 + ["pruning"] * 8 + ["sparse"] * 4  # windows [0.25, 0.75) of 16 steps
    sparsity = [r["sparsity"] for r in records]
    assert sparsity[:4] == [0.0] * 4
    assert all(a <= b for a, b in zip(sparsity, sparsity[1:], strict=False))
    # events at steps 5, 7, 9, 11, each keeping a constant share: (1/2)^(e/4) kept after event e
    assert sparsity[4] == pytest.approx(1 - 0.5 ** 0.25, abs=1e-3)
    assert sparsity[6] == pytest.approx(1 - 0.5 ** 0.5, abs=1e-3)
    assert sparsity[10:] == [0.5] * 6  # exactly 2:4 from the last event on, before prune-end
    ck = load_checkpoint(run)
    for name in sparse_linear_names(ck.model_config):
        assert is_nm_sparse(ck.model_state[f"{name}.mask"], 2, 4)


def test_spdf_switches_every_layer_to_dense_and_compresses_with_the_last_masks(corpus, tmp_path):
    run = tmp_path / "run"
    result = train(small(corpus, run, schedule="spdf", steps=12, mask_refresh_interval=2, eval_interval=12,
                         ckpt_interval=12))
    records = steps_of(run)
    assert [r["phase"] for r in records] == ["sparse"] * 10 + ["dense_finetune"] * 2
    assert [r["sparsity"] for r in records] == [0.5] * 10 + [0.0] * 2
    ck = load_checkpoint(run)
    art = load_artifact(result.artifact)
    for name in sparse_linear_names(ck.model_config):
        mask = ck.model_state[f"{name}.mask"].bool()
        assert is_nm_sparse(art.packed[name].to_dense(), 2, 4)
        assert not bool((art.packed[name].to_dense()[~mask] != 0).any())
    assert result.final_val_loss_sparse is not None


def test_init_from_needs_a_readable_checkpoint(corpus, tmp_path):
    with pytest.raises(ArtifactError, match=r"checkpoint path does not exist"):
        train(small(corpus, tmp_path / "run", init_from=str(tmp_path / "nope")))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------- QAT and resume

@pytest.mark.parametrize("kw", [dict(method="hu"), dict(method="ast", teacher="DENSE"),
                                dict(schedule="gradual", prune_interval=1)])
def test_qat_with_every_method_trains_the_artifact_codes(corpus, tmp_path, dense_run, kw):
    kw = {k: (str(dense_run) if v == "DENSE" else v) for k, v in kw.items()}
    cfg = small(corpus, tmp_path / "run", qat=True, steps=4, mask_refresh_interval=2, eval_interval=4,
                ckpt_interval=4, **kw)
    train(cfg)
    ck = load_checkpoint(tmp_path / "run")
    model = build_model(ck.model_config, cfg)
    model.load_state_dict(ck.model_state)
    art = load_artifact(tmp_path / "run" / "artifact")
    assert art.quantization is not None
    for name, packed in art.packed.items():
        assert torch.equal(packed.to_dense(), model.get_submodule(name).effective_weight()), name


@pytest.mark.parametrize("kw", [
    dict(method="hu", mask_refresh_interval=2),  # MVUE RNG, transposable masks, masked decay, dense fine-tuning
    dict(method="hu", mask_refresh_interval=2, sparse_gemm="ours"),  # MVUE24 seeds from the checkpointed RNG
    dict(method="ast", teacher="DENSE", wanda_score=True, mask_refresh_interval=4),  # Wanda statistics
    dict(schedule="gradual", prune_interval=2),  # the checkpoint at step 6 falls in the pruning window
])
def test_resume_equals_a_straight_run(corpus, tmp_path, dense_run, kw):
    kw = {k: (str(dense_run) if v == "DENSE" else v) for k, v in kw.items()}
    a, b = tmp_path / "a", tmp_path / "b"
    train(small(corpus, a, steps=12, ckpt_interval=6, eval_interval=6, keep_checkpoints=2, **kw))
    shutil.copytree(a, b)  # b = a stopped after its checkpoint at step 6
    shutil.rmtree(b / "checkpoints" / "step_00000012")
    shutil.rmtree(b / "artifact")
    write_json_atomic(b / "checkpoints" / "latest.json", {"step": 6, "dir": "step_00000006"})
    cfg = load_train_config(b)
    train(cfg)
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for name, t in ca.model_state.items():
        assert torch.equal(cb.model_state[name], t), name
    for i, entry in ca.optimizer_state["state"].items():
        for key, value in entry.items():
            assert torch.equal(cb.optimizer_state["state"][i][key], value), (i, key)
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))


def test_resume_refuses_a_changed_method_option(corpus, tmp_path):
    train(small(corpus, tmp_path / "run", method="hu", steps=2, eval_interval=2, ckpt_interval=2))
    cfg = dataclasses.replace(load_train_config(tmp_path / "run"), mvue=False)
    with pytest.raises(ConfigError, match=r"the config differs from its checkpoint's \(mvue: True -> False\)"):
        train(cfg)


def test_non_finite_loss_still_stops_the_hu_recipe(corpus, tmp_path):
    cfg = small(corpus, tmp_path / "run", method="hu", lr=1e30, warmup_steps=0, ckpt_interval=1, grad_clip=1e30)
    with pytest.raises(TrainingDivergedError, match=r"became (nan|inf) at step \d+; training stopped"):
        train(cfg)
    ck = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in ck.model_state.values() if t.is_floating_point())
    assert not math.isnan(steps_of(tmp_path / "run")[-1]["loss"])


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_help_lists_the_method_flags_with_their_defaults():
    from click.testing import CliRunner

    from sparsert.commands.train import command

    text = " ".join(CliRunner().invoke(command, ["--help"], terminal_width=200).output.split())
    for flag in ("--method [sr-ste|hu|ast]", "--transposable / --no-transposable", "--mvue / --no-mvue",
                 "--masked-decay ALPHA", "--dense-finetune FRACTION", "--sparse-layers [all|ffn]",
                 "--schedule [from-scratch|gradual|spdf]", "--prune-start FRACTION", "--prune-end FRACTION",
                 "--init-from CHECKPOINT", "--teacher PATH", "--distill-alpha", "--distill-beta",
                 "--distill-temperature", "--decay-max", "--decay-warmup STEPS", "--wanda-score", "--slorb",
                 "--slorb-k"):
        assert flag in text, flag
    for default in ("[default: sr-ste]", "[default: (sr-ste: 1, hu: 40, ast: 1)]",
                    "[default: (sr-ste: off, hu: on, ast: off)]", "[default: (sr-ste: 0, hu: 6e-05, ast: 0)]",
                    "hu: 1/6", "[default: (sr-ste: all, hu: ffn, ast: all; all with --qat)]",
                    "[default: from-scratch]", "[default: 0.25]", "[default: 0.75]", "[default: 0.33]",
                    "[default: 0.67]", "[default: 2.0]", "[default: 0.0001]"):
        assert default in text, default


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "hu", "--qat", "--dense-finetune", "0.2"],
     "error: --qat trains the INT4 values of the 2:4 artifact; dense fine-tuning (--dense-finetune) would train "
     "other values, so it cannot be combined with --qat"),
    (["--dense", "--method", "hu"], "error: --method applies to sparse training; it cannot be combined with --dense"),
    (["--method", "ast"], "error: --method ast distils from a dense teacher: give --teacher PATH (a dense sparsert "
                          "run or checkpoint, or a Hugging Face model directory) or --init-from (then used as the "
                          "teacher), or --distill-beta 0"),
    (["--schedule", "gradual", "--prune-end", "1.5"],
     "error: --prune-end: expected a fraction in [0, 1], got 1.5"),
])
def test_cli_method_errors_are_one_line(args, message, tmp_path, monkeypatch, capsys):
    from sparsert.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]


def test_cli_runs_the_hu_recipe_and_resumes_it(corpus, tmp_path, monkeypatch):
    from sparsert.cli import main

    monkeypatch.chdir(tmp_path)
    tiny = ["--data", str(corpus), "--batch-size", "2", "--seq-len", "32", "--eval-batches", "2", "--threads", "1",
            "--no-progress", "--out", "run", "--ckpt-interval", "2", "--eval-interval", "2"]
    main(["train", "--method", "hu", "--sparse-layers", "all", "--steps", "2", "--mask-refresh", "1", *tiny])
    ck = load_checkpoint(tmp_path / "run")
    cfg = ck.state["train_config"]
    assert (cfg["method"], cfg["transposable"], cfg["mvue"], cfg["mask_refresh_interval"], cfg["sparse_layers"]) == \
        ("hu", True, True, 1, "all")
    assert all(is_transposable_24(ck.model_state[f"{n}.mask"]) for n in sparse_linear_names(ck.model_config))
    # the saved config is used (only the flags given override it): resuming the finished run changes nothing
    main(["train", "--resume", "--out", "run", "--threads", "1", "--no-progress"])
    assert load_checkpoint(tmp_path / "run").step == 2
