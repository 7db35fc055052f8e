"""The HTTP side of textgen-serve: FastAPI routes in OpenAI's shapes over the continuous-batching Engine.

Every error is OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``) with its status code: 400 for
bad input (broken JSON, wrong types, bad values, prompts over the context, max_tokens over the cap), 401 without
the API key, 404 for an unknown model or path, 413 for a body over the size cap, 503 when the queue is full or
the server is shutting down. Requests never name files: the model is chosen when the server starts.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.generate import document_start
from runtime.logprobs import NEG_INF_LOGPROB, TokenLogprob
from runtime.plan import DecodePlan, alternative_seed, new_plan
from runtime.session import OnnxModel
from runtime.settings import build_settings
from serve import STREAM_INTERVAL_S
from serve.chat import ChatTemplate
from serve.engine import Engine, Job
from serve.schemas import ChatRequest, CompletionRequest, FieldError, SettingError, _Common, request_settings

DISCONNECT_POLL_S = 0.25


@dataclass
class ServerConfig:
    model: OnnxModel
    model_id: str
    cli_settings: list[tuple[str, Any]] = field(default_factory=list)  # --set pairs, over the model defaults
    api_key: str | None = None
    max_batch: int = 32
    max_body_bytes: int = 1024 * 1024
    max_tokens_cap: int = 4096
    stream_interval: float = STREAM_INTERVAL_S  # seconds; 0 = a chunk as soon as tokens are there
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error_body(error.message, error.kind, error.param, error.code), error.status, headers=headers)


class BodyLimit:
    """Pure ASGI middleware: a request body over ``limit`` bytes gets 413 before any route parses it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:  # read the (capped) body here, then replay it to the app
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(error_body(f"request body is larger than {self.limit} bytes", code="body_too_large"),
                                413)
        await response(scope, receive, send)


def create_app(config: ServerConfig) -> FastAPI:
    engine = Engine(config.model, max_batch=config.max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="textgen-serve", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    _install_error_handlers(app)
    auth = _auth_dependency(config.api_key)
    handler = _Handler(config, engine)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_id, **engine.stats()}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [handler.model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(auth)])
    async def model(model_id: str) -> dict[str, Any]:
        handler.check_model(model_id)
        return handler.model_card()

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await handler.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        return await handler.chat(body, request)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = exc.errors()[0] if exc.errors() else {}
        location = [str(part) for part in problem.get("loc", ()) if part != "body"]
        param = location[0] if location else None  # the request field (not pydantic's union branch)
        if problem.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {problem.get('ctx', {}).get('error', 'parse error')}"
            return _error_response(ApiError(400, message, None, "invalid_json"))
        message = f"{param}: {problem.get('msg', 'invalid value')}" if param else problem.get("msg", "invalid body")
        return _error_response(ApiError(400, message, param, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(ApiError(exc.status_code, str(exc.detail), None, code))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))


def _auth_dependency(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    return check


# ---------------------------------------------------------------------------------------------------- requests


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    records: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0


@dataclass
class _Prepared:
    """A validated request: one job per prompt, the texts to echo, and how to report logprobs."""

    jobs: list[Job]
    prompt_texts: list[str]
    queue: asyncio.Queue
    n: int
    logprobs: int | None
    echo: bool
    include_usage: bool
    seed: int


class _Handler:
    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.model = config.model
        self.created = int(time.time())
        self._mailbox: _Mailbox | None = None
        self._open_streams = 0  # streaming responses in progress (event loop only)

    def mailbox(self) -> _Mailbox:
        """The running event loop's mailbox (one per loop; the server has one loop)."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        return self._mailbox

    def model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "textgen",
                "context_length": self.model.info.context_length or None, "arch": self.model.info.arch}

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.config.model_id):
            raise ApiError(404, f"the model '{name}' does not exist (this server has '{self.config.model_id}')",
                           "model", "model_not_found")

    # ------------------------------------------------------------------ preparing jobs

    def _prompts(self, prompt: Any) -> list[tuple[str, list[int]]]:
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
                extra_stops: tuple[str, ...] = ()) -> _Prepared:
        self.check_model(body.model)
        pairs = self._settings_pairs(body)
        if extra_stops:
            pairs.append(("stop", [*(body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []),
                                   *extra_stops]))
        try:
            settings = build_settings(self.model.info.generation, self.config.cli_settings, pairs, source="set")
        except SettingError as exc:
            raise ApiError(400, str(exc), None, "invalid_value") from None
        explicit = any(key == "max_new_tokens" for key, _ in pairs)
        max_new = int(settings.get("max_new_tokens"))
        if max_new > self.config.max_tokens_cap:
            if explicit:
                raise ApiError(400, f"max_tokens is {max_new} but this server allows at most "
                               f"{self.config.max_tokens_cap}", "max_tokens", "max_tokens_exceeded")
            settings.set("max_new_tokens", self.config.max_tokens_cap)
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
            jobs.append(Job(prompt_ids, plans, self.mailbox().deliverer(queue, index), logprobs=logprobs,
                            echo_logprobs=echo and logprobs is not None, logit_bias=bias))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _Prepared(jobs, [text for text, _ in prompts], queue, body.n, logprobs, echo, include_usage, seed)

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

    def submit(self, prepared: _Prepared) -> None:
        for job in prepared.jobs:
            if not self.engine.submit(job):
                self._cancel(prepared)
                raise ApiError(503, "the server is busy or shutting down; retry later", None, "server_busy",
                               kind="server_error")

    def _cancel(self, prepared: _Prepared) -> None:
        for job in prepared.jobs:
            job.cancel()
        self.engine.wake()

    # ------------------------------------------------------------------ endpoints

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        prompts = self._prompts(body.prompt)
        prepared = self.prepare(body, prompts, body.logprobs, body.echo)
        return await self._respond(prepared, request, body.stream, _CompletionShape(self, prepared))

    async def chat(self, body: ChatRequest, request: Request) -> Any:
        template = self.config.chat_template
        prompt = template.render([(message.role, message.content or "") for message in body.messages])
        top = (body.top_logprobs or 0) if body.logprobs else None
        prepared = self.prepare(body, [(prompt, self.model.encode(prompt))], top, False, template.stop)
        return await self._respond(prepared, request, body.stream, _ChatShape(self, prepared))

    async def _respond(self, prepared: _Prepared, request: Request, stream: bool, shape: _Shape) -> Any:
        self.submit(prepared)
        if stream:
            return StreamingResponse(self._stream(prepared, request, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            choices, prompt_info = await self._collect(prepared, request)
        finally:
            self._cancel(prepared)  # a no-op for finished jobs; frees the rows of a client that went away
        return shape.whole(choices, prompt_info)

    async def _events(self, prepared: _Prepared, request: Request) -> AsyncIterator[list[tuple[int, list]]]:
        """Engine events as they come, in batches: everything queued when the loop gets to it (so a busy server
        writes several tokens per chunk instead of falling behind), until every choice is done; ends early if the
        client went away."""
        pending = len(prepared.jobs) * prepared.n
        checked = time.monotonic()
        sent = None  # when the last batch went out
        while pending:
            try:
                items = [await asyncio.wait_for(prepared.queue.get(), DISCONNECT_POLL_S)]
            except asyncio.TimeoutError:
                items = []
            if items and sent is not None and self._open_streams > 1:
                delay = sent + self.config.stream_interval - time.monotonic()
                if delay > 0:  # let this stream's next tokens gather, so one chunk carries them all
                    await asyncio.sleep(delay)
            # uvicorn does not fail a send to a closed socket, so a gone client is noticed by asking
            if not items or time.monotonic() - checked > DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if not items:
                continue
            while not prepared.queue.empty():
                items.append(prepared.queue.get_nowait())
            for _, events in items:
                pending -= sum(1 for event in events if event[0] == "done")
                if any(event[0] == "error" for event in events):
                    pending = 0
            sent = time.monotonic()
            yield items

    async def _collect(self, prepared: _Prepared, request: Request) -> tuple[list[_Choice], dict[int, tuple]]:
        choices = [_Choice() for _ in range(len(prepared.jobs) * prepared.n)]
        prompt_info: dict[int, tuple] = {}
        async for items in self._events(prepared, request):
            for index, events in items:
                for event in events:
                    _apply(event, index, prepared.n, choices, prompt_info)
        return choices, prompt_info

    async def _stream(self, prepared: _Prepared, request: Request, shape: _Shape) -> AsyncIterator[str]:
        choices = [_Choice() for _ in range(len(prepared.jobs) * prepared.n)]
        prompt_info: dict[int, tuple] = {}
        self._open_streams += 1
        try:
            async for items in self._events(prepared, request):
                merged = _merge_texts(items)
                try:
                    for index, event in merged:
                        _apply(event, index, prepared.n, choices, prompt_info)
                except ApiError as exc:  # the headers are sent: the error goes in the stream
                    yield f"data: {json.dumps(error_body(exc.message, exc.kind))}\n\n"
                    return
                chunks = [chunk for index, event in merged for chunk in shape.chunks(event, index, prompt_info)]
                yield "".join(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n" for chunk in chunks)
            if prepared.include_usage:
                yield f"data: {json.dumps(shape.usage_chunk(choices, prompt_info))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._open_streams -= 1
            self._cancel(prepared)


def _merge_texts(items: list[tuple[int, list]]) -> list[tuple[int, tuple]]:
    """The events of ``items`` in order, each choice's consecutive text events joined into one (one chunk for
    several tokens when the loop fell behind the scheduler)."""
    out: list[tuple[int, tuple]] = []
    open_text: dict[tuple[int, int], int] = {}  # (prompt index, choice) -> position of its text event in out
    for index, events in items:
        for event in events:
            key = (index, event[1]) if event[0] in ("text", "done") else None
            if event[0] == "text" and key in open_text:
                position = open_text[key]
                _, choice, text, records = out[position][1]
                out[position] = (index, ("text", choice, text + event[2], [*records, *event[3]]))
                continue
            if key is not None:
                open_text.pop(key, None)
            if event[0] == "text":
                open_text[key] = len(out)
            out.append((index, event))
    return out


class _Mailbox:
    """Carries engine events to the event loop with at most one loop wake-up per scheduler step, however many
    requests the step served (a call_soon_threadsafe per request and step costs a self-pipe write each)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, tuple[int, list]]] = []

    def deliverer(self, queue: asyncio.Queue, index: int) -> Callable[[list], None]:
        def deliver(events: list) -> None:
            with self._lock:
                self._items.append((queue, (index, events)))
                if len(self._items) > 1:
                    return  # a wake-up is already on its way
            try:
                self.loop.call_soon_threadsafe(self._hand_out)
            except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
                pass

        return deliver

    def _hand_out(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


def _apply(event: tuple, index: int, n: int, choices: list[_Choice], prompt_info: dict[int, tuple]) -> None:
    kind = event[0]
    if kind == "error":
        raise ApiError(500, event[1], kind="server_error")
    if kind == "prompt":
        prompt_info[index] = (event[1], event[2])
        return
    choice = choices[index * n + event[1]]
    if kind == "text":
        choice.text.append(event[2])
        choice.records.extend(event[3])
    elif kind == "done":
        choice.finish_reason, choice.tokens = event[2], event[3]


def _logprob(value: float) -> float:
    return value if np.isfinite(value) else NEG_INF_LOGPROB


# ---------------------------------------------------------------------------------------------------- shapes


class _Shape:
    """How one endpoint writes results: whole responses and streamed chunks."""

    prefix = "cmpl"  # of the response id
    chunk_object = ""  # the "object" of streamed chunks

    def __init__(self, handler: _Handler, prepared: _Prepared) -> None:
        self.handler, self.prepared = handler, prepared
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model_id = handler.config.model_id

    def usage(self, choices: list[_Choice], prompt_info: dict[int, tuple]) -> dict[str, int]:
        prompt = sum(info[0] for info in prompt_info.values())
        completion = sum(choice.tokens for choice in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_id,
                "system_fingerprint": f"seed-{self.prepared.seed}"}

    def usage_chunk(self, choices: list[_Choice], prompt_info: dict[int, tuple]) -> dict[str, Any]:
        return {**self.head(self.chunk_object), "choices": [], "usage": self.usage(choices, prompt_info)}

    def whole(self, choices: list[_Choice], prompt_info: dict[int, tuple]) -> dict[str, Any]:
        raise NotImplementedError

    def chunks(self, event: tuple, index: int, prompt_info: dict[int, tuple]) -> list[dict[str, Any]]:
        raise NotImplementedError


class _CompletionShape(_Shape):
    chunk_object = "text_completion"

    def __init__(self, handler: _Handler, prepared: _Prepared) -> None:
        super().__init__(handler, prepared)
        self.offsets: dict[int, int] = {}  # per choice: characters of text sent so far (text_offset)

    def _logprobs(self, records: list[TokenLogprob], start: int) -> dict[str, Any]:
        offsets, position = [], start
        for record in records:
            offsets.append(position)
            position += len(record.text)
        return {
            "tokens": [record.text for record in records],
            "token_logprobs": [_logprob(record.logprob) for record in records],
            "top_logprobs": [{alt.text: _logprob(alt.logprob) for alt in record.top} for record in records],
            "text_offset": offsets,
            # ours, beside OpenAI's: the model's own log-softmax before the sampler
            "raw_token_logprobs": [record.raw_logprob for record in records],
            "raw_top_logprobs": [{alt.text: _logprob(alt.raw_logprob) for alt in record.top} for record in records],
        }

    def whole(self, choices: list[_Choice], prompt_info: dict[int, tuple]) -> dict[str, Any]:
        out = []
        n = self.prepared.n
        for number, choice in enumerate(choices):
            prompt_index = number // n
            prefix = self.prepared.prompt_texts[prompt_index] if self.prepared.echo else ""
            records = (list(prompt_info.get(prompt_index, (0, []))[1]) if self.prepared.echo else []) + choice.records
            logprobs = None
            if self.prepared.logprobs is not None:
                logprobs = self._logprobs(records, 0)
                if self.prepared.echo:  # generated tokens start after the echoed prompt text
                    generated = self._logprobs(choice.records, len(prefix))["text_offset"]
                    logprobs["text_offset"][len(records) - len(choice.records):] = generated
            out.append({"text": prefix + "".join(choice.text), "index": number, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason})
        return {**self.head("text_completion"), "choices": out, "usage": self.usage(choices, prompt_info)}

    def chunks(self, event: tuple, index: int, prompt_info: dict[int, tuple]) -> list[dict[str, Any]]:
        n, kind = self.prepared.n, event[0]
        if kind == "prompt":
            if not self.prepared.echo:
                return []
            text = self.prepared.prompt_texts[index]
            out = []
            for choice in range(n):
                number = index * n + choice
                logprobs = self._logprobs(event[2], 0) if self.prepared.logprobs is not None else None
                self.offsets[number] = len(text)
                out.append(self._chunk(number, text, logprobs, None))
            return out
        number = index * n + event[1]
        if kind == "text":
            start = self.offsets.get(number, 0)
            logprobs = self._logprobs(event[3], start) if self.prepared.logprobs is not None else None
            self.offsets[number] = start + len(event[2])
            return [self._chunk(number, event[2], logprobs, None)]
        if kind == "done":
            return [self._chunk(number, "", None, event[2])]
        return []

    def _chunk(self, number: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": number, "logprobs": logprobs, "finish_reason": finish}
        return {**self.head("text_completion"), "choices": [choice]}


class _ChatShape(_Shape):
    prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def _content(self, records: list[TokenLogprob]) -> list[dict[str, Any]]:
        return [{
            "token": record.text, "logprob": _logprob(record.logprob), "bytes": list(record.text.encode()),
            "raw_logprob": record.raw_logprob,  # ours: the model's own log-softmax before the sampler
            "top_logprobs": [{"token": alt.text, "logprob": _logprob(alt.logprob), "bytes": list(alt.text.encode()),
                              "raw_logprob": alt.raw_logprob} for alt in record.top],
        } for record in records]

    def whole(self, choices: list[_Choice], prompt_info: dict[int, tuple]) -> dict[str, Any]:
        out = []
        for number, choice in enumerate(choices):
            logprobs = {"content": self._content(choice.records)} if self.prepared.logprobs is not None else None
            out.append({"index": number, "message": {"role": "assistant", "content": "".join(choice.text)},
                        "logprobs": logprobs, "finish_reason": choice.finish_reason})
        return {**self.head("chat.completion"), "choices": out, "usage": self.usage(choices, prompt_info)}

    def chunks(self, event: tuple, index: int, prompt_info: dict[int, tuple]) -> list[dict[str, Any]]:
        kind = event[0]
        if kind == "prompt":
            return [self._chunk(choice, {"role": "assistant", "content": ""}, None, None)
                    for choice in range(self.prepared.n)]
        if kind == "text":
            logprobs = {"content": self._content(event[3])} if self.prepared.logprobs is not None else None
            return [self._chunk(event[1], {"content": event[2]}, logprobs, None)]
        if kind == "done":
            return [self._chunk(event[1], {}, None, event[2])]
        return []

    def _chunk(self, number: int, delta: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"index": number, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self.head("chat.completion.chunk"), "choices": [choice]}
