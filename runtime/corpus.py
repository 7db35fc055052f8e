"""Reading a user's corpus into documents, cleaning it, and splitting it into train/validation.

Formats (``fmt``):

- ``text``: the whole file is one continuous stream (one document, ``single_stream=True``); it is split by
  characters, like nanoGPT's tiny-Shakespeare preparation.
- ``csv`` / ``tsv``: one document per row, taken from one column (``column``; required when there are several).
- ``docs``: documents separated by blank lines or by ``<|startoftext|>`` / ``<|endoftext|>`` markers; a file with
  no blank lines whose every line is wrapped in ``<s> ... </s>`` holds one document per line.
- ``dir``: every ``*.txt`` file under a directory (recursively, sorted by path), one document per file.
- ``auto``: a directory is ``dir``, ``*.csv`` is ``csv``, ``*.tsv`` is ``tsv``, anything else ``text`` -- unless
  its text carries document markers (every line wrapped in ``<s> ... </s>``, or ``<|startoftext|>`` /
  ``<|endoftext|>`` separators): then it is read as ``docs``, the markers become document boundaries, and the
  report says so in one notice line. ``--format text`` keeps the markers as text.

Every file is read as UTF-8 (a BOM is dropped) with CRLF normalised to LF. Anything unusable raises CorpusError
with a one-line message naming the file.

Training (train/data.py) and textgen-eval both read corpora through this module, so a held-out file is cut
into documents exactly as the training text was; it is pure Python, hence its place in the torch-free package.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("auto", "text", "csv", "tsv", "docs", "dir")

# Scripts accepted by ``CorpusFilters.keep_script``: a letter belongs to a script when its Unicode name starts
# with the script's name (e.g. "LATIN SMALL LETTER E WITH ACUTE", "CYRILLIC CAPITAL LETTER A").
SCRIPTS = ("latin", "cyrillic", "greek", "armenian", "georgian", "hebrew", "arabic", "devanagari", "thai", "hangul")

# Reasons a document is dropped, in the order the checks run (also the order of the report).
DROP_REASONS = ("empty", "pattern", "script", "too short", "too long")

_MAX_CSV_FIELD = 64 * 1024 * 1024  # the csv module's default limit (128 KiB) is too small for long documents
_DOC_MARKERS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")
_WRAPPED_LINE = re.compile(r"^[ \t]*<s>(.*)</s>[ \t]*$")
_LINE_MARKERS = re.compile(r"^[ \t]*<s>[ \t]?|[ \t]?</s>[ \t]*$", re.MULTILINE)
# Scraped-site credits such as "(Source: ANN)", "(Source: Wikipedia, edited)", "(Souce: AnimeNfo)" and
# "[Written by MAL Rewrite]"; misspellings of "Source" occur in real data, so the word is matched loosely.
_SOURCE_WORD = r"(?:sourced?|souce|soure|sourse|sorce)"
_CREDIT = rf"(?:\(\s*{_SOURCE_WORD}\s*:[^()\n]*\)|\[\s*(?:{_SOURCE_WORD}\s*:|written by)[^\[\]\n]*\])"
# A credit cut off at scraping or missing its opening bracket, e.g. "... forces. Source: ANN" or "[Source: Enoki
# Films US": only after a sentence end, at the very end of the document, and short.
_CUT_CREDIT = rf"(?<=[.!?\"')\]])\s+[(\[]?\s*(?:{_SOURCE_WORD}\s*:|written by )[^\[\]\n]{{0,80}}[)\]]?"
_TRAILING_CREDIT = re.compile(rf"(?:[ \t]*{_CREDIT}|{_CUT_CREDIT})\s*\Z", re.IGNORECASE)
_CREDIT_LINE = re.compile(r"^[ \t]*" + _CREDIT + r"[ \t]*(?:\n|\Z)", re.IGNORECASE | re.MULTILINE)


# Project Gutenberg's edition markers: "*** START OF THE PROJECT GUTENBERG EBOOK ..." ends the header (title page,
# licence summary) and "*** END OF THE PROJECT GUTENBERG EBOOK ..." starts the licence (~18 KB of legal text).
_GUTENBERG_START = re.compile(r"^[ \t]*\*\*\*[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK[^\n]*\n?",
                              re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^[ \t]*\*\*\*[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK",
                            re.IGNORECASE | re.MULTILINE)


class CorpusError(Exception):
    """The corpus cannot be used; the message is one line meant for the user."""


@dataclass
class CorpusFilters:
    """Cleaning applied to every document after reading.

    Order: credits are stripped first (``strip_source_lines``), then documents are dropped when they are empty,
    match a ``drop_patterns`` regex (searched anywhere in the document), contain a letter outside
    ``keep_script``, or have fewer than ``min_words`` / more than ``max_words`` whitespace-separated words."""

    min_words: int | None = None
    max_words: int | None = None
    drop_patterns: list[str] = field(default_factory=list)
    strip_source_lines: bool = False
    keep_script: str | None = None
    strip_boilerplate: bool = False


@dataclass
class DataReport:
    """What loading did: counts by outcome, for the user and for the training log."""

    source: str
    format: str
    documents_read: int = 0
    documents_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    credits_stripped: int = 0
    characters: int = 0
    boilerplate_found: int = 0  # characters of Project Gutenberg header/licence in the kept documents
    boilerplate_stripped: int = 0  # characters of it removed (--strip-boilerplate)
    notice: str | None = None  # one line about a convention detected in the text (document markers)

    def lines(self) -> list[str]:
        out = [
            f"corpus: {self.source} (format {self.format})",
            *([f"notice: {self.notice}"] if self.notice else []),
            f"documents: {self.documents_read:,} read, {self.documents_kept:,} kept",
        ]
        dropped = [f"{count:,} {reason}" for reason, count in self.dropped.items() if count]
        if dropped:
            out.append("dropped: " + ", ".join(dropped))
        if self.credits_stripped:
            out.append(f"source credits stripped from {self.credits_stripped:,} documents")
        if self.boilerplate_stripped:
            out.append(f"boilerplate: stripped {self.boilerplate_stripped:,} characters of Project Gutenberg header "
                       "and licence")
        out.append(f"characters: {self.characters:,}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class Corpus:
    documents: list[str]
    single_stream: bool
    report: DataReport


def load_corpus(
    path: str | Path, fmt: str = "auto", column: str | None = None, filters: CorpusFilters | None = None
) -> Corpus:
    """Read ``path`` in format ``fmt``, apply ``filters``, and return the kept documents with a report."""
    source = Path(path)
    if fmt not in FORMATS:
        raise CorpusError(f"unknown corpus format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not source.exists():
        raise CorpusError(f"corpus not found: {source}")
    auto = fmt == "auto"
    fmt = _resolve_format(source, fmt)
    notice = None
    if fmt == "dir":
        if not source.is_dir():
            raise CorpusError(f"{source} is not a directory (format 'dir')")
        documents = _read_dir(source)
    else:
        if source.is_dir():
            raise CorpusError(f"{source} is a directory; use format 'dir' or 'auto'")
        text = _read_text(source)
        if auto and fmt == "text":
            notice = document_markers(text)
            fmt = "docs" if notice else fmt
        documents = _parse_text(text, source, fmt, column)
    report = DataReport(source=str(source), format=fmt, documents_read=len(documents), notice=notice)
    kept = _apply_filters(documents, filters or CorpusFilters(), report)
    if not kept:
        raise CorpusError(f"no documents left in {source} after filtering ({_dropped_summary(report)})")
    report.documents_kept = len(kept)
    report.characters = sum(len(doc) for doc in kept)
    return Corpus(documents=kept, single_stream=fmt == "text", report=report)


def split_train_val(corpus: Corpus, val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Hold out the END of the corpus for validation (no shuffling, so the split is reproducible).

    A single stream is split by characters: validation is the last ``val_fraction`` of them, the train part is
    ``text[:int(len(text) * (1 - val_fraction))]`` as in nanoGPT. Otherwise the last ``val_fraction`` of the
    documents (at least one) are validation."""
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    if corpus.single_stream:
        text = "".join(corpus.documents)
        cut = int(len(text) * (1.0 - val_fraction))
        if cut == 0 or cut == len(text):
            raise CorpusError(f"corpus too small to split: {len(text)} characters")
        return [text[:cut]], [text[cut:]]
    docs = corpus.documents
    if len(docs) < 2:
        raise CorpusError("need at least 2 documents to split into train and validation")
    n_train = min(int(len(docs) * (1.0 - val_fraction)), len(docs) - 1)
    return docs[:n_train], docs[n_train:]


# --- reading -------------------------------------------------------------------------------------------------


def _resolve_format(source: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if source.is_dir():
        return "dir"
    return {".csv": "csv", ".tsv": "tsv"}.get(source.suffix.lower(), "text")


def _read_text(path: Path, allow_empty: bool = False) -> str:
    """The file's text: UTF-8 (BOM dropped), CRLF -> LF; refuses empty, binary and non-UTF-8 files."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise CorpusError(f"{path} looks like a binary file (it contains NUL bytes), not UTF-8 text")
    # Same as decoding with "utf-8-sig", but the error offset then counts from the start of the file.
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        raise CorpusError(
            f"{path} is not valid UTF-8 (byte 0x{data[offset]:02x} at offset {offset}); re-save it as UTF-8"
        ) from None
    if not allow_empty and not text.strip():
        raise CorpusError(f"{path} is empty")
    return text.replace("\r\n", "\n")


def document_markers(text: str) -> str | None:
    """When plain text carries document markers, the notice saying how they are read; else None."""
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and not _BLANK_LINES.search(text.strip()) and all(_WRAPPED_LINE.match(line) for line in lines):
        return (f"every line is wrapped in <s> ... </s>: read as {len(lines):,} documents, one per line, markers "
                "removed (--format text keeps them as text)")
    separators = len(_DOC_MARKERS.findall(text))
    if separators:
        return (f"{separators:,} <|startoftext|>/<|endoftext|> markers: read as documents separated by them (and "
                "by blank lines), markers removed (--format text keeps them as text)")
    return None


def _parse_text(text: str, path: Path, fmt: str, column: str | None) -> list[str]:
    if fmt == "text":
        return [text]
    if fmt == "docs":
        return _split_docs(text)
    return _read_table(text, path, "\t" if fmt == "tsv" else ",", column)


def _split_docs(text: str) -> list[str]:
    """Blank lines and <|startoftext|>/<|endoftext|> separate documents; <s>-wrapped lines are one each."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not _BLANK_LINES.search(text.strip()) and lines and all(_WRAPPED_LINE.match(line) for line in lines):
        pieces = lines
    else:
        pieces = [p for chunk in _DOC_MARKERS.split(text) for p in _BLANK_LINES.split(chunk)]
    documents = (_LINE_MARKERS.sub("", _DOC_MARKERS.sub("", piece)).strip() for piece in pieces)
    return [doc for doc in documents if doc]


def _read_table(text: str, path: Path, delimiter: str, column: str | None) -> list[str]:
    csv.field_size_limit(max(csv.field_size_limit(), _MAX_CSV_FIELD))
    # strict: an unterminated quote is an error instead of silently swallowing the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = [name.strip() for name in next(reader)]
        index = _column_index(header, column, path)
        cells = [row[index].strip() if index < len(row) else "" for row in reader if row]
    except csv.Error as exc:
        raise CorpusError(f"{path}: malformed CSV near line {reader.line_num}: {exc}") from None
    if not cells:
        raise CorpusError(f"{path} has a header row but no data rows")
    return cells


def _column_index(header: list[str], column: str | None, path: Path) -> int:
    available = ", ".join(repr(name) for name in header)
    if column is None:
        if len(header) == 1:
            return 0
        raise CorpusError(f"{path} has {len(header)} columns; choose one with --column (available: {available})")
    if column not in header:
        raise CorpusError(f"{path} has no column {column!r} (available: {available})")
    return header.index(column)


def _read_dir(directory: Path) -> list[str]:
    files = sorted(p for p in directory.rglob("*.txt") if p.is_file())
    if not files:
        raise CorpusError(f"no *.txt files under {directory}")
    # An empty file among many is reported as a dropped "empty" document rather than stopping the load.
    return [_read_text(p, allow_empty=True).strip() for p in files]


# --- filtering -----------------------------------------------------------------------------------------------


def _apply_filters(documents: list[str], filters: CorpusFilters, report: DataReport) -> list[str]:
    patterns = _compile_patterns(filters.drop_patterns)
    in_script = _script_checker(filters.keep_script)
    kept = []
    for doc in documents:
        body, removed = strip_gutenberg(doc)
        if removed:
            if filters.strip_boilerplate:
                report.boilerplate_stripped += removed
                doc = body
            else:
                report.boilerplate_found += removed
        if filters.strip_source_lines:
            stripped = strip_credits(doc)
            report.credits_stripped += int(stripped != doc)
            doc = stripped
        reason = _drop_reason(doc, filters, patterns, in_script)
        if reason:
            report.dropped[reason] += 1
        else:
            kept.append(doc)
    return kept


def _drop_reason(
    doc: str, filters: CorpusFilters, patterns: list[re.Pattern[str]], in_script: Callable[[str], bool] | None
) -> str | None:
    if not doc.strip():
        return "empty"
    if any(p.search(doc) for p in patterns):
        return "pattern"
    if in_script is not None and not in_script(doc):
        return "script"
    words = len(doc.split())
    if filters.min_words is not None and words < filters.min_words:
        return "too short"
    if filters.max_words is not None and words > filters.max_words:
        return "too long"
    return None


def strip_gutenberg(doc: str) -> tuple[str, int]:
    """The text between Project Gutenberg's START and END markers, and how many characters were around it
    (0 and the text unchanged when it has neither marker)."""
    start = _GUTENBERG_START.search(doc)
    end = _GUTENBERG_END.search(doc, start.end() if start else 0)
    if start is None and end is None:
        return doc, 0
    body = doc[start.end() if start else 0:end.start() if end else len(doc)].strip("\n") + "\n"
    return body, len(doc) - len(body)


def strip_credits(doc: str) -> str:
    """Remove lines that are only a credit, then trailing credits like "(Source: ANN)" (repeatedly)."""
    doc = _CREDIT_LINE.sub("", doc)
    while True:
        shorter = _TRAILING_CREDIT.sub("", doc)
        if shorter == doc:
            return doc.rstrip()
        doc = shorter


def _compile_patterns(patterns: list[str]) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise CorpusError(f"invalid drop pattern {pattern!r}: {exc}") from None
    return compiled


def _script_checker(script: str | None) -> Callable[[str], bool] | None:
    """A predicate: True when every letter of a document belongs to ``script`` (None when not filtering)."""
    if script is None:
        return None
    if script.lower() not in SCRIPTS:
        raise CorpusError(f"unknown script {script!r}; choose one of {', '.join(SCRIPTS)}")
    prefix = script.upper() + " "
    verdicts: dict[str, bool] = {}  # per character: the corpus has few distinct characters, names are slow

    def char_ok(ch: str) -> bool:
        if ch not in verdicts:
            # Modifier letters (category Lm, e.g. "ʼ") are not tied to a script; other letters must match.
            is_letter = unicodedata.category(ch) in ("Lu", "Ll", "Lt", "Lo")
            verdicts[ch] = not is_letter or unicodedata.name(ch, "").startswith(prefix)
        return verdicts[ch]

    return lambda doc: all(char_ok(ch) for ch in set(doc))


def _dropped_summary(report: DataReport) -> str:
    parts = [f"{count} {reason}" for reason, count in report.dropped.items() if count]
    return f"{report.documents_read} read; dropped " + ", ".join(parts) if parts else f"{report.documents_read} read"
