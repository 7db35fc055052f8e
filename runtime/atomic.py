"""Atomic file writes, shared by every part that saves a file (checkpoints, model files, REPL transcripts).

Deliberately free of torch, so the REPL can import it without pulling torch onto its start-up path."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write_bytes(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    A crash or Ctrl-C at any moment leaves either the old file or the new one, never a torn file. A new file gets
    the permissions a plain open() would give (0666 less the umask); a replaced file keeps its own, and a symbolic
    link keeps pointing where it did (the file it points to is replaced)."""
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    kept_mode = _mode_of(target)
    temp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    # O_EXCL: never write into a file someone else made; the kernel applies the umask to 0o666 itself.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if kept_mode is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if kept_mode is not None:
            os.chmod(temp, kept_mode)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def _mode_of(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None
