"""serve/engine.py in-process: rows join and leave a GPT-2 batch of different lengths without leaking rows or
cache columns, cancelled jobs leave at once, and each row decodes as the library's Session does alone."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from runtime.generate import Session, document_start
from runtime.plan import new_plan
from runtime.session import OnnxModel
from runtime.settings import build_settings
from serve.engine import Engine, Job


class Collector:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.done = threading.Event()

    def __call__(self, events: list) -> None:
        self.events.extend(events)
        if any(event[0] in ("done", "error") for event in events):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(event[2] for event in self.events if event[0] == "text")


@pytest.fixture
def gpt(model_factory) -> OnnxModel:
    return OnnxModel.open(model_factory("gpt", context=64), device="cpu", threads=1)


def _job(model: OnnxModel, prompt: str, tokens: int, seed: int) -> tuple[Job, Collector]:
    settings = build_settings(model.info.generation, {"seed": seed, "max_new_tokens": tokens,
                                                      "min_new_tokens": tokens})
    collector = Collector()
    ids = document_start(model.encode(prompt), model.info.special.eos)
    return Job(ids, [new_plan(model, settings)], collector), collector


def _wait(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_long_row_leaving_cuts_its_cache_columns(gpt: OnnxModel) -> None:
    engine = Engine(gpt, max_batch=4)
    long_job, long_out = _job(gpt, "abcdefabcdefabcdefabcdefabcdef", 3, 1)  # 31 tokens in, leaves first
    short_job, short_out = _job(gpt, "ab", 20, 2)
    widths: list[int] = []
    original_step = engine._step

    def step() -> None:
        original_step()
        if engine._mask is not None:
            widths.append(engine._mask.shape[1])

    engine._step = step  # type: ignore[method-assign]
    engine.start()
    try:
        engine.submit(long_job)
        engine.submit(short_job)
        assert long_out.done.wait(10) and short_out.done.wait(10)
    finally:
        engine.stop()
    assert engine.stats()["active_rows"] == 0 and engine._state is None
    assert max(widths) >= 31 + 2  # the short row was left-padded to the long one
    assert widths[-1] == 3 + 20 - 1  # after the long row left: only the short row's own tokens (fed so far)
    for job_out, prompt, tokens, seed in ((long_out, "abcdefabcdefabcdefabcdefabcdef", 3, 1),
                                          (short_out, "ab", 20, 2)):
        values = {"seed": seed, "max_new_tokens": tokens, "min_new_tokens": tokens}
        expected = Session(gpt, build_settings(gpt.info.generation, values)).generate(prompt).text
        assert job_out.text == expected


def test_a_cancelled_job_leaves_the_batch_at_the_next_step(gpt: OnnxModel) -> None:
    engine = Engine(gpt, max_batch=4)
    job, out = _job(gpt, "ab", 60, 1)
    engine.start()
    try:
        engine.submit(job)
        _wait(lambda: engine.stats()["active_rows"] == 1)
        job.cancel()
        engine.wake()
        _wait(lambda: engine.stats()["active_rows"] == 0)
        assert not any(event[0] == "done" for event in out.events)
    finally:
        engine.stop()


def test_n_rows_share_one_prefill_and_a_stopped_engine_refuses_jobs(gpt: OnnxModel) -> None:
    engine = Engine(gpt, max_batch=8)
    settings = build_settings(gpt.info.generation, {"seed": 3, "max_new_tokens": 5})
    plans = [new_plan(gpt, settings) for _ in range(3)]
    plans[1].rng = np.random.default_rng([3, 1])
    out = Collector()
    job = Job(document_start(gpt.encode("ab"), gpt.info.special.eos), plans, out)
    engine.start()
    engine.submit(job)
    _wait(lambda: sum(event[0] == "done" for event in out.events) == 3)
    assert [event for event in out.events if event[0] == "prompt"] == [("prompt", 3, [])]
    engine.stop()
    late = Collector()
    assert not engine.submit(Job([0], [new_plan(gpt, settings)], late))  # refused once stopping


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3, "top_k": 0, "top_p": 0.9},
                                   {"temperature": 0.0}])
def test_rows_sampled_as_one_batch_each_write_what_they_write_alone(gpt: OnnxModel, extra: dict) -> None:
    """Rows with equal sampler settings share one batched sampler call, each with its own seeded generator; rows
    with other settings (here every third one) form their own group: every row still writes the text
    ``Session`` writes alone with its seed, while rows join at different steps and leave at different lengths."""
    engine = Engine(gpt, max_batch=16)
    samplers = [{**extra, "top_k": 5} if index % 3 == 2 else extra for index in range(9)]
    cases = [(prompt, 6 + 3 * index, 100 + index, sampler)
             for index, (prompt, sampler) in enumerate(zip(["ab", "bca", "abcabc"] * 3, samplers, strict=True))]
    batches: list[int] = []
    original_sample = engine._sample

    def sample() -> list[int]:
        batches.append(len(engine._rows))
        return original_sample()

    engine._sample = sample  # type: ignore[method-assign]
    outs = []
    for prompt, tokens, seed, sampler in cases:
        values = {**sampler, "seed": seed, "max_new_tokens": tokens, "min_new_tokens": tokens // 2}
        collector = Collector()
        ids = document_start(gpt.encode(prompt), gpt.info.special.eos)
        outs.append((Job(ids, [new_plan(gpt, build_settings(gpt.info.generation, values))], collector),
                     collector, values))
    engine.start()
    try:
        for job, _, _ in outs:
            engine.submit(job)
        assert all(collector.done.wait(20) for _, collector, _ in outs)
    finally:
        engine.stop()
    assert max(batches) >= 6 and engine._shared_chains  # the rows really were sampled together
    for (prompt, _, _, _), (_, collector, values) in zip(cases, outs, strict=True):
        expected = Session(gpt, build_settings(gpt.info.generation, values)).generate(prompt).text
        assert collector.text == expected


def test_mailbox_hands_out_a_requests_first_events_at_once_and_the_rest_once_per_gap() -> None:
    """While several streams are open the scheduler's events reach the event loop at most once per gap (a wake-up
    per decode step slowed the decoding), except a request's first events, which carry its time to first token;
    a hand-out puts one list of items per request."""
    from serve.app import _Mailbox

    async def scenario() -> tuple[list, list, list]:
        loop = asyncio.get_running_loop()
        mailbox = _Mailbox(loop, gap=lambda: 0.3)
        queue: asyncio.Queue = asyncio.Queue()
        deliver = mailbox.deliverer(queue, 0)
        other = mailbox.deliverer(queue, 1)

        async def drain_after(seconds: float) -> list:
            await asyncio.sleep(seconds)
            return [item for _ in range(queue.qsize()) for item in queue.get_nowait()]

        await loop.run_in_executor(None, deliver, [("text", 0, "a", [])])  # from another thread, as the engine
        first = await drain_after(0.05)
        await loop.run_in_executor(None, deliver, [("text", 0, "b", [])])
        await loop.run_in_executor(None, other, [("text", 0, "x", [])])  # another request's first: at once
        soon = await drain_after(0.05)
        await loop.run_in_executor(None, deliver, [("text", 0, "c", [])])
        waiting = await drain_after(0.05)
        later = await drain_after(0.5)
        return first, soon, waiting, later

    first, soon, waiting, later = asyncio.run(scenario())
    assert first == [(0, [("text", 0, "a", [])])]
    assert soon == [(0, [("text", 0, "b", [])]), (1, [("text", 0, "x", [])])]  # "b" went with the urgent one
    assert waiting == []  # within the gap of the last hand-out
    assert later == [(0, [("text", 0, "c", [])])]


def test_mailbox_puts_one_list_per_request_and_hand_out() -> None:
    from serve.app import _Mailbox

    async def scenario() -> list:
        loop = asyncio.get_running_loop()
        mailbox = _Mailbox(loop, gap=lambda: 0.2)
        queue: asyncio.Queue = asyncio.Queue()
        deliver = mailbox.deliverer(queue, 0)
        for piece in "abc":  # the first at once, then two steps' events within the gap
            await loop.run_in_executor(None, deliver, [("text", 0, piece, [])])
        await asyncio.sleep(0.4)
        return [queue.get_nowait() for _ in range(queue.qsize())]

    assert asyncio.run(scenario()) == [[(0, [("text", 0, "a", [])])],
                                       [(0, [("text", 0, "b", [])]), (0, [("text", 0, "c", [])])]]
