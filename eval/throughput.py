"""Forward throughput of several checkpoints, measured side by side.

On a shared machine the load changes from minute to minute, so runs timed one after the other can
differ by more than the models do. Here every model forwards one batch in turn, for several rounds,
and keeps its fastest: all models meet the same load, and other work only ever slows a batch down.
"""

from __future__ import annotations

import time

import torch

from spiking_lm.checkpoint import load_model
from spiking_lm.eval.evaluate import validation_data

ROUNDS = 5


@torch.no_grad()
def side_by_side(checkpoints: list[str], rounds: int = ROUNDS, device: str | None = None) -> list[float]:
    """Tokens/s of each checkpoint's forward (no grad) on the first batch of its validation windows."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs = []
    for ckpt in checkpoints:
        model, tokenizer, _ = load_model(ckpt)
        x, _ = next(iter(validation_data(ckpt, tokenizer, model.config.block_size, batches=1).val_dataloader()))
        runs.append((model.to(device), x.to(device)))
    fastest = [0.0] * len(runs)
    for _ in range(rounds):
        for i, (model, x) in enumerate(runs):
            start = time.perf_counter()
            model(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            fastest[i] = max(fastest[i], x.numel() / (time.perf_counter() - start))
    return fastest
