"""Sampler settings: the dataclass, the names users type (HF GenerationConfig names plus llama.cpp aliases) and
the preset step orders. Plain data: parsing and validation are in ``validation.py``, which also knows the step
registry, so the steps can name ``SamplerSettings`` without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

PRESET_ORDERS: dict[str, tuple[str, ...]] = {
    "llama": ("penalties", "no_repeat_ngram", "top_k", "typical_p", "top_p", "min_p", "temperature"),
    "hf": ("penalties", "no_repeat_ngram", "temperature", "top_k", "typical_p", "top_p", "min_p"),
}


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


def make_rng(settings: SamplerSettings) -> np.random.Generator:
    """The generator for ``sample``: reproducible when ``settings.seed`` is set, fresh entropy otherwise."""
    return np.random.default_rng(settings.seed)
