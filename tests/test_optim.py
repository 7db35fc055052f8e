"""train.optim: Muon's orthogonalisation, the Muon/AdamW split of a GPT-2's parameters, and that Muon trains."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn import functional as F

from models.gpt2 import GPT2, GPT2Config
from models.rnn import RNNConfig, RNNLanguageModel
from train.optim import Muon, MuonWithAdamW, _newton_schulz, gpt2_optimizer, orthogonalize, rnn_optimizer


def _matrix_with_spread_singular_values(rows: int, cols: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator))
    k = min(rows, cols)
    singular = torch.logspace(-1, 1, k)  # 0.1 .. 10
    return u[:, :k] @ torch.diag(singular) @ v[:, :k].T


def test_orthogonalize_pushes_singular_values_towards_one() -> None:
    for rows, cols in ((48, 160), (160, 48), (64, 64)):
        matrix = _matrix_with_spread_singular_values(rows, cols)
        result = orthogonalize(matrix)
        assert result.shape == matrix.shape and result.dtype == torch.float32
        singular = torch.linalg.svdvals(result)
        # the quintic iteration lands singular values in a band around 1 (about 0.7..1.2), not exactly on it
        assert singular.max() < 1.25 and singular.min() > 0.6
        # the singular vectors are kept: result ~ U V^T of the input
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        cosine = F.cosine_similarity(result.flatten(), (u @ vh).flatten(), dim=0)
        assert cosine > 0.95


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (32, 128), (40, 64), (64, 64)])
def test_every_form_of_the_iteration_gives_the_plain_iteration_in_float64(shape: tuple[int, int]) -> None:
    """The Gram-matrix form (wide matrices) and the batched stack agree with the textbook iteration. Squaring into
    the Gram matrix costs float32 precision: ~3e-5 off on entries of ~0.3 for these 100:1 singular-value spreads
    (the plain float32 iteration: ~5e-7), far inside the bfloat16 iteration's ~4e-3 that Muon is known to train with."""
    stack = torch.stack([_matrix_with_spread_singular_values(*shape) * scale for scale in (1.0, 3e-3, 40.0)])
    wide = stack if shape[0] <= shape[1] else stack.mT
    normalised = wide.double() / wide.double().norm(dim=(-2, -1), keepdim=True)
    reference = torch.stack([_newton_schulz(matrix, 5) for matrix in normalised])
    if shape[0] > shape[1]:
        reference = reference.mT
    batched = orthogonalize(stack)
    one_by_one = torch.stack([orthogonalize(matrix) for matrix in stack])
    assert torch.allclose(batched.double(), reference, atol=1e-4)
    assert torch.allclose(one_by_one, batched, atol=1e-5)


def test_muon_steps_matrices_of_one_shape_together_as_they_would_alone() -> None:
    """Stacking same-shape matrices is an implementation detail: each gets the update it would get alone."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(16, 48), (16, 48), (48, 16), (16, 16)]
    together = [torch.nn.Parameter(torch.randn(*shape, generator=generator)) for shape in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    grads = [torch.randn(*shape, generator=generator) for shape in shapes]
    optimizers = [Muon(together, lr=0.02, weight_decay=0.1)] + [Muon([p], lr=0.02, weight_decay=0.1) for p in alone]
    for _ in range(3):
        for params in (together, alone):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(together[0], together[1])  # same shape, different data: not mixed up


def test_the_split_puts_block_matrices_on_muon_and_the_rest_on_adamw() -> None:
    model = GPT2(GPT2Config(vocab_size=50, context_length=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = gpt2_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(optimizer, MuonWithAdamW) and isinstance(optimizer.muon, Muon)
    on_muon = {id(p) for group in optimizer.muon.param_groups for p in group["params"]}
    on_adamw = {id(p) for group in optimizer.adamw.param_groups for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[i] for i in on_muon) == sorted(
        name for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("transformer.h."))
    assert not on_muon & on_adamw and on_muon | on_adamw == set(names)
    assert id(model.transformer.wte.weight) in on_adamw  # the tied embedding / LM head stays on AdamW
    assert len(optimizer.param_groups) == 3  # setting each group's lr reaches both halves
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    assert optimizer.muon.param_groups[0]["lr"] == optimizer.adamw.param_groups[1]["lr"] == 0.5


def _fit(model: torch.nn.Module, optimizer: Any, data: torch.Tensor, steps: int = 60) -> list[float]:
    """Train ``model`` (logits first in its output) on one fixed batch of 20-token ids; the loss of each step."""
    losses = []
    for _ in range(steps):
        logits = model(data[:, :-1])[0]
        loss = F.cross_entropy(logits.reshape(-1, 20), data[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_muon_fits_a_tiny_model() -> None:
    """Muon + AdamW drive the loss of a tiny GPT-2 down on a fixed batch; its quality at scale is measured in
    benchmarks/quality.py, not here."""
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, 20, (8, 17), generator=generator)
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=20, context_length=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = gpt2_optimizer(model, "muon", lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))
    before = [p.detach().clone() for p in optimizer.muon.param_groups[0]["params"]]
    losses = _fit(model, optimizer, data)
    assert losses[-1] < losses[0] - 1.5, losses
    after = optimizer.muon.param_groups[0]["params"]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # Muon really moved its matrices


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_muon_takes_the_cell_matrices_and_fits_a_tiny_model(cell: str) -> None:
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, 20, (8, 17), generator=generator)
    torch.manual_seed(0)
    model = RNNLanguageModel(RNNConfig(vocab_size=20, cell=cell, embedding_size=16, hidden_size=32, num_layers=2))
    optimizer = rnn_optimizer(model, "muon", lr=1e-2, weight_decay=0.0, betas=(0.9, 0.99))
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    on_muon = sorted(names[id(p)] for group in optimizer.muon.param_groups for p in group["params"])
    assert on_muon == ["rnn.weight_hh_l0", "rnn.weight_hh_l1", "rnn.weight_ih_l0", "rnn.weight_ih_l1"]
    assert isinstance(rnn_optimizer(model, "adamw", 1e-2, 0.0, (0.9, 0.99)), torch.optim.AdamW)
    losses = _fit(model, optimizer, data)
    assert losses[-1] < losses[0] - 1.5, losses
