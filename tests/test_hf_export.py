"""`sparsert export HF_DIR`: a Hugging Face directory sparsert wrote, traced by torch.onnx into a logits graph
whose 2:4 (and 2:4+INT4) weights are stored and annotated as in artifact exports, checked against transformers.
Models and tokenizers are built here from configs (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from conftest import _save_bpe_tokenizer, tiny_qwen2_moe  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from test_generate_cli import make_artifact, run_main  # noqa: E402
from test_hf_compress import _model_dir  # noqa: E402

from sparsert.export.annotations import get_metadata, is_nm_along_axis, read_sparsity_annotations  # noqa: E402
from sparsert.export.hf_export import _dynamic_rope_as_static, export_hf_model  # noqa: E402
from sparsert.export.onnx_runner import empty_past, make_session, run_logits  # noqa: E402
from sparsert.runtime.errors import ArtifactError, ConfigError, ExportError  # noqa: E402
from sparsert.train.hf_compress import compress_hf_model  # noqa: E402
from sparsert.train.hf_model import saved_sparse_layers  # noqa: E402


def _config_class(name: str):
    """The transformers config class ``name``; skips the test when this transformers has none."""
    config_class = getattr(transformers, name, None)
    if config_class is None:
        pytest.skip(f"this transformers has no {name}")
    return config_class


def _compressed(tmp_path: Path, name: str, config) -> tuple[Path, list[str]]:  # noqa: ANN001 - a PretrainedConfig
    """A random model of ``config`` (seed 0) saved as ``tmp_path/name``, then ``compress``ed (magnitude 2:4)."""
    torch.manual_seed(0)
    src = tmp_path / name
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(src))
    return compress_hf_model(src, tmp_path / f"{name}-24")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Llama and GPT-2 (Conv1D) directories and their `compress` outputs: 2:4, and 2:4 + INT4 group 64."""
    root = tmp_path_factory.mktemp("hf_export")
    dirs = {}
    for arch in ("llama", "gpt2"):
        dirs[arch] = _model_dir(root, arch)
        for tag, int4 in (("24", False), ("int4", True)):
            dirs[f"{arch}-{tag}"], _ = compress_hf_model(dirs[arch], root / f"{arch}-{tag}", int4=int4, group_size=64)
    return dirs


def _reference(path: Path, ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("int4", [False, True])
def test_export_stores_and_annotates_every_recorded_layer(compressed, tmp_path, capsys, arch, int4):
    """The INT4 directories are exported with the KV cache (the default), the others with --no-kv-cache."""
    src = compressed[f"{arch}-{'int4' if int4 else '24'}"]
    out = tmp_path / "model.onnx"
    kv = int4
    code, stdout, err = run_main(capsys, "export", str(src), "-o", str(out), *([] if kv else ["--no-kv-cache"]))
    assert code == 0, err
    kind = "2:4+INT4 (INT4 initializer -> DequantizeLinear block [64]" if int4 else "2:4 float32"
    n_layers = 14 if arch == "llama" else 8
    assert f"linear weights: {n_layers} {kind}" in stdout and f"KV cache {'yes' if kv else 'no'}" in stdout
    assert "parity vs PyTorch" in stdout and ": passed" in stdout
    assert f"over {7 if kv else 4} checks" in stdout  # 3 prompts, a batch of 2, and 3 cached steps

    model = onnx.load(str(out))
    meta = get_metadata(model)
    assert meta["sparsert.sparsity.pattern"] == "2:4" and meta["sparsert.kv_cache"] == ("1" if kv else "0")
    assert meta["sparsert.quantization"] == ("int4" if int4 else "none")
    assert meta["sparsert.hf_model_type"] == arch
    layers = read_sparsity_annotations(model)["layers"]
    assert set(layers) == set(saved_sparse_layers(src))
    inits = {t.name: t for t in model.graph.initializer}
    consumers = {name: n for n in model.graph.node for name in n.input}
    stored = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    for name, info in layers.items():
        assert info["pattern"] == "2:4" and info["axis"] == 0
        tensor = inits[info["initializer"]]
        module = stored.get_submodule(name)
        w_kn = module.weight.detach().numpy() if arch == "gpt2" else module.weight.detach().numpy().T
        if int4:
            assert tensor.data_type == onnx.TensorProto.INT4 and info["bits"] == 4 and info["group_size"] == 64
            dq = consumers[tensor.name]
            assert dq.op_type == "DequantizeLinear" and consumers[dq.output[0]].name == info["node"]
            codes = numpy_helper.to_array(tensor).astype(np.float32)
            scales = numpy_helper.to_array(inits[info["scale"]])
            np.testing.assert_array_equal(codes * np.repeat(scales, 64, axis=0), w_kn)
        else:
            array = numpy_helper.to_array(tensor)
            np.testing.assert_array_equal(array, w_kn)  # B [K, N]: the groups of four run along axis 0
            assert is_nm_along_axis(array, 2, 4, axis=0)
    # dynamic batch and length: ONNX Runtime on fresh ids against transformers (INT4 through MatMulNBits in fp32),
    # with the KV cache as a 9-token prefix and then 4 tokens after it
    ids = np.random.default_rng(1).integers(0, 320, size=(3, 13)).astype(np.int64)
    session = make_session(out, accuracy_level=1)
    if kv:
        first, past = run_logits(session, ids[:, :9], empty_past(session, 3))
        assert past["past_key_0"].shape[2] == 9
        got = np.concatenate([first, run_logits(session, ids[:, 9:], past)[0]], axis=1)
    else:
        got = run_logits(session, ids)[0]
    want = _reference(src, ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_bad_input_is_named(compressed, tmp_path, capsys):
    # a plain transformers directory records no 2:4 layers
    with pytest.raises(ConfigError, match=r"without sparsert.json: it records no 2:4 layers; prune it first with: "
                                          r"sparsert compress"):
        export_hf_model(compressed["llama"], tmp_path / "a.onnx")
    # the output may not go inside the directory
    code, _, err = run_main(capsys, "export", str(compressed["llama-24"]), "-o",
                            str(compressed["llama-24"] / "m.onnx"))
    assert code == 2 and "is inside the artifact directory" in err
    # a layer sparsert.json calls 2:4 whose weight is not: named, nothing written
    broken = tmp_path / "broken"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(compressed["llama-24"]))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)
    model.save_pretrained(str(broken))
    (broken / "sparsert.json").write_text((compressed["llama-24"] / "sparsert.json").read_text())
    with pytest.raises(ExportError, match=r"layer model\.layers\.1\.mlp\.up_proj: sparsert\.json records it as 2:4, "
                                          r"but its weight is not 2:4 along K"):
        export_hf_model(broken, tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists() and not list(tmp_path.glob(".b.onnx*"))
    # a malformed sparsert.json: a layer the model lacks, a norm, a group of 0
    record = json.loads((compressed["llama-24"] / "sparsert.json").read_text())
    entry = next(iter(record["sparse_layers"].values()))
    for layer, group, message in (
        ("model.layers.0.nope", None, r"broken/sparsert\.json records layer 'model\.layers\.0\.nope', which the "
                                      r"model does not have"),
        ("model.layers.0.input_layernorm", None, r"a LlamaRMSNorm without a 2-D weight"),
        ("model.layers.0.mlp.up_proj", 0, r"not a valid sparsert layer record .*not positive"),
    ):
        (broken / "sparsert.json").write_text(json.dumps({**record, "sparse_layers": {
            layer: {**entry, "qat_group_size": group}}}))
        with pytest.raises(ArtifactError, match=message):
            export_hf_model(broken, tmp_path / "b.onnx")
    for meta, message in (({**record, "version": 2}, r"version 2; this sparsert reads version 1"),
                          ({**record, "sparse_layers": {"model.layers.0.mlp.up_proj": None}},
                           r"layer 'model\.layers\.0\.mlp\.up_proj': expected an object .*, got NoneType"),
                          ({**record, "sparse_layers": {"model.layers.0.mlp.up_proj": {**entry, "n": 5}}},
                           r"n 5 exceeds m 4")):
        (broken / "sparsert.json").write_text(json.dumps(meta))
        with pytest.raises(ArtifactError, match=message):
            export_hf_model(broken, tmp_path / "b.onnx")
    # --accuracy-level applies to INT4 only
    code, _, err = run_main(capsys, "export", str(compressed["llama-24"]), "-o", str(tmp_path / "c.onnx"),
                            "--accuracy-level", "4")
    assert code == 2 and "applies to INT4 artifacts" in err


def test_int4_values_saved_in_bf16_stay_float_with_a_note(compressed, tmp_path, capsys):
    """A directory saved in bfloat16 no longer holds exact INT4 codes times fp16 scales: those layers are
    exported as float32 2:4 (still checked against transformers), and the export says so."""
    src = tmp_path / "bf16"
    code, _, err = run_main(capsys, "compress", str(compressed["llama-int4"]), "-o", str(src), "--dtype", "bfloat16")
    assert code == 0 and "note: --dtype bfloat16 rounds the INT4 values" in err, err
    assert all(info["qat_group_size"] == 64 for info in json.loads((src / "sparsert.json").read_text())
               ["sparse_layers"].values())
    code, stdout, err = run_main(capsys, "export", str(src), "-o", str(tmp_path / "m.onnx"))
    assert code == 0, err
    assert "are not exact INT4 codes of group 64 (saved in reduced precision?); kept as float32 2:4" in err
    assert "2:4 float32" in stdout and ": passed" in stdout


def test_generate_through_onnx_runtime(compressed, tmp_path, capsys):
    """`generate HF_DIR --backend onnx` gives transformers' greedy tokens, on a graph exported for the run or on
    `--onnx FILE`; an export of other weights, or of a sparsert artifact, is refused by name, and the artifact
    path refuses a Hugging Face export."""
    src = compressed["llama-int4"]
    args = ["generate", str(src), "--prompt", "The quick", "--max-new-tokens", "6", "--json"]
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    want = json.loads(out)["ids"]
    code, out, err = run_main(capsys, *args, "--backend", "onnx")
    assert code == 0, err
    assert json.loads(out)["ids"] == want
    onnx_file = tmp_path / "m.onnx"
    export_hf_model(src, onnx_file, parity=False)
    code, out, err = run_main(capsys, *args, "--backend", "onnx", "--onnx", str(onnx_file))
    assert code == 0, err
    assert json.loads(out)["ids"] == want
    code, _, err = run_main(capsys, "generate", str(compressed["llama-24"]), "--prompt", "hi", "--backend", "onnx",
                            "--onnx", str(onnx_file))
    assert code == 2 and "holds other weights (digest " in err and f"not those of {compressed['llama-24']}" in err
    assert f"export the directory with `sparsert export {compressed['llama-24']} -o FILE` and pass --onnx FILE" in err


def test_artifact_and_hf_exports_are_not_mixed_up(compressed, tmp_path, capsys):
    tiny_artifact = make_artifact(tmp_path / "art")
    hf_onnx, art_onnx = tmp_path / "hf.onnx", tmp_path / "art.onnx"
    export_hf_model(compressed["llama-24"], hf_onnx, parity=False)
    code, _, err = run_main(capsys, "export", str(tiny_artifact), "-o", str(art_onnx), "--skip-parity")
    assert code == 0, err
    code, _, err = run_main(capsys, "generate", str(compressed["llama-24"]), "--prompt", "hi", "--backend", "onnx",
                            "--onnx", str(art_onnx))
    assert code == 2 and "is the export of a sparsert artifact, not of the Hugging Face directory" in err
    code, _, err = run_main(capsys, "generate", str(tiny_artifact), "--prompt", "hi", "--backend", "onnx",
                            "--onnx", str(hf_onnx))
    assert code == 2 and "is the export of a Hugging Face model directory; run it with that directory" in err


def test_layers_with_equal_weights_keep_their_own_names(tmp_path):
    """OPT registers k_proj before q_proj but runs q_proj first: with equal weights, each annotation still names
    the layer whose module the node was traced in."""
    config_class = getattr(transformers, "OPTConfig", None)
    if config_class is None:
        pytest.skip("this transformers has no OPT")
    torch.manual_seed(0)
    config = config_class(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
                          max_position_embeddings=64, word_embed_proj_dim=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    attn = model.model.decoder.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.copy_(attn.k_proj.weight)
    src = tmp_path / "opt"
    model.save_pretrained(str(src))
    out, _ = compress_hf_model(src, tmp_path / "opt-24")
    result, _ = export_hf_model(out, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    nodes = {n.name: n for n in proto.graph.node}
    for layer in ("model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.k_proj"):
        scopes = get_metadata(nodes[result.layers[layer]["node"]])["pkg.torch.onnx.name_scopes"]
        assert f"'model.{layer}'" in scopes


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_layers_export_with_a_kv_cache(tmp_path, capsys, arch):
    """Mistral (every layer a sliding window of 8) and Gemma2 (alternating sliding and full layers): the KV graph
    keeps every past token and the masks limit each query to its window, so it matches transformers (whose own
    cache drops the old tokens) on prompts and cached steps well past the window; the window changes the logits.
    Mistral's greedy tokens through `generate --backend onnx` (cached steps, no rerun note) are transformers'."""
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, sliding_window=8)
    config = (transformers.MistralConfig(**common) if arch == "mistral"
              else transformers.Gemma2Config(**common, head_dim=16))
    out, _ = _compressed(tmp_path, arch, config)
    result, _ = export_hf_model(out, tmp_path / "m.onnx")
    assert result.parity.passed and result.kv_cache
    ids = torch.tensor([[(7 * j + 1) % 320 for j in range(30)]])
    with torch.no_grad():
        windowed = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=ids).logits
        full = transformers.AutoModelForCausalLM.from_pretrained(str(out), sliding_window=64).eval()
        assert (windowed - full(input_ids=ids).logits).abs().max() > 1e-2  # the parity above saw the window
    if arch == "mistral":
        _save_bpe_tokenizer(transformers, out)
        args = ["generate", str(out), "--prompt", "The quick brown fox jumps over the lazy dog", "--max-new-tokens",
                "12", "--json"]
        code, stdout, err = run_main(capsys, *args, "--backend", "torch")
        assert code == 0, err
        want = json.loads(stdout)["ids"]
        code, stdout, err = run_main(capsys, *args, "--backend", "onnx")
        assert code == 0 and json.loads(stdout)["ids"] == want and "reruns" not in err, err


def test_a_hybrid_state_space_cache_is_refused_for_the_kv_graph(tmp_path):
    """Jamba's cache holds Mamba state for its state-space layers, which the KV graph does not: refused by name,
    with the way out, and nothing is written."""
    config = _config_class("JambaConfig")(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=4, num_experts=1,
        mamba_d_state=8, max_position_embeddings=64)
    out, _ = _compressed(tmp_path, "jamba", config)
    with pytest.raises(ExportError, match=r"the JambaForCausalLM has no KV cache the KV-cache graph can hold: layer "
                                          r"0 of its cache is a \w+ \(a hybrid cache\).*export it with --no-kv-cache"):
        export_hf_model(out, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_longrope_parity_runs_on_real_frequencies(tmp_path):
    """Phi-3 with longrope caches its long frequencies on the module at the first call; traced first, that cache
    would hold the exporter's fake tensors and the parity reference would be wrong. The export passes."""
    config = transformers.Phi3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     original_max_position_embeddings=16, pad_token_id=0,
                                     rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                   "long_factor": [8.0] * 8})
    out, _ = _compressed(tmp_path, "phi3", config)
    result, _ = export_hf_model(out, tmp_path / "m.onnx", with_kv_cache=False)
    assert result.parity.passed


def test_dynamic_ntk_rope_exports_exactly_within_the_context(tmp_path):
    """Llama with dynamic NTK RoPE: its frequency update (a data-dependent branch torch.export cannot trace) only
    acts past max_position_embeddings, the graph's context, so the export traces without it, matches transformers
    up to the full context, and leaves the model's forward as it was."""
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    out, _ = _compressed(tmp_path, "llama-dynamic", config)
    result, _ = export_hf_model(out, tmp_path / "m.onnx")
    assert result.parity.passed and result.kv_cache
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    rotary = model.model.rotary_emb
    with _dynamic_rope_as_static(model, 64):
        assert "forward" in vars(rotary)
    assert "forward" not in vars(rotary)
    with _dynamic_rope_as_static(model, 65):  # longer than the frequencies hold: left to transformers
        assert "forward" not in vars(rotary)


def test_falcon_alibi_bfloat16_arithmetic_runs_in_onnx_runtime(tmp_path):
    """Falcon with ALiBi computes its biases with a bfloat16 Mul, which ONNX Runtime's CPU provider lacks: the
    export runs it in float32 between Casts (the same values), so the graph loads and matches transformers."""
    config = transformers.FalconConfig(vocab_size=320, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       alibi=True, new_decoder_architecture=False, multi_query=True,
                                       max_position_embeddings=64)
    out, _ = _compressed(tmp_path, "falcon-alibi", config)
    result, _ = export_hf_model(out, tmp_path / "m.onnx")
    assert result.parity.passed and result.kv_cache
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    bf16 = {v.name for v in graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16}
    arithmetic = [n for n in graph.node if n.op_type in ("Add", "Sub", "Mul", "Div")]
    assert bf16 and not any(out in bf16 for n in arithmetic for out in n.output)
    assert any(n.op_type == "Cast" and n.output[0] in bf16 and n.input[0].endswith("__f32") for n in graph.node)


@pytest.mark.parametrize("int4", [False, True])
def test_moe_experts_export_as_per_expert_matmuls_placed_and_annotated(tmp_path, int4):
    """transformers 5's Qwen2-MoE holds its experts fused (3-D, and its default grouped_mm kernel has no ONNX
    function): the export unfuses them, so each expert multiplies the tokens routed to it by its own constant
    weights, placed and annotated 2:4 (INT4 too) like every other layer. The routed rows are gathered and written
    back without ScatterND's reduction attribute (TensorRT's parser ignores it), and ONNX Runtime matches
    transformers, also on one-token cached steps where some experts get no token."""
    model = tiny_qwen2_moe()
    src = tmp_path / "moe"
    model.save_pretrained(str(src))
    out, names = compress_hf_model(src, tmp_path / "moe-24", int4=int4, group_size=32)
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 8
    result, notes = export_hf_model(out, tmp_path / "m.onnx")
    assert result.parity.passed and result.kv_cache
    steps = [c.mode.rpartition(" ")[2].split("..") for c in result.parity.checks if c.mode.startswith("kv-cache")]
    assert any(a == b for a, b in steps)  # a one-token step: two of the four experts get no token
    assert {n for n, info in result.layers.items() if info["pattern"] == "2:4"} == set(names)
    assert all(result.layers[n]["bits"] == (4 if int4 else None) for n in experts)
    assert ("8 MoE expert matrices exported as per-expert MatMuls over the tokens routed to each (NonZero, GatherND, "
            "ScatterND)") in notes
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert not [t.name for t in graph.initializer if len(t.dims) == 3]  # no fused expert tensor is left
    ops = [n.op_type for n in graph.node]
    assert ops.count("NonZero") == 4 and ops.count("ScatterND") == 4
    assert all(not n.attribute for n in graph.node if n.op_type == "ScatterND")


def test_deepseek_v3_mla_and_grouped_routing_export_with_a_kv_cache(tmp_path):
    """DeepSeek-V3 (multi-head latent attention with its low-rank q/kv projections, a dense first layer, then
    routed experts with group-limited top-k and a shared expert, YaRN RoPE) compresses and exports with its KV
    cache: every linear, the experts' included, is placed and annotated 2:4 and ONNX Runtime matches PyTorch."""
    config = _config_class("DeepseekV3Config")(
        vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0})
    out, names = _compressed(tmp_path, "deepseek", config)
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 8 and "model.layers.0.self_attn.kv_a_proj_with_mqa" in names
    result, _ = export_hf_model(out, tmp_path / "m.onnx")
    assert result.parity.passed and result.kv_cache
    assert {n for n, info in result.layers.items() if info["pattern"] == "2:4"} == set(names)  # experts too


def test_place_weights_keeps_a_traced_constant_in_place_when_only_its_layer_reads_it():
    """A float32 layer whose traced B only its MatMul reads keeps that initializer, renamed and annotated (protobuf's
    arena would not free a replaced copy's bytes: a 7B export would hold its weights twice); a B two nodes read
    is stored as a new initializer for the layer and stays, unannotated, for the other node."""
    from sparsert.export.hf_export import graph_weight, layer_key, place_weights

    rng = np.random.default_rng(0)
    w_own = (rng.standard_normal((8, 4)) * np.tile([1, 0, 0, 1], 2)[:, None]).astype(np.float32)  # B [K, N]: 2:4 on K
    w_shared = (rng.standard_normal((8, 4)) * np.tile([0, 1, 1, 0], 2)[:, None]).astype(np.float32)
    nodes = [onnx.helper.make_node("MatMul", ["x", "traced_a"], ["y"], name="mm_a"),
             onnx.helper.make_node("MatMul", ["x", "traced_b"], ["z"], name="mm_b"),
             onnx.helper.make_node("MatMul", ["x", "traced_b"], ["u"], name="mm_c")]
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])
    outs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4]) for n in "yzu"]
    inits = [numpy_helper.from_array(w_own, "traced_a"), numpy_helper.from_array(w_shared, "traced_b")]
    proto = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], outs, inits))
    traced_a = proto.graph.initializer[0]
    layers = {"own": torch.nn.Linear(8, 4, bias=False), "shared": torch.nn.Linear(8, 4, bias=False)}
    layers["own"].weight.data = torch.from_numpy(w_own.T.copy())
    layers["shared"].weight.data = torch.from_numpy(w_shared.T.copy())
    model = torch.nn.ModuleDict(layers)
    info = {"dense": False, "n": 2, "m": 4}
    keys = {name: layer_key(model, name, info) for name in layers}
    notes = place_weights(proto, keys, lambda name, b: graph_weight(name, b, info)[0])

    names = sorted(t.name for t in proto.graph.initializer)
    assert names == ["own.weight_t", "shared.weight_t", "traced_b"]
    assert traced_a.name == "own.weight_t"  # the same message: renamed in place, not copied
    assert [n.input[1] for n in proto.graph.node] == ["own.weight_t", "shared.weight_t", "traced_b"]
    annotated = read_sparsity_annotations(proto)["layers"]
    assert {k: (v["initializer"], v["pattern"]) for k, v in annotated.items()} == {
        "own": ("own.weight_t", "2:4"), "shared": ("shared.weight_t", "2:4")}
    assert len(notes) == 1 and "shared" in notes[0]
    for t in proto.graph.initializer:
        expected = w_own if t.name == "own.weight_t" else w_shared
        np.testing.assert_array_equal(numpy_helper.to_array(t), expected)


def test_the_traced_model_is_freed_before_the_weights_are_placed(compressed, tmp_path, monkeypatch):
    """The float32 model is not held beside the graph once traced (onnxscript's rewrite rules would keep it through
    the last graph they matched): at place_weights its parameters are gone, and the export still passes parity."""
    import gc
    import weakref

    import sparsert.export.hf_export as hf_export_mod

    trace, place, seen = hf_export_mod._trace, hf_export_mod.place_weights, {}

    def tracing(model, *args):
        seen["param"] = weakref.ref(next(model.parameters()))
        return trace(model, *args)

    def placing(*args):
        gc.collect()
        seen["alive"] = seen["param"]() is not None
        return place(*args)

    monkeypatch.setattr(hf_export_mod, "_trace", tracing)
    monkeypatch.setattr(hf_export_mod, "place_weights", placing)
    result, _ = export_hf_model(compressed["llama-24"], tmp_path / "m.onnx")
    assert seen["alive"] is False
    assert result.parity.passed
