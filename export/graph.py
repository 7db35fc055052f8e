"""Post-export surgery and checks on the ONNX ModelProto.

* `check_signature`: the graph has exactly the inputs/outputs of the contract, and every axis declared dynamic
  really is symbolic (an exporter that froze an axis produces a file that fails on the first other size).
* `dedupe_initializers`: a tied embedding / LM head must be stored once. The TorchScript exporter's constant
  folding turns ``h @ wte.T`` into a second, transposed copy of the embedding (652 MB instead of 497 MB for GPT-2
  small). We keep the transposed copy (the big per-token MatMul reads it directly) and rewrite the embedding
  lookups to gather columns from it, which costs one small Transpose of the gathered rows per step.
* `fold_weight_transposes`: the dynamo exporter (onnxscript's optimizer) does not fold ``Transpose(wte)`` when
  the embedding has more than 8192 elements and another node (the lookup) reads it too, so the LM head would
  transpose 154 MB per session (GPT-2 small) and the quantizers would find no MatMul weight to quantize. Folding
  it here gives the TorchScript layout, which `dedupe_initializers` then stores once.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from export.adapters import GraphSignature
from runtime.errors import first_line


class GraphCheckError(Exception):
    """The exported graph does not match the model-file contract."""


def load_model(path: Path, error: type[Exception]) -> onnx.ModelProto:
    """The ONNX model at ``path``, for the passes that rewrite a written file (quantize, optimize); a missing or
    unreadable file raises ``error``, the caller's own one-line error type."""
    if not path.is_file():
        raise error(f"model file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors have several types
        raise error(f"{path} is not a readable ONNX model: {first_line(exc)}") from exc


def check_signature(model: onnx.ModelProto, signature: GraphSignature) -> None:
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializer_names]
    _check_names("inputs", [v.name for v in inputs], signature.input_names)
    _check_names("outputs", [v.name for v in graph.output], signature.output_names)
    for value in [*inputs, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, symbol in signature.dynamic_axes.get(value.name, {}).items():
            if axis >= len(dims) or not dims[axis].dim_param:
                frozen = dims[axis].dim_value if axis < len(dims) else "missing"
                raise GraphCheckError(
                    f"exported graph froze axis {axis} ({symbol}) of {value.name!r} to {frozen}; it must be dynamic"
                )


def _check_names(kind: str, actual: list[str], expected: list[str]) -> None:
    if actual != expected:
        raise GraphCheckError(f"exported graph {kind} are {actual}, expected {expected}")


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace every 2-D ``Transpose(initializer)`` node by a transposed initializer. Returns the nodes folded."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    kept: list[onnx.NodeProto] = []
    sources: set[str] = set()
    for node in graph.node:
        source = initializers.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        perm = attribute(node, "perm", [1, 0])
        if source is None or len(source.dims) != 2 or perm != [1, 0]:
            kept.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(source).T.copy(), node.output[0]))
        sources.add(source.name)
    if not sources:
        return 0
    folded = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    still_read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    _remove_initializers(model, sources - still_read)
    return folded


def dedupe_initializers(model: onnx.ModelProto) -> int:
    """Store each weight once: merge exact duplicates, and rewrite 2-D transposed twins. Returns bytes saved."""
    saved = _merge_exact_duplicates(model)
    for keep, drop in _transposed_pairs(model):
        saved += _replace_with_transpose_of(model, keep, drop)
    return saved


def _merge_exact_duplicates(model: onnx.ModelProto) -> int:
    groups: dict[tuple, list[onnx.TensorProto]] = defaultdict(list)
    for init in model.graph.initializer:
        if init.raw_data and len(init.raw_data) >= 1024:  # small constants are not worth the rewrite
            groups[(init.data_type, tuple(init.dims), len(init.raw_data))].append(init)
    rename: dict[str, str] = {}
    for tensors in groups.values():
        for index, tensor in enumerate(tensors):
            if tensor.name in rename:
                continue
            for other in tensors[index + 1 :]:
                if other.name not in rename and other.raw_data == tensor.raw_data:
                    rename[other.name] = tensor.name
    if not rename:
        return 0
    saved = sum(len(init.raw_data) for init in model.graph.initializer if init.name in rename)
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name in rename:
                node.input[position] = rename[name]
    _remove_initializers(model, set(rename))
    return saved


def _transposed_pairs(model: onnx.ModelProto) -> list[tuple[onnx.TensorProto, onnx.TensorProto]]:
    """(keep, drop) pairs of 2-D initializers where drop == keep.T; keep is the one a MatMul/Gemm reads."""
    candidates = [
        init for init in model.graph.initializer if len(init.dims) == 2 and init.dims[0] != init.dims[1]
        and init.raw_data and len(init.raw_data) >= 1024
    ]
    by_shape: dict[tuple, list[onnx.TensorProto]] = defaultdict(list)
    for init in candidates:
        by_shape[(init.data_type, tuple(init.dims))].append(init)
    readers = consumers(model.graph)
    pairs = []
    used: set[str] = set()
    for first in candidates:
        for second in by_shape.get((first.data_type, (first.dims[1], first.dims[0])), []):
            if {first.name, second.name} & used:
                continue
            if np.array_equal(numpy_helper.to_array(first).T, numpy_helper.to_array(second)):
                keep, drop = (second, first) if _only_gathered(first.name, readers) else (first, second)
                pairs.append((keep, drop))
                used.update((first.name, second.name))
    return pairs


GRAPH_OUTPUT_READER = "<graph output>"  # op_type of the stand-in reader consumers() gives a graph output


def consumers(graph: onnx.GraphProto, count_outputs: bool = False) -> dict[str, list[onnx.NodeProto]]:
    """Every node that reads each value. With ``count_outputs`` a graph output counts as a reader too (a stand-in
    node of op_type GRAPH_OUTPUT_READER), so a rewrite that checks readers never drops one."""
    result: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            result.setdefault(name, []).append(node)
    if count_outputs:
        for value in graph.output:
            result.setdefault(value.name, []).append(onnx.NodeProto(op_type=GRAPH_OUTPUT_READER))
    return result


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of a node's attribute (int, float, list, ...), or ``default`` when the node does not set it."""
    for entry in node.attribute:
        if entry.name == name:
            return helper.get_attribute_value(entry)
    return default


def _only_gathered(name: str, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """True when ``name`` is only ever the table of an embedding lookup (so its twin should be kept)."""
    nodes = consumers.get(name, [])
    return bool(nodes) and all(node.op_type == "Gather" and node.input[0] == name for node in nodes)


def _replace_with_transpose_of(model: onnx.ModelProto, keep: onnx.TensorProto, drop: onnx.TensorProto) -> int:
    """Make every reader of ``drop`` (== keep.T) read ``keep`` instead, then delete ``drop``."""
    ranks = _value_ranks(model)
    graph = model.graph
    new_nodes: list[onnx.NodeProto] = []
    transposed_name: str | None = None
    for node in graph.node:
        if drop.name not in node.input:
            new_nodes.append(node)
            continue
        indices_rank = ranks.get(node.input[1]) if node.op_type == "Gather" and len(node.input) > 1 else None
        if (
            node.op_type == "Gather"
            and node.input[0] == drop.name
            and drop.name not in node.input[1:]
            and attribute(node, "axis", 0) == 0
            and indices_rank is not None
        ):
            new_nodes.extend(_column_gather(node, keep.name, indices_rank))
            continue
        if transposed_name is None:  # any other reader: one Transpose of the kept weight (ORT folds it at load)
            transposed_name = f"{drop.name}__from_{keep.name}"
            new_nodes.append(helper.make_node("Transpose", [keep.name], [transposed_name], perm=[1, 0]))
        node.input[:] = [transposed_name if name == drop.name else name for name in node.input]
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _remove_initializers(model, {drop.name})
    return len(drop.raw_data)


def _column_gather(node: onnx.NodeProto, keep_name: str, indices_rank: int) -> list[onnx.NodeProto]:
    """rows = W[ids] with W = keep.T, as Transpose(Gather(keep, ids, axis=1)): [E, *ids] -> [*ids, E]."""
    columns = f"{node.output[0]}__columns"
    gather = helper.make_node("Gather", [keep_name, node.input[1]], [columns], axis=1, name=f"{node.name}__columns")
    perm = [*range(1, indices_rank + 1), 0]
    transpose = helper.make_node("Transpose", [columns], [node.output[0]], perm=perm, name=f"{node.name}__rows")
    return [gather, transpose]


def _value_ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(model)
    ranks: dict[str, int] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[value.name] = len(tensor_type.shape.dim)
    return ranks


def _remove_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    kept = [init for init in model.graph.initializer if init.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    kept_inputs = [value for value in model.graph.input if value.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)


def initializer_bytes(model: onnx.ModelProto, data_type: int | None = None) -> int:
    """Bytes of all stored weights (raw or typed fields), or of those of one ``onnx.TensorProto`` data type."""
    total = 0
    for init in model.graph.initializer:
        if data_type is not None and init.data_type != data_type:
            continue
        if init.raw_data:
            total += len(init.raw_data)
        else:
            total += numpy_helper.to_array(init).nbytes
    return total
