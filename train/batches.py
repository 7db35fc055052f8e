"""Turning one long token array into training batches and evaluation inputs.

RNNs (``StreamBatcher``): truncated backpropagation through time over contiguous streams. The training tokens
are cut into ``batch_size`` equal, contiguous streams (row i of the batch always reads stream i); step k takes
the k-th ``seq_len`` window of every stream, so window k+1 of a stream starts exactly where window k ended and the
hidden state the model returns for window k is the right starting state for window k+1 (the loop carries it,
detached). An epoch is one pass over the streams; the state is reset to zeros at each epoch start.

GPT-2 (``BlockBatcher``): the documents, joined by ``<|endoftext|>``, form one token array that is packed into
``context_length``-token blocks. Each epoch draws, from a generator seeded with (seed, epoch), a random offset
for the block grid (so block boundaries move between epochs) and a random order of the blocks, then serves them
``batch_size`` at a time; the blocks left over when fewer than ``batch_size`` remain are skipped that epoch.
Because an epoch's plan depends only on (seed, epoch), a position is fully described by (epoch, index), which is
what checkpoints store to resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EVAL_STREAMS = 32  # parallel validation streams for RNNs (see rnn_eval_streams)
MIN_EVAL_STREAM = 256  # ... but never shorter than this many tokens each


class DataSizeError(Exception):
    """Too little data for the requested batch shape; the message is one line for the user."""


@dataclass
class DataPosition:
    """Where training stands in the data: the epoch and the index of the next batch within it."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> DataPosition:
        return cls(epoch=int(data["epoch"]), index=int(data["index"]))


class StreamBatcher:
    """``batch_size`` contiguous streams read ``seq_len`` tokens at a time (truncated BPTT)."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int) -> None:
        stream_len = (tokens.numel() - 1) // batch_size
        if stream_len < 1:
            raise DataSizeError(
                f"the training split has {tokens.numel()} tokens, too few for --batch-size {batch_size} "
                f"(each stream needs at least 2 tokens); use a smaller --batch-size or more text"
            )
        used = stream_len * batch_size
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.stream_len = stream_len
        self.inputs = tokens[:used].view(batch_size, stream_len)
        self.targets = tokens[1 : used + 1].view(batch_size, stream_len)  # each input's next token

    def batches_per_epoch(self, epoch: int) -> int:
        return math.ceil(self.stream_len / self.seq_len)

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window ``index`` of every stream: inputs and targets, ``[batch_size, <= seq_len]`` (the last window of
        an epoch may be shorter)."""
        start = index * self.seq_len
        return self.inputs[:, start : start + self.seq_len], self.targets[:, start : start + self.seq_len]


class BlockBatcher:
    """Random batches of ``context_length``-token blocks, a shuffled pass over all blocks per epoch."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, context_length: int, seed: int) -> None:
        if tokens.numel() < context_length + 1:
            raise DataSizeError(
                f"the training split has {tokens.numel()} tokens, fewer than --context-length {context_length} + 1; "
                f"use a smaller --context-length or more text"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.context_length = context_length
        self.seed = seed
        self._plan_epoch: int | None = None
        self._starts = torch.empty(0, dtype=torch.long)
        self._rows = 0

    def _plan(self, epoch: int) -> None:
        if self._plan_epoch == epoch:
            return
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        span = self.context_length
        max_offset = min(span - 1, self.tokens.numel() - 1 - span)
        offset = int(torch.randint(0, max_offset + 1, (1,), generator=generator))
        blocks = (self.tokens.numel() - 1 - offset) // span
        order = torch.randperm(blocks, generator=generator)
        self._starts = (offset + order * span).to(self.tokens.device)
        self._rows = min(self.batch_size, blocks)  # a corpus with fewer blocks than a batch: one smaller batch
        self._plan_epoch = epoch

    def batches_per_epoch(self, epoch: int) -> int:
        self._plan(epoch)
        return self._starts.numel() // self._rows

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._plan(epoch)
        starts = self._starts[index * self._rows : (index + 1) * self._rows]
        positions = starts.unsqueeze(1) + torch.arange(self.context_length, device=starts.device)
        return self.tokens[positions], self.tokens[positions + 1]


class DataCursor:
    """Walks a batcher epoch by epoch; its DataPosition is the only state needed to resume."""

    def __init__(self, batcher: StreamBatcher | BlockBatcher, position: DataPosition | None = None) -> None:
        self.batcher = batcher
        self.position = position or DataPosition()

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(inputs, targets, starts_epoch): starts_epoch is True for the first batch of an epoch."""
        if self.position.index >= self.batcher.batches_per_epoch(self.position.epoch):
            self.position = DataPosition(self.position.epoch + 1, 0)
        starts_epoch = self.position.index == 0
        inputs, targets = self.batcher.batch(self.position.epoch, self.position.index)
        self.position = DataPosition(self.position.epoch, self.position.index + 1)
        return inputs, targets, starts_epoch

    def epochs_done(self) -> float:
        """Fractional epochs completed, e.g. 2.5 halfway through the third epoch."""
        per_epoch = self.batcher.batches_per_epoch(self.position.epoch)
        return self.position.epoch + self.position.index / max(per_epoch, 1)


def rnn_eval_streams(tokens: torch.Tensor, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation inputs/targets for an RNN, ``[streams, length]``.

    Protocol (runtime.scoring's ``stateful`` with that many streams): the validation token stream (its first
    ``max_tokens`` + 1 tokens when capped) is cut into up to EVAL_STREAMS contiguous pieces of at least
    MIN_EVAL_STREAM tokens, each read from a zero state with the state carried across the whole piece, so every
    prediction sees all validation text before it within its piece.
    Running the pieces side by side makes CPU evaluation several times faster than one stream; the cost is a cold
    start per piece (up to 31 more than one stream would have): on tiny Shakespeare's 111,540 validation characters
    a 1x256 char LSTM scored 1.5567 nats/char this way and 1.5547 as one single stream (+0.002). Up to
    ``streams - 1`` tokens at the end are unused."""
    tokens = tokens[: max_tokens + 1] if max_tokens is not None else tokens
    predictions = tokens.numel() - 1
    if predictions < 1:
        raise DataSizeError("the validation split has fewer than 2 tokens; use a larger --val-fraction")
    streams = max(1, min(EVAL_STREAMS, predictions // MIN_EVAL_STREAM))
    length = predictions // streams
    used = streams * length
    return tokens[:used].view(streams, length), tokens[1 : used + 1].view(streams, length)


def gpt_eval_windows(
    tokens: torch.Tensor, context_length: int, max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation inputs/targets for GPT-2, ``[windows, length]``.

    Protocol (runtime.scoring's ``windows``): the validation token stream (its first ``max_tokens`` + 1 tokens
    when capped) is cut into non-overlapping windows of ``context_length`` tokens, each evaluated from an empty
    context: the j-th prediction of a window sees the j tokens before it in that window (0 .. context_length - 1,
    on average about half the context). A stream shorter than one window is one shorter window; the tail that
    does not fill a whole window is unused."""
    tokens = tokens[: max_tokens + 1] if max_tokens is not None else tokens
    predictions = tokens.numel() - 1
    if predictions < 1:
        raise DataSizeError("the validation split has fewer than 2 tokens; use a larger --val-fraction")
    length = min(context_length, predictions)
    windows = predictions // length
    used = windows * length
    return tokens[:used].view(windows, length), tokens[1 : used + 1].view(windows, length)
