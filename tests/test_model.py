"""DecoderLM: shapes, names, the documented math, KV-cache decoding, config validation, presets, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsert.runtime.errors import ConfigError
from sparsert.runtime.model import (
    PRESETS,
    DecoderLM,
    ModelConfig,
    count_parameters,
    model_config_from_preset,
    sparse_linear_names,
)

ARCHS = ["llama", "gpt2"]


def small_config(arch: str, **overrides) -> ModelConfig:
    kw = dict(arch=arch, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=24)
    kw.update(overrides)
    return ModelConfig(**kw)


def make_model(arch: str, seed: int = 0, **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(small_config(arch, **overrides)).eval()
    # Non-trivial norm weights/biases so the tests see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_dtype(arch):
    model = make_model(arch)
    ids = torch.randint(0, 256, (3, 10))
    logits = model(ids)
    assert logits.shape == (3, 10, 256)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_module_names_follow_the_contract(arch):
    model = make_model(arch)
    names = sparse_linear_names(model)
    mlp = ["gate_proj", "up_proj", "down_proj"] if arch == "llama" else ["up_proj", "down_proj"]
    expected = [
        f"blocks.{i}.{part}"
        for i in range(2)
        for part in [f"attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [f"mlp.{p}" for p in mlp]
    ]
    assert names == expected
    assert names == sparse_linear_names(model.config)
    modules = dict(model.named_modules())
    for name in names:
        assert isinstance(modules[name], torch.nn.Linear)
        assert (modules[name].bias is not None) == (arch == "gpt2")
    all_linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    assert sorted(all_linears) == sorted(names + ["lm_head"])
    keys = set(model.state_dict())
    assert {"tok_emb.weight", "lm_head.weight", "norm_f.weight"} <= keys
    assert ("pos_emb.weight" in keys) == (arch == "gpt2")
    assert not any("rope" in k for k in keys)
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    d, f = 32, 64
    n_sparse = 2 * (4 * d * d + len(mlp) * d * f)
    assert count_parameters(model, sparse_linears_only=True) == n_sparse
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def reference_forward(model: DecoderLM, ids: torch.Tensor) -> torch.Tensor:
    """The module docstring's formulas, written out with elementary ops."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, T = ids.shape
    hd = c.head_dim
    x = sd["tok_emb.weight"][ids]

    def norm(x, prefix):
        if c.arch == "llama":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * sd[prefix + ".weight"]
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + c.norm_eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def linear(x, prefix):
        y = x @ sd[prefix + ".weight"].T
        return y + sd[prefix + ".bias"] if prefix + ".bias" in sd else y

    pos = torch.arange(T, dtype=torch.float64)
    if c.arch == "gpt2":
        x = x + sd["pos_emb.weight"][:T]
    else:
        inv_freq = torch.tensor([1.0 / c.rope_theta ** (2 * j / hd) for j in range(hd // 2)], dtype=torch.float64)
        ang = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)
        cos, sin = ang.cos(), ang.sin()

        def rope(t):
            rot = torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], dim=-1)
            return t * cos + rot * sin

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c.n_layers):
        p = f"blocks.{i}"
        h = norm(x, f"{p}.attn_norm")
        q, k, v = (linear(h, f"{p}.attn.{n}_proj").view(B, T, c.n_heads, hd).transpose(1, 2) for n in "qkv")
        if c.arch == "llama":
            q, k = rope(q), rope(k)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        a = torch.softmax(scores, dim=-1) @ v
        x = x + linear(a.transpose(1, 2).reshape(B, T, c.d_model), f"{p}.attn.o_proj")
        h = norm(x, f"{p}.mlp_norm")
        if c.arch == "llama":
            g = linear(h, f"{p}.mlp.gate_proj")
            m = (g * torch.sigmoid(g)) * linear(h, f"{p}.mlp.up_proj")
        else:
            u = linear(h, f"{p}.mlp.up_proj")
            m = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        x = x + linear(m, f"{p}.mlp.down_proj")
    return linear(norm(x, "norm_f"), "lm_head")


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_documented_math(arch):
    model = make_model(arch)
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        got = model(ids).double()
    torch.testing.assert_close(got, reference_forward(model, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_full_forward(arch):
    model = make_model(arch)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        # prefill 5, one chunk of 4 (exercises the block causal mask), then one token at a time
        parts = [model(ids[:, :5], cache), model(ids[:, 5:9], cache)]
        parts += [model(ids[:, t:t + 1], cache) for t in range(9, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)
    cache.reset()
    with torch.no_grad():
        again = model(ids[:, :3], cache)
    torch.testing.assert_close(again, full[:, :3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fixed_shape_decode_step_equals_cached_forward(arch):
    """decode_step (the CUDA-graph path of the GPU runtime: position on the device, attention over the whole
    cache with a mask) computes what the cached forward computes, token by token, after a prefill, and leaves
    cache.length to the caller; the cache it writes is the one the cached forward writes."""
    model = make_model(arch)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref_cache, cache = model.new_cache(2), model.new_cache(2)
        cache.k.normal_()  # stale entries of an earlier sequence after pos: the mask must hide them
        cache.v.normal_()
        model(ids[:, :5], ref_cache)
        model(ids[:, :5], cache)
        for t in range(5, 16):
            want = model(ids[:, t:t + 1], ref_cache)
            got = model.decode_step(ids[:, t:t + 1], torch.tensor([t]), cache)
            assert cache.length == 5
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k[:, :, :, :16], ref_cache.k[:, :, :, :16], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.v[:, :, :, :16], ref_cache.v[:, :, :, :16], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_longer_than_max_seq_len_is_rejected(arch):
    model = make_model(arch)
    with pytest.raises(ConfigError, match=r"sequence of 25 positions exceeds the model's max_seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.int64))
    cache = model.new_cache(1)
    model(torch.zeros(1, 20, dtype=torch.int64), cache)
    with pytest.raises(ConfigError, match=r"sequence of 25 positions exceeds the model's max_seq_len=24"):
        model(torch.zeros(1, 5, dtype=torch.int64), cache)
    with pytest.raises(ConfigError, match=r"KV cache max_len must be in 1\.\.24"):
        model.new_cache(1, max_len=25)


def test_bad_input_ids_are_rejected():
    model = make_model("llama")
    with pytest.raises(ConfigError, match=r"token ids must be in 0\.\.255, got 0\.\.256"):
        model(torch.tensor([[0, 256]]))
    with pytest.raises(ConfigError, match=r"expected an int64 tensor \[B, T\], got \(4,\)"):
        model(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ConfigError, match=r"batch size 2 does not match the KV cache's 1"):
        model(torch.zeros(2, 3, dtype=torch.int64), model.new_cache(1))


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(d_model=128, n_layers=8, n_heads=4, ffn_dim=384))
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    expected = 0.02 / math.sqrt(16)
    assert abs(model.blocks[0].attn.o_proj.weight.std().item() - expected) < 0.001
    assert abs(model.blocks[0].mlp.down_proj.weight.std().item() - expected) < 0.001


def test_config_round_trip():
    for arch in ARCHS:
        cfg = small_config(arch, norm_eps=1e-6, rope_theta=500000)
        d = cfg.to_dict()
        assert d["arch"] == arch and d["rope_theta"] == 500000.0 and isinstance(d["rope_theta"], float)
        assert ModelConfig.from_dict(d) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, r"unknown field 'colour'"),
        ({"arch": "bert"}, r"field 'arch': expected one of llama, gpt2, got 'bert'"),
        ({"d_model": "128"}, r"field 'd_model': expected an integer, got '128'"),
        ({"n_layers": 2.0}, r"field 'n_layers': expected an integer, got 2\.0"),
        ({"n_heads": True}, r"field 'n_heads': expected an integer, got True"),
        ({"ffn_dim": 0}, r"field 'ffn_dim': expected a positive integer, got 0"),
        ({"norm_eps": "x"}, r"field 'norm_eps': expected a number"),
        ({"rope_theta": -1.0}, r"field 'rope_theta': expected a positive number, got -1\.0"),
        ({"d_model": 100, "n_heads": 3}, r"field 'd_model': 100 is not divisible by n_heads=3"),
        ({"d_model": 12, "n_heads": 4}, r"head_dim d_model/n_heads = 3 must be even for RoPE"),
    ],
)
def test_config_validation_errors(change, message):
    d = small_config("llama").to_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_from_dict_rejects_non_dict():
    with pytest.raises(ConfigError, match="model config: expected a JSON object, got list"):
        ModelConfig.from_dict([1, 2])


def test_presets():
    assert list(PRESETS) == ["tiny", "small", "base"]
    for name, cfg in PRESETS.items():
        assert cfg.d_model % 128 == 0 and cfg.ffn_dim % 128 == 0, name
    tiny = model_config_from_preset("tiny")
    assert (tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.ffn_dim, tiny.max_seq_len) == (128, 4, 4, 384, 256)
    assert tiny.arch == "llama"
    g = model_config_from_preset("small", arch="gpt2")
    assert g.arch == "gpt2" and g.d_model == 256
    g.d_model = 1
    assert PRESETS["small"].d_model == 256  # presets are copied, never shared
    base = model_config_from_preset("base")
    assert (base.d_model, base.n_layers, base.n_heads, base.ffn_dim, base.max_seq_len) == (512, 8, 8, 1536, 512)


def test_unknown_preset_error_text():
    with pytest.raises(ConfigError, match=r"^unknown preset 'huge' \(choose from tiny, small, base\)$"):
        model_config_from_preset("huge")
    with pytest.raises(ConfigError, match=r"expected one of llama, gpt2, got 'rnn'"):
        model_config_from_preset("tiny", arch="rnn")


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_learns_a_repeated_string(arch):
    torch.manual_seed(0)
    model = DecoderLM(small_config(arch, max_seq_len=32))
    data = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 8), dtype=torch.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        starts = torch.randint(0, data.numel() - 33, (8,), generator=gen)
        w = torch.stack([data[s:s + 33] for s in starts.tolist()])
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(256) at init
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
