"""swap_sparse_linears: any torch model's 2:4 linears on sparsert's formats and kernels (CPU: the compiled CPU
product on the same packed formats, runtime/sparse_cpu.py; GPU: the dispatcher's measured choice, marked ``gpu``)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_qwen2_moe
from torch import nn

from sparsert.runtime.dispatch import SparseLinearGPU
from sparsert.runtime.errors import ConfigError
from sparsert.runtime.linear_swap import swap_sparse_linears
from sparsert.runtime.nm_mask import nm_mask
from sparsert.runtime.packed_linear import pack_linear

gpu = pytest.mark.gpu


def _mlp(seed: int = 0, *, sparse: bool = True, head: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 128, bias=False)]
    model = nn.Sequential(*layers)
    if head:
        model.lm_head = nn.Linear(128, 32)
    if sparse:
        for layer in (model[0], model[2]):
            layer.weight.data *= nm_mask(layer.weight.data, 2, 4)
    return model


def _expected(model: nn.Module, x: torch.Tensor, dtype=torch.bfloat16, int4_group: int | None = None) -> torch.Tensor:
    """The swapped model's math in float32: x rounded to ``dtype`` before each packed layer, which computes with
    the packed (2:4, optionally INT4) weight rounded to ``dtype``."""
    y = x
    for layer in (model[0], model[2]):
        w = pack_linear(layer.weight.detach(), int4_group_size=int4_group).to_dense().to(dtype).float()
        y = y.to(dtype).float() @ w.t()
        if layer.bias is not None:
            y = y + layer.bias.detach()
        y = y.to(dtype).float()
        if layer is model[0]:
            y = torch.relu(y)
    return model.lm_head(y)


@pytest.mark.parametrize("int4", [False, True])
def test_swaps_the_2_4_linears_and_keeps_the_head_dense(int4: bool) -> None:
    model = _mlp()
    x = torch.randn(3, 5, 256)
    expected = _expected(model, x, int4_group=128 if int4 else None)
    report = swap_sparse_linears(model, int4=int4, group_size=128, token_counts=[1, 16])
    assert list(report.swapped) == ["0", "2"] and isinstance(model[0], SparseLinearGPU)
    assert report.swapped["0"] == ("2:4+int4 g128" if int4 else "2:4")
    assert report.left_dense == {"lm_head": "the output head stays dense"} and type(model.lm_head) is nn.Linear
    # on the CPU: the compiled CPU product over the stored tensors (the kernels' function)
    assert all(b == "cpu_packed" for per in report.backends.values() for b in per.values())
    assert set(report.backends["0"]) == {1, 16} and not report.dense_fallback
    # INT4 codes 2 + indices 1 + fp16 scales 0.125 bits; or the float32 layers' kept values 16 + 1 (the CPU product
    # reads the packed float32 values and rounds them to bf16; a bf16 model would hold 8 + 1)
    assert report.weights == 256 * 128 + 128 * 128
    assert report.bits_per_weight == (3.125 if int4 else 17.0)
    y = model(x)
    assert y.shape == (3, 5, 32) and y.dtype == torch.float32
    assert float((y - expected).detach().norm() / expected.detach().norm()) < 1e-2
    assert "2 linear layers swapped" in report.summary()


def test_layers_not_2_4_are_left_dense_or_pruned() -> None:
    model = _mlp()
    model[2].weight.data = torch.randn(128, 128)  # dense again
    report = swap_sparse_linears(model, token_counts=None)
    assert list(report.swapped) == ["0"] and "not 2:4 along K" in report.left_dense["2"]
    assert report.backends == {}

    pruned = _mlp(1, sparse=False)
    reference = _mlp(1, sparse=True)  # the same weights pruned by magnitude
    x = torch.randn(4, 256)
    report = swap_sparse_linears(pruned, prune=True)
    assert list(report.swapped) == ["0", "2"]
    torch.testing.assert_close(pruned(x), _expected(reference, x), rtol=0, atol=0)


def test_tied_output_layer_and_conv1d() -> None:
    class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D's interface: y = x @ W + b, W [in, out]
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.randn(nf))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    torch.manual_seed(2)
    model = nn.Module()
    model.wte = nn.Embedding(50, 64)
    model.c_fc = Conv1D(128, 64)
    model.c_fc.weight.data *= nm_mask(model.c_fc.weight.data.t(), 2, 4).t()  # 2:4 along the input dimension
    model.head = nn.Linear(64, 50, bias=False)
    model.head.weight = model.wte.weight
    report = swap_sparse_linears(model)
    assert list(report.swapped) == ["c_fc"] and report.left_dense == {"head": "its weight is an embedding's (tied)"}
    x = torch.randn(7, 64)
    w = model.c_fc.packed.to_dense()
    torch.testing.assert_close(model.c_fc(x), (x.bfloat16().float() @ w.bfloat16().float().t() + model.c_fc.packed.bias)
                               .bfloat16().float(), rtol=0, atol=0)


def test_bad_input_is_named() -> None:
    with pytest.raises(ConfigError, match="must be a torch nn.Module"):
        swap_sparse_linears("model")
    with pytest.raises(ConfigError, match="has no layer 'fc9'"):
        swap_sparse_linears(_mlp(), ["fc9"])
    with pytest.raises(ConfigError, match="layer '1' is a ReLU, not a linear layer"):
        swap_sparse_linears(_mlp(), ["1"])
    with pytest.raises(ConfigError, match="names must be a list of layer names"):
        swap_sparse_linears(_mlp(), "0")
    dense = _mlp(sparse=False)
    with pytest.raises(ConfigError, match=r"layer '0' \[128, 256\]: its weight is not 2:4 along K \(pass prune=True"):
        swap_sparse_linears(dense, ["0"])
    with pytest.raises(ConfigError, match="no linear layer of the model can be swapped .*0: its weight is not 2:4"):
        swap_sparse_linears(dense)
    with pytest.raises(ConfigError, match="has no linear layer"):
        swap_sparse_linears(nn.Sequential(nn.ReLU()))
    odd = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(ConfigError, match=r"layer '0' \[8, 6\]: K=6 .* not divisible by 4"):
        swap_sparse_linears(odd, ["0"], prune=True)
    with pytest.raises(ConfigError, match=r"K=128 is not divisible by the INT4 group size 96"):
        swap_sparse_linears(_mlp(), ["2"], int4=True, group_size=96)
    for bad, match in ((dict(group_size=6, int4=True), "group_size must be a positive multiple of 4"),
                       (dict(dtype=torch.float32), "dtype must be torch.bfloat16 or torch.float16"),
                       (dict(token_counts=[0]), "token_counts must be a non-empty list of positive ints"),
                       (dict(token_counts=16), "token_counts must be a non-empty list of positive ints"),
                       (dict(token_counts=[]), "token_counts must be a non-empty list of positive ints"),
                       (dict(int4="yes"), "int4 must be True or False"),
                       (dict(prune="no"), "prune must be True or False"),
                       (dict(allow_dense=1), "allow_dense must be True or False"),
                       (dict(dispatcher="x"), "dispatcher must be a sparsert.runtime.dispatch.Dispatcher, got str")):
        with pytest.raises(ConfigError, match=match):
            swap_sparse_linears(_mlp(), **bad)
    nan = _mlp()
    nan[0].weight.data[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"layer '0' \[128, 256\]: its weight is not a finite float tensor"):
        swap_sparse_linears(nan)
    model = _mlp()
    before = [type(m) for m in model]
    with pytest.raises(ConfigError):
        swap_sparse_linears(model, ["0", "2"], int4=True, group_size=256)
    assert [type(m) for m in model] == before  # checked before any layer is replaced
    with pytest.raises(ConfigError, match="names is empty"):
        swap_sparse_linears(model, [])
    with pytest.raises(ConfigError, match="the model is itself a linear layer; .* wrap it first"):
        swap_sparse_linears(nn.Linear(8, 8))
    with pytest.raises(ConfigError, match=r"layer '0' \[0, 8\]: it has no weights"):
        with warnings.catch_warnings():  # torch: "Initializing zero-element tensors is a no-op"
            warnings.simplefilter("ignore")
            empty = nn.Sequential(nn.Linear(8, 0))
        swap_sparse_linears(empty, ["0"])
    with pytest.raises(ConfigError, match="layer '0': its weight is not initialised yet"):
        swap_sparse_linears(nn.Sequential(nn.LazyLinear(8)))


def test_a_failure_while_packing_leaves_the_model_as_it_was() -> None:
    """INT4 scales are fp16: a kept value beyond its range fails in the last layer packed, after the first
    layer's replacement was built; nothing is replaced and the error names the layer."""
    model = _mlp()
    with torch.no_grad():
        kept = model[2].weight[0].nonzero()[0, 0]
        model[2].weight[0, kept] = 1e6
    with pytest.raises(ConfigError, match=r"layer '2' \[128, 128\]: .*float16"):
        swap_sparse_linears(model, int4=True)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_aliases_attention_outputs_and_named_heads() -> None:
    swapped = _mlp(head=False)
    swap_sparse_linears(swapped, ["0", "2"], token_counts=None)
    with pytest.raises(ConfigError, match="every linear layer of the model is swapped already"):
        swap_sparse_linears(swapped, prune=True)
    model = _mlp()
    model.again = model[0]  # one module under two names: both places get the one replacement
    report = swap_sparse_linears(model, ["again"], token_counts=None)
    assert list(report.swapped) == ["0"] and model.again is model[0] and isinstance(model[0], SparseLinearGPU)

    attention = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
    for module in attention.modules():
        if isinstance(module, nn.Linear):
            module.weight.data *= nm_mask(module.weight.data, 2, 4)
    x = torch.randn(2, 5, 128)
    report = swap_sparse_linears(attention)
    assert report.left_dense == {"self_attn.out_proj": "nn.MultiheadAttention reads its weight directly"}
    assert set(report.swapped) == {"linear1", "linear2"} and attention(x).shape == (2, 5, 128)
    with pytest.raises(AttributeError, match="linear1: a SparseLinearGPU holds its weight packed and has no "
                                             r"\.weight; .* leave this layer dense"):
        attention.eval()(x)  # torch's inference fast path reads linear1.weight itself

    class Classifier(nn.Module):  # transformers' get_output_embeddings names the head, whatever it is called
        def __init__(self) -> None:
            super().__init__()
            self.body, self.score = nn.Linear(64, 64), nn.Linear(64, 4)
            for layer in (self.body, self.score):
                layer.weight.data *= nm_mask(layer.weight.data, 2, 4)

        def get_output_embeddings(self) -> nn.Module:
            return self.score

    report = swap_sparse_linears(Classifier())
    assert list(report.swapped) == ["body"] and report.left_dense == {"score": "the output head stays dense"}


def test_the_cpu_product_takes_a_layer_no_gpu_kernel_tile_fits() -> None:
    model = nn.Sequential(nn.Linear(96, 128), nn.ReLU())  # K = 96: no GPU kernel tile fits; the CPU product runs it
    model[0].weight.data *= nm_mask(model[0].weight.data, 2, 4)
    x = torch.randn(5, 96)
    want = torch.relu(x.bfloat16().float() @ model[0].weight.detach().bfloat16().float().t() + model[0].bias.detach())
    report = swap_sparse_linears(model)
    assert not report.dense_fallback and report.bits_per_weight == 17.0 and report.backends["0"][1] == "cpu_packed"
    assert float((model(x) - want).norm() / want.norm()) < 1e-2


def test_backends_chooses_the_candidates() -> None:
    """The kernels' torch fallbacks as the only candidates: a K = 96 layer fits no kernel tile and runs its
    decompressed weight, which the report and a warning say."""
    from sparsert.runtime.dispatch import OursSparse24

    model = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 64))
    for layer in (model[0], model[2]):
        layer.weight.data *= nm_mask(layer.weight.data, 2, 4)
    with pytest.warns(UserWarning, match="1 of 2 swapped layers run the dense fallback"):
        report = swap_sparse_linears(model, names=["0", "2"], backends=[OursSparse24("medium")], token_counts=[1])
    assert "K=96" in report.dense_fallback["0"] and report.backends["2"] == {1: "ours_sparse24_medium"}
    assert "1 on the dense fallback" in report.summary()
    with pytest.raises(ConfigError,
                       match=r"backends must be a non-empty list of GemmBackend objects.*got \['medium'\]"):
        swap_sparse_linears(_mlp(), backends=["medium"])


@gpu
def test_gpu_dense_fallback_is_reported_with_allow_dense_too() -> None:
    model = nn.Sequential(nn.Linear(36, 128), nn.ReLU()).to("cuda")  # K = 36: no kernel tile, no cuSPARSELt shape
    model[0].weight.data *= nm_mask(model[0].weight.data, 2, 4)
    with pytest.warns(UserWarning, match="1 of 1 swapped layers run the dense fallback"):
        report = swap_sparse_linears(model, allow_dense=True)
    assert "K=36" in report.dense_fallback["0"] and report.bits_per_weight == 16.0
    assert "1 on the dense fallback" in report.summary()


def test_cast_or_moved_after_the_swap() -> None:
    model = _mlp()
    x = torch.randn(3, 256)
    swap_sparse_linears(model, token_counts=[1, 4])
    expected = model(x)
    model.to(torch.bfloat16)  # the rest of the model is cast; the swapped layers keep their fp32 bias
    assert model[0].bias.dtype == torch.float32 and torch.equal(model[0].bias, model[0].packed.bias)
    torch.testing.assert_close(model(x.bfloat16()).float(), expected, rtol=2e-2, atol=2e-2)
    layer = model[0]
    layer.device = torch.device("cuda", 0)  # what a layer built on a GPU says when given a CPU input
    with pytest.raises(Exception, match="input is on cpu, the layer's weights on cuda:0; build .*where it will run"):
        layer(x)


def test_a_bucket_first_seen_at_run_time_leaves_no_reference_copy() -> None:
    """A token count outside the tuned buckets is decided at its first call; the fp32 weight the decision
    compares against must not stay behind (it is 32 bits per weight)."""
    model = _mlp()
    swap_sparse_linears(model, token_counts=[1])
    layer = model[0]
    assert layer._ref_weight is None and set(layer.chosen) == {1}
    layer(torch.randn(40, 256))
    assert set(layer.chosen) == {1, 64} and layer._ref_weight is None


def _hf_model(transformers, arch: str, seed: int) -> nn.Module:
    """A tiny random transformers causal LM whose linears the W4A16 kernel takes (K a multiple of 128)."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    else:
        config = transformers.GPT2Config(vocab_size=320, n_embd=128, n_layer=2, n_head=4, n_positions=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hugging_face_causal_lm(arch: str) -> None:
    """A transformers Llama and GPT-2 (Conv1D layers, tied head) pruned, INT4-quantized and swapped on the CPU
    give the logits of the same model with its weights replaced by the packed ones."""
    transformers = pytest.importorskip("transformers")
    model, reference = _hf_model(transformers, arch, 0), _hf_model(transformers, arch, 0)
    report = swap_sparse_linears(model, prune=True, int4=True, group_size=128, token_counts=[1, 8])
    assert len(report.swapped) == 2 * (7 if arch == "llama" else 4) and not report.dense_fallback
    assert "lm_head" in report.left_dense and report.bits_per_weight == 3.125
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name in report.swapped:
            dense = model.get_submodule(name).packed.to_dense()
            modules[name].weight.copy_(dense.t() if arch == "gpt2" else dense)
        ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])
        got, want = model(ids).logits, reference(ids).logits
    assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_swapped_model_saves_and_loads_what_it_serves(arch: str, tmp_path: Path) -> None:
    """state_dict() holds each swapped layer's served weight (2:4 zeros, INT4 dequantized) in the replaced layer's
    layout (GPT-2's Conv1D: [K, out]) and dtype, so save_pretrained writes a checkpoint transformers loads whole;
    load_state_dict packs a changed 2:4 weight again and refuses one that is not 2:4."""
    transformers = pytest.importorskip("transformers")
    model = _hf_model(transformers, arch, 0).to(torch.bfloat16)
    report = swap_sparse_linears(model, prune=True, int4=True, group_size=128, token_counts=[1, 8])
    name = next(iter(report.swapped))
    layer = model.get_submodule(name)
    state = model.state_dict()
    served = layer.packed.to_dense().to(torch.bfloat16)
    assert torch.equal(state[f"{name}.weight"], served.t() if arch == "gpt2" else served)
    assert state[f"{name}.weight"].dtype == torch.bfloat16 and (f"{name}.bias" in state) == (arch == "gpt2")

    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])
    with torch.no_grad():
        logits = model(ids).logits.float()
    model.save_pretrained(str(tmp_path / "saved"))
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), dtype=torch.bfloat16,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():  # dense bf16 matmuls on the served weights: the same model up to rounding
        again = reloaded.eval()(ids).logits.float()
    assert float((again - logits).norm() / logits.norm()) < 2e-2

    model.load_state_dict(state)  # the weights held: nothing packed again
    assert model.get_submodule(name) is layer and layer.chosen == {1: "cpu_packed", 8: "cpu_packed"}
    changed = dict(state)
    changed[f"{name}.weight"] = -state[f"{name}.weight"]  # still 2:4: packed again, same buckets decided
    model.load_state_dict(changed)
    assert torch.equal(model.state_dict()[f"{name}.weight"], -state[f"{name}.weight"]) and set(layer.chosen) == {1, 8}
    changed[f"{name}.weight"] = torch.ones_like(state[f"{name}.weight"])
    with pytest.raises(RuntimeError, match=rf"{name}\.weight: {name} holds a 2:4 weight, and this one is not 2:4"):
        model.load_state_dict(changed)
    changed[f"{name}.weight"] = state[f"{name}.weight"][:, :4]
    with pytest.raises(RuntimeError, match=rf"{name}\.weight: expected a floating tensor \["):
        model.load_state_dict(changed)
    del changed[f"{name}.weight"]
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{name}\.weight"'):
        model.load_state_dict(changed)


def test_a_partial_state_dict_keeps_what_it_leaves_out_and_a_cast_reaches_the_saved_dtype() -> None:
    model = _mlp()
    swap_sparse_linears(model, token_counts=None)
    state = model.state_dict()
    x = torch.randn(2, 256)
    y = model(x)
    model.load_state_dict({"0.weight": state["0.weight"]}, strict=False)  # the bias left out stays
    assert torch.equal(model(x), y)
    model.load_state_dict({"0.bias": state["0.bias"] + 1}, strict=False)  # a new bias alone: packed with it
    assert not torch.equal(model(x), y)
    assert torch.equal(model.state_dict()["0.bias"], state["0.bias"] + 1)
    assert torch.equal(model.state_dict()["0.weight"], state["0.weight"])
    with pytest.raises(RuntimeError, match=r"0\.bias: its bias must be a tensor \[128\], got \[3\]"):
        model.load_state_dict({"0.bias": torch.zeros(3)}, strict=False)
    model.half()  # what the model holds after a cast is what it saves
    assert model.state_dict()["0.weight"].dtype == torch.float16 == model.state_dict()["lm_head.weight"].dtype


def test_the_cpu_product_takes_layers_no_gpu_kernel_tile_fits(hf_model_dirs: dict[str, Path]) -> None:
    """The fixture's hidden size 64 is below the W4A16 kernel's k tile (128), which would run those layers on the
    decompressed weight on a GPU; on the CPU the compiled CPU product (K % 4 == 0) serves every layer packed."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_model_dirs["llama"])).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(hf_model_dirs["llama"])).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = swap_sparse_linears(model, prune=True, int4=True, group_size=64, token_counts=[1, 8])
    assert len(report.swapped) == 14 and not report.dense_fallback
    assert {b for per in report.backends.values() for b in per.values()} == {"cpu_packed"}
    assert report.bits_per_weight == 2 + 1 + 16 / 64  # codes, indices, a 16-bit scale per 64 columns
    with torch.no_grad():
        modules = dict(reference.named_modules())
        for name in report.swapped:
            modules[name].weight.copy_(model.get_submodule(name).packed.to_dense())
        ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])
        got, want = model(ids).logits, reference(ids).logits  # bf16 activations vs float32
    assert float((got - want).norm() / want.norm()) < 3e-2


@pytest.mark.filterwarnings("ignore:swap_sparse_linears.*dense fallback")  # the 1-row shared_expert_gate
def test_fused_moe_experts_are_reported_as_left_dense() -> None:
    """transformers 5's Qwen2-MoE holds its experts as 3-D parameters, not nn.Linear layers: the swap takes the
    attention and shared-expert linears, and the report and a warning name the experts, which stay dense."""
    model = tiny_qwen2_moe(hidden=128, vocab=64)
    fused = {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 3}
    with pytest.warns(UserWarning, match=r"weights of 3 or more dimensions \(\d+% of the model's parameters, e\.g\. "
                      r"model\.layers\.0\.mlp\.experts\.\w+ .*stay dense"):
        report = swap_sparse_linears(model, prune=True, token_counts=[1])
    assert report.outside_linears == fused
    assert "model.layers.0.mlp.shared_expert.up_proj" in report.swapped
    assert f"{len(fused)} weights outside linear layers left dense" in report.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # names= is the user's own choice: no warning
        swap_sparse_linears(_mlp(), names=["0"], token_counts=[1])


@gpu
def test_gpu_hugging_face_causal_lm_on_our_kernels() -> None:
    transformers = pytest.importorskip("transformers")
    model, reference = _hf_model(transformers, "llama", 0), _hf_model(transformers, "llama", 0)
    model.to("cuda", torch.bfloat16)
    report = swap_sparse_linears(model, prune=True, int4=True, group_size=128, token_counts=[1, 8])
    assert len(report.swapped) == 14 and not report.dense_fallback and report.bits_per_weight == 3.125
    assert all(b.startswith("ours_w4a16") for per in report.backends.values() for b in per.values())
    with torch.no_grad():
        modules = dict(reference.named_modules())
        for name in report.swapped:
            modules[name].weight.copy_(model.get_submodule(name).packed.to_dense())
        ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])
        want = reference(ids).logits
        got = model(ids.cuda()).logits.float().cpu()
    assert float((got - want).norm() / want.norm()) < 3e-2


def _grads_through_a_swapped_layer(device: str, int4: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 256), nn.Linear(256, 8)).to(device)
    reference = copy.deepcopy(model)
    swap_sparse_linears(model, names=["2"], prune=True, int4=int4, token_counts=[4])
    with torch.no_grad():
        reference[2].weight.copy_(model[2].packed.to_dense())
    x = torch.randn(4, 128, device=device)
    y, want = model(x), reference(x)
    y.square().sum().backward()
    want.square().sum().backward()
    for name in ("0.weight", "0.bias", "3.weight"):  # before and after the swapped layer
        got, expected = model.get_parameter(name).grad, reference.get_parameter(name).grad
        assert got is not None and float((got - expected).norm() / expected.norm()) < 2e-2, name
    assert not any(p.requires_grad for p in model[2].parameters())  # the packed weight is frozen


@pytest.mark.parametrize("int4", [False, True])
def test_gradients_flow_through_a_swapped_layer(int4: bool) -> None:
    """Fine-tuning what surrounds a swapped layer (adapters, a head): dX = dY @ W reaches the layers before it.
    Before, the CPU product's output was outside autograd and the backward pass failed (on a GPU it was cut)."""
    _grads_through_a_swapped_layer("cpu", int4)


@gpu
@pytest.mark.parametrize("int4", [False, True])
def test_gpu_gradients_flow_through_a_swapped_layer(int4: bool) -> None:
    _grads_through_a_swapped_layer("cuda", int4)


def test_every_backend_names_the_weight_its_gradient_uses() -> None:
    """dX = dY @ W with the W each backend's forward uses: the kernels' prepared weights (rounded to the
    activation dtype), the CPU product's, a dense state, and a state that is no dense matrix (cuSPARSELt's
    compressed buffer: the packed weight rounded to the dtype)."""
    from sparsert.runtime.dispatch import CpuPacked, Cusparselt, DenseCublas, OursSparse24, OursW4A16
    from sparsert.runtime.packed_linear import pack_linear

    w = torch.randn(128, 256)
    for int4, backend in ((False, OursSparse24("medium")), (True, OursW4A16("prefill")), (False, CpuPacked()),
                          (True, CpuPacked()), (False, DenseCublas())):
        packed = pack_linear(w, int4_group_size=128 if int4 else None)
        state = backend.prepare(packed, torch.device("cpu"), torch.bfloat16)
        want = packed.to_dense().to(torch.bfloat16).float() if not int4 else None
        got = backend.dense(state, packed, torch.bfloat16)
        assert got.shape == (128, 256) and got.dtype == torch.float32
        if want is not None:
            assert torch.equal(got, want), backend.name
    packed = pack_linear(w)
    compressed = torch.zeros(128 * 256 // 2 + 4096, dtype=torch.bfloat16)  # the shape of a cuSPARSELt buffer
    assert torch.equal(Cusparselt().dense(compressed, packed, torch.bfloat16),
                       packed.to_dense().to(torch.bfloat16).float())


def test_a_float32_layer_swapped_on_the_cpu_saves_its_own_weight() -> None:
    """The kept values stay in the layer's own dtype (float32 here, read and rounded to bf16 by the CPU product),
    so the state dict gives back the 2:4 weight exactly, on any device; 16 + 1 bits per weight held. A bf16 layer
    holds its values in bf16: 8 + 1."""
    model = _mlp()
    want = model[0].weight.detach().clone()
    report = swap_sparse_linears(model, token_counts=[1])
    assert torch.equal(model.state_dict()["0.weight"], want) and report.bits_per_weight == 17.0
    model.load_state_dict(model.state_dict())  # the weight it holds: nothing packed again, nothing doubled
    assert model[0].weight_nbytes() * 8 / want.numel() == 17.0
    half = _mlp().to(torch.bfloat16)
    assert swap_sparse_linears(half, token_counts=[1]).bits_per_weight == 9.0
    changed = {k: -v for k, v in half.state_dict().items()}  # packed again, in the dtype the values were packed in
    half.load_state_dict(changed)
    assert torch.equal(half.state_dict()["0.weight"], changed["0.weight"])
    assert half[0].weight_nbytes() * 8 / want.numel() == 9.0
