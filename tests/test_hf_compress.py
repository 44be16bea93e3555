"""`sparsert compress HF_DIR -o OUT`: one-shot 2:4 (+INT4) pruning of a Hugging Face causal LM into another
Hugging Face directory that transformers loads and `sparsert generate --backend runtime` serves. Models and
tokenizers are built here from configs (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import _save_bpe_tokenizer, tiny_qwen2_moe  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_generate_cli import run_main  # noqa: E402

from sparsert.runtime.errors import ArtifactError, ConfigError  # noqa: E402
from sparsert.runtime.nm_mask import is_nm_sparse  # noqa: E402
from sparsert.runtime.packed_linear import pack_linear  # noqa: E402
from sparsert.train.hf_compress import compress_hf_model  # noqa: E402
from sparsert.train.hf_model import (  # noqa: E402
    hf_directory_block_linears,
    hf_sparse_linear_names,
    saved_sparse_layers,
    swap_saved_sparse_layers,
)


def _model_dir(root: Path, arch: str) -> Path:
    """A random Llama or GPT-2 (hidden 128: the W4A16 kernel's k tile) with a byte-level BPE tokenizer."""
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    else:
        config = transformers.GPT2Config(vocab_size=320, n_embd=128, n_layer=2, n_head=4, n_positions=64)
    path = root / arch
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    _save_bpe_tokenizer(transformers, path)
    return path


def _block_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every block linear's weight as [out, K] (GPT-2's Conv1D transposed), from the saved directory."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    out = {}
    for name in hf_sparse_linear_names(model):
        module = model.get_submodule(name)
        out[name] = module.weight.detach().t() if type(module).__name__ == "Conv1D" else module.weight.detach()
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsegpt_int4_output_is_2_4_and_requantizes_to_itself(tmp_path, capsys, arch):
    src = _model_dir(tmp_path, arch)
    out = tmp_path / "out"
    code, stdout, err = run_main(capsys, "compress", str(src), "-o", str(out), "--prune", "sparsegpt", "--int4",
                             "--calib-batches", "2", "--calib-seq-len", "32")
    assert code == 0, err
    assert f"wrote {out}: a Hugging Face directory whose" in stdout and "2:4 + INT4 (group 128)" in stdout
    layers = saved_sparse_layers(out)
    weights = _block_weights(out)
    assert set(layers) == set(weights) and len(weights) == 2 * (7 if arch == "llama" else 4)
    for name, w in weights.items():
        assert layers[name]["qat_group_size"] == 128 and layers[name]["transposed"] == (arch == "gpt2")
        assert is_nm_sparse(w, 2, 4), name
        # the stored kept values are INT4 codes times fp16 scales: quantizing them again gives them back
        torch.testing.assert_close(pack_linear(w, int4_group_size=128).to_dense(), w, rtol=0, atol=0)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    pruned = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    head = "lm_head" if arch == "llama" else "transformer.wte"
    assert torch.equal(original.get_submodule(head).weight, pruned.get_submodule(head).weight)  # stays dense
    code, stdout, err = run_main(capsys, "generate", str(out), "--prompt", "The quick", "--max-new-tokens", "4")
    assert code == 0 and stdout.startswith("The quick"), err


def test_sparsegpt_reconstructs_better_than_magnitude(tmp_path):
    """On the calibration text, SparseGPT's layer-wise reconstruction keeps the model closer to the dense one
    than magnitude pruning does (KL of the next-token distributions on held-out windows)."""
    src = _model_dir(tmp_path, "llama")
    with torch.no_grad():  # a dense model with some structure: scale its weights so its outputs are peaked
        model = transformers.AutoModelForCausalLM.from_pretrained(str(src))
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
        model.save_pretrained(str(src))
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Sparse models keep two of every four. " * 40)
    kl = {}
    from sparsert.runtime.hf_tokenizer import HFTokenizer

    ids = torch.tensor([HFTokenizer(src).encode("The lazy dog jumps over the quick brown fox. Models keep two.")])
    dense = model.eval()(ids).logits.log_softmax(-1).detach()
    for method in ("magnitude", "sparsegpt"):
        extra = {} if method == "magnitude" else {"calib_data": text, "calib_batches": 4, "calib_seq_len": 32}
        out, _ = compress_hf_model(src, tmp_path / method, prune=method, **extra)
        got = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits.log_softmax(-1)
        kl[method] = float((dense.exp() * (dense - got.detach())).sum(-1).mean())
    assert kl["sparsegpt"] < kl["magnitude"], kl


def test_a_trained_directory_keeps_its_masks(tmp_path, capsys):
    """A `train --model` run's hf/ (FFN linears trained 2:4, attention dense): --prune is refused, --int4
    quantizes the recorded 2:4 layers only and keeps their masks."""
    from sparsert.train.hf_model import load_hf_causal_lm, save_hf_checkpoint, sparsify_hf_model
    from sparsert.train.sparse_linear import SparsityConfig

    src = _model_dir(tmp_path, "llama")
    bundle = load_hf_causal_lm(src)
    names = sparsify_hf_model(bundle.model, SparsityConfig(), include_attention=False)
    trained = save_hf_checkpoint(bundle.model, bundle.tokenizer, tmp_path / "run-hf")
    code, _, err = run_main(capsys, "compress", str(trained), "-o", str(tmp_path / "x"), "--prune", "wanda")
    assert code == 2 and "already records 2:4 layers (sparsert.json); they keep their trained masks" in err
    out, swapped = compress_hf_model(trained, tmp_path / "int4", int4=True)
    assert sorted(swapped) == sorted(names)
    before, after = _block_weights(trained), _block_weights(out)
    for name in names:  # the trained masks are kept: INT4 can only zero a kept value, never revive a pruned one
        assert is_nm_sparse(after[name], 2, 4)
        assert not ((after[name] != 0) & (before[name] == 0)).any(), name
    attention = "model.layers.0.self_attn.q_proj"
    assert torch.equal(before[attention], after[attention])  # trained dense: untouched


def test_a_dense_model_run_is_pruned_one_shot_from_its_trained_weights(tmp_path, capsys):
    """`compress RUN` of a `train --model ... --dense` run prunes the weights as trained (its hf/ holds their
    magnitude 2:4, recorded like trained masks, so one-shot flags are refused there): --keep-dense layers come out
    exactly as trained, the others 2:4; no scratch copy is left. A sparse run points to its hf/."""
    from sparsert.train.checkpoint import load_checkpoint
    from sparsert.train.train_config import TrainConfig
    from sparsert.train.trainer import train

    src = _model_dir(tmp_path, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Sparse models keep two of every four weights. The quick brown fox jumps. " * 60)
    common = dict(hf_model=str(src), data=str(corpus), steps=1, batch_size=2, seq_len=32, eval_interval=1,
                  eval_batches=1, ckpt_interval=1, threads=1, progress=False)
    run = train(TrainConfig(**common, dense=True, out_dir=str(tmp_path / "dense"))).run_dir
    code, _, err = run_main(capsys, "compress", str(run / "hf"), "-o", str(tmp_path / "x"), "--keep-dense", "*.o_proj")
    assert code == 2 and "already records trained 2:4 layers" in err
    out = tmp_path / "out" / "pruned"
    code, stdout, err = run_main(capsys, "compress", str(run), "-o", str(out), "--prune", "wanda",
                                 "--keep-dense", "*.o_proj")
    assert code == 0, err
    assert "block linears are 2:4" in stdout and sorted(p.name for p in out.parent.iterdir()) == ["pruned"]
    trained = load_checkpoint(run).model_state
    pruned = _block_weights(out)
    assert len(pruned) == 14
    for name, weight in pruned.items():
        if name.endswith("o_proj"):
            assert torch.equal(weight, trained[f"hf.{name}.weight"]), name
        else:
            assert is_nm_sparse(weight, 2, 4), name
    code, _, err = run_main(capsys, "compress", str(run), "-o", str(tmp_path / "new" / "sub" / "x"), "--keep-dense",
                            "nomatch*")  # checked before the weights are copied; no directory is left
    assert code == 2 and "--keep-dense 'nomatch*': matches none" in err and not (tmp_path / "new").exists()
    code, _, err = run_main(capsys, "compress", str(run), "-o", str(tmp_path / "y"), "--awq")
    assert code == 2 and f"--awq (and --force-awq) fold scales into the norms of built-in sparsert checkpoints; {run}" \
        in err
    sparse = train(TrainConfig(**common, out_dir=str(tmp_path / "sparse"))).run_dir
    code, _, err = run_main(capsys, "compress", str(sparse), "-o", str(tmp_path / "z"))
    assert code == 2 and "`sparsert compress RUN/hf` quantizes it" in err


def test_sigterm_and_notes_of_a_scratch_copy(tmp_path, capsys):
    """What `compress RUN` of a dense run relies on: SIGTERM (and Slurm's SIGUSR1) unwinds the `finally` that removes
    the scratch copy (exit status 143, 138), and its notes name the run instead of the scratch directory."""
    import subprocess
    import sys
    import textwrap
    import warnings

    from sparsert.commands.compress import _notes_as_lines
    from sparsert.train.compress import CompressionNote

    scratch = tmp_path / "scratch"
    for sig, status, said in (("SIGTERM", 143, "terminated\n"), ("SIGUSR1", 138, "terminated by SIGUSR1\n")):
        code = textwrap.dedent(f"""
            import os, pathlib, shutil, signal
            import sparsert.cli
            scratch = pathlib.Path({str(scratch)!r})

            def command(**kw):  # stands in for a command's work: sparsert's main() around it is the real one
                scratch.mkdir()
                try:
                    os.kill(os.getpid(), signal.{sig})
                    signal.pause()
                finally:
                    shutil.rmtree(scratch)

            sparsert.cli.cli.main = command
            sparsert.cli.main([])
        """)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == status, result.stderr
        assert result.stderr == said
        assert not scratch.exists()
    with _notes_as_lines(rename=("/scratch/model", "RUN (its dense weights)")):
        warnings.warn("/scratch/model: 2 weights stay dense", CompressionNote, stacklevel=1)
    assert capsys.readouterr().err == "note: RUN (its dense weights): 2 weights stay dense\n"


def test_bad_input_is_named(tmp_path, capsys):
    src = _model_dir(tmp_path, "llama")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    own = tmp_path / "own"  # an earlier output, with a folder of the user's put inside
    (own / "sub").mkdir(parents=True)
    (own / "sparsert.json").write_text("{}")
    capsys.readouterr()  # transformers' saving output
    cases = [
        (["-o", str(junk)], "already exists and is not a Hugging Face directory sparsert wrote"),
        (["-o", str(src)], "the same directory as the model"),
        (["-o", str(own)], f"-o {own}: holds sub, which is not part of the Hugging Face directory sparsert writes"),
        (["-o", str(tmp_path / "o"), "--awq"], "--awq (and --force-awq) fold scales into sparsert checkpoints' norms"),
        (["-o", str(tmp_path / "o"), "--calib-data", str(junk / "a.txt")],
         "--calib-data applies only to --prune wanda/sparsegpt"),
        (["-o", str(tmp_path / "o"), "--force-group-size"],
         "--force-group-size applies only together with --group-size"),
        (["-o", str(tmp_path / "o"), "--int4", "--group-size", "96"], "K=128 (its input features) is not divisible by "
                                                                      "the INT4 group size 96"),
        (["-o", str(tmp_path / "o"), "--prune", "wanda", "--calib-seq-len", "65"],
         "--calib-seq-len 65 exceeds the model's context of 64"),
        (["-o", str(src / "sub")], "a directory inside the model directory"),
        (["-o", str(tmp_path)], "a directory above the model directory"),
        (["-o", str(tmp_path / "o"), "--force-awq"], "--awq (and --force-awq) fold scales"),
        (["-o", str(tmp_path / "o"), "--group-size", "64"], "--group-size sets the INT4 groups; this compression "
                                                            "stores no INT4 (add --int4)"),
        (["-o", str(tmp_path / "o"), "--int4", "--group-size", "0"], "group size must be a positive multiple of 4"),
        (["-o", str(tmp_path / "o"), "--prune", "wanda", "--calib-batches", "0"],
         "--calib-batches must be a positive integer, got 0"),
        (["-o", str(tmp_path / "o"), "--prune", "wanda", "--seed", "-1"],
         "--seed must be an integer in [0, 2**63 - 1]"),
    ]
    for extra, message in cases:
        code, _, err = run_main(capsys, "compress", str(src), *extra)
        last = err.strip().splitlines()[-1]  # in-process, transformers (imported by the test) may draw its bar first
        assert code == 2 and last.startswith("error: ") and message in last, (extra, err)
    assert not (tmp_path / "o").exists() and not (src / "sub").exists()
    (src / "sparsert.json").write_text(json.dumps({"format": "sparsert-hf-checkpoint", "sparse_layers": {}}))
    with pytest.raises(ConfigError, match="the same directory as the model"):
        compress_hf_model(src, tmp_path / "llama" / ".." / "llama")


def test_a_model_with_a_nan_weight_is_refused_naming_the_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = _model_dir(tmp_path, "llama")
    weights = load_file(str(src / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    code, _, err = run_main(capsys, "compress", str(src), "-o", str(tmp_path / "o"))
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: {src}: the model's tensor 'model.layers.0.mlp.up_proj.weight' holds non-finite values (NaN or "
        "infinity)")
    assert not (tmp_path / "o").exists()


def test_dtype_and_a_record_without_2_4_layers(tmp_path, capsys):
    src = _model_dir(tmp_path, "llama")
    for dtype in ("float16", "bfloat16"):
        code, _, err = run_main(capsys, "compress", str(src), "-o", str(tmp_path / dtype), "--dtype", dtype)
        assert code == 0, err
        config = json.loads((tmp_path / dtype / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / dtype))
        assert model.model.layers[0].mlp.up_proj.weight.dtype == getattr(torch, dtype)
    record = tmp_path / "float16" / "sparsert.json"
    meta = json.loads(record.read_text())
    for info in meta["sparse_layers"].values():
        info.update(n=4, m=8)  # what a 4:8 run records
    record.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"records no 2:4 layer \(its sparse layers are 4:8\)"):
        compress_hf_model(tmp_path / "float16", tmp_path / "x", int4=True)
    first = next(iter(meta["sparse_layers"]))
    meta["sparse_layers"] = {n: dict(info, n=2, m=4) if n != first else info
                             for n, info in meta["sparse_layers"].items()}
    record.write_text(json.dumps(meta))
    code, _, err = run_main(capsys, "compress", str(tmp_path / "float16"), "-o", str(tmp_path / "y"))
    assert code == 0 and (f"note: 1 layer(s) recorded with another N:M pattern (4:8, e.g. {first}) stay as stored"
                          in err), err


def test_inspect_a_compressed_directory(tmp_path, capsys):
    """`sparsert inspect` on a directory `compress` wrote: every recorded layer 2:4 with half its weights zero and
    the served bits per weight (3 + 16/g with INT4). A plain transformers directory lists every block linear, 2:4
    ones (weights from elsewhere) served at 9 bits."""
    from sparsert.train.hf_inspect import hf_dir_stats

    src = _model_dir(tmp_path, "gpt2")
    out = tmp_path / "out"
    assert run_main(capsys, "compress", str(src), "-o", str(out), "--int4", "--group-size", "64")[0] == 0
    stats = hf_dir_stats(out)
    assert len(stats.layers) == 8 and stats.served_bits_per_weight == 3.25
    for layer in stats.layers:
        assert layer.is_2_4 and layer.recorded == "2:4+int4 g64" and 0.5 <= layer.zeros < 0.6
    c_fc = next(layer for layer in stats.layers if layer.name.endswith("mlp.c_fc"))
    assert (c_fc.out_features, c_fc.in_features) == (512, 128)  # Conv1D stored [K, out]: reported [out, K]
    stored = load_file(str(out / "model.safetensors"))
    assert stats.total_weights == sum(t.numel() for t in stored.values())
    assert stats.recorded_share == pytest.approx(sum(stored[f"{layer.name}.weight"].numel() for layer in stats.layers)
                                                 / stats.total_weights)
    code, stdout, err = run_main(capsys, "inspect", str(out))
    assert code == 0 and "recorded layers served at 3.250 bits/weight (4.92x smaller than 16-bit dense)" in stdout
    assert f"they hold {stats.recorded_share:.1%} of the directory's {stats.total_weights:,} weights" in stdout
    code, stdout, _ = run_main(capsys, "inspect", str(out), "--json")
    assert code == 0 and json.loads(stdout)["served_bits_per_weight"] == 3.25
    code, stdout, _ = run_main(capsys, "inspect", str(src))  # a plain directory: every block linear, none 2:4
    assert code == 0 and stdout.startswith(f"{src}: a Hugging Face directory sparsert did not write (no "
                                           "sparsert.json); 0 of its 8 block linears are 2:4 along K")
    assert "block linears served at 16.000 bits/weight" in stdout and "sparsert compress" not in stdout

    plain = tmp_path / "plain-24"  # 2:4 weights from elsewhere: the compressed weights without sparsert.json
    plain.mkdir()
    for f in out.iterdir():
        if f.name != "sparsert.json":
            (plain / f.name).write_bytes(f.read_bytes())
    found = hf_dir_stats(plain)
    assert not found.recorded and [layer.name for layer in found.layers] == [layer.name for layer in stats.layers]
    assert all(layer.is_2_4 and layer.recorded == "-" and layer.served_bits == 9.0 for layer in found.layers)
    assert (next(layer for layer in found.layers if layer.name.endswith("mlp.c_fc")).out_features,) == (512,)
    code, stdout, _ = run_main(capsys, "inspect", str(plain))
    assert code == 0 and "8 of its 8 block linears are 2:4 along K" in stdout
    assert f"sparsert compress {plain} -o OUT records the 2:4 ones" in stdout

    meta = json.loads((out / "sparsert.json").read_text())
    edited = {name: dict(info, qat_group_size=48) for name, info in meta["sparse_layers"].items()}
    (out / "sparsert.json").write_text(json.dumps({**meta, "sparse_layers": edited}))  # 48 divides no K here
    code, _, err = run_main(capsys, "inspect", str(out))
    assert code == 2 and "records INT4 group size 48, which does not divide its K=128" in err
    (out / "sparsert.json").write_text(json.dumps({**meta, "sparse_layers": {}}))  # records no layer
    code, stdout, _ = run_main(capsys, "inspect", str(out))
    assert code == 0 and stdout.rstrip().endswith("no recorded layers: every weight stays as stored")
    (out / "sparsert.json").write_text(json.dumps(meta))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_inner": 256}))  # the weights hold 512
    code, _, err = run_main(capsys, "inspect", str(out))
    assert code == 2 and "config.json does not match the weights: 6 tensor(s) of another shape, " in err, err
    (out / "config.json").write_text(json.dumps(config))
    (out / "sparsert.json").write_text(json.dumps({**meta, "sparse_layers": {
        **meta["sparse_layers"], "transformer.h.7.mlp.c_fc": meta["sparse_layers"]["transformer.h.0.mlp.c_fc"]}}))
    code, _, err = run_main(capsys, "inspect", str(out))
    assert code == 2 and "records layer 'transformer.h.7.mlp.c_fc', which the model its config.json describes" in err


def _moe_dir(root: Path, **kwargs: int) -> Path:
    src = root / "moe"
    tiny_qwen2_moe(**kwargs).save_pretrained(str(src))
    _save_bpe_tokenizer(transformers, src)
    return src


def test_fused_moe_experts_are_pruned_2_4_and_load_back_fused(tmp_path, capsys):
    """transformers 5's Qwen2-MoE keeps its experts in 3-D parameters: compress unfuses them into per-expert
    linears and prunes each 2:4 with the other block linears (the routers stay dense), and writes them back
    fused: transformers loads the directory, every expert matrix is 2:4 along K, INT4 values are exact codes of
    their group, and inspect lists the experts."""
    src = _moe_dir(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_main(capsys, "compress", str(src), "-o", str(out), "--int4", "--group-size", "32")
    assert code == 0 and "wrote" in stdout and "note:" not in err
    recorded = saved_sparse_layers(out)
    experts = [f"model.layers.0.mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_up_proj", "down_proj")]
    assert set(experts) <= set(recorded) and "model.layers.0.mlp.shared_expert.up_proj" in recorded
    assert "model.layers.0.mlp.shared_expert_gate" not in recorded  # a router: 1 output, kept dense
    assert all(recorded[n]["qat_group_size"] == 32 for n in experts)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    moe = model.model.layers[0].mlp.experts
    for fused in (moe.gate_up_proj, moe.down_proj):  # [experts, out, K]
        for w in fused.detach():
            assert is_nm_sparse(w, 2, 4)
            packed = pack_linear(w, int4_group_size=32, mask=w != 0)
            assert torch.equal(packed.to_dense().float(), w)
    code, stdout, _ = run_main(capsys, "inspect", str(out))
    assert code == 0 and "model.layers.0.mlp.experts.3.down_proj" in stdout and "MoE routers" in stdout
    code, stdout, _ = run_main(capsys, "inspect", str(out), "--json")
    held = sum(model.get_parameter(p).numel() for p in ("model.layers.0.mlp.experts.gate_up_proj",
                                                         "model.layers.0.mlp.experts.down_proj"))
    held += sum(model.get_submodule(n).weight.numel() for n in recorded if ".experts." not in n)
    assert json.loads(stdout)["recorded_share"] == pytest.approx(held / sum(p.numel() for p in model.parameters()))
    args = ["generate", str(out), "--prompt", "hello world", "--max-new-tokens", "6", "--json"]
    code, stdout, err = run_main(capsys, *args)
    assert code == 0, err
    code, onnx_out, err = run_main(capsys, *args, "--backend", "onnx")  # the experts as per-expert MatMuls
    assert code == 0 and json.loads(onnx_out)["ids"] == json.loads(stdout)["ids"], err
    assert "note: 8 MoE expert matrices exported as per-expert MatMuls" in err and "warning:" not in err
    from sparsert.train import hf_inspect

    stats = hf_inspect.hf_dir_stats(out)  # experts read from their per-expert tensors on disk: no model is built
    with mock.patch.object(hf_inspect, "_fits_hidden_size", return_value=False):
        assert stats == hf_inspect.hf_dir_stats(out)  # ... as the model transformers loads holds them
    with mock.patch.object(hf_inspect, "_weights_from_model", side_effect=AssertionError("model loaded")):
        assert hf_inspect.hf_dir_stats(out) == stats
    gate_up = next(layer for layer in stats.layers if layer.name == "model.layers.0.mlp.experts.1.gate_up_proj")
    assert (gate_up.out_features, gate_up.in_features) == tuple(moe.gate_up_proj.shape[1:]) and gate_up.is_2_4
    meta = json.loads((out / "sparsert.json").read_text())
    meta["sparse_layers"]["model.layers.0.mlp.experts.9.down_proj"] = recorded[experts[1]]  # 4 experts: no 9th
    (out / "sparsert.json").write_text(json.dumps(meta))
    code, _, err = run_main(capsys, "compress", str(out), "-o", str(tmp_path / "again"))
    assert code == 2 and err.strip() == (f"error: {out / 'sparsert.json'} records layer "
                                         "'model.layers.0.mlp.experts.9.down_proj', which the model does not have")


def test_serving_a_saved_moe_unfuses_only_served_experts_and_an_error_changes_nothing(tmp_path, capsys):
    """swap_saved_sparse_layers unfuses only the experts modules holding a 2:4 expert (a layer kept dense stays
    fused, on transformers' kernels), so the served model saves to a checkpoint transformers loads whole; a record
    the model does not fit is refused before anything is swapped, and the experts are fused again."""
    from sparsert.runtime.moe_experts import UnfusedExperts

    config = transformers.MixtralConfig(vocab_size=320, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    src, out = tmp_path / "mixtral", tmp_path / "out"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(src))
    code, _, err = run_main(capsys, "compress", str(src), "-o", str(out), "--keep-dense", "*.layers.1.*")
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    fused_class = type(model.model.layers[1].mlp.experts)
    swap_saved_sparse_layers(model, out, token_counts=None)
    assert isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)
    assert type(model.model.layers[1].mlp.experts) is fused_class
    model.save_pretrained(str(tmp_path / "saved"))
    _, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    meta = json.loads((out / "sparsert.json").read_text())
    meta["sparse_layers"]["model.layers.0.mlp.experts.9.down_proj"] = meta["sparse_layers"][
        "model.layers.0.mlp.experts.1.down_proj"]  # 4 experts: no 9th
    (out / "sparsert.json").write_text(json.dumps(meta))
    fresh = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ConfigError, match=r"no layer 'model\.layers\.0\.mlp\.experts\.9\.down_proj'"):
        swap_saved_sparse_layers(fresh, out, token_counts=None)
    assert type(fresh.model.layers[0].mlp.experts) is fused_class
    after = fresh.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())

    from sparsert.train.hf_inspect import hf_dir_stats  # Mixtral's on-disk names (w1/w2/w3) hold 4 experts

    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    with pytest.raises(ArtifactError, match=r"config.json does not match the weights: it gives "
                                            r"model\.layers\.0\.mlp\.experts 8 experts, but the weights hold no "
                                            r"tensor for model\.layers\.0\.mlp\.experts\.4\.gate_up_proj"):
        hf_dir_stats(out)


def test_stored_experts_that_do_not_stack_are_named(tmp_path):
    """transformers builds fused experts from per-expert tensors on load; when one is missing it raises only "see
    the above report" (a report sparsert keeps quiet): the error names the fused tensor and the cause instead."""
    from safetensors.torch import save_file

    from sparsert.runtime.errors import ArtifactError
    from sparsert.train.hf_inspect import hf_dir_stats
    from sparsert.train.hf_model import load_hf_causal_lm

    src, out = tmp_path / "moe", tmp_path / "moe-24"
    tiny_qwen2_moe().save_pretrained(str(src))
    compress_hf_model(src, out)
    stored = load_file(str(out / "model.safetensors"))
    up = next(k for k in stored if ".experts.3.up_proj" in k)
    message = (r"moe-24: cannot load the model weights \(cannot build 'model\.layers\.0\.mlp\.experts\.gate_up_proj' "
               r"from the stored tensors: \S.*\)$")
    lacking = r"the weights hold no tensor for model\.layers\.0\.mlp\.experts\.3\.gate_up_proj$"
    for broken, inspected in (({k: v for k, v in stored.items() if k != up}, lacking),
                              ({**stored, up: stored[up][:-8]}, message)):  # inspect loads what does not fit
        save_file(broken, str(out / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ArtifactError, match=message):
            load_hf_causal_lm(out)
        with pytest.raises(ArtifactError, match=inspected):
            hf_dir_stats(out)


def test_experts_without_calibration_tokens_fall_back_to_magnitude(tmp_path, capsys):
    """Wanda on experts: each expert sees only the tokens routed to it; with 16 experts and 4 calibration tokens
    most see none, are pruned by magnitude instead, and a note says how many."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=16,
                                        num_experts_per_tok=1, max_position_embeddings=64)
    src, out = tmp_path / "mixtral", tmp_path / "out"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(src))
    _save_bpe_tokenizer(transformers, src)
    code, _, err = run_main(capsys, "compress", str(src), "-o", str(out), "--prune", "wanda", "--calib-batches", "1",
                            "--calib-batch-size", "1", "--calib-seq-len", "4")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "MoE expert layer(s) received no calibration token" in notes[0]
    assert "pruned by magnitude instead of wanda" in notes[0] and "--calib-batches" in notes[0]
    unrouted = int(notes[0].split()[1])
    assert 2 * 12 <= unrouted < 2 * 16  # at most 4 experts are reached, each with its two layers
    recorded = saved_sparse_layers(out)
    assert sum(".experts." in n for n in recorded) == 32


@pytest.mark.filterwarnings("ignore:.*falling back to dense")  # the tiny attention shapes on the CPU path
def test_compressed_moe_experts_are_served_2_4(tmp_path):
    """swap_saved_sparse_layers on a compressed MoE directory (as generate --backend runtime loads it): the experts
    are unfused, packed 2:4 + INT4 like the other recorded layers, and the logits stay transformers' own."""
    from sparsert.runtime.dispatch import SparseLinearGPU
    from sparsert.runtime.moe_experts import fused_experts_modules
    from sparsert.train.hf_model import load_hf_causal_lm, swap_saved_sparse_layers

    src = _moe_dir(tmp_path, hidden=128)
    out, names = compress_hf_model(src, tmp_path / "out", int4=True, group_size=64)
    model, reference = load_hf_causal_lm(out).model, load_hf_causal_lm(out).model
    report = swap_saved_sparse_layers(model, out, token_counts=[1])
    assert set(report.swapped) == set(names) and not report.outside_linears
    assert isinstance(model.get_submodule("model.layers.0.mlp.experts.2.gate_up_proj"), SparseLinearGPU)
    assert report.swapped["model.layers.0.mlp.experts.2.gate_up_proj"] == "2:4+int4 g64"
    ids = torch.tensor([[5, 17, 9, 3, 50, 42]])
    with torch.no_grad():
        got, want = model(ids).logits.float(), reference(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-2
    meta = json.loads((out / "sparsert.json").read_text())  # a record without the experts: they stay fused
    meta["sparse_layers"] = {n: info for n, info in meta["sparse_layers"].items() if ".experts." not in n}
    (out / "sparsert.json").write_text(json.dumps(meta))
    model = load_hf_causal_lm(out).model
    swap_saved_sparse_layers(model, out, token_counts=[1])
    assert list(fused_experts_modules(model)) == ["model.layers.0.mlp.experts"]


def test_sparse_layers_and_keep_dense_choose_the_pruned_layers(tmp_path, capsys):
    """--sparse-layers ffn --keep-dense PATTERN: only the chosen MLP linears become 2:4 (recorded in sparsert.json,
    exported and annotated as such); the others keep their stored weights. A pattern that matches nothing, one
    that leaves nothing to prune, or the flags on a directory with trained 2:4 layers are refused in one line."""
    from sparsert.export.hf_export import export_hf_model

    src = _model_dir(tmp_path, "llama")
    out, names = compress_hf_model(src, tmp_path / "ffn", prune="wanda", calib_batches=2, sparse_layers="ffn",
                                   keep_dense=("*.layers.1.mlp.down_proj",))
    expected = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    expected.remove("model.layers.1.mlp.down_proj")
    assert names == expected and sorted(saved_sparse_layers(out)) == sorted(expected)
    before, after = _block_weights(src), _block_weights(out)
    for name, w in after.items():
        if name in expected:
            assert is_nm_sparse(w, 2, 4) and (w == 0).float().mean().item() == pytest.approx(0.5), name
        else:
            torch.testing.assert_close(w, before[name], rtol=0, atol=0)
    result, _ = export_hf_model(out, tmp_path / "m.onnx", with_kv_cache=False)
    assert result.parity.passed
    assert sorted(n for n, info in result.layers.items() if info["pattern"] == "2:4") == sorted(expected)

    for kw, message in (
        ({"keep_dense": ("*.attn.*",)}, r"--keep-dense '\*\.attn\.\*': matches none of the 14 layers to make 2:4 "
                                        r"\(module names such as 'model\.layers\.0\.self_attn\.q_proj'"),
        ({"sparse_layers": "ffn", "keep_dense": ("*.mlp.*",)}, r"--keep-dense \*\.mlp\.\*: keeps every layer dense"),
        ({"sparse_layers": "most"}, r"--sparse-layers: expected one of all, ffn, got 'most'"),
    ):
        with pytest.raises(ConfigError, match=message):
            compress_hf_model(src, tmp_path / "bad", **kw)
    with pytest.raises(ConfigError, match=r"--keep-dense: expected a list of layer name patterns, got the string"):
        compress_hf_model(src, tmp_path / "bad", keep_dense="*.q_proj")
    assert not (tmp_path / "bad").exists()
    broken = tmp_path / "broken"  # a config transformers cannot build a model from: one line, before any weight
    broken.mkdir()
    config = json.loads((src / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    for extra in ([], ["--keep-dense", "*q_proj"]):
        code, _, err = run_main(capsys, "compress", str(broken), "-o", str(tmp_path / "x"), *extra)
        assert code == 2 and err.strip().splitlines() == [
            f"error: {broken}: cannot read the model config (The hidden size (128) is not a multiple of the number "
            "of attention heads (5).)"]
    gpt2 = tmp_path / "gpt2-bad"  # a config that validates, but no model can be built from: one line as well
    gpt2.mkdir()
    transformers.GPT2Config(n_embd=128, n_head=5, n_layer=1).save_pretrained(str(gpt2))
    with pytest.raises(ConfigError, match=r"gpt2-bad: cannot build the model from its config.json \(.*divisible"):
        hf_directory_block_linears(gpt2)
    code, _, err = run_main(capsys, "compress", str(out), "-o", str(tmp_path / "again"), "--keep-dense", "*q_proj")
    assert code == 2 and err.strip().splitlines() == [
        f"error: --keep-dense chooses the layers one-shot pruning makes 2:4; {out} already records trained 2:4 "
        "layers (sparsert.json), which keep their masks"]
