"""In-process checks of REPL commands on the bundled demo model (no pty needed)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from repl.app import ReplApp
from runtime.evaluation import evaluate_perplexity
from runtime.session import OnnxModel
from runtime.settings import Settings

DEMO = "repl/demo/demo.onnx"


@pytest.fixture(scope="module")
def demo_model() -> OnnxModel:
    from importlib.resources import files

    return OnnxModel.open(files("repl.demo") / "demo.onnx", device="cpu")


def make_app(model: OnnxModel) -> tuple[ReplApp, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False, color_system=None)
    return ReplApp(model, Settings(model.info.generation), history=False, console=console), out


def test_eval_reports_the_same_perplexity_as_textgen_eval(demo_model, tmp_path):
    text = "ROMEO:\nWhat light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    path = tmp_path / "held.txt"
    path.write_text(text, encoding="utf-8")
    app, out = make_app(demo_model)
    app.handle(f":eval {path}")
    expected = evaluate_perplexity(demo_model, text)
    assert f"perplexity {expected.perplexity:.3f}" in out.getvalue()
    # a char model trained on Shakespeare does far better than uniform guessing over its vocabulary
    assert expected.perplexity < demo_model.info.vocab_size / 4
    assert math.isfinite(expected.bits_per_char)


def test_eval_bad_files_keep_the_session(demo_model, tmp_path):
    app, out = make_app(demo_model)
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00\xa0" * 10)
    app.handle(f":eval {tmp_path / 'missing.txt'}")
    app.handle(f":eval {binary}")
    app.handle(":eval")
    app.handle(":set temp 0.6")
    app.handle(":show")
    text = out.getvalue()
    assert "No such file" in text
    assert "cannot read" in text and "utf-8" in text
    assert "usage: :eval FILE" in text
    assert "Traceback" not in text
    assert "0.6" in text


def test_bundled_demo_model_is_a_small_char_lstm(demo_model):
    info = demo_model.info
    assert info.arch in ("lstm", "gru")
    assert info.context_length == 0
    assert demo_model.path.stat().st_size <= 5 * 1024 * 1024
    assert demo_model.decode(demo_model.encode("ROMEO:\n")) == "ROMEO:\n"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception, on purpose
def test_a_ctrl_c_whose_exception_is_lost_still_stops_the_turn(demo_model):
    """Python drops an exception raised inside a finalizer ("Exception ignored in ..."), so a Ctrl-C landing
    there must still stop the generation: the REPL's SIGINT handler remembers it and the next text piece stops the
    turn, which keeps its text and reports 'interrupted'. The handler is the REPL's own even where SIGINT was
    inherited as ignored (a background job), so this also holds there."""
    import os
    import signal

    app, out = make_app(demo_model)
    app.handle(":set max_tokens 100000")
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run in the background (nohup, CI)
    written = []
    original_write = ReplApp.write_text

    def write_and_lose_a_ctrl_c(self: ReplApp, text: str) -> None:
        written.append(text)
        if len(written) == 20:
            class Finalized:
                def __del__(self) -> None:
                    os.kill(os.getpid(), signal.SIGINT)  # delivered here: the KeyboardInterrupt is dropped

            Finalized()
        original_write(self, text)

    app.write_text = write_and_lose_a_ctrl_c.__get__(app)
    app.handle("ROMEO:")
    assert 20 <= len(written) < 100
    assert " · interrupted" in out.getvalue()
    assert signal.getsignal(signal.SIGINT) is before  # restored after the input


@pytest.mark.parametrize(("source", "label"), [
    ({"checkpoint": "x.bin"}, "fp32"),
    ({"quantized": {"mode": "int8"}}, "int8"),
    ({"quantized": {"mode": "fp16", "method": "..."}}, "fp16"),
    ({"quantized": {"mode": "<script>"}}, "quantized"),  # untrusted metadata is not echoed
    ({"quantized": "int4"}, "quantized"),
])
def test_the_header_names_the_weight_format_from_the_source_metadata(source: dict, label: str) -> None:
    from repl.app import weight_format

    assert weight_format(source) == label


def test_bias_unbias_and_ban_commands_change_the_sampler_and_bad_tokens_are_undone(demo_model):
    app, out = make_app(demo_model)
    app.handle(":bias e -inf")
    app.handle(":bias #5 2")
    assert json.loads(app.settings.get("logit_bias")) == {"e": "-inf", "#5": 2.0}
    app.handle(":bias zz 1")  # not one token of the demo's vocabulary: reported, and the old value stays
    assert "'zz' is not one token" in out.getvalue()
    assert json.loads(app.settings.get("logit_bias")) == {"e": "-inf", "#5": 2.0}
    app.handle(":unbias #5")
    assert json.loads(app.settings.get("logit_bias")) == {"e": "-inf"}
    app.handle(":ban the")
    assert json.loads(app.settings.get("ban")) == ["the"]
    app.handle(":set temp 0")
    text = app.session.generate("The ").text
    assert "e" not in text and "the" not in text and len(text) > 50
    app.handle(":unbias")
    assert app.settings.get("logit_bias") == "{}"
    app.handle(":set mirostat 3")
    assert "mirostat must be one of 0, 1, 2" in out.getvalue()


def test_show_lists_the_new_settings_with_their_source_and_help_set_explains_every_key(demo_model):
    from runtime.settings import KEYS, SETTING_HELP

    assert set(SETTING_HELP) == set(KEYS)
    app, out = make_app(demo_model)
    app.handle(":set dry_multiplier 0.8")
    app.handle(":show")
    shown = out.getvalue()
    for key in ("dry_multiplier", "xtc_probability", "mirostat", "top_n_sigma", "dynatemp_range", "logit_bias"):
        assert key in shown
    assert any("dry_multiplier" in line and "0.8" in line and "set" in line for line in shown.splitlines())
    app.handle(":help set")
    assert SETTING_HELP["xtc_threshold"] in out.getvalue()


def _continued_text(app: ReplApp) -> str:
    return app.session.generate("\nJULIET:").text


def test_a_loaded_session_continues_exactly_as_an_uninterrupted_one(demo_model, tmp_path):
    """:save then :load (in another app) and the next sampled text, same seed, is identical to the session that
    never stopped; the state itself comes back, not a re-feed (same model file)."""
    uninterrupted, _ = make_app(demo_model)
    first, out = make_app(demo_model)
    for app in (uninterrupted, first):
        app.handle(":set seed 7")
        app.handle(":set max_tokens 80")
        app.session.generate("ROMEO:")
        app.session.generate("")  # a turn that continues the text (pending token fed with nothing)
    expected = _continued_text(uninterrupted)
    saved = tmp_path / "chat.json"
    first.handle(f":save {saved}")
    document = json.loads(saved.read_text(encoding="utf-8"))
    assert document["version"] == 2 and document["state"] and document["history"] == first.session.history
    second, out = make_app(demo_model)
    second.handle(f":load {saved}")
    assert "re-feeding" not in out.getvalue()
    assert second.session.history == first.session.history
    assert second.settings.get("seed") == 7 and second.settings.get("max_new_tokens") == 80
    assert _continued_text(second) == expected
    second.handle(":undo")  # turns came back: undo re-feeds from the turn's window start
    assert len(second.session.turns) == 2


def test_a_session_from_another_model_file_is_re_fed_with_a_message(demo_model, tmp_path, edit_metadata):
    from importlib.resources import files

    first, _ = make_app(demo_model)
    first.handle(":set seed 3")
    first.session.generate("ROMEO:")
    saved = tmp_path / "chat.json"
    first.handle(f":save {saved}")
    other_path = edit_metadata(Path(str(files("repl.demo") / "demo.onnx")), "other.onnx",
                               lambda meta: meta.update({"textgen.note": "another file"}))
    other, out = make_app(OnnxModel.open(other_path, device="cpu"))
    other.handle(f":load {saved}")
    assert "another model file" in out.getvalue() and "re-feeding" in out.getvalue()
    assert other.session.history == first.session.history
    assert other.session.generate("x").tokens  # it goes on


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(history=[1, 2, "x"]), "'history' must be a list of token ids"),
    (lambda d: d.update(history=[10**9]), "outside this model's vocabulary"),
    (lambda d: d["state"][next(iter(d["state"]))].update(data="!!"), "not base64"),
    (lambda d: d["state"][next(iter(d["state"]))].update(shape=[1, 2]), "do not make an array"),
    (lambda d: d["state"][next(iter(d["state"]))].update(dtype="object"), "dtype float32 or float16"),
    (lambda d: d.update(fed={"start": 0, "end": 10**6}), "fed range"),
])
def test_a_tampered_session_file_is_a_clear_error_and_the_session_goes_on(demo_model, tmp_path, change, message):
    app, out = make_app(demo_model)
    app.session.generate("ROMEO:")
    saved = tmp_path / "chat.json"
    app.handle(f":save {saved}")
    document = json.loads(saved.read_text(encoding="utf-8"))
    change(document)
    saved.write_text(json.dumps(document), encoding="utf-8")
    history = list(app.session.history)
    app.handle(f":load {saved}")
    assert message in out.getvalue() and "Traceback" not in out.getvalue()
    assert app.session.history == history
