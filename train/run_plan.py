"""The run plan: how many steps a run's budget allows, and when it evaluates.

Step and epoch budgets say how many steps the run has before it starts; a time budget is measured from the pace
of the steps after the first (CALIBRATION_STEPS of them). Either way train.schedule.fit_plan then fits the warmup
and the evaluation interval to those steps. A time-budgeted run re-plans after each evaluation, when the
evaluation's real cost and the steps' real pace are known, and keeps time free after its last step for the final
evaluation and files (``reserve``). Interim evaluations score a subset of the validation split and the final one
all of it (train.evaluation.ValidationSet), so the two cost differently: an evaluation is costed as its scoring
pace (seconds per prediction, measured) times its predictions, plus what else it does (samples, checkpoint
writes); the interval between evaluations is fitted to the interim cost, the reserve to the full one. The state
that makes a resumed run continue exactly goes into the checkpoint (``state_dict``, the ``plan`` entry of the
training state's extras).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from train.config import TrainConfig
from train.distributed import Batcher, Cluster
from train.presets import DEFAULT_EPOCHS
from train.schedule import EVAL_POINTS, Budget, LRSchedule, affordable_evaluations, evaluation_points, fit_plan

CALIBRATION_STEPS = 4  # steps timed (after the first, which pays for warm-up) before a time budget is planned
FINAL_FILES_SECONDS = 3.0  # kept at the end of a time budget for the loss plot, last writes and process exit
EVAL_MARGIN = 1.2  # the final evaluation is reserved this many times its estimated duration (load varies)


def run_budget(config: TrainConfig) -> Budget:
    """The configured budget; a run given none trains DEFAULT_EPOCHS epochs."""
    budget = Budget(config.max_steps, config.time_budget, config.epochs)
    if config.max_steps is None and config.time_budget is None and config.epochs is None:
        budget.epochs = DEFAULT_EPOCHS
    return budget


class RunPlan:
    """The evaluation cadence and warmup of one run, fitted to its budget (restored on resume)."""

    def __init__(self, config: TrainConfig, budget: Budget, schedule: LRSchedule, cluster: Cluster,
                 batcher: Batcher, val_count: int, say: Callable[[str], None],
                 interim_count: int | None = None) -> None:
        self.config = config
        self.budget = budget
        self.schedule = schedule  # its warmup_steps is fitted here
        self.cluster = cluster
        self.batcher = batcher
        self.val_count = val_count  # predictions in a full (final) evaluation
        self.interim_count = val_count if interim_count is None else interim_count  # ... in an interim one
        self.say = say
        self.eval_every = config.eval_every
        self.planned = False
        # every evaluation's (seconds per scored prediction, seconds of other work: samples, metrics, checkpoint
        # writes) this run. The cadence goes by their medians, so one evaluation slowed by a busy moment does not
        # stop the evaluations for the rest of the run; the reserve for the final one goes by the last, the
        # cautious choice for fitting the budget.
        self.costs_seen: list[tuple[float, float]] = []
        self.pace: tuple[float, float] | None = None  # (steps/s, training tokens/s) once measured
        self.eval_points = EVAL_POINTS  # fewer when evaluations are dear (train.schedule.evaluation_points)
        # A run fitted to its budget evaluates at next_eval_step (re-planned after each evaluation); otherwise at
        # every multiple of eval_every.
        self.next_eval_step: int | None = None
        self.train_seconds_this_run = 0.0  # time in training steps alone (evaluations left out): the true pace
        self.steps_this_run = 0
        self.first_step_done: tuple[int, float, int] | None = None  # (step, clock, tokens) after this run's first

    def evaluation_due(self, step: int, last_eval_step: int | None) -> bool:
        if step == 0 or last_eval_step == step:
            return False
        if self.next_eval_step is not None:
            return step >= self.next_eval_step
        return step % self.eval_every == 0

    def plan_if_known(self, step: int, seconds: float) -> None:
        """Step and epoch budgets say how many steps the run has before it starts: fit the plan now."""
        if self.planned or self.budget.time_budget is not None:
            return
        self._apply(step, self.budget.expected_steps(step, seconds, 0.0, self._batches_per_epoch(), 0.0))

    def count_step(self, step_seconds: float) -> None:
        """A training step took ``step_seconds`` (evaluations left out)."""
        self.train_seconds_this_run += step_seconds
        self.steps_this_run += 1

    def calibrate(self, step: int, seconds: float, tokens_seen: int) -> None:
        """After each step: remember the first of this run; a time budget is planned once CALIBRATION_STEPS more
        have been timed."""
        if self.first_step_done is None:
            self.first_step_done = (step, seconds, tokens_seen)
        elif not self.planned and step - self.first_step_done[0] >= CALIBRATION_STEPS - 1:
            self._plan_from_pace(step, seconds, tokens_seen)

    def _plan_from_pace(self, step: int, seconds: float, tokens_seen: int) -> None:
        """A time budget: measure the pace of the steps after the first and estimate the steps that fit."""
        first_step, first_seconds, first_tokens = self.first_step_done
        elapsed = seconds - first_seconds
        if elapsed <= 0:
            return
        self.pace = ((step - first_step) / elapsed, (tokens_seen - first_tokens) / elapsed)
        self.eval_points = evaluation_points(self.budget.time_budget, self.interim_estimate())
        reserve = (self.eval_points - 1) * self.interim_estimate() + self.full_estimate() + FINAL_FILES_SECONDS
        self._apply(step, self.budget.expected_steps(step, seconds, self.pace[0], self._batches_per_epoch(), reserve))

    def _apply(self, step: int, expected: int | None) -> None:
        self.planned = True
        if expected is None:
            return
        words = f"the {self.budget.describe()} budget"
        plan = fit_plan(expected, self.schedule.warmup_steps, self.eval_every,
                        "warmup_steps" in self.config.fit_to_budget, "eval_every" in self.config.fit_to_budget, words,
                        self.eval_points)
        self.schedule.warmup_steps, self.eval_every = plan.warmup_steps, plan.eval_every
        if "eval_every" in self.config.fit_to_budget:
            self.next_eval_step = max(1, math.ceil(step / self.eval_every)) * self.eval_every
        for note in plan.notes:
            self.say(note)

    def evaluated(self, step: int, seconds: float, eval_seconds: float, pass_seconds: float | None = None,
                  predictions: int | None = None) -> None:
        """An evaluation at ``step`` took ``eval_seconds`` (the same on every rank), ``pass_seconds`` of them
        scoring ``predictions`` (default: all of it, the full pass); ``seconds`` is the run's clock after it.
        Schedules the next one."""
        pass_seconds = eval_seconds if pass_seconds is None else pass_seconds
        predictions = self.val_count if predictions is None else predictions
        self.costs_seen.append((pass_seconds / max(1, predictions), max(0.0, eval_seconds - pass_seconds)))
        if self.next_eval_step is not None:
            self.next_eval_step = step + self.eval_every
        self._refit_eval_interval(step, seconds)

    def _refit_eval_interval(self, step: int, seconds: float) -> None:
        """After each evaluation of a time-budgeted run: with the evaluation's real cost and the steps' real pace
        known, space the evaluations still to come. The configured interval holds unless the run would then get
        fewer than EVAL_POINTS evaluations (closer together) or spend more than EVAL_SHARE of its budget on them
        (further apart); the count is a floor, not a ration to use up early."""
        if (self.budget.time_budget is None or "eval_every" not in self.config.fit_to_budget
                or self.steps_this_run == 0 or self.train_seconds_this_run <= 0 or not self.costs_seen):
            return
        pace = self.steps_this_run / self.train_seconds_this_run
        interim = self.typical_interim_cost()
        self.eval_points = min(self.eval_points, evaluation_points(self.budget.time_budget, interim))
        affordable_left = affordable_evaluations(self.budget.time_budget, interim) - len(self.costs_seen)
        if affordable_left <= 1:  # only the evaluation at the end is still affordable
            self.next_eval_step = 2**62
            return
        wanted_left = max(1, self.eval_points - len(self.costs_seen))  # the final one included
        time_left = self.budget.time_budget - seconds - self.reserve()
        widest = int(max(0.0, time_left - (wanted_left - 1) * interim) * pace) // wanted_left
        narrowest = math.ceil(max(0.0, time_left) * pace / affordable_left)
        # only the final evaluation still needed for the minimum: no reason to come closer than configured
        wanted = self.config.eval_every if wanted_left <= 1 else min(self.config.eval_every, widest)
        interval = max(narrowest, wanted, 1)
        interval = int(self.cluster.broadcast(interval))  # rank 0's everywhere
        self.eval_every = interval
        if self.next_eval_step is not None:
            self.next_eval_step = step + interval

    def reserve(self) -> float:
        """Seconds a time budget keeps free after the last step: the final (full) evaluation and the last files."""
        if self.budget.time_budget is None:
            return 0.0
        return EVAL_MARGIN * self.full_estimate() + FINAL_FILES_SECONDS

    def interim_estimate(self) -> float:
        """Seconds an interim evaluation takes (the subset of the validation split), at the last one's cost."""
        return self._evaluation_estimate(self.interim_count)

    def typical_interim_cost(self) -> float:
        """Seconds an interim evaluation takes at the median cost of this run's evaluations so far."""
        return self._evaluation_estimate(self.interim_count, typical=True)

    def full_estimate(self) -> float:
        """Seconds the final evaluation takes (every prediction)."""
        return self._evaluation_estimate(self.val_count)

    def _evaluation_estimate(self, predictions: int, typical: bool = False) -> float:
        """Seconds an evaluation of ``predictions`` takes: at the last (or, ``typical``, the median) evaluation's
        scoring pace plus its other work once there was one, else from the training pace (a forward pass is about
        a third of a training step's work)."""
        if self.costs_seen:
            if typical:
                per_prediction = statistics.median(cost[0] for cost in self.costs_seen)
                other = statistics.median(cost[1] for cost in self.costs_seen)
            else:
                per_prediction, other = self.costs_seen[-1]
            return per_prediction * predictions + other
        if self.pace is None or self.pace[1] <= 0:
            return 0.0
        return predictions / (3.0 * self.pace[1])

    def _batches_per_epoch(self) -> int:
        return self.batcher.batches_per_epoch(0)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same plan."""
        return {"planned": self.planned, "eval_every": self.eval_every, "next_eval_step": self.next_eval_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.planned = bool(state.get("planned", False))
        self.eval_every = int(state.get("eval_every", self.eval_every))
        next_step = state.get("next_eval_step")
        self.next_eval_step = int(next_step) if isinstance(next_step, int) else None
