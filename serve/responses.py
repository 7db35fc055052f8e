"""OpenAI's response shapes from engine events: a whole response (``Shape.whole``) or streamed chunks
(``Shape.chunks``), for completions (``CompletionShape``) and chat (``ChatShape``). ``apply_event`` gathers one
choice's events; ``merge_texts`` joins the text events that queued up for one choice, so they go out as one chunk."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.logprobs import NEG_INF_LOGPROB, TokenLogprob
from serve.errors import ApiError
from serve.prepare import Prepared


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    records: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0


def merge_texts(items: list[tuple[int, list]]) -> list[tuple[int, tuple]]:
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


def apply_event(event: tuple, index: int, n: int, choices: list[Choice], prompt_info: dict[int, tuple]) -> None:
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


class Shape:
    """How one endpoint writes results: whole responses and streamed chunks."""

    prefix = "cmpl"  # of the response id
    chunk_object = ""  # the "object" of streamed chunks

    def __init__(self, model_id: str, prepared: Prepared) -> None:
        self.prepared = prepared
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model_id = model_id

    def usage(self, choices: list[Choice], prompt_info: dict[int, tuple]) -> dict[str, int]:
        prompt = sum(info[0] for info in prompt_info.values())
        completion = sum(choice.tokens for choice in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_id,
                "system_fingerprint": f"seed-{self.prepared.seed}"}

    def usage_chunk(self, choices: list[Choice], prompt_info: dict[int, tuple]) -> dict[str, Any]:
        return {**self.head(self.chunk_object), "choices": [], "usage": self.usage(choices, prompt_info)}

    def whole(self, choices: list[Choice], prompt_info: dict[int, tuple]) -> dict[str, Any]:
        raise NotImplementedError

    def chunks(self, event: tuple, index: int, prompt_info: dict[int, tuple]) -> list[dict[str, Any]]:
        raise NotImplementedError


class CompletionShape(Shape):
    chunk_object = "text_completion"

    def __init__(self, model_id: str, prepared: Prepared) -> None:
        super().__init__(model_id, prepared)
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

    def whole(self, choices: list[Choice], prompt_info: dict[int, tuple]) -> dict[str, Any]:
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


class ChatShape(Shape):
    prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def _content(self, records: list[TokenLogprob]) -> list[dict[str, Any]]:
        return [{
            "token": record.text, "logprob": _logprob(record.logprob), "bytes": list(record.text.encode()),
            "raw_logprob": record.raw_logprob,  # ours: the model's own log-softmax before the sampler
            "top_logprobs": [{"token": alt.text, "logprob": _logprob(alt.logprob), "bytes": list(alt.text.encode()),
                              "raw_logprob": alt.raw_logprob} for alt in record.top],
        } for record in records]

    def whole(self, choices: list[Choice], prompt_info: dict[int, tuple]) -> dict[str, Any]:
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
