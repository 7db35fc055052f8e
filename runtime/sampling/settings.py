"""Sampler settings: the dataclass, the names users type (HF GenerationConfig names plus llama.cpp aliases) and
the preset step orders. Plain data: parsing and validation are in ``validation.py``, which also knows the step
registry, so the steps can name ``SamplerSettings`` without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

# llama.cpp's default order (common/common.h: penalties, dry, top_n_sigma, top_k, typ_p, top_p, min_p, xtc,
# temperature), with logit_bias first (llama.cpp adds it ahead of the chain), the history bans (ban strings,
# no-repeat n-grams) next to the penalties, and mirostat last: with mirostat on, the chain keeps only the steps
# that are not sampling-only, temperature and mirostat, as llama.cpp does.
PRESET_ORDERS: dict[str, tuple[str, ...]] = {
    "llama": ("logit_bias", "penalties", "dry", "ban", "no_repeat_ngram", "top_n_sigma", "top_k", "typical_p",
              "top_p", "min_p", "xtc", "temperature", "mirostat"),
    "hf": ("logit_bias", "penalties", "dry", "ban", "no_repeat_ngram", "temperature", "top_n_sigma", "top_k",
           "typical_p", "top_p", "min_p", "xtc", "mirostat"),
}

DEFAULT_DRY_BREAKERS = '["\\n", ":", "\\"", "*"]'  # llama.cpp's: newline, colon, double quote, asterisk


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
    # llama.cpp's samplers, under llama.cpp's names and defaults (each off by default)
    dry_multiplier: float = 0.0  # DRY: 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1  # -1 = whole history, 0 = off
    dry_sequence_breakers: str = DEFAULT_DRY_BREAKERS  # JSON list of strings
    xtc_probability: float = 0.0  # XTC: 0 = off
    xtc_threshold: float = 0.1  # > 0.5 = off
    top_n_sigma: float = -1.0  # <= 0 = off
    dynatemp_range: float = 0.0  # 0 = off
    dynatemp_exponent: float = 1.0
    mirostat: int = 0  # 0 = off, 1 = Mirostat, 2 = Mirostat 2.0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: str = "{}"  # JSON object: token text or "#id" -> bias (a number or "-inf")
    ban: str = "[]"  # JSON list of strings the output never contains
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
    "dry_last_n": "dry_penalty_last_n",
    "dry_breakers": "dry_sequence_breakers",
    "dry_sequence_breaker": "dry_sequence_breakers",
    "top_nsigma": "top_n_sigma",
    "dynatemp_exp": "dynatemp_exponent",
    "mirostat_lr": "mirostat_eta",
    "mirostat_ent": "mirostat_tau",
    "banned_strings": "ban",
}


class SettingError(ValueError):
    """A sampler setting is unknown or out of range; the message is one line for the user."""


def make_rng(settings: SamplerSettings) -> np.random.Generator:
    """The generator for ``sample``: reproducible when ``settings.seed`` is set, fresh entropy otherwise."""
    return np.random.default_rng(settings.seed)
