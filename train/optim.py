"""Optimizers: AdamW, or Muon for a GPT-2's hidden matrices with AdamW for everything else (``--optimizer muon``).

Muon (momentum, then the update matrix orthogonalised by a Newton-Schulz iteration) trains small transformers in
fewer steps than AdamW: measured on the ``shakespeare-gpt2`` preset at 1,738 steps, see train/presets.py. It only
suits 2-D weights inside the blocks; embeddings, the tied LM head, LayerNorm gains and biases stay on AdamW.

Why not ``torch.optim.Muon``: it always runs the Newton-Schulz iteration in bfloat16, which CPUs without native
bf16 arithmetic (AVX2 machines such as this project's CI) emulate ~8x slower than the whole rest of a training step.
Here the iteration runs in float32 on the CPU and bfloat16 on CUDA. The update rule is the same as torch's with
``adjust_lr_fn="match_rms_adamw"``: the orthogonalised update is scaled to AdamW's typical RMS, so one learning rate
serves both halves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (Keller Jordan's Muon)
NS_STEPS = 5
MUON_MOMENTUM = 0.95
ADAMW_RMS = 0.2  # the update RMS Muon's step is scaled to, so AdamW's learning rate carries over


def orthogonalize(matrix: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """An approximation of U V^T for matrix = U S V^T (every singular value pushed towards 1)."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    wide = x.size(0) <= x.size(1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return (x if wide else x.T).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: Nesterov momentum, orthogonalised update, decoupled weight decay."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0,
                 momentum: float = MUON_MOMENTUM) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon only takes 2-D parameters")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = orthogonalize(param.grad.lerp(buffer, momentum))  # Nesterov
                param.mul_(1 - lr * decay)
                param.add_(update, alpha=-lr * ADAMW_RMS * math.sqrt(max(param.shape)))
        return loss


class MuonWithAdamW:
    """Muon for the given matrices and AdamW for the other parameters, driven as one optimizer: ``param_groups``
    lists both (setting a group's ``lr`` reaches the right half), ``state_dict`` holds both for exact resume."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        self.param_groups = [*muon.param_groups, *adamw.param_groups]

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("this checkpoint's optimizer state is not Muon + AdamW")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def gpt2_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float,
                   betas: tuple[float, float]) -> torch.optim.Optimizer | MuonWithAdamW:
    """AdamW decaying only matrices, or (``kind == "muon"``) Muon for the 2-D weights inside the blocks."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if p.dim() == 2 and ".h." in f".{name}"] if kind == "muon" else []
    chosen = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in chosen]
    adamw = torch.optim.AdamW([
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ], lr=lr, betas=betas)
    if not hidden:
        return adamw
    return MuonWithAdamW(Muon(hidden, lr=lr, weight_decay=weight_decay), adamw)
