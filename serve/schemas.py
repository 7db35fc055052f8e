"""Request bodies (pydantic), in OpenAI's names and types, plus the request -> settings translation.

Our own sampler settings (``top_k``, ``min_p``, ``typical_p``, ``repetition_penalty``, ``min_tokens``,
``no_repeat_ngram_size``, and whatever else the settings layer knows, e.g. the DRY/XTC/mirostat names once the
sampler has them) ride along as extra body fields; each extra field goes through runtime.settings, so an unknown
name or a bad value is a 400 naming the field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.sampling import SettingError
from runtime.settings import parse_value

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token (OpenAI allows 5 for completions, 20 for chat)

__all__ = ["SettingError", "CompletionRequest", "ChatRequest", "ChatMessage", "request_settings"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take (OpenAI's), and our extra sampler settings."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # ours (also accepted as any other name the settings layer knows)
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    no_repeat_ngram_size: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: None = None  # not supported: only null is accepted
    best_of: Literal[1] | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=0)


# OpenAI field -> our setting name (the others that are settings keep their names)
_RENAMED = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", "max_completion_tokens": "max_new_tokens"}
_SETTING_FIELDS = ("max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
                   "top_k", "min_p", "typical_p", "repetition_penalty", "min_tokens", "no_repeat_ngram_size")
# request fields that are not generation settings (never passed to the settings layer)
_NOT_SETTINGS = frozenset({"model", "n", "stream", "stream_options", "logit_bias", "user", "prompt", "logprobs",
                           "echo", "suffix", "best_of", "messages", "top_logprobs", "max_completion_tokens"})
_UNSUPPORTED = frozenset({"num_beams", "beams"})  # beam search does not batch with other requests


class FieldError(ValueError):
    """A request field with a bad value: ``param`` names it for the OpenAI error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def request_settings(request: _Common) -> list[tuple[str, Any]]:
    """The request's (setting, value) pairs for runtime.settings, every value validated there."""
    pairs: list[tuple[str, Any]] = []
    values = request.model_dump(exclude_unset=True)
    if isinstance(request, ChatRequest) and request.max_completion_tokens is not None:
        values.setdefault("max_tokens", request.max_completion_tokens)
    for name in _SETTING_FIELDS:
        if values.get(name) is not None:
            pairs.append(_checked(name, _RENAMED.get(name, name), values[name]))
    for name, value in (request.model_extra or {}).items():
        if name in _NOT_SETTINGS:
            continue
        if name.strip().lower() in _UNSUPPORTED:
            raise FieldError(name, f"{name} is not supported by this server")
        pairs.append(_checked(name, name, value))
    return pairs


def _checked(field: str, key: str, value: Any) -> tuple[str, Any]:
    if isinstance(value, bool) or (isinstance(value, (dict, list)) and key != "stop"):
        raise FieldError(field, f"{field} has the wrong type: {value!r}")
    try:
        return parse_value(key, value)
    except SettingError as exc:
        message = str(exc)
        if key != field:
            message = message.replace(key, field)
        raise FieldError(field, message) from None
