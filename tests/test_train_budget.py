"""Issue 17 for textgen-train: output paths refused before any work, a finished run never discarded, budgets that fit
the run (warmup, evaluation cadence, whole-run wall time), a loss plot with the training curve (also on SIGTERM),
and corpus sanity warnings with --strip-boilerplate (on the real Gutenberg file when it is there)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from models.checkpoint import load_checkpoint
from runtime.corpus import strip_gutenberg
from train.config import TrainConfig
from train.data import MIN_VAL_TOKENS, prepare_data
from train.loop import train
from train.metrics import plot_losses, read_metrics
from train.schedule import EVAL_POINTS, evaluation_points, fit_plan

REPO = Path(__file__).resolve().parents[1]
AESOP = REPO.parent / "shared" / "data" / "aesop-fables-pg21.txt"
TEXT = "the quick brown fox jumps over the lazy dog. " * 400


def corpus(tmp_path: Path, text: str = TEXT) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def tiny_lstm(tmp_path: Path, **overrides: object) -> TrainConfig:
    data = overrides.pop("data", None) or str(corpus(tmp_path))
    values: dict[str, object] = dict(
        arch="lstm", data=data, out=str(tmp_path / "run.bin"), tokenizer="char", embedding_size=8,
        hidden_size=16, layers=1, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2, max_steps=10, eval_every=5,
        threads=1, seed=3)
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def run_quietly(config: TrainConfig) -> tuple[object, str]:
    output = io.StringIO()
    result = train(config, console=Console(file=output, width=200), live=False)
    return result, output.getvalue()


# ------------------------------------------------------------------------------------------------ output paths


def test_a_bad_out_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    """The 'first second' promise: the check runs before the ~2 s torch import, whatever the machine's load."""
    (tmp_path / "d").mkdir()
    code = ("import sys; from train.cli import main; "
            f"code = main(['--arch', 'lstm', '--data', {str(corpus(tmp_path))!r}, '--out', {str(tmp_path / 'd')!r}]); "
            "print(code, 'torch' in sys.modules)")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.stdout.split() == ["2", "False"], done
    assert done.stderr.strip() == f"error: cannot write --out {tmp_path / 'd'}: it is a directory; give a file name"
    assert time.monotonic() - started < 5  # generous for a loaded machine; the real guard is 'no torch'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "d"]  # no stray d.metrics.jsonl


def test_a_failing_final_write_falls_back_and_says_where(tmp_path: Path, disk_full: Callable[..., None]) -> None:
    """Disk full at OUT (pretended): the finished run goes to run.recovered-PID.bin beside it, and the log says so."""
    config = tiny_lstm(tmp_path)
    disk_full("run.bin", "run.bin.last")
    result, log = run_quietly(config)
    fallback = tmp_path / f"run.recovered-{os.getpid()}.bin"
    assert f"warning: could not write {tmp_path / 'run.bin'} (No space left on device); saved it to {fallback}" in log
    assert ".tmp" not in log  # never the temp file's name
    assert load_checkpoint(fallback).training.step in (5, 10)
    assert load_checkpoint(tmp_path / f"run.bin.recovered-{os.getpid()}.last").training.step == 10
    assert result.steps == 10  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------ budget fit


def test_fit_plan_shortens_defaults_and_keeps_explicit_values() -> None:
    plan = fit_plan(26, warmup_steps=100, eval_every=250, fit_warmup=True, fit_eval=True, budget_words="the budget")
    assert plan.warmup_steps == 2 and plan.eval_every == 26 // EVAL_POINTS
    assert any("warmup shortened from 100 to 2 steps" in note for note in plan.notes)
    assert any("evaluating every 5 steps instead of 250" in note for note in plan.notes)
    kept = fit_plan(26, warmup_steps=100, eval_every=250, fit_warmup=False, fit_eval=False, budget_words="x")
    assert (kept.warmup_steps, kept.eval_every, kept.notes) == (100, 250, ())
    roomy = fit_plan(10_000, warmup_steps=100, eval_every=250, fit_warmup=True, fit_eval=True, budget_words="x")
    assert (roomy.warmup_steps, roomy.eval_every, roomy.notes) == (100, 250, ())


def test_evaluations_take_at_most_a_fifth_of_a_time_budget() -> None:
    assert evaluation_points(None, 30.0) == EVAL_POINTS  # steps/epochs budgets: the full count
    assert evaluation_points(60.0, 1.0) == EVAL_POINTS
    assert evaluation_points(60.0, 4.0) == 3  # 5 x 4 s would be a third of 60 s
    assert evaluation_points(60.0, 30.0) == 2  # never fewer than one midway and one at the end


@pytest.mark.slow
def test_a_time_budget_fits_warmup_evaluations_and_wall_time(tmp_path: Path) -> None:
    """A default warmup far longer than the run is cut (and said), the run gets ~5 evaluations with one at the
    end, and the whole call, evaluations and files included, stays within the budget."""
    budget = 8.0
    config = tiny_lstm(tmp_path, max_steps=None, time_budget=budget, warmup_steps=100_000, eval_every=100_000,
                       fit_to_budget=["warmup_steps", "eval_every"])
    started = time.monotonic()
    result, log = run_quietly(config)
    wall = time.monotonic() - started
    assert "note: warmup shortened from 100,000" in log or "note: warmup shortened from 100000" in log
    assert "note: evaluating every" in log
    records = read_metrics(tmp_path / "run.bin.metrics.jsonl")
    assert len(records) >= EVAL_POINTS - 1, [r["step"] for r in records]
    assert records[-1]["step"] == result.steps  # type: ignore[attr-defined]
    assert wall <= budget + 1.0, wall
    assert "of wall time, evaluations included" in log


def test_a_short_preset_interval_keeps_evaluating_through_the_whole_budget(tmp_path: Path) -> None:
    """A preset's interval much shorter than the run (jokes-word's 50 steps in a 2,500-step run) is kept while
    evaluations are cheap: the minimum count is not a ration spent in the first steps, leaving the rest of the run
    (and the plot) without a validation point until the end."""
    config = tiny_lstm(tmp_path, max_steps=None, time_budget=6.0, eval_every=10, fit_to_budget=["eval_every"])
    result, _ = run_quietly(config)
    steps = [record["step"] for record in read_metrics(tmp_path / "run.bin.metrics.jsonl")]
    assert result.steps > 40 and len(steps) > EVAL_POINTS, steps  # type: ignore[attr-defined]
    gaps = [after - before for before, after in zip([0, *steps], steps, strict=False)]
    assert max(gaps) <= result.steps / 4, (steps, result.steps)  # type: ignore[attr-defined]


def test_explicit_flags_are_never_refitted(tmp_path: Path) -> None:
    config = tiny_lstm(tmp_path, max_steps=12, warmup_steps=50, eval_every=6, fit_to_budget=[])
    _, log = run_quietly(config)
    assert "warmup shortened" not in log and "evaluating every" not in log
    assert [r["step"] for r in read_metrics(tmp_path / "run.bin.metrics.jsonl")] == [6, 12]


def test_cli_marks_only_unset_flags_as_fittable(tmp_path: Path) -> None:
    from train.cli import build_parser, resolve_config

    args = build_parser().parse_args(["--arch", "gpt2", "--data", str(corpus(tmp_path)), "--out",
                                      str(tmp_path / "g.bin"), "--warmup-steps", "7"])
    config, _, _ = resolve_config(args)
    assert config.fit_to_budget == ["eval_every"] and config.warmup_steps == 7


# ------------------------------------------------------------------------------------------------ the plot


def test_the_plot_draws_the_training_curve_without_any_evaluation(tmp_path: Path) -> None:
    png = tmp_path / "loss.png"
    assert plot_losses(tmp_path / "none.jsonl", png, "t", train_curve=[(1, 4.0), (2, 3.5), (3, 3.2)])
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
    assert not plot_losses(tmp_path / "none.jsonl", tmp_path / "empty.png", "t")


@pytest.mark.slow
def test_sigterm_writes_the_plot_and_the_latest_state(tmp_path: Path) -> None:
    out = tmp_path / "run.bin"
    process = subprocess.Popen(
        [sys.executable, "-m", "train", "--arch", "lstm", "--data", str(corpus(tmp_path)), "--tokenizer", "char",
         "--hidden-size", "16", "--embedding-size", "8", "--layers", "1", "--batch-size", "4", "--seq-len", "16",
         "--time-budget", "120", "--threads", "1", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    assert process.stdout is not None
    for line in process.stdout:  # wait until training has started
        if line.startswith("note: evaluating every") or line.startswith("step "):
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signal.SIGTERM, rest
    assert "interrupted by SIGTERM" in rest
    assert (tmp_path / "run.bin.loss.png").stat().st_size > 1000
    assert load_checkpoint(tmp_path / "run.bin.last").training.step > 0


# ------------------------------------------------------------------------------------------------ corpus sanity


def test_a_tiny_corpus_warns_about_batch_and_validation_size(tmp_path: Path) -> None:
    config = tiny_lstm(tmp_path, data=str(corpus(tmp_path, "A tiny corpus of ninety-four characters, or so. " * 2)),
                       batch_size=32, seq_len=128)
    report = prepare_data(config).report
    warnings = [line for line in report if line.startswith("warning:")]
    assert any("smaller than one batch (32 x 128 = 4,096 tokens)" in line for line in warnings), report
    assert any("validation split is only" in line and f"under {MIN_VAL_TOKENS:,}" in line for line in warnings)
    assert not any("Gutenberg" in line for line in warnings)


GUTENBERG = ("The Project Gutenberg eBook of Tiny Tales\n\nThis ebook is for the use of anyone anywhere.\n\n"
             "*** START OF THE PROJECT GUTENBERG EBOOK TINY TALES ***\n\nTHE FOX\n\nA fox saw grapes.\n" * 1
             + "A fox saw grapes high on a vine. " * 100
             + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK TINY TALES ***\n\nSection 1. General Terms of Use...\n")


def test_gutenberg_boilerplate_is_found_and_stripped() -> None:
    body, removed = strip_gutenberg(GUTENBERG)
    assert body.startswith("THE FOX") and body.rstrip().endswith("on a vine.")
    assert removed == len(GUTENBERG) - len(body) and "Project Gutenberg" not in body
    assert strip_gutenberg("no markers here") == ("no markers here", 0)


def test_gutenberg_warning_and_flag_in_a_training_run(tmp_path: Path) -> None:
    config = tiny_lstm(tmp_path, data=str(corpus(tmp_path, GUTENBERG)))
    warned = prepare_data(config).report
    assert any(line.startswith("warning:") and "Project Gutenberg header and licence" in line
               and "--strip-boilerplate" in line for line in warned)
    stripped = prepare_data(TrainConfig(**{**config.to_dict(), "strip_boilerplate": True}))
    assert not any("Gutenberg" in line and line.startswith("warning:") for line in stripped.report)
    assert any(line.startswith("boilerplate: stripped") for line in stripped.report)


@pytest.mark.skipif(not AESOP.exists(), reason="the shared Aesop corpus is not on this machine")
def test_strip_boilerplate_on_the_real_aesop_file(tmp_path: Path) -> None:
    """The Gutenberg file in ../shared/data: the licence no longer becomes the validation split."""
    base = dict(arch="lstm", data=str(AESOP), out=str(tmp_path / "a.bin"), tokenizer="char")
    plain = prepare_data(TrainConfig(**base))  # type: ignore[arg-type]
    assert any("Project Gutenberg header and licence" in line for line in plain.report)
    clean = prepare_data(TrainConfig(**base, strip_boilerplate=True))  # type: ignore[arg-type]
    text = clean.tokenizer.decode(clean.val_ids.tolist())
    assert "Gutenberg" not in text and "License" not in text
    assert "Gutenberg" in plain.tokenizer.decode(plain.val_ids.tolist())
    assert any(line.startswith("boilerplate: stripped") for line in clean.report)


def test_strip_boilerplate_is_a_cli_flag(tmp_path: Path) -> None:
    from train.cli import build_parser, resolve_config

    args = build_parser().parse_args(["--arch", "lstm", "--data", str(corpus(tmp_path)), "--out",
                                      str(tmp_path / "x.bin"), "--strip-boilerplate"])
    assert resolve_config(args)[0].strip_boilerplate is True
    json.dumps(resolve_config(args)[0].to_dict())  # stored in checkpoints as plain values


def test_a_failing_export_write_falls_back_and_says_where(tmp_path: Path, disk_full: Callable[..., None],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The same promise for textgen-export: a verified file whose write fails goes beside it, and stderr says so."""
    from export.cli import main as export_main

    config = tiny_lstm(tmp_path, max_steps=1, eval_every=1)
    run_quietly(config)
    disk_full("run.onnx")
    assert export_main(["--checkpoint", str(tmp_path / "run.bin"), "--output", str(tmp_path / "run.onnx")]) == 0
    fallback = tmp_path / f"run.recovered-{os.getpid()}.onnx"
    err = capsys.readouterr().err
    assert err.strip() == (f"warning: could not write {tmp_path / 'run.onnx'}: No space left on device; wrote the "
                           f"verified file to {fallback} instead")
    from runtime.session import OnnxModel

    assert OnnxModel.open(fallback, device="cpu", threads=1).info.vocab_size > 0
