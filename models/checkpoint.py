"""The textgen training checkpoint: one file, plain tensors and primitives only.

A checkpoint is a dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``, so loading a
file never runs code from it (a pickle payload is refused by the restricted unpickler). Layout (version 1):

    format          "textgen-checkpoint"
    version         1
    arch            "lstm" | "gru" | "gpt2"
    model_config    dict of the architecture's hyper-parameters
    tokenizer       tokenizers JSON string (Tokenizer.to_str())
    special_tokens  {"eos": int, "unk": int | None, "bos": int | None}
    model           state_dict of the nn.Module
    generation      default sampler settings (GenerationConfig names)
    train           optional: {"step", "optimizer", "scheduler", "rng", "data_position", "config",
                     "best_val_loss", ...} — everything needed to resume exactly
    metrics         optional: last evaluation {"step", "val_loss", ...}
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from models.atomic import atomic_write_bytes, write_with_fallback
from models.filekind import sniff_file_kind

CHECKPOINT_FORMAT = "textgen-checkpoint"
CHECKPOINT_VERSION = 1
ARCHES = ("lstm", "gru", "gpt2")


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message is one line meant for the user."""


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Validate the header fields and write the checkpoint atomically."""
    data = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    for key in ("arch", "model_config", "tokenizer", "special_tokens", "model"):
        if key not in data:
            raise ValueError(f"checkpoint payload lacks {key!r}")
    atomic_write_bytes(path, lambda handle: torch.save(data, handle))


def save_checkpoint_or_fallback(payload: dict[str, Any], path: str | os.PathLike[str]) -> tuple[Path, OSError | None]:
    """``save_checkpoint``, but a failed write (disk full, folder gone) goes to a fallback path beside it or in the
    working directory (models.atomic.write_with_fallback) instead of losing the run: (where it went, the failure)."""
    data = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    return write_with_fallback(path, lambda handle: torch.save(data, handle))


def load_checkpoint(path: str | os.PathLike[str], expect_arch: tuple[str, ...] | None = None) -> dict[str, Any]:
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
    version = data.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION or version < 1:
        raise CheckpointError(
            f"{file} has checkpoint format version {version!r}; this textgen reads versions 1..{CHECKPOINT_VERSION}"
        )
    arch = data.get("arch")
    if arch not in ARCHES:
        raise CheckpointError(f"{file} has unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
    if expect_arch is not None and arch not in expect_arch:
        raise CheckpointError(f"{file} holds a {arch} model, expected {' or '.join(expect_arch)}")
    for key, kind in (("model_config", dict), ("tokenizer", str), ("special_tokens", dict), ("model", dict)):
        if not isinstance(data.get(key), kind):
            raise CheckpointError(f"{file} is damaged: field {key!r} is missing or of the wrong type")
    return data


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
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        if kind == "torch-zip":
            raise CheckpointError(f"{file} is not a readable checkpoint: truncated or damaged (its zip archive "
                                  f"cannot be read; {reason})") from exc
        raise CheckpointError(f"{file} is not a readable checkpoint (truncated or not ours; {reason})") from exc
