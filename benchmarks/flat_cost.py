"""Does a token cost the same late in a text as early? RNN ms/token at position 2,000 vs 20 (the state does not
grow), and GPT-2 ms/token with the KV cache at positions 16..512, for fp32 and int4 weights, beside recomputing
the whole prefix without a cache (what a loop without a cache pays).

    python -m benchmarks.flat_cost            # char-LSTM demo shape + GPT-2 small shape, rewrites its docs section
    python -m benchmarks.flat_cost --smoke    # small shapes and positions, seconds, prints only

All through runtime.session's OnnxModel.run: the prefix is fed untimed, then single-token steps are timed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.common import Table, fmt_ratio, fmt_stats, interleaved, make_parser, parse_args, report, run_main
from benchmarks.model_files import GPT2_SMALL, GPT2_SMOKE, demo_model, model_file, quantized_file
from benchmarks.runners import decode_seconds_per_token, open_model


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="timed GPT-2 steps per position (default 16; smoke 4)")
    parser.add_argument("--rnn-steps", type=int, default=None,
                        help="timed RNN steps per position (default 200; smoke 20): a step is ~0.1 ms, so a few "
                        "steps mostly measure the cache misses left by feeding the prefix")
    args = parse_args(parser, argv)
    steps = args.steps or (4 if args.smoke else 16)
    rnn_steps = args.rnn_steps or (20 if args.smoke else 200)
    rnn_positions = (20, 200) if args.smoke else (20, 2000)
    gpt_positions = (16, 64) if args.smoke else (16, 64, 128, 256, 512)
    rnn_table, rnn_ratio = rnn_flatness(args, rnn_positions, rnn_steps)
    gpt_table, gpt_ratio, int4_ratio = gpt_cache_curve(args, gpt_positions, steps)
    notes = [
        f"RNN: a token at position {rnn_positions[-1]} costs {rnn_ratio} the time of one at {rnn_positions[0]}.",
        f"GPT-2 with the KV cache: position {gpt_positions[-1]} costs {gpt_ratio} position {gpt_positions[0]} "
        f"(int4 weights: {int4_ratio}).",
    ]
    report(args, "flat_cost.py", "flat_cost", "Cost per token along the text", [rnn_table, gpt_table], notes)
    return 0


def rnn_flatness(args: Any, positions: Sequence[int], steps: int) -> tuple[Table, str]:
    path, label = demo_model(args)
    model = open_model(path, args.threads)
    table = Table(f"{label}: ms/token by position ({steps} steps each)", ["position", "ms/token", "vs first"])
    measured = interleaved({str(p): (lambda p=p: decode_seconds_per_token(model, p, steps)) for p in positions},
                           args.repeats)
    results = [measured[str(p)] for p in positions]
    for position, stats in zip(positions, results, strict=True):
        table.add(position, fmt_stats(stats.scaled(1000)), fmt_ratio(stats.median, results[0].median))
    return table, fmt_ratio(results[-1].median, results[0].median)


def gpt_cache_curve(args: Any, positions: Sequence[int], steps: int) -> tuple[Table, str, str]:
    """fp32 and int4 decode cost along the text with the KV cache, and the fp32 cost of recomputing without one.
    int4 shows the cache's own cost best: its weights are 7x smaller, so copying the growing cache into each
    step's ``present`` outputs weighs more."""
    spec = GPT2_SMOKE if args.smoke else GPT2_SMALL
    fp32_path = model_file(spec, args.cache_dir)
    fp32, int4 = open_model(fp32_path, args.threads), open_model(quantized_file(fp32_path, "int4", args.cache_dir),
                                                                 args.threads)
    table = Table(f"{spec.name}: ms/token by position",
                  ["position", "fp32 with KV cache", "vs first position", "int4 with KV cache", "vs first position",
                   "fp32 recompute without cache", "recompute / cache"])
    runners = {f"cache {p}": (lambda p=p: decode_seconds_per_token(fp32, p, steps)) for p in positions}
    runners.update({f"int4 {p}": (lambda p=p: decode_seconds_per_token(int4, p, steps)) for p in positions})
    runners.update({f"recompute {p}": (lambda p=p: recompute_seconds(fp32, p)) for p in positions})
    measured = interleaved(runners, args.repeats)
    cached, low_bit, recomputed = ([measured[f"{kind} {p}"] for p in positions]
                                   for kind in ("cache", "int4", "recompute"))
    for index, position in enumerate(positions):
        table.add(position, fmt_stats(cached[index].scaled(1000)), fmt_ratio(cached[index].median, cached[0].median),
                  fmt_stats(low_bit[index].scaled(1000)), fmt_ratio(low_bit[index].median, low_bit[0].median),
                  fmt_stats(recomputed[index].scaled(1000)), fmt_ratio(recomputed[index].median, cached[index].median))
    table.notes.append(f"With cache: {steps} single-token steps after the prefix. Without: one run over the "
                       "whole prefix plus the new token from an empty cache, per token.")
    return (table, fmt_ratio(cached[-1].median, cached[0].median), fmt_ratio(low_bit[-1].median, low_bit[0].median))


def recompute_seconds(model: Any, position: int) -> float:
    """Seconds to get the next token's logits by re-reading all ``position + 1`` tokens with no cache."""
    ids = np.ones((1, position + 1), dtype=np.int64)
    started = time.perf_counter()
    model.run(ids, model.initial_state(1), 0)
    return time.perf_counter() - started


if __name__ == "__main__":
    run_main(main)
