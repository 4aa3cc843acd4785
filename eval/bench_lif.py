"""Time LIF neurons forward and forward+backward: our fused Triton kernels against the reference loop,
torch.compile of it, snnTorch's Leaky and SpikingJelly's multi-step LIFNode.

    python -m spiking_lm.eval.bench_lif                        # CUDA; T=8, N=32M; fp32 and bf16
    TRITON_INTERPRET=1 python eval/bench_lif.py --device cpu --n 4096 --t 8    # smoke test

Every row runs the same neuron: beta 0.5, threshold 1, reset by subtraction, atan surrogate, reset
detached; only the ``spiking_lm-triton-R2`` row adds a refractory period (the others have none to add).
"Forward" is a training forward (input requires grad, so whatever backward needs is kept); the spiking_lm rows
include the spike counts a training forward takes (counted inside the forward kernel on triton).

The floor is the traffic a fused kernel cannot avoid: forward reads x and writes the spikes and one saved
state, backward reads the upstream gradient and that state and writes dL/dx; six tensors of x's size, so
24 bytes per neuron-step in fp32 and 12 in bf16. ``floor_ratio = fwd_bwd_ms / floor_ms`` with ``floor_ms``
those bytes over the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from spiking_lm.eval.benchmark import choices, device_name, peak_mib, publish, time_ms, version
from spiking_lm.lif import lif
from spiking_lm.lif_reference import lif_reference

BETA, THRESHOLD = 0.5, 1.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STATE_TENSORS = 6  # x, spikes, saved state, upstream grad, state again, dL/dx: see the module docstring


class Skip(Exception):
    """A row that cannot run in this setting by design (not a failure)."""


def ours(refractory: int, backend: str) -> Callable[[str], Callable]:
    def build(device: str):
        if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skip("triton on CPU needs TRITON_INTERPRET=1 set before triton is imported")
        # with the firing counts, as every training forward takes them (LIF(..., return_stats=True))
        return lambda x: lif(
            x, beta=BETA, threshold=THRESHOLD, refractory=refractory, backend=backend, return_stats=True
        )[0]

    return build


def compiled(device: str):
    return torch.compile(lambda x: lif_reference(x, BETA, THRESHOLD, 0, "subtract"))


def snntorch_loop(device: str):
    import snntorch
    from snntorch import surrogate

    leaky = snntorch.Leaky(beta=BETA, threshold=THRESHOLD, spike_grad=surrogate.atan(), reset_mechanism="subtract")

    def run(x):
        mem = torch.zeros_like(x[0])
        spikes = []
        for t in range(x.shape[0]):
            spk, mem = leaky(x[t], mem)
            spikes.append(spk)
        return torch.stack(spikes)

    return run


def spikingjelly_lif(device: str):
    import inspect

    from spikingjelly.activation_based import neuron, surrogate

    # tau = 1/(1 - beta) without input decay is h = beta*v + x; v_reset=None is reset by subtraction.
    kwargs = dict(
        tau=1 / (1 - BETA),
        decay_input=False,
        v_threshold=THRESHOLD,
        v_reset=None,
        surrogate_function=surrogate.ATan(),
        detach_reset=True,
        step_mode="m",
    )
    # Releases before 2.0 take the fused backend by name; 2.0 picks it from the device.
    if "backend" in inspect.signature(neuron.LIFNode.__init__).parameters:
        kwargs["backend"] = "cupy" if device == "cuda" else "torch"
    node = neuron.LIFNode(**kwargs).to(device)

    def run(x):
        node.reset()  # the multi-step node keeps v between calls
        return node(x)

    return run


ROWS: dict[str, tuple[int, Callable[[str], Callable]]] = {
    # name: (refractory steps, builder(device) -> spikes = f(x))
    "spiking_lm-triton-R0": (0, ours(0, "triton")),
    "spiking_lm-triton-R2": (2, ours(2, "triton")),
    "spiking_lm-torch": (0, ours(0, "torch")),
    "torch-compile": (0, compiled),
    "snntorch": (0, snntorch_loop),
    "spikingjelly": (0, spikingjelly_lif),
}


def copy_bandwidth_GBps(device: str, budget_ms: float) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    nbytes = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_ms(lambda: dst.copy_(src), budget_ms, device) / 1e6


def bench_row(build, device: str, dtype: torch.dtype, T: int, N: int, budget_ms: float, bandwidth: float) -> dict:
    fn = build(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, N, device=device, dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(T, N, device=device, dtype=dtype, generator=g)

    def fwd_bwd():
        x.grad = None
        fn(x).backward(grad)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    fwd_ms = time_ms(lambda: fn(x), budget_ms, device)
    fwd_bwd_ms = time_ms(fwd_bwd, budget_ms, device)
    floor_ms = T * N * STATE_TENSORS * x.element_size() / bandwidth / 1e6
    return {
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "floor_ms": floor_ms,
        "floor_ratio": fwd_bwd_ms / floor_ms,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


COLUMNS = [
    ("name", 22, "name", ""),
    ("dtype", 5, "dtype", ""),
    ("fwd_ms", 10, "fwd_ms", ".3f"),
    ("fwd_bwd_ms", 11, "fwd_bwd_ms", ".3f"),
    ("floor_ratio", 11, "floor_ratio", ".2f"),
    ("peak_MiB", 9, peak_mib, ".0f"),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--t", type=int, default=8, help="time steps")
    parser.add_argument("--n", type=int, default=32 * 2**20, help="neurons per step")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {tuple(DTYPES)}")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {tuple(ROWS)}")
    parser.add_argument("--budget_ms", type=float, default=100.0, help="time spent measuring each row (median kept)")
    parser.add_argument("--out", type=Path, help="JSON path; default eval/results/bench_lif_<device>_<date>.json")
    args = parser.parse_args(argv)
    dtypes = choices(parser, "--dtypes", args.dtypes, DTYPES)
    names = choices(parser, "--rows", args.rows, ROWS)

    name = device_name(args.device)
    bandwidth = copy_bandwidth_GBps(args.device, args.budget_ms)
    print(f"{name}: device copy {bandwidth:.0f} GB/s; T={args.t}, N={args.n}", file=sys.stderr)

    rows = []
    jobs = [(row, dtype) for dtype in dtypes for row in names]
    for i, (row, dtype) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {row} {dtype} ...", end=" ", file=sys.stderr, flush=True)
        refractory, build = ROWS[row]
        result = {"name": row, "dtype": dtype, "shape": [args.t, args.n], "refractory": refractory}
        try:
            result |= bench_row(build, args.device, DTYPES[dtype], args.t, args.n, args.budget_ms, bandwidth)
            status = f"{result['fwd_bwd_ms']:.3f} ms fwd+bwd"
        except Skip as e:
            result["skipped"] = status = str(e)
        except Exception as e:  # OOM, a missing package, a compiler error: the row records it, the run goes on
            result["error"] = status = f"{type(e).__name__}: {e}".splitlines()[0]
        print(status, file=sys.stderr, flush=True)
        rows.append(result)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()

    return publish(
        "bench_lif",
        args.device,
        rows,
        COLUMNS,
        args.out,
        snntorch=version("snntorch"),
        spikingjelly=version("spikingjelly"),
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
        bandwidth_GBps=bandwidth,
        bytes_per_neuron_step={d: STATE_TENSORS * DTYPES[d].itemsize for d in dtypes},
    )


if __name__ == "__main__":
    main()
