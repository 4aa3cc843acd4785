"""How the CPU thread count changes the speed of a tiny model's training step, on this machine as loaded now.

    python -m spiking_lm.eval.bench_threads [--rounds 10] [--budget_ms 300] [--out FILE]

One training step (forward, backward, AdamW) of ``configs/tiny.yaml``'s model on one batch, timed under
``torch.set_num_threads(n)`` for each thread count in turn, round after round, so that every count meets the
same load from other jobs. Reports each count's median step time over the rounds and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from spiking_lm.config import ModelConfig
from spiking_lm.eval.benchmark import positive_int, publish, time_ms
from spiking_lm.model import GPT

# configs/tiny.yaml's model and batch, with the char vocabulary of python-docs.
TINY = ModelConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=16, timesteps=2)
BATCH = 4


def step_fn(model: GPT, optimizer: torch.optim.Optimizer):
    x = torch.randint(0, TINY.vocab_size, (BATCH, TINY.block_size))  # (B, L)

    def step() -> None:
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--budget_ms", type=positive_int, default=300, help="timing budget per count and round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    default = torch.get_num_threads()
    counts = sorted({1, default})
    torch.manual_seed(0)
    model = GPT(TINY)
    step = step_fn(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            torch.set_num_threads(n)
            times[n].append(time_ms(step, args.budget_ms, "cpu"))
    torch.set_num_threads(default)
    fastest = min(statistics.median(t) for t in times.values())
    rows = [
        {
            "threads": n,
            "default": "yes" if n == default else "",
            "median_ms": statistics.median(t),
            "min_ms": min(t),
            "vs_fastest": statistics.median(t) / fastest,
        }
        for n, t in times.items()
    ]
    columns = [
        ("threads", 8, "threads", "d"),
        ("default", 8, "default", ""),
        ("median ms", 10, "median_ms", ".2f"),
        ("min ms", 8, "min_ms", ".2f"),
        ("x fastest", 10, "vs_fastest", ".2f"),
    ]
    publish(
        "bench_threads",
        "cpu",
        rows,
        columns,
        args.out,
        rounds=args.rounds,
        budget_ms=args.budget_ms,
        cpu_count=os.cpu_count(),
        load_average=os.getloadavg(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )


if __name__ == "__main__":
    main()
