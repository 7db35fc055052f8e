"""How good is a model file: perplexity on held-out text, and the diversity of what it samples. The library
behind ``textgen-eval`` (repl/evaluate.py, the command line) and the REPL's ``:eval``.

Everything runs through the ONNX file on onnxruntime (no torch), with the model's own context handling.

Perplexity protocol (``evaluate_perplexity``, ``textgen-eval --data``)
----------------------------------------------------------------------
The text is tokenized with the model's tokenizer. Documents (csv rows, blank-line separated docs, ...) are each
followed by the end-of-text token, as in training; a plain text file is one stream. One end-of-text token is put
in front as the starting context, so every token of the text is scored, each exactly once, and the end-of-text
tokens between documents are scored too (predicting where a document ends is part of the model).

The scoring itself is runtime.scoring (the one scorer, shared with ``:eval`` and the quantization cost check),
which defines the protocols and the padded-vocabulary rule (softmax over the tokenizer's real ids only).
``--protocol`` names one: ``stateful`` (the default for RNNs: state carried over the whole text, exact),
``windows`` (non-overlapping windows of the context length, each from an empty cache: what the trainer's GPT-2
validation and the quantization check use) or ``sliding`` (the default for GPT-2: windows of ``context_length``
tokens every ``--stride`` tokens, default half the window, each token scored once with at least
``W - stride + 1`` tokens of context: the Hugging Face perplexity recipe). Every result names its protocol.

Reported: nats/token (mean negative log-likelihood), perplexity = exp(nats/token), bits/token, nats/word and
perplexity per word (total nats / whitespace-separated words), and bits/char = total bits / characters of the
text, where each document separator counts as one word and one character (so for a character-level tokenizer
bits/char == bits/token). Per word and per character compare models with different tokenizers (runtime.units).

Sampling metrics (``textgen-eval --samples N``)
-----------------------------------------------
N samples are drawn in batches by the REPL's own decode loop (``runtime.generate.Session.generate_n``) with the
model's generation settings (changed with ``--set``), each starting from the end-of-text token followed by
``--prompt``, as the REPL's first prompt does. Reported per setting: unique-word rate (mean over samples of
distinct words / words in that sample: low values mean loops), distinct-1/2/3 (distinct word n-grams / n-grams,
pooled over all samples: low values mean the samples resemble each other), the mean entropy in nats of the
SAMPLING distribution at each generated step (after the whole sampler chain: 0 for greedy), mean length in tokens
and words, and the share of samples that ended with the end-of-text token. Words are defined in runtime.textmetrics.
``--reference FILE`` cuts held-out text into as many chunks as there are samples, each as long (in tokens) as
the mean sample, and reports the same text metrics for it. ``--judge J.onnx`` adds the mean cross-entropy
(nats/token) of the generated text under another model file, re-tokenized with its tokenizer and conditioned
on the prompt; repetitive text scores well there, so read it together with the diversity columns.
``--sweep KEY=V1,V2`` (repeatable) runs the whole grid of settings; ``sampler=greedy,sample`` picks presets.
A sweep changes only its own key: every other setting stays as the model file sets it (e.g. a word model's
top_k 40 and top_p 0.95 still filter a temperature sweep). The base settings every row shares are printed above
the table and given as ``base`` in ``--json``; ``--base plain`` starts from the bare distribution instead
(top_k 0, top_p 1, no penalties or other filters, temperature 1) before --set and the swept values.
Every row uses the same seed. Stop strings and beam search are not part of sampling evaluation.
``--logprobs N`` (with ``--json``) adds ``samples`` to each row: every sample's text, token ids and one record per
token in textgen-repl's ``--logprobs`` shape (runtime/logprobs.py); sample i is what the REPL draws with seed + i.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from runtime.generate import Session
from runtime.logprobs import LogprobRecorder
from runtime.scoring import (
    ProgressCallback,
    ScoringError,
    ScoringProtocol,
    default_protocol,
    score_ids,
    stream_ids,
)
from runtime.session import OnnxModel
from runtime.settings import PRESETS, Settings, build_settings, canonical_key
from runtime.textmetrics import bits, chunk_evenly, entropy, safe_exp, text_stats
from runtime.units import text_size

DEFAULT_SAMPLES_BATCH = 16
DEFAULT_SEED = 0

class EvalError(Exception):
    """Evaluation cannot run with these inputs; the message is one line for the user."""


# ================================================================================================ perplexity


@dataclass(frozen=True)
class PerplexityResult:
    """Scores of a model on a text, and the protocol that produced them (runtime.scoring)."""

    nats_per_token: float
    perplexity: float
    bits_per_token: float
    bits_per_char: float
    n_tokens: int  # tokens scored
    n_chars: int  # characters they stand for (a document separator counts as one)
    protocol: ScoringProtocol  # how context was given
    n_unknown: int = 0  # scored tokens that were the tokenizer's unknown token
    n_words: int = 0  # whitespace-separated words they stand for (a document separator counts as one)
    nats_per_word: float = math.nan
    perplexity_per_word: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return json_ready(asdict(self) | {"protocol": self.protocol.as_dict()})


def evaluate_perplexity(model: OnnxModel, text: str, protocol: ScoringProtocol | None = None,
                        on_progress: ProgressCallback | None = None) -> PerplexityResult:
    """Perplexity of ``model`` (a runtime.session.OnnxModel) on ``text``, scored as one stream with ``protocol``
    (default: runtime.scoring.default_protocol)."""
    return evaluate_documents(model, [text], single_stream=True, protocol=protocol, on_progress=on_progress)


def evaluate_documents(model: OnnxModel, documents: Sequence[str], single_stream: bool,
                       protocol: ScoringProtocol | None = None,
                       on_progress: ProgressCallback | None = None) -> PerplexityResult:
    """Perplexity on documents joined with the end-of-text token (or on one stream when ``single_stream``)."""
    ids, n_chars = stream_ids(model, documents, single_stream)
    separators = 0 if single_stream else len(documents)
    n_words = text_size(documents, len(ids) - 1, separators).words
    try:
        score = score_ids(model, ids, protocol or default_protocol(model), on_progress=on_progress)
    except ScoringError as exc:
        raise EvalError(str(exc)) from None
    total, count = score.total, score.n_tokens
    mean = total / count
    unk = model.info.special.unk
    scored = ids[score.first_target : score.first_target + count]
    n_unknown = int(np.count_nonzero(scored == unk)) if unk is not None else 0
    return PerplexityResult(
        nats_per_token=mean,
        perplexity=safe_exp(mean),
        bits_per_token=bits(mean),
        bits_per_char=bits(total) / max(n_chars, 1),
        n_tokens=count,
        n_chars=n_chars,
        protocol=score.protocol,
        n_unknown=n_unknown,
        n_words=n_words,
        nats_per_word=total / n_words if n_words else math.nan,
        perplexity_per_word=safe_exp(total / n_words) if n_words else math.nan,
    )


# ================================================================================================ sampling


@dataclass
class SampleBatchResult:
    """What one setting produced: texts plus the per-step numbers only the decode loop can see."""

    texts: list[str]
    token_counts: list[int]
    ended_on_eos: list[bool]
    entropy_sum: float
    entropy_steps: int
    seconds: float
    tokens: list[list[int]] = field(default_factory=list)  # each sample's generated ids (eos included)
    logprobs: list[list[dict[str, Any]]] | None = None  # per sample, one record per id in ``tokens`` (--logprobs)


@dataclass(frozen=True)
class GenerationPlan:
    """How to draw samples: the same for every row of a sweep except the settings."""

    n_samples: int
    prompt: str
    max_new_tokens: int | None  # None: the settings' max_new_tokens
    seed: int | None  # None: the settings' seed, else DEFAULT_SEED
    batch_size: int = DEFAULT_SAMPLES_BATCH
    logprobs: int | None = None  # alternatives per token to record (runtime/logprobs.py); None: no records


def draw_samples(model: OnnxModel, settings: Settings, plan: GenerationPlan) -> SampleBatchResult:
    """Generate ``plan.n_samples`` samples with ``settings`` (a runtime.settings.Settings) in batches.

    The samples come from the REPL's own batch decode loop (runtime.generate.Session.generate_n, on a fresh session:
    eos + prompt as the context, same SamplerChain, bans, min/max length and window sliding); its ``on_step``
    hook hands over the sampling distribution of every live row at every step for the entropy. Stop strings are
    not used here; Ctrl-C stops the whole evaluation."""
    if int(settings.get("num_beams") or 1) > 1:
        raise EvalError("beam search (num_beams > 1) is not supported for sampling metrics; use a sampling preset")
    max_new = plan.max_new_tokens if plan.max_new_tokens is not None else int(settings.get("max_new_tokens"))
    if max_new < 1:
        raise EvalError("max_new_tokens must be >= 1 for sampling metrics")
    run_settings = copy.deepcopy(settings)  # the caller's settings stay as they were
    run_settings.set("max_new_tokens", max_new, "cli")
    run_settings.set("seed", resolve_seed(plan.seed, settings), "cli")
    run_settings.set("stop", [], "cli")
    entropy_meter = _EntropyMeter()
    session = Session(model, run_settings)
    recorder = None if plan.logprobs is None else LogprobRecorder(session.token_text, plan.logprobs,
                                                                  model.tokenizer_size)
    started = time.perf_counter()
    samples = session.generate_n(plan.prompt, plan.n_samples, batch_size=plan.batch_size, on_step=entropy_meter,
                                 on_draw=recorder)
    seconds = time.perf_counter() - started
    if any(sample.stop_reason == "interrupted" for sample in samples):
        raise KeyboardInterrupt  # generate_n returns partial results on Ctrl-C; an evaluation stops instead
    ended_on_eos = [sample.stop_reason == "eos" for sample in samples]
    return SampleBatchResult(
        texts=[sample.text for sample in samples],
        token_counts=[len(sample.tokens) - int(eos) for sample, eos in zip(samples, ended_on_eos, strict=True)],
        ended_on_eos=ended_on_eos,
        entropy_sum=entropy_meter.total,
        entropy_steps=entropy_meter.steps,
        seconds=seconds,
        tokens=[list(sample.tokens) for sample in samples],
        logprobs=None if recorder is None else [recorder.take(index, len(sample.tokens))
                                                for index, sample in enumerate(samples)],
    )


class _EntropyMeter:
    """generate_n's on_step hook: sums the entropy of each live row's sampling distribution, one term per
    generated token (the step that draws eos included)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.steps = 0

    def __call__(self, probabilities: np.ndarray, rows: np.ndarray) -> None:
        self.total += float(entropy(probabilities).sum())
        self.steps += len(rows)


def resolve_seed(seed: int | None, settings: Settings) -> int:
    """The seed a row samples with: the given one, else the settings' seed, else DEFAULT_SEED."""
    if seed is not None:
        return seed
    configured = settings.get("seed")
    return int(configured) if configured is not None else DEFAULT_SEED


# ================================================================================================ metrics rows


METRIC_COLUMNS = (
    "unique_word_rate", "distinct_1", "distinct_2", "distinct_3", "entropy", "mean_tokens", "mean_words",
    "eos_share",
)
JUDGE_COLUMN = "judge_nats"
NOVELTY_COLUMNS = ("verbatim_share", "copied_ngram_share")


@dataclass
class MetricsRow:
    """One line of the results table: a setting combination (or the reference text) and its metrics."""

    label: dict[str, str]  # swept key -> value as given; {} when nothing was swept
    metrics: dict[str, float]
    seed: int | None = None
    seconds: float | None = None
    samples: list[str] = field(default_factory=list)
    sample_details: list[dict[str, Any]] | None = None  # per sample text, tokens and logprobs (--logprobs)


def sample_metrics(result: SampleBatchResult) -> dict[str, float]:
    stats = text_stats(result.texts)
    n = len(result.texts)
    mean_entropy = result.entropy_sum / result.entropy_steps if result.entropy_steps else math.nan
    return {
        "unique_word_rate": stats.unique_word_rate,
        "distinct_1": stats.distinct_1,
        "distinct_2": stats.distinct_2,
        "distinct_3": stats.distinct_3,
        "entropy": mean_entropy,  # per generated step, over all samples
        "mean_tokens": sum(result.token_counts) / n if n else math.nan,
        "mean_words": stats.mean_words,
        "eos_share": sum(result.ended_on_eos) / n if n else math.nan,
    }


def reference_metrics(model: OnnxModel, documents: Sequence[str], single_stream: bool, n_chunks: int,
                      mean_tokens: float) -> tuple[dict[str, float], int]:
    """Text metrics of held-out text cut into ``n_chunks`` chunks of ``round(mean_tokens)`` tokens.
    Returns the metrics and how many chunks the text allowed."""
    ids, _ = stream_ids(model, documents, single_stream)
    length = max(1, round(mean_tokens)) if math.isfinite(mean_tokens) else 1
    chunks = chunk_evenly(ids[1:].tolist(), n_chunks, length)
    texts = [model.decode(chunk) for chunk in chunks]
    stats = text_stats(texts)
    return {
        "unique_word_rate": stats.unique_word_rate,
        "distinct_1": stats.distinct_1,
        "distinct_2": stats.distinct_2,
        "distinct_3": stats.distinct_3,
        "entropy": math.nan,
        "mean_tokens": sum(len(chunk) for chunk in chunks) / len(chunks) if chunks else math.nan,
        "mean_words": stats.mean_words,
        "eos_share": math.nan,
    }, len(chunks)


def judge_nats(judge: OnnxModel, prompt: str, texts: Sequence[str]) -> float:
    """Mean nats/token of ``texts`` under the ``judge`` model, each conditioned on eos + prompt."""
    prompt_ids = [judge.info.special.eos, *judge.encode(prompt)]
    total, count = 0.0, 0
    for text in texts:
        ids = prompt_ids + judge.encode(text)
        if len(ids) > len(prompt_ids):
            score = score_ids(judge, ids, default_protocol(judge), first_target=len(prompt_ids))
            total += score.total
            count += score.n_tokens
    return total / count if count else math.nan


# ================================================================================================ sweeps


@dataclass(frozen=True)
class Sweep:
    key: str
    values: tuple[str, ...]


def sweep_grid(sweeps: Sequence[Sweep]) -> list[dict[str, str]]:
    """Every combination, first sweep varying slowest; one empty combination when nothing is swept."""
    keys = [sweep.key for sweep in sweeps]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(s.values for s in sweeps))]


BASES = ("model", "plain")
# --base plain: the bare distribution, every filter off (the built-in defaults are HF's, whose top_k is 50).
PLAIN_SAMPLER = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


def base_defaults(model_defaults: dict[str, Any], base: str) -> dict[str, Any]:
    """What every row starts from: the model file's generation defaults, or (``plain``) the bare distribution
    with only the model's length and document-start settings kept."""
    if base == "model":
        return dict(model_defaults)
    kept = {key: value for key, value in model_defaults.items() if key in ("max_new_tokens", "start_with_eos")}
    return {**kept, **PLAIN_SAMPLER}


def base_settings(model_defaults: dict[str, Any], fixed: Sequence[tuple[str, str]], sweeps: Sequence[Sweep],
                  base: str = "model") -> dict[str, dict[str, Any]]:
    """The settings every row shares (swept keys left out): {key: {"value": v, "source": s}}, where source is
    "model" (the file's default), "cli" (--set), "plain" (--base plain) or "default" (built in)."""
    settings = build_settings(base_defaults(model_defaults, base), fixed, {})
    swept = set()
    for sweep in sweeps:
        swept |= set(PRESETS.get(sweep.key, {})) if sweep.key == "sampler" else {canonical_key(sweep.key)}
    shared = {}
    for key, value, source, _ in settings.rows():
        if key not in swept:
            plain = base == "plain" and source == "model" and key in PLAIN_SAMPLER
            shared[key] = {"value": value, "source": "plain" if plain else source}
    return shared


def json_ready(data: Any) -> Any:
    """NaN/inf are not JSON: undefined numbers become null."""
    if isinstance(data, dict):
        return {key: json_ready(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [json_ready(value) for value in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data
