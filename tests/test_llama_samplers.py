"""llama.cpp's samplers (DRY, XTC, mirostat, top-n-sigma, dynamic temperature, logit bias, banned strings):
hand-computed distributions per step and llama.cpp's published semantics. The shared properties (valid
probabilities, batch = rows alone, same seed on every path) run over them in tests/test_sampler_steps.py."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from runtime.sampling import SamplerChain, SamplerSettings, SettingError, apply_setting
from runtime.sampling.candidates import Candidates
from runtime.sampling.draw import step_uniform
from runtime.sampling.llama_steps import DryStep, MirostatStep, XtcStep


def settings(**values: object) -> SamplerSettings:
    base = SamplerSettings(top_k=0)
    for key, value in values.items():
        base = apply_setting(base, key, value)
    return base


def process(sampler: SamplerSettings, logits: list[float], history: list[int],
            vocabulary: list[str] | None = None) -> np.ndarray:
    chain = SamplerChain(sampler, len(logits), vocabulary=vocabulary)
    return chain.process(np.array([logits], dtype=np.float32), [history])[0].astype(np.float64)


# ------------------------------------------------------------------------------------------------ DRY


def test_dry_penalises_the_token_that_would_extend_a_repeat_by_multiplier_times_base_power() -> None:
    # The history ends with 1 2 3, which occurred before followed by 4: emitting 4 extends a repeat of n = 3.
    history = [1, 2, 3, 4, 0, 1, 2, 3]
    out = process(settings(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, order="dry"), [0.0] * 6,
                  history)
    expected = np.zeros(6)
    expected[4] = -0.8 * 1.75 ** (3 - 2)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_dry_takes_the_longest_repeat_per_token_and_spares_repeats_shorter_than_allowed() -> None:
    # "2 3" -> 5 (n = 2: penalty multiplier * base^0) and "1 2 3" -> 4 (n = 3); "3" -> 0 alone is n = 1: spared.
    history = [1, 2, 3, 4, 2, 3, 5, 3, 0, 1, 2, 3]
    step = DryStep(1.0, 2.0, 2, -1, frozenset())
    assert step.repeat_lengths(history) == {4: 3, 5: 2}
    out = process(settings(dry_multiplier=1.0, dry_base=2.0, order="dry"), [0.0] * 6, history)
    np.testing.assert_allclose(out, [0, 0, 0, 0, -2.0, -1.0], rtol=1e-6)


def test_dry_matches_never_cross_a_sequence_breaker_and_the_window_limits_the_search() -> None:
    vocabulary = ["a", "b", "c", "d", "\n", "e"]
    history = [0, 1, 2, 3, 4, 0, 1, 2]  # "abc" repeats, but only "\n" + ... : the match "abc" ends at 2 after \n
    sampler = settings(dry_multiplier=1.0, order="dry")
    assert process(sampler, [0.0] * 6, history, vocabulary)[3] == pytest.approx(-1.75)  # no breaker inside
    history = [0, 1, 2, 3, 0, 4, 1, 2]  # the breaker sits inside the repeat: only "b c" (n = 2) counts
    assert process(sampler, [0.0] * 6, history, vocabulary)[3] == pytest.approx(-1.0)
    windowed = settings(dry_multiplier=1.0, dry_penalty_last_n=4, order="dry")
    assert (process(windowed, [0.0] * 6, [0, 1, 2, 3, 5, 5, 0, 1, 2], vocabulary) == 0).all()


def test_dry_is_off_by_default_and_runs_under_greedy() -> None:
    assert not any(isinstance(step, DryStep) for step in SamplerChain(SamplerSettings(), 10).steps)
    greedy = SamplerChain(settings(temperature=0, dry_multiplier=5.0), 6)
    assert any(isinstance(step, DryStep) for step in greedy.steps)
    logits = np.array([[0, 0, 0, 0, 1.0, 0]], dtype=np.float32)  # 4 would repeat 1 2 3 4 and loses its lead
    assert int(greedy.sample(logits, [[1, 2, 3, 4, 0, 1, 2, 3]], np.random.default_rng(0))[0]) != 4


# ------------------------------------------------------------------------------------------------ XTC


def _step_row(step: object, logits: list[float], uniform: float | None) -> np.ndarray:
    row = Candidates(np.array(logits, dtype=np.float64), [], 0)
    row.uniform = uniform
    step.apply(row)  # type: ignore[attr-defined]
    probs = np.exp(row.logits - row.logits.max())
    return probs / probs.sum()


def test_xtc_removes_every_top_choice_above_the_threshold_but_the_least_likely() -> None:
    logits = np.log([0.4, 0.3, 0.2, 0.1]).tolist()
    step = XtcStep(probability=0.5, threshold=0.15)
    np.testing.assert_allclose(_step_row(step, logits, 0.2), [0, 0, 2 / 3, 1 / 3], atol=1e-12)
    np.testing.assert_allclose(_step_row(step, logits, 0.7), [0.4, 0.3, 0.2, 0.1], atol=1e-12)  # coin: no
    lone = XtcStep(probability=1.0, threshold=0.35)  # one token above the threshold: nothing to exclude
    np.testing.assert_allclose(_step_row(lone, logits, 0.0), [0.4, 0.3, 0.2, 0.1], atol=1e-12)


def test_xtc_fires_with_its_probability_over_seeded_draws() -> None:
    chain = SamplerChain(settings(xtc_probability=0.3, xtc_threshold=0.2), 3)
    logits = np.log(np.array([[0.6, 0.3, 0.1]])).astype(np.float32)
    rng = np.random.default_rng(1)
    picks = np.array([chain.sample(logits, [[]], rng)[0] for _ in range(6000)])
    # without XTC token 0 has 0.6; with it (30 % of draws) only 0.3 / 0.4 goes to token 1 and 0.1 / 0.4 to 2.
    expected = 0.7 * np.array([0.6, 0.3, 0.1]) + 0.3 * np.array([0.0, 0.75, 0.25])
    observed = np.bincount(picks, minlength=3) / picks.size
    np.testing.assert_allclose(observed, expected, atol=0.02)


def test_the_step_uniform_is_independent_of_which_token_the_draw_picks() -> None:
    # Uniforms that draw a token of probability 2**-30 at the bottom of the CDF: all of them have zero high bits,
    # which made the old low-bits coin < 2**-4 every time. The step's uniform must still spread over [0, 1).
    rng = np.random.default_rng(0)
    bottom = rng.integers(0, 2**23, size=4000) / 2.0**53
    coins = np.array([step_uniform(float(u)) for u in bottom])
    assert 0.47 < coins.mean() < 0.53 and coins.max() > 0.95 and coins.min() < 0.05
    everywhere = np.array([step_uniform(float(u)) for u in rng.random(20000)])
    assert abs(np.corrcoef(everywhere, rng.random(20000))[0, 1]) < 0.03
    assert np.histogram(everywhere, bins=10, range=(0, 1))[0].min() > 1800


# ------------------------------------------------------------------------------------------------ top-n-sigma, dynatemp


def test_top_n_sigma_keeps_logits_within_n_standard_deviations_of_the_max() -> None:
    logits = [0.0, 1.0, 2.0, 3.0, 10.0]
    sigma = float(np.std(logits))  # 3.49
    out = process(settings(top_n_sigma=1.0, order="top_n_sigma"), logits, [])
    kept = np.isfinite(out)
    assert kept.tolist() == [value >= 10.0 - sigma for value in logits] == [False] * 4 + [True]
    wide = process(settings(top_n_sigma=3.0, order="top_n_sigma"), logits, [])
    assert np.isfinite(wide).tolist() == [value >= 10.0 - 3 * sigma for value in logits]


def test_dynamic_temperature_follows_the_normalised_entropy() -> None:
    logits = np.log([0.7, 0.2, 0.1])
    entropy = -float((np.exp(logits) * logits).sum())
    temperature = (1.0 - 0.5) + (2 * 0.5) * (entropy / math.log(3)) ** 2.0  # t_min + (t_max - t_min) * h^exp
    out = process(settings(temperature=1.0, dynatemp_range=0.5, dynatemp_exponent=2.0, order="temperature"),
                  logits.tolist(), [])
    np.testing.assert_allclose(out - out.max(), (logits - logits.max()) / temperature, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ mirostat


def test_mirostat_2_keeps_tokens_up_to_mu_bits_of_surprise_and_moves_mu_toward_tau() -> None:
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])  # surprises 1, 2, 3, 4, 4 bits
    step = MirostatStep(2, tau=1.25, eta=0.5, vocab_size=5)  # mu starts at 2 * tau = 2.5 bits: keeps 1 and 2
    kept = _step_row(step, np.log(probs).tolist(), None)
    np.testing.assert_allclose(kept, [2 / 3, 1 / 3, 0, 0, 0], atol=1e-12)
    step.accept(0, 1)  # drawn: token 1, surprise -log2(1/3) after the cut
    assert step.mu(0) == pytest.approx(2.5 - 0.5 * (math.log2(3) - 1.25))
    step.reset(0)
    assert step.mu(0) == 2.5


def test_mirostat_1_cuts_to_the_top_k_its_zipf_estimate_implies() -> None:
    ranks = np.arange(1, 201)
    zipf = 1.0 / ranks**1.5  # an exact Zipf law: s_hat = 1.5
    probs = zipf / zipf.sum()
    step = MirostatStep(1, tau=3.0, eta=0.1, vocab_size=200)
    kept = np.count_nonzero(_step_row(step, np.log(probs).tolist(), None))
    epsilon = 0.5
    k = ((epsilon * 2.0**6.0) / (1 - 200.0**-epsilon)) ** (1 / 1.5)
    assert kept == int(k)


def test_mirostat_replaces_the_other_sampling_steps_and_keeps_state_across_a_turn() -> None:
    chain = SamplerChain(settings(mirostat=2, top_k=5, top_p=0.5, mirostat_tau=2.0), 50)
    assert [type(step).__name__ for step in chain.steps] == ["MirostatStep"]
    rng = np.random.default_rng(3)
    history: list[int] = []
    logits = np.random.default_rng(0).standard_normal((1, 50)).astype(np.float32) * 2
    for _ in range(30):
        history.append(int(chain.sample(logits, [history], rng)[0]))
    chain.sample(logits, [history], rng)
    mirostat = chain.steps[0]
    assert mirostat.mu(0) != 4.0  # it moved with the drawn tokens' surprise
    chain.sample(logits, [[1, 2]], rng)  # a new prompt: mu back to 2 * tau
    assert mirostat.mu(0) == 4.0


# ------------------------------------------------------------------------------------------------ bias and bans


def test_logit_bias_by_text_or_id_and_minus_infinity_removes_the_token() -> None:
    vocabulary = ["a", "b", "e", "#"]
    out = process(settings(logit_bias={"e": "-inf", "#1": 2.5}), [0.0, 0.0, 5.0, 0.0], [], vocabulary)
    assert out[2] == -np.inf and out[1] == pytest.approx(2.5) and out[0] == 0.0
    with pytest.raises(SettingError, match="'zz' is not one token"):
        SamplerChain(settings(logit_bias={"zz": 1}), 4, vocabulary=vocabulary)
    with pytest.raises(SettingError, match="outside the vocabulary"):
        SamplerChain(settings(logit_bias={"#9": 1}), 4, vocabulary=vocabulary)


def test_a_banned_string_is_never_completed_whatever_the_tokenization() -> None:
    vocabulary = ["a", "b", "c", "ab", "bc", "x"]
    sampler = settings(ban=["abc"], order="ban")
    banned = [np.flatnonzero(~np.isfinite(process(sampler, [0.0] * 6, history, vocabulary))).tolist()
              for history in ([5], [0], [3], [0, 1])]
    assert banned == [[], [4], [2], [2]]  # after "a": "bc"; after "ab" (one token or two): "c"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("mirostat", "3", "mirostat must be one of 0, 1, 2"),
    ("dry_base", "0.5", "dry_base must be >= 1"),
    ("xtc_probability", "2", "xtc_probability must be in [0, 1]"),
    ("logit_bias", '{"e": "x"}', "must be a number"),
    ("dry_sequence_breakers", "[1]", "must be a list of strings"),
])
def test_bad_values_are_one_line_setting_errors(key: str, value: str, message: str) -> None:
    with pytest.raises(SettingError, match=re.escape(message)) as error:
        apply_setting(SamplerSettings(), key, value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("mu", [1e6, -1e6, 5000.0, -5000.0])
def test_mirostat_survives_an_extreme_mu(version: int, mu: float) -> None:
    step = MirostatStep(version, tau=5.0, eta=0.1, vocab_size=7)
    step._mu[0] = mu  # what a long run of surprising tokens with a large eta can reach
    kept = np.count_nonzero(_step_row(step, np.log([0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.02]).tolist(), None))
    assert kept == (7 if mu > 0 else 1)
