"""The sampler step interface, its base classes and the classic steps (penalties, no-repeat n-gram, top-k, typical,
top-p, min-p, temperature with llama.cpp's dynamic form). numpy only. llama.cpp's other samplers are in
``llama_steps.py``; ``registry.py`` names every step for an ``order``.

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

A new step is one class here (or in ``llama_steps.py``) and one line in ``registry.REGISTRY``; it runs on the
general path until it has a fast form that the plan knows (see docs/architecture.md, "Sampler chain").
"""

from __future__ import annotations

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
