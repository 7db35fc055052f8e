"""train/tokenizer.py: char/word/bpe tokenizers, special tokens, document encoding, tokenizer.json loading."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from train.tokenizer import (
    EOS_TOKEN,
    UNK_TOKEN,
    TokenizerError,
    build_tokenizer,
    encode_documents,
    special_token_ids,
    tokenizer_kind,
)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
MIXED = "Hello,  world!\n\n\tTabs\tand   spaces — café, naïve.\r\nEnd  \n"
CYRILLIC = "Привет, мир! Ёжик — в тумане.\n"


def round_trip(tok: Tokenizer, text: str) -> str:
    return tok.decode(tok.encode(text).ids, skip_special_tokens=True)


# --- char ----------------------------------------------------------------------------------------------------


def test_char_vocab_is_sorted_characters_then_specials():
    tok = build_tokenizer("char", ["banana\n", "cab"])
    vocab = tok.get_vocab()
    assert vocab == {"\n": 0, "a": 1, "b": 2, "c": 3, "n": 4, EOS_TOKEN: 5, UNK_TOKEN: 6}
    assert special_token_ids(tok) == {"eos": 5, "unk": 6, "bos": None}


def test_char_round_trips_whitespace_and_non_ascii():
    tok = build_tokenizer("char", [MIXED, CYRILLIC])
    for text in (MIXED, CYRILLIC, "  \n\n\t\t", "é—é"):
        assert round_trip(tok, text) == text
    assert len(tok.encode(MIXED).ids) == len(MIXED)


def test_char_unseen_characters_become_unk_without_crashing():
    tok = build_tokenizer("char", ["abc"])
    ids = tok.encode("aXb😀c").ids
    unk = special_token_ids(tok)["unk"]
    assert ids == [0, unk, 1, unk, 2]
    assert round_trip(tok, "aXb😀c") == "abc"


def test_char_eos_literal_is_one_special_token():
    tok = build_tokenizer("char", ["hello <|endoftext|> world"])
    eos = special_token_ids(tok)["eos"]
    assert "|" not in tok.get_vocab()  # the literal marker in training text is not learned as characters
    ids = tok.encode("he<|endoftext|>lo").ids
    assert ids.count(eos) == 1 and len(ids) == 5
    assert tok.decode(ids, skip_special_tokens=True) == "helo"
    assert tok.decode(ids, skip_special_tokens=False) == "he<|endoftext|>lo"


def test_char_vocab_size_keeps_most_frequent_characters():
    tok = build_tokenizer("char", ["aaaa bbb cc d"], vocab_size=5)
    assert tok.get_vocab_size() == 5
    assert set(tok.get_vocab()) == {"a", "b", " ", EOS_TOKEN, UNK_TOKEN}
    assert tok.encode("d").ids == [special_token_ids(tok)["unk"]]


def test_char_ids_match_nanogpt_on_tinyshakespeare():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = build_tokenizer("char", [text])
    chars = sorted(set(text))
    assert tok.get_vocab_size() == 67
    assert tok.encode(text[:1000]).ids == [chars.index(ch) for ch in text[:1000]]
    assert special_token_ids(tok) == {"eos": 65, "unk": 66, "bos": None}


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_char_round_trip_property(text):
    text = text.replace(EOS_TOKEN, "")
    tok = build_tokenizer("char", [text]) if text else None
    if tok is not None:
        assert round_trip(tok, text) == text


# --- word ----------------------------------------------------------------------------------------------------


def test_word_round_trips_exactly_and_splits_punctuation():
    tok = build_tokenizer("word", [MIXED, CYRILLIC])
    for text in (MIXED, CYRILLIC):
        assert round_trip(tok, text) == text
    # Issue 16: the space before a word or mark is a marker on it, not a token; a second space is a lone marker.
    assert tok.encode("Hello,  world!").tokens == ["▁Hello", ",", "▁", "▁world", "!"]
    assert tok.encode("Привет, мир!").tokens == ["▁Привет", ",", "▁мир", "!"]
    assert special_token_ids(tok) == {"eos": 0, "unk": 1, "bos": None}


def test_word_tokens_are_words_and_punctuation_never_whitespace():
    text = "Don't stop, well-known friend!\nO'er the hills (far away).\n"
    tok = build_tokenizer("word", [text, "\n\n  indented\n"])
    tokens = tok.encode(text).tokens
    # A word that opens a line (or the text) has the marker too: the same token as in mid-line.
    assert tokens == ["▁Don't", "▁stop", ",", "▁well-known", "▁friend", "!", "\n", "▁O'er", "▁the", "▁hills", "▁(",
                      "▁far", "▁away", ")", ".", "\n"]
    # After an opening bracket or quote too (a closing quote gets no marker, nor does the word after it).
    quoted = build_tokenizer("word", ['"Hi," he said (to "me"). \'Tis'])
    assert quoted.encode('"Hi," he said (to "me"). \'Tis').tokens == [
        '▁"', "▁Hi", ",", '"', "▁he", "▁said", "▁(", "▁to", '▁"', "▁me", '"', ")", ".", "▁'", "▁Tis"]
    assert round_trip(quoted, '"Hi," he said (to "me"). \'Tis') == '"Hi," he said (to "me"). \'Tis'
    assert not any(token.strip("▁ ") == "" and token != "\n" for token in tokens)
    assert round_trip(tok, text) == text
    assert round_trip(tok, "\n\n  indented\n") == "\n\n  indented\n"
    # Decoded after what precedes it, a token brings the space it stands for (what the REPL's stream does).
    context = tok.encode("Don't").ids
    for token, piece in (("▁stop", " stop"), (",", ","), ("\n", "\n")):
        ids = context + [tok.token_to_id(token)]
        assert tok.decode(ids)[len(tok.decode(context)):] == piece
    assert tok.decode(tok.encode("away\n(far)").ids) == "away\n(far)"  # no space after a line break or "("


def test_word_vocab_size_keeps_most_frequent_and_rest_is_visible_unk():
    text = "the cat the dog the cat a bird"
    tok = build_tokenizer("word", [text], vocab_size=5)  # 2 specials + "▁the", "▁cat", then "▁a" (ties by text)
    assert tok.get_vocab_size() == 5
    assert {"▁the", "▁cat", "▁a"} <= set(tok.get_vocab())
    unk = special_token_ids(tok)["unk"]
    assert tok.encode("the bird").ids == [tok.token_to_id("▁the"), unk]
    assert round_trip(tok, "the bird") == "the <unk>"  # an unknown word is a visible placeholder, never dropped
    assert round_trip(tok, "bird the") == "<unk> the"  # at the start of a text: no space before it


def test_word_default_keeps_every_token_seen_once():
    tok = build_tokenizer("word", ["rare words appear once"])
    assert {"▁rare", "▁words", "▁appear", "▁once"} == set(tok.get_vocab()) - {EOS_TOKEN, UNK_TOKEN}
    assert tok.get_vocab_size() == 6


def test_word_min_frequency_and_lowercase():
    text = "The cat saw the cat. THE end"
    tok = build_tokenizer("word", [text], min_frequency=2, lowercase=True)
    assert set(tok.get_vocab()) - {EOS_TOKEN, UNK_TOKEN} == {"▁the", "▁cat"}  # 3x and 2x after lowercasing
    # The normalizer lives in the tokenizer, so a prompt is lowercased at generation time exactly like the corpus.
    reloaded = Tokenizer.from_str(tok.to_str())
    assert reloaded.encode("THE CAT").tokens == ["▁the", "▁cat"]
    with pytest.raises(TokenizerError, match=r"--min-frequency 9 is larger than every word's count .*'the'.* 3 times"):
        build_tokenizer("word", [text], min_frequency=9, lowercase=True)


def test_word_corpus_without_words_is_refused():
    with pytest.raises(TokenizerError, match="no words .*only punctuation"):
        build_tokenizer("word", ["... !!! ?? -- ;", ", , ."])


def test_vocabulary_options_need_a_built_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.json"
    build_tokenizer("char", ["abc"]).save(str(path))
    with pytest.raises(TokenizerError, match="tokenizer.json used as is"):
        build_tokenizer(str(path), [], min_frequency=2)
    with pytest.raises(TokenizerError, match="not bpe"):
        build_tokenizer("bpe", ["abc"], lowercase=True)


def test_legacy_word_tokenizer_is_still_recognised():
    legacy = Tokenizer(models.WordLevel({EOS_TOKEN: 0, UNK_TOKEN: 1, "a": 2, " ": 3}, unk_token=UNK_TOKEN))
    legacy.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n|[^\S\n]+"), behavior="isolated")
    assert tokenizer_kind(legacy) == "word"


def test_word_eos_literal_is_one_token():
    tok = build_tokenizer("word", ["one<|endoftext|>two"])
    assert tok.encode("one<|endoftext|>two").tokens == ["▁one", EOS_TOKEN, "▁two"]  # each document opens with ▁
    assert not {"<", "|", "endoftext"} & set(tok.get_vocab())


def test_word_build_is_deterministic():
    text = "b a c d e f g h " * 3
    first = build_tokenizer("word", [text], vocab_size=6)
    second = build_tokenizer("word", [text], vocab_size=6)
    assert first.to_str() == second.to_str()


# --- bpe -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return build_tokenizer("bpe", [MIXED * 20, CYRILLIC * 20], vocab_size=300)


def test_bpe_round_trips_any_utf8(bpe):
    for text in (MIXED, CYRILLIC, "never seen: 漢字 😀 ü\u0301 \x00\x7f", " leading space", "\n\n\t"):
        assert round_trip(bpe, text) == text
    assert special_token_ids(bpe) == {"eos": 0, "unk": None, "bos": None}
    assert bpe.get_vocab_size() <= 300


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_bpe_round_trip_property(bpe, text):
    text = text.replace(EOS_TOKEN, "")
    assert round_trip(bpe, text) == text


def test_bpe_learns_merges_and_eos_literal(bpe):
    assert len(bpe.encode(CYRILLIC).ids) < len(CYRILLIC.encode("utf-8"))
    assert bpe.encode("мир<|endoftext|>мир").ids.count(0) == 1


def test_bpe_vocab_size_default_and_minimum():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    started = time.perf_counter()
    tok = build_tokenizer("bpe", [text])
    elapsed = time.perf_counter() - started
    assert tok.get_vocab_size() == 4096
    assert elapsed < 20, f"bpe training took {elapsed:.1f}s"  # ~1.5 s measured on 2 shared cores
    with pytest.raises(TokenizerError, match="at least 257"):
        build_tokenizer("bpe", ["abc"], vocab_size=100)


# --- shared behaviour ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_encode_documents_puts_eos_after_each_document(kind):
    docs = ["ab cd", "ef", "", "gh ab"]
    tok = build_tokenizer(kind, docs, vocab_size=300 if kind == "bpe" else None)
    eos = special_token_ids(tok)["eos"]
    ids = encode_documents(tok, docs)
    assert ids.dtype == np.int32 and ids.ndim == 1
    expected: list[int] = []
    for doc in docs:
        expected += tok.encode(doc, add_special_tokens=False).ids + [eos]
    assert ids.tolist() == expected
    assert ids[-1] == eos and int((ids == eos).sum()) == len(docs)
    assert encode_documents(tok, []).tolist() == []


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_kind_and_json_string_round_trip(kind):
    tok = build_tokenizer(kind, [MIXED], vocab_size=300 if kind == "bpe" else None)
    assert tokenizer_kind(tok) == kind
    restored = Tokenizer.from_str(tok.to_str())  # how checkpoints and model files carry the tokenizer
    assert tokenizer_kind(restored) == kind
    assert restored.encode(MIXED + EOS_TOKEN).ids == tok.encode(MIXED + EOS_TOKEN).ids
    assert round_trip(restored, MIXED) == MIXED
    assert special_token_ids(restored) == special_token_ids(tok)


def test_empty_texts_and_unknown_kind():
    with pytest.raises(TokenizerError, match="no text"):
        build_tokenizer("char", [])
    with pytest.raises(TokenizerError, match="no text"):
        build_tokenizer("word", ["", ""])
    with pytest.raises(TokenizerError, match=r"unknown tokenizer 'chars'.*char, word, bpe"):
        build_tokenizer("chars", ["abc"])
    with pytest.raises(TokenizerError, match="at least 3"):
        build_tokenizer("word", ["abc"], vocab_size=2)


# --- tokenizer.json paths ------------------------------------------------------------------------------------


def test_load_saved_tokenizer(tmp_path):
    tok = build_tokenizer("word", [MIXED])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = build_tokenizer(str(path), [])
    assert loaded.to_str() == tok.to_str()
    assert build_tokenizer(path, ["ignored"], vocab_size=5).get_vocab_size() == tok.get_vocab_size()


def test_load_tokenizer_without_eos_adds_it(tmp_path):
    foreign = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    foreign.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "foreign.json"
    foreign.save(str(path))
    tok = build_tokenizer(str(path), [])
    ids = special_token_ids(tok)
    assert ids == {"eos": 3, "unk": 0, "bos": None}
    assert tok.encode("hello<|endoftext|>world").ids == [1, 3, 2]
    assert tokenizer_kind(tok) == "custom"


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not a valid tokenizer.json"), (json.dumps({"version": "1.0"}), "not a valid tokenizer.json")],
)
def test_invalid_tokenizer_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=message) as error:
        build_tokenizer(str(path), [])
    assert "\n" not in str(error.value)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        build_tokenizer(str(tmp_path / "nope" / "tokenizer.json"), [])


def test_special_token_ids_requires_eos():
    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(TokenizerError, match=re.escape("no <|endoftext|> token")):
        special_token_ids(bare)
