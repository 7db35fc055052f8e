"""The sampler chain: next-token logits -> processed logits -> one drawn id per row. numpy only, never torch.

Steps (each a small class with ``apply(row)``), composed in a configurable order:

    penalties         repetition (HF/CTRL: logit>0 -> /p, logit<0 -> *p), presence (-v once), frequency (-count*v),
                      all over the last ``penalty_last_n`` tokens of the history
    no_repeat_ngram   ban next tokens that would repeat an n-gram of the whole history (HF semantics)
    top_k             keep tokens whose logit >= the k-th largest (ties kept, as HF does)
    typical_p         locally typical sampling, HF's TypicalLogitsWarper semantics
    top_p             keep the smallest set of most probable tokens whose mass reaches top_p (lower ids win ties)
    min_p             keep tokens with p >= min_p * p_max
    temperature       divide by the temperature

"llama" order (the default, llama.cpp's) applies temperature last, so the filters see the model's own
distribution; "hf" applies it right after the penalties, as Hugging Face does. An explicit order is a comma list
of step names and runs exactly those steps. Banned ids (vocab padding, per-call extras such as EOS before
min_tokens) are removed before every step. Greedy (temperature 0) runs only penalties and no_repeat_ngram, then
takes the argmax.

Speed: the decode loop calls this once per token, so there are two paths with the same results.

- General path (wide vocabularies, e.g. GPT-2's 50k): nothing sorts the whole row. top-k finds its cut from a
  strided sample plus a small partition, and every later step works on the small candidate set; top_p/typical_p
  without top_k bin the tokens by surprise (O(V)) and sort only the bins up to the cut.
- Small path (V <= SMALL_VOCAB, e.g. a 65-character vocabulary): there numpy's per-call overhead (~0.5-2 µs) is
  the whole cost, so the aim is few calls. The row is sorted once after the penalties (wider rows are first cut
  by a leading top-k / min-p); then top-k, top-p and min-p keep prefixes, typical-p a subset and temperature
  scales, without masks or further sorts. The repetition/presence/frequency penalties are whole-row vectors
  updated by one token per step. The default chain costs about a fifth of what it costs on the general path.

``sample`` on the small path goes further when every filter keeps a prefix of the sorted candidates (top-k,
top-p and min-p in any order, temperature last, as in the default order): the cuts become counts (list
bisection, top-p last and only when it can still matter), top-p's exponentials are reused for the draw, a
handful of survivors are drawn in plain Python, and with no filter at all the draw comes straight from the
dense row. Batches (``--n``) on these
paths run as [B, V] array operations, each row picking what it would pick alone.

Both paths draw in token-id order, so a seed picks the same token on either. Work arrays and the penalty windows
are kept across calls, so a SamplerChain serves one thread at a time.
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

STEP_NAMES = ("penalties", "no_repeat_ngram", "top_k", "typical_p", "top_p", "min_p", "temperature")
PRESET_ORDERS: dict[str, tuple[str, ...]] = {
    "llama": ("penalties", "no_repeat_ngram", "top_k", "typical_p", "top_p", "min_p", "temperature"),
    "hf": ("penalties", "no_repeat_ngram", "temperature", "top_k", "typical_p", "top_p", "min_p"),
}
# Steps that only reshape the sampling distribution; greedy decoding skips them (HF: warpers need do_sample).
_SAMPLING_ONLY_STEPS = frozenset({"top_k", "typical_p", "top_p", "min_p", "temperature"})
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT64_MAX = float(np.finfo(np.float64).max)
_HUGE_LOGIT = 1e300  # stands in for a +inf logit: finite, so softmax stays defined


@dataclass
class SamplerSettings:
    temperature: float = 1.0  # 0 = greedy (argmax after penalties/masks)
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1.0 = off; (0, 1]
    min_p: float = 0.0  # 0 = off; [0, 1]
    typical_p: float = 1.0  # 1.0 = off; (0, 1]
    repetition_penalty: float = 1.0  # > 0; HF/CTRL style, over the penalty window
    presence_penalty: float = 0.0  # OpenAI style: subtract once if the token appeared in the window
    frequency_penalty: float = 0.0  # subtract count * value
    penalty_last_n: int = 64  # window of recent tokens for the three penalties; 0 = off, -1 = whole history
    no_repeat_ngram_size: int = 0  # ban tokens that would repeat an n-gram of the history (HF semantics)
    order: str = "llama"  # "llama", "hf" or an explicit comma list of step names
    seed: int | None = None


SETTING_NAMES = tuple(f.name for f in fields(SamplerSettings))

ALIASES = {
    "temp": "temperature",
    "topk": "top_k",
    "topp": "top_p",
    "minp": "min_p",
    "typical": "typical_p",
    "rep_penalty": "repetition_penalty",
    "repeat_penalty": "repetition_penalty",
    "presence": "presence_penalty",
    "frequency": "frequency_penalty",
    "freq_penalty": "frequency_penalty",
    "repeat_last_n": "penalty_last_n",
    "last_n": "penalty_last_n",
    "no_repeat_ngram": "no_repeat_ngram_size",
    "samplers": "order",
    "sampler_order": "order",
    "random_seed": "seed",
}


class SettingError(ValueError):
    """A sampler setting is unknown or out of range; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------------------------
# Settings: parsing and validation


def _show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _as_float(name: str, value: object) -> float:
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise SettingError(f"{name} must be a number, got {value!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise SettingError(f"{name} must be a number, got {_show(value)}")
    if not math.isfinite(number):
        raise SettingError(f"{name} must be a finite number, got {_show(value)}")
    return number


def _as_int(name: str, value: object) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise SettingError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool):
        raise SettingError(f"{name} must be an integer, got {value}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():  # JSON metadata may carry 50.0
        return int(value)
    raise SettingError(f"{name} must be an integer, got {_show(value)}")


def _as_seed(name: str, value: object) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "random", "-1")):
        return None
    seed = _as_int(name, value)
    if seed < 0:
        raise SettingError(f"{name} must be an integer >= 0 or 'none', got {seed}")
    return seed


def resolve_order(order: str) -> tuple[str, ...]:
    """The step names an ``order`` setting stands for; raises SettingError for unknown or repeated names."""
    if not isinstance(order, str):
        raise SettingError(f"order must be 'llama', 'hf' or a comma list of steps, got {_show(order)}")
    text = order.strip().lower()
    if text in PRESET_ORDERS:
        return PRESET_ORDERS[text]
    steps = tuple(part.strip() for part in text.split(","))
    if not text or any(not step for step in steps):
        raise SettingError(f"order must be 'llama', 'hf' or a comma list of {', '.join(STEP_NAMES)}; got {order!r}")
    for step in steps:
        if step not in STEP_NAMES:
            raise SettingError(f"order: unknown step {step!r} (steps: {', '.join(STEP_NAMES)})")
    if len(set(steps)) != len(steps):
        raise SettingError(f"order names a step twice: {order!r}")
    return steps


def _as_order(name: str, value: object) -> str:
    steps = resolve_order(value)  # type: ignore[arg-type]
    text = str(value).strip().lower()
    return text if text in PRESET_ORDERS else ",".join(steps)


def _check_float(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, note: str = "") -> Callable:
    """A range check producing messages such as "top_p must be in (0, 1], got 2"."""

    def check(name: str, value: float) -> None:
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if not (too_low or too_high):
            return
        if hi is None:
            wanted = f"{'>' if lo_open else '>='} {_show(lo)}"
        else:
            wanted = f"in {'(' if lo_open else '['}{_show(lo)}, {_show(hi)}{')' if hi_open else ']'}"
        raise SettingError(f"{name} must be {wanted}{note}, got {_show(value)}")

    return check


def _check_int_min(minimum: int, note: str = "") -> Callable:
    def check(name: str, value: int) -> None:
        if value < minimum:
            raise SettingError(f"{name} must be an integer >= {minimum}{note}, got {value}")

    return check


def _no_check(name: str, value: object) -> None:
    return None


# name -> (converter from str/JSON value, range check)
_RULES: dict[str, tuple[Callable[[str, object], object], Callable[[str, object], None]]] = {
    "temperature": (_as_float, _check_float(0.0, None, False, False, " (0 = greedy)")),
    "top_k": (_as_int, _check_int_min(0, " (0 = off)")),
    "top_p": (_as_float, _check_float(0.0, 1.0, True, False)),
    "min_p": (_as_float, _check_float(0.0, 1.0, False, False)),
    "typical_p": (_as_float, _check_float(0.0, 1.0, True, False)),
    "repetition_penalty": (_as_float, _check_float(0.0, None, True, False)),
    "presence_penalty": (_as_float, _no_check),
    "frequency_penalty": (_as_float, _no_check),
    "penalty_last_n": (_as_int, _check_int_min(-1, " (-1 = whole history, 0 = off)")),
    "no_repeat_ngram_size": (_as_int, _check_int_min(0, " (0 = off)")),
    "order": (_as_order, _no_check),
    "seed": (_as_seed, _no_check),
}


def canonical_name(key: str) -> str:
    """Resolve aliases and spelling variants (case, '-' for '_'); raise SettingError for unknown keys."""
    name = str(key).strip().lower().replace("-", "_")
    name = ALIASES.get(name, name)
    if name in _RULES:
        return name
    close = difflib.get_close_matches(name, [*SETTING_NAMES, *ALIASES], n=1)
    hint = f"; did you mean {ALIASES.get(close[0], close[0])}?" if close else f" (settings: {', '.join(SETTING_NAMES)})"
    raise SettingError(f"unknown setting {str(key)!r}{hint}")


def parse_setting(key: str, raw: object) -> tuple[str, object]:
    """``("temp", "0.7") -> ("temperature", 0.7)``: resolve the alias, convert, validate the range."""
    name = canonical_name(key)
    convert, check = _RULES[name]
    value = convert(name, raw)
    check(name, value)
    return name, value


def validate(settings: SamplerSettings) -> None:
    """Raise SettingError (one line) unless every field has a usable type and range."""
    for name, (convert, check) in _RULES.items():
        value = getattr(settings, name)
        if isinstance(value, str) != (name == "order"):  # strings are user text: parse_setting converts those
            raise SettingError(f"{name} has the wrong type: {_show(value)}")
        if name in ("top_k", "penalty_last_n", "no_repeat_ngram_size") and not isinstance(value, (int, np.integer)):
            raise SettingError(f"{name} must be an integer, got {_show(value)}")
        check(name, convert(name, value))


def apply_setting(settings: SamplerSettings, key: str, raw: object) -> SamplerSettings:
    """A copy of ``settings`` with one setting changed from user text (e.g. ``/set temp 0.7``)."""
    name, value = parse_setting(key, raw)
    return replace(settings, **{name: value})


def settings_from_mapping(
    values: Mapping[str, object], base: SamplerSettings | None = None, *, ignore_unknown: bool = False
) -> SamplerSettings:
    """Settings from a mapping such as the model file's generation defaults (HF GenerationConfig names).

    With ``ignore_unknown`` keys that are not sampler settings (``max_new_tokens``, ...) are skipped."""
    changes: dict[str, object] = {}
    for key, raw in values.items():
        try:
            name = canonical_name(key)
        except SettingError:
            if ignore_unknown:
                continue
            raise
        changes[name] = parse_setting(name, raw)[1]
    return replace(base or SamplerSettings(), **changes)


def make_rng(settings: SamplerSettings) -> np.random.Generator:
    """The generator for ``sample``: reproducible when ``settings.seed`` is set, fresh entropy otherwise."""
    return np.random.default_rng(settings.seed)


# ----------------------------------------------------------------------------------------------------------------
# One row of the batch while the chain works on it


class _Scratch:
    """Work arrays reused across steps and calls. On this kind of VM a fresh 400 kB temporary costs ~0.3 ms in
    page faults once two are alive (glibc gives the freed heap top back to the kernel), more than the arithmetic
    on it; the arrays never leave the chain's call."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: type = np.float64) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None or array.size < size:
            array = self._arrays[name] = np.empty(size, dtype=dtype)
        return array[:size]


class _Row:
    """Dense float64 logits (-inf = removed) plus a cached candidate set, so that steps after top-k touch only
    k entries. ``_support`` is None (every id may be finite) or a superset of the finite ids."""

    __slots__ = ("logits", "history", "scratch", "_support", "may_be_empty")

    def __init__(self, logits: np.ndarray, history: Sequence[int], scratch: _Scratch | None = None):
        self.logits = logits
        self.history = history
        self.scratch = scratch or _Scratch()
        self._support: np.ndarray | None = None
        # Set by the steps that ban (filters always keep a token): the chain then checks for an empty row.
        self.may_be_empty = False

    def view(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(ids, logits) to filter: ids None and the row itself (read-only use, -inf entries included) while the
        row is dense, else the finite candidates. Dense rows are filtered in place of building a 50k id list:
        each extra 400 kB temporary costs page faults (~0.3 ms) on this kind of VM."""
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


def _finite(ids: np.ndarray | None, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The finite entries of a view as (ids, values); compact views hold only finite values already."""
    if ids is None:
        ids = (values > -np.inf).nonzero()[0]
        return ids, values[ids]
    return ids, values


def _probabilities(values: np.ndarray, scratch: _Scratch) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, log-probabilities) in scratch arrays, for logits with at least one finite entry
    (-inf -> 0, -inf)."""
    log_probs = np.subtract(values, values.max(), out=scratch.get("log_probs", values.size))
    probs = np.exp(log_probs, out=scratch.get("probs", values.size))
    total = probs.sum()
    probs /= total
    log_probs -= math.log(total)
    return probs, log_probs


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest entry (1-based, k < size) without partitioning the whole array.

    The k-th largest of a strided sample is a lower bound (k sample entries reach it, so k entries of the whole
    array do), so the entries at or above it contain the true top k; partitioning that small pool is exact and
    ~10x cheaper than partitioning 50k entries."""
    stride = int(math.sqrt(values.size / k))  # balances the sample's size against the pool's expected size
    if stride >= 2:
        sample = values[::stride]
        bound = np.partition(sample, sample.size - k)[sample.size - k]
        values = values[values >= bound]
    return float(np.partition(values, values.size - k)[values.size - k])


_SORT_LIMIT = 2048  # candidate sets up to this size are simply sorted
_BINS_PER_NAT = 4
_MAX_KEY_NATS = 1024.0  # beyond ~745 nats a probability is 0 in float64 anyway


def _sorted_head(key: np.ndarray, probs: np.ndarray, mass: float, scratch: _Scratch) -> np.ndarray:
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


def _head_bins(key: np.ndarray, probs: np.ndarray, mass: float, scratch: _Scratch) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------------------------
# Steps


class Step(Protocol):
    def apply(self, row: _Row) -> None: ...


class _BanningStep:
    """A step that reads the history and may remove every token; it always works on the whole (dense) row."""

    def ban(self, logits: np.ndarray, history: Sequence[int]) -> bool:
        """Change the row ``logits`` in place; True when it may have removed every token."""
        raise NotImplementedError

    def edit(self, logits: np.ndarray, history: Sequence[int]) -> None:
        """``ban`` for a caller that checks the row itself (the small path: one argmax)."""
        self.ban(logits, history)

    def edit_small(self, row: np.ndarray, history: Sequence[int], slot: int) -> np.ndarray:
        """The small path's ``edit`` for batch row ``slot``: returns the row (the same array or a new one)."""
        self.edit(row, history)
        return row

    def edit_small_negated(self, neg: np.ndarray, history: Sequence[int], slot: int) -> np.ndarray:
        """``edit_small`` on the negated row (-logits): returns the negated result (the same array or a new one)."""
        row = np.negative(neg, out=neg)
        return np.negative(self.edit_small(row, history, slot), out=neg)

    def apply(self, row: _Row) -> None:
        if self.ban(row.logits, row.history):
            row.may_be_empty = True


class _Filter:
    """A step that keeps part of the candidates (at least one) given only their logits."""

    def mask(self, values: np.ndarray, scratch: _Scratch) -> np.ndarray | None:
        """Which entries of a view (-inf entries may be present) to keep; None keeps them all."""
        raise NotImplementedError

    def apply(self, row: _Row) -> None:
        ids, values = row.view()
        mask = self.mask(values, row.scratch)
        if mask is not None:
            row.keep(ids, values, mask)

    def narrow_sorted(self, neg: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The small-vocabulary path: the candidates as negated logits in ascending order (most likely first,
        all finite, at least one) with their ids; returns them after this step, still sorted."""
        raise NotImplementedError


class PenaltiesStep(_BanningStep):
    """Repetition (HF/CTRL), presence and frequency penalties over the last ``last_n`` history tokens."""

    def __init__(self, repetition: float, presence: float, frequency: float, last_n: int):
        self.repetition, self.presence, self.frequency, self.last_n = repetition, presence, frequency, last_n
        self.boosts = repetition < 1 or presence < 0 or frequency < 0  # may raise a logit, up to overflow
        self._windows: dict[int, _PenaltyWindow] = {}  # small path: per batch row

    def ban(self, logits: np.ndarray, history: Sequence[int]) -> bool:
        values = self._penalize(logits, history)
        return values is not None and bool((values == -np.inf).any())  # an absurd penalty can overflow to -inf

    def edit(self, logits: np.ndarray, history: Sequence[int]) -> None:
        self._penalize(logits, history)

    def _penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray | None:
        """Penalise the window's tokens in ``logits``; their new logits, or None when the window is empty."""
        window = history if self.last_n < 0 else _tail(history, self.last_n)
        tokens, counts = _token_counts(window, logits.size)
        if tokens.size == 0:
            return None
        if self.boosts:  # a boost may overflow to +inf (NaN in the softmax): clip to the largest float instead
            with np.errstate(over="ignore"):
                values = np.minimum(self._penalized(logits[tokens], counts), _FLOAT64_MAX)
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

    def edit_small(self, row: np.ndarray, history: Sequence[int], slot: int) -> np.ndarray:
        if not self._trackable(history, slot):
            self.edit(row, history)  # whole history, arrays, huge batches: count afresh
            return row
        tracked = self._tracked(history, slot, row.size)
        return row if tracked is None else tracked.apply(row)

    def edit_small_negated(self, neg: np.ndarray, history: Sequence[int], slot: int) -> np.ndarray:
        if not self._trackable(history, slot):
            return super().edit_small_negated(neg, history, slot)
        tracked = self._tracked(history, slot, neg.size)
        return neg if tracked is None else tracked.apply(neg, negated=True)

    def _trackable(self, history: Sequence[int], slot: int) -> bool:
        return self.last_n >= 0 and type(history) is list and slot < _MAX_PENALTY_WINDOWS

    def _tracked(self, history: list, slot: int, vocab_size: int) -> _PenaltyWindow | None:
        """The penalty vectors of batch row ``slot`` for ``history``: followed by one token from the last call
        when possible, else rebuilt; None when the window is empty."""
        tracked = self._windows.get(slot)
        if tracked is not None and tracked.follow(history):
            return tracked
        window = history[-self.last_n :]
        if not window:
            return None
        tracked = self._windows[slot] = _PenaltyWindow(self, window, vocab_size)
        return tracked


class _PenaltyWindow:
    """The small path's penalties for one batch row as whole-row vectors: a divisor (the penalty for ids in the
    window, 1.0 elsewhere) and a subtrahend (presence + frequency * count, 0.0 elsewhere), so that applying them
    is three numpy calls and the untouched ids go through exact no-ops (x / 1.0, x * 1.0, x - 0.0). From one
    decode step to the next the window slides by a token: updating two entries beats converting and counting
    the 64-token list again, which cost more than all the arithmetic at V ~ 65."""

    __slots__ = ("step", "window", "counts", "divisor", "subtrahend", "product", "incremental")

    def __init__(self, step: PenaltiesStep, window: list, vocab_size: int):
        self.step = step
        self.window = window
        tokens, counts = _token_counts(window, vocab_size)
        self.counts = [0] * vocab_size
        for token, count in zip(tokens.tolist(), counts.tolist(), strict=True):
            self.counts[token] = count
        self.divisor = np.ones(vocab_size)
        self.divisor[tokens] = step.repetition
        self.subtrahend = np.zeros(vocab_size)
        self.subtrahend[tokens] = step.presence + step.frequency * counts
        self.product = np.empty(vocab_size)  # work row for apply
        # Only plain ints are tracked one by one; anything else (numpy ints, ...) is counted afresh each time.
        self.incremental = all(type(token) is int for token in window)

    def follow(self, history: list) -> bool:
        """Move to the window ending ``history`` when that is the previous window, unchanged or slid by one appended
        token; else False (the caller rebuilds). The window list is our own and is updated in place."""
        window, last_n = self.window, self.step.last_n
        if not self.incremental:
            return False
        if history[-last_n - 1 : -1] != window:
            return history[-last_n:] == window  # the same history again (e.g. :probs, then a turn)
        added = history[-1]
        if type(added) is not int:
            return False
        if len(window) == last_n:
            self._count(window.pop(0), -1)
        window.append(added)
        self._count(added, 1)
        return True

    def _count(self, token: int, change: int) -> None:
        if not 0 <= token < len(self.counts):
            return  # not a token id: never counted
        count = self.counts[token] = self.counts[token] + change
        step = self.step
        if count <= 1:  # the divisor changes only when a token enters or leaves the window
            self.divisor[token] = step.repetition if count else 1.0
        if step.presence or step.frequency:
            self.subtrahend[token] = step.presence + step.frequency * count if count else 0.0

    def apply(self, row: np.ndarray, negated: bool = False) -> np.ndarray:
        """The penalised row (``row`` itself or a new array). ``negated``: the row holds -logits and the result
        is exactly the negation of the plain one (-min(a, b) = max(-a, -b), -(x - s) = -x + s)."""
        if not self.step.boosts:
            return self._penalized(row, negated)
        with np.errstate(over="ignore"):  # as in PenaltiesStep._penalize
            if negated:
                return np.maximum(self._penalized(row, negated), -_FLOAT64_MAX, out=row)
            return np.minimum(self._penalized(row, negated), _FLOAT64_MAX, out=row)

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


class NoRepeatNGramStep(_BanningStep):
    """Ban every token that would complete an n-gram already present in the history (HF semantics)."""

    def __init__(self, size: int):
        self.size = size

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


class TopKStep(_Filter):
    """Keep the tokens whose logit is >= the k-th largest logit (ties at the cut all stay, as in HF)."""

    def __init__(self, k: int):
        self.k = k

    def mask(self, values: np.ndarray, scratch: _Scratch) -> np.ndarray | None:
        return values >= _kth_largest(values, self.k) if values.size > self.k else None

    def narrow_sorted(self, neg: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if neg.size <= self.k:
            return neg, order
        count = neg.searchsorted(neg[self.k - 1], side="right")  # the k-th largest and its ties
        return neg[:count], order[:count]


class TypicalStep(_Filter):
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy until their mass
    reaches ``mass`` (HF TypicalLogitsWarper; the cut's key ties are kept)."""

    def __init__(self, mass: float):
        self.mass = mass

    def mask(self, values: np.ndarray, scratch: _Scratch) -> np.ndarray | None:
        probs, log_probs = _probabilities(values, scratch)
        terms = scratch.get("terms", values.size)
        terms.fill(0.0)
        np.multiply(probs, log_probs, out=terms, where=probs > 0)  # skips 0 * -inf
        entropy = -float(terms.sum())
        key = np.add(log_probs, entropy, out=terms)
        key = np.abs(key, out=key)  # |(-log p) - H|; +inf for removed tokens
        cut = key[_sorted_head(key, probs, self.mass, scratch)[-1]]
        return key <= cut  # HF keeps every token tied with the cut

    def narrow_sorted(self, neg: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
        return neg[keep], order[keep]


class TopPStep(_Filter):
    """Nucleus: keep the smallest set of most probable tokens whose mass reaches ``top_p`` (at least one token;
    among equally probable tokens at the cut the lower ids win, as a stable sort orders them)."""

    def __init__(self, top_p: float):
        self.top_p = top_p

    def mask(self, values: np.ndarray, scratch: _Scratch) -> np.ndarray | None:
        probs, log_probs = _probabilities(values, scratch)
        surprise = np.negative(log_probs, out=log_probs)  # ascending surprise = descending probability
        mask = np.zeros(values.size, dtype=bool)
        mask[_sorted_head(surprise, probs, self.top_p, scratch)] = True
        return mask

    def narrow_sorted(self, neg: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Already in descending probability, equal ones by lower id: the head is a prefix. Comparing the running
        # sum with top_p * total rather than normalising first saves two numpy calls (same cut up to rounding).
        cumulative = np.exp(np.subtract(neg[0], neg)).cumsum()
        count = int(cumulative.searchsorted(self.top_p * cumulative[-1], side="left")) + 1
        return neg[:count], order[:count]


class MinPStep(_Filter):
    """Keep the tokens with p >= min_p * p_max, i.e. logit >= max logit + log(min_p)."""

    def __init__(self, min_p: float):
        self.log_min_p = math.log(min_p)

    def mask(self, values: np.ndarray, scratch: _Scratch) -> np.ndarray | None:
        return values >= values.max() + self.log_min_p

    def narrow_sorted(self, neg: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # logit >= max + log(min_p)  <=>  -logit <= -max - log(min_p), exactly (negation is exact)
        count = neg.searchsorted(neg[0] - self.log_min_p, side="right")
        return neg[:count], order[:count]


class TemperatureStep(_Filter):
    """Divide the logits by the temperature (> 1 flattens the distribution, < 1 sharpens it)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def _shift(self, values: np.ndarray) -> float:
        """What to subtract first: a tiny temperature would overflow huge logits (softmax is shift-invariant)."""
        peak = values.max()
        floor = values.min(initial=np.inf, where=values > -np.inf)
        return peak if float(max(abs(peak), abs(floor))) > _HUGE_LOGIT * self.temperature else 0.0

    def divide_in_place(self, dense: np.ndarray) -> None:
        """The whole row at once: no 50k-wide temporaries."""
        shift = self._shift(dense)
        if shift:
            np.subtract(dense, shift, out=dense)
        np.divide(dense, self.temperature, out=dense)

    def apply(self, row: _Row) -> None:
        ids, values = row.view()
        if ids is None:
            self.divide_in_place(row.logits)
        else:
            row.logits[ids] = (values - self._shift(values)) / self.temperature

    def narrow_sorted(self, neg: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        peak, floor = -neg[0], -neg[-1]  # the largest and smallest logit: no reductions needed
        if float(max(abs(peak), abs(floor))) > _HUGE_LOGIT * self.temperature:
            return (neg + peak) / self.temperature, order  # -(logit - peak) / t; stays sorted
        return neg / self.temperature, order


def _tail(history: Sequence[int], count: int) -> Sequence[int]:
    try:
        return history[-count:]
    except TypeError:  # an iterable without slicing (e.g. a deque)
        return list(history)[-count:]


def _token_counts(tokens: Sequence[int], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids in [0, vocab_size) among ``tokens``, ascending, and how often each occurs."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if vocab_size <= SMALL_VOCAB:  # a vocab-wide bincount beats np.unique's sort here
        # Out-of-range ids (negative ones wrap around as unsigned) all land in one extra bin, dropped below.
        bins = np.minimum(ids.view(np.uint64), np.uint64(vocab_size)).view(np.int64)
        counts = np.bincount(bins, minlength=vocab_size + 1)[:vocab_size]
        present = counts.nonzero()[0]
        return present, counts[present]
    return np.unique(ids[(ids >= 0) & (ids < vocab_size)], return_counts=True)


# ----------------------------------------------------------------------------------------------------------------
# The chain

# Vocabularies up to this size may take the small path (see _choose_small_path): one row at a time, sorted once,
# no support bookkeeping. Its temporaries are at most 32 kB, so they do not hit the page-fault cost that the
# general path's reused buffers exist for, and at V ~ 65 numpy's per-call overhead is the whole cost.
SMALL_VOCAB = 4096
_BAN_CACHE_SIZE = 16  # distinct per-call ban lists remembered (the decode loop uses one or two)
_PREFILTER_FROM = 256  # rows at least this wide are cut by a leading top-k / min-p before the sort
_SORT_ALL_LIMIT = 1024  # widest row the small path sorts whole (top-p / typical-p first); wider: general path
_MAX_PENALTY_WINDOWS = 64  # batch rows whose penalty window the small path tracks incrementally


class _CutPlan(NamedTuple):
    """``SamplerChain._cut``'s view of the prefix filters (no temperature among them)."""

    kth: int | None  # top-k: index of the k-th candidate
    shift: float | None  # min-p: keep -logit <= -max logit - log(min_p)
    top_p: float | None
    k_before_p: bool  # top-p sees top-k's cut
    m_before_p: bool  # top-p sees min-p's cut

    @classmethod
    def of(cls, filters: Sequence[_Filter]) -> _CutPlan:
        names = [type(step).__name__ for step in filters]
        top_k = next((step for step in filters if isinstance(step, TopKStep)), None)
        min_p = next((step for step in filters if isinstance(step, MinPStep)), None)
        top_p = next((step for step in filters if isinstance(step, TopPStep)), None)
        p_at = names.index("TopPStep") if top_p else len(names)
        return cls(
            top_k.k - 1 if top_k else None,
            -min_p.log_min_p if min_p else None,
            top_p.top_p if top_p else None,
            top_k is not None and names.index("TopKStep") < p_at,
            min_p is not None and names.index("MinPStep") < p_at,
        )


class _Bans(NamedTuple):
    ids: np.ndarray  # every banned id, ascending
    extra: np.ndarray | None  # the per-call ones, checked (None: none)
    mask: np.ndarray | None  # small path: 0.0 for allowed ids, -inf for banned ones, added to the logits
    negated_mask: np.ndarray | None  # its negation (+inf for banned ids), from which _pick subtracts the logits


class SamplerChain:
    """Applies the configured steps to a batch of logits and draws one token per row."""

    def __init__(self, settings: SamplerSettings, vocab_size: int, banned_ids: Sequence[int] = ()):
        validate(settings)
        if int(vocab_size) < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.settings = settings
        self.vocab_size = int(vocab_size)
        self.greedy = settings.temperature <= 0
        self.banned_ids = self._check_ids(banned_ids, "banned_ids")
        if self.banned_ids.size >= self.vocab_size:
            raise ValueError("banned_ids cover the whole vocabulary")
        self.step_names = tuple(
            name for name in resolve_order(settings.order) if not (self.greedy and name in _SAMPLING_ONLY_STEPS)
        )
        self.steps = [step for step in map(self._build_step, self.step_names) if step is not None]
        self._banning = [step for step in self.steps if isinstance(step, _BanningStep)]
        self._filters = [step for step in self.steps if isinstance(step, _Filter)]
        self._choose_small_path()
        self._work: np.ndarray | None = None  # general path: float64 batch buffer reused across calls
        self._row = np.empty(self.vocab_size)  # small path: work rows reused across calls
        self._neg = np.empty(self.vocab_size)
        self._scratch = _Scratch()
        self._ban_cache: dict[tuple, _Bans] = {}
        self._base_bans = self._make_bans()

    def _choose_small_path(self) -> None:
        """Decide whether rows take the small path and how (see ``_small_row``)."""
        # Temperature alone among the filters: the row is scaled where it is and never sorted.
        alone = self._filters[0] if len(self._filters) == 1 else None
        self._dense_temperature = alone if isinstance(alone, TemperatureStep) else None
        self._sorting = bool(self._filters) and self._dense_temperature is None
        # On wider rows a leading top-k or min-p cuts the row with one O(V) mask before the sort (and is done).
        first = self._filters[0] if self._filters else None
        cuts = isinstance(first, (TopKStep, MinPStep)) and self.vocab_size >= _PREFILTER_FROM
        self._prefilter = first if cuts else None
        self._sorted_filters = self._filters[1:] if cuts else self._filters
        self._small = (
            self.vocab_size <= SMALL_VOCAB
            # every banning step before the first filter: true for both preset orders; an explicit order that
            # bans after filtering takes the general path
            and self.steps == self._banning + self._filters
            # sorting a whole wide row costs more than the general path's bins
            and (cuts or not self._sorting or self.vocab_size <= _SORT_ALL_LIMIT)
        )
        # sample() on the small path: prefix cuts as counts, one exp shared by top-p and the draw (see _pick). Top-k,
        # top-p and min-p in any order, temperature last or absent; a temperature between filters (the "hf"
        # order, for comparing with transformers) takes _small_row, which scales before the later filters.
        last = self._sorted_filters[-1] if self._sorted_filters else None
        self._final_temperature = last if isinstance(last, TemperatureStep) else None
        self._prefix_filters = self._sorted_filters[:-1] if self._final_temperature else self._sorted_filters
        self._prefix_pick = (
            self._small and self._sorting and not self.greedy
            and all(isinstance(step, (TopKStep, TopPStep, MinPStep)) for step in self._prefix_filters)
        )
        self._dense_pick = self._small and not self._sorting and not self.greedy
        # Batches (``--n``) on these paths run as [B, V] arrays, a few numpy calls per step for all rows.
        self._whole_batch = self._dense_pick or (self._prefix_pick and self._prefilter is None)
        self._cut_plan = _CutPlan.of(self._prefix_filters)
        # min-p's cut (max logit + log min_p, finite) stops before the removed ids anyway, and top-k / top-p pass
        # them through harmlessly (zero weight)
        self._cut_removed = self._cut_plan.shift is None

    def _build_step(self, name: str) -> _BanningStep | _Filter | None:
        """The step object for ``name``, or None where the settings make it a no-op."""
        s = self.settings
        if name == "penalties":
            neutral = s.repetition_penalty == 1 and s.presence_penalty == 0 and s.frequency_penalty == 0
            if neutral or s.penalty_last_n == 0:
                return None
            return PenaltiesStep(s.repetition_penalty, s.presence_penalty, s.frequency_penalty, s.penalty_last_n)
        if name == "no_repeat_ngram":
            return NoRepeatNGramStep(s.no_repeat_ngram_size) if s.no_repeat_ngram_size > 0 else None
        if name == "top_k":
            return TopKStep(s.top_k) if 0 < s.top_k < self.vocab_size else None
        if name == "typical_p":
            return TypicalStep(s.typical_p) if s.typical_p < 1 else None
        if name == "top_p":
            return TopPStep(s.top_p) if s.top_p < 1 else None
        if name == "min_p":
            return MinPStep(s.min_p) if s.min_p > 0 else None
        if name == "temperature":
            return TemperatureStep(s.temperature) if s.temperature != 1 else None
        raise AssertionError(f"unhandled step {name}")

    def _check_ids(self, ids: Sequence[int], what: str) -> np.ndarray:
        array = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        if array.size and (array[0] < 0 or array[-1] >= self.vocab_size):
            raise ValueError(f"{what} must lie in [0, {self.vocab_size}), got {array[0]}..{array[-1]}")
        return array

    # -- public API ----------------------------------------------------------------------------------------------

    def process(
        self, logits: np.ndarray, history: Sequence[Sequence[int]] | None, extra_banned: Sequence[int] = ()
    ) -> np.ndarray:
        """[B, V] logits -> [B, V] float32 processed logits, -inf for removed tokens; every row keeps at least one
        finite entry. Softmax of a row is the distribution ``sample`` draws from (greedy takes its argmax)."""
        original, history = self._check_batch(logits, history)
        out = np.empty((original.shape[0], self.vocab_size), dtype=np.float32)
        for index, (ids, values) in enumerate(self._rows(original, history, extra_banned)):
            peak = values.max()
            if abs(peak) > _FLOAT32_MAX:  # would not survive float32: shift (softmax is shift-invariant)
                values = values - peak
            with np.errstate(over="ignore"):  # what falls below -3.4e38 becomes -inf: probability 0 either way
                if ids is None:
                    out[index] = values
                else:
                    out[index].fill(-np.inf)
                    out[index, ids] = values
        return out

    def probabilities(
        self, logits: np.ndarray, history: Sequence[Sequence[int]] | None, extra_banned: Sequence[int] = ()
    ) -> np.ndarray:
        """Softmax of the processed logits, float64 [B, V]; removed and banned tokens get exactly 0."""
        original, history = self._check_batch(logits, history)
        probs = np.zeros((original.shape[0], self.vocab_size))
        for index, view in enumerate(self._rows(original, history, extra_banned)):
            ids, values = _finite(*view)
            probs[index, ids] = _probabilities(values, self._scratch)[0]
        return probs

    def sample(
        self,
        logits: np.ndarray,
        history: Sequence[Sequence[int]] | None,
        rng: np.random.Generator,
        extra_banned: Sequence[int] = (),
    ) -> np.ndarray:
        """One token id per row, int64 [B]: argmax when greedy, otherwise a draw from ``probabilities``."""
        original, history = self._check_batch(logits, history)
        rows = original.shape[0]
        if self._prefix_pick or self._dense_pick:
            bans = self._bans(extra_banned)
            pick = self._pick if self._prefix_pick else self._pick_dense
            if rows == 1:  # rng.random() gives the same stream as rng.random(1), and is cheaper
                return np.array([pick(original[0], history[0], 0, bans, rng.random())], dtype=np.int64)
            if self._whole_batch:
                return self._pick_rows(original, history, bans, rng.random(rows))
            return np.array([pick(original[index], history[index], index, bans, uniform)
                             for index, uniform in enumerate(rng.random(rows).tolist())], dtype=np.int64)
        picked = np.empty(rows, dtype=np.int64)
        uniforms = None if self.greedy else [rng.random()] if rows == 1 else rng.random(rows)
        if self._small:  # straight from the sorted candidates, without building the id-ordered view
            bans = self._bans(extra_banned)
            for index in range(rows):
                order, values = self._small_row(original[index], history[index], index, bans)
                if uniforms is None:
                    picked[index] = values.argmax()  # greedy never sorts: values is the dense row
                elif order is None:
                    picked[index] = _draw(None, values, uniforms[index], self._scratch)
                else:
                    picked[index] = _draw_sorted(order, values, uniforms[index])
            return picked
        for index, (ids, values) in enumerate(self._rows(original, history, extra_banned)):
            if uniforms is None:
                best = int(values.argmax())
                picked[index] = best if ids is None else ids[best]
            else:
                picked[index] = _draw(ids, values, uniforms[index], self._scratch)
        return picked

    def sample_one(self, logits: np.ndarray, history: Sequence[int], rng: np.random.Generator) -> int:
        """``sample`` for a batch of one ([1, V] logits, one history), as a plain int: the decode loop's call,
        without wrapping the history or the result on the small path's fast routes."""
        if self._prefix_pick or self._dense_pick:
            original = np.asarray(logits)
            if original.shape == (1, self.vocab_size):
                pick = self._pick if self._prefix_pick else self._pick_dense
                return pick(original[0], history, 0, self._base_bans, rng.random())
        return int(self.sample(logits, [history], rng)[0])

    # -- internals -----------------------------------------------------------------------------------------------

    def _check_batch(
        self, logits: np.ndarray, history: Sequence[Sequence[int]] | None
    ) -> tuple[np.ndarray, Sequence[Sequence[int]]]:
        original = np.asarray(logits)
        if original.ndim != 2 or original.shape[1] != self.vocab_size:
            raise ValueError(f"logits must have shape [batch, {self.vocab_size}], got {list(original.shape)}")
        if history is None:  # no step that reads the history can then find anything
            history = [()] * original.shape[0]
        if len(history) != original.shape[0]:
            raise ValueError(f"history has {len(history)} rows for a batch of {original.shape[0]}")
        return original, history

    def _bans(self, extra_banned: Sequence[int]) -> _Bans:
        """Every banned id for this call, remembered per distinct extras list: the decode loop and evaluation
        pass the same one (eos below min_new_tokens) at every step."""
        if not len(extra_banned):
            return self._base_bans
        try:
            key = tuple(extra_banned)
            cached = self._ban_cache.get(key)
        except TypeError:  # unhashable entries (e.g. a 2-D array): check them every time
            return self._make_bans(extra_banned)
        if cached is None:
            if len(self._ban_cache) >= _BAN_CACHE_SIZE:
                self._ban_cache.clear()
            cached = self._ban_cache[key] = self._make_bans(extra_banned)
        return cached

    def _make_bans(self, extra_banned: Sequence[int] = ()) -> _Bans:
        extra = self._check_ids(extra_banned, "extra_banned") if len(extra_banned) else None
        ids = self.banned_ids if extra is None else np.union1d(self.banned_ids, extra)
        if not self._small:
            return _Bans(ids, extra, None, None)
        mask = np.zeros(self.vocab_size)
        mask[ids] = -np.inf
        return _Bans(ids, extra, mask, -mask)

    def _rows(
        self, original: np.ndarray, history: Sequence[Sequence[int]], extra_banned: Sequence[int]
    ) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
        """Each processed row as a view: (None, the whole row with -inf for removed ids) or (ascending ids,
        their finite logits). A small-path view lives in reused buffers: use it before taking the next."""
        bans = self._bans(extra_banned)
        if not self._small:
            for row in self._run(original, history, bans.ids, bans.extra):
                yield row.view()
            return
        for index in range(original.shape[0]):
            order, values = self._small_row(original[index], history[index], index, bans)
            if order is None:
                yield None, values
            else:
                by_id = order.argsort()
                yield order[by_id], np.negative(values[by_id])

    def _small_row(
        self, original: np.ndarray, history: Sequence[int], slot: int, bans: _Bans
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """One row through the chain without _Row: (None, the dense work row) when no filter sorts, else
        (ids, negated logits), most likely first. After the banning steps the finite logits are sorted once
        (descending, equal ones by lower id, as the general path's stable sorts order them); then top-k, top-p
        and min-p each keep a prefix, typical-p a subset and temperature scales, so no filter sorts again or
        builds a mask. Every numpy call here is one of a few dozen per token: at V ~ 65 calls are the cost."""
        if self._sorting:
            order, neg = self._small_sorted(original, history, slot, bans)
            for step in self._sorted_filters:
                neg, order = step.narrow_sorted(neg, order)
            return order, neg
        row = self._small_banned(original, history, slot, bans)
        if row is None:
            return None, self._small_fallback(original, bans.extra)
        if self._dense_temperature is not None:
            self._dense_temperature.divide_in_place(row)
        return None, row

    def _small_banned(
        self, original: np.ndarray, history: Sequence[int], slot: int, bans: _Bans
    ) -> np.ndarray | None:
        """The row with the bans, NaN/+inf cleaned and the banning steps applied (a reused buffer), or None when
        nothing is left."""
        # Copy and ban in one call: x + 0.0 == x, and whatever a banned id held (+inf, NaN) becomes -inf or NaN,
        # which _sanitize turns into -inf.
        row = np.add(original, bans.mask, out=self._row)
        peak = row[row.argmax()]  # argmax (a NaN if there is one) is a plain C call; max is not
        if peak != peak or peak == np.inf:  # NaN or +inf somewhere: see _sanitize
            _sanitize(row)
            peak = row.max()
        if peak == -np.inf:
            return None
        for step in self._banning:
            row = step.edit_small(row, history, slot)
            if row[row.argmax()] == -np.inf:
                return None
        return row

    def _small_sorted(
        self, original: np.ndarray, history: Sequence[int], slot: int, bans: _Bans
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, negated logits) of every finite candidate after the banning steps (and a leading top-k / min-p
        cut on wide rows), sorted once: most likely first, equal ones by lower id, as the general path's stable
        sorts order them. At least one candidate (the fallback when nothing is left)."""
        row = self._small_banned(original, history, slot, bans)
        if row is None:
            token, value = self._fallback_choice(original, bans.extra)
            return np.array([token], dtype=np.int64), np.array([-value])
        neg = np.negative(row, out=self._neg)
        if self._prefilter is None:
            order = neg.argsort(kind="stable")
            neg = neg[order]
        else:
            kept = self._prefilter.mask(row, self._scratch).nonzero()[0]  # ascending, so ties stay by id
            neg = neg[kept]
            by_logit = neg.argsort(kind="stable")
            order, neg = kept[by_logit], neg[by_logit]
        finite = neg.searchsorted(np.inf)  # removed ids (+inf here) sort last
        return order[:finite], neg[:finite]

    def _pick(self, original: np.ndarray, history: Sequence[int], slot: int, bans: _Bans, uniform: float) -> int:
        """``sample`` for one row when every filter keeps a prefix of the sorted candidates (top-k, top-p, min-p in
        any order, then an optional temperature): the cuts are counts into one sorted array, the probabilities
        top-p computes are raised to 1/T for the draw instead of exponentiating again, and a lone survivor needs
        no draw. Same choices as ``_small_row`` + ``_draw_sorted`` (the weights differ by rounding only); about half
        the numpy calls, which at V ~ 65 are the whole cost."""
        order, neg = self._sorted_candidates(original, history, slot, bans)
        count, weights = self._cut(neg)
        if count == 1:
            return int(order[0])
        if count <= _PYTHON_DRAW_LIMIT:
            return self._draw_few(order, neg, count, weights, uniform)
        if weights is None:
            weights = np.exp(np.subtract(neg[0], neg[:count]))
        else:
            weights = weights[:count]
        if self._final_temperature is not None:  # exp((max - logit) / T) = exp(max - logit) ** (1 / T)
            weights = np.power(weights, 1.0 / self._final_temperature.temperature, out=weights)
        by_id = order[:count].argsort()  # draw in id order, as _draw does: a seed picks the same token
        weights = weights[by_id]
        cumulative = _running_sum(weights)
        index = int(cumulative.searchsorted(uniform * cumulative[-1], side="right"))
        if index >= count or weights[index] == 0:  # rounding at the top end
            index = int(weights.nonzero()[0][-1])
        return int(order[by_id[index]])

    def _draw_few(
        self, order: np.ndarray, neg: np.ndarray, count: int, weights: np.ndarray | None, uniform: float
    ) -> int:
        """The end of ``_pick`` for a handful of candidates in plain Python floats, which beats six numpy calls:
        the same weights up to rounding, the same id-order running sum (added left to right, as numpy does)."""
        if weights is None:
            top = float(neg[0])
            values = [math.exp(top - value) for value in neg[:count].tolist()]
        else:
            values = weights[:count].tolist()
        if self._final_temperature is not None:
            power = 1.0 / self._final_temperature.temperature
            values = [value**power for value in values]
        pairs = sorted(zip(order[:count].tolist(), values, strict=True))  # ids are distinct: sorted by id
        running = list(itertools.accumulate(weight for _, weight in pairs))
        index = bisect.bisect_right(running, uniform * running[-1])  # = searchsorted(side="right")
        if index >= count or pairs[index][1] == 0:  # rounding at the top end
            index = max(position for position, (_, weight) in enumerate(pairs) if weight)
        return pairs[index][0]

    def _cut(self, neg: np.ndarray) -> tuple[int, np.ndarray | None]:
        """How many sorted candidates the filters keep, and top-p's weights exp(max - logit) when it ran.

        Top-k's and min-p's cuts do not depend on what came before them (thresholds from the k-th and the
        first candidate, which no earlier cut moves), so they go first; top-p's does (its mass is the prefix's),
        so it runs last on the prefix the steps before it left, and not at all once one candidate is left."""
        size = neg.size
        plan = self._cut_plan
        values = neg.tolist()  # bisect on a list: ~0.1 µs a search against ~0.5 µs for ndarray.searchsorted
        count_k = size if plan.kth is None or plan.kth >= size else bisect.bisect_right(values, values[plan.kth])
        count_m = size if plan.shift is None else bisect.bisect_right(values, values[0] + plan.shift)
        count = min(count_k, count_m)
        if count == 1 or plan.top_p is None:
            return count, None
        top_p_input = min(count_k if plan.k_before_p else size, count_m if plan.m_before_p else size)
        weights = np.exp(np.subtract(values[0], neg[:top_p_input]))
        cumulative = _running_sum(weights)
        target = plan.top_p * cumulative.item(-1)
        if cumulative.item(count - 2) < target:  # top-p's cut lies at ``count`` or beyond: no search needed
            return count, weights
        return int(cumulative.searchsorted(target, "left")) + 1, weights

    def _pick_rows(
        self, original: np.ndarray, history: Sequence[Sequence[int]], bans: _Bans, uniforms: np.ndarray
    ) -> np.ndarray:
        """``_pick`` / ``_pick_dense`` for a whole batch at once: the same cuts and the same id-order draw as
        [B, V] array operations (removed candidates get weight 0, which leaves every running sum unchanged),
        so each row picks what it would alone, up to rounding. Rows with NaN or +inf logits, or with nothing
        left, are done one by one the careful way."""
        neg = np.subtract(bans.negated_mask, original, dtype=np.float64)
        if self._banning:  # a per-row Python loop: skipped when no step bans anything (it costs at batch 32)
            for index, step_row in enumerate(neg):
                for step in self._banning:
                    edited = step.edit_small_negated(step_row, history[index], index)
                    if edited is not step_row:
                        step_row[:] = edited
        if self._dense_pick:
            ranked, lowest = None, neg.min(axis=1, keepdims=True)  # -(max logit); NaN if the row holds one
            first = lowest[:, 0]
        else:
            ranked = neg.argsort(axis=1, kind="stable")
            neg = np.take_along_axis(neg, ranked, axis=1)
            first = neg[:, 0]
        careful = ~np.isfinite(first)
        if ranked is not None:
            careful |= np.isnan(neg[:, -1])
        any_careful = bool(careful.any())
        if any_careful:  # keeps the arithmetic below quiet; these rows are redone one by one
            neg[careful] = 0.0
            if ranked is None:
                lowest[careful] = 0.0
        if ranked is None:
            weights = self._dense_weights(neg, lowest)
            picked = _draw_rows(weights, uniforms)
        else:
            weights = self._prefix_weights(neg)
            dense = np.zeros_like(weights)
            np.put_along_axis(dense, ranked, weights, axis=1)  # back to id order, as the single-row draw sums
            picked = _draw_rows(dense, uniforms)
        if any_careful:
            pick = self._pick_dense if self._dense_pick else self._pick
            for index in np.flatnonzero(careful).tolist():
                picked[index] = pick(original[index], history[index], index, bans, float(uniforms[index]))
        return picked

    def _dense_weights(self, neg: np.ndarray, lowest: np.ndarray) -> np.ndarray:
        """exp((logit - max logit) / T) per row of the (negated) batch, 0 for removed ids; ``lowest`` is each
        row's minimum as a [B, 1] column."""
        weights = np.subtract(lowest, neg)
        if self._dense_temperature is not None:
            weights *= 1.0 / self._dense_temperature.temperature
        return np.exp(weights, out=weights)

    def _prefix_weights(self, neg: np.ndarray) -> np.ndarray:
        """The draw weights of each sorted row (negated logits, ascending): exp((max - logit) / T) for the
        candidates the prefix filters keep (``_cut`` for all rows at once), 0 for the rest."""
        rows, size = neg.shape
        plan = self._cut_plan
        finite = (neg < np.inf).sum(axis=1)  # removed ids (+inf) sort last
        count_k = count_m = finite
        if plan.kth is not None and plan.kth < size:
            count_k = np.minimum(finite, (neg <= neg[:, plan.kth : plan.kth + 1]).sum(axis=1))  # ties kept
        if plan.shift is not None:
            count_m = np.minimum(finite, (neg <= neg[:, :1] + plan.shift).sum(axis=1))
        count = np.minimum(count_k, count_m)
        columns = np.arange(size)
        weights = np.exp(np.subtract(neg[:, :1], neg))
        if plan.top_p is not None:
            top_p_input = np.minimum(count_k if plan.k_before_p else finite, count_m if plan.m_before_p else finite)
            mass = np.where(columns < top_p_input[:, None], weights, 0.0)
            cumulative = np.cumsum(mass, axis=1)
            target = plan.top_p * cumulative[:, -1:]
            count = np.minimum(count, (cumulative < target).sum(axis=1) + 1)  # searchsorted(side="left") + 1
        if self._final_temperature is not None:
            np.power(weights, 1.0 / self._final_temperature.temperature, out=weights)
        weights[columns >= count[:, None]] = 0.0
        return weights

    def _pick_dense(self, original: np.ndarray, history: Sequence[int], slot: int, bans: _Bans, uniform: float) -> int:
        """``sample`` for one row when no filter cuts (temperature alone, or nothing): the draw straight from the
        whole row, negated while it is banned as in ``_sorted_candidates``."""
        neg = np.subtract(bans.negated_mask, original, out=self._neg)
        for step in self._banning:
            neg = step.edit_small_negated(neg, history, slot)
        low = neg[neg.argmin()]  # -(max logit); argmin stops at a NaN
        if low != low or low == -np.inf or low == np.inf:  # NaN, +inf logit, or nothing left: the careful way
            _, values = self._small_row(original, history, slot, bans)
            return _draw(None, values, uniform, self._scratch)
        weights = np.subtract(low, neg, out=self._row)  # logit - max logit: <= 0, -inf for removed ids
        if self._dense_temperature is not None:
            weights *= 1.0 / self._dense_temperature.temperature
        np.exp(weights, out=weights)
        cumulative = _running_sum(weights, out=self._scratch.get("cumulative", weights.size))
        index = int(cumulative.searchsorted(uniform * cumulative[-1], side="right"))
        if index >= weights.size or weights[index] == 0:  # rounding at the top end
            index = int(weights.nonzero()[0][-1])
        return index

    def _sorted_candidates(
        self, original: np.ndarray, history: Sequence[int], slot: int, bans: _Bans
    ) -> tuple[np.ndarray, np.ndarray]:
        """``_small_sorted`` for ``_pick``, cheaper: the row is negated while it is banned and NaN / +inf rows are
        caught after the sort. Removed ids stay at the end when a min-p cut will drop them anyway."""
        # The row is negated while it is banned (one call for both), and the banning steps work on it negated.
        neg = np.subtract(bans.negated_mask, original, out=self._neg)
        for step in self._banning:
            neg = step.edit_small_negated(neg, history, slot)
        if self._prefilter is None:
            order = neg.argsort(kind="stable")
            neg = neg[order]
        else:
            kept = self._prefilter.mask(np.negative(neg, out=self._row), self._scratch).nonzero()[0]
            neg = neg[kept]
            by_logit = neg.argsort(kind="stable")
            order, neg = kept[by_logit], neg[by_logit]
        if not neg.size:  # a NaN row cut by a leading top-k / min-p
            return self._small_sorted(original, history, slot, bans)
        first, last = neg.item(0), neg.item(-1)  # Python floats: cheaper to compare than numpy scalars
        if first in (-math.inf, math.inf) or last != last:
            # A +inf logit sorts first, a NaN last, and a row with nothing left starts with +inf: all rare, so
            # they are checked here rather than before the work; _small_sorted cleans the row first.
            return self._small_sorted(original, history, slot, bans)
        if self._cut_removed and last == math.inf:  # removed ids (+inf here) sort last
            finite = neg.searchsorted(np.inf)
            neg, order = neg[:finite], order[:finite]
        return order, neg

    def _small_fallback(self, original: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        """``_fall_back`` as a dense row (a reused buffer)."""
        token, value = self._fallback_choice(original, extra)
        self._row.fill(-np.inf)
        self._row[token] = value
        return self._row

    def _run(
        self,
        original: np.ndarray,
        history: Sequence[Sequence[int]],
        bans: np.ndarray,
        extra: np.ndarray | None,
    ) -> list[_Row]:
        """The general path: the whole batch in one reused float64 buffer, each row with its candidate set."""
        work = self._load(original)
        work[:, bans] = -np.inf
        rows = [_Row(work[index], history[index], self._scratch) for index in range(work.shape[0])]
        for index, row in enumerate(rows):
            self._process_row(row, original[index], extra)
        return rows

    def _process_row(self, row: _Row, original: np.ndarray, extra: np.ndarray | None) -> None:
        if not row.has_candidates():
            self._fall_back(row, original, extra)
            return
        for step in self.steps:
            step.apply(row)
            if row.may_be_empty:
                row.may_be_empty = False
                if not row.has_candidates():
                    self._fall_back(row, original, extra)
                    return

    def _load(self, logits: np.ndarray) -> np.ndarray:
        """The batch as float64 in a buffer reused across calls (a fresh 50k-wide array per step costs page
        faults), with NaN -> -inf (removed) and +inf -> a huge finite logit, so no step can produce NaN."""
        if self._work is None or self._work.shape != logits.shape:
            self._work = np.empty(logits.shape, dtype=np.float64)
        work = self._work
        np.copyto(work, logits, casting="unsafe")
        _sanitize(work)
        return work

    def _fallback_choice(self, original: np.ndarray, extra: np.ndarray | None) -> tuple[int, float]:
        """Everything was removed (bans + no-repeat): the argmax of the original logits among the allowed ids;
        if the per-call bans leave nothing, among the ids the constructor allowed. (id, its logit)."""
        base = np.ones(self.vocab_size, dtype=bool)
        base[self.banned_ids] = False
        allowed = base.copy()
        if extra is not None:
            allowed[extra] = False
        ids = np.flatnonzero(allowed if allowed.any() else base)
        values = np.array(original[ids], dtype=np.float64)
        _sanitize(values)
        best = int(np.argmax(values))
        return int(ids[best]), float(values[best]) if np.isfinite(values[best]) else 0.0

    def _fall_back(self, row: _Row, original: np.ndarray, extra: np.ndarray | None) -> None:
        token, value = self._fallback_choice(original, extra)
        row.logits.fill(-np.inf)
        row.logits[token] = value
        row.reset_support()


_PYTHON_DRAW_LIMIT = 8  # _pick draws among at most this many candidates in plain Python
_running_sum = np.add.accumulate  # ndarray.cumsum's result; ~0.4 µs cheaper a call on short rows


def _sanitize(values: np.ndarray) -> None:
    peak = values.max() if values.size else 0.0
    if np.isnan(peak) or peak == np.inf:
        np.nan_to_num(values, copy=False, nan=-np.inf, posinf=_HUGE_LOGIT, neginf=-np.inf)


def _draw(ids: np.ndarray | None, values: np.ndarray, uniform: float, scratch: _Scratch) -> int:
    """Inverse-CDF draw over a view (a dense view is drawn from in place: the position is the token id);
    zero-probability entries can never be hit."""
    peak = values[values.argmax()]  # argmax is a plain C call; max goes through a Python wrapper
    weights = np.subtract(values, peak, out=scratch.get("weights", values.size))
    np.exp(weights, out=weights)
    cumulative = weights.cumsum(out=scratch.get("cumulative", values.size))
    index = int(cumulative.searchsorted(uniform * cumulative[-1], side="right"))
    if index >= weights.size or weights[index] == 0:  # rounding at the top end
        index = int(np.flatnonzero(weights)[-1])
    return index if ids is None else int(ids[index])


def _draw_rows(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """``_draw`` for each row of a [B, V] weight array in id order (every row has a positive weight)."""
    cumulative = weights.cumsum(axis=1)
    targets = uniforms * cumulative[:, -1]
    picked = (cumulative <= targets[:, None]).sum(axis=1)  # searchsorted(side="right"), row by row
    # The first entry whose running sum exceeds the target has a positive weight (else the entry before it would
    # exceed the target too), so only rounding at the top end (target >= the total) needs fixing.
    size = weights.shape[1]
    if picked.max() >= size:
        for row in (picked >= size).nonzero()[0].tolist():
            picked[row] = int(weights[row].nonzero()[0][-1])
    return picked.astype(np.int64, copy=False)


def _draw_sorted(order: np.ndarray, neg: np.ndarray, uniform: float) -> int:
    """``_draw`` over the small path's sorted candidates, with the same result: the cumulative sum runs in id
    order, so a seed picks the same token on either path."""
    by_id = order.argsort()
    weights = np.exp(np.subtract(neg[0], neg))[by_id]  # exp(logit - max logit), ids ascending
    cumulative = weights.cumsum()
    index = int(cumulative.searchsorted(uniform * cumulative[-1], side="right"))
    if index >= weights.size or weights[index] == 0:  # rounding at the top end
        index = int(weights.nonzero()[0][-1])
    return int(order[by_id[index]])
