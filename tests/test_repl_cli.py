"""textgen-repl as a command: non-interactive generation, --json, piped stdin, and one-line errors (subprocess).

Most tests use a hand-built "cycle" model: a char-level bigram table whose greedy text is ``[bold] [bold] ...``
and whose sampled text is random, so seeds matter and rich-markup look-alikes are in the output. It is written
with onnx.helper in milliseconds (no torch export).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from repl.cli import main
from runtime.modelfile import ModelInfo, SpecialTokens, StateSpec, encode_metadata
from runtime.session import OnnxModel

CYCLE = "[bold] "  # greedy output repeats this; every character in it is distinct, so a bigram table can
EXTRA_CHARS = "ROMEO:JULIET acefghijkmnpqrstuvwxyz"  # no newline: line-based checks stay simple
EOS, UNK = "<|endoftext|>", "<unk>"
REPO = Path(__file__).resolve().parents[1]


def cycle_tokenizer() -> Tokenizer:
    vocab = {EOS: 0, UNK: 1}
    for char in CYCLE + EXTRA_CHARS:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOS, UNK])
    return tokenizer


def write_cycle_model(path: Path, *, metadata: bool = True, generation: dict | None = None) -> Path:
    """A "gru" model file: logits = table[last token]; the state passes through unchanged.

    Every character's most likely successor is the next character of CYCLE (any other character leads to '['),
    with probability ~0.4 at temperature 1, so sampling wanders and greedy decoding prints ``[bold] [bold] ``."""
    tokenizer = cycle_tokenizer()
    vocab = tokenizer.get_vocab()
    size = len(vocab)
    table = np.zeros((size, size), dtype=np.float32)
    table[:, vocab["["]] = 3.0
    for char, successor in zip(CYCLE, CYCLE[1:] + CYCLE[0], strict=True):
        table[vocab[char]] = 0.0
        table[vocab[char], vocab[successor]] = 3.0
    table[:, [vocab[EOS], vocab[UNK]]] = -12.0  # practically never ends early: max_tokens decides the length
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0),
         helper.make_node("Identity", ["state.h"], ["state_out.h"])],
        "cycle",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("state.h", TensorProto.FLOAT, [1, "batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", size]),
         helper.make_tensor_value_info("state_out.h", TensorProto.FLOAT, [1, "batch", 4])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if metadata:
        info = ModelInfo(
            arch="gru", tokenizer_json=tokenizer.to_str(), special=SpecialTokens(eos=0, unk=1), vocab_size=size,
            context_length=0, state=(StateSpec("state.h", "state_out.h", (1, "batch", 4), batch_axis=1),),
            generation={"temperature": 1.0, "max_new_tokens": 40} if generation is None else generation,
            model_config={"hidden_size": 4, "num_layers": 1}, source={"fixture": "tests/test_repl_cli.py"},
        )
        for key, value in encode_metadata(info).items():
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def cycle_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cycle_model(tmp_path_factory.mktemp("cycle") / "cycle.onnx")


def run_cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "repl", "--device", "cpu", "--threads", "1", *args], input=stdin,
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ generation


def test_prompt_with_seed_is_reproducible(cycle_model):
    args = ("--model", str(cycle_model), "--prompt", "ROMEO:", "--max-tokens", "60")
    first = run_cli(*args, "--seed", "1")
    second = run_cli(*args, "--seed", "1")
    assert first.returncode == 0 and first.stderr == "", first
    assert first.stdout == second.stdout
    text = first.stdout.rstrip("\n")
    assert len(text) == 60 and set(text) <= set(CYCLE + EXTRA_CHARS)
    other = run_cli(*args, "--seed", "2").stdout
    assert other != first.stdout, "a different seed should give a different sample (~60 random draws)"


def test_greedy_text_is_printed_literally(cycle_model):
    result = run_cli("--model", str(cycle_model), "--prompt", "x", "--sampler", "greedy", "--max-tokens", "14")
    assert result.returncode == 0, result
    assert result.stdout == "[bold] [bold] \n"


def test_json_fields_and_text_decodes_from_tokens(cycle_model):
    result = run_cli("--model", str(cycle_model), "--prompt", "JULIET:", "--max-tokens", "25", "--seed", "7",
                     "--set", "temp=0.9", "--set", "top_k=5", "--json")
    assert result.returncode == 0, result
    record = json.loads(result.stdout)
    assert {"prompt", "text", "tokens", "n_tokens", "seconds", "tokens_per_s", "settings", "seed",
            "stop_reason"} <= set(record)
    assert record["prompt"] == "JULIET:" and record["seed"] == 7 and record["stop_reason"] == "max_tokens"
    assert record["n_tokens"] == len(record["tokens"]) == 25
    assert record["seconds"] > 0 and record["tokens_per_s"] > 0
    assert record["settings"]["temperature"] == 0.9 and record["settings"]["top_k"] == 5
    assert record["settings"]["max_new_tokens"] == 25
    model = OnnxModel.open(cycle_model, device="cpu", threads=1)
    assert model.decode(record["tokens"]) == record["text"]
    assert not record["text"].startswith("JULIET:")  # the continuation only


def test_json_matches_plain_output_for_the_same_seed(cycle_model):
    args = ("--model", str(cycle_model), "--prompt", "ab", "--max-tokens", "30", "--seed", "3")
    plain = run_cli(*args)
    record = json.loads(run_cli(*args, "--json").stdout)
    assert plain.stdout == record["text"] + "\n"


def test_real_lstm_json_decodes(model_files):
    result = run_cli("--model", str(model_files.lstm), "--prompt", "abc", "--max-tokens", "30", "--seed", "5",
                     "--json")
    assert result.returncode == 0, result
    record = json.loads(result.stdout)
    model = OnnxModel.open(model_files.lstm, device="cpu", threads=1)
    assert model.decode(record["tokens"]) == record["text"]
    assert record["stop_reason"] in ("eos", "max_tokens", "stop_sequence")
    assert 1 <= record["n_tokens"] <= 30


def test_n_samples(cycle_model):
    result = run_cli("--model", str(cycle_model), "--prompt", "a", "--max-tokens", "20", "--seed", "4",
                     "--n", "3", "--json")
    assert result.returncode == 0, result
    record = json.loads(result.stdout)
    samples = record["samples"]
    assert len(samples) == 3 and all(sample["n_tokens"] == 20 for sample in samples)
    assert len({sample["text"] for sample in samples}) > 1  # independent draws
    plain = run_cli("--model", str(cycle_model), "--prompt", "a", "--max-tokens", "20", "--seed", "4", "--n", "3")
    assert plain.stdout.count("--- sample ") == 3
    for sample in samples:
        assert sample["text"] in plain.stdout


def test_stdin_lines_each_get_a_generation(cycle_model):
    stdin = "ROMEO:\n\nJULIET:\n"
    result = run_cli("--model", str(cycle_model), "--sampler", "greedy", "--max-tokens", "7", stdin=stdin)
    assert result.returncode == 0, result
    # issue 17: each output under a "--- PROMPT ---" line, so successive outputs never run together
    assert result.stdout.splitlines() == ["--- ROMEO: ---", "[bold] ", "--- JULIET: ---", "[bold] "]
    records = run_cli("--model", str(cycle_model), "--max-tokens", "9", "--seed", "2", "--json", stdin=stdin)
    lines = [json.loads(line) for line in records.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["ROMEO:", "JULIET:"]
    assert all(line["n_tokens"] == 9 for line in lines)


def test_stdin_lines_are_independent(cycle_model):
    """Each piped line starts from an empty context: the same line twice gives the same text with a fixed seed."""
    result = run_cli("--model", str(cycle_model), "--max-tokens", "30", "--seed", "9", stdin="ab\nab\n")
    header, first, header_again, second = result.stdout.splitlines()
    assert header == header_again == "--- ab ---"
    assert first == second and len(first) == 30


def test_empty_stdin_prints_nothing(cycle_model):
    result = run_cli("--model", str(cycle_model), stdin="")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def test_output_file(cycle_model, tmp_path):
    target = tmp_path / "out.jsonl"
    result = run_cli("--model", str(cycle_model), "--max-tokens", "5", "--json", "--output", str(target),
                     stdin="a\nb\n")
    assert result.returncode == 0 and result.stdout == "", result
    lines = target.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == ["a", "b"]


def test_help_documents_piped_input():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "stdin piped" in result.stdout and "--json" in result.stdout and "--no-history" in result.stdout


def test_default_model_is_the_bundled_demo():
    demo = REPO / "repl" / "demo" / "demo.onnx"
    result = run_cli("--prompt", "a", "--max-tokens", "3", "--seed", "1")
    if demo.is_file():
        assert result.returncode == 0 and result.stdout.strip(), result
    else:
        assert_one_line_error(result, "demo model", "--model")


def test_repl_package_never_imports_torch():
    code = ("import sys, repl.cli, repl.app, repl.commands, runtime.session, runtime.generate; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


# ------------------------------------------------------------------------------------------------ errors


def test_missing_model(tmp_path):
    assert_one_line_error(run_cli("--model", str(tmp_path / "nope.onnx"), "--prompt", "a"), "not found")


def test_directory_as_model(tmp_path):
    assert_one_line_error(run_cli("--model", str(tmp_path), "--prompt", "a"), "not a file")


def test_corrupt_model(tmp_path, cycle_model):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf" * 50)
    assert_one_line_error(run_cli("--model", str(garbage), "--prompt", "a"), "garbage.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(cycle_model.read_bytes()[:1000])
    assert_one_line_error(run_cli("--model", str(truncated), "--prompt", "a"), "truncated.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli("--model", str(empty), "--prompt", "a"), "empty")


def test_onnx_file_that_is_not_a_textgen_model(tmp_path):
    plain = write_cycle_model(tmp_path / "plain.onnx", metadata=False)
    assert_one_line_error(run_cli("--model", str(plain), "--prompt", "a"), "not a textgen model file")


def test_bad_set_value_in_a_subprocess(cycle_model):
    assert_one_line_error(run_cli("--model", str(cycle_model), "--prompt", "a", "--set", "temp=-1"),
                          "temperature must be >= 0")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--set", "top_p=2"), "top_p must be in"),
        (("--set", "top_k=abc"), "top_k must be an integer"),
        (("--set", "bogus=1"), "unknown setting 'bogus'"),
        (("--set", "temp"), "KEY=VALUE"),
        (("--set", "stop=" + "x" * 1001), "stop takes at most"),
        (("--sampler", "wild"), "unknown sampler preset"),
        (("--max-tokens", "-5"), "max_new_tokens must be in"),
        (("--seed", "abc"), "seed must be an integer"),
        (("--threads", "0"), "--threads"),
        (("--device", "tpu"), "--device"),
        (("--no-such-flag",), "unrecognized arguments"),
    ],
)
def test_bad_arguments_are_one_line(cycle_model, capsys, args, fragment):
    """The same path as the command, in-process (fast): exit 2 and one `error:` line on stderr."""
    status = main(["--model", str(cycle_model), "--device", "cpu", "--prompt", "a", *args])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], captured.err


def test_a_prompt_of_only_unknown_words_is_one_line_exit_2(cycle_model, capsys):
    """Issue 16: the model would continue from nothing it knows; say so instead of generating."""
    status = main(["--model", str(cycle_model), "--device", "cpu", "--prompt", "€€ ЖЖ"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "every word of the prompt is outside the model's vocabulary" in lines[0]


def test_start_with_eos_switch_on_the_command_line(cycle_model):
    on = json.loads(run_cli("--model", str(cycle_model), "--prompt", "a", "--max-tokens", "3", "--json").stdout)
    off = json.loads(run_cli("--model", str(cycle_model), "--prompt", "a", "--max-tokens", "3", "--json",
                             "--set", "start_with_eos=off").stdout)
    assert on["settings"]["start_with_eos"] is True and off["settings"]["start_with_eos"] is False


def test_unwritable_output(cycle_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("--model", str(cycle_model), "--prompt", "a", "--output", str(blocker / "out.txt"))
    assert_one_line_error(result, "cannot write")


def test_session_flags_are_checked_before_work(cycle_model, tmp_path):
    assert_one_line_error(run_cli("--model", str(cycle_model), "--session", str(tmp_path / "s.json"), "--prompt",
                                  "x"), "--session and --autosave belong to the interactive REPL")
    assert_one_line_error(run_cli("--model", str(cycle_model), "--autosave", stdin=""),
                          "--session and --autosave belong to the interactive REPL")
