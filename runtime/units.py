"""Loss units that compare across tokenizers.

A model's loss is measured in nats per token, but a token is a character, a word or punctuation mark, or a BPE
piece depending on the tokenizer, so nats/token compares only models that share one. Restated per word and per
character of the same text, losses of a char model, a word model and a BPE GPT-2 become comparable:

- nats/word = total nats / words, and perplexity per word = exp(nats/word);
- bits/char = total nats / ln 2 / characters.

Words are whitespace-separated words of the text (``str.split``; punctuation attached to a word is part of it)
and characters are Unicode code points. Each document separator (the end-of-text token between documents) is
predicted like any token, so it counts as one word and one character. Pure Python: used by training and by
``textgen-eval`` alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

MAX_EXP = 50.0  # perplexities are capped at exp(50) so a diverged run stays a finite number


@dataclass(frozen=True)
class TextSize:
    """How much text a number of predicted tokens stands for."""

    tokens: int
    words: int
    chars: int

    def __add__(self, other: TextSize) -> TextSize:
        return TextSize(self.tokens + other.tokens, self.words + other.words, self.chars + other.chars)


def text_size(documents: Iterable[str], tokens: int, separators: int) -> TextSize:
    """The words and characters of ``documents`` plus ``separators`` document separators, for ``tokens`` tokens."""
    words = chars = 0
    for document in documents:
        words += len(document.split())
        chars += len(document)
    return TextSize(tokens, words + separators, chars + separators)


def loss_units(nats_per_token: float, size: TextSize) -> dict[str, float]:
    """One mean loss (nats/token over ``size.tokens`` tokens) restated in every unit (the keys name the unit)."""
    total = nats_per_token * size.tokens
    per_word = total / size.words if size.words else math.nan
    return {
        "nats_per_token": nats_per_token,
        "bits_per_token": nats_per_token / math.log(2),
        "ppl_token": math.exp(min(nats_per_token, MAX_EXP)),
        "nats_per_word": per_word,
        "ppl_word": math.exp(min(per_word, MAX_EXP)) if size.words else math.nan,
        "bits_per_char": total / math.log(2) / size.chars if size.chars else math.nan,
    }
