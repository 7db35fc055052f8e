"""Open a textgen model file on onnxruntime and run it: the only place the REPL touches onnxruntime.

``OnnxModel.open(path)`` validates the file (readable ONNX, textgen metadata, graph matching the metadata), picks
the execution provider, and loads the tokenizer from the metadata. ``run`` feeds token ids plus the opaque state
dict and returns the last position's logits and the next state, so one decode loop serves every architecture.
No torch here: this module must import on a machine that only has onnxruntime.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state
from tokenizers import Tokenizer

from runtime.cpu import has_vnni, int8_note
from runtime.errors import whole_line
from runtime.filekind import sniff_file_kind
from runtime.modelfile import ModelFileError, ModelInfo, decode_metadata

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_QUIET = 3  # onnxruntime logger: errors only (warnings such as "some nodes assigned to CPU" stay hidden)
_SILENT = 4  # fatal only: provider-fallback errors while probing CUDA
# What onnxruntime raises when a run fails (bad shapes, out of memory, a provider error); names vary by version.
_ORT_RUN_ERRORS = tuple(
    getattr(_ort_state, name) for name in ("Fail", "InvalidArgument", "RuntimeException", "EPFail", "EngineError",
                                           "NotImplemented") if hasattr(_ort_state, name)
)
SMALL_MODEL_BYTES = 8 * 1024 * 1024  # below this a model runs fastest on one thread (see default_threads)


def _host(value: Any) -> np.ndarray:
    """A state value as a numpy array (OrtValues on a device are copied to the host)."""
    return value.numpy() if isinstance(value, ort.OrtValue) else value


class ModelRunError(Exception):
    """onnxruntime failed while running the model (e.g. out of memory); the message is one line for the user."""


class ModelLoadError(ModelFileError):
    """The model file cannot be opened here (missing, not ONNX, not ours, inconsistent, device unusable); the
    message is one line for the user.

    A subclass of ModelFileError, so metadata errors (re-raised as this type, same message) and load errors can
    be caught either way."""


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _conflict_note() -> str | None:
    if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
        return ("both onnxruntime and onnxruntime-gpu are installed and conflict; "
                "uninstall both and reinstall only one")
    return None


def _preload_cuda_libraries() -> str | None:
    """Load the CUDA/cuDNN libraries onnxruntime-gpu needs (pip-installed nvidia wheels included).

    Returns the first missing library as a short reason, or None. preload_dlls prints its failures to stdout,
    so that output is captured instead of reaching the terminal."""
    if not hasattr(ort, "preload_dlls"):
        return None
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - a failed preload only means we learn less about why CUDA fails
        return whole_line(exc)
    missing = re.search(r"Failed to load (\S+?):", captured.getvalue())
    return f"{Path(missing.group(1)).name} missing" if missing else None


def _cuda_reason(preload_problem: str | None) -> str:
    """Best short explanation of why a CUDA session fell back to the CPU."""
    if preload_problem:
        return preload_problem
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        if os.name != "nt":
            return "no NVIDIA driver/GPU found"
    return "the CUDA provider failed to initialise (check CUDA/cuDNN versions for this onnxruntime-gpu)"


NVIDIA_DEVICE_FILES = ("/proc/driver/nvidia/gpus", "/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def nvidia_gpu_present(device_files: tuple[str, ...] = NVIDIA_DEVICE_FILES) -> bool:
    """Whether this machine shows an NVIDIA driver or GPU at all (Linux device files, WSL's /dev/dxg; on Windows
    the driver's nvcuda.dll). Cheap, and it never loads CUDA: a machine without a GPU is never told about CUDA."""
    if os.name == "nt":
        return ctypes.util.find_library("nvcuda") is not None
    return any(os.path.exists(path) for path in device_files)


def select_providers(device: str) -> tuple[list[str], str | None]:
    """Execution providers to ask for, and a one-line reason CUDA will probably not work (None if none known).

    ``auto`` tries CUDA when this onnxruntime build has the provider AND the machine shows an NVIDIA driver or GPU
    (nvidia_gpu_present), so a machine without one hears nothing about CUDA; ``cuda`` insists on it (OnnxModel.open
    raises if the session does not really get it); ``cpu`` never touches CUDA."""
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device == "cpu":
        return [CPU], None
    if not nvidia_gpu_present():
        if device == "cuda":
            raise ModelLoadError("--device cuda requested but CUDA is not usable here: this machine shows no NVIDIA "
                                 "GPU or driver (no /dev/nvidia0, no /proc/driver/nvidia); use --device cpu")
        return [CPU], None
    if CUDA not in ort.get_available_providers():
        reason = "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
        if device == "cuda":
            raise ModelLoadError(f"--device cuda requested but CUDA is not usable here: {reason}")
        return [CPU], None
    return [CUDA, CPU], _preload_cuda_libraries()


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not speed up these kernels)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return max(1, usable)
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return max(1, min(usable, len(cores) or usable))


def default_threads(model_bytes: int) -> int:
    """intra-op threads when the user gives none: the physical cores, except for small models.

    A decode step of a small model (a char LSTM 1x512 is ~1M multiply-adds) is over before a second thread has
    done useful work, so one thread is faster there (docs/benchmarks.md, levers). Big models are memory-bound and
    gain from more cores."""
    return 1 if model_bytes < SMALL_MODEL_BYTES else physical_cores()


def _session_options(threads: int | None, model_bytes: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads if threads and threads > 0 else default_threads(model_bytes)
    options.inter_op_num_threads = 1
    options.log_severity_level = _QUIET
    return options


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty")
    if sniff_file_kind(path) in ("torch-zip", "pickle"):
        raise ModelLoadError(f"{path} is a PyTorch checkpoint, not an ONNX model — export it first: "
                             f"textgen-export --checkpoint {path}")


def _create_session(path: Path, providers: list[str], threads: int | None) -> ort.InferenceSession:
    ort.set_default_logger_severity(_SILENT if CUDA in providers else _QUIET)
    try:
        options = _session_options(threads, path.stat().st_size)
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several pybind types for unreadable files
        message = whole_line(exc)
        if "opset" in message.lower():  # e.g. a GPT-2 file with the opset-23 Attention op on an old runtime
            message += f" (textgen GPT-2 files need onnxruntime >= 1.23; this is {ort.__version__})"
        raise ModelLoadError(f"{path} is not a readable ONNX model: {message}") from exc
    finally:
        ort.set_default_logger_severity(_QUIET)


_ONNX_TYPE_NAMES = {"float32": "float", "float16": "float16"}  # StateSpec.dtype -> onnxruntime's "tensor(...)"


def _check_graph(session: ort.InferenceSession, info: ModelInfo, where: Path) -> None:
    """The metadata must describe this graph exactly: every name it uses exists, nothing required is unfed."""
    graph_inputs = {node.name: node for node in session.get_inputs()}
    graph_outputs = {node.name: node for node in session.get_outputs()}
    fed = {"input_ids", *info.inputs, *(spec.input for spec in info.state)}
    for name in sorted(fed):
        if name not in graph_inputs:
            raise ModelLoadError(f"{where}: metadata names input {name!r}, which the graph does not have")
    for name in ["logits", *(spec.output for spec in info.state)]:
        if name not in graph_outputs:
            raise ModelLoadError(f"{where}: metadata names output {name!r}, which the graph does not have")
    unfed = sorted(set(graph_inputs) - fed)
    if unfed:
        raise ModelLoadError(f"{where}: the graph needs input {unfed[0]!r}, which the metadata does not describe")
    for spec in info.state:
        _check_state_shape(spec.shape, graph_inputs[spec.input].shape, spec.input, where)
        for node in (graph_inputs[spec.input], graph_outputs[spec.output]):
            if node.type != f"tensor({_ONNX_TYPE_NAMES[spec.dtype]})":
                raise ModelLoadError(f"{where}: state {node.name!r} is {node.type} in the graph but "
                                     f"{spec.dtype} in the metadata")
    vocab_dim = graph_outputs["logits"].shape[-1] if graph_outputs["logits"].shape else None
    if isinstance(vocab_dim, int) and vocab_dim != info.vocab_size:
        raise ModelLoadError(f"{where}: logits have {vocab_dim} entries but metadata says vocab_size {info.vocab_size}")


def _check_state_shape(declared: tuple, graph_shape: list | None, name: str, where: Path) -> None:
    """Fixed sizes in the metadata must match the graph's (a wrong hidden size would only fail mid-generation)."""
    if graph_shape is None:
        return
    if len(graph_shape) != len(declared):
        raise ModelLoadError(f"{where}: state {name!r} has {len(graph_shape)} dimensions in the graph but "
                             f"{len(declared)} in the metadata")
    for axis, (want, have) in enumerate(zip(declared, graph_shape, strict=True)):
        if isinstance(want, int) and isinstance(have, int) and want != have:
            raise ModelLoadError(f"{where}: state {name!r} axis {axis} is {have} in the graph but {want} in the "
                                 f"metadata")


def _load_tokenizer(info: ModelInfo, where: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_str(info.tokenizer_json)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a plain Exception for bad JSON
        reason = whole_line(exc)
        raise ModelLoadError(f"{where}: the tokenizer in the metadata cannot be loaded: {reason}") from exc
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > info.vocab_size:
        raise ModelLoadError(f"{where}: tokenizer has {size} tokens but the model only {info.vocab_size} outputs")
    for name in ("eos", "unk", "bos"):
        token = getattr(info.special, name)
        if token is not None and token >= size:
            raise ModelLoadError(f"{where}: special token {name} ({token}) is outside the tokenizer ({size} tokens)")
    return tokenizer


@dataclass(frozen=True)
class FedState:
    """Model state after the tokens ``rows[:, start:end]`` of a decode loop's rows (the state ``OnnxModel.run``
    returned for them, opaque); ``logits`` [B, V] follow the last of them. Shared by the decode loop
    (runtime/generate.py) and the beam search (runtime/beam.py)."""

    state: dict[str, Any]
    start: int
    end: int
    logits: np.ndarray | None


class OnnxModel:
    """A loaded model file. ``state`` dicts are opaque to callers: pass back what ``run`` returned."""

    def __init__(self, path: Path, session: ort.InferenceSession, info: ModelInfo, tokenizer: Tokenizer,
                 device_note: str | None, resident_state: bool | None = None) -> None:
        self.path = path
        self.session = session
        self.info = info
        self.tokenizer = tokenizer
        self.provider = session.get_providers()[0]
        self.device_note = device_note
        # about the file on this machine, worth saying even in scripts (e.g. int8 weights this CPU saturates)
        self.file_note = int8_note(info.source, has_vnni())
        # Where the state lives between steps: on a GPU it stays there (IO binding, no host round trip per token);
        # on the CPU plain numpy feeds are the default (see resident_state in open()).
        self.state_device = "cuda" if self.provider == CUDA else "cpu"
        self.resident_state = self.provider == CUDA if resident_state is None else resident_state
        self._output_names = ["logits", *(spec.output for spec in info.state)]
        self._state_inputs = [spec.input for spec in info.state]
        self._wants_mask = "attention_mask" in info.inputs
        self._wants_positions = "position_ids" in info.inputs
        self._tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._banned = list(range(self._tokenizer_size, info.vocab_size))

    @classmethod
    def open(cls, path: str | os.PathLike[str], device: str = "auto", threads: int | None = None,
             resident_state: bool | None = None) -> OnnxModel:
        """Load and validate ``path``. Raises ModelLoadError (a ModelFileError) with a one-line message.

        ``resident_state``: keep the recurrent state / KV cache as onnxruntime values on the session's device
        between steps, bound with IO binding, instead of numpy arrays; only the logits come back to the host.
        None (the default) turns it on for CUDA sessions."""
        file = Path(path)
        _check_file(file)
        providers, cuda_problem = select_providers(device)
        session = _create_session(file, providers, threads)
        try:
            info = decode_metadata(dict(session.get_modelmeta().custom_metadata_map), where=str(file))
        except ModelLoadError:
            raise
        except ModelFileError as exc:
            raise ModelLoadError(str(exc)) from exc
        _check_graph(session, info, file)
        tokenizer = _load_tokenizer(info, file)
        notes = [_conflict_note()]
        if CUDA in providers and CUDA not in session.get_providers():
            reason = _cuda_reason(cuda_problem)
            if device == "cuda":
                raise ModelLoadError(f"--device cuda requested but CUDA is not usable here: {reason}")
            notes.append(f"CUDA not usable ({reason}); running on CPU")
        note = "; ".join(n for n in notes if n) or None
        return cls(file, session, info, tokenizer, note, resident_state)

    # ------------------------------------------------------------------ state

    def initial_state(self, batch: int) -> dict[str, np.ndarray]:
        """The state before any token: zeros of each spec's shape with past = 0."""
        return {spec.input: np.zeros(spec.initial_shape(batch), dtype=spec.dtype) for spec in self.info.state}

    def reorder_state(self, state: dict[str, Any], indices: np.ndarray) -> dict[str, Any]:
        """Row ``i`` of the result is row ``indices[i]`` of ``state`` (beam reordering, or expanding a batch of
        one to n rows with ``indices = zeros(n)``)."""
        index = np.asarray(indices, dtype=np.int64)
        # Device-resident values come to the host for the gather (once per turn or beam step, not per token);
        # the next run sends the result back.
        return {spec.input: np.take(_host(state[spec.input]), index, axis=spec.batch_axis)
                for spec in self.info.state}

    # ------------------------------------------------------------------ running

    def _feeds(self, input_ids: np.ndarray, state: dict[str, Any], past_len: int,
               attention_mask: np.ndarray | None) -> dict[str, Any]:
        feeds = dict(state)
        feeds["input_ids"] = input_ids
        if self._wants_mask or self._wants_positions:
            batch, seq = input_ids.shape
            if attention_mask is None:
                if self._wants_mask:
                    feeds["attention_mask"] = np.ones((batch, past_len + seq), dtype=np.int64)
                if self._wants_positions:
                    feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64),
                                                            (batch, seq))
            else:
                mask = np.asarray(attention_mask, dtype=np.int64)
                if mask.shape != (batch, past_len + seq):
                    raise ValueError(f"attention_mask shape {mask.shape} != {(batch, past_len + seq)}")
                if self._wants_mask:
                    feeds["attention_mask"] = mask
                if self._wants_positions:
                    # Left padding: a row's positions count only its real tokens (as Hugging Face does).
                    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
                    feeds["position_ids"] = np.ascontiguousarray(positions[:, past_len:])
        return feeds

    def run_all(self, input_ids: np.ndarray, state: dict[str, Any], past_len: int,
                attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Feed ``input_ids`` [B, T] (int64) after ``past_len`` tokens already in ``state``; return the logits of
        every position [B, T, V] (float32) and the state after the last position."""
        feeds = self._feeds(input_ids, state, past_len, attention_mask)
        try:
            if self.resident_state:
                return self._run_bound(feeds)
            outputs = self.session.run(self._output_names, feeds)
        except _ORT_RUN_ERRORS as exc:
            raise ModelRunError(f"running {self.path.name} failed: {whole_line(exc)}") from exc
        return outputs[0], dict(zip(self._state_inputs, outputs[1:], strict=True))

    def _run_bound(self, feeds: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """One run with IO binding: state values that are already OrtValues are bound where they are, the new state
        is allocated on ``state_device`` by onnxruntime, and only the logits are copied to the host."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits", "cpu")
        for name in self._output_names[1:]:
            binding.bind_output(name, self.state_device)
        self.session.run_with_iobinding(binding)
        logits, *state = binding.get_outputs()
        return logits.numpy(), dict(zip(self._state_inputs, state, strict=True))

    def run(self, input_ids: np.ndarray, state: dict[str, Any], past_len: int,
            attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Like run_all, but only the last position's logits [B, V]: what a decode step needs."""
        logits, new_state = self.run_all(input_ids, state, past_len, attention_mask)
        last = logits[:, -1, :]
        # After a long prompt, copy the row so the [B, T, V] array is freed instead of kept alive by a view.
        return (last.copy() if logits.shape[1] > 1 else last), new_state

    # ------------------------------------------------------------------ text

    @property
    def banned_ids(self) -> list[int]:
        """Output ids with no token behind them (vocab padding): never sampled."""
        return self._banned

    @property
    def tokenizer_size(self) -> int:
        return self._tokenizer_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special-token decoration; unseen characters become unk (or are
        dropped when the tokenizer has no unk)."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except Exception:  # noqa: BLE001 - e.g. a vocabulary without an unk token; encode char by char instead
            return self._encode_per_character(text)

    def unknown_pieces(self, text: str) -> list[str]:
        """The distinct characters (words, for a word-level vocabulary) of ``text`` that the tokenizer reads as
        its unknown token or drops, in order of appearance; empty for byte-level BPE, which reads any text."""
        unk = self.info.special.unk
        try:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
        except Exception:  # noqa: BLE001 - no unk token: the characters that cannot be encoded are dropped
            pieces = [char for char in dict.fromkeys(text) if not self._encodes(char)]
        else:
            pieces = [text[start:end] for token, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
                      if token == unk and end > start]
        return list(dict.fromkeys(pieces))

    def _encodes(self, char: str) -> bool:
        try:
            return bool(self.tokenizer.encode(char, add_special_tokens=False).ids)
        except Exception:  # noqa: BLE001
            return False

    def _encode_per_character(self, text: str) -> list[int]:
        ids: list[int] = []
        for char in text:
            try:
                ids += self.tokenizer.encode(char, add_special_tokens=False).ids
            except Exception:  # noqa: BLE001
                if self.info.special.unk is not None:
                    ids.append(self.info.special.unk)
        return ids

    def decode(self, ids: Any) -> str:
        """Text of ``ids``; special tokens (eos) and padding ids are left out."""
        tokens = [int(i) for i in ids if 0 <= int(i) < self._tokenizer_size]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
