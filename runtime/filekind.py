"""What kind of file the user handed us, from its first bytes: so a wrong file gets a message that names what it
is ("an ONNX model, not a checkpoint") instead of the confusing error of the reader that choked on it.

Deliberately free of torch and onnx (it runs before either is imported)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

FileKind = Literal["torch-zip", "pickle", "onnx", "empty", "other"]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since 1.6
_PICKLE_PROTOCOL = 0x80  # torch.save's legacy format (and any pickle) starts with PROTO


def sniff_file_kind(path: str | os.PathLike[str]) -> FileKind:
    """The kind of an existing regular file. ONNX is recognised by name (``.onnx``) or by its protobuf opening:
    field 1 (ir_version, a varint) then field 2 (producer_name, a string), which every exporter writes first."""
    file = Path(path)
    with file.open("rb") as handle:
        head = handle.read(16)
    if not head:
        return "empty"
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if head[0] == _PICKLE_PROTOCOL:
        return "pickle"
    if file.suffix.lower() == ".onnx" or (head[0] == 0x08 and _after_varint(head, 1) == 0x12):
        return "onnx"
    return "other"


def _after_varint(data: bytes, start: int) -> int | None:
    """The byte after the varint that begins at ``start``, or None when ``data`` ends first."""
    for index in range(start, len(data)):
        if not data[index] & 0x80:
            return data[index + 1] if index + 1 < len(data) else None
    return None
