"""SLoRB end to end: attach to a sparse model, train, compress, load, inspect, export to ONNX, generate.

SLoRB (AST, Huang et al. 2025, §3.4): ``y = x (W ⊙ M)ᵀ (+ b) + S · groupsum_k(x)`` with ``S [out, K/k]``
initialised to the group means of the pruned weights. Tiny models (d = 32, 2 layers), both architectures.
"""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from sparsert.export import annotations as ann
from sparsert.export.onnx_graph import build_onnx_model, export_onnx
from sparsert.export.onnx_runner import OnnxStepper
from sparsert.export.parity import check_parity
from sparsert.runtime.artifact import (
    SLoRBInfo,
    expected_tensors,
    load_artifact,
    read_config,
    save_artifact,
)
from sparsert.runtime.artifact_stats import artifact_stats, format_stats
from sparsert.runtime.errors import ArtifactError, ConfigError, ExportError, FormatError
from sparsert.runtime.generate import GenerationConfig, TorchStepper, generate_ids
from sparsert.runtime.model import (
    DecoderLM,
    ModelConfig,
    SLoRBLinear,
    add_slorb,
    slorb_layers,
    sparse_linear_names,
)
from sparsert.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from sparsert.train.compress import compress_checkpoint
from sparsert.train.slorb import attach_slorb, slorb_from_state, slorb_init
from sparsert.train.sparse_linear import SparseLinear, SparsityConfig
from sparsert.train.sparsify import sparsify_model

K = 16
QAT_GROUP = 16
ARCHS = ["llama", "gpt2"]


def tiny_config(arch: str = "llama") -> ModelConfig:
    return ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=48)


def sparse_model(arch: str, seed: int = 0, qat: bool = True) -> DecoderLM:
    """A tiny DecoderLM (weights x10 for sharp, varied logits) with 2:4 SparseLinears (INT4 QAT g16)."""
    torch.manual_seed(seed)
    model = DecoderLM(tiny_config(arch))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    sparsify_model(model, SparsityConfig(qat_group_size=QAT_GROUP if qat else None))
    return model


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_steps(model: torch.nn.Module, steps: int, seed: int = 0, lr: float = 3e-3) -> list[float]:
    """A few AdamW steps on one fixed batch of random tokens; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 24), generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = lm_loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def as_checkpoint(model: DecoderLM, tmp_path, qat: bool = True) -> Checkpoint:
    """The model as load_checkpoint would return it (in memory)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Checkpoint(
        path=tmp_path, step=3, model_config=model.config, model_state=state, optimizer_state=None,
        state={"sparsity": {"n": 2, "m": 4}, "quantization": {"bits": 4, "group_size": QAT_GROUP} if qat else None},
    )


@pytest.fixture(scope="module")
def trained() -> dict[str, DecoderLM]:
    """Per architecture: a sparse (2:4 + INT4 QAT) model with SLoRB, trained 3 steps, in eval mode."""
    out = {}
    for arch in ARCHS:
        model = sparse_model(arch)
        attach_slorb(model, K)
        train_steps(model, 3)
        out[arch] = model.eval()
    return out


@pytest.fixture(scope="module")
def artifacts(trained, tmp_path_factory) -> dict:
    """(arch, dense_dtype) -> loaded artifact compressed from the trained model."""
    root = tmp_path_factory.mktemp("slorb")
    out = {}
    for arch, model in trained.items():
        for dtype in ("float32", "float16"):
            path = compress_checkpoint(as_checkpoint(model, root), root / f"{arch}-{dtype}", dense_dtype=dtype)
            out[arch, dtype] = load_artifact(path)
    return out


def without_slorb(art):
    """The same artifact minus its SLoRB terms (in memory)."""
    dense = {k: v for k, v in art.dense.items() if ".slorb." not in k}
    return dataclasses.replace(art, slorb=None, dense=dense)


# ---------------------------------------------------------------------------------------------------------
# attach_slorb


def test_attach_slorb_initialises_group_means_and_brings_layers_closer_to_dense():
    model = sparse_model("llama", qat=False)
    attached = attach_slorb(model, K)
    names = sparse_linear_names(model)
    assert list(attached) == names
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 64, generator=gen)  # isotropic inputs: E|Rx|² = |R|²_F
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseLinear) and layer.slorb is attached[name]
        torch.testing.assert_close(layer.slorb.S, slorb_init(layer.weight, layer.mask, K), rtol=0, atol=0)
        xi = x[:, : layer.in_features]
        with torch.no_grad():
            dense = F.linear(xi, layer.weight, layer.bias)
            pruned = layer._forward_linear(xi)
            boosted = layer(xi)
        torch.testing.assert_close(boosted, pruned + layer.slorb(xi))
        assert (dense - boosted).norm() < (dense - pruned).norm(), name
    assert {k for k in model.state_dict() if ".slorb." in k} == {f"{n}.slorb.S" for n in names}
    # calling it again keeps the existing (possibly trained) terms
    s0 = attached[names[0]].S
    assert attach_slorb(model, K)[names[0]].S is s0


def test_attach_slorb_brings_model_logits_closer_to_dense():
    """Weights with a per-group offset (the structure SLoRB's group means capture): on every one of six random
    models the logits move toward the dense model's, by 20% on average (measured 0.64 .. 0.95 of the error)."""
    ratios = []
    for seed in range(6):
        torch.manual_seed(seed)
        model = DecoderLM(tiny_config())
        with torch.no_grad():
            for name in sparse_linear_names(model):
                w = model.get_submodule(name).weight
                w.add_(0.05 * torch.randn(w.shape[0], w.shape[1] // K).repeat_interleave(K, dim=1))
        ids = torch.randint(0, 256, (2, 16))
        with torch.no_grad():
            dense = model(ids)
            sparsify_model(model, SparsityConfig())
            pruned = model(ids)
            attach_slorb(model, K)
            boosted = model(ids)
        ratios.append(float((boosted - dense).norm() / (pruned - dense).norm()))
    assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.9, ratios


def test_attach_slorb_errors():
    with pytest.raises(ConfigError, match="no sparse linears"):
        attach_slorb(DecoderLM(tiny_config()), K)
    model = sparse_model("llama", qat=False)
    with pytest.raises(FormatError, match=r"blocks\.0\.attn\.q_proj: K=32 is not divisible by the group size k=64"):
        attach_slorb(model, 64)
    assert all(m.slorb is None for m in model.modules() if isinstance(m, SparseLinear))  # nothing half-attached
    with pytest.raises(ConfigError, match="positive integer"):
        attach_slorb(model, 0)
    with pytest.raises(ConfigError, match="'lm_head' is not a sparse linear"):
        attach_slorb(model, K, names=["lm_head"])
    # a subset, e.g. only the layers trained sparse: the others get no term
    ffn = [n for n in sparse_linear_names(model) if ".mlp." in n]
    assert list(attach_slorb(model, K, names=ffn)) == ffn
    assert {n for n, m in model.named_modules() if isinstance(m, SparseLinear) and m.slorb is not None} == set(ffn)


def test_training_steps_train_s():
    model = sparse_model("gpt2")
    attach_slorb(model, K)
    name = "blocks.0.mlp.up_proj"
    s0 = model.get_submodule(name).slorb.S.detach().clone()
    losses = train_steps(model, 5, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    layer = model.get_submodule(name)
    assert not torch.equal(layer.slorb.S.detach(), s0)  # S is a trained parameter
    assert bool((layer.mask.reshape(layer.mask.shape[0], -1, 4).sum(-1) == 2).all())  # still 2:4


# ---------------------------------------------------------------------------------------------------------
# Runtime model, checkpoint state, compression, artifact


def test_runtime_slorb_linear_matches_training_term():
    model = sparse_model("llama", qat=False)
    attach_slorb(model, K)
    layer = model.get_submodule("blocks.1.mlp.down_proj")
    ref = DecoderLM(tiny_config())
    add_slorb(ref, ["blocks.1.mlp.down_proj"], K)
    rt = ref.get_submodule("blocks.1.mlp.down_proj")
    assert isinstance(rt, SLoRBLinear) and slorb_layers(ref) == {"blocks.1.mlp.down_proj": K}
    with torch.no_grad():
        rt.weight.copy_(layer.weight * layer.mask)
        rt.slorb.S.copy_(layer.slorb.S)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(rt(x), layer(x))
    with pytest.raises(ConfigError, match="not a sparse linear"):
        add_slorb(ref, ["lm_head"], K)
    with pytest.raises(ConfigError, match="already has group size k=16, not 8"):
        add_slorb(ref, ["blocks.1.mlp.down_proj"], 8)


def test_slorb_from_state_checks_shapes():
    config = tiny_config()
    model = sparse_model("llama", qat=False)
    attach_slorb(model, K)
    state = dict(model.state_dict())
    assert slorb_from_state(state, config) == (K, sparse_linear_names(config))
    assert slorb_from_state({k: v for k, v in state.items() if ".slorb." not in k}, config) is None
    bad = dict(state)
    bad["blocks.1.attn.q_proj.slorb.S"] = torch.zeros(32, 4)  # k = 8
    with pytest.raises(ArtifactError, match=r"'blocks.1.attn.q_proj.slorb.S' implies SLoRB group size k=8"):
        slorb_from_state(bad, config)
    bad["blocks.1.attn.q_proj.slorb.S"] = torch.zeros(32, 3)
    with pytest.raises(ArtifactError, match=r"has shape \[32, 3\], expected \[32, K/k\] with K=32"):
        slorb_from_state(bad, config)
    with pytest.raises(ArtifactError, match="fixed group sum only"):
        slorb_from_state({**state, "blocks.0.attn.q_proj.slorb.P": torch.zeros(2, 32)}, config)
    with pytest.raises(ArtifactError, match="'lm_head.slorb.S' belongs to no sparse linear"):
        slorb_from_state({**state, "lm_head.slorb.S": torch.zeros(256, 2)}, config)


@pytest.mark.parametrize("arch", ARCHS)
def test_compress_carries_s_and_build_model_equals_trained_forward(trained, artifacts, arch):
    art = artifacts[arch, "float32"]
    names = sparse_linear_names(tiny_config(arch))
    assert art.slorb == SLoRBInfo(K, tuple(names))
    assert read_config(art.path)["slorb"] == {"k": K, "layers": names}
    with safe_open(str(art.path / "model.safetensors"), framework="pt") as f:
        for name in names:
            out, k_in = trained[arch].get_submodule(name).weight.shape
            s = f.get_tensor(f"{name}.slorb.S")
            assert s.dtype == torch.float32 and tuple(s.shape) == (out, k_in // K)
            torch.testing.assert_close(s, trained[arch].get_submodule(name).slorb.S.detach(), rtol=0, atol=0)
    model = art.build_model()
    assert slorb_layers(model) == {n: K for n in names}
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = trained[arch](ids)
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
        # the SLoRB term matters: without it the logits are far off
        assert (without_slorb(art).build_model()(ids) - want).abs().max() > 1e-2 * want.abs().max()


def test_slorb_on_a_subset_of_layers_and_dense_mode(tmp_path):
    model = sparse_model("gpt2", qat=False)
    ffn = [n for n in sparse_linear_names(model) if ".mlp." in n]
    model.get_submodule(ffn[0]).dense = True  # nothing pruned in the forward pass: S starts at 0
    attach_slorb(model, K, names=ffn)
    assert not model.get_submodule(ffn[0]).slorb.S.any() and model.get_submodule(ffn[1]).slorb.S.any()
    model.get_submodule(ffn[0]).dense = False
    with torch.no_grad():
        model.get_submodule(ffn[0]).slorb.S.normal_()
    art = load_artifact(compress_checkpoint(as_checkpoint(model.eval(), tmp_path, qat=False), tmp_path / "a",
                                            dense_dtype="float32"))
    assert art.slorb == SLoRBInfo(K, tuple(ffn)) and art.quantization is None
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(art.build_model()(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_float16_artifact_stores_s_in_float16(trained, artifacts):
    art = artifacts["llama", "float16"]
    s = art.dense["blocks.0.mlp.gate_proj.slorb.S"]
    assert s.dtype == torch.float16
    torch.testing.assert_close(s, trained["llama"].get_submodule("blocks.0.mlp.gate_proj").slorb.S.detach().half(),
                               rtol=0, atol=0)


def test_compress_refuses_awq_with_slorb(trained, tmp_path):
    with pytest.raises(ConfigError, match="carries SLoRB terms; --awq cannot be used"):
        compress_checkpoint(as_checkpoint(trained["llama"], tmp_path), tmp_path / "a", awq=True, force_awq=True)
    assert not (tmp_path / "a").exists()


def test_checkpoint_file_round_trip_carries_s(tmp_path):
    model = sparse_model("llama")
    attach_slorb(model, K)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, 1, model, optimizer, {
        "model_config": model.config.to_dict(), "sparsity": {"n": 2, "m": 4},
        "quantization": {"bits": 4, "group_size": QAT_GROUP}})
    ckpt = load_checkpoint(tmp_path)
    assert "blocks.0.attn.q_proj.slorb.S" in ckpt.model_state
    assert load_artifact(compress_checkpoint(tmp_path, tmp_path / "art")).slorb.k == K


def _save(path, art, slorb, dense=None):
    return save_artifact(path, model_config=art.model_config, tokenizer=art.tokenizer, packed=art.packed,
                         dense=art.dense if dense is None else dense, sparsity=art.sparsity,
                         quantization=art.quantization, dense_dtype=art.dense_dtype, slorb=slorb)


def test_artifact_validation_of_slorb(artifacts, tmp_path):
    art = artifacts["llama", "float32"]
    q_s = "blocks.0.attn.q_proj.slorb.S"
    with pytest.raises(ArtifactError, match=rf"missing tensor '{q_s}' \(expected float32 \[32, 2\]\)"):
        _save(tmp_path / "a", art, art.slorb, {k: v for k, v in art.dense.items() if k != q_s})
    with pytest.raises(ArtifactError, match=r"unexpected tensor 'blocks.0.attn.k_proj.slorb.S'"):
        _save(tmp_path / "a", art, SLoRBInfo(K, ("blocks.0.attn.q_proj",)))
    wrong = dict(art.dense, **{q_s: torch.zeros(32, 4)})
    with pytest.raises(ArtifactError, match=rf"'{q_s}' is float32 \[32, 4\], expected float32 \[32, 2\]"):
        _save(tmp_path / "a", art, art.slorb, wrong)
    with pytest.raises(ArtifactError, match=r"slorb.k 24 does not divide K=32 of layer 'blocks.0.attn.q_proj'"):
        _save(tmp_path / "a", art, SLoRBInfo(24, art.slorb.layers))
    with pytest.raises(ArtifactError, match="slorb.layers names 'lm_head'"):
        _save(tmp_path / "a", art, SLoRBInfo(K, ("lm_head",)))
    nan = dict(art.dense, **{"blocks.0.attn.q_proj.slorb.S": torch.full((32, 2), float("nan"))})
    with pytest.raises(ArtifactError, match="'blocks.0.attn.q_proj.slorb.S' holds non-finite values"):
        _save(tmp_path / "a", art, art.slorb, nan)
    assert not (tmp_path / "a").exists()
    # config.json edited by hand: bad k, unknown key; ``null`` means no SLoRB
    path = _save(tmp_path / "b", art, art.slorb)
    config = json.loads((path / "config.json").read_text())
    for slorb, match in (({"k": 0, "layers": ["blocks.0.attn.q_proj"]}, "slorb.k: expected a positive integer"),
                         ({"k": 16, "layers": []}, "slorb.layers is empty"),
                         ({"k": 16, "layers": ["x"], "p": 1}, "slorb: unknown field 'p'")):
        (path / "config.json").write_text(json.dumps({**config, "slorb": slorb}))
        with pytest.raises(ArtifactError, match=match):
            load_artifact(path)
    (path / "config.json").write_text(json.dumps({**config, "slorb": None}))
    with pytest.raises(ArtifactError, match="unexpected tensor '.*slorb.S'"):
        load_artifact(path)


def test_artifacts_without_slorb_are_unchanged(artifacts, tmp_path):
    plain = without_slorb(artifacts["llama", "float32"])
    path = _save(tmp_path / "plain", plain, None)
    assert "slorb" not in read_config(path)
    loaded = load_artifact(path)
    assert loaded.slorb is None and not slorb_layers(loaded.build_model())
    assert not any(".slorb." in n for n in expected_tensors(plain.model_config, plain.sparsity, plain.quantization,
                                                            plain.dense_dtype))


def test_inspect_counts_s_in_the_linear_bytes(artifacts):
    for dtype, extra_bits in (("float16", 1.0), ("float32", 2.0)):  # S: 16 (32) bits per k = 16 weights
        art = artifacts["llama", dtype]
        stats = artifact_stats(art.path)
        for layer in stats.layers:
            packed = art.packed[layer.name]
            s_bytes = layer.out_features * layer.in_features // K * (2 if dtype == "float16" else 4)
            assert layer.slorb_bytes == s_bytes
            assert layer.stored_bytes == sum(t.numel() * t.element_size()
                                             for t in packed.tensors(layer.name).values()) + s_bytes
            assert layer.storage == f"2:4+int4 g{QAT_GROUP}+slorb k{K}"
            # 2:4 + INT4 g16: 3 bits + 16/16 bits of scale; SLoRB adds 16/k (32/k) bits per weight
            assert layer.bits_per_weight == pytest.approx(4.0 + extra_bits)
        assert stats.slorb == {"k": K, "layers": list(art.slorb.layers)}
        assert stats.slorb_bytes == sum(layer.slorb_bytes for layer in stats.layers)
        assert stats.model_params == sum(p.numel() for p in art.build_model().parameters())
        assert f"SLoRB k{K}" in format_stats(stats)


# ---------------------------------------------------------------------------------------------------------
# ONNX export and generation


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_export_full_check_annotations_and_parity(artifacts, tmp_path, arch):
    art = artifacts[arch, "float32"]
    path = tmp_path / "m.onnx"
    model = export_onnx(art, path)
    onnx.checker.check_model(str(path), full_check=True)
    meta = ann.get_metadata(model)
    assert meta[ann.KEY_SLORB_K] == str(K)
    terms = ann.read_slorb_annotations(model)
    assert sorted(terms) == sorted(art.slorb.layers)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for layer, info in terms.items():
        n_out, k_in = art.packed[layer].out_features, art.packed[layer].in_features
        assert info["k"] == K and list(inits[info["initializer"]].dims) == [k_in // K, n_out]
        assert nodes[info["node"]].op_type == "MatMul"
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("ReduceSum") == len(art.slorb.layers)
    # the 2:4 weights keep their pattern and annotations; the SLoRB weight is not annotated as 2:4
    layers = ann.verify_sparsity_annotations(model)
    assert {n for n, v in layers.items() if v["pattern"] == "2:4"} == set(art.sparsity.layers)
    report = check_parity(path, art, threads=1)
    assert report.passed and len(report.checks) == 7
    # a graph without the SLoRB terms fails parity against the SLoRB artifact: the check sees them
    with pytest.raises(ExportError, match="ONNX parity failed"):
        check_parity(build_onnx_model(without_slorb(art)), art, threads=1)


def test_onnx_slorb_annotation_disagreement_is_reported(artifacts):
    model = build_onnx_model(artifacts["llama", "float32"])
    node = next(n for n in model.graph.node if ann.KEY_SLORB_LAYER in ann.get_metadata(n))
    ann.set_metadata(node, {ann.KEY_SLORB_K: "8"})
    with pytest.raises(ExportError, match="sparsert.slorb.k='8' disagrees with initializer"):
        ann.read_slorb_annotations(model)


def test_onnx_fp16_artifact_parity(artifacts):
    assert check_parity(build_onnx_model(artifacts["gpt2", "float16"]), artifacts["gpt2", "float16"],
                        threads=1).passed


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_stepper_greedy_equals_torch_stepper(artifacts, tmp_path, arch):
    art = artifacts[arch, "float32"]
    export_onnx(art, tmp_path / "kv.onnx")
    prompt = list(b"def main():\n")
    cfg = GenerationConfig(max_new_tokens=20)
    want = generate_ids(TorchStepper(art.build_model()), prompt, cfg)
    assert len(set(want)) > 3  # not a degenerate constant output
    assert generate_ids(OnnxStepper(tmp_path / "kv.onnx", threads=1), prompt, cfg) == want
    # and the SLoRB terms change what is generated here (else this test would not see them)
    assert generate_ids(TorchStepper(without_slorb(art).build_model()), prompt, cfg) != want


# ---------------------------------------------------------------------------------------------------------
# GPU runtime assembly (on the CPU with the dense backend) and on a GPU


def test_runtime_model_assembly_adds_slorb_terms_on_cpu(artifacts):
    from sparsert.runtime.dispatch import DenseCublas, Dispatcher
    from sparsert.runtime.gpu_backend import SLoRBLinearGPU, build_runtime_model

    art = artifacts["gpt2", "float32"]
    model = build_runtime_model(art, torch.device("cpu"), dtype=torch.float32, dense_dtype=torch.float32,
                                dispatcher=Dispatcher("cpu", persist=False), backends=[DenseCublas()])
    wrappers = {n for n, m in model.named_modules() if isinstance(m, SLoRBLinearGPU)}
    assert wrappers == set(art.slorb.layers)
    ids = torch.tensor([list(b"hello sparse world")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), art.build_model()(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_stepper_with_slorb_matches_torch(artifacts):
    from sparsert.runtime.gpu_backend import GpuStepper

    art = artifacts["llama", "float32"]
    ref = TorchStepper(art.build_model())
    stepper = GpuStepper(art)
    assert set(stepper.sparse_layers()) == set(art.packed)
    prompt = list(b"The sparse tensor cores ")
    ref_logits = ref.step(prompt)
    logits = stepper.step(prompt).float().cpu()
    assert float((logits - ref_logits).norm() / ref_logits.norm()) < 2e-2
    report = stepper.memory_report()
    assert report["slorb_bytes"] == sum(t.numel() * 4 for n, t in art.dense.items() if n.endswith(".slorb.S"))
