"""The validation loss's sums: runtime.scoring's protocols and padded-vocabulary rule in torch, so the training
loop's number matches runtime.scoring.score_ids on an exported model (train.loop's module docstring)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

RNN_EVAL_CHUNK = 256  # tokens per forward call when evaluating an RNN (state carried between chunks)
GPT_EVAL_LOGITS = 2**24  # logits elements per evaluation batch (bounds memory for big vocabularies)


def rnn_validation_total(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, real_ids: int) -> float:
    """Summed NLL of ``stateful`` streams [streams, T]: the state carried between chunks of RNN_EVAL_CHUNK."""
    total, state = 0.0, None
    if inputs.shape[0] == 0:  # more processes than validation streams: nothing for this one
        return total
    for start in range(0, inputs.shape[1], RNN_EVAL_CHUNK):
        chunk = slice(start, start + RNN_EVAL_CHUNK)
        logits, state = model(inputs[:, chunk], state)
        total += summed_cross_entropy(logits, targets[:, chunk], real_ids)
    return total


def gpt_validation_total(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, real_ids: int) -> float:
    """Summed NLL of independent ``windows`` [windows, T], batched to at most GPT_EVAL_LOGITS logits."""
    windows, length = inputs.shape
    rows = max(1, GPT_EVAL_LOGITS // (length * model.config.vocab_size))
    total = 0.0
    for start in range(0, windows, rows):
        logits = model(inputs[start : start + rows])[0]
        total += summed_cross_entropy(logits, targets[start : start + rows], real_ids)
    return total


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, real_ids: int) -> float:
    """Summed NLL with the softmax over the first ``real_ids`` outputs (runtime.scoring's padded-vocabulary rule:
    ids beyond the tokenizer are never produced)."""
    if logits.shape[-1] > real_ids:
        logits = logits[..., :real_ids]
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, targets.reshape(-1), reduction="sum").item()
