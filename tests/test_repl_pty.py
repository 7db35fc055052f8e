"""The interactive REPL in a real pseudo-terminal (pexpect): commands, bad input, Ctrl-C, Ctrl-D, :save/:load.

The terminal output is full of prompt_toolkit/rich escape sequences, so Terminal strips them and matches on the
plain text; every wait has a generous timeout and looks for strings the app prints itself. Models are the
"cycle" model from test_repl_cli (greedy text ``[bold] [bold] ...``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pexpect
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_repl_cli import REPO, write_cycle_model  # noqa: E402

from runtime.settings import KEYS  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Za-z0-9]|\x1b[=>78]|[\x08\x07]")
WAIT = 30.0
CPR_REQUEST = "\x1b[6n"


class Terminal:
    """A REPL process in a pty; ``expect`` searches the escape-free output after the previous match."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.child = pexpect.spawn(sys.executable, ["-m", "repl", *args], env=env, cwd=str(REPO),
                                   encoding="utf-8", codec_errors="replace", dimensions=(40, 150), timeout=WAIT)
        self.raw = ""
        self.position = 0
        self.answered = 0

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def _read(self) -> bool:
        """Read what is available; False once the process has closed the terminal."""
        try:
            self.raw += self.child.read_nonblocking(1 << 16, timeout=0.2)
        except pexpect.TIMEOUT:
            return True
        except pexpect.EOF:
            return False
        # Answer cursor-position requests as a terminal would: prompt_toolkit then knows the screen height and
        # draws the bottom toolbar.
        requests = self.raw.count(CPR_REQUEST)
        for _ in range(requests - self.answered):
            self.child.send("\x1b[1;1R")
        self.answered = requests
        return True

    def expect(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.text[self.position:])
            if match:
                self.position += match.end()
                return match
            alive = self._read()
            if not alive or time.monotonic() > deadline:
                match = re.search(pattern, self.text[self.position:])
                if match:
                    self.position += match.end()
                    return match
                state = "timed out" if alive else "the process ended"
                raise AssertionError(f"{state} waiting for {pattern!r}; output ends: {self.text[-1500:]!r}")

    def expect_exact(self, fragment: str, timeout: float = WAIT) -> re.Match[str]:
        return self.expect(re.escape(fragment), timeout)

    def command(self, line: str, answer: str) -> None:
        """Send a line and wait for a literal fragment of the answer."""
        self.child.sendline(line)
        self.expect_exact(answer)

    def wait_for_prompt(self) -> None:
        """The bottom toolbar is drawn once prompt_toolkit owns the terminal (raw mode: Ctrl-C is a key)."""
        self.expect(r"CPUExecutionProvider │ temp ")

    def quit(self) -> int:
        """Ctrl-D at the next prompt; the exit status, after checking no traceback was ever printed."""
        self.wait_for_prompt()
        self.child.sendeof()
        deadline = time.monotonic() + WAIT
        while self._read():
            if time.monotonic() > deadline:
                raise AssertionError(f"still running {WAIT:.0f} s after Ctrl-D; output ends: {self.text[-1500:]!r}")
        self.child.close()
        assert "Traceback" not in self.text, self.text[-3000:]
        return self.child.exitstatus


@pytest.fixture(scope="module")
def cycle_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cycle_model(tmp_path_factory.mktemp("pty") / "cycle.onnx")


@pytest.fixture
def repl_env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("XDG_", "NO_COLOR"))}
    env.update(TERM="xterm", HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "state"),
               PYTHONPATH=str(REPO), COLUMNS="150", LINES="40")
    return env


@pytest.fixture
def start(cycle_model, repl_env):
    terminals: list[Terminal] = []

    def spawn(*args: str, model: Path | None = None) -> Terminal:
        terminal = Terminal(["--model", str(model or cycle_model), "--device", "cpu", "--threads", "1", *args],
                            repl_env)
        terminal.expect_exact("Type :help")
        terminals.append(terminal)
        return terminal

    yield spawn
    for terminal in terminals:
        if terminal.child.isalive():
            terminal.child.terminate(force=True)


# ------------------------------------------------------------------------------------------------ tests


def test_set_then_show_and_ctrl_d_exits_zero(start, cycle_model):
    term = start()
    header = term.text
    assert str(cycle_model) in header and "gru" in header and "CPUExecutionProvider" in header
    term.command(":set temp 0.6", "temperature = 0.6")
    term.child.sendline(":show")
    term.expect(r"temperature\s+0\.6\s+set")
    term.expect(r"top_k\s+50\s+default")
    term.expect(r"max_new_tokens\s+40\s+model")  # the model file's default, marked as such
    term.command(":unset temp", "temperature back to 1 (model)")
    assert term.quit() == 0


def test_bad_command_and_bad_values_leave_the_session_alive(start):
    term = start()
    term.command(":frobnicate", "Unknown command ':frobnicate'. Type :help")
    term.command(":set temp 0.5", "temperature = 0.5")  # the next command works
    bad_values = {
        "temperature": ("-1", "temperature must be >= 0"),
        "top_k": ("abc", "top_k must be an integer"),
        "top_p": ("2", "top_p must be in (0, 1]"),
        "min_p": ("1.5", "min_p must be in [0, 1]"),
        "typical_p": ("0", "typical_p must be in (0, 1]"),
        "repetition_penalty": ("0", "repetition_penalty must be > 0"),
        "presence_penalty": ("abc", "presence_penalty must be a number"),
        "frequency_penalty": ("inf", "frequency_penalty must be a finite number"),
        "penalty_last_n": ("-2", "penalty_last_n must be an integer >= -1"),
        "no_repeat_ngram_size": ("-1", "no_repeat_ngram_size must be an integer >= 0"),
        "order": ("bogus", "unknown step 'bogus'"),
        "seed": ("abc", "seed must be an integer"),
        "max_new_tokens": ("-5", "max_new_tokens must be in [0, 1000000]"),
        "min_new_tokens": ("x", "min_new_tokens must be an integer"),
        "num_beams": ("0", "num_beams must be in [1, 64]"),
        "start_with_eos": ("maybe", "start_with_eos must be on or off"),
        "suppress_unk": ("2", "suppress_unk must be on or off"),
        "dry_multiplier": ("-1", "dry_multiplier must be >= 0"),
        "dry_base": ("0.5", "dry_base must be >= 1"),
        "dry_allowed_length": ("0", "dry_allowed_length must be an integer >= 1"),
        "dry_penalty_last_n": ("-3", "dry_penalty_last_n must be an integer >= -1"),
        "dry_sequence_breakers": ("[1]", "dry_sequence_breakers must be a list of strings"),
        "xtc_probability": ("2", "xtc_probability must be in [0, 1]"),
        "xtc_threshold": ("-0.1", "xtc_threshold must be in [0, 1]"),
        "top_n_sigma": ("abc", "top_n_sigma must be a number"),
        "dynatemp_range": ("-1", "dynatemp_range must be >= 0"),
        "dynatemp_exponent": ("0", "dynatemp_exponent must be > 0"),
        "mirostat": ("3", "mirostat must be one of 0, 1, 2"),
        "mirostat_tau": ("0", "mirostat_tau must be > 0"),
        "mirostat_eta": ("2", "mirostat_eta must be in (0, 1]"),
        "logit_bias": ('{"e": "x"}', "must be a number"),
        "ban": ("[1", "ban: not a JSON list of strings"),
    }
    assert set(KEYS) - set(bad_values) == {"stop"}  # every key is covered (stop's limit: see test_repl_cli)
    for key, (value, message) in bad_values.items():
        term.command(f":set {key} {value}", message)
    term.command(":set top_p 2", "top_p must be in (0, 1]")  # aliases and the brief's examples
    term.command(":set temp -1", "temperature must be >= 0")
    term.command(":set rep_penalty 0", "repetition_penalty must be > 0")
    term.command(":set wibble 3", "unknown setting 'wibble'")
    term.command(":set temp", "usage: :set KEY VALUE")
    term.command(":sampler wild", "unknown sampler preset 'wild'")
    term.command(":probs many", "usage: :probs [N]")
    term.command(":load /definitely/not/here.json", "no such file")
    term.child.sendline(":show")
    term.expect(r"temperature\s+0\.5\s+set")  # nothing above changed a value
    assert term.quit() == 0


def test_generated_markup_is_printed_literally(start):
    term = start("--sampler", "greedy", "--max-tokens", "21")
    term.child.sendline("x")
    term.expect_exact("[bold] [bold] [bold]")
    term.expect(r"21 tokens · [\d.]+ tok/s · max_tokens")
    assert term.quit() == 0


def test_ctrl_c_stops_a_long_generation_and_the_session_goes_on(start):
    term = start("--set", "max_tokens=1000000", "--sampler", "greedy")
    term.child.sendline("go")
    term.expect_exact("[bold] [bold] [bold] [bold]")
    term.child.sendintr()
    match = term.expect(r"(\d+) tokens · [\d.]+ tok/s · interrupted")
    assert 0 < int(match.group(1)) < 1_000_000
    term.command(":set max_tokens 7", "max_new_tokens = 7")
    term.child.sendline("")  # an empty line continues the text
    term.expect(r"7 tokens · [\d.]+ tok/s · max_tokens")
    term.wait_for_prompt()
    term.child.sendintr()  # Ctrl-C at an empty prompt explains how to leave
    term.expect_exact("To exit, type :quit or press Ctrl-D")
    term.command(":undo", "removed the last turn")
    assert term.quit() == 0


def test_probs_alternatives_save_and_load(start, tmp_path):
    term = start("--max-tokens", "12", "--seed", "5")
    term.command(":sampler greedy", "sampler greedy")
    term.child.sendline("RO")
    term.expect(r"12 tokens · [\d.]+ tok/s · max_tokens")
    term.command(":probs 4", "next token (top 4)")
    # after "[bold" the cycle's next character has e^3 / (e^3 + 38) of the probability (41 ids, eos/unk ~0)
    term.expect(r'1\s+"\]"\s+34\.58%\s+█{30}')
    term.command(":set temp 1", "temperature = 1")
    term.child.sendline(":n 3")
    for index in (1, 2, 3):
        term.expect_exact(f"alternative {index}/3")
        term.expect(r"12 tokens · [\d.]+ tok/s · max_tokens")
    saved = tmp_path / "chat.json"
    term.command(f":save {saved}", "saved 1 turns")
    document = json.loads(saved.read_text(encoding="utf-8"))
    assert document["transcript"][0]["prompt"] == "RO"
    assert document["transcript"][0]["text"] == "[bold] [bold"
    assert document["settings"]["max_new_tokens"] == 12 and document["settings"]["temperature"] == 1.0

    term.command(":reset", "context cleared")
    term.command(":set top_k 3", "top_k = 3")
    term.command(f":load {saved}", "settings restored, 1 turns replayed")
    term.child.sendline(":show")
    term.expect(r"top_k\s+50\s+default")  # :load brought back the saved settings, not the later :set
    term.command(":save " + str(tmp_path / "again.json"), "saved 1 turns")
    again = json.loads((tmp_path / "again.json").read_text(encoding="utf-8"))
    assert again["transcript"] == document["transcript"]
    term.command(":undo", "removed the last turn")
    term.command(":undo", "nothing to undo")
    assert term.quit() == 0


def test_multiline_block_completion_history_and_model_switch(start, tmp_path, repl_env):
    other = write_cycle_model(tmp_path / "other.onnx", generation={"temperature": 0.7})
    term = start("--sampler", "greedy", "--max-tokens", "3")
    term.child.sendline('"""')
    term.child.sendline("ab")
    term.child.sendline('cd"""')
    term.expect(r"3 tokens · [\d.]+ tok/s · max_tokens")
    term.child.send(":sam\t")  # tab completion of a command name
    term.child.sendline(" beam")
    term.expect_exact("sampler beam")
    saved = tmp_path / "block.json"
    term.command(f":save {saved}", "saved 1 turns")
    assert json.loads(saved.read_text(encoding="utf-8"))["transcript"][0]["prompt"] == "ab\ncd"
    term.command(f":model {other}", "settings kept")
    term.child.sendline(":show")
    term.expect(r"num_beams\s+4\s+set")
    term.command(":help probs", "the N most likely next tokens")
    assert term.quit() == 0
    history = Path(repl_env["XDG_STATE_HOME"]) / "textgen" / "history"
    assert ":sampler beam" in history.read_text(encoding="utf-8")


def test_no_history_writes_nothing(start, repl_env):
    term = start("--no-history")
    term.command(":set top_k 9", "top_k = 9")
    term.command(":quit", "")
    term.child.expect(pexpect.EOF)
    term.child.close()
    assert term.child.exitstatus == 0
    assert not (Path(repl_env["XDG_STATE_HOME"]) / "textgen" / "history").exists()


def test_demo_model_stop_regen_eval_and_traceback_free(start, tmp_path):
    """The bundled demo model in a real terminal: stop sequences, :regen, :eval, then Ctrl-D."""
    demo = REPO / "repl" / "demo" / "demo.onnx"
    term = start("--seed", "3", "--max-tokens", "300", model=demo)
    assert "lstm" in term.text
    term.command(":stop ,", "stop sequences")  # stop at the first comma
    term.child.sendline("ROMEO:")
    term.expect(r"(\d+) tokens · [\d.]+ tok/s · stop_sequence")
    term.command(":regen", "tok/s")
    held = tmp_path / "held.txt"
    held.write_text("JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n", encoding="utf-8")
    term.command(f":eval {held}", "perplexity")
    term.command(":unset stop", "stop")
    term.child.sendline(":show")
    term.expect(r"stop\s+\[\]\s+default")
    assert term.quit() == 0
    assert "Traceback" not in term.text


def test_unknown_prompt_characters_are_named_once_per_turn_and_timings_are_split(start, tmp_path):
    """Issue 17: 'Привет, мир — café' to the demo model names its unknown characters in one dim line (once,
    however often they occur), the status line splits prompt processing from generation, and each :n
    alternative shows its own seed."""
    demo = REPO / "repl" / "demo" / "demo.onnx"
    term = start("--max-tokens", "5", "--seed", "3", model=demo)
    term.child.sendline("Привет, мир — café, Привет")
    term.expect_exact("not in the model's vocabulary, read as unknown: П р и в е т м — é")
    term.expect(r"5 tokens · [\d.]+ tok/s · max_tokens · prompt \d+ tokens in \d+ ms \(\d+ tok/s\)")
    assert term.text.count("not in the model's vocabulary") == 1
    term.expect(r"prompt \d+ tok, \d+ tok/s · gen 5 tok, [\d.]+ tok/s")  # the toolbar
    term.child.sendline(":n 2")
    for index in (1, 2):
        term.expect_exact(f"alternative {index}/2")
        term.expect(rf"seed {3 + index - 1}\b")
    assert term.quit() == 0


def test_probs_pick_mode_appends_tokens_by_hand(start):
    """:probs alone stays a chart; :probs N pick numbers the rows, appends what the user picks (a row number or
    a token's text) and shows what follows, until an empty answer; the session then goes on after the picks."""
    term = start("--max-tokens", "6", model=REPO / "repl" / "demo" / "demo.onnx")
    term.command(":sampler greedy", "sampler greedy")
    term.child.sendline("ROMEO")
    term.expect(r"6 tokens · [\d.]+ tok/s · max_tokens")
    term.command(":probs 3", "next token (top 3)")
    term.wait_for_prompt()
    assert "pick # or token" not in term.text
    term.child.sendline(":probs 5 pick")
    term.expect(r'next token \(top 5\) after "[^"]*"')
    first = term.expect(r'\n\s+1\s+("[^"]+")\s+\d')
    term.expect_exact("pick # or token (Enter ends):")
    term.child.sendline("1")
    term.expect_exact(f"picked {first.group(1)}")
    term.expect_exact("pick # or token (Enter ends):")
    term.child.sendline("Q")  # a token by its text, wherever it ranks
    term.expect_exact('picked "Q"')
    term.expect(r'after "[^"]*Q"')
    term.expect_exact("pick # or token (Enter ends):")
    term.child.sendline("99")
    term.expect_exact("pick a row 1..5")
    term.wait_for_prompt()
    term.child.sendline(":probs pick")
    term.expect_exact("pick # or token (Enter ends):")
    term.child.sendline("")
    term.wait_for_prompt()
    term.child.sendline("")  # an empty line: the model goes on from the picked text
    term.expect(r"6 tokens · [\d.]+ tok/s · max_tokens")
    term.command(":undo", "removed the last turn")
    term.command(":undo", "removed the last turn")  # the pick of "Q" is a turn of its own
    assert term.quit() == 0


def test_session_put_down_and_picked_up_continues_as_if_never_stopped(start, tmp_path):
    """--session FILE --autosave saves on Ctrl-D; --session FILE resumes (seed and all), and the next turn's text
    is the text of a session that never stopped; :save / :load in between changes nothing."""
    demo = REPO / "repl" / "demo" / "demo.onnx"
    stored, resumed_save, straight_save = tmp_path / "s.json", tmp_path / "a.json", tmp_path / "b.json"
    first = start("--seed", "5", "--max-tokens", "30", "--session", str(stored), "--autosave", model=demo)
    first.child.sendline("ROMEO:")
    first.expect(r"30 tokens · [\d.]+ tok/s · max_tokens")
    assert first.quit() == 0
    assert "session saved to" in first.text and json.loads(stored.read_text(encoding="utf-8"))["version"] == 2

    second = start("--session", str(stored), model=demo)
    second.expect_exact("resumed")
    second.command(f":save {tmp_path / 'mid.json'}", "saved 1 turns")
    second.command(f":load {tmp_path / 'mid.json'}", "settings restored")
    second.child.sendline("JULIET:")
    second.expect(r"30 tokens · [\d.]+ tok/s · max_tokens")
    second.command(f":save {resumed_save}", "saved 2 turns")
    assert second.quit() == 0

    straight = start("--seed", "5", "--max-tokens", "30", model=demo)
    for prompt in ("ROMEO:", "JULIET:"):
        straight.child.sendline(prompt)
        straight.expect(r"30 tokens · [\d.]+ tok/s · max_tokens")
    straight.command(f":save {straight_save}", "saved 2 turns")
    assert straight.quit() == 0
    resumed = json.loads(resumed_save.read_text(encoding="utf-8"))
    uninterrupted = json.loads(straight_save.read_text(encoding="utf-8"))
    assert [turn["text"] for turn in resumed["transcript"]] == [turn["text"] for turn in uninterrupted["transcript"]]
    assert resumed["history"] == uninterrupted["history"] and resumed["state"] == uninterrupted["state"]
