"""``textgen-repl --logprobs N --json`` on the bundled demo model: the records' shape and order, the drawn-from and
raw values recomputed independently, unchanged text, usage errors, and agreement with textgen-serve's engine."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from repl.cli import main
from runtime.generate import Session, document_start
from runtime.logprobs import NEG_INF_LOGPROB
from runtime.plan import new_plan
from runtime.sampling import SamplerChain
from runtime.session import OnnxModel
from runtime.settings import build_settings
from serve.engine import Engine, Job

DEMO = Path(str(resources.files("repl.demo") / "demo.onnx"))
PROMPT, SEED, TOKENS = "ROMEO:", 4, 30


@pytest.fixture(scope="module")
def demo() -> OnnxModel:
    return OnnxModel.open(DEMO, device="cpu", threads=1)


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["--prompt", PROMPT, "--max-tokens", str(TOKENS), "--seed", str(SEED), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def independent_log_softmax(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float64)
    top = values.max()
    return values - (top + math.log(np.exp(values - top).sum()))


def replay_logits(model: OnnxModel, context: list[int], generated: list[int]) -> np.ndarray:
    """The model's logits before each generated token, from one prefill of the whole sequence (not the REPL's
    step-by-step loop): row i predicts ``generated[i]``."""
    ids = np.array([context + generated[:-1]], dtype=np.int64)
    logits, _ = model.run_all(ids, model.initial_state(1), 0)
    return logits[0, len(context) - 1:]


def test_three_sorted_alternatives_per_token_all_log_probabilities(capsys) -> None:
    record = run_json(capsys, "--logprobs", "3")
    entries = record["logprobs"]
    assert [entry["id"] for entry in entries] == record["tokens"] and len(entries) == TOKENS
    assert "".join(entry["text"] for entry in entries) == record["text"]  # no eos / stop tokens here
    for entry in entries:
        top = entry["top"]
        assert len(top) == 3
        assert [alt["logprob"] for alt in top] == sorted((alt["logprob"] for alt in top), reverse=True)
        assert all(alt["logprob"] <= 0 and alt["raw_logprob"] <= 0 for alt in top)
        assert entry["logprob"] <= 0 and entry["raw_logprob"] <= 0
        assert top[0]["logprob"] >= entry["logprob"]
        chosen = [alt for alt in top if alt["id"] == entry["id"]]
        assert not chosen or chosen[0]["logprob"] == entry["logprob"]


def test_values_match_the_sampler_chain_and_an_independent_log_softmax(capsys, demo: OnnxModel) -> None:
    record = run_json(capsys, "--logprobs", "5")
    settings = build_settings(demo.info.generation, {"seed": SEED, "max_new_tokens": TOKENS})
    chain = SamplerChain(settings.sampler(), demo.info.vocab_size, demo.banned_ids)
    assert not chain.greedy and chain.step_names  # the demo's defaults sample through a real chain
    context = document_start(demo.encode(PROMPT), demo.info.special.eos, bool(settings.get("start_with_eos")))
    generated = record["tokens"]
    logits = replay_logits(demo, context, generated)
    for index, entry in enumerate(record["logprobs"]):
        history = context + generated[:index]
        drawn = chain.probabilities(logits[index][None, :], [history])[0]
        raw = independent_log_softmax(logits[index])
        assert entry["logprob"] == pytest.approx(math.log(drawn[entry["id"]]), abs=1e-4)
        assert entry["raw_logprob"] == pytest.approx(raw[entry["id"]], abs=1e-4)
        for alt in entry["top"]:
            expected = math.log(drawn[alt["id"]]) if drawn[alt["id"]] > 0 else NEG_INF_LOGPROB
            assert alt["logprob"] == pytest.approx(expected, abs=1e-4)
            assert alt["raw_logprob"] == pytest.approx(raw[alt["id"]], abs=1e-4)
        assert drawn[entry["id"]] > 0  # the chosen token was one the chain kept


def test_same_seed_same_text_with_and_without_logprobs(capsys) -> None:
    for extra in ([], ["--set", "mirostat=2"], ["--set", "dry_multiplier=0.8"]):
        plain = run_json(capsys, *extra)
        observed = run_json(capsys, *extra, "--logprobs", "20")
        assert (observed["text"], observed["tokens"]) == (plain["text"], plain["tokens"])
        assert "logprobs" not in plain and len(observed["logprobs"][0]["top"]) == 20


def test_greedy_reports_the_point_mass_it_draws_from(capsys) -> None:
    record = run_json(capsys, "--sampler", "greedy", "--logprobs", "2")
    for entry in record["logprobs"]:
        assert entry["logprob"] == 0.0
        first, second = entry["top"]
        assert first["id"] == entry["id"] and first["raw_logprob"] >= second["raw_logprob"]
        assert second["logprob"] == NEG_INF_LOGPROB  # removed: JSON has no -inf


def test_each_of_n_samples_has_its_own_records(capsys) -> None:
    record = run_json(capsys, "--n", "3", "--logprobs", "1")
    for sample in record["samples"]:
        assert [entry["id"] for entry in sample["logprobs"]] == sample["tokens"]
        assert all(len(entry["top"]) == 1 for entry in sample["logprobs"])
    # each alternative alone (its own seed) gives the same records
    second = record["samples"][1]
    alone = json.loads(subprocess_run("--prompt", PROMPT, "--max-tokens", str(TOKENS), "--seed", str(second["seed"]),
                                      "--json", "--logprobs", "1").stdout)
    assert alone["tokens"] == second["tokens"]
    for mine, theirs in zip(alone["logprobs"], second["logprobs"], strict=True):
        assert mine["logprob"] == pytest.approx(theirs["logprob"], abs=1e-5)
        assert mine["raw_logprob"] == pytest.approx(theirs["raw_logprob"], abs=1e-5)


def subprocess_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "repl", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    (["--logprobs", "21", "--json"], "--logprobs: expected an integer from 0 to 20, got 21"),
    (["--logprobs", "-1", "--json"], "--logprobs: expected an integer from 0 to 20, got -1"),
    (["--logprobs", "three", "--json"], "--logprobs: expected an integer from 0 to 20, got 'three'"),
    (["--logprobs", "3"], "--logprobs needs --json"),
    (["--logprobs", "3", "--json", "--set", "num_beams=2"], "--logprobs does not work with beam search"),
])
def test_bad_values_are_one_line_usage_errors(args: list[str], message: str) -> None:
    done = subprocess_run("--prompt", PROMPT, "--max-tokens", "3", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr


def test_the_server_engine_reports_the_same_records(capsys, demo: OnnxModel) -> None:
    record = run_json(capsys, "--logprobs", "3")
    settings = build_settings(demo.info.generation, {"seed": SEED, "max_new_tokens": TOKENS})
    prompt_ids = document_start(demo.encode(PROMPT), demo.info.special.eos, bool(settings.get("start_with_eos")))
    records, done = [], threading.Event()

    def collect(events: list) -> None:
        for event in events:
            if event[0] == "text":
                records.extend(event[3])
            elif event[0] in ("done", "error"):
                done.set()

    engine = Engine(demo, max_batch=2)
    engine.start()
    try:
        engine.submit(Job(prompt_ids, [new_plan(demo, settings)], collect, logprobs=3))
        assert done.wait(30)
    finally:
        engine.stop()
    assert [item.id for item in records] == record["tokens"]
    for served, mine in zip(records, record["logprobs"], strict=True):
        assert served.logprob == pytest.approx(mine["logprob"], abs=1e-5)
        assert served.raw_logprob == pytest.approx(mine["raw_logprob"], abs=1e-5)
        assert [alt.id for alt in served.top] == [alt["id"] for alt in mine["top"]]


def test_no_hook_no_extra_chain_pass(demo: OnnxModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default path never recomputes the distribution: the hook's cost is paid only when it is set."""
    calls = []
    original = SamplerChain.probabilities

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SamplerChain, "probabilities", counting)
    session = Session(demo, build_settings(demo.info.generation, {"seed": 1, "max_new_tokens": 5}))
    session.generate(PROMPT)
    session.generate_n(PROMPT, 2)
    assert calls == []
    seen = []
    session.generate(PROMPT, on_draw=lambda tokens, probs, logits, rows: seen.append((tokens, rows)))
    assert len(seen) == 5 and len(calls) == 5 and all(rows.tolist() == [0] for _, rows in seen)


def test_eval_json_rows_carry_each_samples_records_as_the_repl_reports_them(capsys) -> None:
    from repl.evaluate import main as eval_main

    assert eval_main(["--samples", "2", "--max-tokens", str(TOKENS), "--prompt", PROMPT, "--seed", "7", "--json",
                      "--logprobs", "3", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out)["sampling"]["rows"][0]
    assert len(row["samples"]) == 2
    for sample in row["samples"]:
        assert [entry["id"] for entry in sample["logprobs"]] == sample["tokens"]
        assert all(len(entry["top"]) == 3 and entry["logprob"] <= 0 for entry in sample["logprobs"])
    repl = run_json(capsys, "--seed", "8", "--logprobs", "3")  # sample i of seed S is the REPL's seed S + i
    second = row["samples"][1]
    assert (second["text"], second["tokens"]) == (repl["text"], repl["tokens"])
    for mine, theirs in zip(second["logprobs"], repl["logprobs"], strict=True):
        assert mine["logprob"] == pytest.approx(theirs["logprob"], abs=1e-5)
        assert [alt["id"] for alt in mine["top"]] == [alt["id"] for alt in theirs["top"]]


@pytest.mark.parametrize(("args", "message"), [
    (["--samples", "2", "--logprobs", "3"], "--logprobs needs --json and --samples N"),
    (["--samples", "2", "--json", "--logprobs", "21"], "--logprobs must be an integer from 0 to 20, got 21"),
    (["--samples", "2", "--json", "--logprobs", "-1"], "--logprobs must be an integer from 0 to 20, got -1"),
])
def test_eval_bad_logprobs_are_one_line_usage_errors(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "repl.evaluate", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
