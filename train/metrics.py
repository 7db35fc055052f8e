"""Evaluation records: the ``OUT.metrics.jsonl`` log, the ``OUT.loss.png`` curve and number formatting."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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


def plot_losses(metrics: Path, png: Path, title: str, unit: str = "nats/token") -> bool:
    """Train and validation loss (in ``unit``) against step; False when there is nothing to plot."""
    records = [r for r in read_metrics(metrics) if isinstance(r.get("step"), int)]
    if not records:
        return False
    # The object API with no pyplot: nothing global, no GUI backend chosen or imported (Agg renders the file).
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel(f"loss ({unit})")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    return True


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
