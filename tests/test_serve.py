"""textgen-serve end to end: a live server process on 127.0.0.1 (a free port), driven with the official ``openai``
client and ``httpx``. Every server is stopped by its fixture; every wait is bounded."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from runtime.generate import Session
from runtime.session import OnnxModel
from runtime.settings import build_settings

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "repl" / "demo" / "demo.onnx"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    lines: queue.Queue  # stderr lines after the start-up line

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key=options.pop("api_key", "unused"), max_retries=0,
                             timeout=30, **options)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


@contextmanager
def running_server(*args: str) -> Iterator[Server]:
    command = [sys.executable, "-m", "serve", "--port", "0", "--device", "cpu", "--threads", "1", *args]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(process.stderr, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = None
        while url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("textgen-serve did not start in time") from None
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            url = found.group(1) if found else None
            assert process.poll() is None or url, f"textgen-serve exited: {line}"
        yield Server(process, url, lines)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def demo() -> Iterator[Server]:
    with running_server("--max-tokens-cap", "100000") as server:
        yield server


@pytest.fixture(scope="module")
def gpt_path(model_factory) -> Path:
    return model_factory("gpt", context=64)


@pytest.fixture(scope="module")
def gpt(gpt_path: Path) -> Iterator[Server]:
    with running_server("--model", str(gpt_path), "--max-batch", "8") as server:
        yield server


def library_text(path: Path, prompt: str, seed: int, max_tokens: int, **settings) -> str:
    """What the decode loop behind textgen-repl produces for one prompt on a fresh session."""
    model = OnnxModel.open(path, device="cpu", threads=1)
    values = {"seed": seed, "max_new_tokens": max_tokens, **settings}
    return Session(model, build_settings(model.info.generation, values)).generate(prompt).text


# ------------------------------------------------------------------------------------------------ completions


def test_completion_matches_textgen_repl_with_the_same_seed(demo: Server) -> None:
    repl = subprocess.run([sys.executable, "-m", "repl", "--prompt", "ROMEO:", "--seed", "7", "--max-tokens", "60",
                           "--json", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert repl.returncode == 0, repl.stderr
    expected = json.loads(repl.stdout)["text"]
    result = demo.client().completions.create(model="demo", prompt="ROMEO:", max_tokens=60, seed=7)
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 60
    assert result.usage.prompt_tokens == 1 + len("ROMEO:")  # the document-start token, then one per character


def test_concurrent_requests_each_match_the_library_on_gpt2(gpt: Server, gpt_path: Path) -> None:
    """Rows of different lengths share the left-padded KV batch; each still decodes as if alone."""
    cases = [("ab", 1), ("a bc\nd", 2), ("cab", 3), ("", 4), ("bbbbbbbbbbbbbbbbbbbb", 5), ("e", 6)]
    client = gpt.client()

    def ask(case: tuple[str, int]) -> str:
        prompt, seed = case
        return client.completions.create(model=gpt_path.stem, prompt=prompt, max_tokens=30, seed=seed,
                                         extra_body={"min_tokens": 30}).choices[0].text

    with ThreadPoolExecutor(len(cases)) as pool:
        texts = list(pool.map(ask, cases))
    expected = [library_text(gpt_path, prompt, seed, 30, min_new_tokens=30) for prompt, seed in cases]
    assert texts == expected
    assert len(set(texts)) == len(texts)


def test_streamed_chunks_join_to_the_plain_text(demo: Server) -> None:
    client = demo.client()
    body = {"model": "demo", "prompt": "JULIET:", "max_tokens": 400, "seed": 3, "extra_body": {"min_tokens": 400}}
    plain = client.completions.create(**body).choices[0].text
    chunks = list(client.completions.create(**body, stream=True))
    # streamed, not sent whole at the end (the tokens that pile up while the event loop waits for the GIL, a few
    # ms at a time, go out together, so a short fast stream may come in a handful of chunks)
    assert len(chunks) > 5
    assert "".join(chunk.choices[0].text for chunk in chunks) == plain
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_streams_send_a_chunk_per_stream_interval_and_a_lone_stream_every_token() -> None:
    interval = 0.2
    with running_server("--stream-interval", str(interval * 1000)) as server:
        client = server.client()
        body = {"model": "demo", "prompt": "JULIET:", "max_tokens": 150, "extra_body": {"min_tokens": 150}}
        lone = list(client.completions.create(**body, seed=1, stream=True))
        plains = [client.completions.create(**body, seed=seed).choices[0].text for seed in (1, 2)]
        streams: dict[int, list] = {}

        def read(seed: int) -> None:
            streams[seed] = list(client.completions.create(**body, seed=seed, stream=True))

        # a long stream already open makes the measured ones concurrent from their first token on: without it,
        # whichever starts first is alone for a moment and rightly gets a chunk per token
        endless = {**body, "max_tokens": 4096, "extra_body": {"min_tokens": 4096}}
        holder = client.completions.create(**endless, seed=3, stream=True)
        next(iter(holder))
        started = time.monotonic()
        threads = [threading.Thread(target=read, args=(seed,)) for seed in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - started
        holder.close()
    texts = [[chunk.choices[0].text for chunk in streams[seed] if chunk.choices[0].text] for seed in (1, 2)]
    assert ["".join(text) for text in texts] == plains
    lone_texts = [chunk.choices[0].text for chunk in lone if chunk.choices[0].text]
    assert "".join(lone_texts) == plains[0] and len(lone_texts) > 2 + elapsed / interval  # alone: no interval
    for text in texts:  # together: the first chunk at once, then at most one per interval
        assert len(text) <= 2 + elapsed / interval


def test_n_choices_are_independent_and_choice_0_is_the_seeded_one(demo: Server) -> None:
    client = demo.client()
    one = client.completions.create(model="demo", prompt="KING:", max_tokens=40, seed=11).choices[0].text
    three = client.completions.create(model="demo", prompt="KING:", max_tokens=40, seed=11, n=3)
    texts = [choice.text for choice in sorted(three.choices, key=lambda choice: choice.index)]
    assert texts[0] == one
    assert len(set(texts)) == 3
    assert three.usage.completion_tokens == 120


def test_prompt_list_gives_n_choices_per_prompt_in_order(demo: Server) -> None:
    result = demo.client().completions.create(model="demo", prompt=["A", "B"], max_tokens=5, seed=1, n=2)
    assert sorted(choice.index for choice in result.choices) == [0, 1, 2, 3]
    single = demo.client().completions.create(model="demo", prompt="B", max_tokens=5, seed=1)
    assert next(c for c in result.choices if c.index == 2).text == single.choices[0].text


def test_seed_reproduces_and_another_seed_differs(demo: Server) -> None:
    client = demo.client()
    texts = [client.completions.create(model="demo", prompt="Q", max_tokens=40, seed=seed).choices[0].text
             for seed in (5, 5, 6)]
    assert texts[0] == texts[1] != texts[2]


def test_stop_cuts_before_the_stop_string(demo: Server) -> None:
    client = demo.client()
    free = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=200, seed=2).choices[0].text
    stop = free[20:23]  # a string the unstopped text is known to contain
    cut = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=200, seed=2, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free[:free.index(stop)]
    streamed = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=200, seed=2, stop=stop,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == cut.text


def test_logprobs_openai_shape_with_raw_values_beside(demo: Server) -> None:
    result = demo.client().completions.create(model="demo", prompt="ROMEO:", max_tokens=30, seed=4, logprobs=3)
    choice = result.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs) == 30
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(30)]
    extra = logprobs.model_extra
    for token, value, top, raw in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs,
                                      extra["raw_token_logprobs"], strict=True):
        assert value <= 0 and raw <= 0
        assert len(top) == 3
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        assert value <= values[0] + 1e-12
        if token in top:
            assert top[token] == pytest.approx(value)


def test_greedy_logprobs_are_a_point_mass_with_the_model_value_beside(demo: Server) -> None:
    result = demo.client().completions.create(model="demo", prompt="ROMEO:", max_tokens=10, temperature=0,
                                              logprobs=2)
    logprobs = result.choices[0].logprobs
    assert logprobs.token_logprobs == [0.0] * 10
    assert all(-50 < raw < 0 for raw in logprobs.model_extra["raw_token_logprobs"])
    assert all(list(top.values())[1] == -9999.0 for top in logprobs.top_logprobs)


def test_echo_returns_the_prompt_and_its_logprobs(demo: Server) -> None:
    result = demo.client().completions.create(model="demo", prompt="ROMEO:", max_tokens=5, seed=1, echo=True,
                                              logprobs=1)
    choice = result.choices[0]
    assert choice.text.startswith("ROMEO:") and len(choice.text) > len("ROMEO:")
    assert choice.logprobs.tokens[:6] == list("ROMEO:")
    assert choice.logprobs.text_offset[:7] == list(range(7))


# ------------------------------------------------------------------------------------------------ chat and models


def test_chat_completion_plain_and_streamed(demo: Server) -> None:
    client = demo.client()
    messages = [{"role": "system", "content": "A play."}, {"role": "user", "content": "Who are you?"}]
    plain = client.chat.completions.create(model="demo", messages=messages, max_tokens=120, seed=9)
    text = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant"
    assert "\nUser:" not in text
    streamed = client.chat.completions.create(model="demo", messages=messages, max_tokens=120, seed=9, stream=True)
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == text
    # the documented template: what the same prompt gives through /v1/completions
    prompt = "A play.\n\nUser: Who are you?\nAssistant:"
    direct = client.completions.create(model="demo", prompt=prompt, max_tokens=120, seed=9, stop=["\nUser:"])
    assert direct.choices[0].text == text


def test_chat_logprobs_shape(demo: Server) -> None:
    result = demo.client().chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=10, seed=1, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert "".join(item.token for item in content) == result.choices[0].message.content
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
    assert all("raw_logprob" in item.model_extra for item in content)


def test_models_and_health(demo: Server) -> None:
    assert [model.id for model in demo.client().models.list()] == ["demo"]
    health = demo.health()
    assert health["status"] == "ok" and health["active_rows"] == 0


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("body", "status", "param"), [
    ('{"prompt": "a", "max_tokens": 5', 400, None),  # broken JSON
    ('{"prompt": 5}', 400, "prompt"),
    ('{"prompt": "a", "max_tokens": "many"}', 400, "max_tokens"),
    ('{"prompt": "a", "temperature": -3}', 400, "temperature"),
    ('{"prompt": "a", "n": 0}', 400, "n"),
    ('{"prompt": "a", "top_k": "x"}', 400, "top_k"),
    ('{"prompt": "a", "frobnicate": 1}', 400, "frobnicate"),
    ('{"prompt": "a", "min_p": 2}', 400, "min_p"),
    ('{"prompt": "a", "logit_bias": {"not-an-id": 5}}', 400, "logit_bias"),
    ('{"prompt": "a", "model": "gpt-4"}', 404, "model"),
    ('{"prompt": "a", "max_tokens": 100001}', 400, "max_tokens"),
    ('[1, 2]', 400, None),
])
def test_bad_requests_get_openai_errors(demo: Server, body: str, status: int, param: str | None) -> None:
    response = httpx.post(f"{demo.v1}/completions", content=body, headers={"Content-Type": "application/json"},
                          timeout=10)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param


def test_bad_chat_request_and_unknown_route(demo: Server) -> None:
    response = httpx.post(f"{demo.v1}/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = httpx.get(f"{demo.v1}/nothing-here")
    assert response.status_code == 404 and "error" in response.json()


def test_body_over_the_cap_is_413(demo: Server) -> None:
    response = httpx.post(f"{demo.v1}/completions", json={"prompt": "a" * (2 * 1024 * 1024)}, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_context_overflow_is_a_clear_400(gpt: Server, gpt_path: Path) -> None:
    too_long = httpx.post(f"{gpt.v1}/completions", json={"prompt": "ab" * 40, "max_tokens": 1})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    over = httpx.post(f"{gpt.v1}/completions", json={"prompt": "ab", "max_tokens": 62})
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    fits = gpt.client().completions.create(model=gpt_path.stem, prompt="ab", max_tokens=61, seed=1,
                                           extra_body={"min_tokens": 61})
    assert fits.usage.completion_tokens == 61


def test_openai_client_raises_its_own_error_types(demo: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        demo.client().completions.create(model="demo", prompt="a", temperature=-3)
    with pytest.raises(openai.NotFoundError):
        demo.client().completions.create(model="nope", prompt="a")


# ------------------------------------------------------------------------------------------------ faults


def _wait_idle(server: Server, seconds: float = 10) -> dict:
    deadline = time.monotonic() + seconds
    health = server.health()
    while health["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
        health = server.health()
    return health


def test_dropped_streaming_client_frees_its_row(demo: Server) -> None:
    before = _wait_idle(demo)["steps"]
    body = {"prompt": "ROMEO:", "max_tokens": 50000, "seed": 1, "stream": True}
    with httpx.Client(timeout=10) as client, client.stream("POST", f"{demo.v1}/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    after = _wait_idle(demo)
    assert after["active_rows"] == 0
    assert after["steps"] - before < 50000  # cancelled, not run to the end


def test_dropped_plain_client_frees_its_row(demo: Server) -> None:
    before = _wait_idle(demo)["steps"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{demo.v1}/completions", json={"prompt": "A", "max_tokens": 50000, "seed": 1}, timeout=0.5)
    after = _wait_idle(demo)
    assert after["active_rows"] == 0
    assert after["steps"] - before < 50000
    # and the server still answers
    assert demo.client().completions.create(model="demo", prompt="A", max_tokens=3, seed=1).choices[0].text


def test_api_key_and_sigterm_finish_streams_and_exit_0() -> None:
    with running_server("--api-key", "s3cret", "--max-tokens-cap", "100000") as server:
        assert httpx.get(f"{server.v1}/models").status_code == 401
        wrong = httpx.post(f"{server.v1}/completions", json={"prompt": "a"},
                           headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client().models.list()
        assert server.health()["status"] == "ok"  # health stays open for load balancers
        client = server.client(api_key="s3cret")
        stream = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=2000, seed=1, stream=True)
        first = next(iter(stream))
        server.process.send_signal(signal.SIGTERM)
        rest = list(stream)  # the running stream is finished (within --shutdown-timeout) before exit
        text = first.choices[0].text + "".join(chunk.choices[0].text for chunk in rest)
        assert rest[-1].choices[0].finish_reason == "length"
        assert len(text) > 1000
        assert server.process.wait(STOP_TIMEOUT_S) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = subprocess.run([sys.executable, "-m", "serve", "--model", str(tmp_path / "none.onnx"), "--port", "0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "none.onnx" in missing.stderr
    bad_set = subprocess.run([sys.executable, "-m", "serve", "--set", "temperature=-1", "--port", "0"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert bad_set.returncode == 2 and bad_set.stderr.startswith("error: temperature")
    with running_server() as server:
        port = server.url.rsplit(":", 1)[1]
        busy = subprocess.run([sys.executable, "-m", "serve", "--port", port], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env={**os.environ})
        assert busy.returncode == 2 and f"127.0.0.1:{port}" in busy.stderr


def test_chat_template_from_metadata_and_from_the_flag(model_files, edit_metadata, tmp_path: Path) -> None:
    template = {"user": "Q: {content}\n", "generation": "A:", "stop": ["\nQ:"]}
    path = edit_metadata(model_files.lstm, "chatty.onnx",
                         lambda meta: meta.update({"textgen.chat_template": json.dumps(template)}))
    flag_file = tmp_path / "template.json"
    flag_file.write_text(json.dumps({"user": "> {content}\n", "generation": "<", "stop": ["\n>"]}))
    messages = [{"role": "user", "content": "abc"}]
    for extra, prompt, stop in (([], "Q: abc\nA:", "\nQ:"), (["--chat-template", str(flag_file)], "> abc\n<", "\n>")):
        with running_server("--model", str(path), *extra) as server:
            client = server.client()
            chat = client.chat.completions.create(model="chatty", messages=messages, max_tokens=40, seed=2)
            direct = client.completions.create(model="chatty", prompt=prompt, max_tokens=40, seed=2, stop=[stop])
            assert chat.choices[0].message.content == direct.choices[0].text
    bad = subprocess.run([sys.executable, "-m", "serve", "--chat-template", str(tmp_path / "none.json"), "--port",
                          "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "none.json" in bad.stderr


def test_sigterm_cancels_streams_that_outlast_the_shutdown_timeout() -> None:
    with running_server("--max-tokens-cap", "1000000", "--shutdown-timeout", "1") as server:
        body = {"prompt": "ROMEO:", "max_tokens": 1000000, "seed": 1, "stream": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", f"{server.v1}/completions",
                                                                json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            try:
                rest: list[str] | None = list(lines)
            except httpx.HTTPError:  # the connection was cut mid-stream
                rest = None
            assert rest is None or "data: [DONE]" not in rest  # cancelled, not finished
        assert server.process.wait(STOP_TIMEOUT_S) == 0
        assert time.monotonic() - started < STOP_TIMEOUT_S
