"""Tokenizers for training, all built with the Hugging Face ``tokenizers`` library.

The resulting ``tokenizers.Tokenizer`` is stored in checkpoints and model files as JSON (``Tokenizer.to_str()``),
so the runtime decodes with exactly the tokenizer the model was trained with. Kinds:

- ``char``: one token per character (WordLevel + a Split pre-tokenizer on ``[\\s\\S]`` + Fuse decoder).
- ``word``: words and punctuation marks are tokens; the space before a word or mark is not a token of its own
  but a word-boundary marker ``▁`` on it (Metaspace style: ``"the cat."`` -> ``▁the`` ``▁cat`` ``.``; a word
  that opens a line or a text gets the marker too), so a model cannot emit loose whitespace and decoding gives
  back the exact text (see WORD_PATTERN and LINE_START). Line breaks are
  tokens; apostrophes and hyphens inside a word stay in it (``don't``, ``well-known``). Unknown words decode as a
  visible `` <unk>``. ``min_frequency`` and ``lowercase`` (a Lowercase normalizer inside the tokenizer, so
  prompts are lowercased at generation time too) shape the vocabulary.
- ``bpe``: byte-level BPE (GPT-2 style) trained on the corpus; any UTF-8 text round-trips, there is no unknown.
- a path to a ``tokenizer.json``: used as is, with ``<|endoftext|>`` added as a special token if it lacks one.

Every tokenizer has the special token ``<|endoftext|>`` (EOS, the document separator); char and word also have
``<unk>``. Both are registered as special tokens, so the literal text ``<|endoftext|>`` encodes to the EOS id and
``decode(..., skip_special_tokens=True)`` drops them.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from runtime.errors import first_line

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
KINDS = ("char", "word", "bpe")
DEFAULT_BPE_VOCAB = 4096

CHAR_PATTERN = r"[\s\S]"  # any one character, newline included (Oniguruma rejects "(?s).")
# Files written before the word-boundary marker: whitespace runs were tokens of their own. Still recognised.
LEGACY_WORD_PATTERN = r"\w+|[^\w\s]|\n|[^\S\n]+"
# The word tokenizer. The normalizer first turns every space into the marker SPACE_MARK; then each piece is a word
# (inner apostrophes/hyphens kept) or one punctuation mark, each with the marker of the space before it, a newline,
# a marker with no word after it (a second space), or a run of other whitespace (tabs). Every character falls in
# exactly one piece and the decoder turns the marker back into a space, so decode(encode(text)) == text for any
# text whose pieces are all in the vocabulary (and that holds no literal SPACE_MARK).
SPACE_MARK = "\u2581"  # "▁", SentencePiece's and Metaspace's marker
# The normalizer also puts a marker at the start of every non-empty line (Oniguruma's ^ matches after each
# newline), so "ROMEO" opening a line is the same token "▁ROMEO" as in mid-line; with AFTER_OPENER the only
# words without a marker are those glued to a mark that is not an opener ("—such", "end.Next"). The decoder
# removes the inserted markers (at the text start, after each newline and opener): decode(encode(text)) == text
# still holds exactly, and a
# decoded piece that starts mid-text starts without its space (as SentencePiece tokenizers do), which the
# runtime's incremental decoding (runtime.textstream.TextStream, decoding with context) already accounts for.
LINE_START = r"^(?=[^\n])"
# Likewise after an opening bracket, or a quote that opens (at a line start or after a space or an opener): the
# normalizer inserts a marker there unless a line break follows, the decoder removes one, so '("Quote")' is
# ▁( ▁" ▁Quote " ) and every word after an opener has its usual marked form. Closing quotes get nothing.
AFTER_OPENER = r"""(?<=[(\[{“‘«]|^["']|[▁(\[{“‘«]["'])"""
TEXT_START_MARK = r"\A" + SPACE_MARK
WORD_PATTERN = r"▁?\w+(?:['’\-]\w+)*|▁?[^\w\s▁]|▁|\n|[^\S\n]+"


class TokenizerError(Exception):
    """A tokenizer cannot be built or loaded; the message is one line meant for the user."""


@dataclass(frozen=True)
class VocabularyOptions:
    """How a char or word vocabulary is chosen from the corpus (recorded in checkpoints and model files)."""

    vocab_size: int | None = None  # cap, specials included; None keeps every token that passes min_frequency
    min_frequency: int = 1  # tokens seen fewer times in the training text become <unk>
    lowercase: bool = False  # a Lowercase normalizer: applied to the corpus and to every prompt

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def build_tokenizer(kind: str | os.PathLike[str], texts: list[str], vocab_size: int | None = None,
                    min_frequency: int = 1, lowercase: bool = False) -> Tokenizer:
    """Build a tokenizer of ``kind`` ("char", "word", "bpe") from ``texts``, or load one from a tokenizer.json path.

    ``vocab_size`` counts every token, specials included. For char and word it caps the vocabulary to the most
    frequent tokens (the rest become ``<unk>``); None keeps all of them. For bpe it is the BPE vocabulary size
    (default 4096). ``min_frequency`` and ``lowercase`` apply to char and word only. Loading a file takes none
    of them (the file says how it tokenizes)."""
    options = VocabularyOptions(vocab_size, min_frequency, lowercase)
    if kind not in KINDS:
        if min_frequency != 1 or lowercase:
            raise TokenizerError(f"--min-frequency and --lowercase build a char or word vocabulary; {kind} is a "
                                 "tokenizer.json used as is (drop those flags or use --tokenizer word)")
        return _load_tokenizer(str(kind))
    if not any(texts):
        raise TokenizerError(f"no text to build a {kind} tokenizer from")
    if vocab_size is not None and vocab_size < _min_vocab(kind):
        raise TokenizerError(f"{kind} vocabulary size must be at least {_min_vocab(kind)}, got {vocab_size}")
    if min_frequency < 1:
        raise TokenizerError(f"--min-frequency must be at least 1, got {min_frequency}")
    if kind == "bpe":
        if min_frequency != 1 or lowercase:
            raise TokenizerError("--min-frequency and --lowercase apply to char and word tokenizers, not bpe")
        return _build_bpe(texts, vocab_size)
    return _build_char(texts, options) if kind == "char" else _build_word(texts, options)


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
        return {CHAR_PATTERN: "char", WORD_PATTERN: "word", LEGACY_WORD_PATTERN: "word"}.get(pattern, "custom")
    if model_type == "BPE" and pre.get("type") == "ByteLevel":
        return "bpe"
    return "custom"


# --- builders ------------------------------------------------------------------------------------------------


def _min_vocab(kind: str) -> int:
    # bpe: the 256 byte symbols plus EOS; char/word: the two specials plus at least one real token.
    return 257 if kind == "bpe" else 3


def _build_char(texts: list[str], options: VocabularyOptions) -> Tokenizer:
    """Characters sorted by code point get ids 0..n-1, then EOS = n and UNK = n + 1.

    Specials go at the END so character ids are dense and match the usual char-level convention (tiny
    Shakespeare's 65 characters get the same ids as nanoGPT's ``sorted(set(text))``)."""
    counts: Counter[str] = Counter()
    for text in texts:
        text = text.replace(EOS_TOKEN, "")  # a literal EOS in the text is the special token, not chars
        counts.update(text.lower() if options.lowercase else text)
    chars = _kept_by_frequency(counts, options, "character")
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    vocab[EOS_TOKEN] = len(vocab)
    vocab[UNK_TOKEN] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    if options.lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    _register_specials(tok, [EOS_TOKEN, UNK_TOKEN])
    return tok


def _build_word(texts: list[str], options: VocabularyOptions) -> Tokenizer:
    """WordLevel over WORD_PATTERN pieces: id 0 is EOS, 1 is UNK, then pieces by falling frequency (ties by text).

    ``<unk>`` is a plain vocabulary entry, not a special token, so ``decode(..., skip_special_tokens=True)`` keeps
    it: an unknown word shows as `` <unk>`` (the decoder gives it the space its lost marker stood for)."""
    tok = Tokenizer(models.WordLevel({EOS_TOKEN: 0, UNK_TOKEN: 1}, unk_token=UNK_TOKEN))
    steps = [normalizers.Lowercase()] if options.lowercase else []
    tok.normalizer = normalizers.Sequence([
        *steps,
        normalizers.Replace(" ", SPACE_MARK),
        normalizers.Replace(Regex(LINE_START), SPACE_MARK),  # a line's first word takes its mid-line form
        normalizers.Replace(Regex(AFTER_OPENER + r"(?=[^\n])"), SPACE_MARK),  # so does a word after "(" or a quote
    ])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")
    tok.decoder = decoders.Sequence([
        decoders.Replace(UNK_TOKEN, SPACE_MARK + UNK_TOKEN),  # before Fuse: only the unknown token itself
        decoders.Fuse(),  # one string from here on, so the next steps see across token boundaries
        decoders.Replace(Regex(AFTER_OPENER + SPACE_MARK), ""),  # the normalizer's steps undone in reverse order
        decoders.Replace(Regex(TEXT_START_MARK), ""),
        decoders.Replace("\n" + SPACE_MARK, "\n"),
        decoders.Replace(SPACE_MARK, " "),
    ])
    _register_specials(tok, [EOS_TOKEN])  # a literal EOS in the text is the separator, never split into pieces
    counts = _word_counts(tok, texts)
    if not any(_HAS_WORD.search(piece) for piece in counts):
        raise TokenizerError("the corpus has no words (only punctuation and whitespace): a word tokenizer needs "
                             "words; use --tokenizer char")
    pieces = _kept_by_frequency(counts, options, "word")
    vocab = {EOS_TOKEN: 0, UNK_TOKEN: 1}
    vocab.update({piece: index for index, piece in enumerate(pieces, start=2)})
    tok.model = models.WordLevel(vocab, unk_token=UNK_TOKEN)
    return tok


_HAS_WORD = re.compile(r"\w")


def _word_counts(tok: Tokenizer, texts: list[str]) -> Counter[str]:
    """How often each WORD_PATTERN piece occurs in ``texts`` (after normalization; literal EOS markers skipped)."""
    counts: Counter[str] = Counter()
    for text in texts:
        for part in text.split(EOS_TOKEN):
            if part:
                normalized = tok.normalizer.normalize_str(part)
                counts.update(piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def _kept_by_frequency(counts: Counter[str], options: VocabularyOptions, unit: str) -> list[str]:
    """Tokens seen at least ``min_frequency`` times, most frequent first (ties by text), capped at vocab_size - 2
    (the two specials). Raises TokenizerError when the threshold leaves nothing."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = [token for token, count in ranked if count >= options.min_frequency]
    if not kept:
        top, top_count = ranked[0] if ranked else ("", 0)
        top = top.replace(SPACE_MARK, " ").strip() or top
        raise TokenizerError(f"--min-frequency {options.min_frequency} is larger than every {unit}'s count (the most "
                             f"frequent, {top!r}, occurs {top_count} times)")
    if options.vocab_size is not None:
        kept = kept[: options.vocab_size - 2]
    return kept


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
