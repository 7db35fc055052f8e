"""The compiled plan: how a chain's steps run on small vocabularies, decided once when the chain is built.

On a wide vocabulary (GPT-2's 50k) the chain runs every step's ``apply`` on a ``Candidates`` row; nothing sorts
the whole row there (see the steps). On a small one (a 65-character vocabulary) numpy's per-call overhead is
the whole cost, so a ``Plan`` runs the same steps through their fast forms with few calls:

- sorted: the row is banned and the history steps applied as a whole dense row (``edit_row``; the penalties as
  vectors their window keeps), then sorted once (wider rows first cut by a leading top-k / min-p ``mask``);
  every later filter keeps part of the sorted candidates (``narrow_sorted``), without masks or further sorts.
- prefix (``sample`` only): when every filter keeps a prefix of the sorted candidates (top-k, top-p, min-p in
  any order, temperature last or absent, as in the default order) the cuts become counts, top-p's
  exponentials are reused for the draw and a handful of survivors are drawn in plain Python.
- dense (``sample`` only): no filter cuts (temperature alone, or nothing): the draw comes straight from the row.
- whole batch (``--n``): the prefix and dense draws as [B, V] array operations, each row picking what it would
  pick alone.

The plan knows which steps it can run: one it has no fast form for (a new step) makes ``small`` False, and the
chain takes the general path, with the same results. Every path draws in token-id order, so a seed picks the
same token on each. Work arrays are kept across calls, so a plan (and its chain) serves one thread at a time.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from runtime.sampling.candidates import Bans, Scratch, View, sanitize
from runtime.sampling.draw import draw, draw_few, draw_rows, draw_sorted, draw_weights, running_sum
from runtime.sampling.steps import Filter, MinPStep, Step, TemperatureStep, TopKStep, TopPStep

# Vocabularies up to this size may take the small path. Its temporaries are at most 32 kB, so they do not hit
# the page-fault cost that the general path's reused buffers exist for.
SMALL_VOCAB = 4096
_PREFILTER_FROM = 256  # rows at least this wide are cut by a leading top-k / min-p before the sort
_SORT_ALL_LIMIT = 1024  # widest row the small path sorts whole (top-p / typical-p first); wider: general path
_PYTHON_DRAW_LIMIT = 8  # prefix draws among at most this many candidates are done in plain Python


class CutPlan(NamedTuple):
    """The prefix filters as counts into the sorted candidates (no temperature among them)."""

    kth: int | None  # top-k: index of the k-th candidate
    shift: float | None  # min-p: keep -logit <= -max logit - log(min_p)
    top_p: float | None
    k_before_p: bool  # top-p sees top-k's cut
    m_before_p: bool  # top-p sees min-p's cut

    @classmethod
    def of(cls, filters: Sequence[Step]) -> CutPlan:
        kinds = [type(step) for step in filters]
        top_k = next((step for step in filters if isinstance(step, TopKStep)), None)
        min_p = next((step for step in filters if isinstance(step, MinPStep)), None)
        top_p = next((step for step in filters if isinstance(step, TopPStep)), None)
        p_at = kinds.index(TopPStep) if top_p else len(kinds)
        return cls(
            top_k.k - 1 if top_k else None,
            -min_p.log_min_p if min_p else None,
            top_p.top_p if top_p else None,
            top_k is not None and kinds.index(TopKStep) < p_at,
            min_p is not None and kinds.index(MinPStep) < p_at,
        )


_PREFIX_CUTS = (TopKStep, TopPStep, MinPStep)


class Plan:
    """Which fast path a chain's rows take, and the work arrays it needs (see the module docstring)."""

    def __init__(self, steps: Sequence[Step], vocab_size: int, greedy: bool):
        self.vocab_size = vocab_size
        leading = next((i for i, step in enumerate(steps) if not hasattr(step, "edit_row")), len(steps))
        self.banning, filters = list(steps[:leading]), list(steps[leading:])
        # A step that may raise logits clips them below +inf, which would hide a +inf logit from the checks made
        # after the history steps: with one, rows are checked for +inf / NaN before them.
        self.boosting = any(getattr(step, "boosts", False) for step in self.banning)
        # Temperature alone among the filters: the row is scaled where it is and never sorted.
        alone = filters[0] if len(filters) == 1 else None
        self.dense_temperature = alone if isinstance(alone, TemperatureStep) else None
        sorting = bool(filters) and self.dense_temperature is None
        # On wider rows a leading top-k or min-p cuts the row with one O(V) mask before the sort (and is done).
        cuts = bool(filters) and isinstance(filters[0], (TopKStep, MinPStep)) and vocab_size >= _PREFILTER_FROM
        self.prefilter: Filter | None = filters[0] if cuts else None
        self.sorted_filters = filters[1:] if cuts else filters
        self.sorting = sorting
        self.small = (
            vocab_size <= SMALL_VOCAB
            # the plan runs steps it has a fast form for: the history steps first (both preset orders), then
            # filters that narrow sorted candidates; anything else takes the general path
            and all(hasattr(step, "narrow_sorted") and not hasattr(step, "edit_row") for step in filters)
            # sorting a whole wide row costs more than the general path's bins
            and (cuts or not sorting or vocab_size <= _SORT_ALL_LIMIT)
            # steps that read a uniform of their own run where the chain hands it over: the general path
            and not any(step.random for step in steps)
        )
        last = self.sorted_filters[-1] if self.sorted_filters else None
        self.final_temperature = last if isinstance(last, TemperatureStep) else None
        # exp((max - logit) / T) = exp(max - logit) ** (1 / T): the prefix route's weights, raised once
        self.power = 1.0 / self.final_temperature.temperature if self.final_temperature is not None else None
        prefix_filters = self.sorted_filters[:-1] if self.final_temperature else self.sorted_filters
        # sample()'s draw: "prefix" (cuts as counts), "dense" (straight from the row), or None (row, then draw).
        # A temperature between filters (the "hf" order) takes the row route, which scales before later filters.
        self.pick: str | None = None
        if self.small and not greedy:
            if not sorting:
                self.pick = "dense"
            elif all(isinstance(step, _PREFIX_CUTS) for step in prefix_filters):
                self.pick = "prefix"
        # ``sample`` for one row on the prefix or dense route: (original row, history, slot, bans, uniform) -> id
        self.pick_one = self._pick_prefix if self.pick == "prefix" else self._pick_dense
        # Batches (``--n``) on these routes run as [B, V] arrays, a few numpy calls per step for all rows.
        self.whole_batch = self.pick == "dense" or (self.pick == "prefix" and self.prefilter is None)
        self.cut = CutPlan.of(prefix_filters)
        # min-p's cut (max logit + log min_p, finite) stops before the removed ids anyway, and top-k / top-p pass
        # them through harmlessly (zero weight)
        self.cut_removed = self.cut.shift is None
        self._row = np.empty(vocab_size)  # work rows reused across calls
        self._neg = np.empty(vocab_size)
        self.scratch = Scratch()

    # -- what the chain calls ------------------------------------------------------------------------------------

    def views(self, original: np.ndarray, history: Sequence[Sequence[int]], bans: Bans) -> Iterator[View]:
        """Each processed row as a view in token-id order. A view lives in reused buffers: use it before taking
        the next."""
        for index in range(original.shape[0]):
            order, values = self.row(original[index], history[index], index, bans)
            if order is None:
                yield View(None, values)
            else:
                by_id = order.argsort()
                yield View(order[by_id], np.negative(values[by_id]))

    def sample(self, original: np.ndarray, history: Sequence[Sequence[int]], bans: Bans,
               uniforms: Sequence[float] | np.ndarray | None) -> np.ndarray:
        """One token per row (argmax when ``uniforms`` is None), int64 [B]."""
        rows = original.shape[0]
        if self.pick is not None and uniforms is not None:
            pick = self.pick_one
            if rows == 1:
                return np.array([pick(original[0], history[0], 0, bans, uniforms[0])], dtype=np.int64)
            if self.whole_batch:
                return self._pick_rows(original, history, bans, np.asarray(uniforms))
            return np.array([pick(original[index], history[index], index, bans, uniform)
                             for index, uniform in enumerate(np.asarray(uniforms).tolist())], dtype=np.int64)
        picked = np.empty(rows, dtype=np.int64)
        for index in range(rows):
            order, values = self.row(original[index], history[index], index, bans)
            if uniforms is None:
                picked[index] = values.argmax()  # greedy never sorts: values is the dense row
            elif order is None:
                picked[index] = draw(None, values, uniforms[index], self.scratch)
            else:
                picked[index] = draw_sorted(order, values, uniforms[index])
        return picked

    # -- the sorted route ----------------------------------------------------------------------------------------

    def row(self, original: np.ndarray, history: Sequence[int], slot: int, bans: Bans
            ) -> tuple[np.ndarray | None, np.ndarray]:
        """One row through the chain: (None, the dense work row) when no filter sorts, else (ids, negated logits),
        most likely first. After the history steps the finite logits are sorted once (descending, equal ones by
        lower id, as the general path's stable sorts order them); then each filter narrows the sorted
        candidates, so no filter sorts again or builds a mask."""
        if self.sorting:
            order, neg = self._sorted(original, history, slot, bans)
            for step in self.sorted_filters:
                neg, order = step.narrow_sorted(neg, order)
            return order, neg
        row = self._banned(original, history, slot, bans)
        if row is None:
            return None, self._fallback_row(original, bans)
        if self.dense_temperature is not None:
            self.dense_temperature.divide_in_place(row)
        return None, row

    def _banned(self, original: np.ndarray, history: Sequence[int], slot: int, bans: Bans) -> np.ndarray | None:
        """The row with the bans, NaN/+inf cleaned and the history steps applied (a reused buffer), or None when
        nothing is left."""
        # Copy and ban in one call: x + 0.0 == x, and whatever a banned id held (+inf, NaN) becomes -inf or NaN,
        # which sanitize turns into -inf.
        row = np.add(original, bans.mask, out=self._row)
        peak = row[row.argmax()]  # argmax (a NaN if there is one) is a plain C call; max is not
        if peak != peak or peak == np.inf:  # NaN or +inf somewhere
            sanitize(row)
            peak = row.max()
        if peak == -np.inf:
            return None
        for step in self.banning:
            row = step.edit_row(row, history, slot, False)
            if row[row.argmax()] == -np.inf:
                return None
        return row

    def _sorted(self, original: np.ndarray, history: Sequence[int], slot: int, bans: Bans
                ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, negated logits) of every finite candidate after the history steps (and a leading top-k / min-p
        cut on wide rows), sorted once: most likely first, equal ones by lower id. At least one candidate (the
        fallback when nothing is left)."""
        row = self._banned(original, history, slot, bans)
        if row is None:
            token, value = bans.fallback(original)
            return np.array([token], dtype=np.int64), np.array([-value])
        neg = np.negative(row, out=self._neg)
        if self.prefilter is None:
            order = neg.argsort(kind="stable")
            neg = neg[order]
        else:
            kept = self.prefilter.mask(row, self.scratch).nonzero()[0]  # ascending, so ties stay by id
            neg = neg[kept]
            by_logit = neg.argsort(kind="stable")
            order, neg = kept[by_logit], neg[by_logit]
        finite = neg.searchsorted(np.inf)  # removed ids (+inf here) sort last
        return order[:finite], neg[:finite]

    def _fallback_row(self, original: np.ndarray, bans: Bans) -> np.ndarray:
        """``Bans.fallback`` as a dense row (a reused buffer)."""
        token, value = bans.fallback(original)
        self._row.fill(-np.inf)
        self._row[token] = value
        return self._row

    # -- the prefix route ----------------------------------------------------------------------------------------

    def _pick_prefix(self, original: np.ndarray, history: Sequence[int], slot: int, bans: Bans,
                     uniform: float) -> int:
        """The cuts are counts into one sorted array, the probabilities top-p computes are raised to 1/T for the
        draw instead of exponentiating again, and a lone survivor needs no draw. Same choices as ``row`` +
        ``draw_sorted`` (the weights differ by rounding only), in about half the numpy calls."""
        order, neg = self._sorted_candidates(original, history, slot, bans)
        count, weights = self._cut(neg)
        if count == 1:
            return int(order[0])
        if count <= _PYTHON_DRAW_LIMIT:
            return draw_few(order, neg, count, weights, self.power, uniform)
        if weights is None:
            weights = np.exp(np.subtract(neg[0], neg[:count]))
        else:
            weights = weights[:count]
        if self.power is not None:
            weights = np.power(weights, self.power, out=weights)
        by_id = order[:count].argsort()  # draw in id order, as draw does: a seed picks the same token
        return int(order[by_id[draw_weights(weights[by_id], uniform)]])

    def _cut(self, neg: np.ndarray) -> tuple[int, np.ndarray | None]:
        """How many sorted candidates the filters keep, and top-p's weights exp(max - logit) when it ran.

        Top-k's and min-p's cuts do not depend on what came before them (thresholds from the k-th and the
        first candidate, which no earlier cut moves), so they go first; top-p's does (its mass is the prefix's),
        so it runs last on the prefix the steps before it left, and not at all once one candidate is left."""
        size = neg.size
        plan = self.cut
        values = neg.tolist()  # bisect on a list: ~0.1 µs a search against ~0.5 µs for ndarray.searchsorted
        count_k = size if plan.kth is None or plan.kth >= size else bisect.bisect_right(values, values[plan.kth])
        count_m = size if plan.shift is None else bisect.bisect_right(values, values[0] + plan.shift)
        count = min(count_k, count_m)
        if count == 1 or plan.top_p is None:
            return count, None
        top_p_input = min(count_k if plan.k_before_p else size, count_m if plan.m_before_p else size)
        weights = np.exp(np.subtract(values[0], neg[:top_p_input]))
        cumulative = running_sum(weights)
        target = plan.top_p * cumulative.item(-1)
        if cumulative.item(count - 2) < target:  # top-p's cut lies at ``count`` or beyond: no search needed
            return count, weights
        return int(cumulative.searchsorted(target, "left")) + 1, weights

    def _sorted_candidates(self, original: np.ndarray, history: Sequence[int], slot: int, bans: Bans
                           ) -> tuple[np.ndarray, np.ndarray]:
        """``_sorted`` for the prefix route, cheaper: the row is negated while it is banned and NaN / +inf rows
        are caught after the sort. Removed ids stay at the end when a min-p cut will drop them anyway."""
        # The row is negated while it is banned (one call for both), and the history steps work on it negated.
        neg = np.subtract(bans.negated_mask, original, out=self._neg)
        if self.boosting and not _clean(neg):
            return self._sorted(original, history, slot, bans)
        for step in self.banning:
            neg = step.edit_row(neg, history, slot, True)
        if self.prefilter is None:
            order = neg.argsort(kind="stable")
            neg = neg[order]
        else:
            kept = self.prefilter.mask(np.negative(neg, out=self._row), self.scratch).nonzero()[0]
            neg = neg[kept]
            by_logit = neg.argsort(kind="stable")
            order, neg = kept[by_logit], neg[by_logit]
        if not neg.size:  # a NaN row cut by a leading top-k / min-p
            return self._sorted(original, history, slot, bans)
        first, last = neg.item(0), neg.item(-1)  # Python floats: cheaper to compare than numpy scalars
        if first in (-math.inf, math.inf) or last != last:
            # A +inf logit sorts first, a NaN last, and a row with nothing left starts with +inf: all rare, so
            # they are checked here rather than before the work; _sorted cleans the row first.
            return self._sorted(original, history, slot, bans)
        if self.cut_removed and last == math.inf:  # removed ids (+inf here) sort last
            finite = neg.searchsorted(np.inf)
            neg, order = neg[:finite], order[:finite]
        return order, neg

    # -- the dense route -----------------------------------------------------------------------------------------

    def _pick_dense(self, original: np.ndarray, history: Sequence[int], slot: int, bans: Bans,
                    uniform: float) -> int:
        """The draw straight from the whole row, negated while it is banned as in ``_sorted_candidates``."""
        neg = np.subtract(bans.negated_mask, original, out=self._neg)
        if self.boosting and not _clean(neg):
            _, values = self.row(original, history, slot, bans)
            return draw(None, values, uniform, self.scratch)
        for step in self.banning:
            neg = step.edit_row(neg, history, slot, True)
        low = neg[neg.argmin()]  # -(max logit); argmin stops at a NaN
        if low != low or low == -np.inf or low == np.inf:  # NaN, +inf logit, or nothing left: the careful way
            _, values = self.row(original, history, slot, bans)
            return draw(None, values, uniform, self.scratch)
        weights = np.subtract(low, neg, out=self._row)  # logit - max logit: <= 0, -inf for removed ids
        if self.dense_temperature is not None:
            weights *= 1.0 / self.dense_temperature.temperature
        np.exp(weights, out=weights)
        return draw_weights(weights, uniform, self.scratch.get("cumulative", weights.size))

    # -- whole batches -------------------------------------------------------------------------------------------

    def _pick_rows(self, original: np.ndarray, history: Sequence[Sequence[int]], bans: Bans,
                   uniforms: np.ndarray) -> np.ndarray:
        """The prefix / dense route for a whole batch at once: the same cuts and the same id-order draw as [B, V]
        array operations (removed candidates get weight 0, which leaves every running sum unchanged), so each
        row picks what it would alone, up to rounding. Rows with NaN or +inf logits, or with nothing left, are
        done one by one the careful way."""
        neg = np.subtract(bans.negated_mask, original, dtype=np.float64)
        unclean = ~np.isfinite(neg.min(axis=1)) if self.boosting else None  # NaN or a +inf logit
        if self.banning:  # a per-row Python loop: skipped when no step bans anything (it costs at batch 32)
            for index, step_row in enumerate(neg):
                for step in self.banning:
                    edited = step.edit_row(step_row, history[index], index, True)
                    if edited is not step_row:
                        step_row[:] = edited
        dense = self.pick == "dense"
        if dense:
            ranked, lowest = None, neg.min(axis=1, keepdims=True)  # -(max logit); NaN if the row holds one
            first = lowest[:, 0]
        else:
            ranked = neg.argsort(axis=1, kind="stable")
            neg = np.take_along_axis(neg, ranked, axis=1)
            first = neg[:, 0]
        careful = ~np.isfinite(first)
        if unclean is not None:
            careful |= unclean
        if ranked is not None:
            careful |= np.isnan(neg[:, -1])
        any_careful = bool(careful.any())
        if any_careful:  # keeps the arithmetic below quiet; these rows are redone one by one
            neg[careful] = 0.0
            if ranked is None:
                lowest[careful] = 0.0
        if ranked is None:
            picked = draw_rows(self._dense_weights(neg, lowest), uniforms)
        else:
            weights = self._prefix_weights(neg)
            by_id = np.zeros_like(weights)
            np.put_along_axis(by_id, ranked, weights, axis=1)  # back to id order, as the single-row draw sums
            picked = draw_rows(by_id, uniforms)
        if any_careful:
            for index in np.flatnonzero(careful).tolist():
                picked[index] = self.pick_one(original[index], history[index], index, bans, float(uniforms[index]))
        return picked

    def _dense_weights(self, neg: np.ndarray, lowest: np.ndarray) -> np.ndarray:
        """exp((logit - max logit) / T) per row of the (negated) batch, 0 for removed ids; ``lowest`` is each
        row's minimum as a [B, 1] column."""
        weights = np.subtract(lowest, neg)
        if self.dense_temperature is not None:
            weights *= 1.0 / self.dense_temperature.temperature
        return np.exp(weights, out=weights)

    def _prefix_weights(self, neg: np.ndarray) -> np.ndarray:
        """The draw weights of each sorted row (negated logits, ascending): exp((max - logit) / T) for the
        candidates the prefix filters keep (``_cut`` for all rows at once), 0 for the rest."""
        rows, size = neg.shape
        plan = self.cut
        finite = (neg < np.inf).sum(axis=1)  # removed ids (+inf) sort last
        count_k = count_m = finite
        if plan.kth is not None and plan.kth < size:
            count_k = np.minimum(finite, (neg <= neg[:, plan.kth : plan.kth + 1]).sum(axis=1))  # ties kept
        if plan.shift is not None:
            count_m = np.minimum(finite, (neg <= neg[:, :1] + plan.shift).sum(axis=1))
        count = np.minimum(count_k, count_m)
        columns = np.arange(size)
        weights = np.exp(np.subtract(neg[:, :1], neg))
        if plan.top_p is not None:
            top_p_input = np.minimum(count_k if plan.k_before_p else finite, count_m if plan.m_before_p else finite)
            mass = np.where(columns < top_p_input[:, None], weights, 0.0)
            cumulative = np.cumsum(mass, axis=1)
            target = plan.top_p * cumulative[:, -1:]
            count = np.minimum(count, (cumulative < target).sum(axis=1) + 1)  # searchsorted(side="left") + 1
        if self.power is not None:
            np.power(weights, self.power, out=weights)
        weights[columns >= count[:, None]] = 0.0
        return weights


def _clean(neg: np.ndarray) -> bool:
    """No NaN and no +inf logit in a negated row (argmin stops at a NaN; a +inf logit is -inf here)."""
    low = neg[neg.argmin()]
    return low == low and low != -np.inf
