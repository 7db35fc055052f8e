"""The sampler steps and their registry. numpy only.

Every step is one class with one interface, llama.cpp's (``llama_sampler_i``):

    from_settings(settings, vocab_size) -> Step | None   build from SamplerSettings; None where it would be a no-op
    apply(candidates)                                    edit one row's ``Candidates`` in place
    accept(slot, token)                                  batch row ``slot``'s history grew by ``token``
    reset(slot=None, tokens=None)                        forget row ``slot``'s state (all rows: None); with
                                                         ``tokens``, start it again from them

State lives in the step that needs it (the penalties' window per batch row; mirostat's mu), moves only
on ``accept`` and starts over on ``reset``. A stateful step sets ``depth``, the number of trailing history
tokens its state follows; the chain then turns the histories each call passes into those events (one token
appended since the last call: ``accept``; anything else, e.g. a new prompt, an undo, beam rows reordered:
``reset`` with the history's tail), so a step never compares histories itself. Class attributes tell the chain
the rest: ``sampling_only`` steps only reshape the sampling distribution, so greedy decoding skips them (HF:
warpers need do_sample); ``may_remove_all`` steps can remove every token, so the chain checks the row after them;
``random`` steps (XTC) read ``candidates.uniform``, which ``sample`` derives from the row's draw uniform by a
mixing hash (``draw.step_uniform``), so the chain still asks ``rng`` for one uniform per row and call. Steps that
match text (``needs_vocabulary``) get each id's text from the chain as ``from_settings(..., vocabulary=)``.

Optional fast-path forms, used by the compiled plan (``plan.py``) when a step has them and ignored otherwise:

    narrow_sorted(neg, ids)              on candidates sorted most likely first (negated logits): keep a subset,
                                         still sorted; small vocabularies sort once and never mask
    edit_row(row, history, slot, neg)    a whole dense float64 row (negated when ``neg``), returned
    mask(values, scratch)                which entries to keep (Filter); the plan may cut a wide row with it first

A new step is one class here and one line in ``REGISTRY``; it runs on the general path until it has a fast form
that the plan knows (see docs/architecture.md, "Sampler chain").
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from runtime.sampling.candidates import (
    FLOAT64_MAX,
    HUGE_LOGIT,
    Candidates,
    Scratch,
    kth_largest,
    probabilities,
    sorted_head,
    tail,
    token_counts,
)
from runtime.sampling.settings import SamplerSettings

_TRACK_VOCAB = 4096  # penalties keep their window as whole-row vectors up to this vocabulary size


class Step:
    """The interface every sampler step implements (see the module docstring)."""

    sampling_only: ClassVar[bool] = False
    may_remove_all: ClassVar[bool] = False
    depth: int | None = None  # trailing history tokens the step's state follows; None: no state
    random: ClassVar[bool] = False  # reads ``candidates.uniform``, a uniform number of its own per row and call
    # from_settings takes ``vocabulary`` too (each id's text, or None when the caller has no tokenizer)
    needs_vocabulary: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> Step | None:
        raise NotImplementedError

    def apply(self, candidates: Candidates) -> None:
        raise NotImplementedError

    def accept(self, slot: int, token: int) -> None:
        """Stateless steps ignore the history's new tokens."""

    def reset(self, slot: int | None = None, tokens: Sequence[int] | None = None) -> None:
        """Stateless steps have nothing to forget."""


class Filter(Step):
    """A step that keeps part of the candidates (at least one) given only their logits: ``mask`` is its rule."""

    sampling_only = True

    def mask(self, values: np.ndarray, scratch: Scratch) -> np.ndarray | None:
        """Which entries of a view (-inf entries may be present) to keep; None keeps them all."""
        raise NotImplementedError

    def apply(self, candidates: Candidates) -> None:
        ids, values = candidates.view()
        mask = self.mask(values, candidates.scratch)
        if mask is not None:
            candidates.keep(ids, values, mask)


class Ban(Step):
    """A step that reads the history and may remove every token; it works on the whole dense row."""

    may_remove_all = True

    def ban(self, logits: np.ndarray, history: Sequence[int]) -> bool:
        """Change the row ``logits`` in place; True when it may have removed every token."""
        raise NotImplementedError

    def apply(self, candidates: Candidates) -> None:
        if self.ban(candidates.logits, candidates.history):
            candidates.may_be_empty = True

    def edit_row(self, row: np.ndarray, history: Sequence[int], slot: int, negated: bool) -> np.ndarray:
        """``ban`` on a small-vocabulary plan's dense row (-logits when ``negated``), returned (the caller checks
        for an empty row itself)."""
        if not negated:
            self.ban(row, history)
            return row
        plain = np.negative(row, out=row)
        self.ban(plain, history)
        return np.negative(plain, out=row)


# ----------------------------------------------------------------------------------------------------------------
# Steps that read the history


class PenaltiesStep(Ban):
    """Repetition (HF/CTRL: logit > 0 -> /p, else *p), presence (-v once) and frequency (-count * v) penalties
    over the last ``last_n`` history tokens (-1: the whole history)."""


    def __init__(self, repetition: float, presence: float, frequency: float, last_n: int, vocab_size: int):
        self.repetition, self.presence, self.frequency, self.last_n = repetition, presence, frequency, last_n
        self.vocab_size = vocab_size
        self.boosts = repetition < 1 or presence < 0 or frequency < 0  # may raise a logit, up to overflow
        # Small vocabularies keep each row's window as vectors (``edit_row``): counting the window again cost more
        # than all the arithmetic there. Wide rows count it from the history, cheap next to the 50k-wide work.
        self.depth = last_n if last_n > 0 and vocab_size <= _TRACK_VOCAB else None
        self._windows: dict[int, PenaltyWindow] = {}

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> PenaltiesStep | None:
        s = settings
        neutral = s.repetition_penalty == 1 and s.presence_penalty == 0 and s.frequency_penalty == 0
        if neutral or s.penalty_last_n == 0:
            return None
        return cls(s.repetition_penalty, s.presence_penalty, s.frequency_penalty, s.penalty_last_n, vocab_size)

    def ban(self, logits: np.ndarray, history: Sequence[int]) -> bool:
        values = self._penalize(logits, history)
        return values is not None and bool((values == -np.inf).any())  # an absurd penalty can overflow to -inf

    def _penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray | None:
        """Penalise the window's tokens in ``logits``; their new logits, or None when the window is empty."""
        window = history if self.last_n < 0 else tail(history, self.last_n)
        tokens, counts = token_counts(window, logits.size)
        if tokens.size == 0:
            return None
        if self.boosts:  # a boost may overflow to +inf (NaN in the softmax): clip to the largest float instead
            with np.errstate(over="ignore"):
                values = np.minimum(self._penalized(logits[tokens], counts), FLOAT64_MAX)
        else:
            values = self._penalized(logits[tokens], counts)
        logits[tokens] = values
        return values

    def _penalized(self, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
        if self.repetition != 1.0:
            # HF: logit < 0 -> logit * p, else logit / p. The sign bit picks the same entries (-0.0 * p and
            # -0.0 / p are both -0.0) in fewer numpy calls than np.where.
            scaled = values / self.repetition
            np.multiply(values, self.repetition, out=scaled, where=np.signbit(values))
            values = scaled
        if self.presence or self.frequency:  # x - 0.0 == x: skipping the neutral subtraction changes nothing
            values = values - (self.presence + self.frequency * counts)
        return values

    def edit_row(self, row: np.ndarray, history: Sequence[int], slot: int, negated: bool) -> np.ndarray:
        window = self._windows.get(slot)
        if window is None:  # a row the chain does not follow (whole history, arrays, huge batches): count
            return super().edit_row(row, history, slot, negated)
        return window.apply(row, negated) if window.tokens else row

    def accept(self, slot: int, token: int) -> None:
        window = self._windows.get(slot)
        if window is None:
            return
        tokens = window.tokens
        if len(tokens) == self.last_n:
            window.count(tokens.popleft(), -1)
        tokens.append(token)
        window.count(token, 1)

    def reset(self, slot: int | None = None, tokens: Sequence[int] | None = None) -> None:
        if slot is None:
            self._windows.clear()
        elif tokens is None:
            self._windows.pop(slot, None)
        else:
            self._windows[slot] = PenaltyWindow(self, deque(tokens[-self.last_n :]), self.vocab_size)


class PenaltyWindow:
    """One batch row's penalties as whole-row vectors: a divisor (the penalty for ids in the window, 1.0
    elsewhere) and a subtrahend (presence + frequency * count, 0.0 elsewhere), so that applying them is three
    numpy calls and the untouched ids go through exact no-ops (x / 1.0, x * 1.0, x - 0.0). The step's ``accept``
    slides the window by one token, updating two entries instead of counting the window again."""

    __slots__ = ("step", "tokens", "counts", "divisor", "subtrahend", "product")

    def __init__(self, step: PenaltiesStep, tokens: deque, vocab_size: int):
        self.step = step
        self.tokens = tokens
        ids, counts = token_counts(tokens, vocab_size)
        self.counts = [0] * vocab_size
        for token, count in zip(ids.tolist(), counts.tolist(), strict=True):
            self.counts[token] = count
        self.divisor = np.ones(vocab_size)
        self.divisor[ids] = step.repetition
        self.subtrahend = np.zeros(vocab_size)
        self.subtrahend[ids] = step.presence + step.frequency * counts
        self.product = np.empty(vocab_size)  # work row for apply

    def count(self, token: int, change: int) -> None:
        if not 0 <= token < len(self.counts):
            return  # not a token id: never counted
        count = self.counts[token] = self.counts[token] + change
        step = self.step
        if count <= 1:  # the divisor changes only when a token enters or leaves the window
            self.divisor[token] = step.repetition if count else 1.0
        if step.presence or step.frequency:
            self.subtrahend[token] = step.presence + step.frequency * count if count else 0.0

    def apply(self, row: np.ndarray, negated: bool) -> np.ndarray:
        """The penalised row (``row`` itself or a new array). ``negated``: the row holds -logits and the result
        is exactly the negation of the plain one (-min(a, b) = max(-a, -b), -(x - s) = -x + s)."""
        if not self.step.boosts:
            return self._penalized(row, negated)
        with np.errstate(over="ignore"):  # as in PenaltiesStep._penalize
            if negated:
                return np.maximum(self._penalized(row, negated), -FLOAT64_MAX, out=row)
            return np.minimum(self._penalized(row, negated), FLOAT64_MAX, out=row)

    def _penalized(self, row: np.ndarray, negated: bool) -> np.ndarray:
        step = self.step
        if step.repetition != 1.0:
            # HF's rule (x > 0 -> x / p, else x * p) is the smaller of the two for p > 1 and the larger for p < 1
            # (on -x: the larger and the smaller); ids outside the window have p = 1, where both are x. Three
            # calls, bit-identical to the where form.
            divided = row / self.divisor
            multiplied = np.multiply(row, self.divisor, out=self.product)
            pick = np.minimum if (step.repetition > 1) != negated else np.maximum
            row = pick(divided, multiplied, out=divided)
        if step.presence or step.frequency:
            if negated:
                row += self.subtrahend
            else:
                row -= self.subtrahend
        return row


class NoRepeatNGramStep(Ban):
    """Ban every token that would complete an n-gram already present in the history (HF semantics)."""


    def __init__(self, size: int):
        self.size = size

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> NoRepeatNGramStep | None:
        return cls(settings.no_repeat_ngram_size) if settings.no_repeat_ngram_size > 0 else None

    def ban(self, logits: np.ndarray, history: Sequence[int]) -> bool:
        tokens = np.asarray(history, dtype=np.int64).reshape(-1)
        if tokens.size < self.size:
            return False
        if self.size == 1:
            banned = tokens
        else:
            prefix = tokens[tokens.size - self.size + 1 :]
            windows = sliding_window_view(tokens, self.size)
            banned = windows[(windows[:, :-1] == prefix).all(axis=1), -1]
        banned = banned[(banned >= 0) & (banned < logits.size)]
        logits[banned] = -np.inf
        return banned.size > 0


# ----------------------------------------------------------------------------------------------------------------
# Filters and temperature


class TopKStep(Filter):
    """Keep the tokens whose logit is >= the k-th largest logit (ties at the cut all stay, as in HF)."""


    def __init__(self, k: int):
        self.k = k

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> TopKStep | None:
        return cls(settings.top_k) if 0 < settings.top_k < vocab_size else None

    def mask(self, values: np.ndarray, scratch: Scratch) -> np.ndarray | None:
        return values >= kth_largest(values, self.k) if values.size > self.k else None

    def narrow_sorted(self, neg: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if neg.size <= self.k:
            return neg, ids
        count = neg.searchsorted(neg[self.k - 1], side="right")  # the k-th largest and its ties
        return neg[:count], ids[:count]


class TypicalStep(Filter):
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy until their mass
    reaches ``mass`` (HF TypicalLogitsWarper; the cut's key ties are kept)."""


    def __init__(self, mass: float):
        self.mass = mass

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> TypicalStep | None:
        return cls(settings.typical_p) if settings.typical_p < 1 else None

    def mask(self, values: np.ndarray, scratch: Scratch) -> np.ndarray | None:
        probs, log_probs = probabilities(values, scratch)
        terms = scratch.get("terms", values.size)
        terms.fill(0.0)
        np.multiply(probs, log_probs, out=terms, where=probs > 0)  # skips 0 * -inf
        entropy = -float(terms.sum())
        key = np.add(log_probs, entropy, out=terms)
        key = np.abs(key, out=key)  # |(-log p) - H|; +inf for removed tokens
        cut = key[sorted_head(key, probs, self.mass, scratch)[-1]]
        return key <= cut  # HF keeps every token tied with the cut

    def narrow_sorted(self, neg: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shifted = np.subtract(neg[0], neg)  # logit - max logit
        probs = np.exp(shifted)
        total = probs.sum()
        probs /= total
        log_probs = np.subtract(shifted, math.log(total), out=shifted)
        # -inf log-probabilities are possible when the logits span more than the float range: skip 0 * -inf
        entropy = -float(np.multiply(probs, log_probs, out=np.zeros_like(probs), where=probs > 0).sum())
        key = np.abs(np.add(log_probs, entropy, out=log_probs), out=log_probs)
        by_key = key.argsort(kind="stable")
        hit = int(probs[by_key].cumsum().searchsorted(self.mass, side="left"))
        keep = key <= key[by_key[min(hit, key.size - 1)]]  # a subset of a sorted array stays sorted
        return neg[keep], ids[keep]


class TopPStep(Filter):
    """Nucleus: keep the smallest set of most probable tokens whose mass reaches ``top_p`` (at least one token;
    among equally probable tokens at the cut the lower ids win, as a stable sort orders them)."""


    def __init__(self, top_p: float):
        self.top_p = top_p

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> TopPStep | None:
        return cls(settings.top_p) if settings.top_p < 1 else None

    def mask(self, values: np.ndarray, scratch: Scratch) -> np.ndarray | None:
        probs, log_probs = probabilities(values, scratch)
        surprise = np.negative(log_probs, out=log_probs)  # ascending surprise = descending probability
        mask = np.zeros(values.size, dtype=bool)
        mask[sorted_head(surprise, probs, self.top_p, scratch)] = True
        return mask

    def narrow_sorted(self, neg: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Already in descending probability, equal ones by lower id: the head is a prefix. Comparing the running
        # sum with top_p * total rather than normalising first saves two numpy calls (same cut up to rounding).
        cumulative = np.exp(np.subtract(neg[0], neg)).cumsum()
        count = int(cumulative.searchsorted(self.top_p * cumulative[-1], side="left")) + 1
        return neg[:count], ids[:count]


class MinPStep(Filter):
    """Keep the tokens with p >= min_p * p_max, i.e. logit >= max logit + log(min_p)."""


    def __init__(self, min_p: float):
        self.log_min_p = math.log(min_p)

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> MinPStep | None:
        return cls(settings.min_p) if settings.min_p > 0 else None

    def mask(self, values: np.ndarray, scratch: Scratch) -> np.ndarray | None:
        return values >= values.max() + self.log_min_p

    def narrow_sorted(self, neg: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # logit >= max + log(min_p)  <=>  -logit <= -max - log(min_p), exactly (negation is exact)
        count = neg.searchsorted(neg[0] - self.log_min_p, side="right")
        return neg[:count], ids[:count]


class TemperatureStep(Step):
    """Divide the logits by the temperature (> 1 flattens the distribution, < 1 sharpens it)."""

    sampling_only = True

    def __init__(self, temperature: float):
        self.temperature = temperature

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> Step | None:
        if settings.dynatemp_range > 0:  # llama.cpp's temp_ext: the same place in the order
            return DynamicTemperatureStep(settings.temperature, settings.dynatemp_range, settings.dynatemp_exponent)
        return cls(settings.temperature) if settings.temperature != 1 else None

    def _shift(self, values: np.ndarray) -> float:
        """What to subtract first: a tiny temperature would overflow huge logits (softmax is shift-invariant)."""
        peak = values.max()
        floor = values.min(initial=np.inf, where=values > -np.inf)
        return peak if float(max(abs(peak), abs(floor))) > HUGE_LOGIT * self.temperature else 0.0

    def divide_in_place(self, dense: np.ndarray) -> None:
        """The whole row at once: no 50k-wide temporaries."""
        shift = self._shift(dense)
        if shift:
            np.subtract(dense, shift, out=dense)
        np.divide(dense, self.temperature, out=dense)

    def apply(self, candidates: Candidates) -> None:
        ids, values = candidates.view()
        if ids is None:
            self.divide_in_place(candidates.logits)
        else:
            candidates.logits[ids] = (values - self._shift(values)) / self.temperature

    def narrow_sorted(self, neg: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        peak, floor = -neg[0], -neg[-1]  # the largest and smallest logit: no reductions needed
        if float(max(abs(peak), abs(floor))) > HUGE_LOGIT * self.temperature:
            return (neg + peak) / self.temperature, ids  # -(logit - peak) / t; stays sorted
        return neg / self.temperature, ids


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp's samplers (src/llama-sampling.cpp), under its names and semantics


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


class DynamicTemperatureStep(Step):
    """Dynamic temperature (llama.cpp's temp_ext): the temperature moves within [t - range, t + range] with the
    normalised entropy of the candidates: ``t_min + (t_max - t_min) * (H / log n) ** exponent``."""

    sampling_only = True

    def __init__(self, temperature: float, spread: float, exponent: float):
        self.low, self.high = max(0.0, temperature - spread), temperature + spread
        self.exponent = exponent

    def temperature_for(self, values: np.ndarray, scratch: Scratch) -> float | None:
        """The row's temperature; None when it has one candidate (nothing to scale)."""
        count = int(np.count_nonzero(values > -np.inf))
        if count <= 1:
            return None
        probs, log_probs = probabilities(values, scratch)
        entropy = -float(np.multiply(probs, log_probs, out=np.zeros_like(probs), where=probs > 0).sum())
        normalized = min(max(entropy / math.log(count), 0.0), 1.0)
        return self.low + (self.high - self.low) * normalized**self.exponent

    def apply(self, candidates: Candidates) -> None:
        ids, values = candidates.view()
        temperature = self.temperature_for(values, candidates.scratch)
        if temperature is None:
            return
        if temperature <= 0:  # t_min 0 and a certain row: keep the most likely token, as greedy would
            keep = np.zeros(values.size, dtype=bool)
            keep[int(values.argmax())] = True
            candidates.keep(ids, values, keep)
            return
        TemperatureStep(temperature).apply(candidates)


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


# Every step an ``order`` can name, by name. A new step: its class above, one line here (and its settings, if
# any, in settings.py).
REGISTRY: dict[str, type[Step]] = {
    "logit_bias": LogitBiasStep,
    "penalties": PenaltiesStep,
    "dry": DryStep,
    "ban": BanStringsStep,
    "no_repeat_ngram": NoRepeatNGramStep,
    "top_n_sigma": TopNSigmaStep,
    "top_k": TopKStep,
    "typical_p": TypicalStep,
    "top_p": TopPStep,
    "min_p": MinPStep,
    "xtc": XtcStep,
    "temperature": TemperatureStep,
    "mirostat": MirostatStep,
}
