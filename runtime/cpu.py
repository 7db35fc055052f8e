"""What this CPU can do, where it decides how a model file runs: int8 files whose weights use the full signed 8-bit
range are exact only on x86 CPUs with a VNNI dot product (onnxruntime's AVX2 kernel without it adds pairs of u8 x s8
products in int16, VPMADDUBSW, which saturates)."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The feature flags of the first CPU in ``/proc/cpuinfo``; None where there is no such file (not Linux)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def has_vnni(flags: frozenset[str] | None = None) -> bool | None:
    """True / False on x86 Linux, None where it cannot be told (another OS, or not x86, where the question does
    not arise the same way)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else any(flag in flags for flag in VNNI_FLAGS)


def int8_weights_of(source: dict[str, Any]) -> str | None:
    """The int8 weight encoding a model file records (``textgen.source`` -> ``quantized`` -> ``int8_weights``);
    None for files that are not int8 or predate the record (those are all "s7")."""
    quantized = source.get("quantized") if isinstance(source, dict) else None
    value = quantized.get("int8_weights") if isinstance(quantized, dict) else None
    return value if isinstance(value, str) else None


def int8_weights_saturate(weights: str | None, vnni: bool | None) -> bool:
    """Whether onnxruntime may saturate on int8 weights stored as ``weights`` on a CPU with / without VNNI."""
    return weights == "s8" and vnni is False


def int8_note(source: dict[str, Any], vnni: bool | None) -> str | None:
    """One line for a file whose int8 weights this CPU may compute wrongly, else None."""
    if int8_weights_saturate(int8_weights_of(source), vnni):
        return ("this int8 file stores full-range signed 8-bit weights, which onnxruntime adds up in saturating "
                "16-bit sums on CPUs without VNNI, like this one: its logits may be off; re-export it with "
                "--int8-weights s7 or u8")
    return None
