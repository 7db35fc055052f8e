"""Shared plumbing for the benchmark scripts: arguments, timing statistics, tables, the docs/benchmarks.md
sections, the environment block, cached model files, and the decode loops being compared.

Every script runs from the repository root as
``python -m benchmarks.NAME [--smoke] [--threads N] [--repeats N] [--docs PATH | --no-docs]``.
``--smoke`` shrinks models and token counts so the whole script runs in seconds (the tests use it); its numbers
mean nothing and are never written to docs/benchmarks.md unless ``--docs`` names a file explicitly.

Model files are built once from random weights (no downloads) through the project's own checkpoint format and
exporter, and cached under ``--cache-dir`` (default ``~/.cache/textgen-bench``). The cache key covers the model
spec and the source of the code that builds the file (models/, export/), so a changed exporter re-exports.

Heavy imports (torch, onnxruntime, transformers) happen inside functions: ``--help`` stays instant and
benchmarks/startup.py measures other processes, not this one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runtime.atomic import atomic_write_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]

DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DEMO_MODEL = REPO_ROOT / "repl" / "demo" / "demo.onnx"
DEFAULT_CACHE = Path(os.environ.get("TEXTGEN_BENCH_CACHE", Path.home() / ".cache" / "textgen-bench"))
BUILD_SOURCES = ("models/*.py", "export/*.py", "runtime/modelfile.py")  # code whose change re-exports cached files
FALLBACK_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n"
)
EOS_TEXT = "<|endoftext|>"
UNK_TEXT = "<unk>"

# The full sampler chain the "FULL sampler chain" comparisons use: every step of runtime.sampling that the torch and
# Hugging Face loops can mirror (repetition penalty -> top-k -> top-p -> min-p -> temperature, llama.cpp's order).
FULL_CHAIN: dict[str, Any] = {
    "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1, "penalty_last_n": 64,
}
GREEDY: dict[str, Any] = {"temperature": 0.0}


class BenchmarkError(Exception):
    """A benchmark cannot run here (missing model, missing tool); one line for the user."""


# --- arguments -------------------------------------------------------------------------------------------------


def make_parser(description: str, threads: int = 2) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few tokens: runs in seconds")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"intra-op threads for every runner, onnxruntime and torch alike (default {threads})")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 5; smoke 2)")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"markdown file whose section to rewrite (default {DOCS_PATH.relative_to(REPO_ROOT)}; "
                        "smoke runs write nothing unless this is given)")
    parser.add_argument("--no-docs", action="store_true", help="print the tables only")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where built model files are kept")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 5
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.no_docs:
        args.docs = None
    elif args.docs is None and not args.smoke:
        args.docs = DOCS_PATH
    try:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot use --cache-dir {args.cache_dir}: {exc.strerror or exc}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


PROJECT_PACKAGES = ("models", "train", "export", "repl")


def run_main(main: Callable[[Sequence[str] | None], int]) -> None:
    """Entry point wrapper: BenchmarkError, the project's own domain errors (ExportError, QuantizeError,
    ModelLoadError, ...) and Ctrl-C become one line on stderr and exit code 2 / 130; anything else is a bug and
    keeps its traceback."""
    try:
        sys.exit(main(None))
    except Exception as exc:
        if not isinstance(exc, BenchmarkError) and type(exc).__module__.split(".")[0] not in PROJECT_PACKAGES:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


# --- statistics --------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """Median and the full range of a set of repeated measurements."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def scaled(self, factor: float) -> Stats:
        return Stats([value * factor for value in self.samples])

    def inverted(self, factor: float = 1.0) -> Stats:
        """1/x of every sample (e.g. seconds per token -> tokens per second)."""
        return Stats([factor / value for value in self.samples if value > 0])


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Stats:
    """Seconds per call over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return Stats([timed(fn) for _ in range(repeats)])


def collect(fn: Callable[[], float], repeats: int, warmup: int = 1) -> Stats:
    """The values ``fn`` returns (e.g. seconds per token it measured itself) over ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    return Stats([float(fn()) for _ in range(repeats)])


def interleaved(runners: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, Stats]:
    """``collect`` for several runners taking turns (round-robin), so a change in machine load during the
    measurement hits all of them alike instead of whichever happened to run then."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            samples[name].append(float(run()))
    return {name: Stats(values) for name, values in samples.items()}


# --- formatting ----------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, no scientific notation for the ranges seen here."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    decimals = max(0, digits - 1 - int(_floor_log10(magnitude)))
    return f"{value:,.{decimals}f}"


def _floor_log10(value: float) -> float:
    import math

    return math.floor(math.log10(value))


def fmt_stats(stats: Stats | None, digits: int = 3) -> str:
    """``median (low–high)``."""
    if stats is None or not stats.samples:
        return "n/a"
    return f"{fmt(stats.median, digits)} ({fmt(stats.low, digits)}–{fmt(stats.high, digits)})"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def fmt_mb(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 1e6:,.1f} MB"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"row has {len(cells)} cells, table {self.title!r} has {len(self.headers)} columns")
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def text(self) -> str:
        """Aligned plain text for the terminal."""
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.headers)]
        line = "  ".join(h.ljust(w) for h, w in zip(self.headers, widths, strict=True))
        body = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in self.rows]
        notes = [f"  * {note}" for note in self.notes]
        return "\n".join([self.title, line, "-" * len(line), *body, *notes])


# --- environment -----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """The checked-out commit, read from .git without running git."""
    head = REPO_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            target = REPO_ROOT / ".git" / ref[5:]
            if target.exists():
                return target.read_text().strip()[:12]
            packed = (REPO_ROOT / ".git" / "packed-refs").read_text().splitlines()
            return next((line.split()[0][:12] for line in packed if line.endswith(ref[5:])), "unknown")
        return ref[:12]
    except OSError:
        return "unknown"


def environment(args: argparse.Namespace) -> list[tuple[str, str]]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        ("date (UTC)", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")),
        ("machine", f"{cpu_model()}; {usable} usable logical CPUs; {platform.system()} {platform.machine()}"),
        ("load average at start (1/5/15 min)", load),
        ("threads per runner", str(args.threads)),
        ("python", platform.python_version()),
        ("versions", ", ".join(f"{name} {_version(name)}" for name in
                               ("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "transformers"))),
        ("commit", _git_commit() + " (plus uncommitted changes, if any)"),
    ]


def command_line(script: str, args: argparse.Namespace) -> str:
    """The command that reruns this benchmark, e.g. ``python -m benchmarks.batch --n 4`` for "batch.py"."""
    return " ".join(["python", "-m", f"benchmarks.{Path(script).stem}", *(shlex.quote(a) for a in args.argv)])


# --- reporting ----------------------------------------------------------------------------------------------------

DOCS_HEADER = """# Benchmarks

Numbers written by the scripts in `benchmarks/` (each rewrites only its own section). Medians over repeated runs,
with the range (min–max) in parentheses. Random weights: speed does not depend on what a model learned, and
nothing is downloaded. Re-run a section with the command shown in it; `--smoke` runs print without writing here.
"""


def report(args: argparse.Namespace, script: str, key: str, title: str, tables: Sequence[Table],
           notes: Iterable[str] = ()) -> str:
    """Print the tables and, when ``args.docs`` is set, rewrite section ``key`` of that markdown file."""
    env = environment(args)
    for table in tables:
        print()
        print(table.text())
    note_list = list(notes)
    for note in note_list:
        print(f"note: {note}")
    body = [f"## {title}", "", f"Command: `{command_line(script, args)}`" + (" (smoke)" if args.smoke else ""), ""]
    body += [f"- {name}: {value}" for name, value in env]
    body.append("")
    for table in tables:
        body += [table.markdown(), ""]
    body += [f"- {note}" for note in note_list]
    section = "\n".join(body).rstrip() + "\n"
    if args.docs is not None:
        write_section(Path(args.docs), key, section)
        print(f"\nwrote section '{key}' of {args.docs}")
    return section


def write_section(path: Path, key: str, section: str) -> None:
    """Replace the text between this key's markers (or append it), atomically."""
    begin, end = f"<!-- benchmark:{key} -->", f"<!-- /benchmark:{key} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else DOCS_HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip() + "\n\n" + block
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


# --- model files -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model to build from random weights: ``arch`` and its config (GPT2Config / RNNConfig fields)."""

    name: str
    arch: str  # "gpt2" | "lstm" | "gru"
    config: dict[str, Any]
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])


def gpt2_spec(name: str, vocab_size: int, context_length: int, n_layer: int, n_head: int, n_embd: int) -> ModelSpec:
    return ModelSpec(name, "gpt2", {"vocab_size": vocab_size, "context_length": context_length, "n_layer": n_layer,
                                    "n_head": n_head, "n_embd": n_embd})


GPT2_SMALL = gpt2_spec("GPT-2 small shape (12x768, vocab 50257)", 50257, 1024, 12, 12, 768)
GPT2_SMOKE = gpt2_spec("GPT-2 smoke shape (2x64, vocab 512)", 512, 128, 2, 2, 64)
# nanoGPT's shakespeare_char model: 4 layers, 4 heads, 128 wide; 65 characters + end-of-text + unknown = 67.
TINY_GPT = gpt2_spec("tiny GPT (4x128, vocab 67)", 67, 256, 4, 4, 128)
TINY_GPT_SMOKE = gpt2_spec("tiny GPT smoke (1x32, vocab 67)", 67, 64, 1, 2, 32)


def demo_shape() -> ModelSpec:
    """The demo model's shape, read from the trainer's "shakespeare-char" preset (vocab 67: 65 characters, eos,
    unk); 1x512, embedding 64 if the preset cannot be read."""
    config: dict[str, Any] = {"vocab_size": 67, "cell": "lstm", "embedding_size": 64, "hidden_size": 512,
                              "num_layers": 1}
    try:
        from train.presets import PRESETS

        preset = PRESETS["shakespeare-char"]
        config.update(cell=preset.get("arch", "lstm"), embedding_size=int(preset["embedding_size"]),
                      hidden_size=int(preset["hidden_size"]), num_layers=int(preset["layers"]))
    except (ImportError, KeyError, TypeError, ValueError):
        pass
    name = f"char {config['cell'].upper()} {config['num_layers']}x{config['hidden_size']} (vocab 67)"
    return ModelSpec(name, config["cell"], config)


CHAR_LSTM = demo_shape()
CHAR_LSTM_SMOKE = ModelSpec("char LSTM smoke 1x64 (vocab 67)", "lstm",
                            {"vocab_size": 67, "cell": "lstm", "embedding_size": 16, "hidden_size": 64,
                             "num_layers": 1})


def corpus_text() -> str:
    """Tiny Shakespeare when this checkout sits beside ../shared/data, else a built-in excerpt."""
    try:
        return SHAKESPEARE.read_text(encoding="utf-8")
    except OSError:
        return FALLBACK_TEXT


def tokenizer_for(vocab_size: int) -> tuple[str, dict[str, int | None]]:
    """(tokenizer JSON, special tokens) with exactly ``vocab_size`` ids.

    The char tokenizer when it fits; for bigger vocabularies (GPT-2's 50257) the same characters plus filler
    word tokens, so the sampler sees a real, fully usable 50k vocabulary instead of 50k banned padding ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(corpus_text()))
    if vocab_size < len(chars) + 2:
        raise BenchmarkError(f"vocab {vocab_size} is smaller than the {len(chars) + 2}-token char tokenizer")
    vocab = {char: index for index, char in enumerate(chars)}
    while len(vocab) < vocab_size - 2:
        vocab[f"<w{len(vocab)}>"] = len(vocab)
    vocab[EOS_TEXT] = len(vocab)
    vocab[UNK_TEXT] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TEXT))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(EOS_TEXT, special=True), AddedToken(UNK_TEXT, special=True)])
    return tokenizer.to_str(), {"eos": vocab[EOS_TEXT], "unk": vocab[UNK_TEXT], "bos": None}


def benchmark_eos(vocab_size: int) -> int:
    """The end-of-text id of ``tokenizer_for(vocab_size)``: second to last."""
    return vocab_size - 2


def _source_digest(extra: Iterable[Path] = ()) -> str:
    digest = hashlib.sha256()
    files = sorted(p for pattern in BUILD_SOURCES for p in REPO_ROOT.glob(pattern))
    for path in [*files, *extra]:
        if path.name in ("quantize.py", "optimize.py") and path not in extra:
            continue  # they do not change the exported fp32 file
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for name in ("torch", "onnx", "onnxruntime-gpu", "onnxruntime"):
        digest.update(_version(name).encode())
    return digest.hexdigest()[:16]


def _spec_key(spec: ModelSpec) -> str:
    payload = json.dumps({"arch": spec.arch, "config": spec.config, "seed": spec.seed}, sort_keys=True)
    return hashlib.sha256((payload + _source_digest()).encode()).hexdigest()[:16]


def checkpoint_file(spec: ModelSpec, cache_dir: Path) -> Path:
    """A textgen checkpoint of ``spec`` with random weights (seeded), built once."""
    path = cache_dir / f"{spec.arch}-{_spec_key(spec)}.bin"
    if path.exists():
        return path
    import torch

    from models.checkpoint import Checkpoint, save_checkpoint
    from models.registry import build_model

    torch.manual_seed(spec.seed)
    model = build_model(spec.arch, spec.config).eval()
    tokenizer_json, special = tokenizer_for(spec.vocab_size)
    save_checkpoint(Checkpoint(arch=spec.arch, model_config=model.config.to_dict(), tokenizer=tokenizer_json,
                               special_tokens=special, weights=model.state_dict(),
                               generation={"temperature": 0.8, "top_k": 40}), path)
    return path


def model_file(spec: ModelSpec, cache_dir: Path) -> Path:
    """The exported fp32 textgen model file of ``spec`` (built through export.onnx_export once, then cached)."""
    path = cache_dir / f"{spec.arch}-{_spec_key(spec)}.onnx"
    if path.exists():
        return path
    from export.onnx_export import export_checkpoint

    print(f"building {spec.name} model file (cached in {cache_dir}) ...", file=sys.stderr, flush=True)
    export_checkpoint(checkpoint_file(spec, cache_dir), path)
    return path


def quantized_file(fp32_path: Path, mode: str, cache_dir: Path) -> Path:
    """``fp32_path`` quantized to ``mode`` with export.quantize, cached in ``cache_dir`` (never beside the source:
    that may be the bundled demo model inside the package)."""
    stat = fp32_path.stat()
    identity = f"{fp32_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    key = hashlib.sha256((identity + _source_digest([REPO_ROOT / "export" / "quantize.py"])).encode())
    path = cache_dir / f"{fp32_path.stem}.{mode}-{key.hexdigest()[:12]}.onnx"
    if path.exists():
        return path
    from export.quantize import quantize_model

    print(f"quantizing {fp32_path.name} to {mode} ...", file=sys.stderr, flush=True)
    return quantize_model(fp32_path, path, mode)  # type: ignore[arg-type]


def demo_model(args: argparse.Namespace) -> tuple[Path, str]:
    """The bundled demo model when it exists, else a random-weight char LSTM of its shape (smoke: smaller)."""
    if DEMO_MODEL.exists() and not args.smoke:
        return DEMO_MODEL, "demo model (repl/demo/demo.onnx)"
    spec = CHAR_LSTM_SMOKE if args.smoke else CHAR_LSTM
    return model_file(spec, args.cache_dir), f"{spec.name}, random weights (stand-in for the demo model)"


def param_bytes(spec_or_model: Any) -> int:
    """float32 bytes of a torch model's parameters (tied weights once)."""
    return sum(p.numel() for p in spec_or_model.parameters()) * 4


def file_weight_bytes(path: Path) -> int:
    """Bytes of the initializers stored in a model file (what one decode step must read at least once)."""
    import onnx

    from export.graph import initializer_bytes

    return initializer_bytes(onnx.load(str(path)))


# --- our runtime ---------------------------------------------------------------------------------------------


def open_model(path: Path, threads: int, device: str = "cpu") -> Any:
    import onnxruntime

    from runtime.session import OnnxModel

    onnxruntime.set_default_logger_severity(3)
    return OnnxModel.open(path, device=device, threads=threads)


def ours_session(model: Any, sampler: dict[str, Any], tokens: int, seed: int = 1234) -> Any:
    """A runtime.generate.Session that produces exactly ``tokens`` tokens per turn (end-of-text suppressed)."""
    from runtime.generate import Session
    from runtime.settings import Settings

    settings = Settings(model.info.generation)
    for key, value in {**sampler, "max_new_tokens": tokens, "min_new_tokens": tokens, "seed": seed}.items():
        settings.set(key, value, source="cli")
    return Session(model, settings)


def ours_generate(session: Any, prompt: str) -> Any:
    """One fresh turn: reset, then generate (prompt prefill included in the time, as for the other runners)."""
    session.reset()
    return session.generate(prompt)


def fed_context(session: Any, result: Any) -> list[int]:
    """The ids the session fed before the generated tokens (the prompt plus whatever the session adds, such as a
    leading end-of-text at a document start): what the torch and Hugging Face runners must be given."""
    return list(session.history[: len(session.history) - len(result.tokens)])


def decode_seconds_per_token(model: Any, position: int, steps: int, token: int = 1) -> float:
    """Feed ``position`` tokens (untimed), then time ``steps`` single-token runtime steps: seconds per step."""
    import numpy as np

    state, past = model.initial_state(1), 0
    if position:
        prompt = np.full((1, position), token, dtype=np.int64)
        _, state = model.run(prompt, state, 0)
        past = position
    step = np.full((1, 1), token, dtype=np.int64)
    started = time.perf_counter()
    for _ in range(steps):
        _, state = model.run(step, state, past)
        past += 1
    return (time.perf_counter() - started) / steps


# --- PyTorch and Hugging Face runners ------------------------------------------------------------------------


def torch_model(spec: ModelSpec, cache_dir: Path, threads: int) -> Any:
    """The same weights as the exported file, as the PyTorch module (eval mode)."""
    import torch

    from models.checkpoint import load_checkpoint
    from models.registry import model_from_checkpoint

    torch.set_num_threads(threads)
    return model_from_checkpoint(load_checkpoint(checkpoint_file(spec, cache_dir)))


def hf_model(torch_gpt2: Any, eos: int) -> Any:
    """A transformers GPT2LMHeadModel holding the same weights as ``torch_gpt2`` (models.gpt2.GPT2)."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    config = torch_gpt2.config
    hf_config = HFConfig(vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.n_embd,
                         n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=config.layer_norm_epsilon,
                         bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(hf_config).eval()
    state = {}
    for name, tensor in torch_gpt2.state_dict().items():
        # HF's Conv1D stores [in, out]; our nn.Linear stores [out, in].
        conv = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) and tensor.dim() == 2
        state[name] = tensor.t().contiguous() if conv else tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [name for name in missing if not name.endswith((".attn.bias", ".attn.masked_bias"))]
    if real_missing or unexpected:
        raise BenchmarkError(f"weight mapping to transformers failed: missing {real_missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model


def hf_sampling_kwargs(sampler: dict[str, Any]) -> dict[str, Any]:
    if sampler.get("temperature", 1.0) == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampler["temperature"], "top_k": sampler["top_k"],
            "top_p": sampler["top_p"], "min_p": sampler["min_p"],
            "repetition_penalty": sampler["repetition_penalty"]}


def hf_generate(model: Any, prompt_ids: list[int], tokens: int, sampler: dict[str, Any], eos: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                min_new_tokens=tokens, pad_token_id=eos, eos_token_id=eos,
                                **hf_sampling_kwargs(sampler))
    return output[0, len(prompt_ids):].tolist()


class TorchSampler:
    """runtime.sampling's llama-order chain in torch (what a hand-written PyTorch loop does): repetition penalty over
    the last ``penalty_last_n`` tokens, top-k, top-p, min-p on the model's distribution, then temperature."""

    def __init__(self, sampler: dict[str, Any], seed: int = 1234) -> None:
        import torch

        self.settings = sampler
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: Any, history: list[int], eos: int | None = None) -> int:
        import torch

        settings = self.settings
        logits = logits.float().clone()
        if eos is not None:
            logits[eos] = -float("inf")  # the other runners force the same length (min_new_tokens)
        penalty = settings.get("repetition_penalty", 1.0)
        if penalty != 1.0 and history:
            recent = torch.tensor(sorted(set(history[-settings.get("penalty_last_n", 64):])), device=logits.device)
            chosen = logits[recent]
            logits[recent] = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
        if settings.get("temperature", 1.0) == 0:
            return int(torch.argmax(logits))
        top_k = settings.get("top_k", 0)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits[logits < kth] = -float("inf")
        probs = torch.softmax(logits, dim=-1)
        top_p = settings.get("top_p", 1.0)
        if top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, 0) - sorted_probs >= top_p
            logits[order[outside]] = -float("inf")
            probs = torch.softmax(logits, dim=-1)
        min_p = settings.get("min_p", 0.0)
        if min_p > 0:
            logits[probs < min_p * probs.max()] = -float("inf")
        probs = torch.softmax(logits / settings["temperature"], dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def torch_gpt2_decode(model: Any, prompt_ids: list[int], tokens: int, sample: TorchSampler, eos: int) -> list[int]:
    """PyTorch eager decoding with models.gpt2's own KV cache."""
    import torch

    history = list(prompt_ids)
    device = model.transformer.wte.weight.device
    with torch.inference_mode():
        logits, past = model(torch.tensor([prompt_ids], device=device))
        for step in range(tokens):
            token = sample(logits[0, -1], history, eos)
            history.append(token)
            if step + 1 < tokens:
                logits, past = model(torch.tensor([[token]], device=device), past)
    return history[len(prompt_ids):]


def torch_rnn_decode(model: Any, prompt_ids: list[int], tokens: int, sample: TorchSampler, eos: int) -> list[int]:
    """PyTorch eager decoding of models.rnn.RNNLanguageModel, state carried between steps."""
    import torch

    history = list(prompt_ids)
    with torch.inference_mode():
        logits, state = model(torch.tensor([prompt_ids]))
        for step in range(tokens):
            token = sample(logits[0, -1], history, eos)
            history.append(token)
            if step + 1 < tokens:
                logits, state = model(torch.tensor([[token]]), state)
    return history[len(prompt_ids):]


# --- memory bandwidth -------------------------------------------------------------------------------------------


def memory_bandwidth(threads: int, megabytes: int = 512, repeats: int = 5) -> Stats:
    """Bytes per second read by torch's sum over a ``megabytes`` float32 array with ``threads`` threads: the
    ceiling for a decode step that must stream every weight from memory once."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(megabytes * 1024 * 1024 // 4, dtype=torch.float32)
        seconds = repeat(lambda: float(data.sum()), repeats, warmup=1)
    finally:
        torch.set_num_threads(previous)
    return seconds.inverted(float(data.numel() * 4))

