"""Every user-settable generation value, with where its current value came from (for ``:show``).

A value comes from one of SOURCES: the built-in default, the model file's generation defaults, the command
line, or ``:set`` in the session, layered in that order (``build_settings`` for the first three, used by
textgen-repl and textgen-eval alike; ``Settings.set`` for the session). The built-in values come from
runtime.defaults. Sampler keys are parsed and validated by runtime.sampling (one-line SettingError); the
decode-loop keys (max_new_tokens, min_new_tokens, num_beams, stop) are handled here.

``start_with_eos``: whether the first prompt of a session is preceded by the end-of-text token (the document
separator). A property of the model, stored in its file's generation defaults: on for models textgen trains (they
learned documents that follow the separator), off for an imported Hugging Face GPT-2 whose tokenizer adds no BOS,
so a session continues a prompt exactly as transformers' ``generate`` does. Files without the key: on.

``suppress_unk``: never generate the unknown token (it is banned like padding, so the rest of the distribution is
renormalised). Word models trained by textgen set it on in their file: with a capped vocabulary ``<unk>`` stands
for every rare word at once (names, mostly) and is often the single likeliest token, so greedy text would be
``<unk>`` after ``<unk>``. Off by default (older files, char and BPE models, where it rarely matters).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

from runtime.defaults import BUILTIN
from runtime.sampling import ALIASES, SamplerSettings, SettingError, canonical_name, parse_setting
from runtime.sampling.validation import _as_int  # one integer parser for every setting

SOURCES = ("default", "model", "cli", "set")
SAMPLER_KEYS = tuple(f.name for f in fields(SamplerSettings))
LOOP_KEYS = ("max_new_tokens", "min_new_tokens", "num_beams", "stop", "start_with_eos", "suppress_unk")
KEYS = SAMPLER_KEYS + LOOP_KEYS
LOOP_ALIASES = {
    "max_tokens": "max_new_tokens",
    "max_length": "max_new_tokens",
    "n_predict": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "beams": "num_beams",
    "stop_sequences": "stop",
    "stop_strings": "stop",
    "separator": "start_with_eos",
}
MAX_TOKENS_LIMIT = 1_000_000
MAX_BEAMS = 64
MAX_STOP_STRINGS = 16
PRESET_KEY = "sampler"  # a command-line layer's key that applies one of PRESETS rather than a setting

# Preset name -> settings it applies. "sample" is special: it returns the sampler to the model's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0, "num_beams": 1},
    "sample": {},
    "nucleus": {"top_k": 0, "top_p": 0.9, "temperature": 0.8, "num_beams": 1},
    "beam": {"num_beams": 4, "temperature": 0.0, "no_repeat_ngram_size": 2},
    "loop-guard": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
}
PRESET_HELP = {
    "greedy": "always the most likely token (temperature 0)",
    "sample": "back to the model's default sampler settings",
    "nucleus": "top_p 0.9, temperature 0.8, no top_k",
    "beam": "beam search with 4 beams, no repeated bigrams",
    "loop-guard": "repetition_penalty 1.3 and no repeated trigrams (breaks loops)",
}
# One line per setting for ``:help set`` (tests check that every key has one).
SETTING_HELP: dict[str, str] = {
    "temperature": "divide the logits by this (0 = greedy, > 1 flatter)",
    "top_k": "keep the k most likely tokens (0 = off)",
    "top_p": "keep the most likely tokens up to this probability mass (1 = off)",
    "min_p": "keep tokens at least min_p times as likely as the best (0 = off)",
    "typical_p": "locally typical sampling mass (1 = off)",
    "repetition_penalty": "divide repeated tokens' positive logits by this (1 = off)",
    "presence_penalty": "subtract once from tokens in the penalty window (0 = off)",
    "frequency_penalty": "subtract count times this from tokens in the window (0 = off)",
    "penalty_last_n": "the penalties' window in tokens (-1 = whole history, 0 = off)",
    "no_repeat_ngram_size": "never repeat an n-gram of the history (0 = off)",
    "dry_multiplier": "DRY: penalty on the token that would extend a repeat (0 = off; llama.cpp uses 0.8)",
    "dry_base": "DRY: the penalty grows as base^(repeat length - allowed length)",
    "dry_allowed_length": "DRY: repeats up to this many tokens go unpenalised",
    "dry_penalty_last_n": "DRY: tokens searched for repeats (-1 = whole history, 0 = off)",
    "dry_sequence_breakers": "DRY: repeats never span a token containing one of these (JSON list)",
    "xtc_probability": "XTC: chance per token to exclude the top choices (0 = off)",
    "xtc_threshold": "XTC: tokens at least this likely are top choices (all but the least go)",
    "top_n_sigma": "keep logits within n standard deviations of the max (<= 0 = off)",
    "dynatemp_range": "dynamic temperature: temperature +- range by the entropy (0 = off)",
    "dynatemp_exponent": "dynamic temperature: exponent on the normalised entropy",
    "mirostat": "1 or 2: Mirostat aims at a target surprise, replacing the other filters (0 = off)",
    "mirostat_tau": "Mirostat: target surprise in bits",
    "mirostat_eta": "Mirostat: learning rate of its running threshold mu",
    "logit_bias": "add a bias to tokens (JSON object TOKEN -> BIAS; :bias / :unbias)",
    "ban": "strings the output never contains (JSON list; :ban TEXT adds one)",
    "order": "step order: llama, hf or a comma list of steps",
    "seed": "random seed (none = a new one per turn)",
    "max_new_tokens": "tokens generated per turn at most",
    "min_new_tokens": "end-of-text is banned until this many tokens",
    "num_beams": "beam search width (1 = sampling)",
    "stop": "stop generating at any of these texts",
    "start_with_eos": "the first prompt follows the end-of-text separator (on for textgen models, off for HF GPT-2)",
    "suppress_unk": "never generate the unknown token <unk> (on in word-model files)",
}

# Hugging Face GenerationConfig keys a model file may carry that are not user settings here: ignored quietly.
_IGNORED_MODEL_KEYS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
    "num_return_sequences", "length_penalty", "early_stopping", "use_cache", "return_dict_in_generate",
})


def canonical_key(key: str) -> str:
    """The setting a user-typed key names (aliases, case and '-' resolved); SettingError if none."""
    name = str(key).strip().lower().replace("-", "_")
    name = LOOP_ALIASES.get(name, name)
    if name in LOOP_KEYS:
        return name
    try:
        return canonical_name(name)
    except SettingError:
        spellings = [*KEYS, *ALIASES, *LOOP_ALIASES]
        close = difflib.get_close_matches(name, spellings, n=1)
        if close:
            suggestion = LOOP_ALIASES.get(close[0], ALIASES.get(close[0], close[0]))
            raise SettingError(f"unknown setting {str(key)!r}; did you mean {suggestion}?") from None
        raise SettingError(f"unknown setting {str(key)!r} (:help set in the REPL lists every setting)") from None


def decode_escapes(text: str) -> str:
    r"""``\n``, ``\t``, ``\r`` and ``\\`` typed by the user become the characters (non-ASCII text stays as is)."""
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text) and text[index + 1] in "ntr\\":
            out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[text[index + 1]])
            index += 2
            continue
        out.append(char)
        index += 1
    return "".join(out)


def _bounded_int(key: str, raw: object, minimum: int, maximum: int) -> int:
    """The sampler's integer parsing (text, JSON's 50.0, never a bool) plus this key's range."""
    value = _as_int(key, raw)
    if not minimum <= value <= maximum:
        raise SettingError(f"{key} must be in [{minimum}, {maximum}], got {value}")
    return value


_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


def _as_bool(key: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingError(f"{key} must be on or off (true/false), got {raw!r}")


def _as_stop_list(raw: object) -> list[str]:
    if isinstance(raw, str):
        text = decode_escapes(raw)
        values = [text] if text else []
    elif isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
        values = [item for item in raw if item]
    else:
        raise SettingError(f"stop must be text or a list of texts, got {raw!r}")
    if len(values) > MAX_STOP_STRINGS or any(len(item) > 1000 for item in values):
        raise SettingError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most 1000 characters")
    return values


def parse_value(key: str, raw: object) -> tuple[str, object]:
    """(canonical key, validated value) for any setting; raises SettingError with a one-line message."""
    name = canonical_key(key)
    if name == "max_new_tokens":
        return name, _bounded_int(name, raw, 0, MAX_TOKENS_LIMIT)
    if name == "min_new_tokens":
        return name, _bounded_int(name, raw, 0, MAX_TOKENS_LIMIT)
    if name == "num_beams":
        return name, _bounded_int(name, raw, 1, MAX_BEAMS)
    if name == "stop":
        return name, _as_stop_list(raw)
    if name in ("start_with_eos", "suppress_unk"):
        return name, _as_bool(name, raw)
    return parse_setting(name, raw)


class Settings:
    """The session's settings: value and source per key, model defaults layered over the built-in ones."""

    def __init__(self, model_defaults: dict | None = None) -> None:
        self.warnings: list[str] = []
        self._model: dict[str, Any] = {}
        self._values: dict[str, tuple[Any, str]] = {key: (_copy(value), "default") for key, value in BUILTIN.items()}
        if model_defaults is not None and not isinstance(model_defaults, dict):
            self.warnings.append("model generation defaults are not a JSON object; ignored")
            model_defaults = None
        defaults = dict(model_defaults or {})
        greedy = defaults.pop("do_sample", None) is False  # HF: greedy whatever the temperature says
        for key, raw in defaults.items():
            self._take_model_default(str(key), raw)
        if greedy:
            self._model["temperature"] = 0.0
            self._values["temperature"] = (0.0, "model")

    def _take_model_default(self, key: str, raw: object) -> None:
        if key in _IGNORED_MODEL_KEYS:
            return
        try:
            name, value = parse_value(key, raw)
        except SettingError as exc:
            self.warnings.append(f"model default {key!r} ignored: {exc}")
            return
        self._model[name] = value
        self._values[name] = (_copy(value), "model")

    # ------------------------------------------------------------------ user operations

    def set(self, key: str, raw: object, source: str = "set") -> tuple[str, object]:
        """Set one value from user text (or a JSON value); returns (canonical key, value)."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}")
        name, value = parse_value(key, raw)
        self._values[name] = (value, source)
        return name, value

    def add_stop(self, text: str, source: str = "set") -> list[str]:
        """``:stop TEXT``: append one stop sequence (escapes such as \\n understood)."""
        current = list(self.get("stop"))
        _, value = parse_value("stop", [*current, *_as_stop_list(text)])
        self._values["stop"] = (value, source)
        return list(value)

    def add_bias(self, token: str, raw_bias: str, source: str = "set") -> dict[str, object]:
        """``:bias TOKEN BIAS``: one logit-bias entry (TOKEN is a token's text or #id; BIAS a number or -inf)."""
        current = json.loads(self.get("logit_bias"))
        current[decode_escapes(token)] = raw_bias
        _, value = parse_value("logit_bias", current)
        self._values["logit_bias"] = (value, source)
        return json.loads(value)

    def remove_bias(self, token: str | None = None, source: str = "set") -> dict[str, object]:
        """``:unbias [TOKEN]``: drop one entry, or every one."""
        current = json.loads(self.get("logit_bias")) if token else {}
        if token and current.pop(decode_escapes(token), None) is None:
            raise SettingError(f"no logit bias for {token!r} (:bias lists them)")
        _, value = parse_value("logit_bias", current)
        self._values["logit_bias"] = (value, source)
        return json.loads(value)

    def add_ban(self, text: str, source: str = "set") -> list[str]:
        """``:ban TEXT``: never produce TEXT (escapes such as \\n understood)."""
        current = json.loads(self.get("ban"))
        _, value = parse_value("ban", [*current, decode_escapes(text)])
        self._values["ban"] = (value, source)
        return json.loads(value)

    def unset(self, key: str) -> None:
        """Back to the model's default for this key if it has one, else the built-in default."""
        name = canonical_key(key)
        if name in self._model:
            self._values[name] = (_copy(self._model[name]), "model")
        else:
            self._values[name] = (_copy(BUILTIN[name]), "default")

    def apply_preset(self, name: str, source: str = "set") -> dict[str, object]:
        """Apply a sampler preset (see PRESETS); returns the values it set."""
        preset = str(name).strip().lower()
        if preset not in PRESETS:
            raise SettingError(f"unknown sampler preset {name!r} (presets: {', '.join(PRESETS)})")
        if preset == "sample":
            for key in (*SAMPLER_KEYS, "num_beams"):
                if key != "seed":
                    self.unset(key)
            return {key: self.get(key) for key in (*SAMPLER_KEYS, "num_beams") if key != "seed"}
        for key, value in PRESETS[preset].items():
            self._values[key] = (value, source)
        return dict(PRESETS[preset])

    # ------------------------------------------------------------------ reading

    def get(self, key: str) -> Any:
        return _copy(self._values[canonical_key(key)][0])

    def source(self, key: str) -> str:
        return self._values[canonical_key(key)][1]

    def rows(self) -> list[tuple[str, object, str, bool]]:
        """(key, value, source, changed_from_default) for every key; "default" is the built-in value."""
        return [(key, _copy(value), source, value != BUILTIN[key]) for key, (value, source) in self._values.items()]

    def as_dict(self) -> dict[str, object]:
        """Every current value (JSON-friendly), e.g. for --json output and :save."""
        return {key: _copy(value) for key, (value, _) in self._values.items()}

    def sampler(self) -> SamplerSettings:
        return SamplerSettings(**{key: self._values[key][0] for key in SAMPLER_KEYS})


def format_setting(value: object) -> str:
    """A setting's value as the user would type it back: 0.8, 40, none, "text" (strings and lists as JSON)."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and value.startswith(("[", "{")):  # JSON-valued settings: as typed
        return value
    if isinstance(value, (list, str)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def build_settings(model_defaults: dict[str, Any] | None,
                   *layers: Iterable[tuple[str, object]] | Mapping[str, object], source: str = "cli") -> Settings:
    """The settings before a session starts: built-in, then the model file's defaults, then each layer's
    (key, value) pairs in order, every one recorded with ``source`` so ``:show`` can say where it came from.

    A ``sampler`` key applies a preset. Here ``sampler=sample`` leaves the settings as given (it is what no preset
    means) rather than undoing the --set values beside it; in a session ``:sampler sample`` returns the sampler to
    the model's defaults. Raises SettingError for a bad key, value or preset name."""
    settings = Settings(model_defaults)
    for layer in layers:
        for key, value in layer.items() if isinstance(layer, Mapping) else layer:
            if key != PRESET_KEY:
                settings.set(key, value, source)
            elif str(value).strip().lower() != "sample":
                settings.apply_preset(str(value), source)
    return settings
