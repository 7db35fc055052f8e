"""Continuous batching: one scheduler thread decodes every active sequence as one batch through the model file.

A request becomes a ``Job`` (one prompt, ``n`` choices). The scheduler loop, on its own thread:

1. takes new jobs and drops cancelled ones (a client that went away loses its rows before the next step);
2. prefills waiting jobs in chunks of ``PREFILL_CHUNK`` tokens, at most ``PREFILL_BUDGET`` tokens per loop turn,
   each on its own batch-of-one state, so a long prompt delays the running rows by one chunk at a time;
3. when a job's prompt is in, copies its state into ``n`` rows and joins them to the batch (rows join and leave
   only between steps, at token boundaries);
4. samples one token per active row with that row's own sampler chain and seeded generator (the library's
   ``new_plan``: the same chain, generator and stop handling as ``textgen-repl``), sends the text, drops the rows
   that ended and runs one model step for the rest.

Recurrent models (LSTM/GRU) keep one state row per sequence along the state's batch axis. GPT-2 keeps one KV-cache
row per sequence, left-padded to the longest row, with the format's ``attention_mask`` marking the padding and
``position_ids`` counting each row's own tokens (runtime.session derives them from the mask); columns that every
row pads are cut off when rows leave, so the cache stays as long as the longest live sequence.

The scheduler owns the model and the sampler chains: nothing else touches them. Results reach the event loop
through ``Job.deliver`` (thread-safe callbacks); everything the loop sends is a plain tuple.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from runtime.errors import first_line
from runtime.logprobs import TokenLogprob, point_mass, prompt_logprobs, token_logprob
from runtime.plan import DecodePlan, RowRandom
from runtime.sampling import SamplerChain, SamplerSettings
from runtime.session import ModelRunError, OnnxModel
from runtime.textstream import TextStream

PREFILL_CHUNK = 64  # prompt tokens fed per model run while others wait
PREFILL_BUDGET = 256  # prompt tokens fed per scheduler turn (then a decode step runs)
IDLE_WAIT_S = 0.5  # the scheduler re-checks its flags at least this often when idle

# Events sent to a job's consumer: ("text", choice, piece, [TokenLogprob]), ("done", choice, finish_reason,
# completion_tokens), ("prompt", prompt_tokens, [TokenLogprob] for echo), ("error", message).
Event = tuple
Deliver = Callable[[list[Event]], None]


@dataclass
class Job:
    """One prompt with ``n`` choices; ``plans[i]`` holds choice i's settings, chains and generator."""

    prompt_ids: list[int]  # document-start eos included
    plans: list[DecodePlan]
    deliver: Deliver
    logprobs: int | None = None  # alternatives per token, None = no logprobs
    echo_logprobs: bool = False  # also the prompt tokens' logprobs
    logit_bias: np.ndarray | None = None  # [V] added to the logits before sampling
    cancelled: threading.Event = field(default_factory=threading.Event)
    # prefill progress (scheduler thread only)
    fed: int = 0
    state: dict[str, Any] | None = None
    logits: np.ndarray | None = None
    prompt_logits: list[np.ndarray] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    """One choice being decoded: its tokens (prompt first), text stream and pending logprob records."""

    job: Job
    choice: int
    plan: DecodePlan
    history: list[int]
    stream: TextStream
    generated: int = 0
    pending: list[str] = field(default_factory=list)  # text released by the stream, not yet sent
    sent: int = 0  # characters sent so far
    records: list[TokenLogprob] = field(default_factory=list)  # logprobs of tokens whose text is not sent yet
    record_offset: int = 0  # where the first pending record's token starts in the generated text
    keys: tuple[tuple, tuple] = ((), ())  # _chain_key of the plan's chain below min_new_tokens, then after it


class Engine:
    """The scheduler: ``submit`` jobs from any thread; ``start``/``stop`` the decode thread."""

    def __init__(self, model: OnnxModel, max_batch: int = 32, max_waiting: int = 256) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._seq_axes = {spec.input: spec.seq_axis for spec in model.info.state}
        self._batch_axes = {spec.input: spec.batch_axis for spec in model.info.state}
        self._growing = any(axis is not None for axis in self._seq_axes.values())
        self._uses_mask = "attention_mask" in model.info.inputs or "position_ids" in model.info.inputs
        self._eos = model.info.special.eos
        self._lock = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._waiting: deque[Job] = deque()
        self._rows: list[_Row] = []
        self._state: dict[str, Any] | None = None
        self._mask: np.ndarray | None = None  # [B, P] int64, GPT-2 only
        self._logits: np.ndarray | None = None  # [B, V] for the rows' next token
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for /health and tests)
        self._shared_chains: dict[tuple, SamplerChain] = {}  # one per distinct sampler settings + bans

    # ------------------------------------------------------------------ other threads

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="textgen-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left and end the thread (jobs still queued get an error event)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when the queue is full or the engine is stopping (the caller answers 503)."""
        with self._lock:
            if self._stopping or len(self._inbox) + len(self._waiting) >= self.max_waiting:
                return False
            self._inbox.append(job)
            self._lock.notify_all()
        return True

    def wake(self) -> None:
        """Tell the scheduler something changed (e.g. a job was cancelled) so it acts before its next step."""
        with self._lock:
            self._lock.notify_all()

    def stats(self) -> dict[str, int]:
        with self._lock:
            waiting = len(self._inbox) + len(self._waiting)
        return {"active_rows": len(self._rows), "waiting_jobs": waiting, "max_batch": self.max_batch,
                "steps": self.steps}

    # ------------------------------------------------------------------ the scheduler thread

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._inbox or self._waiting or self._rows):
                    self._lock.wait(IDLE_WAIT_S)
                if self._stopping:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                self._turn()
            except ModelRunError as exc:
                self._fail_all(str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug must fail the requests, not hang them all
                self._fail_all(f"internal error: {type(exc).__name__}: {first_line(exc)}")
        self._fail_all("the server is shutting down")

    def _turn(self) -> None:
        self._drop_cancelled()
        self._prefill()
        if self._rows:
            self._step()

    def _fail_all(self, message: str) -> None:
        with self._lock:
            jobs = {id(row.job): row.job for row in self._rows}
            jobs.update((id(job), job) for job in [*self._waiting, *self._inbox])
            self._waiting.clear()
            self._inbox.clear()
        self._remove([])
        for job in jobs.values():
            job.deliver([("error", message)])

    def _drop_cancelled(self) -> None:
        self._waiting = deque(job for job in self._waiting if not job.cancelled.is_set())
        keep = [index for index, row in enumerate(self._rows) if not row.job.cancelled.is_set()]
        if len(keep) != len(self._rows):
            self._remove(keep)

    # ------------------------------------------------------------------ prefill and joining

    def _prefill(self) -> None:
        budget = PREFILL_BUDGET
        while self._waiting and budget > 0:
            job = self._waiting[0]
            if len(self._rows) + len(job.plans) > self.max_batch and self._rows:
                return  # the batch is full: wait for rows to leave
            budget -= self._feed_chunk(job)
            if job.fed == len(job.prompt_ids):
                self._waiting.popleft()
                self._join(job)

    def _feed_chunk(self, job: Job) -> int:
        if job.state is None:
            job.state = self.model.initial_state(1)
        chunk = job.prompt_ids[job.fed:job.fed + PREFILL_CHUNK]
        ids = np.array([chunk], dtype=np.int64)
        if job.echo_logprobs:
            logits, job.state = self.model.run_all(ids, job.state, job.fed)
            job.prompt_logits.extend(logits[0])
            job.logits = logits[:, -1, :]
        else:
            job.logits, job.state = self.model.run(ids, job.state, job.fed)
        job.fed += len(chunk)
        return len(chunk)

    def _join(self, job: Job) -> None:
        length = len(job.prompt_ids)
        prompt_records = []
        if job.echo_logprobs:  # logits at position i predict token i + 1; the leading eos has none
            prompt_records = prompt_logprobs(job.prompt_ids[1:], np.array(job.prompt_logits[:-1]), self._text,
                                             job.logprobs or 0, self.model.tokenizer_size)
        job.deliver([("prompt", length, prompt_records)])
        count = len(job.plans)
        state = self.model.reorder_state(job.state, np.zeros(count, dtype=np.int64))
        logits = np.repeat(job.logits, count, axis=0)
        rows = [self._new_row(job, choice, plan) for choice, plan in enumerate(job.plans)]
        job.state, job.logits, job.prompt_logits = None, None, []
        live = [index for index, plan in enumerate(job.plans) if plan.max_new > 0]
        if len(live) < count:  # max_tokens 0 (e.g. echo only): done without a token
            job.deliver([("done", index, "length", 0) for index in range(count) if index not in live])
            if not live:
                return
            index = np.array(live, dtype=np.int64)
            rows, state, logits = [rows[i] for i in live], self.model.reorder_state(state, index), logits[index]
        self._append(rows, state, logits, length)

    def _new_row(self, job: Job, choice: int, plan: DecodePlan) -> _Row:
        pending: list[str] = []
        stream = TextStream(self.model.tokenizer.decode, plan.stops, pending.append, job.prompt_ids)
        keys = (_chain_key(plan.chain_without_eos), _chain_key(plan.chain))  # built once per row, not per step
        return _Row(job, choice, plan, list(job.prompt_ids), stream, pending=pending, keys=keys)

    def _append(self, rows: list[_Row], state: dict[str, Any], logits: np.ndarray, length: int) -> None:
        """Join ``rows`` (their state has ``length`` real tokens, no padding) to the batch."""
        if not self._rows:
            self._rows, self._state, self._logits = rows, state, logits
            self._mask = np.ones((len(rows), length), dtype=np.int64) if self._growing else None
            return
        batch_state = self._state
        if self._growing:
            width = self._mask.shape[1]
            if length < width:
                state = self._left_pad(state, width - length)
            elif length > width:
                batch_state = self._left_pad(batch_state, length - width)
                self._mask = np.pad(self._mask, ((0, 0), (length - width, 0)))
            new_mask = np.zeros((len(rows), max(width, length)), dtype=np.int64)
            new_mask[:, new_mask.shape[1] - length:] = 1
            self._mask = np.concatenate([self._mask, new_mask])
        self._state = {name: np.concatenate([_host(batch_state[name]), _host(state[name])],
                                            axis=self._batch_axes[name]) for name in state}
        self._logits = np.concatenate([self._logits, logits])
        self._rows = self._rows + rows

    def _left_pad(self, state: dict[str, Any], columns: int) -> dict[str, Any]:
        padded = {}
        for name, value in state.items():
            array = _host(value)
            widths = [(0, 0)] * array.ndim
            widths[self._seq_axes[name]] = (columns, 0)
            padded[name] = np.pad(array, widths)
        return padded

    def _remove(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep`` (their order); cut cache columns no remaining row uses."""
        if not keep:
            self._rows, self._state, self._logits, self._mask = [], None, None, None
            return
        index = np.array(keep, dtype=np.int64)
        self._rows = [self._rows[i] for i in keep]
        self._state = self.model.reorder_state(self._state, index)
        self._logits = self._logits[index]
        if self._growing:
            self._mask = self._mask[index]
            first = int(np.argmax(self._mask.any(axis=0)))  # leading columns that are padding in every row
            if first:
                self._mask = self._mask[:, first:]
                self._state = {name: np.take(_host(value), np.arange(first, first + self._mask.shape[1]),
                                             axis=self._seq_axes[name]) for name, value in self._state.items()}

    # ------------------------------------------------------------------ decoding

    def _step(self) -> None:
        """Sample every row's next token, send the text, drop finished rows, run the model for the rest."""
        events: dict[int, tuple[Job, list[Event]]] = {}
        keep: list[int] = []
        tokens = self._sample()
        for index, row in enumerate(self._rows):
            out = events.setdefault(id(row.job), (row.job, []))[1]
            if self._advance_row(row, index, tokens[index], out):
                keep.append(index)
        self.steps += 1
        for job, job_events in events.values():
            if job_events:
                job.deliver(job_events)
        if len(keep) != len(self._rows):
            self._remove(keep)
        if not self._rows:
            return
        ids = np.array([[row.history[-1]] for row in self._rows], dtype=np.int64)
        if self._growing:
            past = self._mask.shape[1]
            self._mask = np.concatenate([self._mask, np.ones((len(self._rows), 1), dtype=np.int64)], axis=1)
            self._logits, self._state = self.model.run(ids, self._state, past, self._mask)
        else:
            self._logits, self._state = self.model.run(ids, self._state, 0)

    def _sample(self) -> list[int]:
        """One token per row. Rows whose chains have equal settings and bans are sampled as one [B, V] batch
        through one shared chain, each drawing from its own generator (``RowRandom``), so every row gets the
        token it would get alone (the sampler's batch-row == single-row contract) at a fraction of the per-row
        cost; a group of one takes the single-row call the REPL makes."""
        groups: dict[tuple, list[int]] = {}
        tokens = [0] * len(self._rows)
        for index, row in enumerate(self._rows):
            chain = row.plan.chain_at(row.generated)
            bias = row.job.logit_bias
            if bias is not None:  # its own logits: sampled alone, exactly as before
                tokens[index] = chain.sample_one(self._logits[index:index + 1] + bias, row.history, row.plan.rng)
                continue
            groups.setdefault(row.keys[chain is row.plan.chain], []).append(index)
        for key, members in groups.items():
            rows = [self._rows[index] for index in members]
            if len(members) == 1:
                row, index = rows[0], members[0]
                chain = row.plan.chain_at(row.generated)
                tokens[index] = chain.sample_one(self._logits[index:index + 1], row.history, row.plan.rng)
                continue
            shared = self._shared_chains.get(key)
            if shared is None:
                model = rows[0].plan.chain_at(rows[0].generated)
                shared = self._shared_chains[key] = SamplerChain(model.settings, model.vocab_size, model.banned_ids)
            picked = shared.sample(self._logits[members], [row.history for row in rows],
                                   RowRandom.of([row.plan.rng for row in rows]))
            for index, token in zip(members, picked.tolist(), strict=True):
                tokens[index] = token
        return tokens

    def _advance_row(self, row: _Row, index: int, token: int, out: list[Event]) -> bool:
        """Take ``token`` as the next one of ``row`` (batch row ``index``), with its logprobs when asked for; True
        while the row goes on."""
        job, plan = row.job, row.plan
        if job.logprobs is not None and token != self._eos:
            logits = self._logits[index:index + 1]
            if job.logit_bias is not None:
                logits = logits + job.logit_bias
            chain = plan.chain_at(row.generated)
            probabilities = (point_mass(token, chain.vocab_size) if chain.greedy
                             else chain.probabilities(logits, [row.history])[0])
            row.records.append(token_logprob(token, probabilities, logits[0], job.logprobs, self._text,
                                             self.model.tokenizer_size))
        row.history.append(token)
        row.generated += 1
        reason = None
        if token == self._eos:
            reason = "stop"
        elif row.stream.push(token):
            reason = "stop"
        elif row.generated >= plan.max_new:
            reason = "length"
        self._flush(row, out, final=reason is not None)
        if reason is not None:
            out.append(("done", row.choice, reason, row.generated))
            return False
        return True

    def _flush(self, row: _Row, out: list[Event], final: bool) -> None:
        """Send the text the stream released since the last flush, with the logprob records of the tokens that
        start inside it; at the end, the rest (records of tokens that only made up a cut stop sequence go)."""
        if final:
            row.stream.finish()
        if not row.pending and not (final and row.records):
            return
        piece = "".join(row.pending)
        row.pending.clear()
        row.sent += len(piece)
        taken = []
        while row.records and row.record_offset < row.sent:
            record = row.records.pop(0)
            taken.append(record)
            row.record_offset += len(record.text)
        if final:
            row.records.clear()
        if piece or taken:
            out.append(("text", row.choice, piece, taken))

    def _text(self, token: int) -> str:
        return self.model.decode([token])


def _chain_key(chain: SamplerChain) -> tuple:
    """What makes two chains process and draw alike: every sampler setting but the seed (each row brings its own
    generator) and the banned ids."""
    settings = tuple(getattr(chain.settings, name) for name in _KEY_FIELDS)  # plain values: no deep copy
    return (settings, chain.banned_ids.tobytes())


_KEY_FIELDS = tuple(item.name for item in fields(SamplerSettings) if item.name != "seed")


def _host(value: Any) -> np.ndarray:
    """A state value as a numpy array: on CUDA the session keeps state as device OrtValues between steps, and
    joining, padding or cutting rows happens on the host (once per join or leave, not per token)."""
    return value if isinstance(value, np.ndarray) else value.numpy()
