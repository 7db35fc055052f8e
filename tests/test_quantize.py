"""export.quantize (int8 / int4 model files) and export.optimize (GPT-2 graph levers) on tiny exported models.

The models go through the real checkpoint -> export_checkpoint path, so the GPT-2 has the exporter's tied
embedding (the LM head's [n_embd, vocab] weight, read by a column Gather) that quantization must keep shared.
The GPT-2 file is the exporter's default graph (opset 23, ONNX Attention op); ``decomposed`` holds the fallback
graph (TorchScript, opset 17), whose node and initializer names differ, quantized the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FIXTURE_ALPHABET, char_tokenizer
from onnx import helper

from export.onnx_export import export_checkpoint
from export.optimize import OptimizeError, optimize_gpt2
from export.quantize import QuantizeError, perplexity_cost, quantize_model, quantized_lm_head, text_nll
from models.checkpoint import load_checkpoint, save_checkpoint
from models.gpt2 import GPT2, GPT2Config
from models.registry import model_from_checkpoint
from models.rnn import RNNConfig, RNNLanguageModel
from runtime.modelfile import KEY_SOURCE, KEY_STATE, KEY_VERSION, decode_metadata
from runtime.session import ModelLoadError, OnnxModel

N_EMBD = 64  # a multiple of the int4 block (32), as real widths are
GPT2_PADDING = 128  # output ids beyond the tokenizer: (16 + 128) x 64 > 8192 embedding elements
CONTEXT = 32
TEXT = "abc def, ghij.\nja bic hed, fag.\ncab jid hie gaf.\nbad jeh fig cab, dig hij.\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32/int8/int4 files of a tiny GPT-2 and a tiny LSTM, plus their checkpoints."""
    root = tmp_path_factory.mktemp("quantize")
    tokenizer = char_tokenizer(FIXTURE_ALPHABET)
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    models = {
        # Padded vocabulary: above 8192 embedding elements the dynamo exporter leaves the LM head's Transpose(wte)
        # unfolded, as it does for real vocabularies; the exporter must fold it so the head can be quantized.
        "gpt2": GPT2(GPT2Config(vocab_size=vocab + GPT2_PADDING, context_length=CONTEXT, n_layer=1, n_head=2,
                                n_embd=N_EMBD)),
        "lstm": RNNLanguageModel(RNNConfig(vocab_size=vocab, cell="lstm", embedding_size=16, hidden_size=N_EMBD,
                                           num_layers=1)),
    }
    paths: dict[str, Path] = {}
    for arch, model in models.items():
        if arch == "lstm":
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.mul_(2.0)  # peakier than the default init, so logits are not all near zero
        checkpoint = root / f"{arch}.bin"
        save_checkpoint({"arch": arch, "model_config": model.config.to_dict(), "tokenizer": tokenizer.to_str(),
                         "special_tokens": {"eos": 0, "unk": 1, "bos": None}, "model": model.state_dict()},
                        checkpoint)
        paths[f"{arch}.bin"] = checkpoint
        paths[arch] = export_checkpoint(checkpoint, root / f"{arch}.onnx").path
        for mode in ("int8", "int4"):
            paths[f"{arch}.{mode}"] = quantize_model(paths[arch], root / f"{arch}.{mode}.onnx", mode)
    return paths


@pytest.fixture(scope="module")
def decomposed(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same GPT-2 checkpoint exported with decomposed attention (the fallback graph), and its int8/int4 files."""
    root = tmp_path_factory.mktemp("decomposed")
    fp32 = export_checkpoint(files["gpt2.bin"], root / "gpt2.onnx", attention="decomposed").path
    paths = {"gpt2": fp32}
    for mode in ("int8", "int4"):
        paths[f"gpt2.{mode}"] = quantize_model(fp32, root / f"gpt2.{mode}.onnx", mode)
    return paths


def _metadata(path: Path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}


def _logits(path: Path) -> np.ndarray:
    model = OnnxModel.open(path, device="cpu", threads=1)
    ids = np.array([[0, *model.encode(TEXT[:20])]], dtype=np.int64)
    logits, state = model.run_all(ids, model.initial_state(1), 0)
    step, _ = model.run(np.array([[5]], dtype=np.int64), state, ids.shape[1])
    return np.concatenate([logits[0], step])


# --- files load, keep the contract, and stay close to fp32 -------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_file_loads_and_keeps_metadata(files: dict[str, Path], arch: str, mode: str) -> None:
    original, quantized = _metadata(files[arch]), _metadata(files[f"{arch}.{mode}"])
    assert set(quantized) == set(original)
    for key, value in original.items():
        if key != KEY_SOURCE:
            assert quantized[key] == value, key
    source = json.loads(quantized[KEY_SOURCE])
    assert source["quantized"]["mode"] == mode
    assert {k: v for k, v in source.items() if k != "quantized"} == json.loads(original[KEY_SOURCE])
    model = OnnxModel.open(files[f"{arch}.{mode}"], device="cpu", threads=1)
    assert model.info.arch == arch
    assert files[f"{arch}.{mode}"].stat().st_size < files[arch].stat().st_size


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
@pytest.mark.parametrize(("mode", "relative_limit"), [("int8", 0.05), ("int4", 0.2)])
def test_quantized_logits_stay_close_to_fp32(files: dict[str, Path], arch: str, mode: str,
                                             relative_limit: float) -> None:
    reference, quantized = _logits(files[arch]), _logits(files[f"{arch}.{mode}"])
    assert quantized.shape == reference.shape
    peak = float(np.abs(reference).max())
    assert peak > 0.1  # the comparison means something
    assert float(np.abs(quantized - reference).max()) <= relative_limit * peak
    assert not np.array_equal(quantized, reference)  # the weights really changed


def test_int8_quantizes_the_lm_head_matmul(files: dict[str, Path]) -> None:
    model = onnx.load(str(files["gpt2.int8"]))
    vocab = int(_metadata(files["gpt2"])["textgen.vocab_size"])
    assert quantized_lm_head(model, vocab)
    initializers = {init.name: init for init in model.graph.initializer}
    heads = [node for node in model.graph.node if node.op_type == "MatMulInteger"
             and node.input[1] in initializers and vocab in initializers[node.input[1]].dims]
    assert len(heads) == 1
    assert initializers[heads[0].input[1]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    # No per-step dequantization of a whole weight (the Gather pitfall in export/quantize.py) and no float copy of
    # the tied table left.
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            assert node.input[0] not in initializers
    assert not [init for init in model.graph.initializer
                if init.data_type == onnx.TensorProto.FLOAT and sorted(init.dims) == sorted([N_EMBD, vocab])]


def test_int8_lstm_file_quantizes_the_recurrent_weights(files: dict[str, Path]) -> None:
    """The LSTM op holds nearly all of an LSTM file's weights: int8 must quantize it, not only the LM head."""
    model = onnx.load(str(files["lstm.int8"]))
    ops = [node.op_type for node in model.graph.node]
    assert "LSTM" not in ops
    assert ops.count("DynamicQuantizeLSTM") == 1
    lstm = next(node for node in model.graph.node if node.op_type == "DynamicQuantizeLSTM")
    initializers = {init.name: init for init in model.graph.initializer}
    weights = [initializers[name] for name in lstm.input[1:3]]  # W, R
    assert [init.data_type for init in weights] == [onnx.TensorProto.INT8] * 2
    float_bytes = sum(np.prod(init.dims) * 4 for init in onnx.load(str(files["lstm"])).graph.initializer
                      if init.data_type == onnx.TensorProto.FLOAT)
    quantized_float_bytes = sum(np.prod(init.dims) * 4 for init in model.graph.initializer
                                if init.data_type == onnx.TensorProto.FLOAT)
    assert quantized_float_bytes < 0.3 * float_bytes


def test_unquantized_head_is_detected(files: dict[str, Path]) -> None:
    vocab = int(_metadata(files["gpt2"])["textgen.vocab_size"])
    assert not quantized_lm_head(onnx.load(str(files["gpt2"])), vocab)
    assert quantized_lm_head(onnx.load(str(files["gpt2.int4"])), vocab)
    lstm_vocab = int(_metadata(files["lstm"])["textgen.vocab_size"])
    assert quantized_lm_head(onnx.load(str(files["lstm.int8"])), lstm_vocab)


# --- the tied embedding reads exactly the weights the LM head multiplies with ----------------------------------


def _run_with_output(path: Path, output: str) -> np.ndarray:
    """Run the GPT-2 file on ids 0..vocab-1 and return the intermediate tensor ``output``."""
    model = onnx.load(str(path))
    model.graph.output.append(helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    info = OnnxModel.open(path, device="cpu", threads=1).info
    ids = np.arange(info.vocab_size, dtype=np.int64)[None, :]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.zeros_like(ids)}  # one position for all: only the lookup matters here
    feeds.update({spec.input: np.zeros(spec.initial_shape(1), dtype=np.float32) for spec in info.state})
    return session.run([output], feeds)[0]


def test_int8_tied_lookup_is_the_dequantized_lm_head(files: dict[str, Path]) -> None:
    model = onnx.load(str(files["gpt2.int8"]))
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    dequantize = next(node for node in model.graph.node if node.op_type == "DequantizeLinear")
    # int8 columns are gathered, transposed to rows, then dequantized (no DequantizeLinear before a Transpose,
    # which onnxruntime's QDQ propagation breaks at opset 23).
    transpose = producers[dequantize.input[0]]
    gather = producers[transpose.input[0]]
    assert transpose.op_type == "Transpose" and gather.op_type == "Gather"
    table = gather.input[0]
    assert any(node.op_type == "MatMulInteger" and node.input[1] == table for node in model.graph.node)
    weight = initializers[table].astype(np.float32)  # [n_embd, vocab], what the LM head multiplies with
    scale, zero_point = initializers[dequantize.input[1]], initializers[dequantize.input[2]].astype(np.float32)
    expected = (weight - zero_point) * scale
    looked_up = _run_with_output(files["gpt2.int8"], dequantize.output[0])  # [1, vocab, n_embd]
    np.testing.assert_allclose(looked_up[0], expected.T, rtol=1e-6, atol=0)


def _decode_matmul_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None) -> np.ndarray:
    """MatMulNBits' 4-bit layout (ORT contrib op docs): B [N, blocks, blob] with two values per byte, low nibble
    first; scales [N, blocks]; zero points packed the same way along blocks (default 8). Returns [N, K]."""
    n, blocks, blob = packed.shape
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, blob * 2).astype(np.float32)
    if zero_points is None:
        zero = np.full((n, blocks), 8.0, dtype=np.float32)
    else:
        zero = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    return ((values - zero[:, :, None].astype(np.float32)) * scales.reshape(n, blocks)[:, :, None]).reshape(n, -1)


def test_int4_tied_lookup_is_the_dequantized_lm_head(files: dict[str, Path]) -> None:
    model = onnx.load(str(files["gpt2.int4"]))
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    lookup = next(node for node in model.graph.node if node.op_type == "GatherBlockQuantized")
    reshape = next(node for node in model.graph.node if node.output[0] == lookup.input[0])
    head = next(node for node in model.graph.node if node.op_type == "MatMulNBits"
                and node.input[1] == reshape.input[0])  # the LM head: the same packed blocks
    zero_points = initializers[head.input[3]] if len(head.input) > 3 and head.input[3] else None
    expected = _decode_matmul_nbits(initializers[head.input[1]], initializers[head.input[2]], zero_points)
    looked_up = _run_with_output(files["gpt2.int4"], lookup.output[0])  # [1, vocab, n_embd]
    np.testing.assert_allclose(looked_up[0], expected, rtol=1e-6, atol=0)
    fp32_table = load_checkpoint(files["gpt2.bin"]).weights["transformer.wte.weight"].numpy()
    assert float(np.abs(expected - fp32_table).max()) < 0.1 * float(np.abs(fp32_table).max())


def test_quantized_gpt2_drops_the_float_table(files: dict[str, Path]) -> None:
    vocab = int(_metadata(files["gpt2"])["textgen.vocab_size"])
    for mode in ("int8", "int4"):
        model = onnx.load(str(files[f"gpt2.{mode}"]))
        shapes = [sorted(init.dims) for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT]
        assert sorted([N_EMBD, vocab]) not in shapes, mode


# --- perplexity ------------------------------------------------------------------------------------------------


def _torch_nll(checkpoint: Path, ids: list[int], span: int) -> float:
    """Reference: cross-entropy of the PyTorch model over windows of ``span`` inputs (plus the next target)."""
    data = load_checkpoint(checkpoint)
    model = model_from_checkpoint(data)
    usable = len(json.loads(data.tokenizer)["model"]["vocab"])
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, span):
            piece = torch.tensor([ids[start:start + span + 1]])
            logits = model(piece[:, :-1])[0][0, :, :usable]
            total += float(torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum"))
    return total / (len(ids) - 1)


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
def test_text_nll_matches_pytorch_cross_entropy(files: dict[str, Path], arch: str) -> None:
    model = OnnxModel.open(files[arch], device="cpu", threads=1)
    ids = [model.info.special.eos, *model.encode(TEXT)]
    assert len(ids) > 2 * CONTEXT  # the GPT-2 needs several windows
    span = CONTEXT if arch == "gpt2" else len(ids) - 1
    assert text_nll(files[arch], TEXT, threads=1) == pytest.approx(_torch_nll(files[f"{arch}.bin"], ids, span),
                                                                 abs=1e-4)


def test_perplexity_cost_reports_both_perplexities(files: dict[str, Path]) -> None:
    ppl_fp32, ppl_q, increase = perplexity_cost(files["gpt2"], files["gpt2.int4"], TEXT, threads=1)
    assert ppl_fp32 == pytest.approx(math.exp(text_nll(files["gpt2"], TEXT, threads=1)), rel=1e-12)
    assert ppl_q == pytest.approx(math.exp(text_nll(files["gpt2.int4"], TEXT, threads=1)), rel=1e-12)
    assert increase == pytest.approx(ppl_q / ppl_fp32 - 1)
    assert ppl_q != ppl_fp32
    assert perplexity_cost(files["lstm"], files["lstm"], TEXT, threads=1)[2] == 0.0
    limited = perplexity_cost(files["lstm"], files["lstm.int8"], TEXT, max_tokens=10, threads=1)
    assert limited[0] != perplexity_cost(files["lstm"], files["lstm.int8"], TEXT, threads=1)[0]


# --- errors ---------------------------------------------------------------------------------------------------------


def test_quantize_errors_are_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="unknown quantization"):
        quantize_model(files["lstm"], tmp_path / "x.onnx", "int2")  # type: ignore[arg-type]
    with pytest.raises(QuantizeError, match="not found"):
        quantize_model(tmp_path / "missing.onnx", tmp_path / "x.onnx", "int8")
    stripped = onnx.load(str(files["lstm"]))
    del stripped.metadata_props[:]
    onnx.save(stripped, str(tmp_path / "plain.onnx"))
    with pytest.raises(QuantizeError, match="not a textgen model file") as caught:
        quantize_model(tmp_path / "plain.onnx", tmp_path / "x.onnx", "int8")
    assert "\n" not in str(caught.value)
    with pytest.raises(QuantizeError, match="overwrite the source"):
        quantize_model(files["lstm"], files["lstm"], "int8")
    assert not (tmp_path / "x.onnx").exists()


# --- fp16 (GPT-2 files for GPU decoding) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_model(files["gpt2"], tmp_path_factory.mktemp("fp16") / "gpt2.fp16.onnx", "fp16")


def test_fp16_file_halves_the_weights_and_declares_float16_state(files: dict[str, Path], fp16: Path) -> None:
    original, converted = _metadata(files["gpt2"]), _metadata(fp16)
    assert original[KEY_VERSION] == "1" and converted[KEY_VERSION] == "2"
    assert json.loads(converted[KEY_SOURCE])["quantized"]["mode"] == "fp16"
    assert set(converted) == set(original)
    before, after = decode_metadata(original), decode_metadata(converted)
    for name in ("arch", "tokenizer_json", "special", "vocab_size", "context_length", "inputs", "generation",
                 "model_config"):
        assert getattr(after, name) == getattr(before, name), name
    states = json.loads(converted[KEY_STATE])
    assert states == [{**entry, "dtype": "float16"} for entry in json.loads(original[KEY_STATE])]
    graph = onnx.load(str(fp16)).graph
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.input, *graph.output]}
    assert types["logits"] == onnx.TensorProto.FLOAT  # samplers see float32 as before
    for entry in states:
        assert types[entry["input"]] == types[entry["output"]] == onnx.TensorProto.FLOAT16
    assert not [init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT
                and init.dims and math.prod(init.dims) > 64]
    assert fp16.stat().st_size < 0.55 * files["gpt2"].stat().st_size  # the tied table is still stored once


def test_fp16_logits_and_greedy_text_match_fp32(files: dict[str, Path], fp16: Path) -> None:
    reference, converted = _logits(files["gpt2"]), _logits(fp16)
    peak = float(np.abs(reference).max())
    assert peak > 0.1 and converted.dtype == np.float32
    assert float(np.abs(converted - reference).max()) <= 1e-2 * peak
    assert not np.array_equal(converted, reference)
    model = OnnxModel.open(fp16, device="cpu", threads=1)
    assert {value.dtype for value in model.initial_state(2).values()} == {np.dtype(np.float16)}
    tokens = {}
    for path in (files["gpt2"], fp16):
        runner = OnnxModel.open(path, device="cpu", threads=1)
        ids = [0, *runner.encode("abc def")]
        logits, state = runner.run(np.array([ids], dtype=np.int64), runner.initial_state(1), 0)
        for _ in range(12):  # greedy, feeding the (float16) cache back
            ids.append(int(np.argmax(logits[0])))
            logits, state = runner.run(np.array([[ids[-1]]], dtype=np.int64), state, len(ids) - 1)
        tokens[path] = ids
    assert tokens[files["gpt2"]] == tokens[fp16]


@pytest.mark.cuda
def test_fp16_on_cuda_keeps_a_float16_cache_on_the_gpu(files: dict[str, Path], fp16: Path) -> None:
    """What the fp16 file is for: decoding on a GPU with the float16 KV cache resident there."""
    try:
        gpu = OnnxModel.open(fp16, device="cuda")
    except ModelLoadError as exc:
        pytest.skip(f"no usable CUDA: {exc}")
    cpu = OnnxModel.open(files["gpt2"], device="cpu", threads=1)
    ids = np.array([[0, *cpu.encode("abc def")]], dtype=np.int64)
    got, state = gpu.run(ids, gpu.initial_state(1), 0)
    expected, cpu_state = cpu.run(ids, cpu.initial_state(1), 0)
    for position in range(ids.shape[1], ids.shape[1] + 4):
        assert all(value.device_name() == "cuda" and value.data_type() == "tensor(float16)"
                   for value in state.values())
        np.testing.assert_allclose(got, expected, atol=1e-2 * max(1.0, float(np.abs(expected).max())))
        step = np.array([[int(np.argmax(expected[0]))]], dtype=np.int64)
        got, state = gpu.run(step, state, position)
        expected, cpu_state = cpu.run(step, cpu_state, position)


def test_fp16_is_refused_for_rnns_and_checked_against_the_source(files: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuantizeError, match="fp16 is for GPT-2 files") as caught:
        quantize_model(files["lstm"], tmp_path / "lstm.fp16.onnx", "fp16")
    assert "\n" not in str(caught.value)
    monkeypatch.setattr("export.quantize.FP16_TOLERANCE", 0.0)  # no float16 file matches float32 exactly
    with pytest.raises(QuantizeError, match="logits differ from the source's"):
        quantize_model(files["gpt2"], tmp_path / "gpt2.fp16.onnx", "fp16")
    assert not list(tmp_path.iterdir())


# --- export.optimize -------------------------------------------------------------------------------------------


def test_optimize_gpt2_keeps_size_metadata_and_logits(files: dict[str, Path], tmp_path: Path) -> None:
    result = optimize_gpt2(files["gpt2"], tmp_path / "opt.onnx")
    assert result.path.exists() and result.fused  # the pass changed something
    assert result.max_abs_diff <= 1e-3
    assert _metadata(result.path) == _metadata(files["gpt2"])
    weights = sum(len(init.raw_data) for init in onnx.load(str(result.path)).graph.initializer)
    assert weights <= 1.05 * result.weight_bytes
    np.testing.assert_allclose(_logits(result.path), _logits(files["gpt2"]), atol=1e-3)


def test_optimize_refuses_non_gpt2(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(OptimizeError, match="lstm model"):
        optimize_gpt2(files["lstm"], tmp_path / "opt.onnx")
    assert not (tmp_path / "opt.onnx").exists()


def test_default_gpt2_file_is_the_attention_graph_and_matches_decomposed(files: dict[str, Path],
                                                                        decomposed: dict[str, Path]) -> None:
    graph = onnx.load(str(files["gpt2"]))
    assert any(node.op_type == "Attention" for node in graph.graph.node)
    assert max(opset.version for opset in graph.opset_import if opset.domain in ("", "ai.onnx")) == 23
    assert not any(node.op_type == "Attention" for node in onnx.load(str(decomposed["gpt2"])).graph.node)
    assert _metadata(decomposed["gpt2"]) == _metadata(files["gpt2"])
    np.testing.assert_allclose(_logits(files["gpt2"]), _logits(decomposed["gpt2"]), atol=1e-4)


# --- both GPT-2 graphs: every MatMul quantized, the tied table shared --------------------------------------------


def _weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [node for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers]


@pytest.mark.parametrize("graph", ["attention", "decomposed"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_gpt2_weight_matmul_is_quantized(files: dict[str, Path], decomposed: dict[str, Path], graph: str,
                                               mode: str) -> None:
    paths = files if graph == "attention" else decomposed
    fp32, quantized = onnx.load(str(paths["gpt2"])), onnx.load(str(paths[f"gpt2.{mode}"]))
    weight_matmuls = len(_weight_matmuls(fp32))
    assert weight_matmuls == 4 + 1  # one layer's qkv, attention output, two MLP products; the LM head
    assert _weight_matmuls(quantized) == []
    kernel = "MatMulInteger" if mode == "int8" else "MatMulNBits"
    assert sum(node.op_type == kernel for node in quantized.graph.node) == weight_matmuls
    vocab = int(_metadata(paths["gpt2"])["textgen.vocab_size"])
    assert quantized_lm_head(quantized, vocab)
    float_tables = [init for init in quantized.graph.initializer if init.data_type == onnx.TensorProto.FLOAT
                    and sorted(init.dims) == sorted([N_EMBD, vocab])]
    assert float_tables == []  # the tied lookup reads the quantized head
    lookup = "DequantizeLinear" if mode == "int8" else "GatherBlockQuantized"
    assert sum(node.op_type == lookup for node in quantized.graph.node) == 1
    attention_ops = sum(node.op_type == "Attention" for node in quantized.graph.node)
    assert attention_ops == (1 if graph == "attention" else 0)


@pytest.mark.parametrize(("mode", "relative_limit"), [("int8", 0.05), ("int4", 0.2)])
def test_quantized_decomposed_gpt2_stays_close_to_fp32(decomposed: dict[str, Path], mode: str,
                                                       relative_limit: float) -> None:
    reference, quantized = _logits(decomposed["gpt2"]), _logits(decomposed[f"gpt2.{mode}"])
    peak = float(np.abs(reference).max())
    assert float(np.abs(quantized - reference).max()) <= relative_limit * peak


@pytest.mark.parametrize(("rows", "block"), [((128, 384), 128), ((64, 384), 32)])
def test_int4_blocks_are_128_unless_a_weight_is_narrower(rows: tuple[int, int], block: int) -> None:
    """Blocks of 128 (faster on GPT-2 small); 32 when some MatMul has K < 128, which the quantizer would skip."""
    from onnx import TensorProto, helper

    from export.quantize import _int4_block_size

    weights = [onnx.numpy_helper.from_array(np.zeros((k, 16), dtype=np.float32), f"w{i}") for i, k in enumerate(rows)]
    nodes = [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]) for i in range(len(rows))]
    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, k]) for i, k in enumerate(rows)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 16]) for i in range(len(rows))]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=weights)
    assert _int4_block_size(helper.make_model(graph)) == block


# --- int8 weight encodings (s7 default, u8, s8) and the CPUs they are exact on ------------------------------------


def _matmul_integer_weights(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    initializers = {init.name: init for init in model.graph.initializer}
    return [onnx.numpy_helper.to_array(initializers[node.input[1]]) for node in model.graph.node
            if node.op_type == "MatMulInteger" and node.input[1] in initializers]


@pytest.fixture(scope="module")
def int8_encodings(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8-encodings")
    paths = {"s7": files["lstm.int8"]}  # the default
    for weights in ("s8", "u8"):
        paths[weights] = quantize_model(files["lstm"], root / f"lstm.{weights}.onnx", "int8", weights)
    return paths


def test_int8_weight_encodings_are_stored_as_named_and_recorded(int8_encodings: dict[str, Path]) -> None:
    ranges = {}
    for weights, path in int8_encodings.items():
        assert json.loads(_metadata(path)[KEY_SOURCE])["quantized"]["int8_weights"] == weights
        arrays = _matmul_integer_weights(path)
        assert arrays, weights
        ranges[weights] = (arrays[0].dtype, max(int(np.abs(a.astype(np.int32)).max()) for a in arrays))
    assert ranges["s7"][0] == np.int8 and ranges["s7"][1] <= 64  # 7-bit: no pair of products saturates int16
    assert ranges["s8"][0] == np.int8 and ranges["s8"][1] > 64
    assert ranges["u8"][0] == np.uint8 and ranges["u8"][1] > 128


@pytest.mark.parametrize("weights", ["s7", "u8"])
def test_int8_encodings_safe_everywhere_stay_close_to_fp32_on_this_cpu(files: dict[str, Path],
                                                                       int8_encodings: dict[str, Path],
                                                                       weights: str) -> None:
    reference, quantized = _logits(files["lstm"]), _logits(int8_encodings[weights])
    assert float(np.abs(quantized - reference).max()) <= 0.05 * float(np.abs(reference).max())


def test_an_s8_file_is_flagged_on_a_cpu_without_vnni_only(int8_encodings: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.session

    monkeypatch.setattr(runtime.session, "has_vnni", lambda: False)
    note = OnnxModel.open(int8_encodings["s8"], device="cpu", threads=1).file_note or ""
    assert "without VNNI" in note and "--int8-weights s7 or u8" in note
    for weights in ("s7", "u8"):
        assert "VNNI" not in (OnnxModel.open(int8_encodings[weights], device="cpu", threads=1).file_note or "")
    monkeypatch.setattr(runtime.session, "has_vnni", lambda: True)
    assert "VNNI" not in (OnnxModel.open(int8_encodings["s8"], device="cpu", threads=1).file_note or "")


def test_unknown_int8_encoding_is_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="unknown int8 weight encoding 's9'; choose s7 or s8 or u8"):
        quantize_model(files["lstm"], tmp_path / "x.onnx", "int8", "s9")  # type: ignore[arg-type]
    assert not (tmp_path / "x.onnx").exists()


def test_cpu_flags_and_vnni_come_from_cpuinfo(tmp_path: Path) -> None:
    from runtime.cpu import cpu_flags, has_vnni, int8_note

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    flags = cpu_flags.__wrapped__(cpuinfo)
    assert flags == frozenset({"fpu", "sse2", "avx2", "fma"})
    assert cpu_flags.__wrapped__(tmp_path / "missing") is None
    if has_vnni(frozenset()) is not None:  # x86: decided by the flags
        assert has_vnni(flags) is False and has_vnni(flags | {"avx512_vnni"}) is True
        assert has_vnni(frozenset({"avx_vnni"})) is True
    s8 = {"quantized": {"mode": "int8", "int8_weights": "s8"}}
    assert int8_note(s8, vnni=False) and int8_note(s8, vnni=True) is None and int8_note(s8, vnni=None) is None
    assert int8_note({"quantized": {"mode": "int8"}}, vnni=False) is None  # older files: all s7
    assert int8_note({"quantized": "garbage"}, vnni=False) is None  # untrusted metadata


def test_textgen_repl_in_a_script_warns_of_an_s8_file_here(int8_encodings: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import runtime.session
    from repl.cli import main

    monkeypatch.setattr(runtime.session, "has_vnni", lambda: False)
    for weights, warned in (("s8", True), ("s7", False)):
        assert main(["--model", str(int8_encodings[weights]), "--prompt", "the", "--max-tokens", "3"]) == 0
        captured = capsys.readouterr()
        assert ("note: this int8 file stores full-range signed 8-bit weights" in captured.err) is warned, weights
        assert "VNNI" not in captured.out  # the text stays clean for a pipe
