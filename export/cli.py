"""`textgen-export` / `python -m export`: turn a checkpoint or Hugging Face GPT-2 directory into one .onnx file.

User errors (unusable checkpoint, unusable HF directory, failed verification) print one `error: ...` line on
stderr and exit with code 2; there is never a traceback for them. When a GPT-2's opset-23 Attention-op graph
cannot be used and the slower TorchScript graph is written instead, one `notice: ...` line on stderr says why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from runtime.errors import first_line

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before the error; a bad flag here is one ``error: ...`` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="textgen-export",
        description="Export a textgen checkpoint (or a Hugging Face GPT-2 directory) to one verified ONNX file.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file from textgen-train, or an HF GPT-2 dir")
    parser.add_argument("--output", help="where to write the .onnx file (default: beside the checkpoint)")
    parser.add_argument(
        "--opset", type=int, default=None,
        help="ONNX opset of the TorchScript graph (RNNs, GPT-2 with --attention decomposed): default 17, 14..20; "
        "GPT-2's Attention-op graph is always opset 23, and an explicit 14..20 selects the decomposed graph",
    )
    parser.add_argument(
        "--attention", choices=("auto", "op", "decomposed"), default="auto",
        help="GPT-2 only. auto (default): the ONNX Attention op (opset 23, dynamo exporter; faster CPU decoding, "
        "needs onnxruntime >= 1.23), falling back with a notice to the decomposed graph if that export "
        "or its check fails; op: the Attention op or an error; decomposed: MatMul/Softmax attention "
        "(TorchScript exporter, opset 17, any onnxruntime >= 1.18)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest allowed ONNX-vs-PyTorch logit difference (1e-4)"
    )
    parser.add_argument(
        "--quantize", choices=("int8", "int4", "fp16"), default=None,
        help="also write a smaller copy beside the fp32 file: NAME.int8.onnx / NAME.int4.onnx for CPU decoding, "
        "NAME.fp16.onnx (GPT-2: float16 weights and KV cache) for GPU decoding",
    )
    parser.add_argument(
        "--int8-weights", choices=("s7", "s8", "u8"), default=None,
        help="with --quantize int8: how the weights are stored. s7 (default): signed, 7-bit range, exact on "
        "every x86 CPU; u8: unsigned, full 8-bit range, exact everywhere; s8: signed, full range, exact only on "
        "CPUs with VNNI (others saturate; the runtime warns when such a file is opened there)",
    )
    parser.add_argument(
        "--eval-text", metavar="FILE", default=None,
        help="with --quantize: held-out text to measure the quantized file's perplexity cost on",
    )
    return parser


# Perplexity increase above which a quantized file is reported as too lossy (issue 6's limits).
QUANTIZE_LIMITS = {"int8": 0.02, "int4": 0.05, "fp16": 0.01}


def _user_errors() -> tuple[type[BaseException], ...]:
    from export.onnx_export import ExportError
    from export.quantize import QuantizeError
    from models.checkpoint import CheckpointError

    errors: list[type[BaseException]] = [CheckpointError, ExportError, QuantizeError]
    try:
        from models.hf_gpt2 import HFImportError
    except ImportError:  # no HF importer in this installation; directories are then refused with ExportError
        pass
    else:
        errors.append(HFImportError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.checkpoint).exists():  # answer at once, before paying for importing torch
        print(f"error: checkpoint not found: {args.checkpoint}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.eval_text and not args.quantize:
        print("error: --eval-text goes with --quantize", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.int8_weights and args.quantize != "int8":
        print("error: --int8-weights goes with --quantize int8", file=sys.stderr)
        return EXIT_USER_ERROR
    problem = _early_problem(args)  # answered in the first second, before torch is imported
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        from export.onnx_export import ATTENTION_OPSET, export_checkpoint

        result = export_checkpoint(args.checkpoint, args.output, opset=args.opset, tolerance=args.tolerance,
                                   attention=args.attention)
        if result.fallback:
            reason = first_line(result.fallback)
            print(f"notice: the opset-{ATTENTION_OPSET} Attention-op graph was not used ({reason}); wrote the "
                  "decomposed-attention graph instead (correct, slower on CPU)", file=sys.stderr)
        if result.write_failure:
            print(f"warning: could not write {result.write_failure}; wrote the verified file to {result.path} "
                  "instead", file=sys.stderr)
        graph = f"opset {result.opset}" + (", ONNX Attention op" if result.attention_op else "")
        print(f"wrote {result.path} ({_human_size(result.bytes)}, {result.arch}, {graph})")
        print(f"verified with onnxruntime {result.provider}: max abs logit diff {result.max_abs_diff:.3g}")
        if args.quantize:
            return _quantize(result.path, args.quantize, args.eval_text, args.int8_weights)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _early_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the input or output path that needs no torch to see: a file that is not a checkpoint
    (an ONNX model, anything else), and an --output that is a folder, the input itself or unwritable."""
    from runtime.atomic import OutputPathError, check_output_path
    from runtime.filekind import sniff_file_kind

    source = Path(args.checkpoint)
    if source.is_file():
        try:
            kind = sniff_file_kind(source)
        except OSError as exc:
            return f"cannot read {source}: {exc.strerror or exc}"
        if kind == "onnx":
            return f"{source} is an ONNX model, not a checkpoint — open it with textgen-repl --model {source}"
        if kind == "other":
            return f"{source} is not a PyTorch checkpoint (textgen-train writes a PyTorch zip file)"
        if kind == "empty":
            return f"{source} is empty"
    if args.output is not None:
        target = Path(args.output)
    elif source.is_dir():
        target = source.resolve().parent / f"{source.resolve().name}.onnx"
    else:
        target = source.with_suffix(".onnx")
    try:
        check_output_path(target, "--output", inputs=(source,))
    except OutputPathError as exc:
        return str(exc)
    return None


def _quantize(fp32_path: Path, mode: str, eval_text: str | None, int8_weights: str | None = None) -> int:
    """Write NAME.MODE.onnx beside the fp32 file; with eval_text, report (and judge) its perplexity cost."""
    from export.quantize import DEFAULT_INT8_WEIGHTS, QuantizeError, perplexity_cost, quantize_model
    from runtime.cpu import has_vnni, int8_weights_saturate

    target = fp32_path.with_name(f"{fp32_path.stem}.{mode}.onnx")
    weights = int8_weights or DEFAULT_INT8_WEIGHTS
    quantize_model(fp32_path, target, mode, weights)  # type: ignore[arg-type]
    print(f"wrote {target} ({_human_size(target.stat().st_size)}, {mode}"
          + (f", {weights} weights)" if mode == "int8" else ")"))
    if mode == "int8" and int8_weights_saturate(weights, has_vnni()):
        print("warning: s8 weights can saturate on CPUs without VNNI, like this one, so this file's logits may be off "
              "here (--int8-weights s7 or u8 are exact everywhere)", file=sys.stderr)
    if eval_text is None:
        return 0
    try:
        text = Path(eval_text).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantizeError(f"cannot read --eval-text {eval_text}: {exc}") from None
    ppl_fp32, ppl_q, increase = perplexity_cost(fp32_path, target, text)
    print(f"perplexity on {eval_text}: fp32 {ppl_fp32:.4f}, {mode} {ppl_q:.4f} ({increase:+.3%})")
    limit = QUANTIZE_LIMITS[mode]
    if increase > limit:
        print(f"warning: {mode} costs {increase:.2%} perplexity, above the {limit:.0%} limit; prefer the fp32 file",
              file=sys.stderr)
    return 0


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    value = size / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


if __name__ == "__main__":
    sys.exit(main())
