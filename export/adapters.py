"""Thin nn.Module wrappers that give each architecture the flat tensor-in/tensor-out signature of the ONNX graph.

The exporter traces these, so their argument order *is* the graph's input order and their return order the
output order. The names, dynamic axes and `textgen.state` entries that docs/model-file.md prescribes live here
next to the wrappers, so one place decides how PyTorch state maps to ONNX tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from runtime.modelfile import StateSpec

BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past_seq", "total_seq"

# Example sizes for tracing: distinct and >= 2 so the exporter cannot mistake one axis for another or treat
# a size-1 axis as a constant.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4


@dataclass
class GraphSignature:
    """Names and dynamic axes of one architecture's graph, plus its state pairs for the metadata."""

    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    state: tuple[StateSpec, ...]
    optional_inputs: tuple[str, ...] = ()
    example_args: tuple[torch.Tensor, ...] = field(default_factory=tuple)


class RNNExportAdapter(nn.Module):
    """``forward(input_ids, *state) -> (logits, *new_state)`` for models.rnn.RNNLanguageModel."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, new_state = self.model(input_ids, tuple(state))
        return (logits, *new_state)


class GPT2ExportAdapter(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, *past_flat) -> (logits, *present_flat)``.

    ``past_flat`` is ``k0, v0, k1, v1, ...``; models.gpt2.GPT2 wants a list of (key, value) pairs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_flat: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        past = [(past_flat[i], past_flat[i + 1]) for i in range(0, len(past_flat), 2)]
        logits, present = self.model(input_ids, past, position_ids=position_ids, attention_mask=attention_mask)
        flat: list[torch.Tensor] = []
        for key, value in present:
            flat.extend((key, value))
        return (logits, *flat)


def rnn_signature(cell: str, num_layers: int, hidden_size: int, vocab_size: int) -> GraphSignature:
    suffixes = ("h", "c") if cell == "lstm" else ("h",)
    state = tuple(
        StateSpec(input=f"state.{s}", output=f"state_out.{s}", shape=(num_layers, "batch", hidden_size), batch_axis=1)
        for s in suffixes
    )
    generator = torch.Generator().manual_seed(0)
    example_ids = torch.randint(0, vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=generator)
    example_state = tuple(torch.zeros(num_layers, EXAMPLE_BATCH, hidden_size) for _ in suffixes)
    axes: dict[str, dict[int, str]] = {"input_ids": {0: BATCH, 1: SEQ}, "logits": {0: BATCH, 1: SEQ}}
    for spec in state:
        axes[spec.input] = {1: BATCH}
        axes[spec.output] = {1: BATCH}
    return GraphSignature(
        input_names=["input_ids", *(s.input for s in state)],
        output_names=["logits", *(s.output for s in state)],
        dynamic_axes=axes,
        state=state,
        example_args=(example_ids, *example_state),
    )


def gpt2_signature(n_layer: int, n_head: int, n_embd: int, vocab_size: int) -> GraphSignature:
    head_dim = n_embd // n_head
    state = tuple(
        StateSpec(
            input=f"past_key_values.{layer}.{part}",
            output=f"present.{layer}.{part}",
            shape=("batch", n_head, "past", head_dim),
            batch_axis=0,
            seq_axis=2,
        )
        for layer in range(n_layer)
        for part in ("key", "value")
    )
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: BATCH, 1: SEQ},
        "attention_mask": {0: BATCH, 1: TOTAL},
        "position_ids": {0: BATCH, 1: SEQ},
        "logits": {0: BATCH, 1: SEQ},
    }
    for spec in state:
        axes[spec.input] = {0: BATCH, 2: PAST}
        axes[spec.output] = {0: BATCH, 2: TOTAL}
    generator = torch.Generator().manual_seed(0)
    batch, seq, past = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    example_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = (past + torch.arange(seq, dtype=torch.int64)).expand(batch, seq).contiguous()
    example_past = tuple(torch.randn(batch, n_head, past, head_dim, generator=generator) for _ in state)
    return GraphSignature(
        input_names=["input_ids", "attention_mask", "position_ids", *(s.input for s in state)],
        output_names=["logits", *(s.output for s in state)],
        dynamic_axes=axes,
        state=state,
        optional_inputs=("attention_mask", "position_ids"),
        example_args=(example_ids, mask, positions, *example_past),
    )
