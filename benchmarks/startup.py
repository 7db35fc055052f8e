"""Time to first token from a cold process: ``textgen-repl --model M --prompt ... --max-tokens 1`` wall time, as a
subprocess, beside the interpreter and onnxruntime import floors; and a check that torch is never imported on
that path (``python -X importtime``), with the slowest imports listed.

    python -m benchmarks.startup            # demo model + GPT-2 small shape (fp32, int4), rewrites its docs section
    python -m benchmarks.startup --smoke    # small stand-in model, prints only
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    BenchmarkError,
    Table,
    fmt_mb,
    fmt_stats,
    make_parser,
    parse_args,
    repeat,
    report,
    run_main,
)
from benchmarks.model_files import GPT2_SMALL, demo_model, model_file, quantized_file

PROMPT = "ROMEO:"
IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(\S+)\s*$")


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    args = parse_args(parser, argv)
    models = [demo_model(args)]
    if not args.smoke:
        fp32 = model_file(GPT2_SMALL, args.cache_dir)
        int4 = quantized_file(fp32, "int4", args.cache_dir)
        models += [(fp32, f"{GPT2_SMALL.name}, fp32"), (int4, f"{GPT2_SMALL.name}, int4")]
    repl = repl_command()
    table = Table(f"Cold-process wall time, {args.repeats} runs each (after one warm-up run)",
                  ["command", "model file", "seconds", "torch imported"])
    python = [sys.executable]
    table.add("python -c pass", "", fmt_stats(wall(python + ["-c", "pass"], args)), "no")
    table.add("python -c 'import onnxruntime'", "", fmt_stats(wall(python + ["-c", "import onnxruntime"], args)),
              "no")
    table.add("textgen-repl --help", "", fmt_stats(wall(repl + ["--help"], args)), "n/a")
    slowest: list[str] = []
    for path, label in models:
        command = repl + ["--model", str(path), "--prompt", PROMPT, "--max-tokens", "1", "--seed", "1",
                          "--device", "cpu", "--threads", str(args.threads), "--no-history"]
        seconds = wall(command, args)
        torch_seen, top = import_profile(path, args.threads)
        table.add(f"textgen-repl --prompt {PROMPT} --max-tokens 1", f"{label} ({fmt_mb(path.stat().st_size)})",
                  fmt_stats(seconds), "YES" if torch_seen else "no")
        if not slowest:
            slowest = top
    table.notes.append("Each run is a fresh process; the model file is in the page cache after the warm-up run.")
    notes = ["Slowest packages imported on the textgen-repl path (cumulative, python -X importtime): "
             + "; ".join(slowest)
             + "."]
    report(args, "startup.py", "startup", "Start-up: time to first token", [table], notes)
    if any(row[-1] == "YES" for row in table.rows):
        print("error: torch was imported on the textgen-repl path", file=sys.stderr)
        return 1
    return 0


def repl_command() -> list[str]:
    """The installed ``textgen-repl`` console script beside this interpreter, else ``python -m repl``."""
    script = Path(sys.executable).with_name("textgen-repl")
    if script.exists():
        return [str(script)]
    found = shutil.which("textgen-repl")
    if found:
        return [found]
    if not (REPO_ROOT / "repl" / "cli.py").exists():
        raise BenchmarkError("textgen-repl is not available (no repl/cli.py in this checkout)")
    return [sys.executable, "-m", "repl"]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TERM", "dumb")
    return env


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
                            env=_environment(), timeout=300, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise BenchmarkError(f"{' '.join(command[:3])} ... exited with {result.returncode}: {last}")
    return result


def wall(command: list[str], args: Any) -> Any:
    return repeat(lambda: _run(command), args.repeats, warmup=1)


def import_profile(path: Path, threads: int) -> tuple[bool, list[str]]:
    """(was torch imported, the five slowest packages) for one textgen-repl run under -X importtime."""
    return imports_of([sys.executable, "-X", "importtime", "-m", "repl", "--model", str(path), "--prompt", PROMPT,
                       "--max-tokens", "1", "--seed", "1", "--device", "cpu", "--threads", str(threads),
                       "--no-history"])


def imports_of(command: list[str]) -> tuple[bool, list[str]]:
    """Run ``command`` (a ``python -X importtime ...`` line): (was torch imported, the five slowest packages).

    A package's cumulative time includes its submodules; packages are counted wherever they were first imported
    (onnxruntime, for one, is imported by runtime.session, not at the top)."""
    result = _run(command)
    modules: list[tuple[int, str]] = []
    torch_seen = False
    for line in result.stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if not match:
            continue
        cumulative, name = int(match.group(2)), match.group(3)
        torch_seen |= name == "torch" or name.startswith("torch.")
        if "." not in name and name not in ("site", "encodings"):
            modules.append((cumulative, name))
    top = [f"{name} {us / 1e6:.2f} s" for us, name in sorted(modules, reverse=True)[:5]]
    return torch_seen, top


if __name__ == "__main__":
    run_main(main)
