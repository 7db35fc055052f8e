"""``textgen-train`` / ``python -m train``: train an LSTM, GRU or GPT-2 on a corpus and write checkpoints.

Every problem the user can fix (a bad corpus, tokenizer, checkpoint, Hugging Face directory or flag value) ends
as ONE line ``error: ...`` on stderr and exit status 2, never a traceback. SIGINT exits 130 and SIGTERM 143 after
the current step, with the latest state saved to ``OUT.last``.

The same command under ``torchrun --nproc_per_node N -m train ...`` trains data-parallel (see
train.distributed): rank 0 prints and writes; an error on another rank is printed as ``rank N: error: ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console

# Only light modules here: bad flags and output paths are answered before torch is imported.
from runtime.atomic import OutputPathError, check_output_path
from runtime.corpus import FORMATS, CorpusError
from runtime.errors import first_line
from train.config import OPTIMIZERS, SCHEDULES, TrainConfig, TrainingError
from train.metrics import loss_plot_path, metrics_path

if TYPE_CHECKING:
    from models.checkpoint import Checkpoint
from train.presets import ARCH_DEFAULTS, FINETUNE_DEFAULTS, PRESETS, preset_names, resolve_preset_data

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """A missing or conflicting flag; one line for the user."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints the usage block before its error; we print only ``error: ...`` (one line, exit 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="textgen-train",
        description="Train a text generator (LSTM, GRU or GPT-2) on your corpus. Writes OUT (the best checkpoint by "
        "validation loss), OUT.last (the latest state, for --resume), OUT.metrics.jsonl and OUT.loss.png.",
        argument_default=None,
    )
    _add(parser, "--preset", help=f"fill in defaults from a preset: {', '.join(preset_names())} (flags win)")
    _add(parser, "--arch", choices=["lstm", "gru", "gpt2"], help="model architecture")
    _add(parser, "--data", help="corpus: a text file, CSV/TSV file, documents file or a folder of .txt files")
    _add(parser, "--out", help="checkpoint path, e.g. lstm.bin")
    corpus = parser.add_argument_group("corpus")
    _add(corpus, "--format", choices=list(FORMATS), help="corpus format (default auto: by extension)")
    _add(corpus, "--column", help="CSV/TSV column holding the text")
    _add(corpus, "--val-fraction", type=float, help="fraction held out for validation, from the end (0.1)")
    _add(corpus, "--min-words", type=int, help="drop documents with fewer words")
    _add(corpus, "--max-words", type=int, help="drop documents with more words")
    _add(corpus, "--drop-pattern", dest="drop_patterns", action="append", metavar="REGEX",
         help="drop documents matching this regex (repeatable)")
    _add(corpus, "--strip-source-lines", action="store_const", const=True,
         help="strip credits such as '(Source: ANN)' and '[Written by MAL Rewrite]'")
    _add(corpus, "--keep-script", metavar="SCRIPT", help="drop documents with letters outside this script (latin...)")
    _add(corpus, "--strip-boilerplate", action="store_const", const=True,
         help="strip a Project Gutenberg header and licence (kept otherwise, with a warning)")
    tokens = parser.add_argument_group("tokenizer")
    _add(tokens, "--tokenizer", help="char, word, bpe or the path of a tokenizer.json")
    _add(tokens, "--vocab-size", type=int, help="vocabulary size cap (char/word) or BPE size")
    _add(tokens, "--min-frequency", type=int, metavar="N",
         help="char/word: keep only tokens seen at least N times in the training text; the rest become <unk>")
    _add(tokens, "--lowercase", action="store_const", const=True,
         help="char/word: lowercase the corpus, and every prompt at generation time (stored in the tokenizer)")
    rnn = parser.add_argument_group("LSTM/GRU size")
    _add(rnn, "--embedding-size", type=int, help="token embedding width")
    _add(rnn, "--hidden-size", type=int, help="LSTM/GRU hidden units per layer")
    _add(rnn, "--layers", type=int, help="stacked LSTM/GRU layers")
    _add(rnn, "--dropout", type=float, help="dropout (RNNs and GPT-2)")
    gpt = parser.add_argument_group("GPT-2 size")
    _add(gpt, "--n-layer", type=int, help="transformer blocks")
    _add(gpt, "--n-head", type=int, help="attention heads per block")
    _add(gpt, "--n-embd", type=int, help="model width (divisible by --n-head)")
    _add(gpt, "--context-length", type=int, help="GPT-2 context (training block) length in tokens")
    _add(gpt, "--init-from", metavar="HF_DIR", help="fine-tune this local Hugging Face GPT-2 (its own tokenizer)")
    optim = parser.add_argument_group("optimisation")
    _add(optim, "--lr", type=float, help="peak learning rate")
    _add(optim, "--weight-decay", type=float, help="AdamW weight decay")
    _add(optim, "--warmup-steps", type=int,
         help="linear warmup steps (a default or preset warmup longer than 10%% of the steps the budget allows is "
         "shortened, with a note; an explicit value is kept)")
    _add(optim, "--grad-clip", type=float, help="clip the gradient norm to this (0: off)")
    _add(optim, "--batch-size", type=int, help="sequences per optimizer step (per process under torchrun)")
    _add(optim, "--seq-len", type=int, help="RNN truncated-BPTT window in tokens")
    _add(optim, "--grad-accum", type=int, help="micro-batches per optimizer step")
    _add(optim, "--schedule", choices=list(SCHEDULES),
         help="cosine decay to 10%% (default), linear decay to zero, or reduce-on-plateau")
    _add(optim, "--optimizer", choices=list(OPTIMIZERS),
         help="adamw, or muon: Muon for GPT-2's block matrices or an RNN's cell matrices, AdamW for the rest; "
         "fewer steps to a given loss, each step dearer (an LSTM gains from it in minutes, not in 90 s)")
    budget = parser.add_argument_group("budget and evaluation")
    _add(budget, "--time-budget", type=float, metavar="SECONDS",
         help="the whole run's wall time, from start to the last file written (corpus loading, tokenizer, "
         "evaluations and checkpoints included); total over resumes")
    _add(budget, "--max-steps", type=int, help="stop after this many optimizer steps (total, resumes included)")
    _add(budget, "--epochs", type=float, help="stop after this many passes over the training data")
    _add(budget, "--eval-every", type=int, metavar="STEPS",
         help="evaluate on the validation split every STEPS steps and at the end (default 250, shortened so a run "
         "gets about 5 evaluations; an explicit value is kept)")
    _add(budget, "--eval-tokens", type=int, help="validate on only the first N validation tokens (quicker)")
    _add(budget, "--eval-interim-tokens", type=int, metavar="N",
         help="evaluations before the final one score a fixed subset of about N of those predictions, the final "
              f"one all of them (default {TrainConfig.eval_interim_tokens}; 0: every evaluation scores them all)")
    _add(budget, "--patience", type=int, help="stop after N evaluations without improvement")
    run = parser.add_argument_group("run")
    _add(run, "--seed", type=int, help="random seed (weights, batches, dropout): same seed, same run")
    _add(run, "--device", choices=["auto", "cpu", "cuda"], help="where to train (auto: CUDA when torch sees a GPU)")
    _add(run, "--threads", type=int, help="torch CPU threads")
    _add(run, "--resume", metavar="CKPT", help="continue from a checkpoint (OUT or OUT.last) exactly")
    _add(run, "--prime", action="append", metavar="TEXT", help="print a sampled continuation at each evaluation")
    return parser


def _add(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, **options: Any) -> None:
    parser.add_argument(flag, default=None, **options)


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, Checkpoint | None, list[str]]:
    """(config, checkpoint to resume or None, notes for the user) from parsed flags, preset and defaults."""
    known = {f.name for f in fields(TrainConfig)}
    explicit = {key: value for key, value in vars(args).items() if value is not None and key in known}
    if args.resume is not None:
        from train.resume import config_for_resume, load_resume_checkpoint

        checkpoint = load_resume_checkpoint(args.resume)
        config, ignored = config_for_resume(checkpoint, explicit)
        notes = [f"note: --{name.replace('_', '-')} is taken from the checkpoint on --resume; the flag is ignored"
                 for name in ignored]
        config.validate()
        check_outputs(config)
        return config, checkpoint, notes
    preset = _preset(args.preset)
    arch = explicit.get("arch", preset.get("arch"))
    if arch is None:
        raise UsageError("--arch is required (lstm, gru or gpt2), or choose a --preset")
    values: dict[str, Any] = dict(ARCH_DEFAULTS[arch])
    if explicit.get("init_from", preset.get("init_from")) is not None:
        values.update(FINETUNE_DEFAULTS)
    values.update(preset)
    if "data" in preset and "data" not in explicit:
        values["data"] = resolve_preset_data(preset["data"])
    values.update(explicit)
    values["arch"] = arch
    values["fit_to_budget"] = [name for name in ("warmup_steps", "eval_every") if name not in explicit]
    notes = []
    if values.get("init_from") is not None and "tokenizer" in explicit:
        notes.append("note: --init-from uses the pretrained model's own tokenizer; --tokenizer is ignored")
    if "data" not in values:
        raise UsageError("--data is required (the corpus to train on)")
    if "out" not in values:
        if args.preset is None:
            raise UsageError("--out is required (where to write the checkpoint, e.g. lstm.bin)")
        values["out"] = f"{args.preset}.bin"
    config = TrainConfig(**values).validate()
    check_outputs(config)
    return config, None, notes


def check_outputs(config: TrainConfig) -> None:
    """Refuse, before any work, an --out that is a folder, the corpus itself, or an unwritable place, and any of
    the files written beside it (OUT.last, OUT.metrics.jsonl, OUT.loss.png) that is a folder."""
    check_output_path(config.out, "--out", inputs=(config.data,))
    for companion in (f"{config.out}.last", metrics_path(config.out), loss_plot_path(config.out)):
        try:
            check_output_path(companion, "", inputs=(config.data,))
        except OutputPathError as exc:
            raise OutputPathError(f"{exc} (written beside --out {config.out})") from None


def _preset(name: str | None) -> dict[str, Any]:
    if name is None:
        return {}
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    preset = dict(PRESETS[name])
    preset["preset"] = name
    return preset


def main(argv: Sequence[str] | None = None) -> int:
    code = _run(argv, _process_started())
    if "torch" in sys.modules:  # torchrun workers always load it; a refused command line never does
        from train.distributed import launched_by_torchrun

        if launched_by_torchrun():
            _exit_skipping_finalisation(code)
    return code


def _process_started() -> float:
    """When this process started, on the time.monotonic() clock: a time budget counts Python's own start-up too
    (Linux: from /proc; elsewhere from now)."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return now
    age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    return now - age if 0 <= age < 60 else now


def _exit_skipping_finalisation(code: int) -> NoReturn:
    """How a torchrun worker ends, once its checkpoint is written and its process group destroyed.

    Interpreter finalisation after a gloo run sometimes aborted rank 0 ("terminate called without an active
    exception", exit -6, in 3 of 6 SIGTERM runs of tests/test_distributed.py on 2026-12-02) after everything had
    been saved and both ranks had left the group: C++ objects of the distributed stack were torn down with a
    thread still attached. Nothing is left to finalise by then, so the worker flushes its output and leaves with
    its real exit status, which torchrun reports."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(argv: Sequence[str] | None, started: float) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _early_output_check(args)
    except (UsageError, OutputPathError) as exc:
        return _fail(str(exc))
    from models.checkpoint import CheckpointError
    from models.hf_gpt2 import HFImportError
    from train.batches import DataSizeError
    from train.distributed import is_main_process
    from train.loop import train
    from train.tokenizer import TokenizerError

    console = Console(quiet=not is_main_process())  # under torchrun only rank 0 prints notes and progress
    errors = (UsageError, CorpusError, TokenizerError, CheckpointError, HFImportError, TrainingError, DataSizeError)
    try:
        config, resume, notes = resolve_config(args)
        for note in notes:
            console.print(note, markup=False, highlight=False)
        result = train(config, resume=resume, console=console, started=started)
    except (*errors, OutputPathError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # e.g. the output folder is not writable, the disk is full
        return _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being handled
        print("interrupted", file=sys.stderr)
        return 130
    return 128 + result.signal if result.signal is not None else 0


def _early_output_check(args: argparse.Namespace) -> None:
    """The output path, checked in the first second (before torch loads) when the command line names it."""
    out = args.out if args.out is not None else f"{args.preset}.bin" if args.preset in PRESETS else None
    if out is None:
        return
    data = args.data if args.data is not None else PRESETS.get(args.preset or "", {}).get("data")
    check_outputs(TrainConfig(arch="lstm", data=data or "", out=out))


def _fail(message: str) -> int:
    rank = "" if os.environ.get("RANK", "0").strip() in ("", "0") else f"rank {os.environ.get('RANK')}: "
    print(f"{rank}error: {first_line(message) or 'training failed'}", file=sys.stderr)
    return EXIT_BAD_INPUT
