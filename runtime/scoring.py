"""The one scorer: token log-likelihoods of a text under a model file, through onnxruntime (no torch).

``textgen-eval --data``, the REPL's ``:eval`` and the quantization cost check (export.quantize.perplexity_cost) all
score through ``score_ids``; the trainer's validation (PyTorch, train/loop.py) uses the same protocol names and
the same rules, so a number means the same thing wherever it was computed and says how it was computed.

Protocols (``ScoringProtocol``; what context each prediction sees). ``ids[0]`` is context only; every later
token is a target, scored once:

* ``stateful`` (RNNs): the text is fed in chunks with the recurrent state carried from chunk to chunk, so every
  token is predicted from everything before it — exactly what one long forward pass gives. With ``streams`` S > 1
  the predictions are cut into S equal contiguous pieces, each read from a zero state side by side (a batch of S
  rows: several times faster on a CPU, at the cost of a cold start per piece); the last ``< S`` targets that do
  not fill a piece are not scored. The trainer's RNN validation is this protocol with up to 32 streams.
* ``windows``: non-overlapping windows of ``window`` input tokens, each from an empty context, so the j-th
  prediction of a window sees the j tokens before it in that window (0 .. window - 1, about half on average).
  A last, shorter window scores the rest. The trainer's GPT-2 validation is this protocol with the context
  length as the window (over whole windows only: it scores the rows of one rectangular tensor). Cheap.
* ``sliding``: windows of ``window`` tokens starting every ``stride`` tokens, each from an empty context, each
  scoring only the targets the previous window did not, so every token has at least ``window - stride + 1``
  tokens of context except near the start (the Hugging Face perplexity recipe). ``stride == window`` is
  ``windows``; a smaller stride gives more context and costs ``window / stride`` times the compute.

Padded vocabulary: a model's output layer may be larger than its tokenizer (docs/model-file.md allows it, e.g. a
vocabulary rounded up to a multiple of 64 for faster matrix products, as nanoGPT does); those ids have no token
behind them and the sampler never draws them. The softmax runs over the real
tokenizer ids only (``logits[..., :tokenizer_size]``), so a model is neither helped nor hurt by its padding and a
padded and an unpadded export of the same weights score the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the type only: importing this module must not start onnxruntime (train/ imports the names)
    from runtime.session import OnnxModel

STATEFUL = "stateful"
WINDOWS = "windows"
SLIDING = "sliding"
PROTOCOL_NAMES = (STATEFUL, WINDOWS, SLIDING)

LOGIT_BUDGET = 1 << 24  # floats of logits per onnxruntime call (64 MB): bounds memory for a 50k vocabulary
MAX_CHUNK = 4096  # tokens per stateful call

ProgressCallback = Callable[[int, int], None]


class ScoringError(ValueError):
    """This protocol cannot score this model or text; the message is one line for the user."""


@dataclass(frozen=True)
class ScoringProtocol:
    """How context is given to each prediction (see the module docstring). Build with the class methods."""

    name: str
    window: int | None = None  # input tokens per window (windows, sliding)
    stride: int | None = None  # tokens between window starts (sliding)
    streams: int = 1  # pieces scored side by side (stateful)

    def __post_init__(self) -> None:
        if self.name not in PROTOCOL_NAMES:
            raise ScoringError(f"unknown scoring protocol {self.name!r}; choose {', '.join(PROTOCOL_NAMES)}")
        if self.name == STATEFUL:
            if self.streams < 1 or self.window is not None or self.stride is not None:
                raise ScoringError("the stateful protocol takes only a number of streams >= 1")
            return
        if self.window is None or self.window < 1:
            raise ScoringError(f"the {self.name} protocol needs a window of at least 1 token, got {self.window}")
        if self.name == SLIDING and (self.stride is None or not 1 <= self.stride <= self.window):
            raise ScoringError(f"the sliding stride must be between 1 and the window {self.window}, got {self.stride}")
        if self.name == WINDOWS and self.stride not in (None, self.window):
            raise ScoringError("the windows protocol has no stride (use sliding)")

    @classmethod
    def stateful(cls, streams: int = 1) -> ScoringProtocol:
        return cls(STATEFUL, streams=streams)

    @classmethod
    def windows(cls, window: int) -> ScoringProtocol:
        return cls(WINDOWS, window=window)

    @classmethod
    def sliding(cls, window: int, stride: int) -> ScoringProtocol:
        return cls(SLIDING, window=window, stride=stride)

    @property
    def step(self) -> int:
        """Tokens between window starts (windows and sliding)."""
        return self.stride if self.name == SLIDING and self.stride is not None else int(self.window or 0)

    def describe(self) -> str:
        """The protocol and what context a prediction sees, in words."""
        if self.name == STATEFUL:
            if self.streams == 1:
                return "stateful: every token sees the whole text before it"
            return f"stateful in {self.streams} streams: every token sees the text before it in its stream"
        window = int(self.window or 0)
        if self.name == WINDOWS:
            return f"windows of {window}: each from an empty context, 0 to {window - 1} tokens of context"
        least = window - self.step + 1
        plural = "s" if least != 1 else ""
        return f"sliding window {window}, stride {self.step}: at least {least} token{plural} of context"

    def as_dict(self) -> dict[str, Any]:
        """The name, its parameters and the description (JSON reports)."""
        parameters: dict[str, Any] = {"streams": self.streams} if self.name == STATEFUL else {"window": self.window}
        if self.name == SLIDING:
            parameters["stride"] = self.stride
        return {"name": self.name, **parameters, "description": self.describe()}


def default_protocol(model: OnnxModel, name: str | None = None, stride: int | None = None) -> ScoringProtocol:
    """The protocol ``name`` for ``model``, with the model's context length as the window.

    No name: ``stateful`` for an RNN, ``sliding`` for a GPT-2 (``stride`` tokens, default half the window).
    Raises ScoringError for a protocol the model cannot run (stateful needs an RNN; windows need a context length)."""
    context = model.info.context_length
    if name is None:
        name = STATEFUL if context == 0 else SLIDING
    if name not in PROTOCOL_NAMES:
        raise ScoringError(f"unknown scoring protocol {name!r}; choose {', '.join(PROTOCOL_NAMES)}")
    if stride is not None and name != SLIDING:
        raise ScoringError(f"a stride applies to the sliding protocol, not to {name}")
    if name == STATEFUL:
        if context:
            raise ScoringError(f"the stateful protocol needs an RNN; this {model.info.arch} model has a context "
                               f"of {context} tokens (use windows or sliding)")
        return ScoringProtocol.stateful()
    if not context:
        raise ScoringError(f"the {name} protocol needs a model with a context length; "
                           f"{model.info.arch} models are scored statefully")
    if name == WINDOWS:
        return ScoringProtocol.windows(context)
    if stride is not None and not 1 <= stride <= context:
        raise ScoringError(f"the stride must be between 1 and the model's context length {context}, got {stride}")
    return ScoringProtocol.sliding(context, stride if stride is not None else max(1, context // 2))


@dataclass(frozen=True, eq=False)  # eq would compare numpy arrays
class Score:
    """Negative log-likelihoods (nats) of ``ids[first_target : first_target + n_tokens]``, in text order."""

    nll: np.ndarray = field(repr=False)  # [n_tokens] float64
    first_target: int
    protocol: ScoringProtocol

    @property
    def n_tokens(self) -> int:
        return int(self.nll.shape[0])

    @property
    def total(self) -> float:
        return float(self.nll.sum())

    @property
    def nats_per_token(self) -> float:
        return self.total / self.n_tokens if self.n_tokens else float("nan")


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood in nats of ``targets`` [T] under ``logits`` [T, V] (softmax over the last axis).

    Stable log-softmax: subtract the row maximum before exp; the sum runs in float64 so that uniform logits give
    exactly log(V)."""
    rows = np.asarray(logits, dtype=np.float32)
    index = np.asarray(targets, dtype=np.int64)
    if rows.ndim != 2 or index.shape != (rows.shape[0],):
        raise ValueError(f"logits {rows.shape} and targets {index.shape} do not match")
    peak = rows.max(axis=1, keepdims=True)
    log_total = np.log(np.exp(rows - peak).sum(axis=1, dtype=np.float64))
    chosen = rows[np.arange(rows.shape[0]), index].astype(np.float64) - peak[:, 0].astype(np.float64)
    return log_total - chosen


def stream_ids(model: OnnxModel, documents: Sequence[str], single_stream: bool) -> tuple[np.ndarray, int]:
    """[eos] + the tokens of ``documents`` (each followed by eos unless ``single_stream``), and the characters
    they stand for (a document separator counts as one). The leading eos is the starting context, as in training,
    so every token of the text is scored."""
    eos = model.info.special.eos
    ids: list[int] = [eos]
    n_chars = 0
    for document in documents:
        ids.extend(model.encode(document))
        n_chars += len(document)
        if not single_stream:
            ids.append(eos)
            n_chars += 1
    return np.asarray(ids, dtype=np.int64), n_chars


def score_ids(model: OnnxModel, ids: Sequence[int] | np.ndarray, protocol: ScoringProtocol, first_target: int = 1,
              on_progress: ProgressCallback | None = None) -> Score:
    """Score ``ids[first_target:]``, each token predicted from the tokens before it as ``protocol`` says."""
    tokens = np.asarray(ids, dtype=np.int64)
    if first_target < 1:
        raise ValueError("first_target must be >= 1: the first token is context only")
    if len(tokens) <= first_target:
        raise ScoringError("the text is empty: nothing to score")
    _check_fits(model, protocol)
    if protocol.name == STATEFUL:
        if protocol.streams > 1 and first_target != 1:
            raise ValueError("stateful streams score the whole text: first_target must be 1")
        nll = _score_stateful(model, tokens, first_target, protocol.streams, on_progress)
    else:
        nll = _score_windows(model, tokens, first_target, int(protocol.window or 0), protocol.step, on_progress)
    return Score(nll, first_target, protocol)


def _check_fits(model: OnnxModel, protocol: ScoringProtocol) -> None:
    context = model.info.context_length
    if protocol.name == STATEFUL and context:
        raise ScoringError(f"the stateful protocol needs an RNN, not a {model.info.arch} with a "
                           f"{context}-token context")
    if protocol.window is not None and context and protocol.window > context:
        raise ScoringError(f"a window of {protocol.window} tokens is longer than the model's context length {context}")


def _real_ids_only(model: OnnxModel, logits: np.ndarray) -> np.ndarray:
    """The padded-vocabulary rule: softmax over the tokenizer's ids only (padding ids are never produced)."""
    return logits[..., : model.tokenizer_size]


def _score_stateful(model: OnnxModel, ids: np.ndarray, first_target: int, streams: int,
                    on_progress: ProgressCallback | None) -> np.ndarray:
    """Feed each stream chunk by chunk carrying the state; input position j predicts the token after it."""
    predictions = len(ids) - 1
    streams = min(streams, predictions)
    length = predictions // streams
    used = streams * length
    inputs = ids[:used].reshape(streams, length)
    targets = ids[1 : used + 1].reshape(streams, length)
    chunk = max(1, min(MAX_CHUNK, LOGIT_BUDGET // (model.info.vocab_size * streams)))
    state = model.initial_state(streams)
    pieces: list[np.ndarray] = []
    for start in range(0, length, chunk):
        logits, state = model.run_all(np.ascontiguousarray(inputs[:, start : start + chunk]), state, start)
        logits = _real_ids_only(model, logits)
        width = logits.shape[1]
        nll = token_nll(logits.reshape(streams * width, -1), targets[:, start : start + width].reshape(-1))
        pieces.append(nll.reshape(streams, width))
        if on_progress:
            on_progress(start + width, length)
    scored = np.concatenate(pieces, axis=1).reshape(-1)  # stream by stream: text order
    return scored[first_target - 1 :]


@dataclass(frozen=True)
class Window:
    start: int  # first input position
    end: int  # inputs are ids[start:end]; position j predicts ids[start + j + 1]
    first_scored: int  # first target index this window scores (targets run to `end` inclusive)


def sliding_windows(n_ids: int, window: int, stride: int, first_target: int = 1) -> list[Window]:
    """The windows over ``n_ids`` tokens: each target index in [first_target, n_ids) belongs to exactly one
    window, which predicts it from at least ``window - stride + 1`` tokens when it can (``stride == window``:
    non-overlapping windows)."""
    windows: list[Window] = []
    last_input = n_ids - 1  # the final token is a target only, never an input
    scored_up_to = 0  # targets <= this are taken
    start = 0
    while scored_up_to < last_input:
        end = min(start + window, last_input)
        first = max(scored_up_to + 1, first_target)
        if first <= end:
            windows.append(Window(start, end, first))
        scored_up_to = end
        start += stride
    return windows


def _score_windows(model: OnnxModel, ids: np.ndarray, first_target: int, window: int, stride: int,
                   on_progress: ProgressCallback | None) -> np.ndarray:
    """Score windows from an empty context, batching windows of equal length into one call."""
    plan = sliding_windows(len(ids), window, stride, first_target)
    scored: dict[int, np.ndarray] = {}  # window index -> its targets' NLL
    by_length: dict[int, list[int]] = {}
    for index, item in enumerate(plan):
        by_length.setdefault(item.end - item.start, []).append(index)
    done = 0
    for length, group in by_length.items():
        rows = max(1, LOGIT_BUDGET // (length * model.info.vocab_size))
        for offset in range(0, len(group), rows):
            batch = [plan[index] for index in group[offset : offset + rows]]
            inputs = np.stack([ids[w.start : w.end] for w in batch])
            logits, _ = model.run_all(inputs, model.initial_state(len(batch)), 0)
            logits = _real_ids_only(model, logits)
            for row, (index, w) in enumerate(zip(group[offset : offset + rows], batch, strict=True)):
                positions = slice(w.first_scored - 1 - w.start, w.end - w.start)  # target t sits at t - 1 - start
                scored[index] = token_nll(logits[row, positions], ids[w.first_scored : w.end + 1])
            done += len(batch)
            if on_progress:
                on_progress(done, len(plan))
    return np.concatenate([scored[index] for index in range(len(plan))]) if plan else np.zeros(0)
