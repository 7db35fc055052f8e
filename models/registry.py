"""Build a model from (arch, config dict) — the one place that maps checkpoint contents to nn.Modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.checkpoint import CheckpointError
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


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """The model of a loaded checkpoint (see models.checkpoint.load_checkpoint), weights restored, eval mode."""
    model = build_model(checkpoint["arch"], checkpoint["model_config"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint weights do not fit its {checkpoint['arch']} config: {first_line(exc)}"
        ) from exc
    return model.eval()
