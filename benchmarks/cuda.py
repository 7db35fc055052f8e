"""GPT-2 decode on a CUDA GPU: our model file through the runtime on onnxruntime's CUDA provider, against the same
loop on the CPU and PyTorch eager (KV cache) / Hugging Face ``generate`` on the GPU.

    python -m benchmarks.cuda            # GPT-2 small shape, fp32 and fp16 files, rewrites its docs section
    python -m benchmarks.cuda --smoke    # small shape, prints only

Without a usable CUDA device (no GPU, no driver, onnxruntime without the CUDA provider, missing CUDA/cuDNN
libraries) it prints ``skipped: <reason>`` and exits 0, leaving docs/benchmarks.md alone.

On a lent GPU machine that lacks onnxruntime-gpu (the device tool's H100/H200 image has the CPU build only):
``bash benchmarks/gpu_prepare.sh`` here cuts the wheel into pieces that fit one device call each, and
``bash benchmarks/gpu_run.sh`` there puts it together and runs the CUDA tests and this script.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Stats,
    Table,
    collect,
    fmt,
    fmt_ratio,
    fmt_stats,
    make_parser,
    parse_args,
    repeat,
    report,
    run_main,
)
from benchmarks.model_files import GPT2_SMALL, GPT2_SMOKE, benchmark_eos, model_file, quantized_file
from benchmarks.runners import (
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
)
from runtime.errors import first_line

PROMPT = "ROMEO:"


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="tokens per turn (default 64; smoke 8)")
    parser.add_argument("--batch", type=int, default=None, help="samples for the throughput table (64; smoke 4)")
    args = parse_args(parser, argv)
    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    tokens = args.tokens or (8 if args.smoke else 64)
    spec = GPT2_SMOKE if args.smoke else GPT2_SMALL
    path = model_file(spec, args.cache_dir)
    files = {"fp32": path, "fp16": quantized_file(path, "fp16", args.cache_dir)}
    rows: dict[str, Stats] = {
        f"ours {kind}, onnxruntime CUDA provider": ours(file, "cuda", tokens, args) for kind, file in files.items()
    }
    rows[f"ours fp32, onnxruntime CPU, {args.threads} threads"] = ours(path, "cpu", tokens, args)
    rows.update(torch_rows(spec, tokens, args, context_ids(path, args)))
    base = rows["ours fp32, onnxruntime CUDA provider"]
    table = Table(f"{spec.name}, batch 1, greedy, {tokens} tokens per turn, {args.repeats} turns",
                  ["runner", "ms/token", "tok/s", "speed vs ours fp32 on CUDA"])
    for name, per_token in rows.items():
        table.add(name, fmt_stats(per_token.scaled(1000)), fmt(1 / per_token.median),
                  fmt_ratio(base.median, per_token.median))
    batch = args.batch or (4 if args.smoke else 64)
    throughput = Table(f"{spec.name}, {batch} samples at once (Session.generate_n, what `textgen-repl --n "
                       f"{batch}` runs), {tokens} tokens each, {args.repeats} runs",
                       ["runner", "total tok/s", "vs the same file at batch 1"])
    for kind, file in files.items():
        many = batched_tokens_per_second(file, "cuda", tokens, batch, args)
        one = rows[f"ours {kind}, onnxruntime CUDA provider"]
        throughput.add(f"ours {kind}, onnxruntime CUDA provider", fmt_stats(many),
                       fmt_ratio(many.median, 1 / one.median))
    report(args, "cuda.py", "cuda", f"GPT-2 decode on CUDA ({gpu_name()})", [table, throughput])
    return 0


def cuda_unavailable_reason() -> str | None:
    """None when onnxruntime really runs a graph on CUDA here, else a one-line reason."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider"
    ort.set_default_logger_severity(4)  # the provider's own fallback errors are noise here
    missing = None
    if hasattr(ort, "preload_dlls"):
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):  # preload_dlls prints its failures
                ort.preload_dlls()
        except Exception:  # noqa: BLE001 - a failed preload shows up as a CPU-only session below
            pass
        found = re.search(r"Failed to load (\S+?):", captured.getvalue())
        missing = found.group(1) if found else None
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(probe)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CUDAExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure means no CUDA for us
        return f"CUDA session failed: {first_line(exc)}"
    finally:
        ort.set_default_logger_severity(3)
    if "CUDAExecutionProvider" not in session.get_providers():
        detail = f"; {missing} not found" if missing else ""
        return f"no usable CUDA device (onnxruntime fell back to the CPU{detail})"
    return None


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "CUDA GPU"


def ours(path: Path, device: str, tokens: int, args: Any) -> Stats:
    model = open_model(path, args.threads, device=device)
    session = ours_session(model, GREEDY, tokens)
    return collect(lambda: _per_token(ours_generate(session, PROMPT)), args.repeats)


def batched_tokens_per_second(path: Path, device: str, tokens: int, batch: int, args: Any) -> Stats:
    """Total tokens/s of ``batch`` samples decoded together; the KV cache of all rows stays on the device."""
    session = ours_session(open_model(path, args.threads, device=device), GREEDY, tokens)

    def run() -> float:
        session.reset()
        results = session.generate_n(PROMPT, batch)
        return sum(len(result.tokens) for result in results) / max(result.seconds for result in results)

    return collect(run, args.repeats)


def _per_token(result: Any) -> float:
    return result.seconds / len(result.tokens)


def context_ids(path: Path, args: Any) -> list[int]:
    """The ids our session feeds for PROMPT (the prompt plus any document-start token it adds)."""
    session = ours_session(open_model(path, args.threads, device="cpu"), GREEDY, 1)
    return fed_context(session, ours_generate(session, PROMPT))


def torch_rows(spec: Any, tokens: int, args: Any, ids: list[int]) -> dict[str, Stats]:
    import torch

    if not torch.cuda.is_available():
        return {}
    model = torch_model(spec, args.cache_dir, args.threads).to("cuda")
    eos = benchmark_eos(spec.vocab_size)

    def eager() -> None:
        torch_gpt2_decode(model, ids, tokens, TorchSampler(GREEDY), eos)
        torch.cuda.synchronize()

    rows = {"PyTorch eager + KV cache, CUDA": repeat(eager, args.repeats).scaled(1 / tokens)}
    try:
        hf = hf_model(model.cpu(), eos).to("cuda")
    except ImportError:
        return rows
    rows["Hugging Face transformers generate, CUDA"] = repeat(
        lambda: hf_generate(hf, ids, tokens, GREEDY, eos), args.repeats).scaled(1 / tokens)
    return rows


if __name__ == "__main__":
    run_main(main)
