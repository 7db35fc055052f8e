"""What a step works on: one row's candidates (``Candidates``), the bans of a call (``Bans``) and the numeric
helpers the steps share. numpy only.

A ``Candidates`` row is dense float64 logits over the whole vocabulary (-inf = removed) plus a cached set of the
ids that may still be finite, so that the steps after a top-k touch only k entries instead of 50k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT64_MAX = float(np.finfo(np.float64).max)
HUGE_LOGIT = 1e300  # stands in for a +inf logit: finite, so softmax stays defined
_BINCOUNT_LIMIT = 4096  # token_counts: a vocabulary-wide bincount beats np.unique's sort up to this width


class Scratch:
    """Work arrays reused across steps and calls. On this kind of VM a fresh 400 kB temporary costs page faults
    once two are alive (glibc gives the freed heap top back to the kernel), more than the arithmetic on it; the
    arrays never leave the chain's call."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: type = np.float64) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None or array.size < size:
            array = self._arrays[name] = np.empty(size, dtype=dtype)
        return array[:size]


class Candidates:
    """One row while the chain works on it: dense float64 ``logits`` (-inf = removed), the row's ``history``, its
    batch ``slot`` (for steps that keep state per row), the chain's ``scratch`` and, while ``sample`` runs, the
    ``uniform`` that ``random`` steps read (None in ``process`` / ``probabilities``, which draw nothing: such a
    step then leaves the distribution it would draw from). ``_support`` is None (every id may be finite) or a
    superset of the finite ids."""

    __slots__ = ("logits", "history", "slot", "scratch", "uniform", "_support", "may_be_empty")

    def __init__(self, logits: np.ndarray, history: Sequence[int], slot: int = 0, scratch: Scratch | None = None):
        self.logits = logits
        self.history = history
        self.slot = slot
        self.scratch = scratch or Scratch()
        self.uniform: float | None = None
        self._support: np.ndarray | None = None
        # Set by the steps that ban (filters always keep a token): the chain then checks for an empty row.
        self.may_be_empty = False

    def view(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(ids, logits) to filter: ids None and the row itself (read-only use, -inf entries included) while the
        row is dense, else the finite candidates. Dense rows are filtered in place of building a 50k id list:
        each extra 400 kB temporary costs page faults on this kind of VM."""
        if self._support is None:
            return None, self.logits
        return self.candidates()

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, logits) of the finite entries; the logits are a copy."""
        if self._support is None:
            ids = np.flatnonzero(self.logits > -np.inf)
            values = self.logits[ids]
        else:
            ids = self._support
            values = self.logits[ids]
            finite = values > -np.inf
            if not finite.all():
                ids, values = ids[finite], values[finite]
        self._support = ids
        return ids, values

    def keep(self, ids: np.ndarray | None, values: np.ndarray, mask: np.ndarray) -> None:
        """Keep the entries of a ``view()`` where ``mask`` holds (finite ones only); remove the rest."""
        kept = np.flatnonzero(mask & (values > -np.inf))
        if kept.size == values.size:
            return
        if ids is None:  # dense -> sparse: clear the whole row once
            kept_values = values[kept]
            self.logits.fill(-np.inf)
            self.logits[kept] = kept_values
            self._support = kept
        else:  # already sparse: clear only what this step removed
            removed = np.ones(ids.size, dtype=bool)
            removed[kept] = False
            self.logits[ids[removed]] = -np.inf
            self._support = ids[kept]

    def reset_support(self) -> None:
        self._support = None

    def has_candidates(self) -> bool:
        if self._support is None:
            return bool((self.logits > -np.inf).any())
        return bool((self.logits[self._support] > -np.inf).any())


class Bans:
    """Every id a call bans: the chain's own (vocabulary padding) plus the call's extras (e.g. end-of-text
    before ``min_new_tokens``), and, for small-vocabulary plans, the same as a row to add (0.0 allowed, -inf
    banned) and its negation (+inf banned), from which the plan subtracts the logits."""

    __slots__ = ("base", "ids", "extra", "mask", "negated_mask")

    def __init__(self, base: np.ndarray, extra: np.ndarray | None, vocab_size: int, with_masks: bool):
        self.base = base
        self.extra = extra
        self.ids = base if extra is None else np.union1d(base, extra)
        self.mask = self.negated_mask = None
        if with_masks:
            self.mask = np.zeros(vocab_size)
            self.mask[self.ids] = -np.inf
            self.negated_mask = -self.mask

    def fallback(self, original: np.ndarray) -> tuple[int, float]:
        """When everything was removed (bans + no-repeat): the argmax of the original logits among the allowed
        ids; if the per-call bans leave nothing, among the ids the chain allowed. (id, its logit)."""
        base = np.ones(original.size, dtype=bool)
        base[self.base] = False
        allowed = base.copy()
        if self.extra is not None:
            allowed[self.extra] = False
        ids = np.flatnonzero(allowed if allowed.any() else base)
        values = np.array(original[ids], dtype=np.float64)
        sanitize(values)
        best = int(np.argmax(values))
        return int(ids[best]), float(values[best]) if np.isfinite(values[best]) else 0.0


class View(NamedTuple):
    """A processed row: ids None and the whole row (-inf for removed ids), or ascending ids and their logits."""

    ids: np.ndarray | None
    values: np.ndarray


# ----------------------------------------------------------------------------------------------------------------
# Numeric helpers


def sanitize(values: np.ndarray) -> None:
    """NaN -> -inf (removed), +inf -> a huge finite logit, in place, so that no step can produce NaN."""
    peak = values.max() if values.size else 0.0
    if np.isnan(peak) or peak == np.inf:
        np.nan_to_num(values, copy=False, nan=-np.inf, posinf=HUGE_LOGIT, neginf=-np.inf)


def finite(ids: np.ndarray | None, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The finite entries of a view as (ids, values); compact views hold only finite values already."""
    if ids is None:
        ids = (values > -np.inf).nonzero()[0]
        return ids, values[ids]
    return ids, values


def probabilities(values: np.ndarray, scratch: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, log-probabilities) in scratch arrays, for logits with at least one finite entry
    (-inf -> 0, -inf)."""
    log_probs = np.subtract(values, values.max(), out=scratch.get("log_probs", values.size))
    probs = np.exp(log_probs, out=scratch.get("probs", values.size))
    total = probs.sum()
    probs /= total
    log_probs -= math.log(total)
    return probs, log_probs


def kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest entry (1-based, k < size) without partitioning the whole array.

    The k-th largest of a strided sample is a lower bound (k sample entries reach it, so k entries of the whole
    array do), so the entries at or above it contain the true top k; partitioning that small pool is exact and
    much cheaper than partitioning 50k entries."""
    stride = int(math.sqrt(values.size / k))  # balances the sample's size against the pool's expected size
    if stride >= 2:
        sample = values[::stride]
        bound = np.partition(sample, sample.size - k)[sample.size - k]
        pool = values[values >= bound]
        if pool.size >= k:  # short only when NaNs (which never compare) are about: then use the whole row
            values = pool
    return float(np.partition(values, values.size - k)[values.size - k])


_SORT_LIMIT = 2048  # candidate sets up to this size are simply sorted
_BINS_PER_NAT = 4
_MAX_KEY_NATS = 1024.0  # beyond ~745 nats a probability is 0 in float64 anyway


def sorted_head(key: np.ndarray, probs: np.ndarray, mass: float, scratch: Scratch) -> np.ndarray:
    """Indices of the shortest run, in ascending ``key`` order (a key in nats, >= 0, +inf for removed tokens; ties
    broken by position, i.e. by lower token id), whose probability reaches ``mass``; every index if none does."""
    members = _head_bins(key, probs, mass, scratch) if key.size > _SORT_LIMIT else None
    if members is not None:
        key, probs = key[members], probs[members]
    # Array methods rather than np.argsort & co.: same algorithms without the dispatch layer (~1 µs a call).
    order = key.argsort(kind="stable")
    cumulative = probs[order].cumsum()
    hit = int(cumulative.searchsorted(mass, side="left"))
    head = order[: hit + 1]
    return head if members is None else members[head]


def _head_bins(key: np.ndarray, probs: np.ndarray, mass: float, scratch: Scratch) -> np.ndarray:
    """Indices of every entry in the quarter-nat key bins up to the bin where the cumulative mass reaches
    ``mass``. Excluded entries have larger keys than every member and equal keys share a bin, so the members are
    an exact prefix of the sorted order (ties whole) that holds the cut: O(V) instead of sorting 50k."""
    scaled = np.minimum(key, _MAX_KEY_NATS, out=scratch.get("bin_keys", key.size))
    scaled *= _BINS_PER_NAT
    bins = scratch.get("bins", key.size, np.int64)
    np.copyto(bins, scaled, casting="unsafe")  # truncation = floor for keys >= 0
    cumulative = np.cumsum(np.bincount(bins, weights=probs))
    last = int(np.searchsorted(cumulative, mass, side="left"))
    return np.flatnonzero(bins <= last)


def tail(history: Sequence[int], count: int) -> Sequence[int]:
    try:
        return history[-count:]
    except TypeError:  # an iterable without slicing (e.g. a deque)
        return list(history)[-count:]


def token_counts(tokens: Sequence[int], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids in [0, vocab_size) among ``tokens``, ascending, and how often each occurs."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if vocab_size <= _BINCOUNT_LIMIT:
        # Out-of-range ids (negative ones wrap around as unsigned) all land in one extra bin, dropped below.
        bins = np.minimum(ids.view(np.uint64), np.uint64(vocab_size)).view(np.int64)
        counts = np.bincount(bins, minlength=vocab_size + 1)[:vocab_size]
        present = counts.nonzero()[0]
        return present, counts[present]
    return np.unique(ids[(ids >= 0) & (ids < vocab_size)], return_counts=True)
