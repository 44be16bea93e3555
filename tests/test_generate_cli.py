"""`sparsert export` and `sparsert generate` from the command line: the export -> generate chain in real
subprocesses, backends agreeing on greedy text, and one-line errors (exit 2, no output file) on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from sparsert.cli import main
from sparsert.export import parity as parity_mod
from sparsert.runtime.artifact import QuantizationInfo, SparsityInfo, save_artifact
from sparsert.runtime.errors import ArtifactError
from sparsert.runtime.model import DecoderLM, ModelConfig, sparse_linear_names
from sparsert.runtime.packed_linear import pack_linear
from sparsert.runtime.tokenizer import ByteTokenizer

PROMPT = "def main():\n"


def make_artifact(path: Path, arch: str = "llama", seed: int = 0, max_seq_len: int = 48) -> Path:
    """A random tiny model (weights x10 for varied greedy output) saved as a 2:4 + INT4 (group 16) artifact."""
    torch.manual_seed(seed)
    config = ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=max_seq_len)
    model = DecoderLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    sd = model.state_dict()
    names = sparse_linear_names(config)
    packed = {n: pack_linear(sd[f"{n}.weight"], int4_group_size=16, bias=sd.get(f"{n}.bias")) for n in names}
    dense = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in packed}
    return save_artifact(path, model_config=config, tokenizer=ByteTokenizer(), packed=packed, dense=dense,
                         sparsity=SparsityInfo(tuple(names)), quantization=QuantizationInfo(tuple(names), 16))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("cli") / "art")


def sparsert(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Run ``python -m sparsert <args>`` for each argument list, concurrently; results in order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "sparsert", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for args in commands]
    results = []
    for args, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------------------
# The chain, in subprocesses


def test_export_then_generate_onnx_and_torch_same_greedy_text(tmp_path, artifact):
    out = tmp_path / "out" / "model.onnx"
    (done,) = sparsert(["export", str(artifact), "-o", str(out)])
    assert done.returncode == 0, done.stderr
    assert "14 2:4+INT4" in done.stdout and "passed" in done.stdout and "parity vs PyTorch" in done.stdout
    onnx.checker.check_model(str(out), full_check=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temp files left

    args = ["generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "24"]
    by_onnx, by_torch = sparsert([*args, "--backend", "onnx", "--onnx", str(out)], [*args, "--backend", "torch"])
    assert by_onnx.returncode == 0, by_onnx.stderr
    assert by_torch.returncode == 0, by_torch.stderr
    assert by_onnx.stdout.startswith(PROMPT) and len(by_onnx.stdout) > len(PROMPT) + 10
    assert by_onnx.stdout == by_torch.stdout
    assert "[onnx, cpu] 24 tokens" in by_onnx.stderr and "[torch, cpu] 24 tokens" in by_torch.stderr


def test_generate_backends_agree_in_process(capsys, artifact):
    """--backend onnx without --onnx (temporary export) and sampling agree with torch; --json output."""
    results = {}
    for backend in ("torch", "onnx"):
        code, out, err = run_main(capsys, "generate", str(artifact), "--prompt", "Hello", "--max-new-tokens", "16",
                                  "--temperature", "0.9", "--top-k", "40", "--seed", "5", "--backend", backend,
                                  "--json")
        assert code == 0, err
        results[backend] = json.loads(out)
    assert results["torch"]["ids"] == results["onnx"]["ids"] and len(results["torch"]["ids"]) == 16
    assert results["torch"]["text"] == results["onnx"]["text"]


def test_export_no_kv_cache_and_skip_parity(capsys, tmp_path, artifact):
    out = tmp_path / "nokv.onnx"
    code, stdout, err = run_main(capsys, "export", str(artifact), "-o", str(out), "--no-kv-cache", "--skip-parity")
    assert code == 0, err
    assert "KV cache no" in stdout and "skipped (--skip-parity)" in stdout
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["input_ids"]
    code, stdout, err = run_main(capsys, "generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "8",
                                 "--backend", "onnx", "--onnx", str(out), "--json")
    code_t, stdout_t, _ = run_main(capsys, "generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "8",
                                   "--json")
    assert code == code_t == 0, err
    assert json.loads(stdout)["ids"] == json.loads(stdout_t)["ids"]


def test_export_artifact_and_make_stepper_are_library_functions(tmp_path, artifact):
    """What the two commands call: export_artifact (checked export) and make_stepper (a backend by name)."""
    from sparsert.backends import make_stepper
    from sparsert.export.onnx_export import export_artifact
    from sparsert.runtime.artifact import load_artifact
    from sparsert.runtime.errors import ConfigError
    from sparsert.runtime.generate import GenerationConfig, generate_ids

    result = export_artifact(artifact, tmp_path / "m.onnx", parity=False)
    assert result.path == tmp_path / "m.onnx" and result.file_bytes == result.path.stat().st_size
    assert result.kv_cache and result.parity is None and sum(1 for v in result.layers.values() if v["pattern"]) == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    art = load_artifact(artifact)
    cfg = GenerationConfig(max_new_tokens=8)
    ids = []
    for backend, onnx_path in (("torch", None), ("onnx", result.path), ("onnx", None)):
        with make_stepper(art, backend, onnx_path) as stepper:
            ids.append(generate_ids(stepper, list(PROMPT.encode()), cfg))
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 8
    with pytest.raises(ConfigError, match=r"--backend must be one of torch, onnx, runtime, got 'tpu'"):
        with make_stepper(art, "tpu"):
            pass


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def test_missing_artifact(capsys, tmp_path):
    missing = tmp_path / "no-such-artifact"
    code, _, err = run_main(capsys, "generate", str(missing), "--prompt", "hi")
    assert_one_line_error(code, err, f"artifact {missing} does not exist")
    out = tmp_path / "m.onnx"
    code, _, err = run_main(capsys, "export", str(missing), "-o", str(out))
    assert_one_line_error(code, err, f"artifact {missing} does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "ok \udcff\udcfe"], "--prompt is not valid UTF-8 text (an undecodable byte at character 3)"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
        (["--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens must be a positive integer, got -3"),
        (["--prompt", "hi", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--prompt", "hi", "--top-k", "0"], "--top-k must be a positive integer"),
        (["--prompt", "hi", "--onnx", "x.onnx"], "--onnx applies only to --backend onnx"),
        (["--prompt", "hi", "--top-k", "5"], "--top-k only acts when sampling; add --temperature > 0"),
        (["--prompt", "hi", "--cuda-graph"], "--cuda-graph applies only to --backend runtime (got --backend torch)"),
        (["--prompt", "hi", "--top-k", "5", "--seed", "3"], "--top-k, --seed only act when sampling"),
        (["--prompt", "hi", "--backend", "onnx", "--onnx", "missing.onnx"], "ONNX model missing.onnx does not exist"),
        (["--prompt", "x" * 48], "prompt is 48 tokens; the model's context is 48 tokens"),
        (["--prompt", "hi", "--backend", "onnx", "--onnx", ""], "--onnx: expected the path of an .onnx file, got ''"),
        (["--prompt", "hi", "--temperature", "1", "--seed", "99999999999999999999999"],
         "--seed must be an integer in [0, 2**63 - 1], got 99999999999999999999999"),
    ],
)
def test_generate_bad_input(capsys, artifact, extra, message):
    code, out, err = run_main(capsys, "generate", str(artifact), *extra)
    assert_one_line_error(code, err, message)
    assert out == ""


def test_generate_onnx_from_another_model(capsys, tmp_path, artifact):
    other = make_artifact(tmp_path / "other", max_seq_len=32)
    code, _, err = run_main(capsys, "export", str(other), "-o", str(tmp_path / "other.onnx"), "--skip-parity")
    assert code == 0, err
    code, _, err = run_main(capsys, "generate", str(artifact), "--prompt", "hi", "--backend", "onnx",
                            "--onnx", str(tmp_path / "other.onnx"))
    assert_one_line_error(code, err, "was exported from a different model")


def test_runtime_backend_without_gpu_runs_its_cpu_fallback(capsys, artifact):
    """No GPU: a note says so and the runtime runs on the CPU, its 2:4+INT4 layers packed as on the GPU with the
    kernels' rounding (bf16 activations): the PyTorch reference's greedy tokens (over 8 tokens: the sharp random
    model's float32 and bf16 logits part later); --cuda-graph is a one-line error."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --backend runtime runs there")
    outs = {}
    for backend in ("torch", "runtime"):
        code, out, err = run_main(capsys, "generate", str(artifact), "--prompt", "Hello", "--max-new-tokens", "8",
                                  "--backend", backend, "--json")
        assert code == 0, err
        outs[backend] = json.loads(out)
        notes = [line for line in err.splitlines() if line.startswith("note: ")]
        assert len(notes) == (backend == "runtime"), err
        assert outs[backend]["device"] == "cpu"
    assert notes[0].startswith("note: no usable GPU (") and "--backend runtime runs on the CPU" in notes[0]
    assert outs["runtime"]["ids"] == outs["torch"]["ids"]
    code, _, err = run_main(capsys, "generate", str(artifact), "--prompt", "hi", "--backend", "runtime",
                            "--cuda-graph")
    assert_one_line_error(code, err, "--cuda-graph needs a usable NVIDIA GPU (sm_80 or newer): ")
    assert err.rstrip().endswith("leave it out to run --backend runtime on the CPU")


def test_runtime_stepper_on_the_cpu_holds_the_packed_formats(artifact):
    """GpuStepper(device="cpu"): the linears hold their packed formats (INT4 group 16: codes 2 + indices 1 + a
    16-bit scale per 16 columns) on the compiled CPU product, and its logits are the reference's up to the GEMMs'
    bf16 activations."""
    from sparsert.runtime.artifact import load_artifact
    from sparsert.runtime.errors import ConfigError
    from sparsert.runtime.generate import TorchStepper
    from sparsert.runtime.gpu_backend import GpuStepper

    art = load_artifact(artifact)
    stepper = GpuStepper(art, device="cpu")
    report = stepper.memory_report()
    assert report["device"] == "cpu" and report["linear_weight_bits_per_weight"] == 2 + 1 + 16 / 16
    assert {b for layer in stepper.sparse_layers().values() for b in layer.backends} == {"cpu_packed"}
    prompt = [72, 101, 108, 108, 111]
    want = TorchStepper(art.build_model()).step(prompt)
    got = stepper.step(prompt)
    assert got.device.type == "cpu" and float((got - want).norm() / want.norm()) < 2e-2
    assert float((stepper.step([32]) - TorchStepper(art.build_model()).step(prompt + [32])).norm()) > 0  # cached
    with pytest.raises(ConfigError, match=r"cuda_graph needs a GPU"):
        GpuStepper(art, device="cpu", cuda_graph=True)
    with pytest.raises(ConfigError, match=r"device must be a CUDA device index or 'cpu', got 'cuda'"):
        GpuStepper(art, device="cuda")


def test_runtime_backend_without_gpu_names_the_reason(capsys, monkeypatch, artifact):
    from sparsert.runtime import device

    class DynamicLibNotFoundError(RuntimeError):  # what cuda.pathfinder raises when libcuda.so is not found
        pass

    class NoDriver:
        def cuInit(self, flags):
            raise DynamicLibNotFoundError('"cuda" is an NVIDIA driver library and can only be found via system '
                                          "search. Ensure the NVIDIA display driver is installed.")

    monkeypatch.delenv("SPARSERT_DISABLE_GPU", raising=False)
    monkeypatch.setattr(device, "driver", NoDriver)
    monkeypatch.setattr(device, "_PROBE", None)  # probe afresh, with the driver above
    code, out, err = run_main(capsys, "generate", str(artifact), "--prompt", "hi", "--backend", "runtime",
                              "--max-new-tokens", "2")
    assert code == 0, err
    assert err.startswith("note: no usable GPU (the NVIDIA driver library (libcuda) was not found): --backend "
                          "runtime runs on the CPU")
    assert "DynamicLibNotFoundError" not in err and out.startswith("hi")
    monkeypatch.setattr(device, "probe_gpu", lambda: (False, "GPU sm_75 is not supported (needs sm_80 or newer)"))
    code, _, err = run_main(capsys, "generate", str(artifact), "--prompt", "hi", "--backend", "runtime",
                            "--cuda-graph")
    assert_one_line_error(code, err, "--cuda-graph needs a usable NVIDIA GPU (sm_80 or newer): GPU sm_75 is not "
                                     "supported (needs sm_80 or newer); leave it out")


def test_empty_paths_are_refused_not_read_as_the_current_directory(capsys, monkeypatch, tmp_path, artifact):
    monkeypatch.chdir(artifact)  # the current directory is a valid artifact: "" must still be refused
    code, _, err = run_main(capsys, "generate", "", "--prompt", "hi")
    assert_one_line_error(code, err, "artifact: expected the path of an artifact directory, got ''")
    code, _, err = run_main(capsys, "export", "", "-o", str(tmp_path / "e.onnx"), "--skip-parity")
    assert_one_line_error(code, err, "ARTIFACT: expected the path of an artifact directory, got ''")
    code, _, err = run_main(capsys, "export", str(artifact), "-o", "", "--skip-parity")
    assert_one_line_error(code, err, "-o: expected the path of an .onnx file, got ''")
    (tmp_path / "empty.onnx").write_bytes(b"")
    code, _, err = run_main(capsys, "generate", str(artifact), "--prompt", "hi", "--backend", "onnx", "--onnx",
                            str(tmp_path / "empty.onnx"))
    assert_one_line_error(code, err, f"ONNX model {tmp_path / 'empty.onnx'} is an empty file (0 bytes)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.onnx"]


def test_export_output_needs_a_file_name_under_a_directory(capsys, tmp_path, artifact):
    (tmp_path / "t.sh").write_text("#!/bin/sh\n")
    before = snapshot(tmp_path)
    cases = [
        (tmp_path / ".onnx", f"-o {tmp_path / '.onnx'}: expected a file name such as model.onnx ('.onnx' is only "
                             "the suffix)"),
        (tmp_path / "t.sh" / "x.onnx", f"-o {tmp_path / 't.sh' / 'x.onnx'}: {tmp_path / 't.sh'} is not a directory"),
        (tmp_path / "t.sh" / "a" / "x.onnx", f"{tmp_path / 't.sh'} is not a directory"),
    ]
    for out, message in cases:
        code, stdout, err = run_main(capsys, "export", str(artifact), "-o", str(out), "--skip-parity")
        assert_one_line_error(code, err, message)
        assert stdout == ""
    assert snapshot(tmp_path) == before


def test_export_failures_leave_no_output(capsys, monkeypatch, tmp_path, artifact):
    # -o names a directory
    code, _, err = run_main(capsys, "export", str(artifact), "-o", str(tmp_path))
    assert_one_line_error(code, err, "is a directory")
    # parity fails (a zero tolerance cannot be met by honest fp32 rounding): nothing is kept
    monkeypatch.setattr(parity_mod, "FP32_TOLERANCE", parity_mod.Tolerance(rtol=0.0, atol=0.0))
    out = tmp_path / "sub" / "model.onnx"
    code, stdout, err = run_main(capsys, "export", str(artifact), "-o", str(out))
    assert_one_line_error(code, err, "ONNX parity failed")
    assert stdout == "" and list((tmp_path / "sub").iterdir()) == []
    # an existing file that is not an ONNX model is refused before any work, and left as it was
    out.write_bytes(b"previous")
    code, _, err = run_main(capsys, "export", str(artifact), "-o", str(out))
    assert_one_line_error(code, err, f"-o {out} exists and is not an ONNX model: refusing to overwrite it")
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]


# ----------------------------------------------------------------------------------------------------------
# generate --onnx must be an export of this very artifact; export -o never destroys what is not an export


def test_generate_refuses_onnx_exported_from_another_artifact_of_the_same_config(capsys, tmp_path, artifact):
    """Same architecture and config, other weights: the model configs agree, the weights digests do not."""
    other = make_artifact(tmp_path / "other", seed=1)  # same ModelConfig as `artifact`
    onnx_file = tmp_path / "other.onnx"
    code, _, err = run_main(capsys, "export", str(other), "-o", str(onnx_file), "--skip-parity")
    assert code == 0, err
    recorded = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}["sparsert.weights_sha256"]
    assert recorded == hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest()
    code, out, err = run_main(capsys, "generate", str(artifact), "--prompt", "hi", "--backend", "onnx",
                              "--onnx", str(onnx_file))
    assert_one_line_error(code, err, f"--onnx {onnx_file} was exported from another artifact (weights digest "
                                     f"{recorded[:16]}), not {artifact}")
    assert f"export this artifact with `sparsert export {artifact} -o FILE` and pass --onnx FILE" in err and out == ""
    # the export of the artifact itself is accepted, without a warning
    code, _, err = run_main(capsys, "export", str(artifact), "-o", str(onnx_file), "--skip-parity")
    assert code == 0, err
    code, out, err = run_main(capsys, "generate", str(artifact), "--prompt", "hi", "--max-new-tokens", "4",
                              "--backend", "onnx", "--onnx", str(onnx_file))
    assert code == 0 and out.startswith("hi") and "warning" not in err, err


def test_generate_with_onnx_exported_before_the_digest_warns(capsys, tmp_path, artifact):
    """An export without sparsert.weights_sha256 (older sparsert) still runs, with one warning line."""
    onnx_file = tmp_path / "legacy.onnx"
    code, _, err = run_main(capsys, "export", str(artifact), "-o", str(onnx_file), "--skip-parity")
    assert code == 0, err
    model = onnx.load(str(onnx_file))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != "sparsert.weights_sha256"]
    assert len(kept) == len(model.metadata_props) - 1
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(onnx_file))
    args = ["generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "6", "--json"]
    code, out, err = run_main(capsys, *args, "--backend", "onnx", "--onnx", str(onnx_file))
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "cannot be verified" in lines[0], err
    assert str(onnx_file) in lines[0] and str(artifact) in lines[0]
    code_t, out_t, _ = run_main(capsys, *args)
    assert code_t == 0 and json.loads(out)["ids"] == json.loads(out_t)["ids"]


def test_generate_onnx_directory_is_named_as_such(capsys, tmp_path, artifact):
    code, out, err = run_main(capsys, "generate", str(artifact), "--prompt", "hi", "--backend", "onnx",
                              "--onnx", str(tmp_path))
    assert_one_line_error(code, err, f"ONNX model {tmp_path} is a directory, expected an .onnx file")
    assert out == ""


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` -> its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def test_export_refuses_outputs_that_are_not_onnx_exports(capsys, tmp_path, artifact):
    """Into the artifact, over a text file, over a directory, to a name not ending in .onnx, over a stray
    <out>.data: one error line each, before any work, and every file byte for byte as it was."""
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("a text corpus\n")
    (tmp_path / "fake.onnx").write_text("not an ONNX model\n")
    (tmp_path / "outdir.onnx").mkdir()
    (tmp_path / "outdir.onnx" / "keep.txt").write_text("keep")
    (tmp_path / "stray.onnx.data").write_bytes(b"not external data of stray.onnx")
    before = snapshot(tmp_path)
    cases = [
        (art / "model.safetensors", f"-o {art / 'model.safetensors'} is inside the artifact directory {art}"),
        (art / "config.json", "is inside the artifact directory"),
        (art / "model.onnx", f"-o {art / 'model.onnx'} is inside the artifact directory {art}"),
        (tmp_path / "data" / "corpus.txt", "exists and is not an ONNX model: refusing to overwrite it"),
        (tmp_path / "fake.onnx", f"-o {tmp_path / 'fake.onnx'} exists and is not an ONNX model"),
        (tmp_path / "outdir.onnx", "is a directory, expected an .onnx file path"),
        (tmp_path / "new.txt", "expected a file name ending in .onnx"),
        (tmp_path / "stray.onnx", f"{tmp_path / 'stray.onnx.data'} exists and is not the external data of an "
                                  f"ONNX model at {tmp_path / 'stray.onnx'}"),
    ]
    for out, message in cases:
        code, stdout, err = run_main(capsys, "export", str(art), "-o", str(out), "--skip-parity")
        assert_one_line_error(code, err, message)
        assert stdout == ""
    # a symlink into the artifact is resolved
    (tmp_path / "link.onnx").symlink_to(art / "model.safetensors")
    code, _, err = run_main(capsys, "export", str(art), "-o", str(tmp_path / "link.onnx"), "--skip-parity")
    assert_one_line_error(code, err, "is inside the artifact directory")
    (tmp_path / "link.onnx").unlink()
    assert snapshot(tmp_path) == before


def test_export_replaces_an_earlier_export(capsys, tmp_path, artifact):
    """Re-exporting over an existing .onnx (and over an external-data pair) is the normal workflow."""
    from sparsert.export.onnx_export import is_onnx_model
    from sparsert.export.onnx_graph import build_onnx_model, save_onnx_model
    from sparsert.runtime.artifact import load_artifact

    out = tmp_path / "model.onnx"
    code, _, err = run_main(capsys, "export", str(artifact), "-o", str(out), "--no-kv-cache", "--skip-parity")
    assert code == 0, err
    assert is_onnx_model(out) and [i.name for i in onnx.load(str(out)).graph.input] == ["input_ids"]
    code, stdout, err = run_main(capsys, "export", str(artifact), "-o", str(out), "--skip-parity")
    assert code == 0 and "KV cache yes" in stdout, err
    assert len(onnx.load(str(out)).graph.input) > 1 and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    # an earlier export with external data: both files may be replaced
    save_onnx_model(build_onnx_model(load_artifact(artifact)), out, external_data=True)
    assert (tmp_path / "model.onnx.data").is_file()
    (tmp_path / "model.onnx.data").rename(tmp_path / "moved.data")  # the weights left behind when copying the model
    code, _, err = run_main(capsys, "generate", str(artifact), "--prompt", "hi", "--backend", "onnx",
                            "--onnx", str(out))
    assert_one_line_error(code, err, f"ONNX Runtime cannot load {out}: its external data file "
                                     f"{tmp_path / 'model.onnx.data'} is missing")
    (tmp_path / "moved.data").rename(tmp_path / "model.onnx.data")
    code, _, err = run_main(capsys, "export", str(artifact), "-o", str(out), "--skip-parity")
    assert code == 0, err
    onnx.checker.check_model(str(out), full_check=True)


def test_generate_says_when_the_context_cut_it_short(capsys, artifact):
    """max_seq_len is 48: a 12-token prompt leaves room for 36 of the 100 tokens asked for."""
    code, out, err = run_main(capsys, "generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "100")
    assert code == 0
    assert ("note: stopped after 36 of --max-new-tokens 100: the prompt (12 tokens) and the generated tokens fill "
            "the model's context of 48") in err
    code, out, _ = run_main(capsys, "generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "100",
                            "--json")
    assert json.loads(out)["stop"] == "context" and len(json.loads(out)["ids"]) == 36
    code, out, err = run_main(capsys, "generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "5",
                              "--json")
    assert json.loads(out)["stop"] == "max_new_tokens" and "note:" not in err


def test_export_accuracy_level_without_effect_is_refused(capsys, tmp_path, artifact):
    out = tmp_path / "m.onnx"
    code, _, err = run_main(capsys, "export", str(artifact), "-o", str(out), "--skip-parity", "--accuracy-level", "4")
    assert_one_line_error(code, err, "--accuracy-level sets ONNX Runtime's MatMulNBits accuracy for the parity run")
    assert not out.exists()


def test_bench_generate_without_gpu_and_its_table(tmp_path):
    """tools/bench_generate.py: nothing measured without a GPU; its table has one line per mode."""
    from conftest import check_tool_measures_nothing_without_gpu, load_tool

    check_tool_measures_nothing_without_gpu("bench_generate", tmp_path)
    gen = load_tool("bench_generate")
    rows = [{"mode": m, "ms_per_token": ms, "tokens_per_s": 1e3 / ms, "vs_runtime_eager": 4.0 / ms}
            for m, ms in (("torch dense bf16 (eager)", 6.0), ("sparsert runtime (eager)", 4.0),
                          ("sparsert runtime (CUDA graph)", 1.0))]
    md = gen.to_markdown({"device": "H200", "arch": "sm_90a", "date": "d", "d_model": 1024, "layers": 8,
                          "ffn": 2816, "max_seq_len": 512, "prompt_len": 32, "new_tokens": 128,
                          "graph_tokens_equal_eager": 128}, rows)
    table = [line for line in md.splitlines() if line.startswith("| torch") or line.startswith("| sparsert")]
    assert len(table) == 3 and "| 1.000 | 1000 | 4.00x |" in table[2] and "the first 128 of 128" in md


# ----------------------------------------------------------------------------------------------------------
# A Hugging Face model directory (the <run>/hf of `sparsert train --model`)
# ----------------------------------------------------------------------------------------------------------

def test_generate_from_a_hugging_face_directory(capsys, hf_model_dirs):
    """--backend torch runs the directory with transformers: the same greedy tokens as transformers' own
    generate. The ONNX backend wants a directory with 2:4 layers (compress it first); --cuda-graph is refused by
    name; so is --backend runtime without a GPU."""
    transformers = pytest.importorskip("transformers")
    from sparsert.runtime.hf_tokenizer import HFTokenizer

    path = hf_model_dirs["llama"]
    code, out, err = run_main(capsys, "generate", str(path), "--prompt", "The quick", "--max-new-tokens", "8",
                              "--json")
    assert code == 0, err
    got = json.loads(out)
    tok = HFTokenizer(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    prompt = torch.tensor([tok.encode("The quick")])
    want = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, prompt.shape[1]:]
    assert got["ids"] == want.tolist() and got["text"] == tok.decode(want.tolist())
    capsys.readouterr()  # transformers' own loading output
    code, _, err = run_main(capsys, "generate", str(path), "--prompt", "hi", "--backend", "onnx")
    assert_one_line_error(code, err, "without sparsert.json: it records no 2:4 layers; prune it first with: "
                                     "sparsert compress")
    code, _, err = run_main(capsys, "generate", str(path), "--prompt", "hi", "--backend", "runtime", "--cuda-graph")
    assert_one_line_error(code, err, "--cuda-graph: ")
    if not torch.cuda.is_available():  # the CPU fallback, with a note; this directory has no 2:4 layer to swap
        code, _, err = run_main(capsys, "generate", str(path), "--prompt", "hi", "--backend", "runtime")
        assert err.startswith("note: no usable GPU (")
        assert_one_line_error(code, err.split("\n", 1)[1], f"{path} is a Hugging Face model directory without "
                              "sparsert.json and no linear weight that is 2:4 along K: nothing for --backend runtime's "
                              f"2:4 kernels to run; prune it first with: sparsert compress {path} -o OUT")


def _trained_hf_dir(tmp_path, transformers, qat_group: int | None):
    """What `sparsert train --model` leaves in <run>/hf: a Llama (K = 128, 256: the W4A16 kernel's tiles) whose
    FFN linears trained 2:4 (INT4 QAT with ``qat_group``) and whose attention linears trained dense."""
    from sparsert.train.hf_model import save_hf_checkpoint, sparsify_hf_model
    from sparsert.train.sparse_linear import SparsityConfig

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    names = sparsify_hf_model(model, SparsityConfig(qat_group_size=qat_group), include_attention=False)
    return save_hf_checkpoint(model, None, tmp_path / "hf"), names


@pytest.mark.parametrize("qat_group", [None, 128])
def test_swap_saved_sparse_layers_follows_sparsert_json(tmp_path, qat_group):
    transformers = pytest.importorskip("transformers")
    from sparsert.runtime.dispatch import SparseLinearGPU
    from sparsert.train.hf_model import load_hf_causal_lm, saved_sparse_layers, swap_saved_sparse_layers

    path, names = _trained_hf_dir(tmp_path, transformers, qat_group)
    assert set(saved_sparse_layers(path)) == set(names)
    model, reference = load_hf_causal_lm(path).model, load_hf_causal_lm(path).model
    report = swap_saved_sparse_layers(model, path, token_counts=[1])
    assert set(report.swapped) == set(names) and len(names) == 6 and not report.left_dense
    assert set(report.swapped.values()) == {f"2:4+int4 g{qat_group}" if qat_group else "2:4"}
    assert not isinstance(model.model.layers[0].self_attn.q_proj, SparseLinearGPU)  # trained dense: left alone
    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    # the saved weights are the QAT's dequantized codes: quantizing them again gives them back (bf16 GEMMs)
    assert float((got - want).norm() / want.norm()) < 1e-2
    (path / "sparsert.json").write_text('{"format": "sparsert-hf-checkpoint", "sparse_layers": {"x": {"n": 2}}}')
    with pytest.raises(ArtifactError, match=r"sparsert.json: not a valid sparsert layer record"):
        swap_saved_sparse_layers(model, path)


def _generate_from_a_trained_hf_directory(capsys, tmp_path, device: str) -> None:
    """--backend runtime on a <run>/hf directory: its 2:4 INT4-QAT layers on sparsert's kernels (on the GPU) or on
    the CPU product (without one) give the logits of the CPU reference (bf16 tolerance), and the command
    generates there."""
    transformers = pytest.importorskip("transformers")
    from sparsert.backends import make_hf_stepper

    path, _ = _trained_hf_dir(tmp_path, transformers, 128)
    shutil.copytree(hf_tokenizer_source(tmp_path), path, dirs_exist_ok=True)
    prompt = [5, 17, 99, 3, 250, 42]
    with make_hf_stepper(path, "torch") as (stepper, _tok):
        want = stepper.step(prompt).cpu()
    with make_hf_stepper(path, "runtime") as (stepper, _tok):
        got = stepper.step(prompt).cpu()
    assert float((got - want).norm() / want.norm()) < 3e-2
    code, out, err = run_main(capsys, "generate", str(path), "--prompt", "The quick", "--max-new-tokens", "8",
                              "--backend", "runtime", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["ids"]) == 8 and result["device"].startswith(device)


@pytest.mark.filterwarnings("ignore::sparsert.backends.RuntimeNote")  # the runtime's CPU fallback
def test_generate_from_a_trained_hf_directory_on_the_runtime_cpu_fallback(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_gpu_generate_from_a_trained_hf_directory covers --backend runtime")
    _generate_from_a_trained_hf_directory(capsys, tmp_path, "cpu")


@pytest.mark.gpu
def test_gpu_generate_from_a_trained_hf_directory(capsys, tmp_path):
    _generate_from_a_trained_hf_directory(capsys, tmp_path, "cuda")


def hf_tokenizer_source(tmp_path):
    """A directory with only a byte-level BPE tokenizer (tests/conftest.py's), to copy beside a model."""
    transformers = pytest.importorskip("transformers")
    from conftest import _save_bpe_tokenizer

    out = tmp_path / "tokenizer"
    _save_bpe_tokenizer(transformers, out)
    return out


def test_hf_stepper_cuts_the_logits_to_the_tokenizer(hf_model_dirs):
    """An embedding padded past the tokenizer (320 rows, 300 tokens) must not produce ids the tokenizer cannot
    decode; ids the model cannot take are refused by name."""
    transformers = pytest.importorskip("transformers")
    from sparsert.runtime.errors import ConfigError
    from sparsert.runtime.hf_stepper import HFStepper

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_model_dirs["llama"])).eval()
    stepper = HFStepper(model, 128, vocab_size=300)
    full = model(torch.tensor([[1, 2, 3]])).logits[0, -1]
    assert full.shape == (320,)
    torch.testing.assert_close(stepper.step([1, 2, 3]), full[:300].detach())
    with pytest.raises(ConfigError, match=r"token ids must be in 0..299, got 1..300"):
        stepper.step([1, 300])
    with pytest.raises(ConfigError, match="positions exceed the model's 128"):
        stepper.step([1] * 126)
    with pytest.raises(ConfigError, match="takes no KV cache"):
        HFStepper(torch.nn.Linear(2, 2), 8)
