"""Tokens per second of sampling with and without the KV cache, for the softmax and the spiking model.

    nice -n 10 python -m spiking_lm.eval.bench_generate            # CPU: quickstart and shakespeare-char sizes
    python -m spiking_lm.eval.bench_generate --device cuda          # the same on a GPU

Each row is one model at one size (see SIZES, MODELS), randomly initialised: the cost of a token does not
depend on the weights. It samples ``--new-tokens`` tokens after a one-token prompt, with the cache
(``GPT.generate``'s default) and without it (the whole window rerun for every token), from the same seed. The
two are the same math on matmuls of other shapes, so they agree up to float rounding, which in a spiking model
can tip a neuron over its threshold and so change a sample; the row says whether they sampled the same
tokens, and where they first differ if not. After an untimed warm-up,
each round times both, taking turns; a row keeps its median round. On the CPU the time is the process's CPU
time (``clock``).

A cached token at batch 1 reads every weight for one row, which on a CPU is bound by memory bandwidth: the row's
``linears tok/s`` times the model's linear layers alone on one row per token, and ``bound`` is that over the
uncached tokens/s, the most the cache could gain whatever the rest of the model costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from spiking_lm.config import ModelConfig
from spiking_lm.eval.benchmark import choices, positive_int, publish
from spiking_lm.model import GPT

# configs/quickstart.yaml and configs/shakespeare_char_*.yaml; the vocabulary is Tiny Shakespeare's 65
# characters for both (the quickstart's is of the same order: its cost is the output layer's alone).
SIZES = {
    "quickstart": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, timesteps=4),
    "shakespeare-char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, timesteps=4, bias=False),
}
MODELS = {
    "softmax": dict(attention="softmax", mlp_activation="gelu"),
    "spiking": dict(attention="spiking", mlp_activation="lif"),
}
VOCAB_SIZE = 65
# The target: cached >= 10x uncached for 500 new tokens at block 256 on CPU.
TARGET_SPEEDUP, TARGET_BLOCK = 10.0, 256


def sample_seconds(
    model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool, seed: int
) -> tuple[float, torch.Tensor]:
    """Seconds (see ``clock``) of sampling ``new_tokens`` tokens after ``prompt``, and the tokens (1, L + new)."""
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    timer = clock(prompt.device.type)
    torch.manual_seed(seed)
    sync()
    start = timer()
    out = model.generate(prompt, new_tokens, use_cache=use_cache)
    sync()
    return timer() - start, out


def linear_floor_seconds(model: GPT, device: torch.device, tokens: int, warmup: int) -> float:
    """Seconds (see ``clock``) of running every linear layer of ``model`` on one row, ``tokens`` times after
    ``warmup`` untimed ones: what a cached token cannot do without at batch 1, as it reads every weight for a
    single row. On a CPU that is bound by memory bandwidth, so ``tokens / this`` bounds the cached tokens/s
    whatever the rest of the model costs."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = {n: torch.randn(1, n, device=device) for n in {m.in_features for m in layers}}  # (1, in) each
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timer = clock(device.type)

    def run(n: int) -> None:
        for _ in range(n):
            for layer in layers:
                layer(rows[layer.in_features])

    with torch.inference_mode():
        run(warmup)
        sync()
        start = timer()
        run(tokens)
        sync()
        return timer() - start


def clock(device: str):
    """Wall time on a GPU; on the CPU this process's CPU time, which the load of a shared machine does not
    inflate (with one thread, as OMP_NUM_THREADS=1 gives, it is the wall time of an idle machine)."""
    return time.perf_counter if device == "cuda" else time.process_time


def bench_row(size: str, name: str, args: argparse.Namespace, device: torch.device) -> dict:
    config = ModelConfig(vocab_size=VOCAB_SIZE, **SIZES[size], **MODELS[name])
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(VOCAB_SIZE, (1, 1), device=device)  # (1, 1)
    for use_cache in (True, False):
        sample_seconds(model, prompt, args.warmup_tokens, use_cache, args.seed)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    outs = {}
    for r in range(args.rounds):
        for use_cache in (True, False):
            elapsed, outs[use_cache] = sample_seconds(model, prompt, args.new_tokens, use_cache, args.seed)
            seconds[use_cache].append(elapsed)
        print(
            f"{size} {name} round {r + 1}/{args.rounds}: cached {seconds[True][-1]:.2f} s, "
            f"uncached {seconds[False][-1]:.2f} s (time.{clock(device.type).__name__})",
            file=sys.stderr,
            flush=True,
        )
    cached, uncached = (args.new_tokens / statistics.median(seconds[c]) for c in (True, False))
    floor = args.new_tokens / min(
        linear_floor_seconds(model, device, args.new_tokens, args.warmup_tokens) for _ in range(args.rounds)
    )
    differ = (outs[True] != outs[False]).nonzero()[:, 1]  # positions where the two samples differ
    return {
        "size": size,
        "model": name,
        "block_size": config.block_size,
        "params": model.num_params(),
        "new_tokens": args.new_tokens,
        "cached_tokens_per_s": cached,
        "uncached_tokens_per_s": uncached,
        "speedup": cached / uncached,
        # The linear layers alone on one row per token: a ceiling on cached tokens/s, and so on the speedup.
        "linear_floor_tokens_per_s": floor,
        "speedup_bound": floor / uncached,
        "same_tokens": torch.equal(outs[True], outs[False]),
        # The first new token that differs: float rounding (matmuls of other shapes) can flip a spike.
        "first_difference": int(differ.min()) - prompt.size(1) if len(differ) else None,
    }


COLUMNS = [
    ("size", 16, "size", ""),
    ("model", 8, "model", ""),
    ("block", 5, "block_size", "d"),
    ("cached tok/s", 12, "cached_tokens_per_s", ".1f"),
    ("uncached tok/s", 14, "uncached_tokens_per_s", ".1f"),
    ("speedup", 7, "speedup", ".1f"),
    ("linears tok/s", 13, "linear_floor_tokens_per_s", ".1f"),
    ("bound", 5, "speedup_bound", ".1f"),
    ("same tokens", 11, "same_tokens", ""),
    ("first diff", 10, "first_difference", "d"),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {tuple(SIZES)}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {tuple(MODELS)}")
    parser.add_argument("--new-tokens", type=positive_int, default=500, help="tokens sampled per timing")
    parser.add_argument("--warmup-tokens", type=positive_int, default=8, help="untimed tokens per mode first")
    parser.add_argument("--rounds", type=positive_int, default=3, help="timings per mode; the median is kept")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", type=Path, help="JSON path; default eval/results/bench_generate_<device>_<date>.json")
    args = parser.parse_args(argv)
    sizes = choices(parser, "--sizes", args.sizes, SIZES)
    models = choices(parser, "--models", args.models, MODELS)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    rows = [bench_row(size, name, args, device) for size in sizes for name in models]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = publish(
        "bench_generate",
        args.device,
        rows,
        COLUMNS,
        args.out,
        settings=settings,
        threads=torch.get_num_threads(),
        clock=f"time.{clock(args.device).__name__}",
        target={"speedup": TARGET_SPEEDUP, "block_size": TARGET_BLOCK, "new_tokens": 500},
    )
    for row in rows:
        if row["block_size"] == TARGET_BLOCK and args.new_tokens == 500:
            met = "met" if row["speedup"] >= TARGET_SPEEDUP else "NOT met"
            print(
                f"target cached >= {TARGET_SPEEDUP:g}x uncached ({row['model']}, block {TARGET_BLOCK}, "
                f"500 new tokens): {met} ({row['speedup']:.1f}x; the linear layers alone on one row per token "
                f"bound it at {row['speedup_bound']:.1f}x)"
            )
    return report


if __name__ == "__main__":
    main()
