"""Data-parallel training across processes: ``torchrun --nproc_per_node N -m train ...``.

torchrun (or ``python -m torch.distributed.run``) starts N copies of the same command and gives each the
variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. When they are set, training joins a process
group (NCCL when the device is CUDA, each process on GPU LOCAL_RANK; gloo on CPU) and wraps the model in
DistributedDataParallel; without them nothing here talks to anyone and the single-process path runs as before.

How the work is split (``--batch-size`` is PER PROCESS; one optimizer step uses ``batch_size x world_size``
streams or blocks, so adding processes adds throughput at the same per-device memory, as in PyTorch's DDP
convention; lower ``--lr`` or ``--batch-size`` yourself if a bigger global batch does not suit your run):
- RNNs: the training tokens are cut into ``batch_size x world_size`` contiguous streams; rank r reads streams
  r, r + W, r + 2W, ... for the whole run, so the hidden state it carries between windows stays its own.
- GPT-2: every rank builds the same seeded block order (train.batches.BlockBatcher with the global batch) and
  rank r takes every W-th block of each batch.
- Validation runs on all ranks, each on every W-th validation stream/window; the summed losses are all-reduced,
  so every rank computes the identical value (and so takes identical best-checkpoint/early-stopping decisions).
- Only rank 0 writes checkpoints, the metrics log, the plot, samples and progress. Checkpoints hold the
  unwrapped module's state_dict, so export and resume read them as any other checkpoint; the per-rank RNG states
  and RNN states are gathered into them so a resume with the same number of processes continues exactly.
- Every step the ranks exchange (loss, tokens, elapsed seconds, signal received): the learning rate and the time
  budget follow the slowest rank's clock, a SIGINT/SIGTERM on any rank stops all of them after the same step,
  and a diverged loss on any rank stops all of them — nobody is left waiting in a collective.
- Randomness that should differ per rank (dropout) is seeded with ``seed + rank`` after the model is built;
  the model's initial weights come from ``seed`` on every rank (and DDP broadcasts rank 0's anyway).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import distributed as dist
from torch import nn

from train.config import TrainConfigError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Batcher(Protocol):
    def batches_per_epoch(self, epoch: int) -> int: ...

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class StepAgreement:
    """What all ranks agree on after a step: the mean loss, the total tokens, the slowest clock, and the signal
    any rank received (None when none did)."""

    loss: float
    tokens: int
    seconds: float
    signal: int | None


@dataclass
class Cluster:
    """The processes training together. ``Cluster.single(device)`` is the plain one-process run: every
    collective below is then the identity, so the training loop has one code path."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None  # None: no process group (single process)
    owns_group: bool = field(default=False, repr=False)  # we initialised the group, so we tear it down

    @classmethod
    def single(cls, device: torch.device) -> Cluster:
        return cls(rank=0, world_size=1, local_rank=0, device=device)

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --------------------------------------------------------------------------------------------- model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run training forward passes through: DDP around ``model`` when distributed."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_gradient_sync(self, wrapped: nn.Module, last_micro_batch: bool) -> AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step (the gradients
        accumulate locally and are averaged once)."""
        if not self.distributed or last_micro_batch:
            return nullcontext()
        return wrapped.no_sync()

    # --------------------------------------------------------------------------------------------- data

    def shard(self, batcher: Batcher) -> Batcher:
        return batcher if not self.distributed else RankShard(batcher, self.rank, self.world_size)

    def local_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of a ``[rows, ...]`` tensor: rows rank, rank + W, ..."""
        return rows if not self.distributed else rows[self.rank :: self.world_size]

    # --------------------------------------------------------------------------------------------- collectives

    def agree_step(self, loss: float, tokens: int, seconds: float, signal: int | None) -> StepAgreement:
        if not self.distributed:
            return StepAgreement(loss, tokens, seconds, signal)
        mine = torch.tensor([loss, float(tokens), seconds, float(signal or 0)], dtype=torch.float64,
                            device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine)
        table = torch.stack(everyone).cpu()
        losses = table[:, 0]
        # NaN/inf on any rank must reach everyone as non-finite, which the mean does.
        mean_loss = float(losses.mean()) if bool(torch.isfinite(losses).all()) else math.nan
        signum = int(table[:, 3].max())
        return StepAgreement(mean_loss, int(table[:, 1].sum()), float(table[:, 2].max()), signum or None)

    def total(self, value: float) -> float:
        """``value`` summed over all ranks (float64); every rank gets the same result."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total.item())

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable; tensors should be on the CPU), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class RankShard:
    """One rank's rows of a batcher built with the global batch: rows rank, rank + W, ... of every batch.

    Every rank walks the same (epoch, index) positions, so a checkpoint's data position means the same on all of
    them, and the rows a rank reads at a given row slot are always the same streams (RNN state continuity)."""

    def __init__(self, batcher: Batcher, rank: int, world_size: int) -> None:
        self.batcher = batcher
        self.rank = rank
        self.world_size = world_size

    def batches_per_epoch(self, epoch: int) -> int:
        return self.batcher.batches_per_epoch(epoch)

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.batcher.batch(epoch, index)
        return inputs[self.rank :: self.world_size], targets[self.rank :: self.world_size]


# ------------------------------------------------------------------------------------------------- setup


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return all(name in env for name in TORCHRUN_VARIABLES)


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """True unless this is a torchrun worker with RANK > 0 (for output decided before the group exists)."""
    env = os.environ if environ is None else environ
    return env.get("RANK", "0").strip() in ("", "0")


def ranks_from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; TrainConfigError if they make no sense."""
    env = os.environ if environ is None else environ
    try:
        rank, world, local = (int(env[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise TrainConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise TrainConfigError(f"inconsistent torchrun variables: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def start(device: torch.device, environ: Mapping[str, str] | None = None) -> Cluster:
    """Join the process group described by torchrun's environment, or a single-process Cluster without it.

    An already initialised default group (a caller that set it up itself) is reused and left open."""
    if dist.is_available() and dist.is_initialized():
        return _existing_group(device)
    if not launched_by_torchrun(environ):
        return Cluster.single(device)
    if not dist.is_available():
        raise TrainConfigError("this torch build has no torch.distributed; run without torchrun")
    rank, world, local = ranks_from_environment(environ)
    device, backend = _device_and_backend(device, local)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    return Cluster(rank, world, local, device, backend, owns_group=True)


def finish(cluster: Cluster) -> None:
    """Leave the process group if we created it."""
    if cluster.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _device_and_backend(device: torch.device, local_rank: int) -> tuple[torch.device, str]:
    if device.type != "cuda":
        if not dist.is_gloo_available():
            raise TrainConfigError("CPU training under torchrun needs the gloo backend, missing from this torch")
        return device, "gloo"
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:
        raise TrainConfigError(
            f"torchrun started more processes on this machine than it has GPUs ({gpus}): local rank {local_rank} "
            f"has none; use --nproc_per_node {gpus} or --device cpu"
        )
    if not dist.is_nccl_available():
        raise TrainConfigError("CUDA training under torchrun needs the NCCL backend, missing from this torch")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device, "nccl"


def _existing_group(device: torch.device) -> Cluster:
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return Cluster(rank, world, local, device, dist.get_backend(), owns_group=False)


# ------------------------------------------------------------------------------------------------- helpers


def parameter_checksum(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the model's state_dict: names, dtypes, shapes and exact bytes. Equal
    checksums across ranks mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def interleave_states(per_rank: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-rank RNN states ``[layers, b, hidden]`` (rank r holding global streams r, r + W, ...) -> the global
    states ``[layers, b x W, hidden]`` in stream order. The inverse of ``Cluster.local_rows`` on axis 1."""
    combined = []
    for parts in zip(*per_rank, strict=True):
        stacked = torch.stack(parts, dim=2)  # [layers, b, W, hidden]: stream i * W + r at [:, i, r]
        combined.append(stacked.reshape(stacked.shape[0], -1, stacked.shape[-1]))
    return combined


def rank_slice_of_state(state: list[torch.Tensor], rank: int, world_size: int) -> list[torch.Tensor]:
    return [tensor[:, rank::world_size] for tensor in state]
