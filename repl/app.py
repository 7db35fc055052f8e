"""The interactive REPL: prompt_toolkit reads the user's text, rich prints everything around the generated text,
and the generated text itself goes to the terminal as plain characters (never parsed as markup or emoji).

Each line the user types continues the same running text (runtime.generate.Session); lines starting with ':' are
commands (repl.commands). Whatever goes wrong in one command or turn is reported in one line and the session
goes on; Ctrl-C stops a generation, Ctrl-D exits.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from rich.console import Console
from rich.text import Text

from repl.commands import QuitRepl, ReplCompleter, ReplError, parse_command
from runtime.atomic import atomic_write_text, check_output_path
from runtime.errors import first_line
from runtime.generate import GenerationResult, Session, SessionError, SessionSnapshot
from runtime.modelfile import ModelFileError
from runtime.sampling import SettingError
from runtime.session import OnnxModel
from runtime.settings import Settings

SESSION_FORMAT = "textgen-repl-session"
SESSION_VERSION = 2  # 2: the token history, turn positions and the model state itself (1: transcript only)
MAX_SESSION_BYTES = 512 * 1024 * 1024  # a GPT-2 small KV cache at 1,024 tokens is ~100 MB as base64
STATE_DTYPES = ("float32", "float16")
BLOCK_QUOTE = '"""'
USER_SOURCES = ("cli", "set")
EXIT_HINT = "(Ctrl-C) To exit, type :quit or press Ctrl-D."
_EXPECTED_ERRORS = (ReplError, SettingError, SessionError, ModelFileError, OSError, ValueError)


def history_path() -> Path:
    """``$XDG_STATE_HOME/textgen/history``, defaulting to ``~/.local/state/textgen/history``."""
    state_home = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state_home) if os.path.isabs(state_home) else Path.home() / ".local" / "state"
    return base / "textgen" / "history"


def block_is_open(text: str) -> bool:
    """True while a \"\"\" block has been opened but not closed (Enter then adds a line instead of sending)."""
    body = text.lstrip()
    return body.startswith(BLOCK_QUOTE) and not (len(body) >= 6 and body.rstrip().endswith(BLOCK_QUOTE))


def unwrap_block(text: str) -> str:
    """The text inside a \"\"\" block (one newline after the opening and before the closing quotes dropped)."""
    body = text.strip()
    if not body.startswith(BLOCK_QUOTE):
        return text
    inner = body[3:-3] if len(body) >= 6 and body.endswith(BLOCK_QUOTE) else body[3:]
    inner = inner[1:] if inner.startswith("\n") else inner
    return inner[:-1] if inner.endswith("\n") else inner


def weight_format(source: dict[str, Any]) -> str:
    """fp32, or the mode export.quantize recorded in ``textgen.source`` (int8, int4, fp16). Metadata is untrusted:
    an unknown mode reads "quantized" rather than being echoed."""
    if "quantized" not in source:
        return "fp32"
    quantized = source["quantized"]
    mode = quantized.get("mode") if isinstance(quantized, dict) else None
    return mode if mode in ("int8", "int4", "fp16") else "quantized"


def model_fingerprint(model: OnnxModel) -> str:
    """Identifies the tokenizer: saved token ids are only replayed into a model that reads them the same way."""
    digest = hashlib.sha256(model.info.tokenizer_json.encode("utf-8"))
    digest.update(str(model.info.vocab_size).encode())
    return digest.hexdigest()[:16]


class ReplApp:
    def __init__(self, model: OnnxModel, settings: Settings, *, device: str = "auto", threads: int | None = None,
                 history: bool = True, console: Console | None = None, autosave: str | None = None) -> None:
        self.model = model
        self.settings = settings
        self.session = Session(model, settings)
        self.device = device
        self.threads = threads
        self.console = console or Console(highlight=False, emoji=False)
        self.use_history = history
        self.last_tokens_per_s: float | None = None
        self.last_result: GenerationResult | None = None  # for the toolbar's prompt / generation timings
        self._ends_with_newline = True
        self._notices: list[str] = []  # notices of the running turn, shown after its text (once each)
        self._interrupt_requested = False  # set by Ctrl-C while an input is handled
        self._prompt: PromptSession[str] | None = None
        self._model_digest: str | None = None
        self.autosave = autosave  # where to save the session on exit (--autosave)
        self.resumed: str | None = None  # the note to show once the header is printed (--session)

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Read and handle lines until :quit or Ctrl-D; returns the exit status."""
        self.print_header()
        if self.resumed:
            self.note(self.resumed)
        prompt = self._prompt = self._prompt_session()
        try:
            while True:
                try:
                    return self._loop(prompt)
                except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled: just go on
                    continue
        finally:
            if self.autosave:
                self._save_on_exit(self.autosave)

    def _save_on_exit(self, target: str) -> None:
        try:
            path = self.save_session(target)
        except (OSError, ReplError) as exc:
            self.error(f"autosave failed: {_error_line(exc)}")
        else:
            self.note(f"session saved to {path}")

    def _loop(self, prompt: PromptSession[str]) -> int:
        while True:
            try:
                line = prompt.prompt("> ")
            except KeyboardInterrupt:
                self.note(EXIT_HINT)
                continue
            except EOFError:
                return 0
            try:
                self.handle(line)
            except QuitRepl:
                return 0

    def handle(self, line: str) -> None:
        """One input: a command or text to continue. Never lets an exception end the session (except :quit)."""
        with self._ctrl_c_remembered():
            self._handle(line)

    @contextlib.contextmanager
    def _ctrl_c_remembered(self) -> Iterator[None]:
        """While an input is handled, Ctrl-C raises KeyboardInterrupt as usual and is also remembered: Python drops
        an exception raised while a finalizer runs ("Exception ignored in ..."), and a Ctrl-C that lands there
        must still stop the generation, at the next piece of text (see write_text)."""
        self._interrupt_requested = False

        def on_sigint(signum: int, frame: object) -> None:
            self._interrupt_requested = True
            raise KeyboardInterrupt

        try:
            previous = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread (embedded use): keep Python's own handling
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, line: str) -> None:
        try:
            if line.lstrip().startswith(":") and not line.lstrip().startswith(BLOCK_QUOTE):
                command, arg = parse_command(line)
                command.handler(self, arg)
            else:
                self.turn(unwrap_block(line))
        except QuitRepl:
            raise
        except KeyboardInterrupt:
            self._finish_output()
            self.note("interrupted")
        except _EXPECTED_ERRORS as exc:
            self._finish_output()
            self.error(_error_line(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not end the user's session with a traceback
            self._finish_output()
            self.error(f"internal error: {type(exc).__name__}: {_error_line(exc)}")

    # ------------------------------------------------------------------ output

    def print_header(self) -> None:
        info = self.model.info
        self.console.print(Text.assemble(("textgen", "bold"), "  model ", (str(self.model.path), "cyan")))
        context = f"context {info.context_length}" if info.context_length else "unbounded context"
        weights = weight_format(info.source)
        self.console.print(Text(f"{info.arch} · {weights} · vocab {info.vocab_size} · {context} · "
                                f"{self.model.provider}"))
        if self.model.device_note:
            self.console.print(Text(self.model.device_note, style="dim"))
        if self.model.file_note:
            self.console.print(Text(f"note: {self.model.file_note}", style="yellow"))
        for warning in self.settings.warnings:
            self.console.print(Text(f"note: {warning}", style="dim"))
        self.console.print(Text("Type :help for commands, Ctrl-D to exit.", style="dim"))

    def ask(self, question: str) -> str:
        """One line from the user inside a command (``:probs pick``); Ctrl-D or Ctrl-C answer with nothing."""
        try:
            if self._prompt is None:  # not running interactively (embedded use, tests): plain input
                return input(question)
            return self._prompt.prompt(question)
        except (EOFError, KeyboardInterrupt):
            return ""

    def note(self, message: str) -> None:
        self.console.print(Text(message, style="dim"))

    def error(self, message: str) -> None:
        self.console.print(Text(message, style="red"))

    def write_text(self, text: str) -> None:
        """Generated text: written as is, so '[bold]' or ':smile:' in it appear literally."""
        if self._interrupt_requested:  # a Ctrl-C whose KeyboardInterrupt was lost (see _ctrl_c_remembered)
            self._interrupt_requested = False
            raise KeyboardInterrupt
        if text:
            self.console.file.write(text)
            self.console.file.flush()
            self._ends_with_newline = text.endswith("\n")

    def _finish_output(self) -> None:
        """End the generated text's line, then show the turn's notices."""
        if not self._ends_with_newline:
            self.console.file.write("\n")
            self.console.file.flush()
            self._ends_with_newline = True
        for message in self._notices:
            self.note(message)
        self._notices.clear()

    def _notice(self, message: str) -> None:
        """A notice during generation (e.g. the context window slid): kept until the text is done, so the
        generated text is not cut in two, and shown once however often it happened."""
        if message not in self._notices:
            self._notices.append(message)

    def report(self, result: GenerationResult, show_seed: bool = False) -> None:
        """The turn's status line: generation then prompt timings (llama.cpp's split), why it stopped, the seed."""
        self._finish_output()
        self.last_tokens_per_s = result.tokens_per_s
        self.last_result = result
        parts = [f"{len(result.tokens)} tokens", f"{result.tokens_per_s:.1f} tok/s", result.stop_reason,
                 f"prompt {result.prompt_fed} tokens in {result.prompt_seconds * 1000:.0f} ms "
                 f"({result.prompt_tokens_per_s:.0f} tok/s)"]
        sampled = self.settings.get("temperature") > 0
        if sampled and (show_seed or self.settings.get("seed") is None):
            parts.append(f"seed {result.seed}")
        self.note(" · ".join(parts))

    # ------------------------------------------------------------------ generating

    def turn(self, prompt: str) -> None:
        self._ends_with_newline = True
        try:
            result = self.session.generate(prompt, on_text=self.write_text, on_notice=self._notice)
        except KeyboardInterrupt:  # landed outside the decode loop; the session stays consistent
            self._finish_output()
            self.note("interrupted")
            return
        self.report(result)

    def regenerate(self) -> None:
        self._ends_with_newline = True
        result = self.session.regen(on_text=self.write_text, on_notice=self._notice)
        self.report(result)

    def alternatives(self, count: int) -> None:
        """``count`` continuations of the last prompt from the context before it; the running text is unchanged."""
        turns = self.session.turns
        if turns:
            prompt, last = turns[-1]
            start = len(self.session.history) - last.prompt_tokens - len(last.tokens)
            scratch = Session(self.model, self.settings)
            scratch.history.extend(self.session.history[:start])  # pending tokens: fed with the prompt in one run
        else:
            prompt, scratch = "", self.session  # nothing typed yet: continuations of the empty context
        results = scratch.generate_n(prompt, count, on_notice=self._notice)
        for index, result in enumerate(results, start=1):
            self.console.print(Text(f"── alternative {index}/{count} ──", style="bold"))
            self._ends_with_newline = True
            self.write_text(result.text)
            self.report(result, show_seed=True)  # each alternative's own seed: --seed N alone reproduces it

    # ------------------------------------------------------------------ :save / :load / :model

    def save_session(self, target: str) -> Path:
        """Write the transcript, the settings and the exact model state (version 2) to ``target``, atomically."""
        path = check_output_path(target, ":save", inputs=(self.model.path,))
        snapshot = self.session.snapshot()
        transcript = [
            {"prompt": prompt, "text": result.text, "tokens": [int(t) for t in result.tokens],
             "stop_reason": result.stop_reason, "start": start, "window_start": window}
            for prompt, start, window, result in snapshot.turns if result is not None
        ]
        user_settings = {key: value for key, value, source, _ in self.settings.rows() if source in USER_SOURCES}
        document = {
            "format": SESSION_FORMAT, "version": SESSION_VERSION, "model": str(self.model.path),
            "model_sha256": self.model_digest(), "tokenizer": model_fingerprint(self.model),
            "settings": user_settings, "all_settings": self.settings.as_dict(), "transcript": transcript,
            "history": snapshot.history, "fed": {"start": snapshot.fed_start, "end": snapshot.fed_end},
            "state": {name: encode_array(array) for name, array in snapshot.state.items()},
            "logits": None if snapshot.logits is None else encode_array(snapshot.logits),
        }
        atomic_write_text(path, json.dumps(document, ensure_ascii=False, indent=1) + "\n")
        return path

    def model_digest(self) -> str:
        """sha256 of the model file, computed once per model: a saved state continues only on the same file."""
        if self._model_digest is None:
            digest = hashlib.sha256()
            with open(self.model.path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            self._model_digest = digest.hexdigest()
        return self._model_digest

    def load_session(self, target: str) -> tuple[Path, int]:
        path = Path(target).expanduser()
        document = read_session_file(path)
        restored = Settings(self.model.info.generation)
        for key, value in document["settings"].items():
            restored.set(key, value, source="set")  # validated again: the file may have been edited
        same_tokenizer = document.get("tokenizer") == model_fingerprint(self.model)
        if document["version"] >= 2 and same_tokenizer:
            session = self._resume(path, document, restored)
        else:
            if document["version"] >= 2:
                self.note(f"{path} was made with another tokenizer ({document.get('model')}): its text is "
                          "re-encoded and re-fed")
            session = replay_transcript(self.model, restored, document["transcript"], same_tokenizer)
        self.settings, self.session = restored, session
        return path, len(document["transcript"])

    def _resume(self, path: Path, document: dict[str, Any], settings: Settings) -> Session:
        """A version-2 session on a model with the same tokenizer: its exact state on the same model file;
        otherwise its token history, re-fed (and said so)."""
        same_file = document.get("model_sha256") == self.model_digest()
        snapshot = session_snapshot(path, document, with_state=same_file)
        session = Session(self.model, settings)
        problem = session.check_snapshot(snapshot)
        if problem is not None and snapshot.state is not None:
            self.note(f"{path}: {problem}; re-feeding its {len(snapshot.history)} tokens instead")
            snapshot.state = None
            problem = session.check_snapshot(snapshot)
        if problem is not None:
            raise ReplError(f"{path}: {problem}")
        if not same_file:
            self.note(f"{path} was made with another model file ({document.get('model')}) with the same tokenizer: "
                      f"re-feeding its {len(snapshot.history) - snapshot.fed_start} tokens into this one")
        session.restore(snapshot)
        return session

    def switch_model(self, target: str) -> None:
        model = OnnxModel.open(Path(target).expanduser(), device=self.device, threads=self.threads)
        settings = Settings(model.info.generation)
        for key, value, source, _ in self.settings.rows():
            if source in USER_SOURCES:
                settings.set(key, value, source=source)
        self.model, self.settings, self.session = model, settings, Session(model, settings)
        self._model_digest = None
        self.print_header()
        self.note("settings kept; the running text starts afresh")

    # ------------------------------------------------------------------ prompt_toolkit

    def _history(self) -> History:
        if not self.use_history:
            return InMemoryHistory()
        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        except OSError as exc:
            self.note(f"input history off: cannot write {path} ({exc.strerror or exc})")
            return InMemoryHistory()
        return FileHistory(str(path))

    def _prompt_session(self) -> PromptSession[str]:
        return PromptSession(
            history=self._history(), completer=ReplCompleter(), complete_while_typing=False,
            key_bindings=_key_bindings(), bottom_toolbar=self.toolbar, prompt_continuation=_continuation,
            reserve_space_for_menu=4,
        )

    def toolbar(self) -> FormattedText:
        """Model, provider, the main sampler values and the last speed (plain text: no markup parsing)."""
        settings = self.settings
        last = self.last_result
        speed = (f"prompt {last.prompt_fed} tok, {last.prompt_tokens_per_s:.0f} tok/s · "
                 f"gen {len(last.tokens)} tok, {last.tokens_per_s:.1f} tok/s" if last is not None else "– tok/s")
        sampler = (f"temp {settings.get('temperature'):g}  top_k {settings.get('top_k')}  "
                   f"top_p {settings.get('top_p'):g}")
        text = f" {self.model.path.name} │ {self.model.provider} │ {sampler} │ {speed} "
        return FormattedText([("class:bottom-toolbar", text)])


def _continuation(width: int, line_number: int, is_soft_wrap: bool) -> str:
    return "." * max(0, width - 1) + " "


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("enter")
    def _enter(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        if block_is_open(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    @bindings.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()  # Ctrl-C on a typed line discards it
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    return bindings


# ------------------------------------------------------------------------------------------------ sessions on disk


def read_session_file(path: Path) -> dict[str, Any]:
    """A :save file, checked: it is edited by hand sometimes, and loading it must never crash the session."""
    try:
        if path.stat().st_size > MAX_SESSION_BYTES:
            raise ReplError(f"{path} is too large for a session file")
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReplError(f"no such file: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ReplError(f"{path} is not a session file (not JSON)") from None
    if not isinstance(document, dict) or document.get("format") != SESSION_FORMAT:
        raise ReplError(f"{path} is not a textgen session file (no format {SESSION_FORMAT!r})")
    version = document.get("version")
    if not isinstance(version, int) or not 1 <= version <= SESSION_VERSION:
        raise ReplError(f"{path} has session format version {version!r}; this textgen reads 1..{SESSION_VERSION}")
    if not isinstance(document.get("settings"), dict):
        raise ReplError(f"{path}: 'settings' must be an object")
    transcript = document.get("transcript")
    if not isinstance(transcript, list) or not all(_valid_turn(turn) for turn in transcript):
        raise ReplError(f"{path}: 'transcript' must be a list of {{prompt, text}} objects")
    return document


def encode_array(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(array.dtype), "shape": list(array.shape),
            "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")}


def decode_array(value: object, what: str) -> np.ndarray:
    """An ``encode_array`` record, checked (the file is untrusted): known dtype, sane shape, exact byte count."""
    if not isinstance(value, dict) or value.get("dtype") not in STATE_DTYPES:
        raise ReplError(f"{what} must be an array record with dtype {' or '.join(STATE_DTYPES)}")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(type(size) is int and 0 <= size < 1 << 31 for size in shape):
        raise ReplError(f"{what}: 'shape' must be a list of non-negative integers")
    try:
        data = base64.b64decode(str(value.get("data", "")), validate=True)
    except (binascii.Error, ValueError):
        raise ReplError(f"{what}: 'data' is not base64") from None
    dtype = np.dtype(value["dtype"])
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ReplError(f"{what}: {len(data)} bytes do not make an array of shape {shape}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def session_snapshot(path: Path, document: dict[str, Any], with_state: bool) -> SessionSnapshot:
    """A version-2 document's history, turns and (``with_state``) model state, with types checked."""
    history, fed = document.get("history"), document.get("fed")
    if not isinstance(history, list) or not all(type(token) is int for token in history):
        raise ReplError(f"{path}: 'history' must be a list of token ids")
    if not isinstance(fed, dict) or not all(type(fed.get(key)) is int for key in ("start", "end")):
        raise ReplError(f"{path}: 'fed' must hold integer start and end")
    turns = []
    for turn in document["transcript"]:
        start, window = turn.get("start"), turn.get("window_start")
        if type(start) is not int or type(window) is not int:
            raise ReplError(f"{path}: a version-2 turn needs integer 'start' and 'window_start'")
        tokens = list(turn.get("tokens") or [])
        result = GenerationResult(text=turn["text"], tokens=tokens, prompt_tokens=0, seconds=0.0, tokens_per_s=0.0,
                                  stop_reason=str(turn.get("stop_reason", "max_tokens")), seed=None)
        turns.append((turn["prompt"], start, window, result))
    state = logits = None
    if with_state:
        raw_state = document.get("state")
        if not isinstance(raw_state, dict):
            raise ReplError(f"{path}: 'state' must be an object of arrays")
        state = {str(name): decode_array(value, f"{path}: state {name!r}") for name, value in raw_state.items()}
        if document.get("logits") is not None:
            logits = decode_array(document["logits"], f"{path}: logits")
    return SessionSnapshot(history, turns, fed["start"], fed["end"], state, logits)


def _valid_turn(turn: object) -> bool:
    if not isinstance(turn, dict):
        return False
    if not isinstance(turn.get("prompt"), str) or not isinstance(turn.get("text"), str):
        return False
    tokens = turn.get("tokens")
    return tokens is None or (isinstance(tokens, list) and all(type(t) is int for t in tokens))


def replay_transcript(model: OnnxModel, settings: Settings, transcript: list[dict[str, Any]],
                      same_tokenizer: bool) -> Session:
    """A session whose running text is the transcript, without generating anything.

    Each turn is fed as its prompt (a generation of zero tokens, so :undo and :regen see the turn) followed by
    its recorded tokens as pending tokens. Token ids are trusted only from a model with the same tokenizer;
    otherwise the recorded text is re-encoded (plus eos where the turn ended on it)."""
    feeder = Settings(model.info.generation)
    feeder.set("max_new_tokens", 0)
    feeder.set("num_beams", 1)
    session = Session(model, feeder)
    eos = model.info.special.eos
    for turn in transcript:
        tokens = turn.get("tokens")
        if not same_tokenizer or tokens is None or any(not 0 <= t < model.info.vocab_size for t in tokens):
            tokens = model.encode(turn["text"]) + ([eos] if turn.get("stop_reason") == "eos" else [])
        result = session.generate(turn["prompt"])
        session.history.extend(tokens)
        result.text, result.tokens = turn["text"], list(tokens)
        result.stop_reason = str(turn.get("stop_reason", "max_tokens"))
    session.settings = settings
    return session


def _error_line(exc: BaseException) -> str:
    """An OSError as "path: reason" (its str() leads with "[Errno N]"); anything else its first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return first_line(exc)
