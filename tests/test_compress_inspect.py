"""Checkpoint -> artifact compression, artifact statistics, and the ``compress``/``inspect`` CLI commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsert.runtime.artifact import load_artifact
from sparsert.runtime.artifact_stats import (
    MAX_BITS_PER_WEIGHT_24_INT4,
    MIN_RATIO_VS_FP32_24_INT4,
    artifact_stats,
    format_stats,
)
from sparsert.runtime.errors import ArtifactError, ConfigError
from sparsert.runtime.int4 import fake_quantize_int4
from sparsert.runtime.model import DecoderLM, ModelConfig, sparse_linear_names
from sparsert.runtime.nm_mask import nm_mask
from sparsert.train.checkpoint import save_checkpoint
from sparsert.train.compress import CompressionNote, compress_checkpoint
from sparsert.train.sparse_linear import SparsityConfig
from sparsert.train.sparsify import sparse_modules, sparsify_model

REPO = Path(__file__).resolve().parents[1]


def tiny_config(arch: str = "llama") -> ModelConfig:
    return ModelConfig(arch=arch, d_model=128, n_layers=1, n_heads=4, ffn_dim=256, max_seq_len=16)


def make_checkpoint(run_dir: Path, *, sparse: bool, qat: int | None = None, arch: str = "llama") -> DecoderLM:
    """Save a real training checkpoint (H2's format) of a random model; returns the model as trained.

    Sparse checkpoints get masks chosen by a random score (not by |W|), so a test can tell whether the
    compressor used the checkpoint's masks or re-pruned by magnitude.
    """
    torch.manual_seed(0)
    config = tiny_config(arch)
    model = DecoderLM(config)
    if sparse:
        sparsify_model(model, SparsityConfig(qat_group_size=qat))
        for module in sparse_modules(model).values():
            score = torch.rand(module.weight.shape)
            module.mask.copy_(nm_mask(module.weight, score=score).to(torch.uint8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {
        "model_config": config.to_dict(),
        "train_config": {},
        "sparsity": {"n": 2, "m": 4} if sparse else None,
        "quantization": {"bits": 4, "group_size": qat} if qat else None,
    }
    save_checkpoint(run_dir, 7, model, optimizer, state)
    return model.eval()


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DecoderLM]:
    run = tmp_path_factory.mktemp("qat") / "run"
    return run, make_checkpoint(run, sparse=True, qat=128)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DecoderLM]:
    run = tmp_path_factory.mktemp("dense") / "run"
    return run, make_checkpoint(run, sparse=False)


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------------------------------------
# compress_checkpoint


def test_qat_checkpoint_compresses_to_the_codes_it_trained_with(tmp_path: Path, qat_run) -> None:
    run, trained = qat_run
    out = compress_checkpoint(run, tmp_path / "art", dense_dtype="float32")
    art = load_artifact(out)
    assert art.quantization is not None and art.quantization.group_size == 128
    assert art.sparsity.layers == tuple(sparse_linear_names(trained.config))
    assert art.producer["source"] == {"checkpoint": str(run / "checkpoints" / "step_00000007"), "step": 7}
    assert art.producer["masks"] == "checkpoint masks"
    for name, module in sparse_modules(trained).items():
        # The checkpoint's own (random-score) mask, fake-quantized exactly as QAT's forward pass did.
        expected = fake_quantize_int4(module.weight.detach() * module.mask, 128)
        assert torch.equal(art.packed[name].to_dense(), expected), name
    with torch.no_grad():
        torch.testing.assert_close(art.build_model()(ids()), trained(ids()), rtol=0, atol=1e-5)


def test_sparse_checkpoint_without_qat_keeps_values_unquantized(tmp_path: Path) -> None:
    trained = make_checkpoint(tmp_path / "run", sparse=True, arch="gpt2")
    art = load_artifact(compress_checkpoint(tmp_path / "run", tmp_path / "art"))
    assert art.quantization is None and art.dense_dtype == torch.float16
    for name, module in sparse_modules(trained).items():
        expected = (module.weight.detach() * module.mask).half().float()
        assert torch.equal(art.packed[name].to_dense(), expected), name
        assert torch.equal(art.packed[name].bias, module.bias.detach())


def test_dense_checkpoint_is_pruned_by_magnitude(tmp_path: Path, dense_run) -> None:
    run, trained = dense_run
    art = load_artifact(compress_checkpoint(run, tmp_path / "fp32", dense_dtype="float32"))
    assert art.quantization is None and art.producer["masks"] == "magnitude one-shot"
    for name in sparse_linear_names(trained.config):
        w = trained.get_submodule(name).weight.detach()
        assert torch.equal(art.packed[name].to_dense(), w * nm_mask(w)), name

    art = load_artifact(compress_checkpoint(run, tmp_path / "int4", quantize=True, int4_group_size=64))
    assert art.quantization.group_size == 64
    w = trained.get_submodule("blocks.0.mlp.down_proj").weight.detach()
    assert torch.equal(art.packed["blocks.0.mlp.down_proj"].to_dense(), fake_quantize_int4(w * nm_mask(w), 64))


def test_quantization_can_be_switched_off(tmp_path: Path, qat_run) -> None:
    with pytest.warns(CompressionNote, match=r"trained with INT4 QAT \(group size 128\); --no-int4 stores its kept "
                      r"values unquantized"):
        art = load_artifact(compress_checkpoint(qat_run[0], tmp_path / "art", quantize=False))
    assert art.quantization is None and art.sparsity is not None


def test_a_group_size_other_than_the_qat_one_is_refused_unless_forced(tmp_path: Path, qat_run) -> None:
    """QAT trained the codes of groups of 128; re-quantizing in groups of 64 silently changes them."""
    for quantize in (None, True):
        with pytest.raises(ConfigError, match=r"trained with INT4 QAT in groups of 128; --group-size 64 would "
                           r"re-quantize .* omit --group-size to keep 128, or add --force-group-size"):
            compress_checkpoint(qat_run[0], tmp_path / "out", int4_group_size=64, quantize=quantize)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"--force-group-size applies only together with --group-size"):
        compress_checkpoint(qat_run[0], tmp_path / "out", force_group_size=True)
    same = load_artifact(compress_checkpoint(qat_run[0], tmp_path / "same", int4_group_size=128))
    assert same.quantization.group_size == 128
    with pytest.raises(ConfigError, match=r"^--force-group-size has no effect here: --group-size 128 is the QAT "
                       r"run's own; leave it out$"):
        compress_checkpoint(qat_run[0], tmp_path / "out", int4_group_size=128, force_group_size=True)
    plain = tmp_path / "plain"
    make_checkpoint(plain, sparse=True)
    with pytest.raises(ConfigError, match=r"^--force-group-size has no effect here: .* was not trained with INT4 "
                       r"QAT; leave it out$"):
        compress_checkpoint(plain, tmp_path / "out", quantize=True, int4_group_size=64, force_group_size=True)
    assert not (tmp_path / "out").exists()
    forced = load_artifact(compress_checkpoint(qat_run[0], tmp_path / "forced", int4_group_size=64,
                                               force_group_size=True))
    assert forced.quantization.group_size == 64


def test_compress_refuses_empty_paths_and_an_artifact(tmp_path: Path, qat_run, dense_run,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    art = compress_checkpoint(qat_run[0], tmp_path / "art")
    monkeypatch.chdir(qat_run[0])  # "" must not be read as the current directory, a valid run
    with pytest.raises(ConfigError, match=r"^CHECKPOINT: expected the path of a training run .*, got ''$"):
        compress_checkpoint("", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"^-o: expected the path of the artifact directory to write, got ''$"):
        compress_checkpoint(qat_run[0], "")
    with pytest.raises(ConfigError, match=r"^--calib-data: expected the path of a text file, folder or \.jsonl, "
                       r"got ''$"):
        compress_checkpoint(dense_run[0], tmp_path / "out", prune="wanda", calib_data="")
    with pytest.raises(ConfigError, match=rf"^{art} is a sparsert artifact \(already compressed\); compress takes "
                       r"a training run directory"):
        compress_checkpoint(art, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_name_the_checkpoint_file(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    make_checkpoint(tmp_path / "run", sparse=True)
    model_file = tmp_path / "run" / "checkpoints" / "step_00000007" / "model.safetensors"
    with safe_open(str(model_file), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(model_file))
    tensors["blocks.0.attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(model_file), metadata=metadata)
    with pytest.raises(ArtifactError, match=rf"^checkpoint {model_file}: blocks\.0\.attn\.q_proj\.weight holds "
                       r"non-finite values"):
        compress_checkpoint(tmp_path / "run", tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_compress_bad_inputs_write_nothing(tmp_path: Path, qat_run, dense_run) -> None:
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match=r"nope: checkpoint path does not exist"):
        compress_checkpoint(tmp_path / "nope", out)
    with pytest.raises(ConfigError, match=r"unknown pruning method 'obs' \(choose from magnitude, wanda, sparsegpt\)"):
        compress_checkpoint(dense_run[0], out, prune="obs")
    with pytest.raises(ConfigError, match=r"carries trained 2:4 masks; --prune applies only to dense checkpoints"):
        compress_checkpoint(qat_run[0], out, prune="magnitude")
    with pytest.raises(ConfigError, match=r"INT4 group size 96 does not divide K=128 of layer 'blocks\.0\.attn"):
        compress_checkpoint(qat_run[0], out, int4_group_size=96, force_group_size=True)
    with pytest.raises(ConfigError, match=r"--group-size: the INT4 group size must be a positive multiple of 4, got 6"):
        compress_checkpoint(qat_run[0], out, int4_group_size=6)
    with pytest.raises(ConfigError, match=r"--group-size 64 applies only to INT4, but .* not trained with INT4 QAT"):
        compress_checkpoint(dense_run[0], out, int4_group_size=64)
    with pytest.raises(ConfigError, match=r"--group-size 64 applies only to INT4, but INT4 is switched off"):
        compress_checkpoint(qat_run[0], out, int4_group_size=64, quantize=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_compress_into_a_truncated_checkpoint_fails_cleanly(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "run", sparse=True)
    model_file = tmp_path / "run" / "checkpoints" / "step_00000007" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"model\.safetensors: corrupt or truncated"):
        compress_checkpoint(tmp_path / "run", tmp_path / "art")
    assert not (tmp_path / "art").exists()


# ----------------------------------------------------------------------------------------------------------
# Statistics


def test_int4_artifact_meets_the_compression_targets(tmp_path: Path, qat_run) -> None:
    stats = artifact_stats(compress_checkpoint(qat_run[0], tmp_path / "art"))
    # 2 x (4-bit code + 2-bit index) per 4 weights + one 16-bit scale per 128 weights = 3.125 bits/weight.
    assert stats.linear_bits_per_weight == pytest.approx(3.125)
    assert stats.linear_bits_per_weight <= MAX_BITS_PER_WEIGHT_24_INT4
    assert stats.linear_ratio_vs_fp32 == pytest.approx(32 / 3.125)
    assert stats.linear_ratio_vs_fp32 >= MIN_RATIO_VS_FP32_24_INT4
    assert stats.linear_ratio_vs_fp16 == pytest.approx(16 / 3.125)
    assert all(0.5 <= layer.sparsity < 0.6 for layer in stats.layers)
    assert [layer.storage for layer in stats.layers] == ["2:4+int4 g128"] * 7
    q = stats.layers[0]
    assert (q.out_features, q.in_features, q.stored_bytes) == (128, 128, 128 * (16 + 32) + 128 * 2)
    assert stats.file_bytes == (tmp_path / "art" / "model.safetensors").stat().st_size
    params = sum(p.numel() for p in qat_run[1].parameters())
    assert stats.model_params == params
    assert stats.model_ratio_vs_fp32 == pytest.approx(4 * params / stats.file_bytes)
    table = format_stats(stats)
    assert "blocks.0.mlp.gate_proj" in table and "3.125" in table and "10.24" in table


def test_stats_of_fp16_and_dense_artifacts(tmp_path: Path, qat_run) -> None:
    with pytest.warns(CompressionNote):  # --no-int4 on a QAT checkpoint
        fp16 = artifact_stats(compress_checkpoint(qat_run[0], tmp_path / "fp16", quantize=False))
    assert fp16.linear_bits_per_weight == pytest.approx(9.0)  # 2 x (16 + 2) bits per 4 weights
    assert fp16.linear_sparsity == pytest.approx(0.5, abs=1e-3)
    with pytest.warns(CompressionNote):
        fp32 = artifact_stats(compress_checkpoint(qat_run[0], tmp_path / "fp32", quantize=False,
                                                  dense_dtype="float32"))
    assert fp32.linear_bits_per_weight == pytest.approx(17.0)
    assert fp32.linear_ratio_vs_fp32 == pytest.approx(32 / 17)


# ----------------------------------------------------------------------------------------------------------
# CLI (subprocesses: the real entry point, exit codes and stderr)


def sparsert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsert", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_cli_compress_then_inspect(tmp_path: Path, qat_run) -> None:
    out = tmp_path / "art"
    refused = sparsert("compress", qat_run[0], "-o", out, "--group-size", "64")
    assert refused.returncode == 2 and not out.exists()
    assert refused.stderr.startswith("error: ") and len(refused.stderr.strip().splitlines()) == 1
    assert "groups of 128; --group-size 64" in refused.stderr and "--force-group-size" in refused.stderr
    done = sparsert("compress", qat_run[0], "-o", out, "--group-size", "64", "--force-group-size")
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "bits/weight" in done.stdout
    shown = sparsert("inspect", out, "--json")
    assert shown.returncode == 0, shown.stderr
    stats = json.loads(shown.stdout)
    assert stats["quantization"]["group_size"] == 64
    assert stats["linear_bits_per_weight"] == pytest.approx(3.25)  # 16-bit scale per 64 weights
    assert len(stats["layers"]) == 7 and stats["layers"][0]["storage"] == "2:4+int4 g64"
    fp16 = sparsert("compress", qat_run[0], "-o", tmp_path / "fp16", "--no-int4")
    assert fp16.returncode == 0, fp16.stderr
    assert fp16.stderr.startswith("note: ") and "trained with INT4 QAT (group size 128); --no-int4" in fp16.stderr


def test_cli_bad_checkpoint_path_exits_2_with_one_line(tmp_path: Path) -> None:
    done = sparsert("compress", tmp_path / "missing", "-o", tmp_path / "art")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: checkpoint path does not exist"]
    assert not (tmp_path / "art").exists()


def test_inspect_broken_artifact_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sparsert.cli import main  # in-process: the same entry point as the console script

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path / "broken")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "config.json is not valid JSON" in lines[0]


def test_inspect_refuses_an_empty_path_and_points_a_run_to_its_artifact(
        tmp_path: Path, qat_run, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsert.cli import main

    run = tmp_path / "run"
    art = compress_checkpoint(qat_run[0], run / "artifact")
    monkeypatch.chdir(art)  # "" must not be read as the current directory, a valid artifact
    for args, message in ((["inspect", ""], "error: artifact: expected the path of an artifact directory, got ''"),
                          (["inspect", str(run)], f"error: {run} is not an artifact ({run / 'config.json'} is "
                                                  f"missing); it looks like a training run directory: its artifact "
                                                  f"is {art}")):
        (run / "checkpoints").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [message]
