"""Progress display: a rich live bar on a terminal, periodic plain lines otherwise (logs, pipes, CI)."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from train.metrics import format_rate, format_seconds

PLAIN_EVERY_SECONDS = 10.0


class ProgressReporter:
    """``update`` after every step; ``say`` prints a line (above the bar when there is one)."""

    def __init__(self, console: Console, live: bool | None = None, plain_every: float = PLAIN_EVERY_SECONDS) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self.plain_every = plain_every
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_plain = time.monotonic()

    def __enter__(self) -> ProgressReporter:
        if self.live:
            self._progress = Progress(
                TextColumn("step {task.fields[step]}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]}"),
                TextColumn("lr {task.fields[lr]}"),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=1000, step=0, loss="-", rate="-", lr="-", eta="-")
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def update(self, *, fraction: float, step: int, loss: float, lr: float, tokens_per_s: float,
               eta: float | None) -> None:
        fields = {
            "step": step,
            "loss": f"{loss:.4f}",
            "rate": format_rate(tokens_per_s),
            "lr": f"{lr:.2e}",
            "eta": format_seconds(eta) if eta is not None else "-",
        }
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=round(fraction * 1000), **fields)
            return
        now = time.monotonic()
        if now - self._last_plain >= self.plain_every:
            self._last_plain = now
            self.say(
                f"step {step} ({fraction:.0%}) | loss {fields['loss']} | {fields['rate']} | lr {fields['lr']} | "
                f"ETA {fields['eta']}"
            )

    def say(self, text: str) -> None:
        # Generated samples may hold "[...]" or ":name:": never interpret them as rich markup or emoji.
        self.console.print(text, markup=False, emoji=False, highlight=False, soft_wrap=True)
