"""The HTTP side of textgen-serve: FastAPI routes in OpenAI's shapes over the continuous-batching Engine.

Every error is OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``) with its status code: 400 for
bad input (broken JSON, wrong types, bad values, prompts over the context, max_tokens over the cap), 401 without
the API key, 404 for an unknown model or path, 413 for a body over the size cap, 503 when the queue is full or
the server is shutting down. Requests never name files: the model is chosen when the server starts.

This module is the app: its routes, error handlers, body cap and API key, and the handler that submits prepared
requests to the engine and carries the engine's events back (``_Mailbox``), whole or as server-sent events. What a
request becomes (jobs, settings, the 400s) is serve.prepare; what a response looks like, serve.responses; the error
shape, serve.errors.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.session import OnnxModel
from serve import STREAM_INTERVAL_S
from serve.chat import ChatTemplate
from serve.engine import Engine
from serve.errors import ApiError, error_body
from serve.prepare import Prepared, Preparer
from serve.responses import ChatShape, Choice, CompletionShape, Shape, apply_event, merge_texts
from serve.schemas import ChatRequest, CompletionRequest

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
    auth = _auth_dependencies(config.api_key)
    handler = _Handler(config, engine)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_id, **engine.stats()}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [handler.model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=auth)
    async def model(model_id: str) -> dict[str, Any]:
        handler.preparer.check_model(model_id)
        return handler.model_card()

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await handler.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=auth)
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


def _auth_dependencies(api_key: str | None) -> list[Any]:
    """The API-key check as a route dependency; none without a key. It is async: FastAPI runs a plain function
    dependency through a worker thread, a hop per request for a comparison of a few bytes."""
    if api_key is None:
        return []
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    return [Depends(check)]


# ---------------------------------------------------------------------------------------------------- requests


class _Handler:
    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.model = config.model
        self.created = int(time.time())
        self.preparer = Preparer(config.model, config.model_id, config.cli_settings, config.max_tokens_cap)
        self._mailbox: _Mailbox | None = None
        self._open_streams = 0  # streaming responses in progress (event loop only)

    def mailbox(self) -> _Mailbox:
        """The running event loop's mailbox (one per loop; the server has one loop)."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop, self._hand_out_gap)
        return self._mailbox

    def _hand_out_gap(self) -> float:
        """The least time between two hand-outs of engine events: the stream interval while several streams are
        open (read from the scheduler thread too: a plain int read)."""
        return self.config.stream_interval if self._open_streams > 1 else 0.0

    def _deliverer(self, queue: asyncio.Queue, index: int) -> Callable[[list], None]:
        return self.mailbox().deliverer(queue, index)

    def model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "textgen",
                "context_length": self.model.info.context_length or None, "arch": self.model.info.arch}

    def submit(self, prepared: Prepared) -> None:
        for job in prepared.jobs:
            if not self.engine.submit(job):
                self._cancel(prepared)
                raise ApiError(503, "the server is busy or shutting down; retry later", None, "server_busy",
                               kind="server_error")

    def _cancel(self, prepared: Prepared) -> None:
        for job in prepared.jobs:
            job.cancel()
        self.engine.wake()

    # ------------------------------------------------------------------ endpoints

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        prompts = self.preparer.prompts(body.prompt)
        prepared = self.preparer.prepare(body, prompts, body.logprobs, body.echo, self._deliverer)
        return await self._respond(prepared, request, body.stream, CompletionShape(self.config.model_id, prepared))

    async def chat(self, body: ChatRequest, request: Request) -> Any:
        template = self.config.chat_template
        prompt = template.render([(message.role, message.content or "") for message in body.messages])
        top = (body.top_logprobs or 0) if body.logprobs else None
        prepared = self.preparer.prepare(body, [(prompt, self.model.encode(prompt))], top, False, self._deliverer,
                                         template.stop)
        return await self._respond(prepared, request, body.stream, ChatShape(self.config.model_id, prepared))

    async def _respond(self, prepared: Prepared, request: Request, stream: bool, shape: Shape) -> Any:
        self.submit(prepared)
        if stream:
            return StreamingResponse(self._stream(prepared, request, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            choices, prompt_info = await self._collect(prepared, request)
        finally:
            self._cancel(prepared)  # a no-op for finished jobs; frees the rows of a client that went away
        return shape.whole(choices, prompt_info)

    async def _events(self, prepared: Prepared, request: Request) -> AsyncIterator[list[tuple[int, list]]]:
        """Engine events as they come, in batches: everything queued when the loop gets to it (so a busy server
        writes several tokens per chunk instead of falling behind), until every choice is done; ends early if the
        client went away."""
        pending = len(prepared.jobs) * prepared.n
        checked = time.monotonic()
        while pending:
            try:
                async with asyncio.timeout(DISCONNECT_POLL_S):  # no task per wait, unlike asyncio.wait_for
                    items = await prepared.queue.get()
            except TimeoutError:
                items = []
            # uvicorn does not fail a send to a closed socket, so a gone client is noticed by asking
            if not items or time.monotonic() - checked > DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if not items:
                continue
            while not prepared.queue.empty():
                items.extend(prepared.queue.get_nowait())
            for _, events in items:
                for event in events:
                    if event[0] == "done":
                        pending -= 1
                    elif event[0] == "error":
                        pending = 0
            yield items

    async def _collect(self, prepared: Prepared, request: Request) -> tuple[list[Choice], dict[int, tuple]]:
        choices = [Choice() for _ in range(len(prepared.jobs) * prepared.n)]
        prompt_info: dict[int, tuple] = {}
        async for items in self._events(prepared, request):
            for index, events in items:
                for event in events:
                    apply_event(event, index, prepared.n, choices, prompt_info)
        return choices, prompt_info

    async def _stream(self, prepared: Prepared, request: Request, shape: Shape) -> AsyncIterator[str]:
        choices = [Choice() for _ in range(len(prepared.jobs) * prepared.n)]
        prompt_info: dict[int, tuple] = {}
        self._open_streams += 1
        try:
            async for items in self._events(prepared, request):
                merged = merge_texts(items)
                try:
                    for index, event in merged:
                        apply_event(event, index, prepared.n, choices, prompt_info)
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


class _Mailbox:
    """Carries engine events to the event loop with at most one loop wake-up per scheduler step, however many
    requests the step served (a call_soon_threadsafe per request and step costs a self-pipe write each); while
    several streams are open, at most one hand-out per ``gap()`` seconds. Every hand-out wakes each waiting
    request's coroutine, and the scheduler thread shares the GIL with the loop: waking them all at each decode
    step (hundreds of times a second) slowed the decoding itself, while one hand-out per stream interval gives
    each stream the same one chunk per interval it was allowed anyway."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gap: Callable[[], float]) -> None:
        self.loop = loop
        self.gap = gap
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, tuple[int, list]]] = []
        self._wake_pending = False
        self._last_hand_out = 0.0  # event loop only

    def deliverer(self, queue: asyncio.Queue, index: int) -> Callable[[list], None]:
        first = True

        def deliver(events: list) -> None:
            nonlocal first
            urgent, first = first, False  # a request's first events (its time to first token) never wait
            with self._lock:
                self._items.append((queue, (index, events)))
                if self._wake_pending and not urgent:
                    return  # a hand-out is already on its way
                self._wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._hand_out if urgent else self._schedule)
            except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
                pass

        return deliver

    def _schedule(self) -> None:
        delay = self._last_hand_out + self.gap() - time.monotonic()
        if delay > 0:
            self.loop.call_later(delay, self._hand_out)
        else:
            self._hand_out()

    def _hand_out(self) -> None:
        """Each request's queue gets one list: the items of all the steps since the last hand-out."""
        with self._lock:
            items, self._items = self._items, []
            self._wake_pending = False
        self._last_hand_out = time.monotonic()
        by_queue: dict[int, tuple[asyncio.Queue, list]] = {}
        for queue, item in items:
            by_queue.setdefault(id(queue), (queue, []))[1].append(item)
        for queue, queued in by_queue.values():
            queue.put_nowait(queued)
