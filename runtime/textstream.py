"""Streaming text assembly: generated token ids in, text increments out (``TextStream``), and the same rule for
ids decoded in one go (``text_after``). Decoding with a few ids of context keeps leading spaces and multi-byte
characters split over byte-level tokens right; a tail that could start a stop sequence is held back."""

from __future__ import annotations

from collections.abc import Callable, Sequence

TextCallback = Callable[[str], None]
_DECODE_CONTEXT = 4  # tokens of context the incremental decoder keeps, so leading spaces/bytes decode right


class TextStream:
    """Turns generated token ids into text increments.

    Decodes a small window of recent ids so multi-byte characters split over byte-level tokens are emitted only
    once complete (a trailing U+FFFD means "wait"), and holds back any tail that could be the start of a stop
    sequence. ``push`` returns True when a stop sequence appeared; ``text`` is then cut just before it."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = (),
                 on_text: TextCallback | None = None, context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._on_text = on_text
        self._ids = list(context[-_DECODE_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def push(self, token: int) -> bool:
        self._ids.append(token)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return False
        self._accept(full_text[len(prefix_text):])
        return self.stopped

    def _accept(self, piece: str) -> None:
        self._prefix, self._read = self._read, len(self._ids)
        self.text += piece
        if not self._stops:
            self._emit(len(self.text))
            return
        search_from = max(0, len(self.text) - len(piece) - self._longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            self._emit(len(self.text))
            return
        self._emit(len(self.text) - self._partial_stop_tail())

    def _partial_stop_tail(self) -> int:
        """Length of the longest text tail that is a proper prefix of some stop sequence."""
        for size in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0

    def _emit(self, upto: int) -> None:
        if upto > self._emitted:
            piece = self.text[self._emitted:upto]
            self._emitted = upto
            if self._on_text is not None:
                self._on_text(piece)

    def finish(self, emit: bool = True) -> str:
        """Flush what is still undecided (an incomplete character, a held-back partial stop sequence)."""
        if not self.stopped:
            tail = self._decode(self._ids[self._prefix:])[len(self._decode(self._ids[self._prefix:self._read])):]
            if tail:
                self._prefix, self._read = self._read, len(self._ids)
                self.text += tail
            if emit:
                self._emit(len(self.text))
        return self.text


def text_after(decode: Callable[[Sequence[int]], str], context: Sequence[int], tokens: Sequence[int]) -> str:
    """What a TextStream over ``context`` (no stop sequences) ends with after ``tokens``, decoded in one go: the
    text of context tail + tokens past the length of the context tail's text, the stream's own rule (a tokenizer
    that joins with spaces adds one; a character the context left unfinished counts as the context's)."""
    tail = list(context[-_DECODE_CONTEXT:])
    return decode(tail + list(tokens))[len(decode(tail)):]
