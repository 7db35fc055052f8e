"""Atomic file writes, shared by every part that saves a file (checkpoints, model files, REPL transcripts).

Deliberately free of torch, so the REPL can import it without pulling torch onto its start-up path."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class OutputPathError(OSError):
    """An output path that cannot be written; the message is one line naming the user's path and the cause.

    An OSError so every caller that already turns OSError into one line keeps working."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "cannot write the output"


def atomic_write_bytes(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    A crash or Ctrl-C at any moment leaves either the old file or the new one, never a torn file. A new file gets
    the permissions a plain open() would give (0666 less the umask); a replaced file keeps its own, and a symbolic
    link keeps pointing where it did (the file it points to is replaced)."""
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    try:
        _write_atomically(target, write)
    except OSError as exc:
        if isinstance(exc, OutputPathError) or exc.errno is None:
            raise
        # Name the user's path, never the temp file beside it (".NAME.0baf….tmp" means nothing to them).
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _write_atomically(target: Path, write: Callable[[BinaryIO], object]) -> None:
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


def check_output_path(path: str | os.PathLike[str], flag: str, inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Refuse an output path before any work is done: a directory, one of the ``inputs``, or a place that cannot
    be written (the nearest existing folder is probed by creating and removing a file there, which is the only
    reliable test: permissions, read-only mounts and /proc all answer it). Returns the path."""
    target = Path(path).expanduser()
    named = f"{flag} {path}" if flag else str(path)
    if target.is_dir():
        raise OutputPathError(f"cannot write {named}: it is a directory; give a file name")
    for source in inputs:
        if source is not None and target.exists() and Path(source).exists() and _same_file(target, Path(source)):
            raise OutputPathError(f"cannot write {named}: it is the input file {source}; choose another output")
    folder = _nearest_existing_folder(target.parent)
    if folder is None:
        raise OutputPathError(f"cannot write {named}: {_first_file_in(target.parent)} is a file, not a folder")
    reason = _write_probe(folder)
    if reason is not None:
        raise OutputPathError(f"cannot write {named}: no file can be created in {folder} ({reason})")
    return target


def write_with_fallback(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object]
) -> tuple[Path, OSError | None]:
    """``atomic_write_bytes`` to ``path``; if that fails (disk full, folder gone), to a fallback beside it, then
    in the working directory, so finished work is never discarded. Returns (where it went, the first failure or
    None). Raises the first failure when no place could take it."""
    target = Path(path)
    try:
        atomic_write_bytes(target, write)
        return target, None
    except OSError as first:
        for candidate in fallback_paths(target):
            try:
                atomic_write_bytes(candidate, write)
            except OSError:
                continue
            return candidate, first
        raise first from None


def fallback_paths(target: Path) -> list[Path]:
    """Where a failed write goes instead: ``STEM.recovered-PID.SUFFIX`` (the suffix kept, so ``.onnx`` stays an
    .onnx file) beside the target, then in the working folder."""
    name = f"{target.stem}.recovered-{os.getpid()}{target.suffix}"
    beside, here = target.with_name(name), Path.cwd() / name
    return [beside] if beside.resolve() == here.resolve() else [beside, here]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def _nearest_existing_folder(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate if candidate.is_dir() else None
    return None


def _first_file_in(folder: Path) -> Path:
    for candidate in reversed((folder, *folder.parents)):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return folder


def _write_probe(folder: Path) -> str | None:
    probe = folder / f".textgen-write-probe-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    probe.unlink(missing_ok=True)
    return None
