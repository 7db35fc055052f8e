"""Interim evaluations on a fixed subset of the validation split, the final one a full pass (issue 23): what each
record covers, the best checkpoint's honest loss, the run plan's costs, exact resume, and a split no larger than
the subset scored in full as before.

Corpora are a few KB in tmp_path and models tiny, so the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from rich.console import Console

from export.onnx_export import export_checkpoint
from models.checkpoint import load_checkpoint
from models.registry import build_model
from runtime.session import OnnxModel
from train.batches import StreamBatcher, gpt_eval_windows, rnn_eval_streams
from train.cli import main
from train.config import TrainConfig
from train.data import prepare_data
from train.distributed import Cluster
from train.evaluation import ValidationSet, gpt_validation_total, rnn_validation_total
from train.loop import INTERIM_SAMPLE_TOKENS, train
from train.metrics import _plot_validation, read_metrics
from train.resume import config_for_resume, last_checkpoint_path, load_resume_checkpoint
from train.run_plan import EVAL_MARGIN, FINAL_FILES_SECONDS, RunPlan
from train.schedule import Budget, LRSchedule

# ~2,100 validation characters at the default 10 %: several 256-token streams, many 16-token windows
TEXT = "".join(f"line {i}: the {w} sat on the mat and looked at the {v}.\n" for i, (w, v) in
               enumerate(zip(["cat", "dog", "owl", "fox"] * 100, ["log", "hen", "sky"] * 134, strict=False)))


def config(tmp_path: Path, arch: str = "lstm", **overrides: object) -> TrainConfig:
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT, encoding="utf-8")
    values: dict[str, object] = dict(
        arch=arch, data=str(data), out=str(tmp_path / f"{arch}.bin"), tokenizer="char", embedding_size=16,
        hidden_size=32, layers=1, n_layer=1, n_head=2, n_embd=16, context_length=16, batch_size=4, seq_len=16,
        lr=1e-2, warmup_steps=2, max_steps=12, eval_every=4, threads=1, seed=7, eval_interim_tokens=300)
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def full_count(cfg: TrainConfig) -> int:
    """Predictions in a full pass over cfg's validation split, from the protocol functions alone."""
    ids = prepare_data(cfg).val_ids
    targets = rnn_eval_streams(ids)[1] if cfg.arch == "lstm" else gpt_eval_windows(ids, cfg.context_length)[1]
    return targets.numel()


def run(cfg: TrainConfig) -> tuple[object, str, list[dict]]:
    output = io.StringIO()
    result = train(cfg, console=Console(file=output, width=250), live=False)
    return result, output.getvalue(), read_metrics(Path(f"{cfg.out}.metrics.jsonl"))


# ------------------------------------------------------------------------------------------------ the subset


def token_losses(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, stateful: bool) -> torch.Tensor:
    """Every prediction's NLL, [rows, T], scored in one call (the protocol without chunking)."""
    with torch.no_grad():
        logits = model(inputs, None)[0] if stateful else model(inputs)[0]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@pytest.mark.parametrize("arch", ["lstm", "gpt2"])
def test_the_subset_is_part_of_the_full_pass_scored_the_same_way(arch: str) -> None:
    torch.manual_seed(0)
    stateful = arch == "lstm"
    shape = ({"embedding_size": 8, "hidden_size": 16, "num_layers": 1} if stateful else
             {"context_length": 16, "n_layer": 1, "n_head": 2, "n_embd": 16})
    model = build_model(arch, {"vocab_size": 11, "dropout": 0.0, **shape}).eval()
    ids = torch.randint(0, 11, (3073,))
    inputs, targets = rnn_eval_streams(ids) if stateful else gpt_eval_windows(ids, 16)
    per_token = token_losses(model, inputs, targets, stateful)
    validation = ValidationSet(inputs, targets, stateful, 700, lambda rows: rows)
    assert validation.has_subset and validation.count == targets.numel() == 3072
    assert 0 < validation.subset_count <= 700
    with torch.no_grad():
        subset, state = validation.score_subset(model, 11)
        rest = validation.score_rest(model, 11, state)
    if stateful:  # every stream's opening columns, read from its zero state as in the full pass
        assert validation.subset_count == inputs.shape[0] * validation.subset_columns
        expected_subset = per_token[:, : validation.subset_columns].sum().item()
        full = rnn_validation_total(model, inputs, targets, 11)
    else:  # whole windows spread over the split, not its beginning
        rows = [i for i in range(inputs.shape[0]) if any(torch.equal(inputs[i], r) for r in validation._subset[0])]
        assert len(rows) * 16 == validation.subset_count and rows[-1] > inputs.shape[0] // 2
        expected_subset = per_token[rows].sum().item()
        full = gpt_validation_total(model, inputs, targets, 11)
    assert subset == pytest.approx(expected_subset, rel=1e-5)
    assert subset + rest == pytest.approx(full, rel=1e-5) and full == pytest.approx(per_token.sum().item(), rel=1e-5)

    # two processes, each scoring its rows (Cluster.local_rows), cover the same subset between them
    halves = [ValidationSet(inputs, targets, stateful, 700, lambda rows, r=r: rows[r::2]) for r in (0, 1)]
    with torch.no_grad():
        assert sum(h.score_subset(model, 11)[0] for h in halves) == pytest.approx(subset, rel=1e-5)
    assert halves[0].subset_count == validation.subset_count

    whole = ValidationSet(inputs, targets, stateful, 3072, lambda rows: rows)
    assert not whole.has_subset and whole.subset_count == whole.count


# ------------------------------------------------------------------------------------------------ a run


@pytest.mark.parametrize("arch", ["lstm", "gpt2"])
def test_interim_records_are_the_subset_and_the_final_one_a_full_pass(tmp_path: Path, arch: str) -> None:
    cfg = config(tmp_path, arch, prime=["the "])
    count = full_count(cfg)
    result, log, records = run(cfg)
    assert [r["step"] for r in records] == [4, 8, 12]
    samples = re.findall(r"--- sample \('the '\) ---\n(.*?)\n---", log, flags=re.DOTALL)
    assert len(samples) == 3  # shorter at the interim evaluations (sampling is dear next to a subset), full at the end
    assert max(len(text) for text in samples[:2]) <= len("the ") + INTERIM_SAMPLE_TOKENS["char"] < len(samples[2])
    interim, final = records[:-1], records[-1]
    subset = interim[0]["val_tokens"]
    assert 0 < subset <= 300 < count
    assert all(r["val_scope"] == "subset" and r["val_tokens"] == subset for r in interim)
    assert all(r["val_subset_loss"] == r["val_loss"] for r in interim)
    assert final["val_scope"] == "full" and final["val_tokens"] == final["val_full_tokens"] == count
    assert final["val_subset_tokens"] == subset and final["val_subset_loss"] != final["val_loss"]
    assert f"[subset: {subset:,} of {count:,} predictions]" in log
    assert f"[full pass, {count:,} predictions; subset {final['val_subset_loss']:.4f}]" in log
    assert f"interim evaluations score a fixed {subset:,} of them" in log
    # the loss fell all along, so the final evaluation is the best: OUT records its full-pass loss
    assert final["best"] and result.best_step == 12  # type: ignore[attr-defined]
    assert result.best_val_loss == final["val_loss"] and result.best_val_tokens == count  # type: ignore[attr-defined]
    best = load_checkpoint(cfg.out)
    assert best.training.best_val_loss == final["val_loss"] and best.metrics["val_scope"] == "full"


def test_the_subset_moves_time_only_the_training_and_final_loss_are_the_same(tmp_path: Path) -> None:
    """Step for step, a run with interim subsets trains the same weights and ends on the same full-pass loss as a
    run that scores everything at every evaluation (evaluation never touches training)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    options = dict(schedule="plateau", dropout=0.2, layers=2)
    _, _, with_subset = run(config(tmp_path / "a", **options))
    _, _, all_full = run(config(tmp_path / "b", eval_interim_tokens=0, **options))
    assert [r["val_scope"] for r in all_full] == ["full"] * 3 and "val_subset_loss" not in all_full[-1]
    assert with_subset[-1]["val_loss"] == pytest.approx(all_full[-1]["val_loss"], abs=1e-6)
    a = load_checkpoint(last_checkpoint_path(tmp_path / "a" / "lstm.bin"))
    b = load_checkpoint(last_checkpoint_path(tmp_path / "b" / "lstm.bin"))
    for name, tensor in a.weights.items():
        assert torch.equal(tensor, b.weights[name]), name


def test_early_stopping_ends_on_a_full_pass_and_an_earlier_best_is_labelled_a_subset(tmp_path: Path) -> None:
    cfg = config(tmp_path, lr=0.3, grad_clip=0.0, max_steps=200, eval_every=2, patience=1)
    count = full_count(cfg)
    result, log, records = run(cfg)
    assert result.stop_reason.startswith("early stopping"), records  # type: ignore[attr-defined]
    final = records[-1]
    assert final["val_scope"] == "full" and final["val_tokens"] == count and not final["best"]
    best = next(r for r in records if r["step"] == result.best_step)  # type: ignore[attr-defined]
    assert best["val_scope"] == "subset" and final["val_subset_loss"] >= best["val_loss"]  # compared like with like
    assert result.best_val_loss == best["val_loss"] and result.best_val_tokens < count  # type: ignore[attr-defined]
    saved = load_checkpoint(cfg.out)
    assert saved.training.step == best["step"] and saved.training.best_val_loss == best["val_loss"]
    assert saved.metrics["val_scope"] == "subset" and saved.metrics["val_tokens"] == best["val_tokens"]
    assert (f"at step {best['step']} on the interim subset ({best['val_tokens']:,} of {count:,} predictions); "
            f"full pass at step {final['step']}: {final['val_loss']:.4f}") in log
    exported = export_checkpoint(cfg.out, tmp_path / "best.onnx")  # the model file says what its loss covers
    source = OnnxModel.open(exported.path, device="cpu", threads=1).info.source
    assert (source["val_loss"], source["val_tokens"]) == (best["val_loss"], best["val_tokens"])


def test_a_split_no_larger_than_the_subset_is_scored_in_full_as_before(tmp_path: Path) -> None:
    cfg = config(tmp_path, eval_interim_tokens=100_000)
    count = full_count(cfg)
    result, log, records = run(cfg)
    assert [(r["val_scope"], r["val_tokens"]) for r in records] == [("full", count)] * 3
    assert not any("val_subset_loss" in r for r in records)
    assert "interim evaluations" not in log and "[subset" not in log and "[full pass" not in log
    assert result.best_val_loss == min(r["val_loss"] for r in records)  # type: ignore[attr-defined]


@pytest.mark.parametrize("arch", ["lstm", "gpt2"])
def test_resume_with_a_subset_continues_exactly(tmp_path: Path, arch: str) -> None:
    (tmp_path / "straight").mkdir()
    (tmp_path / "split").mkdir()
    options = dict(dropout=0.2, schedule="plateau", eval_every=3)  # the plateau schedule sees the subset losses
    straight = config(tmp_path / "straight", arch, **options)
    run(straight)
    split = config(tmp_path / "split", arch, **options)
    train(split, console=Console(file=io.StringIO()), live=False, stop_at_step=6)
    checkpoint = load_resume_checkpoint(last_checkpoint_path(split.out))
    assert checkpoint.training.extra["evaluation"]["best_val_tokens"] < full_count(split)
    resumed, _ = config_for_resume(checkpoint, {})
    train(resumed, resume=checkpoint, console=Console(file=io.StringIO()), live=False)
    a, b = (load_checkpoint(last_checkpoint_path(c.out)) for c in (straight, split))
    for name, tensor in a.weights.items():
        assert torch.equal(tensor, b.weights[name]), name
    assert a.training.scheduler == b.training.scheduler and a.training.best_val_loss == b.training.best_val_loss
    records_a, records_b = (read_metrics(Path(f"{c.out}.metrics.jsonl")) for c in (straight, split))
    assert [(r["val_loss"], r["val_scope"]) for r in records_a] == [(r["val_loss"], r["val_scope"]) for r in records_b]


# ------------------------------------------------------------------------------------------------ plan, plot, CLI


def test_the_plan_spaces_evaluations_by_the_interim_cost_and_reserves_a_full_pass(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_steps=None, time_budget=90.0, fit_to_budget=["eval_every"])
    batcher = StreamBatcher(torch.arange(5000), 4, 16)
    plan = RunPlan(cfg, Budget(time_budget=90.0), LRSchedule("cosine", 1e-2, 2), Cluster.single(torch.device("cpu")),
                   batcher, 100_000, lambda _: None, interim_count=10_000)
    plan.evaluated(step=100, seconds=20.0, eval_seconds=1.5, pass_seconds=1.0, predictions=10_000)
    assert plan.interim_estimate() == pytest.approx(1.5)  # 1 s of scoring + 0.5 s of samples and writes
    assert plan.full_estimate() == pytest.approx(10.5)  # ten times the predictions, the same other work
    assert plan.reserve() == pytest.approx(EVAL_MARGIN * 10.5 + FINAL_FILES_SECONDS)


def test_the_plot_tells_subset_points_from_full_passes() -> None:
    records = [{"step": 4, "val_loss": 2.0, "val_scope": "subset", "val_subset_loss": 2.0, "val_subset_tokens": 300,
                "val_full_tokens": 2000, "val_tokens": 300},
               {"step": 8, "val_loss": 1.8, "val_scope": "full", "val_subset_loss": 1.7, "val_subset_tokens": 300,
                "val_full_tokens": 2000, "val_tokens": 2000}]
    axes = Figure().subplots()
    _plot_validation(axes, records)
    lines = {line.get_label(): line.get_xydata().tolist() for line in axes.get_lines()}
    assert lines == {"validation, interim subset (300 predictions)": [[4, 2.0], [8, 1.7]],
                     "validation, full pass (2,000 predictions)": [[8, 1.8]]}
    plain = Figure().subplots()
    _plot_validation(plain, [{"step": 4, "val_loss": 2.0}])
    assert [line.get_label() for line in plain.get_lines()] == ["validation"]


def test_the_flag_reaches_the_config_and_a_bad_value_is_one_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from train.cli import build_parser, resolve_config

    data = tmp_path / "c.txt"
    data.write_text(TEXT, encoding="utf-8")
    base = ["--arch", "lstm", "--data", str(data), "--out", str(tmp_path / "x.bin")]
    assert resolve_config(build_parser().parse_args(base))[0].eval_interim_tokens == 16_384
    assert resolve_config(build_parser().parse_args([*base, "--eval-interim-tokens", "0"]))[0].eval_interim_tokens == 0
    assert main([*base, "--eval-interim-tokens", "-5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --eval-interim-tokens must be an integer >= 0, got -5"


def test_one_slow_evaluation_does_not_stop_the_cadence(tmp_path: Path) -> None:
    """A busy moment that slows one evaluation must not end the evaluations for the rest of the run: the cadence
    goes by the median cost of the run's evaluations, while the final pass's reserve keeps the last (cautious)."""
    cfg = config(tmp_path, max_steps=None, time_budget=60.0, eval_every=10, fit_to_budget=["eval_every"])
    batcher = StreamBatcher(torch.arange(5000), 4, 16)
    plan = RunPlan(cfg, Budget(time_budget=60.0), LRSchedule("cosine", 1e-2, 2), Cluster.single(torch.device("cpu")),
                   batcher, 2_000, lambda _: None)
    plan.next_eval_step = 10
    for step in range(1, 41):
        plan.count_step(0.1)  # 10 steps/s
        if step % 10 == 0:
            slow = step == 40
            plan.evaluated(step=step, seconds=step * 0.15, eval_seconds=8.0 if slow else 0.2,
                           pass_seconds=8.0 if slow else 0.2)
    assert plan.next_eval_step == 40 + 10  # the configured interval still holds
    assert plan.reserve() >= 8.0  # the final pass is budgeted at the slow cost
