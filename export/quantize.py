"""Shrink a textgen model file's weights to int8 or int4 with onnxruntime's own quantization tools.

``quantize_model(src, dst, "int8" | "int4")`` writes a new model file that is still a valid textgen file: the
same graph inputs/outputs and all of the source's ``metadata_props`` (``textgen.source`` gains a ``quantized``
entry saying how). Nothing here quantizes by hand; onnxruntime.quantization does the arithmetic:

* int8: ``quant_pre_process`` then ``quantize_dynamic(op_types_to_quantize=["MatMul", "LSTM"], reduce_range=True)``
  — int8 weights with one per-tensor scale, activations quantized on the fly (MatMulInteger /
  DynamicQuantizeMatMul / DynamicQuantizeLSTM kernels). ``reduce_range`` keeps the weights in 7 bits:
  onnxruntime's u8 x s8 kernel on AVX2 CPUs without VNNI adds pairs of products in int16 (VPMADDUBSW), which
  saturates with full 8-bit weights. Measured on an AVX2 EPYC on a tiny LSTM: logits off by 28 % of their peak with
  8-bit weights, 1.3 % with 7-bit ones. A model file runs wherever it is copied, so every int8 file is made the way
  that is safe on every x86 CPU unless ``--int8-weights`` says otherwise.
  ``MatMul`` and ``LSTM`` only (``INT8_OP_TYPES``; ``u8`` files ``MatMul`` only), because with the default op types
  the tied LM-head weight, which the embedding lookup also reads through a Gather, was quantized as a Gather input
  and all of it dequantized on every step. The LSTM op becomes ``DynamicQuantizeLSTM`` (int8 W and R, the same
  weight encoding): before it was included an LSTM file's int8 copy quantized only its small LM head and kept
  nearly all of its size.
* int4: ``MatMulNBitsQuantizer`` (blocks of 128 along K, accuracy_level 4 = int8 compute in the kernel).

The tied embedding: the exporter stores GPT-2's embedding once, as the LM head's ``[n_embd, vocab]`` MatMul
weight, and the token lookup gathers columns from it (export/graph.py). After quantization the MatMul reads the
quantized copy but that Gather would still read the float32 table, which would then have to stay in the file
(154 MB for GPT-2 small). So the lookup is rewired to the quantized twin: int8 gathers int8 columns, transposes
them to rows and dequantizes only those (DequantizeLinear with the same per-tensor scale), int4 reads the
MatMulNBits blocks through the ``com.microsoft`` GatherBlockQuantized op. Both exporter graphs (TorchScript opset
17 and dynamo opset 23) have this Gather(axis=1) + Transpose lookup and their ``MatMul`` weights as initializers.
The float32 table is then dropped; the lookup returns exactly the dequantized weights the LM head multiplies with.

``perplexity_cost(fp32, quantized, text)`` measures what the smaller file costs in quality: per-token NLL of a
held-out text through the one scorer (runtime.scoring, the same as textgen-eval and ``:eval``), for both files.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.graph import attribute, consumers, initializer_bytes, load_model
from runtime.atomic import atomic_write_bytes
from runtime.errors import first_line
from runtime.modelfile import KEY_SOURCE, ModelFileError, ModelInfo, decode_metadata, encode_metadata

Mode = Literal["int8", "int4", "fp16"]
MODES: tuple[str, ...] = ("int8", "int4", "fp16")
# int8 weight encodings (quantize_dynamic's weight_type / reduce_range): what each costs in accuracy and speed on
# CPUs with and without VNNI is in docs/benchmarks.md. "s7" is safe on every x86 CPU; "s8" saturates in
# onnxruntime's AVX2 u8 x s8 kernel on CPUs without VNNI (runtime.cpu warns when such a file is opened there).
Int8Weights = Literal["s7", "s8", "u8"]
INT8_WEIGHTS: dict[str, tuple[str, bool, str]] = {  # name -> (weight type, reduce_range, description)
    "s7": ("QInt8", True, "signed, 7-bit range (reduce_range)"),
    "s8": ("QInt8", False, "signed, full 8-bit range (needs VNNI on x86)"),
    "u8": ("QUInt8", False, "unsigned, full 8-bit range, zero point per tensor"),
}
DEFAULT_INT8_WEIGHTS: Int8Weights = "s7"
# fp16 logits may differ from the float32 file's by this much relative to max(1, max |logit|) (measured: 1.8e-4 on
# the 4x128 char GPT-2 of the shakespeare-gpt2 preset).
FP16_TOLERANCE = 1e-2
MAX_FLOAT32_FRACTION = 0.01  # of the weight bytes an fp16 file may keep in float32 (ops the converter skips)
# Blocks of 128 rather than 32: faster GPT-2 decoding for a slightly larger perplexity cost (docs/benchmarks.md,
# levers: the int4 row).
# A model with a narrower MatMul (K < 128, e.g. 64 wide) gets blocks of 32: the quantizer skips a weight whose K
# is below the block size, which would leave it (and the tied LM head) in float32.
INT4_BLOCK_SIZE = 128
INT4_NARROW_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: its fastest CPU kernel (docs/benchmarks.md, levers)
MAX_PROTO_BYTES = 2**31 - 1
QUANTIZED_MATMUL_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits")
# The op types int8 quantizes: every weight MatMul, and the LSTM op, whose input and recurrent weights are nearly
# all of an LSTM file (com.microsoft DynamicQuantizeLSTM). onnxruntime has no quantized GRU; a GRU file's int8
# copy quantizes its LM head only. u8 files keep the LSTM op in float32: DynamicQuantizeLSTM with unsigned 8-bit
# weights saturated on the AVX2 EPYC (logits off by 25 % of their peak on the test LSTM, as s8 is; s7 2 %), and u8
# exists to be exact everywhere.
INT8_OP_TYPES: dict[str, tuple[str, ...]] = {"s7": ("MatMul", "LSTM"), "s8": ("MatMul", "LSTM"), "u8": ("MatMul",)}


class QuantizeError(Exception):
    """The model cannot be quantized; the message is one line for the user."""


def quantize_model(src_onnx: Path | str, dst_onnx: Path | str, mode: Mode,
                   int8_weights: Int8Weights = DEFAULT_INT8_WEIGHTS) -> Path:
    """Write ``src_onnx`` quantized to ``mode`` ("int8", "int4" or "fp16") to ``dst_onnx`` (atomically) and
    return it.

    The result keeps the source's metadata and is checked to open in the runtime before it is written; an fp16
    file is also checked against the source's logits."""
    source, target = Path(src_onnx), Path(dst_onnx)
    if mode not in MODES:
        raise QuantizeError(f"unknown quantization {mode!r}; choose {' or '.join(MODES)}")
    if int8_weights not in INT8_WEIGHTS:
        raise QuantizeError(f"unknown int8 weight encoding {int8_weights!r}; choose {' or '.join(INT8_WEIGHTS)}")
    if not source.is_file():
        raise QuantizeError(f"model file not found: {source}")
    if target.exists() and target.resolve() == source.resolve():
        raise QuantizeError(f"output {target} would overwrite the source; choose another name")
    original = load_model(source, QuantizeError)
    info = _textgen_info(original, source)
    if mode == "fp16" and info.arch != "gpt2":
        raise QuantizeError(f"{source}: fp16 is for GPT-2 files (GPU decoding); onnxruntime has no float16 "
                            f"{info.arch.upper()} kernel on the CPU to check the file with, and int8 suits RNNs")
    with tempfile.TemporaryDirectory(prefix="textgen-quantize-") as work, _quiet_quantizer():
        if mode == "int8":
            quantized = _quantize_int8(source, Path(work), int8_weights)
        elif mode == "int4":
            quantized = _quantize_int4(original)
        else:
            quantized = _convert_fp16(original)
    _copy_metadata(original, quantized, mode, int8_weights)
    if mode == "fp16":
        _check_float16_weights(quantized, original, source)
    elif not quantized_lm_head(quantized, info.vocab_size):
        raise QuantizeError(f"{source}: the {mode} quantizer left the LM-head MatMul in float32")
    model_bytes = _serialize(quantized)
    _check_loads(model_bytes, source, compare_logits=mode == "fp16")
    try:
        atomic_write_bytes(target, lambda handle: handle.write(model_bytes))
    except OSError as exc:
        raise QuantizeError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target


# --- the two quantizers ----------------------------------------------------------------------------------------


def _quantize_int8(source: Path, work: Path, weights: Int8Weights) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    weight_type, reduce_range, _ = INT8_WEIGHTS[weights]

    prepared, quantized = work / "prepared.onnx", work / "quantized.onnx"
    try:
        # Symbolic shape inference gives up on the exporter's GPT-2 graph ("Incomplete symbolic shape
        # inference"); dynamic quantization does not need it, ORT's optimizer pass and ONNX shapes suffice.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True, all_tensors_to_one_file=True)
        quantize_dynamic(str(prepared), str(quantized), op_types_to_quantize=list(INT8_OP_TYPES[weights]),
                         weight_type=QuantType[weight_type], reduce_range=reduce_range)
    except Exception as exc:  # noqa: BLE001 - the quantizer raises bare Exceptions and asserts
        raise QuantizeError(f"int8 quantization failed: {first_line(exc)}") from exc
    model = onnx.load(str(quantized))
    _share_tied_table_int8(model)
    return model


def _quantize_int4(original: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.ModelProto()
    model.CopyFrom(original)  # the quantizer edits the proto in place
    try:
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=_int4_block_size(model),
            is_symmetric=False,
            accuracy_level=INT4_ACCURACY_LEVEL,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    except Exception as exc:  # noqa: BLE001
        raise QuantizeError(f"int4 quantization failed: {first_line(exc)}") from exc
    result = quantizer.model.model
    _share_tied_table_int4(result)
    return result


def _convert_fp16(original: onnx.ModelProto) -> onnx.ModelProto:
    """Weights, activations and the KV cache in float16; the logits stay float32 (a Cast at the end) so the
    samplers and every caller see the same output type as before."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.ModelProto()
    model.CopyFrom(original)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns about each weight value clipped to float16's range
            return convert_float_to_float16(model, keep_io_types=["logits"])
    except Exception as exc:  # noqa: BLE001 - the converter raises bare Exceptions and asserts
        raise QuantizeError(f"fp16 conversion failed: {first_line(exc)}") from exc


def _int4_block_size(model: onnx.ModelProto) -> int:
    """INT4_BLOCK_SIZE, or INT4_NARROW_BLOCK_SIZE when some MatMul weight has fewer input rows (K) than that."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    rows = [shapes[node.input[1]][0] for node in model.graph.node
            if node.op_type == "MatMul" and len(shapes.get(node.input[1], [])) == 2]
    return INT4_BLOCK_SIZE if min(rows, default=INT4_BLOCK_SIZE) >= INT4_BLOCK_SIZE else INT4_NARROW_BLOCK_SIZE


# --- the tied embedding: read the quantized twin instead of keeping float32 --------------------------------------


def _share_tied_table_int8(model: onnx.ModelProto) -> None:
    """Gather(W, ids) -> DequantizeLinear(Gather(W_quantized, ids), W_scale, W_zero_point) for every float table W
    whose int8 twin quantize_dynamic created (per-tensor scale and zero point); then drop W if nothing reads it."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers_of = consumers(graph)
    graph_outputs = {value.name for value in graph.output}
    new_nodes: list[onnx.NodeProto] = []
    rewired: set[str] = set()
    moved: set[int] = set()  # ids of Transpose nodes re-emitted next to their Gather
    for node in graph.node:
        if id(node) in moved:
            continue
        table = node.input[0] if node.op_type == "Gather" and node.input else None
        twin = _int8_twin(initializers, table) if table in initializers else None
        if twin is None:
            new_nodes.append(node)
            continue
        readers = readers_of.get(node.output[0], [])
        transpose = readers[0] if len(readers) == 1 and readers[0].op_type == "Transpose" else None
        if transpose is not None and node.output[0] not in graph_outputs:
            moved.add(id(transpose))
        else:
            transpose = None
        new_nodes.extend(_int8_lookup(node, twin, transpose))
        rewired.add(table)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    _drop_unused_initializers(model, rewired)


def _int8_lookup(gather: onnx.NodeProto, twin: tuple[str, str, str],
                 transpose: onnx.NodeProto | None) -> list[onnx.NodeProto]:
    """Gather from the int8 twin, then DequantizeLinear. With the lookup's Transpose (the exporter's column
    gather), the Transpose moves the int8 values and the DequantizeLinear comes last: a quarter of the bytes to
    move, and onnxruntime's QDQ propagation would otherwise push a QuantizeLinear/DequantizeLinear pair through
    the Transpose, which fails to load at opset >= 21 ("output_dtype INT8 does not match y_zero_point type
    UINT8", onnxruntime 1.31)."""
    quantized, scale, zero_point = twin
    gathered = f"{gather.output[0]}__int8"
    nodes = [helper.make_node("Gather", [quantized, gather.input[1]], [gathered], name=f"{gather.name}__int8",
                              axis=attribute(gather, "axis", 0))]
    output = gather.output[0]
    if transpose is not None:
        output = transpose.output[0]
        nodes.append(helper.make_node("Transpose", [gathered], [f"{output}__int8"], name=f"{transpose.name}__int8",
                                      perm=attribute(transpose, "perm", [])))
        gathered = f"{output}__int8"
    nodes.append(helper.make_node("DequantizeLinear", [gathered, scale, zero_point], [output],
                                  name=f"{gather.name}__dequantize"))
    return nodes


def _int8_twin(initializers: dict[str, onnx.TensorProto], name: str) -> tuple[str, str, str] | None:
    """(quantized, scale, zero point) names when ``name`` has a per-tensor int8 twin; quantize_dynamic names them
    ``{name}_quantized``, ``{name}_scale`` and ``{name}_zero_point``."""
    table = initializers[name]
    quantized = initializers.get(f"{name}_quantized")
    scale = initializers.get(f"{name}_scale")
    zero_point = initializers.get(f"{name}_zero_point")
    if quantized is None or scale is None or zero_point is None or table.data_type != onnx.TensorProto.FLOAT:
        return None
    if list(quantized.dims) != list(table.dims) or quantized.data_type not in (onnx.TensorProto.INT8,
                                                                              onnx.TensorProto.UINT8):
        return None
    if np.prod(scale.dims, dtype=np.int64) != 1 or np.prod(zero_point.dims, dtype=np.int64) != 1:
        return None  # per-channel parameters would have to be gathered too
    return quantized.name, scale.name, zero_point.name


def _share_tied_table_int4(model: onnx.ModelProto) -> None:
    """Gather(W, ids, axis=1) -> Transpose, where W [K, N] is also a MatMulNBits weight, becomes one
    GatherBlockQuantized over the MatMulNBits blocks: its packed ``[N, K/2]`` rows are exactly W's columns."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nbits = {node.input[1]: node for node in graph.node if node.op_type == "MatMulNBits"}
    readers_of = consumers(graph)
    replaced: dict[str, list[onnx.NodeProto]] = {}  # name of the Gather node -> nodes that stand in for it
    removed: set[int] = set()
    rewired: set[str] = set()
    for node in graph.node:
        if node.op_type != "Gather" or attribute(node, "axis", 0) != 1 or node.input[0] not in initializers:
            continue
        table = node.input[0]
        matmul = nbits.get(f"{table}_Q4")
        readers = readers_of.get(node.output[0], [])
        if matmul is None or len(readers) != 1 or not _moves_first_axis_last(readers[0]):
            continue
        stand_in = _gather_block_quantized(model, matmul, node.input[1], readers[0].output[0], f"{node.name}__int4")
        if stand_in is None:
            continue
        replaced[node.name or node.output[0]] = stand_in
        removed.add(id(readers[0]))
        rewired.add(table)
    if not replaced:
        return
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in removed:
            continue
        new_nodes.extend(replaced.get(node.name or node.output[0], [node]) if node.op_type == "Gather" else [node])
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(model, rewired)


def _gather_block_quantized(model: onnx.ModelProto, matmul: onnx.NodeProto, ids: str, output: str,
                            name: str) -> list[onnx.NodeProto] | None:
    """Nodes computing ``W[:, ids]`` transposed to ``[*ids, K]`` from the MatMulNBits inputs of W, or None when
    the block layout cannot be read as rows (K not a whole number of blocks)."""
    k, n = attribute(matmul, "K", 0), attribute(matmul, "N", 0)
    block, bits = attribute(matmul, "block_size", 0), attribute(matmul, "bits", 4)
    if bits != 4 or block < 16 or k % block or k % 2:
        return None
    shape_name = f"{name}__rows_shape"
    model.graph.initializer.append(numpy_helper.from_array(np.array([n, k // 2], dtype=np.int64), shape_name))
    rows = f"{name}__rows"
    inputs = [rows, ids, *matmul.input[2:4]]  # scales [N, K/block], optional packed zero points
    return [
        helper.make_node("Reshape", [matmul.input[1], shape_name], [rows], name=f"{name}__reshape"),
        helper.make_node("GatherBlockQuantized", inputs, [output], name=name, domain="com.microsoft",
                         gather_axis=0, quantize_axis=1, block_size=block, bits=bits),
    ]


def _moves_first_axis_last(node: onnx.NodeProto) -> bool:
    """A Transpose [E, *ids] -> [*ids, E], which the exporter puts after the column gather."""
    if node.op_type != "Transpose":
        return False
    perm = list(attribute(node, "perm", []))
    return len(perm) >= 2 and perm == [*range(1, len(perm)), 0]


# --- checks ----------------------------------------------------------------------------------------------------


def quantized_lm_head(model: onnx.ModelProto, vocab_size: int) -> bool:
    """True when the vocab-sized output projection runs as a quantized kernel (MatMulInteger, MatMulNBits, ...)
    on a stored quantized weight, i.e. the biggest per-token product really got smaller."""
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_MATMUL_OPS:
            continue
        if node.op_type == "MatMulNBits" and attribute(node, "N", 0) == vocab_size:
            return True
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is not None and vocab_size in weight.dims:
            return True
    return False


def _textgen_info(model: onnx.ModelProto, where: Path) -> ModelInfo:
    try:
        return decode_metadata({prop.key: prop.value for prop in model.metadata_props}, where=str(where))
    except ModelFileError as exc:
        raise QuantizeError(str(exc)) from exc


def _check_float16_weights(converted: onnx.ModelProto, original: onnx.ModelProto, source: Path) -> None:
    """The point of an fp16 file is half the bytes: no weight may be left behind in float32 beyond a sliver."""
    float32 = initializer_bytes(converted, onnx.TensorProto.FLOAT)
    total = initializer_bytes(original)
    if float32 > MAX_FLOAT32_FRACTION * max(total, 1):
        raise QuantizeError(f"{source}: the fp16 converter left {float32} of {total} weight bytes in float32")


def _check_loads(model_bytes: bytes, source: Path, compare_logits: bool = False) -> None:
    """The quantized bytes must open in the runtime as a textgen model (graph matches metadata, kernels exist);
    with ``compare_logits``, it must give the source's logits within FP16_TOLERANCE (export.verify's comparison)."""
    from export.verify import compare_model_files
    from runtime.session import OnnxModel

    with tempfile.TemporaryDirectory(prefix="textgen-quantize-check-") as work:
        path = Path(work) / source.name
        path.write_bytes(model_bytes)
        try:
            model = OnnxModel.open(path, device="cpu", threads=1)
            model.run(np.zeros((1, 2), dtype=np.int64), model.initial_state(1), 0)
            if compare_logits:
                reference = OnnxModel.open(source, device="cpu", threads=1)
                difference, peak = compare_model_files(reference, model)
        except Exception as exc:  # noqa: BLE001 - ModelLoadError, or onnxruntime's own types at run time
            raise QuantizeError(f"the quantized model does not run in onnxruntime: {first_line(exc)}") from exc
    if compare_logits and difference > FP16_TOLERANCE * max(1.0, peak):
        raise QuantizeError(f"the fp16 model's logits differ from the source's by {difference:.3g} (max |logit| "
                            f"{peak:.3g}); keep the float32 file")


# --- perplexity --------------------------------------------------------------------------------------------------


def perplexity_cost(fp32_path: Path | str, q_path: Path | str, text: str, max_tokens: int | None = None,
                    threads: int | None = None, protocol: str | None = None) -> tuple[float, float, float]:
    """(perplexity of the float32 file, of the quantized file, relative increase ppl_q / ppl_fp32 - 1) on ``text``.

    Both files score the same tokens the same way through the runtime (see ``text_nll``)."""
    nll_fp32 = text_nll(fp32_path, text, max_tokens, threads, protocol)
    nll_q = text_nll(q_path, text, max_tokens, threads, protocol)
    ppl_fp32, ppl_q = math.exp(nll_fp32), math.exp(nll_q)
    return ppl_fp32, ppl_q, ppl_q / ppl_fp32 - 1.0


def text_nll(model_path: Path | str, text: str, max_tokens: int | None = None, threads: int | None = None,
             protocol: str | None = None) -> float:
    """Mean negative log-likelihood (nats per token) of ``text`` under the model, scored by runtime.scoring.

    The text is one stream after an end-of-text token (its first ``max_tokens`` tokens when given). ``protocol``
    names a runtime.scoring protocol; by default recurrent models are scored ``stateful`` (one pass) and a GPT-2
    with non-overlapping ``windows`` of its context length (cheaper than sliding windows, and the same protocol
    for both files is all a cost comparison needs). Padding ids beyond the tokenizer are left out of the softmax."""
    from runtime.scoring import STATEFUL, WINDOWS, ScoringError, default_protocol, score_ids, stream_ids
    from runtime.session import OnnxModel

    model = OnnxModel.open(model_path, device="cpu", threads=threads)
    ids, _ = stream_ids(model, [text], single_stream=True)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise QuantizeError("the held-out text is too short to score (it needs at least one token)")
    try:
        chosen = default_protocol(model, protocol or (STATEFUL if model.info.context_length == 0 else WINDOWS))
        return score_ids(model, ids, chosen).nats_per_token
    except ScoringError as exc:
        raise QuantizeError(f"{model_path}: {exc}") from None


# --- plumbing ---------------------------------------------------------------------------------------------------


def _copy_metadata(original: onnx.ModelProto, quantized: onnx.ModelProto, mode: str,
                   int8_weights: Int8Weights = DEFAULT_INT8_WEIGHTS) -> None:
    """The source's metadata, verbatim except ``textgen.source`` which records the quantization."""
    entries = {prop.key: prop.value for prop in original.metadata_props}
    try:
        source = json.loads(entries.get(KEY_SOURCE, "{}"))
    except json.JSONDecodeError:
        source = {}
    if not isinstance(source, dict):
        source = {}
    source["quantized"] = _describe(mode, quantized, int8_weights)
    if mode == "fp16":  # the state (KV cache) is float16 now: say so, which takes format version 2
        info = decode_metadata(entries)
        info.state = tuple(replace(spec, dtype="float16") for spec in info.state)
        entries.update(encode_metadata(info))
    entries[KEY_SOURCE] = json.dumps(source)
    del quantized.metadata_props[:]
    for key, value in entries.items():
        quantized.metadata_props.add(key=key, value=value)


def _describe(mode: str, quantized: onnx.ModelProto, int8_weights: Int8Weights) -> dict[str, object]:
    import onnxruntime

    if mode == "fp16":
        method = "onnxruntime.transformers float16 converter: weights, activations and KV cache float16, logits float32"
        return {"mode": mode, "method": method, "onnxruntime": onnxruntime.__version__}
    if mode == "int8":
        method = f"onnxruntime quantize_dynamic, MatMul weights int8 per tensor, {INT8_WEIGHTS[int8_weights][2]}"
        return {"mode": mode, "method": method, "int8_weights": int8_weights, "onnxruntime": onnxruntime.__version__}
    method = "onnxruntime MatMulNBitsQuantizer, MatMul weights 4-bit asymmetric"
    block = next((attribute(node, "block_size", 0) for node in quantized.graph.node if node.op_type == "MatMulNBits"),
                 None)
    return {"mode": mode, "method": method, "block_size": block, "accuracy_level": INT4_ACCURACY_LEVEL,
            "onnxruntime": onnxruntime.__version__}


def _serialize(model: onnx.ModelProto) -> bytes:
    if model.ByteSize() > MAX_PROTO_BYTES:
        raise QuantizeError("the quantized model is larger than 2 GB, the limit of one self-contained ONNX file")
    return model.SerializeToString()


def _drop_unused_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    used = {name for node in model.graph.node for name in node.input}
    unused = {name for name in names if name not in used}
    if not unused:
        return
    kept = [init for init in model.graph.initializer if init.name not in unused]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)
    inputs = [value for value in model.graph.input if value.name not in unused]
    model.graph.ClearField("input")
    model.graph.input.extend(inputs)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizers log every node at INFO level; keep that away from the user."""
    loggers = [logging.getLogger(name) for name in ("onnxruntime.quantization", "onnxruntime")]
    quantizer_module_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    loggers.append(quantizer_module_logger)
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
