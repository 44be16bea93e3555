"""``sparsert train --method hu --sparse-gemm ours|cusparselt``: the Hu et al. recipe trained on its three 2:4
sparse GEMMs (train/sparse24_training_linear.py) under bf16 autocast, instead of matmuls on W ⊙ mask.

On CPU ``ours`` runs the GEMMs' torch fallback (the same function from the same compressed operands), so the
whole path — layer, autograd, trainer, checkpoint, artifact — runs here; cuSPARSELt needs a CUDA GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import sparsert.train.sparse24_training_linear as stl
from sparsert.runtime.errors import ConfigError
from sparsert.runtime.model import ModelConfig, model_config_from_preset
from sparsert.train.metrics import read_metrics
from sparsert.train.sparse_linear import SparseLinear, SparsityConfig
from sparsert.train.sparsify import sparse_modules
from sparsert.train.train_config import TrainConfig, config_differences
from sparsert.train.trainer import build_model, train, use_sparse_gemms

gpu = pytest.mark.gpu


def small(corpus, out, **kw) -> TrainConfig:
    base = dict(data=str(corpus), out_dir=str(out), method="hu", steps=6, batch_size=2, seq_len=64, eval_interval=6,
                eval_batches=2, ckpt_interval=6, threads=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kw,message", [
    (dict(sparse_gemm="cublas"), "'sparse_gemm': expected one of masked, ours, cusparselt, got 'cublas'"),
    (dict(method="sr-ste", sparse_gemm="ours"), "--sparse-gemm ours runs the three 2:4 GEMMs of the Hu et al. recipe"),
    (dict(method="hu", mvue=False, sparse_gemm="ours"), "needs --method hu with its transposable masks and MVUE24"),
    (dict(method="hu", qat=True, sparse_gemm="cusparselt"), "--sparse-gemm cusparselt multiplies the 2:4 values"),
    (dict(method="hu", schedule="gradual", sparse_gemm="ours"), "--schedule gradual prunes through denser masks"),
    (dict(method="hu", distributed="fsdp", sparse_gemm="ours"), "not supported with --distributed fsdp"),
    (dict(dense=True, sparse_gemm="ours"), "'sparse_gemm' applies to sparse training"),
])
def test_combinations_the_sparse_gemms_cannot_train_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)


def test_sparse_gemm_may_change_on_resume():
    saved = TrainConfig(method="hu")
    assert config_differences(saved, dataclasses.replace(saved, sparse_gemm="ours")) == []


def test_layers_the_gemms_cannot_take_are_named():
    mc = ModelConfig(d_model=96, n_layers=1, n_heads=4, ffn_dim=192, max_seq_len=64)
    cfg = TrainConfig(method="hu")  # sparse_gemm stays masked: build, then ask for the GEMMs
    model = build_model(mc, cfg)
    with pytest.raises(ConfigError, match=r"--sparse-gemm ours: layer blocks\.0\.mlp\.gate_proj has in_features=96; "
                                          "the 2:4 GEMMs need multiples of 64"):
        use_sparse_gemms(model, ["blocks.0.mlp.gate_proj"], "ours")


def test_cusparselt_on_the_cpu_is_refused_before_training(corpus, tmp_path):
    with pytest.raises(ConfigError, match="--sparse-gemm cusparselt runs on a CUDA GPU; this run trains on cpu"):
        train(small(corpus, tmp_path / "run", sparse_gemm="cusparselt", device="cpu"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def _hu_layer(gemm: str, seed: int = 3) -> SparseLinear:
    torch.manual_seed(seed)
    layer = SparseLinear(128, 192, config=SparsityConfig(transposable=True, mvue=True, decay=0.0), name="fc")
    layer.generator = torch.Generator().manual_seed(seed)
    layer.gemm = gemm
    return layer


def test_layer_on_the_sparse_gemms_computes_the_masked_linear():
    """Forward and ∇X equal the masked linear's (in bf16); ∇W is the MVUE24 product with the draw seeded from
    the layer's generator; ∇b exact."""
    layer = _hu_layer("ours")
    x = torch.randn(256, 128).requires_grad_(True)
    gy = torch.randn(256, 192).to(torch.bfloat16)
    state = layer.generator.get_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(gy)
    assert y.dtype == torch.bfloat16
    wm = (layer.weight * layer.mask).detach()
    xb = x.detach().to(torch.bfloat16)
    ref = xb.double() @ wm.to(torch.bfloat16).double().t() + layer.bias.detach().double()
    assert float((y.detach().double() - ref).norm() / ref.norm()) < 1e-2
    ref_dx = gy.double() @ wm.to(torch.bfloat16).double()
    assert float((x.grad.double() - ref_dx).norm() / ref_dx.norm()) < 1e-2
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().set_state(state)))
    s = stl.mvue24_sample_dense_t(gy.contiguous(), seed=seed)  # [N, T]: the very draw of this step
    ref_dw = s.double() @ xb.double()
    assert float((layer.weight.grad.double() - ref_dw).norm() / ref_dw.norm()) < 1e-2
    assert torch.allclose(layer.bias.grad.double(), gy.double().sum(0), rtol=1e-2, atol=1e-2)
    assert layer.generator.get_state().ne(state).any()  # the draw advanced the generator


def test_layer_falls_back_to_the_masked_path_when_not_training_or_dense():
    layer = _hu_layer("ours")
    x = torch.randn(8, 128)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, layer.weight * layer.mask, layer.bias))
    layer.dense = True
    assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))


def _model_grads(gemm: str, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Parameter gradients of one forward/backward of the tiny Hu model (same init, masks and batch for every
    call): the exact gradients of float32 matmuls on W ⊙ mask (``masked``, MVUE24 off), or the sparse GEMMs
    under bf16 autocast with the MVUE24 seeds drawn from a generator seeded ``seed``."""
    cfg = TrainConfig(method="hu", sparse_gemm=gemm, mvue=gemm != "masked")
    model = build_model(model_config_from_preset("tiny"), cfg).to(device)
    gen = torch.Generator().manual_seed(seed)  # on the CPU, as the trainer makes it for the sparse GEMMs
    for m in sparse_modules(model).values():
        m.generator = gen
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 256, (4, 64), generator=g).to(device) for _ in range(2))
    with torch.autocast(device, dtype=torch.bfloat16, enabled=gemm != "masked"):
        logits = model(x)
    F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_one_step_gradients(gemm: str, device: str) -> None:
    ref = _model_grads("masked", device=device)
    draws = [_model_grads(gemm, seed, device) for seed in range(16)]
    sparse = [n for n in ref if ".mlp." in n and n.endswith("_proj.weight")]
    assert sparse and len(ref) == len(draws[0])

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    for name, g in ref.items():
        if name in sparse:
            assert rel(draws[1][name], draws[0][name]) > 0.2, name  # the seed matters
            assert rel(torch.stack([d[name] for d in draws]).mean(0), g) < 0.3, name  # noise ~0.7/4
        else:
            assert rel(draws[0][name], g) < 3e-2, name


def test_one_step_gradients_match_the_masked_model():
    """Every dense parameter's gradient (it depends on the sparse layers' ∇X) equals the masked model's to bf16
    precision; the sparse layers' ∇W are MVUE24 estimates: noisy (another seed gives another one) but unbiased,
    their mean over 16 seeds close to the masked model's exact ∇W."""
    _check_one_step_gradients("ours", "cpu")


@gpu
@pytest.mark.parametrize("gemm", ["ours", "cusparselt"])
def test_gpu_one_step_gradients_match_the_masked_model(gemm):
    from sparsert.runtime.cusparselt import cusparselt_status

    if gemm == "cusparselt" and cusparselt_status():
        pytest.skip(cusparselt_status())
    _check_one_step_gradients(gemm, "cuda")


@pytest.fixture
def gemm_calls(monkeypatch) -> list[str]:
    """The ``gemm`` of every call to ``sparse24_training_linear`` (which still computes: a counter, not a stand-in)."""
    calls = []
    real = stl.sparse24_training_linear

    def counting(*args, **kwargs):
        calls.append(kwargs["gemm"])
        return real(*args, **kwargs)

    monkeypatch.setattr(stl, "sparse24_training_linear", counting)
    return calls


def test_hu_trains_on_the_sparse_gemms_close_to_the_masked_run(corpus, tmp_path, gemm_calls):
    calls = gemm_calls
    masked = train(small(corpus, tmp_path / "masked"))
    assert calls == []
    sparse = train(small(corpus, tmp_path / "sparse", sparse_gemm="ours"))
    ffn = [n for n in sparse_modules(build_model(model_config_from_preset("tiny"), TrainConfig(method="hu")))
           if ".mlp." in n]
    assert calls == ["ours"] * (5 * len(ffn))  # 5 sparse steps (the 6th fine-tunes dense), every FFN linear
    a, b = ([r["loss"] for r in read_metrics(run) if "loss" in r] for run in (tmp_path / "masked", tmp_path / "sparse"))
    assert a[0] == pytest.approx(b[0], rel=2e-3)  # same init and batch; bf16 vs float32
    assert all(x == pytest.approx(y, rel=3e-2) for x, y in zip(a, b, strict=True))
    assert sparse.final_val_loss == pytest.approx(masked.final_val_loss, rel=2e-2)
    # (exact resume of a --sparse-gemm run: tests/test_train_methods.py::test_resume_equals_a_straight_run)


@gpu
@pytest.mark.parametrize("gemm", ["ours", "cusparselt"])
def test_gpu_hu_trains_on_the_sparse_gemms(corpus, tmp_path, gemm):
    from sparsert.runtime.cusparselt import cusparselt_status

    if gemm == "cusparselt" and cusparselt_status():
        pytest.skip(cusparselt_status())
    masked = train(small(corpus, tmp_path / "masked", device="cuda", steps=12, eval_interval=12, ckpt_interval=12))
    sparse = train(small(corpus, tmp_path / gemm, device="cuda", steps=12, eval_interval=12, ckpt_interval=12,
                         sparse_gemm=gemm))
    assert sparse.final_val_loss == pytest.approx(masked.final_val_loss, rel=3e-2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hugging_face_models_train_on_the_sparse_gemms(corpus, tmp_path, hf_model_dirs, arch, gemm_calls):
    calls = gemm_calls
    result = train(small(corpus, tmp_path / "run", hf_model=str(hf_model_dirs[arch]), preset="tiny", steps=3,
                         eval_interval=3, ckpt_interval=3, dense_finetune=0.0, sparse_gemm="ours"))
    assert len(calls) == 3 * 2 * (3 if arch == "llama" else 2)  # steps x layers x FFN linears per layer
    assert result.final_val_loss == result.final_val_loss and (tmp_path / "run" / "hf").is_dir()


def test_cli_resumes_a_hu_run_on_the_sparse_gemms(corpus, tmp_path, monkeypatch, capsys, gemm_calls):
    """A masked Hu run stopped after its step-2 checkpoint continues on the sparse GEMMs with only --resume,
    --out and --sparse-gemm given (the recipe comes from the saved config), and says so."""
    import shutil

    from sparsert.cli import main
    from sparsert.train.checkpoint import load_checkpoint, write_json_atomic

    monkeypatch.chdir(tmp_path)
    train(small(corpus, tmp_path / "run", steps=4, ckpt_interval=2, eval_interval=4, dense_finetune=0.0,
                keep_checkpoints=2))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")
    shutil.rmtree(tmp_path / "run" / "artifact")
    write_json_atomic(tmp_path / "run" / "checkpoints" / "latest.json", {"step": 2, "dir": "step_00000002"})
    assert gemm_calls == []
    main(["train", "--resume", "--out", "run", "--sparse-gemm", "ours", "--threads", "1", "--no-progress"])
    assert load_checkpoint(tmp_path / "run").step == 4
    assert len(gemm_calls) == 2 * 3 * 4  # steps 3 and 4, three FFN linears in each of the 4 blocks
    assert "trained with --sparse-gemm masked; it continues with --sparse-gemm ours" in capsys.readouterr().err


def test_whole_model_step_benchmark(tmp_path, capsys):
    """tools/bench_train_step.py: nothing measured without a GPU; its CPU smoke run times every variant it can
    run here (cuSPARSELt needs CUDA) against dense bf16."""
    from conftest import check_tool_measures_nothing_without_gpu, load_tool

    check_tool_measures_nothing_without_gpu("bench_train_step", tmp_path)
    bench = load_tool("bench_train_step")
    out = tmp_path / "t.md"
    assert bench.main(["--device", "cpu", "--out", str(out)]) == 0
    table = [line for line in out.read_text().splitlines() if line.startswith("| ") and "variant" not in line]
    assert [line.split(" | ")[0][2:] for line in table] == ["dense fp32", "dense bf16", "hu masked", "hu ours"]
    assert "| dense bf16 | " in out.read_text() and "1.000x" in out.read_text()
    assert all("–" not in line.split(" | ")[1] for line in table)  # every variant ran
