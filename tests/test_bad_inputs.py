"""The bad-input suite (issue 17): every case is a wrong file, path, flag or command a user can type, and each must
end in ONE clear line naming the cause, the documented exit code, no traceback, and nothing lost (every file that
existed before is byte-for-byte unchanged and no stray file appears).

The table below is the single home of the cases; docs/bad-inputs.md is rendered from it
(``python tests/test_bad_inputs.py --write-docs``) and a test keeps the two in step. Command-line cases run
in-process through each tool's ``main(argv)`` (fast: the tools answer most of them before importing torch), and
the ``sub`` ones also through a real subprocess; REPL in-session cases run through the REPL's own command
dispatcher (``ReplApp.handle``), the path every typed line takes.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "bad-inputs.md"
DEMO = REPO / "repl" / "demo" / "demo.onnx"
CORPUS = "the fox and the grapes. a fox saw some grapes hanging high on a vine.\n" * 40


@dataclass(frozen=True)
class Case:
    tool: str  # "train" | "export" | "repl" | "eval" | "session"
    args: tuple[str, ...]  # command-line words, or one typed REPL line; {w} is the workspace
    message: str  # a fragment the one line must contain
    code: int = 2  # exit status (session cases: none, the REPL keeps going)
    sub: bool = False  # also run through a real subprocess
    needs_no_gpu: bool = False  # the case assumes a machine where CUDA is not usable

    @property
    def label(self) -> str:
        return f"{self.tool}: {' '.join(self.args)}"


def _t(*args: str, message: str, sub: bool = False, **extra: object) -> Case:
    return Case("train", args, message, sub=sub, **extra)  # type: ignore[arg-type]


LSTM = ("--arch", "lstm", "--data", "{w}/corpus.txt", "--tokenizer", "char")
OUT = ("--out", "{w}/run.bin")
GPT = ("--arch", "gpt2", "--data", "{w}/corpus.txt", "--tokenizer", "char")

CASES: list[Case] = [
    # ------------------------------------------------------------------ textgen-train: flags and config
    _t(message="--arch is required", sub=True),
    _t("--arch", "transformer", message="invalid choice: 'transformer'", sub=True),
    _t("--arch", "lstm", message="--data is required"),
    _t("--arch", "lstm", "--data", "{w}/corpus.txt", message="--out is required"),
    _t("--preset", "nope", message="unknown preset 'nope'"),
    _t(*LSTM, *OUT, "--no-such-flag", message="unrecognized arguments: --no-such-flag"),
    _t(*LSTM, *OUT, "--lr", "fast", message="invalid float value: 'fast'"),
    _t(*LSTM, *OUT, "--epochs", "two", message="invalid float value: 'two'"),
    _t(*LSTM, *OUT, "--batch-size", "1.5", message="invalid int value: '1.5'"),
    _t(*LSTM, *OUT, "--schedule", "step", message="invalid choice: 'step'"),
    _t(*LSTM, *OUT, "--format", "xml", message="invalid choice: 'xml'"),
    _t(*LSTM, *OUT, "--device", "tpu", message="invalid choice: 'tpu'"),
    _t(*LSTM, *OUT, "--val-fraction", "0", message="--val-fraction must be between 0 and 1"),
    _t(*LSTM, *OUT, "--val-fraction", "1.5", message="--val-fraction must be between 0 and 1"),
    _t(*LSTM, *OUT, "--lr", "0", message="--lr must be > 0", sub=True),
    _t(*LSTM, *OUT, "--lr", "-0.1", message="--lr must be > 0"),
    _t(*LSTM, *OUT, "--batch-size", "0", message="--batch-size must be an integer >= 1"),
    _t(*LSTM, *OUT, "--seq-len", "0", message="--seq-len must be an integer >= 1"),
    _t(*LSTM, *OUT, "--hidden-size", "0", message="--hidden-size must be an integer >= 1"),
    _t(*LSTM, *OUT, "--embedding-size", "-4", message="--embedding-size must be an integer >= 1"),
    _t(*LSTM, *OUT, "--layers", "0", message="--layers must be an integer >= 1"),
    _t(*LSTM, *OUT, "--grad-accum", "0", message="--grad-accum must be an integer >= 1"),
    _t(*LSTM, *OUT, "--dropout", "1", message="--dropout must be in [0, 1)", sub=True),
    _t(*LSTM, *OUT, "--dropout", "-0.1", message="--dropout must be in [0, 1)"),
    _t(*LSTM, *OUT, "--weight-decay", "-1", message="--weight-decay must be >= 0"),
    _t(*LSTM, *OUT, "--grad-clip", "-1", message="--grad-clip must be >= 0"),
    _t(*LSTM, *OUT, "--warmup-steps", "-1", message="--warmup-steps must be an integer >= 0"),
    _t(*LSTM, *OUT, "--time-budget", "0", message="--time-budget must be > 0 seconds"),
    _t(*LSTM, *OUT, "--time-budget", "-5", message="--time-budget must be > 0 seconds"),
    _t(*LSTM, *OUT, "--epochs", "0", message="--epochs must be > 0"),
    _t(*LSTM, *OUT, "--max-steps", "0", message="--max-steps must be an integer >= 1"),
    _t(*LSTM, *OUT, "--eval-every", "0", message="--eval-every must be an integer >= 1"),
    _t(*LSTM, *OUT, "--eval-tokens", "1", message="--eval-tokens must be at least 2"),
    _t(*LSTM, *OUT, "--patience", "0", message="--patience must be an integer >= 1"),
    _t(*LSTM, *OUT, "--threads", "0", message="--threads must be an integer >= 1"),
    _t(*LSTM, *OUT, "--vocab-size", "0", message="--vocab-size must be an integer >= 1"),
    _t(*GPT, *OUT, "--n-embd", "100", "--n-head", "3", message="--n-embd (100) must be divisible by --n-head (3)"),
    _t(*GPT, *OUT, "--n-layer", "0", message="--n-layer must be an integer >= 1"),
    _t(*GPT, *OUT, "--context-length", "0", message="--context-length must be an integer >= 1"),
    _t(*LSTM, *OUT, "--init-from", "{w}/adir", message="--init-from needs --arch gpt2"),
    # ------------------------------------------------------------------ textgen-train: output paths (first second)
    _t(*LSTM, "--out", "{w}/adir", message="cannot write --out {w}/adir: it is a directory", sub=True),
    _t(*LSTM, "--out", "/proc/textgen-x.bin", message="no file can be created in /proc", sub=True),
    _t(*LSTM, "--out", "{w}/corpus.txt", message="is the input file {w}/corpus.txt", sub=True),
    _t(*LSTM, "--out", "{w}/corpus.txt/run.bin", message="{w}/corpus.txt is a file, not a folder"),
    _t(*LSTM, "--out", "{w}/clash.bin", message="cannot write {w}/clash.bin.last: it is a directory"),
    _t(*LSTM, "--out", "{w}/plot.bin", message="cannot write {w}/plot.bin.loss.png: it is a directory"),
    _t("--preset", "shakespeare-char", "--data", "{w}/corpus.txt", "--out", "{w}/adir",
       message="it is a directory"),
    # ------------------------------------------------------------------ textgen-train: corpus and tokenizer
    _t("--arch", "lstm", "--data", "{w}/missing.txt", *OUT, message="corpus not found: {w}/missing.txt", sub=True),
    _t("--arch", "lstm", "--data", "{w}/empty.txt", *OUT, message="{w}/empty.txt is empty"),
    _t("--arch", "lstm", "--data", "{w}/binary.bin", *OUT, message="{w}/binary.bin"),
    _t("--arch", "lstm", "--data", "{w}/latin1.txt", *OUT, message="is not valid UTF-8"),
    _t("--arch", "lstm", "--data", "{w}/adir", "--format", "text", *OUT, message="{w}/adir is a directory"),
    _t("--arch", "lstm", "--data", "{w}/corpus.txt", "--format", "dir", *OUT, message="is not a directory"),
    _t("--arch", "lstm", "--data", "{w}/jokes.csv", "--column", "Punchline", *OUT, message="Punchline"),
    _t("--arch", "lstm", "--data", "{w}/jokes.csv", *OUT, message="--column"),
    _t(*LSTM, *OUT, "--drop-pattern", "(unclosed", message="(unclosed"),
    _t(*LSTM, *OUT, "--keep-script", "klingon", message="klingon"),
    _t(*LSTM, *OUT, "--min-words", "100000", message="no documents left"),
    _t("--arch", "lstm", "--data", "{w}/corpus.txt", "--tokenizer", "sentencepiece", *OUT, message="sentencepiece"),
    _t("--arch", "lstm", "--data", "{w}/corpus.txt", "--tokenizer", "{w}/missing.json", *OUT,
       message="{w}/missing.json"),
    _t("--arch", "lstm", "--data", "{w}/corpus.txt", "--tokenizer", "{w}/corpus.txt", *OUT, message="tokenizer"),
    _t("--arch", "gpt2", "--data", "{w}/corpus.txt", "--init-from", "{w}/missing-hf", *OUT,
       message="{w}/missing-hf"),
    _t("--arch", "gpt2", "--data", "{w}/corpus.txt", "--init-from", "{w}/adir", *OUT, message="config.json"),
    # ------------------------------------------------------------------ textgen-train: --resume
    _t("--resume", "{w}/missing.bin", *OUT, message="checkpoint not found: {w}/missing.bin"),
    _t("--resume", "{w}/corpus.txt", *OUT, message="{w}/corpus.txt is not a PyTorch checkpoint"),
    _t("--resume", "{w}/model.onnx", *OUT, message="{w}/model.onnx is an ONNX model, not a checkpoint"),
    _t("--resume", "{w}/empty.bin", *OUT, message="{w}/empty.bin is empty"),
    _t("--resume", "{w}/adir", *OUT, message="{w}/adir is a directory"),
    _t("--resume", "{w}/foreign.bin", *OUT, message="not a textgen checkpoint"),
    _t("--resume", "{w}/exported.bin", *OUT, message="no training state to resume from"),
    _t("--resume", "{w}/payload.pkl", *OUT, message="{w}/payload.pkl was refused: it holds Python objects"),
    _t(*LSTM, *OUT, "--device", "cuda", message="--device cuda was requested", needs_no_gpu=True),
    # ------------------------------------------------------------------ python -m export
    Case("export", (), "the following arguments are required: --checkpoint", sub=True),
    Case("export", ("--checkpoint",), "expected one argument"),
    Case("export", ("--checkpoint", "{w}/missing.bin"), "checkpoint not found: {w}/missing.bin", sub=True),
    Case("export", ("--checkpoint", "{w}/model.onnx"),
         "{w}/model.onnx is an ONNX model, not a checkpoint — open it with textgen-repl", sub=True),
    Case("export", ("--checkpoint", "{w}/binary.bin"), "{w}/binary.bin is not a PyTorch checkpoint", sub=True),
    Case("export", ("--checkpoint", "{w}/corpus.txt"), "{w}/corpus.txt is not a PyTorch checkpoint"),
    Case("export", ("--checkpoint", "{w}/empty.bin"), "{w}/empty.bin is empty"),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--output", "{w}/adir"),
         "cannot write --output {w}/adir: it is a directory", sub=True),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--output", "/proc/textgen-x.onnx"),
         "no file can be created in /proc"),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--output", "{w}/run.ckpt"), "is the input file", sub=True),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--output", "{w}/corpus.txt/x.onnx"), "is a file, not a folder"),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--opset", "5"), "opset 5 is not supported"),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--opset", "seventeen"), "invalid int value: 'seventeen'"),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--tolerance", "0"), "tolerance must be a positive number"),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--tolerance", "nan"), "tolerance must be a positive number"),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--attention", "flash"), "invalid choice: 'flash'"),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--quantize", "int3"), "invalid choice: 'int3'"),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--eval-text", "{w}/corpus.txt"), "--eval-text goes with",
         sub=True),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--quantize", "int4", "--int8-weights", "u8"),
         "--int8-weights goes with --quantize int8", sub=True),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--quantize", "int8", "--int8-weights", "s9"),
         "invalid choice: 's9'"),
    Case("export", ("--checkpoint", "{w}/run.ckpt", "--no-such-flag"), "unrecognized arguments: --no-such-flag"),
    Case("export", ("--checkpoint", "{w}/adir"), "{w}/adir"),
    Case("export", ("--checkpoint", "{w}/foreign.bin"), "not a textgen checkpoint"),
    Case("export", ("--checkpoint", "{w}/payload.pkl"), "{w}/payload.pkl was refused: it holds Python objects"),
    Case("export", ("--checkpoint", "{w}/truncated.bin"),
         "{w}/truncated.bin is not a readable checkpoint: truncated or damaged"),
    # ------------------------------------------------------------------ textgen-repl (command line)
    Case("repl", ("--no-such-flag",), "unrecognized arguments: --no-such-flag", sub=True),
    Case("repl", ("--model", "{w}/missing.onnx", "--prompt", "a"), "model file not found: {w}/missing.onnx",
         sub=True),
    Case("repl", ("--model", "{w}/adir", "--prompt", "a"), "{w}/adir is not a file"),
    Case("repl", ("--model", "{w}/empty.onnx", "--prompt", "a"), "{w}/empty.onnx is empty"),
    Case("repl", ("--model", "{w}/corpus.txt", "--prompt", "a"), "{w}/corpus.txt is not a readable ONNX model"),
    Case("repl", ("--model", "{w}/garbage.onnx", "--prompt", "a"), "{w}/garbage.onnx is not a readable ONNX model",
         sub=True),
    Case("repl", ("--model", "{w}/run.ckpt", "--prompt", "a"),
         "{w}/run.ckpt is a PyTorch checkpoint, not an ONNX model — export it first", sub=True),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--set", "temp=hot"), "temp"),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--set", "temp"), "--set expects KEY=VALUE"),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--set", "colour=red"), "colour", sub=True),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--set", "top_p=2"), "top_p"),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--sampler", "wild"), "wild", sub=True),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--n", "0"), "expected a positive integer, got 0",
         sub=True),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--n", "many"), "expected a positive integer"),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--threads", "0"), "expected a positive integer"),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--max-tokens", "-5"), "max_new_tokens"),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--seed", "abc"), "seed"),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--device", "tpu"), "invalid choice: 'tpu'"),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--output", "{w}/adir"),
         "cannot write --output {w}/adir: it is a directory", sub=True),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--output", "/proc/textgen-x.txt"),
         "no file can be created in /proc"),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--output", "{w}/model.onnx"),
         "it is the input file {w}/model.onnx", sub=True),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--output", "{w}/corpus.txt/out.txt"),
         "is a file, not a folder"),
    Case("repl", ("--model", "{w}/model.onnx", "--prompt", "a", "--device", "cuda"), "--device cuda requested",
         needs_no_gpu=True),
    # ------------------------------------------------------------------ textgen-eval
    Case("eval", ("--no-such-flag",), "unrecognized arguments: --no-such-flag", sub=True),
    Case("eval", ("--model", "{w}/missing.onnx", "--data", "{w}/corpus.txt"), "model file not found"),
    Case("eval", ("--model", "{w}/model.onnx", "--data", "{w}/missing.txt"), "{w}/missing.txt", sub=True),
    Case("eval", ("--model", "{w}/model.onnx", "--data", "{w}/binary.bin"), "{w}/binary.bin"),
    Case("eval", ("--model", "{w}/model.onnx", "--data", "{w}/empty.txt"), "{w}/empty.txt"),
    Case("eval", ("--model", "{w}/model.onnx", "--data", "{w}/corpus.txt", "--format", "xml"), "xml"),
    Case("eval", ("--model", "{w}/model.onnx", "--samples", "-1"), "--samples"),
    Case("eval", ("--model", "{w}/model.onnx", "--samples", "two"), "invalid int value: 'two'", sub=True),
    Case("eval", ("--model", "{w}/model.onnx", "--samples", "2", "--sweep", "temp"), "temp"),
    Case("eval", ("--model", "{w}/model.onnx", "--samples", "2", "--sweep", "temp=hot"), "temp"),
    Case("eval", ("--model", "{w}/model.onnx", "--samples", "2", "--set", "colour=red"), "colour"),
    Case("eval", ("--model", "{w}/model.onnx", "--data", "{w}/corpus.txt", "--csv", "{w}/adir"),
         "cannot write --csv {w}/adir: it is a directory", sub=True),
    Case("eval", ("--model", "{w}/model.onnx", "--data", "{w}/corpus.txt", "--csv", "{w}/model.onnx"),
         "it is the input file"),
    Case("eval", ("--model", "{w}/run.ckpt", "--data", "{w}/corpus.txt"), "is a PyTorch checkpoint, not an ONNX",
         sub=True),
    # ------------------------------------------------------------------ textgen-repl in session (typed lines)
    Case("session", (":set temp hot",), "temp", code=0),
    Case("session", (":set colour red",), "colour", code=0),
    Case("session", (":set top_k -3",), "top_k", code=0),
    Case("session", (":unset colour",), "colour", code=0),
    Case("session", (":sampler wild",), "wild", code=0),
    Case("session", (":probs many",), ":probs", code=0),
    Case("session", (":n 0",), ":n", code=0),
    Case("session", (":n lots",), ":n", code=0),
    Case("session", (":save",), "usage: :save FILE", code=0),
    Case("session", (":save {w}/adir",), "cannot write :save {w}/adir: it is a directory", code=0),
    Case("session", (":save /proc/textgen-x.json",), "no file can be created in /proc", code=0),
    Case("session", (":save {w}/model.onnx",), "it is the input file", code=0),
    Case("session", (":save {w}/corpus.txt/s.json",), "is a file, not a folder", code=0),
    Case("session", (":load",), "usage: :load FILE", code=0),
    Case("session", (":load {w}/missing.json",), "{w}/missing.json", code=0),
    Case("session", (":load {w}/corpus.txt",), "{w}/corpus.txt", code=0),
    Case("session", (":load {w}/binary.bin",), "{w}/binary.bin", code=0),
    Case("session", (":eval {w}/missing.txt",), "{w}/missing.txt", code=0),
    Case("session", (":eval {w}/binary.bin",), "{w}/binary.bin", code=0),
    Case("session", (":model {w}/missing.onnx",), "model file not found: {w}/missing.onnx", code=0),
    Case("session", (":model {w}/corpus.txt",), "{w}/corpus.txt is not a readable ONNX model", code=0),
    Case("session", (":model {w}/run.ckpt",), "is a PyTorch checkpoint, not an ONNX model", code=0),
    Case("session", (":help frobnicate",), "frobnicate", code=0),
    Case("session", (":frobnicate",), "frobnicate", code=0),
    Case("session", (":regen",), "nothing to regenerate", code=0),
]

TOOLS: dict[str, tuple[str, str]] = {  # tool -> (module with main(), how a user runs it)
    "train": ("train.cli", "textgen-train"),
    "export": ("export.cli", "python -m export"),
    "repl": ("repl.cli", "textgen-repl"),
    "eval": ("repl.evaluate", "textgen-eval"),
    "session": ("repl.app", "textgen-repl (typed in the session)"),
}
SUBPROCESS_MODULE = {"train": "train", "export": "export", "repl": "repl", "eval": "repl.evaluate"}


# ---------------------------------------------------------------------------------------------------- workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every file the cases point at: real corpora, a real checkpoint and model file, and the wrong kinds."""
    import torch

    from train.config import TrainConfig
    from train.loop import train

    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    (root / "jokes.csv").write_text("Joke,Rating\nwhy did the fox cross,3\na grape walks in,4\n", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    (root / "empty.bin").write_bytes(b"")
    (root / "empty.onnx").write_bytes(b"")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "garbage.onnx").write_bytes(b"\x01\x02not a model" * 50)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait, cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 20)
    (root / "adir").mkdir()
    (root / "clash.bin.last").mkdir()
    (root / "plot.bin.loss.png").mkdir()
    (root / "model.onnx").write_bytes(DEMO.read_bytes())
    (root / "payload.pkl").write_bytes(pickle.dumps({"format": "textgen-checkpoint", "run": os.system}))
    torch.save({"weights": torch.zeros(2)}, root / "foreign.bin")
    config = TrainConfig(arch="lstm", data=str(root / "corpus.txt"), out=str(root / "run.ckpt"), tokenizer="char",
                         embedding_size=8, hidden_size=16, layers=1, batch_size=2, seq_len=16, max_steps=1,
                         eval_every=1, threads=1)
    from rich.console import Console

    train(config, console=Console(file=io.StringIO()), live=False)
    for side_file in ("run.ckpt.last", "run.ckpt.metrics.jsonl", "run.ckpt.loss.png"):
        (root / side_file).unlink()
    checkpoint = torch.load(root / "run.ckpt", weights_only=True)
    checkpoint.pop("train")
    torch.save(checkpoint, root / "exported.bin")  # a checkpoint without training state
    data = (root / "run.ckpt").read_bytes()
    (root / "truncated.bin").write_bytes(data[: len(data) // 2])
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a digest of its bytes: what 'nothing lost' is checked against."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        state[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def expand(case: Case, root: Path) -> tuple[list[str], str]:
    return [arg.replace("{w}", str(root)) for arg in case.args], case.message.replace("{w}", str(root))


def assert_one_clear_line(stderr: str, stdout: str, message: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr + stdout, stderr
    assert len(lines) == 1, f"expected one line, got: {stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert message in lines[0], f"{message!r} not in {lines[0]!r}"
    return lines[0]


def run_in_process(case: Case, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    import importlib

    main: Callable[[list[str]], int] = importlib.import_module(TOOLS[case.tool][0]).main
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exit (after our one-line error)
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _skip_if_gpu(case: Case) -> None:
    if case.needs_no_gpu:
        from runtime.session import nvidia_gpu_present

        if nvidia_gpu_present():
            pytest.skip("this machine has a GPU; the case is about one that has none")


CLI_CASES = [case for case in CASES if case.tool != "session"]
SESSION_CASES = [case for case in CASES if case.tool == "session"]


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.label for case in CLI_CASES])
def test_cli_bad_input(case: Case, workspace: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    _skip_if_gpu(case)
    monkeypatch.chdir(workspace)
    argv, message = expand(case, workspace)
    before = snapshot(workspace)
    code, out, err = run_in_process(case, argv, capsys)
    assert code == case.code, (code, err)
    assert_one_clear_line(err, out, message)
    assert snapshot(workspace) == before, "a file was changed, removed or left behind"


SUB_CASES = [case for case in CLI_CASES if case.sub]


@pytest.mark.parametrize("case", SUB_CASES, ids=[case.label for case in SUB_CASES])
def test_cli_bad_input_in_a_real_process(case: Case, workspace: Path) -> None:
    _skip_if_gpu(case)
    argv, message = expand(case, workspace)
    before = snapshot(workspace)
    done = subprocess.run([sys.executable, "-m", SUBPROCESS_MODULE[case.tool], *argv], capture_output=True,
                          text=True, timeout=120, cwd=workspace, stdin=subprocess.DEVNULL)
    assert done.returncode == case.code, done.stderr
    assert_one_clear_line(done.stderr, done.stdout, message)
    assert snapshot(workspace) == before


def test_session_bad_inputs_each_answer_one_line_and_the_session_goes_on(workspace: Path) -> None:
    """All typed cases through one REPL session (its command dispatcher): one red line each, no traceback, no
    'internal error', files untouched; afterwards the same session still generates."""
    from rich.console import Console

    from repl.app import ReplApp
    from runtime.session import OnnxModel
    from runtime.settings import Settings

    model = OnnxModel.open(workspace / "model.onnx", device="cpu", threads=1)
    buffer = io.StringIO()
    app = ReplApp(model, Settings(model.info.generation), device="cpu", threads=1, history=False,
                  console=Console(file=buffer, width=400, color_system=None))
    before = snapshot(workspace)
    for case in SESSION_CASES:
        (line,), message = expand(case, workspace)
        buffer.seek(0)
        buffer.truncate()
        app.handle(line)
        printed = [text for text in buffer.getvalue().splitlines() if text.strip()]
        assert "Traceback" not in buffer.getvalue() and "internal error" not in buffer.getvalue(), (line, printed)
        assert len(printed) == 1, (line, printed)
        assert message in printed[0], (line, printed[0])
    assert snapshot(workspace) == before
    buffer.seek(0)
    buffer.truncate()
    app.handle(":set max_new_tokens 5")
    app.handle("ROMEO:")
    assert "5 tokens" in buffer.getvalue()


@pytest.mark.parametrize("tool", ["train", "export", "repl", "eval"])
def test_every_flag_has_help_text(tool: str) -> None:
    import argparse
    import importlib

    parser = importlib.import_module(TOOLS[tool][0]).build_parser()
    missing = [action.option_strings[0] for action in parser._actions
               if action.option_strings and not (action.help and action.help.strip())]
    assert missing == [], f"{TOOLS[tool][1]} flags without help: {missing}"
    assert isinstance(parser, argparse.ArgumentParser)


# ---------------------------------------------------------------------------------------------------- the docs


def render_docs() -> str:
    lines = [
        "# Bad inputs and what they answer",
        "",
        "Every row is a test case in `tests/test_bad_inputs.py` (this file is rendered from it: "
        "`python tests/test_bad_inputs.py --write-docs`). Each case must end in ONE line that contains the "
        "expected message, the exit code shown, no traceback, and nothing lost: every file that existed before "
        "is unchanged and no stray file is left. `W/` is the folder holding the test's files. REPL session "
        "lines answer with one red line and the session goes on (no exit).",
        "",
        f"{len(CASES)} cases: " + ", ".join(
            f"{sum(case.tool == tool for case in CASES)} {TOOLS[tool][1]}" for tool in TOOLS) + ".",
        "",
        "| # | tool | input | expected message contains | exit |",
        "|---|---|---|---|---|",
    ]
    for number, case in enumerate(CASES, start=1):
        words = " ".join(case.args).replace("{w}", "W") or "(no arguments)"
        message = case.message.replace("{w}", "W").replace("|", "\\|")
        exit_code = "— (session goes on)" if case.tool == "session" else str(case.code)
        lines.append(f"| {number} | {TOOLS[case.tool][1]} | `{words}` | {message} | {exit_code} |")
    return "\n".join(lines) + "\n"


def test_docs_list_every_case() -> None:
    assert len(CASES) >= 100
    assert len({(case.tool, case.args) for case in CASES}) == len(CASES), "a case is listed twice"
    assert DOCS.read_text(encoding="utf-8") == render_docs(), "run: python tests/test_bad_inputs.py --write-docs"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-docs"]:
        DOCS.write_text(render_docs(), encoding="utf-8")
        print(f"wrote {DOCS} ({len(CASES)} cases)")
