"""Acceptance of llama.cpp's samplers on the bundled demo model (repl/demo/demo.onnx): DRY makes greedy text
repeat less, --logit-bias e=-inf removes the letter, and bad values are one-line usage errors (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.generate import Session
from runtime.session import OnnxModel
from runtime.settings import build_settings

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "repl" / "demo" / "demo.onnx"
pytestmark = pytest.mark.skipif(not DEMO.is_file(), reason="the bundled demo model is not built")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "repl", "--device", "cpu", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO, stdin=subprocess.DEVNULL)


def distinct_word_4grams(text: str) -> float:
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return len(set(grams)) / len(grams)


@pytest.fixture(scope="module")
def demo() -> OnnxModel:
    return OnnxModel.open(DEMO, device="cpu", threads=1)


def greedy_text(model: OnnxModel, **extra: object) -> str:
    settings = build_settings(model.info.generation, {"temperature": 0, "max_new_tokens": 600, **extra})
    return Session(model, settings).generate("The king").text


def test_dry_makes_greedy_text_repeat_visibly_less(demo: OnnxModel) -> None:
    plain = distinct_word_4grams(greedy_text(demo))
    dry = distinct_word_4grams(greedy_text(demo, dry_multiplier=0.8))
    assert dry >= plain + 0.15, (plain, dry)


def test_logit_bias_minus_infinity_removes_the_character() -> None:
    args = ("--prompt", "The ", "--max-tokens", "200", "--seed", "3")
    assert "e" in run_cli(*args).stdout
    result = run_cli(*args, "--logit-bias", "e=-inf")
    assert result.returncode == 0 and len(result.stdout) > 100 and "e" not in result.stdout


def test_a_banned_string_never_appears() -> None:
    args = ("--prompt", "The ", "--max-tokens", "300", "--set", "temp=0")
    assert "seas" in run_cli(*args).stdout
    result = run_cli(*args, "--ban", "seas")
    assert result.returncode == 0 and "seas" not in result.stdout and len(result.stdout) > 200


@pytest.mark.parametrize(("args", "fragment"), [
    (("--set", "mirostat=3"), "mirostat must be one of 0, 1, 2"),
    (("--set", "xtc_probability=-1"), "xtc_probability must be in [0, 1]"),
    (("--set", "dry_base=0"), "dry_base must be >= 1"),
    (("--logit-bias", "e=lots"), "must be a number"),
    (("--logit-bias", "zz=1"), "'zz' is not one token"),
    (("--logit-bias", "e"), "--logit-bias expects TOKEN=BIAS"),
])
def test_bad_sampler_values_are_one_line_usage_errors(args: tuple[str, ...], fragment: str) -> None:
    result = run_cli("--prompt", "x", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in result.stderr
