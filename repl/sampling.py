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

Speed: the vocabulary can be 50k wide and the decode loop calls this once per token, so nothing sorts the whole
row. top-k finds its cut from a strided sample plus a small partition, and every later step works on the small
candidate set; top_p/typical_p without top_k bin the tokens by surprise (O(V)) and sort only the bins up to the
cut. Work arrays are reused across calls, so a SamplerChain serves one thread at a time.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol

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
    order = np.argsort(key, kind="stable")
    cumulative = np.cumsum(probs[order])
    hit = int(np.searchsorted(cumulative, mass, side="left"))
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


class PenaltiesStep:
    """Repetition (HF/CTRL), presence and frequency penalties over the last ``last_n`` history tokens."""

    def __init__(self, repetition: float, presence: float, frequency: float, last_n: int):
        self.repetition, self.presence, self.frequency, self.last_n = repetition, presence, frequency, last_n

    def apply(self, row: _Row) -> None:
        history = row.history if self.last_n < 0 else _tail(row.history, self.last_n)
        ids = _valid_ids(history, row.logits.size)
        if ids.size == 0:
            return
        tokens, counts = np.unique(ids, return_counts=True)
        values = row.logits[tokens]
        if self.repetition != 1.0:
            values = np.where(values < 0, values * self.repetition, values / self.repetition)
        values = values - (self.presence + self.frequency * counts)
        if np.isneginf(values).any():  # an absurd penalty can overflow a finite logit to -inf
            row.may_be_empty = True
        row.logits[tokens] = values


class NoRepeatNGramStep:
    """Ban every token that would complete an n-gram already present in the history (HF semantics)."""

    def __init__(self, size: int):
        self.size = size

    def apply(self, row: _Row) -> None:
        history = np.asarray(row.history, dtype=np.int64).reshape(-1)
        if history.size < self.size:
            return
        if self.size == 1:
            banned = history
        else:
            prefix = history[history.size - self.size + 1 :]
            windows = sliding_window_view(history, self.size)
            banned = windows[(windows[:, :-1] == prefix).all(axis=1), -1]
        banned = banned[(banned >= 0) & (banned < row.logits.size)]
        row.logits[banned] = -np.inf
        row.may_be_empty = banned.size > 0


class TopKStep:
    """Keep the tokens whose logit is >= the k-th largest logit (ties at the cut all stay, as in HF)."""

    def __init__(self, k: int):
        self.k = k

    def apply(self, row: _Row) -> None:
        ids, values = row.view()
        if values.size > self.k:
            row.keep(ids, values, values >= _kth_largest(values, self.k))


class TypicalStep:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy until their mass
    reaches ``mass`` (HF TypicalLogitsWarper; the cut's key ties are kept)."""

    def __init__(self, mass: float):
        self.mass = mass

    def apply(self, row: _Row) -> None:
        ids, values = row.view()
        probs, log_probs = _probabilities(values, row.scratch)
        terms = row.scratch.get("terms", values.size)
        terms.fill(0.0)
        np.multiply(probs, log_probs, out=terms, where=probs > 0)  # skips 0 * -inf
        entropy = -float(terms.sum())
        key = np.add(log_probs, entropy, out=terms)
        key = np.abs(key, out=key)  # |(-log p) - H|; +inf for removed tokens
        cut = key[_sorted_head(key, probs, self.mass, row.scratch)[-1]]
        row.keep(ids, values, key <= cut)  # HF keeps every token tied with the cut


class TopPStep:
    """Nucleus: keep the smallest set of most probable tokens whose mass reaches ``top_p`` (at least one token;
    among equally probable tokens at the cut the lower ids win, as a stable sort orders them)."""

    def __init__(self, top_p: float):
        self.top_p = top_p

    def apply(self, row: _Row) -> None:
        ids, values = row.view()
        probs, log_probs = _probabilities(values, row.scratch)
        surprise = np.negative(log_probs, out=log_probs)  # ascending surprise = descending probability
        mask = np.zeros(values.size, dtype=bool)
        mask[_sorted_head(surprise, probs, self.top_p, row.scratch)] = True
        row.keep(ids, values, mask)


class MinPStep:
    """Keep the tokens with p >= min_p * p_max, i.e. logit >= max logit + log(min_p)."""

    def __init__(self, min_p: float):
        self.log_min_p = math.log(min_p)

    def apply(self, row: _Row) -> None:
        ids, values = row.view()
        row.keep(ids, values, values >= values.max() + self.log_min_p)


class TemperatureStep:
    """Divide the logits by the temperature (> 1 flattens the distribution, < 1 sharpens it)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def apply(self, row: _Row) -> None:
        ids, values = row.view()
        peak = values.max()
        floor = values.min(initial=np.inf, where=values > -np.inf)
        # A tiny temperature would overflow huge logits: shift first (softmax is shift-invariant).
        shift = peak if float(max(abs(peak), abs(floor))) > _HUGE_LOGIT * self.temperature else 0.0
        if ids is None:  # dense: in place, no 50k-wide temporaries
            if shift:
                np.subtract(row.logits, shift, out=row.logits)
            np.divide(row.logits, self.temperature, out=row.logits)
        else:
            row.logits[ids] = (values - shift) / self.temperature


def _tail(history: Sequence[int], count: int) -> Sequence[int]:
    try:
        return history[-count:]
    except TypeError:  # an iterable without slicing (e.g. a deque)
        return list(history)[-count:]


def _valid_ids(tokens: Sequence[int], vocab_size: int) -> np.ndarray:
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    return ids[(ids >= 0) & (ids < vocab_size)]


# ----------------------------------------------------------------------------------------------------------------
# The chain


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
        self._work: np.ndarray | None = None  # float64 batch buffer reused across calls (one chain per thread)
        self._scratch = _Scratch()

    def _build_step(self, name: str) -> Step | None:
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
        rows = self._run(logits, history, extra_banned)
        out = np.empty((len(rows), self.vocab_size), dtype=np.float32)
        for index, row in enumerate(rows):
            peak = row.logits.max()
            if abs(peak) > _FLOAT32_MAX:  # would not survive float32: shift (softmax is shift-invariant)
                row.logits -= peak
            with np.errstate(over="ignore"):  # what falls below -3.4e38 becomes -inf: probability 0 either way
                out[index] = row.logits
        return out

    def probabilities(
        self, logits: np.ndarray, history: Sequence[Sequence[int]] | None, extra_banned: Sequence[int] = ()
    ) -> np.ndarray:
        """Softmax of the processed logits, float64 [B, V]; removed and banned tokens get exactly 0."""
        rows = self._run(logits, history, extra_banned)
        probs = np.zeros((len(rows), self.vocab_size))
        for index, row in enumerate(rows):
            ids, values = row.candidates()
            probs[index, ids] = _probabilities(values, row.scratch)[0]
        return probs

    def sample(
        self,
        logits: np.ndarray,
        history: Sequence[Sequence[int]] | None,
        rng: np.random.Generator,
        extra_banned: Sequence[int] = (),
    ) -> np.ndarray:
        """One token id per row, int64 [B]: argmax when greedy, otherwise a draw from ``probabilities``."""
        rows = self._run(logits, history, extra_banned)
        if self.greedy:
            return np.array([int(np.argmax(row.logits)) for row in rows], dtype=np.int64)
        uniforms = rng.random(len(rows))
        return np.array([_draw(row, u) for row, u in zip(rows, uniforms, strict=True)], dtype=np.int64)

    # -- internals -----------------------------------------------------------------------------------------------

    def _run(
        self, logits: np.ndarray, history: Sequence[Sequence[int]] | None, extra_banned: Sequence[int]
    ) -> list[_Row]:
        original = np.asarray(logits)
        if original.ndim != 2 or original.shape[1] != self.vocab_size:
            raise ValueError(f"logits must have shape [batch, {self.vocab_size}], got {list(original.shape)}")
        if history is None:  # no step that reads the history can then find anything
            history = [()] * original.shape[0]
        if len(history) != original.shape[0]:
            raise ValueError(f"history has {len(history)} rows for a batch of {original.shape[0]}")
        work = self._load(original)
        extra = self._check_ids(extra_banned, "extra_banned") if len(extra_banned) else None
        work[:, self.banned_ids] = -np.inf
        if extra is not None:
            work[:, extra] = -np.inf
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

    def _fall_back(self, row: _Row, original: np.ndarray, extra: np.ndarray | None) -> None:
        """Everything was removed (bans + no-repeat): take the argmax of the original logits among the allowed
        ids; if the per-call bans leave nothing, among the ids the constructor allowed."""
        base = np.ones(self.vocab_size, dtype=bool)
        base[self.banned_ids] = False
        allowed = base.copy()
        if extra is not None:
            allowed[extra] = False
        ids = np.flatnonzero(allowed if allowed.any() else base)
        values = np.array(original[ids], dtype=np.float64)
        _sanitize(values)
        best = int(np.argmax(values))
        row.logits.fill(-np.inf)
        row.logits[ids[best]] = values[best] if np.isfinite(values[best]) else 0.0
        row.reset_support()


def _sanitize(values: np.ndarray) -> None:
    peak = values.max() if values.size else 0.0
    if np.isnan(peak) or peak == np.inf:
        np.nan_to_num(values, copy=False, nan=-np.inf, posinf=_HUGE_LOGIT, neginf=-np.inf)


def _draw(row: _Row, uniform: float) -> int:
    """Inverse-CDF draw over the row's candidates; zero-probability entries can never be hit."""
    ids, values = row.view()  # a dense row is drawn from in place: the position is the token id
    weights = np.subtract(values, values.max(), out=row.scratch.get("weights", values.size))
    np.exp(weights, out=weights)
    cumulative = np.cumsum(weights, out=row.scratch.get("cumulative", values.size))
    index = int(np.searchsorted(cumulative, uniform * cumulative[-1], side="right"))
    if index >= weights.size or weights[index] == 0:  # rounding at the top end
        index = int(np.flatnonzero(weights)[-1])
    return index if ids is None else int(ids[index])
