"""Prove an exported graph computes what the PyTorch model computes, before the file is written.

Both sides get identical inputs (token ids from a seeded generator, never from their own outputs), and each side
feeds its *own* state/KV cache forward, so a bug in how state flows through the graph shows up as a growing
difference over the decode steps. The result is the largest absolute logit difference seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.adapters import GraphSignature

RNN_PROMPT_BATCH, RNN_PROMPT_LENGTH, DECODE_STEPS = 2, 7, 20
GPT2_SHAPES = ((1, 5, 0), (1, 1, 5), (2, 3, 4))  # (batch, seq, past): prefill, single step, batched with past


@dataclass
class Verification:
    max_abs_diff: float
    peak_abs_logit: float  # the scale of the logits compared, for judging the difference
    provider: str


def make_session(model_bytes: bytes) -> ort.InferenceSession:
    """A CPU session from serialized bytes, with onnxruntime's own logging kept away from the user."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])


class _Tracker:
    def __init__(self) -> None:
        self.max_abs_diff = 0.0
        self.peak = 0.0

    def compare(self, expected: torch.Tensor, actual: np.ndarray) -> None:
        reference = expected.detach().numpy()
        if reference.shape != actual.shape:
            raise VerificationError(f"ONNX logits have shape {actual.shape}, PyTorch {reference.shape}")
        if not (np.isfinite(reference).all() and np.isfinite(actual).all()):
            raise VerificationError("non-finite logits during verification")
        self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(reference - actual))))
        self.peak = max(self.peak, float(np.max(np.abs(reference))))


class VerificationError(Exception):
    """The ONNX graph does not reproduce the PyTorch model."""


def verify_rnn(model: nn.Module, model_bytes: bytes, signature: GraphSignature, vocab_size: int) -> Verification:
    """A batch-2, 7-token prompt, then 20 single-token steps with the state fed back on both sides."""
    session = make_session(model_bytes)
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab_size, (RNN_PROMPT_BATCH, RNN_PROMPT_LENGTH + DECODE_STEPS), generator=generator)
    chunks = [tokens[:, :RNN_PROMPT_LENGTH]] + [tokens[:, i : i + 1] for i in range(RNN_PROMPT_LENGTH, tokens.shape[1])]
    torch_state = tuple(torch.zeros(_initial_shape(spec.shape, RNN_PROMPT_BATCH)) for spec in signature.state)
    onnx_state = [state.numpy() for state in torch_state]
    tracker = _Tracker()
    with torch.inference_mode():
        for chunk in chunks:
            logits, torch_state = model(chunk, torch_state)
            feeds = {"input_ids": chunk.numpy()}
            feeds.update({spec.input: value for spec, value in zip(signature.state, onnx_state, strict=True)})
            outputs = session.run(signature.output_names, feeds)
            tracker.compare(logits, outputs[0])
            onnx_state = outputs[1:]
    return Verification(tracker.max_abs_diff, tracker.peak, session.get_providers()[0])


def verify_gpt2(
    model: nn.Module, model_bytes: bytes, signature: GraphSignature, vocab_size: int, context_length: int
) -> Verification:
    """A prompt then 20 cached single-token steps, plus fixed (batch, seq, past) shapes with a given cache."""
    session = make_session(model_bytes)
    tracker = _Tracker()
    generator = torch.Generator().manual_seed(1234)
    with torch.inference_mode():
        _gpt2_decode(model, session, signature, vocab_size, context_length, generator, tracker)
        for batch, seq, past in GPT2_SHAPES:
            if past + seq <= context_length:
                _gpt2_shape(model, session, signature, vocab_size, (batch, seq, past), generator, tracker)
    return Verification(tracker.max_abs_diff, tracker.peak, session.get_providers()[0])


def _gpt2_decode(
    model: nn.Module,
    session: ort.InferenceSession,
    signature: GraphSignature,
    vocab_size: int,
    context_length: int,
    generator: torch.Generator,
    tracker: _Tracker,
) -> None:
    prompt_length = min(RNN_PROMPT_LENGTH, context_length)
    steps = min(DECODE_STEPS, context_length - prompt_length)
    tokens = torch.randint(0, vocab_size, (1, prompt_length + steps), generator=generator)
    chunks = [tokens[:, :prompt_length]] + [tokens[:, i : i + 1] for i in range(prompt_length, tokens.shape[1])]
    torch_past = [torch.zeros(_initial_shape(spec.shape, 1)) for spec in signature.state]
    onnx_past = [tensor.numpy() for tensor in torch_past]
    done = 0
    for chunk in chunks:
        seq = chunk.shape[1]
        mask = torch.ones(1, done + seq, dtype=torch.int64)
        positions = done + torch.arange(seq, dtype=torch.int64).unsqueeze(0)
        logits, present = _torch_gpt2(model, chunk, mask, positions, torch_past)
        outputs = _onnx_gpt2(session, signature, chunk, mask, positions, onnx_past)
        tracker.compare(logits, outputs[0])
        torch_past, onnx_past, done = present, outputs[1:], done + seq


def _gpt2_shape(
    model: nn.Module,
    session: ort.InferenceSession,
    signature: GraphSignature,
    vocab_size: int,
    shape: tuple[int, int, int],
    generator: torch.Generator,
    tracker: _Tracker,
) -> None:
    batch, seq, past = shape
    tokens = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = (past + torch.arange(seq, dtype=torch.int64)).expand(batch, seq).contiguous()
    if batch > 1 and past >= 2:
        # Left-pad the last row by two cached positions, as a batched prompt of a shorter text would be.
        mask[-1, :2] = 0
        positions[-1] -= 2
    cache = [torch.randn(_initial_shape(spec.shape, batch, past), generator=generator) for spec in signature.state]
    logits, _ = _torch_gpt2(model, tokens, mask, positions, cache)
    outputs = _onnx_gpt2(session, signature, tokens, mask, positions, [tensor.numpy() for tensor in cache])
    tracker.compare(logits, outputs[0])


def _torch_gpt2(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
    logits, present = model(ids, pairs, position_ids=positions, attention_mask=mask)
    return logits, [tensor for pair in present for tensor in pair]


def _onnx_gpt2(
    session: ort.InferenceSession,
    signature: GraphSignature,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    past: list[np.ndarray],
) -> list[np.ndarray]:
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds.update({spec.input: value for spec, value in zip(signature.state, past, strict=True)})
    return session.run(signature.output_names, feeds)


def _initial_shape(shape: tuple[int | str, ...], batch: int, past: int = 0) -> tuple[int, ...]:
    return tuple(batch if d == "batch" else past if d == "past" else int(d) for d in shape)


def compare_model_files(reference: Any, candidate: Any) -> tuple[float, float]:
    """(largest logit difference, largest |reference logit|) between two opened GPT-2 model files (runtime.session
    OnnxModel) over a prefill (batch 1, 5 tokens), a decode step on that cache and a batch-2 prompt with left
    padding: the shapes the runtime feeds. How a rewritten file (optimised, fp16) is checked against its source."""
    rng = np.random.default_rng(0)
    vocab = reference.tokenizer_size
    prompt = rng.integers(0, vocab, size=(1, 5), dtype=np.int64)
    step = rng.integers(0, vocab, size=(1, 1), dtype=np.int64)
    padded = rng.integers(0, vocab, size=(2, 4), dtype=np.int64)
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=np.int64)
    outputs = []
    for model in (reference, candidate):
        first, state = model.run_all(prompt, model.initial_state(1), 0)
        second, _ = model.run_all(step, state, 5)
        third, _ = model.run_all(padded, model.initial_state(2), 0, attention_mask=mask)
        outputs.append((first, second, third[:, -1]))
    worst = max(float(np.max(np.abs(expected - actual))) for expected, actual in zip(*outputs, strict=True))
    peak = max(float(np.max(np.abs(expected))) for expected in outputs[0])
    return worst, peak
