"""Compression methods: one-shot pruning (magnitude/Wanda/SparseGPT) and the AWQ INT4 scale search, through
``compress_checkpoint`` and ``sparsert compress``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsert.runtime.artifact import load_artifact
from sparsert.runtime.errors import ConfigError, DataError
from sparsert.runtime.int4 import fake_quantize_int4
from sparsert.runtime.model import DecoderLM, ModelConfig, sparse_linear_names
from sparsert.runtime.nm_mask import is_nm_sparse, nm_mask
from sparsert.runtime.tokenizer import ByteTokenizer
from sparsert.train.awq import (
    BlockScales,
    awq_scale_model,
    fold_block_scales,
    int4_output_error,
    search_scales,
)
from sparsert.train.calibration import InputStats
from sparsert.train.checkpoint import save_checkpoint
from sparsert.train.compress import calibration_batches, compress_checkpoint
from sparsert.train.data import TokenData, load_corpus
from sparsert.train.oneshot_prune import prune_model_oneshot
from sparsert.train.sparse_linear import SparsityConfig
from sparsert.train.sparsify import sparse_modules, sparsify_model

TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    "        self.y = y\n\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n"
) * 8


def save(run: Path, model: DecoderLM, *, sparse: bool = False, qat: int | None = None) -> Path:
    state = {"model_config": model.config.to_dict(), "train_config": {},
             "sparsity": {"n": 2, "m": 4} if sparse else None,
             "quantization": {"bits": 4, "group_size": qat} if qat else None}
    save_checkpoint(run, 3, model, torch.optim.SGD(model.parameters(), lr=0.1), state)
    return run


def outlier_model(arch: str = "llama", seed: int = 0) -> DecoderLM:
    """A random tiny model whose norms blow up a few channels (x30), giving outlier input channels as in
    trained LLMs (the case AWQ is for)."""
    torch.manual_seed(seed)
    model = DecoderLM(ModelConfig(arch=arch, d_model=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=32))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.attn_norm, block.mlp_norm):
                norm.weight.mul_(torch.where(torch.rand(64, generator=g) < 0.06, 30.0, 1.0))
    return model.eval()


def ids(seed: int, batch: int = 2, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (batch, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# One-shot pruning through compress_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DecoderLM, list[torch.Tensor]]:
    """A tiny model trained 60 steps on the default corpus (~1 s), its dense checkpoint, calibration batches."""
    data = TokenData.from_corpus(load_corpus(None, max_bytes=1 << 20), ByteTokenizer())
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = data.get_batch("train", 8, 32, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    gc = torch.Generator().manual_seed(10)
    calib = [data.get_batch("train", 4, 32, gc)[0] for _ in range(8)]
    run = save(tmp_path_factory.mktemp("trained") / "run", model)
    return run, model, calib


def calib_loss(model: DecoderLM, calib: list[torch.Tensor]) -> float:
    with torch.no_grad():
        losses = [float(F.cross_entropy(model(c[:, :-1]).flatten(0, 1), c[:, 1:].flatten())) for c in calib]
    return sum(losses) / len(losses)


def block0_error(dense: DecoderLM, pruned: DecoderLM, calib: list[torch.Tensor]) -> float:
    """Σ ‖X(W − Ŵ)ᵀ‖² over block 0's q/k/v/gate/up (their inputs do not depend on any pruning)."""
    xs: dict[str, list[torch.Tensor]] = {"attn": [], "mlp": []}
    hooks = [dense.blocks[0].attn.q_proj.register_forward_pre_hook(lambda m, i: xs["attn"].append(i[0])),
             dense.blocks[0].mlp.up_proj.register_forward_pre_hook(lambda m, i: xs["mlp"].append(i[0]))]
    with torch.no_grad():
        for c in calib:
            dense(c)
    for h in hooks:
        h.remove()
    err = 0.0
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        x = torch.cat(xs[name.split(".")[0]]).reshape(-1, 32).double()
        w = dense.get_submodule(f"blocks.0.{name}").weight.detach().double()
        w_hat = pruned.get_submodule(f"blocks.0.{name}").weight.detach().double()
        err += float(((x @ (w - w_hat).t()) ** 2).sum())
    return err


def test_each_prune_method_gives_a_valid_24_artifact_and_the_better_methods_reconstruct_better(
    tmp_path: Path, trained
) -> None:
    run, dense, calib = trained
    arts, errs, losses = {}, {}, {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = compress_checkpoint(run, tmp_path / method, prune=method, dense_dtype="float32",
                                  calibration=None if method == "magnitude" else calib)
        art = arts[method] = load_artifact(out)  # validates the packed 2:4 indices
        assert art.producer["masks"] == f"{method} one-shot" and art.quantization is None
        assert art.sparsity.layers == tuple(sparse_linear_names(dense.config))
        model = art.build_model()
        expected = copy.deepcopy(dense)
        masks = prune_model_oneshot(expected, method, calib)  # H6's pass on the same model and batches
        for name, layer in art.packed.items():
            w = layer.to_dense()
            assert is_nm_sparse(w) and not w[~masks[name]].any(), name
            torch.testing.assert_close(w, expected.get_submodule(name).weight.detach(), rtol=0, atol=0)
        errs[method], losses[method] = block0_error(dense, model, calib), calib_loss(model, calib)
    dense_loss = calib_loss(dense, calib)
    # SparseGPT reconstructs layer outputs far better and loses less calibration loss than magnitude.
    assert errs["sparsegpt"] < 0.3 * errs["magnitude"], errs
    assert losses["sparsegpt"] - dense_loss < 0.8 * (losses["magnitude"] - dense_loss), (losses, dense_loss)
    # Wanda's mask reconstructs block 0 better than magnitude (its loss is not reliably lower on a tiny model).
    assert errs["wanda"] < 0.9 * errs["magnitude"], errs


def test_calibration_batches_come_from_the_train_split_and_follow_the_seed(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    tok = ByteTokenizer()
    a = calibration_batches(tok, path, batches=3, batch_size=2, seq_len=16, seed=1)
    assert len(a) == 3 and all(b.shape == (2, 16) and b.dtype == torch.int64 for b in a)
    again = calibration_batches(tok, path, batches=3, batch_size=2, seq_len=16, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert not torch.equal(a[0], calibration_batches(tok, path, batches=1, batch_size=2, seq_len=16, seed=2)[0])
    train = TokenData.from_corpus(load_corpus(path), tok).train
    windows = {tuple(train[i:i + 16].tolist()) for i in range(train.numel() - 15)}
    assert all(tuple(row.tolist()) in windows for b in a for row in b)
    with pytest.raises(DataError, match=r"calibration data \(.*calib.txt\): train split has \d+ tokens, fewer"):
        calibration_batches(tok, path, batches=1, batch_size=1, seq_len=4096)


def test_calibration_options_apply_only_where_used(tmp_path: Path, trained) -> None:
    run, _, calib = trained
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"--calib-batches applies only to --prune wanda/sparsegpt and --awq"):
        compress_checkpoint(run, out, prune="magnitude", calib_batches=4)
    with pytest.raises(ConfigError, match=r"--calib-seq-len 64 exceeds the model's max_seq_len=32"):
        compress_checkpoint(run, out, prune="wanda", calib_seq_len=64)
    with pytest.raises(ConfigError, match=r"--calib-batch-size must be a positive integer, got -1"):
        compress_checkpoint(run, out, prune="wanda", calib_batch_size=-1)
    with pytest.raises(ConfigError, match=r"give calibration batches or --calib-data, not both"):
        compress_checkpoint(run, out, prune="wanda", calibration=calib, calib_data="x.txt")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# AWQ


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_folded_scales_compute_the_same_function(arch: str) -> None:
    model = outlier_model(arch)
    x = ids(0)
    with torch.no_grad():
        ref = model(x)
    g = torch.Generator().manual_seed(3)

    def rand(k: int) -> torch.Tensor:
        return torch.exp(torch.randn(k, generator=g))  # scales from ~0.05 to ~20

    with torch.no_grad():
        for block in model.blocks:
            fold_block_scales(block, BlockScales(rand(64), rand(64), rand(64), rand(128) if arch == "llama" else None))
        out = model(x)
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, outlier_model(arch).blocks[0].attn.q_proj.weight)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    if arch == "gpt2":
        with pytest.raises(ConfigError, match="cannot be folded into a GELU MLP"):
            fold_block_scales(model.blocks[0], BlockScales(down=rand(128)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_awq_scale_model_keeps_the_float_model_and_lowers_int4_error(arch: str) -> None:
    model = outlier_model(arch)
    prune_model_oneshot(model, "magnitude")
    masks = {n: model.get_submodule(n).weight != 0 for n in sparse_linear_names(model)}
    x = ids(1)
    with torch.no_grad():
        ref = model(x)
    found = awq_scale_model(model, [ids(2, 4)], group_size=32)
    expected_groups = {"attn.qkv", "attn.o_proj", "mlp.gate_up"} | ({"mlp.down_proj"} if arch == "llama" else set())
    assert set(found) == {f"blocks.{i}.{g}" for i in range(2) for g in expected_groups}
    assert all(r.error <= r.plain_error for r in found.values())
    qkv = found["blocks.0.attn.qkv"]
    assert qkv.alpha > 0 and qkv.error < 0.5 * qkv.plain_error
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    for n, mask in masks.items():  # the 2:4 pattern is untouched by the scaling
        assert torch.equal(model.get_submodule(n).weight != 0, mask), n


def test_awq_beats_plain_int4_on_a_layer_with_outlier_input_channels() -> None:
    g = torch.Generator().manual_seed(0)
    k, out = 128, 64
    boost = torch.ones(k)
    boost[torch.randperm(k, generator=g)[:4]] = 40.0  # four outlier channels

    def acts(tokens: int) -> torch.Tensor:
        return torch.randn(tokens, k, generator=g) * boost

    w = torch.randn(out, k, generator=g) * 0.02
    w = w * nm_mask(w)
    stats = InputStats(k, with_gram=True)
    stats.add(acts(512))
    found = search_scales([w], stats, group_size=64)
    assert 0 < found.alpha <= 1 and found.error < 0.6 * found.plain_error
    assert found.plain_error == pytest.approx(int4_output_error([w], stats.gram, None, 64))
    # held-out tokens, computed directly: ‖Q(W·diag(s))·(x/s)ᵀ − W xᵀ‖ vs ‖Q(W) xᵀ − W xᵀ‖
    x, s = acts(256), found.scales
    ref = x @ w.t()
    awq = (x / s) @ fake_quantize_int4(w * s, 64).t()
    plain = x @ fake_quantize_int4(w, 64).t()
    assert (awq - ref).norm() < 0.75 * (plain - ref).norm()
    assert not fake_quantize_int4(w * s, 64)[w == 0].any()  # the 2:4 pattern survives the scaling


def test_compress_with_awq_is_closer_to_the_float_model_than_plain_int4(tmp_path: Path) -> None:
    model = outlier_model("llama", seed=4)
    with torch.no_grad():  # a sparse checkpoint: masks by a random score, so not |W| after scaling either
        sparsify_model(model, SparsityConfig())
        for module in sparse_modules(model).values():
            module.mask.copy_(nm_mask(module.weight, score=torch.rand(module.weight.shape)).to(torch.uint8))
    run = save(tmp_path / "run", model, sparse=True)
    calib = [ids(s, 4) for s in range(4)]
    plain = load_artifact(compress_checkpoint(run, tmp_path / "plain", quantize=True, int4_group_size=32,
                                              dense_dtype="float32"))
    awq = load_artifact(compress_checkpoint(run, tmp_path / "awq", awq=True, int4_group_size=32,
                                            dense_dtype="float32", calibration=calib))
    fp = load_artifact(compress_checkpoint(run, tmp_path / "fp", quantize=False, dense_dtype="float32"))
    assert awq.quantization is not None and awq.quantization.group_size == 32  # --awq implies INT4
    assert awq.producer["int4_scales"]["method"] == "awq"
    assert max(awq.producer["int4_scales"]["alpha"].values()) > 0
    for name, layer in awq.packed.items():  # the checkpoint's masks, kept as they are
        assert torch.equal(layer.indices, fp.packed[name].indices), name
        assert not layer.to_dense()[~sparse_modules(model)[name].mask.bool()].any(), name
    x = ids(9, 4)
    with torch.no_grad():
        ref = fp.build_model()(x)
        err_plain = (plain.build_model()(x) - ref).norm()
        err_awq = (awq.build_model()(x) - ref).norm()
    assert err_awq < 0.8 * err_plain, (err_awq, err_plain)


def test_awq_searches_only_the_groups_the_artifact_quantizes(tmp_path: Path) -> None:
    """--awq with --keep-dense: layers kept dense are not quantized, so no scale is searched for a group of dense
    layers only, and the artifact still computes the float model's function where nothing is quantized."""
    run = save(tmp_path / "run", outlier_model("llama", seed=5))
    calib = [ids(s, 4) for s in range(3)]
    art = load_artifact(compress_checkpoint(run, tmp_path / "awq", prune="magnitude", awq=True, int4_group_size=32,
                                            dense_dtype="float32", calibration=calib,
                                            keep_dense=["blocks.0.*", "*.q_proj"]))
    searched = set(art.producer["int4_scales"]["alpha"])
    assert searched == {"blocks.1.attn.qkv", "blocks.1.attn.o_proj", "blocks.1.mlp.gate_up", "blocks.1.mlp.down_proj"}
    assert not [n for n in art.packed if n.startswith("blocks.0.") or n.endswith("q_proj")]
    model = outlier_model("llama", seed=5)
    found = awq_scale_model(model, calib, 32, quantized={"blocks.0.attn.o_proj"})
    assert set(found) == {"blocks.0.attn.o_proj"}


def test_awq_refused_on_qat_checkpoints_unless_forced(tmp_path: Path) -> None:
    model = outlier_model("gpt2")
    sparsify_model(model, SparsityConfig(qat_group_size=32))
    run = save(tmp_path / "run", model, sparse=True, qat=32)
    calib = [ids(0, 2)]
    with pytest.raises(ConfigError, match=r"trained with INT4 QAT; --awq would rescale .* \(add --force-awq"):
        compress_checkpoint(run, tmp_path / "art", awq=True, calibration=calib)
    assert not (tmp_path / "art").exists()
    art = load_artifact(compress_checkpoint(run, tmp_path / "art", awq=True, force_awq=True, calibration=calib))
    assert art.quantization.group_size == 32 and art.producer["int4_scales"]["method"] == "awq"
    with pytest.raises(ConfigError, match=r"--awq searches INT4 scales; it cannot be combined with --no-int4"):
        compress_checkpoint(run, tmp_path / "x", awq=True, quantize=False, calibration=calib)
    with pytest.raises(ConfigError, match=r"--force-awq applies only together with --awq"):
        compress_checkpoint(run, tmp_path / "x", force_awq=True)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------
# CLI (in process: the console script's entry point)


def cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    from sparsert.cli import main

    with pytest.raises(SystemExit) as info:
        main(["compress", *map(str, args)])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16))
    return save(tmp_path_factory.mktemp("dense") / "run", model)


def test_cli_prune_wanda_with_calibration_file(tmp_path: Path, dense_run: Path, capsys) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "art"
    code, stdout, err = cli(capsys, dense_run, "-o", out, "--prune", "wanda", "--calib-data", text,
                            "--calib-batches", 2, "--seed", 3, "--awq", "--group-size", 32)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    art = load_artifact(out)
    assert art.producer["masks"] == "wanda one-shot" and art.quantization.group_size == 32
    assert art.producer["calibration"] == {"data": str(text), "batches": 2, "batch_size": 4, "seq_len": 16, "seed": 3}
    assert all(is_nm_sparse(layer.to_dense()) for layer in art.packed.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prune", "wanda", "--calib-batches", 0], "error: --calib-batches must be a positive integer, got 0"),
        (["--prune", "wanda", "--seed", -1], "error: --seed must be an integer in [0, 2**63 - 1], got -1"),
        (["--prune", "wanda", "--seed", 2**70], f"error: --seed must be an integer in [0, 2**63 - 1], got {2**70}"),
        (["--prune", "wanda", "--calib-batches", 10**9],
         "error: calibration of --calib-batches 1000000000 x --calib-batch-size 4 x --calib-seq-len 16 = "
         "64,000,000,000 tokens is more than the 16,777,216 this tool holds in memory (one-shot pruning needs a "
         "few thousand)"),
        (["--prune", "sparsegpt", "--calib-data", "{tmp}/missing.txt"],
         "error: calibration data ({tmp}/missing.txt): {tmp}/missing.txt: data path does not exist"),
        (["--awq", "--group-size", 32, "--calib-data", "{tmp}/missing.txt"],
         "error: calibration data ({tmp}/missing.txt): {tmp}/missing.txt: data path does not exist"),
    ],
)
def test_cli_bad_calibration_input_exits_2_with_one_line(tmp_path: Path, dense_run: Path, capsys, args, message):
    args = [str(a).format(tmp=tmp_path) for a in args]
    code, _, err = cli(capsys, dense_run, "-o", tmp_path / "art", *args)
    assert code == 2
    assert err.strip().splitlines() == [message.format(tmp=tmp_path)]
    assert not (tmp_path / "art").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]


def test_cli_unknown_prune_method_is_a_usage_error(tmp_path: Path, dense_run: Path, capsys) -> None:
    code, _, err = cli(capsys, dense_run, "-o", tmp_path / "art", "--prune", "obs")
    assert code == 2
    assert "Invalid value for '--prune': 'obs' is not one of 'magnitude', 'wanda', 'sparsegpt'" in err
    assert not (tmp_path / "art").exists()


def test_cli_keep_dense_and_ffn_only_one_shot(tmp_path: Path, dense_run: Path, capsys) -> None:
    """--sparse-layers ffn and --keep-dense on a dense checkpoint: the artifact packs only the chosen layers 2:4 and
    stores the others dense; the same flags on a sparse checkpoint are refused."""
    out = tmp_path / "art"
    code, _, err = cli(capsys, dense_run, "-o", out, "--prune", "wanda", "--sparse-layers", "ffn", "--keep-dense",
                       "*.gate_proj")
    assert code == 0, err
    art = load_artifact(out)
    assert sorted(art.packed) == ["blocks.0.mlp.down_proj", "blocks.0.mlp.up_proj"]
    assert "blocks.0.attn.q_proj.weight" in art.dense and "blocks.0.mlp.gate_proj.weight" in art.dense
    code, _, err = cli(capsys, dense_run, "-o", tmp_path / "bad", "--keep-dense", "blocks.9.*")
    assert code == 2 and "error: --keep-dense 'blocks.9.*': matches none of the 7 layers to make 2:4" in err
    assert not (tmp_path / "bad").exists()
    model = outlier_model("llama")
    sparsify_model(model, SparsityConfig())
    run = save(tmp_path / "sparse", model, sparse=True)
    with pytest.raises(ConfigError, match=r"--sparse-layers chooses the layers one-shot pruning makes 2:4; "
                                          r"checkpoint .* carries trained 2:4 layers, which keep their masks$"):
        compress_checkpoint(run, tmp_path / "bad", sparse_layers="ffn")
