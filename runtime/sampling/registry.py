"""REGISTRY: every sampler step an ``order`` can name, by name; the one list (``steps.py`` holds the interface and
the classic steps, ``llama_steps.py`` llama.cpp's)."""

from __future__ import annotations

from runtime.sampling.llama_steps import (
    BanStringsStep,
    DryStep,
    LogitBiasStep,
    MirostatStep,
    TopNSigmaStep,
    XtcStep,
)
from runtime.sampling.steps import (
    MinPStep,
    NoRepeatNGramStep,
    PenaltiesStep,
    Step,
    TemperatureStep,
    TopKStep,
    TopPStep,
    TypicalStep,
)

# A new step: its class in steps.py (or llama_steps.py for a llama.cpp sampler), one line here (and its settings,
# if any, in settings.py and validation.py).
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
