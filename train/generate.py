"""``spiking-lm generate``: sample text from a trained checkpoint or an exported model."""

from __future__ import annotations

import math

import torch

from spiking_lm.checkpoint import load_model
from spiking_lm.device import resolve_device


def generate(ckpt: str, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 1337, device: str | None = None) -> None:
    """Sample text from a trained checkpoint or an exported model, and print it after the prompt.

    Args:
        ckpt: checkpoint written by spiking-lm fit, or a spiking-lm export folder
        prompt: text to continue (default: a newline); every character must be in the model's vocabulary
        max_new_tokens: tokens to sample after the prompt (>= 0)
        temperature: divides the logits before sampling (finite, > 0): lower is more conservative
        top_k: sample only among the k most likely tokens (>= 1; default: all)
        seed: random seed; the same seed gives the same text from a checkpoint and its export
        device: cpu, cuda or cuda:N (default: cuda when available)
    """
    if max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {top_k}")
    if not prompt:
        raise ValueError("--prompt is empty; give at least one character to continue from")
    where = resolve_device(device)
    model, tokenizer, _ = load_model(ckpt)
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=where)  # (1, L)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.to(where).generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)  # (1, L + new)
    print(tokenizer.decode(out[0].tolist()))
