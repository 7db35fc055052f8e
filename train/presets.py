"""Named presets (``--preset NAME``) and the defaults every run starts from.

Resolution order for each setting: an explicit command-line flag, then the preset, then the architecture's
defaults (ARCH_DEFAULTS), then TrainConfig's own defaults. A preset's ``data`` is a path relative to the current
directory or, failing that, to the repository root (the corpora live in ``../shared/data``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EPOCHS = 10.0  # the budget when none of --time-budget, --max-steps, --epochs is given

# Placeholder synopses in the anime CSV ("No synopsis information has been added to this title...",
# "No synopsis has been added for this series yet...").
ANIME_PLACEHOLDERS = r"^\s*No synopsis (information )?has been added"

ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "lstm": {"lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 20, "batch_size": 32, "seq_len": 128},
    "gru": {"lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 20, "batch_size": 32, "seq_len": 128},
    "gpt2": {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 100, "batch_size": 16, "tokenizer": "bpe"},
}
# Fine-tuning a pretrained GPT-2 wants a much smaller rate than training one from scratch.
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 5e-5, "weight_decay": 0.01, "warmup_steps": 20, "context_length": 256}

PRESETS: dict[str, dict[str, Any]] = {
    # The bundled demo model: a char-level LSTM tuned for --time-budget 90 on this project's 2-core CPU, shared with
    # other jobs. Short budgets favour many small updates: 1x384 with 32 streams x 64 tokens and a high rate beat
    # 1x256, 1x512, 2x256, a GRU and bigger batches/windows in 90 s runs (1.536-1.567 nats/char, load-dependent).
    # Two threads: on a quiet machine 1.506 in 90 s vs 1.521 with one. With the cores busy elsewhere two threads
    # wait on each other (steps up to ~25x slower): pass --threads 1 then.
    # lr 1e-2 rather than the 1.5e-2 tuned on the AVX-512 machine (~2,400 steps in 90 s): on the AVX2 EPYC (~1,250
    # steps) 1.4806 / 1.4978 vs 1.4945 / 1.5130 in interleaved 90 s runs, 1.4929 vs 1.5195 at a fixed 1,250 steps.
    # AdamW, not Muon: Muon on the cell matrices wins step for step (1.463 vs 1.541 at 900 steps) but its steps cost
    # 1.25-1.5x, which leaves 90 s runs level (1.502 vs 1.501-1.516) and 240 s runs ~0.02 ahead (--optimizer muon).
    "shakespeare-char": {
        "arch": "lstm", "data": "../shared/data/tinyshakespeare.txt", "format": "text", "tokenizer": "char",
        "embedding_size": 64, "hidden_size": 384, "layers": 1, "dropout": 0.0,
        "lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 20, "grad_clip": 1.0,
        "batch_size": 32, "seq_len": 64, "time_budget": 90.0, "eval_every": 400, "threads": 2,
        "prime": ["ROMEO:"],
    },
    # nanoGPT's CPU model shape for tiny Shakespeare (4 layers, 4 heads, 128 wide, block 64) with a short-run
    # optimiser: Muon for the block matrices + AdamW for the rest (train/optim.py), lr 5e-3, 20 warmup steps, no
    # weight decay, batch 16. At a fixed 1,738 steps: 1.593 nats/char vs 1.752 with AdamW at lr 3e-3 (the best
    # AdamW setting found); Muon's steps cost 1.37x. In 90 s on the AVX2 EPYC machine: 1.770 vs 2.034 with
    # nanoGPT's own settings (AdamW lr 1e-3, warmup 100, decay 0.1, batch 12). A full evaluation costs ~50 training
    # steps, so evaluations before the last score a 16,384-prediction subset (--eval-interim-tokens) and only the
    # final one scores the whole split. On a loaded machine two threads collapse (40-60 steps in 90 s
    # at load 3.5 vs ~1,250 with one): pass --threads 1 there.
    "shakespeare-gpt2": {
        "arch": "gpt2", "data": "../shared/data/tinyshakespeare.txt", "format": "text", "tokenizer": "char",
        "n_layer": 4, "n_head": 4, "n_embd": 128, "context_length": 64, "dropout": 0.0,
        "lr": 5e-3, "weight_decay": 0.0, "warmup_steps": 20, "batch_size": 16, "optimizer": "muon",
        "time_budget": 90.0, "eval_every": 2000, "threads": 2, "prime": ["ROMEO:"],
    },
    # Word presets (issue 16): words and punctuation marks are the tokens (train/tokenizer.py), ~1.1-1.4 tokens
    # per word. Tuned on the 2-core CPU while it was shared with three other jobs (one thread each, 150-180 tok/s
    # for the old 2x512 shape): one LSTM layer, a higher rate and no dropout reach a lower loss in these short
    # budgets than 2x512 with dropout. shakespeare-word in 150 s: 1x512 at lr 5e-3 (100 steps, 7.26 nats/word)
    # ~ 1x256 at lr 1e-2 (88 steps, 7.27) << 2x512 at lr 2e-3 (15 steps, 10.32). Shakespeare keeps words seen at
    # least twice (the tutorial's min-frequency rule; 7.1k tokens, 6.3 % of validation tokens unknown): in 300 s
    # 231 steps and 7.04 nats/word, against 101 steps and 8.45 with every word kept (14k tokens, a softmax twice
    # as wide). The anime vocabulary is capped at 8,000 (the full one has 61k entries and its softmax would
    # dominate a step). Word models never generate <unk> by default (suppress_unk, generation_defaults below).
    "shakespeare-word": {
        "arch": "lstm", "data": "../shared/data/tinyshakespeare.txt", "format": "text", "tokenizer": "word",
        "min_frequency": 2, "embedding_size": 128, "hidden_size": 512, "layers": 1, "dropout": 0.0,
        "lr": 5e-3, "batch_size": 16, "seq_len": 32, "time_budget": 300.0, "eval_every": 100,
        "prime": ["ROMEO:"],
    },
    # The PyTorch LSTM jokes tutorial's corpus: one joke per CSV row. Every word kept: the corpus is small and a
    # word seen once is still a word the model should be able to write.
    "jokes-word": {
        "arch": "lstm", "data": "../shared/data/reddit-cleanjokes.csv", "format": "csv", "column": "Joke",
        "tokenizer": "word", "embedding_size": 128, "hidden_size": 256, "layers": 1, "dropout": 0.2,
        "lr": 5e-3, "batch_size": 16, "seq_len": 32, "time_budget": 180.0, "eval_every": 50,
        "prime": ["What do you call"],
    },
    "anime-word": {
        "arch": "lstm", "data": "../shared/data/anime/anime_with_synopsis.csv", "format": "csv",
        "column": "sypnopsis", "drop_patterns": [ANIME_PLACEHOLDERS], "strip_source_lines": True, "min_words": 5,
        "tokenizer": "word", "vocab_size": 8000, "embedding_size": 128, "hidden_size": 512, "layers": 1,
        "dropout": 0.0, "lr": 5e-3, "batch_size": 32, "seq_len": 32, "time_budget": 600.0, "eval_every": 200,
        "eval_tokens": 100_000, "prime": ["The story follows"],
    },
    # Muon: in 600 s on the AVX2 EPYC 4.917 nats/token (901 steps) against 5.031 with AdamW (1,043 steps).
    "anime-gpt2": {
        "arch": "gpt2", "data": "../shared/data/anime/anime_with_synopsis.csv", "format": "csv",
        "column": "sypnopsis", "drop_patterns": [ANIME_PLACEHOLDERS], "strip_source_lines": True, "min_words": 5,
        "tokenizer": "bpe", "vocab_size": 4096, "n_layer": 4, "n_head": 4, "n_embd": 256, "context_length": 128,
        "dropout": 0.1, "lr": 1e-3, "batch_size": 16, "optimizer": "muon", "time_budget": 600.0, "eval_every": 200,
        "eval_tokens": 100_000, "prime": ["The story follows"],
    },
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def resolve_preset_data(path: str) -> str:
    """A preset's data path: as given if it exists from the current directory, else from the repository root."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    from_repo = REPO_ROOT / candidate
    return str(from_repo) if from_repo.exists() else str(candidate)

