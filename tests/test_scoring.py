"""The one scorer (runtime.scoring): every caller gets the same number for the same protocol, and the trainer's
validation loss of a model equals the scorer's number for its exported file.

The models are trained for a few steps by textgen-train's own loop and exported for real, so the numbers are those
of trained weights through the whole checkpoint -> ONNX -> onnxruntime path.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from export.onnx_export import export_checkpoint
from export.quantize import QuantizeError, perplexity_cost, text_nll
from repl.app import ReplApp
from repl.evaluate import main as eval_main
from runtime.scoring import (
    SLIDING,
    STATEFUL,
    WINDOWS,
    ScoringError,
    ScoringProtocol,
    default_protocol,
    score_ids,
    stream_ids,
)
from runtime.session import OnnxModel
from runtime.settings import Settings
from train.config import TrainConfig
from train.evaluation import summed_cross_entropy
from train.loop import Trainer
from train.loop import train as run_training
from train.progress import ProgressReporter
from train.resume import config_for_resume, last_checkpoint_path, load_resume_checkpoint

CORPUS = "the cat sat on the mat. the dog sat on the log.\n" * 120
HELD_OUT = "the dog sat on the mat.\nthe cat sat on the log. the cat, the dog.\n" * 3

CONFIGS = {
    "lstm": dict(arch="lstm", embedding_size=16, hidden_size=32, layers=1, seq_len=16),
    "gpt2": dict(arch="gpt2", n_layer=1, n_head=2, n_embd=16, context_length=16, weight_decay=0.1),
}


def _train(root: Path, arch: str) -> tuple[TrainConfig, Path]:
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    config = TrainConfig(data=str(corpus), out=str(root / f"{arch}.bin"), tokenizer="char", batch_size=4, lr=1e-2,
                         warmup_steps=2, max_steps=20, eval_every=10, threads=1, seed=7, **CONFIGS[arch])
    run_training(config, console=Console(file=io.StringIO()), live=False)
    onnx_path = export_checkpoint(last_checkpoint_path(config.out), root / f"{arch}.onnx").path
    return config, onnx_path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TrainConfig, Path]]:
    threads = torch.get_num_threads()
    try:
        return {arch: _train(tmp_path_factory.mktemp(arch), arch) for arch in CONFIGS}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("held") / "held.txt"
    path.write_text(HELD_OUT, encoding="utf-8")
    return path


def _textgen_eval(model: Path, data: Path, protocol: str, capsys: pytest.CaptureFixture[str]) -> dict:
    argv = ["--model", str(model), "--data", str(data), "--protocol", protocol, "--json", "--device", "cpu",
            "--threads", "1"]
    assert eval_main(argv) == 0
    return json.loads(capsys.readouterr().out)["perplexity"]


def _repl_eval(model: OnnxModel, data: Path) -> str:
    out = io.StringIO()
    console = Console(file=out, width=300, force_terminal=False, color_system=None)
    ReplApp(model, Settings(model.info.generation), history=False, console=console).handle(f":eval {data}")
    return out.getvalue()


@pytest.mark.parametrize("arch", ["lstm", "gpt2"])
def test_every_caller_gets_the_same_number_for_the_same_protocol(trained, held_out: Path, arch: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = trained[arch][1]
    model = OnnxModel.open(path, device="cpu", threads=1)
    ids, _ = stream_ids(model, [HELD_OUT], single_stream=True)
    names = [STATEFUL] if arch == "lstm" else [WINDOWS, SLIDING]
    numbers: dict[str, dict[str, float]] = {}
    for name in names:
        direct = score_ids(model, ids, default_protocol(model, name))
        assert direct.n_tokens == len(HELD_OUT)  # char-level: every character scored once
        report = _textgen_eval(path, held_out, name, capsys)
        assert report["protocol"]["name"] == name and report["n_tokens"] == direct.n_tokens
        ppl_fp32, _, increase = perplexity_cost(path, path, HELD_OUT, threads=1, protocol=name)
        assert increase == 0.0
        numbers[name] = {
            "score_ids": direct.nats_per_token,
            "textgen-eval": report["nats_per_token"],
            "quantize cost check": text_nll(path, HELD_OUT, threads=1, protocol=name),
        }
        for caller, value in numbers[name].items():
            assert value == pytest.approx(direct.nats_per_token, rel=1e-9, abs=0), (name, caller)
        assert ppl_fp32 == pytest.approx(report["perplexity"], rel=1e-9)
    # :eval scores with the model's default protocol (stateful for RNNs, sliding for GPT-2), as textgen-eval does
    default = default_protocol(model)
    printed = _repl_eval(model, held_out)
    expected = numbers[default.name]["score_ids"]
    assert f"{expected:.4f} nats/token" in printed and default.describe() in printed
    # the quantization check's own default for a GPT-2 is windows, for an RNN stateful
    quantize_default = text_nll(path, HELD_OUT, threads=1)
    assert quantize_default == pytest.approx(numbers[STATEFUL if arch == "lstm" else WINDOWS]["score_ids"], rel=1e-9)
    print(f"\n{arch}: " + "; ".join(f"{name}: " + ", ".join(f"{caller} {value:.6f}" for caller, value in row.items())
                                   for name, row in numbers.items()) + f"; :eval printed {printed.strip()!r}")


def test_protocols_differ_where_they_should(trained) -> None:
    """A sliding stride equal to the window is the windows protocol; a smaller stride gives other contexts and so
    another number (guards against the callers agreeing because the protocol was ignored)."""
    model = OnnxModel.open(trained["gpt2"][1], device="cpu", threads=1)
    ids, _ = stream_ids(model, [HELD_OUT], single_stream=True)
    windows = score_ids(model, ids, ScoringProtocol.windows(16))
    assert score_ids(model, ids, ScoringProtocol.sliding(16, 16)).total == windows.total
    assert abs(score_ids(model, ids, ScoringProtocol.sliding(16, 4)).total - windows.total) > 1e-3
    assert abs(score_ids(model, ids, ScoringProtocol.windows(8)).total - windows.total) > 1e-3


@pytest.mark.parametrize("arch", ["lstm", "gpt2"])
def test_trainer_validation_matches_the_scorer_on_the_exported_model(trained, arch: str) -> None:
    config, path = trained[arch]
    checkpoint = load_resume_checkpoint(last_checkpoint_path(config.out))
    resumed, _ = config_for_resume(checkpoint, {})
    trainer = Trainer(resumed, checkpoint, ProgressReporter(Console(file=io.StringIO()), live=False))
    trainer_loss = trainer.validation_loss()
    assert trainer_loss == pytest.approx(checkpoint.metrics["val_loss"], rel=1e-6)  # what training reported
    protocol = trainer.val_protocol
    assert protocol.name == (STATEFUL if arch == "lstm" else WINDOWS)
    if arch == "lstm":
        assert protocol.streams > 1  # the cold start per stream and the unscored tail are part of the protocol
    else:
        assert protocol.window == config.context_length
    model = OnnxModel.open(path, device="cpu", threads=1)
    ids = trainer.data.val_ids[: trainer.val_count + 1].numpy()
    score = score_ids(model, ids, protocol)
    assert score.n_tokens == trainer.val_count
    assert score.nats_per_token == pytest.approx(trainer_loss, rel=1e-5)
    print(f"\n{arch}: trainer {trainer_loss:.6f}, scorer {score.nats_per_token:.6f} ({protocol.describe()})")


def test_trainer_validation_leaves_padding_ids_out_of_the_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    targets = torch.randint(0, 5, (2, 3))
    padded = torch.cat([logits, torch.full((2, 3, 4), 9.0)], dim=-1)  # four padding ids, very likely ones
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="sum").item()
    assert summed_cross_entropy(padded, targets, 7) == pytest.approx(expected, rel=1e-6)
    assert summed_cross_entropy(padded, targets, 11) > expected + 1.0


def test_protocol_errors_are_one_line_scoring_errors(trained) -> None:
    lstm = OnnxModel.open(trained["lstm"][1], device="cpu", threads=1)
    gpt = OnnxModel.open(trained["gpt2"][1], device="cpu", threads=1)
    with pytest.raises(ScoringError, match="needs an RNN"):
        default_protocol(gpt, STATEFUL)
    with pytest.raises(ScoringError, match="scored statefully"):
        default_protocol(lstm, WINDOWS)
    with pytest.raises(ScoringError, match="longer than the model's context"):
        score_ids(gpt, list(range(40)), ScoringProtocol.windows(17))
    with pytest.raises(ScoringError, match="stride"):
        ScoringProtocol.sliding(16, 17)
    with pytest.raises(QuantizeError, match="needs an RNN"):
        text_nll(trained["gpt2"][1], HELD_OUT, protocol=STATEFUL)


def test_textgen_eval_names_the_protocol_and_rejects_a_wrong_one(trained, held_out: Path, capsys) -> None:
    path = trained["gpt2"][1]
    assert eval_main(["--model", str(path), "--data", str(held_out), "--protocol", "windows", "--device", "cpu"]) == 0
    assert "protocol windows of 16: each from an empty context" in capsys.readouterr().out
    assert eval_main(["--model", str(path), "--data", str(held_out), "--protocol", "stateful", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: the stateful protocol needs an RNN")
    assert eval_main(["--model", str(path), "--data", str(held_out), "--protocol", "windows", "--stride", "4"]) == 2
    assert "--stride applies to --protocol sliding, not to windows" in capsys.readouterr().err
    assert eval_main(["--model", str(path), "--data", str(held_out), "--stride", "17"]) == 2
    assert "--stride must be between 1 and the model's context length 16, got 17" in capsys.readouterr().err
    lstm = trained["lstm"][1]
    assert eval_main(["--model", str(lstm), "--data", str(held_out), "--protocol", "sliding"]) == 2
    assert "the sliding protocol needs a model with a context length; lstm models are scored statefully" in \
        capsys.readouterr().err
