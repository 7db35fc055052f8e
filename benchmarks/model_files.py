"""Model files for the benchmarks, built once from random weights (no downloads) through the project's own
checkpoint format and exporter, and cached under ``--cache-dir`` (default ``~/.cache/textgen-bench``). The cache
key covers the model spec and the source of the code that builds the file (models/, export/), so a changed
exporter re-exports. The shapes the benchmarks compare (GPT-2 small, nanoGPT's tiny GPT, the demo model's char
LSTM) are named here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, BenchmarkError, distribution_version

SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DEMO_MODEL = REPO_ROOT / "repl" / "demo" / "demo.onnx"
BUILD_SOURCES = ("models/*.py", "export/*.py", "runtime/modelfile.py")  # code whose change re-exports cached files
FALLBACK_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n"
)
EOS_TEXT = "<|endoftext|>"
UNK_TEXT = "<unk>"


# --- model files -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model to build from random weights: ``arch`` and its config (GPT2Config / RNNConfig fields)."""

    name: str
    arch: str  # "gpt2" | "lstm" | "gru"
    config: dict[str, Any]
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])


def gpt2_spec(name: str, vocab_size: int, context_length: int, n_layer: int, n_head: int, n_embd: int) -> ModelSpec:
    return ModelSpec(name, "gpt2", {"vocab_size": vocab_size, "context_length": context_length, "n_layer": n_layer,
                                    "n_head": n_head, "n_embd": n_embd})


GPT2_SMALL = gpt2_spec("GPT-2 small shape (12x768, vocab 50257)", 50257, 1024, 12, 12, 768)
GPT2_SMOKE = gpt2_spec("GPT-2 smoke shape (2x64, vocab 512)", 512, 128, 2, 2, 64)
# nanoGPT's shakespeare_char model: 4 layers, 4 heads, 128 wide; 65 characters + end-of-text + unknown = 67.
TINY_GPT = gpt2_spec("tiny GPT (4x128, vocab 67)", 67, 256, 4, 4, 128)
TINY_GPT_SMOKE = gpt2_spec("tiny GPT smoke (1x32, vocab 67)", 67, 64, 1, 2, 32)


def demo_shape() -> ModelSpec:
    """The demo model's shape, read from the trainer's "shakespeare-char" preset (vocab 67: 65 characters, eos,
    unk); 1x512, embedding 64 if the preset cannot be read."""
    config: dict[str, Any] = {"vocab_size": 67, "cell": "lstm", "embedding_size": 64, "hidden_size": 512,
                              "num_layers": 1}
    try:
        from train.presets import PRESETS

        preset = PRESETS["shakespeare-char"]
        config.update(cell=preset.get("arch", "lstm"), embedding_size=int(preset["embedding_size"]),
                      hidden_size=int(preset["hidden_size"]), num_layers=int(preset["layers"]))
    except (ImportError, KeyError, TypeError, ValueError):
        pass
    name = f"char {config['cell'].upper()} {config['num_layers']}x{config['hidden_size']} (vocab 67)"
    return ModelSpec(name, config["cell"], config)


CHAR_LSTM = demo_shape()
CHAR_LSTM_SMOKE = ModelSpec("char LSTM smoke 1x64 (vocab 67)", "lstm",
                            {"vocab_size": 67, "cell": "lstm", "embedding_size": 16, "hidden_size": 64,
                             "num_layers": 1})


def corpus_text() -> str:
    """Tiny Shakespeare when this checkout sits beside ../shared/data, else a built-in excerpt."""
    try:
        return SHAKESPEARE.read_text(encoding="utf-8")
    except OSError:
        return FALLBACK_TEXT


def tokenizer_for(vocab_size: int) -> tuple[str, dict[str, int | None]]:
    """(tokenizer JSON, special tokens) with exactly ``vocab_size`` ids.

    The char tokenizer when it fits; for bigger vocabularies (GPT-2's 50257) the same characters plus filler
    word tokens, so the sampler sees a real, fully usable 50k vocabulary instead of 50k banned padding ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(corpus_text()))
    if vocab_size < len(chars) + 2:
        raise BenchmarkError(f"vocab {vocab_size} is smaller than the {len(chars) + 2}-token char tokenizer")
    vocab = {char: index for index, char in enumerate(chars)}
    while len(vocab) < vocab_size - 2:
        vocab[f"<w{len(vocab)}>"] = len(vocab)
    vocab[EOS_TEXT] = len(vocab)
    vocab[UNK_TEXT] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TEXT))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(EOS_TEXT, special=True), AddedToken(UNK_TEXT, special=True)])
    return tokenizer.to_str(), {"eos": vocab[EOS_TEXT], "unk": vocab[UNK_TEXT], "bos": None}


def benchmark_eos(vocab_size: int) -> int:
    """The end-of-text id of ``tokenizer_for(vocab_size)``: second to last."""
    return vocab_size - 2


def _source_digest(extra: Iterable[Path] = ()) -> str:
    digest = hashlib.sha256()
    files = sorted(p for pattern in BUILD_SOURCES for p in REPO_ROOT.glob(pattern))
    for path in [*files, *extra]:
        if path.name in ("quantize.py", "optimize.py") and path not in extra:
            continue  # they do not change the exported fp32 file
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for name in ("torch", "onnx", "onnxruntime-gpu", "onnxruntime"):
        digest.update(distribution_version(name).encode())
    return digest.hexdigest()[:16]


def spec_key(spec: ModelSpec) -> str:
    payload = json.dumps({"arch": spec.arch, "config": spec.config, "seed": spec.seed}, sort_keys=True)
    return hashlib.sha256((payload + _source_digest()).encode()).hexdigest()[:16]


def checkpoint_file(spec: ModelSpec, cache_dir: Path) -> Path:
    """A textgen checkpoint of ``spec`` with random weights (seeded), built once."""
    path = cache_dir / f"{spec.arch}-{spec_key(spec)}.bin"
    if path.exists():
        return path
    import torch

    from models.checkpoint import Checkpoint, save_checkpoint
    from models.registry import build_model

    torch.manual_seed(spec.seed)
    model = build_model(spec.arch, spec.config).eval()
    tokenizer_json, special = tokenizer_for(spec.vocab_size)
    save_checkpoint(Checkpoint(arch=spec.arch, model_config=model.config.to_dict(), tokenizer=tokenizer_json,
                               special_tokens=special, weights=model.state_dict(),
                               generation={"temperature": 0.8, "top_k": 40}), path)
    return path


def model_file(spec: ModelSpec, cache_dir: Path) -> Path:
    """The exported fp32 textgen model file of ``spec`` (built through export.onnx_export once, then cached)."""
    path = cache_dir / f"{spec.arch}-{spec_key(spec)}.onnx"
    if path.exists():
        return path
    from export.onnx_export import export_checkpoint

    print(f"building {spec.name} model file (cached in {cache_dir}) ...", file=sys.stderr, flush=True)
    export_checkpoint(checkpoint_file(spec, cache_dir), path)
    return path


def quantized_file(fp32_path: Path, mode: str, cache_dir: Path, int8_weights: str = "s7") -> Path:
    """``fp32_path`` quantized to ``mode`` with export.quantize (int8: with the ``int8_weights`` encoding), cached in
    ``cache_dir`` (never beside the source: that may be the bundled demo model inside the package)."""
    stat = fp32_path.stat()
    identity = f"{fp32_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    key = hashlib.sha256((identity + _source_digest([REPO_ROOT / "export" / "quantize.py"])).encode())
    label = f"{mode}{int8_weights}" if mode == "int8" and int8_weights != "s7" else mode
    path = cache_dir / f"{fp32_path.stem}.{label}-{key.hexdigest()[:12]}.onnx"
    if path.exists():
        return path
    from export.quantize import quantize_model

    print(f"quantizing {fp32_path.name} to {label} ...", file=sys.stderr, flush=True)
    return quantize_model(fp32_path, path, mode, int8_weights)  # type: ignore[arg-type]


def demo_model(args: argparse.Namespace) -> tuple[Path, str]:
    """The bundled demo model when it exists, else a random-weight char LSTM of its shape (smoke: smaller)."""
    if DEMO_MODEL.exists() and not args.smoke:
        return DEMO_MODEL, "demo model (repl/demo/demo.onnx)"
    spec = CHAR_LSTM_SMOKE if args.smoke else CHAR_LSTM
    return model_file(spec, args.cache_dir), f"{spec.name}, random weights (stand-in for the demo model)"


def param_bytes(spec_or_model: Any) -> int:
    """float32 bytes of a torch model's parameters (tied weights once)."""
    return sum(p.numel() for p in spec_or_model.parameters()) * 4


def file_weight_bytes(path: Path) -> int:
    """Bytes of the initializers stored in a model file (what one decode step must read at least once)."""
    import onnx

    from export.graph import initializer_bytes

    return initializer_bytes(onnx.load(str(path)))


