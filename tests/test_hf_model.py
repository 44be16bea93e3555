"""Hugging Face causal LMs: load a local directory, sparsify, SR-STE steps, save back, reload with transformers.

Every model and tokenizer is built here from a config (random weights, a byte-level BPE trained on a few
sentences): nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402

from sparsert.runtime.errors import ArtifactError, ConfigError  # noqa: E402
from sparsert.runtime.hf_tokenizer import HFTokenizer, import_transformers  # noqa: E402
from sparsert.runtime.nm_mask import is_nm_sparse  # noqa: E402
from sparsert.runtime.tokenizer import tokenizer_from_dict  # noqa: E402
from sparsert.train.hf_model import (  # noqa: E402
    check_causal_lm_config,
    hf_forward,
    hf_sparse_linear_names,
    load_hf_causal_lm,
    load_hf_config,
    save_hf_checkpoint,
    sparsify_hf_model,
)
from sparsert.train.sparse_linear import SparseLinear, SparsityConfig  # noqa: E402
from sparsert.train.sparsify import refresh_masks, sparse_modules  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. Sparse models keep two of every four weights. "
        "Zwei von vier Gewichten bleiben übrig, the rest are zero. ") * 4


@pytest.fixture(scope="module")
def hf_dirs(hf_model_dirs: dict[str, Path]) -> dict[str, Path]:
    """llama, qwen2, gpt2 (vocab 320) and bert directories (tests/conftest.py)."""
    return hf_model_dirs


def _batch(tok: HFTokenizer, batch: int = 2, seq: int = 24) -> torch.Tensor:
    ids = torch.tensor(tok.encode(TEXT))
    assert ids.numel() >= batch * (seq + 1)
    return ids[: batch * (seq + 1)].reshape(batch, seq + 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_sparsify_train_save_reload(arch: str, hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    bundle = load_hf_causal_lm(hf_dirs[arch])
    model, tok = bundle.model, bundle.tokenizer
    assert isinstance(tok, HFTokenizer)
    # transformers picks the tokenizer class from model_type; Qwen2's adds '<|endoftext|>' (301 tokens)
    assert tok.vocab_size == len(transformers.AutoTokenizer.from_pretrained(str(hf_dirs[arch]))) >= 300
    names = sparsify_hf_model(model, SparsityConfig(decay=2e-4))
    per_block = 7 if arch != "gpt2" else 4  # q,k,v,o,gate,up,down | c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert len(names) == 2 * per_block and list(sparse_modules(model)) == names
    assert not any("lm_head" in n or "emb" in n or "wte" in n for n in names)
    for module in sparse_modules(model).values():
        assert is_nm_sparse(module.weight * module.mask, 2, 4)

    batch = _batch(tok)
    x, y = batch[:, :-1], batch[:, 1:]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = hf_forward(model, x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        refresh_masks(model)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

    model.eval()
    with torch.no_grad():
        expected = hf_forward(model, x)
    out = save_hf_checkpoint(model, tok, tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary directory left behind
    meta = json.loads((out / "sparsert.json").read_text())
    assert sorted(meta["sparse_layers"]) == sorted(names)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        got = reloaded(input_ids=x).logits.float()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    tensors = load_file(str(out / "model.safetensors"))
    assert not any(k.endswith(".mask") for k in tensors)
    for name in names:
        w = tensors[f"{name}.weight"]
        if arch == "gpt2":
            assert type(reloaded.get_submodule(name)).__name__ == "Conv1D"
            assert not is_nm_sparse(w, 2, 4)  # [in, out]: the groups run along the input rows
            w = w.t()
        assert is_nm_sparse(w, 2, 4), name
        assert (w == 0).float().mean().item() == pytest.approx(0.5)
    emb = reloaded.get_input_embeddings().weight
    assert (emb == 0).float().mean().item() < 0.01  # embeddings stay dense
    reloaded_tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert reloaded_tok.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)


def test_qat_weights_saved_as_trained(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    bundle = load_hf_causal_lm(hf_dirs["llama"])
    names = sparsify_hf_model(bundle.model, SparsityConfig(qat_group_size=32), include_attention=False)
    assert len(names) == 6 and all(".mlp." in n for n in names)
    x = _batch(bundle.tokenizer)[:, :-1]
    with torch.no_grad():
        expected = hf_forward(bundle.model.eval(), x)
    out = save_hf_checkpoint(bundle.model, None, tmp_path / "q")
    reloaded = load_hf_causal_lm(out)
    assert reloaded.tokenizer is None

    # consume=True (compress, save_hf_run: the model is dropped after the save) writes the same tensors and leaves
    # each sparse layer holding its folded weight instead of a second copy beside it.
    consumed = save_hf_checkpoint(bundle.model, None, tmp_path / "consumed", consume=True)
    saved, again = load_file(str(out / "model.safetensors")), load_file(str(consumed / "model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    for name in names:
        assert torch.equal(bundle.model.get_submodule(name).weight, saved[f"{name}.weight"])
    with torch.no_grad():
        torch.testing.assert_close(hf_forward(reloaded.model, x), expected, atol=1e-5, rtol=1e-5)
    w = reloaded.model.get_submodule(names[0]).weight
    assert is_nm_sparse(w, 2, 4)
    # INT4 fake quantization: at most 16 levels per group of 32 columns
    assert all(len(torch.unique(g)) <= 16 for g in w.reshape(-1, 32))


def test_sparse_linear_names_flags(hf_dirs: dict[str, Path]) -> None:
    model = load_hf_causal_lm(hf_dirs["gpt2"], load_tokenizer=False).model
    assert hf_sparse_linear_names(model, include_attention=False) == [
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj"]
    assert hf_sparse_linear_names(model, include_mlp=False)[:2] == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    with pytest.raises(ConfigError, match="both off, nothing to sparsify"):
        hf_sparse_linear_names(model, include_attention=False, include_mlp=False)
    sparsify_hf_model(model, include_attention=False)
    assert isinstance(model.get_submodule("transformer.h.0.mlp.c_fc"), SparseLinear)
    assert type(model.get_submodule("transformer.h.0.attn.c_attn")).__name__ == "Conv1D"


@pytest.mark.parametrize("config_name, kwargs, ffn", [
    ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32),
     ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]),  # fc1/fc2 directly in the decoder layer
    ("XGLMConfig", dict(d_model=32, ffn_dim=64, num_layers=1, attention_heads=2), ["model.layers.0.fc1",
                                                                                  "model.layers.0.fc2"]),
    ("RecurrentGemmaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  lru_width=32, attention_window_size=16, block_types=["recurrent"]),
     ["model.layers.0.mlp_block.gate_proj", "model.layers.0.mlp_block.up_proj", "model.layers.0.mlp_block.down_proj"]),
    ("GraniteMoeHybridConfig", dict(hidden_size=64, intermediate_size=64, shared_intermediate_size=128,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                    num_experts_per_tok=1, layer_types=["mamba"], mamba_n_heads=4, mamba_d_head=32,
                                    mamba_n_groups=1, mamba_d_state=16, mamba_expand=2),
     ["model.layers.0.block_sparse_moe.experts.0.gate_up_proj", "model.layers.0.block_sparse_moe.experts.0.down_proj",
      "model.layers.0.block_sparse_moe.experts.1.gate_up_proj", "model.layers.0.block_sparse_moe.experts.1.down_proj",
      "model.layers.0.shared_mlp.input_linear", "model.layers.0.shared_mlp.output_linear"]),
])
def test_ffn_layers_of_other_layouts(config_name: str, kwargs: dict, ffn: list[str]) -> None:
    """--sparse-layers ffn finds the feed-forward linears of models whose FFN is not under a module named "mlp"
    (fc1/fc2 in the layer, ``mlp_block``, ``shared_mlp``), and leaves recurrence / state-space projections
    (``temporal_block``, ``mamba``) and attention dense."""
    transformers = import_transformers()
    from sparsert.runtime.moe_experts import unfuse_experts
    from sparsert.train.sparsify import select_sparse_layers

    kwargs.setdefault("num_hidden_layers", 1)
    if config_name == "XGLMConfig":
        kwargs.pop("num_hidden_layers")
    config = getattr(transformers, config_name)(vocab_size=64, max_position_embeddings=64, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config)
    unfuse_experts(model)
    assert sorted(select_sparse_layers(hf_sparse_linear_names(model), "ffn")) == sorted(ffn)


def test_not_a_causal_lm_is_refused(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    bert = hf_dirs["bert"]
    with pytest.raises(ConfigError, match=r"bert: not a causal language model \(model_type 'bert' is an encoder; "
                                          r"expected a decoder-only causal LM"):
        load_hf_causal_lm(bert)
    bart = transformers.BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1)
    with pytest.raises(ConfigError, match=r"model_type 'bart' is an encoder-decoder"):
        check_causal_lm_config(bart, "bart")
    empty = tmp_path / "no_config"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no_config: no config.json, not a Hugging Face model directory"):
        load_hf_causal_lm(empty)
    with pytest.raises(ConfigError, match=r"missing: Hugging Face model directory does not exist"):
        load_hf_causal_lm(tmp_path / "missing")


def test_a_router_choosing_more_experts_than_it_has_is_refused(tmp_path: Path) -> None:
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=8)
    config.save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match=r"config.json: num_experts_per_tok 8 exceeds num_local_experts 4 \(each "
                                          r"token is routed to that many distinct experts\)"):
        load_hf_config(tmp_path)


def test_weights_not_matching_config_are_refused(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = hf_dirs["llama"]
    bad = tmp_path / "three_layers"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"three_layers: the weights lack \d+ tensor\(s\) of the model, "
                                            r"e.g. 'model.layers.2."):
        load_hf_causal_lm(bad)
    config["num_hidden_layers"] = 2
    vocab = config["vocab_size"]
    (bad / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(ArtifactError, match=r"three_layers: config.json does not match the weights: \d+ tensor\(s\) of "
                                            rf"another shape, 'lm_head.weight' is \[{vocab}, \d+\] in the "
                                            r"weights but \[100, \d+\] by config.json"):
        load_hf_causal_lm(bad)
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:1000])  # truncated
    with pytest.raises(ArtifactError, match=r"three_layers: cannot load the model weights \(Error while deserial"):
        load_hf_causal_lm(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"three_layers: no model weights"):
        load_hf_causal_lm(bad)


def test_save_refuses_existing_directory(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    bundle = load_hf_causal_lm(hf_dirs["qwen2"])
    sparsify_hf_model(bundle.model)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"out: output directory already exists \(pass overwrite=True"):
        save_hf_checkpoint(bundle.model, bundle.tokenizer, target)
    save_hf_checkpoint(bundle.model, bundle.tokenizer, target, overwrite=True)
    assert not (target / "old.txt").exists() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hf_tokenizer_adapter(hf_dirs: dict[str, Path]) -> None:
    from sparsert.train.data import Corpus, TokenData

    tok = HFTokenizer(hf_dirs["llama"])
    ids = tok.encode("Zwei von vier, übrig.")
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == "Zwei von vier, übrig."
    assert tok.encode_numpy("the fox").dtype.name == "int32"
    d = tok.to_dict()
    assert d == {"type": "hf", "path": str(hf_dirs["llama"].resolve()), "vocab_size": 300}
    assert HFTokenizer.from_dict(d).encode("lazy dog") == tok.encode("lazy dog")
    rebuilt = tokenizer_from_dict(d)  # how a checkpoint's or artifact's tokenizer is read back
    assert isinstance(rebuilt, HFTokenizer) and rebuilt.encode("lazy dog") == tok.encode("lazy dog")
    with pytest.raises(ConfigError, match=r"nowhere: Hugging Face tokenizer directory does not exist"):
        tokenizer_from_dict({**d, "path": str(hf_dirs["llama"].parent / "nowhere")})
    with pytest.raises(ConfigError, match=r"has vocab_size 300, the artifact recorded 301"):
        HFTokenizer.from_dict({**d, "vocab_size": 301})
    with pytest.raises(ConfigError, match=r"token id 300 is out of range 0..299"):
        tok.decode([1, 300])
    data = TokenData.from_corpus(Corpus(name="t", documents=[TEXT], sources=["t"]), tok, val_fraction=0.1)
    assert data.vocab_size == 300
    assert torch.equal(torch.cat([data.train, data.val]).sort().values.long(),
                       torch.tensor(tok.encode(TEXT)).sort().values)


def test_missing_transformers_names_the_extra(hf_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ConfigError, match=r"needs the 'hf' extra \(transformers\): pip install sparsert\[hf\]"):
        import_transformers()
    with pytest.raises(ConfigError, match=r"needs the 'hf' extra"):
        load_hf_causal_lm(hf_dirs["llama"])
