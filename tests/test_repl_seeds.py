"""Issue 17 in the REPL's engine and CLI: every alternative of --n / :n has its own seed and that seed alone
reproduces it; unknown prompt characters are reported; prompt and generation timings are reported apart."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime.generate import Session
from runtime.plan import RowRandom, alternative_seed
from runtime.session import OnnxModel
from runtime.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "repl" / "demo" / "demo.onnx"


@pytest.fixture(scope="module")
def demo() -> OnnxModel:
    return OnnxModel.open(DEMO, device="cpu", threads=1)


def session(model: OnnxModel, **values: object) -> Session:
    settings = Settings(model.info.generation)
    for key, value in values.items():
        settings.set(key, value, source="cli")
    return Session(model, settings)


def test_row_random_draws_what_each_rows_own_generator_draws() -> None:
    rows = RowRandom([5, 9])
    first, second = np.random.default_rng(5), np.random.default_rng(9)
    for _ in range(3):
        assert rows.random(2).tolist() == [first.random(), second.random()]
    assert RowRandom([5]).random() == np.random.default_rng(5).random()
    with pytest.raises(ValueError, match="2 rows"):
        rows.random(3)


@pytest.mark.parametrize("sampler", [{}, {"top_k": 5, "top_p": 0.9}, {"repetition_penalty": 1.3, "min_p": 0.05}])
def test_each_alternative_is_reproduced_alone_by_its_seed(demo: OnnxModel, sampler: dict) -> None:
    alternatives = session(demo, seed=41, max_new_tokens=40, temperature=1.0, **sampler).generate_n("ROMEO:", 4)
    assert [result.seed for result in alternatives] == [alternative_seed(41, index) for index in range(4)]
    assert len({result.text for result in alternatives}) > 1
    for result in alternatives:
        alone = session(demo, seed=result.seed, max_new_tokens=40, temperature=1.0, **sampler).generate("ROMEO:")
        assert alone.text == result.text, result.seed


def test_seeds_do_not_depend_on_the_batch_size(demo: OnnxModel) -> None:
    whole = session(demo, seed=7, max_new_tokens=25).generate_n("JULIET:", 4)
    split = session(demo, seed=7, max_new_tokens=25).generate_n("JULIET:", 4, batch_size=3)
    assert [r.text for r in whole] == [r.text for r in split] and [r.seed for r in whole] == [r.seed for r in split]


def test_unknown_characters_are_one_warning_naming_them(demo: OnnxModel) -> None:
    notices: list[str] = []
    result = session(demo, seed=1, max_new_tokens=3).generate("Привет, мир — café, Привет", on_notice=notices.append)
    assert result.warnings == ["not in the model's vocabulary, read as unknown: П р и в е т м — é"]
    assert notices == result.warnings  # said once, however often the characters occur
    assert session(demo, seed=1, max_new_tokens=3).generate("ROMEO: hello").warnings == []


def test_prompt_and_generation_timings_are_reported_apart(demo: OnnxModel) -> None:
    prompt = "ROMEO: " * 300
    result = session(demo, seed=1, max_new_tokens=20).generate(prompt)
    assert result.prompt_fed == len(prompt) + 1  # the prompt's characters after the document-start token
    assert result.prompt_seconds > 0 and result.gen_seconds > 0
    assert result.prompt_seconds + result.gen_seconds == pytest.approx(result.seconds)
    assert result.tokens_per_s == pytest.approx(len(result.tokens) / result.gen_seconds)
    assert result.prompt_tokens_per_s == pytest.approx(result.prompt_fed / result.prompt_seconds)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "repl", "--model", str(DEMO), "--device", "cpu", "--threads", "1",
                           *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_cli_json_carries_each_seed_timings_and_warnings() -> None:
    many = run_cli("--prompt", "Café ROMEO:", "--n", "3", "--seed", "11", "--max-tokens", "30", "--json")
    assert many.returncode == 0, many.stderr
    record = json.loads(many.stdout)
    seeds = [sample["seed"] for sample in record["samples"]]
    assert seeds == [11, 12, 13]
    for sample in record["samples"]:
        assert sample["warnings"] == ["not in the model's vocabulary, read as unknown: é"]
        assert {"prompt_fed", "prompt_seconds", "prompt_tokens_per_s", "gen_seconds", "tokens_per_s"} <= set(sample)
    alone = json.loads(run_cli("--prompt", "Café ROMEO:", "--seed", str(seeds[2]), "--max-tokens", "30",
                               "--json").stdout)
    assert alone["text"] == record["samples"][2]["text"]
    plain = run_cli("--prompt", "Café ROMEO:", "--n", "2", "--seed", "11", "--max-tokens", "10")
    assert "--- sample 1/2 (seed 11) ---" in plain.stdout and "--- sample 2/2 (seed 12) ---" in plain.stdout
    assert plain.stderr.strip() == "note: not in the model's vocabulary, read as unknown: é"


def test_onnxruntime_load_errors_keep_their_cause_on_one_line(tmp_path: Path) -> None:
    """A foreign ONNX file of a newer IR version: onnxruntime's cause sits at the end of a long message; it must
    reach the user whole (it used to be cut off with '...')."""
    import onnx
    from onnx import TensorProto, helper

    from runtime.session import ModelLoadError

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    model.ir_version = 99
    path = tmp_path / "future.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError) as caught:
        OnnxModel.open(path, device="cpu")
    message = str(caught.value)
    assert "\n" not in message and not message.endswith("...")
    assert message.startswith(f"{path} is not a readable ONNX model") and "IR version" in message
    assert "99" in message


def test_a_failing_output_write_falls_back_and_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str],
                                                          disk_full: Callable[..., None]) -> None:
    """textgen-repl --output: generated text is never thrown away when its write fails (disk full, pretended)."""
    import os

    from repl.cli import main

    disk_full("out.txt")
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "out.txt"
    assert main(["--model", str(DEMO), "--device", "cpu", "--prompt", "ROMEO:", "--max-tokens", "12", "--seed", "4",
                 "--output", str(target)]) == 0
    fallback = tmp_path / f"out.recovered-{os.getpid()}.txt"
    err = capsys.readouterr().err.strip()
    assert err == (f"warning: could not write {target} (No space left on device); wrote the output to {fallback} "
                   "instead")
    assert len(fallback.read_text(encoding="utf-8").rstrip("\n")) == 12 and not target.exists()
