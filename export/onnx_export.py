"""Checkpoint (or Hugging Face GPT-2 directory) -> one verified, self-contained textgen .onnx file.

Pipeline: load the source -> export a flat-signature adapter -> check the graph's names and symbolic axes -> store
tied weights once -> write the docs/model-file.md metadata -> `onnx.checker` -> run the serialized bytes in
onnxruntime against PyTorch -> only then write the file atomically.

Two exporters, chosen by architecture:

* RNNs: the TorchScript exporter at opset 17 (fully dynamic LSTM/GRU graphs; the dynamo exporter froze dims of
  recurrent graphs).
* GPT-2 (``attention="auto"``, the default): the dynamo exporter at opset 23, where ``scaled_dot_product_attention``
  becomes the standard ONNX ``Attention`` op: one kernel per layer instead of MatMul/Softmax/MatMul, faster
  GPT-2 decoding on CPU, tiny GPTs most of all (docs/benchmarks.md has the figures). It is
  exported from (batch, seq, past) = (2, 3, 4) so no axis is frozen, and goes through the same checks and parity
  runs as any other graph. If the
  dynamo export raises or any check fails, the TorchScript opset-17 graph (attention decomposed into
  MatMul/Softmax) is written instead and ``ExportResult.fallback`` says why: older torch or onnxruntime
  versions still get a correct, if slower, file. ``attention="op"`` makes that failure an error;
  ``attention="decomposed"`` skips the attempt.

Generation defaults stored in the file are runtime.defaults.DEFAULT_GENERATION overridden key by key by the
checkpoint's "generation" dict.

Verification tolerance: the check fails when max |logit_onnx - logit_torch| > tolerance * max(1, peak |logit|).
For the small-logit models textgen trains this is a plain absolute tolerance; for models with logits near
-100 (pretrained GPT-2) it scales with float32's resolution at that magnitude instead of failing on rounding.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, is_dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from tokenizers import Tokenizer
from torch import nn

from export.adapters import (
    GPT2ExportAdapter,
    GraphSignature,
    RNNExportAdapter,
    gpt2_signature,
    rnn_signature,
)
from export.attention_cache import fuse_attention_cache
from export.graph import (
    GraphCheckError,
    check_signature,
    dedupe_initializers,
    fold_weight_transposes,
    initializer_bytes,
)
from export.verify import Verification, VerificationError, verify_gpt2, verify_rnn
from models.checkpoint import CheckpointError, load_checkpoint
from models.registry import model_from_checkpoint
from runtime.atomic import write_with_fallback
from runtime.defaults import DEFAULT_GENERATION
from runtime.errors import first_line
from runtime.modelfile import ModelInfo, SpecialTokens, encode_metadata

DEFAULT_OPSET = 17  # TorchScript graphs: LSTM/GRU ops and decomposed GPT-2 attention; onnxruntime 1.18+ runs it
MIN_OPSET, MAX_OPSET = 14, 20  # 14: Trilu/LSTM layout; 20: the TorchScript exporter's ceiling in torch 2.x
ATTENTION_OPSET = 23  # the first opset with the ONNX Attention op; onnxruntime has a CPU kernel from 1.23
AttentionMode = Literal["auto", "op", "decomposed"]
ATTENTION_MODES: tuple[str, ...] = ("auto", "op", "decomposed")
MAX_WEIGHT_RATIO = 1.05  # a GPT-2 graph may store at most this much more than its parameter bytes (tied weights)
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for one serialized message (we never use external data)


class ExportError(Exception):
    """The export cannot produce a correct model file; the message is one line for the user."""


@dataclass
class ExportResult:
    path: Path
    bytes: int
    max_abs_diff: float
    arch: str
    provider: str = "CPUExecutionProvider"  # the onnxruntime provider the verification ran on
    opset: int = DEFAULT_OPSET
    attention_op: bool = False  # True: GPT-2 attention is the ONNX Attention op (opset 23)
    fallback: str | None = None  # one line: why the Attention-op graph was not used although it was tried
    write_failure: str | None = None  # one line: why the requested output could not be written (``path`` is where
    # the verified file went instead, beside it or in the working folder)


@dataclass
class _Built:
    """One graph that passed every check, ready to be written."""

    model_bytes: bytes
    verification: Verification
    opset: int
    attention_op: bool


@dataclass
class _Source:
    """A loaded model plus everything the metadata needs, whatever it was loaded from."""

    arch: str
    model: nn.Module
    model_config: dict[str, Any]
    tokenizer_json: str
    special: SpecialTokens
    generation: dict[str, Any]
    provenance: dict[str, Any]
    tokenizer_options: dict[str, Any]


@dataclass(frozen=True)
class _Job:
    """One export: the source, its graph contract and metadata, and what every graph built for it must meet."""

    loaded: _Source
    signature: GraphSignature
    metadata: list[onnx.StringStringEntryProto]
    vocab_size: int
    context_length: int
    tolerance: float


def export_checkpoint(
    source: str | Path,
    output: str | Path | None = None,
    opset: int | None = None,
    tolerance: float = 1e-4,
    attention: AttentionMode = "auto",
) -> ExportResult:
    """Export a textgen checkpoint file or a Hugging Face GPT-2 directory to one verified .onnx file.

    ``attention`` (GPT-2 only): "auto" tries the opset-23 ONNX Attention-op graph and falls back to the TorchScript
    graph when it fails (``ExportResult.fallback`` says why); "op" requires it; "decomposed" uses the TorchScript
    graph directly. An explicit ``opset`` below 23 asks for the TorchScript graph.

    Raises CheckpointError (unusable checkpoint), HFImportError (unusable HF directory) or ExportError."""
    source_path = Path(source)
    target = default_output_path(source_path) if output is None else Path(output)
    _check_arguments(source_path, target, opset, tolerance, attention)
    loaded = _load_hf(source_path) if source_path.is_dir() else _load_checkpoint(source_path)
    signature, context_length, vocab_size = _signature_for(loaded)
    _check_tokens(loaded, vocab_size)
    metadata = _metadata_entries(loaded, signature, context_length, vocab_size)
    job = _Job(loaded, signature, metadata, vocab_size, context_length, tolerance)

    built, fallback = None, None
    if _try_attention_op(loaded.arch, attention, opset):
        try:
            built = _build(job, True, ATTENTION_OPSET)
        except ExportError as exc:
            if attention == "op":
                raise
            fallback = str(exc).removesuffix("; nothing was written")
    if built is None:
        built = _build(job, False, DEFAULT_OPSET if opset is None else opset)
    try:  # a verified export is never thrown away: a failed write goes to a fallback path, said by the CLI
        written, failure = write_with_fallback(target, lambda handle: handle.write(built.model_bytes))
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror or exc}") from exc
    verification = built.verification
    return ExportResult(written, len(built.model_bytes), verification.max_abs_diff, loaded.arch,
                        verification.provider, built.opset, built.attention_op, fallback,
                        None if failure is None else f"{target}: {failure.strerror or failure}")


def default_output_path(source: Path) -> Path:
    """`lstm.bin` -> `lstm.onnx`; a directory `gpt2/` -> `gpt2.onnx` beside it."""
    if source.is_dir():
        return source.resolve().parent / f"{source.resolve().name}.onnx"
    return source.with_suffix(".onnx")


def _check_arguments(source: Path, target: Path, opset: int | None, tolerance: float, attention: str) -> None:
    if opset is not None and not (MIN_OPSET <= opset <= MAX_OPSET or opset == ATTENTION_OPSET):
        raise ExportError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} (or {ATTENTION_OPSET} "
                          "for GPT-2's Attention op)")
    if attention not in ATTENTION_MODES:
        raise ExportError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ExportError(f"tolerance must be a positive number, got {tolerance}")
    if target.is_dir():
        raise ExportError(f"output {target} is a directory; give a file name ending in .onnx")
    if source.exists() and target.exists() and source.resolve() == target.resolve():
        raise ExportError(f"output {target} would overwrite the source; choose another --output")


# --- loading -------------------------------------------------------------------------------------------------


def _load_checkpoint(path: Path) -> _Source:
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError:
        raise
    except Exception as exc:  # torch's unpickler raises e.g. IndexError on arbitrary bytes; still a bad file
        raise CheckpointError(f"{path} is not a readable checkpoint (not ours or damaged): {first_line(exc)}") from exc
    model = model_from_checkpoint(checkpoint)
    training = checkpoint.training
    return _Source(
        arch=checkpoint.arch,
        model=model,
        model_config=_json_safe(checkpoint.model_config),
        tokenizer_json=checkpoint.tokenizer,
        special=_special_tokens(checkpoint.special_tokens, path.name),
        generation=_generation(checkpoint.generation),
        provenance=_provenance(path.name, checkpoint.metrics or {}, training.to_dict() if training else {}),
        tokenizer_options=_json_safe(checkpoint.tokenizer_options or {}),
    )


def _load_hf(path: Path) -> _Source:
    try:
        from models.hf_gpt2 import load_hf_gpt2, tokenizer_adds_bos
    except ImportError as exc:  # the optional importer is missing from this installation
        raise ExportError(f"{path} is a directory, but Hugging Face import is unavailable ({exc})") from exc
    model, config, tokenizer_json, special = load_hf_gpt2(path)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else asdict(config) if is_dataclass(config) else {}
    return _Source(
        arch="gpt2",
        model=model.eval(),
        model_config=_json_safe(config_dict),
        tokenizer_json=tokenizer_json,
        special=_special_tokens(special, path.name),
        generation={**DEFAULT_GENERATION, "start_with_eos": tokenizer_adds_bos(path)},
        provenance=_provenance(path.name, {}, {}),
        tokenizer_options={"kind": "pretrained"},
    )


def _special_tokens(raw: Any, where: str) -> SpecialTokens:
    values = asdict(raw) if is_dataclass(raw) else raw
    if not isinstance(values, dict):
        raise ExportError(f"{where}: special tokens must be a mapping")

    def token_id(name: str) -> int | None:
        value = values.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ExportError(f"{where}: special token {name!r} must be a non-negative integer, got {value!r}")
        return value

    eos = token_id("eos")
    if eos is None:
        raise ExportError(f"{where}: special token 'eos' is missing")
    return SpecialTokens(eos=eos, unk=token_id("unk"), bos=token_id("bos"))


def _generation(raw: Any) -> dict[str, Any]:
    settings = dict(DEFAULT_GENERATION)
    if isinstance(raw, dict):
        settings.update({str(k): v for k, v in _json_safe(raw).items() if v is not None})
    return settings


def _provenance(name: str, metrics: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """Where the weights came from: the checkpoint's last evaluation, else its training state."""
    step = _number(metrics.get("step", train.get("step")))
    val_loss = _number(metrics.get("val_loss", train.get("best_val_loss")))
    # the predictions val_loss is the mean of: fewer than the validation split's when the checkpoint was the best
    # at an interim evaluation, which scores a subset (train.loop)
    val_tokens = _number(metrics.get("val_tokens")) if "val_loss" in metrics else None
    return {
        "checkpoint": name,
        "step": int(step) if step is not None else None,
        "val_loss": val_loss,
        "val_tokens": int(val_tokens) if val_tokens is not None else None,
        "textgen_version": _textgen_version(),
    }


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """Keep only what JSON can carry (a checkpoint may hold tensors or tuples in its config)."""
    return json.loads(json.dumps(data, default=lambda value: _number(value)))


def _textgen_version() -> str:
    try:
        return package_metadata.version("textgen-onnx")
    except package_metadata.PackageNotFoundError:
        return "unknown"


# --- graph ---------------------------------------------------------------------------------------------------


def _signature_for(loaded: _Source) -> tuple[GraphSignature, int, int]:
    """The graph signature, context length (0 = unbounded) and output vocab size of the loaded model."""
    config = loaded.model.config  # RNNConfig or GPT2Config
    if loaded.arch in ("lstm", "gru"):
        signature = rnn_signature(loaded.arch, config.num_layers, config.hidden_size, config.vocab_size)
        return signature, 0, config.vocab_size
    signature = gpt2_signature(config.n_layer, config.n_head, config.n_embd, config.vocab_size)
    return signature, config.context_length, config.vocab_size


def _check_tokens(loaded: _Source, vocab_size: int) -> None:
    try:
        ids = Tokenizer.from_str(loaded.tokenizer_json).get_vocab(with_added_tokens=True).values()
        tokenizer_size = max(ids, default=-1) + 1  # one past the largest id: ids may have holes
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise ExportError(f"the tokenizer stored with the model is not valid tokenizers JSON ({exc})") from exc
    if tokenizer_size > vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer_size} tokens but the model only predicts {vocab_size}")
    for name, token in asdict(loaded.special).items():
        if token is not None and token >= tokenizer_size:
            raise ExportError(f"special token {name} = {token} is outside the tokenizer's {tokenizer_size} ids")


def _try_attention_op(arch: str, attention: str, opset: int | None) -> bool:
    """Whether to try the opset-23 Attention-op graph first; refuses combinations that cannot be honoured."""
    if arch != "gpt2" or attention == "decomposed":
        if opset == ATTENTION_OPSET:
            what = f"{arch} models" if arch != "gpt2" else "--attention decomposed"
            raise ExportError(f"opset {ATTENTION_OPSET} is only for GPT-2's Attention op; {what} use "
                              f"{MIN_OPSET}..{MAX_OPSET}")
        return False
    if opset is not None and opset != ATTENTION_OPSET:
        if attention == "op":
            raise ExportError(f"the ONNX Attention op needs opset {ATTENTION_OPSET}, not {opset}")
        return False  # "auto" with an explicit older opset: only the TorchScript graph can have it
    return True


def _build(job: _Job, attention_op: bool, opset: int) -> _Built:
    """Export one graph and run every check on it; ExportError (one line) when any fails."""
    model = job.loaded.model
    if not attention_op:
        return _checked(job, _export_graph(model, job.signature, opset), opset, attention_op)
    proto = _export_attention_graph(model, job.signature)
    if fuse_attention_cache(proto, model.config.n_head):
        try:
            return _checked(job, proto, opset, attention_op)
        except ExportError:
            # A rewrite this onnxruntime cannot run or get right (rare): export again and keep the exporter's own
            # Attention graph, rather than hold a second copy of every export's weights for this case.
            proto = _export_attention_graph(model, job.signature)
    return _checked(job, proto, opset, attention_op)


def _checked(job: _Job, proto: onnx.ModelProto, opset: int, attention_op: bool) -> _Built:
    """``proto`` with the metadata, serialized, checked by onnx and verified against PyTorch."""
    if job.loaded.arch == "gpt2":
        _check_weight_bytes(proto, job.loaded.model)
    proto.metadata_props.extend(job.metadata)
    model_bytes = _serialize_checked(proto)
    verification = _verify(job.loaded, model_bytes, job.signature, job.vocab_size, job.context_length)
    allowed = job.tolerance * max(1.0, verification.peak_abs_logit)
    if not verification.max_abs_diff <= allowed:
        raise ExportError(
            f"verification failed: ONNX and PyTorch logits differ by up to {verification.max_abs_diff:.3g}, "
            f"more than the {allowed:.3g} allowed (tolerance {job.tolerance:g}); nothing was written"
        )
    return _Built(model_bytes, verification, opset, attention_op)


def _export_graph(model: nn.Module, signature: GraphSignature, opset: int) -> onnx.ModelProto:
    """The TorchScript exporter: RNNs, and GPT-2 with attention decomposed into MatMul/Softmax."""
    adapter = (RNNExportAdapter if signature.optional_inputs == () else GPT2ExportAdapter)(model).eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript path is deprecated (DeprecationWarning) and warns on traced Python ints; the
            # symbolic-axes check and the parity runs below catch what those warnings are about.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                adapter,
                signature.example_args,
                buffer,
                input_names=signature.input_names,
                output_names=signature.output_names,
                dynamic_axes=signature.dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:
        raise ExportError(f"the ONNX exporter failed: {first_line(exc)}") from exc
    proto = onnx.load_model_from_string(buffer.getvalue())
    try:
        check_signature(proto, signature)
    except GraphCheckError as exc:
        raise ExportError(str(exc)) from exc
    dedupe_initializers(proto)
    return proto


def _export_attention_graph(model: nn.Module, signature: GraphSignature) -> onnx.ModelProto:
    """The dynamo exporter at opset 23: GPT-2's scaled_dot_product_attention becomes the ONNX Attention op."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    past, total = torch.export.Dim("past_seq"), torch.export.Dim("total_seq")
    # dynamic_shapes mirrors forward(input_ids, attention_mask, position_ids, *past_flat): a tuple for *past.
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
                      tuple({0: batch, 2: past} for _ in signature.state))
    exporter_log = logging.getLogger("torch.onnx")
    previous_level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" and similar notices, once per op
    try:
        # The exporter also prints progress lines; the user sees one line about the result instead.
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                GPT2ExportAdapter(model).eval(), signature.example_args, input_names=signature.input_names,
                output_names=signature.output_names, dynamic_shapes=dynamic_shapes, opset_version=ATTENTION_OPSET,
                dynamo=True, external_data=False, verbose=False,
            )
        proto = program.model_proto
        check_signature(proto, signature)
        fold_weight_transposes(proto)  # the LM head's Transpose(wte) is left unfolded for large vocabularies
        dedupe_initializers(proto)
    except GraphCheckError as exc:
        raise ExportError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - torch.export/onnxscript raise many types; all mean "no graph"
        raise ExportError(f"the opset-{ATTENTION_OPSET} dynamo exporter failed: {first_line(exc)}") from exc
    finally:
        exporter_log.setLevel(previous_level)
    _name_dynamic_axes(proto, signature)
    _strip_exporter_annotations(proto)
    return proto


def _strip_exporter_annotations(proto: onnx.ModelProto) -> None:
    """Drop the dynamo exporter's per-node debug metadata (Python stack traces with the exporting machine's file
    paths, FX node text: ~90 KB for a 2-layer GPT-2) and its ExportedProgram notes; the file should carry only
    the weights, the graph and the textgen metadata."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    del proto.graph.metadata_props[:]


def _name_dynamic_axes(proto: onnx.ModelProto, signature: GraphSignature) -> None:
    """Give the dynamic axes of the graph's inputs/outputs the signature's symbols (the dynamo exporter calls the
    present tensors' length "past_seq + seq"), so both exporters write the same interface."""
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, symbol in signature.dynamic_axes.get(value.name, {}).items():
            dims[axis].dim_param = symbol


def _check_weight_bytes(proto: onnx.ModelProto, model: nn.Module) -> None:
    """A tied embedding/LM head stored twice would grow the file by the whole embedding (+31% for GPT-2 small)."""
    unique = {tensor.data_ptr(): tensor for tensor in model.parameters()}
    parameter_bytes = sum(tensor.numel() * tensor.element_size() for tensor in unique.values())
    stored = initializer_bytes(proto)
    if stored > MAX_WEIGHT_RATIO * parameter_bytes:
        raise ExportError(f"the graph stores {stored / parameter_bytes:.2f}x the parameter bytes (limit "
                          f"{MAX_WEIGHT_RATIO}x): a tied weight is stored twice")


def _metadata_entries(
    loaded: _Source, signature: GraphSignature, context_length: int, vocab_size: int
) -> list[onnx.StringStringEntryProto]:
    info = ModelInfo(
        arch=loaded.arch,
        tokenizer_json=loaded.tokenizer_json,
        special=loaded.special,
        vocab_size=vocab_size,
        context_length=context_length,
        state=signature.state,
        inputs=signature.optional_inputs,
        generation=loaded.generation,
        model_config=loaded.model_config,
        source=loaded.provenance,
        tokenizer_options=loaded.tokenizer_options,
    )
    return [onnx.StringStringEntryProto(key=key, value=value) for key, value in encode_metadata(info).items()]


def _serialize_checked(proto: onnx.ModelProto) -> bytes:
    if proto.ByteSize() > MAX_PROTO_BYTES:
        raise ExportError("the model is larger than 2 GB, the limit of a single self-contained ONNX file")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {first_line(exc)}") from exc
    return proto.SerializeToString()


def _verify(
    loaded: _Source, model_bytes: bytes, signature: GraphSignature, vocab_size: int, context_length: int
) -> Verification:
    try:
        if loaded.arch == "gpt2":
            return verify_gpt2(loaded.model, model_bytes, signature, vocab_size, context_length)
        return verify_rnn(loaded.model, model_bytes, signature, vocab_size)
    except VerificationError as exc:
        raise ExportError(f"verification failed: {exc}; nothing was written") from exc
    except Exception as exc:  # onnxruntime raises its own exception classes; any failure means a broken graph
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"verification failed: onnxruntime could not run the graph: {first_line(exc)}") from exc
