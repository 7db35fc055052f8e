"""The word tokenizer on the three word-level tutorial corpora (issue 16): every line round-trips exactly, tokens
are words and punctuation (never whitespace), and about one token per word. Reads ../shared/data beside the
repository; skipped where it is missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.corpus import CorpusFilters, load_corpus
from train.presets import ANIME_PLACEHOLDERS
from train.tokenizer import SPACE_MARK, build_tokenizer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CORPORA = {
    "shakespeare": ("tinyshakespeare.txt", "text", None, None),
    "jokes": ("reddit-cleanjokes.csv", "csv", "Joke", None),
    "anime": ("anime/anime_with_synopsis.csv", "csv", "sypnopsis",
              CorpusFilters(drop_patterns=[ANIME_PLACEHOLDERS], strip_source_lines=True, min_words=5)),
}


@pytest.fixture(scope="module", params=sorted(CORPORA))
def corpus(request) -> tuple[str, list[str]]:
    name, fmt, column, filters = CORPORA[request.param]
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    return request.param, load_corpus(path, fmt, column, filters).documents


def test_every_line_round_trips_exactly(corpus) -> None:
    name, documents = corpus
    tok = build_tokenizer("word", documents)
    lines = [line for document in documents for line in document.split("\n")]
    encodings = tok.encode_batch(lines, add_special_tokens=False)
    decoded = [tok.decode(enc.ids, skip_special_tokens=True) for enc in encodings]
    mismatched = [line for line, back in zip(lines, decoded, strict=True) if line != back]
    assert not mismatched, f"{name}: {len(mismatched)} of {len(lines)} lines differ, e.g. {mismatched[0]!r}"


def test_tokens_are_words_and_punctuation(corpus) -> None:
    name, documents = corpus
    tok = build_tokenizer("word", documents)
    sample = documents[:300] if len(documents) > 1 else [documents[0][:200_000]]
    encodings = tok.encode_batch(sample, add_special_tokens=False)
    tokens = [token for enc in encodings for token in enc.tokens]
    tokens = [t for t in tokens if t != "<unk>"]  # a cut-off last word
    loose_space = [t for t in tokens if t.strip(SPACE_MARK + " \t") == "" and t != "\n"]
    assert len(loose_space) <= 0.001 * len(tokens), f"{name}: {len(loose_space)} whitespace tokens"
    assert all(re.fullmatch(rf"{SPACE_MARK}?(\w+(['’-]\w+)*|[^\w\s])|\n", t) for t in tokens if t not in loose_space)
    words = sum(len(doc.split()) for doc in sample)
    assert 1.0 <= len(tokens) / words < 1.6, f"{name}: {len(tokens) / words:.2f} tokens per word"


def test_capped_vocabulary_keeps_unknown_words_visible(corpus) -> None:
    name, documents = corpus
    tok = build_tokenizer("word", documents, vocab_size=2000)
    text = documents[-1][:2000]
    decoded = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=True)
    unknown = tok.encode(text, add_special_tokens=False).ids.count(tok.token_to_id("<unk>"))
    assert decoded.count("<unk>") == unknown
    assert len(decoded.split()) == len(text.split()) or unknown  # words are replaced, never silently dropped
