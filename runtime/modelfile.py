"""The textgen model-file contract (see docs/model-file.md): metadata keys, writer-side encoding and a
validating reader. Pure Python + json; no torch, no onnxruntime, so both the exporter and the runtime use it.

Metadata is untrusted input: every field is size-limited, type-checked and range-checked here, and the reader
raises ModelFileError with a one-line message instead of letting a KeyError or JSON traceback escape.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_NAME = "textgen-onnx"
FORMAT_VERSION = 2  # the newest version this reader understands; a file is written with the oldest that fits it
# Version 2 added float16 state (``"dtype": "float16"`` in textgen.state). Files without it are still written as
# version 1, so that older readers keep opening every file they can run.
FLOAT16_STATE_VERSION = 2
STATE_DTYPES = ("float32", "float16")

KEY_FORMAT = "textgen.format"
KEY_VERSION = "textgen.format_version"
KEY_ARCH = "textgen.arch"
KEY_TOKENIZER = "textgen.tokenizer"
KEY_SPECIAL = "textgen.special_tokens"
KEY_VOCAB = "textgen.vocab_size"
KEY_CONTEXT = "textgen.context_length"
KEY_STATE = "textgen.state"
KEY_INPUTS = "textgen.inputs"
KEY_GENERATION = "textgen.generation"
KEY_CONFIG = "textgen.model_config"
KEY_SOURCE = "textgen.source"
KEY_TOKENIZER_OPTIONS = "textgen.tokenizer_options"  # optional (absent: {}); how the vocabulary was made

ARCHES = ("lstm", "gru", "gpt2")
OPTIONAL_INPUTS = ("attention_mask", "position_ids")
MAX_TOKENIZER_CHARS = 64 * 1024 * 1024  # a GPT-2 tokenizer.json is ~1.3 MB; refuse absurd sizes
MAX_JSON_CHARS = 1024 * 1024


class ModelFileError(Exception):
    """The file is not a usable textgen model; the message is one line for the user."""


@dataclass(frozen=True)
class StateSpec:
    """One recurrent-state tensor: fed as ``input``, produced as ``output``, zeros of ``shape`` at start.

    ``shape`` holds ints and the symbols "batch" and "past"; ``seq_axis`` is the axis that grows per token
    (None when the state has a fixed size, as an RNN's does); ``dtype`` is "float32", or "float16" in
    half-precision GPT-2 files (format version 2)."""

    input: str
    output: str
    shape: tuple[int | str, ...]
    batch_axis: int
    seq_axis: int | None = None
    dtype: str = "float32"

    def initial_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else 0 if d == "past" else int(d) for d in self.shape)


@dataclass(frozen=True)
class SpecialTokens:
    eos: int
    unk: int | None = None
    bos: int | None = None


@dataclass
class ModelInfo:
    """Everything the runtime needs to know about a model file, validated."""

    arch: str
    tokenizer_json: str
    special: SpecialTokens
    vocab_size: int
    context_length: int  # 0 = unbounded
    state: tuple[StateSpec, ...]
    inputs: tuple[str, ...] = ()
    generation: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    tokenizer_options: dict[str, Any] = field(default_factory=dict)


def encode_metadata(info: ModelInfo) -> dict[str, str]:
    """The exporter's side: ModelInfo -> the string map stored in ONNX ``metadata_props``."""
    return {
        KEY_FORMAT: FORMAT_NAME,
        KEY_VERSION: str(required_version(info)),
        KEY_ARCH: info.arch,
        KEY_TOKENIZER: info.tokenizer_json,
        KEY_SPECIAL: json.dumps(asdict(info.special)),
        KEY_VOCAB: str(info.vocab_size),
        KEY_CONTEXT: str(info.context_length),
        KEY_STATE: json.dumps([_encode_state(spec) for spec in info.state]),
        KEY_INPUTS: json.dumps(list(info.inputs)),
        KEY_GENERATION: json.dumps(info.generation),
        KEY_CONFIG: json.dumps(info.model_config),
        KEY_SOURCE: json.dumps(info.source),
        KEY_TOKENIZER_OPTIONS: json.dumps(info.tokenizer_options),
    }


def required_version(info: ModelInfo) -> int:
    """The oldest format version that can describe ``info``."""
    return FLOAT16_STATE_VERSION if any(spec.dtype != "float32" for spec in info.state) else 1


def _encode_state(spec: StateSpec) -> dict[str, Any]:
    entry = {**asdict(spec), "shape": list(spec.shape)}
    if spec.dtype == "float32":  # the version-1 default, left implicit so version-1 files stay as they were
        del entry["dtype"]
    return entry


def decode_metadata(meta: dict[str, str], where: str = "model file") -> ModelInfo:
    """The runtime's side: validate a metadata map and build ModelInfo, or raise ModelFileError."""
    if meta.get(KEY_FORMAT) != FORMAT_NAME:
        raise ModelFileError(f"{where} is not a textgen model file (no '{KEY_FORMAT}' metadata)")
    version = _int(meta, KEY_VERSION, where, minimum=1)
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{where} uses model-file format version {version}, newer than this textgen supports "
            f"({FORMAT_VERSION}); upgrade textgen-onnx or re-export the model"
        )
    arch = meta.get(KEY_ARCH)
    if arch not in ARCHES:
        raise ModelFileError(f"{where}: unknown architecture {arch!r}")
    tokenizer_json = meta.get(KEY_TOKENIZER)
    if not isinstance(tokenizer_json, str) or not tokenizer_json or len(tokenizer_json) > MAX_TOKENIZER_CHARS:
        raise ModelFileError(f"{where}: tokenizer metadata is missing or too large")
    info = ModelInfo(
        arch=arch,
        tokenizer_json=tokenizer_json,
        special=_special(meta, where),
        vocab_size=_int(meta, KEY_VOCAB, where, minimum=1),
        context_length=_int(meta, KEY_CONTEXT, where, minimum=0),
        state=_state(meta, where),
        inputs=_inputs(meta, where),
        generation=_json_object(meta, KEY_GENERATION, where),
        model_config=_json_object(meta, KEY_CONFIG, where),
        source=_json_object(meta, KEY_SOURCE, where),
        format_version=version,
        tokenizer_options=_json_object(meta, KEY_TOKENIZER_OPTIONS, where),
    )
    if version < required_version(info):
        raise ModelFileError(f"{where}: float16 state needs model-file format version {FLOAT16_STATE_VERSION}, "
                             f"but the file says {version}")
    return info


def _int(meta: dict[str, str], key: str, where: str, minimum: int) -> int:
    raw = meta.get(key)
    try:
        value = int(str(raw).strip())
    except (TypeError, ValueError):
        raise ModelFileError(f"{where}: metadata {key} must be an integer, got {str(raw)[:40]!r}") from None
    if value < minimum or value > 2**31:
        raise ModelFileError(f"{where}: metadata {key} out of range ({value})")
    return value


def _json(meta: dict[str, str], key: str, where: str, default: Any) -> Any:
    raw = meta.get(key)
    if raw is None:
        return default
    if len(raw) > MAX_JSON_CHARS:
        raise ModelFileError(f"{where}: metadata {key} is too large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise ModelFileError(f"{where}: metadata {key} is not valid JSON") from None


def _json_object(meta: dict[str, str], key: str, where: str) -> dict[str, Any]:
    value = _json(meta, key, where, {})
    if not isinstance(value, dict):
        raise ModelFileError(f"{where}: metadata {key} must be a JSON object")
    return value


def _optional_id(value: Any, name: str, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelFileError(f"{where}: special token {name} must be a non-negative integer")
    return value


def _special(meta: dict[str, str], where: str) -> SpecialTokens:
    raw = _json_object(meta, KEY_SPECIAL, where)
    eos = _optional_id(raw.get("eos"), "eos", where)
    if eos is None:
        raise ModelFileError(f"{where}: special token 'eos' is missing")
    return SpecialTokens(
        eos=eos,
        unk=_optional_id(raw.get("unk"), "unk", where),
        bos=_optional_id(raw.get("bos"), "bos", where),
    )


def _state(meta: dict[str, str], where: str) -> tuple[StateSpec, ...]:
    raw = _json(meta, KEY_STATE, where, None)
    if not isinstance(raw, list) or not raw or len(raw) > 4096:
        raise ModelFileError(f"{where}: metadata {KEY_STATE} must be a non-empty JSON list")
    specs = []
    for item in raw:
        try:
            shape = tuple(d if d in ("batch", "past") else int(d) for d in item["shape"])
            seq_axis = item.get("seq_axis")
            spec = StateSpec(
                input=str(item["input"]),
                output=str(item["output"]),
                shape=shape,
                batch_axis=int(item["batch_axis"]),
                seq_axis=None if seq_axis is None else int(seq_axis),
                dtype=item.get("dtype", "float32"),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ModelFileError(f"{where}: malformed entry in {KEY_STATE}") from None
        if spec.dtype not in STATE_DTYPES:
            raise ModelFileError(f"{where}: state {spec.input!r} has unknown dtype {spec.dtype!r}")
        if not 0 <= spec.batch_axis < len(shape) or shape[spec.batch_axis] != "batch":
            raise ModelFileError(f"{where}: state {spec.input!r} has a bad batch_axis")
        if spec.seq_axis is not None and not (0 <= spec.seq_axis < len(shape) and shape[spec.seq_axis] == "past"):
            raise ModelFileError(f"{where}: state {spec.input!r} has a bad seq_axis")
        specs.append(spec)
    return tuple(specs)


def _inputs(meta: dict[str, str], where: str) -> tuple[str, ...]:
    raw = _json(meta, KEY_INPUTS, where, [])
    if not isinstance(raw, list) or any(name not in OPTIONAL_INPUTS for name in raw):
        raise ModelFileError(f"{where}: metadata {KEY_INPUTS} lists unknown inputs")
    return tuple(raw)
