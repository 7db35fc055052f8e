"""The resolved training configuration: every knob of a run, validated, as plain values.

A TrainConfig is stored (as a dict of primitives) inside every checkpoint, so ``--resume`` continues with exactly
the settings the run started with. Budgets (``max_steps``, ``time_budget``, ``epochs``) are TOTALS for the whole
run, resumed parts included: resuming a run that stopped at step N with ``--max-steps 2N`` trains N more steps.
The cosine schedule follows the budget, so resuming with the SAME budget continues exactly; a larger budget on
resume stretches the rest of the schedule (the learning rate jumps up to where the longer run would be).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ARCHES = ("lstm", "gru", "gpt2")
SCHEDULES = ("cosine", "linear", "plateau")
OPTIMIZERS = ("adamw", "muon")
DEVICES = ("auto", "cpu", "cuda")


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss diverged); the message is one line for the user."""


class TrainConfigError(TrainingError):
    """A flag value that cannot work; the message is one line for the user."""


@dataclass
class TrainConfig:
    arch: str
    data: str
    out: str
    # corpus
    format: str = "auto"
    column: str | None = None
    val_fraction: float = 0.1
    min_words: int | None = None
    max_words: int | None = None
    drop_patterns: list[str] = field(default_factory=list)
    strip_source_lines: bool = False
    keep_script: str | None = None
    strip_boilerplate: bool = False
    # tokenizer
    tokenizer: str = "char"
    vocab_size: int | None = None
    min_frequency: int = 1
    lowercase: bool = False
    # RNN shape
    embedding_size: int = 64
    hidden_size: int = 256
    layers: int = 2
    dropout: float = 0.0
    # GPT-2 shape
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    context_length: int = 128
    init_from: str | None = None
    # optimisation
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    batch_size: int = 32
    seq_len: int = 128
    grad_accum: int = 1
    schedule: str = "cosine"
    optimizer: str = "adamw"
    # budget and evaluation
    time_budget: float | None = None
    max_steps: int | None = None
    epochs: float | None = None
    eval_every: int = 250
    eval_tokens: int | None = None
    # predictions an interim evaluation scores (train.evaluation.ValidationSet; about 15 % of tiny Shakespeare's
    # validation split); 0: every evaluation scores the whole split
    eval_interim_tokens: int = 16_384
    patience: int | None = None
    # run
    seed: int = 1337
    device: str = "auto"
    threads: int | None = None
    prime: list[str] = field(default_factory=list)
    preset: str | None = None
    # Settings that came from a default or preset rather than a flag, which the run may fit to its budget
    # (train.schedule.fit_plan): "warmup_steps", "eval_every". Explicit flags are never changed.
    fit_to_budget: list[str] = field(default_factory=list)

    @property
    def is_rnn(self) -> bool:
        return self.arch in ("lstm", "gru")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def validate(self) -> TrainConfig:
        """Raise TrainConfigError naming the first bad value; returns self for chaining."""
        _choice("--arch", self.arch, ARCHES)
        _choice("--schedule", self.schedule, SCHEDULES)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--device", self.device, DEVICES)
        for flag, value in (
            ("--embedding-size", self.embedding_size), ("--hidden-size", self.hidden_size), ("--layers", self.layers),
            ("--n-layer", self.n_layer), ("--n-head", self.n_head), ("--n-embd", self.n_embd),
            ("--context-length", self.context_length), ("--batch-size", self.batch_size), ("--seq-len", self.seq_len),
            ("--grad-accum", self.grad_accum), ("--eval-every", self.eval_every),
            ("--min-frequency", self.min_frequency),
        ):
            _at_least(flag, value, 1)
        for flag, optional in (
            ("--max-steps", self.max_steps), ("--eval-tokens", self.eval_tokens), ("--patience", self.patience),
            ("--threads", self.threads), ("--vocab-size", self.vocab_size),
        ):
            if optional is not None:
                _at_least(flag, optional, 1)
        if self.eval_tokens is not None and self.eval_tokens < 2:
            raise TrainConfigError("--eval-tokens must be at least 2")
        _at_least("--eval-interim-tokens", self.eval_interim_tokens, 0)
        _at_least("--warmup-steps", self.warmup_steps, 0)
        if not self.lr > 0:
            raise TrainConfigError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise TrainConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise TrainConfigError(f"--grad-clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise TrainConfigError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise TrainConfigError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainConfigError(f"--epochs must be > 0, got {self.epochs}")
        if self.arch == "gpt2" and self.init_from is None and self.n_embd % self.n_head:
            raise TrainConfigError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        if self.init_from is not None and self.arch != "gpt2":
            raise TrainConfigError("--init-from needs --arch gpt2 (it fine-tunes a Hugging Face GPT-2)")
        return self


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TrainConfigError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def _at_least(flag: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TrainConfigError(f"{flag} must be an integer >= {minimum}, got {value!r}")
