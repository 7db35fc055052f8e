"""The draw: one token from processed logits and a uniform number in [0, 1). numpy only.

Every form draws by inverse CDF over the candidates in token-id order (the running sum adds the weights of
lower ids first), so a seed picks the same token whichever path the chain took; zero-weight entries can never
be hit (a rounding overshoot at the top end falls back to the last positive weight).
"""

from __future__ import annotations

import bisect
import itertools
import math

import numpy as np

from runtime.sampling.candidates import Scratch

running_sum = np.add.accumulate  # ndarray.cumsum's result; ~0.4 µs cheaper a call on short rows
_MASK64 = (1 << 64) - 1


def step_uniform(uniform: float) -> float:
    """A second uniform for the random steps (XTC's coin), from the row's draw uniform, so that ``rng`` is still
    asked once per row and a seed gives the same result on every path.

    It is SplitMix64's finaliser applied to the uniform's 53 random bits, not a slice of those bits. An earlier
    version took the low 27 bits, which is correlated with the draw: every uniform that draws a token of
    probability p < 2**-26 from the bottom of the CDF has all-zero high bits, so its low bits are < p * 2**53 and
    the step's "uniform" is then below p * 2**26, never near 1. In general the two were dependent up to
    (candidates) * 2**-26 in total variation, ~1e-3 on a 50k vocabulary. A mixing hash spreads every run of
    consecutive draw values over [0, 1) pseudo-randomly, so the coin is independent of which token is drawn."""
    z = int(uniform * 9007199254740992.0)  # the 53-bit integer numpy's random() divided by 2**53
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / 9007199254740992.0


def draw(ids: np.ndarray | None, values: np.ndarray, uniform: float, scratch: Scratch) -> int:
    """Inverse-CDF draw over a view (a dense view is drawn from in place: the position is the token id)."""
    peak = values[values.argmax()]  # argmax is a plain C call; max goes through a Python wrapper
    weights = np.subtract(values, peak, out=scratch.get("weights", values.size))
    np.exp(weights, out=weights)
    cumulative = weights.cumsum(out=scratch.get("cumulative", values.size))
    index = int(cumulative.searchsorted(uniform * cumulative[-1], side="right"))
    if index >= weights.size or weights[index] == 0:  # rounding at the top end
        index = int(np.flatnonzero(weights)[-1])
    return index if ids is None else int(ids[index])


def draw_weights(weights: np.ndarray, uniform: float, cumulative: np.ndarray | None = None) -> int:
    """The position drawn from non-negative ``weights`` (at least one positive), in order."""
    cumulative = running_sum(weights, out=cumulative)
    index = int(cumulative.searchsorted(uniform * cumulative[-1], side="right"))
    if index >= weights.size or weights[index] == 0:  # rounding at the top end
        index = int(weights.nonzero()[0][-1])
    return index


def draw_sorted(order: np.ndarray, neg: np.ndarray, uniform: float) -> int:
    """``draw`` over sorted candidates (ids ``order``, negated logits ``neg``, most likely first), with the same
    result: the running sum runs in id order."""
    by_id = order.argsort()
    weights = np.exp(np.subtract(neg[0], neg))[by_id]  # exp(logit - max logit), ids ascending
    cumulative = weights.cumsum()
    index = int(cumulative.searchsorted(uniform * cumulative[-1], side="right"))
    if index >= weights.size or weights[index] == 0:  # rounding at the top end
        index = int(weights.nonzero()[0][-1])
    return int(order[by_id[index]])


def draw_few(order: np.ndarray, neg: np.ndarray, count: int, weights: np.ndarray | None, power: float | None,
             uniform: float) -> int:
    """A draw among the first ``count`` sorted candidates in plain Python floats, which beats six numpy calls
    for a handful: weights exp(max - logit) (or the given ones) raised to ``power`` (1 / temperature), summed in
    id order left to right as numpy does."""
    if weights is None:
        top = float(neg[0])
        values = [math.exp(top - value) for value in neg[:count].tolist()]
    else:
        values = weights[:count].tolist()
    if power is not None:
        values = [value**power for value in values]
    pairs = sorted(zip(order[:count].tolist(), values, strict=True))  # ids are distinct: sorted by id
    running = list(itertools.accumulate(weight for _, weight in pairs))
    index = bisect.bisect_right(running, uniform * running[-1])  # = searchsorted(side="right")
    if index >= count or pairs[index][1] == 0:  # rounding at the top end
        index = max(position for position, (_, weight) in enumerate(pairs) if weight)
    return pairs[index][0]


def draw_rows(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """``draw`` for each row of a [B, V] weight array in id order (every row has a positive weight)."""
    cumulative = weights.cumsum(axis=1)
    targets = uniforms * cumulative[:, -1]
    picked = (cumulative <= targets[:, None]).sum(axis=1)  # searchsorted(side="right"), row by row
    # The first entry whose running sum exceeds the target has a positive weight (else the entry before it would
    # exceed the target too), so only rounding at the top end (target >= the total) needs fixing.
    size = weights.shape[1]
    if picked.max() >= size:
        for row in (picked >= size).nonzero()[0].tolist():
            picked[row] = int(weights[row].nonzero()[0][-1])
    return picked.astype(np.int64, copy=False)
