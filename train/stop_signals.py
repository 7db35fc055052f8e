"""StopSignals: SIGINT/SIGTERM turned into an orderly stop of the training loop (train.loop)."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step. A second signal acts at once (the original
    handlers are back by then): Ctrl-C twice raises KeyboardInterrupt; the checkpoint files stay intact because
    every write is atomic.

    Under torchrun (``second_acts_at_once=False``) later signals are only recorded: the terminal's Ctrl-C reaches
    torchrun, not the workers (they run in their own sessions), and torchrun sends SIGTERM to the workers still
    running as soon as one exits with a non-zero status, which must not kill a rank that is finishing its own
    orderly stop. torchrun SIGKILLs workers that have not exited 30 s after its signal."""

    def __init__(self, second_acts_at_once: bool = True) -> None:
        self.received: int | None = None
        self.second_acts_at_once = second_acts_at_once
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if self.second_acts_at_once:
            self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __exit__(self, *exc_info: object) -> None:
        self._restore()
