"""What resuming a run needs before the trainer starts: where OUT.last lives, a checkpoint that can be resumed, and
the saved config with the settings a resumed run may change."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from train.config import TrainConfig

# Settings a resumed run may change; everything else comes from the checkpoint so the run continues exactly.
RESUME_OVERRIDES = frozenset(
    {"out", "data", "max_steps", "time_budget", "epochs", "eval_every", "eval_tokens", "eval_interim_tokens",
     "patience", "device", "threads", "prime"}
)


def last_checkpoint_path(out: str | Path) -> Path:
    return Path(f"{out}.last")


def load_resume_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint that can be resumed: a textgen checkpoint with the training state this trainer writes."""
    checkpoint = load_checkpoint(path)
    if checkpoint.training is None or checkpoint.training.missing():
        raise CheckpointError(f"{path} has no training state to resume from (not written by textgen-train?)")
    if not isinstance(checkpoint.training.config, dict):
        raise CheckpointError(f"{path} is damaged: its training config is not a mapping")
    return checkpoint


def config_for_resume(checkpoint: Checkpoint, overrides: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The saved config with the allowed ``overrides`` applied, and the names of overrides that were ignored
    because changing them would break the resumed run (model shape, tokenizer, optimizer...)."""
    if checkpoint.training is None or not isinstance(checkpoint.training.config, dict):
        raise CheckpointError("the checkpoint has no training config to resume from (use load_resume_checkpoint)")
    try:
        config = TrainConfig.from_dict(checkpoint.training.config)
    except TypeError as exc:
        raise CheckpointError(f"the checkpoint's training config is unusable: {exc}") from exc
    allowed = {key: value for key, value in overrides.items() if key in RESUME_OVERRIDES}
    saved = config.to_dict()
    ignored = sorted(key for key, value in overrides.items() if key not in RESUME_OVERRIDES and saved.get(key) != value)
    return replace(config, **allowed), ignored
