"""What int8 / int4 quantization (export/quantize.py) costs in quality: perplexity of held-out text through the
runtime, fp32 file against quantized files, on models that learned something.

    python -m benchmarks.quantize_cost            # trains (once, cached) the shakespeare-gpt2 preset, uses the demo
                                                  # model (or trains the shakespeare-char preset), rewrites its section
    python -m benchmarks.quantize_cost --smoke    # random tiny models, seconds, prints only (ppl ~ vocab size)

Held-out text: the last 10% of tiny Shakespeare, the part the trainer's default ``--val-fraction 0.1`` keeps out
of training; ``--eval-chars`` of it are scored (export.quantize.text_nll).
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, BenchmarkError, Table, fmt, fmt_mb, make_parser, parse_args, report, run_main
from benchmarks.model_files import CHAR_LSTM_SMOKE, DEMO_MODEL, TINY_GPT_SMOKE, corpus_text, model_file, quantized_file


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--eval-chars", type=int, default=None, help="held-out characters scored (20000; smoke 300)")
    parser.add_argument("--train-seconds", type=float, default=90.0,
                        help="training budget per preset when a trained model must be made (default 90)")
    args = parse_args(parser, argv)
    text = held_out_text(args.eval_chars or (300 if args.smoke else 20_000))
    table = Table(f"Perplexity on {len(text):,} held-out characters of tiny Shakespeare",
                  ["model", "file", "file size", "perplexity", "vs fp32"])
    from export.quantize import text_nll

    for label, fp32 in models(args):
        base = math.exp(text_nll(fp32, text, threads=args.threads))
        table.add(label, "fp32", fmt_mb(fp32.stat().st_size), fmt(base, 4), "—")
        for mode in ("int8", "int4"):
            path = quantized_file(fp32, mode, args.cache_dir)
            ppl = math.exp(text_nll(path, text, threads=args.threads))  # what perplexity_cost computes, fp32 once
            table.add(label, mode, fmt_mb(path.stat().st_size), fmt(ppl, 4), f"{100 * (ppl / base - 1):+.2f}%")
    table.notes.append("int8: onnxruntime quantize_dynamic, MatMul weights (LM head included) int8 per tensor, "
                       "7-bit range (reduce_range). "
                       "int4: MatMulNBits, 4-bit blocks of 128, accuracy_level 4. Embedding/LSTM weights stay fp32 "
                       "except a GPT-2's tied embedding, which reads the quantized LM head.")
    report(args, "quantize_cost.py", "quantize_cost", "Quantization: quality cost", [table])
    return 0


def held_out_text(chars: int) -> str:
    text = corpus_text()
    held_out = text[int(len(text) * 0.9):]
    return held_out[:chars]


def models(args: Any) -> list[tuple[str, Path]]:
    if args.smoke:
        return [(f"{TINY_GPT_SMOKE.name}, random weights", model_file(TINY_GPT_SMOKE, args.cache_dir)),
                (f"{CHAR_LSTM_SMOKE.name}, random weights", model_file(CHAR_LSTM_SMOKE, args.cache_dir))]
    found = [(f"shakespeare-gpt2 preset, {args.train_seconds:g} s of training", trained("shakespeare-gpt2", args))]
    if DEMO_MODEL.exists():
        found.append(("demo model", DEMO_MODEL))
    else:
        found.append((f"shakespeare-char preset, {args.train_seconds:g} s of training",
                      trained("shakespeare-char", args)))
    return [(f"{shape(path)}, {label}", path) for label, path in found]


def shape(path: Path) -> str:
    """"gpt2 4x128" / "lstm 1x256" from the file's metadata."""
    from runtime.session import OnnxModel

    info = OnnxModel.open(path, device="cpu", threads=1).info
    config = info.model_config
    if info.arch == "gpt2":
        return f"GPT-2 {config.get('n_layer')}x{config.get('n_embd')}"
    return f"{info.arch.upper()} {config.get('num_layers')}x{config.get('hidden_size')}"


def trained(preset: str, args: Any) -> Path:
    """The exported model file of ``preset`` trained for ``--train-seconds`` by the project's trainer (cached)."""
    digest = hashlib.sha256()
    for folder in ("train", "models", "export"):
        for path in sorted((REPO_ROOT / folder).glob("*.py")):
            if path.name not in ("quantize.py", "optimize.py"):
                digest.update(path.read_bytes())
    digest.update(f"{preset}:{args.train_seconds}".encode())
    stem = args.cache_dir / f"trained-{preset}-{digest.hexdigest()[:12]}"
    checkpoint, onnx_file = stem.with_suffix(".bin"), stem.with_suffix(".onnx")
    if onnx_file.exists():
        return onnx_file
    if not checkpoint.exists():
        print(f"training the {preset} preset for {args.train_seconds:g} s ...", file=sys.stderr, flush=True)
        # The preset's own thread count: it is tuned for this machine (one thread for the char LSTM).
        command = [sys.executable, "-m", "train", "--preset", preset, "--time-budget", str(args.train_seconds),
                   "--out", str(checkpoint), "--seed", "1"]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not checkpoint.exists():
            last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise BenchmarkError(f"training the {preset} preset failed: {last}")
    from export.onnx_export import export_checkpoint

    export_checkpoint(checkpoint, onnx_file)
    return onnx_file


if __name__ == "__main__":
    run_main(main)
