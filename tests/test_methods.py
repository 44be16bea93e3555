"""Masked decay, AST distillation and adaptive masks, SLoRB, and sparsity schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsert.runtime.errors import ConfigError, FormatError
from sparsert.runtime.model import DecoderLM, ModelConfig
from sparsert.runtime.nm_mask import is_nm_sparse, nm_mask
from sparsert.runtime.tokenizer import ByteTokenizer
from sparsert.runtime.transposable_mask import is_transposable_24
from sparsert.train.ast_distill import (
    AST_GPT2,
    AdaptiveMasks,
    ASTConfig,
    Teacher,
    annealed_decay,
    check_tokenizers_match,
    distillation_loss,
)
from sparsert.train.masked_decay import DEFAULT_MASKED_DECAY, apply_masked_decay, masked_decay_, masked_modules
from sparsert.train.schedules import SparsitySchedule, gradual_nm_mask
from sparsert.train.slorb import SLoRB, group_sum, slorb_dense_equivalent, slorb_init, slorb_tensors
from sparsert.train.sparse_linear import SparseLinear, SparsityConfig


class _Masked(nn.Module):
    """A minimal module following the weight + mask convention (as SparseLinear does)."""

    def __init__(self, w: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(w.clone())
        self.register_buffer("mask", mask.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask)


# ----------------------------------------------------------------------------------------------- masked decay


def test_masked_decay_formula_bool_and_uint8_masks():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 8, generator=g)
    grad = torch.randn(4, 8, generator=g)
    mask = nm_mask(w)
    for m in (mask, mask.to(torch.uint8)):
        out = masked_decay_(grad.clone(), w, m, 0.5)
        torch.testing.assert_close(out, grad + 0.5 * (~mask) * w)
        assert torch.equal(out[mask], grad[mask])  # kept weights untouched
    assert DEFAULT_MASKED_DECAY == 6e-5


def test_apply_masked_decay_over_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(8, 4, config=SparsityConfig(decay=0.0)), nn.Linear(4, 4),
                          _Masked(torch.randn(4, 4), torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.uint8)))
    model(torch.randn(3, 8)).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert set(masked_modules(model)) == {"0", "2"}
    assert apply_masked_decay(model, 1e-2) == 2
    for idx in ("0", "2"):
        mod = model.get_submodule(idx)
        expected = before[f"{idx}.weight"] + 1e-2 * (1 - mod.mask.float()) * mod.weight.detach()
        torch.testing.assert_close(mod.weight.grad, expected)
    torch.testing.assert_close(model[1].weight.grad, before["1.weight"])  # dense layer untouched
    with pytest.raises(ConfigError, match="alpha"):
        apply_masked_decay(model, -1.0)
    with pytest.raises(FormatError, match="same shape"):
        masked_decay_(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(4, 2), 1.0)


# ---------------------------------------------------------------------------------------------------- AST


def test_distillation_loss_formula():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 11, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 11, generator=g)
    y = torch.randint(0, 11, (2, 3), generator=g)
    y[1, 2] = -100
    out = distillation_loss(s, t, y, alpha=0.33, beta=0.67, temperature=2.0)
    valid = y.reshape(-1) != -100
    sf, tf, yf = s.reshape(-1, 11)[valid], t.reshape(-1, 11)[valid], y.reshape(-1)[valid]
    ce = F.cross_entropy(sf, yf)
    pt, ps = F.softmax(tf / 2, -1), F.softmax(sf / 2, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.total, 0.33 * ce + 0.67 * 4 * kl)
    out.total.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    # identical logits: KL vanishes
    assert distillation_loss(t, t, y).kl.abs() < 1e-6
    assert (AST_GPT2.alpha, AST_GPT2.beta, AST_GPT2.temperature) == (0.33, 0.67, 2.0)


def test_distillation_rejects_vocab_mismatch():
    with pytest.raises(ConfigError, match="vocabularies must be equal"):
        distillation_loss(torch.randn(1, 2, 5), torch.randn(1, 2, 6), torch.zeros(1, 2, dtype=torch.long))


def _tiny(vocab: int = 256) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16))


def test_teacher_interface_and_vocab_check():
    teacher = Teacher(_tiny(), student_vocab_size=256)
    ids = torch.randint(0, 256, (2, 5))
    logits = teacher(ids)
    assert logits.shape == (2, 5, 256) and not logits.requires_grad
    assert not any(p.requires_grad for p in teacher.module.parameters()) and not teacher.module.training
    with pytest.raises(ConfigError, match="teacher vocabulary has 300 tokens but the student's has 256"):
        Teacher(_tiny(300), student_vocab_size=256)

    class HFStyle(nn.Module):  # returns an object with .logits and declares no vocabulary
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(256, 7)

        def forward(self, ids):  # noqa: ANN001, ANN201
            return type("Out", (), {"logits": self.emb(ids)})()

    with pytest.raises(ConfigError, match="produces 7 logits per token but the student's vocabulary has 256"):
        Teacher(HFStyle(), student_vocab_size=256)(ids)


def test_tokenizer_check():
    check_tokenizers_match(ByteTokenizer(), ByteTokenizer())

    class Shifted(ByteTokenizer):
        def encode(self, text: str) -> list[int]:
            return [(i + 1) % 256 for i in super().encode(text)]

        def to_dict(self) -> dict:
            return ByteTokenizer().to_dict()

    with pytest.raises(ConfigError, match="encode the same text differently"):
        check_tokenizers_match(Shifted(), ByteTokenizer())


def _save_hf_tokenizer(out, vocab: dict[str, int]) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(out))


def test_tokenizer_check_hf_compares_vocabularies_not_paths(tmp_path):
    from sparsert.runtime.hf_tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "sparse": 1, "dense": 2, "two": 3, "four": 4}
    _save_hf_tokenizer(tmp_path / "teacher", vocab)
    _save_hf_tokenizer(tmp_path / "student", vocab)
    _save_hf_tokenizer(tmp_path / "swapped", {**vocab, "two": 4, "four": 3})
    teacher, student = HFTokenizer(tmp_path / "teacher"), HFTokenizer(tmp_path / "student")
    assert teacher.to_dict() != student.to_dict()  # the paths differ ...
    check_tokenizers_match(teacher, student)  # ... the tokenizers do not
    with pytest.raises(ConfigError, match=r"different vocabularies \(token 'four': id 4 vs 3\)"):
        check_tokenizers_match(teacher, HFTokenizer(tmp_path / "swapped"))
    with pytest.raises(ConfigError, match="tokenizer is of type 'hf', the student's 'byte'"):
        check_tokenizers_match(teacher, ByteTokenizer())


def test_annealed_decay_schedule():
    assert annealed_decay(0, 1e-4, 10_000) == 0.0
    assert annealed_decay(2_500, 1e-4, 10_000) == pytest.approx(2.5e-5)
    assert annealed_decay(9_999, 1e-4, 10_000) == pytest.approx(1e-4 * 0.9999)
    assert annealed_decay(10_000, 1e-4, 10_000) == 1e-4
    assert annealed_decay(40_000, 1e-4, 10_000) == 1e-4
    assert annealed_decay(0, 1e-4, 0) == 1e-4
    with pytest.raises(ConfigError):
        annealed_decay(-1)


def test_ast_config_validation():
    assert ASTConfig().to_dict()["mask_interval"] == 10
    with pytest.raises(ConfigError, match="temperature"):
        ASTConfig(temperature=0)
    with pytest.raises(ConfigError, match="alpha and beta are both 0"):
        ASTConfig(alpha=0, beta=0)


def test_adaptive_masks_refresh_interval_and_flip_rate():
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(16, 8, config=SparsityConfig()), SparseLinear(8, 8, config=SparsityConfig()))
    am = AdaptiveMasks(model, interval=10)
    with torch.no_grad():
        model[0].weight.mul_(-1).add_(torch.randn(8, 16))  # move weights so masks change
    old = model[0].mask.clone()
    assert am.step(5) is None and torch.equal(model[0].mask, old)  # not due
    flip = am.step(10)
    assert flip is not None and 0 < flip <= 1
    assert model[0].mask.dtype == torch.uint8 and torch.equal(model[0].mask.bool(), nm_mask(model[0].weight))
    changed = int((old != model[0].mask).sum())
    assert flip == pytest.approx(changed / (8 * 16 + 8 * 8))
    assert am.refresh() == 0.0  # nothing moved since


def test_adaptive_masks_wanda_score_uses_activation_norms():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    layer = _Masked(w, torch.ones(1, 4, dtype=torch.bool))
    model = nn.Sequential(layer)
    am = AdaptiveMasks(model, interval=1, wanda=True).attach()
    with pytest.raises(ConfigError, match="no activations recorded"):
        am.activation_norms("0")
    model(torch.zeros(0, 4))  # a layer no token reached (an MoE expert on zero rows): the magnitude mask
    am.refresh()
    assert layer.mask.tolist() == [[False, False, True, True]]
    x = torch.tensor([[10.0, 10.0, 0.1, 0.1]]).repeat(3, 1)  # channels 0, 1 far more active
    model(x)
    torch.testing.assert_close(am.activation_norms("0"), x.pow(2).sum(0).sqrt())
    am.refresh()
    assert layer.mask.tolist() == [[True, True, False, False]]  # magnitude alone would keep 2, 3
    am.detach()
    assert not layer._forward_hooks


def test_adaptive_masks_state_dict_round_trip_and_paused():
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    make = lambda: nn.Sequential(_Masked(w, torch.ones(4, 8, dtype=torch.bool)))  # noqa: E731
    model = make()
    am = AdaptiveMasks(model, interval=1, wanda=True).attach()
    x = torch.randn(5, 8) * torch.tensor([5.0, 0.1, 3.0, 0.2, 0.1, 4.0, 2.0, 0.3])
    model(x)
    with am.paused():
        model(torch.full((50, 8), 100.0))  # evaluation-like passes: not counted
        with am.paused():
            model(torch.full((50, 8), 100.0))
    model(x)
    state = am.state_dict()
    torch.testing.assert_close(state["0"], 2 * x.pow(2).sum(0))
    state["0"].add_(1)  # a copy: the masks' statistics are untouched
    torch.testing.assert_close(am.activation_norms("0"), (2 * x.pow(2).sum(0)).sqrt())
    # a resumed run restores the statistics and computes the same Wanda masks
    resumed_model = make()
    resumed = AdaptiveMasks(resumed_model, interval=1, wanda=True).attach()
    resumed.load_state_dict(am.state_dict())
    am.refresh()
    resumed.refresh()
    assert torch.equal(resumed_model[0].mask, model[0].mask)
    assert am.state_dict() == {} and resumed.state_dict() == {}  # a refresh starts new statistics
    good = {"0": torch.ones(8)}
    for bad, match in (({"1": torch.ones(8)}, "'1', which is not a masked module"),
                       ({"0": torch.ones(7)}, r"'0' must be finite non-negative floats \[8\], got \(7,\)"),
                       ({"0": torch.full((8,), float("nan"))}, "finite non-negative"),
                       ({"0": -torch.ones(8)}, "finite non-negative"),
                       ({"0": [1.0] * 8}, "got list")):
        resumed.load_state_dict(good)
        with pytest.raises(ConfigError, match=match):
            resumed.load_state_dict(bad)
        torch.testing.assert_close(resumed.state_dict()["0"], torch.ones(8))  # unchanged by a refused load


def test_adaptive_masks_transposable_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(16, 8, config=SparsityConfig()))
    AdaptiveMasks(model, pattern="transposable").refresh()
    assert is_transposable_24(model[0].mask)
    with pytest.raises(ConfigError, match="no module with a weight and a mask"):
        AdaptiveMasks(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="2:4 only"):
        AdaptiveMasks(model, n=1, m=4, pattern="transposable")


# ---------------------------------------------------------------------------------------------------- SLoRB


def test_slorb_exact_formula_and_fold():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 32, generator=g)
    mask = nm_mask(w)
    s = slorb_init(w, mask, k=16)
    expected = torch.stack([(w * ~mask)[:, :16].mean(1), (w * ~mask)[:, 16:].mean(1)], dim=1)
    torch.testing.assert_close(s, expected)
    slorb = SLoRB.from_pruned(w, mask, k=16)
    x = torch.randn(3, 5, 32, generator=g)
    y = slorb(x)
    first, second = x[..., :16].sum(-1, keepdim=True), x[..., 16:].sum(-1, keepdim=True)
    torch.testing.assert_close(y, first * s[:, 0] + second * s[:, 1])
    torch.testing.assert_close(group_sum(x, 16), torch.stack([x[..., :16].sum(-1), x[..., 16:].sum(-1)], -1))
    dense = slorb_dense_equivalent(slorb)  # (6, 32), constant on each group of 16 columns
    torch.testing.assert_close(F.linear(x, w * mask) + y, F.linear(x, w * mask + dense))
    assert torch.equal(dense[:, :16], s[:, :1].expand(6, 16))
    t = slorb_tensors("blocks.0.mlp.up_proj", slorb)
    assert list(t) == ["blocks.0.mlp.up_proj.slorb.S"] and t["blocks.0.mlp.up_proj.slorb.S"].shape == (6, 2)


def test_slorb_trainable_p():
    w = torch.randn(4, 32)
    slorb = SLoRB.from_pruned(w, nm_mask(w), k=16, trainable_p=True)
    fixed = SLoRB.from_pruned(w, nm_mask(w), k=16)
    x = torch.randn(2, 32)
    torch.testing.assert_close(slorb(x), fixed(x))  # P starts as the group-sum matrix
    slorb(x).sum().backward()
    assert slorb.P.grad is not None and slorb.S.grad is not None
    assert set(slorb_tensors("l", slorb)) == {"l.slorb.S", "l.slorb.P"}
    assert sum(p.numel() for p in fixed.parameters()) == 4 * 32 // 16  # N·K/k extra parameters


def test_slorb_brings_pruned_layer_closer_to_dense():
    g = torch.Generator().manual_seed(3)
    # weights with structure shared inside each group of 16 columns (a smooth per-group offset), the case
    # SLoRB's group means capture; inputs isotropic
    offset = torch.randn(64, 8, generator=g).repeat_interleave(16, dim=1)
    w = offset + 0.5 * torch.randn(64, 128, generator=g)
    mask = nm_mask(w)
    x = torch.randn(512, 128, generator=g)
    dense, pruned = F.linear(x, w), F.linear(x, w * mask)
    boosted = pruned + SLoRB.from_pruned(w, mask, k=16)(x)
    err_pruned, err_boosted = (dense - pruned).norm(), (dense - boosted).norm()
    assert err_boosted < 0.8 * err_pruned
    # plain random weights: still never worse in expectation (a projection), here on a large sample
    w2 = torch.randn(64, 128, generator=g)
    m2 = nm_mask(w2)
    e1 = (F.linear(x, w2) - F.linear(x, w2 * m2)).norm()
    e2 = (F.linear(x, w2) - F.linear(x, w2 * m2) - SLoRB.from_pruned(w2, m2)(x)).norm()
    assert e2 < e1


def test_slorb_errors():
    with pytest.raises(FormatError, match="K=24 is not divisible by the group size k=16"):
        SLoRB(24, 4, 16, name="blocks.0.attn.q_proj")
    with pytest.raises(ConfigError, match="positive integer"):
        SLoRB(32, 4, 0)
    with pytest.raises(FormatError, match="must both be"):
        slorb_init(torch.randn(4, 32), torch.ones(4, 16, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ schedules


def test_from_scratch_and_spdf_boundaries():
    s = SparsitySchedule.from_scratch()
    assert [s.phase(t, 600) for t in (0, 599)] == ["sparse", "sparse"]
    assert s.density(0, 600) == 0.5 and s.keep_per_group(0, 600) == 2
    spdf = SparsitySchedule.spdf()  # last 1/6 dense
    assert spdf.dense_finetune_fraction == pytest.approx(1 / 6)
    assert spdf.finetune_start(300_000) == 250_000
    assert spdf.phase(249_999, 300_000) == "sparse" and spdf.phase(250_000, 300_000) == "dense_finetune"
    assert spdf.density(250_000, 300_000) == 1.0
    w = torch.randn(8, 16)
    assert spdf.mask(w, 299_999, 300_000).all()
    assert torch.equal(spdf.mask(w, 0, 300_000), nm_mask(w))


def test_gradual_schedule_boundaries_and_geometric_density():
    s = SparsitySchedule.gradual(start=0.25, end=0.75, interval=100)
    total = 4000  # window 1000 .. 3000, 20 events
    assert s.pruning_window(total) == (1000, 3000) and s.num_events(total) == 20
    assert s.phase(999, total) == "dense" and s.density(999, total) == 1.0
    assert s.phase(1000, total) == "pruning" and s.is_pruning_event(1000, total)
    assert not s.is_pruning_event(1001, total) and s.is_pruning_event(1100, total)
    assert s.is_pruning_event(2900, total) and not s.is_pruning_event(3000, total)
    assert s.phase(2999, total) == "pruning" and s.phase(3000, total) == "sparse"
    # p = 1 - (1-s)^(1/E) of the remaining weights per event
    p = 1 - 0.5 ** (1 / 20)
    assert s.density(1000, total) == pytest.approx(1 - p)
    assert s.density(1150, total) == pytest.approx((1 - p) ** 2)
    assert s.density(2900, total) == pytest.approx(0.5)  # last event lands on 2:4
    assert s.density(3999, total) == 0.5 and s.keep_per_group(3999, total) == pytest.approx(2.0)
    dens = [s.density(t, total) for t in range(0, total, 50)]
    assert all(a >= b for a, b in zip(dens, dens[1:], strict=False))  # monotone
    with_ft = SparsitySchedule.gradual(dense_finetune_fraction=0.2)
    assert with_ft.phase(3200, 4000) == "dense_finetune"


def test_gradual_masks_are_nested_supersets_of_24():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=g)
    final = nm_mask(w)
    prev = torch.ones_like(final)
    for d in (1.0, 0.9, 0.75, 0.6, 0.5):
        m = gradual_nm_mask(w, d)
        assert m.float().mean().item() == pytest.approx(d, abs=1 / w.numel())
        assert (m >= final).all() and (m <= prev).all()  # nested, superset of the final 2:4 mask
        assert (m.reshape(16, -1, 4).sum(-1) >= 2).all()
        prev = m
    assert torch.equal(gradual_nm_mask(w, 0.5), final) and is_nm_sparse(w * prev)


def test_schedule_validation():
    with pytest.raises(ConfigError, match="kind"):
        SparsitySchedule(kind="cosine")
    with pytest.raises(ConfigError, match="must be before"):
        SparsitySchedule.gradual(start=0.8, end=0.5)
    with pytest.raises(ConfigError, match="pruning must end by the start of dense fine-tuning"):
        SparsitySchedule.gradual(end=0.9, dense_finetune_fraction=0.2)
    with pytest.raises(ConfigError, match="prune_interval"):
        SparsitySchedule.gradual(interval=0)
    with pytest.raises(ConfigError, match="total_steps"):
        SparsitySchedule().phase(0, 0)
    with pytest.raises(ConfigError, match="density must be in"):
        gradual_nm_mask(torch.randn(4, 8), 0.4)
    assert math.isclose(SparsitySchedule.spdf(0.25).finetune_start(1000), 750)
