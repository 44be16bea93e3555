"""runtime.moe_experts: transformers 5's fused MoE experts as per-expert linear layers (same logits, the fused
state dict back exactly), and the 2:4 swap reaching them. Models are built from configs (nothing is downloaded)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_qwen2_moe
from torch import nn

from sparsert.runtime.dispatch import SparseLinearGPU
from sparsert.runtime.linear_swap import swap_sparse_linears, weights_outside_linears
from sparsert.runtime.moe_experts import (
    FusedLayout,
    UnfusedExperts,
    expert_layer_names,
    fused_expert_state,
    fused_experts_modules,
    unfuse_experts,
    unfused_experts_of,
)
from sparsert.runtime.nm_mask import is_nm_sparse

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, head_dim=16)


def _moe(config_name: str, **extra: object) -> nn.Module:
    config_class = getattr(transformers, config_name, None)
    if config_class is None:
        pytest.skip(f"this transformers has no {config_name}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config_class(**{**COMMON, **extra})).eval()
    if not fused_experts_modules(model):
        pytest.skip(f"this transformers holds the {config_name} experts as nn.Linear layers")
    return model


ARCHS = {
    "qwen2-moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    # transposed [experts, K, out] weights, biases and a clamped gate of its own
    "gpt-oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                     layer_types=["full_attention", "full_attention"])),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_unfused_experts_compute_the_same_logits_and_fuse_back_exactly(arch: str) -> None:
    config_name, extra = ARCHS[arch]
    model = _moe(config_name, **extra)
    fused_state = {k: v.clone() for k, v in model.state_dict().items()}
    layouts = fused_experts_modules(model)
    assert len(layouts) == 2 and all(lay.num_experts == 4 for lay in layouts.values())
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    created = unfuse_experts(model)
    assert created == expert_layer_names(model) and len(created) == 2 * 4 * 2
    assert not weights_outside_linears(model) and unfused_experts_of(model) == layouts
    for name in created:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear) and isinstance(model.get_submodule(name.rsplit(".", 2)[0]),
                                                            UnfusedExperts)
    module, layout = next(iter(layouts.items()))
    expert = model.get_submodule(f"{module}.2.down_proj").weight
    stored = fused_state[f"{module}.down_proj"][2]
    assert torch.equal(expert, stored.t() if layout.transposed else stored)  # [out, K]: K = the input features
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    back = fused_expert_state(model.state_dict(), unfused_experts_of(model))
    assert back.keys() == fused_state.keys() and all(torch.equal(back[k], fused_state[k]) for k in fused_state)
    assert unfuse_experts(model) == []  # nothing fused is left


def test_gpt_oss_layout_is_transposed_with_biases() -> None:
    model = _moe(*ARCHS["gpt-oss"][:1], **ARCHS["gpt-oss"][1])
    assert set(fused_experts_modules(model).values()) == {FusedLayout(("gate_up_proj", "down_proj"), 4, True, True)}


def test_a_layout_it_does_not_know_stays_fused() -> None:
    """An experts module with weights beside the experts (here a norm) is left fused: it stays outside the linears,
    reported by weights_outside_linears."""
    model = tiny_qwen2_moe()
    experts = model.model.layers[0].mlp.experts
    experts.extra_norm = nn.LayerNorm(8)
    assert list(fused_experts_modules(model)) == []
    assert unfuse_experts(model) == [] and len(weights_outside_linears(model)) == 2
    experts.has_post_expert_norm = True
    del experts.extra_norm
    assert list(fused_experts_modules(model)) == []


def test_fusing_a_state_without_an_expert_names_the_tensor() -> None:
    model = tiny_qwen2_moe()
    unfuse_experts(model)
    state = model.state_dict()
    del state["model.layers.0.mlp.experts.3.down_proj.weight"]
    with pytest.raises(KeyError, match=r"lacks 'model\.layers\.0\.mlp\.experts\.3\.down_proj\.weight' to fuse "
                       r"model\.layers\.0\.mlp\.experts\.down_proj"):
        fused_expert_state(state, unfused_experts_of(model))


def test_unfused_experts_are_swapped_like_any_linear() -> None:
    """Once unfused, swap_sparse_linears packs every expert 2:4 (on the CPU: the compiled CPU product) and the model
    still gives the logits of the same 2:4 weights run dense; no weight is left outside the linears."""
    model = tiny_qwen2_moe(hidden=128, vocab=64)
    reference = tiny_qwen2_moe(hidden=128, vocab=64)
    names = unfuse_experts(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = swap_sparse_linears(model, prune=True, token_counts=[1])
    assert not [w for w in caught if "3 or more dimensions" in str(w.message)]
    assert set(names) <= set(report.swapped) and not report.outside_linears
    assert all(isinstance(model.get_submodule(n), SparseLinearGPU) for n in names)
    unfuse_experts(reference)
    with torch.no_grad():
        for name in report.swapped:
            dense = model.get_submodule(name).packed.to_dense()
            assert is_nm_sparse(dense, 2, 4)
            reference.get_submodule(name).weight.copy_(dense)
        ids = torch.tensor([[5, 17, 9, 3, 50, 42, 7, 8]])
        torch.testing.assert_close(model(ids).logits.float(), reference(ids).logits, rtol=2e-2, atol=2e-2)


@pytest.mark.filterwarnings("ignore:swap_sparse_linears.*dense fallback")  # Qwen2-MoE's K=32 experts on a GPU
@pytest.mark.parametrize("arch", list(ARCHS))
def test_served_experts_save_in_the_fused_layout_transformers_loads(arch: str, tmp_path) -> None:
    """Unfused and swapped for serving, the experts' state is the fused tensors transformers holds (transposed
    with biases for GPT-OSS): save_pretrained writes a checkpoint transformers loads whole with the served weights,
    and the fused state loads back into the served model. Unfused for training, the state stays per expert."""
    model = _moe(ARCHS[arch][0], **ARCHS[arch][1])
    unfuse_experts(model)
    assert "model.layers.0.mlp.experts.0.down_proj.weight" in model.state_dict()  # plain linears: per expert
    swap_sparse_linears(model, prune=True, token_counts=None)
    state = model.state_dict()
    layout = next(iter(unfused_experts_of(model).values()))
    fused = {k: v for k, v in state.items() if ".experts." in k}
    assert set(fused) == {f"model.layers.{i}.mlp.experts.{p}{b}" for i in range(2) for p in layout.params
                          for b in ("", "_bias")[: 1 + layout.bias]}
    expert = model.get_submodule("model.layers.1.mlp.experts.2.down_proj")
    want = expert.served_weight()
    torch.testing.assert_close(fused["model.layers.1.mlp.experts.down_proj"][2], want.t() if layout.transposed
                               else want, rtol=0, atol=0)
    model.load_state_dict(state)  # the fused tensors split back into the experts (the weights held: no repacking)
    assert model.get_submodule("model.layers.1.mlp.experts.2.down_proj") is expert
    ids = torch.tensor([[5, 17, 9, 3, 50, 42, 7, 8]])
    with torch.no_grad():
        served = model(ids).logits.float()
    model.save_pretrained(str(tmp_path / "saved"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"),
                                                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():  # dense float32 on the served (2:4) weights vs bf16 GEMMs
        torch.testing.assert_close(loaded.eval()(ids).logits, served, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("config_name", "extra", "routers"), [
    ("Qwen2MoeConfig", ARCHS["qwen2-moe"][1], ["mlp.shared_expert_gate"]),  # a Linear(d, 1) named *_gate
    ("HunYuanMoEV1Config", dict(num_experts=4, moe_topk=2), ["mlp.gate.wg"]),  # a Linear inside a module "gate"
])
def test_routers_stay_dense_and_experts_count_as_ffn(config_name: str, extra: dict, routers: list[str]) -> None:
    """The linears that route tokens are never listed for 2:4 (their code reads .weight, and they are few
    weights that decide everything downstream); every expert is an FFN layer for --sparse-layers ffn, whatever its
    parent is named (Granite's block_sparse_moe)."""
    from sparsert.train.hf_model import hf_sparse_linear_names
    from sparsert.train.sparsify import is_ffn_name

    model = _moe(config_name, **extra)
    assert all(isinstance(model.get_submodule(f"model.layers.0.{r}"), nn.Linear) for r in routers)
    experts = unfuse_experts(model)
    names = hf_sparse_linear_names(model)
    assert set(experts) <= set(names) and not any(n.endswith(r) for n in names for r in routers)
    assert set(experts) <= set(hf_sparse_linear_names(model, include_attention=False))
    assert is_ffn_name("model.layers.0.block_sparse_moe.experts.3.down_proj")
    assert is_ffn_name("model.layers.0.mlp.shared_expert.up_proj")
    assert not is_ffn_name("model.layers.0.self_attn.q_proj")


@pytest.mark.gpu
def test_gpu_moe_experts_on_our_kernels() -> None:
    """An MoE's unfused experts on the GPU: every expert and the other block linears 2:4 + INT4 (g128) on our W4A16
    kernel (3.125 bits per weight), the logits those weights give when run dense."""
    from sparsert.train.hf_model import hf_sparse_linear_names

    model, reference = tiny_qwen2_moe(hidden=128), tiny_qwen2_moe(hidden=128)
    model.to("cuda", torch.bfloat16)
    experts = unfuse_experts(model)
    report = swap_sparse_linears(model, hf_sparse_linear_names(model), prune=True, int4=True, group_size=128,
                                 token_counts=[1, 8])
    assert set(experts) <= set(report.swapped) and not report.dense_fallback and report.bits_per_weight == 3.125
    unfuse_experts(reference)
    with torch.no_grad():
        for name in report.swapped:
            reference.get_submodule(name).weight.copy_(model.get_submodule(name).packed.to_dense())
        ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])
        want = reference(ids).logits
        got = model(ids.cuda()).logits.float().cpu()
    assert float((got - want).norm() / want.norm()) < 3e-2


def test_in_training_every_expert_gets_a_gradient() -> None:
    """Data-parallel ranks must reduce the same parameters: in training every expert runs, on zero rows when the
    router chose it for no token, so each gets a gradient (zero when unused); in eval only chosen experts run."""
    model = _moe("Qwen3MoeConfig", moe_intermediate_size=32, num_experts=16, num_experts_per_tok=1)
    names = unfuse_experts(model)
    ids = torch.tensor([[5, 17, 9]])  # 3 tokens for 16 experts: most get none
    model.train()
    model(ids).logits.sum().backward()
    grads = [model.get_submodule(n).weight.grad for n in names]
    assert all(g is not None for g in grads) and sum(bool(g.any()) for g in grads) <= 2 * 2 * 3
    model.zero_grad(set_to_none=True)
    model.eval()
    model(ids).logits.sum().backward()
    assert sum(model.get_submodule(n).weight.grad is not None for n in names) <= 2 * 2 * 3


def test_a_checkpoint_with_fused_experts_is_named_on_load() -> None:
    """A run of an MoE model checkpointed before experts were unfused (fused 3-D tensors in its state) is refused
    in one line that says so, not with torch's list of every missing key."""
    from sparsert.runtime.errors import ArtifactError
    from sparsert.train.trainer import load_model_state

    model = tiny_qwen2_moe()
    unfuse_experts(model)
    old = fused_expert_state(model.state_dict(), unfused_experts_of(model))
    with pytest.raises(ArtifactError, match=r"^cannot resume RUN: the checkpoint lacks 'model\.layers\.0\.mlp\.experts"
                       r"\.0\.gate_up_proj\.weight' \(8 tensor\(s\) of the model missing\); it holds fused MoE experts "
                       r"\('model\.layers\.0\.mlp\.experts\.gate_up_proj'\), written before"):
        load_model_state(model, old, "cannot resume RUN")
    state = model.state_dict()
    state["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ArtifactError, match=r"has 'model\.norm\.weight' of shape \[3\], not \[64\]$"):
        load_model_state(model, state, "X")
    load_model_state(model, model.state_dict(), "X")
