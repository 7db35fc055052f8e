"""Quality benchmark: the validation loss the tiny-Shakespeare presets reach in a fixed training time.

Runs ``textgen-train --preset NAME --time-budget 90`` (as a fresh ``python -m train`` process, exactly what a user
types) for the char-level LSTM preset ``shakespeare-char``, the char-level GPT-2 preset ``shakespeare-gpt2`` and
``nanogpt-settings`` (the GPT-2 preset with nanoGPT's CPU-recipe optimiser settings: the same-machine yardstick) on
../shared/data/tinyshakespeare.txt, then prints a table (wall time, steps, validation loss in nats/char, the goal)
next to nanoGPT's own CPU recipe measured earlier on this kind of machine, and rewrites the ``## Quality`` section of
docs/benchmarks.md (between ``<!-- quality:start -->`` and ``<!-- quality:end -->``; nothing else in the file).

Validation is the last 10 % of the characters (nanoGPT's split), scored in full at the end of the run.
``--presets anime-gpt2`` adds issue 23's third goal: the anime-gpt2 preset on its own corpus for its own 600 s.
``--smoke`` trains each preset for 2 s on a 2,000-character validation slice: it checks the pipeline in seconds,
its numbers mean nothing, and it writes no docs unless ``--docs`` names a file.

The machine has 2 cores shared with other jobs, so every row records the 1-minute load average before and after
its run: a 90 s budget buys fewer steps on a busy machine, and the loss follows.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from benchmarks.common import cpu_model
from runtime.atomic import atomic_write_bytes
from train.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MARK_START, MARK_END = "<!-- quality:start -->", "<!-- quality:end -->"
# Same-machine yardstick: nanoGPT's CPU-recipe settings (AdamW, lr 1e-3, 100 warmup steps, weight decay 0.1,
# batch 12, same 4x128 shape and block 64) trained by our trainer on the same budget: nanoGPT's own figure below
# was measured on an earlier (faster) machine of this kind and cannot be re-run here (no network).
# Each row: the preset it trains and the flags on top of it.
RUNS: dict[str, tuple[str, list[str]]] = {
    "shakespeare-char": ("shakespeare-char", []),
    "shakespeare-gpt2": ("shakespeare-gpt2", []),
    "nanogpt-settings": ("shakespeare-gpt2", ["--optimizer", "adamw", "--lr", "1e-3", "--warmup-steps", "100",
                                              "--weight-decay", "0.1", "--batch-size", "12"]),
    # On request only (--presets anime-gpt2): its own corpus (the preset's data path) and its own 600 s budget.
    "anime-gpt2": ("anime-gpt2", []),
}
PRESETS = tuple(RUNS)
DEFAULT_PRESETS = ("shakespeare-char", "shakespeare-gpt2", "nanogpt-settings")  # the tiny-Shakespeare rows
OWN_CORPUS_BUDGETS = {"anime-gpt2": 600.0}  # presets trained on their own corpus, for this budget unless given
# Final validation loss goals (issue 23): nats/char for the tiny-Shakespeare presets within 90 s, nats/token (a
# 4,096-id BPE) for anime-gpt2 within 600 s.
GOALS = {"shakespeare-char": 1.45, "shakespeare-gpt2": 1.55, "anime-gpt2": 4.6}
RUNS_DEFAULT = 3  # runs per preset, interleaved: a figure is their median, with their range
BUDGET = 90.0
SMOKE_BUDGET = 2.0
SMOKE_EVAL_TOKENS = 2000
# nanoGPT's CPU recipe (4x128 GPT, block 64, batch 12, 2,000 iters, dropout 0), run earlier on this kind of machine.
NANOGPT_VAL_LOSS, NANOGPT_SECONDS, NANOGPT_STEPS = 1.8857, 92.6, 2000
# nanoGPT's README: the baby GPT (6 layers x 384, block 256) on tiny Shakespeare, ~3 minutes on one A100.
NANOGPT_A100_VAL_LOSS = 1.4697
LN2 = 0.6931471805599453
PROTOCOL_NOTES = (
    "Validation: the last 10 % of the characters (111,540 of tiny Shakespeare's 1,115,394, nanoGPT's split), all "
    "of them, scored once at the end of the run; loss in nats per character. Evaluations during the run score a "
    f"fixed subset (`--eval-interim-tokens`, {TrainConfig.eval_interim_tokens:,} predictions by default) and count "
    "against the budget.",
    "GPT-2 protocol: non-overlapping windows of the context length, each from an empty context, so the j-th "
    "prediction of a window sees j characters (0..63 for context 64). nanoGPT's estimate_loss averages random "
    "block_size windows scored the same way (each prediction sees 0..63 characters), eval_iters x batch_size of "
    "them: 20 x 12 windows = 15,360 predictions in its CPU recipe. Same expected value; ours scores every "
    "validation character, so it has no sampling noise (nanoGPT's 240-window estimate has some).",
    "LSTM protocol: the validation text cut into 32 contiguous pieces, the state carried through each piece, so a "
    "prediction sees everything before it in its piece (measured +0.002 nats/char against one single stream).",
    "Units: the tiny-Shakespeare presets are char-level, so a token is a character (nats/token = nats/char). "
    "anime-gpt2 (on request, `--presets anime-gpt2`): the preset's own corpus (anime synopses) and 600 s budget, "
    "a 4,096-id BPE, its trainer's validation split capped at 100,000 tokens (the preset's --eval-tokens); "
    "bits/char is the trainer's val_bpc (nats per token x tokens / characters / ln 2), comparable with the char and "
    "word models.",
    "nanoGPT row: nanoGPT's own code, measured earlier on this kind of machine, not re-run "
    "here; its 2,000 iterations took 92.6 s wall with 2 threads. The machine behind this kind has changed since "
    "(see the machine line): `nanogpt-settings` is the same-machine yardstick, nanoGPT's CPU-recipe settings "
    "(AdamW lr 1e-3, warmup 100, weight decay 0.1, batch 12, 4x128, block 64; AdamW beta2 0.95 where nanoGPT's "
    "config has 0.99) run by our trainer on the same budget.",
)


class BenchmarkError(Exception):
    """The benchmark cannot run or a training run failed; one line for the user."""


@dataclass
class PresetRun:
    preset: str
    command: list[str]
    model: str
    wall_seconds: float
    train_seconds: float
    steps: int
    tokens_per_second: float
    final_val_loss: float
    best_val_loss: float
    final_val_bpc: float  # bits per character of the final evaluation (the loss / ln 2 for char models)
    load_before: float
    load_after: float
    sample: str


# --------------------------------------------------------------------------------------------------- running


def train_command(preset: str, budget: float, data: Path, out: Path, smoke: bool) -> list[str]:
    """The training command of one row; a preset with its own corpus (OWN_CORPUS_BUDGETS) reads its preset's."""
    trained, flags = RUNS[preset]
    corpus = [] if preset in OWN_CORPUS_BUDGETS else ["--data", str(data)]
    command = [sys.executable, "-m", "train", "--preset", trained, *flags, "--time-budget", f"{budget:g}",
               *corpus, "--out", str(out)]
    if smoke:
        command += ["--eval-tokens", str(SMOKE_EVAL_TOKENS)]
    return command


def run_preset(preset: str, budget: float, data: Path, out_dir: Path, smoke: bool) -> PresetRun:
    """Train one preset in a fresh process and read the result back from its checkpoint and metrics log."""
    from models.checkpoint import load_checkpoint
    from train.metrics import metrics_path, read_metrics
    from train.resume import last_checkpoint_path

    out = out_dir / f"{preset}.bin"
    command = train_command(preset, budget, data, out, smoke)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines() or [f"exit status {completed.returncode}"]
        raise BenchmarkError(f"training {preset} failed: {lines[-1]}")
    records = read_metrics(metrics_path(out))
    if not records:
        raise BenchmarkError(f"training {preset} wrote no evaluation to {metrics_path(out)}")
    if records[-1].get("val_scope", "full") != "full":  # interim evaluations score a subset; the final one must not
        raise BenchmarkError(f"the last evaluation in {metrics_path(out)} scored a subset of the validation split")
    state = load_checkpoint(last_checkpoint_path(out)).training
    if state is None or state.step is None or state.best_val_loss is None:
        raise BenchmarkError(f"{last_checkpoint_path(out)} holds no training state")
    seconds = float(state.seconds)
    return PresetRun(
        preset=preset, command=command, model=_model_line(completed.stdout), wall_seconds=wall,
        train_seconds=seconds, steps=int(state.step), tokens_per_second=int(state.tokens_seen) / seconds,
        final_val_loss=float(records[-1]["val_loss"]), best_val_loss=float(state.best_val_loss),
        final_val_bpc=float(records[-1].get("val_bpc", float(records[-1]["val_loss"]) / LN2)),
        load_before=load_before, load_after=os.getloadavg()[0], sample=_last_sample(completed.stdout),
    )


def _model_line(stdout: str) -> str:
    """'lstm 1x384 (embedding 64, vocab 67), 0.21M parameters' from the trainer's 'model:' line."""
    line = next((line for line in stdout.splitlines() if line.startswith("model: ")), "model: ?")
    return re.sub(r" \([\d.]+ MiB fp32\)$", "", line.removeprefix("model: "))


def _last_sample(stdout: str) -> str:
    samples = re.findall(r"--- sample \(.*?\) ---\n(.*?)\n---", stdout, flags=re.DOTALL)
    return samples[-1] if samples else ""


# --------------------------------------------------------------------------------------------------- reporting


def table_rows(runs: Sequence[PresetRun]) -> list[list[str]]:
    rows = []
    for run in runs:
        goal = GOALS.get(run.preset)
        met = "n/a" if goal is None else ("yes" if run.final_val_loss <= goal else "no")
        rows.append([
            f"`{run.preset}`", run.model, f"{run.wall_seconds:.1f}", f"{run.train_seconds:.1f}", f"{run.steps:,}",
            f"{run.tokens_per_second / 1000:.1f}k", f"{run.final_val_loss:.4f}",
            f"{run.final_val_bpc:.3f}", f"<= {goal:.2f}" if goal else "-", met,
            f"{run.load_before:.2f} / {run.load_after:.2f}",
        ])
    rows.append([
        "nanoGPT baby GPT on one A100, ~3 min (its README; the target of issue 23)", "gpt 6x384, block 256", "~180",
        "-", "5,000", "-", f"{NANOGPT_A100_VAL_LOSS:.4f}", f"{NANOGPT_A100_VAL_LOSS / LN2:.3f}", "-",
        "-", "not re-run",
    ])
    rows.append([
        "nanoGPT CPU recipe, nanoGPT itself, earlier machine (reference)", "gpt 4x128, block 64, batch 12",
        f"{NANOGPT_SECONDS:.1f}", "-", f"{NANOGPT_STEPS:,}", "-", f"{NANOGPT_VAL_LOSS:.4f}",
        f"{NANOGPT_VAL_LOSS / LN2:.3f}", "-", "-", "not re-run",
    ])
    return rows


HEADER = ["preset", "model", "wall s", "training s", "steps", "tokens/s", "val loss (nats/token)", "bits/char",
          "goal", "met", "load avg 1 min (before / after)"]


SUMMARY_HEADER = ["preset", "runs", "val loss (nats/token): median (min–max)", "bits/char: median", "steps: median",
                  "goal", "met"]


def summary_rows(runs: Sequence[PresetRun]) -> list[list[str]]:
    """One row per preset: the median and range of its runs' final validation loss."""
    rows = []
    for preset in dict.fromkeys(run.preset for run in runs):
        losses = sorted(run.final_val_loss for run in runs if run.preset == preset)
        bpc = statistics.median(run.final_val_bpc for run in runs if run.preset == preset)
        steps = sorted(run.steps for run in runs if run.preset == preset)
        median = statistics.median(losses)
        goal = GOALS.get(preset)
        met = "n/a" if goal is None else ("yes" if median <= goal else "no")
        rows.append([f"`{preset}`", str(len(losses)), f"{median:.4f} ({losses[0]:.4f}–{losses[-1]:.4f})",
                     f"{bpc:.3f}", f"{statistics.median(steps):,.0f}", f"<= {goal:.2f}" if goal else "-", met])
    return rows


def markdown_table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    cells = [header, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells)


def environment() -> list[str]:
    versions = []
    for name in ("torch", "numpy"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    return [
        f"date (UTC): {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"machine: {cpu_model()}; {len(os.sched_getaffinity(0))} usable logical CPUs; {platform.system()} "
        f"{platform.machine()}",
        f"python: {platform.python_version()}; versions: {', '.join(versions)}",
    ]


def section(runs: Sequence[PresetRun], argv: Sequence[str], smoke: bool) -> str:
    command = " ".join(["python", "-m", "benchmarks.quality", *(shlex.quote(a) for a in argv)])
    lines = ["## Quality", "", f"Command: `{command}`" + (" (smoke: numbers mean nothing)" if smoke else ""), ""]
    lines += ["Each preset is trained by:", ""]
    for run in runs:
        shown = ["textgen-train", *run.command[3:]]  # "python -m train" is textgen-train
        shown[shown.index("--out") + 1] = f"{run.preset}.bin"
        if "--data" in shown:
            shown[shown.index("--data") + 1] = "../shared/data/tinyshakespeare.txt"
        lines.append(f"    {' '.join(shlex.quote(part) for part in shown)}")
    lines += ["", *[f"- {item}" for item in environment()], "", markdown_table(summary_rows(runs), SUMMARY_HEADER),
              "", "Every run:", "", markdown_table(table_rows(runs)), ""]
    lines += [f"- {note}" for note in PROTOCOL_NOTES]
    for run in list({run.preset: run for run in runs}.values()):  # each preset's last run
        if run.sample:
            lines += ["", f"Sample from `{run.preset}` at the end of its run (temperature 0.8):", "", "```text",
                      run.sample.replace("```", "'''"), "```"]
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the text between the quality markers (or append the marked block), atomically."""
    block = f"{MARK_START}\n{text.rstrip()}\n{MARK_END}"
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if MARK_START in current and MARK_END in current:
        head, rest = current.split(MARK_START, 1)
        updated = head + block + rest.split(MARK_END, 1)[1]
    else:
        updated = current.rstrip() + "\n\n" + block + "\n"
    atomic_write_bytes(path, lambda handle: handle.write(updated.encode("utf-8")))


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_BUDGET:g} s per preset: checks the pipeline")
    parser.add_argument("--time-budget", type=float, default=None, help=f"seconds per preset (default {BUDGET:g})")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(DEFAULT_PRESETS),
                        help="rows to train (default: the three tiny-Shakespeare ones; anime-gpt2 trains for its "
                             "own 600 s on the anime synopses unless --time-budget is given)")
    parser.add_argument("--runs", type=int, default=None,
                        help=f"runs per preset, taking turns (default {RUNS_DEFAULT}; smoke 1)")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="the tiny Shakespeare text file")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the checkpoints here (default: a temp dir)")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"markdown file to update (default {DOCS_PATH.relative_to(REPO_ROOT)}; smoke: none)")
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    budget = args.time_budget if args.time_budget is not None else SMOKE_BUDGET if args.smoke else BUDGET
    if not budget > 0:
        raise BenchmarkError("--time-budget must be > 0")
    if args.runs is not None and args.runs < 1:
        raise BenchmarkError("--runs must be >= 1")
    if not args.data.is_file():
        raise BenchmarkError(f"corpus not found: {args.data}")
    docs = None if args.no_docs else args.docs if args.docs is not None else None if args.smoke else DOCS_PATH
    with tempfile.TemporaryDirectory(prefix="textgen-quality-") as scratch:
        out_dir = args.out_dir or Path(scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        runs = []
        repeats = args.runs or (1 if args.smoke else RUNS_DEFAULT)
        for index in range(repeats):  # presets take turns, so a change in machine load hits all of them alike
            for preset in args.presets:
                seconds = _budget(preset, args.time_budget, budget, args.smoke)
                print(f"training {preset} for {seconds:g} s (run {index + 1} of {repeats}) ...", flush=True)
                runs.append(run_preset(preset, seconds, args.data, out_dir, args.smoke))
    print()
    print(text_table(summary_rows(runs), SUMMARY_HEADER))
    print()
    print(text_table(table_rows(runs)))
    for note in PROTOCOL_NOTES:
        print(f"note: {note}")
    if docs is not None:
        write_section(docs, section(runs, arguments, args.smoke))
        print(f"\nwrote the Quality section of {docs}")
    return 0


def _budget(preset: str, given: float | None, default: float, smoke: bool) -> float:
    """A preset on its own corpus trains for its own budget unless --time-budget (or --smoke) says otherwise."""
    if given is None and not smoke and preset in OWN_CORPUS_BUDGETS:
        return OWN_CORPUS_BUDGETS[preset]
    return default


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
