"""textgen-eval: the command line of runtime.evaluation (what is measured, and how, is documented there).

This module is the command: argument parsing and checks, loading the model files and corpora, progress, the
results table, ``--csv`` and ``--json`` output, and the exit codes (a bad input is one line ``error: ...`` and exit
2; Ctrl-C exits 130).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from runtime.atomic import OutputPathError, check_output_path
from runtime.evaluation import (
    BASES,
    DEFAULT_SAMPLES_BATCH,
    DEFAULT_SEED,
    JUDGE_COLUMN,
    METRIC_COLUMNS,
    NOVELTY_COLUMNS,
    EvalError,
    GenerationPlan,
    MetricsRow,
    PerplexityResult,
    SampleBatchResult,
    Sweep,
    base_defaults,
    base_settings,
    draw_samples,
    evaluate_documents,
    json_ready,
    judge_nats,
    reference_metrics,
    resolve_seed,
    sample_metrics,
    sweep_grid,
)
from runtime.logprobs import MAX_TOP
from runtime.modelfile import ModelFileError
from runtime.sampling import SettingError
from runtime.scoring import PROTOCOL_NAMES, SLIDING, ProgressCallback, ScoringError, ScoringProtocol, default_protocol
from runtime.session import ModelRunError, OnnxModel
from runtime.settings import build_settings
from runtime.textmetrics import Novelty

# Short table headers (the table must fit a terminal) and the legend printed under it.
METRIC_TITLES = {
    "unique_word_rate": "uniq-w", "distinct_1": "dist-1", "distinct_2": "dist-2", "distinct_3": "dist-3",
    "entropy": "H/step", "mean_tokens": "tokens", "mean_words": "words", "eos_share": "eos",
    JUDGE_COLUMN: "judge", "verbatim_share": "verbatim", "copied_ngram_share": "copied",
}
LEGEND = (
    "uniq-w: distinct/total words within a sample (mean); dist-n: distinct word n-grams over all samples; "
    "H/step: entropy of the sampling distribution (nats); tokens, words: mean length; eos: share of samples "
    "that ended on end-of-text"
)
JUDGE_LEGEND = "; judge: nats/token under the judge model"
NOVELTY_LEGEND = ("; verbatim: share of samples found verbatim in {corpus} (whole lines); copied: share of the "
                  "samples' word {n}-grams found in it")



# ================================================================================================ arguments


def parse_assignment(raw: str, option: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not key.strip():
        raise EvalError(f"{option} expects KEY=VALUE, got {raw!r}")
    return key.strip(), value.strip()


def parse_sweeps(raw_sweeps: Sequence[str]) -> list[Sweep]:
    sweeps: list[Sweep] = []
    for raw in raw_sweeps:
        key, values = parse_assignment(raw, "--sweep")
        items = tuple(value.strip() for value in values.split(","))
        if not values or any(not item for item in items):
            raise EvalError(f"--sweep {key}= needs a comma-separated list of values, got {values!r}")
        if any(sweep.key == key for sweep in sweeps):
            raise EvalError(f"--sweep {key} given twice; list all its values in one --sweep")
        sweeps.append(Sweep(key, items))
    return sweeps


ALWAYS_SHOWN = ("temperature", "top_k", "top_p")  # printed in the base line even at their built-in values


def base_line(base: dict[str, dict[str, Any]]) -> str:
    shown = [f"{key} {entry['value']} ({entry['source']})" for key, entry in base.items()
             if key in ALWAYS_SHOWN or entry["source"] != "default"]
    return "base settings of every row: " + ", ".join(shown)


# ================================================================================================ output


LENGTH_COLUMNS = ("mean_tokens", "mean_words")


def format_metric(value: float | None, decimals: int = 3) -> str:
    """A table cell: fixed decimals, an em dash for a value that is undefined (NaN) or missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{decimals}f}"


def table_columns(sweeps: Sequence[Sweep], with_judge: bool, extra: Sequence[str] = ()) -> list[str]:
    keys = [s.key for s in sweeps] or ["run"]
    return [*keys, *METRIC_COLUMNS, *([JUDGE_COLUMN] if with_judge else []), *extra]


def row_cells(row: MetricsRow, sweeps: Sequence[Sweep], columns: Sequence[str], reference: bool) -> list[str]:
    keys = [s.key for s in sweeps] or ["run"]
    cells = []
    for column in columns:
        if column in keys:
            if reference:
                cells.append("reference" if column == keys[0] else "")
            else:
                cells.append(row.label.get(column, "samples"))
        else:
            cells.append(format_metric(row.metrics.get(column), 1 if column in LENGTH_COLUMNS else 3))
    return cells


def render_table(rows: Sequence[MetricsRow], reference: MetricsRow | None, sweeps: Sequence[Sweep],
                 with_judge: bool, title: str = "sampling metrics", extra: Sequence[str] = ()) -> Any:
    from rich import box
    from rich.table import Table

    columns = table_columns(sweeps, with_judge, extra)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in columns:
        numeric = column in METRIC_TITLES
        table.add_column(METRIC_TITLES.get(column, column), justify="right" if numeric else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row_cells(row, sweeps, columns, reference=False))
    if reference is not None:
        table.add_row(*row_cells(reference, sweeps, columns, reference=True), style="dim")
    return table


def write_csv(path: Path, rows: Sequence[MetricsRow], reference: MetricsRow | None, sweeps: Sequence[Sweep],
              with_judge: bool, extra: Sequence[str] = ()) -> None:
    """One line per row; metric cells are plain numbers (empty when undefined) for spreadsheets and pandas."""
    columns = table_columns(sweeps, with_judge, extra)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row, is_reference in [*((r, False) for r in rows), *([(reference, True)] if reference else [])]:
        cells = row_cells(row, sweeps, columns, is_reference)
        writer.writerow([_csv_number(row.metrics.get(c)) if c in METRIC_TITLES else cell
                         for c, cell in zip(columns, cells, strict=True)])
    try:
        path.write_text(buffer.getvalue(), encoding="utf-8")
    except OSError as exc:
        raise EvalError(f"cannot write {path}: {exc.strerror or exc}") from None


def _csv_number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return ""
    return repr(float(value))


# ================================================================================================ CLI

EPILOG = """\
perplexity protocols (--protocol): stateful, the default for RNNs (state carried over the whole text, exact);
sliding, the default for GPT-2 (windows of context_length tokens moved by --stride, default half the window; each
token is scored once, with at least window - stride + 1 tokens of context except at the start: Hugging Face's
perplexity recipe); windows (non-overlapping windows of context_length tokens, each from an empty context, as the
trainer's GPT-2 validation). The softmax runs over the tokenizer's real ids only (vocabulary padding left out).
Documents are joined with the end-of-text token, which is scored too; bits/char counts each separator as one
character.

sampling metrics: unique-word rate is per sample (low = loops); distinct-n is pooled over samples (low = samples
alike); entropy is that of the sampling distribution after the sampler chain (0 for greedy). Each sample starts
from the end-of-text token plus --prompt; stop strings and beam search are not used here.

examples:
  textgen-eval --model m.onnx --data held_out.txt
  textgen-eval --model m.onnx --samples 50 --reference held_out.txt --sweep temp=0.7,1.0 --sweep top_p=0.9,1
  textgen-eval --model m.onnx --samples 20 --judge big.onnx --sweep sampler=greedy,sample --csv out.csv
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line `error: ...` and exit 2 like every other textgen error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see textgen-eval --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="textgen-eval",
        description="Evaluate a textgen model file: perplexity on held-out text and sampling diversity.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="model file (.onnx); default: the bundled demo model")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (auto: CUDA when usable, else CPU)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: physical cores)")
    data = parser.add_argument_group("perplexity")
    data.add_argument("--data", help="held-out text to score")
    data.add_argument("--format", default="auto", help="corpus format: auto|text|csv|tsv|docs|dir (default auto)")
    data.add_argument("--column", help="CSV/TSV column holding the text")
    data.add_argument("--protocol", choices=PROTOCOL_NAMES, default=None,
                      help="scoring protocol (default: stateful for RNNs, sliding for GPT-2)")
    data.add_argument("--stride", type=int, default=None,
                      help="GPT-2 sliding-window stride in tokens (default: half the context length)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--samples", type=int, default=0, metavar="N", help="number of samples to generate")
    sampling.add_argument("--prompt", default="", help="text every sample continues (default: none)")
    sampling.add_argument("--max-tokens", type=int, default=None, help="tokens per sample (default: model's)")
    sampling.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a sampler setting")
    sampling.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                          help="evaluate every value (repeatable: the grid of all combinations)")
    sampling.add_argument("--base", choices=BASES, default="model",
                          help="what the rows start from: the model file's settings (default; a sweep changes only "
                          "its key, the file's top_k/top_p stay) or plain (top_k 0, top_p 1, temperature 1)")
    sampling.add_argument("--seed", type=int, default=None, help=f"sampling seed (default {DEFAULT_SEED})")
    sampling.add_argument("--batch-size", type=int, default=DEFAULT_SAMPLES_BATCH, help="samples per batch")
    sampling.add_argument("--reference", help="held-out text to compare the samples' metrics with "
                          "(read with the same --format/--column as --data)")
    sampling.add_argument("--judge", help="another model file: cross-entropy of the samples under it")
    sampling.add_argument("--novelty", metavar="CORPUS",
                          help="share of samples found verbatim in CORPUS and of their word n-grams copied from it")
    sampling.add_argument("--novelty-n", type=int, default=4, metavar="N", help="n for --novelty (default 4)")
    output = parser.add_argument_group("output")
    output.add_argument("--csv", help="also write the sampling table to this CSV file")
    output.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    output.add_argument("--logprobs", type=int, default=None, metavar="N",
                        help=f"with --json and --samples: each row lists its samples with every token's "
                             f"log-probabilities and N (0-{MAX_TOP}) alternatives, as textgen-repl --logprobs")
    return parser


def _default_model() -> Path:
    from importlib import resources

    path = Path(str(resources.files("repl.demo") / "demo.onnx"))
    if not path.is_file():
        raise EvalError("no --model given and the bundled demo model (repl/demo/demo.onnx) is missing")
    return path


def _open_model(path: str | Path, device: str, threads: int | None) -> OnnxModel:
    return OnnxModel.open(path, device=device, threads=threads)


def _load_documents(path: str, fmt: str, column: str | None) -> tuple[list[str], bool]:
    from runtime.corpus import CorpusError, load_corpus

    try:
        corpus = load_corpus(path, fmt=fmt, column=column)
    except CorpusError as exc:
        raise EvalError(str(exc)) from None
    return corpus.documents, corpus.single_stream


def _check_arguments(args: argparse.Namespace) -> None:
    if not args.data and args.samples <= 0:
        raise EvalError("nothing to do: give --data FILE (perplexity) and/or --samples N (sampling metrics)")
    if args.samples < 0:
        raise EvalError(f"--samples must be >= 0, got {args.samples}")
    if args.samples == 0 and (args.sweep or args.reference or args.judge or args.csv or args.novelty):
        raise EvalError("--sweep, --reference, --judge, --novelty and --csv need --samples N")
    if args.logprobs is not None:
        if not 0 <= args.logprobs <= MAX_TOP:
            raise EvalError(f"--logprobs must be an integer from 0 to {MAX_TOP}, got {args.logprobs}")
        if not (args.json and args.samples > 0):
            raise EvalError("--logprobs needs --json and --samples N (it adds each sample's token records to the "
                            "JSON sampling rows)")
    if args.novelty_n < 1:
        raise EvalError(f"--novelty-n must be >= 1, got {args.novelty_n}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise EvalError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed is not None and args.seed < 0:
        raise EvalError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        raise EvalError(f"--threads must be >= 1, got {args.threads}")


def run_sampling(model: OnnxModel, args: argparse.Namespace, sweeps: Sequence[Sweep],
                 fixed: Sequence[tuple[str, str]], judge: OnnxModel | None,
                 notice: Callable[[str], None], novelty: Novelty | None = None) -> list[MetricsRow]:
    grid = sweep_grid(sweeps)
    defaults = base_defaults(model.info.generation, args.base)
    all_settings = [build_settings(defaults, fixed, combo) for combo in grid]  # fail fast on values
    rows = []
    for index, (combination, settings) in enumerate(zip(grid, all_settings, strict=True), start=1):
        if len(grid) > 1:
            notice(f"[{index}/{len(grid)}] " + ", ".join(f"{k}={v}" for k, v in combination.items()))
        plan = GenerationPlan(args.samples, args.prompt, args.max_tokens, args.seed, args.batch_size, args.logprobs)
        result = draw_samples(model, settings, plan)
        metrics = sample_metrics(result)
        if judge is not None:
            metrics[JUDGE_COLUMN] = judge_nats(judge, args.prompt, result.texts)
        if novelty is not None:
            metrics.update(zip(NOVELTY_COLUMNS, novelty.measure(result.texts), strict=True))
        rows.append(MetricsRow(dict(combination), metrics, resolve_seed(args.seed, settings), result.seconds,
                               result.texts, _sample_details(result)))
    return rows


def _sample_details(result: SampleBatchResult) -> list[dict[str, Any]] | None:
    if result.logprobs is None:
        return None
    return [{"text": text, "tokens": tokens, "logprobs": records}
            for text, tokens, records in zip(result.texts, result.tokens, result.logprobs, strict=True)]


def _reference_row(model: OnnxModel, args: argparse.Namespace, rows: Sequence[MetricsRow],
                   notice: Callable[[str], None]) -> MetricsRow:
    documents, single = _load_documents(args.reference, args.format, args.column)
    lengths = [row.metrics["mean_tokens"] for row in rows if math.isfinite(row.metrics["mean_tokens"])]
    mean_tokens = sum(lengths) / len(lengths) if lengths else 1.0
    metrics, n_chunks = reference_metrics(model, documents, single, args.samples, mean_tokens)
    if n_chunks < args.samples:
        notice(f"reference text only holds {n_chunks} chunks of {max(1, round(mean_tokens))} tokens "
               f"(wanted {args.samples})")
    return MetricsRow({}, metrics)


def _protocol(model: OnnxModel, name: str | None, stride: int | None) -> ScoringProtocol:
    """The protocol --protocol/--stride ask for (runtime.scoring.default_protocol), errors worded for the CLI."""
    context = model.info.context_length
    if stride is not None and name not in (None, SLIDING):
        raise EvalError(f"--stride applies to --protocol sliding, not to {name}")
    if stride is not None and not 1 <= stride <= context:
        raise EvalError(f"--stride must be between 1 and the model's context length {context}, got {stride}")
    try:
        return default_protocol(model, name, stride)
    except ScoringError as exc:
        raise EvalError(str(exc)) from None


def _perplexity_lines(result: PerplexityResult, path: str) -> list[str]:
    lines = [
        f"perplexity on {path}: {result.perplexity:.4g}",
        f"  {result.nats_per_token:.4f} nats/token, {result.bits_per_token:.4f} bits/token, "
        f"{result.nats_per_word:.4f} nats/word (perplexity per word {result.perplexity_per_word:.4g}), "
        f"{result.bits_per_char:.4f} bits/char",
        f"  {result.n_tokens:,} tokens, {result.n_words:,} words, {result.n_chars:,} characters; "
        f"protocol {result.protocol.describe()}",
    ]
    if result.n_unknown:
        lines.append(f"  {result.n_unknown:,} tokens were unknown to the tokenizer and scored as <unk>")
    return lines


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    _check_arguments(args)
    sweeps = parse_sweeps(args.sweep)
    fixed = [parse_assignment(raw, "--set") for raw in args.set]
    console = Console(stderr=args.json, highlight=False)
    if not console.is_terminal:
        console.width = 200  # piped output: never squeeze or wrap the table to a default 80 columns
    err = Console(stderr=True, highlight=False)

    def notice(text: str) -> None:
        err.print(text, style="dim", markup=False, emoji=False, soft_wrap=True)

    model_path = Path(args.model) if args.model else _default_model()
    model = _open_model(model_path, args.device, args.threads)
    judge = _open_model(args.judge, args.device, args.threads) if args.judge else None
    report: dict[str, Any] = {"model": str(model_path), "arch": model.info.arch}
    if args.data:
        documents, single = _load_documents(args.data, args.format, args.column)
        if model.info.context_length == 0 and args.stride is not None:
            notice("--stride is ignored for RNN models: they are scored statefully over the whole text")
        stride = args.stride if model.info.context_length else None
        protocol = _protocol(model, args.protocol, stride)
        with _progress(err, f"scoring {args.data}") as on_progress:
            result = evaluate_documents(model, documents, single, protocol=protocol, on_progress=on_progress)
        report["perplexity"] = result.as_dict() | {"data": args.data}
        if not args.json:
            for line in _perplexity_lines(result, args.data):
                console.print(line, markup=False, emoji=False, soft_wrap=True)
    if args.samples > 0:
        base = base_settings(model.info.generation, fixed, sweeps, args.base)
        if args.max_tokens is not None:
            base["max_new_tokens"] = {"value": args.max_tokens, "source": "cli"}
        novelty = Novelty(_load_documents(args.novelty, args.format, args.column)[0], args.novelty_n) \
            if args.novelty else None
        extra = NOVELTY_COLUMNS if novelty is not None else ()
        rows = run_sampling(model, args, sweeps, fixed, judge, notice, novelty)
        reference = _reference_row(model, args, rows, notice) if args.reference else None
        report["sampling"] = _sampling_report(args, rows, reference)
        report["sampling"]["base"] = {"from": args.base, "settings": base}
        if args.csv:
            write_csv(Path(args.csv), rows, reference, sweeps, judge is not None, extra)
        if not args.json:
            console.print(base_line(base), markup=False, emoji=False, soft_wrap=True)
            console.print(render_table(rows, reference, sweeps, judge is not None, _table_title(args, rows), extra))
            legend = NOVELTY_LEGEND.format(corpus=args.novelty, n=args.novelty_n) if novelty is not None else ""
            notice(LEGEND + (JUDGE_LEGEND if judge is not None else "") + legend)
            if judge is not None:
                notice("note: repetitive text is easy to predict, so it gets a LOW judge loss; "
                       "read the judge column together with uniq-w and dist-n")
    if args.json:
        sys.stdout.write(json.dumps(json_ready(report)) + "\n")
    return 0


@contextlib.contextmanager
def _progress(console: Any, description: str) -> Iterator[ProgressCallback | None]:
    """A transient rich progress bar on a terminal; nothing when stderr is piped."""
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _table_title(args: argparse.Namespace, rows: Sequence[MetricsRow]) -> str:
    seed = rows[0].seed if rows else None
    prompt = f", prompt {args.prompt!r}" if args.prompt else ""
    return f"sampling metrics: {args.samples} samples per row, seed {seed}{prompt}"


def _sampling_report(args: argparse.Namespace, rows: Sequence[MetricsRow],
                     reference: MetricsRow | None) -> dict[str, Any]:
    return {
        "samples": args.samples,
        "prompt": args.prompt,
        "set": dict(parse_assignment(raw, "--set") for raw in args.set),
        "judge": args.judge,
        "rows": [_row_report(row) for row in rows],
        "reference": None if reference is None else {"data": args.reference, **reference.metrics},
    }


def _row_report(row: MetricsRow) -> dict[str, Any]:
    report = {"settings": row.label, "seed": row.seed, "seconds": row.seconds, **row.metrics}
    if row.sample_details is not None:  # --logprobs: each sample with its per-token records
        report["samples"] = row.sample_details
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.csv is not None:  # refused before the model loads, not after the whole evaluation
            check_output_path(args.csv, "--csv", inputs=tuple(p for p in (args.model, args.data, args.reference) if p))
        return _run(args)
    except (EvalError, ModelFileError, ModelRunError, SettingError, OutputPathError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
