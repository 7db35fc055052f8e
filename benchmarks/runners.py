"""The decode loops the benchmarks compare: ours (runtime.generate's Session, the runtime's raw steps), the
PyTorch eager loops over the same weights with a torch sampler chain, and Hugging Face ``generate``; and the
sampler settings they all mirror (``FULL_CHAIN``, ``GREEDY``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import BenchmarkError
from benchmarks.model_files import ModelSpec, checkpoint_file

# The full sampler chain the "FULL sampler chain" comparisons use: every step of runtime.sampling that the torch and
# Hugging Face loops can mirror (repetition penalty -> top-k -> top-p -> min-p -> temperature, llama.cpp's order).
FULL_CHAIN: dict[str, Any] = {
    "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1, "penalty_last_n": 64,
}
GREEDY: dict[str, Any] = {"temperature": 0.0}


# --- our runtime ---------------------------------------------------------------------------------------------


def open_model(path: Path, threads: int, device: str = "cpu") -> Any:
    import onnxruntime

    from runtime.session import OnnxModel

    onnxruntime.set_default_logger_severity(3)
    return OnnxModel.open(path, device=device, threads=threads)


def ours_session(model: Any, sampler: dict[str, Any], tokens: int, seed: int = 1234) -> Any:
    """A runtime.generate.Session that produces exactly ``tokens`` tokens per turn (end-of-text suppressed)."""
    from runtime.generate import Session
    from runtime.settings import Settings

    settings = Settings(model.info.generation)
    for key, value in {**sampler, "max_new_tokens": tokens, "min_new_tokens": tokens, "seed": seed}.items():
        settings.set(key, value, source="cli")
    return Session(model, settings)


def ours_generate(session: Any, prompt: str) -> Any:
    """One fresh turn: reset, then generate (prompt prefill included in the time, as for the other runners)."""
    session.reset()
    return session.generate(prompt)


def fed_context(session: Any, result: Any) -> list[int]:
    """The ids the session fed before the generated tokens (the prompt plus whatever the session adds, such as a
    leading end-of-text at a document start): what the torch and Hugging Face runners must be given."""
    return list(session.history[: len(session.history) - len(result.tokens)])


def decode_seconds_per_token(model: Any, position: int, steps: int, token: int = 1) -> float:
    """Feed ``position`` tokens (untimed), then time ``steps`` single-token runtime steps: seconds per step."""
    import numpy as np

    state, past = model.initial_state(1), 0
    if position:
        prompt = np.full((1, position), token, dtype=np.int64)
        _, state = model.run(prompt, state, 0)
        past = position
    step = np.full((1, 1), token, dtype=np.int64)
    started = time.perf_counter()
    for _ in range(steps):
        _, state = model.run(step, state, past)
        past += 1
    return (time.perf_counter() - started) / steps


# --- PyTorch and Hugging Face runners ------------------------------------------------------------------------


def torch_model(spec: ModelSpec, cache_dir: Path, threads: int) -> Any:
    """The same weights as the exported file, as the PyTorch module (eval mode)."""
    import torch

    from models.checkpoint import load_checkpoint
    from models.registry import model_from_checkpoint

    torch.set_num_threads(threads)
    return model_from_checkpoint(load_checkpoint(checkpoint_file(spec, cache_dir)))


def hf_model(torch_gpt2: Any, eos: int) -> Any:
    """A transformers GPT2LMHeadModel holding the same weights as ``torch_gpt2`` (models.gpt2.GPT2)."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    config = torch_gpt2.config
    hf_config = HFConfig(vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.n_embd,
                         n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=config.layer_norm_epsilon,
                         bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(hf_config).eval()
    state = {}
    for name, tensor in torch_gpt2.state_dict().items():
        # HF's Conv1D stores [in, out]; our nn.Linear stores [out, in].
        conv = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) and tensor.dim() == 2
        state[name] = tensor.t().contiguous() if conv else tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [name for name in missing if not name.endswith((".attn.bias", ".attn.masked_bias"))]
    if real_missing or unexpected:
        raise BenchmarkError(f"weight mapping to transformers failed: missing {real_missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model


def hf_sampling_kwargs(sampler: dict[str, Any]) -> dict[str, Any]:
    if sampler.get("temperature", 1.0) == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampler["temperature"], "top_k": sampler["top_k"],
            "top_p": sampler["top_p"], "min_p": sampler["min_p"],
            "repetition_penalty": sampler["repetition_penalty"]}


def hf_generate(model: Any, prompt_ids: list[int], tokens: int, sampler: dict[str, Any], eos: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                min_new_tokens=tokens, pad_token_id=eos, eos_token_id=eos,
                                **hf_sampling_kwargs(sampler))
    return output[0, len(prompt_ids):].tolist()


class TorchSampler:
    """runtime.sampling's llama-order chain in torch (what a hand-written PyTorch loop does): repetition penalty over
    the last ``penalty_last_n`` tokens, top-k, top-p, min-p on the model's distribution, then temperature."""

    def __init__(self, sampler: dict[str, Any], seed: int = 1234) -> None:
        import torch

        self.settings = sampler
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: Any, history: list[int], eos: int | None = None) -> int:
        import torch

        settings = self.settings
        logits = logits.float().clone()
        if eos is not None:
            logits[eos] = -float("inf")  # the other runners force the same length (min_new_tokens)
        penalty = settings.get("repetition_penalty", 1.0)
        if penalty != 1.0 and history:
            recent = torch.tensor(sorted(set(history[-settings.get("penalty_last_n", 64):])), device=logits.device)
            chosen = logits[recent]
            logits[recent] = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
        if settings.get("temperature", 1.0) == 0:
            return int(torch.argmax(logits))
        top_k = settings.get("top_k", 0)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits[logits < kth] = -float("inf")
        probs = torch.softmax(logits, dim=-1)
        top_p = settings.get("top_p", 1.0)
        if top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, 0) - sorted_probs >= top_p
            logits[order[outside]] = -float("inf")
            probs = torch.softmax(logits, dim=-1)
        min_p = settings.get("min_p", 0.0)
        if min_p > 0:
            logits[probs < min_p * probs.max()] = -float("inf")
        probs = torch.softmax(logits / settings["temperature"], dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def torch_gpt2_decode(model: Any, prompt_ids: list[int], tokens: int, sample: TorchSampler, eos: int) -> list[int]:
    """PyTorch eager decoding with models.gpt2's own KV cache."""
    import torch

    history = list(prompt_ids)
    device = model.transformer.wte.weight.device
    with torch.inference_mode():
        logits, past = model(torch.tensor([prompt_ids], device=device))
        for step in range(tokens):
            token = sample(logits[0, -1], history, eos)
            history.append(token)
            if step + 1 < tokens:
                logits, past = model(torch.tensor([[token]], device=device), past)
    return history[len(prompt_ids):]


def torch_rnn_decode(model: Any, prompt_ids: list[int], tokens: int, sample: TorchSampler, eos: int) -> list[int]:
    """PyTorch eager decoding of models.rnn.RNNLanguageModel, state carried between steps."""
    import torch

    history = list(prompt_ids)
    with torch.inference_mode():
        logits, state = model(torch.tensor([prompt_ids]))
        for step in range(tokens):
            token = sample(logits[0, -1], history, eos)
            history.append(token)
            if step + 1 < tokens:
                logits, state = model(torch.tensor([[token]]), state)
    return history[len(prompt_ids):]
