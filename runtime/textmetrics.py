"""Pure metric functions for textgen-eval: word diversity, distinct-n, entropy (per-token log-loss: runtime.scoring).

No model, no I/O, numpy only, so each function can be checked against hand-computed values.

Conventions (they decide the numbers, so they are stated once here):

* A *word* is a maximal run of letters/digits/underscore, apostrophes inside a word kept ("don't"), compared
  case-folded. Punctuation and whitespace are not words, so "Hello," and "hello" are the same word.
* distinct-n is measured over ALL samples pooled (the corpus-level distinct-n of Li et al. 2016): number of
  different n-grams / number of n-grams, where n-grams never cross a sample boundary. Low: samples alike.
* unique-word rate is measured WITHIN each text (distinct words / words of that text), then averaged over the
  texts that have words. Low: a sample repeats itself (loops). So it complements pooled distinct-1.
* Entropy is in nats: H(p) = -sum p log p with 0 log 0 = 0.
* An undefined value (no words at all, no samples) is NaN, never a made-up 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WORD_PATTERN = re.compile(r"\w+(?:['’]\w+)*")
LN2 = math.log(2.0)


def words(text: str) -> list[str]:
    """The words of ``text``, case-folded, in order (see the module docstring for what counts as a word)."""
    return [match.group(0).casefold() for match in WORD_PATTERN.finditer(text)]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Consecutive n-grams of one sequence; empty when the sequence is shorter than n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams over the words of all ``texts`` pooled (NaN when there are none)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else math.nan


def unique_word_rate(texts: Sequence[str]) -> float:
    """Mean over texts (those with any words) of distinct words / words in that text; NaN if none has words."""
    rates = []
    for text in texts:
        found = words(text)
        if found:
            rates.append(len(set(found)) / len(found))
    return sum(rates) / len(rates) if rates else math.nan


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy in nats of each distribution along the last axis (0 log 0 = 0). Returns one value per row."""
    p = np.asarray(probabilities, dtype=np.float64)
    positive = p > 0
    terms = np.zeros_like(p)
    terms[positive] = p[positive] * np.log(p[positive])
    return -terms.sum(axis=-1)


def bits(nats: float) -> float:
    return nats / LN2


def safe_exp(nats: float) -> float:
    """exp(nats), inf instead of OverflowError for a model that is hopeless on the text."""
    try:
        return math.exp(nats)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class TextStats:
    """Diversity of a set of texts (see the module docstring for the definitions)."""

    n_texts: int
    total_words: int
    unique_word_rate: float
    distinct_1: float
    distinct_2: float
    distinct_3: float
    mean_words: float


def text_stats(texts: Sequence[str]) -> TextStats:
    word_counts = [len(words(text)) for text in texts]
    return TextStats(
        n_texts=len(texts),
        total_words=sum(word_counts),
        unique_word_rate=unique_word_rate(texts),
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        distinct_3=distinct_n(texts, 3),
        mean_words=sum(word_counts) / len(texts) if texts else math.nan,
    )


def chunk_evenly(ids: Sequence[int], n_chunks: int, chunk_length: int) -> list[list[int]]:
    """Up to ``n_chunks`` non-overlapping slices of ``chunk_length`` items, spread evenly from start to end.

    Fewer chunks come back when the sequence is too short for all of them (one chunk, the whole sequence, when
    it is shorter than ``chunk_length``); none for an empty sequence. Spreading (rather than taking the first
    chunks) makes a reference sample represent the whole held-out text."""
    if n_chunks < 1 or chunk_length < 1:
        raise ValueError("n_chunks and chunk_length must be >= 1")
    size = len(ids)
    if size == 0:
        return []
    if size <= chunk_length:
        return [list(ids)]
    count = min(n_chunks, size // chunk_length)
    if count == 1:
        return [list(ids[:chunk_length])]
    # Integer spacing (size - chunk_length) / (count - 1) >= chunk_length because count * chunk_length <= size.
    starts = [i * (size - chunk_length) // (count - 1) for i in range(count)]
    return [list(ids[start : start + chunk_length]) for start in starts]


class Novelty:
    """How much of generated text a corpus already holds (makemore prints whether a sample is in the training
    set): the share of samples found verbatim in it, and the share of the samples' word n-grams it contains.

    A sample is found verbatim when its text (surrounding whitespace stripped, each line stripped) appears in
    the corpus at line boundaries: it is one of the corpus's lines or documents, or a run of whole lines. So
    "emma" counts when the corpus has the line "emma", not because it has "emmanuel". Word n-grams use
    ``words`` (case-folded), over each corpus document."""

    def __init__(self, documents: Sequence[str], n: int = 4) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self._text = "\n" + "\n".join(_stripped_lines(document) for document in documents) + "\n"
        self._grams: set[int] = set()
        for document in documents:
            self._grams.update(hash(gram) for gram in ngrams(words(document), n))

    def found_verbatim(self, text: str) -> bool:
        body = _stripped_lines(text).strip("\n")
        return bool(body) and f"\n{body}\n" in self._text

    def measure(self, texts: Sequence[str]) -> tuple[float, float]:
        """(share of samples found verbatim, share of word n-grams copied); NaN when there is nothing to count."""
        counted = [text for text in texts if text.strip()]
        verbatim = sum(self.found_verbatim(text) for text in counted) / len(counted) if counted else math.nan
        total = copied = 0
        for text in texts:
            for gram in ngrams(words(text), self.n):
                total += 1
                copied += hash(gram) in self._grams
        return verbatim, copied / total if total else math.nan


def _stripped_lines(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines())
