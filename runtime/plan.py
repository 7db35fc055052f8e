"""The plan of one generation: its settings read once (sampler chains, lengths, stops, beams) and its seeded
random source, so a mid-generation ``:set`` cannot tear it. The Session builds one per turn
(runtime/generate.py), the server one per request row (serve/). Not to be confused with the sampler chain's
compiled fast paths (runtime/sampling/plan.py)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.sampling import SamplerChain, SamplerSettings
from runtime.session import OnnxModel
from runtime.settings import Settings


@dataclass
class DecodePlan:
    """The settings of one generation, read once so a mid-generation ``:set`` cannot tear it."""

    sampler: SamplerSettings
    chain: SamplerChain
    chain_without_eos: SamplerChain  # the same chain with eos banned too, while min_new_tokens is not reached
    max_new: int
    min_new: int
    beams: int
    stops: list[str]
    seed: int
    rng: np.random.Generator = field(repr=False)

    def chain_at(self, generated: int) -> SamplerChain:
        """The chain for the token after ``generated`` new ones. Banning eos through a second chain built once,
        rather than per-call extra bans, keeps the per-step cost of the sampler flat."""
        return self.chain_without_eos if generated < self.min_new else self.chain


class RowRandom:
    """One ``np.random.Generator`` per batch row, behind the one-generator interface the sampler chain uses
    (``random()`` for a batch of one, ``random(rows)`` for a batch): row i draws from ``default_rng(seeds[i])``
    exactly what a single generation with ``--seed seeds[i]`` draws, so each alternative of ``:n`` / ``--n`` is
    reproduced alone by its own seed. Anything else the chain might ask for is refused loudly rather than drawn
    from a shared stream, which would silently break that promise."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.seeds = list(seeds)
        self._rows = [np.random.default_rng(seed) for seed in self.seeds]

    @classmethod
    def of(cls, generators: Sequence[np.random.Generator]) -> RowRandom:
        """Rows that draw from generators already running (the server's rows, each mid-way through its own
        seeded stream); they advance exactly as if each row drew alone."""
        rows = cls([])
        rows._rows = list(generators)
        return rows

    def random(self, size: int | None = None) -> float | np.ndarray:
        if size is None:
            return self._rows[0].random()
        if size != len(self._rows):
            raise ValueError(f"RowRandom has {len(self._rows)} rows, asked for {size} draws")
        return np.array([row.random() for row in self._rows])


def alternative_seed(seed: int, index: int) -> int:
    """The seed of alternative ``index`` (0-based) of a ``:n`` / ``--n`` run with ``seed``: the first one is the
    seed itself, so ``--n 1`` and a plain run agree."""
    return seed + index


def new_plan(model: OnnxModel, settings: Settings, vocabulary: Callable[[], list[str]] | None = None) -> DecodePlan:
    """The settings of one generation read once: sampler chains, lengths, stops and a seeded generator (a fresh
    seed when the settings have none). The server builds one per request row, the Session one per turn.
    ``vocabulary()`` gives each id's text, asked only when a step matches text (logit bias by text, banned
    strings, DRY's sequence breakers); without it such settings raise SettingError."""
    sampler = settings.sampler()
    seed = sampler.seed if sampler.seed is not None else draw_seed()
    vocab, banned, eos = model.info.vocab_size, model.banned_ids, model.info.special.eos
    unk = model.info.special.unk
    if unk is not None and settings.get("suppress_unk"):  # banned like padding (runtime/settings.py)
        banned = [*banned, unk]
    texts = vocabulary() if vocabulary is not None and needs_vocabulary(sampler) else None
    chain = SamplerChain(sampler, vocab, banned, vocabulary=texts)
    min_new = int(settings.get("min_new_tokens"))
    return DecodePlan(
        sampler=sampler,
        chain=chain,
        # never used without min_new_tokens (chain_at): not built then, each chain costs a settings check
        chain_without_eos=SamplerChain(sampler, vocab, [*banned, eos], vocabulary=texts) if min_new > 0 else chain,
        max_new=int(settings.get("max_new_tokens")),
        min_new=min_new,
        beams=int(settings.get("num_beams")),
        stops=list(settings.get("stop")),
        seed=seed,
        rng=np.random.default_rng(seed),
    )



def needs_vocabulary(sampler: SamplerSettings) -> bool:
    """Whether the chain needs each id's text: banned strings, DRY's sequence breakers, logit bias by text."""
    return sampler.ban != "[]" or sampler.dry_multiplier > 0 or any(
        not (key.startswith("#") and key[1:].isdigit()) for key in json.loads(sampler.logit_bias))


def draw_seed() -> int:
    return secrets.randbits(31)
