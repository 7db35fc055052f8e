"""A graph-level speed lever for GPT-2 model files, checked for parity and file size before it is written.

* ``optimize_gpt2(src, dst)``: onnxruntime.transformers' GPT-2 fusion passes (SkipLayerNorm, BiasGelu /
  FastGelu, Attention when its pattern matcher recognises our graph). ``opt_level`` 0 runs only those Python
  fusions: on another GPT-2 graph, level 1's constant folding re-materialised the transposed LM-head weight and
  stored the tied embedding twice (652 MB for GPT-2 small). The result is refused when
  its weights grow beyond ``MAX_SIZE_RATIO`` x the source's or its logits drift from the source's.

The other lever measured here, exporting GPT-2 at opset 23 so that ``scaled_dot_product_attention`` becomes the
standard ONNX ``Attention`` op, started as an experiment in this module and is now the exporter's default GPT-2
graph (export/onnx_export.py, ``--attention``). benchmarks/gpt2_decode.py measures both against the decomposed-
attention graph; the numbers and verdicts are in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from export.graph import initializer_bytes, load_model
from runtime.atomic import atomic_write_bytes
from runtime.errors import first_line
from runtime.modelfile import ModelFileError, ModelInfo, decode_metadata

MAX_SIZE_RATIO = 1.05  # an optimised graph may store at most this much more weight data than the source
PARITY_TOLERANCE = 1e-3  # fusions reorder float arithmetic (FastGelu's tanh approximation): allow more than 1e-4
MAX_PROTO_BYTES = 2**31 - 1


class OptimizeError(Exception):
    """The optimisation cannot produce a correct, compact model file; the message is one line for the user."""


@dataclass
class OptimizeResult:
    path: Path
    bytes: int
    weight_bytes: int  # initializer bytes of the source file: the yardstick for the size check
    max_abs_diff: float  # largest logit difference against the source over the parity inputs
    fused: dict[str, int] = field(default_factory=dict)  # op type -> count of nodes the pass added


def optimize_gpt2(src_onnx: Path | str, dst_onnx: Path | str, opt_level: int = 0) -> OptimizeResult:
    """Run onnxruntime.transformers' GPT-2 optimizer on a textgen GPT-2 file and write the result to ``dst_onnx``."""
    from onnxruntime.transformers.optimizer import optimize_model

    source, target = Path(src_onnx), Path(dst_onnx)
    original = load_model(source, OptimizeError)
    info = _gpt2_info(original, source)
    config = info.model_config
    heads, width = int(config.get("n_head", 0)), int(config.get("n_embd", 0))
    if heads < 1 or width < 1:
        raise OptimizeError(f"{source}: metadata lacks n_head/n_embd, which the GPT-2 optimizer needs")
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # it logs every fusion at INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and prints shape-inference failures it recovers from
            optimized = optimize_model(str(source), model_type="gpt2", num_heads=heads, hidden_size=width,
                                       opt_level=opt_level, use_gpu=False).model
    except Exception as exc:  # noqa: BLE001 - the optimizer raises bare Exceptions and asserts
        raise OptimizeError(f"the GPT-2 optimizer failed: {first_line(exc)}") from exc
    return _finish(original, optimized, source, target, fused=_added_ops(original, optimized))


# --- the tail: metadata, size, parity, write -------------------------------------------------------------------


def _finish(original: onnx.ModelProto, candidate: onnx.ModelProto, source: Path, target: Path,
            fused: dict[str, int]) -> OptimizeResult:
    del candidate.metadata_props[:]
    candidate.metadata_props.extend(original.metadata_props)
    weight_bytes = initializer_bytes(original)
    if candidate.ByteSize() > MAX_PROTO_BYTES:
        raise OptimizeError("the optimised model is larger than 2 GB, the limit of one self-contained ONNX file")
    candidate_weights = initializer_bytes(candidate)
    if candidate_weights > MAX_SIZE_RATIO * weight_bytes:
        raise OptimizeError(
            f"the optimised graph would store {candidate_weights / weight_bytes:.2f}x the source's weight bytes "
            f"(limit {MAX_SIZE_RATIO}x): a weight is stored twice; nothing was written"
        )
    model_bytes = candidate.SerializeToString()
    max_diff = _parity(original.SerializeToString(), model_bytes)
    if not max_diff <= PARITY_TOLERANCE:
        raise OptimizeError(f"the optimised model's logits differ from the source's by {max_diff:.3g}; not written")
    try:
        atomic_write_bytes(target, lambda handle: handle.write(model_bytes))
    except OSError as exc:
        raise OptimizeError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return OptimizeResult(target, len(model_bytes), weight_bytes, max_diff, fused)


def _parity(reference_bytes: bytes, candidate_bytes: bytes) -> float:
    """Largest logit difference between the two files (export.verify.compare_model_files)."""
    from export.verify import compare_model_files
    from runtime.session import OnnxModel

    with tempfile.TemporaryDirectory(prefix="textgen-optimize-") as work:
        paths = [Path(work) / "reference.onnx", Path(work) / "candidate.onnx"]
        paths[0].write_bytes(reference_bytes)
        paths[1].write_bytes(candidate_bytes)
        reference, candidate = (OnnxModel.open(path, device="cpu", threads=1) for path in paths)
        return compare_model_files(reference, candidate)[0]


def _added_ops(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, int]:
    old, new = Counter(n.op_type for n in before.graph.node), Counter(n.op_type for n in after.graph.node)
    return {op: count for op, count in sorted(new.items()) if count > old.get(op, 0)}


def _gpt2_info(model: onnx.ModelProto, where: Path) -> ModelInfo:
    try:
        info = decode_metadata({prop.key: prop.value for prop in model.metadata_props}, where=str(where))
    except ModelFileError as exc:
        raise OptimizeError(str(exc)) from exc
    if info.arch != "gpt2":
        raise OptimizeError(f"{where} is a {info.arch} model; these optimisations are for GPT-2 files")
    return info
