"""``sparsert train`` end to end in a subprocess: outputs, Ctrl-C, resume, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsert.train.checkpoint import load_checkpoint
from sparsert.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "2", "--threads", "1", "--no-progress"]


def sparsert(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "sparsert", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def test_cli_run_writes_metrics_checkpoint_and_artifact(corpus, tmp_path):
    r = sparsert("train", "--data", str(corpus), "--steps", "4", "--eval-interval", "2", "--ckpt-interval", "2",
                 "--mask-refresh", "1", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("tiny-sparse24-")
    run = runs[0]
    assert f"artifact: {Path('runs') / run.name / 'artifact'}" in r.stdout.splitlines()
    assert (run / "artifact" / "model.safetensors").exists()
    records = read_metrics(run)
    assert [x["step"] for x in records if "loss" in x] == [1, 2, 3, 4]
    assert all("flip_rate" in x for x in records if "loss" in x)
    assert load_checkpoint(run).step == 4

    # Resume of a finished run with a changed flag is refused, listing the difference; no change to the run.
    r = sparsert("train", "--resume", "--out", str(run), "--lr", "0.01", "--threads", "1", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: cannot resume {run}: the config differs from its checkpoint's (lr: 0.003 -> 0.01); "
        "resume without those options, or start a new run"
    ]


def test_ctrl_c_exits_130_keeps_the_last_complete_checkpoint_and_resume_finishes(corpus, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "sparsert", "train", "--data", str(corpus), "--out", str(out), "--steps", "400",
            "--ckpt-interval", "20", "--eval-interval", "1000", *TINY]
    # A job started in the background by a non-interactive shell (as CI may be) inherits SIGINT as ignored, and
    # Python then installs no KeyboardInterrupt handler: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    latest = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert latest.exists(), "no checkpoint within 120 s"
    time.sleep(0.05)  # let it run on a little
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "resume with: sparsert train --resume --out" in stderr
    ck = load_checkpoint(out)
    assert 20 <= ck.step < 400 and ck.step % 20 == 0
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    step_lines = [x for x in read_metrics(out) if "loss" in x]
    assert step_lines[-1]["step"] >= ck.step
    assert json.loads(latest.read_text())["step"] == ck.step

    # --resume takes the saved config (only the flags given override it) and finishes the run; the metrics
    # lines written after the checkpoint are dropped, so every step appears exactly once.
    r = sparsert("train", "--resume", "--out", str(out), "--threads", "1", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resumed at step {ck.step}" in r.stderr
    assert [x["step"] for x in read_metrics(out) if "loss" in x] == list(range(1, 401))
    assert load_checkpoint(out).step == 400 and (out / "artifact" / "config.json").exists()


def test_sigterm_checkpoints_the_step_it_arrives_in_exits_143_and_resume_finishes(corpus, tmp_path):
    """A batch scheduler's SIGTERM: no step is lost although no periodic checkpoint is due (interval 1000)."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "sparsert", "train", "--data", str(corpus), "--out", str(out), "--steps", "300",
            "--ckpt-interval", "1000", "--eval-interval", "1000", *TINY]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len([x for x in read_metrics(out) if "loss" in x]) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    ck = load_checkpoint(out)
    assert 3 <= ck.step < 300
    assert f"SIGTERM received: stopped after step {ck.step} of 300 with its checkpoint" in stderr
    assert f"to finish the run: sparsert train --resume --out {out}" in stderr
    assert "Traceback" not in stderr
    assert [x["step"] for x in read_metrics(out) if "loss" in x][-1] == ck.step
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]

    r = sparsert("train", "--resume", "--out", str(out), "--threads", "1", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [x["step"] for x in read_metrics(out) if "loss" in x] == list(range(1, 301))
    assert (out / "artifact" / "config.json").exists()


def test_stop_requests_records_the_first_signal_and_restores_the_handlers():
    from sparsert.train.stop_signals import signal_name, stop_requests

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with stop_requests() as stop_signal:
        assert stop_signal() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # handlers run between bytecodes of the main thread
        assert stop_signal() == signal.SIGUSR1
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
    assert signal_name(signal.SIGTERM) == "SIGTERM"

    # The same signal twice: the handler outside the block acts (a way out of a stuck step).
    class Outside(Exception):
        pass

    def outside(signum, frame):
        raise Outside

    previous = signal.signal(signal.SIGTERM, outside)
    try:
        with pytest.raises(Outside), stop_requests() as stop_signal:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert stop_signal() == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_unknown_preset_and_missing_data_are_one_line_errors_with_nothing_written(corpus, tmp_path):
    r = sparsert("train", "--preset", "huge", "--data", str(corpus), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown preset 'huge' (choose from tiny, small, base)"]
    r = sparsert("train", "--data", str(tmp_path / "missing.txt"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.txt'}: data path does not exist"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/ folder, no partial output
    (tmp_path / "notes").write_text("x")  # a file where --out needs a folder
    r = sparsert("train", "--data", str(corpus), "--out", "notes/run", *TINY, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: cannot use notes/run: notes is a file, not a directory"]


def test_resume_without_out_names_the_runs_it_could_mean(tmp_path, monkeypatch, capsys):
    """A run started with its own --out is not found by the default name: the error lists resumable runs."""
    from sparsert.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "my-experiment" / "checkpoints" / "step_00000040").mkdir(parents=True)
    (tmp_path / "runs" / "no-checkpoint").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --resume: no run of preset 'tiny' (sparse24) with a checkpoint under runs/ (runs with a checkpoint "
        "there: my-experiment); pass the run directory with --out"]


@pytest.mark.parametrize(("args", "message"), [
    (["--sparsity", "4:2"], "error: --sparsity: expected N:M with integers 0 < N < M (e.g. 2:4), got '4:2'"),
    (["--sparsity", "2-4"], "error: --sparsity: expected N:M with integers 0 < N < M (e.g. 2:4), got '2-4'"),
    (["--steps", "0"], "error: --steps: expected a positive integer, got 0"),
    (["--seed", str(10**23)], f"error: --seed: expected an integer >= 0 of at most {2**63 - 1}, got {10**23}"),
    (["--threads", "99999999"], "error: --threads: expected a positive integer of at most 4096, got 99999999"),
    (["--group-size", "64"], "error: --group-size: only used with --qat (the INT4 group size); this run would "
                             "ignore it"),
    (["--slorb-k", "8"], "error: --slorb-k: only used with --slorb (the SLoRB group size); this run would ignore it"),
    (["--decay-max", "0.5", "--decay-warmup", "3"], "error: --decay-max, --decay-warmup: only used with --method ast "
                                                   "(AST's annealed decay); this run would ignore them"),
    (["--distill-temperature", "3"], "error: --distill-temperature: only used when distilling from a teacher "
                                     "(--teacher, or --method ast); this run would ignore it"),
    (["--dense", "--mask-refresh", "3"], "error: --mask-refresh: only used in sparse training (a --dense run has no "
                                         "masks); this run would ignore it"),
    (["--mask-refresh", "-1"], "error: --mask-refresh: expected a positive integer, got -1"),
    (["--lr", "0"], "error: --lr: expected a number > 0, got 0.0"),
    (["--dense", "--qat"],
     "error: --qat trains the INT4 values of the sparse model; it cannot be combined with --dense"),
    (["--dense", "--sparsity", "1:4"],
     "error: --sparsity sets the pattern of a sparse run; it cannot be combined with --dense"),
    (["--qat", "--group-size", "30"], "error: --group-size: 30 must be a multiple of M=4"),
    (["--resume"], "error: --resume: no run of preset 'tiny' (sparse24) with a checkpoint under runs/; "
                   "pass the run directory with --out"),
    (["--prune-start", "0.1"], "error: --prune-start sets the gradual schedule's pruning; add --schedule gradual "
                               "(this run's schedule is from-scratch)"),
    (["--schedule", "spdf", "--qat"],
     "error: --schedule spdf ends with dense fine-tuning, which --qat leaves out (the artifact holds the INT4 codes "
     "QAT trained); use --qat with --schedule from-scratch or gradual"),
    (["--init-from", "runs/dense", "--arch", "gpt2"],
     "error: --arch chooses a built-in model; with --init-from the model is the one in runs/dense (leave --arch "
     "out)"),
    (["--init-from", "runs/dense", "--preset", "small"],
     "error: --preset chooses a built-in model; with --init-from the model is the one in runs/dense (leave "
     "--preset out)"),
    (["--out", ""], "error: --out: expected a run directory path, got ''"),  # not the current directory
    (["--schedule", "spdf", "--dense-finetune", "0"],
     "error: --schedule spdf is sparse training followed by dense fine-tuning; --dense-finetune 0 leaves none, "
     "which is --schedule from-scratch: use that, or a fraction above 0"),
    (["--schedule", "gradual", "--prune-start", "0.8", "--prune-end", "0.2"],
     "error: --prune-start 0.8 must be before --prune-end 0.2 (the fractions of the steps where pruning starts "
     "and ends)"),
    (["--method", "hu", "--schedule", "gradual", "--prune-end", "0.9"],
     "error: --prune-end 0.9: pruning must end by the start of dense fine-tuning, at 0.8333 of the steps "
     "(--dense-finetune 0.1667)"),
])
def test_bad_flags_are_one_line_errors(args, message, tmp_path, monkeypatch, capsys):
    from sparsert.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_filesystem_errors_and_bad_values_are_one_line(tmp_path, monkeypatch, capsys):
    """An --out that is an existing file, and a value click rejects: `error: ...` on one line, exit 2."""
    from sparsert.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    for args, message in (
        (["--out", "afile", "--steps", "2"], "error: --out afile: expected a run directory, got a file"),
        (["--method", "foo"], "error: Invalid value for '--method': 'foo' is not one of 'sr-ste', 'hu', 'ast'. "
                              "(see 'sparsert train --help')"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["train", *args])
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [message]
    assert (tmp_path / "afile").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_under_torchrun_rank_0_alone_prints_config_errors(tmp_path, monkeypatch, capsys):
    """Every rank meets a bad flag or config alike: rank 0 prints it, the others exit 2 silently. Errors a rank
    may meet alone (files) carry its rank; without torchrun's TORCHELASTIC_RUN_ID, or with a RANK outside
    WORLD_SIZE, errors are printed as usual."""
    from sparsert.cli import main

    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "config.json").write_text("{}", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    bad_config = ["train", "--schedule", "gradual", "--prune-start", "0.8", "--prune-end", "0.2"]
    cases = [("1", ["train", "--method", "foo"], []),
             ("1", bad_config, []),
             ("0", bad_config, ["error: --prune-start 0.8"]),
             ("2", bad_config, ["error: --prune-start 0.8"]),
             ("1", ["inspect", "art"], ["error: [rank 1] art/config.json: unknown format"]),
             ("0", ["inspect", "art"], ["error: art/config.json: unknown format"])]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for rank, args, starts in cases:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == len(starts), (rank, args, err)
        assert all(line.startswith(start) for line, start in zip(err, starts, strict=True)), (rank, args, err)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # RANK inherited outside torchrun: every error is shown as usual
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        main(bad_config)
    assert capsys.readouterr().err.startswith("error: --prune-start 0.8")


def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import torch

    from sparsert.cli import main

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--device", "cuda", "--steps", "2"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --device cuda: torch {torch.__version__} sees no CUDA GPU (use --device cpu)"]
    assert list(tmp_path.iterdir()) == []


def test_files_left_out_of_a_data_folder_are_reported(corpus, tmp_path, monkeypatch, capsys):
    """A --data folder with a binary beside the text trains on the text and says which file it left out (stdout
    and a metrics.jsonl header record), instead of skipping it silently."""
    from sparsert.cli import main

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "blob.bin").write_bytes(bytes(range(256)) * 4)
    monkeypatch.chdir(tmp_path)
    main(["train", "--data", str(folder), "--steps", "1", "--eval-interval", "1", "--out", "run", *TINY])
    err = capsys.readouterr().err  # the trainer's notes go to stderr, beside the progress bar
    assert f"note: --data {folder}: left out 1 file(s) that are not UTF-8 text: blob.bin" in err
    assert {"data_skipped": ["blob.bin"]} in read_metrics(tmp_path / "run")


def test_too_short_data_names_the_file(tmp_path, monkeypatch, capsys):
    from sparsert.cli import main

    (tmp_path / "short.txt").write_text("a few bytes " * 8, encoding="utf-8")  # splits, but shorter than seq_len
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", "short.txt", "--steps", "2", *TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --data short.txt: ") and "fewer than seq_len + 1" in err[0]
    assert not (tmp_path / "runs").exists()


def test_ast_without_a_teacher_takes_distill_beta_zero(corpus, tmp_path, monkeypatch):
    """The trainer's advice for AST without a teacher (--distill-beta 0) must not be refused as a flag without
    effect."""
    from sparsert.cli import main

    monkeypatch.chdir(tmp_path)
    main(["train", "--method", "ast", "--distill-beta", "0", "--data", str(corpus), "--steps", "1",
          "--eval-interval", "1", "--out", "run", *TINY])
    assert (tmp_path / "run" / "artifact").is_dir()


def _cli_error(args: list[str], capsys) -> str:
    """The one stderr line of ``sparsert train ARGS`` exiting 2."""
    from sparsert.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_out_that_holds_other_files_is_refused_before_training(corpus, tmp_path, monkeypatch, capsys):
    """A new run's --out must not hold run files that are not its own (a metrics.jsonl that is not a sparsert
    log, a non-empty artifact/ folder): refused up front, and left as it was."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    (mine / "artifact").mkdir(parents=True)
    files = {"notes.txt": "keep me", "metrics.jsonl": '{"epoch": 1}\n', "artifact/weights.bin": "x"}
    for name, text in files.items():
        (mine / name).write_text(text)
    args = ["--data", str(corpus), "--steps", "1", *TINY]
    assert _cli_error([*args, "--out", "mine"], capsys) == (
        "error: --out mine: it already holds metrics.jsonl, artifact, not from an interrupted sparsert run, and a "
        "new run writes metrics.jsonl, checkpoints/, artifact/ (or hf/) there: choose another --out, or move "
        "metrics.jsonl and artifact out of mine")
    assert {str(p.relative_to(mine)): p.read_text() for p in mine.rglob("*") if p.is_file()} == files

    (tmp_path / "only" / "artifact").mkdir(parents=True)  # the artifact folder is the only thing in the way
    (tmp_path / "only" / "artifact" / "x.bin").write_text("x")
    assert _cli_error([*args, "--out", "only"], capsys) == (
        "error: --out only: it already holds artifact, not from an interrupted sparsert run, and a new run writes "
        "metrics.jsonl, checkpoints/, artifact/ (or hf/) there: choose another --out, or move artifact out of only")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "only"]
    assert [p.name for p in (tmp_path / "only").rglob("*")] == ["artifact", "x.bin"]


def test_default_out_and_resume_of_a_run_still_work(corpus, tmp_path, monkeypatch, capsys):
    """The quickstart (no --out) twice makes two runs; --resume of a genuine run rewrites its artifact, and is
    refused before training when something that is not an artifact sits in <run>/artifact."""
    from sparsert.cli import main

    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        main(["train", "--data", str(corpus), "--steps", "1", "--eval-interval", "1", *TINY])
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "artifact" / "config.json").is_file() for r in runs)
    capsys.readouterr()
    run = runs[0]
    assert _cli_error(["--data", str(corpus), "--steps", "1", *TINY, "--out", str(run)], capsys) == (
        f"error: {run} already holds a training run; continue it with --resume or choose another --out")
    assert _cli_error(["--data", str(corpus), "--steps", "1", *TINY, "--out", str(run / "artifact")], capsys) == (
        f"error: --out {run / 'artifact'}: is a sparsert artifact, not a run directory (a run writes checkpoints/ "
        "and artifact/ or hf/ into it); choose another --out")
    main(["train", "--resume", "--out", str(run), "--threads", "1", "--no-progress"])  # finished: re-evaluates
    assert (run / "artifact" / "config.json").is_file()
    capsys.readouterr()

    shutil.rmtree(run / "artifact")
    (run / "artifact").mkdir()
    (run / "artifact" / "mine.txt").write_text("keep me")
    log = (run / "metrics.jsonl").read_text()
    assert _cli_error(["--resume", "--out", str(run), "--threads", "1", "--no-progress"], capsys) == (
        f"error: cannot resume {run}: {run / 'artifact'} is not a sparsert artifact, and the run ends by writing its "
        f"artifact there; move it out of {run} to resume")
    assert (run / "artifact" / "mine.txt").read_text() == "keep me" and (run / "metrics.jsonl").read_text() == log


def test_errors_name_the_flag_the_user_gave(corpus, tmp_path, monkeypatch, capsys):
    """--init-from as AST's default teacher, --teacher with any method, a missing path, and a K that --sparsity or
    --group-size does not divide: each message starts with the flag given; nothing is written."""
    from sparsert.cli import main

    monkeypatch.chdir(tmp_path)
    base = ["--data", str(corpus), "--steps", "1", "--eval-interval", "1", *TINY]
    main(["train", *base, "--out", "sparse"])
    capsys.readouterr()
    step = Path("sparse") / "checkpoints" / "step_00000001"
    for args, message in (
        (["--method", "ast", "--init-from", "sparse"],
         f"error: --init-from {step}: a sparse checkpoint cannot be the distillation teacher, and --method ast "
         "distils from --init-from unless --teacher is given: give --teacher with a dense run (trained with "
         "--dense) or a Hugging Face model directory, or --distill-beta 0"),
        (["--teacher", "sparse"],  # any method distils from a --teacher
         f"error: --teacher {step}: a sparse checkpoint; the distillation teacher must be dense (a run trained with "
         "--dense, or a Hugging Face model directory)"),
        (["--method", "ast", "--init-from", "sparse", "--teacher", "sparse"],  # both given: the teacher's flag
         f"error: --teacher {step}: a sparse checkpoint; the distillation teacher must be dense (a run trained with "
         "--dense, or a Hugging Face model directory)"),
        (["--init-from", "sparse", "--teacher", "sparse"],
         f"error: --teacher {step}: a sparse checkpoint; the distillation teacher must be dense (a run trained with "
         "--dense, or a Hugging Face model directory)"),
        (["--teacher", "/nonexistent"],
         "error: --teacher /nonexistent: path does not exist (expected a dense sparsert run or checkpoint, or a "
         "Hugging Face model directory)"),
        (["--init-from", "/nonexistent"],
         "error: --init-from /nonexistent: checkpoint path does not exist (expected a sparsert run, its "
         "checkpoints/ or a step directory)"),
        (["--sparsity", "2:3"],
         "error: --sparsity 2:3: layer blocks.0.attn.q_proj has K=128 input features, not a multiple of M=3; M must "
         "divide the K of every layer trained 2:3 (their greatest common divisor is 128); 24 of the 28 layers are "
         "(--keep-dense PATTERN trains layers dense)"),
        (["--qat", "--group-size", "100"],
         "error: --group-size 100: layer blocks.0.attn.q_proj has K=128 input features, not a multiple of the INT4 "
         "group size; it must divide the K of every layer trained 2:4 (their greatest common divisor is 128)"),
    ):
        assert _cli_error([*base, *args, "--out", "new"], capsys) == message, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparse"]


@pytest.mark.parametrize(("args", "noted"), [
    (["--method", "hu", "--steps", "5"], True),  # 1/6 of 5 steps rounds down to 0
    (["--schedule", "spdf", "--steps", "5"], True),
    (["--method", "hu", "--dense-finetune", "0.5", "--steps", "1"], True),
    (["--method", "hu", "--steps", "6"], False),  # 1 step dense
])
def test_a_dense_finetune_that_rounds_to_no_step_is_noted(corpus, tmp_path, monkeypatch, capsys, args, noted):
    from sparsert.cli import main

    monkeypatch.chdir(tmp_path)
    main(["train", "--data", str(corpus), "--eval-interval", "100", "--mask-refresh", "2", *TINY, "--out", "run",
          *args])
    err = capsys.readouterr().err
    steps = int(args[-1])
    fraction = "0.5" if "0.5" in args else "0.1667"
    need = 2 if "0.5" in args else 6
    note = (f"note: dense fine-tuning for the last {fraction} of {steps} steps (--dense-finetune) rounds down to 0 "
            f"steps: this run trains no step dense (that takes --steps {need} or more)")
    assert (note in err) is noted, err
    phases = [r["phase"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert ("dense_finetune" in phases) is not noted


def test_progress_bar_into_a_pipe_redraws_rarely(corpus, tmp_path):
    """stderr captured (not a terminal, as in a log file): the bar is kept but redrawn every 30 s, not ~10 times a
    second, so a log does not fill with carriage-return frames."""
    args = [a for a in TINY if a != "--no-progress"]
    r = sparsert("train", "--data", str(corpus), "--steps", "120", "--eval-interval", "1000", "--out", "run", *args,
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    frames = [f for f in r.stderr.replace("\r", "\n").splitlines() if f.startswith("train sparse24:")]
    assert 1 <= len(frames) <= 6, frames
    assert "120/120" in frames[-1]
