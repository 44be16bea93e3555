"""Generation loop: greedy equals repeated full forwards, seeded sampling, limits and errors; tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsert.runtime.errors import ConfigError, FormatError
from sparsert.runtime.generate import (
    GenerationConfig,
    Stepper,
    TorchStepper,
    choose_token,
    generate_ids,
    generate_text,
)
from sparsert.runtime.model import DecoderLM, ModelConfig
from sparsert.runtime.tokenizer import ByteTokenizer, tokenizer_from_dict


def make_model(arch: str = "llama", max_seq_len: int = 32) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=4, ffn_dim=64,
                                  max_seq_len=max_seq_len))
    with torch.no_grad():  # larger weights: sharper, more varied logits than the 0.02 init
        for p in model.parameters():
            p.mul_(10.0) if p.dim() == 2 else None
    return model.eval()


class FullForwardStepper:
    """A Stepper without a cache: recomputes the whole sequence each step (the reference)."""

    def __init__(self, model: DecoderLM) -> None:
        self.model, self.max_seq_len, self.ids = model, model.config.max_seq_len, []

    def reset(self) -> None:
        self.ids = []

    def step(self, ids):
        self.ids += list(ids)
        with torch.no_grad():
            return self.model(torch.tensor([self.ids]))[0, -1].numpy()  # numpy logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_argmax_of_repeated_full_forwards(arch):
    model = make_model(arch)
    prompt = [5, 17, 200, 3]
    out = generate_ids(TorchStepper(model), prompt, GenerationConfig(max_new_tokens=12))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]
    assert len(set(out)) > 1  # not a degenerate constant output


def test_sampling_is_reproducible_and_backend_neutral():
    model = make_model()
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=7)
    a = generate_ids(TorchStepper(model), [1, 2, 3], cfg)
    stepper = TorchStepper(model)
    assert generate_ids(stepper, [1, 2, 3], cfg) == a
    assert generate_ids(stepper, [1, 2, 3], cfg) == a  # reset between calls
    assert generate_ids(FullForwardStepper(model), [1, 2, 3], cfg) == a  # numpy logits, no cache
    others = {tuple(generate_ids(stepper, [1, 2, 3], GenerationConfig(16, 1.0, seed=s))) for s in range(4)}
    assert len(others) > 1


def test_choose_token_rules():
    logits = np.array([0.0, 3.0, 3.0, 1.0, -2.0])
    rng = np.random.default_rng(0)
    assert choose_token(logits, GenerationConfig(), rng) == 1  # first index on ties
    assert choose_token(torch.tensor(logits, dtype=torch.float16), GenerationConfig(), rng) == 1
    top2 = GenerationConfig(temperature=5.0, top_k=2)
    picks = {choose_token(logits, top2, rng) for _ in range(200)}
    assert picks == {1, 2}
    # Inverse CDF with one uniform draw: matches a direct computation.
    cfg = GenerationConfig(temperature=0.5, seed=3)
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    p = np.exp((logits - logits.max()) / 0.5)
    expected = [int(np.searchsorted(np.cumsum(p), rng2.random() * p.sum(), side="right")) for _ in range(50)]
    assert [choose_token(logits, cfg, rng1) for _ in range(50)] == expected


def test_bad_stepper_logits_are_format_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(FormatError, match=r"stepper logits: shape \[1, 5\], expected \[vocab_size\]"):
        choose_token(np.zeros((1, 5)), GenerationConfig(), rng)
    with pytest.raises(FormatError, match=r"stepper logits: 2 of 4 values are NaN or \+inf, expected finite logits"):
        choose_token(torch.tensor([0.0, float("nan"), 1.0, float("nan")]), GenerationConfig(), rng)
    with pytest.raises(FormatError, match=r"1 of 3 values are NaN or \+inf"):
        choose_token(np.array([0.0, np.inf, 1.0]), GenerationConfig(temperature=1.0), rng)
    with pytest.raises(FormatError, match="all 3 values are -inf"):
        choose_token(np.full(3, -np.inf), GenerationConfig(), rng)


def test_sampling_edge_cases_stay_well_defined():
    """-inf logits are never chosen; a temperature far below the logit gaps samples the argmax instead of
    overflowing to NaN."""
    rng = np.random.default_rng(0)
    z = np.array([-np.inf, 1.0, 3.0, -np.inf, 2.0])
    assert {choose_token(z, GenerationConfig(temperature=1.0), rng) for _ in range(200)} <= {1, 2, 4}
    assert choose_token(z, GenerationConfig(temperature=1e-320), rng) == 2
    assert choose_token(z, GenerationConfig(temperature=1e-320, top_k=2), rng) == 2


def test_prompt_ids_must_be_integers():
    stepper = TorchStepper(make_model(max_seq_len=16))
    cfg = GenerationConfig(max_new_tokens=2)
    for bad, why in (([2.7], "prompt ids must be integers, got 2.7"), ("hello", "sequence of token ids"),
                     (torch.tensor([[1, 2]]), "1-D integer tensor"), (torch.tensor([1.0]), "1-D integer tensor"),
                     ([True], "must be integers")):
        with pytest.raises(ConfigError, match=why):
            generate_ids(stepper, bad, cfg)
    with pytest.raises(ConfigError, match="must be a GenerationConfig"):
        generate_ids(stepper, [1], {"max_new_tokens": 2})
    assert generate_ids(stepper, torch.tensor([1, 2]), cfg) == generate_ids(stepper, [np.int64(1), 2], cfg)


def test_stops_at_the_context_limit():
    model = make_model(max_seq_len=16)
    out = generate_ids(TorchStepper(model), list(range(10)), GenerationConfig(max_new_tokens=100))
    assert len(out) == 6
    with pytest.raises(ConfigError, match=r"prompt is 16 tokens; the model's context is 16 tokens"):
        generate_ids(TorchStepper(model), list(range(16)), GenerationConfig())


def test_on_token_streams_each_token():
    seen = []
    out = generate_ids(TorchStepper(make_model()), [1], GenerationConfig(max_new_tokens=5), on_token=seen.append)
    assert seen == out and len(out) == 5


def test_generate_text():
    model = make_model()
    tok = ByteTokenizer()
    text = generate_text(TorchStepper(model), tok, "hé", GenerationConfig(max_new_tokens=8))
    ids = generate_ids(TorchStepper(model), tok.encode("hé"), GenerationConfig(max_new_tokens=8))
    assert text == tok.decode(ids)
    with pytest.raises(ConfigError, match=r"^prompt is empty$"):
        generate_text(TorchStepper(model), tok, "", GenerationConfig())
    with pytest.raises(ConfigError, match=r"^prompt is empty$"):
        generate_ids(TorchStepper(model), [], GenerationConfig())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, r"--max-new-tokens must be a positive integer, got 0"),
        ({"max_new_tokens": -3}, r"--max-new-tokens must be a positive integer, got -3"),
        ({"max_new_tokens": 2.5}, r"--max-new-tokens must be a positive integer, got 2\.5"),
        ({"temperature": -0.1}, r"--temperature must be a finite number >= 0, got -0\.1"),
        ({"temperature": float("nan")}, r"--temperature must be a finite number >= 0"),
        ({"top_k": 0}, r"--top-k must be a positive integer, got 0"),
        ({"seed": -1}, r"--seed must be an integer in \[0, 2\*\*63 - 1\], got -1"),
        ({"seed": 2**63}, r"--seed must be an integer in \[0, 2\*\*63 - 1\], got 9223372036854775808"),
    ],
)
def test_generation_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**kwargs)


def test_torch_stepper_cache_grows_with_the_positions_used():
    """A long max_seq_len must not allocate the whole KV cache for a short prompt; growing it keeps the tokens."""
    model = make_model(max_seq_len=600)
    stepper = TorchStepper(model)
    assert stepper.cache.max_len == 256 and stepper.max_seq_len == 600
    prompt = [int(i) for i in torch.randint(0, 256, (250,), generator=torch.Generator().manual_seed(1))]
    cfg = GenerationConfig(max_new_tokens=12)
    out = generate_ids(stepper, prompt, cfg)  # crosses 256 while decoding
    assert stepper.cache.max_len == 512
    assert out == generate_ids(FullForwardStepper(model), prompt, cfg)
    generate_ids(stepper, prompt * 2, GenerationConfig(max_new_tokens=20))  # 520 positions: 1024, capped at 600
    assert stepper.cache.max_len == 600


def test_torch_stepper_is_a_stepper():
    assert isinstance(TorchStepper(make_model()), Stepper)
    assert isinstance(FullForwardStepper(make_model()), Stepper)


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.decode([97, 0xC3, 0xA9]) == "aé"
    assert tok.decode([97, 0xC3]) == "a\ufffd"  # cut multi-byte sequence -> replacement character
    assert tok.encode_numpy("aé").tolist() == [97, 0xC3, 0xA9]
    with pytest.raises(ConfigError, match=r"token id 300 is out of range 0\.\.255"):
        tok.decode([1, 300])
    assert tok.to_dict() == {"type": "byte", "vocab_size": 256}
    assert isinstance(tokenizer_from_dict(tok.to_dict()), ByteTokenizer)
    with pytest.raises(ConfigError, match=r"unknown type 'bpe' \(known: 'byte', 'hf'\)"):
        tokenizer_from_dict({"type": "bpe"})
    with pytest.raises(ConfigError, match=r"a byte tokenizer has vocab_size 256, got 512"):
        tokenizer_from_dict({"type": "byte", "vocab_size": 512})
