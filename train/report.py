"""What the training loop tells the user: the loss/throughput window since the last evaluation, the evaluation
line, the validation loss per word / per character, and the model's shape in words."""

from __future__ import annotations

import math
from typing import Any

from runtime.units import loss_units
from train.data import PreparedData
from train.metrics import format_rate, format_seconds


class RateWindow:
    """Training loss and throughput since the last evaluation, plus a smoothed loss for the progress bar."""

    def __init__(self) -> None:
        self.smoothed_loss = math.nan
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps, self.tokens, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.smoothed_loss = loss if math.isnan(self.smoothed_loss) else 0.9 * self.smoothed_loss + 0.1 * loss

    @property
    def mean_loss(self) -> float | None:
        return self.loss_sum / self.steps if self.steps else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def eval_line(record: dict[str, Any], improved: bool) -> str:
    train = f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-"
    line = (f"step {record['step']} | {format_seconds(record['seconds'])} | train {train} | "
            f"val {record['val_loss']:.4f} nats/token (ppl {record['val_ppl']:.2f}{units_text(record)})"
            f"{scope_text(record)}")
    line += f" | lr {record['lr']:.2e} | {format_rate(record['tokens_per_s'])}"
    return line + (" | best, saved" if improved else "")


def scope_text(record: dict[str, Any]) -> str:
    """What an evaluation's val_loss covers, in a run whose interim evaluations score a subset (nothing otherwise)."""
    if "val_subset_loss" not in record:
        return ""
    if record.get("val_scope") == "subset":
        return f" [subset: {record['val_tokens']:,} of {record['val_full_tokens']:,} predictions]"
    return f" [full pass, {record['val_tokens']:,} predictions; subset {record['val_subset_loss']:.4f}]"


def val_units(val_loss: float, data: PreparedData) -> dict[str, Any]:
    """The validation loss per word and per character (runtime.units), converted with the whole validation split's
    words/characters per token (exact when every validation token is scored, i.e. no --eval-tokens cap)."""
    if data.val_size is None or data.val_size.tokens == 0:
        return {}
    units = loss_units(val_loss, data.val_size)
    record = {"val_bpc": units["bits_per_char"]}
    if not data.char_level:
        record.update(val_nats_per_word=units["nats_per_word"], val_ppl_word=units["ppl_word"])
    return record


def units_text(record: dict[str, Any]) -> str:
    text = ""
    if "val_nats_per_word" in record:
        text += f"; {record['val_nats_per_word']:.3f} nats/word, ppl/word {record['val_ppl_word']:,.5g}"
    if "val_bpc" in record:
        text += f"; {record['val_bpc']:.3f} bits/char"
    return text


def model_shape(model_config: dict[str, Any], arch: str) -> str:
    if arch in ("lstm", "gru"):
        return (f"{model_config.get('num_layers')}x{model_config.get('hidden_size')} "
                f"(embedding {model_config.get('embedding_size')}, vocab {model_config.get('vocab_size')})")
    return (f"{model_config.get('n_layer')} layers x {model_config.get('n_embd')} wide, "
            f"{model_config.get('n_head')} heads, context {model_config.get('context_length')}, "
            f"vocab {model_config.get('vocab_size')}")
