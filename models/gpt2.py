"""GPT-2 with an explicit key/value cache, weight-compatible with Hugging Face's GPT-2.

``forward(input_ids[B, T], past, position_ids, attention_mask) -> (logits[B, T, V], present)``. ``past`` is a
list with one ``(key, value)`` pair per layer, each ``[B, n_head, past_len, head_dim]``; ``present`` is ``past``
with the T new keys/values appended, so feeding it back continues the sequence. The module names mirror
Hugging Face's (``transformer.h.0.attn.c_attn`` ...) so an HF state dict maps one-to-one (HF's Conv1D weights
are stored transposed relative to nn.Linear; models/hf_gpt2.py transposes them).

Attention has two code paths, chosen only by which arguments are given (never by tensor values or sizes, so
the graph traces to ONNX cleanly):
- no ``past`` and no ``attention_mask`` (training): SDPA with ``is_causal=True``, the fast path;
- otherwise: an explicit boolean mask, causal aligned BOTTOM-RIGHT (query i of the T new tokens sees keys
  0..past_len+i) and combined with the padding mask. SDPA's ``is_causal`` aligns top-left, which is wrong as
  soon as there is a past, so it is never used together with a cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [batch, n_head, past_len, head_dim]


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    context_length: int = 1024  # number of learned positions (HF n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    bias: bool = True  # biases in Linear and LayerNorm layers (HF GPT-2 has them)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if not self.layer_norm_epsilon > 0:
            raise ValueError("layer_norm_epsilon must be > 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPT2Config:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def causal_mask(query_len: int, key_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``[query_len, key_len]``, True = may attend, aligned bottom-right: the queries are the LAST
    ``query_len`` positions of the ``key_len`` keys, so query i sees keys ``0 .. key_len - query_len + i``."""
    query_slot = torch.arange(query_len, device=device).unsqueeze(1) + (key_len - query_len)
    key_slot = torch.arange(key_len, device=device).unsqueeze(0)
    return key_slot <= query_slot


def attention_keep_mask(
    query_len: int, key_len: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean ``[B or 1, 1, query_len, key_len]``: bottom-right causal AND not padding.

    A query whose every key is masked (a left-padding position, which sees only padding) would make softmax
    produce NaN; such rows are opened to all keys instead. Their outputs are garbage but finite, and no real
    token attends to a padding position, so they never leak into real tokens' logits."""
    keep = causal_mask(query_len, key_len, device).unsqueeze(0).unsqueeze(0)
    if attention_mask is not None:
        keep = keep & (attention_mask != 0).unsqueeze(1).unsqueeze(2)
    return keep | ~keep.any(dim=-1, keepdim=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, past: KV | None, keep: torch.Tensor | None) -> tuple[torch.Tensor, KV]:
        batch, seq, width = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        dropout_p = self.dropout if self.training else 0.0
        if keep is None:
            attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
        attended = attended.transpose(1, 2).reshape(batch, seq, width)
        return self.resid_dropout(self.c_proj(attended)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # HF's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: KV | None, keep: torch.Tensor | None) -> tuple[torch.Tensor, KV]:
        attended, present = self.attn(self.ln_1(x), past, keep)
        x = x + attended
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.context_length, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embedding
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the residual's variance does not grow with depth.
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        past: list[KV] | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        seq = input_ids.shape[1]
        past_len = past[0][0].shape[2] if past else 0
        self._check_lengths(seq, past, past_len)
        if position_ids is None:
            position_ids = (torch.arange(seq, device=input_ids.device) + past_len).unsqueeze(0)
        keep = None
        if past is not None or attention_mask is not None:
            keep = attention_keep_mask(seq, past_len + seq, attention_mask, input_ids.device)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        present: list[KV] = []
        for index, block in enumerate(self.transformer.h):
            x, layer_present = block(x, past[index] if past is not None else None, keep)
            present.append(layer_present)
        return self.lm_head(self.transformer.ln_f(x)), present

    def _check_lengths(self, seq: int, past: list[KV] | None, past_len: int) -> None:
        """Readable errors for eager callers. Skipped while tracing/exporting: a Python comparison on a symbolic
        size would become a guard that specialises the exported graph's dynamic axes."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return
        if past is not None and len(past) != self.config.n_layer:
            raise ValueError(f"past has {len(past)} layers, the model has {self.config.n_layer}")
        if past_len + seq > self.config.context_length:
            raise ValueError(
                f"sequence of {past_len + seq} tokens (past {past_len} + new {seq}) exceeds the context length "
                f"{self.config.context_length}"
            )

    def empty_past(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> list[KV]:
        """A zero-length cache: passing it is the same as no cache, but takes the explicit-mask path the ONNX
        graph uses."""
        reference = self.transformer.wte.weight
        shape = (batch, self.config.n_head, 0, self.config.head_dim)
        device = reference.device if device is None else device
        dtype = reference.dtype if dtype is None else dtype
        return [
            (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(self.config.n_layer)
        ]

    def num_parameters(self) -> int:
        """Trainable parameter count; the tied embedding/LM head is counted once."""
        return sum(parameter.numel() for parameter in self.parameters())
