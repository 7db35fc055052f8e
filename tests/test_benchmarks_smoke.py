"""Every benchmark script runs in --smoke mode and produces its table, ratios and docs section.

Speeds are not asserted (they depend on the machine and its load); what is asserted is that each script runs end
to end, prints the rows and ratios it promises, and rewrites only its own section of a docs file. The scripts run
in this process (imported as the benchmarks package) with one shared model cache, except those run through the
command line (``python -m benchmarks.NAME`` from the repository root).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
RATIO = re.compile(r"\d+\.\d\dx")


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.{name}")


def _run_module(name: str, *arguments: str, timeout: int) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.NAME ARGUMENTS`` from the repository root, as the docs say to run it."""
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *arguments], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=REPO)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


def _run(name: str, cache: Path, docs: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code = _load(name).main(["--smoke", "--cache-dir", str(cache), "--docs", str(docs), *extra])
    assert code == 0
    return capsys.readouterr().out


def _section(docs: Path, key: str) -> str:
    text = docs.read_text()
    assert text.count(f"<!-- benchmark:{key} -->") == 1 and text.count(f"<!-- /benchmark:{key} -->") == 1
    section = text.split(f"<!-- benchmark:{key} -->")[1].split(f"<!-- /benchmark:{key} -->")[0]
    assert "Command: `python -m benchmarks." in section and "--smoke" in section
    assert "- machine: " in section and "- versions: torch" in section
    assert re.search(r"^\|---", section, re.MULTILINE)  # a markdown table
    return section


def test_gpt2_decode(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "bench.md"
    # The graph levers' exports take ~20 s here; export.optimize itself is tested in test_quantize.py.
    out = _run("gpt2_decode", cache, docs, capsys, "--no-graph-levers")
    for row in ("ours fp32", "ours int8", "ours int4", "PyTorch eager + KV cache", "Hugging Face transformers",
                "IO binding", "intra-op threads 1", "CPU memory arena off", "spinning off"):
        assert row in out, row
    assert "decomposed attention" not in out and "ORT GPT-2 optimizer" not in out  # the lever rows
    for runner in ("ours fp32", "Hugging Face transformers generate"):  # same weights, same fed ids: same text
        line = next(line for line in out.splitlines() if line.startswith(runner))
        assert re.search(r"\s(\d+)/\1\s*$", line), line
    assert len(RATIO.findall(out)) >= 10
    assert re.search(r"ours int8 .*%", out)  # % of the bandwidth bound
    assert "Memory bandwidth measured here" in out
    assert "llama.cpp rows skipped: no build in" in out  # a fresh cache has none; the line says how to get one
    section = _section(docs, "gpt2_decode")
    assert "| ours int4 |" in section and "bandwidth bound ms/token" in section


def test_llama_bench_json_becomes_prompt_generation_and_turn_seconds(tmp_path: Path) -> None:
    llama_cpp = _load("llama_cpp")
    build = llama_cpp.LlamaCpp(tmp_path)
    build.bin_dir.mkdir(parents=True)
    runs = [{"n_prompt": 8, "n_gen": 0, "samples_ts": [200.0, 400.0]},  # prompt tokens per second
            {"n_prompt": 0, "n_gen": 64, "samples_ts": [50.0, 40.0]},
            {"n_prompt": 8, "n_gen": 64, "samples_ts": [36.0, 72.0]}]  # (8 + 64) tokens per second
    fake = build.binary("llama-bench")  # prints what the real one prints with -o json, and checks its arguments
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"assert sys.argv[sys.argv.index('-pg') + 1] == '8,64', sys.argv\n"
                    f"print(json.dumps({runs!r}))\n")
    fake.chmod(0o755)
    model = tmp_path / "model-q8_0.gguf"
    model.write_bytes(b"")
    (result,) = llama_cpp.bench(build, {"q8_0": model}, threads=2, prompt=8, tokens=64, repeats=2)
    assert result.prompt_s_per_token.samples == [1 / 200, 1 / 400]
    assert result.gen_s_per_token.samples == [1 / 50, 1 / 40]
    assert result.turn_s_per_token.samples == pytest.approx([2 / 64, 1 / 64])  # 72 tokens in 2 s, then in 1 s


def test_a_llama_bench_that_dies_of_sigill_is_told_apart(tmp_path: Path) -> None:
    llama_cpp = _load("llama_cpp")
    build = llama_cpp.LlamaCpp(tmp_path)
    build.bin_dir.mkdir(parents=True)
    fake = build.binary("llama-bench")  # what a build with AMX code does on a VM that reports AMX it cannot run
    fake.write_text(f"#!{sys.executable}\nimport os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    fake.chmod(0o755)
    assert llama_cpp._probe(build, tmp_path / "model.gguf") is None  # setup then rebuilds without AMX
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(1)\n")
    with pytest.raises(llama_cpp.BenchmarkError, match="llama-bench failed on model.gguf") as failure:
        llama_cpp._probe(build, tmp_path / "model.gguf")  # any other failure is not mistaken for SIGILL
    assert not isinstance(failure.value, llama_cpp.IllegalInstruction)


def test_tiny_decode(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "bench.md"
    out = _run("tiny_decode", cache, docs, capsys)
    assert out.count("ours (runtime.generate.Session), full chain") == 2  # tiny GPT and char LSTM
    assert out.count("PyTorch eager loop, same chain") == 2 and out.count("Hugging Face") == 1  # no HF LSTM
    assert "nanoGPT" in out and "550 tok/s" in out
    assert len(RATIO.findall(out)) >= 7
    _section(docs, "tiny_decode")


def test_sampler_cost(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "bench.md"
    out = _run("sampler_cost", cache, docs, capsys)
    defaults = [line for line in out.splitlines() if line.startswith("exporter defaults (T 0.8")]
    assert len(defaults) == 2 and "small" in defaults[0] and "general" in defaults[1]  # V=67, then V=50,257
    assert out.count("mirostat 1 (tau 5, eta 0.1)") == 2
    assert re.search(r"^full chain\s.*\d\.\d\dx", out, re.MULTILINE)  # the end-to-end ratio to greedy
    _section(docs, "sampler_cost")


def test_flat_cost(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "bench.md"
    out = _run("flat_cost", cache, docs, capsys)
    assert "recompute without cache" in out
    assert re.search(r"position 200 costs \d+\.\d\dx", out)
    assert re.search(r"position 64 costs \d+\.\d\dx", out)
    _section(docs, "flat_cost")


def test_kv_cache(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "bench.md"
    out = _run("kv_cache", cache, docs, capsys)  # also checks both caches give the same attention outputs
    assert "growing cache (our files)" in out and "preallocated, 64 slots" in out and "preallocated, 128 slots" in out
    assert len(RATIO.findall(out)) >= 2
    _section(docs, "kv_cache")


def test_batch(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "bench.md"
    out = _run("batch", cache, docs, capsys, "--n", "4")
    assert "batch 4 (Session.generate_n)" in out and "batch 1 (Session.generate)" in out
    assert len(RATIO.findall(out)) >= 2
    _section(docs, "batch")


def test_startup(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "bench.md"
    out = _run("startup", cache, docs, capsys)
    row = next(line for line in out.splitlines() if line.startswith("textgen-repl --prompt"))
    assert row.rstrip().endswith("no")  # torch stayed out of the REPL's path
    assert "Slowest packages imported" in out
    _section(docs, "startup")


def test_startup_torch_check_can_fail() -> None:
    startup = _load("startup")
    seen, top = startup.imports_of([sys.executable, "-X", "importtime", "-c", "import torch"])
    assert seen and any(entry.startswith("torch ") for entry in top)
    seen, _ = startup.imports_of([sys.executable, "-X", "importtime", "-c", "import json"])
    assert not seen


def test_quantize_cost(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "bench.md"
    out = _run("quantize_cost", cache, docs, capsys)
    assert len(re.findall(r"  (int8|int4)  ", out)) == 4  # the file column of 2 models x 2 modes
    assert len(re.findall(r"[+-]\d+\.\d\d%", out)) == 4
    _section(docs, "quantize_cost")


def test_cuda_skips_cleanly_or_reports(cache: Path, tmp_path: Path) -> None:
    docs = tmp_path / "bench.md"
    result = _run_module("cuda", "--smoke", "--cache-dir", str(cache), "--docs", str(docs), timeout=300)
    assert result.returncode == 0, result.stderr
    if result.stdout.startswith("skipped: "):
        assert len(result.stdout.strip().splitlines()) == 1 and not docs.exists()
        assert "Traceback" not in result.stderr
    else:
        assert "ours, onnxruntime CUDA provider" in result.stdout
        _section(docs, "cuda")


def test_sections_are_rewritten_in_place(tmp_path: Path) -> None:
    common = _load("common")
    docs = tmp_path / "bench.md"
    common.write_section(docs, "a", "## A\nfirst\n")
    common.write_section(docs, "b", "## B\nother\n")
    common.write_section(docs, "a", "## A\nsecond\n")
    text = docs.read_text()
    assert text.startswith("# Benchmarks")
    assert "second" in text and "first" not in text and "other" in text
    assert text.index("## A") < text.index("## B")  # rewritten where it was
    assert text.count("<!-- benchmark:a -->") == 1


@pytest.mark.parametrize(("arguments", "message"), [
    (["--threads", "0"], "--threads must be >= 1"),
    (["--cache-dir", __file__], "cannot use --cache-dir"),
])
def test_bad_arguments_are_one_line_errors(arguments: list[str], message: str) -> None:
    result = _run_module("batch", "--smoke", *arguments, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("failing_call", [
    "from export.quantize import quantize_model; quantize_model('missing.onnx', 'out.onnx', 'int8')",
    "from runtime.session import OnnxModel; OnnxModel.open('missing.onnx', device='cpu', threads=1)",
])
def test_project_errors_become_one_line(tmp_path: Path, failing_call: str) -> None:
    """A domain error from the project (the quantizer or the runtime refusing a file) is one line and exit code 2."""
    script = tmp_path / "failing.py"
    module, call = failing_call.split("; ")
    script.write_text(
        "from benchmarks.common import run_main\n"
        f"{module}\n"
        f"run_main(lambda argv: {call})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the benchmarks package is importable from the repository root
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            check=False, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: model file not found: missing.onnx"


SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_quality_smoke_writes_only_its_section(tmp_path: Path) -> None:
    """quality.py trains each preset for 2 s through the real CLI, prints the table and rewrites only its own
    marked section of a docs file (the rest of the file is kept byte for byte)."""
    docs = tmp_path / "bench.md"
    docs.write_text("# Benchmarks\n\nintro\n\n<!-- quality:start -->\nold table\n<!-- quality:end -->\n\ntail\n")
    result = _run_module("quality", "--smoke", "--docs", str(docs), timeout=600)
    assert result.returncode == 0, result.stderr
    for preset in ("shakespeare-char", "shakespeare-gpt2", "nanogpt-settings"):
        assert preset in result.stdout
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n<!-- quality:start -->\n")
    assert text.endswith("<!-- quality:end -->\n\ntail\n")
    assert "old table" not in text and "nanoGPT" in text
    section = text.split("<!-- quality:start -->")[1].split("<!-- quality:end -->")[0]
    assert re.search(r"^\|---", section, re.MULTILINE)
    assert re.search(r"shakespeare-char.*\| \d\.\d{3}", section)  # a measured validation loss
    assert "--optimizer adamw --lr 1e-3" in section  # the yardstick's command line is shown


def test_quality_summary_is_the_median_and_range_of_each_presets_runs() -> None:
    quality = _load("quality")

    def run(preset: str, loss: float, steps: int) -> object:
        return quality.PresetRun(preset=preset, command=[], model="m", wall_seconds=90.0, train_seconds=80.0,
                                 steps=steps, tokens_per_second=1.0, final_val_loss=loss, best_val_loss=loss,
                                 final_val_bpc=loss / 0.6931471805599453 if preset != "anime-gpt2" else 1.25,
                                 load_before=0.0, load_after=0.0, sample="")

    runs = [run("shakespeare-char", 1.50, 900), run("shakespeare-gpt2", 1.54, 700),
            run("shakespeare-char", 1.44, 1000), run("shakespeare-char", 1.47, 950), run("anime-gpt2", 4.7, 900)]
    rows = quality.summary_rows(runs)
    assert rows[0] == ["`shakespeare-char`", "3", "1.4700 (1.4400–1.5000)", "2.121", "950", "<= 1.45", "no"]
    assert rows[1] == ["`shakespeare-gpt2`", "1", "1.5400 (1.5400–1.5400)", "2.222", "700", "<= 1.55", "yes"]
    assert rows[2] == ["`anime-gpt2`", "1", "4.7000 (4.7000–4.7000)", "1.250", "900", "<= 4.60", "no"]


def test_quality_anime_row_trains_on_its_own_corpus_for_its_own_budget(tmp_path: Path) -> None:
    quality = _load("quality")
    assert quality._budget("anime-gpt2", None, 90.0, smoke=False) == 600.0
    assert quality._budget("anime-gpt2", 120.0, 120.0, smoke=False) == 120.0  # --time-budget wins
    assert quality._budget("shakespeare-gpt2", None, 90.0, smoke=False) == 90.0
    command = quality.train_command("anime-gpt2", 600.0, SHAKESPEARE, tmp_path / "a.bin", smoke=False)
    assert "--data" not in command and command[command.index("--preset") + 1] == "anime-gpt2"
    assert "--data" in quality.train_command("shakespeare-char", 90.0, SHAKESPEARE, tmp_path / "c.bin", False)
    assert "anime-gpt2" not in quality.DEFAULT_PRESETS  # 600 s x 3 runs: on request only


def test_serve(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "bench.md"
    out = _run("serve", cache, docs, capsys, "--repeats", "1")
    assert out.count("aggregate tok/s") == 3  # HTTP: the char LSTM and the tiny GPT; the scheduler alone
    assert "the scheduler alone" in out
    assert len(RATIO.findall(out)) >= 4
    assert "TTFT p95 ms" in out
    section = _section(docs, "serve")
    assert "| 4 |" in section
