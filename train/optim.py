"""Optimizers: AdamW, or Muon for a GPT-2's hidden matrices / an RNN's recurrent-cell matrices with AdamW for
everything else (``--optimizer muon``).

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
# Wide matrices at least this many times longer than high take the Gram-matrix form of the iteration (fewer FLOPs
# from 1.5x on; 2x leaves a margin for the extra small products).
GRAM_FORM_MIN_RATIO = 2
ADAMW_RMS = 0.2  # the update RMS Muon's step is scaled to, so AdamW's learning rate carries over


def orthogonalize(matrix: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """An approximation of U V^T for matrix = U S V^T (every singular value pushed towards 1).

    ``matrix`` may be a stack (..., m, n) of same-shape matrices: one batched iteration for all of them costs fewer
    small-matrix calls than one per matrix.
    """
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral <= Frobenius norm <= 1: the iteration converges
    rows, cols = x.shape[-2:]
    if x.dtype == torch.float32 and cols >= GRAM_FORM_MIN_RATIO * rows:
        x = _newton_schulz_on_gram(x, steps)
    else:
        x = _newton_schulz(x, steps)
    return (x if wide else x.mT).to(matrix.dtype)


def _newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


def _newton_schulz_on_gram(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iteration carried out on the (m, m) Gram matrix G = X X^T of a wide (m, n) X.

    Each step multiplies X by P = aI + bG + cG^2, so the next Gram matrix is P G P, and every P and G is a
    polynomial in the first G (they commute): X_final = (P_k ... P_1) X_0. That touches the long side twice instead
    of twice per step: for the 128 x 512 MLP matrices of the shakespeare-gpt2 preset 0.55x the multiply work of the
    plain iteration. Only in float32: bfloat16 loses too much squaring G.
    """
    a, b, c = NS_COEFFICIENTS
    gram = x @ x.mT
    identity = torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    product: torch.Tensor | None = None
    for step in range(steps):
        poly = a * identity + b * gram + c * (gram @ gram)
        product = poly if product is None else poly @ product
        if step < steps - 1:
            gram = poly @ gram @ poly
    assert product is not None
    return product @ x


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
            with_grad = [p for p in group["params"] if p.grad is not None]
            for same_shape in _by_shape(with_grad):
                self._step_same_shape(same_shape, group["lr"], group["weight_decay"], group["momentum"])
        return loss

    def _step_same_shape(self, params: list[nn.Parameter], lr: float, decay: float, momentum: float) -> None:
        """One step for matrices of one shape, orthogonalised together as a stack."""
        nesterov = []
        for param in params:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param)
            buffer = state["momentum_buffer"]
            buffer.lerp_(param.grad, 1 - momentum)
            nesterov.append(param.grad.lerp(buffer, momentum))
        updates = orthogonalize(torch.stack(nesterov))
        scale = lr * ADAMW_RMS * math.sqrt(max(params[0].shape))
        for param, update in zip(params, updates, strict=True):
            param.mul_(1 - lr * decay)
            param.add_(update, alpha=-scale)


def _by_shape(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    groups: dict[tuple[int, ...], list[nn.Parameter]] = {}
    for param in params:
        groups.setdefault(tuple(param.shape), []).append(param)
    return list(groups.values())


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


def rnn_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float,
                  betas: tuple[float, float]) -> torch.optim.Optimizer | MuonWithAdamW:
    """AdamW, or (``kind == "muon"``) Muon for the recurrent cell's input and hidden matrices (``rnn.weight_ih_l*``,
    ``rnn.weight_hh_l*``, each orthogonalised whole: the per-gate blocks cost 1.3x more per step for no gain at
    equal time, docs/benchmarks.md) with AdamW for the embedding, the head and the biases."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if p.dim() == 2 and name.startswith("rnn.weight_")] if kind == "muon" else []
    rest = _the_rest(named, hidden)
    return _with_muon(hidden, torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=weight_decay), lr,
                      weight_decay)


def gpt2_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float,
                   betas: tuple[float, float]) -> torch.optim.Optimizer | MuonWithAdamW:
    """AdamW decaying only matrices, or (``kind == "muon"``) Muon for the 2-D weights inside the blocks."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if p.dim() == 2 and ".h." in f".{name}"] if kind == "muon" else []
    rest = _the_rest(named, hidden)
    adamw = torch.optim.AdamW([
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ], lr=lr, betas=betas)
    return _with_muon(hidden, adamw, lr, weight_decay)


def _the_rest(named: list[tuple[str, nn.Parameter]], hidden: list[nn.Parameter]) -> list[nn.Parameter]:
    chosen = {id(p) for p in hidden}
    return [p for _, p in named if id(p) not in chosen]


def _with_muon(hidden: list[nn.Parameter], adamw: torch.optim.AdamW, lr: float,
               weight_decay: float) -> torch.optim.Optimizer | MuonWithAdamW:
    """AdamW alone when Muon has no matrices to take, else both driven as one optimizer."""
    if not hidden:
        return adamw
    return MuonWithAdamW(Muon(hidden, lr=lr, weight_decay=weight_decay), adamw)
