"""Import a GPT-2 from a local Hugging Face directory: config.json, weights, tokenizer. No network, no transformers.

A directory holds ``config.json`` (``model_type`` "gpt2"), weights as ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) or ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``, so no
code in it runs), and ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``. Every problem is an HFImportError
whose message is one line naming what is wrong.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from models.gpt2 import GPT2, GPT2Config
from models.registry import build_model
from runtime.errors import first_line

EOS_TEXT = "<|endoftext|>"
MAX_JSON_BYTES = 4 * 1024 * 1024  # config.json and the shard index are a few KB
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # HF's causal-mask buffers, not weights
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation we implement
# HF GPT-2 options that change the computation in ways this model does not implement: (key, the value we need).
UNSUPPORTED_OPTIONS = (
    ("scale_attn_by_inverse_layer_idx", False),
    ("reorder_and_upcast_attn", False),
    ("scale_attn_weights", True),
    ("add_cross_attention", False),
)


class HFImportError(Exception):
    """A Hugging Face directory that cannot be imported; the message is one line for the user."""


def is_hf_gpt2_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory whose config.json says ``model_type: gpt2``."""
    directory = Path(path)
    if not directory.is_dir():
        return False
    try:
        return _read_json(directory / "config.json").get("model_type") == "gpt2"
    except HFImportError:
        return False


def load_hf_gpt2(path: str | os.PathLike[str]) -> tuple[GPT2, GPT2Config, str, dict[str, int | None]]:
    """(model in eval mode, float32; its config; tokenizer JSON string; special tokens
    ``{"eos": id of <|endoftext|>, "unk": None, "bos": None}``)."""
    directory = Path(path)
    if not directory.is_dir():
        raise HFImportError(f"{directory} is not a directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise HFImportError(f"no config.json in {directory}")
    config_json = _read_json(config_file)
    config = hf_config_to_gpt2(config_json)
    tokenizer = _load_tokenizer(directory)
    tokenizer_size = _tokenizer_size(tokenizer)
    if tokenizer_size > config.vocab_size:
        raise HFImportError(
            f"tokenizer in {directory} has {tokenizer_size} ids but the model's vocabulary has only {config.vocab_size}"
        )
    special = {"eos": _eos_id(tokenizer, config_json, directory), "unk": None, "bos": None}
    model = build_model("gpt2", config.to_dict())
    model.load_state_dict(_convert_state_dict(_load_weights(directory), model, directory))
    return model.float().eval(), config, tokenizer.to_str(), special


def hf_config_to_gpt2(config_json: dict[str, Any]) -> GPT2Config:
    """Map an HF GPT-2 config.json to GPT2Config; refuse other model types and options we do not implement."""
    if not isinstance(config_json, dict):
        raise HFImportError("config.json is not a JSON object")
    model_type = config_json.get("model_type")
    if model_type != "gpt2":
        raise HFImportError(f"config.json has model_type {model_type!r}; only 'gpt2' models can be imported")
    for key, needed in UNSUPPORTED_OPTIONS:
        if key in config_json and bool(config_json[key]) != needed:
            raise HFImportError(f"config.json sets {key}={config_json[key]!r}, which textgen's GPT-2 does not support")
    activation = config_json.get("activation_function", "gelu_new")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise HFImportError(
            f"config.json uses activation_function {activation!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    defaults = GPT2Config()
    n_embd = _positive_int(config_json, "n_embd", defaults.n_embd)
    n_inner = config_json.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise HFImportError(f"config.json sets n_inner={n_inner!r}; only 4 * n_embd ({4 * n_embd}) is supported")
    context_key = "n_positions" if "n_positions" in config_json else "n_ctx"
    epsilon = config_json.get("layer_norm_epsilon", defaults.layer_norm_epsilon)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise HFImportError(f"config.json has an invalid layer_norm_epsilon {epsilon!r}")
    try:
        return GPT2Config(
            vocab_size=_positive_int(config_json, "vocab_size", defaults.vocab_size),
            context_length=_positive_int(config_json, context_key, defaults.context_length),
            n_layer=_positive_int(config_json, "n_layer", defaults.n_layer),
            n_head=_positive_int(config_json, "n_head", defaults.n_head),
            n_embd=n_embd,
            dropout=0.0,  # HF's *_pdrop are training settings; an imported model is for inference
            layer_norm_epsilon=float(epsilon),
            bias=True,
        )
    except ValueError as exc:
        raise HFImportError(f"config.json is not a valid GPT-2 config: {exc}") from exc


# --------------------------------------------------------------------------------------------------- config


def _read_json(file: Path) -> dict[str, Any]:
    try:
        if file.stat().st_size > MAX_JSON_BYTES:
            raise HFImportError(f"{file} is too large to be a config file")
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFImportError(f"cannot read {file}: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise HFImportError(f"{file} is not a JSON object")
    return data


def _positive_int(config_json: dict[str, Any], key: str, default: int) -> int:
    value = config_json.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HFImportError(f"config.json has an invalid {key} {value!r} (expected a positive integer)")
    return value


# --------------------------------------------------------------------------------------------------- tokenizer


def _load_tokenizer(directory: Path) -> Tokenizer:
    tokenizer_file = directory / "tokenizer.json"
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    try:
        if tokenizer_file.is_file():
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        elif vocab_file.is_file() and merges_file.is_file():
            tokenizer = _tokenizer_from_vocab_merges(vocab_file, merges_file)
        else:
            raise HFImportError(f"no tokenizer (tokenizer.json or vocab.json+merges.txt) in {directory}")
    except HFImportError:
        raise
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses for bad files
        raise HFImportError(f"cannot read the tokenizer in {directory}: {first_line(exc)}") from exc
    # A padding/truncation setting saved with the tokenizer would silently pad or cut the user's prompts.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def tokenizer_adds_bos(path: str | os.PathLike[str]) -> bool:
    """Whether the directory's tokenizer puts a BOS token before every text (``add_bos_token`` in
    tokenizer_config.json; absent, as for GPT-2, means no). transformers' ``generate`` then continues the prompt
    as given, so a textgen session of this model should not prepend the end-of-text separator either."""
    config_file = Path(path) / "tokenizer_config.json"
    if not config_file.is_file():
        return False
    return _read_json(config_file).get("add_bos_token") is True


def _tokenizer_from_vocab_merges(vocab_file: Path, merges_file: Path) -> Tokenizer:
    """The GPT-2 byte-level BPE: no prefix space, byte-level decoding, <|endoftext|> special."""
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS_TEXT])
    return tokenizer


def _tokenizer_size(tokenizer: Tokenizer) -> int:
    """One more than the largest id the tokenizer can produce (ids may have holes, so not the token count)."""
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    return max(ids) + 1 if ids else 0


def _eos_id(tokenizer: Tokenizer, config_json: dict[str, Any], directory: Path) -> int:
    eos = tokenizer.token_to_id(EOS_TEXT)
    if eos is not None:
        return eos
    fallback = config_json.get("eos_token_id")
    if isinstance(fallback, int) and not isinstance(fallback, bool) and 0 <= fallback < _tokenizer_size(tokenizer):
        return fallback
    raise HFImportError(f"the tokenizer in {directory} has no {EOS_TEXT} token and config.json no usable eos_token_id")


# --------------------------------------------------------------------------------------------------- weights


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    single, index, pickled = (
        directory / "model.safetensors",
        directory / "model.safetensors.index.json",
        directory / "pytorch_model.bin",
    )
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        return _load_sharded_safetensors(index)
    if pickled.is_file():
        return _load_pytorch_bin(pickled)
    raise HFImportError(f"no weights (model.safetensors or pytorch_model.bin) in {directory}")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise HFImportError(f"cannot read {file}: {first_line(exc)}") from exc


def _load_sharded_safetensors(index_file: Path) -> dict[str, torch.Tensor]:
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFImportError(f"{index_file} has no valid weight_map")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = index_file.parent / shard
        if Path(shard).name != shard or not shard_file.is_file():  # refuse paths that leave the directory
            raise HFImportError(f"{index_file} names a missing or invalid shard {shard!r}")
        tensors.update(_load_safetensors(shard_file))
    return tensors


def _load_pytorch_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise HFImportError(f"{file} was refused: it holds objects that are not plain tensors") from exc
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError) as exc:
        raise HFImportError(f"cannot read {file}: {first_line(exc)}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise HFImportError(f"{file} is not a state dict of tensors")
    return data


def _convert_state_dict(
    hf_tensors: dict[str, torch.Tensor], model: GPT2, directory: Path
) -> dict[str, torch.Tensor]:
    """HF names/layouts -> ours: add the ``transformer.`` prefix, transpose Conv1D weights, fill the tied head."""
    expected = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for hf_name, tensor in hf_tensors.items():
        if hf_name.endswith(IGNORED_SUFFIXES):
            continue
        has_prefix = hf_name.startswith("transformer.") or hf_name == "lm_head.weight"
        name = hf_name if has_prefix else f"transformer.{hf_name}"
        if name not in expected:
            unexpected.append(hf_name)
            continue
        if name.endswith(CONV1D_SUFFIXES) and tensor.dim() == 2:
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise HFImportError(
                f"weight {hf_name} in {directory} has shape {list(tensor.shape)}, expected {list(expected[name].shape)}"
            )
        converted[name] = tensor.to(torch.float32).contiguous()
    if unexpected:
        raise HFImportError(f"weights in {directory} have unexpected keys: {_first_few(unexpected)}")
    _check_tied_head(converted, directory)
    missing = [name for name in expected if name not in converted]
    if missing:
        raise HFImportError(f"weights in {directory} lack keys: {_first_few(missing)}")
    return converted


def _check_tied_head(converted: dict[str, torch.Tensor], directory: Path) -> None:
    """Our LM head IS the token embedding; a checkpoint with a different head cannot be represented."""
    embedding = converted.get("transformer.wte.weight")
    head = converted.pop("lm_head.weight", None)
    if embedding is None:
        return  # reported as a missing key
    if head is not None and not torch.equal(head, embedding):
        raise HFImportError(f"weights in {directory} have an lm_head that differs from wte (untied); not supported")
    converted["lm_head.weight"] = embedding


def _first_few(names: list[str], count: int = 4) -> str:
    shown = ", ".join(names[:count])
    return f"{shown} (and {len(names) - count} more)" if len(names) > count else shown
