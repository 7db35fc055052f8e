"""Properties every sampler step must keep, parametrized over the step registry (runtime.sampling.steps.REGISTRY):
a new step is covered the moment it is registered, with no new test code. ``KeepAboveMeanStep`` and
``CoinDropsTopStep`` below are tiny example steps (a filter; a step that reads a uniform of its own, as XTC
will), registered for this module only, to show it: they run under every property like the real steps do
(``pytest tests/test_sampler_steps.py -v`` lists them in each one's parameters).

Settings are drawn from the validation rules themselves (``runtime.sampling.validation.RULES``: each range is a
small object a strategy can read), so a new setting is drawn too. The properties:

- valid probabilities for any logits (huge, equal, NaN, +-inf), bans and per-call bans included;
- a batch row gets what that row gets alone (processed logits, probabilities and the seeded token);
- the same seed picks the same token on every path: the plan's fast route, the general path, ``sample_one``,
  over several decode steps whose histories grow by the drawn tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields

import numpy as np
import pytest
from conftest import general_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.sampling import PRESET_ORDERS, REGISTRY, SamplerChain, SamplerSettings, SettingError
from runtime.sampling.candidates import Candidates, Scratch
from runtime.sampling.steps import Filter, Step
from runtime.sampling.validation import RULES, FloatRange, IntAtLeast, IntChoice


class KeepAboveMeanStep(Filter):
    """Example step: keep the tokens whose logit is at least the mean of the candidates' logits."""

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> KeepAboveMeanStep:
        return cls()

    def mask(self, values: np.ndarray, scratch: Scratch) -> np.ndarray:
        candidates = values[values > -np.inf]
        peak = candidates.max()
        with np.errstate(over="ignore"):  # a -inf mean keeps everything; the top token always stays
            cut = peak + (candidates - peak).mean()
        return values >= cut


class CoinDropsTopStep(Step):
    """Example step with randomness of its own: on heads (its uniform < 0.5) the most likely token goes."""

    sampling_only = True
    random = True

    @classmethod
    def from_settings(cls, settings: SamplerSettings, vocab_size: int) -> CoinDropsTopStep:
        return cls()

    def apply(self, candidates: Candidates) -> None:
        if candidates.uniform is None or candidates.uniform >= 0.5:
            return  # process / probabilities: the distribution before the coin
        ids, values = candidates.view()
        if np.count_nonzero(values > -np.inf) > 1:
            keep = np.ones(values.size, dtype=bool)
            keep[values.argmax()] = False
            candidates.keep(ids, values, keep)


EXAMPLE_STEPS = {"keep_above_mean": KeepAboveMeanStep, "coin_drops_top": CoinDropsTopStep}
STEPS = [*REGISTRY, *EXAMPLE_STEPS]  # what the properties run over: every registered step, and the example


@pytest.fixture(autouse=True)
def register_example_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, step in EXAMPLE_STEPS.items():
        monkeypatch.setitem(REGISTRY, name, step)  # the one registry line a new step needs, here for tests only


# ---------------------------------------------------------------------------------------------------------------
# Strategies read from the settings' own rules


def _valid(check: FloatRange, value: float) -> bool:
    try:
        check("value", value)
    except SettingError:
        return False
    return True


def setting_values(name: str, default: object) -> st.SearchStrategy:
    """Valid values of one setting, drawn from its rule's range (bounded to a sane span), or its default."""
    check = RULES[name][1]
    if isinstance(check, FloatRange):
        low = -5.0 if check.low is None else check.low + (1e-3 if check.low_open else 0.0)
        high = low + 10.0 if check.high is None else min(check.high, low + 10.0)
        values = st.floats(low, high).filter(lambda value: _valid(check, value))
        return st.one_of(st.just(default), st.just(low), values)
    if isinstance(check, IntAtLeast):
        return st.one_of(st.just(default), st.integers(check.minimum, check.minimum + 12))
    if isinstance(check, IntChoice):
        return st.one_of(st.just(default), st.sampled_from(check.choices))
    return st.just(default)  # order and seed are drawn below


@st.composite
def chain_settings(draw: st.DrawFn, step: str) -> SamplerSettings:
    """Settings whose order holds ``step``: alone, or placed anywhere in a preset order."""
    defaults = SamplerSettings()
    values = {f.name: draw(setting_values(f.name, getattr(defaults, f.name)))
              for f in fields(SamplerSettings) if f.name not in ("order", "seed")}
    base = draw(st.sampled_from([(), PRESET_ORDERS["llama"], PRESET_ORDERS["hf"]]))
    names = [name for name in base if name != step]
    names.insert(draw(st.integers(0, len(names))), step)
    return SamplerSettings(**values, order=",".join(names))


@st.composite
def hostile_logits(draw: st.DrawFn, batch: int, vocab: int) -> np.ndarray:
    special = [0.0, 1.0, -1.0, 1e30, -1e30, 3e38, -3e38, 88.0, -88.0, np.nan, np.inf, -np.inf]
    pool = draw(st.lists(st.one_of(st.sampled_from(special), st.floats(-LIMIT32, LIMIT32, width=32)), min_size=1,
                         max_size=20))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).choice(np.array(pool, dtype=np.float32), size=(batch, vocab))


def smooth_logits(rng: np.random.Generator, batch: int, vocab: int) -> np.ndarray:
    """Continuous logits (no exact ties), where every path must make the same cuts, not just valid ones."""
    return (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)


def histories(rng: np.random.Generator, batch: int, vocab: int) -> list[list[int]]:
    return [rng.integers(0, min(vocab, 12), size=int(rng.integers(0, 40))).tolist() for _ in range(batch)]


LIMIT32 = float(np.float32(1e30))
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------------------------
# The properties


@pytest.mark.parametrize("step", STEPS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_probabilities_are_valid_for_any_logits(step: str, data: st.DataObject) -> None:
    sampler = data.draw(chain_settings(step))
    vocab, batch = data.draw(st.integers(2, 300)), data.draw(st.integers(1, 3))
    logits = data.draw(hostile_logits(batch, vocab))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    banned = rng.choice(vocab, size=int(rng.integers(0, vocab)), replace=False).tolist()
    extra = rng.choice(vocab, size=int(rng.integers(0, 3)), replace=False).tolist()
    for general in (False, True):
        with general_path() if general else _nothing():
            chain = SamplerChain(sampler, vocab, banned_ids=banned)
        rows = histories(rng, batch, vocab)
        processed = chain.process(logits, rows, extra)
        assert processed.dtype == np.float32 and not np.isnan(processed).any() and not np.isposinf(processed).any()
        probs = chain.probabilities(logits, rows, extra)
        assert np.isfinite(probs).all() and (probs >= 0).all()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert (probs[:, banned] == 0).all() and (probs[~np.isfinite(processed)] == 0).all()
        picked = chain.sample(logits, rows, np.random.default_rng(0), extra)
        assert picked.dtype == np.int64 and picked.shape == (batch,)
        assert not set(picked.tolist()) & set(banned)
        if not any(step.random for step in chain.steps):  # a random step draws from what it leaves after its coin
            chosen = probs[np.arange(batch), picked]
            assert (chosen == probs.max(axis=1)).all() if chain.greedy else (chosen > 0).all()


@pytest.mark.parametrize("step", STEPS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_a_batch_row_gets_what_the_row_gets_alone(step: str, data: st.DataObject) -> None:
    sampler = data.draw(chain_settings(step))
    vocab, batch = data.draw(st.sampled_from([7, 67, 300])), data.draw(st.integers(2, 5))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    together = SamplerChain(sampler, vocab, banned_ids=[vocab - 1])
    alone = [SamplerChain(sampler, vocab, banned_ids=[vocab - 1]) for _ in range(batch)]
    rows = histories(rng, batch, vocab)
    for _ in range(3):
        logits = smooth_logits(rng, batch, vocab)
        for index, chain in enumerate(alone):
            np.testing.assert_array_equal(chain.process(logits[index : index + 1], [rows[index]])[0],
                                          together.process(logits, rows)[index])
        seed = int(rng.integers(1 << 30))
        picked = together.sample(logits, rows, np.random.default_rng(seed)).tolist()
        draws = np.random.default_rng(seed)  # rng.random(B) is B calls of rng.random()
        assert picked == [int(chain.sample(logits[i : i + 1], [rows[i]], draws)[0]) for i, chain in enumerate(alone)]
        for row, token in zip(rows, picked, strict=True):
            row.append(token)


@pytest.mark.parametrize("step", STEPS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_the_same_seed_picks_the_same_token_on_every_path(step: str, data: st.DataObject) -> None:
    sampler = data.draw(chain_settings(step))
    vocab = data.draw(st.sampled_from([7, 67, 300]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    planned = SamplerChain(sampler, vocab, banned_ids=[vocab - 1])
    one = SamplerChain(sampler, vocab, banned_ids=[vocab - 1])
    with general_path():
        general = SamplerChain(sampler, vocab, banned_ids=[vocab - 1])
    assert not general.plan.small
    history = histories(rng, 1, vocab)[0]
    streams = [np.random.default_rng(7) for _ in range(3)]
    for _ in range(6):  # a decode loop: each path's history grows by the token it drew (the same one)
        logits = smooth_logits(rng, 1, vocab)
        tokens = [int(planned.sample(logits, [history], streams[0])[0]),
                  int(general.sample(logits, [history], streams[1])[0]),
                  one.sample_one(logits, history, streams[2])]
        assert tokens[0] == tokens[1] == tokens[2]
        history.append(tokens[0])


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ---------------------------------------------------------------------------------------------------------------
# The example step itself


def test_the_example_step_runs_and_takes_the_general_path() -> None:
    """The properties above would be vacuous for the example if it never ran: it does, on the general path (the
    plan has no fast form for it), and a registered step with a fast form keeps the small-vocabulary plan."""
    chain = SamplerChain(SamplerSettings(order="keep_above_mean", top_k=0), 5)
    assert chain.step_names == ("keep_above_mean",) and not chain.plan.small
    logits = np.array([[4.0, 0.0, 3.0, -1.0, 2.0]])  # mean 1.6
    assert np.isfinite(chain.process(logits, None)).tolist() == [[True, False, True, False, True]]
    assert SamplerChain(SamplerSettings(order="top_k,temperature", top_k=2, temperature=0.7), 5).plan.small
    assert "keep_above_mean" in STEPS and set(REGISTRY) <= set(STEPS)



def test_the_random_example_step_reads_its_own_uniform() -> None:
    """The uniform a random step reads comes with the row's draw uniform (rng is still asked once per row), and
    is independent of it: the coin drops the near-certain top token in about half of the draws."""
    chain = SamplerChain(SamplerSettings(order="coin_drops_top", top_k=0), 3)
    assert not chain.plan.small
    logits = np.array([[12.0, 0.0, 0.0]])
    assert chain.probabilities(logits, None)[0, 0] > 0.99  # no coin without a draw
    tops = sum(int(chain.sample(logits, None, np.random.default_rng(seed))[0]) == 0 for seed in range(400))
    assert 150 < tops < 250
