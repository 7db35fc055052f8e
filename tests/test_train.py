"""The trainer (train/): batching, the loop, checkpoints, exact resume, signals and the CLI's error handling.

Every corpus is a few KB written into tmp_path and every model is tiny, so the file runs in well under a minute
on 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from models.checkpoint import load_checkpoint, save_checkpoint
from models.registry import model_from_checkpoint
from train.batches import BlockBatcher, DataCursor, DataSizeError, StreamBatcher, gpt_eval_windows, rnn_eval_streams
from train.cli import build_parser, main, resolve_config
from train.config import TrainConfig, TrainConfigError
from train.loop import train
from train.metrics import REQUIRED_FIELDS, read_metrics
from train.resume import config_for_resume, last_checkpoint_path, load_resume_checkpoint
from train.schedule import Budget, LRSchedule
from train.tokenizer import build_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
REPETITIVE = "the cat sat on the mat. the dog sat on the log.\n" * 120
DOCS_CSV = "id,text\n" + "".join(f'{i},"joke number {i}: why did the {w} cross the road? to get to the other side."\n'
                                 for i, w in enumerate(["cat", "dog", "fox", "owl", "hen"] * 8))


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def write_corpus(tmp_path: Path, text: str = REPETITIVE, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def rnn_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(arch="lstm", data=str(write_corpus(tmp_path)), out=str(tmp_path / "model.bin"), tokenizer="char",
                  embedding_size=16, hidden_size=32, layers=1, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2,
                  max_steps=30, eval_every=10, threads=1, seed=7)
    values.update(overrides)
    return TrainConfig(**values)


def gpt_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(arch="gpt2", data=str(write_corpus(tmp_path)), out=str(tmp_path / "gpt.bin"), tokenizer="char",
                  n_layer=1, n_head=2, n_embd=16, context_length=16, batch_size=4, lr=1e-2, warmup_steps=2,
                  weight_decay=0.1, max_steps=20, eval_every=10, threads=1, seed=7)
    values.update(overrides)
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------------------- batching


def test_stream_windows_are_contiguous_across_steps() -> None:
    tokens = torch.arange(403)
    batcher = StreamBatcher(tokens, batch_size=4, seq_len=30)
    assert batcher.stream_len == 100 and batcher.batches_per_epoch(0) == 4  # 30 + 30 + 30 + 10
    windows = [batcher.batch(0, k) for k in range(batcher.batches_per_epoch(0))]
    for k in range(len(windows) - 1):
        inputs, _ = windows[k]
        next_inputs, _ = windows[k + 1]
        # stream i's window k+1 starts right where window k ended
        assert torch.equal(next_inputs[:, 0], inputs[:, -1] + 1)
    for stream in range(4):
        joined = torch.cat([inputs[stream] for inputs, _ in windows])
        assert torch.equal(joined, torch.arange(stream * 100, stream * 100 + 100))  # one contiguous stream
    for inputs, targets in windows:
        assert torch.equal(targets, inputs + 1)  # each target is the next token


def test_cursor_wraps_epochs_and_flags_epoch_starts() -> None:
    cursor = DataCursor(StreamBatcher(torch.arange(41), batch_size=2, seq_len=10))
    flags = [cursor.next()[2] for _ in range(5)]
    assert flags == [True, False, True, False, True]  # 2 windows per epoch; the RNN state resets on True
    assert cursor.position.epoch == 2 and cursor.epochs_done() == pytest.approx(2.5)


def test_block_batcher_is_seeded_and_shifted() -> None:
    tokens = torch.arange(1000)
    first = BlockBatcher(tokens, batch_size=8, context_length=16, seed=3)
    again = BlockBatcher(tokens, batch_size=8, context_length=16, seed=3)
    other = BlockBatcher(tokens, batch_size=8, context_length=16, seed=4)
    inputs, targets = first.batch(0, 0)
    assert inputs.shape == (8, 16) and torch.equal(targets, inputs + 1)
    assert torch.equal(inputs, again.batch(0, 0)[0])
    assert not torch.equal(inputs, other.batch(0, 0)[0])
    starts = torch.cat([first.batch(0, k)[0][:, 0] for k in range(first.batches_per_epoch(0))])
    assert starts.unique().numel() == starts.numel()  # an epoch serves every block at most once
    assert not torch.equal(first.batch(1, 0)[0], inputs)  # the next epoch is a different shuffle


def test_too_little_data_is_a_clear_error() -> None:
    with pytest.raises(DataSizeError, match="--batch-size"):
        StreamBatcher(torch.arange(5), batch_size=8, seq_len=4)
    with pytest.raises(DataSizeError, match="--context-length"):
        BlockBatcher(torch.arange(10), batch_size=2, context_length=16, seed=0)


def test_eval_layouts_cover_the_validation_stream() -> None:
    inputs, targets = rnn_eval_streams(torch.arange(10_001))
    assert inputs.shape[0] == 32 and torch.equal(targets, inputs + 1)
    assert torch.equal(inputs.reshape(-1), torch.arange(inputs.numel()))  # contiguous pieces, in order
    capped, _ = rnn_eval_streams(torch.arange(10_001), max_tokens=300)
    assert capped.numel() == 300 and capped.shape[0] == 1
    windows, window_targets = gpt_eval_windows(torch.arange(101), context_length=32)
    assert windows.shape == (3, 32) and torch.equal(window_targets, windows + 1)


def test_schedules() -> None:
    cosine = LRSchedule("cosine", 1.0, warmup_steps=10)
    assert cosine.lr(0, 0.0) == pytest.approx(0.1)
    assert cosine.lr(50, 0.0) == pytest.approx(1.0)
    assert cosine.lr(50, 1.0) == pytest.approx(0.1)
    linear = LRSchedule("linear", 1.0, warmup_steps=10)
    assert linear.lr(0, 0.0) == pytest.approx(0.1)
    assert [linear.lr(50, progress) for progress in (0.0, 0.25, 1.0)] == pytest.approx([1.0, 0.75, 0.0])
    plateau = LRSchedule("plateau", 1.0, warmup_steps=0)
    for loss in (2.0, 1.5, 1.6, 1.55):
        plateau.observe(loss)
    assert plateau.lr(100, 0.5) == pytest.approx(0.5)  # two evaluations without improvement halve the rate
    budget = Budget(max_steps=100, time_budget=10.0)
    assert budget.fraction(50, 8.0, 0.0) == pytest.approx(0.8)
    # the schedule's progress: a time budget's decay ends at the last step, before the reserved final evaluation
    assert Budget(time_budget=10.0).fraction(3, 6.0, 0.0, reserve=2.0) == pytest.approx(0.75)
    assert Budget(time_budget=10.0).fraction(3, 8.0, 0.0, reserve=2.0) == pytest.approx(1.0)
    assert budget.reached(50, 10.0, 0.0) and budget.reached(20, 1.0, 0.0) is None


# --------------------------------------------------------------------------------------------------- training


def test_loss_decreases_and_files_are_written(tmp_path: Path) -> None:
    config = rnn_config(tmp_path, max_steps=40, eval_every=10, prime=["the "])
    output = io.StringIO()
    result = train(config, console=Console(file=output, width=120), live=False)
    records = read_metrics(Path(f"{config.out}.metrics.jsonl"))
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    for record in records:
        assert all(name in record for name in REQUIRED_FIELDS)
        assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]))
        assert record["val_bpc"] == pytest.approx(record["val_loss"] / math.log(2))
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.3
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert result.best_val_loss == pytest.approx(min(r["val_loss"] for r in records))
    assert Path(f"{config.out}.loss.png").stat().st_size > 1000
    text = output.getvalue()
    assert "corpus:" in text and "tokenizer: char" in text  # the data report comes first
    assert "--- sample ('the ') ---" in text and "best val loss" in text

    best = load_checkpoint(config.out)  # weights_only=True inside
    assert best.arch == "lstm" and best.training.best_val_loss == pytest.approx(result.best_val_loss)
    assert best.training.step == result.best_step
    assert set(best.training.rng) == {"torch", "cuda", "numpy", "python"}
    assert best.training.config["hidden_size"] == 32 and best.generation["temperature"] > 0
    last = load_checkpoint(last_checkpoint_path(config.out))
    assert last.training.step == 40 and last.training.data_position["index"] > 0
    model = model_from_checkpoint(best)
    logits, _ = model(torch.tensor([[0, 1, 2]]))
    assert logits.shape == (1, 3, best.model_config["vocab_size"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def gpt_muon_config(tmp_path: Path, **overrides) -> TrainConfig:
    return gpt_config(tmp_path, optimizer="muon", **overrides)


def rnn_muon_config(tmp_path: Path, **overrides) -> TrainConfig:
    return rnn_config(tmp_path, optimizer="muon", **overrides)


@pytest.mark.parametrize("make_config", [rnn_config, rnn_muon_config, gpt_config, gpt_muon_config],
                         ids=["lstm", "lstm-muon", "gpt2", "gpt2-muon"])
def test_resume_continues_exactly(tmp_path: Path, make_config) -> None:
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight_dir.mkdir()
    split_dir.mkdir()
    # dropout 0.2 exercises the torch RNG; 2 RNN layers carry a 2-layer state; 12 steps of 4 cross epoch ends.
    options = dict(max_steps=12, eval_every=3, dropout=0.2, layers=2, schedule="plateau")
    straight = make_config(straight_dir, **options)
    train(straight, console=quiet(), live=False)

    split = make_config(split_dir, **options)
    first = train(split, console=quiet(), live=False, stop_at_step=6)  # stops on an evaluation step, like a signal
    assert first.steps == 6 and first.stop_reason.startswith("stopped")
    checkpoint = load_resume_checkpoint(last_checkpoint_path(split.out))
    resumed_config, ignored = config_for_resume(checkpoint, {"lr": 0.5, "max_steps": 12})
    assert ignored == ["lr"] and resumed_config.lr == split.lr
    train(resumed_config, resume=checkpoint, console=quiet(), live=False)

    a = load_checkpoint(last_checkpoint_path(straight.out))
    b = load_checkpoint(last_checkpoint_path(split.out))
    assert a.training.step == b.training.step == 12
    for name, tensor in a.weights.items():
        assert torch.equal(tensor, b.weights[name]), name
    assert a.training.scheduler == b.training.scheduler
    assert a.training.best_val_loss == b.training.best_val_loss
    losses_a = [r["val_loss"] for r in read_metrics(Path(f"{straight.out}.metrics.jsonl"))]
    losses_b = [r["val_loss"] for r in read_metrics(Path(f"{split.out}.metrics.jsonl"))]
    assert losses_a == losses_b  # the evaluation skipped at the stop ran first on resume


def test_gpt2_from_scratch_checkpoint_loads(tmp_path: Path) -> None:
    config = gpt_config(tmp_path, max_steps=20, eval_every=10)
    result = train(config, console=quiet(), live=False)
    checkpoint = load_checkpoint(result.checkpoint)
    assert checkpoint.arch == "gpt2" and checkpoint.model_config["context_length"] == 16
    model = model_from_checkpoint(checkpoint)
    logits, present = model(torch.tensor([[1, 2, 3, 4]]))
    assert logits.shape[-1] == checkpoint.model_config["vocab_size"] and len(present) == 1
    records = read_metrics(Path(f"{config.out}.metrics.jsonl"))
    assert records[-1]["val_loss"] < records[0]["val_loss"]


def test_csv_corpus_with_word_tokenizer_and_early_stopping(tmp_path: Path) -> None:
    data = write_corpus(tmp_path, DOCS_CSV, "jokes.csv")
    config = rnn_config(tmp_path, data=str(data), column="text", tokenizer="word", seq_len=8, lr=0.5,
                        schedule="plateau", max_steps=200, eval_every=2, patience=2, val_fraction=0.2)
    result = train(config, console=quiet(), live=False)
    assert result.stop_reason.startswith("early stopping") and result.steps < 200
    checkpoint = load_checkpoint(result.checkpoint)
    assert checkpoint.generation["top_k"] == 40  # word-level defaults
    assert '"WordLevel"' in checkpoint.tokenizer


def test_word_model_reports_loss_per_token_per_word_and_per_character(tmp_path: Path) -> None:
    """Issue 16: a word model's loss is nats per TOKEN; the log and metrics.jsonl restate it per word and per
    character of the validation text (each document separator counts as one word and one character)."""
    data = write_corpus(tmp_path, DOCS_CSV, "jokes.csv")
    config = rnn_config(tmp_path, data=str(data), column="text", tokenizer="word", seq_len=8, max_steps=4,
                        eval_every=2, val_fraction=0.2, min_frequency=2, lowercase=True)
    output = io.StringIO()
    train(config, console=Console(file=output, width=200), live=False)
    records = read_metrics(Path(f"{config.out}.metrics.jsonl"))
    validation = [line.split(",", 1)[1].strip('"') for line in DOCS_CSV.splitlines()[1:]][-8:]
    words = sum(len(doc.split()) for doc in validation) + len(validation)
    chars = sum(len(doc) for doc in validation) + len(validation)
    text = output.getvalue()
    tokens = int(re.search(r"validation ([\d,]+) tokens", text).group(1).replace(",", ""))
    assert tokens > words  # punctuation marks are tokens too
    for record in records:
        # The mean loss per predicted token, times the validation text's tokens per word (or per character).
        total = record["val_loss"] * tokens
        assert record["loss_unit"] == "nats/token"
        assert record["val_nats_per_word"] == pytest.approx(total / words)
        assert record["val_ppl_word"] == pytest.approx(math.exp(total / words))
        assert record["val_bpc"] == pytest.approx(total / chars / math.log(2))
    assert "nats/token" in text and "nats/word" in text and "bits/char" in text
    assert f"validation text: {words:,} words, {chars:,} characters" in text
    checkpoint = load_checkpoint(config.out)
    assert checkpoint.tokenizer_options == {"kind": "word", "vocab_size": None, "min_frequency": 2,
                                            "lowercase": True}
    assert '"Lowercase"' in checkpoint.tokenizer


def test_sigterm_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    data = write_corpus(tmp_path)
    out = tmp_path / "sig.bin"
    log = (tmp_path / "stdout.txt").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "train", "--arch", "gru", "--data", str(data), "--out", str(out), "--hidden-size", "16",
         "--layers", "1", "--batch-size", "2", "--seq-len", "8", "--max-steps", "1000000", "--eval-every", "5",
         "--threads", "1"],
        stdout=log, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )
    deadline = time.monotonic() + 60
    while not last_checkpoint_path(out).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    log.close()
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stderr
    assert "interrupted by SIGTERM" in (tmp_path / "stdout.txt").read_text()
    checkpoint = load_checkpoint(last_checkpoint_path(out))
    assert checkpoint.training.step >= 5 and checkpoint.arch == "gru"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------------- CLI


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


def test_cli_bad_corpora_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x00\x01\x02abc" * 50)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    csv_file = write_corpus(tmp_path, DOCS_CSV, "docs.csv")
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "not found"),
        (["--data", str(empty)], "empty"),
        (["--data", str(binary)], "binary"),
        (["--data", str(latin1)], "UTF-8"),
        (["--data", str(csv_file), "--column", "Joke"], "no column 'Joke'"),
    ]
    for extra, expected in cases:
        code, err = run_main(["--arch", "lstm", "--out", str(tmp_path / "x.bin"), *extra], capsys)
        assert code == 2, extra
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "x.bin").exists()


def test_cli_bad_flags_and_resume_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_corpus(tmp_path)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(300))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    no_state = tmp_path / "exported-only.bin"
    save_checkpoint({"arch": "lstm", "model_config": {"vocab_size": 3}, "tokenizer": "{}", "special_tokens": {"eos": 0},
                     "model": {}}, no_state)
    base = ["--arch", "lstm", "--data", str(data), "--out", str(tmp_path / "x.bin")]
    punctuation = write_corpus(tmp_path, "... !!! ?? --\n" * 50, "punct.txt")
    tokenizer_json = tmp_path / "tokenizer.json"
    build_tokenizer("bpe", ["some text " * 50]).save(str(tokenizer_json))
    cases = [
        (base + ["--lr", "-1"], "--lr"),
        (base + ["--batch-size", "many"], "invalid int value"),
        (base + ["--tokenizer", "nonsense"], "unknown tokenizer"),
        (base + ["--tokenizer", "word", "--min-frequency", "100000"], "--min-frequency 100000 is larger than every"),
        (base + ["--tokenizer", "word", "--min-frequency", "0"], "--min-frequency"),
        (base + ["--tokenizer", str(tokenizer_json), "--lowercase"], "tokenizer.json used as is"),
        (["--arch", "lstm", "--data", str(punctuation), "--tokenizer", "word", "--out", str(tmp_path / "x.bin")],
         "no words"),
        (base + ["--optimizer", "sgd"], "invalid choice"),
        (base + ["--batch-size", "100000"], "--batch-size"),
        (["--data", str(data), "--out", "x.bin"], "--arch is required"),
        (["--preset", "nope"], "unknown preset"),
        (["--resume", str(garbage)], "garbage.bin"),  # refused or unreadable, depending on the bytes
        (["--resume", str(foreign)], "not a textgen checkpoint"),
        (["--resume", str(tmp_path / "absent.bin")], "not found"),
        (["--resume", str(no_state)], "no training state"),
    ]
    if not torch.cuda.is_available():
        cases.append((base + ["--device", "cuda"], "no CUDA GPU"))
    for argv, expected in cases:
        code, err = run_main(argv, capsys)
        assert code == 2, argv
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_cli_process_error_has_no_traceback(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "train", "--arch", "lstm", "--data", str(tmp_path / "nope.txt"), "--out", "x.bin"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [f"error: corpus not found: {tmp_path / 'nope.txt'}"]


def test_preset_defaults_lose_to_explicit_flags(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--preset", "shakespeare-char", "--hidden-size", "64", "--out", "m.bin"])
    config, resume, _ = resolve_config(args)
    assert resume is None and config.preset == "shakespeare-char"
    assert config.hidden_size == 64  # the flag
    assert config.tokenizer == "char" and config.time_budget == 90  # the preset
    assert config.data.endswith("tinyshakespeare.txt")
    gpt = resolve_config(build_parser().parse_args(["--arch", "gpt2", "--data", "d.txt", "--out", "g.bin"]))[0]
    assert gpt.weight_decay == 0.1 and gpt.tokenizer == "bpe"  # architecture defaults
    with pytest.raises(TrainConfigError, match="divisible"):
        resolve_config(build_parser().parse_args(["--arch", "gpt2", "--data", "d", "--out", "o", "--n-embd", "30"]))


def test_finetune_from_hugging_face_directory(tmp_path: Path) -> None:
    pytest.importorskip("models.hf_gpt2")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([REPETITIVE], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32,
                                        vocab_size=tokenizer.get_vocab_size(), eos_token_id=0, bos_token_id=0)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(hf_dir)
    tokenizer.save(str(hf_dir / "tokenizer.json"))

    config = gpt_config(tmp_path, init_from=str(hf_dir), context_length=16, lr=3e-3, max_steps=10, eval_every=5,
                        tokenizer="bpe", n_embd=16, n_head=2)
    result = train(config, console=quiet(), live=False)
    checkpoint = load_checkpoint(result.checkpoint)
    assert json.loads(checkpoint.tokenizer)["model"]["vocab"] == json.loads(tokenizer.to_str())["model"]["vocab"]
    assert checkpoint.model_config["context_length"] == 32  # the pretrained model's positions are kept
    assert checkpoint.special_tokens["eos"] == 0
    model = model_from_checkpoint(checkpoint)
    assert model.transformer.wte.weight.shape == (tokenizer.get_vocab_size(), 16)
    records = read_metrics(Path(f"{config.out}.metrics.jsonl"))
    assert records[-1]["val_loss"] < records[0]["val_loss"]
