"""Time one attention layer, forward and backward: the spiking attention's fused kernels against its unfused
reference, and against S x FlashAttention (softmax attention through scaled_dot_product_attention on S steps).

    python -m spiking_lm.eval.bench_attention        # CUDA: nanoGPT size (B 64, 6 heads of 64, S 4), L 256 and 1024
    python -m spiking_lm.eval.bench_attention --scope core --batch 16    # issue 16's targets (TARGETS)
    TRITON_INTERPRET=1 python -m spiking_lm.eval.bench_attention --device cpu --batch 1 --heads 2 \
        --head-size 16 --blocks 33 --precision 32 --budget_ms 1                             # smoke test

Each row is the model's ``CausalSelfAttention`` with its default spiking attention: row-max centring,
cumulative readout, count norm, LIF with beta 0.5, refractory 1, threshold 0.1, under bf16 autocast as in
bf16-mixed training. ``--scope layer`` times the whole layer (projections included) on one current for every
step (S' = 1); ``--scope core`` times the attention alone on S different steps of q, k, v (S' = S, as in every
layer after the first), against scaled_dot_product_attention on the same S x B x nh heads. Peak memory is the
highest allocation during forward + backward above what was held before (CUDA only): the rows' own activations.
Each row's time is also given relative to the unfused row's and to the sdpa-xS row's at its L; TARGETS states
the fused path's targets, and the report says which the run measured and whether they were met.
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from spiking_lm.config import ModelConfig
from spiking_lm.eval.benchmark import choices, peak_mib, publish, time_ms
from spiking_lm.model import CausalSelfAttention

# The attention of each row; softmax's gets S copies of its input, as a layer after the first LIF site does.
ROWS = {
    "unfused": dict(attention="spiking", backend="torch"),
    "fused": dict(attention="spiking", backend="triton"),
    "sdpa-xS": dict(attention="softmax"),
}


@dataclass(frozen=True)
class Target:
    """A goal for one row's time or memory relative to a reference row's, at one setting."""

    issue: int
    text: str
    row: str
    reference: str
    L: int
    metric: str  # "time" (row / reference) or "memory" (row / reference peak)
    limit: float  # the ratio must be at most this
    setting: dict  # the arguments the goal was set at: scope, batch, heads, head_size, timesteps, precision


# Issue 16: at B 16, 6 heads of 64, S 4, bf16, the attention alone.
ISSUE16 = dict(scope="core", batch=16, heads=6, head_size=64, timesteps=4, precision="bf16-mixed")
# Issue 11: at nanoGPT's size, the whole layer.
ISSUE11 = dict(scope="layer", batch=64, heads=6, head_size=64, timesteps=4, precision="bf16-mixed")
TARGETS = [
    Target(16, "fused fwd+bwd <= 3x S x sdpa", "fused", "sdpa-xS", 1024, "time", 3.0, ISSUE16),
    Target(16, "moonshot: fused fwd+bwd <= 1.5x S x sdpa", "fused", "sdpa-xS", 1024, "time", 1.5, ISSUE16),
    Target(16, "fused >= 4x faster than unfused", "fused", "unfused", 256, "time", 1 / 4, ISSUE16),
    Target(11, "fused >= 3x faster than unfused", "fused", "unfused", 256, "time", 1 / 3, ISSUE11),
    Target(11, "fused <= 1/8 the memory of unfused", "fused", "unfused", 256, "memory", 1 / 8, ISSUE11),
    Target(11, "fused no slower than S x sdpa", "fused", "sdpa-xS", 1024, "time", 1.0, ISSUE11),
]


def bench_row(name: str, args: argparse.Namespace, L: int) -> dict:
    C = args.heads * args.head_size
    config = ModelConfig(
        n_head=args.heads, n_embd=C, block_size=L, timesteps=args.timesteps, mlp_activation="gelu", **ROWS[name]
    )
    layer = CausalSelfAttention(config).to(args.device)
    gen = torch.Generator(args.device).manual_seed(0)
    if args.scope == "layer":
        S_in = args.timesteps if name == "sdpa-xS" else 1
        x = torch.randn(S_in, args.batch, L, C, device=args.device, generator=gen, requires_grad=True)  # (S', B, L, C)
        run = layer
    else:
        dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32  # as the bf16 projection gives
        x = torch.randn(
            args.timesteps, args.batch, L, 3 * C, device=args.device, dtype=dtype, generator=gen, requires_grad=True
        )  # (S, B, L, 3C): the projection's output

        def run(x):
            # q, k, v laid out as the layer makes them: views of the projection's output
            q, k, v = (t.unflatten(-1, (args.heads, args.head_size)).transpose(-3, -2) for t in x.split(C, -1))
            if name == "sdpa-xS":  # (S * B, nh, L, hs)
                return F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), is_causal=True)
            return layer._spiking_attention(q, k, v)[0]  # the layer's own choice of implementation, as training's

    def fwd_bwd():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            y = run(x)  # (S, B, L, C), (S, B, nh, L, hs) or (S * B, nh, L, hs)
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
    ("L", 5, "L", "d"),
    ("name", 9, "name", ""),
    ("fwd_bwd_ms", 11, "fwd_bwd_ms", ".3f"),
    ("x unfused", 10, "speedup_vs_unfused", ".2f"),
    ("/ sdpa-xS", 10, "time_vs_sdpa", ".2f"),
    ("peak_MiB", 9, peak_mib, ".0f"),
    ("/ unfused", 10, "memory_vs_unfused", ".3f"),
]


def add_ratios(rows: list[dict]) -> None:
    """Give each measured row its speedup over the unfused row, its time relative to the sdpa-xS row and its peak
    memory relative to the unfused row's, each at the same L, where those rows were measured."""
    for row in rows:
        same_L = {r["name"]: r for r in rows if r["L"] == row["L"] and "fwd_bwd_ms" in r}
        if "fwd_bwd_ms" not in row:
            continue
        if unfused := same_L.get("unfused"):
            row["speedup_vs_unfused"] = unfused["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            if row["peak_mem_bytes"] is not None and unfused["peak_mem_bytes"]:
                row["memory_vs_unfused"] = row["peak_mem_bytes"] / unfused["peak_mem_bytes"]
        if sdpa := same_L.get("sdpa-xS"):
            row["time_vs_sdpa"] = row["fwd_bwd_ms"] / sdpa["fwd_bwd_ms"]


def check_targets(rows: list[dict], setting: dict) -> list[dict]:
    """Each target with the measured ratio and whether it is met; ``ratio`` is None where this run did not
    measure it (another setting or L, a row missing or failed, or memory off CUDA)."""
    results = []
    for t in TARGETS:
        at = {r["name"]: r for r in rows if r["L"] == t.L}
        row, ref = at.get(t.row, {}), at.get(t.reference, {})
        key = "fwd_bwd_ms" if t.metric == "time" else "peak_mem_bytes"
        ratio = None
        if t.setting == {k: setting[k] for k in t.setting} and row.get(key) is not None and ref.get(key):
            ratio = row[key] / ref[key]
        results.append(asdict(t) | {"ratio": ratio, "met": None if ratio is None else ratio <= t.limit})
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--blocks", default="256,1024", help="comma-separated sequence lengths L")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32"])
    parser.add_argument(
        "--scope",
        default="layer",
        choices=["layer", "core"],
        help="time the whole layer on S' = 1, or the attention alone on S' = S",
    )
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
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    add_ratios(rows)
    setting = dict(
        scope=args.scope,
        batch=args.batch,
        heads=args.heads,
        head_size=args.head_size,
        timesteps=args.timesteps,
        precision=args.precision,
    )
    targets = check_targets(rows, setting) if args.device == "cuda" else []  # timings off CUDA say nothing

    report = publish("bench_attention", args.device, rows, COLUMNS, args.out, **setting, targets=targets)
    for t in targets:
        if t["ratio"] is not None:
            verdict = "met" if t["met"] else "NOT met"
            print(f"issue {t['issue']}: {t['text']} at L {t['L']}: {t['ratio']:.3f} (limit {t['limit']:.3f}) {verdict}")
    return report


if __name__ == "__main__":
    main()
