"""The decode loop: one implementation for every architecture, driven only by the model file's state specs.

A Session is a running conversation. ``history`` holds every context token since the last reset; the model state
always covers a prefix of it (``history[start:end]``, start > 0 once the context window has slid) and the tokens
after ``end`` are *pending*: they are fed together with the next prompt in one run. That one invariant is what
keeps the session consistent when Ctrl-C lands anywhere in the loop: a token is appended to ``history`` first and
the state that includes it replaces the old one in a single assignment, so history and state never disagree.
Callers may append ids to ``history`` themselves (e.g. replaying a saved transcript): they become pending too.

Document start: when the setting ``start_with_eos`` is on (the model file's default for models textgen trains),
the first prompt of an empty session (new, reset, or every turn undone) is conditioned on a leading end-of-text
token, the document separator the models were trained with, so generation starts where a document starts.
``textgen-eval`` samples under the same convention. When it is off (an imported Hugging Face GPT-2, whose
tokenizer adds no BOS) the prompt is fed as it is, as transformers' ``generate`` does; an empty prompt still
starts from the end-of-text token, since a model needs at least one token to condition on.

``generate_n`` is the batch decode loop that evaluation uses too (``on_step`` exposes each step's sampling
distribution), so the REPL and ``textgen-eval`` share one implementation of windows, bans, lengths and stops.

Beside the loop: each generation's settings are read once into a plan (runtime/plan.py), generated ids become
text through runtime/textstream.py, and ``num_beams`` > 1 runs the beam search of runtime/beam.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from runtime.beam import BeamSearch
from runtime.plan import DecodePlan, RowRandom, alternative_seed, needs_vocabulary, new_plan
from runtime.sampling import SamplerChain, SamplerSettings
from runtime.session import FedState, OnnxModel, _host
from runtime.settings import Settings
from runtime.textstream import TextCallback, TextStream, text_after

# on_step(probabilities, rows): see Session.generate_n
StepCallback = Callable[[np.ndarray, np.ndarray], None]
# on_draw(tokens, probabilities, logits, rows): see Session.generate_n
DrawCallback = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]
STOP_REASONS = ("eos", "max_tokens", "stop_sequence", "interrupted")
_WORD_CHAR = re.compile(r"\w")  # a prompt needs at least one known token with a letter or digit in it


class SessionError(Exception):
    """A session operation that cannot be done now (e.g. :regen with no turn); one line for the user."""


@dataclass
class GenerationResult:
    text: str  # generated text, without eos and without the stop sequence that ended it
    tokens: list[int]  # generated ids added to the context (eos / stop-sequence tokens included)
    prompt_tokens: int
    seconds: float
    tokens_per_s: float
    stop_reason: str  # "eos" | "max_tokens" | "stop_sequence" | "interrupted"
    seed: int | None  # the seed that reproduces exactly this text alone (``--seed``), alternatives included
    slid: bool = False  # the context window slid during this turn
    # Timings split like llama.cpp's: prompt processing (every token fed before the first new one: pending tokens,
    # the prompt, a leading end-of-text) and generation; ``tokens_per_s`` is the generation rate only.
    prompt_seconds: float = 0.0
    prompt_fed: int = 0
    warnings: list[str] = field(default_factory=list)  # e.g. prompt characters the model does not know

    @property
    def gen_seconds(self) -> float:
        return max(0.0, self.seconds - self.prompt_seconds)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_fed / self.prompt_seconds if self.prompt_seconds > 0 else 0.0


@dataclass(frozen=True)
class _BatchRow:
    """One finished row of a batch: its generated ids (eos included), why it stopped, and its text."""

    tokens: list[int]
    reason: str
    text: str


@dataclass
class _Turn:
    prompt: str
    start: int  # len(history) before the prompt's tokens
    window_start: int  # where the context window began then (for re-feeding when no snapshot is kept)
    snapshot: FedState | None  # the state before the turn, for an exact undo
    result: GenerationResult | None = None


@dataclass
class SessionSnapshot:
    """A session put down (``Session.snapshot``): its token history, its turns as (prompt, start, window start,
    result), and the model state after ``history[fed_start:fed_end]`` (None: re-feed from ``fed_start``)."""

    history: list[int]
    turns: list[tuple[str, int, int, GenerationResult | None]]
    fed_start: int
    fed_end: int
    state: dict[str, np.ndarray] | None
    logits: np.ndarray | None


def document_start(ids: list[int], eos: int, start_with_eos: bool = True) -> list[int]:
    """A first prompt's ids, conditioned on the document separator (see the module docstring) when
    ``start_with_eos`` is on: a leading eos, unless the prompt already starts with it. An empty prompt always
    starts from the separator, the only context there is."""
    if ids[:1] == [eos] or (ids and not start_with_eos):
        return ids
    return [eos, *ids]


def kept_on_slide(context_length: int) -> int:
    """Tokens kept when the window slides: three quarters of it, so sliding is rare and context stays long."""
    return max(1, context_length * 3 // 4)


class _SlideNotices:
    """Called when the context window slides: remembers it (GenerationResult.slid) and tells the user."""

    def __init__(self, on_notice: TextCallback | None) -> None:
        self.happened = False
        self._on_notice = on_notice

    def __call__(self, kept: int) -> None:
        self.happened = True
        if self._on_notice is not None:
            self._on_notice(f"context full: kept the last {kept} tokens")


class Session:
    """A running conversation: the model's state after every token fed so far (each turn continues it).

    The first prompt after the session starts empty is preceded by the end-of-text token when ``start_with_eos``
    is on (see the module docstring): ``history[0]`` is then eos and that turn's ``prompt_tokens`` counts it."""

    def __init__(self, model: OnnxModel, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.history: list[int] = []
        self._turns: list[_Turn] = []
        self._eos = model.info.special.eos
        self._context_length = model.info.context_length
        self._growing_state = any(spec.seq_axis is not None for spec in model.info.state)
        self._step_ids = np.zeros((1, 1), dtype=np.int64)  # reused for every single-token step
        # Streams only see sampled ids (never padding) and eos never reaches them: skip OnnxModel.decode's filter.
        self._decode_fast = model.tokenizer.decode
        self._fed = self._empty(1)
        self._prompt_done: float | None = None  # when the running turn's prompt was processed
        self._vocabulary: list[str] | None = None

    # ------------------------------------------------------------------ public API

    @property
    def turns(self) -> list[tuple[str, GenerationResult]]:
        return [(turn.prompt, turn.result) for turn in self._turns if turn.result is not None]

    @property
    def window_start(self) -> int:
        """Index in ``history`` where the model's context begins (> 0 once the context window has slid)."""
        return self._fed.start

    def reset(self) -> None:
        self.history.clear()
        self._turns = []
        self._fed = self._empty(1)

    def undo(self) -> bool:
        """Drop the last turn (its prompt and generated tokens); False when there is none."""
        if not self._turns:
            return False
        turn = self._turns.pop()
        del self.history[turn.start:]
        if turn.snapshot is not None:
            self._fed = turn.snapshot
        else:  # re-feed lazily: everything after the window start becomes pending
            self._fed = replace(self._empty(1), start=turn.window_start, end=turn.window_start)
        return True

    def regen(self, on_text: TextCallback | None = None, on_notice: TextCallback | None = None) -> GenerationResult:
        """Undo the last turn and generate again from the same prompt with the current settings."""
        if not self._turns:
            raise SessionError("nothing to regenerate yet")
        prompt = self._turns[-1].prompt
        self.undo()
        return self.generate(prompt, on_text=on_text, on_notice=on_notice)

    def generate(self, prompt: str, on_text: TextCallback | None = None,
                 on_notice: TextCallback | None = None, *, on_draw: DrawCallback | None = None) -> GenerationResult:
        """Feed ``prompt`` (after any pending tokens) and generate a continuation, streaming it via ``on_text``.

        ``on_draw`` (see generate_n; rows are always ``[0]``) sees each sampled token with the distribution it was
        drawn from and the raw logits; it is not called for beam search (num_beams > 1), whose candidates are not
        drawn from one distribution.

        Ctrl-C (KeyboardInterrupt) stops the turn and returns what was generated, stop_reason "interrupted"."""
        plan = self._plan()
        started = time.perf_counter()
        prompt_ids = self._prompt_ids(prompt)
        warnings = self._prompt_warnings(prompt, on_notice)
        self._begin_turn(prompt)
        slides = _SlideNotices(on_notice)
        first_new = len(self.history) + len(prompt_ids)
        self.history.extend(prompt_ids)
        fed_before, self._prompt_done = self._fed.end, None
        if plan.beams > 1:
            reason, text = self._beam_turn(plan, first_new, slides, on_text)
        else:
            reason, text = self._sample_turn(plan, first_new, slides, on_text, on_draw)
        tokens = self.history[first_new:]
        result = _result(text, tokens, len(prompt_ids), started, reason, plan.seed, slides.happened)
        result.prompt_seconds = (self._prompt_done or time.perf_counter()) - started
        result.prompt_fed, result.warnings = max(0, first_new - fed_before), warnings
        finish_timings(result)
        self._turns[-1].result = result
        return result

    def _prompt_warnings(self, prompt: str, on_notice: TextCallback | None) -> list[str]:
        """One line naming the prompt's characters (or words) the model's vocabulary does not have, said once."""
        unknown = self.model.unknown_pieces(prompt) if prompt else []
        if not unknown:
            return []
        shown = " ".join(repr(piece)[1:-1] if piece.isprintable() else repr(piece) for piece in unknown[:20])
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        warning = f"not in the model's vocabulary, read as unknown: {shown}{more}"
        if on_notice is not None:
            on_notice(warning)
        return [warning]

    def _mark_prompt_done(self) -> None:
        """Called once per turn, when the prompt's logits exist: the end of prompt processing (see
        GenerationResult)."""
        self._prompt_done = time.perf_counter()

    def generate_n(self, prompt: str, n: int, on_notice: TextCallback | None = None, *,
                   batch_size: int | None = None, on_step: StepCallback | None = None,
                   on_draw: DrawCallback | None = None) -> list[GenerationResult]:
        """``n`` independent continuations of the current context + ``prompt``, decoded in batches of
        ``batch_size`` rows (default: all ``n`` in one batch, fastest; smaller batches bound memory). One random
        generator serves the batches in turn, so they never repeat each other and a seed reproduces the results
        for the same ``n`` and ``batch_size``.

        ``on_step(probabilities, rows)``, when given, is called at every decode step with the distributions the
        still-running rows draw their next token from (float64 [live, V], each row sums to 1, exactly 0 for
        removed or banned ids; a one-hot row at the chosen token when decoding greedily) and those rows' indices
        among the ``n`` results; rows that already ended are left out. ``on_draw(tokens, probabilities, logits, rows)``
        sees the same step with the tokens drawn (int64 [live]) and the model's raw logits ([live, V], before any
        sampler step), for log-probabilities (runtime/logprobs.py). Without either hook no extra work is done.

        Ctrl-C returns what was generated (stop_reason "interrupted"; rows of batches not started are empty).
        The session's own history and state are left exactly as they were."""
        if n < 1:
            raise ValueError("n must be >= 1")
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        plan = self._plan()
        started = time.perf_counter()
        prompt_ids = self._prompt_ids(prompt)
        warnings = self._prompt_warnings(prompt, on_notice)
        context = self.history + prompt_ids
        slides = _SlideNotices(on_notice)
        fed_before = self._fed.end
        base = self._advance([context], self._fed, slides)
        prompt_seconds = time.perf_counter() - started
        size = batch_size or n
        rows: list[_BatchRow] = []
        while len(rows) < n:
            batch = self._decode_batch(plan, context, base, min(size, n - len(rows)), slides, (on_step, on_draw),
                                       len(rows))
            rows.extend(batch)
            if any(row.reason == "interrupted" for row in batch):  # Ctrl-C: start no further batch
                rows.extend(_BatchRow([], "interrupted", "") for _ in range(n - len(rows)))
        results = []
        for index, row in enumerate(rows):
            result = _result(row.text, row.tokens, len(prompt_ids), started, row.reason,
                             alternative_seed(plan.seed, index), slides.happened)
            result.prompt_seconds, result.prompt_fed = prompt_seconds, max(0, len(context) - fed_before)
            result.warnings = warnings
            results.append(finish_timings(result))
        return results

    def _decode_batch(self, plan: DecodePlan, context: list[int], base: FedState, n: int, slides: _SlideNotices,
                      hooks: tuple[StepCallback | None, DrawCallback | None], first_row: int) -> list[_BatchRow]:
        """Decode ``n`` rows that all continue ``context`` (whose state is ``base``) in lockstep."""
        rows = [list(context) for _ in range(n)]
        fed = FedState(self.model.reorder_state(base.state, np.zeros(n, dtype=np.int64)), base.start, base.end,
                   np.repeat(base.logits, n, axis=0))
        # Text is decoded as it comes only where a stop sequence must be spotted; otherwise once at the end.
        streams = None
        if plan.stops:
            streams = [TextStream(self._decode_fast, plan.stops, None, context) for _ in range(n)]
        reasons: list[str | None] = [None] * n
        counts: list[int | None] = [None] * n  # tokens kept (eos included) once a row has ended
        steps, live, eos = 0, n, self._eos
        rng = RowRandom([alternative_seed(plan.seed, first_row + index) for index in range(n)])
        observed = hooks[0] is not None or hooks[1] is not None
        try:
            for step in range(plan.max_new):
                chain = plan.chain_at(step)
                picked = chain.sample(fed.logits, rows, rng)
                if observed:
                    _report_step(*hooks, chain, fed.logits, rows, picked, reasons, first_row)
                tokens = picked.tolist()
                steps += 1
                if live == n and streams is None and eos not in tokens:  # the usual step: every row goes on
                    for row, token in zip(rows, tokens, strict=True):
                        row.append(token)
                else:
                    live -= self._append_checked(rows, tokens, reasons, counts, streams, steps)
                if not live or step + 1 == plan.max_new:
                    break
                fed = self._advance(rows, fed, slides)
        except KeyboardInterrupt:
            reasons = [reason or "interrupted" for reason in reasons]
        results = []
        for index, row in enumerate(rows):
            count = counts[index]
            tokens = row[len(context):len(context) + (steps if count is None else count)]
            if streams is not None:
                text = streams[index].finish(emit=False)
            else:
                text = text_after(self._decode_fast, context, tokens[:-1] if reasons[index] == "eos" else tokens)
            results.append(_BatchRow(tokens, reasons[index] or "max_tokens", text))
        return results

    def _append_checked(self, rows: list[list[int]], tokens: list[int], reasons: list[str | None],
                        counts: list[int | None], streams: list[TextStream] | None, steps: int) -> int:
        """Append a step's tokens, ending rows at eos or a stop sequence; returns how many rows ended now."""
        ended, eos = 0, self._eos
        for index, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if reasons[index] is not None:
                row.append(eos)  # filler keeps the batch rectangular; not part of the result
                continue
            row.append(token)
            if token == eos:
                reasons[index] = "eos"
            elif streams is not None and streams[index].push(token):
                reasons[index] = "stop_sequence"
            else:
                continue
            counts[index] = steps
            ended += 1
        return ended

    def next_token_probs(self, top: int) -> list[tuple[int, str, float]]:
        """The ``top`` most likely next tokens after the current context under the current sampler settings:
        (id, text, probability), most likely first; tokens the sampler removed (probability 0) are left out."""
        plan = self._plan()
        if self.history:
            self._fed = self._advance([self.history], self._fed, None)
            logits, history = self._fed.logits, self.history
        else:  # nothing yet: what would follow a document start
            logits, history = self._advance([[self._eos]], self._empty(1), None).logits, [self._eos]
        probs = plan.chain_at(0).probabilities(logits, [history])[0]
        count = max(0, min(int(top), probs.size))
        best = np.argsort(-probs, kind="stable")[:count]
        return [(int(i), self._token_text(int(i)), float(probs[i])) for i in best if probs[i] > 0]

    def pick(self, token: int) -> GenerationResult:
        """Append ``token`` by hand (``:probs pick``) as a turn of its own, so that ``:undo`` takes it back and the
        next turn continues after it; returns that turn's result (its text is the token's)."""
        if not 0 <= int(token) < self.model.info.vocab_size or int(token) in set(self.model.banned_ids):
            raise SessionError(f"token #{token} is not in this model's vocabulary")
        started = time.perf_counter()
        prompt_ids = self._prompt_ids("")  # eos first when the session is empty, as for a typed prompt
        self._begin_turn("")
        self.history.extend([*prompt_ids, int(token)])
        text = text_after(self._decode_fast, self.history[:-1], [int(token)])
        result = _result(text, [int(token)], len(prompt_ids), started, "picked", None, False)
        self._turns[-1].result = result
        return result

    def token_id(self, text: str) -> int | None:
        """The id whose text is exactly ``text`` (lowest id first), or None."""
        texts = self._token_texts()
        return texts.index(text) if text in texts else None

    # ------------------------------------------------------------------ put down and pick up

    def snapshot(self) -> SessionSnapshot:
        """Everything needed to continue this session exactly: the history, the turns, and the model's state after
        the tokens fed so far (host arrays) with the logits that follow them."""
        fed = self._fed
        state = {name: np.array(_host(value)) for name, value in fed.state.items()}
        logits = None if fed.logits is None else np.array(fed.logits)
        turns = [(turn.prompt, turn.start, turn.window_start, turn.result) for turn in self._turns]
        return SessionSnapshot(list(self.history), turns, fed.start, fed.end, state, logits)

    def restore(self, snapshot: SessionSnapshot) -> None:
        """Continue from ``snapshot`` as if never stopped. Without its state (``snapshot.state`` None, e.g. another
        model file), the history from the window start is re-fed lazily before the next token. The snapshot must
        be valid for this model (``check_snapshot``)."""
        self.history = list(snapshot.history)
        self._turns = [_Turn(prompt, start, window, None, result) for prompt, start, window, result in snapshot.turns]
        if snapshot.state is None:
            self._fed = replace(self._empty(1), start=snapshot.fed_start, end=snapshot.fed_start)
        else:
            self._fed = FedState(dict(snapshot.state), snapshot.fed_start, snapshot.fed_end, snapshot.logits)

    def check_snapshot(self, snapshot: SessionSnapshot) -> str | None:
        """Why ``snapshot`` cannot continue on this model (one line), or None when it can."""
        vocab = self.model.info.vocab_size
        if any(type(token) is not int or not 0 <= token < vocab for token in snapshot.history):
            return "its token history has ids outside this model's vocabulary"
        size = len(snapshot.history)
        if not 0 <= snapshot.fed_start <= snapshot.fed_end <= size:
            return "its fed range is not inside its history"
        previous = 0
        for _, start, window, _ in snapshot.turns:
            if not (previous <= start <= size and 0 <= window <= start):
                return "its turns are not in order inside its history"
            previous = start
        if snapshot.state is not None:
            if snapshot.fed_end > snapshot.fed_start and snapshot.logits is None:
                return "its state has no logits"
            if snapshot.logits is not None and snapshot.logits.shape != (1, vocab):
                return "its logits do not fit this model's vocabulary"
            expected = self.model.initial_state(1)
            past = snapshot.fed_end - snapshot.fed_start
            for spec in self.model.info.state:
                array = snapshot.state.get(spec.input)
                want = list(expected[spec.input].shape)
                if spec.seq_axis is not None:
                    want[spec.seq_axis] = past
                if array is None or array.dtype != expected[spec.input].dtype or list(array.shape) != want:
                    return f"its state tensor {spec.input!r} does not fit this model"
            if set(snapshot.state) != set(expected):
                return "its state tensors are not this model's"
        return None

    def check_sampler(self) -> None:
        """Build the sampler chain once: a setting that needs the vocabulary (a logit-bias token that is not one
        token of this model) raises its SettingError here rather than at the next turn."""
        self._chain(self.settings.sampler(), self.model.banned_ids)

    # ------------------------------------------------------------------ turn plumbing

    def _chain(self, sampler: SamplerSettings, banned: Sequence[int]) -> SamplerChain:
        vocabulary = self._token_texts() if needs_vocabulary(sampler) else None
        return SamplerChain(sampler, self.model.info.vocab_size, banned, vocabulary=vocabulary)

    def _token_texts(self) -> list[str]:
        """Each id's text, for the steps that match text (logit bias by text, banned strings, DRY's breakers);
        built on first use (a 50k vocabulary takes a moment) and kept."""
        if self._vocabulary is None:
            self._vocabulary = [self._token_text(token) for token in range(self.model.info.vocab_size)]
        return self._vocabulary

    def _plan(self) -> DecodePlan:
        return new_plan(self.model, self.settings, self._token_texts)

    def _prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's ids, after a leading eos when it starts the session and ``start_with_eos`` is on. A prompt
        with nothing but unknown words is refused, since the model would continue from no information (words
        partly unknown are named by ``_prompt_warnings``)."""
        ids = self.model.encode(prompt) if prompt else []
        self._refuse_only_unknown(prompt, ids)
        if self.history:
            return ids
        return document_start(ids, self._eos, bool(self.settings.get("start_with_eos")))

    def _refuse_only_unknown(self, prompt: str, ids: list[int]) -> None:
        unk = self.model.info.special.unk
        if unk is None or unk not in ids:
            return
        if any(_WORD_CHAR.search(self.model.tokenizer.id_to_token(token) or "") for token in ids
               if token not in (unk, self._eos)):
            return
        unknown = self.model.unknown_pieces(prompt)
        shown = ", ".join(repr(word) for word in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise SessionError(f"every word of the prompt is outside the model's vocabulary ({shown}); "
                           "try words from its training text")

    def _begin_turn(self, prompt: str) -> None:
        if self._growing_state and self._turns:
            # A KV cache snapshot per turn would pile up memory: keep one for the latest turn only.
            self._turns[-1].snapshot = None
        self._turns.append(_Turn(prompt, len(self.history), self._fed.start, self._fed))

    def _empty(self, batch: int) -> FedState:
        return FedState(self.model.initial_state(batch), 0, 0, None)

    def token_text(self, token: int) -> str:
        """One id's text as shown alone (a token that decodes to nothing shows its vocabulary entry)."""
        return self._token_text(token)

    def _token_text(self, token: int) -> str:
        text = self.model.decode([token])
        if text or token >= self.model.tokenizer_size:
            return text
        return self.model.tokenizer.id_to_token(token) or ""

    # ------------------------------------------------------------------ feeding the model

    def _advance(self, rows: Sequence[Sequence[int]], fed: FedState,
                 on_slide: Callable[[int], None] | None) -> FedState:
        """The state after all of ``rows`` (equal-length token lists), given ``fed`` for a prefix of them.

        Slides the window (keeps the most recent tokens, re-feeds them from an empty state) rather than let the
        context exceed the model's context length."""
        length = len(rows[0])
        if length == fed.end:
            return fed
        start, state, past = fed.start, fed.state, fed.end - fed.start
        if self._context_length and length - start > self._context_length:
            kept = kept_on_slide(self._context_length)
            start, state, past = length - kept, self.model.initial_state(len(rows)), 0
            if on_slide is not None:
                on_slide(kept)
        begin = start + past
        if len(rows) == 1 and begin == length - 1:
            ids = self._step_ids
            ids[0, 0] = rows[0][-1]
        elif begin == length - 1:  # a batch decode step: each row's last token
            ids = np.array([row[-1] for row in rows], dtype=np.int64)[:, None]
        else:
            ids = np.array([row[begin:] for row in rows], dtype=np.int64)
        logits, state = self.model.run(ids, state, past)
        return FedState(state, start, length, logits)

    # ------------------------------------------------------------------ sampling

    def _sample_turn(self, plan: DecodePlan, first_new: int, on_slide: Callable[[int], None],
                     on_text: TextCallback | None, on_draw: DrawCallback | None = None) -> tuple[str, str]:
        history, eos = self.history, self._eos
        streaming = on_text is not None or bool(plan.stops)
        stream = TextStream(self._decode_fast, plan.stops, on_text, history[:first_new]) if streaming else None
        rng, rows = plan.rng, (history,)
        reason = "max_tokens"
        try:
            if plan.max_new > 0:  # the prompt (after any pending tokens): its logits end prompt processing
                self._fed = self._advance(rows, self._fed, on_slide)
                self._mark_prompt_done()
            for generated in range(plan.max_new):
                chain = plan.chain_at(generated)
                token = chain.sample_one(self._fed.logits, history, rng)
                if on_draw is not None:
                    _report_step(None, on_draw, chain, self._fed.logits, [history], np.array([token]), (None,), 0)
                history.append(token)
                if token == eos:
                    reason = "eos"
                    break
                if stream is not None and stream.push(token):
                    reason = "stop_sequence"
                    break
                if generated + 1 < plan.max_new:  # the next token's logits; none are needed after the last
                    self._fed = self._advance(rows, self._fed, on_slide)
        except KeyboardInterrupt:
            reason = "interrupted"
        if stream is None:  # decoded after the context, as a stream would, so a leading space is kept
            generated_ids = history[first_new:-1] if reason == "eos" else history[first_new:]
            return reason, text_after(self._decode_fast, history[:first_new], generated_ids)
        # After Ctrl-C the callback is not called again; the returned text still has every kept token.
        return reason, stream.finish(emit=reason != "interrupted")

    # ------------------------------------------------------------------ beam search

    def _beam_turn(self, plan: DecodePlan, first_new: int, on_slide: Callable[[int], None],
                   on_text: TextCallback | None) -> tuple[str, str]:
        """Beam search; the best hypothesis's tokens join the history as pending tokens."""
        search: BeamSearch | None = None
        try:
            self._fed = self._advance([self.history], self._fed, on_slide)
            self._mark_prompt_done()
            search = BeamSearch(self.model, plan, self.history, self._fed,
                                lambda rows, fed: self._advance(rows, fed, on_slide))
            tokens, reason = search.run()
        except KeyboardInterrupt:
            reason = "interrupted"
            tokens = search.best_so_far() if search is not None else []
        stream = TextStream(self._decode_fast, plan.stops, None, self.history[:first_new])
        kept: list[int] = []
        for token in tokens:
            kept.append(token)
            if token == self._eos:
                break
            if stream.push(token):
                reason = "stop_sequence"
                break
        self.history.extend(kept)
        text = stream.finish()
        if on_text is not None and text:
            on_text(text)
        return reason, text


def _report_step(on_step: StepCallback | None, on_draw: DrawCallback | None, chain: SamplerChain,
                 logits: np.ndarray, rows: list[list[int]], picked: np.ndarray, reasons: Sequence[str | None],
                 first_row: int) -> None:
    """Call ``on_step`` / ``on_draw`` with the distributions the live rows' tokens were just drawn from (see
    generate_n).

    Recomputed with the same chain, logits and histories as the draw, so observing never changes what is drawn
    (the second chain pass is the price, paid only when a callback is set)."""
    live = np.array([index for index, reason in enumerate(reasons) if reason is None], dtype=np.int64)
    if chain.greedy:  # greedy decoding draws from a point mass at the argmax
        probabilities = np.zeros((live.size, chain.vocab_size))
        probabilities[np.arange(live.size), picked[live]] = 1.0
    else:  # the whole batch (not just the live rows) keeps the chain's work buffer the same shape every step
        probabilities = chain.probabilities(logits, rows)[live]
    if on_step is not None:
        on_step(probabilities, live + first_row)
    if on_draw is not None:
        on_draw(picked[live], probabilities, np.asarray(logits)[live], live + first_row)


def _result(text: str, tokens: list[int], prompt_tokens: int, started: float, reason: str, seed: int | None,
            slid: bool) -> GenerationResult:
    seconds = time.perf_counter() - started
    return GenerationResult(
        text=text, tokens=list(tokens), prompt_tokens=prompt_tokens, seconds=seconds,
        tokens_per_s=len(tokens) / seconds if seconds > 0 else 0.0, stop_reason=reason, seed=seed, slid=slid,
    )


def finish_timings(result: GenerationResult) -> GenerationResult:
    """Make ``tokens_per_s`` the generation rate alone, once ``prompt_seconds`` is known."""
    gen = result.gen_seconds
    result.tokens_per_s = len(result.tokens) / gen if gen > 0 else 0.0
    return result
