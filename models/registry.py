"""Build a model from (arch, config dict) — the one place that maps checkpoint contents to nn.Modules.

The trainer (fresh, fine-tuned and resumed runs), the exporter and the Hugging Face importer all build their
models here."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.checkpoint import Checkpoint, CheckpointError
from runtime.errors import first_line


def build_model(arch: str, model_config: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of the given architecture."""
    try:
        if arch in ("lstm", "gru"):
            from models.rnn import RNNConfig, RNNLanguageModel

            return RNNLanguageModel(RNNConfig.from_dict({**model_config, "cell": arch}))
        if arch == "gpt2":
            from models.gpt2 import GPT2, GPT2Config

            return GPT2(GPT2Config.from_dict(model_config))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid {arch} model config: {exc}") from exc
    raise CheckpointError(f"unknown architecture {arch!r}")


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """The model of a loaded checkpoint (see models.checkpoint.load_checkpoint), weights restored, eval mode."""
    model = build_model(checkpoint.arch, checkpoint.model_config)
    load_weights(model, checkpoint.weights, checkpoint.arch)
    return model.eval()


def load_weights(model: nn.Module, weights: dict[str, Any], arch: str) -> None:
    """``model.load_state_dict(weights)``, with a one-line CheckpointError when they do not fit."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit its {arch} config: {first_line(exc)}") from exc
