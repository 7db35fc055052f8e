"""Corpus -> tokenizer -> train/validation token arrays, as one step with a printable summary."""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
from tokenizers import Tokenizer

from runtime.corpus import CorpusFilters, DataReport, load_corpus, split_train_val
from runtime.units import TextSize, text_size
from train.config import TrainConfig
from train.tokenizer import build_tokenizer, encode_documents, special_token_ids, tokenizer_kind

MIN_VAL_TOKENS = 1000  # below this a validation loss is mostly noise


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    special: dict[str, int | None]
    kind: str  # "char", "word", "bpe" or "custom"
    train_ids: torch.Tensor  # int64, one long stream
    val_ids: torch.Tensor
    report: list[str]
    val_size: TextSize | None = None  # the whole validation split's tokens, words and characters (runtime.units)

    @property
    def char_level(self) -> bool:
        return self.kind == "char"


def prepare_data(
    config: TrainConfig, tokenizer: Tokenizer | None = None, special: dict[str, int | None] | None = None
) -> PreparedData:
    """Load and split the corpus, then tokenize both parts.

    ``tokenizer``/``special`` come from a resumed checkpoint or a pretrained model; otherwise a tokenizer of kind
    ``config.tokenizer`` is built from the TRAINING part only, so nothing about the validation text leaks into
    it (a char-level model sees validation-only characters as unknown)."""
    # TrainConfig carries every CorpusFilters option under the same name (flat, as the command line has them)
    options = {option.name: copy.copy(getattr(config, option.name)) for option in fields(CorpusFilters)}
    filters = CorpusFilters(**options)
    corpus = load_corpus(config.data, config.format, config.column, filters)
    train_docs, val_docs = split_train_val(corpus, config.val_fraction)
    if tokenizer is None:
        tokenizer = build_tokenizer(config.tokenizer, train_docs, config.vocab_size, config.min_frequency,
                                    config.lowercase)
    if special is None:
        special = special_token_ids(tokenizer)
    train_ids = _encode(tokenizer, train_docs, corpus.single_stream)
    val_ids = _encode(tokenizer, val_docs, corpus.single_stream)
    kind = tokenizer_kind(tokenizer)
    val_size = text_size(val_docs, val_ids.numel(), 0 if corpus.single_stream else len(val_docs))
    report = [
        *corpus.report.lines(),
        f"split: {len(train_docs):,} train / {len(val_docs):,} validation documents "
        f"(last {config.val_fraction:g} held out)",
        f"tokenizer: {kind}, {tokenizer.get_vocab_size(with_added_tokens=True):,} tokens; "
        f"train {train_ids.numel():,} tokens, validation {val_ids.numel():,} tokens",
        *sanity_warnings(config, corpus.report, train_ids.numel(), val_ids.numel()),
        f"validation text: {val_size.words:,} words, {val_size.chars:,} characters "
        f"({val_size.tokens / max(val_size.words, 1):.2f} tokens/word)",
    ]
    unknown = _unknown_share(val_ids, special.get("unk"))
    if unknown:
        report.append(f"unknown: {unknown:.2%} of validation tokens are <unk> (outside the vocabulary)")
    return PreparedData(tokenizer, special, kind, train_ids, val_ids, report, val_size)


def _unknown_share(ids: torch.Tensor, unk: int | None) -> float:
    if unk is None or ids.numel() == 0:
        return 0.0
    return float((ids == unk).sum()) / ids.numel()


def sanity_warnings(config: TrainConfig, report: DataReport, train_tokens: int, val_tokens: int) -> list[str]:
    """One ``warning:`` line per thing about the corpus that makes a run mislead (training goes on)."""
    warnings = []
    block = config.seq_len if config.is_rnn else config.context_length
    batch = config.batch_size * block
    if train_tokens < batch:
        warnings.append(f"warning: the training text is {train_tokens:,} tokens, smaller than one batch "
                        f"({config.batch_size} x {block} = {batch:,} tokens): the model will memorise it, and its "
                        "losses say little; use more text")
    if val_tokens < MIN_VAL_TOKENS:
        warnings.append(f"warning: the validation split is only {val_tokens:,} tokens (under {MIN_VAL_TOKENS:,}): "
                        "its loss is noisy and the best checkpoint is picked on it; use more text or a larger "
                        "--val-fraction")
    if report.boilerplate_found:
        warnings.append(f"warning: {report.source} carries {report.boilerplate_found:,} characters of Project "
                        "Gutenberg header and licence (the licence at the end becomes validation text); "
                        "--strip-boilerplate removes them")
    return warnings


def _encode(tokenizer: Tokenizer, docs: list[str], single_stream: bool) -> torch.Tensor:
    ids = torch.from_numpy(encode_documents(tokenizer, docs).astype("int64"))
    # A plain text file is one continuous stream, not a document: drop the end-of-text that encode_documents
    # appends, so validation is exactly the held-out characters (comparable with nanoGPT's split).
    return ids[:-1] if single_stream and ids.numel() > 1 else ids
