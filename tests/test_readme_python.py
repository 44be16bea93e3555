"""The README's "Use from Python" snippets run as written (on the CPU), against a tiny artifact and a tiny 2:4
Hugging Face model saved where the snippets look for them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_the_two_snippets() -> None:
    snippets = _snippets()
    assert len(snippets) == 2
    assert "runs/demo/artifact" in snippets[0] and "runs/hf-my-llama/hf" in snippets[1]


def test_artifact_snippet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from sparsert.runtime.artifact import SparsityInfo, save_artifact
    from sparsert.runtime.model import DecoderLM, ModelConfig, sparse_linear_names
    from sparsert.runtime.packed_linear import pack_linear
    from sparsert.runtime.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    config = ModelConfig(d_model=64, n_layers=1, n_heads=4, ffn_dim=128, max_seq_len=64)
    sd = DecoderLM(config).state_dict()
    names = sparse_linear_names(config)
    packed = {n: pack_linear(sd[f"{n}.weight"]) for n in names}
    dense = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] not in packed}
    save_artifact(tmp_path / "runs/demo/artifact", model_config=config, tokenizer=ByteTokenizer(), packed=packed,
                  dense=dense, sparsity=SparsityInfo(tuple(names)), quantization=None)
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippets()[0], "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_swap_snippet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    transformers = pytest.importorskip("transformers")
    from sparsert.runtime.nm_mask import nm_mask

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # what `sparsert train --model` leaves in <run>/hf: 2:4 zeros in the block linears
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.mul_(nm_mask(module.weight, 2, 4))
    model.save_pretrained(str(tmp_path / "runs/hf-my-llama/hf"))
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippets()[1], "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "14 linear layers swapped (3.125 bits/weight held), 1 left dense"
