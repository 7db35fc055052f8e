"""Move GPT-2's KV-cache bookkeeping into the ONNX Attention op itself (opset 23, standard ONNX).

The dynamo exporter writes each layer's attention as torch wrote it::

    q, k, v = Split(qkv)                              # [batch, seq, hidden] each
    q4 = Transpose(Reshape(q))                        # [batch, heads, seq, head_dim]; the same for k and v
    present.N.key = Concat(past_key_values.N.key, k4)  # and the same for the values
    y = Attention(q4, present.N.key, present.N.value, mask)
    out = Reshape(Transpose(y))                       # back to [batch, seq, hidden]

The Attention op can take 3-D ``[batch, seq, hidden]`` inputs (``q_num_heads``/``kv_num_heads`` say how to split
them) plus ``past_key``/``past_value``, and returns ``present_key``/``present_value`` itself, so the ten nodes
around it collapse into one::

    out, present.N.key, present.N.value = Attention(q, k, v, mask, past_key_values.N.key, past_key_values.N.value)

Ten fewer nodes per layer matter where a decode step is overhead-bound: 4-bit weights and tiny models (each
node costs a few microseconds of dispatch), and on CUDA the op's own cache path is what onnxruntime's fused
kernels serve. The interface (input/output names, shapes, types) is unchanged. Layers that do not match the
pattern exactly are left alone, and the exporter's parity check against PyTorch runs on the result either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from export.graph import GRAPH_OUTPUT_READER, attribute, consumers

HEADS_FIRST = [0, 2, 1, 3]  # [batch, seq, heads, dim] <-> [batch, heads, seq, dim]


@dataclass(frozen=True)
class _Layer:
    """One matched layer: the new node's inputs and outputs, and the nodes it replaces."""

    inputs: list[str]  # q, k, v, mask, past_key, past_value
    outputs: list[str]  # y (3-D), present_key, present_value
    replaced: list[onnx.NodeProto]


def fuse_attention_cache(model: onnx.ModelProto, n_head: int) -> int:
    """Rewrite every matching layer in place (see the module docstring); returns how many were rewritten."""
    graph = model.graph
    if _has_subgraphs(graph):  # their readers of outer names are invisible here: rewrite nothing
        return 0
    producers = {output: node for node in graph.node for output in node.output}
    readers = consumers(graph, count_outputs=True)
    cache_inputs = {value.name for value in graph.input}
    layers: dict[int, _Layer] = {}
    for node in graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            layer = _match(node, producers, readers, cache_inputs)
            if layer is not None:
                layers[id(node)] = layer
    if not layers:
        return 0
    replaced = {id(old) for layer in layers.values() for old in layer.replaced}
    rewritten: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in layers:
            rewritten.append(_fused_node(node, layers[id(node)], n_head))
        elif id(node) not in replaced:
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    remove_dead_nodes(model)
    return len(layers)


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nothing reads (the shape arithmetic that fed the removed Reshapes), and the
    initializers only they read. A graph with control flow is left whole: its subgraphs may read outer names."""
    graph = model.graph
    if _has_subgraphs(graph):
        return
    needed = {value.name for value in [*graph.output, *graph.input]}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(output in needed for output in node.output if output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used_initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used_initializers)


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in graph.node for attribute in node.attribute)


def _match(attention: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
           readers: dict[str, list[onnx.NodeProto]], cache_inputs: set[str]) -> _Layer | None:
    """The layer around ``attention`` when it is exactly the exporter's pattern, else None."""
    already_3d = attribute(attention, "q_num_heads") is not None or attribute(attention, "kv_num_heads") is not None
    if len(attention.input) != 4 or len(attention.output) != 1 or already_3d:
        return None
    query = _unheaded(attention.input[0], producers, readers)
    key = _cache_concat(attention.input[1], attention, producers, readers, cache_inputs)
    value = _cache_concat(attention.input[2], attention, producers, readers, cache_inputs)
    result = _reheaded(attention.output[0], readers)
    if query is None or key is None or value is None or result is None:
        return None
    (q, q_nodes), (past_key, k, k_nodes), (past_value, v, v_nodes) = query, key, value
    y, y_nodes = result
    return _Layer(inputs=[q, k, v, attention.input[3], past_key, past_value],
                  outputs=[y, attention.input[1], attention.input[2]],
                  replaced=[attention, *q_nodes, *k_nodes, *v_nodes, *y_nodes])


def _unheaded(name: str, producers: dict[str, onnx.NodeProto],
              readers: dict[str, list[onnx.NodeProto]]) -> tuple[str, list[onnx.NodeProto]] | None:
    """``name`` = Transpose(Reshape(x), perm 0213) read only once: x (3-D) and the two nodes."""
    transpose = producers.get(name)
    if transpose is None or transpose.op_type != "Transpose" or attribute(transpose, "perm") != HEADS_FIRST:
        return None
    reshape = producers.get(transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    if len(readers.get(reshape.output[0], [])) != 1 or len(readers.get(name, [])) != 1:
        return None
    return reshape.input[0], [transpose, reshape]


def _cache_concat(name: str, attention: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                  readers: dict[str, list[onnx.NodeProto]],
                  cache_inputs: set[str]) -> tuple[str, str, list[onnx.NodeProto]] | None:
    """``name`` = Concat(past graph input, Transpose(Reshape(x)), axis 2), read by ``attention`` and as a graph
    output only (the fused node takes over producing it, later in the node order): the past input, x and the
    nodes."""
    concat = producers.get(name)
    if concat is None or concat.op_type != "Concat" or attribute(concat, "axis") != 2 or len(concat.input) != 2:
        return None
    if any(reader is not attention and reader.op_type != GRAPH_OUTPUT_READER for reader in readers.get(name, [])):
        return None
    past, new = concat.input
    if past not in cache_inputs:
        return None
    unheaded = _unheaded(new, producers, readers)
    if unheaded is None:
        return None
    return past, unheaded[0], [concat, *unheaded[1]]


def _reheaded(name: str, readers: dict[str, list[onnx.NodeProto]]) -> tuple[str, list[onnx.NodeProto]] | None:
    """``name`` read only by Transpose(perm 0213) read only by Reshape: the Reshape's output and the two nodes."""
    first = readers.get(name, [])
    if len(first) != 1 or first[0].op_type != "Transpose" or attribute(first[0], "perm") != HEADS_FIRST:
        return None
    transpose = first[0]
    after = readers.get(transpose.output[0], [])
    if len(after) != 1 or after[0].op_type != "Reshape":
        return None
    return after[0].output[0], [transpose, after[0]]


def _fused_node(attention: onnx.NodeProto, layer: _Layer, n_head: int) -> onnx.NodeProto:
    node = helper.make_node("Attention", layer.inputs, layer.outputs, name=attention.name or None)
    node.attribute.extend(attention.attribute)  # scale, is_causal, softcap, ... as the exporter set them
    node.attribute.extend([helper.make_attribute("q_num_heads", n_head),
                           helper.make_attribute("kv_num_heads", n_head)])
    return node
