"""What the sampler chain costs per token: µs per row for several settings at a char-level vocabulary (67) and at
GPT-2's (50,257), and end-to-end decode speed of the char-LSTM demo shape, greedy vs the full chain.

    python -m benchmarks.sampler_cost               # rewrites its docs section
    python -m benchmarks.sampler_cost --no-docs     # prints only
    python -m benchmarks.sampler_cost --smoke       # seconds, prints only
    python -m benchmarks.sampler_cost --gpt2-step   # also times a GPT-2-small decode step (exports ~500 MB once)

Sampler rows: ``SamplerChain.sample`` on one row of random float32 logits (normal, sd 3) per call, with a history
list that grows by one token per call as in the decode loop (penalties look at its last 64 tokens). End to end:
``runtime.generate.Session`` producing exactly ``--tokens`` tokens (end-of-text suppressed), prompt included.
Wall-clock and CPU time (``time.process_time``) are both shown: on a shared, loaded machine the CPU time is the
steadier figure, and the load average is printed with the results. One onnxruntime thread by default (what the
runtime picks for a model this small).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.common import Stats, Table, fmt_stats, make_parser, parse_args, report, run_main
from benchmarks.model_files import GPT2_SMALL, GPT2_SMOKE, demo_model, model_file
from benchmarks.runners import FULL_CHAIN, GREEDY, decode_seconds_per_token, open_model, ours_generate, ours_session
from runtime.defaults import DEFAULT_GENERATION
from runtime.sampling import SamplerChain, settings_from_mapping
from runtime.settings import SAMPLER_KEYS

PROMPT = "ROMEO:"
CHAR_VOCAB = 67  # the demo's 65 characters + end-of-text + unknown
GPT2_VOCAB = 50257
# the sampler part only: DEFAULT_GENERATION also holds decode-loop settings (max_new_tokens, start_with_eos)
EXPORT_DEFAULTS: dict[str, Any] = {k: v for k, v in DEFAULT_GENERATION.items() if k in SAMPLER_KEYS}
CONFIGS: dict[str, dict[str, Any]] = {
    "greedy": GREEDY,
    "temperature 0.8 only": {"temperature": 0.8, "top_k": 0},
    "top-p 0.95 only": {"top_k": 0, "top_p": 0.95},
    "exporter defaults (T 0.8, top-k 40, top-p 0.95)": EXPORT_DEFAULTS,
    "full chain (+ min-p 0.05, repetition 1.1)": FULL_CHAIN,
    "full chain, hf order": {**FULL_CHAIN, "order": "hf"},
    "full chain + typical-p 0.9": {**FULL_CHAIN, "typical_p": 0.9},
    # llama.cpp's samplers (issue 19), each on top of the exporter defaults
    "defaults + logit bias (3 tokens)": {**EXPORT_DEFAULTS, "logit_bias": {"#1": -1.0, "#2": "-inf", "#3": 2.0}},
    "defaults + DRY 0.8, last 64": {**EXPORT_DEFAULTS, "dry_multiplier": 0.8, "dry_penalty_last_n": 64},
    "defaults + DRY 0.8, whole history": {**EXPORT_DEFAULTS, "dry_multiplier": 0.8},
    "defaults + top-n-sigma 1": {**EXPORT_DEFAULTS, "top_n_sigma": 1.0},
    "defaults + XTC 0.5 / 0.1": {**EXPORT_DEFAULTS, "xtc_probability": 0.5, "xtc_threshold": 0.1},
    "defaults + dynatemp 0.5": {**EXPORT_DEFAULTS, "dynatemp_range": 0.5},
    "mirostat 2 (tau 5, eta 0.1)": {"temperature": 0.8, "mirostat": 2},
    "mirostat 1 (tau 5, eta 0.1)": {"temperature": 0.8, "mirostat": 1},
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0], threads=1)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per end-to-end turn (default 1000; smoke 50)")
    parser.add_argument("--gpt2-step", action="store_true",
                        help="also time a GPT-2-small fp32 decode step and show the chain's share of it")
    args = parse_args(parser, argv)
    tokens = args.tokens or (50 if args.smoke else 1000)
    load_before = os.getloadavg()
    sampler_table, full_at_gpt2 = sampler_costs(args)
    tables = [sampler_table, end_to_end(args, tokens)]
    if args.gpt2_step:
        tables.append(gpt2_share(args, full_at_gpt2))
    load_after = os.getloadavg()
    notes = [f"Load average (1/5/15 min) before: {_load(load_before)}; after: {_load(load_after)} "
             f"(this machine has {os.cpu_count()} logical CPUs)."]
    report(args, "sampler_cost.py", "sampler_cost", "Sampler cost per token", tables, notes)
    return 0


def _load(values: tuple[float, float, float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


# --- the chain alone ---------------------------------------------------------------------------------------------


def sampler_costs(args: Any) -> tuple[Table, tuple[Stats, Stats]]:
    """µs per row for every configuration at both vocabularies; also the full chain's (wall, CPU) seconds per row
    at V=50,257 for the GPT-2 comparison."""
    table = Table("SamplerChain.sample, one row per call: µs/row", ["settings", "vocab", "path", "wall µs/row",
                                                                       "CPU µs/row"])
    full_at_gpt2 = (Stats([]), Stats([]))
    for vocab, calls in ((CHAR_VOCAB, 200 if args.smoke else 2000), (GPT2_VOCAB, 10 if args.smoke else 200)):
        for name, values in CONFIGS.items():
            chain = SamplerChain(settings_from_mapping(values), vocab, banned_ids=[vocab - 1])
            wall, cpu = time_chain(chain, vocab, calls, args.repeats)
            table.add(name, f"{vocab:,}", "small" if chain.plan.small else "general", fmt_stats(wall.scaled(1e6)),
                      fmt_stats(cpu.scaled(1e6)))
            if vocab == GPT2_VOCAB and values is FULL_CHAIN:
                full_at_gpt2 = (wall, cpu)
    table.notes.append(f"{args.repeats} timed windows of calls per row after one untimed one; median (min–max).")
    table.notes.append("path: the small-vocabulary path (sorts the candidates once) or the general one "
                       "(partition and bins, never sorts a 50k row); runtime/sampling/plan.py explains both.")
    return table, full_at_gpt2


def time_chain(chain: SamplerChain, vocab: int, calls: int, repeats: int) -> tuple[Stats, Stats]:
    """(wall seconds, CPU seconds) per call over ``repeats`` windows of ``calls`` calls, after a warm-up window."""
    rng = np.random.default_rng(vocab)
    rows = [row[None, :] for row in (rng.standard_normal((16, vocab)) * 3).astype(np.float32)]
    upcoming = rng.integers(0, min(vocab, 80), size=(repeats + 1) * calls + 300).tolist()
    history = upcoming[:300]
    position = 300
    draws = np.random.default_rng(0)
    walls, cpus = [], []
    for window in range(repeats + 1):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        for index in range(calls):
            history.append(upcoming[position])
            position += 1
            chain.sample(rows[index % len(rows)], [history], draws)
        if window:  # the first window warms caches and the penalty window up
            walls.append((time.perf_counter() - wall_start) / calls)
            cpus.append((time.process_time() - cpu_start) / calls)
    return Stats(walls), Stats(cpus)


# --- end to end ----------------------------------------------------------------------------------------------


def end_to_end(args: Any, tokens: int) -> Table:
    path, label = demo_model(args)
    model = open_model(path, args.threads)
    table = Table(f"{label}: end-to-end decode through runtime.generate.Session, batch 1, {tokens} tokens per turn",
                  ["sampler", "tok/s (wall)", "tok/s (CPU time)", "tok/s vs greedy (CPU time)"])
    samplers = {"greedy": GREEDY, "full chain": FULL_CHAIN, "exporter defaults": EXPORT_DEFAULTS}
    sessions = {name: ours_session(model, values, tokens) for name, values in samplers.items()}
    walls: dict[str, list[float]] = {name: [] for name in samplers}
    cpus: dict[str, list[float]] = {name: [] for name in samplers}
    for session in sessions.values():
        ours_generate(session, PROMPT)  # warm-up
    # Interleaved (greedy, chain, defaults, greedy, ...): this VM's speed drifts by tens of percent over seconds,
    # and back-to-back blocks would put that drift into the ratios.
    for _ in range(args.repeats):
        for name, session in sessions.items():
            cpu_start = time.process_time()
            result = ours_generate(session, PROMPT)
            walls[name].append(result.tokens_per_s)
            cpus[name].append(len(result.tokens) / (time.process_time() - cpu_start))
    for name in samplers:
        # each round's turn against the greedy turn of the same round, then the median: drift cancels out
        paired = Stats([mine / greedy for mine, greedy in zip(cpus[name], cpus["greedy"], strict=True)])
        table.add(name, fmt_stats(Stats(walls[name])), fmt_stats(Stats(cpus[name])),
                  f"{paired.median:.2f}x ({paired.low:.2f}–{paired.high:.2f})")
    table.notes.append("full chain: repetition penalty 1.1 over 64 tokens, top-k 40, top-p 0.95, min-p 0.05, "
                       "temperature 0.8 (llama.cpp order). exporter defaults: temperature 0.8, top-k 40, top-p 0.95.")
    table.notes.append("tok/s (CPU time) = tokens / process CPU seconds: on a loaded machine the wall figure also "
                       "counts the time other processes held the cores. The samplers' turns alternate, and "
                       "'vs greedy' is the median (min–max) over rounds of each turn's CPU-time tok/s over the same "
                       "round's greedy turn.")
    return table


# --- against a GPT-2-small decode step -------------------------------------------------------------------------


def gpt2_share(args: Any, full_chain: tuple[Stats, Stats]) -> Table:
    """The full chain at V=50,257 against one fp32 GPT-2-small decode step (goal: at most 20 % of it)."""
    spec = GPT2_SMOKE if args.smoke else GPT2_SMALL
    model = open_model(model_file(spec, args.cache_dir), max(2, args.threads))  # memory-bound: 2 cores
    steps = 4 if args.smoke else 16
    step = Stats([decode_seconds_per_token(model, 16, steps) for _ in range(args.repeats)])
    chain_wall, chain_cpu = full_chain
    table = Table(f"{spec.name}, fp32: the full chain's share of a decode step",
                  ["decode step ms/token", "full chain µs/row (wall)", "full chain µs/row (CPU)", "chain / step"])
    table.add(fmt_stats(step.scaled(1000)), fmt_stats(chain_wall.scaled(1e6)), fmt_stats(chain_cpu.scaled(1e6)),
              f"{chain_wall.median / step.median:.1%}")
    table.notes.append(f"decode step (wall): {steps} single-token steps after a 16-token prefix, at least 2 threads; "
                       "chain: the V=50,257 full-chain row of the first table. chain / step compares the wall "
                       "medians. Goal: at most 20 %.")
    return table


if __name__ == "__main__":
    run_main(main)
