"""Time one attention layer, forward and backward: the spiking attention's fused kernels against its unfused
reference, and against S x FlashAttention (softmax attention through scaled_dot_product_attention on S steps).

    python -m spiking_lm.eval.bench_attention        # CUDA: nanoGPT size (B 64, 6 heads of 64, S 4), L 256 and 1024
    TRITON_INTERPRET=1 python -m spiking_lm.eval.bench_attention --device cpu --batch 1 --heads 2 \
        --head-size 16 --blocks 33 --precision 32 --budget_ms 1                             # smoke test

Each row is the model's ``CausalSelfAttention`` (projections included) with its default spiking attention:
row-max centring, cumulative readout, count norm, LIF with beta 0.5, refractory 1, threshold 0.1, one
current for every step (S' = 1), under bf16 autocast as in bf16-mixed training. Peak memory is the highest
allocation during forward + backward above what was held before (CUDA only): the layer's own activations.
Targets of the fused path (issue 11): fwd+bwd >= 3x faster and <= 1/8 the memory of the unfused path at
L 256; at L 1024 no slower than S x FlashAttention.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from spiking_lm.config import ModelConfig
from spiking_lm.eval.benchmark import choices, peak_mib, publish, time_ms
from spiking_lm.model import CausalSelfAttention

# The attention of each row; softmax's gets S copies of its input, as a layer after the first LIF site does.
ROWS = {
    "unfused": dict(attention="spiking", backend="torch"),
    "fused": dict(attention="spiking", backend="triton"),
    "sdpa-xS": dict(attention="softmax"),
}


def bench_row(name: str, args: argparse.Namespace, L: int) -> dict:
    C = args.heads * args.head_size
    config = ModelConfig(n_head=args.heads, n_embd=C, block_size=L, timesteps=args.timesteps, mlp_activation="gelu",
                         **ROWS[name])
    layer = CausalSelfAttention(config).to(args.device)
    gen = torch.Generator(args.device).manual_seed(0)
    S_in = args.timesteps if name == "sdpa-xS" else 1
    x = torch.randn(S_in, args.batch, L, C, device=args.device, generator=gen, requires_grad=True)  # (S', B, L, C)

    def fwd_bwd():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            y = layer(x)  # (S, B, L, C)
        y.float().square().mean().backward()

    result = {"fwd_bwd_ms": time_ms(fwd_bwd, args.budget_ms, args.device), "peak_mem_bytes": None}
    if args.device == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        result["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - held
    return result


COLUMNS = [
    ("L", 5, "L", "d"), ("name", 9, "name", ""), ("fwd_bwd_ms", 11, "fwd_bwd_ms", ".3f"),
    ("x unfused", 10, "speedup_vs_unfused", ".2f"), ("peak_MiB", 9, peak_mib, ".0f"),
    ("/ unfused", 10, "memory_vs_unfused", ".3f"),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--blocks", default="256,1024", help="comma-separated sequence lengths L")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32"])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {tuple(ROWS)}")
    parser.add_argument("--budget_ms", type=float, default=100.0, help="time spent measuring each row (median kept)")
    parser.add_argument("--out", type=Path, help="JSON path; default eval/results/bench_attention_<device>_<date>.json")
    args = parser.parse_args(argv)
    names = choices(parser, "--rows", args.rows, ROWS)
    try:
        blocks = [int(b) for b in args.blocks.split(",")]
    except ValueError:
        parser.error(f"--blocks must be comma-separated integers, got {args.blocks!r}")

    rows = []
    for L in blocks:
        by_name = {}
        for name in names:
            print(f"L={L} {name} ...", end=" ", file=sys.stderr, flush=True)
            row = {"name": name, "L": L}
            try:
                row |= bench_row(name, args, L)
                status = f"{row['fwd_bwd_ms']:.3f} ms"
            except Exception as e:  # an out-of-memory unfused row at L 1024 is a result, not a crash
                row["error"] = status = f"{type(e).__name__}: {e}".splitlines()[0]
            print(status, file=sys.stderr, flush=True)
            rows.append(row)
            by_name[name] = row
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        base = by_name.get("unfused", {})
        for row in by_name.values():
            if "fwd_bwd_ms" in row and "fwd_bwd_ms" in base:
                row["speedup_vs_unfused"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
                if row["peak_mem_bytes"] is not None:
                    row["memory_vs_unfused"] = row["peak_mem_bytes"] / base["peak_mem_bytes"]

    return publish(
        "bench_attention", args.device, rows, COLUMNS, args.out, precision=args.precision, batch=args.batch,
        heads=args.heads, head_size=args.head_size, timesteps=args.timesteps,
    )


if __name__ == "__main__":
    main()
