"""Turning an exception from anywhere (ours, a library's, the OS's) into the one line a user is shown.

Every CLI and the REPL print failures as one line (never a traceback), and most wrap a library's message in
their own sentence ("the ONNX exporter failed: ..."). Library messages are often many lines long (onnxruntime
and torch append stack-like detail), so only the first line that says something is kept.
"""

from __future__ import annotations


def first_line(error: BaseException | str, limit: int | None = None) -> str:
    """The first non-blank line of ``error``'s message, stripped.

    An exception with an empty message gives its type name (``KeyError()`` -> ``"KeyError"``), so the user sees
    something; an empty string gives ``""``. With ``limit``, a longer line is cut to ``limit`` characters ending
    in "..." (for messages that may quote a whole input line).
    """
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    if limit is not None and len(text) > limit:
        return text[: limit - 3] + "..."
    return text


def whole_line(error: BaseException | str) -> str:
    """All of ``error``'s message on one line (whitespace runs, newlines included, become one space).

    For libraries that put the cause at the end of a long multi-line message: onnxruntime's load errors end with
    e.g. "Unsupported model IR version: 11, max supported IR version: 10", which ``first_line`` would cut off.
    """
    text = " ".join(str(error).split())
    return text or (type(error).__name__ if isinstance(error, BaseException) else "")
