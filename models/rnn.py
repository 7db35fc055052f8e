"""A recurrent language model (LSTM or GRU) whose state is an explicit input and output.

``forward(input_ids[B, T], state) -> (logits[B, T, V], new_state)``. The state is a tuple of tensors shaped
``[layers, B, hidden]``: ``(h, c)`` for an LSTM, ``(h,)`` for a GRU. Passing the returned state back in
continues the sequence exactly, which is what truncated-BPTT training and the ONNX decode loop both rely on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

State = tuple[torch.Tensor, ...]


@dataclass
class RNNConfig:
    vocab_size: int
    cell: str = "lstm"  # "lstm" or "gru"
    embedding_size: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', not {self.cell!r}")
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RNNConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class RNNLanguageModel(nn.Module):
    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        rnn_class = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = rnn_class(
            config.embedding_size,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.config.cell == "lstm" else ("h",)

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in self.state_names)

    def forward(self, input_ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.initial_state(input_ids.shape[0], input_ids.device)
        embedded = self.dropout(self.embedding(input_ids))
        rnn_state = state if self.config.cell == "lstm" else state[0]
        output, new_state = self.rnn(embedded, rnn_state)
        logits = self.head(self.dropout(output))
        new_state_tuple = tuple(new_state) if self.config.cell == "lstm" else (new_state,)
        return logits, new_state_tuple


def detach_state(state: State) -> State:
    """Cut the autograd graph between truncated-BPTT windows while keeping the values."""
    return tuple(s.detach() for s in state)
