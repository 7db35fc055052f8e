"""The exporter: checkpoint / HF directory -> one verified .onnx file that follows docs/model-file.md.

Every test runs real files through real onnxruntime sessions; models are tiny and made here.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from export.graph import initializer_bytes
from export.onnx_export import ExportError, export_checkpoint
from models.checkpoint import CheckpointError, save_checkpoint
from models.rnn import RNNConfig, RNNLanguageModel
from runtime.defaults import DEFAULT_GENERATION
from runtime.modelfile import ModelInfo, decode_metadata

ort.set_default_logger_severity(3)
ALPHABET = "abcdefghij .,\n"
REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_GPT2 = importlib.util.find_spec("models.gpt2") is not None
HAS_HF_IMPORT = importlib.util.find_spec("models.hf_gpt2") is not None


# --- helpers -------------------------------------------------------------------------------------------------


def make_tokenizer() -> Tokenizer:
    """The project's char tokenizer when train/tokenizer.py exists; otherwise the same shape built here."""
    if importlib.util.find_spec("train.tokenizer") is not None:
        from train.tokenizer import build_tokenizer

        return build_tokenizer("char", [ALPHABET])
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{char: index + 2 for index, char in enumerate(ALPHABET)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["<|endoftext|>", "<unk>"])
    return tokenizer


def special_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    return {"eos": tokenizer.token_to_id("<|endoftext|>"), "unk": tokenizer.token_to_id("<unk>"), "bos": None}


def write_rnn_checkpoint(path: Path, cell: str, seed: int = 0) -> RNNLanguageModel:
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    config = RNNConfig(vocab_size=tokenizer.get_vocab_size() + 2, cell=cell, embedding_size=8, hidden_size=16,
                       num_layers=2)
    model = RNNLanguageModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)  # larger logits than the default init, so differences would show
    save_checkpoint(
        {
            "arch": cell, "model_config": config.to_dict(), "tokenizer": tokenizer.to_str(),
            "special_tokens": special_ids(tokenizer), "model": model.state_dict(),
            "generation": {"temperature": 0.6, "top_k": 10},
            "metrics": {"step": 123, "val_loss": 1.5},
        },
        path,
    )
    return model


def read_model(path: Path) -> tuple[ort.InferenceSession, ModelInfo]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, decode_metadata(session.get_modelmeta().custom_metadata_map)


def zeros_state(info: ModelInfo, batch: int) -> dict[str, np.ndarray]:
    return {spec.input: np.zeros(spec.initial_shape(batch), dtype=np.float32) for spec in info.state}


def run_step(session: ort.InferenceSession, info: ModelInfo, feeds: dict[str, np.ndarray],
             state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    outputs = session.run(["logits", *(spec.output for spec in info.state)], {**feeds, **state})
    return outputs[0], {spec.input: value for spec, value in zip(info.state, outputs[1:], strict=True)}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )


def assert_user_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


# --- RNN -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["lstm", "gru"])
def rnn_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = root / f"{request.param}.bin"
    model = write_rnn_checkpoint(checkpoint, request.param)
    result = export_checkpoint(checkpoint)
    session, info = read_model(result.path)
    return request.param, model, result, session, info


def test_rnn_export_writes_default_path_and_reports(rnn_export) -> None:
    cell, _, result, _, _ = rnn_export
    assert result.path.name == f"{cell}.onnx" and result.path.exists()
    assert result.bytes == result.path.stat().st_size
    assert result.arch == cell
    assert 0 <= result.max_abs_diff <= 1e-4
    assert result.provider == "CPUExecutionProvider"


def test_rnn_metadata_round_trips(rnn_export) -> None:
    cell, model, _, session, info = rnn_export
    tokenizer = make_tokenizer()
    assert info.arch == cell
    assert Tokenizer.from_str(info.tokenizer_json).encode("abc\n").ids == tokenizer.encode("abc\n").ids
    assert asdict(info.special) == special_ids(tokenizer)
    assert info.vocab_size == model.config.vocab_size
    assert info.context_length == 0 and info.inputs == ()
    layers, hidden = model.config.num_layers, model.config.hidden_size
    expected_names = ["h", "c"] if cell == "lstm" else ["h"]
    assert [(s.input, s.output) for s in info.state] == [(f"state.{n}", f"state_out.{n}") for n in expected_names]
    assert all(s.shape == (layers, "batch", hidden) and s.batch_axis == 1 and s.seq_axis is None for s in info.state)
    assert info.generation == {**DEFAULT_GENERATION, "temperature": 0.6, "top_k": 10}
    assert info.model_config == model.config.to_dict()
    assert info.source["checkpoint"] == f"{cell}.bin"
    assert info.source["step"] == 123 and info.source["val_loss"] == 1.5 and info.source["textgen_version"]
    # Every state tensor named in the metadata exists in the graph.
    graph_inputs = {i.name for i in session.get_inputs()}
    assert {s.input for s in info.state} <= graph_inputs
    assert info.generation["start_with_eos"] is True  # trained here: documents follow the separator


def test_files_without_the_issue_16_keys_still_load(rnn_export) -> None:
    """textgen.tokenizer_options and generation's start_with_eos are optional: older files read as before."""
    from runtime.modelfile import KEY_GENERATION, KEY_TOKENIZER_OPTIONS, encode_metadata
    from runtime.settings import Settings

    info = rnn_export[4]
    meta = encode_metadata(info)
    assert KEY_TOKENIZER_OPTIONS in meta
    del meta[KEY_TOKENIZER_OPTIONS]
    meta[KEY_GENERATION] = '{"temperature": 0.6}'
    old = decode_metadata(meta)
    assert old.tokenizer_options == {} and old.format_version == info.format_version
    assert Settings(old.generation).get("start_with_eos") is True


def test_rnn_graph_axes_are_symbolic(rnn_export) -> None:
    _, _, result, _, _ = rnn_export
    proto = onnx.load(str(result.path))
    shapes = {v.name: v.type.tensor_type.shape.dim for v in [*proto.graph.input, *proto.graph.output]}
    assert all(d.dim_param for d in shapes["input_ids"]) and all(d.dim_param for d in shapes["logits"][:2])
    assert shapes["state.h"][1].dim_param and shapes["state_out.h"][1].dim_param
    assert shapes["state.h"][0].dim_value == 2 and shapes["state.h"][2].dim_value == 16


def test_rnn_one_token_and_long_prompt_match_pytorch(rnn_export) -> None:
    _, model, _, session, info = rnn_export
    generator = torch.Generator().manual_seed(5)
    for length in (1, 50):
        ids = torch.randint(0, info.vocab_size, (1, length), generator=generator)
        logits, _ = run_step(session, info, {"input_ids": ids.numpy()}, zeros_state(info, 1))
        with torch.no_grad():
            expected, _ = model(ids)
        assert logits.shape == (1, length, info.vocab_size)
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5, rtol=0)


def test_rnn_stateful_steps_equal_full_sequence_forward(rnn_export) -> None:
    _, model, _, session, info = rnn_export
    ids = torch.randint(0, info.vocab_size, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full, _ = model(ids)
    state = zeros_state(info, 2)
    stepped = []
    for position in range(ids.shape[1]):
        logits, state = run_step(session, info, {"input_ids": ids[:, position : position + 1].numpy()}, state)
        stepped.append(logits)
    np.testing.assert_allclose(np.concatenate(stepped, axis=1), full.numpy(), atol=1e-5, rtol=0)


def test_rnn_batch_of_three(rnn_export) -> None:
    _, model, _, session, info = rnn_export
    ids = torch.randint(0, info.vocab_size, (3, 4), generator=torch.Generator().manual_seed(7))
    logits, state = run_step(session, info, {"input_ids": ids.numpy()}, zeros_state(info, 3))
    with torch.no_grad():
        expected, expected_state = model(ids)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(state["state.h"], expected_state[0].numpy(), atol=1e-5, rtol=0)


def test_verification_failure_raises_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tmp_path / "lstm.bin"
    write_rnn_checkpoint(checkpoint, "lstm")
    import export.onnx_export as exporter

    original = exporter.dedupe_initializers

    def corrupt_head_bias(proto: onnx.ModelProto) -> int:
        # Simulate an exporter bug: the graph's head bias no longer matches the PyTorch weights.
        saved = original(proto)
        for init in proto.graph.initializer:
            if init.name.endswith("head.bias"):
                values = onnx.numpy_helper.to_array(init) + 0.5
                init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
                return saved
        raise AssertionError("no head bias initializer to corrupt")

    monkeypatch.setattr(exporter, "dedupe_initializers", corrupt_head_bias)
    with pytest.raises(ExportError, match="verification failed"):
        export_checkpoint(checkpoint, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["lstm.bin"]  # no temp file left behind either


def test_bad_arguments_are_export_errors(tmp_path: Path) -> None:
    checkpoint = tmp_path / "gru.bin"
    write_rnn_checkpoint(checkpoint, "gru")
    with pytest.raises(ExportError, match="opset"):
        export_checkpoint(checkpoint, opset=7)
    with pytest.raises(ExportError, match="tolerance"):
        export_checkpoint(checkpoint, tolerance=0.0)
    with pytest.raises(ExportError, match="directory"):
        export_checkpoint(checkpoint, output=tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        export_checkpoint(tmp_path / "missing.bin")


# --- GPT-2 (models.gpt2) -------------------------------------------------------------------------------------


def gpt2_config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else asdict(config)


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory: pytest.TempPathFactory):
    if not HAS_GPT2:
        pytest.skip("models/gpt2.py is not written yet")
    from models.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    # A large vocabulary makes the tied embedding dominate the parameters, so storing it twice would show.
    config = GPT2Config(vocab_size=8192, context_length=48, n_layer=2, n_head=2, n_embd=32)
    model = GPT2(config).eval()
    checkpoint = tmp_path_factory.mktemp("gpt2") / "gpt2.bin"
    save_checkpoint(
        {
            "arch": "gpt2", "model_config": gpt2_config_dict(config), "tokenizer": tokenizer.to_str(),
            "special_tokens": special_ids(tokenizer), "model": model.state_dict(),
        },
        checkpoint,
    )
    result = export_checkpoint(checkpoint)
    session, info = read_model(result.path)
    return model, result, session, info


def gpt2_feeds(ids: np.ndarray, past_length: int) -> dict[str, np.ndarray]:
    batch, seq = ids.shape
    return {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, past_length + seq), dtype=np.int64),
        "position_ids": np.tile(np.arange(past_length, past_length + seq, dtype=np.int64), (batch, 1)),
    }


def test_gpt2_metadata(gpt2_export) -> None:
    model, _, _, info = gpt2_export
    config = model.config
    assert info.arch == "gpt2" and info.inputs == ("attention_mask", "position_ids")
    assert info.context_length == config.context_length and info.vocab_size == config.vocab_size
    assert len(info.state) == 2 * config.n_layer
    assert info.state[1].input == "past_key_values.0.value" and info.state[1].output == "present.0.value"
    head_dim = config.n_embd // config.n_head
    assert all(s.shape == ("batch", config.n_head, "past", head_dim) for s in info.state)
    assert all(s.batch_axis == 0 and s.seq_axis == 2 for s in info.state)
    assert info.generation == DEFAULT_GENERATION


def test_gpt2_logits_match_pytorch(gpt2_export) -> None:
    model, _, session, info = gpt2_export
    ids = np.random.default_rng(1).integers(0, info.vocab_size, (2, 6))
    logits, _ = run_step(session, info, gpt2_feeds(ids, 0), zeros_state(info, 2))
    with torch.no_grad():
        expected, _ = model(torch.from_numpy(ids))
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)


def test_gpt2_cached_decode_equals_full_recompute(gpt2_export) -> None:
    _, _, session, info = gpt2_export
    ids = np.random.default_rng(2).integers(0, info.vocab_size, (1, 20))
    full, _ = run_step(session, info, gpt2_feeds(ids, 0), zeros_state(info, 1))
    logits, state = run_step(session, info, gpt2_feeds(ids[:, :8], 0), zeros_state(info, 1))
    pieces = [logits]
    for position in range(8, ids.shape[1]):
        logits, state = run_step(session, info, gpt2_feeds(ids[:, position : position + 1], position), state)
        pieces.append(logits)
    assert state["past_key_values.0.key"].shape[2] == ids.shape[1]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-4, rtol=0)


def test_gpt2_tied_embedding_stored_once(gpt2_export) -> None:
    model, result, _, _ = gpt2_export
    unique = {p.data_ptr(): p for p in model.parameters()}
    parameter_bytes = sum(p.numel() * p.element_size() for p in unique.values())
    proto = onnx.load(str(result.path))
    assert initializer_bytes(proto) <= 1.02 * parameter_bytes
    assert result.bytes <= 1.05 * parameter_bytes


def ai_onnx_opset(proto: onnx.ModelProto) -> int:
    return max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def graph_interface(proto: onnx.ModelProto) -> list[tuple[str, int, list[str | int]]]:
    """(name, dtype, dims) of every graph input and output: what docs/model-file.md fixes."""
    return [(value.name, value.type.tensor_type.elem_type,
             [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim])
            for value in [*proto.graph.input, *proto.graph.output]]


def test_gpt2_default_export_is_one_opset_23_file_with_attention_ops(gpt2_export) -> None:
    model, result, _, _ = gpt2_export
    assert result.attention_op and result.opset == 23 and result.fallback is None
    proto = onnx.load(str(result.path), load_external_data=False)
    assert ai_onnx_opset(proto) == 23
    attention = [node for node in proto.graph.node if node.op_type == "Attention"]
    assert len(attention) == model.config.n_layer
    assert not any(node.op_type == "Softmax" for node in proto.graph.node)  # nothing decomposed left
    # Each op reads its layer's cache input and writes its present outputs itself (export/attention_cache.py):
    # no Concat/Transpose/Reshape of heads around it.
    for layer, node in enumerate(attention):
        assert list(node.input[4:]) == [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        assert list(node.output[1:]) == [f"present.{layer}.key", f"present.{layer}.value"]
    assert not any(node.op_type in ("Concat", "Reshape") for node in proto.graph.node)
    transposes = [node.input[0] for node in proto.graph.node if node.op_type == "Transpose"]
    assert len(transposes) == 1 and transposes[0].endswith("__columns")  # the tied lookup's rows, not heads
    # The LM head multiplies with a stored [n_embd, vocab] weight, not a per-session Transpose of the embedding
    # (the dynamo exporter leaves that unfolded above 8192 elements; this vocabulary has 8192 x 32).
    shapes = {init.name: list(init.dims) for init in proto.graph.initializer}
    heads = [node for node in proto.graph.node if node.op_type == "MatMul"
             and shapes.get(node.input[1]) == [model.config.n_embd, model.config.vocab_size]]
    assert len(heads) == 1
    assert not any(node.op_type == "Transpose" and node.input[0] in shapes for node in proto.graph.node)
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["gpt2.bin", "gpt2.onnx"]  # no .data file


def test_gpt2_attention_and_decomposed_graphs_share_the_interface(gpt2_export, tmp_path: Path) -> None:
    _, result, session, info = gpt2_export
    decomposed = export_checkpoint(result.path.with_suffix(".bin"), tmp_path / "decomposed.onnx",
                                   attention="decomposed")
    assert not decomposed.attention_op and decomposed.opset == 17 and decomposed.fallback is None
    proto, reference = onnx.load(str(result.path)), onnx.load(str(decomposed.path))
    assert ai_onnx_opset(reference) == 17
    assert not any(node.op_type == "Attention" for node in reference.graph.node)
    assert graph_interface(proto) == graph_interface(reference)
    assert {p.key: p.value for p in proto.metadata_props} == {p.key: p.value for p in reference.metadata_props}
    ids = np.random.default_rng(3).integers(0, info.vocab_size, (2, 5))
    other, _ = read_model(decomposed.path)
    expected, _ = run_step(other, info, gpt2_feeds(ids, 0), zeros_state(info, 2))
    logits, _ = run_step(session, info, gpt2_feeds(ids, 0), zeros_state(info, 2))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def _read_elsewhere(graph: onnx.GraphProto, how: str, heads_shape: list) -> None:
    """Make something besides layer 1's attention read a tensor the cache rewrite would remove or move."""
    concat = next(node for node in graph.node if node.op_type == "Concat" and node.input[0] == "past_key_values.1.key")
    if how == "node":
        graph.node.append(onnx.helper.make_node("Identity", [concat.input[1]], ["extra"]))
        graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, heads_shape))
    elif how == "graph output":
        graph.output.append(onnx.helper.make_tensor_value_info(concat.input[1], onnx.TensorProto.FLOAT, heads_shape))
    else:  # "present read early": a node between the Concat and the attention reads the concatenated keys
        position = list(graph.node).index(concat) + 1
        graph.node.insert(position, onnx.helper.make_node("Shape", ["present.1.key"], ["extra"]))
        graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.INT64, [4]))


@pytest.mark.parametrize("how", ["node", "graph output", "present read early"])
def test_attention_cache_fusion_leaves_a_layer_whose_tensors_are_read_elsewhere(gpt2_export, monkeypatch,
                                                                                how: str) -> None:
    """export/attention_cache.py rewrites a layer only when nothing else reads the nodes it removes; the partly
    rewritten graph is valid (onnx checker, node order) and computes exactly what the exporter's own graph does."""
    import export.onnx_export as onnx_export
    from export.adapters import gpt2_signature
    from export.attention_cache import fuse_attention_cache

    model, _, _, info = gpt2_export
    config = model.config
    original = onnx_export._export_attention_graph(
        model, gpt2_signature(config.n_layer, config.n_head, config.n_embd, config.vocab_size))
    _read_elsewhere(original.graph, how, ["batch", config.n_head, "seq", config.n_embd // config.n_head])
    fused = onnx.ModelProto()
    fused.CopyFrom(original)

    assert fuse_attention_cache(fused, config.n_head) == 1  # layer 0 only
    onnx.checker.check_model(fused, full_check=True)
    attention = [node for node in fused.graph.node if node.op_type == "Attention"]
    assert [len(node.input) for node in attention] == [6, 4]
    assert len(fused.graph.node) < len(original.graph.node) - 8  # the removed nodes' shape arithmetic went too
    ids = np.random.default_rng(5).integers(0, info.vocab_size, (2, 3))
    past_shape = (2, config.n_head, 4, config.n_embd // config.n_head)  # 4 cached positions
    noise = np.random.default_rng(6)
    state = {spec.input: noise.standard_normal(past_shape).astype(np.float32) for spec in info.state}
    feeds = {**gpt2_feeds(ids, 4), **state}
    expected = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    actual = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert len(actual) == len(expected) == 2 + 2 * config.n_layer
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_a_cache_rewrite_that_fails_parity_keeps_the_attention_graph(tmp_path: Path, monkeypatch) -> None:
    """If the rewritten graph does not match PyTorch (a wrong head count, here), the exporter writes the
    exporter's own Attention-op graph rather than falling back to the opset-17 one or failing."""
    import export.onnx_export as onnx_export
    from export.attention_cache import fuse_attention_cache

    def wrong_heads(proto: onnx.ModelProto, n_head: int) -> int:
        return fuse_attention_cache(proto, n_head * 2)

    monkeypatch.setattr(onnx_export, "fuse_attention_cache", wrong_heads)
    write_small_gpt2_checkpoint(tmp_path / "gpt2.bin")
    result = export_checkpoint(tmp_path / "gpt2.bin")
    assert result.attention_op and result.opset == 23 and result.fallback is None
    assert result.max_abs_diff < 1e-4
    proto = onnx.load(str(result.path))
    assert [len(node.input) for node in proto.graph.node if node.op_type == "Attention"] == [4]
    assert any(node.op_type == "Concat" and node.input[0] == "past_key_values.0.key" for node in proto.graph.node)


def write_small_gpt2_checkpoint(path: Path) -> None:
    from models.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size() + 2, context_length=16, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint({"arch": "gpt2", "model_config": gpt2_config_dict(config), "tokenizer": tokenizer.to_str(),
                     "special_tokens": special_ids(tokenizer), "model": GPT2(config).state_dict()}, path)


@pytest.fixture
def dynamo_export_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dynamo exporter raises (as on torch versions it cannot handle the KV cache); TorchScript still works."""
    original = torch.onnx.export

    def export(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure\nsecond line of a long torch.export message")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)


def assert_decomposed_gpt2(path: Path) -> None:
    proto = onnx.load(str(path))
    assert ai_onnx_opset(proto) == 17
    assert not any(node.op_type == "Attention" for node in proto.graph.node)
    assert read_model(path)[1].arch == "gpt2"


@pytest.mark.skipif(not HAS_GPT2, reason="models/gpt2.py is not written yet")
def test_gpt2_falls_back_when_the_dynamo_export_raises(tmp_path: Path, dynamo_export_fails, capsys) -> None:
    from export.cli import main

    checkpoint = tmp_path / "small.bin"
    write_small_gpt2_checkpoint(checkpoint)
    result = export_checkpoint(checkpoint, tmp_path / "lib.onnx")
    assert not result.attention_op and result.opset == 17
    assert result.fallback == "the opset-23 dynamo exporter failed: simulated dynamo failure"
    assert_decomposed_gpt2(result.path)
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "cli.onnx")]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("notice: the opset-23 Attention-op graph was not used"), lines
    assert "simulated dynamo failure" in lines[0] and "Traceback" not in captured.err
    assert "opset 17" in captured.out and "Attention op" not in captured.out
    assert_decomposed_gpt2(tmp_path / "cli.onnx")


@pytest.mark.skipif(not HAS_GPT2, reason="models/gpt2.py is not written yet")
def test_gpt2_falls_back_when_the_attention_graph_fails_parity(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import export.onnx_export as exporter

    original = exporter._export_attention_graph

    def corrupted(model, signature) -> onnx.ModelProto:
        # Simulate an exporter bug in the new graph only: one weight no longer matches PyTorch's.
        proto = original(model, signature)
        init = max(proto.graph.initializer, key=lambda tensor: len(tensor.raw_data))
        # Negated, not shifted: a constant shift of a weight that reads a LayerNorm output (which sums to zero
        # with the initial scale 1 and shift 0) would change nothing.
        init.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(init), init.name))
        return proto

    monkeypatch.setattr(exporter, "_export_attention_graph", corrupted)
    checkpoint = tmp_path / "small.bin"
    write_small_gpt2_checkpoint(checkpoint)
    result = export_checkpoint(checkpoint)
    assert result.fallback.startswith("verification failed: ONNX and PyTorch logits differ")
    assert "nothing was written" not in result.fallback  # something was: the decomposed graph
    assert result.max_abs_diff <= 1e-4
    assert_decomposed_gpt2(result.path)


@pytest.mark.skipif(not HAS_GPT2, reason="models/gpt2.py is not written yet")
def test_gpt2_attention_op_mode_does_not_fall_back(tmp_path: Path, dynamo_export_fails) -> None:
    checkpoint = tmp_path / "small.bin"
    write_small_gpt2_checkpoint(checkpoint)
    with pytest.raises(ExportError, match="dynamo exporter failed: simulated dynamo failure$"):
        export_checkpoint(checkpoint, attention="op")
    assert not (tmp_path / "small.onnx").exists()


@pytest.mark.skipif(not HAS_GPT2, reason="models/gpt2.py is not written yet")
def test_attention_and_opset_choices(tmp_path: Path, dynamo_export_fails) -> None:
    gpt2, lstm = tmp_path / "small.bin", tmp_path / "lstm.bin"
    write_small_gpt2_checkpoint(gpt2)
    write_rnn_checkpoint(lstm, "lstm")
    with pytest.raises(ExportError, match="needs opset 23, not 17"):
        export_checkpoint(gpt2, opset=17, attention="op")
    with pytest.raises(ExportError, match="only for GPT-2's Attention op"):
        export_checkpoint(lstm, opset=23)
    with pytest.raises(ExportError, match="only for GPT-2's Attention op"):
        export_checkpoint(gpt2, opset=23, attention="decomposed")
    with pytest.raises(ExportError, match="attention must be one of"):
        export_checkpoint(gpt2, attention="fused")  # type: ignore[arg-type]
    # An explicit pre-23 opset asks for the TorchScript graph: no dynamo attempt, so no fallback notice.
    result = export_checkpoint(gpt2, opset=18)
    assert result.opset == 18 and not result.attention_op and result.fallback is None
    # RNNs ignore --attention: they have none.
    assert export_checkpoint(lstm, attention="op").opset == 17


def test_cli_help_documents_the_attention_choice() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--attention {auto,op,decomposed}" in text and "opset 23" in text and "onnxruntime >= 1.23" in text


# --- Hugging Face GPT-2 directory ----------------------------------------------------------------------------


def greedy_onnx(session: ort.InferenceSession, info: ModelInfo, prompt: list[int], new_tokens: int) -> list[int]:
    state = zeros_state(info, 1)
    ids = np.array([prompt], dtype=np.int64)
    done, generated = 0, []
    for _ in range(new_tokens):
        logits, state = run_step(session, info, gpt2_feeds(ids, done), state)
        done += ids.shape[1]
        token = int(np.argmax(logits[0, -1]))
        generated.append(token)
        ids = np.array([[token]], dtype=np.int64)
    return generated


@pytest.mark.skipif(not HAS_HF_IMPORT, reason="models/hf_gpt2.py is not written yet")
def test_hf_directory_greedy_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = transformers.GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.mul_(4.0)  # peaky logits: greedy text varies and argmax ties are implausible
    directory = tmp_path / "tiny-gpt2"
    hf_model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    result = export_checkpoint(directory)
    assert result.path == tmp_path / "tiny-gpt2.onnx" and result.arch == "gpt2"
    session, info = read_model(result.path)
    prompt = tokenizer.encode("abc de").ids
    hf_model.generation_config.eos_token_id = None  # compare 30 tokens even if greedy emits end-of-text
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    assert greedy_onnx(session, info, prompt, 30) == expected[0, len(prompt) :].tolist()


@pytest.mark.skipif(not HAS_HF_IMPORT, reason="models/hf_gpt2.py is not written yet")
def test_hf_gpt2_session_continues_the_prompt_exactly_like_generate(tmp_path: Path) -> None:
    """Issue 16: a tiny random GPT-2 and its tokenizer saved by transformers; the exported file records that a
    session does not start with the end-of-text separator (GPT-2's tokenizer adds no BOS), so a REPL session's
    greedy continuation of a prompt is token for token what transformers' generate gives for the same prompt."""
    transformers = pytest.importorskip("transformers")
    from runtime.generate import Session
    from runtime.session import OnnxModel
    from runtime.settings import Settings

    torch.manual_seed(1)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(), eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", unk_token="<unk>")
    config = transformers.GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.mul_(4.0)  # peaky logits: greedy text varies and argmax ties are implausible
    directory = tmp_path / "tiny-gpt2"
    hf_model.save_pretrained(directory)
    fast.save_pretrained(directory)  # tokenizer.json + tokenizer_config.json, as a downloaded GPT-2 has them
    result = export_checkpoint(directory, attention="decomposed")
    model = OnnxModel.open(result.path, device="cpu", threads=1)
    assert model.info.generation["start_with_eos"] is False
    assert model.info.tokenizer_options == {"kind": "pretrained"}
    settings = Settings(model.info.generation)
    settings.set("temperature", 0)
    settings.set("max_new_tokens", 25)
    prompt = "abc de"
    ours = Session(model, settings).generate(prompt).tokens
    prompt_ids = fast(prompt)["input_ids"]
    assert prompt_ids == model.encode(prompt) and fast.eos_token_id not in prompt_ids
    hf_model.generation_config.eos_token_id = None  # compare every token even if greedy emits end-of-text
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=25, do_sample=False,
                                     attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                     pad_token_id=fast.eos_token_id)
    assert ours == expected[0, len(prompt_ids):].tolist()
    # With the separator switched on the session conditions on [eos] + prompt instead: another continuation.
    settings.set("start_with_eos", "on")
    assert Session(model, settings).generate(prompt).tokens != ours


# --- CLI ---------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create the marker file: the exporter must refuse without executing it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass
class BadInputRuns:
    results: dict[str, subprocess.CompletedProcess[str]]
    marker_created: bool
    onnx_files: list[str]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory: pytest.TempPathFactory) -> BadInputRuns:
    """`python -m export` on each kind of bad input, all launched at once (each process pays torch's import)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    text = root / "notes.txt"
    text.write_text("this is not a checkpoint\n")
    truncated = root / "truncated.bin"
    write_rnn_checkpoint(truncated, "lstm")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    evil = root / "evil.bin"
    buffer = io.BytesIO()
    payload = _Payload(root / "pwned")
    torch.save({"format": "textgen-checkpoint", "version": 1, "arch": "lstm", "payload": payload}, buffer)
    evil.write_bytes(buffer.getvalue())
    foreign = root / "state_dict.pt"
    torch.save(RNNLanguageModel(RNNConfig(vocab_size=5, hidden_size=4, embedding_size=4)).state_dict(), foreign)
    sources = {"missing": root / "nope.bin", "text": text, "truncated": truncated, "pickle": evil, "foreign": foreign}
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "export", "--checkpoint", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )
        for name, path in sources.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    onnx_files = sorted(p.name for p in root.iterdir() if p.suffix == ".onnx")
    return BadInputRuns(results, (root / "pwned").exists(), onnx_files)


def test_cli_success_prints_path_size_diff_and_provider(tmp_path: Path) -> None:
    checkpoint = tmp_path / "lstm.bin"
    write_rnn_checkpoint(checkpoint, "lstm")
    output = tmp_path / "out" / "model.onnx"
    result = run_cli("--checkpoint", str(checkpoint), "--output", str(output), "--opset", "17")
    assert result.returncode == 0, result.stderr
    assert str(output) in result.stdout and "CPUExecutionProvider" in result.stdout
    assert "max abs logit diff" in result.stdout
    assert output.exists() and read_model(output)[1].arch == "lstm"


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing", "not found"),
        ("text", "notes.txt"),
        ("truncated", "truncated"),
        ("pickle", "refused"),
        ("foreign", "not a textgen checkpoint"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(bad_input_runs: BadInputRuns, case: str, fragment: str) -> None:
    assert_user_error(bad_input_runs.results[case], fragment)


def test_cli_pickle_payload_never_runs_and_nothing_is_written(bad_input_runs: BadInputRuns) -> None:
    assert bad_input_runs.results["pickle"].returncode == 2
    assert not bad_input_runs.marker_created
    assert bad_input_runs.onnx_files == []


def test_cli_verification_failure_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.cli import main

    checkpoint = tmp_path / "gru.bin"
    write_rnn_checkpoint(checkpoint, "gru")
    # A tolerance far below float32 resolution cannot be met by any real export.
    assert main(["--checkpoint", str(checkpoint), "--tolerance", "1e-30"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: verification failed"), captured.err
    assert captured.out == "" and not (tmp_path / "gru.onnx").exists()


def test_cli_quantize_writes_a_runnable_copy_and_reports_its_cost(tmp_path: Path, capsys) -> None:
    from export.cli import main
    from runtime.session import OnnxModel

    checkpoint = tmp_path / "q.bin"
    write_rnn_checkpoint(checkpoint, "gru")
    held = tmp_path / "held.txt"
    held.write_text("the cat sat on the mat\n" * 5, encoding="utf-8")
    assert main(["--checkpoint", str(checkpoint), "--quantize", "int8", "--eval-text", str(held)]) == 0
    out = capsys.readouterr().out
    quantized = tmp_path / "q.int8.onnx"
    assert f"wrote {quantized}" in out and "perplexity on" in out and "int8" in out
    model = OnnxModel.open(quantized, device="cpu")
    assert model.info.arch == "gru"
    logits, _ = model.run(np.array([model.encode("the cat")], dtype=np.int64), model.initial_state(1), 0)
    assert np.isfinite(logits).all()
    assert main(["--checkpoint", str(checkpoint), "--eval-text", str(held)]) == 2
    assert "--eval-text goes with --quantize" in capsys.readouterr().err


def test_cli_int8_weights_are_chosen_recorded_and_only_with_int8(tmp_path: Path, capsys) -> None:
    import json

    from export.cli import main
    from runtime.session import OnnxModel

    checkpoint = tmp_path / "w.bin"
    write_rnn_checkpoint(checkpoint, "lstm")
    assert main(["--checkpoint", str(checkpoint), "--quantize", "int8", "--int8-weights", "u8"]) == 0
    assert "int8, u8 weights" in capsys.readouterr().out
    source = OnnxModel.open(tmp_path / "w.int8.onnx", device="cpu").info.source
    assert source["quantized"]["int8_weights"] == "u8"
    assert json.dumps(source)  # plain JSON, as the model-file contract says
    for flags in (["--int8-weights", "u8"], ["--quantize", "int4", "--int8-weights", "s8"]):
        assert main(["--checkpoint", str(checkpoint), *flags]) == 2
        assert capsys.readouterr().err.strip() == "error: --int8-weights goes with --quantize int8"
