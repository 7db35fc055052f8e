"""Beam search over the decode loop's model state (``num_beams`` > 1), with Hugging Face's semantics; the
Session runs it for a turn (runtime/generate.py) and keeps the best hypothesis."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from runtime.plan import DecodePlan
from runtime.session import FedState, OnnxModel

# advance(rows, fed): the state after all of ``rows`` (equal-length token lists), given ``fed`` for a prefix
Advance = Callable[[Sequence[Sequence[int]], FedState], FedState]


class BeamSearch:
    """Hugging Face beam search semantics (batch of one prompt): candidates are the top 2*num_beams extensions by
    summed log-probability (after the logits processors); a candidate ending in eos among the top num_beams
    becomes a finished hypothesis scored sum / generated_length ** length_penalty (1.0); the search stops when no
    running beam can beat the worst of num_beams finished hypotheses (HF's early_stopping=False heuristic) or at
    max_new_tokens. With temperature > 0 candidates are sampled from the processed distribution (beam sample)."""

    length_penalty = 1.0

    def __init__(self, model: OnnxModel, plan: DecodePlan, context: Sequence[int], fed: FedState,
                 advance: Advance) -> None:
        """``fed`` is the model state after ``context`` (batch of one, with its logits); ``advance(rows, fed)``
        feeds the rows' new tokens (the decode loop's own feeding, context sliding included)."""
        self.model = model
        self.plan = plan
        self.advance = advance
        self.beams = plan.beams
        self.eos = model.info.special.eos
        self.context = list(context)
        self.sampling = plan.sampler.temperature > 0
        self.fed = FedState(self.model.reorder_state(fed.state, np.zeros(self.beams, dtype=np.int64)), fed.start,
                        fed.end, np.repeat(fed.logits, self.beams, axis=0))
        self.running: list[list[int]] = [[] for _ in range(self.beams)]
        self.scores = np.full(self.beams, -1e9)
        self.scores[0] = 0.0  # identical beams at the start: only the first may expand, as HF does
        self.finished: list[tuple[float, list[int]]] = []

    def best_so_far(self) -> list[int]:
        candidates = self.finished + [(float(s) / max(1, len(t)), t) for s, t in zip(self.scores, self.running,
                                                                                     strict=True) if t]
        return max(candidates, key=lambda item: item[0])[1] if candidates else []

    def run(self) -> tuple[list[int], str]:
        for step in range(self.plan.max_new):
            if self._step(step):
                break
        best = max(self.finished, key=lambda item: item[0])[1] if self.finished else self.running[0]
        return best, ("eos" if best and best[-1] == self.eos else "max_tokens")

    def _step(self, step: int) -> bool:
        """One beam step; True when the search is over."""
        vocab = self.model.info.vocab_size
        rows = [self.context + beam for beam in self.running]
        log_probs = _log_softmax(self.fed.logits.astype(np.float64))
        processed = self.plan.chain_at(step).process(log_probs, rows).astype(np.float64)
        totals = (processed + self.scores[:, None]).ravel()
        candidates = self._candidates(totals)
        last_step = step + 1 == self.plan.max_new
        generated = step + 1
        next_beams: list[tuple[float, int, int]] = []
        for rank, flat in enumerate(candidates):
            beam, token = divmod(int(flat), vocab)
            score = float(totals[flat])
            if token == self.eos or last_step:
                if rank < self.beams:
                    self._finish(score / generated ** self.length_penalty, self.running[beam] + [token])
            elif len(next_beams) < self.beams:
                next_beams.append((score, beam, token))
        if not next_beams or last_step:
            return True
        while len(next_beams) < self.beams:  # fewer live candidates than beams: pad with hopeless copies
            next_beams.append((-np.inf, next_beams[0][1], next_beams[0][2]))
        order = np.array([beam for _, beam, _ in next_beams], dtype=np.int64)
        self.running = [self.running[beam] + [token] for _, beam, token in next_beams]
        self.scores = np.array([score for score, _, _ in next_beams])
        reordered = FedState(self.model.reorder_state(self.fed.state, order), self.fed.start, self.fed.end, None)
        rows = [self.context + beam for beam in self.running]
        self.fed = self.advance(rows, reordered)
        return self._cannot_improve(generated)

    def _candidates(self, totals: np.ndarray) -> np.ndarray:
        """Flat indices of 2*num_beams candidates: the best ones, or drawn without replacement when sampling."""
        finite = np.flatnonzero(np.isfinite(totals) & (totals > -1e8))
        count = min(2 * self.beams, finite.size)
        if self.sampling:
            weights = np.exp(totals[finite] - totals[finite].max())
            count = min(count, int(np.count_nonzero(weights)))
            return self.plan.rng.choice(finite, size=count, replace=False, p=weights / weights.sum())
        if count < finite.size:
            finite = finite[np.argpartition(-totals[finite], count - 1)[:count]]
        return finite[np.argsort(-totals[finite], kind="stable")]

    def _finish(self, score: float, tokens: list[int]) -> None:
        self.finished.append((score, tokens))
        self.finished.sort(key=lambda item: -item[0])
        del self.finished[self.beams:]

    def _cannot_improve(self, generated: int) -> bool:
        if len(self.finished) < self.beams:
            return False
        best_running = float(self.scores.max()) / generated ** self.length_penalty
        return best_running <= self.finished[-1][0]



def _log_softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
