"""Would a preallocated KV cache, updated in place, make GPT-2 decoding flat? Per-step cost of GPT-2-small-sized
attention (12 layers, 12 heads of 64) on onnxruntime's CPU kernels: the growing cache our model files use (opset 23
``Attention`` with ``past_key``/``past_value``: every step writes a new ``present`` one position longer) against a
fixed-capacity cache (opset 24 ``TensorScatter`` writing the new position in place through IO binding, then
``Attention`` reading the buffer with ``nonpad_kv_seqlen``, the valid length per row).

    python -m benchmarks.kv_cache            # rewrites its docs section
    python -m benchmarks.kv_cache --smoke    # tiny shapes, seconds, prints only

Only the attention part of a step is timed (q/k/v are given); weights and MatMuls are the same either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as make

from benchmarks.common import (
    BenchmarkError,
    Table,
    fmt_ratio,
    fmt_stats,
    interleaved,
    make_parser,
    parse_args,
    report,
    run_main,
)

FULL = {"layers": 12, "heads": 12, "head_dim": 64, "positions": (16, 128, 512, 1000), "capacities": (1024, 2048)}
SMOKE = {"layers": 2, "heads": 2, "head_dim": 16, "positions": (4, 40), "capacities": (64, 128)}
STEPS = 16  # timed steps per run, starting at the position


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(make_parser(__doc__.splitlines()[0]), argv)
    shape = SMOKE if args.smoke else FULL
    layers, heads, head_dim = shape["layers"], shape["heads"], shape["head_dim"]
    growing = _session(growing_cache_graph(layers, heads, head_dim), args.threads)
    fixed = {capacity: _session(fixed_cache_graph(layers, heads, head_dim, capacity), args.threads)
             for capacity in shape["capacities"]}
    runners: dict[str, Callable[[], float]] = {}
    for position in shape["positions"]:
        runners[f"growing {position}"] = lambda p=position: growing_steps(growing, p, layers, heads, head_dim)
        for capacity, session in fixed.items():
            if position + STEPS <= capacity:
                runners[f"{capacity} {position}"] = (
                    lambda s=session, p=position, c=capacity: fixed_steps(s, p, c, layers, heads, head_dim))
    for capacity, session in fixed.items():  # both loops must compute the same attention before they are timed
        check_same_attention(growing, session, capacity, layers, heads, head_dim)
    measured = interleaved(runners, args.repeats)
    table = Table(f"{layers} layers x {heads} heads x {head_dim}: attention ms per decode step, {STEPS} steps from "
                  "the position", ["position", "growing cache (our files)",
                                   *(f"preallocated, {c:,} slots" for c in shape["capacities"]),
                                   "fastest preallocated / growing"])
    for position in shape["positions"]:
        cells = [measured.get(f"{c} {position}") for c in shape["capacities"]]
        best = min((cell.median for cell in cells if cell is not None), default=None)
        table.add(position, fmt_stats(measured[f"growing {position}"].scaled(1000)),
                  *(fmt_stats(cell.scaled(1000)) if cell is not None else "n/a" for cell in cells),
                  fmt_ratio(best, measured[f"growing {position}"].median))
    table.notes.append("Preallocated: TensorScatter (opset 24) writes the new key/value into the cache buffer bound "
                       "as both its input and its output (in place), then Attention (opset 24) reads the buffer "
                       "with nonpad_kv_seqlen = valid length. Growing: Attention (opset 23) with past_key/past_value "
                       "returns a new present one position longer, which the next step feeds back.")
    notes = ["A ratio above 1.00x means the preallocated cache is slower. If its cost follows the capacity, not "
             "the position, onnxruntime's Attention reads the whole buffer whatever nonpad_kv_seqlen says."]
    report(args, "kv_cache.py", "kv_cache", "Growing vs preallocated KV cache (attention only)", [table], notes)
    return 0


# --- graphs ----------------------------------------------------------------------------------------------------


def growing_cache_graph(layers: int, heads: int, head_dim: int) -> onnx.ModelProto:
    """Per layer: y, present_k, present_v = Attention(q, k, v, past_k, past_v), 3-D q/k/v as in our files."""
    nodes, inputs, outputs = [], [], []
    for layer in range(layers):
        inputs += _qkv_inputs(layer, heads * head_dim)
        inputs += [_value(f"past_{kv}{layer}", [1, heads, "past", head_dim]) for kv in "kv"]
        nodes.append(make.make_node("Attention", [f"q{layer}", f"k{layer}", f"v{layer}", "", f"past_k{layer}",
                                                  f"past_v{layer}"],
                                    [f"y{layer}", f"present_k{layer}", f"present_v{layer}"],
                                    q_num_heads=heads, kv_num_heads=heads))
        outputs += [_value(name, None) for name in (f"y{layer}", f"present_k{layer}", f"present_v{layer}")]
    return _model(nodes, inputs, outputs, [], opset=23)


def fixed_cache_graph(layers: int, heads: int, head_dim: int, capacity: int) -> onnx.ModelProto:
    """Per layer: cache_k/v updated in place at ``position`` by TensorScatter, then Attention over the buffers with
    nonpad_kv_seqlen (4-D heads-first inputs, which TensorScatter's update needs)."""
    heads_shape = make.make_tensor("heads_shape", TensorProto.INT64, [4], [1, 1, heads, head_dim])
    nodes = []
    inputs = [_value("position", [1], TensorProto.INT64), _value("valid", [1], TensorProto.INT64)]
    outputs = []
    for layer in range(layers):
        inputs += _qkv_inputs(layer, heads * head_dim)
        inputs += [_value(f"cache_{kv}{layer}", [1, heads, capacity, head_dim]) for kv in "kv"]
        for name in (f"q{layer}", f"k{layer}", f"v{layer}"):
            nodes += [make.make_node("Reshape", [name, "heads_shape"], [f"{name}_split"]),
                      make.make_node("Transpose", [f"{name}_split"], [f"{name}_heads"], perm=[0, 2, 1, 3])]
        for kv in "kv":
            nodes.append(make.make_node("TensorScatter", [f"cache_{kv}{layer}", f"{kv}{layer}_heads", "position"],
                                        [f"updated_{kv}{layer}"], axis=2))
        nodes.append(make.make_node("Attention", [f"q{layer}_heads", f"updated_k{layer}", f"updated_v{layer}", "",
                                                  "", "", "valid"], [f"y{layer}"]))
        outputs += [_value(name, None) for name in (f"y{layer}", f"updated_k{layer}", f"updated_v{layer}")]
    return _model(nodes, inputs, outputs, [heads_shape], opset=24)


def _qkv_inputs(layer: int, width: int) -> list[onnx.ValueInfoProto]:
    return [_value(f"{name}{layer}", [1, 1, width]) for name in "qkv"]


def _value(name: str, shape: list[Any] | None, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return make.make_tensor_value_info(name, dtype, shape)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto], opset: int) -> onnx.ModelProto:
    graph = make.make_graph(nodes, "attention-cache", inputs, outputs, initializer=initializers)
    return make.make_model(graph, opset_imports=[make.make_opsetid("", opset)], ir_version=11)


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# --- decode loops ------------------------------------------------------------------------------------------------


def _qkv(layers: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"{name}{layer}": rng.standard_normal((1, 1, width)).astype(np.float32)
            for layer in range(layers) for name in "qkv"}


def check_same_attention(growing: ort.InferenceSession, fixed: ort.InferenceSession, capacity: int, layers: int,
                         heads: int, head_dim: int, steps: int = 4) -> None:
    """Decode ``steps`` positions from an empty cache in both graphs with the same q/k/v; every layer's output must
    agree (BenchmarkError otherwise), so the timed loops are doing the same work."""
    rng = np.random.default_rng(2)
    width = heads * head_dim
    past = {f"past_{kv}{layer}": np.zeros((1, heads, 0, head_dim), np.float32)
            for layer in range(layers) for kv in "kv"}
    caches = {f"cache_{kv}{layer}": np.zeros((1, heads, capacity, head_dim), np.float32)
              for layer in range(layers) for kv in "kv"}
    growing_names = [output.name for output in growing.get_outputs()]
    fixed_names = [output.name for output in fixed.get_outputs()]
    for step in range(steps):
        qkv = {f"{name}{layer}": rng.standard_normal((1, 1, width)).astype(np.float32)
               for layer in range(layers) for name in "qkv"}
        grown = dict(zip(growing_names, growing.run(None, {**qkv, **past}), strict=True))
        positions = {"position": np.array([step], np.int64), "valid": np.array([step + 1], np.int64)}
        kept = dict(zip(fixed_names, fixed.run(None, {**qkv, **positions, **caches}), strict=True))
        for layer in range(layers):
            heads_last = kept[f"y{layer}"].transpose(0, 2, 1, 3).reshape(1, 1, width)  # [1, H, 1, D] -> 3-D
            if not np.allclose(grown[f"y{layer}"], heads_last, atol=1e-5):
                raise BenchmarkError(f"the preallocated cache ({capacity} slots) computes other attention outputs "
                                     f"than the growing one at step {step}, layer {layer}")
        past = {f"past_{kv}{layer}": grown[f"present_{kv}{layer}"] for layer in range(layers) for kv in "kv"}
        caches = {f"cache_{kv}{layer}": kept[f"updated_{kv}{layer}"] for layer in range(layers) for kv in "kv"}


def growing_steps(session: ort.InferenceSession, position: int, layers: int, heads: int, head_dim: int) -> float:
    """Seconds per step for STEPS steps from ``position``, each feeding the last step's present back."""
    qkv = _qkv(layers, heads * head_dim)
    rng = np.random.default_rng(1)
    past = {f"past_{kv}{layer}": rng.standard_normal((1, heads, position, head_dim)).astype(np.float32)
            for layer in range(layers) for kv in "kv"}
    names = [output.name for output in session.get_outputs()]
    started = time.perf_counter()
    for _ in range(STEPS):
        outputs = dict(zip(names, session.run(None, {**qkv, **past}), strict=True))
        past = {f"past_{kv}{layer}": outputs[f"present_{kv}{layer}"] for layer in range(layers) for kv in "kv"}
    return (time.perf_counter() - started) / STEPS


def fixed_steps(session: ort.InferenceSession, position: int, capacity: int, layers: int, heads: int,
                head_dim: int) -> float:
    """Seconds per step for STEPS steps from ``position``, the cache buffers bound as input and output alike."""
    qkv = _qkv(layers, heads * head_dim)
    caches = {f"{kv}{layer}": ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, capacity, head_dim), np.float32))
              for layer in range(layers) for kv in "kv"}
    started = time.perf_counter()
    for step in range(STEPS):
        binding = session.io_binding()
        for name, value in qkv.items():
            binding.bind_cpu_input(name, value)
        binding.bind_cpu_input("position", np.array([position + step], dtype=np.int64))
        binding.bind_cpu_input("valid", np.array([position + step + 1], dtype=np.int64))
        for name, buffer in caches.items():
            binding.bind_ortvalue_input(f"cache_{name}", buffer)
            binding.bind_ortvalue_output(f"updated_{name}", buffer)  # the same buffer: updated in place
        for layer in range(layers):
            binding.bind_output(f"y{layer}", "cpu")
        session.run_with_iobinding(binding)
    return (time.perf_counter() - started) / STEPS


if __name__ == "__main__":
    run_main(main)
