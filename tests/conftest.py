"""Shared pytest setup: one torch thread, the ``gpu`` marker, and tiny local Hugging Face models.

Tests marked ``@pytest.mark.gpu`` run only where a CUDA device of sm_80 or newer is usable through
cuda-python (driver present, device found) and torch was built with CUDA; elsewhere they are skipped with
the reason (``no NVIDIA GPU/driver available (needs sm_80+)`` and the detail).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

# What `sparsert` (sparsert.cli.main) sets before transformers is imported: set for the whole session, so tests
# that run the CLI in-process see the same transformers whatever ran first.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The sentences the fixture tokenizers are trained on.
HF_TOKENIZER_TEXT = ("The quick brown fox jumps over the lazy dog. Sparse models keep two of every four weights. "
                     "Zwei von vier Gewichten bleiben übrig, the rest are zero. ")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests use tiny tensors: one intra-op thread avoids OpenMP hand-off costs on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _train_on_the_cpu_unless_a_gpu_test(request, monkeypatch):
    """The CPU suite's training runs stay on the CPU where a GPU exists too (their exact-resume checks assume
    the CPU's deterministic kernels): ``--device auto`` reads $SPARSERT_DEVICE. GPU tests choose their own."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("SPARSERT_DEVICE", "cpu")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """~200 KB of real text for training runs: this repository's trainer sources, repeated."""
    import inspect

    import sparsert.train.run_dir as run_dir_mod
    import sparsert.train.train_config as train_config_mod
    import sparsert.train.trainer as trainer_mod

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    text = "".join(inspect.getsource(m) for m in (trainer_mod, train_config_mod, run_dir_mod))
    path.write_text(text * 3, encoding="utf-8")
    return path


TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    """``tools/<name>.py`` imported as a module (tools/ holds scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    if str(TOOLS) not in sys.path:  # tools import each other, as they do when run as scripts
        sys.path.insert(0, str(TOOLS))
    spec.loader.exec_module(module)
    return module


def check_tool_measures_nothing_without_gpu(name: str, tmp_path: Path) -> None:
    """``tools/<name>.py --out FILE`` on a machine without a GPU: exit 0, ``no GPU: nothing measured``, no FILE.
    Does nothing where a GPU is present (the tool would measure)."""
    import subprocess
    import sys

    from sparsert.runtime.device import probe_gpu

    if probe_gpu()[0]:
        return
    out = tmp_path / f"{name}.md"
    proc = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("no GPU: nothing measured"), proc.stderr
    assert not out.exists()


@functools.lru_cache(maxsize=1)
def gpu_status() -> tuple[bool, str]:
    """(usable, reason) for the GPU tests."""
    from sparsert.runtime.device import NO_GPU_MESSAGE, probe_gpu

    ok, reason = probe_gpu()
    if not ok:
        return False, reason
    import torch

    if not torch.cuda.is_available():
        return False, f"{NO_GPU_MESSAGE}: torch {torch.__version__} has no CUDA support"
    return True, reason


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    ok, reason = gpu_status()
    if ok:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(skip)


def _save_bpe_tokenizer(transformers, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(HF_TOKENIZER_TEXT.split(". "), trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(out))


def tiny_qwen2_moe(hidden: int = 64, vocab: int = 320):
    """A random 1-layer transformers Qwen2-MoE (4 experts of ``hidden`` features, 2 per token, a shared expert)
    whose experts are fused 3-D parameters, as transformers 5 holds them; skips the test when this
    transformers has no Qwen2-MoE or keeps the experts as nn.Linear layers."""
    transformers = pytest.importorskip("transformers")
    config_class = getattr(transformers, "Qwen2MoeConfig", None)
    if config_class is None:
        pytest.skip("this transformers has no Qwen2-MoE")
    torch.manual_seed(0)
    config = config_class(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          moe_intermediate_size=hidden, shared_expert_intermediate_size=hidden, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("this transformers holds Qwen2-MoE experts as nn.Linear layers")
    return model


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local Hugging Face model directories built from configs (random weights; nothing is downloaded):
    ``llama``, ``qwen2`` and ``gpt2`` causal LMs (vocab 320, hidden 64, 2 layers, 4 heads, 128 positions), each
    with a byte-level BPE tokenizer of 300 tokens (``<eos>`` included) trained on a few sentences, and ``bert``
    (an encoder, no tokenizer). Skips without transformers/tokenizers. Shared by the session: copy a directory
    before changing it."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("hf_models")
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    configs = {
        "llama": transformers.LlamaConfig(**common),
        "qwen2": transformers.Qwen2Config(**common),
        "gpt2": transformers.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                        bos_token_id=0, eos_token_id=0),
    }
    dirs = {}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(root / name))
        _save_bpe_tokenizer(transformers, root / name)
        dirs[name] = root / name
    bert = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64)
    transformers.BertModel(bert).save_pretrained(str(root / "bert"))
    dirs["bert"] = root / "bert"
    return dirs


class CsltStandIn:
    """torch's cuSPARSELt ops as torch documents them, on CPU, for checking how sparsert calls them without a
    GPU (the real library needs one; the GPU tests run it). ``_cslt_compress`` returns the 2:4 matrix itself;
    ``_cslt_sparse_mm(A, B, bias)`` is ``A·B + bias`` per row of A (transposed with ``transpose_result``) and
    asserts the library's preconditions; the search returns ``found``. Records searches and configurations."""

    def __init__(self, found=(3, 1, -1, 10)):
        self.found, self.searches, self.runs = found, 0, []
        self.fail_if = set()  # {(alg_id, n)}: that configuration raises on that many columns of B (a bad replay)

    def compress(self, dense):
        assert dense.is_contiguous() and dense.shape[0] % 8 == 0 and dense.shape[1] % 8 == 0
        return dense.clone()

    def _check(self, a, b, bias):
        assert b.dtype == a.dtype, "A and B dtypes differ"
        assert b.shape[0] == a.shape[1] and b.shape[0] % 8 == 0 and b.shape[1] % 8 == 0, tuple(b.shape)
        assert b.is_contiguous() or b.t().is_contiguous()
        assert bias is None or (bias.dtype == a.dtype and bias.shape == (a.shape[0],))

    def sparse_mm(self, a, b, bias=None, alpha=None, out_dtype=None, transpose_result=False, alg_id=0, split_k=1,
                  split_k_mode=-1):
        from sparsert.runtime.cusparselt import CsltConfig

        self._check(a, b, bias)
        if (alg_id, b.shape[1]) in self.fail_if:
            raise RuntimeError("CUDA error: the stand-in's configuration does not run this shape")
        self.runs.append(CsltConfig(alg_id, split_k, split_k_mode))
        out = a.float() @ b.float() + (0 if bias is None else bias.float()[:, None])
        return (out.t().contiguous() if transpose_result else out).to(b.dtype)

    def mm_search(self, a, b, bias, alpha, out_dtype, transpose_result):
        self._check(a, b, bias)
        self.searches += 1
        return self.found


@pytest.fixture
def cslt_stand_in(monkeypatch):
    """A :class:`CsltStandIn` in place of torch's cuSPARSELt ops, device 0 reported as sm_90, and a fresh
    configuration cache for the test."""
    import types

    from sparsert.runtime import cusparselt

    s = CsltStandIn()
    monkeypatch.setattr(torch, "_cslt_compress", s.compress, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", s.sparse_mm, raising=False)
    monkeypatch.setattr(torch._C, "_cusparselt", types.SimpleNamespace(mm_search=s.mm_search), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(cusparselt, "_TUNED", cusparselt.TunedCusparselt(persist=False))
    cusparselt.cusparselt_status.cache_clear()
    assert cusparselt.cusparselt_status() == ""
    yield s
    cusparselt.cusparselt_status.cache_clear()
