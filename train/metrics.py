"""Evaluation records: the ``OUT.metrics.jsonl`` log, the ``OUT.loss.png`` curve and number formatting."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.atomic import atomic_write_bytes

REQUIRED_FIELDS = ("step", "seconds", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s")


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run logs a large finite number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def bits_per_char(loss_nats_per_char: float) -> float:
    return loss_nats_per_char / math.log(2)


def metrics_path(out: str | Path) -> Path:
    return Path(f"{out}.metrics.jsonl")


def loss_plot_path(out: str | Path) -> Path:
    return Path(f"{out}.loss.png")


class MetricsLog:
    """One JSON object per evaluation, appended and flushed at once so a killed run keeps its history.

    A fresh run truncates the file; a resumed run appends to it."""

    def __init__(self, path: Path, append: bool) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            path.write_text("", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        missing = [name for name in REQUIRED_FIELDS if name not in record]
        if missing:
            raise ValueError(f"metrics record lacks {missing}")
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log; unreadable lines (a torn last line) are skipped."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_losses(metrics: Path, png: Path, title: str,
                train_curve: Sequence[tuple[int, float]] = (), unit: str = "nats/token") -> bool:
    """Training loss (every step, with a moving average) and validation loss (each evaluation), in ``unit``,
    against step; False when there is nothing to plot. Written atomically, so an interrupted run never leaves half
    a PNG."""
    records = [r for r in read_metrics(metrics) if isinstance(r.get("step"), int)]
    if not records and not train_curve:
        return False
    # The object API with no pyplot: nothing global, no GUI backend chosen or imported (Agg renders the file).
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    if train_curve:
        steps, losses = zip(*train_curve, strict=True)
        axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (each step)")
        axes.plot(steps, _moving_average(losses), color="tab:blue", linewidth=1.5, label="train (moving average)")
    else:  # a log from before the curve was kept: the per-evaluation means
        points = [(r["step"], r["train_loss"]) for r in records if isinstance(r.get("train_loss"), (int, float))]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", markersize=3, color="tab:blue", label="train")
    _plot_validation(axes, [r for r in records if isinstance(r.get("val_loss"), (int, float))])
    axes.set_xlabel("step")
    axes.set_ylabel(f"loss ({unit})")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(png, lambda handle: handle.write(buffer.getvalue()))
    return True


def _plot_validation(axes: Any, records: list[dict[str, Any]]) -> None:
    """Validation loss per evaluation. A run whose interim evaluations score a subset (records with
    ``val_subset_loss``) gets two series: the subset loss of every evaluation (the final one's too: its subset part,
    so the line compares like with like) and the full passes as separate, larger points."""
    subset = [(r["step"], r["val_subset_loss"]) for r in records if isinstance(r.get("val_subset_loss"), (int, float))]
    if not subset:
        points = [(r["step"], r["val_loss"]) for r in records]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", markersize=4, color="tab:orange", label="validation")
        return
    tokens = next(r["val_subset_tokens"] for r in records if "val_subset_tokens" in r)
    axes.plot(*zip(*subset, strict=True), marker="o", markersize=4, color="tab:orange",
              label=f"validation, interim subset ({tokens:,} predictions)")
    full = [(r["step"], r["val_loss"]) for r in records if r.get("val_scope") == "full"]
    if full:
        axes.plot(*zip(*full, strict=True), linestyle="none", marker="*", markersize=11, color="tab:red",
                  label=f"validation, full pass ({records[-1]['val_full_tokens']:,} predictions)")


def _moving_average(values: Sequence[float]) -> list[float]:
    """Mean of the last ~5 % of points (at least 1): the trend through the step-to-step noise."""
    width = max(1, len(values) // 20)
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= width:
            total -= values[index - width]
        averaged.append(total / min(index + 1, width))
    return averaged


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_rate(tokens_per_s: float) -> str:
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M tok/s"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k tok/s"
    return f"{tokens_per_s:.0f} tok/s"
