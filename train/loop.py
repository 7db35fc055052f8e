"""The training loop: model + optimizer + schedule over batches, with evaluation, checkpoints and exact resume.

Files a run writes (OUT is ``--out``):
- ``OUT``: the best checkpoint so far by validation loss (written when an evaluation improves on it);
- ``OUT.last``: the latest state (written at every evaluation, at the end, and when interrupted);
- ``OUT.metrics.jsonl``: one JSON object per evaluation; ``OUT.loss.png``: the loss curves, drawn at the end.
Both checkpoints are complete (models/checkpoint.py layout, with a ``train`` section) and either can be resumed.

Validation reports the mean cross-entropy in nats per token over the validation split (``--eval-tokens`` caps
it to its first N tokens), its perplexity, and bits per character for char-level tokenizers. What context each
prediction sees is described in train.batches.rnn_eval_streams (RNNs: the state carried through contiguous
pieces of the validation stream) and train.batches.gpt_eval_windows (GPT-2: non-overlapping context windows).

Exact resume: a checkpoint stores the step, weights, optimizer and schedule state, every RNG state, the data
position (epoch, batch index), the RNN state carried between windows, the best validation loss and the resolved
config. Training N steps, stopping (signal or ``stop_at_step``), then resuming to 2N gives the same weights on
CPU with a fixed seed as training 2N steps at once. Evaluations never touch the training RNG (samples use their
own generator), and an evaluation skipped by an interruption is run first on resume.

Under torchrun the same loop trains with DistributedDataParallel; train.distributed describes how batches,
evaluation, stopping decisions and checkpoint writing are shared out between the processes. Resuming with the
same number of processes continues exactly as well (per-rank RNG and RNN states are stored in the checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from rich.console import Console
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.registry import build_model
from models.rnn import RNNConfig, RNNLanguageModel, State, detach_state
from repl.units import loss_units
from train import distributed
from train.batches import (
    BlockBatcher,
    DataCursor,
    DataPosition,
    DataSizeError,
    StreamBatcher,
    gpt_eval_windows,
    rnn_eval_streams,
)
from train.config import TrainConfig, TrainConfigError, TrainingError
from train.data import PreparedData, prepare_data
from train.distributed import Cluster, interleave_states, parameter_checksum, rank_slice_of_state
from train.metrics import (
    MetricsLog,
    format_rate,
    format_seconds,
    loss_plot_path,
    metrics_path,
    perplexity,
    plot_losses,
)
from train.optim import MuonWithAdamW, gpt2_optimizer
from train.presets import DEFAULT_EPOCHS, generation_defaults
from train.progress import ProgressReporter
from train.rng import capture_rng_state, restore_rng_state, seed_everything
from train.sample import sample_continuation
from train.schedule import Budget, LRSchedule

RNN_EVAL_CHUNK = 256  # tokens per forward call when evaluating an RNN (state carried between chunks)
GPT_EVAL_LOGITS = 2**24  # logits elements per evaluation batch (bounds memory for big vocabularies)
SAMPLE_TOKENS = {"char": 200}  # tokens sampled per --prime at each evaluation; 60 for other tokenizers
# Settings a resumed run may change; everything else comes from the checkpoint so the run continues exactly.
RESUME_OVERRIDES = frozenset(
    {"out", "data", "max_steps", "time_budget", "epochs", "eval_every", "eval_tokens", "patience", "device",
     "threads", "prime"}
)


def last_checkpoint_path(out: str | Path) -> Path:
    return Path(f"{out}.last")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    best_val_loss: float | None
    best_step: int | None
    checkpoint: Path  # the best checkpoint (OUT)
    last_checkpoint: Path  # OUT.last
    stop_reason: str
    signal: int | None = None  # the signal that interrupted the run, if any
    checksums: tuple[str, ...] = ()  # distributed runs: every rank's final parameter checksum, in rank order


def load_resume_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint that can be resumed: a textgen checkpoint with the ``train`` section this trainer writes."""
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("train")
    needed = ("step", "optimizer", "scheduler", "rng", "data_position", "config")
    if not isinstance(state, dict) or any(key not in state for key in needed):
        raise CheckpointError(f"{path} has no training state to resume from (not written by textgen-train?)")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} is damaged: its training config is not a mapping")
    return checkpoint


def config_for_resume(checkpoint: dict[str, Any], overrides: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The saved config with the allowed ``overrides`` applied, and the names of overrides that were ignored
    because changing them would break the resumed run (model shape, tokenizer, optimizer...)."""
    try:
        config = TrainConfig.from_dict(checkpoint["train"]["config"])
    except TypeError as exc:
        raise CheckpointError(f"the checkpoint's training config is unusable: {exc}") from exc
    allowed = {key: value for key, value in overrides.items() if key in RESUME_OVERRIDES}
    saved = config.to_dict()
    ignored = sorted(key for key, value in overrides.items() if key not in RESUME_OVERRIDES and saved.get(key) != value)
    return replace(config, **allowed), ignored


def train(
    config: TrainConfig,
    *,
    resume: dict[str, Any] | None = None,
    console: Console | None = None,
    live: bool | None = None,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Run training as configured. ``resume`` is a checkpoint from load_resume_checkpoint. ``stop_at_step`` stops
    after that step exactly as an interruption would (no evaluation, last checkpoint written), which is how
    interrupted-and-resumed runs are reproduced in tests. Raises the domain errors of the corpus, tokenizer,
    checkpoint and Hugging Face import modules, TrainConfigError and DataSizeError.

    Started by torchrun (its environment variables set), the run is one rank of a distributed data-parallel run
    (see train.distributed); only rank 0 prints."""
    config.validate()
    cluster = distributed.start(_resolve_device(config.device))
    try:
        if not cluster.is_main:
            console, live = Console(quiet=True), False
        console = console or Console()
        reporter = ProgressReporter(console, live)
        trainer = Trainer(config, resume, reporter, cluster)
        with _StopSignals(second_acts_at_once=not cluster.distributed) as signals, reporter:
            return trainer.run(signals, stop_at_step)
    finally:
        distributed.finish(cluster)


class _StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step. A second signal acts at once (the original
    handlers are back by then): Ctrl-C twice raises KeyboardInterrupt; the checkpoint files stay intact because
    every write is atomic.

    Under torchrun (``second_acts_at_once=False``) later signals are only recorded: the terminal's Ctrl-C reaches
    torchrun, not the workers (they run in their own sessions), and torchrun sends SIGTERM to the workers still
    running as soon as one exits with a non-zero status, which must not kill a rank that is finishing its own
    orderly stop. torchrun SIGKILLs workers that have not exited 30 s after its signal."""

    def __init__(self, second_acts_at_once: bool = True) -> None:
        self.received: int | None = None
        self.second_acts_at_once = second_acts_at_once
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if self.second_acts_at_once:
            self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __exit__(self, *exc_info: object) -> None:
        self._restore()


class Trainer:
    """Everything one run holds. Construction loads data and model; ``run`` trains."""

    def __init__(self, config: TrainConfig, resume: dict[str, Any] | None, reporter: ProgressReporter,
                 cluster: Cluster | None = None) -> None:
        self.config = config
        self.reporter = reporter
        self.out = Path(config.out)
        self.last_out = last_checkpoint_path(config.out)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.cluster = cluster or Cluster.single(_resolve_device(config.device))
        self.device = self.cluster.device
        seed_everything(config.seed)  # the same initial weights on every rank
        self.data, self.model, self.model_config = self._load_data_and_model(resume)
        self.model.to(self.device)
        if self.cluster.distributed:
            seed_everything(config.seed + self.cluster.rank)  # per-rank randomness (dropout) from here on
        self.train_model = self.cluster.wrap(self.model)  # forward passes in training; self.model everywhere else
        self.optimizer = self._make_optimizer()
        self.schedule = LRSchedule(config.schedule, config.lr, config.warmup_steps)
        self.budget = Budget(config.max_steps, config.time_budget, config.epochs)
        if config.max_steps is None and config.time_budget is None and config.epochs is None:
            self.budget.epochs = DEFAULT_EPOCHS
        self.amp_dtype, self.scaler = self._amp()
        self.block_len = self._block_len()
        self.cursor = DataCursor(self._batcher())
        self.val_inputs, self.val_targets, self.val_count = self._validation_data()
        self.generation = generation_defaults(config.arch, self.data.kind)
        # progress through the run (all restored on resume)
        self.step = 0
        self.seconds = 0.0
        self.tokens_seen = 0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.last_eval_step: int | None = None
        self.rnn_state: State | None = None
        self.last_metrics: dict[str, Any] | None = None
        if resume is not None:
            self._restore(resume)
        self.metrics_log = MetricsLog(metrics_path(config.out), append=resume is not None) if self.is_main else None

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints (the only one outside torchrun)."""
        return self.cluster.is_main

    # ------------------------------------------------------------------------------------------------ setup

    def _load_data_and_model(self, resume: dict[str, Any] | None) -> tuple[PreparedData, nn.Module, dict[str, Any]]:
        config = self.config
        if resume is not None:
            tokenizer = _tokenizer_from_json(resume["tokenizer"])
            data = prepare_data(config, tokenizer, dict(resume["special_tokens"]))
            model = build_model(resume["arch"], resume["model_config"])
            try:
                model.load_state_dict(resume["model"])
            except RuntimeError as exc:
                raise CheckpointError(f"checkpoint weights do not fit its model config: {_first_line(exc)}") from exc
            return data, model, dict(resume["model_config"])
        if config.init_from is not None:
            return self._load_pretrained()
        data = self._prepare_fresh_data()
        vocab = data.tokenizer.get_vocab_size(with_added_tokens=True)
        if config.is_rnn:
            rnn_config = RNNConfig(vocab_size=vocab, cell=config.arch, embedding_size=config.embedding_size,
                                   hidden_size=config.hidden_size, num_layers=config.layers, dropout=config.dropout)
            return data, RNNLanguageModel(rnn_config), rnn_config.to_dict()
        from models.gpt2 import GPT2, GPT2Config

        gpt_config = GPT2Config(vocab_size=vocab, context_length=config.context_length, n_layer=config.n_layer,
                                n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout)
        return data, GPT2(gpt_config), gpt_config.to_dict()

    def _prepare_fresh_data(self) -> PreparedData:
        """Build the tokenizer from the corpus; in a distributed run rank 0 builds it and every other rank uses
        rank 0's, so all of them agree on the vocabulary whatever the tokenizer trainer does."""
        if not self.cluster.distributed:
            return prepare_data(self.config)
        data = prepare_data(self.config) if self.is_main else None
        shared = self.cluster.broadcast((data.tokenizer.to_str(), dict(data.special)) if data is not None else None)
        if data is not None:
            return data
        tokenizer_json, special = shared
        return prepare_data(self.config, _tokenizer_from_json(tokenizer_json), special)

    def _load_pretrained(self) -> tuple[PreparedData, nn.Module, dict[str, Any]]:
        from models.gpt2 import GPT2
        from models.hf_gpt2 import load_hf_gpt2

        pretrained, gpt_config, tokenizer_json, special = load_hf_gpt2(self.config.init_from)
        data = prepare_data(self.config, _tokenizer_from_json(tokenizer_json), dict(special))
        if self.config.dropout != gpt_config.dropout:  # imported models come with dropout off; fine-tuning may want it
            gpt_config = replace(gpt_config, dropout=self.config.dropout)
            model = GPT2(gpt_config)
            model.load_state_dict(pretrained.state_dict())
            pretrained = model
        return data, pretrained, gpt_config.to_dict()

    def _make_optimizer(self) -> torch.optim.Optimizer | MuonWithAdamW:
        config = self.config
        if config.is_rnn:
            return torch.optim.AdamW(self.model.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                     weight_decay=config.weight_decay)
        return gpt2_optimizer(self.model, config.optimizer, config.lr, config.weight_decay, (0.9, 0.95))

    def _amp(self) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
        """Mixed precision on CUDA only: bf16 for GPT-2 where supported, else fp16 with loss scaling (RNNs use
        fp16: cuDNN's LSTM/GRU kernels are well tested in half precision)."""
        if self.device.type != "cuda":
            return None, None
        if not self.config.is_rnn and torch.cuda.is_bf16_supported():
            return torch.bfloat16, None
        return torch.float16, torch.amp.GradScaler("cuda")

    def _block_len(self) -> int:
        if self.config.is_rnn:
            return self.config.seq_len
        return min(self.config.context_length, self.model.config.context_length)

    def _batcher(self) -> distributed.Batcher:
        """The global batch (``batch_size`` rows per process), of which this process reads its own rows."""
        ids = self.data.train_ids.to(self.device)
        rows = self.config.batch_size * self.cluster.world_size
        if self.config.is_rnn:
            batcher: StreamBatcher | BlockBatcher = StreamBatcher(ids, rows, self.config.seq_len)
        else:
            batcher = BlockBatcher(ids, rows, self.block_len, self.config.seed)
        if self.cluster.distributed and batcher.batch(0, 0)[0].shape[0] < self.cluster.world_size:
            raise DataSizeError(f"the training split is too small to give each of the {self.cluster.world_size} "
                                f"processes a block of {self.block_len} tokens; use fewer processes or more text")
        return self.cluster.shard(batcher)

    def _validation_data(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This process's validation rows and the number of predictions over ALL processes' rows."""
        ids = self.data.val_ids.to(self.device)
        if self.config.is_rnn:
            inputs, targets = rnn_eval_streams(ids, self.config.eval_tokens)
        else:
            inputs, targets = gpt_eval_windows(ids, self.block_len, self.config.eval_tokens)
        return self.cluster.local_rows(inputs), self.cluster.local_rows(targets), targets.numel()

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["train"]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["scheduler"])
            self.cursor.position = DataPosition.from_dict(state["data_position"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.step = int(state["step"])
            self.seconds = float(state.get("seconds", 0.0))
            self.tokens_seen = int(state.get("tokens_seen", 0))
            self.best_val_loss = _optional_float(state.get("best_val_loss"))
            self.best_step = state.get("best_step")
            self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
            self.last_eval_step = state.get("last_eval_step")
            self.rnn_state = self._restored_rnn_state(state.get("rnn_state"))
            restore_rng_state(self._restored_rng_state(state))  # last: building the model and data drew numbers
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"the checkpoint's training state cannot be restored: {_first_line(exc)}") from exc

    def _restored_rnn_state(self, saved: list[torch.Tensor] | None) -> State | None:
        """This process's streams of the saved (global) RNN state. A state saved by a run with a different
        number of processes does not fit the stream layout: start from zeros (the data order differs anyway)."""
        if not saved:
            return None
        expected_rows = self.config.batch_size * self.cluster.world_size
        if saved[0].shape[1] != expected_rows:
            self.reporter.say(f"note: the checkpoint's RNN state is for {saved[0].shape[1]} streams, this run has "
                              f"{expected_rows}; continuing from a zero state")
            return None
        local = rank_slice_of_state(list(saved), self.cluster.rank, self.cluster.world_size)
        return tuple(t.to(self.device) for t in local)

    def _restored_rng_state(self, state: dict[str, Any]) -> dict[str, Any]:
        by_rank = state.get("rng_by_rank")
        if isinstance(by_rank, list) and len(by_rank) == self.cluster.world_size:
            return by_rank[self.cluster.rank]
        if self.cluster.rank > 0:  # no state saved for this rank: a fresh, still rank-specific stream
            seed_everything(self.config.seed + self.cluster.rank + 7919 * int(state["step"]))
            return capture_rng_state()
        return state["rng"]

    # ------------------------------------------------------------------------------------------------ run

    def run(self, signals: _StopSignals, stop_at_step: int | None) -> TrainResult:
        self._announce()
        start = time.monotonic()
        base_seconds = self.seconds
        window = _RateWindow()
        if self._evaluation_due():  # an interruption skipped the evaluation at this step: do it now
            self._evaluate(window)
        stop_reason = self.budget.reached(self.step, self.seconds, self.cursor.epochs_done())
        while stop_reason is None:
            lr = self.schedule.lr(self.step, self.budget.fraction(self.step, self.seconds, self.cursor.epochs_done()))
            step_start = time.monotonic()
            loss, tokens = self._train_step(lr)
            # All ranks agree on the loss, the clock and any signal, so they all take the same decisions below.
            agreed = self.cluster.agree_step(loss, tokens, base_seconds + time.monotonic() - start, signals.received)
            window.add(agreed.loss, agreed.tokens, time.monotonic() - step_start)
            self.step += 1
            self.tokens_seen += agreed.tokens
            self.seconds = agreed.seconds
            if not math.isfinite(agreed.loss):
                raise TrainingError(f"the loss became {agreed.loss} at step {self.step}; try a smaller --lr")
            self._show_progress(agreed.loss, lr, window)
            if agreed.signal is not None:
                return self._interrupted(f"interrupted by {signal.Signals(agreed.signal).name}", agreed.signal)
            if stop_at_step is not None and self.step >= stop_at_step:
                return self._interrupted(f"stopped at step {self.step}", None)
            if self._evaluation_due():
                self._evaluate(window)
                if self.config.patience is not None and self.evals_without_improvement >= self.config.patience:
                    stop_reason = f"early stopping: no improvement in {self.config.patience} evaluations"
                    break
            stop_reason = self.budget.reached(self.step, self.seconds, self.cursor.epochs_done())
        if self.step > 0 and self.last_eval_step != self.step:
            self._evaluate(window)
        self._save(self.last_out)
        return self._finish(stop_reason)

    def _announce(self) -> None:
        config, say = self.config, self.reporter.say
        for line in self.data.report:
            say(line)
        parameters = sum(p.numel() for p in self.model.parameters())
        say(f"model: {config.arch} {_shape(self.model_config, config.arch)}, {parameters / 1e6:.2f}M parameters "
            f"({parameters * 4 / 2**20:.1f} MiB fp32)")
        world = self.cluster.world_size
        per_step = self.config.batch_size * self.block_len * config.grad_accum * world
        layout = "streams" if config.is_rnn else "blocks"
        processes = f" x {world} processes" if self.cluster.distributed else ""
        say(f"batches: {config.batch_size} {layout} x {self.block_len} tokens x {config.grad_accum} accumulation"
            f"{processes} = {per_step:,} tokens/step, {self.cursor.batcher.batches_per_epoch(0):,} batches/epoch")
        if self.cluster.distributed:
            say(f"distributed: {world} processes ({self.cluster.backend}); each reads its own {config.batch_size} of "
                f"the {config.batch_size * world} {layout} per step; rank 0 writes files")
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.amp_dtype]
        say(f"device: {self.device} ({precision}, {torch.get_num_threads()} threads); "
            f"budget: {self.budget.describe()}; lr {config.lr:g} ({config.schedule}, warmup {config.warmup_steps})")
        if self.step:
            say(f"resuming at step {self.step} ({format_seconds(self.seconds)} trained so far)")

    def _train_step(self, lr: float) -> tuple[float, int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, tokens)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total_loss, tokens = 0.0, 0
        for micro in range(self.config.grad_accum):
            inputs, targets, starts_epoch = self.cursor.next()
            last = micro == self.config.grad_accum - 1
            with self.cluster.no_gradient_sync(self.train_model, last):
                with self._autocast():
                    logits = self._forward_train(inputs, starts_epoch)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
                scaled = loss / self.config.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total_loss += loss.item()
            tokens += targets.numel()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss / self.config.grad_accum, tokens

    def _forward_train(self, inputs: torch.Tensor, starts_epoch: bool) -> torch.Tensor:
        if not self.config.is_rnn:
            return self.train_model(inputs)[0]
        if starts_epoch or self.rnn_state is None:
            self.rnn_state = self.model.initial_state(inputs.shape[0], self.device)
        logits, state = self.train_model(inputs, self.rnn_state)
        self.rnn_state = detach_state(state)  # truncated BPTT: keep the values, cut the graph
        return logits

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _show_progress(self, loss: float, lr: float, window: _RateWindow) -> None:
        epochs = self.cursor.epochs_done()
        self.reporter.update(
            fraction=self.budget.fraction(self.step, self.seconds, epochs), step=self.step, loss=window.smoothed_loss,
            lr=lr, tokens_per_s=window.tokens_per_s, eta=self.budget.eta(self.step, self.seconds, epochs),
        )

    def _evaluation_due(self) -> bool:
        return self.step > 0 and self.step % self.config.eval_every == 0 and self.last_eval_step != self.step

    # ------------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean cross-entropy (nats/token) over the validation data, per the protocol in the module docstring."""
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        with self._autocast():
            if self.config.is_rnn:
                total = self._rnn_val_total()
            else:
                total = self._gpt_val_total()
        self.model.train(was_training)
        return self.cluster.total(total) / self.val_count

    def _rnn_val_total(self) -> float:
        total, state = 0.0, None
        if self.val_inputs.shape[0] == 0:  # more processes than validation streams: nothing for this one
            return total
        for start in range(0, self.val_inputs.shape[1], RNN_EVAL_CHUNK):
            chunk = slice(start, start + RNN_EVAL_CHUNK)
            logits, state = self.model(self.val_inputs[:, chunk], state)
            total += _summed_cross_entropy(logits, self.val_targets[:, chunk])
        return total

    def _gpt_val_total(self) -> float:
        windows, length = self.val_inputs.shape
        rows = max(1, GPT_EVAL_LOGITS // (length * self.model.config.vocab_size))
        total = 0.0
        for start in range(0, windows, rows):
            logits = self.model(self.val_inputs[start : start + rows])[0]
            total += _summed_cross_entropy(logits, self.val_targets[start : start + rows])
        return total

    def _evaluate(self, window: _RateWindow) -> None:
        val_loss = self.validation_loss()
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        self.schedule.observe(val_loss)
        if improved:
            self.best_val_loss, self.best_step = val_loss, self.step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        self.last_eval_step = self.step
        record = self._metrics_record(val_loss, window)
        record["best"] = improved
        self.last_metrics = record
        if self.metrics_log is not None:
            self.metrics_log.write(record)
        window.reset()
        self.reporter.say(_eval_line(record, improved))
        if self.is_main:
            self._print_samples()
        if improved:
            self._save(self.out)
        self._save(self.last_out)

    def _metrics_record(self, val_loss: float, window: _RateWindow) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.step,
            "seconds": round(self.seconds, 3),
            "epoch": round(self.cursor.epochs_done(), 4),
            "train_loss": window.mean_loss,
            "val_loss": val_loss,
            "val_ppl": perplexity(val_loss),
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens_per_s": round(window.tokens_per_s, 1),
            "val_tokens": self.val_count,
            "loss_unit": "nats/token",  # train_loss and val_loss; the val_* per word/char keys say their own unit
        }
        record.update(_val_units(val_loss, self.data))
        return record

    def _print_samples(self) -> None:
        length = SAMPLE_TOKENS.get(self.data.kind, 60)
        for index, prime in enumerate(self.config.prime):
            text = sample_continuation(self.model, self.data.tokenizer, prime, self.data.special["eos"], length,
                                       seed=self.config.seed + self.step + index, device=self.device)
            self.reporter.say(f"--- sample ({prime!r}) ---\n{text}\n---")

    # ------------------------------------------------------------------------------------------------ saving

    def _save(self, path: Path) -> None:
        """Every rank takes part (its RNG and RNN state are gathered); rank 0 writes."""
        per_rank = self.cluster.gather({
            "rng": capture_rng_state(),
            "rnn_state": [t.detach().cpu() for t in self.rnn_state] if self.rnn_state is not None else None,
        })
        if self.is_main:
            save_checkpoint(self._payload(per_rank), path)

    def _payload(self, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        # self.model is the bare module (never the DDP wrapper): names carry no "module." prefix.
        model_state = {name: tensor.detach().cpu() for name, tensor in self.model.state_dict().items()}
        rnn_states = [part["rnn_state"] for part in per_rank]
        rnn_state = interleave_states(rnn_states) if all(s is not None for s in rnn_states) else None
        return {
            "arch": self.config.arch,
            "model_config": self.model_config,
            "tokenizer": self.data.tokenizer.to_str(),
            "tokenizer_options": self._tokenizer_options(),
            "special_tokens": dict(self.data.special),
            "model": model_state,
            "generation": dict(self.generation),
            "train": {
                "step": self.step,
                "seconds": self.seconds,
                "tokens_seen": self.tokens_seen,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": per_rank[0]["rng"],
                "rng_by_rank": [part["rng"] for part in per_rank] if self.cluster.distributed else None,
                "world_size": self.cluster.world_size,
                "data_position": self.cursor.position.to_dict(),
                "rnn_state": rnn_state,
                "config": self.config.to_dict(),
                "best_val_loss": self.best_val_loss,
                "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement,
                "last_eval_step": self.last_eval_step,
                "tokenizer_kind": self.data.kind,
            },
            "metrics": dict(self.last_metrics) if self.last_metrics else None,
        }

    def _tokenizer_options(self) -> dict[str, Any]:
        """How the vocabulary was made (stored in the model file as textgen.tokenizer_options)."""
        config = self.config
        if config.init_from is not None or config.tokenizer not in ("char", "word", "bpe"):
            return {"kind": self.data.kind, "source": "file" if config.init_from is None else "pretrained"}
        return {"kind": config.tokenizer, "vocab_size": config.vocab_size, "min_frequency": config.min_frequency,
                "lowercase": config.lowercase}

    def _interrupted(self, reason: str, signum: int | None) -> TrainResult:
        self._save(self.last_out)
        checksums = self._check_ranks_in_sync()
        self.reporter.say(f"{reason} after step {self.step}; saved the latest state to {self.last_out} "
                          f"(continue with --resume {self.last_out})")
        return self._result(reason, signum, checksums)

    def _check_ranks_in_sync(self) -> tuple[str, ...]:
        """Distributed runs: compare every rank's weights (a checksum each) and fail loudly if they differ."""
        if not self.cluster.distributed:
            return ()
        checksums = tuple(self.cluster.gather(parameter_checksum(self.model)))
        if len(set(checksums)) != 1:
            raise TrainingError(f"the processes ended with different weights (checksums {', '.join(checksums)}); "
                                f"{self.last_out} holds rank 0's")
        self.reporter.say(f"ranks in sync: parameter checksum {checksums[0]} on all {len(checksums)} processes")
        return checksums

    def _finish(self, stop_reason: str) -> TrainResult:
        checksums = self._check_ranks_in_sync()
        if self.is_main:
            self._plot()
        summary = f"done ({stop_reason}): {self.step} steps in {format_seconds(self.seconds)}"
        if self.best_val_loss is not None:
            units = _val_units(self.best_val_loss, self.data)
            summary += (f"; best val loss {self.best_val_loss:.4f} nats/token (ppl {perplexity(self.best_val_loss):.2f}"
                        f"{_units_text(units)}) at step {self.best_step}; checkpoint {self.out} "
                        f"(latest: {self.last_out})")
        else:
            summary += f"; latest state in {self.last_out}"
        self.reporter.say(summary)
        return self._result(stop_reason, None, checksums)

    def _plot(self) -> None:
        plot_losses(metrics_path(self.out), loss_plot_path(self.out), f"{self.out.name}: {self.config.arch}",
                    unit=f"nats per {self.data.kind} token")

    def _result(self, reason: str, signum: int | None, checksums: tuple[str, ...] = ()) -> TrainResult:
        return TrainResult(self.step, self.seconds, self.best_val_loss, self.best_step, self.out, self.last_out,
                           reason, signum, checksums)


class _RateWindow:
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


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, targets.reshape(-1), reduction="sum").item()


def _eval_line(record: dict[str, Any], improved: bool) -> str:
    train = f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-"
    line = (f"step {record['step']} | {format_seconds(record['seconds'])} | train {train} | "
            f"val {record['val_loss']:.4f} nats/token (ppl {record['val_ppl']:.2f}{_units_text(record)})")
    line += f" | lr {record['lr']:.2e} | {format_rate(record['tokens_per_s'])}"
    return line + (" | best, saved" if improved else "")


def _val_units(val_loss: float, data: PreparedData) -> dict[str, Any]:
    """The validation loss per word and per character (repl.units), converted with the whole validation split's
    words/characters per token (exact when every validation token is scored, i.e. no --eval-tokens cap)."""
    if data.val_size is None or data.val_size.tokens == 0:
        return {}
    units = loss_units(val_loss, data.val_size)
    record = {"val_bpc": units["bits_per_char"]}
    if not data.char_level:
        record.update(val_nats_per_word=units["nats_per_word"], val_ppl_word=units["ppl_word"])
    return record


def _units_text(record: dict[str, Any]) -> str:
    text = ""
    if "val_nats_per_word" in record:
        text += f"; {record['val_nats_per_word']:.3f} nats/word, ppl/word {record['val_ppl_word']:.1f}"
    if "val_bpc" in record:
        text += f"; {record['val_bpc']:.3f} bits/char"
    return text


def _shape(model_config: dict[str, Any], arch: str) -> str:
    if arch in ("lstm", "gru"):
        return (f"{model_config.get('num_layers')}x{model_config.get('hidden_size')} "
                f"(embedding {model_config.get('embedding_size')}, vocab {model_config.get('vocab_size')})")
    return (f"{model_config.get('n_layer')} layers x {model_config.get('n_embd')} wide, "
            f"{model_config.get('n_head')} heads, context {model_config.get('context_length')}, "
            f"vocab {model_config.get('vocab_size')}")


def _resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("--device cuda was requested but no CUDA GPU is available to torch")
    return torch.device(requested)


def _tokenizer_from_json(text: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # the tokenizers library raises plain Exception for malformed JSON
        raise CheckpointError(f"the stored tokenizer cannot be read: {_first_line(exc)}") from exc


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
