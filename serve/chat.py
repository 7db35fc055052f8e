"""The plain-text chat template: how a list of chat messages becomes one prompt for a base model.

Our models are base language models trained on plain text, so a conversation is written out the way a script is:

    {system text}               <- the system (or developer) message, if any, followed by a blank line
    User: {text}
    Assistant: {text}
    User: {text}
    Assistant:                  <- the model continues from here

and generation stops at the next "\\nUser:" (added to the request's own stop strings). A model file may carry
its own template as JSON in the ``textgen.chat_template`` metadata key, and ``textgen-serve --chat-template
FILE.json`` overrides both; the JSON object has the keys of ``ChatTemplate`` (``{content}`` marks where the
message text goes; plain replacement, no format language, since metadata is untrusted input).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

METADATA_KEY = "textgen.chat_template"
_MAX_PART = 1000  # characters per template part


class ChatTemplateError(ValueError):
    """A chat template that cannot be used; one line for the user."""


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "{content}\n\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    generation: str = "Assistant:"  # appended after the last message: where the model's reply starts
    stop: tuple[str, ...] = ("\nUser:",)

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt for ``(role, content)`` messages (role: system, developer, user or assistant)."""
        parts = []
        for role, content in messages:
            part = {"system": self.system, "developer": self.system, "user": self.user,
                    "assistant": self.assistant}[role]
            parts.append(part.replace("{content}", content))
        return "".join(parts) + self.generation


def parse_template(text: str, where: str) -> ChatTemplate:
    """A ChatTemplate from its JSON text; ChatTemplateError names ``where`` and the problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChatTemplateError(f"{where}: chat template is not JSON ({exc.msg})") from None
    if not isinstance(data, Mapping):
        raise ChatTemplateError(f"{where}: chat template must be a JSON object")
    known = {field.name for field in fields(ChatTemplate)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ChatTemplateError(f"{where}: unknown chat template key {unknown[0]!r} (keys: {', '.join(sorted(known))})")
    values = {}
    for key, value in data.items():
        if key == "stop":
            if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
                raise ChatTemplateError(f"{where}: chat template 'stop' must be a list of non-empty strings")
            values[key] = tuple(value)
        elif not isinstance(value, str) or len(value) > _MAX_PART:
            raise ChatTemplateError(f"{where}: chat template {key!r} must be a string of at most {_MAX_PART} chars")
        else:
            values[key] = value
    return ChatTemplate(**values)
