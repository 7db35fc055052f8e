"""Tokenizers for training, all built with the Hugging Face ``tokenizers`` library.

The resulting ``tokenizers.Tokenizer`` is stored in checkpoints and model files as JSON (``Tokenizer.to_str()``),
so the runtime decodes with exactly the tokenizer the model was trained with. Kinds:

- ``char``: one token per character (WordLevel + a Split pre-tokenizer on ``[\\s\\S]`` + Fuse decoder).
- ``word``: words, single punctuation marks, newlines and runs of other whitespace are tokens, so decoding
  gives back the exact text (WordLevel + Split + Fuse decoder).
- ``bpe``: byte-level BPE (GPT-2 style) trained on the corpus; any UTF-8 text round-trips, there is no unknown.
- a path to a ``tokenizer.json``: used as is, with ``<|endoftext|>`` added as a special token if it lacks one.

Every tokenizer has the special token ``<|endoftext|>`` (EOS, the document separator); char and word also have
``<unk>``. Both are registered as special tokens, so the literal text ``<|endoftext|>`` encodes to the EOS id and
``decode(..., skip_special_tokens=True)`` drops them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from runtime.errors import first_line

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
KINDS = ("char", "word", "bpe")
DEFAULT_BPE_VOCAB = 4096

CHAR_PATTERN = r"[\s\S]"  # any one character, newline included (Oniguruma rejects "(?s).")
# A word, one punctuation mark, one newline, or a run of other whitespace: every character falls in exactly
# one piece, so the Fuse decoder restores the text. Newlines are single tokens to keep the vocabulary small.
WORD_PATTERN = r"\w+|[^\w\s]|\n|[^\S\n]+"


class TokenizerError(Exception):
    """A tokenizer cannot be built or loaded; the message is one line meant for the user."""


def build_tokenizer(kind: str | os.PathLike[str], texts: list[str], vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer of ``kind`` ("char", "word", "bpe") from ``texts``, or load one from a tokenizer.json path.

    ``vocab_size`` counts every token, specials included. For char and word it caps the vocabulary to the most
    frequent tokens (the rest become ``<unk>``); None keeps all of them. For bpe it is the BPE vocabulary size
    (default 4096). It is ignored when loading a file."""
    if kind in KINDS:
        if not any(texts):
            raise TokenizerError(f"no text to build a {kind} tokenizer from")
        if vocab_size is not None and vocab_size < _min_vocab(kind):
            raise TokenizerError(f"{kind} vocabulary size must be at least {_min_vocab(kind)}, got {vocab_size}")
        builders = {"char": _build_char, "word": _build_word, "bpe": _build_bpe}
        return builders[kind](texts, vocab_size)
    return _load_tokenizer(str(kind))


def special_token_ids(tok: Tokenizer) -> dict[str, int | None]:
    """{"eos": id of <|endoftext|>, "unk": id of the unknown token or None, "bos": None} (the metadata layout)."""
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        raise TokenizerError(f"tokenizer has no {EOS_TOKEN} token")
    unk_token = getattr(tok.model, "unk_token", None) or UNK_TOKEN
    return {"eos": eos, "unk": tok.token_to_id(unk_token), "bos": None}


def encode_documents(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one int32 id array, each followed by the EOS id (so EOS separates and ends them)."""
    eos = special_token_ids(tok)["eos"]
    encodings = tok.encode_batch(docs, add_special_tokens=False)
    ids = np.empty(sum(len(enc.ids) + 1 for enc in encodings), dtype=np.int32)
    position = 0
    for enc in encodings:
        ids[position : position + len(enc.ids)] = enc.ids
        position += len(enc.ids)
        ids[position] = eos
        position += 1
    return ids


def tokenizer_kind(tok: Tokenizer) -> str:
    """Best effort: "char", "word" or "bpe" for tokenizers built here (or built the same way), else "custom"."""
    spec = json.loads(tok.to_str())
    model_type = (spec.get("model") or {}).get("type")
    pre = spec.get("pre_tokenizer") or {}
    if model_type == "WordLevel" and pre.get("type") == "Split":
        pattern = (pre.get("pattern") or {}).get("Regex")
        return {CHAR_PATTERN: "char", WORD_PATTERN: "word"}.get(pattern, "custom")
    if model_type == "BPE" and pre.get("type") == "ByteLevel":
        return "bpe"
    return "custom"


# --- builders ------------------------------------------------------------------------------------------------


def _min_vocab(kind: str) -> int:
    # bpe: the 256 byte symbols plus EOS; char/word: the two specials plus at least one real token.
    return 257 if kind == "bpe" else 3


def _build_char(texts: list[str], vocab_size: int | None) -> Tokenizer:
    """Characters sorted by code point get ids 0..n-1, then EOS = n and UNK = n + 1.

    Specials go at the END so character ids are dense and match the usual char-level convention (tiny
    Shakespeare's 65 characters get the same ids as nanoGPT's ``sorted(set(text))``)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.replace(EOS_TOKEN, ""))  # a literal EOS in the text is the special token, not chars
    chars = list(counts)
    if vocab_size is not None and len(chars) > vocab_size - 2:
        chars = [ch for ch, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: vocab_size - 2]]
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    vocab[EOS_TOKEN] = len(vocab)
    vocab[UNK_TOKEN] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    _register_specials(tok, [EOS_TOKEN, UNK_TOKEN])
    return tok


def _build_word(texts: list[str], vocab_size: int | None) -> Tokenizer:
    """WordLevel trained by the library: ids 0 and 1 are EOS and UNK, then tokens by falling frequency."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    _register_specials(tok, [EOS_TOKEN, UNK_TOKEN])  # before training, so a literal EOS is not split into words
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size or 2**31 - 1, min_frequency=1, special_tokens=[EOS_TOKEN, UNK_TOKEN], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _build_bpe(texts: list[str], vocab_size: int | None) -> Tokenizer:
    """Byte-level BPE: EOS is id 0, the 256 byte symbols follow, then the learned merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _register_specials(tok, [EOS_TOKEN])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size or DEFAULT_BPE_VOCAB,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _load_tokenizer(path_text: str) -> Tokenizer:
    path = Path(path_text)
    looks_like_path = path.suffix == ".json" or "/" in path_text or "\\" in path_text
    if looks_like_path and not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    if not path.is_file():
        raise TokenizerError(
            f"unknown tokenizer {path_text!r}: use {', '.join(KINDS)} or the path of an existing tokenizer.json"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exception for unreadable or malformed JSON
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {first_line(exc)}") from None
    if tok.token_to_id(EOS_TOKEN) is None:
        _register_specials(tok, [EOS_TOKEN])
    return tok


def _register_specials(tok: Tokenizer, tokens: list[str]) -> None:
    tok.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in tokens])
