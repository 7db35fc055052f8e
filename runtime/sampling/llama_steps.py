"""llama.cpp's samplers (src/llama-sampling.cpp), under its names and semantics: logit bias, banned strings, DRY,
top-n-sigma, XTC and mirostat (dynamic temperature, a form of the temperature step, is in ``steps.py``). numpy only.

Each is a ``Step`` (the interface, its fast forms and the classic HF-style steps are in ``steps.py``); ``registry.py``
names them for an ``order``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

from runtime.sampling.candidates import (
    FLOAT64_MAX,
    Candidates,
    Scratch,
    probabilities,
    tail,
)
from runtime.sampling.settings import SamplerSettings
from runtime.sampling.steps import Ban, Filter, Step


def _json_list(text: str) -> list[str]:
    return [str(item) for item in json.loads(text)]


def parse_bias_key(key: str, vocabulary: Sequence[str] | None, vocab_size: int) -> int:
    """A logit-bias key: ``#id`` or a token's exact text. Raises ValueError with a one-line reason."""
    if key.startswith("#") and key[1:].isdigit():
        token = int(key[1:])
        if token >= vocab_size:
            raise ValueError(f"logit_bias: token #{token} is outside the vocabulary (size {vocab_size})")
        return token
    if vocabulary is None:
        raise ValueError(f"logit_bias: {key!r} needs the model's vocabulary; use #id")
    matches = [index for index, text in enumerate(vocabulary) if text == key]
    if not matches:
        raise ValueError(f"logit_bias: {key!r} is not one token of this model's vocabulary (use #id)")
    return matches[0]


class LogitBiasStep(Ban):
    """llama.cpp's logit_bias: add a fixed bias to chosen tokens' logits (-inf removes the token)."""

    needs_vocabulary = True

    def __init__(self, ids: np.ndarray, biases: np.ndarray):
        self.ids, self.biases = ids, biases

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int,
                      vocabulary: Sequence[str] | None = None) -> LogitBiasStep | None:
        entries = json.loads(settings.logit_bias)
        if not entries:
            return None
        ids = [parse_bias_key(key, vocabulary, vocab_size) for key in entries]
        biases = [float(value) for value in entries.values()]
        return cls(np.array(ids, dtype=np.int64), np.array(biases))

    def ban(self, logits: np.ndarray, history: Sequence[int]) -> bool:
        with np.errstate(invalid="ignore"):  # +inf logit + -inf bias: removed (NaN -> -inf below)
            values = logits[self.ids] + self.biases
        values[np.isnan(values)] = -np.inf
        logits[self.ids] = np.minimum(values, FLOAT64_MAX)
        return bool((values == -np.inf).any())


class BanStringsStep(Ban):
    """Banned strings: remove every token that would complete one of the strings in the text, whatever
    tokenization leads there (the history's decoded tail plus the token's text would contain the string), so a
    multi-token string is never completed. Needs each id's text (``vocabulary``)."""

    needs_vocabulary = True

    def __init__(self, strings: list[str], vocabulary: Sequence[str]):
        self.strings = strings
        self.vocabulary = vocabulary
        self.longest = max(len(text) for text in strings)
        # For each string and each split k: ids whose text starts with string[k:] (k >= 1) or contains it (k = 0)
        self._completing: list[list[np.ndarray]] = []
        for text in strings:
            per_split = [np.array([i for i, t in enumerate(vocabulary) if text in t], dtype=np.int64)]
            for k in range(1, len(text)):
                rest = text[k:]
                per_split.append(np.array([i for i, t in enumerate(vocabulary) if t.startswith(rest)],
                                          dtype=np.int64))
            self._completing.append(per_split)

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int,
                      vocabulary: Sequence[str] | None = None) -> BanStringsStep | None:
        strings = [text for text in _json_list(settings.ban) if text]
        if not strings or vocabulary is None:
            return None
        return cls(strings, list(vocabulary)[:vocab_size])

    def _tail_text(self, history: Sequence[int]) -> str:
        pieces: list[str] = []
        size = 0
        for token in reversed(list(tail(history, self.longest))):
            if 0 <= token < len(self.vocabulary):
                pieces.append(self.vocabulary[token])
                size += len(pieces[-1])
            if size >= self.longest:
                break
        return "".join(reversed(pieces))

    def ban(self, logits: np.ndarray, history: Sequence[int]) -> bool:
        text = self._tail_text(history)
        removed = False
        for string, per_split in zip(self.strings, self._completing, strict=True):
            for k, ids in enumerate(per_split):
                if ids.size and (k == 0 or text.endswith(string[:k])):
                    logits[ids] = -np.inf
                    removed = True
        return removed


class DryStep(Ban):
    """DRY ("don't repeat yourself", llama.cpp / koboldcpp): when the history's end repeats an earlier stretch of
    ``n >= allowed_length`` tokens, the token that followed that stretch would extend the repeat, so its logit
    loses ``multiplier * base ** (n - allowed_length)`` (the longest such n per token). Matches never cross a
    sequence breaker (a token whose text contains one of ``dry_sequence_breakers``), and only the last
    ``last_n`` tokens are searched (-1: the whole history)."""

    needs_vocabulary = True

    def __init__(self, multiplier: float, base: float, allowed_length: int, last_n: int, breakers: frozenset[int]):
        self.multiplier, self.base, self.allowed_length, self.last_n = multiplier, base, allowed_length, last_n
        self.breakers = breakers
        # The exponent is capped where the penalty would overflow a float64 (llama.cpp caps it likewise).
        self.max_exponent = int(1000 / math.log2(base)) if base > 1 else 1 << 30

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int,
                      vocabulary: Sequence[str] | None = None) -> DryStep | None:
        s = settings
        if s.dry_multiplier == 0 or s.dry_penalty_last_n == 0:
            return None
        strings = [text for text in _json_list(s.dry_sequence_breakers) if text]
        breakers = frozenset(
            index for index, text in enumerate(vocabulary or ())
            if index < vocab_size and any(breaker in text for breaker in strings)
        )
        return cls(s.dry_multiplier, s.dry_base, s.dry_allowed_length, s.dry_penalty_last_n, breakers)

    def repeat_lengths(self, history: Sequence[int]) -> dict[int, int]:
        """token -> the longest n for which emitting it would extend a repeat of n tokens."""
        window = list(history if self.last_n < 0 else tail(history, self.last_n))
        limit = 0  # tokens at the end before the last breaker: a match never crosses one
        for token in reversed(window):
            if token in self.breakers:
                break
            limit += 1
        if limit < self.allowed_length or len(window) < 2:
            return {}
        reversed_window = window[::-1]
        z = _z_array(reversed_window)
        lengths: dict[int, int] = {}
        size = len(window)
        for j in range(1, size):  # earlier stretch ends at i = size - 1 - j; window[i + 1] follows it
            n = min(z[j], limit)
            if n >= self.allowed_length:
                token = window[size - j]
                if n > lengths.get(token, 0):
                    lengths[token] = n
        return lengths

    def ban(self, logits: np.ndarray, history: Sequence[int]) -> bool:
        lengths = self.repeat_lengths(history)
        if not lengths:
            return False
        ids = np.fromiter(lengths, dtype=np.int64, count=len(lengths))
        keep = (ids >= 0) & (ids < logits.size)
        ids = ids[keep]
        exponents = np.minimum(np.fromiter(lengths.values(), dtype=np.float64, count=len(lengths))[keep]
                               - self.allowed_length, self.max_exponent)
        logits[ids] -= self.multiplier * np.power(self.base, exponents)
        return False  # finite penalties never remove a token


def _z_array(sequence: list[int]) -> list[int]:
    """Z-algorithm: z[j] = length of the longest common prefix of sequence and sequence[j:] (z[0] = len)."""
    size = len(sequence)
    z = [0] * size
    if size:
        z[0] = size
    left = right = 0
    for j in range(1, size):
        if j < right:
            z[j] = min(right - j, z[j - left])
        while j + z[j] < size and sequence[z[j]] == sequence[j + z[j]]:
            z[j] += 1
        if j + z[j] > right:
            left, right = j, j + z[j]
    return z


class TopNSigmaStep(Filter):
    """top-n-sigma (llama.cpp): keep the tokens whose logit is >= max logit - n * the logits' standard
    deviation (over the candidates still in play)."""

    def __init__(self, n: float):
        self.n = n

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> TopNSigmaStep | None:
        return cls(settings.top_n_sigma) if settings.top_n_sigma > 0 else None

    def mask(self, values: np.ndarray, scratch: Scratch) -> np.ndarray | None:
        present = values[values > -np.inf]
        if present.size <= 1:
            return None
        peak = present.max()
        with np.errstate(over="ignore", invalid="ignore"):
            spread = float((present - peak).std())
        if not math.isfinite(spread):
            return values >= peak
        return values >= peak - self.n * spread


class XtcStep(Step):
    """XTC, exclude top choices (llama.cpp): with probability ``xtc_probability`` (the step's own uniform),
    when two or more tokens have p >= ``xtc_threshold``, remove all of them but the least likely one."""

    sampling_only = True
    random = True

    def __init__(self, probability: float, threshold: float):
        self.probability, self.threshold = probability, threshold

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> XtcStep | None:
        s = settings
        return cls(s.xtc_probability, s.xtc_threshold) if s.xtc_probability > 0 and s.xtc_threshold <= 0.5 else None

    def apply(self, candidates: Candidates) -> None:
        if candidates.uniform is None or candidates.uniform >= self.probability:
            return  # process / probabilities, or the coin said no: the distribution is left as it is
        ids, values = candidates.view()
        probs = probabilities(values, candidates.scratch)[0]
        above = np.flatnonzero((probs >= self.threshold) & (probs > 0))
        if above.size < 2:
            return
        keep = np.ones(values.size, dtype=bool)
        least = above[np.argmin(probs[above])]
        keep[above] = False
        keep[least] = True
        candidates.keep(ids, values, keep)


class MirostatStep(Step):
    """Mirostat 1 and 2 (llama.cpp): truncate the distribution to aim at a target surprise ``tau`` (bits); the
    chain's draw then picks among what is left, and ``accept`` moves the row's ``mu`` by ``eta`` times the
    drawn token's surprise minus tau. mu starts at 2 * tau and goes back there on ``reset`` (a new prompt, an
    undo, a new session): it is kept through a turn, and each REPL turn (a chain of its own) starts again from
    2 * tau; with min_new_tokens > 0 the turn's chain that bans end-of-text keeps a mu of its own. Version 1
    estimates the Zipf exponent from the top ``m`` = 100 tokens and keeps the top k it implies; version 2 keeps
    the tokens whose surprise is at most mu."""

    sampling_only = True
    depth = 1
    m = 100

    def __init__(self, version: int, tau: float, eta: float, vocab_size: int):
        self.version, self.tau, self.eta, self.vocab_size = version, tau, eta, vocab_size
        self._mu: dict[int, float] = {}
        self._kept: dict[int, dict[int, float]] = {}  # slot -> token -> surprise (bits) after truncation

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> MirostatStep | None:
        s = settings
        return cls(s.mirostat, s.mirostat_tau, s.mirostat_eta, vocab_size) if s.mirostat else None

    def mu(self, slot: int) -> float:
        return self._mu.get(slot, 2 * self.tau)

    def apply(self, candidates: Candidates) -> None:
        ids, values = candidates.view()
        probs = probabilities(values, candidates.scratch)[0].copy()
        mu = self.mu(candidates.slot)
        if self.version == 1:
            kept = self._top_k(probs, mu)
        else:  # surprise -log2 p <= mu  <=>  p >= 2^-mu; the most likely token always stays
            with np.errstate(over="ignore"):
                kept = np.flatnonzero(probs >= np.exp2(np.float64(-mu)))
            if kept.size == 0:
                kept = np.array([int(probs.argmax())])
        keep = np.zeros(values.size, dtype=bool)
        keep[kept] = True
        candidates.keep(ids, values, keep)
        renormalized = probs[kept] / probs[kept].sum()
        tokens = kept if ids is None else ids[kept]
        self._kept[candidates.slot] = dict(zip(tokens.tolist(), (-np.log2(renormalized)).tolist(), strict=True))

    def _top_k(self, probs: np.ndarray, mu: float) -> np.ndarray:
        """Mirostat 1: the positions of the top k probabilities, k from the estimated Zipf exponent s_hat of the
        top m (partitions rather than sorting a 50k row)."""
        positive = int(np.count_nonzero(probs))
        m = min(self.m, positive)
        head = np.argpartition(-probs, m - 1)[:m] if m < probs.size else np.arange(probs.size)
        head = head[np.argsort(-probs[head], kind="stable")][:m]
        k = self._k(probs[head], mu, positive) if m >= 2 else 1
        if k <= m:
            return head[:k]
        return np.argpartition(-probs, k - 1)[:k] if k < probs.size else np.arange(probs.size)

    def _k(self, sorted_probs: np.ndarray, mu: float, positive: int) -> int:
        m = sorted_probs.size
        ranks = np.arange(m - 1)
        t = np.log((ranks + 2) / (ranks + 1))
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            b = np.log(sorted_probs[: m - 1] / sorted_probs[1:m])
        s_hat = float((t * b).sum() / (t * t).sum())
        epsilon = s_hat - 1
        if not math.isfinite(s_hat) or s_hat <= 0 or abs(epsilon) < 1e-12:
            return 1
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            # numpy scalars, so that overflow is inf under errstate rather than a Python OverflowError
            k = float(((epsilon * np.exp2(np.float64(mu))) / (1 - np.float64(self.vocab_size) ** -epsilon))
                      ** (1 / s_hat))
        if not math.isfinite(k):
            return positive if k > 0 else 1
        return int(min(max(k, 1), positive))

    def accept(self, slot: int, token: int) -> None:
        surprise = self._kept.pop(slot, {}).get(token)
        if surprise is not None:  # a token the step saw offered (not, e.g., one a user typed in)
            self._mu[slot] = self.mu(slot) - self.eta * (surprise - self.tau)

    def reset(self, slot: int | None = None, tokens: Sequence[int] | None = None) -> None:
        if slot is None:
            self._mu.clear()
            self._kept.clear()
        else:
            self._mu.pop(slot, None)
            self._kept.pop(slot, None)
