"""Shared test fixtures: tiny textgen model files (LSTM, GRU, GPT-2) written exactly per docs/model-file.md.

Models are exported with the TorchScript exporter (``torch.onnx.export(dynamo=False)``), which gives fully dynamic
batch/seq/past axes for these small graphs, and stamped with ``runtime.modelfile.encode_metadata``. The GPT-2 here
is a minimal test double with the optimum-style interface (``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/.value`` -> ``present.{i}.key/.value``) and an explicit bottom-right causal mask.

Everything is session-scoped and tiny so a test file that uses them stays well under a minute on 2 cores.

Also the helpers more than one test file needs: ``general_path`` (sampler chains forced off their small-vocabulary
fast paths) and the ``disk_full`` fixture (writes that fail as on a full disk).
"""

from __future__ import annotations

import errno
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn

import runtime.atomic
import runtime.sampling.plan as sampling_plan
from models.rnn import RNNConfig, RNNLanguageModel
from runtime.modelfile import ModelInfo, SpecialTokens, StateSpec, encode_metadata

EOS_TEXT = "<|endoftext|>"
UNK_TEXT = "<unk>"
FIXTURE_ALPHABET = "abcdefghij .,\n"
TINY_ALPHABET = "ab"
FIXTURE_GENERATION = {"temperature": 0.8, "top_k": 20, "max_new_tokens": 40}


def char_tokenizer(alphabet: str) -> Tokenizer:
    """Char-level tokenizer as the trainer builds it: id 0 = eos, id 1 = unk, then one id per character."""
    vocab = {EOS_TEXT: 0, UNK_TEXT: 1}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TEXT))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOS_TEXT, UNK_TEXT])
    return tokenizer


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but gives clean dynamic graphs
        torch.onnx.export(
            module, args, str(path), input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=17, dynamo=False,
        )


def stamp_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the file's metadata_props with ``metadata`` (an empty dict strips them)."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


# --------------------------------------------------------------------------------------------------- RNN


class _RNNWrapper(nn.Module):
    """Flattens the RNN's state tuple into separate graph inputs/outputs."""

    def __init__(self, model: RNNLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor):
        logits, new_state = self.model(input_ids, tuple(state))
        return (logits, *new_state)


def rnn_info(model: RNNLanguageModel, tokenizer: Tokenizer, generation: dict | None = None) -> ModelInfo:
    cfg = model.config
    specs = tuple(
        StateSpec(input=f"state.{n}", output=f"state_out.{n}", shape=(cfg.num_layers, "batch", cfg.hidden_size),
                  batch_axis=1, seq_axis=None)
        for n in model.state_names
    )
    return ModelInfo(
        arch=cfg.cell, tokenizer_json=tokenizer.to_str(), special=SpecialTokens(eos=0, unk=1, bos=None),
        vocab_size=cfg.vocab_size, context_length=0, state=specs, inputs=(),
        generation=dict(FIXTURE_GENERATION if generation is None else generation),
        model_config=cfg.to_dict(), source={"fixture": "tests/conftest.py"},
    )


def write_rnn_model(path: Path, *, cell: str = "lstm", alphabet: str = FIXTURE_ALPHABET, hidden: int = 32,
                    layers: int = 2, seed: int = 0, weight_scale: float = 1.0, eos_bias: float = 0.0,
                    pad_vocab: int = 0, generation: dict | None = None) -> Path:
    """A random tiny RNN model file. ``weight_scale`` > 1 makes the next-token distributions peakier;
    ``eos_bias`` adds to the eos logit; ``pad_vocab`` adds output ids beyond the tokenizer (padding)."""
    torch.manual_seed(seed)
    tokenizer = char_tokenizer(alphabet)
    vocab_size = tokenizer.get_vocab_size() + pad_vocab
    model = RNNLanguageModel(RNNConfig(vocab_size=vocab_size, cell=cell, embedding_size=16, hidden_size=hidden,
                                       num_layers=layers)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(weight_scale)
        model.head.bias[0] += eos_bias
    state_names = [f"state.{n}" for n in model.state_names]
    out_names = [f"state_out.{n}" for n in model.state_names]
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    dynamic.update({name: {1: "batch"} for name in state_names + out_names})
    example_ids = torch.zeros((2, 3), dtype=torch.long)
    _export(_RNNWrapper(model), (example_ids, *model.initial_state(2)), path, ["input_ids", *state_names],
            ["logits", *out_names], dynamic)
    stamp_metadata(path, encode_metadata(rnn_info(model, tokenizer, generation)))
    return path


# --------------------------------------------------------------------------------------------------- GPT-2


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, keep, past_k, past_v):
        batch, seq, width = x.shape
        head_dim = width // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~keep, -1e9)
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, seq, width)
        x = x + self.proj(attended)
        x = x + self.mlp(self.ln2(x))
        return x, k, v


class TinyGPT(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), past as (k0, v0, k1, ...)."""

    def __init__(self, vocab: int, context: int, width: int = 16, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.context, self.heads, self.layers, self.width = context, heads, layers, width
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        seq = input_ids.shape[1]
        total = attention_mask.shape[1]
        # Bottom-right causal mask: query i sits at absolute slot total - seq + i.
        query_slot = torch.arange(seq).unsqueeze(1) + (total - seq)
        causal = torch.arange(total).unsqueeze(0) <= query_slot
        keep = causal.unsqueeze(0).unsqueeze(0) & (attention_mask > 0).unsqueeze(1).unsqueeze(2)
        x = self.wte(input_ids) + self.wpe(position_ids)
        presents = []
        for index, block in enumerate(self.blocks):
            x, k, v = block(x, keep, past[2 * index], past[2 * index + 1])
            presents += [k, v]
        return (self.head(self.ln_f(x)), *presents)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        shape = (batch, self.heads, 0, self.width // self.heads)
        return [torch.zeros(shape) for _ in range(2 * self.layers)]


def gpt_info(model: TinyGPT, tokenizer: Tokenizer, vocab_size: int, generation: dict | None = None) -> ModelInfo:
    head_dim = model.width // model.heads
    specs = tuple(
        StateSpec(input=f"past_key_values.{i}.{kind}", output=f"present.{i}.{kind}",
                  shape=("batch", model.heads, "past", head_dim), batch_axis=0, seq_axis=2)
        for i in range(model.layers) for kind in ("key", "value")
    )
    return ModelInfo(
        arch="gpt2", tokenizer_json=tokenizer.to_str(), special=SpecialTokens(eos=0, unk=1, bos=None),
        vocab_size=vocab_size, context_length=model.context, state=specs, inputs=("attention_mask", "position_ids"),
        generation=dict(FIXTURE_GENERATION if generation is None else generation),
        model_config={"n_layer": model.layers, "n_head": model.heads, "n_embd": model.width, "n_ctx": model.context},
        source={"fixture": "tests/conftest.py"},
    )


def write_gpt_model(path: Path, *, alphabet: str = FIXTURE_ALPHABET, context: int = 24, seed: int = 0,
                    pad_vocab: int = 3, generation: dict | None = None) -> Path:
    torch.manual_seed(seed)
    tokenizer = char_tokenizer(alphabet)
    vocab_size = tokenizer.get_vocab_size() + pad_vocab
    model = TinyGPT(vocab_size, context).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)  # peakier distributions than the default init, so greedy text varies
    past_names = [f"past_key_values.{i}.{kind}" for i in range(model.layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(model.layers) for kind in ("key", "value")]
    dynamic = {
        "input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"},
    }
    dynamic.update({name: {0: "batch", 2: "past"} for name in past_names})
    dynamic.update({name: {0: "batch", 2: "total"} for name in present_names})
    batch, seq, past = 2, 3, 4  # distinct sizes >= 2 so no dimension gets frozen
    head_dim = model.width // model.heads
    example = (
        torch.zeros((batch, seq), dtype=torch.long), torch.ones((batch, past + seq), dtype=torch.long),
        torch.arange(past, past + seq).repeat(batch, 1),
        *[torch.zeros((batch, model.heads, past, head_dim)) for _ in past_names],
    )
    _export(model, example, path, ["input_ids", "attention_mask", "position_ids", *past_names],
            ["logits", *present_names], dynamic)
    stamp_metadata(path, encode_metadata(gpt_info(model, tokenizer, vocab_size, generation)))
    return path


# --------------------------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class ModelFiles:
    lstm: Path
    gru: Path
    gpt: Path
    tiny: Path  # 2-character LSTM (vocab 4: eos, unk, a, b) for exhaustive-search checks
    eager_eos: Path  # LSTM whose eos logit dominates: greedy stops at once


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    root = tmp_path_factory.mktemp("models")
    return ModelFiles(
        lstm=write_rnn_model(root / "lstm.onnx", cell="lstm", weight_scale=2.5, seed=1, pad_vocab=2),
        gru=write_rnn_model(root / "gru.onnx", cell="gru", weight_scale=2.5, seed=1),
        gpt=write_gpt_model(root / "gpt.onnx"),
        tiny=write_rnn_model(root / "tiny.onnx", alphabet=TINY_ALPHABET, hidden=8, layers=1, weight_scale=2.0,
                             seed=4),
        eager_eos=write_rnn_model(root / "eos.onnx", eos_bias=50.0, seed=2),
    )


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Write extra model files on demand: ``model_factory("rnn"|"gpt", **options)``."""
    root = tmp_path_factory.mktemp("custom-models")
    counter = iter(range(10**6))

    def make(kind: str, **options) -> Path:
        path = root / f"{kind}-{next(counter)}.onnx"
        return write_rnn_model(path, **options) if kind == "rnn" else write_gpt_model(path, **options)

    return make


@pytest.fixture
def edit_metadata(tmp_path: Path) -> Callable[[Path, str, Callable[[dict[str, str]], None]], Path]:
    """``edit_metadata(source, name, change)``: a copy of ``source`` in tmp_path whose metadata map went through
    ``change(meta)`` (mutate it in place; ``meta.clear()`` strips the textgen metadata)."""

    def edit(source: Path, name: str, change: Callable[[dict[str, str]], None]) -> Path:
        target = tmp_path / name
        target.write_bytes(source.read_bytes())
        meta = {prop.key: prop.value for prop in onnx.load(str(target)).metadata_props}
        change(meta)
        stamp_metadata(target, meta)
        return target

    return edit


# --------------------------------------------------------------------------------------------------- real exporter


@dataclass(frozen=True)
class ExportedFiles:
    """The same kinds of tiny models, trained-checkpoint style, written by the real exporter (export/)."""

    lstm: Path
    gru: Path
    gpt: Path


def _export_via_checkpoint(root: Path, name: str, arch: str, model: nn.Module, tokenizer: Tokenizer) -> Path:
    from export.onnx_export import export_checkpoint  # only the tests that ask for exported files need export/
    from models.checkpoint import save_checkpoint

    checkpoint = root / f"{name}.bin"
    save_checkpoint({
        "arch": arch, "model_config": model.config.to_dict(), "tokenizer": tokenizer.to_str(),
        "special_tokens": {"eos": 0, "unk": 1, "bos": None}, "model": model.state_dict(),
        "generation": dict(FIXTURE_GENERATION),
    }, checkpoint)
    return export_checkpoint(checkpoint, root / f"{name}.onnx").path


@pytest.fixture(scope="session")
def exported_files(tmp_path_factory: pytest.TempPathFactory) -> ExportedFiles:
    from models.gpt2 import GPT2, GPT2Config

    root = tmp_path_factory.mktemp("exported")
    tokenizer = char_tokenizer(FIXTURE_ALPHABET)
    vocab = tokenizer.get_vocab_size()
    models_by_name: dict[str, tuple[str, nn.Module]] = {}
    for name, cell, seed in (("lstm", "lstm", 1), ("gru", "gru", 1)):
        torch.manual_seed(seed)
        config = RNNConfig(vocab_size=vocab + 2, cell=cell, embedding_size=16, hidden_size=32, num_layers=2)
        models_by_name[name] = (cell, RNNLanguageModel(config))
    torch.manual_seed(0)
    models_by_name["gpt"] = ("gpt2", GPT2(GPT2Config(vocab_size=vocab + 3, context_length=24, n_layer=2, n_head=2,
                                                     n_embd=16)))
    paths = {}
    for name, (arch, model) in models_by_name.items():
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(2.5)  # peakier distributions, so greedy text varies
        paths[name] = _export_via_checkpoint(root, name, arch, model.eval(), tokenizer)
    return ExportedFiles(**paths)


@pytest.fixture
def model_path(request: pytest.FixtureRequest, model_files: ModelFiles) -> Path:
    """For ``@pytest.mark.parametrize("model_path", ["lstm", "exported-gpt", ...], indirect=True)``: the fixture
    model file of that kind, or (prefix "exported-") the same kind written by the real exporter."""
    kind: str = request.param
    if kind.startswith("exported-"):
        return getattr(request.getfixturevalue("exported_files"), kind.removeprefix("exported-"))
    return getattr(model_files, kind)


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by several test files


@contextmanager
def general_path() -> Iterator[None]:
    """Sampler chains built inside take the general path whatever their vocabulary (every vocabulary counts as
    wide), so a test can compare it with the small-vocabulary fast paths."""
    saved = sampling_plan.SMALL_VOCAB
    sampling_plan.SMALL_VOCAB = 0
    try:
        yield
    finally:
        sampling_plan.SMALL_VOCAB = saved


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``disk_full("a.bin", ...)``: from then on, atomic writes (runtime.atomic) to files of those names fail with
    ENOSPC, naming the temporary file beside the target as a real failed write does; other writes go through."""
    real_write = runtime.atomic._write_atomically

    def fill(*names: str) -> None:
        def write(target: Path, write: object) -> None:
            if target.name in names:
                raise OSError(errno.ENOSPC, "No space left on device", str(target.parent / f".{target.name}.77.tmp"))
            real_write(target, write)  # type: ignore[arg-type]

        monkeypatch.setattr(runtime.atomic, "_write_atomically", write)

    return fill
