"""The sampler chain: a list of steps plus the plan compiled from them. [B, V] logits -> processed logits,
probabilities, or one drawn id per row. numpy only, never torch.

``SamplerChain(settings, vocab_size, banned_ids)`` builds the steps the ``order`` setting names from the
registry (skipping those the settings make no-ops, and for greedy decoding the sampling-only ones), then asks
``Plan`` how they can run. Rows take the plan's small-vocabulary routes when it has them, else the general path
below: each row a ``Candidates`` that every step's ``apply`` edits in turn. Banned ids (vocabulary padding,
per-call extras such as end-of-text before ``min_new_tokens``) are removed before every step; when the steps
remove everything, the best allowed original logit is kept.

Histories come with every call, so the chain is the one place that follows them for the stateful steps
(``HistoryFollower``): a row's history one token longer than at the last call becomes ``accept(slot, token)``,
anything else ``reset(slot, tail)``.

The contract callers rely on: ``sample(logits, histories, rng)`` asks ``rng`` only for ``rng.random()`` (a batch
of one) or ``rng.random(rows)``, one uniform per row, in row order, so a caller may hand in any object with that
method (one seed per row, say); the draw is by inverse CDF in token-id order whatever the path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from runtime.sampling.candidates import FLOAT32_MAX, Bans, Candidates, Scratch, View, finite, probabilities, sanitize
from runtime.sampling.draw import draw, step_uniform
from runtime.sampling.plan import Plan
from runtime.sampling.registry import REGISTRY
from runtime.sampling.settings import SamplerSettings, SettingError
from runtime.sampling.steps import Step
from runtime.sampling.validation import resolve_order, validate

_BAN_CACHE_SIZE = 16  # distinct per-call ban lists remembered (the decode loop uses one or two)
MAX_FOLLOWED_ROWS = 64  # batch rows whose history the chain follows for stateful steps


class HistoryFollower:
    """Turns the histories each call passes into ``accept`` / ``reset`` events for the stateful steps.

    Per batch row it keeps the last ``depth`` tokens and the length it saw: the same history again is nothing
    new (e.g. ``:probs``, then a turn), one token more is an ``accept``, anything else (a new prompt, an undo, an
    edit inside the window, beam rows reordered) a ``reset`` with the history's tail. Rows it cannot follow (not
    a list, beyond ``MAX_FOLLOWED_ROWS``) are reset to no state, and the steps read those histories directly."""

    def __init__(self, steps: Sequence[Step]):
        self.steps = steps
        self.depth = max(step.depth for step in steps)
        self._rows: dict[int, list] = {}  # slot -> [tail, length]

    def follow(self, slot: int, history: Sequence[int]) -> None:
        if type(history) is not list or slot >= MAX_FOLLOWED_ROWS:
            if self._rows.pop(slot, None) is not None:
                for step in self.steps:
                    step.reset(slot)
            return
        seen = self._rows.get(slot)
        if seen is not None:
            tail, depth, size = seen[0], self.depth, len(history)
            if size == seen[1] + 1 and type(history[-1]) is int and history[-depth - 1 : -1] == tail:
                token = history[-1]
                if len(tail) == depth:
                    del tail[0]
                tail.append(token)
                seen[1] = size
                for step in self.steps:
                    step.accept(slot, token)
                return
            if size == seen[1] and history[-depth:] == tail:
                return
        tail = history[-self.depth :]
        self._rows[slot] = [tail, len(history)]
        for step in self.steps:
            step.reset(slot, tail)


class SamplerChain:
    """Applies the configured steps to a batch of logits and draws one token per row."""

    def __init__(self, settings: SamplerSettings, vocab_size: int, banned_ids: Sequence[int] = (),
                 vocabulary: Sequence[str] | None = None):
        validate(settings)
        if int(vocab_size) < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.settings = settings
        self.vocab_size = int(vocab_size)
        self.greedy = settings.temperature <= 0
        self.vocabulary = vocabulary
        self.banned_ids = self._check_ids(banned_ids, "banned_ids")
        if self.banned_ids.size >= self.vocab_size:
            raise ValueError("banned_ids cover the whole vocabulary")
        names = resolve_order(settings.order)
        if settings.mirostat:  # llama.cpp: mirostat replaces the other sampling steps (temperature stays)
            names = tuple(name for name in names
                          if not REGISTRY[name].sampling_only or name in ("temperature", "mirostat"))
            if "mirostat" not in names:
                names = (*names, "mirostat")
        self.step_names = tuple(name for name in names if not (self.greedy and REGISTRY[name].sampling_only))
        self.steps: list[Step] = [step for step in map(self._build, self.step_names) if step is not None]
        stateful = [step for step in self.steps if step.depth is not None]
        self._follower = HistoryFollower(stateful) if stateful else None
        self.plan = Plan(self.steps, self.vocab_size, self.greedy)
        self._random = any(step.random for step in self.steps)
        self._work: np.ndarray | None = None  # general path: float64 batch buffer reused across calls
        self._scratch = Scratch()
        self._ban_cache: dict[tuple, Bans] = {}
        self._base_bans = self._make_bans()

    def _build(self, name: str) -> Step | None:
        kind = REGISTRY[name]
        if getattr(kind, "needs_vocabulary", False):
            try:
                return kind.from_settings(self.settings, self.vocab_size, vocabulary=self.vocabulary)
            except ValueError as error:  # e.g. a logit-bias key that is not one token of this vocabulary
                raise SettingError(str(error)) from None
        return kind.from_settings(self.settings, self.vocab_size)

    def _check_ids(self, ids: Sequence[int], what: str) -> np.ndarray:
        array = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        if array.size and (array[0] < 0 or array[-1] >= self.vocab_size):
            raise ValueError(f"{what} must lie in [0, {self.vocab_size}), got {array[0]}..{array[-1]}")
        return array

    # -- public API ----------------------------------------------------------------------------------------------

    def process(
        self, logits: np.ndarray, history: Sequence[Sequence[int]] | None, extra_banned: Sequence[int] = ()
    ) -> np.ndarray:
        """[B, V] logits -> [B, V] float32 processed logits, -inf for removed tokens; every row keeps at least one
        finite entry. Softmax of a row is the distribution ``sample`` draws from (greedy takes its argmax)."""
        original, history = self._check_batch(logits, history)
        out = np.empty((original.shape[0], self.vocab_size), dtype=np.float32)
        for index, (ids, values) in enumerate(self._views(original, history, extra_banned)):
            peak = values.max()
            if abs(peak) > FLOAT32_MAX:  # would not survive float32: shift (softmax is shift-invariant)
                values = values - peak
            with np.errstate(over="ignore"):  # what falls below -3.4e38 becomes -inf: probability 0 either way
                if ids is None:
                    out[index] = values
                else:
                    out[index].fill(-np.inf)
                    out[index, ids] = values
        return out

    def probabilities(
        self, logits: np.ndarray, history: Sequence[Sequence[int]] | None, extra_banned: Sequence[int] = ()
    ) -> np.ndarray:
        """Softmax of the processed logits, float64 [B, V]; removed and banned tokens get exactly 0."""
        original, history = self._check_batch(logits, history)
        probs = np.zeros((original.shape[0], self.vocab_size))
        for index, view in enumerate(self._views(original, history, extra_banned)):
            ids, values = finite(*view)
            probs[index, ids] = probabilities(values, self._scratch)[0]
        return probs

    def sample(
        self,
        logits: np.ndarray,
        history: Sequence[Sequence[int]] | None,
        rng: np.random.Generator,
        extra_banned: Sequence[int] = (),
    ) -> np.ndarray:
        """One token id per row, int64 [B]: argmax when greedy, otherwise a draw from ``probabilities``."""
        original, history = self._check_batch(logits, history)
        rows = original.shape[0]
        bans = self._bans(extra_banned)
        if rows == 1 and self.plan.pick is not None:  # the decode loop's call: no lists around one row
            return np.array([self.plan.pick_one(original[0], history[0], 0, bans, rng.random())], dtype=np.int64)
        uniforms = None if self.greedy else [rng.random()] if rows == 1 else rng.random(rows)
        if self.plan.small:
            picked = self.plan.sample(original, history, bans, uniforms)
        else:
            picked = np.empty(rows, dtype=np.int64)
            for index, row in enumerate(self._run(original, history, bans, uniforms if self._random else None)):
                ids, values = row.view()
                if uniforms is None:
                    best = int(values.argmax())
                    picked[index] = best if ids is None else ids[best]
                else:
                    picked[index] = draw(ids, values, uniforms[index], self._scratch)
        return picked

    def sample_one(self, logits: np.ndarray, history: Sequence[int], rng: np.random.Generator) -> int:
        """``sample`` for a batch of one ([1, V] logits, one history), as a plain int: the decode loop's call,
        without wrapping the history or the result on the plan's fast routes."""
        plan = self.plan
        if plan.pick is not None:
            original = np.asarray(logits)
            if original.shape == (1, self.vocab_size):
                if self._follower is not None:
                    self._follower.follow(0, history)
                return plan.pick_one(original[0], history, 0, self._base_bans, rng.random())
        return int(self.sample(logits, [history], rng)[0])

    # -- internals -----------------------------------------------------------------------------------------------

    def _check_batch(
        self, logits: np.ndarray, history: Sequence[Sequence[int]] | None
    ) -> tuple[np.ndarray, Sequence[Sequence[int]]]:
        original = np.asarray(logits)
        if original.ndim != 2 or original.shape[1] != self.vocab_size:
            raise ValueError(f"logits must have shape [batch, {self.vocab_size}], got {list(original.shape)}")
        if history is None:  # no step that reads the history can then find anything
            history = [()] * original.shape[0]
        if len(history) != original.shape[0]:
            raise ValueError(f"history has {len(history)} rows for a batch of {original.shape[0]}")
        follower = self._follower
        if follower is not None:
            if len(history) == 1:
                follower.follow(0, history[0])
            else:
                for slot, row in enumerate(history):
                    follower.follow(slot, row)
        return original, history

    def _bans(self, extra_banned: Sequence[int]) -> Bans:
        """Every banned id for this call, remembered per distinct extras list: the decode loop and evaluation
        pass the same one (eos below min_new_tokens) at every step."""
        if not len(extra_banned):
            return self._base_bans
        try:
            key = tuple(extra_banned)
            cached = self._ban_cache.get(key)
        except TypeError:  # unhashable entries (e.g. a 2-D array): check them every time
            return self._make_bans(extra_banned)
        if cached is None:
            if len(self._ban_cache) >= _BAN_CACHE_SIZE:
                self._ban_cache.clear()
            cached = self._ban_cache[key] = self._make_bans(extra_banned)
        return cached

    def _make_bans(self, extra_banned: Sequence[int] = ()) -> Bans:
        extra = self._check_ids(extra_banned, "extra_banned") if len(extra_banned) else None
        return Bans(self.banned_ids, extra, self.vocab_size, with_masks=self.plan.small)

    def _views(
        self, original: np.ndarray, history: Sequence[Sequence[int]], extra_banned: Sequence[int]
    ) -> Iterator[View]:
        """Each processed row as a view: (None, the whole row with -inf for removed ids) or (ascending ids,
        their finite logits)."""
        bans = self._bans(extra_banned)
        if self.plan.small:
            yield from self.plan.views(original, history, bans)
            return
        for row in self._run(original, history, bans):
            yield View(*row.view())

    # -- the general path ----------------------------------------------------------------------------------------

    def _run(self, original: np.ndarray, history: Sequence[Sequence[int]], bans: Bans,
             uniforms: Sequence[float] | None = None) -> list[Candidates]:
        """The whole batch in one reused float64 buffer, each row a Candidates that every step edits in turn."""
        work = self._load(original)
        work[:, bans.ids] = -np.inf
        rows = [Candidates(work[index], history[index], index, self._scratch) for index in range(work.shape[0])]
        if uniforms is not None:
            for row, uniform in zip(rows, uniforms, strict=True):
                row.uniform = step_uniform(float(uniform))
        for index, row in enumerate(rows):
            self._process_row(row, original[index], bans)
        return rows

    def _process_row(self, row: Candidates, original: np.ndarray, bans: Bans) -> None:
        if not row.has_candidates():
            self._fall_back(row, original, bans)
            return
        for step in self.steps:
            step.apply(row)
            if row.may_be_empty:
                row.may_be_empty = False
                if not row.has_candidates():
                    self._fall_back(row, original, bans)
                    return

    def _load(self, logits: np.ndarray) -> np.ndarray:
        """The batch as float64 in a buffer reused across calls (a fresh 50k-wide array per step costs page
        faults), with NaN -> -inf (removed) and +inf -> a huge finite logit, so no step can produce NaN."""
        if self._work is None or self._work.shape != logits.shape:
            self._work = np.empty(logits.shape, dtype=np.float64)
        work = self._work
        np.copyto(work, logits, casting="unsafe")
        sanitize(work)
        return work

    @staticmethod
    def _fall_back(row: Candidates, original: np.ndarray, bans: Bans) -> None:
        token, value = bans.fallback(original)
        row.logits.fill(-np.inf)
        row.logits[token] = value
        row.reset_support()
