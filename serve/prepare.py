"""From a parsed request to engine jobs: the prompts as token ids, the settings layered through runtime.settings
(model defaults, then ``--set``, then the request), the checks that make bad input a 400 (token ids outside the
vocabulary, logit_bias keys and values, max_tokens over the cap, prompts over the context), and one decode plan
per choice, seeded so that ``textgen-repl --seed`` reproduces any choice."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.generate import document_start
from runtime.plan import DecodePlan, alternative_seed, new_plan
from runtime.session import OnnxModel
from runtime.settings import build_settings
from serve.engine import Job
from serve.errors import ApiError
from serve.schemas import FieldError, SettingError, _Common, request_settings

# Makes the callback that carries one prompt's engine events to the request's queue (serve.app's mailbox).
Deliverer = Callable[[asyncio.Queue, int], Callable[[list], None]]


@dataclass
class Prepared:
    """A validated request: one job per prompt, the texts to echo, and how to report logprobs."""

    jobs: list[Job]
    prompt_texts: list[str]
    queue: asyncio.Queue
    n: int
    logprobs: int | None
    echo: bool
    include_usage: bool
    seed: int


class Preparer:
    """Turns requests for one model into engine jobs, or an ApiError that says what is wrong."""

    def __init__(self, model: OnnxModel, model_id: str, cli_settings: list[tuple[str, Any]],
                 max_tokens_cap: int) -> None:
        self.model = model
        self.model_id = model_id
        self.cli_settings = cli_settings
        self.max_tokens_cap = max_tokens_cap

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_id):
            raise ApiError(404, f"the model '{name}' does not exist (this server has '{self.model_id}')",
                           "model", "model_not_found")

    def prompts(self, prompt: Any) -> list[tuple[str, list[int]]]:
        """(text, ids) per prompt: a string, a list of strings, a list of token ids or a list of such lists."""
        if isinstance(prompt, str):
            return [(prompt, self.model.encode(prompt))]
        if not prompt:
            raise ApiError(400, "prompt must not be an empty list", "prompt", "invalid_value")
        if all(isinstance(item, str) for item in prompt):
            return [(text, self.model.encode(text)) for text in prompt]
        lists = [prompt] if all(isinstance(item, int) for item in prompt) else prompt
        out = []
        for ids in lists:
            bad = [token for token in ids if not 0 <= token < self.model.tokenizer_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.model.tokenizer_size - 1})",
                               "prompt", "invalid_value")
            out.append((self.model.decode(ids), list(ids)))
        return out

    def _logit_bias(self, bias: dict[str, float] | None) -> np.ndarray | None:
        if not bias:
            return None
        vector = np.zeros(self.model.info.vocab_size, dtype=np.float32)
        for key, value in bias.items():
            if not key.strip().isdigit() or not 0 <= int(key) < self.model.tokenizer_size:
                raise ApiError(400, f"logit_bias key {key!r} is not a token id of this model", "logit_bias",
                               "invalid_value")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias values must be in [-100, 100], got {value}", "logit_bias",
                               "invalid_value")
            vector[int(key)] = value
        return vector

    def _settings_pairs(self, body: _Common) -> list[tuple[str, Any]]:
        try:
            return request_settings(body)
        except FieldError as exc:
            raise ApiError(400, str(exc), exc.param, "invalid_value") from None

    def prepare(self, body: _Common, prompts: list[tuple[str, list[int]]], logprobs: int | None, echo: bool,
                deliverer: Deliverer, extra_stops: tuple[str, ...] = ()) -> Prepared:
        self.check_model(body.model)
        pairs = self._settings_pairs(body)
        if extra_stops:
            pairs.append(("stop", [*(body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []),
                                   *extra_stops]))
        try:
            settings = build_settings(self.model.info.generation, self.cli_settings, pairs, source="set")
        except SettingError as exc:
            raise ApiError(400, str(exc), None, "invalid_value") from None
        explicit = any(key == "max_new_tokens" for key, _ in pairs)
        max_new = int(settings.get("max_new_tokens"))
        if max_new > self.max_tokens_cap:
            if explicit:
                raise ApiError(400, f"max_tokens is {max_new} but this server allows at most "
                               f"{self.max_tokens_cap}", "max_tokens", "max_tokens_exceeded")
            settings.set("max_new_tokens", self.max_tokens_cap)
        seed = settings.get("seed")
        if seed is None:
            seed = secrets.randbits(31)
            settings.set("seed", seed)
        bias = self._logit_bias(body.logit_bias)
        queue: asyncio.Queue = asyncio.Queue()
        eos = self.model.info.special.eos
        jobs = []
        for index, (_, ids) in enumerate(prompts):
            prompt_ids = document_start(ids, eos, bool(settings.get("start_with_eos")))
            rows_new = self._fit_context(len(prompt_ids), int(settings.get("max_new_tokens")), explicit)
            plans = [self._plan(settings, seed, choice, rows_new) for choice in range(body.n)]
            jobs.append(Job(prompt_ids, plans, deliverer(queue, index), logprobs=logprobs,
                            echo_logprobs=echo and logprobs is not None, logit_bias=bias))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(jobs, [text for text, _ in prompts], queue, body.n, logprobs, echo, include_usage, seed)

    def _fit_context(self, prompt_tokens: int, max_new: int, explicit: bool) -> int:
        """max_new for this prompt: the REPL slides its window, a server row cannot, so past the context is a 400
        (or, when max_tokens was not given, generation stops at the context's end)."""
        context = self.model.info.context_length
        if not context:
            return max_new
        if prompt_tokens >= context:
            raise ApiError(400, f"this model's context is {context} tokens, but the prompt has {prompt_tokens} "
                           f"(including the document-start token)", "prompt", "context_length_exceeded")
        if prompt_tokens + max_new > context:
            if explicit:
                raise ApiError(400, f"this model's context is {context} tokens; the prompt ({prompt_tokens}) plus "
                               f"max_tokens ({max_new}) exceed it", "max_tokens", "context_length_exceeded")
            return context - prompt_tokens
        return max_new

    def _plan(self, settings: Any, seed: int, choice: int, max_new: int) -> DecodePlan:
        """Choice i draws from ``default_rng(alternative_seed(seed, i))``, as alternative i of
        ``textgen-repl --seed SEED --n N`` does, so ``textgen-repl --seed`` with that seed alone reproduces it."""
        plan = new_plan(self.model, settings)
        plan.max_new = max_new
        if choice:
            plan.seed = alternative_seed(seed, choice)
            plan.rng = np.random.default_rng(plan.seed)
        return plan
