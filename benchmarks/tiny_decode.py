"""Small-model decode speed with the FULL sampler chain on: a tiny GPT (nanoGPT's shakespeare_char shape: 4 layers,
128 wide, 67-token char vocabulary) and the char-RNN demo shape (train/presets.py "shakespeare-char"), batch 1, CPU.

    python -m benchmarks.tiny_decode            # 200 tokens x 5 turns per row, rewrites its docs section
    python -m benchmarks.tiny_decode --smoke    # smaller shapes, seconds, prints only

Runners: ours (the model file through runtime.generate.Session, i.e. the REPL's own loop and sampler; also its
``--quantize int8`` copy), Hugging Face
``generate`` (GPT only: transformers has no LSTM LM), and a PyTorch eager loop with the same weights and the same
chain written in torch. Sampler: repetition penalty 1.1 over 64 tokens, top-k 40, top-p 0.95, min-p 0.05,
temperature 0.8 (runners.FULL_CHAIN). Every runner produces exactly ``--tokens`` tokens (end-of-text suppressed).
One thread by default: at this size extra threads only add synchronisation (and, on a busy machine, OpenMP spin
waits that made torch 10x slower in a trial here); ``--threads 2`` compares the other way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchmarkError,
    Stats,
    Table,
    fmt,
    fmt_ratio,
    fmt_stats,
    interleaved,
    make_parser,
    parse_args,
    report,
    run_main,
    timed,
)
from benchmarks.model_files import (
    CHAR_LSTM,
    CHAR_LSTM_SMOKE,
    TINY_GPT,
    TINY_GPT_SMOKE,
    ModelSpec,
    benchmark_eos,
    model_file,
)
from benchmarks.runners import (
    FULL_CHAIN,
    GREEDY,
    TorchSampler,
    fed_context,
    hf_generate,
    hf_model,
    open_model,
    ours_generate,
    ours_session,
    torch_gpt2_decode,
    torch_model,
    torch_rnn_decode,
)

PROMPT = "ROMEO:"
NANOGPT_NOTE = ("nanoGPT's sample.py (not installable here, so not re-run): ~550 tok/s for the same tiny GPT shape, "
                "an earlier measurement on this kind of machine, quoted for scale only.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0], threads=1)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per turn (default 200; smoke 16)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers row")
    args = parse_args(parser, argv)
    tokens = args.tokens or (16 if args.smoke else 200)
    gpt, lstm = (TINY_GPT_SMOKE, CHAR_LSTM_SMOKE) if args.smoke else (TINY_GPT, CHAR_LSTM)
    table = Table(f"Batch 1, full sampler chain, {tokens} tokens per turn, {args.repeats} turns, "
                  f"{args.threads} thread(s)",
                  ["model", "runner", "tok/s", "ms/token", "speed vs PyTorch eager loop"])
    for spec in (gpt, lstm):
        rows = measure_model(spec, tokens, args)
        eager = rows["PyTorch eager loop, same chain in torch"]
        for runner, per_token in rows.items():
            table.add(spec.name, runner, fmt(per_token.inverted().median), fmt_stats(per_token.scaled(1000)),
                      fmt_ratio(eager.median, per_token.median))
    table.notes.append(f"Sampler: {', '.join(f'{k} {v}' for k, v in FULL_CHAIN.items())} (llama.cpp order).")
    table.notes.append("ms/token: whole turn (prompt prefill included) / tokens; tok/s is its inverse.")
    report(args, "tiny_decode.py", "tiny_decode", "Tiny models with the full sampler chain", [table],
           [NANOGPT_NOTE])
    return 0


def measure_model(spec: ModelSpec, tokens: int, args: Any) -> dict[str, Stats]:
    """Seconds per token for each runner on ``spec``, the runners taking turns (common.interleaved)."""
    path = model_file(spec, args.cache_dir)
    model = open_model(path, args.threads)
    full, greedy = ours_session(model, FULL_CHAIN, tokens), ours_session(model, GREEDY, tokens)
    int8 = ours_session(open_model(_int8_copy(path), args.threads), FULL_CHAIN, tokens)
    ids = fed_context(full, ours_generate(full, PROMPT))  # what our session feeds, for the other runners
    torch_module = torch_model(spec, args.cache_dir, args.threads)
    eos = benchmark_eos(spec.vocab_size)
    decode = torch_gpt2_decode if spec.arch == "gpt2" else torch_rnn_decode
    sample = TorchSampler(FULL_CHAIN)
    runners: dict[str, Callable[[], float]] = {
        "ours (runtime.generate.Session), full chain": lambda: _per_token(ours_generate(full, PROMPT)),
        "ours, int8 copy (--quantize int8), full chain": lambda: _per_token(ours_generate(int8, PROMPT)),
        "ours, greedy (sampler off, for scale)": lambda: _per_token(ours_generate(greedy, PROMPT)),
        "PyTorch eager loop, same chain in torch":
            lambda: timed(lambda: decode(torch_module, ids, tokens, sample, eos)) / tokens,
    }
    if spec.arch == "gpt2" and not args.no_hf:
        try:
            hf = hf_model(torch_module, eos)
        except ImportError as exc:
            raise BenchmarkError(f"transformers is not installed ({exc}); pass --no-hf") from exc
        runners["Hugging Face transformers generate, same chain"] = (
            lambda: timed(lambda: hf_generate(hf, ids, tokens, FULL_CHAIN, eos)) / tokens)
    return interleaved(runners, args.repeats)


def _int8_copy(path: Path) -> Path:
    """The file's ``--quantize int8`` copy (default weight encoding), made once beside it in the cache."""
    from export.quantize import quantize_model

    target = path.with_name(f"{path.stem}.int8.onnx")
    if not target.exists() or target.stat().st_mtime < path.stat().st_mtime:
        quantize_model(path, target, "int8")
    return target


def _per_token(result: Any) -> float:
    return result.seconds / len(result.tokens)


if __name__ == "__main__":
    run_main(main)
