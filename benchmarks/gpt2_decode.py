"""GPT-2 small decode speed, batch 1, CPU: our model file through our runtime decode loop (fp32, int8, int4 and
the graph-level levers) against PyTorch eager with a KV cache and Hugging Face ``generate``, plus the memory-
bandwidth bound measured here, file size against parameter bytes, and the session-level levers.

    python -m benchmarks.gpt2_decode            # full run (GPT-2 small shape, 64 tokens x 5), rewrites its docs section
    python -m benchmarks.gpt2_decode --smoke    # tiny shape, seconds, prints only

Every runner decodes greedily from the same prompt with the same weights (random, seeded) and is forced to
produce exactly ``--tokens`` tokens (end-of-text suppressed); ms/token is a whole turn's wall time (prompt
prefill included, as users see it) divided by the tokens produced. The bound assumes one decode step must read
every stored weight once: weight bytes / measured read bandwidth.
"""

from __future__ import annotations

import gc
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    BenchmarkError,
    Stats,
    Table,
    fmt,
    fmt_mb,
    fmt_ratio,
    fmt_stats,
    interleaved,
    make_parser,
    memory_bandwidth,
    parse_args,
    repeat,
    report,
    run_main,
)
from benchmarks.model_files import (
    GPT2_SMALL,
    GPT2_SMOKE,
    benchmark_eos,
    checkpoint_file,
    file_weight_bytes,
    model_file,
    param_bytes,
    quantized_file,
)
from benchmarks.runners import (
    GREEDY,
    TorchSampler,
    decode_seconds_per_token,
    fed_context,
    hf_generate,
    hf_model,
    open_model,
    ours_generate,
    ours_session,
    torch_gpt2_decode,
    torch_model,
)

PROMPT = "ROMEO:"


@dataclass
class Row:
    """One runner's figures: seconds per generated token for a whole turn (prompt included) and, where the runner
    reports them apart (ours, llama.cpp), seconds per prompt token and per generated token."""

    name: str
    per_token: Stats
    tokens: list[int] | None  # greedy ids (None: llama-bench feeds random ids and shows none)
    weights: int | None = None
    file_bytes: int | None = None
    context: list[int] | None = None
    prompt: Stats | None = None
    gen: Stats | None = None


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="tokens per turn (default 64; smoke 8)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers row")
    parser.add_argument("--no-int8-encodings", action="store_true",
                        help="skip the int8 rows with u8 and s8 weights (\"ours int8\" is the default s7)")
    parser.add_argument("--no-llama-cpp", action="store_true",
                        help="skip the llama.cpp rows (they need `python -m benchmarks.llama_cpp setup` first)")
    parser.add_argument("--no-graph-levers", action="store_true",
                        help="skip the ORT GPT-2 optimizer and decomposed-attention rows (each costs an extra export)")
    args = parse_args(parser, argv)
    tokens = args.tokens or (8 if args.smoke else 64)
    spec = GPT2_SMOKE if args.smoke else GPT2_SMALL
    fp32 = model_file(spec, args.cache_dir)
    variants = [("ours fp32", fp32), ("ours int8", quantized_file(fp32, "int8", args.cache_dir)),
                ("ours int4", quantized_file(fp32, "int4", args.cache_dir))]
    if not args.no_int8_encodings:  # the int8 weight encodings (export/quantize.py INT8_WEIGHTS) side by side
        variants += [(f"ours int8, {weights} weights", quantized_file(fp32, "int8", args.cache_dir, weights))
                     for weights in ("u8", "s8")]
    notes = [graph_note(fp32), int8_encodings_note()]
    if not args.no_graph_levers:
        variants += graph_lever_variants(spec, fp32, args.cache_dir, notes)

    bandwidth = memory_bandwidth(args.threads, megabytes=64 if args.smoke else 512, repeats=3 if args.smoke else 10)
    rows = measure_ours(variants, tokens, args)
    gc.collect()
    torch_gpt2 = torch_model(spec, args.cache_dir, args.threads)
    parameters = param_bytes(torch_gpt2)
    context = rows[0].context or []  # the ids our session fed: the other runners get exactly these
    rows.append(measure_torch(torch_gpt2, context, tokens, args, parameters))
    if not args.no_hf:
        rows.append(measure_hf(torch_gpt2, context, tokens, args, parameters))
    del torch_gpt2
    gc.collect()
    if not args.no_llama_cpp:
        rows += measure_llama_cpp(spec, len(context), tokens, args, notes)

    levers = session_levers(fp32, tokens, args)
    tables = [speed_table(spec.name, rows, bandwidth, parameters, tokens, args)]
    versus = llama_cpp_table(rows)
    tables += [versus, levers] if versus else [levers]
    notes += [
        f"Memory bandwidth measured here: best {fmt(bandwidth.high / 1e9)} GB/s, median "
        f"{fmt(bandwidth.median / 1e9)} GB/s (torch sum over a {64 if args.smoke else 512} MB float32 array, "
        f"{args.threads} threads, {len(bandwidth.samples)} runs); the bound uses the best.",
    ]
    report(args, "gpt2_decode.py", "gpt2_decode", f"GPT-2 decode, batch 1, CPU, {args.threads} threads", tables,
           notes)
    return 0


# --- runners ------------------------------------------------------------------------------------------------------


def measure_ours(variants: list[tuple[str, Path]], tokens: int, args: Any) -> list[Row]:
    """Each file through runtime.generate.Session, the files taking turns (see common.interleaved)."""
    sessions = {name: ours_session(open_model(path, args.threads), GREEDY, tokens) for name, path in variants}
    results: dict[str, list[Any]] = {name: [] for name in sessions}

    def turn(name: str) -> float:
        result = ours_generate(sessions[name], PROMPT)
        results[name].append(result)
        return result.seconds / len(result.tokens)

    stats = interleaved({name: (lambda n=name: turn(n)) for name in sessions}, args.repeats)
    rows = []
    for name, path in variants:
        timed_turns = results[name][-args.repeats:]  # the warm-up turn is not counted
        last = timed_turns[-1]
        rows.append(Row(name, stats[name], last.tokens, file_weight_bytes(path), path.stat().st_size,
                        fed_context(sessions[name], last),
                        prompt=Stats([r.prompt_seconds / r.prompt_fed for r in timed_turns]),
                        gen=Stats([r.gen_seconds / len(r.tokens) for r in timed_turns])))
    return rows


def measure_llama_cpp(spec: Any, prompt_tokens: int, tokens: int, args: Any, notes: list[str]) -> list[Row]:
    """The same weights as GGUF (llama.cpp's converter; q8_0 / q4_0 by its quantizer) through llama-bench, or
    nothing and a note when there is no build (``python -m benchmarks.llama_cpp setup``)."""
    from benchmarks import llama_cpp

    build = llama_cpp.find(args.cache_dir)
    if build is None:
        notes.append(llama_cpp.missing_line(args.cache_dir))
        print(notes[-1], file=sys.stderr)
        return []
    files = llama_cpp.gguf_files(build, spec, args.cache_dir)
    results = llama_cpp.bench(build, files, args.threads, prompt_tokens, tokens, args.repeats)
    notes.append(f"llama.cpp build {build.commit()} from PyPI's llama-cpp-python {llama_cpp.VERSION} source package; "
                 f"`llama-bench -t {args.threads} -p {prompt_tokens} -n {tokens} -pg {prompt_tokens},{tokens} "
                 f"-r {args.repeats}` (random token ids, no sampling); GGUF by its convert_hf_to_gguf.py and "
                 "llama-quantize from the same weights.")
    return [Row(f"llama.cpp {result.kind}", result.turn_s_per_token, None, result.path.stat().st_size,
                result.path.stat().st_size, prompt=result.prompt_s_per_token, gen=result.gen_s_per_token)
            for result in results]


def measure_torch(model: Any, ids: list[int], tokens: int, args: Any, parameters: int) -> Row:
    eos = benchmark_eos(model.config.vocab_size)
    produced: list[list[int]] = []

    def turn() -> None:
        produced.append(torch_gpt2_decode(model, ids, tokens, TorchSampler(GREEDY), eos))

    per_turn = repeat(turn, args.repeats)
    return Row("PyTorch eager + KV cache (models.gpt2)", per_turn.scaled(1 / tokens), produced[-1], parameters)


def measure_hf(model: Any, ids: list[int], tokens: int, args: Any, parameters: int) -> Row:
    try:
        hf = hf_model(model, benchmark_eos(model.config.vocab_size))
    except ImportError as exc:
        raise BenchmarkError(f"transformers is not installed ({exc}); pass --no-hf") from exc
    eos = benchmark_eos(model.config.vocab_size)
    produced: list[list[int]] = []
    per_turn = repeat(lambda: produced.append(hf_generate(hf, ids, tokens, GREEDY, eos)), args.repeats)
    return Row("Hugging Face transformers generate", per_turn.scaled(1 / tokens), produced[-1], parameters)


# --- graph-level levers (export/optimize.py) ------------------------------------------------------------------------


def graph_lever_variants(spec: Any, fp32: Path, cache_dir: Path, notes: list[str]) -> list[tuple[str, Path]]:
    """The exporter's other GPT-2 graph (attention decomposed into MatMul/Softmax, TorchScript opset 17: the
    fallback) and the ORT GPT-2 optimizer applied to the default file."""
    from export.onnx_export import ExportError, export_checkpoint
    from export.optimize import OptimizeError, optimize_gpt2

    key = hashlib.sha256((REPO_ROOT / "export" / "optimize.py").read_bytes()).hexdigest()[:8]
    variants = []
    optimized = fp32.with_name(f"{fp32.stem}.ortopt-{key}.onnx")
    decomposed = fp32.with_name(f"{fp32.stem}.decomposed.onnx")  # fp32's stem already keys the exporter's source
    try:
        if not optimized.exists():
            result = optimize_gpt2(fp32, optimized)
            notes.append(f"ORT GPT-2 optimizer fused {result.fused}; file {fmt_mb(result.bytes)}.")
        variants.append(("ours fp32 + ORT GPT-2 optimizer (opt_level 0)", optimized))
    except OptimizeError as exc:
        notes.append(f"ORT GPT-2 optimizer row skipped: {exc}")
    try:
        if not decomposed.exists():
            print("exporting the decomposed-attention (opset 17) variant ...", file=sys.stderr, flush=True)
            export_checkpoint(checkpoint_file(spec, cache_dir), decomposed, attention="decomposed")
        variants.append(("ours fp32, decomposed attention (TorchScript opset 17, the fallback)", decomposed))
    except ExportError as exc:
        notes.append(f"decomposed-attention row skipped: {exc}")
    return variants


def int8_encodings_note() -> str:
    from runtime.cpu import has_vnni

    vnni = {True: "has", False: "lacks", None: "may or may not have"}[has_vnni()]
    return ("\"ours int8\" stores its weights as s7 (signed, 7-bit range: the default, exact on every x86 CPU); u8 "
            "(unsigned, full range) and s8 (signed, full range) rows beside it. This CPU "
            f"{vnni} VNNI, without which onnxruntime's u8 x s8 kernel can saturate with s8 weights.")


def graph_note(fp32: Path) -> str:
    """Which graph the exporter's default file is: the ONNX Attention op, or the fallback after a failure."""
    import onnx

    model = onnx.load(str(fp32), load_external_data=False)
    opset = max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    if any(node.op_type == "Attention" for node in model.graph.node):
        return f"\"ours\" files come from the exporter's default GPT-2 graph: opset {opset}, ONNX Attention op."
    return f"\"ours\" files: the exporter fell back to the decomposed-attention graph (opset {opset})."


# --- session-level levers ----------------------------------------------------------------------------------------


def session_levers(fp32: Path, tokens: int, args: Any) -> Table:
    """The runtime's plain step loop (no sampler) under different onnxruntime session settings."""
    table = Table("Session-level levers (fp32 file, runtime step loop without sampling)",
                  ["variant", "ms/token", "vs runtime default"])
    position = 8
    runtime_default = open_model(fp32, args.threads)
    runners = {
        f"runtime.session OnnxModel.run, {args.threads} intra-op threads":
            lambda: decode_seconds_per_token(runtime_default, position, tokens),
        "plain InferenceSession.run loop, numpy feeds (control for the rows below)":
            lambda: raw_seconds_per_token(fp32, args.threads, position, tokens, arena=True),
        "IO binding: state stays in OrtValues":
            lambda: io_binding_seconds_per_token(fp32, args.threads, position, tokens),
        "CPU memory arena off": lambda: raw_seconds_per_token(fp32, args.threads, position, tokens, arena=False),
        "thread-pool spinning off (session.intra_op.allow_spinning=0)":
            lambda: raw_seconds_per_token(fp32, args.threads, position, tokens, spinning=False),
    }
    if args.threads != 1:
        one_thread = open_model(fp32, 1)
        runners["intra-op threads 1"] = lambda: decode_seconds_per_token(one_thread, position, tokens)
    measured = interleaved(runners, args.repeats)
    variants = list(measured.items())
    baseline = variants[0][1]
    for name, stats in variants:
        table.add(name, fmt_stats(stats.scaled(1000)), fmt_ratio(baseline.median, stats.median))
    table.notes.append(f"{tokens} steps after an {position}-token prompt per run; ratio > 1 means faster.")
    gc.collect()
    return table


def _session(path: Path, threads: int, arena: bool = True, spinning: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()  # as runtime.session sets them, plus the lever under test
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    if not spinning:  # idle pool threads sleep instead of busy-waiting for the next op
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


_SESSIONS: dict[tuple[str, int, bool, bool], Any] = {}


def _cached_session(path: Path, threads: int, arena: bool = True, spinning: bool = True) -> Any:
    key = (str(path), threads, arena, spinning)
    if key not in _SESSIONS:
        _SESSIONS[key] = _session(path, threads, arena, spinning)
    return _SESSIONS[key]


def _feeds(ids: Any, past: int) -> dict[str, Any]:
    import numpy as np

    batch, seq = ids.shape
    feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
                             "position_ids": np.arange(past, past + seq, dtype=np.int64)[None, :]}
    return feeds


def _empty_state(session: Any) -> dict[str, Any]:
    import numpy as np

    state = {}
    for node in session.get_inputs():
        if node.name.startswith("past_key_values."):
            _, heads, _, head_dim = node.shape
            state[node.name] = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
    return state


def raw_seconds_per_token(path: Path, threads: int, position: int, steps: int, arena: bool = True,
                          spinning: bool = True) -> float:
    import numpy as np

    session = _cached_session(path, threads, arena, spinning)
    inputs = list(_empty_state(session))
    outputs = ["logits", *(name.replace("past_key_values.", "present.") for name in inputs)]
    state = _empty_state(session)
    ids = np.ones((1, position), dtype=np.int64)
    result = session.run(outputs, {**_feeds(ids, 0), **state})
    state = dict(zip(inputs, result[1:], strict=True))
    step = np.ones((1, 1), dtype=np.int64)
    started = time.perf_counter()
    for offset in range(steps):
        result = session.run(outputs, {**_feeds(step, position + offset), **state})
        state = dict(zip(inputs, result[1:], strict=True))
    return (time.perf_counter() - started) / steps


def io_binding_seconds_per_token(path: Path, threads: int, position: int, steps: int) -> float:
    """The same loop with IO binding: outputs stay OrtValues and are bound as the next step's inputs, and only
    the logits are read back into numpy."""
    import numpy as np
    import onnxruntime as ort

    session = _cached_session(path, threads)
    inputs = list(_empty_state(session))
    outputs = [name.replace("past_key_values.", "present.") for name in inputs]
    state = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in _empty_state(session).items()}
    binding = session.io_binding()

    def run(ids: Any, past: int) -> Any:
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in _feeds(ids, past).items():
            binding.bind_cpu_input(name, value)
        for name, value in state.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in outputs:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        state.update(zip(inputs, values[1:], strict=True))
        return values[0].numpy()[:, -1]

    run(np.ones((1, position), dtype=np.int64), 0)
    step = np.ones((1, 1), dtype=np.int64)
    started = time.perf_counter()
    for offset in range(steps):
        run(step, position + offset)
    return (time.perf_counter() - started) / steps


# --- the main table --------------------------------------------------------------------------------------------------


def speed_table(name: str, rows: list[Row], bandwidth: Stats, parameters: int, tokens: int, args: Any) -> Table:
    table = Table(
        f"{name}, batch 1, greedy, {tokens} tokens per turn, {args.repeats} turns",
        ["runner", "generation ms/token", "tok/s", "% of bound", "bandwidth bound ms/token", "prompt tok/s",
         "turn ms/token (prompt included)", "turn vs PyTorch eager", "weights read per token", "file size",
         "file / fp32 param bytes", "greedy tokens = PyTorch's"],
    )
    eager = next(row for row in rows if row.name.startswith("PyTorch"))
    for row in rows:
        gen_ms = row.gen.scaled(1000) if row.gen else None
        bound_ms = row.weights / bandwidth.high * 1000 if row.weights else None  # the best read rate seen
        same = (f"{sum(a == b for a, b in zip(row.tokens, eager.tokens, strict=False))}/{len(eager.tokens or [])}"
                if row.tokens is not None else "n/a")
        table.add(
            row.name, fmt_stats(gen_ms) if gen_ms else "n/a", fmt(1 / row.gen.median) if row.gen else "n/a",
            f"{100 * bound_ms / gen_ms.median:.0f}%" if bound_ms and gen_ms else "n/a", fmt(bound_ms),
            fmt(1 / row.prompt.median) if row.prompt else "n/a", fmt_stats(row.per_token.scaled(1000)),
            fmt_ratio(eager.per_token.median, row.per_token.median), fmt_mb(row.weights), fmt_mb(row.file_bytes),
            fmt_ratio(row.file_bytes, parameters) if row.file_bytes else "n/a", same,
        )
    table.notes.append(f"fp32 parameter bytes (tied embedding once): {fmt_mb(parameters)}.")
    table.notes.append("Generation and prompt figures are apart where the runner reports them apart (ours, "
                       "llama.cpp), as llama.cpp does; % of bound is on generation, the bandwidth-bound phase.")
    table.notes.append("Quantized files compute different logits, so their greedy tokens may differ legitimately.")
    return table


def llama_cpp_table(rows: list[Row]) -> Table | None:
    """Ours against llama.cpp at each precision: generation and prompt speed ratios (> 1: ours is faster)."""
    pairs = [("ours fp32", "llama.cpp f32"), ("ours int8", "llama.cpp q8_0"), ("ours int4", "llama.cpp q4_0")]
    by_name = {row.name: row for row in rows}
    table = Table("Ours vs llama.cpp, same weights, same run",
                  ["precision", "generation: ours / llama.cpp tok/s", "prompt: ours / llama.cpp tok/s",
                   "turn: ours / llama.cpp"])
    for ours, theirs in pairs:
        if ours in by_name and theirs in by_name:
            a, b = by_name[ours], by_name[theirs]
            table.add(f"{ours.split()[-1]} vs {theirs.split()[-1]}", fmt_ratio(b.gen.median, a.gen.median),
                      fmt_ratio(b.prompt.median, a.prompt.median), fmt_ratio(b.per_token.median, a.per_token.median))
    return table if table.rows else None


if __name__ == "__main__":
    run_main(main)
