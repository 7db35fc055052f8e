"""Shared plumbing for the benchmark scripts: arguments, timing statistics, tables, the docs/benchmarks.md
sections, the environment block and the memory-bandwidth ceiling. The cached model files are
benchmarks/model_files.py; the decode loops being compared, benchmarks/runners.py.

Every script runs from the repository root as
``python -m benchmarks.NAME [--smoke] [--threads N] [--repeats N] [--docs PATH | --no-docs]``.
``--smoke`` shrinks models and token counts so the whole script runs in seconds (the tests use it); its numbers
mean nothing and are never written to docs/benchmarks.md unless ``--docs`` names a file explicitly.

Heavy imports (torch, onnxruntime, transformers) happen inside functions: ``--help`` stays instant and
benchmarks/startup.py measures other processes, not this one.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runtime.atomic import atomic_write_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]

DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_CACHE = Path(os.environ.get("TEXTGEN_BENCH_CACHE", Path.home() / ".cache" / "textgen-bench"))



class BenchmarkError(Exception):
    """A benchmark cannot run here (missing model, missing tool); one line for the user."""


# --- arguments -------------------------------------------------------------------------------------------------


def make_parser(description: str, threads: int = 2) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few tokens: runs in seconds")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"intra-op threads for every runner, onnxruntime and torch alike (default {threads})")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 5; smoke 2)")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"markdown file whose section to rewrite (default {DOCS_PATH.relative_to(REPO_ROOT)}; "
                        "smoke runs write nothing unless this is given)")
    parser.add_argument("--no-docs", action="store_true", help="print the tables only")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where built model files are kept")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 5
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.no_docs:
        args.docs = None
    elif args.docs is None and not args.smoke:
        args.docs = DOCS_PATH
    try:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot use --cache-dir {args.cache_dir}: {exc.strerror or exc}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


PROJECT_PACKAGES = ("models", "train", "export", "runtime", "repl", "serve")


def run_main(main: Callable[[Sequence[str] | None], int]) -> None:
    """Entry point wrapper: BenchmarkError, the project's own domain errors (ExportError, QuantizeError,
    ModelLoadError, ...) and Ctrl-C become one line on stderr and exit code 2 / 130; anything else is a bug and
    keeps its traceback."""
    try:
        sys.exit(main(None))
    except Exception as exc:
        if not isinstance(exc, BenchmarkError) and type(exc).__module__.split(".")[0] not in PROJECT_PACKAGES:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


# --- statistics --------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """Median and the full range of a set of repeated measurements."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def scaled(self, factor: float) -> Stats:
        return Stats([value * factor for value in self.samples])

    def inverted(self, factor: float = 1.0) -> Stats:
        """1/x of every sample (e.g. seconds per token -> tokens per second)."""
        return Stats([factor / value for value in self.samples if value > 0])


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Stats:
    """Seconds per call over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return Stats([timed(fn) for _ in range(repeats)])


def collect(fn: Callable[[], float], repeats: int, warmup: int = 1) -> Stats:
    """The values ``fn`` returns (e.g. seconds per token it measured itself) over ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    return Stats([float(fn()) for _ in range(repeats)])


def interleaved(runners: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, Stats]:
    """``collect`` for several runners taking turns (round-robin), so a change in machine load during the
    measurement hits all of them alike instead of whichever happened to run then."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            samples[name].append(float(run()))
    return {name: Stats(values) for name, values in samples.items()}


# --- formatting ----------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, no scientific notation for the ranges seen here."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    decimals = max(0, digits - 1 - int(_floor_log10(magnitude)))
    return f"{value:,.{decimals}f}"


def _floor_log10(value: float) -> float:
    import math

    return math.floor(math.log10(value))


def fmt_stats(stats: Stats | None, digits: int = 3) -> str:
    """``median (low–high)``."""
    if stats is None or not stats.samples:
        return "n/a"
    return f"{fmt(stats.median, digits)} ({fmt(stats.low, digits)}–{fmt(stats.high, digits)})"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def fmt_mb(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 1e6:,.1f} MB"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"row has {len(cells)} cells, table {self.title!r} has {len(self.headers)} columns")
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def text(self) -> str:
        """Aligned plain text for the terminal."""
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.headers)]
        line = "  ".join(h.ljust(w) for h, w in zip(self.headers, widths, strict=True))
        body = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in self.rows]
        notes = [f"  * {note}" for note in self.notes]
        return "\n".join([self.title, line, "-" * len(line), *body, *notes])


# --- environment -----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def distribution_version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """The checked-out commit, read from .git without running git."""
    head = REPO_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            target = REPO_ROOT / ".git" / ref[5:]
            if target.exists():
                return target.read_text().strip()[:12]
            packed = (REPO_ROOT / ".git" / "packed-refs").read_text().splitlines()
            return next((line.split()[0][:12] for line in packed if line.endswith(ref[5:])), "unknown")
        return ref[:12]
    except OSError:
        return "unknown"


def environment(args: argparse.Namespace) -> list[tuple[str, str]]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        ("date (UTC)", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")),
        ("machine", f"{cpu_model()}; {usable} usable logical CPUs; {platform.system()} {platform.machine()}"),
        ("load average at start (1/5/15 min)", load),
        ("threads per runner", str(args.threads)),
        ("python", platform.python_version()),
        ("versions", ", ".join(f"{name} {distribution_version(name)}" for name in
                               ("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "transformers"))),
        ("commit", _git_commit() + " (plus uncommitted changes, if any)"),
    ]


def command_line(script: str, args: argparse.Namespace) -> str:
    """The command that reruns this benchmark, e.g. ``python -m benchmarks.batch --n 4`` for "batch.py"."""
    return " ".join(["python", "-m", f"benchmarks.{Path(script).stem}", *(shlex.quote(a) for a in args.argv)])


# --- reporting ----------------------------------------------------------------------------------------------------

DOCS_HEADER = """# Benchmarks

Numbers written by the scripts in `benchmarks/` (each rewrites only its own section). Medians over repeated runs,
with the range (min–max) in parentheses. Random weights: speed does not depend on what a model learned, and
nothing is downloaded. Re-run a section with the command shown in it; `--smoke` runs print without writing here.
"""


def report(args: argparse.Namespace, script: str, key: str, title: str, tables: Sequence[Table],
           notes: Iterable[str] = ()) -> str:
    """Print the tables and, when ``args.docs`` is set, rewrite section ``key`` of that markdown file."""
    env = environment(args)
    for table in tables:
        print()
        print(table.text())
    note_list = list(notes)
    for note in note_list:
        print(f"note: {note}")
    body = [f"## {title}", "", f"Command: `{command_line(script, args)}`" + (" (smoke)" if args.smoke else ""), ""]
    body += [f"- {name}: {value}" for name, value in env]
    body.append("")
    for table in tables:
        body += [table.markdown(), ""]
    body += [f"- {note}" for note in note_list]
    section = "\n".join(body).rstrip() + "\n"
    if args.docs is not None:
        write_section(Path(args.docs), key, section)
        print(f"\nwrote section '{key}' of {args.docs}")
    return section


def write_section(path: Path, key: str, section: str) -> None:
    """Replace the text between this key's markers (or append it), atomically."""
    begin, end = f"<!-- benchmark:{key} -->", f"<!-- /benchmark:{key} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else DOCS_HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip() + "\n\n" + block
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


# --- memory bandwidth -------------------------------------------------------------------------------------------


def memory_bandwidth(threads: int, megabytes: int = 512, repeats: int = 5) -> Stats:
    """Bytes per second read by torch's sum over a ``megabytes`` float32 array with ``threads`` threads: the
    ceiling for a decode step that must stream every weight from memory once."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(megabytes * 1024 * 1024 // 4, dtype=torch.float32)
        seconds = repeat(lambda: float(data.sum()), repeats, warmup=1)
    finally:
        torch.set_num_threads(previous)
    return seconds.inverted(float(data.numel() * 4))

