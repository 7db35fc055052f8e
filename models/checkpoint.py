"""The textgen training checkpoint: one file, plain tensors and primitives only, loaded and saved here only.

In memory a checkpoint is a ``Checkpoint`` (with a ``TrainingState`` when a trainer wrote it); on disk it is a
dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``, so loading a file never runs code
from it (a pickle payload is refused by the restricted unpickler). On-disk layout (version 1), unchanged since
checkpoints were plain dicts:

    format          "textgen-checkpoint"
    version         1
    arch            "lstm" | "gru" | "gpt2"
    model_config    dict of the architecture's hyper-parameters (models.registry turns it into a model)
    tokenizer       tokenizers JSON string (Tokenizer.to_str())
    special_tokens  {"eos": int, "unk": int | None, "bos": int | None}
    model           state_dict of the nn.Module                                  (Checkpoint.weights)
    generation      default sampler settings (GenerationConfig names)
    train           optional: {"step", "optimizer", "scheduler", "rng", "data_position", "config",
                     "best_val_loss", ...} — everything needed to resume exactly  (Checkpoint.training)
    metrics         optional: last evaluation {"step", "val_loss", ...}

Keys this version does not know (top level or in ``train``) are kept in ``extra`` and written back as they were.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from runtime.atomic import atomic_write_bytes, write_with_fallback
from runtime.errors import first_line
from runtime.filekind import sniff_file_kind

CHECKPOINT_FORMAT = "textgen-checkpoint"
CHECKPOINT_VERSION = 1
ARCHES = ("lstm", "gru", "gpt2")
# What a training state must hold to be resumed (older trainers wrote at least these).
RESUME_FIELDS = ("step", "optimizer", "scheduler", "rng", "data_position", "config")


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message is one line meant for the user."""


@dataclass
class TrainingState:
    """The ``train`` section: everything textgen-train needs to continue a run exactly (train/checkpointing.py
    writes and restores it). Every field may be missing from a file (None); ``missing()`` says which of
    RESUME_FIELDS are."""

    step: int | None = None
    optimizer: dict[str, Any] | None = None  # torch optimizer state_dict
    scheduler: dict[str, Any] | None = None  # train.schedule.LRSchedule state
    rng: dict[str, Any] | None = None  # train.rng.capture_rng_state() of rank 0
    data_position: dict[str, int] | None = None  # train.batches.DataPosition.to_dict()
    config: dict[str, Any] | None = None  # train.config.TrainConfig.to_dict()
    seconds: float = 0.0
    tokens_seen: int = 0
    scaler: dict[str, Any] | None = None  # AMP GradScaler state (CUDA fp16)
    rng_by_rank: list[dict[str, Any]] | None = None  # distributed runs: every rank's RNG state
    world_size: int = 1
    rnn_state: list[torch.Tensor] | None = None  # the RNN state carried between windows, all ranks' streams
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_eval_step: int | None = None
    tokenizer_kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    def missing(self) -> list[str]:
        return [name for name in RESUME_FIELDS if getattr(self, name) is None]

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingState:
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {key: value for key, value in data.items() if key in known}
        extra = {key: value for key, value in data.items() if key not in known}
        return cls(**values, extra=extra)


@dataclass
class Checkpoint:
    """A textgen checkpoint in memory. ``save_checkpoint`` / ``load_checkpoint`` move it to and from a file;
    ``models.registry.model_from_checkpoint`` builds its model."""

    arch: str
    model_config: dict[str, Any]
    tokenizer: str  # tokenizers JSON
    special_tokens: dict[str, int | None]
    weights: dict[str, torch.Tensor]  # the model's state_dict
    generation: dict[str, Any] = field(default_factory=dict)
    training: TrainingState | None = None
    metrics: dict[str, Any] | None = None
    tokenizer_options: dict[str, Any] | None = None  # how the vocabulary was made (min_frequency, ...)
    version: int = CHECKPOINT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys this version does not know

    def to_dict(self) -> dict[str, Any]:
        """The on-disk layout (module docstring)."""
        data: dict[str, Any] = {
            **self.extra,
            "format": CHECKPOINT_FORMAT,
            "version": self.version,
            "arch": self.arch,
            "model_config": self.model_config,
            "tokenizer": self.tokenizer,
            "special_tokens": self.special_tokens,
            "model": self.weights,
            "generation": self.generation,
            "metrics": self.metrics,
        }
        if self.tokenizer_options is not None:
            data["tokenizer_options"] = self.tokenizer_options
        if self.training is not None:
            data["train"] = self.training.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "checkpoint",
                  expect_arch: tuple[str, ...] | None = None) -> Checkpoint:
        """Validate the on-disk layout (a checkpoint dict, old or new) and type it. Raises CheckpointError."""
        version = data.get("version", CHECKPOINT_VERSION)
        if not isinstance(version, int) or version > CHECKPOINT_VERSION or version < 1:
            raise CheckpointError(f"{where} has checkpoint format version {version!r}; this textgen reads versions "
                                  f"1..{CHECKPOINT_VERSION}")
        arch = data.get("arch")
        if arch not in ARCHES:
            raise CheckpointError(f"{where} has unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
        if expect_arch is not None and arch not in expect_arch:
            raise CheckpointError(f"{where} holds a {arch} model, expected {' or '.join(expect_arch)}")
        for key, kind in (("model_config", dict), ("tokenizer", str), ("special_tokens", dict), ("model", dict)):
            if not isinstance(data.get(key), kind):
                raise CheckpointError(f"{where} is damaged: field {key!r} is missing or of the wrong type")
        train, generation, metrics = data.get("train"), data.get("generation"), data.get("metrics")
        known = {"format", "version", "arch", "model_config", "tokenizer", "special_tokens", "model", "generation",
                 "train", "metrics", "tokenizer_options"}
        options = data.get("tokenizer_options")
        return cls(
            arch=arch,
            model_config=dict(data["model_config"]),
            tokenizer=data["tokenizer"],
            special_tokens=dict(data["special_tokens"]),
            weights=dict(data["model"]),
            generation=dict(generation) if isinstance(generation, dict) else {},
            training=TrainingState.from_dict(train) if isinstance(train, dict) else None,
            metrics=dict(metrics) if isinstance(metrics, dict) else None,
            tokenizer_options=dict(options) if isinstance(options, dict) else None,
            version=version,
            extra={key: value for key, value in data.items() if key not in known},
        )


def _on_disk(checkpoint: Checkpoint | Mapping[str, Any]) -> dict[str, Any]:
    """The on-disk dict of ``checkpoint``. A mapping in the on-disk layout (how checkpoints were built before they
    were typed) is validated as ``Checkpoint.from_dict`` would and written the same way."""
    if not isinstance(checkpoint, Checkpoint):
        try:
            checkpoint = Checkpoint.from_dict({"format": CHECKPOINT_FORMAT, **checkpoint}, where="the payload")
        except CheckpointError as exc:
            raise ValueError(str(exc)) from exc
    return checkpoint.to_dict()


def save_checkpoint(checkpoint: Checkpoint | Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``checkpoint`` atomically."""
    data = _on_disk(checkpoint)
    atomic_write_bytes(path, lambda handle: torch.save(data, handle))


def save_checkpoint_or_fallback(
    checkpoint: Checkpoint | Mapping[str, Any], path: str | os.PathLike[str]
) -> tuple[Path, OSError | None]:
    """``save_checkpoint``, but a failed write (disk full, folder gone) goes to a fallback path beside it or in the
    working directory (runtime.atomic.write_with_fallback) instead of losing the run: (where it went, the failure)."""
    data = _on_disk(checkpoint)
    return write_with_fallback(path, lambda handle: torch.save(data, handle))


def load_checkpoint(path: str | os.PathLike[str], expect_arch: tuple[str, ...] | None = None) -> Checkpoint:
    """Load and validate a textgen checkpoint. Raises CheckpointError with a one-line reason."""
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"checkpoint not found: {file}")
    if file.is_dir():
        raise CheckpointError(f"{file} is a directory, not a checkpoint file")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{file} is empty")
    data = _restricted_load(file)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file} is not a textgen checkpoint (no '{CHECKPOINT_FORMAT}' header)")
    if "version" not in data:
        raise CheckpointError(f"{file} has checkpoint format version None; this textgen reads versions "
                              f"1..{CHECKPOINT_VERSION}")
    return Checkpoint.from_dict(data, where=str(file), expect_arch=expect_arch)


def _restricted_load(file: Path) -> Any:
    kind = sniff_file_kind(file)
    if kind == "onnx":
        raise CheckpointError(f"{file} is an ONNX model, not a checkpoint — open it with textgen-repl --model {file}")
    if kind == "other":
        raise CheckpointError(f"{file} is not a PyTorch checkpoint (textgen-train writes a PyTorch zip file)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise beside our own one line
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only=True refuses any global it does not know: this is where pickle payloads end up.
        # torch's own message suggests weights_only=False, which would run the file's code: never repeat it.
        raise CheckpointError(f"{file} was refused: it holds Python objects that are not plain tensors (a pickle "
                              "that could run code when loaded); textgen checkpoints hold only tensors") from exc
    except Exception as exc:  # arbitrary bytes can make the zip/pickle readers raise almost anything
        detail = first_line(str(exc))
        reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        if kind == "torch-zip":
            raise CheckpointError(f"{file} is not a readable checkpoint: truncated or damaged (its zip archive "
                                  f"cannot be read; {reason})") from exc
        raise CheckpointError(f"{file} is not a readable checkpoint (truncated or not ours; {reason})") from exc
