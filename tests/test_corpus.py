"""runtime/corpus.py: every format, every filter, every bad input, and the train/validation split."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.corpus import (
    FORMATS,
    Corpus,
    CorpusError,
    CorpusFilters,
    DataReport,
    load_corpus,
    split_train_val,
    strip_credits,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def real_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


# --- text ----------------------------------------------------------------------------------------------------


def test_text_is_one_stream_with_crlf_normalised_and_bom_dropped(tmp_path):
    path = write(tmp_path / "t.txt", b"\xef\xbb\xbfFirst line\r\n\tsecond  line\r\n\r\nthird\n")
    corpus = load_corpus(path)
    assert corpus.single_stream is True
    assert corpus.documents == ["First line\n\tsecond  line\n\nthird\n"]
    assert corpus.report.format == "text"
    assert corpus.report.characters == len(corpus.documents[0])


def test_text_split_is_by_characters_last_fraction_is_validation(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    corpus = load_corpus(write(tmp_path / "t.txt", text), fmt="text")
    train, val = split_train_val(corpus, 0.1)
    assert train == [text[:900]] and val == [text[900:]]
    train, val = split_train_val(corpus, 0.25)
    assert len(val[0]) == 250 and train[0] + val[0] == text


def test_tinyshakespeare_split_matches_nanogpt():
    corpus = load_corpus(real_file("tinyshakespeare.txt"))
    train, val = split_train_val(corpus, 0.1)
    assert len(train[0]) + len(val[0]) == 1_115_394
    assert len(val[0]) == 111_540


def test_text_too_small_to_split(tmp_path):
    assert split_train_val(load_corpus(write(tmp_path / "t.txt", "abc")), 0.1) == (["ab"], ["c"])
    corpus = load_corpus(write(tmp_path / "t.txt", "x"))
    with pytest.raises(CorpusError, match="too small"):
        split_train_val(corpus, 0.1)


# --- csv / tsv -----------------------------------------------------------------------------------------------


def test_csv_single_column_needs_no_column_name(tmp_path):
    path = write(tmp_path / "one.csv", "text\nfirst joke\nsecond joke\n")
    corpus = load_corpus(path)
    assert corpus.documents == ["first joke", "second joke"]
    assert corpus.single_stream is False


def test_csv_quoted_multiline_fields_crlf_and_empty_cells(tmp_path):
    content = 'ID,Joke\r\n1,"Line one\r\nline two, with comma"\r\n2,""\r\n3,"He said ""hi"""\r\n4,   \r\n'
    corpus = load_corpus(write(tmp_path / "j.csv", content), column="Joke")
    assert corpus.documents == ["Line one\nline two, with comma", 'He said "hi"']
    assert corpus.report.documents_read == 4
    assert corpus.report.dropped["empty"] == 2
    assert corpus.report.documents_kept == 2


def test_csv_with_several_columns_requires_column_and_lists_them(tmp_path):
    path = write(tmp_path / "a.csv", "MAL_ID,Name,sypnopsis\n1,X,Some story\n")
    with pytest.raises(CorpusError, match=r"3 columns.*--column.*'MAL_ID', 'Name', 'sypnopsis'") as missing:
        load_corpus(path)
    with pytest.raises(CorpusError, match=r"no column 'synopsis'.*'sypnopsis'") as wrong:
        load_corpus(path, column="synopsis")
    assert "\n" not in str(missing.value) and "\n" not in str(wrong.value)
    assert load_corpus(path, column="sypnopsis").documents == ["Some story"]


def test_csv_header_only_and_short_rows(tmp_path):
    with pytest.raises(CorpusError, match="no data rows"):
        load_corpus(write(tmp_path / "h.csv", "a,b\n"), column="b")
    corpus = load_corpus(write(tmp_path / "s.csv", "a,b\nonly-a\nx,kept\n"), column="b")
    assert corpus.documents == ["kept"]
    assert corpus.report.dropped["empty"] == 1


def test_tsv_uses_tabs(tmp_path):
    path = write(tmp_path / "d.tsv", "id\ttext\n1\tcommas, stay, inside\n2\tsecond\n")
    corpus = load_corpus(path, column="text")
    assert corpus.report.format == "tsv"
    assert corpus.documents == ["commas, stay, inside", "second"]


def test_long_csv_field_beyond_default_limit(tmp_path):
    long_text = "word " * 40_000  # 200,000 characters, above the csv module's default 131,072 limit
    corpus = load_corpus(write(tmp_path / "l.csv", f'text\n"{long_text}"\n'))
    assert corpus.documents == [long_text.strip()]


def test_reddit_jokes_csv():
    corpus = load_corpus(real_file("reddit-cleanjokes.csv"), column="Joke")
    assert len(corpus.documents) == 1622
    assert corpus.documents[0].startswith("What did the bartender say")
    assert not any("\r" in doc for doc in corpus.documents)


def test_anime_placeholders_dropped_by_pattern_and_credits_stripped():
    filters = CorpusFilters(drop_patterns=[r"^No synopsis"], strip_source_lines=True)
    corpus = load_corpus(real_file("anime/anime_with_synopsis.csv"), column="sypnopsis", filters=filters)
    assert corpus.report.dropped["pattern"] == 745
    assert corpus.report.documents_read == 16_214
    assert not any(doc.endswith("(Source: ANN)") for doc in corpus.documents)
    assert not any("No synopsis information has been added" in doc for doc in corpus.documents)


# --- docs ----------------------------------------------------------------------------------------------------


def test_docs_split_on_blank_lines(tmp_path):
    content = "First doc\nstill first\n\n\nSecond doc\n   \n\t\nThird doc\n"
    corpus = load_corpus(write(tmp_path / "d.txt", content), fmt="docs")
    assert corpus.documents == ["First doc\nstill first", "Second doc", "Third doc"]


def test_docs_strip_start_and_end_of_text_markers(tmp_path):
    content = "<|startoftext|>Joke one\nline two\n\n<|startoftext|>Joke two<|endoftext|>Joke three<|endoftext|>"
    corpus = load_corpus(write(tmp_path / "d.txt", content), fmt="docs")
    assert corpus.documents == ["Joke one\nline two", "Joke two", "Joke three"]


def test_docs_lines_wrapped_in_s_markers_are_documents(tmp_path):
    content = "<s> Первый анекдот. </s>\r\n<s> Second, with <b>tags</b> inside </s>\r\n<s> third </s>"
    corpus = load_corpus(write(tmp_path / "a.txt", content), fmt="docs")
    assert corpus.documents == ["Первый анекдот.", "Second, with <b>tags</b> inside", "third"]


def test_docs_blocks_keep_lines_together_even_with_s_markers(tmp_path):
    content = "<s> a </s>\n<s> b </s>\n\n<s> c </s>\n"
    corpus = load_corpus(write(tmp_path / "a.txt", content), fmt="docs")
    assert corpus.documents == ["a\nb", "c"]


def test_anek_derived_file_has_one_joke_per_line():
    corpus = load_corpus(real_file("anek-first800-derived.txt"), fmt="docs")
    assert len(corpus.documents) == 800
    assert not any("<s>" in doc or "</s>" in doc or "\r" in doc or "\n" in doc for doc in corpus.documents)


def test_docs_split_is_by_documents(tmp_path):
    docs = [f"document number {i}" for i in range(25)]
    corpus = load_corpus(write(tmp_path / "d.txt", "\n\n".join(docs)), fmt="docs")
    train, val = split_train_val(corpus, 0.1)
    assert train == docs[:22] and val == docs[22:]  # int(25 * 0.9) = 22 train documents
    train, val = split_train_val(Corpus(docs[:3], False, DataReport("x", "docs")), 0.1)
    assert train == docs[:2] and val == docs[2:3]  # at least one validation document


def test_split_refuses_one_document_and_bad_fraction(tmp_path):
    corpus = Corpus(["only one"], False, DataReport("x", "docs"))
    with pytest.raises(CorpusError, match="at least 2 documents"):
        split_train_val(corpus)
    corpus = Corpus(["a", "b"], False, DataReport("x", "docs"))
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(CorpusError, match="between 0 and 1"):
            split_train_val(corpus, fraction)


# --- dir -----------------------------------------------------------------------------------------------------


def test_dir_reads_every_txt_sorted_recursively(tmp_path):
    root = tmp_path / "books"
    write(root / "b.txt", "bravo\n")
    write(root / "a.txt", "\ufeffalpha\r\nline\r\n")
    write(root / "sub" / "c.txt", "charlie")
    write(root / "notes.md", "ignored")
    write(root / "empty.txt", "")
    corpus = load_corpus(root)
    assert corpus.report.format == "dir"
    assert corpus.documents == ["alpha\nline", "bravo", "charlie"]
    assert corpus.report.dropped["empty"] == 1
    assert corpus.single_stream is False


def test_dir_errors(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CorpusError, match=r"no \*\.txt files"):
        load_corpus(tmp_path / "nothing")
    file_path = write(tmp_path / "f.txt", "text")
    with pytest.raises(CorpusError, match="not a directory"):
        load_corpus(file_path, fmt="dir")
    with pytest.raises(CorpusError, match="is a directory"):
        load_corpus(tmp_path / "nothing", fmt="text")


def test_dir_names_the_bad_file(tmp_path):
    write(tmp_path / "d" / "good.txt", "fine")
    write(tmp_path / "d" / "bad.txt", b"ok\xe9no")
    with pytest.raises(CorpusError, match=r"bad\.txt is not valid UTF-8"):
        load_corpus(tmp_path / "d")


# --- auto and bad input --------------------------------------------------------------------------------------


def test_auto_picks_format_from_path(tmp_path):
    assert load_corpus(write(tmp_path / "x.CSV", "t\na\n")).report.format == "csv"
    assert load_corpus(write(tmp_path / "x.tsv", "t\na\n")).report.format == "tsv"
    assert load_corpus(write(tmp_path / "x.txt", "t\na\n")).report.format == "text"
    assert load_corpus(write(tmp_path / "noext", "t\na\n")).report.format == "text"
    write(tmp_path / "d" / "x.txt", "doc")
    assert load_corpus(tmp_path / "d").report.format == "dir"
    assert set(FORMATS) == {"auto", "text", "csv", "tsv", "docs", "dir"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b" \n\t\r\n", "is empty"),
        (b"\xef\xbb\xbf", "is empty"),
        (b"abc\x00def", "binary file"),
        ("h\u00e9llo".encode("utf-16"), "binary file"),
        (b"caf\xe9 au lait", r"not valid UTF-8 \(byte 0xe9 at offset 3\)"),
        (b"\xef\xbb\xbfab\xff", r"not valid UTF-8 \(byte 0xff at offset 5\)"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    with pytest.raises(CorpusError, match=message) as error:
        load_corpus(write(tmp_path / "bad.txt", content))
    assert "\n" not in str(error.value)
    assert "bad.txt" in str(error.value)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(CorpusError, match="corpus not found"):
        load_corpus(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="unknown corpus format 'json'"):
        load_corpus(write(tmp_path / "a.txt", "x"), fmt="json")


@pytest.mark.parametrize("content", ['text\n"unterminated\nmore rows\n', 'text\n"closed"junk\n'])
def test_malformed_csv(tmp_path, content):
    with pytest.raises(CorpusError, match="malformed CSV near line"):
        load_corpus(write(tmp_path / "m.csv", content))


# --- filters -------------------------------------------------------------------------------------------------


def docs_file(tmp_path: Path, docs: list[str]) -> Path:
    return write(tmp_path / "docs.txt", "\n\n".join(docs))


def test_min_and_max_words(tmp_path):
    docs = ["one", "one two three", "one two three four five six"]
    corpus = load_corpus(docs_file(tmp_path, docs), "docs", filters=CorpusFilters(min_words=2, max_words=5))
    assert corpus.documents == ["one two three"]
    assert corpus.report.dropped["too short"] == 1
    assert corpus.report.dropped["too long"] == 1


def test_drop_patterns(tmp_path):
    docs = ["No synopsis yet.", "A real story.", "Another real story", "spam spam"]
    filters = CorpusFilters(drop_patterns=[r"^No synopsis", r"spam"])
    corpus = load_corpus(docs_file(tmp_path, docs), "docs", filters=filters)
    assert corpus.documents == ["A real story.", "Another real story"]
    assert corpus.report.dropped["pattern"] == 2


def test_invalid_drop_pattern(tmp_path):
    with pytest.raises(CorpusError, match=r"invalid drop pattern '\(unclosed'"):
        load_corpus(docs_file(tmp_path, ["a"]), "docs", filters=CorpusFilters(drop_patterns=["(unclosed"]))


def test_strip_source_lines(tmp_path):
    docs = [
        "A story. (Source: ANN)",
        "Another story.\n\n[Written by MAL Rewrite]",
        "Third story. (Souce: AnimeNfo) [Written by MAL Rewrite]",
        "A story about the source: of the Nile.",
        "(Source: ANN)",
    ]
    path = write(tmp_path / "c.csv", "text\n" + "\n".join(f'"{doc}"' for doc in docs))
    corpus = load_corpus(path, filters=CorpusFilters(strip_source_lines=True))
    assert corpus.documents == ["A story.", "Another story.", "Third story.", "A story about the source: of the Nile."]
    assert corpus.report.credits_stripped == 4
    assert corpus.report.dropped["empty"] == 1
    unfiltered = load_corpus(path)
    assert unfiltered.documents[0] == "A story. (Source: ANN)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Nice. (Source: ANN, edited)", "Nice."),
        ("Cut off. Source: ANN", "Cut off."),
        ("Cut off. [Source: Enoki Films US", "Cut off."),
        ("(Source: Wiki)\nBody stays.", "Body stays."),
        ("Middle (Source: ANN) stays here.", "Middle (Source: ANN) stays here."),
        ("Our source: the river.", "Our source: the river."),
    ],
)
def test_strip_credits_cases(text, expected):
    assert strip_credits(text) == expected


def test_keep_script(tmp_path):
    docs = ["Plain English.", "Café naïve — résumé", "Привет, мир", "Mixed with мир", "漢字 text", "123 — 456 !?"]
    latin = load_corpus(docs_file(tmp_path, docs), "docs", filters=CorpusFilters(keep_script="latin"))
    assert latin.documents == ["Plain English.", "Café naïve — résumé", "123 — 456 !?"]
    assert latin.report.dropped["script"] == 3
    cyrillic = load_corpus(docs_file(tmp_path, docs), "docs", filters=CorpusFilters(keep_script="Cyrillic"))
    assert cyrillic.documents == ["Привет, мир", "123 — 456 !?"]  # digits and punctuation belong to no script


def test_unknown_script(tmp_path):
    with pytest.raises(CorpusError, match="unknown script 'klingon'"):
        load_corpus(docs_file(tmp_path, ["a"]), "docs", filters=CorpusFilters(keep_script="klingon"))


def test_nothing_left_after_filtering(tmp_path):
    with pytest.raises(CorpusError, match=r"no documents left.*2 read; dropped 2 too short") as error:
        load_corpus(docs_file(tmp_path, ["a", "b"]), "docs", filters=CorpusFilters(min_words=3))
    assert "\n" not in str(error.value)


def test_report_lines(tmp_path):
    docs = ["one", "one two three", "skip me please"]
    filters = CorpusFilters(min_words=2, drop_patterns=["skip"])
    report = load_corpus(docs_file(tmp_path, docs), "docs", filters=filters).report
    text = str(report)
    assert report.lines()[0].startswith("corpus: ") and "format docs" in report.lines()[0]
    assert "documents: 3 read, 1 kept" in text
    assert "dropped: 1 pattern, 1 too short" in text
    assert "characters: 13" in text
    assert text == "\n".join(report.lines())


# --- document markers in plain text (issue 16) --------------------------------------------------------------


def test_auto_reads_s_wrapped_lines_as_documents_with_one_notice(tmp_path):
    path = write(tmp_path / "anek.txt", "<s> Первый анекдот. </s>\n<s> - Второй? - Да. </s>\n<s> третий </s>\n")
    corpus = load_corpus(path)
    assert corpus.documents == ["Первый анекдот.", "- Второй? - Да.", "третий"]
    assert not corpus.single_stream and corpus.report.format == "docs"
    notices = [line for line in corpus.report.lines() if line.startswith("notice:")]
    assert len(notices) == 1 and "<s> ... </s>" in notices[0] and "--format text" in notices[0]
    plain = load_corpus(path, fmt="text")  # the user's explicit choice wins: markers stay text
    assert plain.single_stream and "</s>" in plain.documents[0] and plain.report.notice is None


def test_auto_reads_startoftext_separators_as_documents(tmp_path):
    path = write(tmp_path / "gpt.txt", "<|startoftext|>first joke\n<|startoftext|>second one\n<|endoftext|>")
    corpus = load_corpus(path)
    assert corpus.documents == ["first joke", "second one"]
    assert "3 <|startoftext|>/<|endoftext|> markers" in corpus.report.notice


def test_plain_text_without_markers_has_no_notice(tmp_path):
    corpus = load_corpus(write(tmp_path / "plain.txt", "a <s> tag mid-line is text\nsecond line\n"))
    assert corpus.single_stream and corpus.report.notice is None


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared/data/anek-first800-derived.txt").is_file(),
                    reason="the anecdote corpus is not beside the repository")
def test_real_anecdote_file_is_800_documents_without_markers():
    corpus = load_corpus(Path(__file__).resolve().parents[2] / "shared/data/anek-first800-derived.txt")
    assert len(corpus.documents) == 800 and corpus.report.notice
    assert not any("<s>" in doc or "</s>" in doc for doc in corpus.documents)
