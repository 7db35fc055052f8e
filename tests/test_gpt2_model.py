"""models/gpt2.py and models/hf_gpt2.py against Hugging Face transformers (a test-only dependency).

Everything is tiny: a 2-layer, 32-wide GPT-2 with a ~300-token byte-level BPE trained here on a few sentences.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.gpt2 import GPT2, GPT2Config, attention_keep_mask, causal_mask
from models.hf_gpt2 import HFImportError, hf_config_to_gpt2, is_hf_gpt2_dir, load_hf_gpt2
from train.optim import gpt2_optimizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

EOS = "<|endoftext|>"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small language model learns to continue text one token at a time.",
    "Attention looks back over every earlier position, and the cache keeps their keys and values.",
    "Left padding lets prompts of different lengths share one batch.",
]
TOLERANCE_HF = 1e-4
TOLERANCE_CACHE = 1e-5


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def hf_model(vocab_size: int, seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF's init is close to uniform logits; spread them so greedy text is not degenerate
        for parameter in model.parameters():
            parameter.mul_(3.0)
    return model


def write_hf_dir(
    directory: Path, model: transformers.GPT2LMHeadModel, tokenizer: Tokenizer, *, weights: str = "safetensors",
    tokenizer_files: str = "json",
) -> Path:
    """``weights``: "safetensors" (save_pretrained) or "bin" (pytorch_model.bin, old-style keys without the
    ``transformer.`` prefix, with HF's attn.bias buffers and an explicit lm_head.weight)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if weights == "bin":
        (directory / "model.safetensors").unlink()
        state = {name.removeprefix("transformer."): t.clone() for name, t in model.state_dict().items()}
        for layer in range(model.config.n_layer):
            state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
        torch.save(state, directory / "pytorch_model.bin")
    if tokenizer_files == "json":
        tokenizer.save(str(directory / "tokenizer.json"))
    else:
        tokenizer.model.save(str(directory))  # vocab.json + merges.txt
    return directory


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer()


@pytest.fixture(scope="module")
def reference(tokenizer: Tokenizer) -> transformers.GPT2LMHeadModel:
    return hf_model(tokenizer.get_vocab_size())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, reference, tokenizer: Tokenizer) -> Path:
    return write_hf_dir(tmp_path_factory.mktemp("hf") / "gpt2", reference, tokenizer)


@pytest.fixture(scope="module")
def ours(hf_dir: Path) -> GPT2:
    return load_hf_gpt2(hf_dir)[0]


@pytest.fixture()
def make_dir(tmp_path: Path, reference, tokenizer: Tokenizer) -> Callable[..., Path]:
    def make(name: str = "model", **options) -> Path:
        return write_hf_dir(tmp_path / name, reference, tokenizer, **options)

    return make


def token_ids(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text).ids])


def full_logits(model: GPT2, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


# --------------------------------------------------------------------------------------------------- parity


def test_logits_match_transformers(ours: GPT2, reference, tokenizer: Tokenizer) -> None:
    ids = token_ids(tokenizer, CORPUS[2])
    assert ids.shape[1] > 10
    with torch.no_grad():
        expected = reference(ids).logits
    assert (full_logits(ours, ids) - expected).abs().max().item() < TOLERANCE_HF


def test_bin_weights_without_prefix_and_vocab_merges_tokenizer(make_dir, reference, tokenizer: Tokenizer) -> None:
    directory = make_dir(weights="bin", tokenizer_files="vocab_merges")
    assert not (directory / "model.safetensors").exists() and not (directory / "tokenizer.json").exists()
    model, config, tokenizer_json, special = load_hf_gpt2(directory)
    rebuilt = Tokenizer.from_str(tokenizer_json)
    text = "The lazy fox, 42 tokens & ünïcödé!"
    assert rebuilt.encode(text).ids == tokenizer.encode(text).ids
    assert rebuilt.decode(rebuilt.encode(text).ids) == text
    assert special == {"eos": tokenizer.token_to_id(EOS), "unk": None, "bos": None}
    ids = token_ids(tokenizer, CORPUS[0])
    with torch.no_grad():
        expected = reference(ids).logits
    assert (full_logits(model, ids) - expected).abs().max().item() < TOLERANCE_HF


def test_load_returns_config_tokenizer_and_eval_float32(hf_dir: Path, tokenizer: Tokenizer) -> None:
    model, config, tokenizer_json, special = load_hf_gpt2(hf_dir)
    assert config == GPT2Config(vocab_size=tokenizer.get_vocab_size(), context_length=64, n_layer=2, n_head=2,
                                n_embd=32, dropout=0.0, layer_norm_epsilon=1e-5, bias=True)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert Tokenizer.from_str(tokenizer_json).encode(CORPUS[1]).ids == tokenizer.encode(CORPUS[1]).ids
    assert special["eos"] == 0 and Tokenizer.from_str(tokenizer_json).id_to_token(special["eos"]) == EOS


def test_greedy_continuation_matches_transformers_generate(ours: GPT2, reference, tokenizer: Tokenizer) -> None:
    prompt = token_ids(tokenizer, "The quick brown")
    with torch.no_grad():
        expected = reference.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, prompt.shape[1]:].tolist()
    generated: list[int] = []
    with torch.no_grad():
        logits, past = ours(prompt, ours.empty_past(1))
        for _ in range(30):
            next_id = int(logits[0, -1].argmax())
            generated.append(next_id)
            logits, past = ours(torch.tensor([[next_id]]), past)
    assert len(expected) == 30
    assert len(set(generated)) > 3  # a real continuation, not one token repeated
    assert generated == expected


# --------------------------------------------------------------------------------------------------- KV cache


def decode_in_chunks(model: GPT2, ids: torch.Tensor, chunk_sizes: list[int]) -> tuple[torch.Tensor, list]:
    assert sum(chunk_sizes) == ids.shape[1]
    outputs, past, start = [], model.empty_past(ids.shape[0]), 0
    with torch.no_grad():
        for size in chunk_sizes:
            logits, past = model(ids[:, start:start + size], past)
            outputs.append(logits)
            start += size
    return torch.cat(outputs, dim=1), past


@pytest.mark.parametrize("chunks", [[7] + [1] * 9, [5, 3, 4, 1, 3], [1] * 16, [16]])
def test_incremental_decoding_equals_full_recompute(ours: GPT2, tokenizer: Tokenizer, chunks: list[int]) -> None:
    ids = token_ids(tokenizer, CORPUS[2])[:, :16]
    incremental, present = decode_in_chunks(ours, ids, chunks)
    assert (incremental - full_logits(ours, ids)).abs().max().item() < TOLERANCE_CACHE
    assert len(present) == ours.config.n_layer
    for key, value in present:
        assert key.shape == value.shape == (1, ours.config.n_head, 16, ours.config.head_dim)


def test_past_without_padding_is_causal_bottom_right(ours: GPT2, tokenizer: Tokenizer) -> None:
    """SDPA's is_causal aligns top-left, so with a past the first new token would see only key 0. The explicit
    bottom-right mask must make a 3-token chunk after a 5-token past equal the full run."""
    ids = token_ids(tokenizer, CORPUS[1])[:, :8]
    with torch.no_grad():
        _, past = ours(ids[:, :5])
        chunk_logits, _ = ours(ids[:, 5:], past)
    assert (chunk_logits - full_logits(ours, ids)[:, 5:]).abs().max().item() < TOLERANCE_CACHE
    # and a later token never influences an earlier one inside the chunk
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % ours.config.vocab_size
    with torch.no_grad():
        changed_logits, _ = ours(changed[:, 5:], past)
    assert torch.equal(changed_logits[:, :2], chunk_logits[:, :2])
    assert not torch.allclose(changed_logits[:, 2], chunk_logits[:, 2])


def test_causal_mask_is_bottom_right_aligned() -> None:
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert torch.equal(causal_mask(4, 4), torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_keep_mask_combines_padding_and_never_leaves_a_row_empty() -> None:
    """Left-padding queries see only padding; an all-False row is NaN in exporters/kernels that add -inf, so such
    rows are opened to every key (their outputs are never read)."""
    padding = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    keep = attention_keep_mask(4, 4, padding, torch.device("cpu"))
    assert keep.shape == (2, 1, 4, 4)
    assert keep[0, 0, :2].all()  # the two padding queries: opened
    assert keep[0, 0, 2:].tolist() == [[False, False, True, False], [False, False, True, True]]
    assert torch.equal(keep[1, 0], causal_mask(4, 4))


def test_position_ids_default_follows_the_past(ours: GPT2, tokenizer: Tokenizer) -> None:
    ids = token_ids(tokenizer, CORPUS[0])[:, :6]
    with torch.no_grad():
        _, past = ours(ids[:, :4])
        default_logits, _ = ours(ids[:, 4:], past)
        explicit_logits, _ = ours(ids[:, 4:], past, position_ids=torch.tensor([[4, 5]]))
        wrong_logits, _ = ours(ids[:, 4:], past, position_ids=torch.tensor([[0, 1]]))
    assert torch.equal(default_logits, explicit_logits)
    assert not torch.allclose(default_logits, wrong_logits, atol=1e-3)


def test_empty_past_path_equals_training_fast_path(ours: GPT2, tokenizer: Tokenizer) -> None:
    ids = token_ids(tokenizer, CORPUS[3])
    with torch.no_grad():
        explicit, _ = ours(ids, ours.empty_past(1))
        masked, _ = ours(ids, attention_mask=torch.ones_like(ids))
    fast = full_logits(ours, ids)
    assert (explicit - fast).abs().max().item() < TOLERANCE_CACHE
    assert (masked - fast).abs().max().item() < TOLERANCE_CACHE


def test_left_padding_gives_the_unpadded_logits_and_continues(ours: GPT2, tokenizer: Tokenizer) -> None:
    long_ids = token_ids(tokenizer, CORPUS[1])[:, :9]
    short_ids = token_ids(tokenizer, CORPUS[0])[:, :5]
    pad = long_ids.shape[1] - short_ids.shape[1]
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_ids], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, past = ours(batch, ours.empty_past(2), position_ids=positions, attention_mask=mask)
    assert torch.isfinite(logits).all()
    assert (logits[0] - full_logits(ours, long_ids)[0]).abs().max().item() < TOLERANCE_CACHE
    assert (logits[1, pad:] - full_logits(ours, short_ids)[0]).abs().max().item() < TOLERANCE_CACHE

    # two decode steps for both rows with the grown mask: still the unpadded results
    follow = torch.tensor([[11, 12], [13, 14]])
    step_logits = []
    with torch.no_grad():
        for step in range(2):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            step_out, past = ours(follow[:, step:step + 1], past, position_ids=positions, attention_mask=mask)
            step_logits.append(step_out)
    steps = torch.cat(step_logits, dim=1)
    long_full = full_logits(ours, torch.cat([long_ids, follow[:1]], dim=1))[:, -2:]
    short_full = full_logits(ours, torch.cat([short_ids, follow[1:]], dim=1))[:, -2:]
    assert (steps[0] - long_full[0]).abs().max().item() < TOLERANCE_CACHE
    assert (steps[1] - short_full[0]).abs().max().item() < TOLERANCE_CACHE


def test_too_long_sequence_is_a_clear_error(ours: GPT2) -> None:
    with torch.no_grad(), pytest.raises(ValueError, match="exceeds the context length 64"):
        _, past = ours(torch.zeros(1, 60, dtype=torch.long))
        ours(torch.zeros(1, 5, dtype=torch.long), past)


# --------------------------------------------------------------------------------------------------- import errors


def test_missing_weights(make_dir) -> None:
    directory = make_dir()
    (directory / "model.safetensors").unlink()
    with pytest.raises(HFImportError, match=r"^no weights \(model.safetensors or pytorch_model.bin\) in "):
        load_hf_gpt2(directory)


def test_missing_tokenizer(make_dir) -> None:
    directory = make_dir(tokenizer_files="vocab_merges")
    (directory / "merges.txt").unlink()
    with pytest.raises(HFImportError, match=r"^no tokenizer \(tokenizer.json or vocab.json\+merges.txt\) in "):
        load_hf_gpt2(directory)


def test_missing_config(make_dir) -> None:
    directory = make_dir()
    (directory / "config.json").unlink()
    assert not is_hf_gpt2_dir(directory)
    with pytest.raises(HFImportError, match=r"^no config.json in "):
        load_hf_gpt2(directory)


def edit_config(directory: Path, **changes) -> None:
    file = directory / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_other_model_type_is_named(make_dir) -> None:
    directory = make_dir()
    edit_config(directory, model_type="llama")
    assert not is_hf_gpt2_dir(directory)
    with pytest.raises(HFImportError, match="model_type 'llama'"):
        load_hf_gpt2(directory)


@pytest.mark.parametrize("option", ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"])
def test_unsupported_options_are_refused(option: str) -> None:
    config = {"model_type": "gpt2", "n_embd": 32, "n_head": 2, option: True}
    with pytest.raises(HFImportError, match=option):
        hf_config_to_gpt2(config)


def test_config_mapping_and_n_ctx_fallback() -> None:
    config = hf_config_to_gpt2({"model_type": "gpt2", "n_ctx": 128, "n_embd": 48, "n_layer": 3, "n_head": 4,
                                "vocab_size": 500, "layer_norm_epsilon": 1e-6, "resid_pdrop": 0.1})
    assert config == GPT2Config(vocab_size=500, context_length=128, n_layer=3, n_head=4, n_embd=48, dropout=0.0,
                                layer_norm_epsilon=1e-6)
    with pytest.raises(HFImportError, match="n_head"):
        hf_config_to_gpt2({"model_type": "gpt2", "n_head": "12"})


def test_tokenizer_larger_than_vocab_is_refused(tmp_path: Path, tokenizer: Tokenizer) -> None:
    small = hf_model(tokenizer.get_vocab_size() - 10)
    directory = write_hf_dir(tmp_path / "small", small, tokenizer)
    with pytest.raises(HFImportError, match=f"has {tokenizer.get_vocab_size()} ids .* only {small.config.vocab_size}"):
        load_hf_gpt2(directory)


def test_padded_vocab_is_accepted(tmp_path: Path, tokenizer: Tokenizer) -> None:
    padded = hf_model(tokenizer.get_vocab_size() + 20, seed=1)
    model, config, _, _ = load_hf_gpt2(write_hf_dir(tmp_path / "padded", padded, tokenizer))
    assert config.vocab_size == tokenizer.get_vocab_size() + 20
    ids = token_ids(tokenizer, CORPUS[0])
    with torch.no_grad():
        expected = padded(ids).logits
    assert full_logits(model, ids).shape[-1] == config.vocab_size
    assert (full_logits(model, ids) - expected).abs().max().item() < TOLERANCE_HF


def test_missing_and_misshapen_weights_are_named(make_dir) -> None:
    directory = make_dir()
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    without = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    save_file(without, str(directory / "model.safetensors"))
    with pytest.raises(HFImportError, match=r"lack keys: transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_hf_gpt2(directory)
    misshapen = {**tensors, "transformer.wpe.weight": torch.zeros(32, 32)}
    save_file(misshapen, str(directory / "model.safetensors"))
    with pytest.raises(HFImportError, match=r"transformer\.wpe\.weight .* shape \[32, 32\], expected \[64, 32\]"):
        load_hf_gpt2(directory)


def test_untied_head_is_refused(make_dir) -> None:
    directory = make_dir()
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(HFImportError, match="untied"):
        load_hf_gpt2(directory)


class NotATensor:
    pass


def test_pickle_payload_in_bin_is_refused(make_dir) -> None:
    directory = make_dir()
    (directory / "model.safetensors").unlink()
    torch.save({"payload": NotATensor()}, directory / "pytorch_model.bin")
    with pytest.raises(HFImportError, match="refused"):
        load_hf_gpt2(directory)


def test_is_hf_gpt2_dir(hf_dir: Path, tmp_path: Path) -> None:
    assert is_hf_gpt2_dir(hf_dir)
    assert not is_hf_gpt2_dir(hf_dir / "config.json")
    assert not is_hf_gpt2_dir(tmp_path / "absent")
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    (broken / "config.json").write_text("{not json")
    assert not is_hf_gpt2_dir(broken)


# --------------------------------------------------------------------------------------------------- the module


def test_tied_weights_share_storage(ours: GPT2, reference) -> None:
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()
    fresh = GPT2(ours.config)
    fresh.load_state_dict(ours.state_dict())
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert ours.num_parameters() == reference.num_parameters()


def test_config_round_trip_ignores_unknown_keys() -> None:
    config = GPT2Config(vocab_size=70, context_length=32, n_layer=3, n_head=4, n_embd=64, dropout=0.1, bias=False)
    assert GPT2Config.from_dict({**config.to_dict(), "future_option": 1}) == config
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=30, n_head=4)


def test_init_and_optimizer_groups() -> None:
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=70, context_length=32, n_layer=4, n_head=4, n_embd=64))
    residual_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert math.isclose(residual_std, 0.02 / math.sqrt(8), rel_tol=0.05)
    assert math.isclose(model.transformer.h[0].mlp.c_fc.weight.std().item(), 0.02, rel_tol=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0.0
    optimizer = gpt2_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    grouped = decay["params"] + no_decay["params"]
    assert len({id(p) for p in grouped}) == len(grouped) == len(list(model.parameters()))
    assert sum(p.numel() for p in grouped) == model.num_parameters()
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_dropout_only_in_training_and_gradients_flow() -> None:
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=40, context_length=16, n_layer=2, n_head=2, n_embd=16, dropout=0.2, bias=False))
    ids = torch.randint(0, 40, (2, 8))
    model.train()
    first, second = model(ids)[0], model(ids)[0]
    assert not torch.allclose(first, second)
    loss = torch.nn.functional.cross_entropy(first.flatten(0, 1), ids.roll(-1, dims=1).flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids)[0], model(ids)[0])


def test_traces_to_onnx_with_dynamic_past(tmp_path: Path) -> None:
    """The export helper's contract in miniature: trace from (batch, seq, past) = (2, 3, 4), run at other sizes."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=50, context_length=32, n_layer=2, n_head=2, n_embd=16)).eval()

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *flat):
            past = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
            logits, present = self.model(input_ids, past, position_ids=position_ids, attention_mask=attention_mask)
            return (logits, *[t for pair in present for t in pair])

    names = [f"past.{i}" for i in range(4)]
    outs = [f"present.{i}" for i in range(4)]
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "t"}, "position_ids": {0: "b", 1: "s"},
            "logits": {0: "b", 1: "s"}, **{n: {0: "b", 2: "p"} for n in names}, **{n: {0: "b", 2: "t"} for n in outs}}
    example = (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 7, dtype=torch.long),
               torch.arange(4, 7).repeat(2, 1), *[torch.randn(2, 2, 4, 8) for _ in names])
    path = tmp_path / "gpt2.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Flat(), example, str(path), input_names=["input_ids", "attention_mask", "position_ids",
                          *names], output_names=["logits", *outs], dynamic_axes=axes, opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for batch, seq, past_len in ((1, 5, 0), (1, 1, 5), (2, 3, 4), (2, 5, 0)):
        ids = torch.randint(0, 50, (batch, seq), generator=generator)
        mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        if batch == 2:
            mask[1, :2] = 0  # left padding in the second row; at past 0 its first queries see only padding
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, past_len:]
        past = [torch.randn(batch, 2, past_len, 8, generator=generator) for _ in names]
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(),
                 **{n: t.numpy() for n, t in zip(names, past, strict=True)}}
        onnx_logits, *onnx_present = session.run(None, feeds)
        assert np.isfinite(onnx_logits).all()  # fully masked (padding) rows must not turn into NaN
        with torch.no_grad():
            torch_logits, *torch_present = Flat()(ids, mask, positions, *past)
        assert np.abs(onnx_logits - torch_logits.numpy()).max() < 1e-4
        assert onnx_present[0].shape == (batch, 2, past_len + seq, 8)
        assert np.abs(onnx_present[-1] - torch_present[-1].numpy()).max() < 1e-5
