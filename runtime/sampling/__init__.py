"""The sampler chain: next-token logits -> processed logits -> one drawn id per row. numpy only, never torch.

Steps, composed in a configurable order (``order``: "llama", "hf" or a comma list of registered step names):

    logit_bias        add fixed biases to chosen tokens (-inf removes one); by token text or #id
    penalties         repetition (HF/CTRL: logit>0 -> /p, logit<0 -> *p), presence (-v once), frequency (-count*v),
                      all over the last ``penalty_last_n`` tokens of the history
    dry               DRY: -multiplier * base^(n - allowed_length) on the token that would extend a repeat of n
    ban               banned strings: no token may complete one, whatever the tokenization
    no_repeat_ngram   ban next tokens that would repeat an n-gram of the whole history (HF semantics)
    top_n_sigma       keep logits >= max - n * std
    top_k             keep tokens whose logit >= the k-th largest (ties kept, as HF does)
    typical_p         locally typical sampling, HF's TypicalLogitsWarper semantics
    top_p             keep the smallest set of most probable tokens whose mass reaches top_p (lower ids win ties)
    min_p             keep tokens with p >= min_p * p_max
    xtc               XTC: with xtc_probability, drop every token with p >= xtc_threshold but the least likely
    temperature       divide by the temperature (dynatemp_range > 0: by an entropy-driven one, llama.cpp's temp_ext)
    mirostat          Mirostat 1 / 2: truncate toward a target surprise; replaces the other sampling filters

"llama" order (the default, llama.cpp's; every llama.cpp sampler is off until set) applies temperature last, so
the filters see the model's own distribution; "hf" applies it right after the penalties, as Hugging Face does.
Greedy (temperature 0) runs only the steps that read the history, then takes the argmax.

Modules, by concern:

    settings.py    SamplerSettings, the names and aliases users type, the preset orders
    validation.py  parsing and validation (one-line SettingError), each setting's rule in RULES
    steps.py       the Step interface (apply / accept / reset, llama.cpp's), its bases, the classic steps
    llama_steps.py llama.cpp's samplers: logit bias, banned strings, DRY, top-n-sigma, XTC, mirostat
    registry.py    REGISTRY: every step an ``order`` can name, by name (the one list)
    candidates.py  what steps work on: one row's Candidates, a call's Bans, shared numeric helpers
    plan.py        the compiled Plan: the small-vocabulary routes (sorted, prefix cuts, dense, whole batches)
    draw.py        the inverse-CDF draw in token-id order, in its row, sorted, few-candidate and batch forms
    chain.py       SamplerChain: steps + plan; process / probabilities / sample / sample_one

docs/architecture.md ("Sampler chain") explains the interface and how to add a step.
"""

from runtime.sampling.chain import SamplerChain
from runtime.sampling.registry import REGISTRY
from runtime.sampling.settings import ALIASES, PRESET_ORDERS, SETTING_NAMES, SamplerSettings, SettingError, make_rng
from runtime.sampling.steps import Step
from runtime.sampling.validation import (
    apply_setting,
    canonical_name,
    parse_setting,
    resolve_order,
    settings_from_mapping,
    step_names,
    validate,
)

__all__ = [
    "ALIASES",
    "PRESET_ORDERS",
    "REGISTRY",
    "SETTING_NAMES",
    "SamplerChain",
    "SamplerSettings",
    "SettingError",
    "Step",
    "apply_setting",
    "canonical_name",
    "make_rng",
    "parse_setting",
    "resolve_order",
    "settings_from_mapping",
    "step_names",
    "validate",
]
