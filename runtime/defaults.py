"""The one table of generation defaults: what each setting is when nobody said otherwise, at each layer.

Three layers of defaults meet in a session, and each is defined here once:

* ``BUILTIN``: every setting's value before a model file is read (the sampler's own defaults are Hugging Face
  GenerationConfig's: temperature 1.0, top_k 50; the penalty window is llama.cpp's 64 tokens). ``:show`` calls
  these the "default" source, and ``:unset`` returns to them when the model file does not set the key.
* ``DEFAULT_GENERATION``: what a model file carries (its ``textgen.generation`` metadata) when the checkpoint
  does not say more: llama.cpp's sampler defaults, which suit small models better than temperature 1.0. The
  exporter writes it for imported Hugging Face models and under every checkpoint's own values.
* ``generation_defaults(tokenizer_kind)``: what the trainer stores in a checkpoint: DEFAULT_GENERATION adjusted
  per tokenizer (a character model has no long tail to cut, and writes more tokens per word).

Names are Hugging Face GenerationConfig's (``top_k`` 0 = off, ``max_new_tokens``). Pure data, so the trainer and
the exporter read it without loading the sampler.
"""

from __future__ import annotations

from typing import Any

BUILTIN: dict[str, Any] = {
    # sampler chain (runtime's SamplerSettings fields, in its order)
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "penalty_last_n": 64,
    "no_repeat_ngram_size": 0,
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_penalty_last_n": -1,
    "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]',
    "xtc_probability": 0.0,
    "xtc_threshold": 0.1,
    "top_n_sigma": -1.0,
    "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0,
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
    "logit_bias": "{}",
    "ban": "[]",
    "order": "llama",
    "seed": None,
    # decode loop
    "max_new_tokens": 200,
    "min_new_tokens": 0,
    "num_beams": 1,
    "stop": [],
    "start_with_eos": True,  # the first prompt follows the document separator (runtime/settings.py)
    "suppress_unk": False,  # never generate the unknown token
}

DEFAULT_GENERATION: dict[str, Any] = {
    "temperature": 0.8, "top_k": 40, "top_p": 0.95, "max_new_tokens": 200,
    "start_with_eos": True,  # textgen trains documents after the separator; an HF import says otherwise
}

# Per tokenizer kind, on top of DEFAULT_GENERATION. Characters: ~65 candidates, so no top-k/top-p cut, and 500
# tokens is a few lines of text. Words: 100 tokens is a paragraph.
_BY_TOKENIZER: dict[str, dict[str, Any]] = {
    "char": {"top_k": 0, "top_p": 1.0, "max_new_tokens": 500},
    # <unk> stands for every rare word at once, so a word model never generates it (runtime/settings.py)
    "word": {"max_new_tokens": 100, "suppress_unk": True},
}


def generation_defaults(tokenizer_kind: str) -> dict[str, Any]:
    """The generation settings a newly trained checkpoint carries, for its tokenizer kind (char, word, bpe...)."""
    return {**DEFAULT_GENERATION, **_BY_TOKENIZER.get(tokenizer_kind, {})}
