"""``textgen-repl``: talk to a textgen model file, interactively or from the command line / a pipe.

Start-up is kept short: argparse first (``--help`` never loads a model), onnxruntime only once the arguments are
valid, prompt_toolkit and rich only for the interactive REPL. Never imports torch. Every user-facing failure is
one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import sys
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from runtime.errors import first_line

if TYPE_CHECKING:
    from runtime.generate import GenerationResult, Session
    from runtime.logprobs import LogprobRecorder
    from runtime.settings import Settings

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEMO_PACKAGE = "repl.demo"
DEMO_FILE = "demo.onnx"

DESCRIPTION = "Generate text with a textgen model file (.onnx), interactively or non-interactively."
EPILOG = """\
modes:
  no --prompt, stdin a terminal    interactive REPL (type :help inside)
  --prompt TEXT                    one generation (or --n N of them) for TEXT, printed, then exit
  no --prompt, stdin piped         one independent generation per input line (blank lines are skipped);
                                   plain text: a "--- PROMPT ---" line, then its continuation and a
                                   newline (the text may hold newlines itself: use --json for exact
                                   boundaries); --json: one JSON object per input line

timings (--json fields, and the REPL's status line), split like llama.cpp's:
  prompt_fed tokens processed in prompt_seconds (prompt_tokens_per_s), then n_tokens generated in
  gen_seconds (tokens_per_s: generation only); seconds is the whole call.
  Each --n sample carries its own seed: --seed SEED alone reproduces that sample.

--logprobs N (0-20, needs --json): a "logprobs" list beside "tokens", one entry per generated token: id, text,
  logprob (from the distribution the token was drawn from, after the sampler chain; 0 under greedy decoding),
  raw_logprob (the model's own log-softmax), and "top": the N most likely alternatives with both, best first.
  A token the sampler removed has logprob -9999.0 (JSON has no -inf). Not with beam search (num_beams > 1).

examples:
  textgen-repl --model lstm.onnx
  textgen-repl --session chat.json --autosave          # resume chat.json, save it back on exit
  textgen-repl --set dry_multiplier=0.8 --logit-bias e=-inf --ban thou
  textgen-repl --model lstm.onnx --prompt "ROMEO:" --max-tokens 200 --seed 1 --json
  printf 'ROMEO:\\nJULIET:\\n' | textgen-repl --model lstm.onnx --sampler greedy --max-tokens 50
"""


class CliError(Exception):
    """A command-line problem; the message is one line for the user."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (raised, so main decides the exit)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="textgen-repl", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="PATH", help="model file (default: the bundled demo model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (auto: CUDA when usable, else CPU)")
    parser.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads (default: physical cores)")
    parser.add_argument("--sampler", metavar="NAME",
                        help="sampler preset: greedy, sample, nucleus, beam, loop-guard (applied before --set)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="any setting, e.g. --set temp=0.6 --set top_k=40 (repeatable; see :show in the REPL)")
    parser.add_argument("--logit-bias", dest="logit_bias", action="append", default=[], metavar="TOKEN=BIAS",
                        help="add BIAS (a number or -inf) to TOKEN's logit; TOKEN is its text or #id (repeatable)")
    parser.add_argument("--ban", action="append", default=[], metavar="TEXT",
                        help="never produce TEXT, however it would be tokenized (repeatable; \\n understood)")
    parser.add_argument("--session", metavar="FILE",
                        help="resume the session saved in FILE (:save FILE writes one)")
    parser.add_argument("--autosave", action="store_true",
                        help="save the session to the --session FILE on exit (created if missing)")
    parser.add_argument("--prompt", metavar="TEXT", help="generate once for TEXT and exit")
    parser.add_argument("--max-tokens", metavar="N", help="shortcut for --set max_new_tokens=N")
    parser.add_argument("--seed", metavar="N", help="shortcut for --set seed=N (same seed, same text)")
    parser.add_argument("--n", type=_positive_int, metavar="N", help="N independent samples per prompt")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per prompt) instead of text")
    parser.add_argument("--logprobs", type=_logprobs_count, metavar="N",
                        help="with --json: each generated token's log-probabilities and its N (0-20) most likely "
                             "alternatives (see below)")
    parser.add_argument("--output", metavar="FILE",
                        help="write the output to FILE instead of stdout (checked before the model loads)")
    parser.add_argument("--no-history", action="store_true",
                        help="do not read or write the REPL input history ($XDG_STATE_HOME/textgen/history, "
                             "by default ~/.local/state/textgen/history)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _logprobs_count(text: str) -> int:
    from runtime.logprobs import MAX_TOP

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_TOP}, got {text!r}") from None
    if not 0 <= value <= MAX_TOP:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_TOP}, got {value}")
    return value


# ------------------------------------------------------------------------------------------------ set-up


@contextlib.contextmanager
def model_location(model_arg: str | None) -> Iterator[Path]:
    """The model file to open: ``--model`` as given, else the bundled demo model."""
    if model_arg is not None:
        yield Path(model_arg).expanduser()
        return
    demo = resources.files(DEMO_PACKAGE) / DEMO_FILE
    if not demo.is_file():
        raise CliError("no --model given and the bundled demo model (repl/demo/demo.onnx) is not installed; "
                       "pass --model PATH")
    with resources.as_file(demo) as path:
        yield path


def build_settings(model_defaults: dict[str, Any], args: argparse.Namespace) -> Settings:
    """The model's defaults, then --sampler, then --set in order, then the --max-tokens/--seed shortcuts."""
    from runtime import settings

    preset = [(settings.PRESET_KEY, args.sampler)] if args.sampler is not None else []
    shortcuts = [(key, value) for key, value in (("max_new_tokens", args.max_tokens), ("seed", args.seed))
                 if value is not None]
    built = settings.build_settings(model_defaults, preset, map(_assignment, args.assignments), shortcuts)
    for text in args.logit_bias:
        token, sep, bias = text.rpartition("=")
        if not sep or not token:
            raise CliError(f"--logit-bias expects TOKEN=BIAS (e.g. e=-inf or #12=2.5), got {text!r}")
        built.add_bias(token, bias, source="cli")
    for text in args.ban:
        built.add_ban(text, source="cli")
    return built


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise CliError(f"--set expects KEY=VALUE, got {text!r}")
    return key.strip(), value


# ------------------------------------------------------------------------------------------------ batch mode


def result_record(result: GenerationResult) -> dict[str, Any]:
    """One generation as JSON fields (``text`` is the continuation only; it decodes from ``tokens``)."""
    return {
        "text": result.text,
        "tokens": [int(token) for token in result.tokens],
        "n_tokens": len(result.tokens),
        "seconds": round(result.seconds, 6),
        "prompt_fed": result.prompt_fed,
        "prompt_seconds": round(result.prompt_seconds, 6),
        "prompt_tokens_per_s": round(result.prompt_tokens_per_s, 3),
        "gen_seconds": round(result.gen_seconds, 6),
        "tokens_per_s": round(result.tokens_per_s, 3),
        "stop_reason": result.stop_reason,
        "seed": result.seed,
        "warnings": list(result.warnings),
    }


class BatchRunner:
    """Non-interactive generation: each prompt starts from an empty context and is written to ``out``."""

    def __init__(self, session: Session, out: IO[str], as_json: bool, samples: int | None,
                 model_path: Path, headers: bool = False, logprobs: int | None = None) -> None:
        self.session = session
        self.logprobs = logprobs  # alternatives per token, None: no logprobs (needs as_json)
        self.out = out
        self.as_json = as_json
        self.samples = samples
        self.model_path = model_path
        self.headers = headers  # piped prompts in plain text: a "--- PROMPT ---" line before each output

    def run(self, prompt: str) -> None:
        self.session.reset()
        if self.headers and not self.as_json:
            self._write(f"--- {prompt} ---\n")
        if self.samples is None:
            self._single(prompt)
        else:
            self._several(prompt, self.samples)
        self.out.flush()

    def _single(self, prompt: str) -> None:
        stream: Callable[[str], None] | None = None if self.as_json else self._write
        recorder = self._recorder()
        result = self.session.generate(prompt, on_text=stream, on_notice=_notice, on_draw=recorder)
        if self.as_json:
            self._write_json({"prompt": prompt, **self._record(result, recorder, 0)})
        else:
            self._write("\n")

    def _several(self, prompt: str, count: int) -> None:
        recorder = self._recorder()
        results = self.session.generate_n(prompt, count, on_notice=_notice, on_draw=recorder)
        if self.as_json:
            samples = [self._record(result, recorder, index) for index, result in enumerate(results)]
            self._write_json({"prompt": prompt, "samples": samples, "seed": results[0].seed})
            return
        for index, result in enumerate(results, start=1):
            self._write(f"--- sample {index}/{count} (seed {result.seed}) ---\n{result.text}\n")

    def _recorder(self) -> LogprobRecorder | None:
        if self.logprobs is None:
            return None
        from runtime.logprobs import LogprobRecorder

        return LogprobRecorder(self.session.token_text, self.logprobs, self.session.model.tokenizer_size)

    @staticmethod
    def _record(result: GenerationResult, recorder: LogprobRecorder | None, row: int) -> dict[str, Any]:
        record = result_record(result)
        if recorder is not None:  # one entry per id in "tokens" (eos and stop-sequence tokens included)
            record["logprobs"] = recorder.take(row, len(result.tokens))
        return record

    def _write_json(self, fields: dict[str, Any]) -> None:
        record = {"model": str(self.model_path), **fields, "settings": self.session.settings.as_dict()}
        self._write(json.dumps(record, ensure_ascii=False) + "\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def _notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@contextlib.contextmanager
def output_stream(path: str | None) -> Iterator[IO[str]]:
    """stdout, or ``path`` written through a temp file beside it that replaces it at the end (also after Ctrl-C,
    keeping what was generated): a run that fails half way leaves an existing file as it was."""
    if path is None:
        yield sys.stdout
        return
    target = Path(path).expanduser()
    buffer = io.StringIO()
    try:
        yield buffer
    except KeyboardInterrupt:
        _write_output(target, path, buffer.getvalue())
        raise
    _write_output(target, path, buffer.getvalue())


def _write_output(target: Path, shown: str, text: str) -> None:
    """The generated output, never thrown away: a failed write (disk full) goes beside it or to the working folder."""
    from runtime.atomic import write_with_fallback

    try:
        written, failure = write_with_fallback(target, lambda handle: handle.write(text.encode("utf-8")))
    except OSError as exc:
        raise CliError(f"cannot write {shown}: {exc.strerror or exc}") from None
    if failure is not None:
        print(f"warning: could not write {shown} ({failure.strerror or failure}); wrote the output to {written} "
              "instead", file=sys.stderr)


def input_prompts(stream: IO[str]) -> Iterator[str]:
    """One prompt per non-blank input line (line ending removed, other whitespace kept)."""
    for line in stream:
        prompt = line.rstrip("\r\n")
        if prompt.strip():
            yield prompt


def run_batch(session: Session, args: argparse.Namespace, model_path: Path) -> int:
    prompts: Iterator[str] = iter([args.prompt]) if args.prompt is not None else input_prompts(sys.stdin)
    with output_stream(args.output) as out:
        runner = BatchRunner(session, out, args.json, args.n, model_path, headers=args.prompt is None,
                             logprobs=args.logprobs)
        for prompt in prompts:
            runner.run(prompt)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ entry point


def _run(args: argparse.Namespace) -> int:
    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive and (args.json or args.output or args.n):
        raise CliError("--json, --n and --output need --prompt or prompts piped on stdin")
    if args.logprobs is not None and not args.json:
        raise CliError("--logprobs needs --json (the log-probabilities are fields of the JSON output)")
    if (args.session or args.autosave) and not interactive:
        raise CliError("--session and --autosave belong to the interactive REPL (no --prompt, no piped stdin)")
    if args.autosave and not args.session:
        raise CliError("--autosave needs --session FILE (where to save)")
    if args.session and not args.autosave and not Path(args.session).expanduser().is_file():
        raise CliError(f"--session {args.session}: no such file")
    build_settings({}, args)  # a bad --set fails here, before the (slower) model load
    if args.output is not None:  # a folder, the model itself or an unwritable place: refused before any work
        from runtime.atomic import check_output_path

        check_output_path(args.output, "--output", inputs=(args.model,) if args.model else ())
    from repl.commands import ReplError
    from runtime.generate import Session
    from runtime.session import OnnxModel

    with model_location(args.model) as path:
        model = OnnxModel.open(path, device=args.device, threads=args.threads)
        if model.file_note and not interactive:  # the interactive REPL shows it in its banner
            _notice(model.file_note)
        settings = build_settings(model.info.generation, args)
        for warning in settings.warnings:
            _notice(warning)
        Session(model, settings).check_sampler()  # a --logit-bias token this vocabulary lacks: exit 2 now
        if args.logprobs is not None and int(settings.get("num_beams")) > 1:
            raise CliError("--logprobs does not work with beam search (num_beams > 1): its tokens are not drawn "
                           "from one distribution")
        # Everything loaded so far lives as long as the process: keep it out of the collector's full passes,
        # which otherwise walk ~170k objects (~0.1 s, a visible stall mid-stream) every so often.
        gc.freeze()
        if interactive:
            from repl.app import ReplApp

            app = ReplApp(model, settings, device=args.device, threads=args.threads,
                          history=not args.no_history, autosave=args.session if args.autosave else None)
            if args.session and Path(args.session).expanduser().is_file():
                try:
                    _, turns = app.load_session(args.session)
                except ReplError as error:
                    raise CliError(str(error)) from None
                app.resumed = f"resumed {args.session}: {turns} turns"
            return app.run()
        return run_batch(Session(model, settings), args, path)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()  # the reader went away (e.g. `| head`): not an error worth a message
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line, never a traceback
        print(f"error: {_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if _is_user_error(exc) else 1


def _is_user_error(exc: Exception) -> bool:
    from runtime.modelfile import ModelFileError

    known: tuple[type[Exception], ...] = (CliError, ModelFileError, OSError)
    if "runtime.sampling" in sys.modules:
        from runtime.generate import SessionError
        from runtime.sampling import SettingError

        known += (SettingError, SessionError)
    return isinstance(exc, known)


def _error_line(exc: Exception) -> str:
    """Our own errors as written; anything else prefixed by its type, which says what kind of failure it was."""
    line = first_line(exc)
    ours = isinstance(exc, CliError) or type(exc).__module__.startswith(("repl.", "runtime."))
    return line if ours or line == type(exc).__name__ else f"{type(exc).__name__}: {line}"


def _silence_stdout() -> None:
    import os

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
