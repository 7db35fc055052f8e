"""Sampling continuations of ``--prime`` texts during training, to see what the model has learned so far.

Uses its own torch.Generator, so printing samples never disturbs the training random stream (exact resume
depends on that).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import nn

from models.rnn import RNNLanguageModel

TEMPERATURE = 0.8


@torch.no_grad()
def sample_continuation(
    model: nn.Module, tokenizer: Tokenizer, prime: str, eos_id: int, max_new_tokens: int, seed: int,
    device: torch.device,
) -> str:
    """``prime`` + up to ``max_new_tokens`` sampled tokens (temperature 0.8), stopping at end-of-text."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = tokenizer.encode(prime, add_special_tokens=False).ids or [eos_id]
    sampleable = tokenizer.get_vocab_size(with_added_tokens=True)  # ids beyond the tokenizer are padding
    step = _rnn_stepper(model) if isinstance(model, RNNLanguageModel) else _gpt_stepper(model)
    logits = step(torch.tensor([prompt], device=device))
    generated: list[int] = []
    for _ in range(max_new_tokens):
        probabilities = torch.softmax(logits[0, -1, :sampleable].float() / TEMPERATURE, dim=-1)
        token = int(torch.multinomial(probabilities, 1, generator=generator))
        if token == eos_id:
            break
        generated.append(token)
        logits = step(torch.tensor([[token]], device=device))
    model.train(was_training)
    # Decoded after the prompt, so a token brings the space it stands for (a word tokenizer's decoder drops the
    # marker of a text's first word; see train/tokenizer.py).
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    return prime + tokenizer.decode(prompt + generated, skip_special_tokens=True)[len(head):]


def _rnn_stepper(model: RNNLanguageModel):
    state = None

    def step(ids: torch.Tensor) -> torch.Tensor:
        nonlocal state
        logits, state = model(ids, state)
        return logits

    return step


def _gpt_stepper(model: nn.Module):
    """Feeds tokens with a KV cache; when the context is full, re-feeds the most recent half from scratch."""
    context = model.config.context_length
    history: list[int] = []
    past = None

    def step(ids: torch.Tensor) -> torch.Tensor:
        nonlocal past
        history.extend(ids[0].tolist())
        cached = past[0][0].shape[2] if past else 0
        if cached + ids.shape[1] > context:
            ids = torch.tensor([history[-max(1, context // 2):]], device=ids.device)
            past = None
        logits, past = model(ids, past)
        return logits

    return step
