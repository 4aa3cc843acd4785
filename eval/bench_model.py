"""Time training steps of the softmax baseline and the spiking models side by side, in one process.

    python -m spiking_lm.eval.bench_model            # CUDA: nanoGPT shakespeare-char size, bf16-mixed
    python -m spiking_lm.eval.bench_model --device cpu --n-layer 2 --n-head 2 --n-embd 64 --block-size 32 \
        --batch-size 4 --no-compile                  # CPU ratios at a small size

Each row is one model (see ROWS); a step is what training does: forward and loss under autocast, backward,
gradient clipping at 1, fused AdamW on CUDA. All models are built first; after warm-up (compilation,
autotuning) they take turns, ``--steps`` steps each per round, so that a shared machine's load meets them
alike; each row keeps its median round. Inputs are random tokens: a step's cost does not depend on the text.

Peak memory is the row's own: the highest allocation during its steps less what the other models hold
(their weights, gradients and optimizer state), so it counts this model's state and activations (CUDA only).
Dropout is 0 by default: the fused spiking attention runs only without attention dropout.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spiking_lm.config import ModelConfig
from spiking_lm.eval.benchmark import choices, peak_mib, positive_int, publish
from spiking_lm.model import GPT


@dataclass(frozen=True)
class Row:
    """One model to time: ModelConfig overrides on top of the size flags."""

    overrides: dict = field(default_factory=dict)
    compile: bool = False
    needs: str | None = None  # a module that must exist for the row to mean what its name says


ROWS: dict[str, Row] = {
    # The first row is the baseline of the ratios.
    "softmax-gelu": Row(dict(attention="softmax", mlp_activation="gelu"), compile=True),
    "softmax-lif": Row(dict(attention="softmax", mlp_activation="lif")),
    # backend "torch": the reference PyTorch attention and neurons, every (query, key) state in memory
    "spiking-lif-unfused": Row(dict(attention="spiking", mlp_activation="lif", backend="torch")),
    # backend "triton": the fused kernels for the neurons and, once it exists, the attention
    "spiking-lif-fused": Row(
        dict(attention="spiking", mlp_activation="lif", backend="triton"), needs="spiking_lm.kernels.spiking_attention"
    ),
}


class Skip(Exception):
    """A row that cannot run in this setting by design (not a failure)."""


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the weights, gradients and optimizer state of one model."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


class Run:
    """One row's model, optimizer and batch, and its training step."""

    def __init__(self, name: str, config: ModelConfig, args: argparse.Namespace, device: torch.device):
        row = ROWS[name]
        if row.needs and importlib.util.find_spec(row.needs) is None:
            raise Skip(f"no {row.needs} in this version")
        if config.backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skip("the fused kernels need CUDA, or TRITON_INTERPRET=1 on CPU")
        self.model = GPT(config).to(device).train()
        self.forward = torch.compile(self.model) if row.compile and args.compile else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(config.vocab_size, (args.batch_size, config.block_size + 1), generator=g)
        self.x, self.y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)  # (B, L), (B, L)
        self.device, self.bf16 = device, args.precision == "bf16-mixed"

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            _, loss = self.forward(self.x, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()

    def time_ms(self, steps: int) -> float:
        """Mean wall time of ``steps`` steps, in ms."""
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return (time.perf_counter() - start) * 1e3 / steps

    def peak_bytes(self) -> int | None:
        """This row's peak allocation over one step, net of what the other models hold."""
        if self.device.type != "cuda":
            return None
        self.sync()
        others = torch.cuda.memory_allocated() - state_bytes(self.model, self.opt)
        torch.cuda.reset_peak_memory_stats()
        self.step()
        self.sync()
        return torch.cuda.max_memory_allocated() - others

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def bench(names: list[str], config: ModelConfig, args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = {name: {"name": name} for name in names}
    runs: dict[str, Run] = {}
    for name in names:
        print(f"building and warming up {name} ...", file=sys.stderr, flush=True)
        try:
            run = Run(name, dataclasses.replace(config, **ROWS[name].overrides), args, device)
            for _ in range(args.warmup):
                run.step()
            rows[name]["peak_mem_bytes"] = run.peak_bytes()
            runs[name] = run
        except Skip as e:
            rows[name]["skipped"] = str(e)
        except Exception as e:  # OOM, a compiler error: the row records it, the others go on
            rows[name]["error"] = error_text(e)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, run in list(runs.items()):
            try:
                times[name].append(run.time_ms(args.steps))
            except Exception as e:
                rows[name]["error"] = error_text(e)
                del runs[name]
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.1f} ms" for n, t in times.items() if t),
            file=sys.stderr,
            flush=True,
        )
    tokens = args.batch_size * config.block_size
    for name in runs:
        ms = statistics.median(times[name])
        rows[name] |= {"ms_per_step": ms, "tokens_per_s": tokens / ms * 1e3}
    return add_ratios(list(rows.values()))


def add_ratios(rows: list[dict]) -> list[dict]:
    """``rows`` with each measured row's step time and peak memory relative to the first row's (the baseline)."""
    base = rows[0]
    for row in rows:
        if "ms_per_step" in row and "ms_per_step" in base:
            row["step_ratio_vs_softmax"] = row["ms_per_step"] / base["ms_per_step"]
            if row["peak_mem_bytes"] is not None and base["peak_mem_bytes"]:
                row["mem_ratio_vs_softmax"] = row["peak_mem_bytes"] / base["peak_mem_bytes"]
    return rows


COLUMNS = [
    ("name", 20, "name", ""),
    ("ms/step", 9, "ms_per_step", ".1f"),
    ("tokens/s", 10, "tokens_per_s", ".0f"),
    ("peak_MiB", 9, peak_mib, ".0f"),
    ("step_ratio", 10, "step_ratio_vs_softmax", ".2f"),
    ("mem_ratio", 9, "mem_ratio_vs_softmax", ".2f"),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated, from {tuple(ROWS)}; the first is the baseline of the ratios",
    )
    parser.add_argument("--n-layer", type=positive_int, default=6)
    parser.add_argument("--n-head", type=positive_int, default=6)
    parser.add_argument("--n-embd", type=positive_int, default=384)
    parser.add_argument("--block-size", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--timesteps", type=positive_int, default=4, help="simulation steps S of the spiking rows")
    parser.add_argument("--vocab-size", type=positive_int, default=65, help="65: Tiny Shakespeare's characters")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--precision", choices=["bf16-mixed", "32"], help="default: bf16-mixed on CUDA, 32 on CPU")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the rows marked for it (the softmax baseline)",
    )
    parser.add_argument("--warmup", type=positive_int, default=3, help="untimed steps per row first")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps per row and round")
    parser.add_argument("--rounds", type=positive_int, default=5, help="rounds of taking turns; the median is kept")
    parser.add_argument("--out", type=Path, help="JSON path; default eval/results/bench_model_<device>_<date>.json")
    args = parser.parse_args(argv)
    names = choices(parser, "--rows", args.rows, ROWS)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32")
    try:
        config = ModelConfig(
            vocab_size=args.vocab_size,
            block_size=args.block_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            timesteps=args.timesteps,
            dropout=args.dropout,
            bias=False,
        )
    except ValueError as e:
        parser.error(str(e))

    device = torch.device(args.device)
    rows = bench(names, config, args, device)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return publish("bench_model", args.device, rows, COLUMNS, args.out, settings=settings)


if __name__ == "__main__":
    main()
