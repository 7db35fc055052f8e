"""The training loop: model + optimizer + schedule over batches, with evaluation, checkpoints and exact resume.

Files a run writes (OUT is ``--out``):
- ``OUT``: the best checkpoint so far by validation loss (written when an evaluation improves on it);
- ``OUT.last``: the latest state (written at the first evaluation, then at evaluations at most every
  LAST_STATE_INTERVAL seconds, at the end, and when interrupted: a short run's evaluations stay cheap);
- ``OUT.metrics.jsonl``: one JSON object per evaluation; ``OUT.loss.png``: the loss curves, drawn at the end.
Both checkpoints are complete (models/checkpoint.py layout, with a ``train`` section) and either can be resumed.

Validation reports the mean cross-entropy in nats per token over the validation split (``--eval-tokens`` caps
it to its first N tokens), its perplexity, and bits per character for char-level tokenizers. Interim evaluations
score a fixed subset of those predictions (``--eval-interim-tokens``, train.evaluation.ValidationSet), the same
every time and scored exactly as the full pass scores them; the final evaluation of a run (end of its budget, early
stopping) scores them all, and its subset part is what it is compared with for the best checkpoint, like with like.
Each metrics record says what its ``val_loss`` covers (``val_scope``, ``val_tokens``); the best checkpoint's
recorded loss is a full pass when the final evaluation was the best, else the subset loss it was chosen by, and
said to be one. A split no larger than the subset is scored in full at every evaluation. It is scored with
runtime.scoring's protocols and padded-vocabulary rule (softmax over the tokenizer's ids only), so an exported
model scored by runtime.scoring.score_ids on the same tokens with ``Trainer.val_protocol`` gets the same number:
RNNs ``stateful`` with up to 32 streams (train.batches.rnn_eval_streams: the state carried through contiguous
pieces of the validation stream), GPT-2 ``windows`` of the training context (train.batches.gpt_eval_windows:
non-overlapping windows from an empty context, whole windows only).

Exact resume: a checkpoint stores the step, weights, optimizer and schedule state, every RNG state, the data
position (epoch, batch index), the RNN state carried between windows, the best validation loss and the resolved
config. Training N steps, stopping (signal or ``stop_at_step``), then resuming to 2N gives the same weights on
CPU with a fixed seed as training 2N steps at once. Evaluations never touch the training RNG (samples use their
own generator), and an evaluation skipped by an interruption is run first on resume. What a checkpoint holds of the
run, and restoring it, is train.checkpointing; fitting the warmup and evaluation cadence to the budget is
train.run_plan.

Under torchrun the same loop trains with DistributedDataParallel; train.distributed describes how batches,
evaluation, stopping decisions and checkpoint writing are shared out between the processes. Resuming with the
same number of processes continues exactly as well (per-rank RNG and RNN states are stored in the checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from models.checkpoint import (
    Checkpoint,
    CheckpointError,
    save_checkpoint_or_fallback,
)
from models.registry import build_model, load_weights, model_from_checkpoint
from models.rnn import State, detach_state
from runtime.defaults import generation_defaults
from runtime.errors import first_line
from runtime.scoring import ScoringProtocol
from train import distributed
from train.batches import (
    BlockBatcher,
    DataCursor,
    DataSizeError,
    StreamBatcher,
    gpt_eval_windows,
    rnn_eval_streams,
)
from train.checkpointing import rank_state, restore_run, run_checkpoint
from train.config import TrainConfig, TrainConfigError, TrainingError
from train.data import PreparedData, prepare_data
from train.distributed import Cluster, parameter_checksum
from train.evaluation import ValidationSet
from train.metrics import (
    MetricsLog,
    format_seconds,
    loss_plot_path,
    metrics_path,
    perplexity,
    plot_losses,
)
from train.optim import MuonWithAdamW, gpt2_optimizer, rnn_optimizer
from train.progress import ProgressReporter
from train.report import RateWindow, eval_line, model_shape, units_text, val_units
from train.resume import last_checkpoint_path
from train.rng import seed_everything
from train.run_plan import RunPlan, run_budget
from train.sample import sample_continuation
from train.schedule import LRSchedule
from train.stop_signals import StopSignals

LAST_STATE_INTERVAL = 60.0  # seconds between OUT.last writes at evaluations (each is a full checkpoint)
MAX_CURVE_POINTS = 4000  # training-loss points kept for the plot (thinned beyond that)
SAMPLE_TOKENS = {"char": 200}  # tokens sampled per --prime at each evaluation; 60 for other tokenizers
# ... at an interim evaluation that scores a subset: sampling one token at a time costs about half as much as
# scoring the whole subset in parallel (char GPT-2 preset; more on a busy machine, where the many small steps wait
# on each other's threads), so the samples there are shorter and the final evaluation prints the full length
INTERIM_SAMPLE_TOKENS = {"char": 80}  # 25 for other tokenizers


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
    best_val_tokens: int | None = None  # predictions behind best_val_loss (fewer than val_tokens: an interim subset)
    val_tokens: int | None = None  # predictions in a full validation pass


def train(
    config: TrainConfig,
    *,
    resume: Checkpoint | None = None,
    console: Console | None = None,
    live: bool | None = None,
    stop_at_step: int | None = None,
    started: float | None = None,
) -> TrainResult:
    """Run training as configured. ``resume`` is a checkpoint from load_resume_checkpoint. ``stop_at_step`` stops
    after that step exactly as an interruption would (no evaluation, last checkpoint written), which is how
    interrupted-and-resumed runs are reproduced in tests. Raises the domain errors of the corpus, tokenizer,
    checkpoint and Hugging Face import modules, TrainConfigError and DataSizeError.

    Started by torchrun (its environment variables set), the run is one rank of a distributed data-parallel run
    (see train.distributed); only rank 0 prints. ``started`` (time.monotonic()) is when the command started: a
    time budget counts the whole run's wall time from there (default: now)."""
    started = time.monotonic() if started is None else started
    config.validate()
    cluster = distributed.start(_resolve_device(config.device))
    try:
        if not cluster.is_main:
            console, live = Console(quiet=True), False
        console = console or Console()
        reporter = ProgressReporter(console, live)
        trainer = Trainer(config, resume, reporter, cluster, started)
        with StopSignals(second_acts_at_once=not cluster.distributed) as signals, reporter:
            return trainer.run(signals, stop_at_step)
    finally:
        distributed.finish(cluster)


class Trainer:
    """Everything one run holds. Construction loads data and model; ``run`` trains."""

    def __init__(self, config: TrainConfig, resume: Checkpoint | None, reporter: ProgressReporter,
                 cluster: Cluster | None = None, started: float | None = None) -> None:
        self.config = config
        self.started = time.monotonic() if started is None else started
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
        self.budget = run_budget(config)
        self.amp_dtype, self.scaler = self._amp()
        self.block_len = self._block_len()
        self.cursor = DataCursor(self._batcher())
        self.validation, self.val_protocol = self._validation_data()
        self.val_count = self.validation.count  # predictions in a full pass (over all processes)
        self.val_vocab = self.data.tokenizer.get_vocab_size(with_added_tokens=True)  # real ids: the softmax's range
        self.generation = generation_defaults(self.data.kind)
        # progress through the run (all restored on resume)
        self.step = 0
        self.seconds = 0.0
        self.tokens_seen = 0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.best_subset_loss: float | None = None  # the best evaluation's subset loss: what the next ones beat
        self.best_val_tokens: int | None = None  # predictions behind best_val_loss
        self.evals_without_improvement = 0
        self.last_eval_step: int | None = None
        self.last_eval_full = False  # whether the evaluation at last_eval_step scored every prediction
        self.rnn_state: State | None = None
        self.last_metrics: dict[str, Any] | None = None
        # fitting the run to its budget (train.run_plan), restored on resume so it continues exactly
        self.plan = RunPlan(config, self.budget, self.schedule, self.cluster, self.cursor.batcher, self.val_count,
                            reporter.say, self.validation.subset_count)
        self.train_curve: list[tuple[int, float]] = []  # (step, training loss) for the plot
        self.metrics_failed = False
        self.last_saved: float | None = None  # when OUT.last was last written (the run's clock, self.seconds)
        self.last_saved_step: int | None = None
        if resume is not None:
            restore_run(self, resume)
        self.metrics_log = MetricsLog(metrics_path(config.out), append=resume is not None) if self.is_main else None

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints (the only one outside torchrun)."""
        return self.cluster.is_main

    # ------------------------------------------------------------------------------------------------ setup

    def _load_data_and_model(self, resume: Checkpoint | None) -> tuple[PreparedData, nn.Module, dict[str, Any]]:
        """Data and model, the model built by models.registry: from the checkpoint on resume, from a Hugging Face
        GPT-2 with ``init_from``, else freshly initialised from the config."""
        config = self.config
        if resume is not None:
            tokenizer = _tokenizer_from_json(resume.tokenizer)
            data = prepare_data(config, tokenizer, dict(resume.special_tokens))
            return data, model_from_checkpoint(resume).train(), dict(resume.model_config)
        if config.init_from is not None:
            return self._load_pretrained()
        data = self._prepare_fresh_data()
        vocab = data.tokenizer.get_vocab_size(with_added_tokens=True)
        if config.is_rnn:
            shape = {"embedding_size": config.embedding_size, "hidden_size": config.hidden_size,
                     "num_layers": config.layers}
        else:
            shape = {"context_length": config.context_length, "n_layer": config.n_layer, "n_head": config.n_head,
                     "n_embd": config.n_embd}
        model = build_model(config.arch, {"vocab_size": vocab, **shape, "dropout": config.dropout})
        return data, model, model.config.to_dict()

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
        from models.hf_gpt2 import load_hf_gpt2

        pretrained, gpt_config, tokenizer_json, special = load_hf_gpt2(self.config.init_from)
        data = prepare_data(self.config, _tokenizer_from_json(tokenizer_json), dict(special))
        if self.config.dropout != gpt_config.dropout:  # imported models come with dropout off; fine-tuning may want it
            gpt_config = replace(gpt_config, dropout=self.config.dropout)
            model = build_model("gpt2", gpt_config.to_dict())
            load_weights(model, pretrained.state_dict(), "gpt2")
            pretrained = model
        return data, pretrained, gpt_config.to_dict()

    def _make_optimizer(self) -> torch.optim.Optimizer | MuonWithAdamW:
        config = self.config
        if config.is_rnn:
            return rnn_optimizer(self.model, config.optimizer, config.lr, config.weight_decay, (0.9, 0.99))
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

    def _validation_data(self) -> tuple[ValidationSet, ScoringProtocol]:
        """This process's validation rows with their interim subset, and the scoring protocol a full pass
        implements (runtime.scoring) over the first ``count + 1`` validation tokens."""
        ids = self.data.val_ids.to(self.device)
        if self.config.is_rnn:
            inputs, targets = rnn_eval_streams(ids, self.config.eval_tokens)
            protocol = ScoringProtocol.stateful(streams=inputs.shape[0])
        else:
            inputs, targets = gpt_eval_windows(ids, self.block_len, self.config.eval_tokens)
            protocol = ScoringProtocol.windows(inputs.shape[1])
        validation = ValidationSet(inputs, targets, self.config.is_rnn, self.config.eval_interim_tokens or None,
                                   self.cluster.local_rows)
        return validation, protocol

    # ------------------------------------------------------------------------------------------------ run

    def run(self, signals: StopSignals, stop_at_step: int | None) -> TrainResult:
        self._announce()
        start = self.started
        base_seconds = self.seconds
        window = RateWindow()
        self.plan.plan_if_known(self.step, self.seconds)
        if self._evaluation_due():  # an interruption skipped the evaluation at this step: do it now
            self._evaluate(window, final=self._last_step())
        stop_reason = self.budget.reached(self.step, self.seconds, self.cursor.epochs_done())
        while stop_reason is None:
            progress = self.budget.fraction(self.step, self.seconds, self.cursor.epochs_done(), self.plan.reserve())
            lr = self.schedule.lr(self.step, progress)
            step_start = time.monotonic()
            loss, tokens = self._train_step(lr)
            # All ranks agree on the loss, the clock and any signal, so they all take the same decisions below.
            agreed = self.cluster.agree_step(loss, tokens, base_seconds + time.monotonic() - start, signals.received)
            window.add(agreed.loss, agreed.tokens, time.monotonic() - step_start)
            self.plan.count_step(time.monotonic() - step_start)
            self.step += 1
            self.tokens_seen += agreed.tokens
            self.seconds = agreed.seconds
            if not math.isfinite(agreed.loss):
                raise TrainingError(f"the loss became {agreed.loss} at step {self.step}; try a smaller --lr")
            self._record_train_loss(agreed.loss)
            self.plan.calibrate(self.step, self.seconds, self.tokens_seen)
            self._show_progress(agreed.loss, lr, window)
            if agreed.signal is not None:
                return self._interrupted(f"interrupted by {signal.Signals(agreed.signal).name}", agreed.signal)
            if stop_at_step is not None and self.step >= stop_at_step:
                return self._interrupted(f"stopped at step {self.step}", None)
            if self._evaluation_due():
                self._evaluate(window, final=self._last_step())
                if self._stops_early():
                    stop_reason = f"early stopping: no improvement in {self.config.patience} evaluations"
                    break
            stop_reason = self.budget.reached(self.step, self.seconds, self.cursor.epochs_done(), self.plan.reserve())
        if self.step > 0 and not (self.last_eval_step == self.step and self.last_eval_full):
            self._evaluate(window, final=True)  # the run's last word on validation is a full pass
        if self.last_saved_step != self.step:
            self._save(self.last_out)
        return self._finish(stop_reason)

    def _record_train_loss(self, loss: float) -> None:
        self.train_curve.append((self.step, loss))
        if len(self.train_curve) > MAX_CURVE_POINTS:  # keep every other point: the curve's shape, bounded memory
            self.train_curve = self.train_curve[::2]

    def _announce(self) -> None:
        config, say = self.config, self.reporter.say
        for line in self.data.report:
            say(line)
        parameters = sum(p.numel() for p in self.model.parameters())
        say(f"model: {config.arch} {model_shape(self.model_config, config.arch)}, {parameters / 1e6:.2f}M parameters "
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
        wall = " of wall time, evaluations included" if self.budget.time_budget is not None else ""
        say(f"device: {self.device} ({precision}, {torch.get_num_threads()} threads); "
            f"budget: {self.budget.describe()}{wall}; lr {config.lr:g} ({config.schedule}, "
            f"warmup {self.schedule.warmup_steps})")
        say(f"validation: {self.val_count:,} tokens, protocol {self.val_protocol.describe()}")
        if self.validation.has_subset:
            say(f"interim evaluations score a fixed {self.validation.subset_count:,} of them (--eval-interim-tokens); "
                "the final one scores all")
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

    def _show_progress(self, loss: float, lr: float, window: RateWindow) -> None:
        epochs = self.cursor.epochs_done()
        self.reporter.update(
            fraction=self.budget.fraction(self.step, self.seconds, epochs), step=self.step, loss=window.smoothed_loss,
            lr=lr, tokens_per_s=window.tokens_per_s, eta=self.budget.eta(self.step, self.seconds, epochs),
        )

    def _evaluation_due(self) -> bool:
        return self.plan.evaluation_due(self.step, self.last_eval_step)

    def _last_step(self) -> bool:
        """Whether the run stops after this step's evaluation (its budget is used up, counting the evaluation at
        its interim cost): that evaluation is then the final one, a full pass."""
        seconds = self.seconds + self.plan.interim_estimate()
        return self.budget.reached(self.step, seconds, self.cursor.epochs_done(), self.plan.reserve()) is not None

    def _stops_early(self) -> bool:
        return self.config.patience is not None and self.evals_without_improvement >= self.config.patience

    # ------------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean cross-entropy (nats/token) of a full pass over the validation data: ``self.val_protocol`` over the
        first ``self.val_count + 1`` validation tokens, softmax over the tokenizer's ids (module docstring)."""
        with self._scoring():
            subset, state = self.validation.score_subset(self.model, self.val_vocab)
            return self._full_pass_loss(self.cluster.total(subset), state)

    def _full_pass_loss(self, subset_total: float, state: State | None) -> float:
        """The mean over every prediction, given the subset's total over all processes and the state its streams
        ended in (RNNs): the rest of the split is scored from there."""
        rest = self.validation.score_rest(self.model, self.val_vocab, state) if self.validation.has_subset else 0.0
        return (subset_total + self.cluster.total(rest)) / self.val_count

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        """The model in eval mode (and autocast where training uses it) for the length of a validation pass."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                yield
        finally:
            self.model.train(was_training)

    def _evaluate(self, window: RateWindow, final: bool) -> None:
        """Score the interim subset, decide improvement on it (like with like: every evaluation scores it), and
        complete the pass over the whole split when this is the run's final evaluation (``final``, or early stopping
        decided by this very result)."""
        began = time.monotonic()
        validation = self.validation
        with self._scoring():
            subset_total, state = validation.score_subset(self.model, self.val_vocab)
            subset_total = self.cluster.total(subset_total)
            subset_loss = subset_total / validation.subset_count
            # a repeat at the same step (an interim evaluation, then the final one) updates the best's number
            improved = (self.best_subset_loss is None or subset_loss < self.best_subset_loss
                        or (final and self.best_step == self.step))
            self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
            if validation.has_subset and (final or self._stops_early()):
                val_loss, predictions = self._full_pass_loss(subset_total, state), validation.count
            else:
                val_loss, predictions = subset_loss, validation.subset_count
        pass_seconds = time.monotonic() - began
        self.schedule.observe(subset_loss)  # a plateau is judged on numbers that compare
        if improved:
            self.best_val_loss, self.best_step, self.best_val_tokens = val_loss, self.step, predictions
            self.best_subset_loss = subset_loss
        self.last_eval_step, self.last_eval_full = self.step, predictions == validation.count
        record = self._metrics_record(val_loss, predictions, subset_loss, window)
        record["best"] = improved
        self.last_metrics = record
        self._log_metrics(record)
        window.reset()
        self.reporter.say(eval_line(record, improved))
        if self.is_main:
            self._print_samples(interim=predictions < validation.count)
        if improved:
            self._save(self.out)
        if self.last_saved is None or self.seconds - self.last_saved >= LAST_STATE_INTERVAL:
            self._save(self.last_out)
        # rank 0's measures on every rank, so all of them take the same stop decision from them
        eval_seconds, pass_seconds = self.cluster.broadcast((time.monotonic() - began, pass_seconds))
        self.seconds += eval_seconds  # the clock as the budget sees it, until the next step re-reads it
        self.plan.evaluated(self.step, self.seconds, eval_seconds, pass_seconds, predictions)

    def _log_metrics(self, record: dict[str, Any]) -> None:
        """Append to OUT.metrics.jsonl; a failed write is said once and training goes on (the checkpoints matter
        more than the log)."""
        if self.metrics_log is None or self.metrics_failed:
            return
        try:
            self.metrics_log.write(record)
        except OSError as exc:
            self.metrics_failed = True
            self.reporter.say(f"warning: cannot write {self.metrics_log.path} ({exc.strerror or exc}); "
                              "training goes on without the metrics log")

    def _metrics_record(self, val_loss: float, predictions: int, subset_loss: float,
                        window: RateWindow) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.step,
            "seconds": round(self.seconds, 3),
            "epoch": round(self.cursor.epochs_done(), 4),
            "train_loss": window.mean_loss,
            "val_loss": val_loss,
            "val_ppl": perplexity(val_loss),
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens_per_s": round(window.tokens_per_s, 1),
            "val_tokens": predictions,  # the predictions val_loss is the mean of
            "val_scope": "full" if predictions == self.val_count else "subset",
            "loss_unit": "nats/token",  # train_loss and val_loss; the val_* per word/char keys say their own unit
        }
        if self.validation.has_subset:  # the number every evaluation of this run has, for comparing them
            record.update(val_subset_loss=subset_loss, val_subset_tokens=self.validation.subset_count,
                          val_full_tokens=self.val_count)
        record.update(val_units(val_loss, self.data))
        return record

    def _print_samples(self, interim: bool) -> None:
        length = INTERIM_SAMPLE_TOKENS.get(self.data.kind, 25) if interim else SAMPLE_TOKENS.get(self.data.kind, 60)
        for index, prime in enumerate(self.config.prime):
            text = sample_continuation(self.model, self.data.tokenizer, prime, self.data.special["eos"], length,
                                       seed=self.config.seed + self.step + index, device=self.device)
            self.reporter.say(f"--- sample ({prime!r}) ---\n{text}\n---")

    # ------------------------------------------------------------------------------------------------ saving

    def _save(self, path: Path) -> None:
        """Every rank takes part (its RNG and RNN state are gathered); rank 0 writes."""
        per_rank = self.cluster.gather(rank_state(self))
        if path == self.last_out:
            # the run's clock, which every rank agrees on (train.distributed), so all of them decide alike
            self.last_saved, self.last_saved_step = self.seconds, self.step
        if self.is_main:
            written, failure = save_checkpoint_or_fallback(run_checkpoint(self, per_rank), path)
            if failure is not None:
                self.reporter.say(f"warning: could not write {path} ({failure.strerror or failure}); "
                                  f"saved it to {written} instead")

    def _interrupted(self, reason: str, signum: int | None) -> TrainResult:
        self._save(self.last_out)
        checksums = self._check_ranks_in_sync()
        if self.is_main:
            self._plot()
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
        wall = time.monotonic() - self.started
        summary = f"done ({stop_reason}): {self.step} steps in {format_seconds(self.seconds)} (wall {wall:.1f} s)"
        if self.best_val_loss is not None:
            units = val_units(self.best_val_loss, self.data)
            summary += (f"; best val loss {self.best_val_loss:.4f} nats/token (ppl {perplexity(self.best_val_loss):.2f}"
                        f"{units_text(units)}) at step {self.best_step}{self._best_scope()}; checkpoint {self.out} "
                        f"(latest: {self.last_out})")
        else:
            summary += f"; latest state in {self.last_out}"
        self.reporter.say(summary)
        return self._result(stop_reason, None, checksums)

    def _best_scope(self) -> str:
        """What the best loss covers, when it is not a full pass: the interim subset it was chosen by, and the
        final full pass beside it."""
        if self.best_val_tokens is None or self.best_val_tokens >= self.val_count:
            return ""
        scope = f" on the interim subset ({self.best_val_tokens:,} of {self.val_count:,} predictions)"
        final = self.last_metrics
        if final is not None and final.get("val_scope") == "full":
            scope += f"; full pass at step {final['step']}: {final['val_loss']:.4f}"
        return scope

    def _plot(self) -> None:
        """OUT.loss.png; a failure to draw or write it is a warning, never the end of a finished run."""
        try:
            plot_losses(metrics_path(self.out), loss_plot_path(self.out), f"{self.out.name}: {self.config.arch}",
                        train_curve=self.train_curve, unit=f"nats per {self.data.kind} token")
        except (OSError, ValueError, RuntimeError) as exc:
            self.reporter.say(f"warning: could not draw {loss_plot_path(self.out)} ({first_line(exc)})")

    def _result(self, reason: str, signum: int | None, checksums: tuple[str, ...] = ()) -> TrainResult:
        return TrainResult(self.step, self.seconds, self.best_val_loss, self.best_step, self.out, self.last_out,
                           reason, signum, checksums, self.best_val_tokens, self.val_count)


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
        raise CheckpointError(f"the stored tokenizer cannot be read: {first_line(exc)}") from exc

