"""llama.cpp beside our runtime: build it from PyPI's ``llama-cpp-python`` source package, convert the benchmark's
random GPT-2 to GGUF with llama.cpp's own converter and quantizer, and time it with ``llama-bench``.

    python -m benchmarks.llama_cpp setup     # download + build (about 10 min on 2 cores), once per cache dir
    python -m benchmarks.llama_cpp status    # where the build is, or why there is none

The build belongs to the benchmarks, not to the project's install or CI: ``benchmarks.gpt2_decode`` adds llama.cpp
rows when the build is present and says in one line how to get it when it is not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_CACHE, BenchmarkError, Stats, run_main

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
BINARIES = ("llama-bench", "llama-quantize")
GGUF_TYPES = ("f32", "q8_0", "q4_0")  # the converter writes f32; llama-quantize makes the others
# This VM family reports AMX in cpuid yet faults on the tile instructions (SIGILL at tilezero, ../shared/NOTES.md):
# a native build that dies that way is rebuilt with AMX code generation off.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp build: its source tree (converter, gguf-py) and its binaries."""

    root: Path

    @property
    def source(self) -> Path:
        return self.root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"

    @property
    def bin_dir(self) -> Path:
        return self.root / "build" / "bin"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def ready(self) -> bool:
        return all(self.binary(name).exists() for name in BINARIES) and (self.source / "convert_hf_to_gguf.py").exists()

    def commit(self) -> str:
        """llama.cpp's build number and commit, as ``llama-bench`` reports them."""
        info = self.root / "build-info.json"
        return json.loads(info.read_text())["build"] if info.exists() else "unknown"


def build_root(cache_dir: Path) -> Path:
    return cache_dir / "llama.cpp"


def find(cache_dir: Path = DEFAULT_CACHE) -> LlamaCpp | None:
    build = LlamaCpp(build_root(cache_dir))
    return build if build.ready else None


def missing_line(cache_dir: Path = DEFAULT_CACHE) -> str:
    return (f"llama.cpp rows skipped: no build in {build_root(cache_dir)} "
            f"(run `python -m benchmarks.llama_cpp setup`, about 10 minutes on 2 cores)")


# --- setup ---------------------------------------------------------------------------------------------------------


def _run(command: list[str], log: Path, label: str | None = None) -> None:
    label = label or " ".join(command)
    print(f"{label}  (log: {log})", file=sys.stderr, flush=True)
    with log.open("a") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise BenchmarkError(f"{label} failed (exit {result.returncode}); see {log}")


def _download(root: Path) -> None:
    archive = root / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(root),
              f"{PACKAGE}=={VERSION}"], root / "download.log")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


def _configure_and_build(build: LlamaCpp, extra_flags: str) -> None:
    log = build.root / "build.log"
    flags = [f"-DCMAKE_C_FLAGS={extra_flags}", f"-DCMAKE_CXX_FLAGS={extra_flags}"] if extra_flags else []
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(build.source), "-B", str(build.root / "build"), *generator,
          "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
          "-DLLAMA_BUILD_SERVER=OFF", *flags], log)
    _run(["cmake", "--build", str(build.root / "build"), "--target", *BINARIES, "-j", str(os.cpu_count() or 2)], log)


class IllegalInstruction(BenchmarkError):
    """llama-bench died with SIGILL: the build uses instructions this CPU reports but cannot run."""


def _probe(build: LlamaCpp, model: Path) -> list[dict] | None:
    """llama-bench once on a tiny model (its quantized kernels included): its runs, or None if it died of SIGILL."""
    try:
        return _bench(build, model, threads=1, prompt=4, tokens=4, repeats=1)
    except IllegalInstruction:
        return None


def setup(cache_dir: Path) -> LlamaCpp:
    """Download, build, and check that the build runs here (rebuild without AMX if it faults)."""
    for tool in ("cmake", "g++"):
        if shutil.which(tool) is None:
            raise BenchmarkError(f"building llama.cpp needs {tool}, which is not on PATH")
    build = LlamaCpp(build_root(cache_dir))
    build.root.mkdir(parents=True, exist_ok=True)
    if not build.source.exists():
        _download(build.root)
    if not build.ready:
        _configure_and_build(build, "")
    probe = tiny_probe_model(build, cache_dir)
    runs = _probe(build, probe)
    if runs is None:
        print("llama.cpp died with SIGILL (AMX reported but not usable here): rebuilding with AMX off ...",
              file=sys.stderr, flush=True)
        shutil.rmtree(build.root / "build")
        _configure_and_build(build, NO_AMX_FLAGS)
        runs = _probe(build, probe)
        if runs is None:
            raise BenchmarkError(f"llama.cpp still dies with SIGILL after a rebuild without AMX; see {build.root}")
    build_info = f"{runs[0].get('build_number', '?')} ({runs[0].get('build_commit', '?')})"
    (build.root / "build-info.json").write_text(json.dumps({"build": build_info}))
    return build


def tiny_probe_model(build: LlamaCpp, cache_dir: Path) -> Path:
    """A q8_0 GGUF of the benchmark's smoke-sized GPT-2: enough to run the quantized kernels once."""
    from benchmarks.model_files import GPT2_SMOKE

    return gguf_files(build, GPT2_SMOKE, cache_dir, ("q8_0",))["q8_0"]


# --- conversion ----------------------------------------------------------------------------------------------------


def hf_directory(spec: Any, cache_dir: Path) -> Path:
    """The benchmark's random GPT-2 (``spec``) as a Hugging Face directory the converter can read: the same
    weights as our model file, a tokenizer with the same ids."""
    from benchmarks.model_files import benchmark_eos, spec_key, tokenizer_for
    from benchmarks.runners import hf_model, torch_model

    path = cache_dir / f"hf-{spec_key(spec)}"
    if (path / "config.json").exists():
        return path
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    eos = benchmark_eos(spec.vocab_size)
    hf_model(torch_model(spec, cache_dir, threads=2), eos).save_pretrained(partial)
    twin = _bpe_twin(Tokenizer.from_str(tokenizer_for(spec.vocab_size)[0]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=twin, eos_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.save_pretrained(partial)
    config = json.loads((partial / "config.json").read_text())
    config.setdefault("n_ctx", config["n_positions"])  # transformers 5 no longer writes it; the converter reads it
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    partial.rename(path)
    return path


def _bpe_twin(tokenizer: Any) -> Any:
    """The benchmark's char tokenizer as a BPE model with the same ids: llama.cpp loads a GPT-2 vocabulary only
    with merges, so the first filler token becomes the merge of two characters."""
    from tokenizers import Tokenizer, models

    vocab = dict(tokenizer.get_vocab(with_added_tokens=False))
    filler = next(token for token, _ in sorted(vocab.items(), key=lambda item: item[1]) if token.startswith("<w"))
    vocab["th"] = vocab.pop(filler)
    twin = Tokenizer(models.BPE(vocab, [("t", "h")], unk_token="<unk>"))
    twin.pre_tokenizer, twin.decoder = tokenizer.pre_tokenizer, tokenizer.decoder
    twin.add_special_tokens(list(tokenizer.get_added_tokens_decoder().values()))
    return twin


# The converter identifies a BPE pre-tokenizer by hashing how it splits a test string; the benchmark's char
# tokenizer is not one it knows. Speed does not depend on it (llama-bench feeds token ids), so the GGUF is marked
# as GPT-2's own pre-tokenizer.
_CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
import convert_hf_to_gguf
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
convert_hf_to_gguf.main()
"""


def gguf_files(build: LlamaCpp, spec: Any, cache_dir: Path, types: Sequence[str] = GGUF_TYPES) -> dict[str, Path]:
    """``spec`` as GGUF files, one per type: f32 from llama.cpp's converter, the rest from llama-quantize."""
    directory = hf_directory(spec, cache_dir)
    f32 = directory / "model-f32.gguf"
    log = directory / "convert.log"
    if not f32.exists():
        _run([sys.executable, "-c", _CONVERT, str(build.source), str(directory), "--outtype", "f32",
              "--outfile", str(f32)], log,
             f"llama.cpp convert_hf_to_gguf.py {directory.name} --outtype f32")
    files = {"f32": f32}
    for kind in types:
        if kind == "f32":
            continue
        path = directory / f"model-{kind}.gguf"
        if not path.exists():
            _run([str(build.binary("llama-quantize")), str(f32), str(path), kind.upper()], log)
        files[kind] = path
    return {kind: files[kind] for kind in types}


# --- timing --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchResult:
    """One GGUF file timed by llama-bench, each figure in seconds: per prompt token (prompt processing), per
    generated token (generation), and a whole turn (prompt then generation) per generated token."""

    kind: str
    path: Path
    prompt_s_per_token: Stats
    gen_s_per_token: Stats
    turn_s_per_token: Stats


def _bench(build: LlamaCpp, model: Path, threads: int, prompt: int, tokens: int, repeats: int,
           combined: bool = False) -> list[dict]:
    command = [str(build.binary("llama-bench")), "-m", str(model), "-t", str(threads), "-p", str(prompt),
               "-n", str(tokens), "-r", str(repeats), "-o", "json"]
    if combined:
        command += ["-pg", f"{prompt},{tokens}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode == -signal.SIGILL:
        raise IllegalInstruction(f"llama-bench died with SIGILL on {model.name}")
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise BenchmarkError(f"llama-bench failed on {model.name}: {last}")
    return json.loads(result.stdout)


def bench(build: LlamaCpp, files: dict[str, Path], threads: int, prompt: int, tokens: int,
          repeats: int) -> list[BenchResult]:
    """Each file through ``llama-bench -p PROMPT -n TOKENS -pg PROMPT,TOKENS``; its samples are per repetition."""
    results = []
    for kind, path in files.items():
        runs = _bench(build, path, threads, prompt, tokens, repeats, combined=True)
        by_test = {(run["n_prompt"] > 0, run["n_gen"] > 0): run for run in runs}
        prompt_only, gen_only, turn = by_test[True, False], by_test[False, True], by_test[True, True]
        # samples_ts is tokens/s of the test's own tokens: prompt tokens, generated tokens, or both for -pg
        results.append(BenchResult(
            kind, path,
            Stats([1.0 / rate for rate in prompt_only["samples_ts"]]),
            Stats([1.0 / rate for rate in gen_only["samples_ts"]]),
            Stats([(prompt + tokens) / rate / tokens for rate in turn["samples_ts"]]),
        ))
    return results


# --- command line --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("setup", "status"))
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the build is kept")
    args = parser.parse_args(argv)
    if args.action == "status":
        build = find(args.cache_dir)
        print(f"llama.cpp build {build.commit()} in {build.root}" if build else missing_line(args.cache_dir))
        return 0 if build else 1
    build = setup(args.cache_dir)
    print(f"llama.cpp build {build.commit()} ready in {build.root}")
    return 0


if __name__ == "__main__":
    run_main(main)
