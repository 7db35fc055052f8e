"""Learning-rate schedule and training budget.

Schedule: linear warmup over ``warmup_steps``, then either
- ``cosine``: from the base rate down to MIN_LR_RATIO of it, following the run's progress through its budget
  (steps, epochs or seconds, whichever is furthest along — with a time budget the decay follows the clock), or
- ``linear``: from the base rate straight down to zero at the end of the budget (Hugging Face's ``linear``;
  linear decay to zero was found to beat cosine-to-10 % at a fixed training budget, Bergsma et al. 2025,
  "Straight to Zero"), or
- ``plateau``: the base rate, halved whenever PLATEAU_PATIENCE evaluations in a row fail to improve the best
  validation loss (like torch's ReduceLROnPlateau, but with state that is plain numbers).

Budget: ``--time-budget`` is the whole run's wall time, from the start of ``textgen-train`` (corpus loading and
tokenizer training included) to the last file written; evaluations count, and the run stops early enough to fit
its final evaluation and checkpoint in. ``fit_plan`` estimates, from the pace of the first steps, how many steps a
budget allows and fits the warmup and evaluation cadence to them (a 100-step warmup in a 26-step run never ends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MIN_LR_RATIO = 0.1
WARMUP_FRACTION = 0.1  # a default/preset warmup longer than this share of the run's steps is shortened to it
EVAL_POINTS = 5  # evaluations a run gets at least (the last at the end), so the loss plot has a curve...
EVAL_SHARE = 0.2  # ...unless they would take more than this share of a time budget: then fewer (at least 2)
PLATEAU_FACTOR = 0.5
PLATEAU_PATIENCE = 2
PLATEAU_MIN_SCALE = 1 / 64
PLATEAU_THRESHOLD = 1e-3  # relative improvement that counts as better


class LRSchedule:
    def __init__(self, kind: str, base_lr: float, warmup_steps: int) -> None:
        self.kind = kind
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.plateau_scale = 1.0
        self.plateau_best = math.inf
        self.plateau_bad_evals = 0

    def lr(self, step: int, progress: float) -> float:
        """The rate for optimizer step ``step`` (0-based) at ``progress`` (0..1) through the budget."""
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "plateau":
            return self.base_lr * warmup * self.plateau_scale
        progress = min(max(progress, 0.0), 1.0)
        if self.kind == "linear":
            return self.base_lr * warmup * (1.0 - progress)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.base_lr * warmup * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * decay)

    def observe(self, val_loss: float) -> None:
        """Feed an evaluation result (plateau schedule only)."""
        if self.kind != "plateau":
            return
        if val_loss < self.plateau_best * (1.0 - PLATEAU_THRESHOLD):
            self.plateau_best = val_loss
            self.plateau_bad_evals = 0
            return
        self.plateau_bad_evals += 1
        if self.plateau_bad_evals >= PLATEAU_PATIENCE:
            self.plateau_scale = max(self.plateau_scale * PLATEAU_FACTOR, PLATEAU_MIN_SCALE)
            self.plateau_bad_evals = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "warmup_steps": self.warmup_steps,
            "plateau_scale": self.plateau_scale,
            "plateau_best": self.plateau_best,
            "plateau_bad_evals": self.plateau_bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warmup_steps = int(state.get("warmup_steps", self.warmup_steps))  # fitted to the budget (fit_plan)
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad_evals = int(state["plateau_bad_evals"])


@dataclass
class Budget:
    """When to stop: the first of max_steps, time_budget (seconds) and epochs that is reached."""

    max_steps: int | None = None
    time_budget: float | None = None
    epochs: float | None = None

    def expected_steps(self, step: int, seconds: float, steps_per_second: float, batches_per_epoch: int,
                       reserve: float) -> int | None:
        """The steps this budget allows in all: exact for --max-steps / --epochs, estimated for --time-budget from
        ``steps_per_second`` with ``reserve`` seconds kept for evaluations and the final files."""
        limits = []
        if self.max_steps is not None:
            limits.append(self.max_steps)
        if self.epochs is not None:
            limits.append(max(1, math.ceil(self.epochs * batches_per_epoch)))
        if self.time_budget is not None and steps_per_second > 0:
            limits.append(step + max(1, int((self.time_budget - seconds - reserve) * steps_per_second)))
        return min(limits) if limits else None

    def fraction(self, step: int, seconds: float, epochs_done: float, reserve: float = 0.0) -> float:
        """How far along the run is, 0..1: the furthest of the set budgets. ``reserve``: seconds of a time budget
        kept for after the last step (the final evaluation and files); the learning-rate schedule passes it so its
        decay ends at the last step rather than at the end of the clock."""
        parts = [0.0]
        if self.max_steps:
            parts.append(step / self.max_steps)
        if self.time_budget:
            parts.append(seconds / max(self.time_budget - reserve, 1e-9))
        if self.epochs:
            parts.append(epochs_done / self.epochs)
        return min(1.0, max(parts))

    def reached(self, step: int, seconds: float, epochs_done: float, reserve: float = 0.0) -> str | None:
        """Why the run is over, or None. ``reserve``: seconds still needed after the last step (the final
        evaluation and checkpoints), so the whole run fits its time budget."""
        if self.max_steps is not None and step >= self.max_steps:
            return f"reached --max-steps {self.max_steps}"
        if self.time_budget is not None and seconds + reserve >= self.time_budget:
            return f"reached --time-budget {self.time_budget:g} s"
        if self.epochs is not None and epochs_done >= self.epochs - 1e-9:
            return f"reached --epochs {self.epochs:g}"
        return None

    def eta(self, step: int, seconds: float, epochs_done: float) -> float | None:
        """Seconds left, extrapolating the run's average pace; None before there is a pace to go by."""
        fraction = self.fraction(step, seconds, epochs_done)
        if fraction <= 0.0:
            return None
        return seconds * (1.0 - fraction) / fraction

    def describe(self) -> str:
        parts = []
        if self.max_steps is not None:
            parts.append(f"{self.max_steps} steps")
        if self.time_budget is not None:
            parts.append(f"{self.time_budget:g} s")
        if self.epochs is not None:
            parts.append(f"{self.epochs:g} epochs")
        return " or ".join(parts) + (", whichever comes first" if len(parts) > 1 else "")


@dataclass(frozen=True)
class FittedPlan:
    """Warmup and evaluation interval fitted to the steps a budget allows, and the notes that say so."""

    warmup_steps: int
    eval_every: int
    notes: tuple[str, ...]


def evaluation_points(time_budget: float | None, eval_seconds: float) -> int:
    """How many evaluations a run gets at least: EVAL_POINTS, or fewer (at least 2) when that many would take more
    than EVAL_SHARE of a time budget (the per-step training curve in the plot shows the trend between them)."""
    if time_budget is None or eval_seconds <= 0:
        return EVAL_POINTS
    return min(EVAL_POINTS, affordable_evaluations(time_budget, eval_seconds))


def affordable_evaluations(time_budget: float, eval_seconds: float) -> int:
    """The most evaluations (at least 2) that fit in EVAL_SHARE of a time budget."""
    if eval_seconds <= 0:
        return 2**31
    return max(2, int(EVAL_SHARE * time_budget / eval_seconds))


def fit_plan(expected_steps: int, warmup_steps: int, eval_every: int, fit_warmup: bool, fit_eval: bool,
             budget_words: str, points: int = EVAL_POINTS) -> FittedPlan:
    """Shorten a default/preset warmup to WARMUP_FRACTION of ``expected_steps`` and the evaluation interval so a
    run gets ``points`` evaluations; settings the user gave explicitly are kept as they are."""
    notes = []
    warmup_cap = max(1, int(WARMUP_FRACTION * expected_steps))
    if fit_warmup and warmup_steps > warmup_cap:
        notes.append(f"note: warmup shortened from {warmup_steps} to {warmup_cap} steps ({WARMUP_FRACTION:.0%} of the "
                     f"~{expected_steps:,} steps {budget_words} allows; --warmup-steps N keeps your own)")
        warmup_steps = warmup_cap
    interval_cap = max(1, expected_steps // points)
    if fit_eval and eval_every > interval_cap:
        notes.append(f"note: evaluating every {interval_cap:,} steps instead of {eval_every:,}, so the "
                     f"~{expected_steps:,} steps get about {points} evaluations (the last at the end)")
        eval_every = interval_cap
    return FittedPlan(warmup_steps, eval_every, tuple(notes))
