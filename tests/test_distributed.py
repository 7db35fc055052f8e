"""Distributed data-parallel training (train/distributed.py): real 2-process gloo runs on the CPU through
``python -m torch.distributed.run``, plus the pieces (sharding, state layout, checksums) checked in-process.

Each launch costs ~5-10 s on 2 busy cores (two Python processes importing torch), so the file makes three:
an LSTM run compared against the equivalent single-process run, and a GPT-2 run stopped by a SIGTERM sent to
rank 1 alone, then resumed.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from export.onnx_export import export_checkpoint
from models.checkpoint import load_checkpoint
from models.registry import model_from_checkpoint
from train.batches import BlockBatcher, StreamBatcher
from train.config import TrainConfig, TrainConfigError
from train.distributed import (
    RankShard,
    interleave_states,
    launched_by_torchrun,
    parameter_checksum,
    rank_slice_of_state,
    ranks_from_environment,
    start,
)
from train.loop import train
from train.metrics import read_metrics
from train.resume import last_checkpoint_path

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = "the cat sat on the mat. the dog sat on the log.\n" * 120
LAUNCH_TIMEOUT = 120
SYNC_LINE = re.compile(r"ranks in sync: parameter checksum ([0-9a-f]{16}) on all 2 processes")


# --------------------------------------------------------------------------------------------------- in-process


def test_rank_shards_partition_the_global_batch() -> None:
    tokens = torch.arange(1001)
    for batcher in (StreamBatcher(tokens, batch_size=6, seq_len=10), BlockBatcher(tokens, 6, 10, seed=3)):
        shards = [RankShard(batcher, rank, 3) for rank in range(3)]
        for index in (0, 1, batcher.batches_per_epoch(0) - 1):
            full_inputs, full_targets = batcher.batch(0, index)
            parts = [shard.batch(0, index) for shard in shards]
            assert all(inputs.shape[0] == 2 for inputs, _ in parts)
            rows = sorted(tuple(row.tolist()) for inputs, _ in parts for row in inputs)
            assert rows == sorted(tuple(row.tolist()) for row in full_inputs)  # disjoint and complete
            assert torch.equal(parts[1][1], full_targets[1::3])
        assert all(shard.batches_per_epoch(0) == batcher.batches_per_epoch(0) for shard in shards)
    # a stream batcher's rank keeps the same streams from one window to the next (RNN state continuity)
    streams = RankShard(StreamBatcher(tokens, batch_size=4, seq_len=10), 1, 2)
    first, second = streams.batch(0, 0)[0], streams.batch(0, 1)[0]
    assert torch.equal(second[:, 0], first[:, -1] + 1)


def test_rnn_state_layout_round_trips() -> None:
    world, layers, per_rank, hidden = 3, 2, 4, 5
    global_state = [torch.randn(layers, per_rank * world, hidden) for _ in range(2)]  # (h, c)
    local = [rank_slice_of_state(global_state, rank, world) for rank in range(world)]
    assert local[2][0].shape == (layers, per_rank, hidden)
    assert torch.equal(local[2][1][:, 1], global_state[1][:, 2 + world])  # rank 2's 2nd stream is global 5
    rebuilt = interleave_states(local)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, global_state, strict=True))


def test_parameter_checksum_sees_one_changed_bit() -> None:
    model = torch.nn.Linear(3, 2)
    before = parameter_checksum(model)
    assert parameter_checksum(model) == before and re.fullmatch(r"[0-9a-f]{16}", before)
    with torch.no_grad():
        model.bias[0] = torch.nextafter(model.bias[0], torch.tensor(10.0))
    assert parameter_checksum(model) != before


def test_environment_decides_the_mode() -> None:
    torchrun_env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert launched_by_torchrun(torchrun_env) and not launched_by_torchrun({"RANK": "0"})
    assert ranks_from_environment(torchrun_env) == (1, 2, 1)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(TrainConfigError):
            ranks_from_environment({**torchrun_env, **bad})
    cluster = start(torch.device("cpu"), environ={})
    assert not cluster.distributed and cluster.is_main and cluster.world_size == 1
    agreed = cluster.agree_step(2.5, 10, 1.25, None)  # one process: everything passes through unchanged
    assert (agreed.loss, agreed.tokens, agreed.seconds, agreed.signal) == (2.5, 10, 1.25, None)
    assert cluster.total(3.0) == 3.0 and cluster.gather("x") == ["x"] and cluster.broadcast(7) == 7


# --------------------------------------------------------------------------------------------------- torchrun


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun_command(*train_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "train", *train_args]


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--tokenizer", "char", "--threads", "1", "--seed", "7", *extra]


def launch(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(torchrun_command(*args), capture_output=True, text=True, cwd=REPO_ROOT,
                          env=worker_environment(), timeout=LAUNCH_TIMEOUT)


def test_two_lstm_ranks_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "ddp.bin"
    shape = ["--arch", "lstm", "--embedding-size", "16", "--hidden-size", "32", "--layers", "1", "--seq-len", "16",
             "--lr", "1e-2", "--warmup-steps", "2", "--max-steps", "12", "--eval-every", "6",
             "--eval-interim-tokens", "64"]  # the interim evaluation scores a subset, each rank its share of it
    completed = launch(tiny_args(data, out, *shape, "--batch-size", "4", "--prime", "the "))
    assert completed.returncode == 0, completed.stderr[-3000:]
    stdout = completed.stdout
    match = SYNC_LINE.search(stdout)
    assert match, stdout[-3000:]
    assert stdout.count("--- sample ('the ') ---") == 2  # rank 0 alone prints: one sample per evaluation
    assert "x 2 processes = 128 tokens/step" in stdout

    records = read_metrics(Path(f"{out}.metrics.jsonl"))
    assert [r["step"] for r in records] == [6, 12]  # written once, by rank 0
    assert [(r["val_scope"], r["val_tokens"]) for r in records] == [("subset", 64), ("full", 574)]
    last = load_checkpoint(last_checkpoint_path(out))
    assert last.training.world_size == 2 and len(last.training.rng_by_rank) == 2
    assert last.training.rnn_state[0].shape == (1, 8, 32)  # both ranks' 4 streams, in global order
    assert not any(name.startswith("module.") for name in last.weights)
    model = model_from_checkpoint(last)
    assert parameter_checksum(model) == match.group(1)  # the checkpoint holds the weights both ranks ended with

    # One process reading all 8 streams takes the same steps: the DDP-averaged gradient of two 4-stream halves
    # is the gradient of the whole batch, equal up to float summation order. Adam divides each gradient element by
    # its own magnitude, so rounding noise in near-zero elements grows into ~1e-3 weight differences over 12 steps
    # (measured 2e-3 at most); a wrong split (e.g. one process with 4 streams) differs by ~5e-2 and val by ~4e-2.
    single = TrainConfig(arch="lstm", data=str(data), out=str(tmp_path / "single.bin"), tokenizer="char",
                         embedding_size=16, hidden_size=32, layers=1, seq_len=16, lr=1e-2, warmup_steps=2,
                         max_steps=12, eval_every=6, threads=1, seed=7, batch_size=8, eval_interim_tokens=64)
    result = train(single, console=Console(file=io.StringIO()), live=False)
    reference = load_checkpoint(last_checkpoint_path(single.out))
    for name, tensor in reference.weights.items():
        torch.testing.assert_close(last.weights[name], tensor, rtol=0, atol=1e-2, msg=name)
    single_records = read_metrics(Path(f"{single.out}.metrics.jsonl"))
    assert [r["val_loss"] for r in records] == pytest.approx([r["val_loss"] for r in single_records], abs=5e-3)
    assert [r["val_subset_loss"] for r in records] == pytest.approx([r["val_subset_loss"] for r in single_records],
                                                                    abs=5e-3)
    assert result.best_val_loss == pytest.approx(last.training.best_val_loss, abs=5e-3)

    exported = export_checkpoint(out, tmp_path / "ddp.onnx")
    assert exported.arch == "lstm" and exported.path.stat().st_size > 0


def worker_pids(launcher: subprocess.Popen[str]) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (read from /proc: its children and their RANK variable)."""
    workers = {}
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((item[5:] for item in environ if item.startswith(b"RANK=")), None)
            if rank is not None:
                workers[int(rank)] = int(pid)
    return workers


def test_sigterm_on_one_gpt2_rank_stops_both_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "gpt.bin"
    shape = ["--arch", "gpt2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-length", "16",
             "--batch-size", "3", "--dropout", "0.1", "--lr", "1e-2", "--warmup-steps", "2", "--schedule", "plateau",
             "--eval-every", "3", "--eval-tokens", "200"]
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        launcher = subprocess.Popen(torchrun_command(*tiny_args(data, out, *shape, "--max-steps", "1000000")),
                                    stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                                    env=worker_environment())
        try:
            deadline = time.monotonic() + LAUNCH_TIMEOUT
            while not last_checkpoint_path(out).exists() and launcher.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert launcher.poll() is None, log_path.read_text()[-3000:]
            os.kill(worker_pids(launcher)[1], signal.SIGTERM)  # rank 1 only: rank 0 must learn it at the next step
            launcher.wait(timeout=LAUNCH_TIMEOUT)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    output = log_path.read_text()
    # The workers exit 128 + SIGTERM; torchrun then reports them as failed (with its own traceback, after). Its
    # summary lists the failures it saw before tearing the group down: one or both ranks, depending on timing.
    assert launcher.returncode != 0 and output.count("exitcode  : 143") >= 1, output[-3000:]
    workers_output = output.split("failed (exitcode")[0]
    assert "interrupted by SIGTERM" in workers_output and "Traceback" not in workers_output
    stopped = load_checkpoint(last_checkpoint_path(out))
    stop_step = stopped.training.step
    assert stop_step >= 3 and SYNC_LINE.search(output)

    # Resuming with 2 processes continues exactly: the same weights as one uninterrupted run of as many steps.
    target = str(stop_step + 4)
    resumed = launch(["--resume", str(last_checkpoint_path(out)), "--max-steps", target])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight_out = tmp_path / "straight" / "gpt.bin"
    straight = launch(tiny_args(data, straight_out, *shape, "--max-steps", target))
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = load_checkpoint(last_checkpoint_path(out))
    b = load_checkpoint(last_checkpoint_path(straight_out))
    assert a.training.step == b.training.step == stop_step + 4
    for name, tensor in b.weights.items():
        assert torch.equal(a.weights[name], tensor), name
    assert SYNC_LINE.search(resumed.stdout).group(1) == SYNC_LINE.search(straight.stdout).group(1)
    model = model_from_checkpoint(a)
    assert model.config.context_length == 16
    exported = export_checkpoint(last_checkpoint_path(out), tmp_path / "gpt.onnx")
    assert exported.arch == "gpt2"
