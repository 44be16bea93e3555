"""`sparsert report`: metrics.jsonl of synthetic runs -> PNG plots and a summary; errors; TensorBoard."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

import pytest

from sparsert.cli import main
from sparsert.runtime.errors import ArtifactError, ConfigError
from sparsert.train.report import (
    COLUMNS,
    TensorBoardWriter,
    build_report,
    load_run,
    method_label,
    summarize_run,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 120


def _write_run(root: Path, name: str, *, sparse: bool, final_val: float, qat: bool = False) -> Path:
    """A run directory as the trainer writes it: metrics.jsonl + checkpoints/latest.json + state.json."""
    run = root / name
    run.mkdir(parents=True)
    lines = []
    for step in range(1, STEPS + 1):
        rec = {"step": step, "loss": final_val + 3.0 * math.exp(-step / 30) + 0.02 * math.sin(step),
               "lr": 1e-3, "tokens_per_s": 5000.0}
        if sparse:
            frac = min(max((step / STEPS - 0.25) / 0.5, 0.0), 1.0)
            rec["sparsity"] = 0.5 * frac
            # step 1: a compile-time outlier the summary leaves out; steps 2..120 average 0.012
            rec["mask_refresh_share"] = 0.9 if step == 1 else (0.03 if step % 10 == 0 else 0.01)
            if step % 10 == 0:
                rec["flip_rate"] = 0.05 * math.exp(-step / 25)  # peak 0.05*e^-0.4 at step 10
        lines.append(json.dumps(rec))
        if step % 40 == 0:
            val = final_val + 3.0 * math.exp(-step / 30)
            lines.append(json.dumps({"step": step, "val_loss": val, "val_ppl": math.exp(val)}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    step_dir = run / "checkpoints" / f"step_{STEPS:08d}"
    step_dir.mkdir(parents=True)
    state = {"format": "sparsert-checkpoint", "version": 1, "step": STEPS, "model_config": {},
             "train_config": {"batch_size": 4, "seq_len": 32, "transposable": sparse, "mvue": False},
             "sparsity": {"n": 2, "m": 4} if sparse else None,
             "quantization": {"bits": 4, "group_size": 128} if qat else None}
    (step_dir / "state.json").write_text(json.dumps(state))
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": STEPS, "dir": step_dir.name}))
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    return (_write_run(tmp_path, "dense", sparse=False, final_val=2.0),
            _write_run(tmp_path, "sparse24", sparse=True, final_val=2.1, qat=True))


def test_report_writes_valid_pngs_and_summary_numbers(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    import matplotlib.image

    dense, sparse = two_runs
    out = tmp_path / "out"
    report = build_report([dense, sparse], out, dense=dense)
    for name in ("loss.png", "flip_rate.png", "sparsity.png"):
        path = out / name
        width, height = _png_size(path)
        assert width > 300 and height > 200
        pixels = matplotlib.image.imread(path)  # decodes the whole image
        assert pixels.shape[:2] == (height, width)
        assert pixels.std() > 0.01  # not a blank canvas
    md = (out / "summary.md").read_text()
    html = (out / "summary.html").read_text()
    assert [p.name for p in report.files] == ["loss.png", "flip_rate.png", "sparsity.png", "summary.md",
                                              "summary.html"]

    final_dense = 2.0 + 3.0 * math.exp(-120 / 30)
    final_sparse = 2.1 + 3.0 * math.exp(-120 / 30)
    gap = (final_sparse / final_dense - 1) * 100
    peak, final = 0.05 * math.exp(-10 / 25), 0.05 * math.exp(-120 / 25)
    for text in (md, html):
        assert f"{final_dense:.4f}" in text and f"{final_sparse:.4f}" in text
        assert f"{math.exp(final_sparse):.2f}" in text
        assert f"+{gap:.2f}%" in text
        assert f"{peak:.3g} (10)" in text and f"{final:.3g}" in text
        assert f"{peak / final:.1f}×" in text
        assert "1.2%" in text and "mask refresh share" in text  # the sparse run's mean; "—" for the dense one
        assert "dense baseline" in text
    assert "2:4, INT4 g128, transposable" in md
    assert "| 120 | 15.4k |" in md  # steps, tokens = 4 * 32 * 120
    s = report.summaries[1]
    assert s.val_loss == pytest.approx(final_sparse) and s.ppl_ratio_to_dense == pytest.approx(
        math.exp(final_sparse - final_dense))
    tail = [2.1 + 3.0 * math.exp(-k / 30) + 0.02 * math.sin(k) for k in range(111, 121)]
    assert s.train_loss == pytest.approx(sum(tail) / 10)
    assert '<img src="loss.png"' in html and "![loss.png](loss.png)" in md


def test_report_dense_added_when_not_listed_and_default_output(two_runs: tuple[Path, Path]) -> None:
    dense, sparse = two_runs
    report = build_report([sparse], dense=dense, plots=False)
    assert report.out_dir == sparse / "report"
    assert [s.name for s in report.summaries] == ["dense", "sparse24"]
    assert report.summaries[0].is_dense_baseline
    assert not list(report.out_dir.glob("*.png"))
    assert (report.out_dir / "summary.md").is_file()


def test_a_sparse_run_is_refused_as_the_dense_baseline(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    dense, sparse = two_runs
    with pytest.raises(ConfigError, match=rf"--dense {sparse}: this run trained sparse; expected a dense baseline"):
        build_report([dense], tmp_path / "out", dense=sparse, plots=False)
    assert not (tmp_path / "out").exists()


def test_dense_only_run_has_no_flip_plot_and_says_why(tmp_path: Path) -> None:
    run = _write_run(tmp_path, "d", sparse=False, final_val=2.0)
    report = build_report([run], tmp_path / "o")
    assert not (tmp_path / "o" / "flip_rate.png").exists()
    assert "flip_rate.png not drawn: no run logged a flip rate" in report.markdown
    assert "No dense baseline given" in report.markdown
    assert method_label(load_run(run)) == "dense"


def test_router_aux_loss_plot_only_for_runs_that_logged_it(tmp_path: Path) -> None:
    """A MoE run's router_aux_loss gets router_aux_loss.png (linked from the summary); without it, no plot and no
    note about it."""
    import matplotlib.image

    moe = _write_run(tmp_path, "moe", sparse=True, final_val=2.0)
    records = [json.loads(line) for line in (moe / "metrics.jsonl").read_text().splitlines()]
    for rec in records:
        if "loss" in rec:
            rec["router_aux_loss"] = 2.0 + math.exp(-rec["step"] / 20)  # top-2 routing: 2 at perfect balance
    (moe / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = build_report([moe], tmp_path / "o")
    path = tmp_path / "o" / "router_aux_loss.png"
    assert path in report.files and "router_aux_loss.png" in report.markdown
    assert matplotlib.image.imread(path).std() > 0.01
    plain = build_report([_write_run(tmp_path, "plain", sparse=True, final_val=2.0)], tmp_path / "p")
    assert not (tmp_path / "p" / "router_aux_loss.png").exists() and "router" not in plain.markdown
    # the same folder again, for a run without the loss: the earlier report's router plot is not left beside it
    again = build_report([_write_run(tmp_path, "plain2", sparse=True, final_val=2.0)], tmp_path / "o")
    assert not path.exists() and "router" not in again.markdown


def test_resumed_run_replaces_relogged_steps_and_skips_cut_last_line(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    recs = [{"step": s, "loss": 5.0} for s in range(1, 6)]  # first attempt, steps 1..5
    recs += [{"step": s, "loss": 4.0} for s in range(4, 8)]  # resumed from the step-3 checkpoint
    recs += [{"step": 7, "flip_rate": 0.01}]  # a second line for step 7 merges into it
    recs += [{"step": 7, "val_loss": "nan", "val_ppl": "nan"}]  # the trainer writes NaN as a string
    text = "\n".join(json.dumps(r) for r in [{"train_config": {"method": "ast"}}] + recs) + '\n{"step": 8, "lo'
    (run / "metrics.jsonl").write_text(text)
    m = load_run(run)
    assert [r["step"] for r in m.train] == [1, 2, 3, 4, 5, 6, 7]
    assert m.series("loss")[1] == [5.0, 5.0, 5.0, 4.0, 4.0, 4.0, 4.0]
    assert m.train[-1]["flip_rate"] == 0.01
    assert m.meta == {"train_config": {"method": "ast"}}
    assert method_label(m) == "method=ast"
    assert any("incomplete last line" in n for n in m.notes)
    assert "non-finite loss logged at step 7" in m.notes
    assert m.series("val_loss", evals=True) == ([], [])
    s = summarize_run(m)
    assert s.flip_peak == s.flip_final == 0.01 and s.flip_peak_over_final == 1.0


def test_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"missing_run: run directory does not exist$"):
        load_run(tmp_path / "missing_run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"empty: no metrics.jsonl, not a training run directory"):
        build_report([tmp_path / "empty"], tmp_path / "o")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ArtifactError, match=r"metrics.jsonl:2: not valid JSON"):
        load_run(bad)
    (bad / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(ArtifactError, match=r"no training metrics \(no line with a 'loss' or 'val_loss'\)"):
        load_run(bad)
    (bad / "metrics.jsonl").write_text('{"step": -1, "loss": 0.1}\n')
    with pytest.raises(ArtifactError, match=r"metrics.jsonl:1: 'step' must be a non-negative integer"):
        load_run(bad)
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": "nan"}\n{"step": 2, "loss": "low"}\n')  # "nan": NaN
    with pytest.raises(ArtifactError, match=r"metrics.jsonl:2: 'loss' must be a number, got 'low'"):
        load_run(bad)
    assert not (tmp_path / "o").exists()  # nothing written on error


def test_missing_matplotlib_is_a_clear_error(two_runs: tuple[Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"needs matplotlib .*'report' extra.*pip install sparsert\[report\]"):
        build_report(list(two_runs), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    build_report(list(two_runs), tmp_path / "o", plots=False)  # the summary alone still works
    assert (tmp_path / "o" / "summary.md").is_file()


def test_cli_report(two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dense, sparse = two_runs
    main(["report", str(dense), str(sparse), "-o", str(tmp_path / "cli"), "--dense", str(dense), "--no-plots"])
    out = capsys.readouterr().out
    assert "| sparse24 |" in out and f"wrote {tmp_path / 'cli' / 'summary.md'}" in out
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "nope")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope'}: run directory does not exist\n"


HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_missing_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TensorBoard logging needs the 'tensorboard' package: pip install"):
        TensorBoardWriter(tmp_path / "tb")


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_writer_writes_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardWriter(tmp_path / "tb") as tb:
        assert tb.log({"step": 1, "loss": 3.0, "lr": 0.1, "note": "x"}) == 2
        assert tb.log({"step": 2, "loss": 2.5, "flip_rate": 0.01}) == 2
        assert tb.log({"step": 2, "val_loss": 2.7, "val_ppl": math.exp(2.7)}) == 2
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/flip_rate", "eval/val_loss",
                                          "eval/val_ppl"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.5)]


def test_reads_what_the_trainer_writes(tmp_path: Path) -> None:
    """Records written by the trainer's own MetricsLog and a checkpoint written by save_checkpoint."""
    import torch

    from sparsert.runtime.model import DecoderLM, ModelConfig
    from sparsert.train.checkpoint import save_checkpoint
    from sparsert.train.metrics import MetricsLog
    from sparsert.train.sparse_linear import SparsityConfig
    from sparsert.train.sparsify import sparsify_model

    run = tmp_path / "run"
    run.mkdir()
    with MetricsLog(run / "metrics.jsonl") as log:
        for step in range(1, 7):
            rec = {"step": step, "loss": 4.0 - 0.1 * step, "lr": 1e-3, "tokens_per_s": 100.0, "sparsity": 0.5}
            if step % 2 == 0:
                rec["flip_rate"] = 0.1 / step
            log.write(rec)
        log.write({"step": 6, "val_loss": 3.5, "val_ppl": math.exp(3.5)})
        log.write({"step": 7, "loss": float("nan"), "lr": 1e-3, "tokens_per_s": 100.0, "sparsity": 0.5})
    config = ModelConfig(d_model=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=256, max_seq_len=16)
    model = DecoderLM(config)
    sparsify_model(model, SparsityConfig())
    state = {"model_config": config.to_dict(), "train_config": {"batch_size": 2, "seq_len": 8, "qat": False},
             "sparsity": {"n": 2, "m": 4, "method": "sr-ste"}, "quantization": None, "tokens_seen": 6 * 16}
    save_checkpoint(run, 6, model, torch.optim.AdamW(model.parameters()), state)

    m = load_run(run)
    assert m.series("flip_rate") == ([2, 4, 6], [0.05, 0.025, 0.1 / 6])
    assert "non-finite loss logged at step 7" in m.notes
    s = summarize_run(m)
    assert (s.steps, s.tokens, s.val_loss, s.method) == (7, 7 * 16, 3.5, "2:4")
    assert s.flip_peak_over_final == pytest.approx(3.0)


def test_method_label_shows_only_the_settings_that_shaped_the_run(tmp_path: Path) -> None:
    from dataclasses import asdict

    from sparsert.train.train_config import TrainConfig

    def label(sparsity: dict | None, **config) -> str:
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        full = asdict(TrainConfig(progress=False, **config))  # every method field, with its defaults
        (run / "metrics.jsonl").write_text(json.dumps({"train_config": full}) + "\n" +
                                           json.dumps({"step": 1, "loss": 1.0}) + "\n")
        step_dir = run / "checkpoints" / "step_00000001"
        step_dir.mkdir(parents=True)
        (step_dir / "state.json").write_text(json.dumps({"step": 1, "sparsity": sparsity, "train_config": full}))
        (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "dir": step_dir.name}))
        return method_label(load_run(run))

    assert label(None, dense=True) == "dense"  # no AST weights, schedule fractions or SLoRB rank
    hu = label({"n": 2, "m": 4}, method="hu")
    assert hu.startswith("2:4, ") and "method=hu" in hu and "masked_decay=6e-05" in hu and "transposable" in hu
    assert not any(w in hu for w in ("distill", "prune_", "slorb"))
    ast = label({"n": 2, "m": 4}, method="ast", slorb=True, teacher="runs/dense")
    assert all(w in ast for w in ("method=ast", "distill_alpha=0.33", "slorb", "slorb_k=16")) and "prune_" not in ast
    gradual = label({"n": 2, "m": 4}, schedule="gradual")
    assert "prune_start=0.25" in gradual and "distill" not in gradual and "slorb" not in gradual


def test_run_ending_dense_is_compared_by_its_2to4_model(tmp_path: Path) -> None:
    """A Hu/SPDF run ends with dense fine-tuning; its artifact holds the re-masked 2:4 model, whose loss the
    trainer logs as val_loss_sparse: that is the number compared with dense, and the notes say so."""
    dense = _write_run(tmp_path, "dense", sparse=False, final_val=2.0)
    hu = _write_run(tmp_path, "hu", sparse=True, final_val=2.0)
    metrics = hu / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps(
        {"step": STEPS, "val_loss": 2.0, "val_ppl": math.exp(2.0), "val_loss_sparse": 2.2,
         "val_ppl_sparse": math.exp(2.2)}) + "\n")
    summary = summarize_run(load_run(hu), load_run(dense))
    assert summary.val_loss == pytest.approx(2.2) and summary.val_ppl == pytest.approx(math.exp(2.2))
    assert summary.val_loss_vs_dense == pytest.approx(2.2 / (2.0 + 3.0 * math.exp(-STEPS / 30)) - 1)
    report = build_report([dense, hu], tmp_path / "out", dense=dense)
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "hu: ends with dense fine-tuning" in text and "val_loss_sparse" in text, report


def _edit_state(run: Path, **changes) -> None:
    """Update the run's checkpoint state.json (top-level keys; ``train_config`` is merged)."""
    path = run / "checkpoints" / f"step_{STEPS:08d}" / "state.json"
    state = json.loads(path.read_text())
    state["train_config"].update(changes.pop("train_config", {}))
    state.update(changes)
    path.write_text(json.dumps(state))


def test_dense_ratio_only_for_runs_trained_and_validated_alike(two_runs: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Another corpus or validation set: no ratio, and a note naming what differs; other token counts: the ratio
    with a note."""
    dense, sparse = two_runs
    _edit_state(dense, data_digest="aa" * 32, train_config={"data": None, "eval_batches": 4})
    _edit_state(sparse, data_digest="bb" * 32, train_config={"data": "data/mixed", "eval_batches": 4})
    report = build_report([sparse], tmp_path / "r1", dense=dense, plots=False)
    row = report.summaries[1]
    assert row.val_loss is not None and row.val_loss_vs_dense is None and row.ppl_ratio_to_dense is None
    note = ("sparse24: not compared with the dense baseline dense: trained and validated on different data "
            "(data/mixed vs the default corpus).")
    assert note in report.notes and note in (tmp_path / "r1" / "summary.md").read_text()

    _edit_state(sparse, data_digest="aa" * 32, train_config={"data": None, "seq_len": 64})
    report = build_report([sparse], tmp_path / "r2", dense=dense, plots=False)
    assert report.summaries[1].val_loss_vs_dense is None
    assert any("a different validation set (windows of seq_len 64 vs 32 tokens)" in n for n in report.notes)

    _edit_state(sparse, train_config={"seq_len": 32, "eval_batches": 8})
    report = build_report([sparse], tmp_path / "r3", dense=dense, plots=False)
    assert any("a different validation set (32 vs 16 validation windows" in n for n in report.notes)

    # the same 32 validation windows (batch_size x eval_batches = 8 x 4 and 4 x 8), twice the training tokens
    _edit_state(sparse, train_config={"eval_batches": 4, "batch_size": 8})
    _edit_state(dense, train_config={"eval_batches": 8})
    main(["report", str(sparse), "--dense", str(dense), "-o", str(tmp_path / "r4"), "--no-plots"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| sparse24 |")).split("|")
    assert row[COLUMNS.index("val loss vs dense") + 1].strip().endswith("%")  # the ratio is given
    assert ("note: sparse24: trained on 30.7k tokens (120 steps), the dense baseline on 15.4k (120 steps): the val "
            "loss gap to dense also reflects that.") in out


def test_hf_runs_tokenized_alike_are_compared_wherever_the_model_folder_was(two_runs: tuple[Path, Path],
                                                                            tmp_path: Path) -> None:
    """A Hugging Face tokenizer is recorded with its folder's path: the same tokenizer read from another copy
    (another machine) is not "different tokenizers"; another vocabulary is."""
    dense, sparse = two_runs
    _edit_state(dense, data_digest="aa" * 32, tokenizer={"type": "hf", "path": "/models/llama", "vocab_size": 99})
    _edit_state(sparse, data_digest="aa" * 32, tokenizer={"type": "hf", "path": "/scratch/llama", "vocab_size": 99})
    assert build_report([sparse], tmp_path / "r1", dense=dense, plots=False).summaries[1].val_loss_vs_dense \
        is not None
    _edit_state(sparse, data_digest="bb" * 32, tokenizer={"type": "hf", "path": "/scratch/llama", "vocab_size": 99})
    report = build_report([sparse], tmp_path / "r2", dense=dense, plots=False)
    assert not any("different tokenizers" in n for n in report.notes)  # only the data differs
    _edit_state(sparse, tokenizer={"type": "hf", "path": "/models/llama", "vocab_size": 98})
    report = build_report([sparse], tmp_path / "r3", dense=dense, plots=False)
    assert any("different tokenizers" in n for n in report.notes)


def test_run_labels_duplicates_and_output_paths(two_runs: tuple[Path, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    dense, _ = two_runs
    other = tmp_path / "other"
    other.mkdir()
    _write_run(other, "dense", sparse=False, final_val=2.0)
    monkeypatch.chdir(tmp_path)
    report = build_report(["dense", "other/dense"], "rep", plots=False)
    assert [s.name for s in report.summaries] == ["dense", "other/dense"]  # not "/dense"
    with pytest.raises(ConfigError, match=r"^RUN_DIR dense is given twice: give each run once$"):
        build_report(["dense", "dense"], "rep2", plots=False)
    with pytest.raises(ConfigError, match=rf"^RUN_DIR {tmp_path / 'dense'} is the same run as dense: give each"):
        build_report(["dense", str(tmp_path / "dense")], "rep2", plots=False)
    artifact = dense / "artifact"
    artifact.mkdir()
    (artifact / "config.json").write_text(json.dumps({"format": "sparsert-artifact", "format_version": 1}))
    for out in (artifact, artifact / "sub"):
        with pytest.raises(ConfigError, match=r"is inside the artifact directory .*artifact: refusing to write a "
                           r"report into an artifact"):
            build_report(["dense"], out, plots=False)
    assert sorted(p.name for p in artifact.iterdir()) == ["config.json"]
    monkeypatch.chdir(dense)  # "" would be this run, "." as the output its folder
    with pytest.raises(ConfigError, match=r"^RUN_DIR: expected the path of a training run, got ''$"):
        build_report([""], plots=False)
    with pytest.raises(ConfigError, match=r"^-o: expected the path of a folder, got ''$"):
        build_report(["."], "", plots=False)
    with pytest.raises(ConfigError, match=r"^--dense: expected the path of a training run, got ''$"):
        build_report(["."], "r", dense="", plots=False)
    assert not (dense / "r").exists() and not (dense / "summary.md").exists()
