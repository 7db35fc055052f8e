"""runtime/logprobs.py: hand-computed records, the ranking of alternatives, greedy point masses, prompt scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.logprobs import log_softmax, point_mass, prompt_logprobs, token_logprob

TEXTS = {0: "<eos>", 1: "a", 2: "b", 3: "c", 4: "d", 5: ""}


def text(token: int) -> str:
    return TEXTS[token]


def test_drawn_and_raw_logprobs_are_reported_side_by_side() -> None:
    raw_logits = np.log(np.array([0.1, 0.4, 0.2, 0.2, 0.1, 0.0], dtype=np.float32) + 1e-30)
    drawn = np.array([0.0, 0.5, 0.25, 0.25, 0.0, 0.0])  # e.g. after a top-k of 3
    record = token_logprob(2, drawn, raw_logits, 4, text, real_tokens=5)
    assert (record.id, record.text) == (2, "b")
    assert record.logprob == pytest.approx(math.log(0.25))
    assert record.raw_logprob == pytest.approx(math.log(0.2), rel=1e-5)
    # best under the drawn-from distribution first; the tie b/c by raw value then id; then removed tokens by raw
    assert [alt.id for alt in record.top] == [1, 2, 3, 0]
    assert record.top[3].logprob == -math.inf
    assert record.top[3].raw_logprob == pytest.approx(math.log(0.1), rel=1e-5)


def test_padding_ids_are_never_alternatives() -> None:
    logits = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 50.0])  # id 5 is vocabulary padding with a huge logit
    record = token_logprob(1, point_mass(1, 6), logits, 5, text, real_tokens=5)
    assert 5 not in [alt.id for alt in record.top]
    assert len(record.top) == 5


def test_greedy_point_mass() -> None:
    logits = np.array([1.0, 3.0, 2.0, 0.0, -1.0, -2.0])
    record = token_logprob(1, point_mass(1, 6), logits, 2, text)
    assert record.logprob == 0.0
    assert record.raw_logprob == pytest.approx(log_softmax(logits)[1])
    assert [alt.id for alt in record.top] == [1, 2]  # the runner-up by the model's own value
    assert record.top[1].logprob == -math.inf


def test_top_bounds() -> None:
    with pytest.raises(ValueError):
        token_logprob(0, point_mass(0, 6), np.zeros(6), 21, text)
    assert token_logprob(0, point_mass(0, 6), np.zeros(6), 0, text).top == []


def test_prompt_logprobs_use_the_raw_model() -> None:
    logits = np.log(np.array([[0.1, 0.6, 0.1, 0.1, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2, 0.0]]) + 1e-30)
    records = prompt_logprobs([1, 4], logits, text, 1, real_tokens=5)
    assert [r.logprob for r in records] == pytest.approx([math.log(0.6), math.log(0.2)], rel=1e-6)
    assert [r.logprob for r in records] == [r.raw_logprob for r in records]
    assert records[0].top[0].id == 1
