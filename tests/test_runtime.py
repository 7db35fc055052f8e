"""runtime.session: opening model files (and refusing bad ones in one line), providers, and the stateful contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import runtime.session as session_module
from runtime.modelfile import FORMAT_VERSION, KEY_STATE, KEY_VERSION, ModelFileError
from runtime.session import ModelLoadError, ModelRunError, OnnxModel, select_providers


def _metadata(path: Path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}


def _open(path: Path) -> OnnxModel:
    return OnnxModel.open(path, device="cpu", threads=1)


def _load_error(path: Path, **options) -> str:
    with pytest.raises(ModelLoadError) as caught:
        OnnxModel.open(path, **options)
    message = str(caught.value)
    assert "\n" not in message and message
    assert isinstance(caught.value, ModelFileError)  # callers may catch either type
    return message


# ------------------------------------------------------------------------------------------- stateful contract


ALL_KINDS = ["lstm", "gru", "gpt", "exported-lstm", "exported-gru", "exported-gpt"]


@pytest.mark.parametrize("model_path", ALL_KINDS, indirect=True)
def test_step_by_step_equals_full_sequence(model_path):
    model = _open(model_path)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, model.tokenizer_size, size=(2, 9)).astype(np.int64)
    full, _ = model.run_all(tokens, model.initial_state(2), past_len=0)
    assert full.shape == (2, 9, model.info.vocab_size) and full.dtype == np.float32

    # prompt of 4 in one run, then one token per step, passing the state back
    last, state = model.run(tokens[:, :4], model.initial_state(2), past_len=0)
    np.testing.assert_allclose(last, full[:, 3], atol=1e-5)
    for position in range(4, 9):
        last, state = model.run(tokens[:, position:position + 1], state, past_len=position)
        np.testing.assert_allclose(last, full[:, position], atol=1e-5)
    assert set(state) == {spec.input for spec in model.info.state}


@pytest.mark.parametrize("model_path", ["gpt", "exported-gpt"], indirect=True)
def test_gpt_left_padding_matches_unpadded_rows(model_path):
    """attention_mask with left padding: position_ids count only real tokens, so a padded row equals its
    unpadded run (the batched-prompts case)."""
    model = _open(model_path)
    short = np.array([[4, 5, 6]], dtype=np.int64)
    long = np.array([[7, 8, 9, 10, 11]], dtype=np.int64)
    batch = np.array([[0, 0, 4, 5, 6], [7, 8, 9, 10, 11]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    padded, state = model.run(batch, model.initial_state(2), 0, attention_mask=mask)
    alone_short, _ = model.run(short, model.initial_state(1), 0)
    alone_long, _ = model.run(long, model.initial_state(1), 0)
    np.testing.assert_allclose(padded[0], alone_short[0], atol=1e-5)
    np.testing.assert_allclose(padded[1], alone_long[0], atol=1e-5)
    # one more step with the grown mask continues both rows correctly
    step_mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    nxt, _ = model.run(np.array([[2], [3]], dtype=np.int64), state, 5, attention_mask=step_mask)
    ref_short, _ = model.run(np.array([[4, 5, 6, 2]], dtype=np.int64), model.initial_state(1), 0)
    np.testing.assert_allclose(nxt[0], ref_short[0], atol=1e-5)


@pytest.mark.parametrize("model_path", ["lstm", "gpt", "exported-gpt"], indirect=True)
def test_reorder_state_takes_rows_along_the_batch_axis(model_path):
    model = _open(model_path)
    tokens = np.array([[2, 3, 4], [5, 6, 7], [8, 9, 10]], dtype=np.int64)
    _, state = model.run(tokens, model.initial_state(3), 0)
    reordered = model.reorder_state(state, np.array([2, 2, 0]))
    nxt = np.array([[3], [3], [3]], dtype=np.int64)
    got, _ = model.run(nxt, reordered, 3)
    expected, _ = model.run(nxt, state, 3)
    np.testing.assert_allclose(got, expected[[2, 2, 0]], atol=1e-6)
    expanded = model.reorder_state(model.reorder_state(state, np.array([1])), np.zeros(4, dtype=np.int64))
    for spec in model.info.state:
        assert expanded[spec.input].shape[spec.batch_axis] == 4


@pytest.mark.parametrize("model_path", ALL_KINDS, indirect=True)
def test_resident_state_runs_through_io_binding_and_matches_numpy_feeds(model_path):
    """The device-resident path (IO binding; what a CUDA session uses) run on the CPU: the state comes back as
    onnxruntime values on the session's device, is fed back as it is, and every logit equals the numpy path."""
    plain = _open(model_path)
    resident = OnnxModel.open(model_path, device="cpu", threads=1, resident_state=True)
    assert resident.resident_state and not plain.resident_state and resident.state_device == "cpu"
    tokens = np.random.default_rng(1).integers(2, plain.tokenizer_size, size=(2, 7)).astype(np.int64)
    expected, plain_state = plain.run(tokens[:, :3], plain.initial_state(2), 0)
    got, state = resident.run(tokens[:, :3], resident.initial_state(2), 0)
    np.testing.assert_array_equal(got, expected)
    for position in range(3, 7):
        assert all(isinstance(value, ort.OrtValue) and value.device_name() == "cpu" for value in state.values())
        expected, plain_state = plain.run(tokens[:, position:position + 1], plain_state, position)
        got, state = resident.run(tokens[:, position:position + 1], state, position)
        assert isinstance(got, np.ndarray) and got.shape == (2, plain.info.vocab_size)
        np.testing.assert_array_equal(got, expected)
    # rows of a resident state can be reordered (a beam step, or one row expanded to n samples)
    reordered = resident.reorder_state(state, np.array([1, 1, 0]))
    nxt = np.full((3, 1), 3, dtype=np.int64)
    got, _ = resident.run(nxt, reordered, 7)
    expected, _ = plain.run(nxt, plain.reorder_state(plain_state, np.array([1, 1, 0])), 7)
    np.testing.assert_array_equal(got, expected)


def _cuda_model(path: Path) -> OnnxModel:
    try:
        return OnnxModel.open(path, device="cuda")
    except ModelLoadError as exc:
        pytest.skip(f"no usable CUDA: {exc}")


@pytest.mark.cuda
@pytest.mark.parametrize("model_path", ["lstm", "exported-gpt"], indirect=True)
def test_on_cuda_the_state_stays_on_the_gpu_between_steps(model_path):
    """A CUDA session binds the state on the GPU (no host round trip per token) and computes what the CPU does."""
    gpu, cpu = _cuda_model(model_path), _open(model_path)
    assert gpu.provider == "CUDAExecutionProvider" and gpu.resident_state and gpu.state_device == "cuda"
    tokens = np.random.default_rng(2).integers(2, cpu.tokenizer_size, size=(2, 6)).astype(np.int64)
    got, state = gpu.run(tokens[:, :2], gpu.initial_state(2), 0)
    expected, cpu_state = cpu.run(tokens[:, :2], cpu.initial_state(2), 0)
    for position in range(2, 6):
        assert all(value.device_name() == "cuda" for value in state.values())
        got, state = gpu.run(tokens[:, position:position + 1], state, position)
        expected, cpu_state = cpu.run(tokens[:, position:position + 1], cpu_state, position)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_initial_state_follows_the_specs(model_files):
    lstm, gpt = _open(model_files.lstm), _open(model_files.gpt)
    assert {k: v.shape for k, v in lstm.initial_state(3).items()} == {"state.h": (2, 3, 32), "state.c": (2, 3, 32)}
    shapes = {v.shape for v in gpt.initial_state(2).values()}
    assert shapes == {(2, 2, 0, 8)}
    assert all(not v.any() for v in lstm.initial_state(1).values())


# ------------------------------------------------------------------------------------------- text and vocabulary


def test_banned_ids_are_the_vocab_padding(model_files):
    lstm = _open(model_files.lstm)
    assert lstm.info.vocab_size == lstm.tokenizer_size + 2
    assert lstm.banned_ids == [lstm.tokenizer_size, lstm.tokenizer_size + 1]
    assert _open(model_files.gru).banned_ids == []


def test_encode_decode_and_unknown_characters(model_files):
    model = _open(model_files.lstm)
    ids = model.encode("abc, d\n")
    assert model.decode(ids) == "abc, d\n"
    unk = model.info.special.unk
    assert model.encode("aZ€") == [model.encode("a")[0], unk, unk]
    assert model.decode([model.info.special.eos, *model.encode("ab"), *model.banned_ids]) == "ab"


# ------------------------------------------------------------------------------------------- bad files


def test_missing_file_directory_and_empty_file(tmp_path):
    assert "not found" in _load_error(tmp_path / "nope.onnx")
    assert "not a file" in _load_error(tmp_path)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "empty" in _load_error(empty)


def test_corrupt_bytes_are_refused(tmp_path, model_files):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not an onnx protobuf at all" * 50)
    assert "not a readable ONNX model" in _load_error(garbage)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_files.lstm.read_bytes()[:3000])
    assert "not a readable ONNX model" in _load_error(truncated)


def test_onnx_without_textgen_metadata(edit_metadata, model_files):
    plain = edit_metadata(model_files.lstm, "plain.onnx", lambda meta: meta.clear())
    assert "not a textgen model file" in _load_error(plain)


def test_newer_format_version_names_both_versions(edit_metadata, model_files):
    newer = edit_metadata(model_files.lstm, "newer.onnx", lambda meta: meta.update({KEY_VERSION: "7"}))
    message = _load_error(newer)
    assert "7" in message and str(FORMAT_VERSION) in message and "newer" in message


def test_version_1_files_stay_version_1_and_float16_state_needs_version_2(edit_metadata, model_files):
    """Files without float16 state are written as version 1 (older readers keep opening them); a file that
    declares float16 state must say version 2, and the declared dtype must be the graph's."""
    meta = _metadata(model_files.lstm)
    assert meta[KEY_VERSION] == "1" and "dtype" not in meta[KEY_STATE]

    def declare_float16(version: str):
        def change(meta):
            specs = json.loads(meta[KEY_STATE])
            specs[0]["dtype"] = "float16"
            meta[KEY_STATE] = json.dumps(specs)
            meta[KEY_VERSION] = version
        return change

    old = edit_metadata(model_files.lstm, "fp16-v1.onnx", declare_float16("1"))
    assert "float16 state needs model-file format version 2" in _load_error(old)
    mismatch = edit_metadata(model_files.lstm, "fp16-v2.onnx", declare_float16("2"))
    assert "'state.h' is tensor(float) in the graph but float16 in the metadata" in _load_error(mismatch)
    unknown = edit_metadata(model_files.lstm, "int3.onnx", lambda meta: meta.update(
        {KEY_STATE: meta[KEY_STATE].replace('"batch_axis"', '"dtype": "int3", "batch_axis"', 1)}))
    assert "unknown dtype 'int3'" in _load_error(unknown)


def test_metadata_naming_a_missing_input(edit_metadata, model_files):
    def rename(meta):
        specs = json.loads(meta[KEY_STATE])
        specs[0]["input"] = "state.hidden"
        meta[KEY_STATE] = json.dumps(specs)

    bad = edit_metadata(model_files.lstm, "renamed.onnx", rename)
    assert "'state.hidden'" in _load_error(bad)


def test_metadata_naming_a_missing_output(edit_metadata, model_files):
    def rename(meta):
        specs = json.loads(meta[KEY_STATE])
        specs[-1]["output"] = "present.9.value"
        meta[KEY_STATE] = json.dumps(specs)

    bad = edit_metadata(model_files.gpt, "renamed.onnx", rename)
    assert "'present.9.value'" in _load_error(bad)


def test_graph_input_the_metadata_does_not_describe(edit_metadata, model_files):
    bad = edit_metadata(model_files.gpt, "noinputs.onnx",
                        lambda meta: meta.update({"textgen.inputs": "[]"}))
    assert "attention_mask" in _load_error(bad)


def test_state_size_disagreeing_with_the_graph(edit_metadata, model_files):
    def grow(meta):
        specs = json.loads(meta[KEY_STATE])
        specs[0]["shape"] = [2, "batch", 64]
        meta[KEY_STATE] = json.dumps(specs)

    bad = edit_metadata(model_files.lstm, "hidden.onnx", grow)
    assert "'state.h' axis 2 is 32 in the graph but 64" in _load_error(bad)


def test_a_failing_run_is_a_one_line_model_run_error(model_files):
    model = _open(model_files.lstm)
    wrong_state = {name: np.zeros((2, 1, 7), dtype=np.float32) for name in model.initial_state(1)}
    with pytest.raises(ModelRunError) as caught:
        model.run(np.array([[2]], dtype=np.int64), wrong_state, 0)
    assert "\n" not in str(caught.value) and "lstm.onnx" in str(caught.value)


def test_broken_tokenizer_metadata(edit_metadata, model_files):
    bad = edit_metadata(model_files.lstm, "tok.onnx",
                        lambda meta: meta.update({"textgen.tokenizer": "{not json"}))
    assert "tokenizer" in _load_error(bad)


# ------------------------------------------------------------------------------------------- devices


def test_select_providers():
    assert select_providers("cpu") == (["CPUExecutionProvider"], None)
    providers, _ = select_providers("auto")
    assert providers[-1] == "CPUExecutionProvider"
    with pytest.raises(ModelLoadError, match="unknown device"):
        select_providers("tpu")


def test_cpu_device_gives_a_cpu_session_without_notes(model_files, monkeypatch):
    monkeypatch.setattr(session_module, "_installed", lambda name: name == "onnxruntime-gpu")
    model = OnnxModel.open(model_files.lstm, device="cpu")
    assert model.provider == "CPUExecutionProvider"
    assert model.session.get_providers() == ["CPUExecutionProvider"]
    assert model.device_note is None


def test_auto_reports_what_the_session_really_got(model_files):
    model = OnnxModel.open(model_files.lstm, device="auto")
    assert model.provider == model.session.get_providers()[0]
    if model.provider == "CPUExecutionProvider" and not session_module.nvidia_gpu_present():
        assert model.device_note is None  # issue 17: no CUDA notice on a machine without a GPU
    elif model.provider == "CPUExecutionProvider" and "CUDAExecutionProvider" in (
        session_module.ort.get_available_providers()
    ):
        assert model.device_note and "running on CPU" in model.device_note and "\n" not in model.device_note


def test_cuda_without_a_usable_gpu_is_a_one_line_error(model_files):
    try:
        model = OnnxModel.open(model_files.lstm, device="cuda")
    except ModelLoadError as exc:
        assert str(exc).startswith("--device cuda requested but CUDA is not usable here: ")
        assert "\n" not in str(exc)
    else:  # a machine with a working GPU
        assert model.provider == "CUDAExecutionProvider"


def test_both_distributions_installed_is_noted(model_files, monkeypatch):
    monkeypatch.setattr(session_module, "_installed", lambda name: True)
    model = OnnxModel.open(model_files.lstm, device="cpu")
    assert "both onnxruntime and onnxruntime-gpu" in model.device_note


def test_opening_with_auto_prints_nothing(model_files):
    """No wall of provider errors: onnxruntime-gpu's CUDA probe stays silent on a machine without a GPU."""
    code = f"from runtime.session import OnnxModel; OnnxModel.open({str(model_files.lstm)!r}, device='auto')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_repl_runtime_does_not_import_torch():
    code = ("import sys, runtime.session, runtime.generate, runtime.settings; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_physical_cores_is_positive():
    assert 1 <= session_module.physical_cores()


def test_auto_on_a_machine_without_a_gpu_says_nothing_about_cuda(model_files, monkeypatch):
    """Issue 17: the "CUDA not usable (libcublasLt.so.13 missing)" notice only where a GPU is present."""
    monkeypatch.setattr(session_module, "nvidia_gpu_present", lambda *args: False)
    model = OnnxModel.open(model_files.lstm, device="auto")
    assert model.provider == "CPUExecutionProvider" and model.device_note is None
    with pytest.raises(ModelLoadError, match="shows no NVIDIA GPU or driver"):
        OnnxModel.open(model_files.lstm, device="cuda")


def test_gpu_presence_is_read_from_device_files(tmp_path):
    assert not session_module.nvidia_gpu_present((str(tmp_path / "nvidia0"),))
    (tmp_path / "nvidia0").write_text("")
    assert session_module.nvidia_gpu_present((str(tmp_path / "nvidia0"),))


def test_a_gpu_that_is_present_but_unusable_is_noted(model_files, monkeypatch):
    """With a (pretended) GPU present, auto tries CUDA; where the provider cannot start, one note says why."""
    monkeypatch.setattr(session_module, "nvidia_gpu_present", lambda *args: True)
    model = OnnxModel.open(model_files.lstm, device="auto")
    available = session_module.ort.get_available_providers()
    if model.provider == "CPUExecutionProvider" and "CUDAExecutionProvider" in available:
        assert model.device_note and "CUDA not usable" in model.device_note and "\n" not in model.device_note
