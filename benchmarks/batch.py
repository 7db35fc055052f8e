"""Batched sampling: ``--n 32`` independent samples of the demo model decoded as one batch
(runtime.generate.Session.generate_n, what ``textgen-repl --n 32`` runs) against one sample at a time.

    python -m benchmarks.batch            # demo model (or a stand-in of its shape), rewrites its docs section
    python -m benchmarks.batch --smoke    # small stand-in, seconds, prints only

Both use the model's default sampler settings and produce exactly ``--tokens`` tokens per sample (end-of-text
suppressed). Throughput counts every sample's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.common import Table, fmt, fmt_ratio, fmt_stats, interleaved, make_parser, parse_args, report, run_main
from benchmarks.model_files import demo_model
from benchmarks.runners import open_model, ours_session

PROMPT = "ROMEO:"


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="samples decoded together (default 32)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sample (default 200; smoke 8)")
    args = parse_args(parser, argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    tokens = args.tokens or (8 if args.smoke else 200)
    path, label = demo_model(args)
    model = open_model(path, args.threads)
    session = ours_session(model, {}, tokens)

    def single() -> float:
        session.reset()
        result = session.generate(PROMPT)
        return len(result.tokens) / result.seconds

    def batched() -> float:
        session.reset()
        results = session.generate_n(PROMPT, args.n)
        seconds = max(result.seconds for result in results)  # all rows end together: the batch's wall time
        return sum(len(result.tokens) for result in results) / seconds

    measured = interleaved({"single": single, "batched": batched}, args.repeats)
    one, many = measured["single"], measured["batched"]
    table = Table(f"{label}: {tokens} tokens per sample, {args.repeats} runs, {args.threads} threads",
                  ["mode", "total tok/s", "per-sample tok/s", "throughput vs batch 1"])
    table.add("batch 1 (Session.generate)", fmt_stats(one), fmt(one.median), "1.00x")
    table.add(f"batch {args.n} (Session.generate_n)", fmt_stats(many), fmt(many.median / args.n),
              fmt_ratio(many.median, one.median))
    table.notes.append(f"Sampler: the model's defaults {describe(model)}.")
    report(args, "batch.py", "batch", f"Batched sampling: {args.n} samples at once vs one at a time", [table])
    return 0


def describe(model: Any) -> str:
    generation = model.info.generation
    return ", ".join(f"{key} {value}" for key, value in generation.items() if key != "max_new_tokens") or "(none)"


if __name__ == "__main__":
    run_main(main)
