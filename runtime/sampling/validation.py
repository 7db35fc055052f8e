"""Parsing and validation of sampler settings into one-line ``SettingError`` messages.

Each setting has one rule (a converter and a range) in ``RULES``; the ranges are small objects rather than
closures so that tests can draw valid values from them, which is how the shared property tests cover a new
setting without new test code. The step names an ``order`` may list come from the step registry
(``runtime.sampling.steps.REGISTRY``), read at call time.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from runtime.sampling.registry import REGISTRY
from runtime.sampling.settings import ALIASES, PRESET_ORDERS, SETTING_NAMES, SamplerSettings, SettingError


def step_names() -> tuple[str, ...]:
    """Every registered step, in registry order."""
    return tuple(REGISTRY)


# ----------------------------------------------------------------------------------------------------------------
# Converters


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
    names = step_names()
    if not isinstance(order, str):
        raise SettingError(f"order must be 'llama', 'hf' or a comma list of steps, got {_show(order)}")
    text = order.strip().lower()
    if text in PRESET_ORDERS:
        return PRESET_ORDERS[text]
    steps = tuple(part.strip() for part in text.split(","))
    if not text or any(not step for step in steps):
        raise SettingError(f"order must be 'llama', 'hf' or a comma list of {', '.join(names)}; got {order!r}")
    for step in steps:
        if step not in names:
            raise SettingError(f"order: unknown step {step!r} (steps: {', '.join(names)})")
    if len(set(steps)) != len(steps):
        raise SettingError(f"order names a step twice: {order!r}")
    return steps


def _as_strings(name: str, value: object) -> str:
    """A list of strings, as canonical JSON text: from a list, JSON list text, or one comma-free string list
    ``a,b`` (JSON is the way to name a comma)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise SettingError(f"{name}: not a JSON list of strings ({error.msg}): {value!r}") from None
        else:
            value = [part for part in value.split(",") if part] if value else []
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise SettingError(f"{name} must be a list of strings, got {_show(value)}")
    return json.dumps(list(value))


def parse_bias(name: str, raw: object) -> float:
    """A logit bias: a finite number or -inf (which removes the token)."""
    if isinstance(raw, str) and raw.strip().lower() in ("-inf", "-infinity"):
        return -math.inf
    return _as_float(name, raw)


def _as_bias_map(name: str, value: object) -> str:
    """token text or #id -> bias, as canonical JSON text (-inf written as the string "-inf")."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as error:
            raise SettingError(f"{name}: not a JSON object of token -> bias ({error.msg}): {value!r}") from None
    if not isinstance(value, dict) or not all(isinstance(key, str) and key for key in value):
        raise SettingError(f"{name} must map token texts (or #id) to biases, got {_show(value)}")
    canonical: dict[str, object] = {}
    for key, raw in value.items():
        bias = parse_bias(f"{name} {key!r}", raw)
        canonical[key] = "-inf" if bias == -math.inf else bias
    return json.dumps(canonical)


def _as_order(name: str, value: object) -> str:
    steps = resolve_order(value)  # type: ignore[arg-type]
    text = str(value).strip().lower()
    return text if text in PRESET_ORDERS else ",".join(steps)


# ----------------------------------------------------------------------------------------------------------------
# Ranges


@dataclass(frozen=True)
class FloatRange:
    """A range check producing messages such as "top_p must be in (0, 1], got 2"; None bounds are open-ended."""

    low: float | None
    high: float | None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __call__(self, name: str, value: float) -> None:
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (too_low or too_high):
            return
        if self.high is None:
            wanted = f"{'>' if self.low_open else '>='} {_show(self.low)}"
        else:
            wanted = (f"in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}"
                      f"{')' if self.high_open else ']'}")
        raise SettingError(f"{name} must be {wanted}{self.note}, got {_show(value)}")


@dataclass(frozen=True)
class TemperatureRange(FloatRange):
    """0 (greedy) or a normal float: dividing by a subnormal temperature (below 2.2e-308) turns every logit into an
    infinity, where no cut or draw means anything; tiny normal ones such as 1e-30 still work as near-greedy."""

    smallest: float = sys.float_info.min

    def __call__(self, name: str, value: float) -> None:
        super().__call__(name, value)
        if 0.0 < value < self.smallest:
            raise SettingError(f"{name} must be 0 (greedy) or at least {_show(self.smallest)}, got {_show(value)}")


@dataclass(frozen=True)
class IntAtLeast:
    minimum: int
    note: str = ""

    def __call__(self, name: str, value: int) -> None:
        if value < self.minimum:
            raise SettingError(f"{name} must be an integer >= {self.minimum}{self.note}, got {value}")


@dataclass(frozen=True)
class IntChoice:
    """An integer among a few values, e.g. mirostat 0, 1 or 2."""

    choices: tuple[int, ...]
    note: str = ""

    def __call__(self, name: str, value: int) -> None:
        if value not in self.choices:
            wanted = ", ".join(str(choice) for choice in self.choices)
            raise SettingError(f"{name} must be one of {wanted}{self.note}, got {value}")


def _no_check(name: str, value: object) -> None:
    return None


# name -> (converter from str/JSON value, range check)
RULES: dict[str, tuple[Callable[[str, object], object], Callable[[str, object], None]]] = {
    "temperature": (_as_float, TemperatureRange(0.0, None, note=" (0 = greedy)")),
    "top_k": (_as_int, IntAtLeast(0, " (0 = off)")),
    "top_p": (_as_float, FloatRange(0.0, 1.0, low_open=True)),
    "min_p": (_as_float, FloatRange(0.0, 1.0)),
    "typical_p": (_as_float, FloatRange(0.0, 1.0, low_open=True)),
    "repetition_penalty": (_as_float, FloatRange(0.0, None, low_open=True)),
    "presence_penalty": (_as_float, FloatRange(None, None)),
    "frequency_penalty": (_as_float, FloatRange(None, None)),
    "penalty_last_n": (_as_int, IntAtLeast(-1, " (-1 = whole history, 0 = off)")),
    "no_repeat_ngram_size": (_as_int, IntAtLeast(0, " (0 = off)")),
    "dry_multiplier": (_as_float, FloatRange(0.0, None, note=" (0 = off)")),
    "dry_base": (_as_float, FloatRange(1.0, None)),
    "dry_allowed_length": (_as_int, IntAtLeast(1)),
    "dry_penalty_last_n": (_as_int, IntAtLeast(-1, " (-1 = whole history, 0 = off)")),
    "dry_sequence_breakers": (_as_strings, _no_check),
    "xtc_probability": (_as_float, FloatRange(0.0, 1.0, note=" (0 = off)")),
    "xtc_threshold": (_as_float, FloatRange(0.0, 1.0, note=" (> 0.5 = off)")),
    "top_n_sigma": (_as_float, FloatRange(None, None)),
    "dynatemp_range": (_as_float, FloatRange(0.0, None, note=" (0 = off)")),
    "dynatemp_exponent": (_as_float, FloatRange(0.0, None, low_open=True)),
    "mirostat": (_as_int, IntChoice((0, 1, 2), " (0 = off, 1 = Mirostat, 2 = Mirostat 2.0)")),
    "mirostat_tau": (_as_float, FloatRange(0.0, None, low_open=True)),
    "mirostat_eta": (_as_float, FloatRange(0.0, 1.0, low_open=True)),
    "logit_bias": (_as_bias_map, _no_check),
    "ban": (_as_strings, _no_check),
    "order": (_as_order, _no_check),
    "seed": (_as_seed, _no_check),
}


_TEXT_SETTINGS = ("order", "dry_sequence_breakers", "logit_bias", "ban")  # settings whose value is text

# ----------------------------------------------------------------------------------------------------------------
# Parsing


def canonical_name(key: str) -> str:
    """Resolve aliases and spelling variants (case, '-' for '_'); raise SettingError for unknown keys."""
    name = str(key).strip().lower().replace("-", "_")
    name = ALIASES.get(name, name)
    if name in RULES:
        return name
    close = difflib.get_close_matches(name, [*SETTING_NAMES, *ALIASES], n=1)
    hint = f"; did you mean {ALIASES.get(close[0], close[0])}?" if close else f" (settings: {', '.join(SETTING_NAMES)})"
    raise SettingError(f"unknown setting {str(key)!r}{hint}")


def parse_setting(key: str, raw: object) -> tuple[str, object]:
    """``("temp", "0.7") -> ("temperature", 0.7)``: resolve the alias, convert, validate the range."""
    name = canonical_name(key)
    convert, check = RULES[name]
    value = convert(name, raw)
    check(name, value)
    return name, value


def validate(settings: SamplerSettings) -> None:
    """Raise SettingError (one line) unless every field has a usable type and range."""
    for name, (convert, check) in RULES.items():
        value = getattr(settings, name)
        if isinstance(value, str) != (name in _TEXT_SETTINGS):  # other strings are user text: parse_setting
            # converts those
            raise SettingError(f"{name} has the wrong type: {_show(value)}")
        if convert is _as_int and not isinstance(value, (int, np.integer)):
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
