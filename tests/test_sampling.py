"""The sampler chain (runtime/sampling/): each step by hand, agreement with Hugging Face's logits processors,
properties over arbitrary settings/logits, seeded draws and the setting parser. The behaviour tests run on both
implementations (the small-vocabulary path these vocabularies take by default, and the general one), and the two
must agree with each other."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import general_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from runtime.sampling import (
    PRESET_ORDERS,
    SamplerChain,
    SamplerSettings,
    SettingError,
    apply_setting,
    make_rng,
    parse_setting,
    resolve_order,
    settings_from_mapping,
    validate,
)

# p = [0.5, 0.2, 0.15, 0.1, 0.05]: the distribution most hand-computed cases below use.
PROBS = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
LOGITS = np.log(PROBS)[None, :]
OFF = {"top_k": 0}  # the dataclass default top_k=50 would be a no-op at V=5 anyway; explicit for clarity


@pytest.fixture(params=["small", "general"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test on both paths; the vocabularies here take the small one unless the general one is forced."""
    if request.param == "general":
        with general_path():
            yield request.param
    else:
        yield request.param


def only(step: str, **values: object) -> SamplerSettings:
    """Settings that run just one step."""
    return replace(SamplerSettings(), order=step, **{**OFF, **values})


def kept(chain: SamplerChain, logits: np.ndarray, history=None, **kwargs) -> list[set[int]]:
    processed = chain.process(logits, history, **kwargs)
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in processed]


# ---------------------------------------------------------------------------------------------------------------
# Each step against hand-computed results


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize(("k", "expected"), [(1, {0}), (2, {0, 1}), (4, {0, 1, 2, 3}), (5, {0, 1, 2, 3, 4})])
def test_top_k_keeps_the_k_largest(k: int, expected: set[int]) -> None:
    assert kept(SamplerChain(only("top_k", top_k=k), 5), LOGITS) == [expected]


@pytest.mark.usefixtures("path")
def test_top_k_keeps_ties_at_the_cut() -> None:
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0]])
    chain = SamplerChain(only("top_k", top_k=3), 6)
    assert kept(chain, logits) == [{1, 2, 3, 4}]  # the 3rd largest is 2.0, held by ids 2 and 4


def test_top_k_on_a_wide_row_matches_a_full_partition() -> None:
    """The strided-sample shortcut must give exactly the full top-k, including on adversarial orders."""
    rng = np.random.default_rng(3)
    for logits in (rng.standard_normal((2, 20000)), np.sort(rng.standard_normal((2, 20000)), axis=1)):
        for k in (1, 7, 50, 999):
            got = kept(SamplerChain(only("top_k", top_k=k), 20000), logits)
            want = [set(np.argsort(-row)[:k].tolist()) for row in logits]
            assert got == want


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.45, {0}), (0.6, {0, 1}), (0.75, {0, 1, 2}), (0.9, {0, 1, 2, 3}), (0.99, {0, 1, 2, 3, 4})],
)
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(top_p: float, expected: set[int]) -> None:
    chain = SamplerChain(only("top_p", top_p=top_p), 5)
    assert kept(chain, LOGITS[:, ::-1].copy()) == [{4 - i for i in expected}]  # order of ids must not matter
    assert kept(chain, LOGITS) == [expected]


@pytest.mark.usefixtures("path")
def test_top_p_cuts_exactly_at_the_mass_and_breaks_ties_by_lower_id() -> None:
    flat = np.zeros((1, 4))  # p = 0.25 each, exactly: cumulative 0.25, 0.5 (== top_p), ...
    assert kept(SamplerChain(only("top_p", top_p=0.5), 4), flat) == [{0, 1}]
    assert kept(SamplerChain(only("top_p", top_p=0.5000001), 4), flat) == [{0, 1, 2}]
    assert kept(SamplerChain(only("top_p", top_p=0.2), 4), flat) == [{0}]


@pytest.mark.usefixtures("path")
def test_top_p_probabilities_are_renormalised() -> None:
    probs = SamplerChain(only("top_p", top_p=0.6), 5).probabilities(LOGITS, None)
    np.testing.assert_allclose(probs[0], [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], atol=1e-12)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize(("min_p", "expected"), [(0.25, {0, 1, 2}), (0.35, {0, 1}), (0.5, {0}), (1.0, {0})])
def test_min_p_keeps_tokens_above_a_fraction_of_the_top(min_p: float, expected: set[int]) -> None:
    assert kept(SamplerChain(only("min_p", min_p=min_p), 5), LOGITS) == [expected]


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize(("mass", "expected"), [(0.15, {1}), (0.3, {1, 2}), (0.5, {0, 1, 2}), (0.9, {0, 1, 2, 3})])
def test_typical_p_by_hand(mass: float, expected: set[int]) -> None:
    # H = 1.3331 nats; |surprise - H| = [0.640, 0.276, 0.564, 0.970, 1.663] -> order ids 1, 2, 0, 3, 4 with
    # cumulative mass 0.2, 0.35, 0.85, 0.95, 1.0.
    assert kept(SamplerChain(only("typical_p", typical_p=mass), 5), LOGITS) == [expected]


@pytest.mark.usefixtures("path")
def test_temperature_divides_the_logits() -> None:
    chain = SamplerChain(only("temperature", temperature=0.5), 5)
    np.testing.assert_allclose(chain.process(LOGITS, None)[0], LOGITS[0] / 0.5, rtol=1e-6)
    expected = PROBS**2 / (PROBS**2).sum()
    np.testing.assert_allclose(chain.probabilities(LOGITS, None)[0], expected, atol=1e-12)


@pytest.mark.usefixtures("path")
def test_repetition_presence_and_frequency_penalties() -> None:
    logits = np.array([[2.0, -2.0, 1.0, 0.5, 3.0]])
    history = [[0, 1, 1]]
    rep = SamplerChain(only("penalties", repetition_penalty=2.0), 5)
    np.testing.assert_allclose(rep.process(logits, history)[0], [1.0, -4.0, 1.0, 0.5, 3.0])
    additive = SamplerChain(only("penalties", presence_penalty=0.5, frequency_penalty=0.25), 5)
    np.testing.assert_allclose(additive.process(logits, history)[0], [1.25, -3.0, 1.0, 0.5, 3.0])
    both = SamplerChain(only("penalties", repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25), 5)
    np.testing.assert_allclose(both.process(logits, history)[0], [0.25, -5.0, 1.0, 0.5, 3.0])


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize(("last_n", "penalised"), [(1, {2}), (2, {1, 2}), (-1, {0, 1, 2}), (0, set())])
def test_penalty_window(last_n: int, penalised: set[int]) -> None:
    logits = np.full((1, 5), 2.0)
    chain = SamplerChain(only("penalties", repetition_penalty=2.0, penalty_last_n=last_n), 5)
    out = chain.process(logits, [[0, 1, 2]])[0]
    assert set(np.flatnonzero(out == 1.0).tolist()) == penalised


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize(
    ("size", "history", "banned"),
    [
        (3, [1, 2, 3, 1, 2], {3}),
        (3, [1, 2, 3, 1, 2, 4, 1, 2], {3, 4}),
        (2, [1, 2, 3, 1, 2], {3}),
        (2, [0, 4, 0, 0], {4, 0}),
        (1, [4, 1, 4], {1, 4}),
        (3, [1, 2], set()),
        (4, [1, 2, 3, 1, 2], set()),
    ],
)
def test_no_repeat_ngram(size: int, history: list[int], banned: set[int]) -> None:
    chain = SamplerChain(only("no_repeat_ngram", no_repeat_ngram_size=size), 6)
    assert kept(chain, np.zeros((1, 6)), [history]) == [set(range(6)) - banned]


@pytest.mark.usefixtures("path")
def test_banned_ids_get_zero_probability() -> None:
    chain = SamplerChain(SamplerSettings(top_k=0), 6, banned_ids=[5])
    probs = chain.probabilities(np.zeros((2, 6)), [[], []], extra_banned=[0])
    np.testing.assert_allclose(probs, np.tile([0, 0.25, 0.25, 0.25, 0.25, 0], (2, 1)))
    assert 0 not in chain.sample(np.full((1, 6), -5.0) + np.eye(6)[0] * 100, [[]], np.random.default_rng(0), [0])


@pytest.mark.usefixtures("path")
def test_everything_removed_falls_back_to_the_best_allowed_original_logit() -> None:
    logits = np.array([[5.0, 1.0, 3.0, 2.0]])
    chain = SamplerChain(replace(SamplerSettings(), no_repeat_ngram_size=1, top_k=2), 4, banned_ids=[0])
    # history bans 1, 2, 3 (n=1 bans every seen token) and id 0 is banned: nothing is left
    probs = chain.probabilities(logits, [[1, 2, 3]])
    np.testing.assert_array_equal(probs, [[0, 0, 1, 0]])
    assert chain.sample(logits, [[1, 2, 3]], np.random.default_rng(0)).tolist() == [2]
    # per-call bans still hold in the fallback while some allowed id is left
    assert chain.sample(logits, [[1, 3]], np.random.default_rng(0), extra_banned=[2]).tolist() == [3]
    # per-call bans that leave nothing are dropped before the constructor's bans are
    assert chain.sample(logits, [[]], np.random.default_rng(0), extra_banned=[1, 2, 3]).tolist() == [2]


@pytest.mark.usefixtures("path")
def test_greedy_takes_the_argmax_after_penalties_and_ignores_filters() -> None:
    logits = np.array([[3.0, 2.9, 0.0, -1.0]])
    greedy = SamplerChain(SamplerSettings(temperature=0, repetition_penalty=2.0, typical_p=0.2, min_p=1.0), 4)
    assert greedy.sample(logits, [[0]], np.random.default_rng(0)).tolist() == [1]  # 3.0 / 2 < 2.9
    assert greedy.sample(logits, [[]], np.random.default_rng(0)).tolist() == [0]
    # typical_p would have removed the most likely token; greedy never runs it
    assert np.isfinite(greedy.process(logits, [[]])).all()


@pytest.mark.usefixtures("path")
def test_llama_order_filters_before_temperature_hf_after() -> None:
    # raw p = [0.5, 0.2, 0.15, 0.1, 0.05]; at temperature 0.5 p ~ [0.74, 0.12, 0.07, 0.03, 0.01]
    values = {"temperature": 0.5, "top_p": 0.6}
    assert kept(SamplerChain(replace(SamplerSettings(**values), order="llama"), 5), LOGITS) == [{0, 1}]
    assert kept(SamplerChain(replace(SamplerSettings(**values), order="hf"), 5), LOGITS) == [{0}]


def test_explicit_order_runs_only_the_listed_steps() -> None:
    chain = SamplerChain(SamplerSettings(repetition_penalty=2.0, top_k=2, order="top_k"), 5)
    assert chain.step_names == ("top_k",)
    out = chain.process(LOGITS, [[0]])  # no penalty: token 0 keeps its logit
    np.testing.assert_allclose(out[0, :2], LOGITS[0, :2], rtol=1e-6)
    assert resolve_order("min_p, top_k") == ("min_p", "top_k")
    assert resolve_order("HF") == PRESET_ORDERS["hf"]


@pytest.mark.usefixtures("path")
def test_huge_and_non_finite_inputs_never_give_nan() -> None:
    logits = np.array(
        [
            [1e30, -1e30, 1e30, 0.0, -3e38],
            [np.nan, np.inf, 1.0, -np.inf, 2.0],
            [-np.inf, -np.inf, -np.inf, -np.inf, -np.inf],
            [3e38, 3e38, -3e38, 1.0, 2.0],
        ],
        dtype=np.float32,
    )
    for temperature in (1e-30, 0.3, 1.0, 40.0):
        chain = SamplerChain(SamplerSettings(temperature=temperature, top_p=0.9, min_p=0.1, typical_p=0.9), 5)
        processed = chain.process(logits, None)
        assert not np.isnan(processed).any() and not np.isposinf(processed).any()
        assert np.isfinite(processed).any(axis=1).all()
        probs = chain.probabilities(logits, None)
        assert np.isfinite(probs).all()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert chain.probabilities(logits, None)[1].argmax() == 1  # +inf is the most likely token, NaN is removed


def test_bad_shapes_and_ids_raise() -> None:
    chain = SamplerChain(SamplerSettings(), 5)
    with pytest.raises(ValueError, match="shape"):
        chain.process(np.zeros((1, 4)), [[]])
    with pytest.raises(ValueError, match="history"):
        chain.process(np.zeros((2, 5)), [[]])
    with pytest.raises(ValueError, match="extra_banned"):
        chain.process(np.zeros((1, 5)), [[]], extra_banned=[7])
    with pytest.raises(ValueError, match="whole vocabulary"):
        SamplerChain(SamplerSettings(), 3, banned_ids=[0, 1, 2])
    with pytest.raises(SettingError):
        SamplerChain(SamplerSettings(top_p=0.0), 5)


# ---------------------------------------------------------------------------------------------------------------
# Agreement with Hugging Face's processors (torch float64, so rounding cannot flip a cut)


def hf_apply(processors: list, logits: np.ndarray, history: np.ndarray) -> np.ndarray:
    return LogitsProcessorList(processors)(torch.from_numpy(history), torch.from_numpy(logits.copy())).numpy()


def assert_same_distribution(ours: np.ndarray, theirs: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-5)


HF_CASES = [
    ("temperature", {"temperature": 0.7}, lambda: TemperatureLogitsWarper(0.7)),
    ("top_k", {"top_k": 7}, lambda: TopKLogitsWarper(7)),
    ("top_p", {"top_p": 0.8}, lambda: TopPLogitsWarper(0.8)),
    ("top_p", {"top_p": 0.3}, lambda: TopPLogitsWarper(0.3)),
    ("min_p", {"min_p": 0.1}, lambda: MinPLogitsWarper(0.1)),
    ("typical_p", {"typical_p": 0.7}, lambda: TypicalLogitsWarper(0.7)),
    ("typical_p", {"typical_p": 0.2}, lambda: TypicalLogitsWarper(0.2)),
    ("penalties", {"repetition_penalty": 1.7, "penalty_last_n": -1}, lambda: RepetitionPenaltyLogitsProcessor(1.7)),
    ("no_repeat_ngram", {"no_repeat_ngram_size": 2}, lambda: NoRepeatNGramLogitsProcessor(2)),
]


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize(("step", "values", "make"), HF_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(HF_CASES)])
@pytest.mark.parametrize("vocab", [5, 40, 3000])
def test_each_step_matches_transformers(step: str, values: dict, make, vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((3, vocab)) * 2
    history = rng.integers(0, min(vocab, 6), size=(3, 12))  # few distinct ids, so n-grams do repeat
    ours = SamplerChain(only(step, **values), vocab).process(logits, history)  # a [B, L] array works as history
    assert_same_distribution(ours, hf_apply([make()], logits, history))


@pytest.mark.usefixtures("path")
def test_whole_chain_in_hf_order_matches_transformers() -> None:
    rng = np.random.default_rng(11)
    ours_settings = SamplerSettings(
        order="hf",
        temperature=0.8,
        top_k=30,
        typical_p=0.95,
        top_p=0.9,
        min_p=0.02,
        repetition_penalty=1.3,
        penalty_last_n=-1,
        no_repeat_ngram_size=3,
    )
    processors = [
        RepetitionPenaltyLogitsProcessor(1.3),
        NoRepeatNGramLogitsProcessor(3),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(30),
        TypicalLogitsWarper(0.95),
        TopPLogitsWarper(0.9),
        MinPLogitsWarper(0.02),
    ]
    for vocab in (50, 500):
        for _ in range(5):
            logits = rng.standard_normal((3, vocab)) * 3
            history = rng.integers(0, 10, size=(3, 40))
            ours = SamplerChain(ours_settings, vocab).process(logits, history.tolist())
            assert_same_distribution(ours, hf_apply(processors, logits, history))


# ---------------------------------------------------------------------------------------------------------------
# Properties over arbitrary valid settings and logits

LIMIT32 = float(np.float32(1e30))
SPECIAL_LOGITS = [0.0, 1.0, -1.0, 1e30, -1e30, 3e38, -3e38, 88.0, -88.0, 1e-30]


@st.composite
def sampler_cases(draw: st.DrawFn):
    vocab = draw(st.integers(1, 300))
    batch = draw(st.integers(1, 3))
    value = st.one_of(st.sampled_from(SPECIAL_LOGITS), st.floats(-LIMIT32, LIMIT32, width=32))
    mode = draw(st.sampled_from(["random", "equal", "few"]))
    if mode == "equal":
        logits = np.full((batch, vocab), draw(value), dtype=np.float32)
    else:
        pool = [draw(value) for _ in range(draw(st.integers(1, 4 if mode == "few" else 40)))]
        seed = draw(st.integers(0, 2**32 - 1))
        logits = np.random.default_rng(seed).choice(np.array(pool, dtype=np.float32), size=(batch, vocab))
    ids = st.integers(0, vocab - 1)
    history = [draw(st.lists(ids, max_size=30)) for _ in range(batch)]
    banned = draw(st.lists(ids, max_size=vocab - 1, unique=True))
    extra = draw(st.lists(ids, max_size=vocab, unique=True))
    sampler = SamplerSettings(
        temperature=draw(st.one_of(st.just(0.0), st.floats(1e-3, 10))),
        top_k=draw(st.integers(0, vocab + 3)),
        top_p=draw(st.one_of(st.just(1.0), st.floats(1e-6, 1.0))),
        min_p=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
        typical_p=draw(st.one_of(st.just(1.0), st.floats(1e-6, 1.0))),
        repetition_penalty=draw(st.one_of(st.just(1.0), st.floats(0.1, 10))),
        presence_penalty=draw(st.one_of(st.just(0.0), st.floats(-5, 5))),
        frequency_penalty=draw(st.one_of(st.just(0.0), st.floats(-5, 5))),
        penalty_last_n=draw(st.integers(-1, 40)),
        no_repeat_ngram_size=draw(st.integers(0, 4)),
        order=draw(st.sampled_from(["llama", "hf", "top_p,penalties,temperature,min_p", "temperature,top_k"])),
    )
    return sampler, logits, history, banned, extra


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sampler_cases())
def test_properties_hold_for_any_settings_and_logits(case) -> None:
    sampler, logits, history, banned, extra = case
    vocab = logits.shape[1]
    check_properties(SamplerChain(sampler, vocab, banned_ids=banned), logits, history, banned, extra)
    with general_path():
        check_properties(SamplerChain(sampler, vocab, banned_ids=banned), logits, history, banned, extra)


def check_properties(chain: SamplerChain, logits: np.ndarray, history: list, banned: list, extra: list) -> None:
    vocab = logits.shape[1]
    processed = chain.process(logits, history, extra)
    assert processed.dtype == np.float32 and processed.shape == logits.shape
    assert not np.isnan(processed).any() and not np.isposinf(processed).any()
    assert np.isfinite(processed).any(axis=1).all()

    probs = chain.probabilities(logits, history, extra)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs[:, banned] == 0).all()
    if len(set(banned) | set(extra)) < vocab:  # else the per-call bans are dropped (see the fallback test)
        assert (probs[:, extra] == 0).all()
    assert (probs[~np.isfinite(processed)] == 0).all()

    ids = chain.sample(logits, history, np.random.default_rng(0), extra)
    assert ids.dtype == np.int64 and ids.shape == (logits.shape[0],)
    rows = np.arange(logits.shape[0])
    if chain.greedy:
        assert (processed[rows, ids] == processed.max(axis=1)).all()
    else:
        assert (probs[rows, ids] > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Draws


@pytest.mark.usefixtures("path")
def test_seeded_draws_are_reproducible() -> None:
    logits = np.random.default_rng(0).standard_normal((4, 100))
    chain = SamplerChain(SamplerSettings(seed=1234, top_k=0), 100)

    def draws(rng: np.random.Generator) -> list[int]:
        return [int(i) for _ in range(20) for i in chain.sample(logits, None, rng)]

    first = draws(make_rng(chain.settings))
    assert first == draws(make_rng(chain.settings))
    assert first != draws(np.random.default_rng(4321))


@pytest.mark.usefixtures("path")
def test_sampling_frequencies_follow_the_probabilities() -> None:
    logits = np.log(np.array([[0.4, 0.25, 0.15, 0.1, 0.07, 0.03]]))
    chain = SamplerChain(SamplerSettings(temperature=0.9, top_p=0.95, top_k=0), 6)
    expected = chain.probabilities(logits, None)[0]
    assert expected[5] == 0 and expected[4] > 0  # top_p cut the last token
    rng = np.random.default_rng(2024)
    batch = np.repeat(logits, 1000, axis=0)
    counts = np.bincount(np.concatenate([chain.sample(batch, None, rng) for _ in range(20)]), minlength=6)
    assert counts[5] == 0
    support = expected > 0
    total = counts.sum()
    chi2 = (((counts - total * expected) ** 2)[support] / (total * expected[support])).sum()
    assert chi2 < 25.0  # 4 degrees of freedom: p ~ 5e-5 for a correct sampler


# ---------------------------------------------------------------------------------------------------------------
# The small-vocabulary path against the general one

FULL = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1}  # the demo's
AGREEMENT_CASES = [
    FULL,
    {**FULL, "order": "hf"},
    {"temperature": 1.3, "top_k": 0, "top_p": 0.8, "typical_p": 0.9, "presence_penalty": 0.4,
     "frequency_penalty": 0.3, "penalty_last_n": 16},
    {"temperature": 0.7, "top_k": 0, "min_p": 0.1, "no_repeat_ngram_size": 2, "repetition_penalty": 0.8},
    {"temperature": 0.6, "top_k": 0},  # temperature alone: the small path does not sort
    {"temperature": 1.0, "top_k": 0, "repetition_penalty": 1.5},  # nothing to filter
    {"temperature": 0.0, "repetition_penalty": 1.3, "penalty_last_n": -1},  # greedy
    {"order": "min_p,top_p,temperature", "temperature": 0.9, "min_p": 0.02, "top_p": 0.9},
    {"order": "temperature,typical_p,top_k", "temperature": 2.0, "typical_p": 0.5, "top_k": 5},
]


@pytest.mark.parametrize("values", AGREEMENT_CASES, ids=[str(i) for i in range(len(AGREEMENT_CASES))])
@pytest.mark.parametrize("vocab", [67, 300, 1500])
def test_small_and_general_paths_agree(values: dict, vocab: int) -> None:
    """Same kept tokens, logits, probabilities and seeded draws. The logits are continuous (no exact ties), where
    summing in another order could move a cut by rounding; the tie rules are pinned by the hand tests above."""
    settings = SamplerSettings(**values)
    rng = np.random.default_rng(vocab)
    small = SamplerChain(settings, vocab, banned_ids=[vocab - 1, 3])
    with general_path():
        general = SamplerChain(settings, vocab, banned_ids=[vocab - 1, 3])
    assert not general.plan.small
    assert small.plan.small or vocab > 1024  # what is compared on the narrower rows is really the small path
    histories = [rng.integers(0, 50, size=100).tolist() for _ in range(3)]
    histories[2] += [-1, vocab + 5]  # not token ids: ignored
    for extra in ((), [0]):
        for _ in range(3):
            logits = (rng.standard_normal((3, vocab)) * 3).astype(np.float32)
            np.testing.assert_array_equal(small.process(logits, histories, extra),
                                          general.process(logits, histories, extra))
            np.testing.assert_array_equal(small.probabilities(logits, histories, extra),
                                          general.probabilities(logits, histories, extra))
            draws = [np.random.default_rng(seed) for seed in (5, 5)]
            for _ in range(10):
                assert small.sample(logits, histories, draws[0], extra).tolist() == \
                    general.sample(logits, histories, draws[1], extra).tolist()
            for history in histories:  # the decode loop's pattern: the same lists, one token longer each call
                history.append(int(rng.integers(0, 50)))


def test_each_vocabulary_takes_the_cheaper_path() -> None:
    full = SamplerSettings(**FULL)
    assert SamplerChain(full, 67).plan.small and SamplerChain(full, 4096).plan.small  # a leading top-k cuts wide
    assert not SamplerChain(full, 4097).plan.small and not SamplerChain(full, 50257).plan.small
    nucleus = SamplerSettings(top_k=0, top_p=0.9)  # sorts whole rows: only up to 1024 wide
    assert SamplerChain(nucleus, 1024).plan.small and not SamplerChain(nucleus, 1025).plan.small
    assert SamplerChain(SamplerSettings(temperature=0.7, top_k=0), 4096).plan.small  # no sort at all
    assert not SamplerChain(replace(full, order="top_k,penalties"), 67).plan.small  # bans after a filter
    # sample() on the small path: prefix cuts as counts (top-k, top-p, min-p in any order, temperature last) ...
    assert SamplerChain(full, 67).plan.pick == "prefix"
    assert SamplerChain(replace(full, order="min_p,top_p,top_k,temperature"), 67).plan.pick == "prefix"
    assert SamplerChain(replace(full, order="hf"), 67).plan.pick is None  # scales before filtering: Plan.row
    assert SamplerChain(replace(full, typical_p=0.9), 67).plan.pick is None  # typical-p keeps a subset
    # ... or straight from the dense row when nothing cuts
    assert SamplerChain(SamplerSettings(temperature=0.7, top_k=0), 67).plan.pick == "dense"
    assert SamplerChain(SamplerSettings(temperature=0.0), 67).plan.pick is None  # greedy: argmax


def test_penalty_window_follows_a_history_edited_between_calls() -> None:
    """The small path updates its penalty vectors by one token per call instead of recounting the window; whatever
    happens to the history lists in between, the result must equal counting afresh."""
    vocab = 20
    settings = SamplerSettings(temperature=0.7, top_k=0, repetition_penalty=1.8, presence_penalty=0.3,
                               frequency_penalty=0.2, penalty_last_n=8)
    logits = (np.random.default_rng(0).standard_normal((2, vocab)) * 2).astype(np.float32)
    tracked = SamplerChain(settings, vocab)
    with general_path():
        general = SamplerChain(settings, vocab)
    rows = [[1, 2, 3], [4]]

    def check() -> None:
        fresh = SamplerChain(settings, vocab).process(logits, rows)  # a new chain counts from scratch
        np.testing.assert_array_equal(tracked.process(logits, rows), fresh)
        np.testing.assert_array_equal(general.process(logits, rows), fresh)

    check()
    for token in [4, 5, 6, 7, 8, 9, 1, 1, 1, 2, 2]:  # fills the window, then slides it
        rows[0].append(token)
        rows[1].append((token * 7) % vocab)
        check()
    edits = [
        lambda: rows[0].__delitem__(slice(-3, None)),  # an undo
        lambda: rows[0].extend([5, 5]),  # two tokens at once
        lambda: rows[0].__setitem__(slice(None), [7] * 12),  # the same list refilled
        lambda: rows[0].__setitem__(-2, 0),  # one token changed inside the window
        lambda: rows[0].append(np.int64(3)),  # not a plain int: counted afresh from then on
        lambda: rows[0].append(4),
        lambda: rows[0].extend([-1, vocab + 3]),  # not token ids
        lambda: rows[0].extend([2] * 9),  # ... which then leave the window
        lambda: rows.__setitem__(0, [*rows[0], 6]),  # a new list object
        lambda: rows.reverse(),  # the rows swap places in the batch
    ]
    for edit in edits:
        edit()
        check()


@pytest.mark.usefixtures("path")
def test_per_call_bans_are_remembered_yet_still_checked() -> None:
    chain = SamplerChain(SamplerSettings(temperature=0.5, top_k=0), 6, banned_ids=[5])
    logits = np.zeros((1, 6))
    pairs, triples = list(itertools.combinations(range(5), 2)), list(itertools.combinations(range(5), 3))
    for extra in [[0], (), [1, 2], [0], np.array([3]), [[4]], np.array([[1, 2]]), *pairs, *triples, *pairs]:
        probs = chain.probabilities(logits, None, extra_banned=extra)[0]
        assert set(np.flatnonzero(probs == 0).tolist()) == {5, *np.ravel(extra).tolist()}
    for _ in range(2):  # a bad list is refused every time, not remembered
        with pytest.raises(ValueError, match="extra_banned"):
            chain.sample(logits, None, np.random.default_rng(0), extra_banned=[9])


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("boost", [{"repetition_penalty": 1e-10}, {"presence_penalty": -1e308},
                                   {"frequency_penalty": -1e308}])
def test_boosting_penalties_never_overflow_to_infinity(boost: dict) -> None:
    logits = np.array([[1.5e308, 5.0, -1.0, 0.0]])  # float64 logits near the top of the range
    chain = SamplerChain(SamplerSettings(top_k=0, **boost), 4)
    processed = chain.process(logits, [[0, 1]])
    assert not np.isnan(processed).any() and not np.isposinf(processed).any()
    probs = chain.probabilities(logits, [[0, 1]])
    assert np.isfinite(probs).all() and probs[0].argmax() == 0
    np.testing.assert_allclose(probs.sum(), 1.0)
    assert chain.sample(logits, [[0, 1]], np.random.default_rng(0)).tolist() == [0]


# ---------------------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("temp", "0.7", ("temperature", 0.7)),
        ("Temperature", "0", ("temperature", 0.0)),
        ("rep_penalty", "1.1", ("repetition_penalty", 1.1)),
        ("repeat_penalty", "1.2", ("repetition_penalty", 1.2)),
        ("top-k", "40", ("top_k", 40)),
        ("TOP_P", " 0.95 ", ("top_p", 0.95)),
        ("repeat_last_n", "-1", ("penalty_last_n", -1)),
        ("no_repeat_ngram", "3", ("no_repeat_ngram_size", 3)),
        ("order", "HF", ("order", "hf")),
        ("samplers", "top_k, temperature", ("order", "top_k,temperature")),
        ("seed", "42", ("seed", 42)),
        ("seed", "none", ("seed", None)),
        ("min_p", 0.05, ("min_p", 0.05)),
        ("top_k", 50.0, ("top_k", 50)),
    ],
)
def test_parse_setting_accepts(key: str, raw: object, expected: tuple) -> None:
    assert parse_setting(key, raw) == expected


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        ("temp", "-1", "temperature must be >= 0 (0 = greedy), got -1"),
        ("top_p", "2", "top_p must be in (0, 1], got 2"),
        ("top_p", "0", "top_p must be in (0, 1], got 0"),
        ("top_k", "abc", "top_k must be an integer, got 'abc'"),
        ("top_k", "-3", "top_k must be an integer >= 0 (0 = off), got -3"),
        ("min_p", "1.5", "min_p must be in [0, 1], got 1.5"),
        ("typical_p", "nan", "typical_p must be a finite number, got 'nan'"),
        ("repetition_penalty", "0", "repetition_penalty must be > 0, got 0"),
        ("penalty_last_n", "-2", "penalty_last_n must be an integer >= -1"),
        ("seed", "-5", "seed must be an integer >= 0"),
        ("order", "top_k,bogus", "order: unknown step 'bogus'"),
        ("order", "top_k,top_k", "order names a step twice"),
        ("order", "", "order must be"),
        ("tmperature", "1", "unknown setting 'tmperature'; did you mean temperature?"),
        ("flux_capacitor", "1", "unknown setting 'flux_capacitor'"),
    ],
)
def test_parse_setting_rejects_with_a_clear_one_line_message(key: str, raw: str, message: str) -> None:
    with pytest.raises(SettingError) as caught:
        parse_setting(key, raw)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_validate_and_helpers() -> None:
    validate(SamplerSettings())
    with pytest.raises(SettingError, match="top_k must be an integer"):
        validate(SamplerSettings(top_k=2.5))  # type: ignore[arg-type]
    with pytest.raises(SettingError, match="wrong type"):
        validate(SamplerSettings(temperature="0.7"))  # type: ignore[arg-type]
    with pytest.raises(SettingError, match="order"):
        validate(SamplerSettings(order="llama,hf"))
    assert apply_setting(SamplerSettings(), "temp", "0.3").temperature == 0.3
    generation = {"temperature": 0.8, "top_k": 20, "max_new_tokens": 40}
    assert settings_from_mapping(generation, ignore_unknown=True) == SamplerSettings(temperature=0.8, top_k=20)
    with pytest.raises(SettingError, match="max_new_tokens"):
        settings_from_mapping(generation)


def test_importing_the_sampler_does_not_import_torch() -> None:
    code = "import sys, runtime.sampling; sys.exit(1 if 'torch' in sys.modules else 0)"
    repo_root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo_root, timeout=60).returncode == 0


def test_hand_computed_typical_constants() -> None:
    """Guards the numbers quoted in test_typical_p_by_hand."""
    entropy = -(PROBS * np.log(PROBS)).sum()
    assert math.isclose(entropy, 1.3331, abs_tol=1e-4)
    np.testing.assert_allclose(np.abs(-np.log(PROBS) - entropy), [0.640, 0.276, 0.564, 0.970, 1.663], atol=1e-3)


@pytest.mark.parametrize("values", [FULL, {"temperature": 0.7, "top_k": 0}, {**FULL, "presence_penalty": 0.5},
                                    {"order": "min_p,top_p,temperature", "min_p": 0.1, "top_p": 0.5, "top_k": 0}])
def test_a_batch_picks_what_each_row_picks_alone(values: dict) -> None:
    """Batches on the small path run as [B, V] arrays (``_pick_rows``); each row must draw the token it would
    draw in a batch of one, given the same uniform (rng.random(B) is B calls of rng.random())."""
    vocab, batch = 67, 6
    rng = np.random.default_rng(7)
    together = SamplerChain(SamplerSettings(**values), vocab, banned_ids=[vocab - 1, 3])
    assert together.plan.whole_batch
    alone = [SamplerChain(SamplerSettings(**values), vocab, banned_ids=[vocab - 1, 3]) for _ in range(batch)]
    histories = [rng.integers(0, 50, size=80).tolist() for _ in range(batch)]
    for _ in range(40):
        logits = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
        logits[0, 5] = np.nan if _ % 10 == 0 else logits[0, 5]  # a row done the careful way now and then
        seed = int(rng.integers(1 << 30))
        picked = together.sample(logits, histories, np.random.default_rng(seed))
        draws = np.random.default_rng(seed)
        expected = [int(chain.sample(logits[i : i + 1], [histories[i]], draws)[0]) for i, chain in enumerate(alone)]
        assert picked.tolist() == expected
        for history in histories:
            history.append(int(rng.integers(0, 50)))


@pytest.mark.parametrize("values", [FULL, {"temperature": 0.7, "top_k": 0}, {**FULL, "typical_p": 0.9},
                                    {"temperature": 0.0, "repetition_penalty": 1.3}])
@pytest.mark.parametrize("vocab", [67, 5000])
def test_sample_one_is_sample_for_one_row(values: dict, vocab: int) -> None:
    """The decode loop's ``sample_one`` (a plain int, no [1]-lists) draws what ``sample`` draws for that row."""
    rng = np.random.default_rng(3)
    one, batch = (SamplerChain(SamplerSettings(**values), vocab, banned_ids=[vocab - 1]) for _ in range(2))
    history = rng.integers(0, 50, size=90).tolist()
    for _ in range(25):
        logits = (rng.standard_normal((1, vocab)) * 3).astype(np.float32)
        seed = int(rng.integers(1 << 30))
        token = one.sample_one(logits, history, np.random.default_rng(seed))
        assert type(token) is int
        assert token == int(batch.sample(logits, [history], np.random.default_rng(seed))[0])
        history.append(token)
