"""The REPL's ``:commands``: what each one does, its help text, and tab completion for names, keys and presets.

Handlers take the running REPL (a ReplHost: repl.app.ReplApp, or a test double) and the text after the command
name. They raise ReplError (or SettingError,
SessionError, ModelFileError) with a one-line message for anything the user got wrong; the app prints it and
the session goes on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from rich import box
from rich.table import Table
from rich.text import Text

from runtime.sampling import ALIASES, SettingError
from runtime.settings import (
    KEYS,
    LOOP_ALIASES,
    PRESET_HELP,
    PRESETS,
    SETTING_HELP,
    canonical_key,
    decode_escapes,
    format_setting,
)

if TYPE_CHECKING:
    from rich.console import Console

    from runtime.generate import Session
    from runtime.settings import Settings

DEFAULT_PROBS = 10
MAX_PROBS = 100
MAX_ALTERNATIVES = 32
BAR_WIDTH = 30


class ReplError(Exception):
    """A command the user got wrong; one line, the session goes on."""


class QuitRepl(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by :quit / :exit."""


class ReplHost(Protocol):
    """What a command may use of the running REPL. repl.app.ReplApp provides it; this module never imports the
    app, so the app can import the commands without an import cycle."""

    console: Console
    settings: Settings
    session: Session

    def note(self, message: str) -> None: ...
    def ask(self, question: str) -> str: ...
    def regenerate(self) -> None: ...
    def alternatives(self, count: int) -> None: ...
    def save_session(self, target: str) -> Path: ...
    def load_session(self, target: str) -> tuple[Path, int]: ...
    def switch_model(self, target: str) -> None: ...


Handler = Callable[[ReplHost, str], None]


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    summary: str
    details: str
    handler: Handler


# ------------------------------------------------------------------------------------------------ handlers


def cmd_set(app: ReplHost, arg: str) -> None:
    key, value = _split_assignment(arg)
    if not key or value is None:
        raise ReplError("usage: :set KEY VALUE (e.g. :set temp 0.6); :show lists the keys")
    name = canonical_key(key)
    _checked(app, name, lambda: app.settings.set(key, value, source="set"))
    app.note(f"{name} = {format_setting(app.settings.get(name))}")


def _checked(app: ReplHost, key: str, change: Callable[[], object]) -> None:
    """Make a change to ``key``, then build the sampler once: a value this model cannot use (a logit-bias token
    not in its vocabulary) is undone and reported, so the next turn does not fail on it."""
    before, source = app.settings.get(key), app.settings.source(key)
    change()
    try:
        app.session.check_sampler()
    except SettingError:
        app.settings.set(key, before, source=source)
        raise


def cmd_bias(app: ReplHost, arg: str) -> None:
    token, _, bias = arg.strip().rpartition(" ")
    if not arg.strip():
        app.note(f"logit bias: {app.settings.get('logit_bias')} (:bias TOKEN BIAS adds one, :unbias clears)")
        return
    if not token:
        raise ReplError("usage: :bias TOKEN BIAS (TOKEN: the token's text or #id; BIAS: a number or -inf)")
    _checked(app, "logit_bias", lambda: app.settings.add_bias(token, bias, source="set"))
    app.note(f"logit_bias = {app.settings.get('logit_bias')}")


def cmd_unbias(app: ReplHost, arg: str) -> None:
    app.settings.remove_bias(arg.strip() or None, source="set")
    app.note(f"logit_bias = {app.settings.get('logit_bias')}")


def cmd_ban(app: ReplHost, arg: str) -> None:
    if not arg:
        app.note(f"banned strings: {app.settings.get('ban')} (:ban TEXT adds one, :unset ban clears them)")
        return
    _checked(app, "ban", lambda: app.settings.add_ban(arg, source="set"))
    app.note(f"banned strings: {app.settings.get('ban')}")


def cmd_unset(app: ReplHost, arg: str) -> None:
    if not arg.strip():
        raise ReplError("usage: :unset KEY")
    key = canonical_key(arg.strip())
    app.settings.unset(key)
    app.note(f"{key} back to {format_setting(app.settings.get(key))} ({app.settings.source(key)})")


def cmd_show(app: ReplHost, arg: str) -> None:
    table = Table(box=box.SIMPLE, title="settings (* = changed from the built-in default)", title_justify="left")
    for column in ("", "key", "value", "source"):
        table.add_column(column)
    for key, value, source, changed in app.settings.rows():
        style = "bold" if changed else ""
        table.add_row("*" if changed else "", Text(key), Text(format_setting(value)), Text(source), style=style)
    app.console.print(table)


def cmd_sampler(app: ReplHost, arg: str) -> None:
    name = arg.strip()
    if not name:
        for preset, text in PRESET_HELP.items():
            app.console.print(Text(f"  {preset:<11} {text}"))
        return
    applied = app.settings.apply_preset(name, source="set")
    values = ", ".join(f"{key}={format_setting(value)}" for key, value in applied.items())
    app.note(f"sampler {name.lower()}: {values}" if values else f"sampler {name.lower()}")


def cmd_stop(app: ReplHost, arg: str) -> None:
    if not arg:
        stops = app.settings.get("stop")
        app.note(f"stop sequences: {format_setting(stops)} (:stop TEXT adds one, :unset stop clears them)")
        return
    stops = app.settings.add_stop(arg, source="set")
    app.note(f"stop sequences: {format_setting(stops)}")


def cmd_probs(app: ReplHost, arg: str) -> None:
    words = arg.split()
    picking = "pick" in (word.lower() for word in words)
    rest = " ".join(word for word in words if word.lower() != "pick")
    count = _int_argument(rest, DEFAULT_PROBS, 1, MAX_PROBS, "usage: :probs [N] [pick] (N: 1..100)")
    while True:
        ranked = app.session.next_token_probs(count)
        if not ranked:
            raise ReplError("no token is possible under the current settings")
        _print_chart(app, ranked, picking)
        if not picking:
            return
        answer = app.ask("pick # or token (Enter ends): ")
        if not answer.strip():
            return
        token = _picked_token(app, answer, ranked)
        result = app.session.pick(token)
        app.note(f"picked {display_token(result.text)}")


def _print_chart(app: ReplHost, ranked: list[tuple[int, str, float]], picking: bool) -> None:
    top = max(prob for _, _, prob in ranked) or 1.0
    title = f"next token (top {len(ranked)})"
    if picking:
        tail = app.session.model.decode(app.session.history[-40:])[-40:]
        title += f" after {display_token(tail)}"
    table = Table(box=box.SIMPLE, title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("probability", justify="right")
    table.add_column("")
    for rank, (_, text, prob) in enumerate(ranked, start=1):
        bar = "█" * max(1 if prob > 0 else 0, math.floor(BAR_WIDTH * prob / top))
        table.add_row(str(rank), Text(display_token(text)), f"{prob:7.2%}", Text(bar, style="cyan"))
    app.console.print(table)


def _picked_token(app: ReplHost, answer: str, ranked: list[tuple[int, str, float]]) -> int:
    """A row number of the chart, ``#id``, or a token's text (as shown, quoted, or with \\n escapes)."""
    text = answer.strip()
    if text.isdigit():
        if not 1 <= int(text) <= len(ranked):
            raise ReplError(f"pick a row 1..{len(ranked)}, #id or a token's text")
        return ranked[int(text) - 1][0]
    if text.startswith("#") and text[1:].isdigit():
        return int(text[1:])
    try:
        wanted = json.loads(text) if text.startswith('"') else decode_escapes(answer.rstrip("\n"))
    except json.JSONDecodeError:
        wanted = text
    for token, shown, _ in ranked:
        if shown == wanted:
            return token
    token = app.session.token_id(wanted)
    if token is None:
        raise ReplError(f"{display_token(wanted)} is not one token of this model (use a row number or #id)")
    return token


def cmd_n(app: ReplHost, arg: str) -> None:
    count = _int_argument(arg, 3, 1, MAX_ALTERNATIVES, f"usage: :n N (1..{MAX_ALTERNATIVES})")
    app.alternatives(count)


def cmd_reset(app: ReplHost, arg: str) -> None:
    app.session.reset()
    app.note("context cleared")


def cmd_undo(app: ReplHost, arg: str) -> None:
    app.note("removed the last turn" if app.session.undo() else "nothing to undo")


def cmd_regen(app: ReplHost, arg: str) -> None:
    app.regenerate()


def cmd_save(app: ReplHost, arg: str) -> None:
    path = app.save_session(_path_argument(arg, "usage: :save FILE"))
    app.note(f"saved {len(app.session.turns)} turns and the settings to {path}")


def cmd_load(app: ReplHost, arg: str) -> None:
    path, turns = app.load_session(_path_argument(arg, "usage: :load FILE"))
    app.note(f"loaded {path}: settings restored, {turns} turns replayed")


def cmd_eval(app: ReplHost, arg: str) -> None:
    from runtime.evaluation import EvalError, evaluate_perplexity

    path = Path(_path_argument(arg, "usage: :eval FILE (a held-out text file)")).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplError(f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    try:
        result = evaluate_perplexity(app.session.model, text)
    except EvalError as exc:
        raise ReplError(str(exc)) from None
    app.console.print(
        f"{path}: perplexity {result.perplexity:.3f}, {result.nats_per_token:.4f} nats/token, "
        f"{result.bits_per_char:.4f} bits/char over {result.n_tokens:,} tokens; protocol {result.protocol.describe()}",
        markup=False,
        highlight=False,
    )


def cmd_model(app: ReplHost, arg: str) -> None:
    app.switch_model(_path_argument(arg, "usage: :model PATH"))


def cmd_help(app: ReplHost, arg: str) -> None:
    name = arg.strip().lstrip(":").lower()
    if not name:
        app.console.print(Text(HELP_INTRO))
        for command in unique_commands():
            app.console.print(Text(f"  {command.usage:<22} {command.summary}"))
        return
    command = COMMANDS.get(name)
    if command is None:
        raise ReplError(f"Unknown command ':{name}'. Type :help")
    app.console.print(Text(f"{command.usage}\n  {command.summary}"))
    if command.details:
        app.console.print(Text(command.details, style="dim"))


def cmd_quit(app: ReplHost, arg: str) -> None:
    raise QuitRepl()


# ------------------------------------------------------------------------------------------------ helpers


def display_token(text: str) -> str:
    """A token as a quoted literal: whitespace and control characters visible, nothing interpreted."""
    return json.dumps(text, ensure_ascii=False)


def _split_assignment(arg: str) -> tuple[str, str | None]:
    """``temp 0.6`` or ``temp=0.6`` -> ("temp", "0.6"). The value keeps inner spaces (for stop sequences)."""
    text = arg.lstrip()
    key, space, rest = text.partition(" ")
    if "=" in key:
        key, _, value = key.partition("=")
        return key, value + space + rest if value or rest else None
    return key, (rest if space else None)


def _int_argument(arg: str, default: int, low: int, high: int, usage: str) -> int:
    text = arg.strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ReplError(usage) from None
    if not low <= value <= high:
        raise ReplError(usage)
    return value


def _path_argument(arg: str, usage: str) -> str:
    path = arg.strip()
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        path = path[1:-1]
    if not path:
        raise ReplError(usage)
    return path


HELP_INTRO = """\
Type text and press Enter: the model continues it, and every turn continues the same running text.
An empty line lets the model go on. Multi-line input: start with \"\"\" and end with \"\"\", or Esc then Enter
for a new line. Ctrl-C stops a generation; Ctrl-D (or :quit) exits.
Commands:"""

_SET_DETAILS = (
    "\n".join(f"{key:<22} {SETTING_HELP[key]}" for key in KEYS) + "\naliases: "
    + ", ".join(f"{alias}={name}" for alias, name in {**ALIASES, **LOOP_ALIASES}.items())
    + "\nseed none draws a new random seed per turn; stop texts understand \\n and \\t."
)

_COMMAND_LIST = [
    Command("set", ":set KEY VALUE", "change a setting (e.g. :set temp 0.6, :set top_k 40)", _SET_DETAILS, cmd_set),
    Command("unset", ":unset KEY", "back to the model's (or the built-in) default", "", cmd_unset),
    Command("show", ":show", "all settings: value and where it came from (default/model/cli/set)", "", cmd_show),
    Command("sampler", ":sampler NAME", "preset: " + ", ".join(PRESETS),
            "\n".join(f"{name}: {text}" for name, text in PRESET_HELP.items()), cmd_sampler),
    Command("stop", ":stop TEXT", "also stop generating at TEXT (:unset stop clears)", "", cmd_stop),
    Command("bias", ":bias TOKEN BIAS", "add BIAS (a number or -inf) to a token's logit (text or #id)", "",
            cmd_bias),
    Command("unbias", ":unbias [TOKEN]", "drop one logit bias, or all of them", "", cmd_unbias),
    Command("ban", ":ban TEXT", "never produce TEXT, however it would be tokenized (:unset ban clears)", "",
            cmd_ban),
    Command("probs", ":probs [N] [pick]", "the N most likely next tokens (default 10); pick: choose them by hand",
            "Probabilities after the current penalties and filters (top_k, top_p, temperature, ...).\n"
            "With pick, type a row number, #id or a token's text to append that token; the chart then shows\n"
            "what follows it. Enter on an empty line ends picking; :undo takes a pick back.", cmd_probs),
    Command("n", ":n N", "N alternative continuations of the last prompt (the text stays as it is)", "", cmd_n),
    Command("reset", ":reset", "forget the running text and start afresh", "", cmd_reset),
    Command("undo", ":undo", "remove the last turn (your text and the model's)", "", cmd_undo),
    Command("regen", ":regen", "generate the last turn again", "", cmd_regen),
    Command("save", ":save FILE", "write the transcript, settings and model state as JSON", "", cmd_save),
    Command("load", ":load FILE", "continue a :save file exactly where it was put down", "", cmd_load),
    Command("eval", ":eval FILE", "perplexity of the loaded model on a text file (see textgen-eval)", "", cmd_eval),
    Command("model", ":model PATH", "switch to another model file (settings are kept; the text restarts)", "",
            cmd_model),
    Command("help", ":help [COMMAND]", "this list, or one command's details", "", cmd_help),
    Command("quit", ":quit", "leave (also :exit, Ctrl-D)", "", cmd_quit),
]
COMMANDS: dict[str, Command] = {command.name: command for command in _COMMAND_LIST}
COMMANDS["exit"] = COMMANDS["quit"]


def unique_commands() -> list[Command]:
    return list(_COMMAND_LIST)


def parse_command(line: str) -> tuple[Command, str]:
    """``:set temp 0.6`` -> (the set command, "temp 0.6"); ReplError for an unknown name."""
    body = line.strip()[1:] if line.strip().startswith(":") else line
    body = body.lstrip()
    name, _, arg = body.partition(" ")
    command = COMMANDS.get(name.lower())
    if command is None:
        raise ReplError(f"Unknown command ':{name}'. Type :help")
    return command, arg


# ------------------------------------------------------------------------------------------------ completion

SETTING_WORDS = sorted({*KEYS, *ALIASES, *LOOP_ALIASES})
_PATH_COMMANDS = ("save", "load", "model")


class ReplCompleter(Completer):
    """Completes command names after ':', setting keys after :set/:unset, presets after :sampler, command names
    after :help and file paths after :save/:load/:model."""

    def __init__(self) -> None:
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith(":") or "\n" in text:
            return
        name, space, rest = text[1:].partition(" ")
        if not space:
            yield from _matching(name, COMMANDS, prefix=":")
            return
        command = name.lower()
        if command in ("set", "unset") and " " not in rest:
            yield from _matching(rest, SETTING_WORDS)
        elif command == "sampler" and " " not in rest:
            yield from _matching(rest, PRESETS)
        elif command == "help" and " " not in rest:
            yield from _matching(rest, COMMANDS)
        elif command in _PATH_COMMANDS:
            yield from self._paths.get_completions(Document(rest, len(rest)), complete_event)


def _matching(word: str, candidates: Iterable[str], prefix: str = "") -> Iterator[Completion]:
    lowered = word.lower()
    for candidate in sorted(candidates):
        if candidate.startswith(lowered):
            yield Completion(prefix + candidate, start_position=-len(word) - len(prefix))
