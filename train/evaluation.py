"""The validation loss's sums: runtime.scoring's protocols and padded-vocabulary rule in torch, so the training
loop's number matches runtime.scoring.score_ids on an exported model (train.loop's module docstring).

``ValidationSet`` holds one process's validation rows and the fixed subset that interim evaluations score
(``--eval-interim-tokens``): the same predictions every time, each scored exactly as the full pass scores it, so
interim losses compare with each other and with the subset part of the final, full pass.
- RNN ``stateful`` streams: the subset is the first columns of every stream (each stream's opening stretch, read
  from its zero state as in the full pass); the rest of the pass continues each stream from the state the subset
  left, so a full pass is the subset plus the rest with no token read twice.
- GPT-2 ``windows``: the subset is whole windows evenly spaced through the split (so it samples all of the text,
  not its beginning); the rest are the other windows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from models.rnn import State

RNN_EVAL_CHUNK = 256  # tokens per forward call when evaluating an RNN (state carried between chunks)
GPT_EVAL_LOGITS = 2**24  # logits elements per evaluation batch (bounds memory for big vocabularies)


def rnn_validation_total(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, real_ids: int) -> float:
    """Summed NLL of ``stateful`` streams [streams, T]: the state carried between chunks of RNN_EVAL_CHUNK."""
    return _rnn_total(model, inputs, targets, real_ids, None)[0]


def _rnn_total(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, real_ids: int,
               state: State | None) -> tuple[float, State | None]:
    """Summed NLL of streams read from ``state`` (None: zeros), and the state after their last token."""
    total = 0.0
    if inputs.shape[0] == 0:  # more processes than validation streams: nothing for this one
        return total, state
    for start in range(0, inputs.shape[1], RNN_EVAL_CHUNK):
        chunk = slice(start, start + RNN_EVAL_CHUNK)
        logits, state = model(inputs[:, chunk], state)
        total += summed_cross_entropy(logits, targets[:, chunk], real_ids)
    return total, state


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


class ValidationSet:
    """This process's validation rows, split into the fixed interim subset and the rest (module docstring).

    ``inputs``/``targets`` are ALL processes' rows ``[rows, T]``; ``local_rows`` picks this process's share
    (train.distributed.Cluster.local_rows). ``interim_tokens`` caps the subset's predictions (rounded down to
    whole stream columns or windows, at least one); None, or a cap at least the whole set, makes the subset the
    whole set: every evaluation is then a full pass, as before interim evaluations existed. ``count`` and
    ``subset_count`` are predictions over all processes' rows."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, stateful: bool, interim_tokens: int | None,
                 local_rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.stateful = stateful
        self.count = targets.numel()
        rows, length = targets.shape
        cap = self.count if interim_tokens is None else min(interim_tokens, self.count)
        if stateful:  # every stream, its first columns
            self.subset_columns = min(length, max(1, cap // rows))
            self.subset_count = rows * self.subset_columns
            in_subset = torch.ones(rows, dtype=torch.bool)
        else:  # whole windows, evenly spaced
            self.subset_columns = length
            picked = min(rows, max(1, cap // length))
            in_subset = torch.zeros(rows, dtype=torch.bool)
            in_subset[(torch.arange(picked) * rows) // picked] = True
            self.subset_count = picked * length
        local_in_subset = local_rows(in_subset).to(inputs.device)
        inputs, targets = local_rows(inputs), local_rows(targets)
        self._subset = inputs[local_in_subset], targets[local_in_subset]
        self._other_rows = inputs[~local_in_subset], targets[~local_in_subset]

    @property
    def has_subset(self) -> bool:
        """True when interim evaluations score fewer predictions than the full pass."""
        return self.subset_count < self.count

    def score_subset(self, model: nn.Module, real_ids: int) -> tuple[float, State | None]:
        """This process's summed NLL over its part of the subset, and (RNNs) the state its streams end in, from
        which ``score_rest`` continues them."""
        inputs, targets = self._subset
        if self.stateful:
            columns = slice(0, self.subset_columns)
            return _rnn_total(model, inputs[:, columns], targets[:, columns], real_ids, None)
        return gpt_validation_total(model, inputs, targets, real_ids), None

    def score_rest(self, model: nn.Module, real_ids: int, state: State | None) -> float:
        """This process's summed NLL over the predictions outside the subset (``state``: from score_subset)."""
        if self.stateful:
            inputs, targets = self._subset
            columns = slice(self.subset_columns, None)
            return _rnn_total(model, inputs[:, columns], targets[:, columns], real_ids, state)[0]
        return gpt_validation_total(model, *self._other_rows, real_ids)
