"""What a training run's checkpoint holds of it, and restoring a run from one.

``run_checkpoint`` turns a run into a models.checkpoint.Checkpoint (weights, architecture, tokenizer, generation
defaults and the ``train`` section); ``restore_run`` puts the ``train`` section back into a freshly built run:
optimizer, schedule, data position, progress, the RNN state carried between windows, the run plan and every RNG
state, so the resumed run continues exactly (train.loop's docstring). The file layout and its loading belong to
models/checkpoint.py; which checkpoints can be resumed, and with which config, to train/resume.py.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from models.checkpoint import Checkpoint, CheckpointError, TrainingState
from models.rnn import State
from runtime.errors import first_line
from train.batches import DataCursor, DataPosition
from train.config import TrainConfig
from train.data import PreparedData
from train.distributed import Cluster, interleave_states, rank_slice_of_state
from train.progress import ProgressReporter
from train.rng import capture_rng_state, restore_rng_state, seed_everything
from train.run_plan import RunPlan
from train.schedule import LRSchedule


class TrainingRun(Protocol):
    """What a checkpoint is made from and restored into (train.loop.Trainer)."""

    config: TrainConfig
    model: nn.Module  # the bare module, never the DDP wrapper
    model_config: dict[str, Any]
    data: PreparedData
    generation: dict[str, Any]
    optimizer: Any  # torch.optim.Optimizer or train.optim.MuonWithAdamW
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None
    cursor: DataCursor
    cluster: Cluster
    device: torch.device
    reporter: ProgressReporter
    plan: RunPlan
    step: int
    seconds: float
    tokens_seen: int
    best_val_loss: float | None
    best_step: int | None
    best_subset_loss: float | None
    best_val_tokens: int | None
    evals_without_improvement: int
    last_eval_step: int | None
    last_eval_full: bool
    rnn_state: State | None
    last_metrics: dict[str, Any] | None
    train_curve: list[tuple[int, float]]


# ------------------------------------------------------------------------------------------------ saving


def rank_state(run: TrainingRun) -> dict[str, Any]:
    """This process's part of a checkpoint: its RNG state and its streams' RNN state (gathered to rank 0)."""
    return {
        "rng": capture_rng_state(),
        "rnn_state": [t.detach().cpu() for t in run.rnn_state] if run.rnn_state is not None else None,
    }


def run_checkpoint(run: TrainingRun, per_rank: list[dict[str, Any]]) -> Checkpoint:
    """The checkpoint of ``run`` now; ``per_rank`` is every rank's ``rank_state``, in rank order."""
    # run.model is the bare module (never the DDP wrapper): names carry no "module." prefix.
    model_state = {name: tensor.detach().cpu() for name, tensor in run.model.state_dict().items()}
    rnn_states = [part["rnn_state"] for part in per_rank]
    rnn_state = interleave_states(rnn_states) if all(s is not None for s in rnn_states) else None
    training = TrainingState(
        step=run.step,
        seconds=run.seconds,
        tokens_seen=run.tokens_seen,
        optimizer=run.optimizer.state_dict(),
        scheduler=run.schedule.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler is not None else None,
        rng=per_rank[0]["rng"],
        rng_by_rank=[part["rng"] for part in per_rank] if run.cluster.distributed else None,
        world_size=run.cluster.world_size,
        data_position=run.cursor.position.to_dict(),
        rnn_state=rnn_state,
        config=run.config.to_dict(),
        best_val_loss=run.best_val_loss,
        best_step=run.best_step,
        evals_without_improvement=run.evals_without_improvement,
        last_eval_step=run.last_eval_step,
        tokenizer_kind=run.data.kind,
        extra={
            "plan": {
                **run.plan.state_dict(),
                "train_curve": torch.tensor(run.train_curve, dtype=torch.float64).reshape(-1, 2),
            },
            # what best_val_loss covers and the subset loss later evaluations compare with (train.loop)
            "evaluation": {"best_subset_loss": run.best_subset_loss, "best_val_tokens": run.best_val_tokens,
                           "last_eval_full": run.last_eval_full},
        },
    )
    return Checkpoint(
        arch=run.config.arch,
        model_config=run.model_config,
        tokenizer=run.data.tokenizer.to_str(),
        special_tokens=dict(run.data.special),
        weights=model_state,
        generation=dict(run.generation),
        training=training,
        metrics=dict(run.last_metrics) if run.last_metrics else None,
        tokenizer_options=tokenizer_options(run.config, run.data),
    )


def tokenizer_options(config: TrainConfig, data: PreparedData) -> dict[str, Any]:
    """How the vocabulary was made (stored in the model file as textgen.tokenizer_options)."""
    if config.init_from is not None or config.tokenizer not in ("char", "word", "bpe"):
        return {"kind": data.kind, "source": "file" if config.init_from is None else "pretrained"}
    return {"kind": config.tokenizer, "vocab_size": config.vocab_size, "min_frequency": config.min_frequency,
            "lowercase": config.lowercase}


# ------------------------------------------------------------------------------------------------ restoring


def restore_run(run: TrainingRun, checkpoint: Checkpoint) -> None:
    """Put the checkpoint's training state back into ``run`` (built from the same checkpoint)."""
    state = checkpoint.training
    if state is None:
        raise CheckpointError("the checkpoint has no training state to resume from (use load_resume_checkpoint)")
    try:
        run.optimizer.load_state_dict(state.optimizer)
        run.schedule.load_state_dict(state.scheduler)
        run.cursor.position = DataPosition.from_dict(state.data_position)
        if run.scaler is not None and state.scaler:
            run.scaler.load_state_dict(state.scaler)
        run.step = int(state.step)
        run.seconds = float(state.seconds)
        run.tokens_seen = int(state.tokens_seen)
        run.best_val_loss = _optional_float(state.best_val_loss)
        run.best_step = state.best_step
        run.evals_without_improvement = int(state.evals_without_improvement)
        run.last_eval_step = state.last_eval_step
        run.rnn_state = _restored_rnn_state(run, state.rnn_state)
        _restore_plan(run, state.extra.get("plan"))
        _restore_evaluation(run, state.extra.get("evaluation"))
        restore_rng_state(_restored_rng_state(run, state))  # last: building the model and data drew numbers
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"the checkpoint's training state cannot be restored: {first_line(exc)}") from exc


def _restored_rnn_state(run: TrainingRun, saved: list[torch.Tensor] | None) -> State | None:
    """This process's streams of the saved (global) RNN state. A state saved by a run with a different
    number of processes does not fit the stream layout: start from zeros (the data order differs anyway)."""
    if not saved:
        return None
    expected_rows = run.config.batch_size * run.cluster.world_size
    if saved[0].shape[1] != expected_rows:
        run.reporter.say(f"note: the checkpoint's RNN state is for {saved[0].shape[1]} streams, this run has "
                         f"{expected_rows}; continuing from a zero state")
        return None
    local = rank_slice_of_state(list(saved), run.cluster.rank, run.cluster.world_size)
    return tuple(t.to(run.device) for t in local)


def _restored_rng_state(run: TrainingRun, state: TrainingState) -> dict[str, Any]:
    by_rank = state.rng_by_rank
    if isinstance(by_rank, list) and len(by_rank) == run.cluster.world_size:
        return by_rank[run.cluster.rank]
    if run.cluster.rank > 0:  # no state saved for this rank: a fresh, still rank-specific stream
        seed_everything(run.config.seed + run.cluster.rank + 7919 * int(state.step))
        return capture_rng_state()
    return state.rng


def _restore_plan(run: TrainingRun, plan: dict[str, Any] | None) -> None:
    if not isinstance(plan, dict):
        return
    run.plan.load_state_dict(plan)
    curve = plan.get("train_curve")
    if isinstance(curve, torch.Tensor) and curve.ndim == 2:
        run.train_curve = [(int(step), float(loss)) for step, loss in curve.tolist()]


def _restore_evaluation(run: TrainingRun, saved: dict[str, Any] | None) -> None:
    """The best evaluation's subset loss and coverage. A checkpoint from before interim evaluations scored every
    prediction at each evaluation: its best loss is a full pass, the nearest thing to a subset loss it has."""
    saved = saved if isinstance(saved, dict) else {}
    best_subset = saved.get("best_subset_loss", run.best_val_loss)
    run.best_subset_loss = _optional_float(best_subset)
    tokens = saved.get("best_val_tokens")
    run.best_val_tokens = int(tokens) if isinstance(tokens, int) else None
    run.last_eval_full = bool(saved.get("last_eval_full", run.last_eval_step is not None))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
