"""Log-probabilities of generated tokens: what was drawn, from which distribution, and what else was likely.

For every generated token two numbers are reported, and they are different things:

* ``logprob``: the log-probability under the distribution the token was *drawn from*, i.e. after the sampler chain
  (penalties, filters, temperature). Tokens the chain removed have probability 0 (``-inf``). Greedy decoding draws
  from a point mass at the argmax, so the chosen token has logprob 0 and every other token ``-inf``.
* ``raw_logprob``: the model's own log-softmax of the logits, before any sampler step, over the tokenizer's real
  ids (vocabulary padding, when the model has any, is left out of the softmax).

The ``top`` alternatives are the N most likely tokens under the drawn-from distribution, ties (e.g. every token a
filter removed, or all but one under greedy decoding) broken by the raw log-probability, then by id. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

MAX_TOP = 20  # OpenAI's cap for top_logprobs; more is rarely useful and costs a sort per token
NEG_INF_LOGPROB = -9999.0  # JSON has no -inf: a removed token's logprob is written as this (vLLM does the same)


@dataclass(frozen=True)
class Alternative:
    id: int
    text: str
    logprob: float  # under the distribution the token was drawn from (-inf when the sampler removed it)
    raw_logprob: float  # the model's log-softmax, before the sampler


@dataclass(frozen=True)
class TokenLogprob:
    id: int
    text: str
    logprob: float
    raw_logprob: float
    top: list[Alternative] = field(default_factory=list)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis (``-inf`` logits stay ``-inf``)."""
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def point_mass(token: int, vocab_size: int) -> np.ndarray:
    """The distribution greedy decoding draws from: all mass on ``token``."""
    probabilities = np.zeros(vocab_size)
    probabilities[token] = 1.0
    return probabilities


def token_logprob(token: int, probabilities: np.ndarray, raw_logits: np.ndarray, top: int,
                  token_text: Callable[[int], str], real_tokens: int | None = None) -> TokenLogprob:
    """The record for ``token`` drawn from ``probabilities`` (one row, sums to 1) after the model produced
    ``raw_logits`` (one row); ``top`` alternatives (0..MAX_TOP) with their texts from ``token_text``. Ids from
    ``real_tokens`` up (vocabulary padding, no token behind them) are never listed as alternatives."""
    if not 0 <= top <= MAX_TOP:
        raise ValueError(f"top must be in [0, {MAX_TOP}], got {top}")
    with np.errstate(divide="ignore"):
        drawn = np.log(np.asarray(probabilities, dtype=np.float64))
    raw_logits = np.asarray(raw_logits, dtype=np.float64)
    if real_tokens is not None and real_tokens < raw_logits.size:  # padding ids: outside the model's softmax
        raw_logits = raw_logits.copy()
        raw_logits[real_tokens:] = -np.inf
    return _record(token, drawn, log_softmax(raw_logits), top, token_text, real_tokens)


def _record(token: int, drawn: np.ndarray, raw: np.ndarray, top: int, token_text: Callable[[int], str],
            real_tokens: int | None) -> TokenLogprob:
    order = _best(drawn, raw, top, drawn.size if real_tokens is None else real_tokens)
    alternatives = [Alternative(int(i), token_text(int(i)), float(drawn[i]), float(raw[i])) for i in order]
    return TokenLogprob(int(token), token_text(int(token)), float(drawn[token]), float(raw[token]), alternatives)


def _best(drawn: np.ndarray, raw: np.ndarray, top: int, real_tokens: int) -> np.ndarray:
    """Ids of the ``top`` best tokens by (drawn, raw, -id), without sorting the whole vocabulary."""
    if top == 0:
        return np.zeros(0, dtype=np.int64)
    kept = np.flatnonzero(np.isfinite(drawn))
    removed = np.flatnonzero(~np.isfinite(drawn[:real_tokens]))
    picked = [_head(kept, drawn, raw, top), _head(removed, raw, raw, top - min(top, kept.size))]
    return np.concatenate(picked)[:top]


def _head(ids: np.ndarray, key: np.ndarray, tie: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` ids with the largest ``key`` (then ``tie``, then the lower id), best first."""
    if count <= 0 or ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if count < ids.size:  # keep every id tied with the count-th best, so the tie-break below sees them all
        threshold = np.partition(key[ids], ids.size - count)[ids.size - count]
        ids = ids[key[ids] >= threshold]
    return ids[np.lexsort((ids, -tie[ids], -key[ids]))][:count]


def json_logprob(value: float) -> float:
    """``value`` for JSON: ``-inf`` (a token the sampler removed) becomes NEG_INF_LOGPROB."""
    return value if np.isfinite(value) else NEG_INF_LOGPROB


def record_json(record: TokenLogprob) -> dict[str, object]:
    """One token's record as the REPL and textgen-eval write it: ``logprob`` from the distribution the token was
    drawn from, ``raw_logprob`` the model's own; ``top`` the alternatives, best first, with both."""
    return {"id": record.id, "text": record.text, "logprob": json_logprob(record.logprob),
            "raw_logprob": json_logprob(record.raw_logprob),
            "top": [{"id": alt.id, "text": alt.text, "logprob": json_logprob(alt.logprob),
                     "raw_logprob": json_logprob(alt.raw_logprob)} for alt in record.top]}


class LogprobRecorder:
    """The ``on_draw`` hook of runtime.generate's Session.generate / generate_n: one JSON-ready record
    (``record_json``) per drawn token, kept per result row. Greedy steps arrive as a point mass at the chosen token,
    so its logprob is 0, as textgen-serve reports it."""

    def __init__(self, token_text: Callable[[int], str], top: int, real_tokens: int | None = None) -> None:
        if not 0 <= top <= MAX_TOP:
            raise ValueError(f"top must be in [0, {MAX_TOP}], got {top}")
        self.token_text = token_text
        self.top = top
        self.real_tokens = real_tokens
        self.rows: dict[int, list[dict[str, object]]] = {}

    def __call__(self, tokens: np.ndarray, probabilities: np.ndarray, logits: np.ndarray, rows: np.ndarray) -> None:
        for token, drawn, raw, row in zip(tokens, probabilities, logits, rows, strict=True):
            record = token_logprob(int(token), drawn, raw, self.top, self.token_text, self.real_tokens)
            self.rows.setdefault(int(row), []).append(record_json(record))

    def take(self, row: int, count: int) -> list[dict[str, object]]:
        """Row ``row``'s records for its first ``count`` tokens (the tokens a result kept)."""
        return self.rows.get(row, [])[:count]


def prompt_logprobs(tokens: list[int], logits: np.ndarray, token_text: Callable[[int], str], top: int,
                    real_tokens: int | None = None) -> list[TokenLogprob]:
    """Raw-model records for prompt tokens (``echo`` with ``logprobs``): ``logits[i]`` [V] are the model's
    logits *before* ``tokens[i]``. Nothing was drawn here, so ``logprob`` equals ``raw_logprob``."""
    if not 0 <= top <= MAX_TOP:
        raise ValueError(f"top must be in [0, {MAX_TOP}], got {top}")
    records = []
    for token, row in zip(tokens, logits, strict=True):
        raw = log_softmax(row)
        records.append(_record(token, raw, raw, top, token_text, real_tokens))
    return records
