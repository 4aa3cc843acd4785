"""The Triton builds that the launchers in kernels/ ask for, compiled for a GPU that is not here.

A hand-written list of variants compiles other binaries than those that launch: Triton's JIT specialises every
launch on its arguments (an integer equal to 1 becomes a constant, one divisible by 16 an alignment hint, a
pointer is 16-byte aligned or not) and these change the code, its registers and its spills. So the builds are
found from the launches themselves, in two processes (the interpreter is chosen when triton is imported):

1. ``record_builds`` (TRITON_INTERPRET=1, on the CPU): runs WORKLOADS, the model's configurations forward and
   backward through the public API, and keeps every distinct launch: the kernel, each argument as the JIT sees
   it (a tensor's dtype and alignment, an integer's value, a float, a constexpr), num_warps, num_stages and
   options such as enable_fp_fusion.
2. ``compile_build`` (no interpreter): binds the launch's arguments with the JIT's own binder for a CUDA target
   (``create_function_from_signature`` and ``JITFunction._pack_args``, as ``JITFunction.run`` does) and compiles
   the result with ``triton.compile``; ptxas's report (``-v``) gives the registers and spills, the metadata the
   shared memory, the PTX the numerics.

``builds_for_targets`` runs both and returns every build with its compiled resources per target; the compile
tests and ``eval/kernel_resources.py`` read that.

    TRITON_INTERPRET=1 python -m spiking_lm.eval.kernel_builds record builds.json     # step 1
    python -m spiking_lm.eval.kernel_builds compile 90 builds.json sm90.json           # step 2, for sm_90
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

from spiking_lm.neuron import Code, Gradient, Reset, Surrogate

MODULE = "spiking_lm.eval.kernel_builds"  # run in subprocesses as python -m MODULE
TARGETS = (90, 80)  # compute capabilities: H100/H200, A100

# One SM of sm_90 (H100/H200), for the resident warps of a build.
SM90 = dict(regs=65536, reg_unit=256, smem=228 * 1024, smem_reserved=1024, warps=64, blocks=32)


@dataclass(frozen=True)
class Workload:
    """One model configuration to run forward and backward while recording launches."""

    head_size: int
    dtype: str  # "fp32", or "bf16" for bf16 autocast as in bf16-mixed training
    refractory: int  # of every LIF site
    dropout: float  # the model's, attention dropout included; training mode

    @property
    def label(self) -> str:
        return f"hs{self.head_size}-{self.dtype}-R{self.refractory}-dropout{self.dropout:g}"


# The model's configurations: head size 32 and 64, fp32 and bf16, refractory 0 and 1, dropout on and off. Each runs
# a 2-layer model, whose first attention gets one current for all steps (S' = 1) and the second S (S' = S).
WORKLOADS = [Workload(*w) for w in itertools.product((32, 64), ("fp32", "bf16"), (0, 1), (0.0, 0.2))]
SEQ_LEN = 32  # a multiple of 16, as real lengths are: lengths are integer arguments the JIT specialises
BATCH, HEADS, TIMESTEPS = 1, 2, 4
# Sizes of the plain LIF op: with one SM (see record_builds) they reach each block size its launcher picks.
LIF_NEURONS = (512, 1024, 2048, 4096)
# The neuron's other settings, each once beside the model's defaults, at the largest size.
LIF_SETTINGS = [
    *(dict(code=code) for code in get_args(Code)[1:]),
    *(dict(gradient=gradient) for gradient in get_args(Gradient)[1:]),
    *(dict(reset=reset) for reset in get_args(Reset)[1:]),
    *(dict(surrogate=surrogate) for surrogate in get_args(Surrogate)[1:]),
]


def _encode(value):
    """A launch argument as JSON, keeping what the JIT specialises on."""
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):  # a constexpr dtype
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}")


def _jit_key(kernel, args: tuple, kwargs: dict, binders: dict) -> str:
    """The key under which Triton's JIT caches a launch's binary on an sm_90 GPU: the specialisation of every
    argument and the options, from the JIT's own binder. Launches with equal keys compile to the same binary."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if kernel.fn not in binders:
        jit = JITFunction(kernel.fn, **kernel.kwargs)  # the interpreted kernel's compiled twin
        binders[kernel.fn] = create_function_from_signature(
            jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32))
        )
    _, specialization, options = binders[kernel.fn](*args, **kwargs)
    return repr((kernel.fn.__module__, kernel.fn.__name__, specialization, sorted(options.items())))


@contextlib.contextmanager
def _recording(launches: list[dict], label: list[str]):
    """Record every interpreted kernel launch into ``launches``, tagged with ``label[0]``."""
    from triton.runtime.interpreter import InterpretedFunction

    run, binders = InterpretedFunction.run, {}

    def recorded_run(self, *args, grid, warmup, **kwargs):
        launches.append(
            dict(
                module=self.fn.__module__,
                kernel=self.fn.__name__,
                args=[_encode(a) for a in args],
                kwargs={k: _encode(v) for k, v in kwargs.items()},
                workload=label[0],
                key=_jit_key(self, args, kwargs, binders),
            )
        )
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recorded_run
    try:
        yield
    finally:
        InterpretedFunction.run = run


def _run_model(w: Workload) -> None:
    import torch

    from spiking_lm.config import ModelConfig, NeuronConfig
    from spiking_lm.model import GPT

    neuron = dict(refractory=w.refractory)
    config = ModelConfig(
        vocab_size=16,
        block_size=SEQ_LEN,
        n_layer=2,
        n_head=HEADS,
        n_embd=HEADS * w.head_size,
        dropout=w.dropout,
        timesteps=TIMESTEPS,
        backend="triton",
        attn_neuron=NeuronConfig(threshold=0.1, **neuron),
        mlp_neuron=NeuronConfig(**neuron),
    )
    model = GPT(config).train()
    idx = torch.randint(0, 16, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=w.dtype == "bf16"):
        _, loss = model(idx, idx)
    loss.backward()


def _run_lif(dtype: str, refractory: int) -> None:
    import torch

    from spiking_lm.lif import lif

    for n, settings in [(n, {}) for n in LIF_NEURONS] + [(LIF_NEURONS[-1], s) for s in LIF_SETTINGS]:
        x = torch.randn(TIMESTEPS, n, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], requires_grad=True)
        lif(x, beta=0.5, threshold=0.5, refractory=refractory, backend="triton", **settings).sum().backward()


def record_builds(workloads: list[Workload] = WORKLOADS, progress: bool = False) -> list[dict]:
    """Every distinct launch of the workloads: module, kernel, args and kwargs as the JIT sees them, and the
    workloads that launched it. Needs TRITON_INTERPRET=1 set before triton was imported."""
    import torch
    from tqdm import tqdm

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("record_builds runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1")
    torch.manual_seed(0)
    # The launchers size their grids by the SM count (0 off CUDA). With one SM a small workload gets the block
    # sizes that a GPU's many SMs get at training size.
    kernel_modules = [importlib.import_module(f"spiking_lm.kernels.{m}") for m in _kernel_module_names()]
    patched = [m for m in kernel_modules if hasattr(m, "_sm_count")]
    if not patched:
        raise RuntimeError(
            "no module in kernels/ has _sm_count any more: record_builds needs another way to give "
            "the launchers the block sizes of a GPU"
        )
    originals = [m._sm_count for m in patched]
    launches, label = [], [""]
    try:
        for m in patched:
            m._sm_count = lambda device: 1
        with _recording(launches, label):
            for w in tqdm(workloads, desc="recording launches", disable=not progress):
                label[0] = w.label
                _run_model(w)
            for dtype, refractory in itertools.product(("fp32", "bf16"), (0, 1)):
                label[0] = f"lif-op-{dtype}-R{refractory}"
                _run_lif(dtype, refractory)
    finally:
        for m, original in zip(patched, originals, strict=True):
            m._sm_count = original
    builds: dict[str, dict] = {}
    for launch in launches:
        build = builds.setdefault(launch["key"], {**launch, "workloads": []})
        if launch["workload"] not in build["workloads"]:
            build["workloads"].append(launch["workload"])
    return [{k: v for k, v in b.items() if k not in ("workload", "key")} for b in builds.values()]


def _kernel_module_names() -> list[str]:
    import pkgutil

    import spiking_lm.kernels

    return sorted(m.name for m in pkgutil.iter_modules(spiking_lm.kernels.__path__))


class _Pointer:
    """A tensor argument as the JIT's binder reads it: a dtype and an address."""

    def __init__(self, dtype: str, aligned: bool):
        import torch

        self.dtype = getattr(torch, dtype)
        self._ptr = 0 if aligned else 8

    def data_ptr(self) -> int:
        return self._ptr


def _decode(value):
    import triton.language as tl

    if isinstance(value, dict):
        return _Pointer(value["tensor"], value["aligned"]) if "tensor" in value else getattr(tl, value["tl_dtype"])
    return value


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
}


# Instructions counted in a build's PTX: fused multiply-adds (one rounding where the reference rounds twice), the
# separate multiply and add, the matrix-multiply instructions (those of Hopper's wgmma, those on tf32 operands).
PTX_COUNTS = {
    "fma_f32": r"\bfma\.rn(?:\.ftz)?\.f32\b",
    "mul_f32": r"\bmul\.rn(?:\.ftz)?\.f32\b",
    "add_f32": r"\badd\.rn(?:\.ftz)?\.f32\b",
    "mma": r"\b(?:mma\.sync|wgmma\.mma_async)[\w.]*",
    "wgmma": r"\bwgmma\.mma_async[\w.]*",
    "tf32_mma": r"\b(?:mma\.sync|wgmma\.mma_async)[\w.]*\.tf32\b",
}


def compile_build(build: dict, cc: int) -> dict:
    """Compile one recorded launch for compute capability ``cc`` as the JIT would on that GPU.

    Returns its signature, constexprs and options as bound, ptxas's registers, spill stores and loads and stack,
    the shared memory and the PTX_COUNTS; or ``error``. Needs the interpreter off.
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = getattr(importlib.import_module(build["module"]), build["kernel"])
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("compile_build needs the kernels compiled, not interpreted: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    args = [_decode(a) for a in build["args"]]
    # As JITFunction.run: the debug and instrumentation options join the launch's own.
    kwargs = {
        **{k: _decode(v) for k, v in build["kwargs"].items()},
        "debug": build["kwargs"].get("debug", kernel.debug) or knobs.runtime.debug,
        "instrumentation_mode": knobs.compilation.instrumentation_mode,
    }
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    row = {
        "signature": {k: str(v) for k, v in signature.items()},
        "constexprs": {kernel.arg_names[path[0]]: repr(v) for path, v in constexprs.items()},
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
        "enable_fp_fusion": options.enable_fp_fusion,
    }
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed when the cubin is made
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
            )
    except Exception as e:  # reported per build by the callers
        return row | {"error": f"{type(e).__name__}: {e}"}
    for name, pattern in _PTXAS.items():
        row[name] = sum(int(n) for n in pattern.findall(log.getvalue()))
    if not _PTXAS["registers"].search(log.getvalue()):
        return row | {"error": f"no ptxas report (was the build cached?): {log.getvalue()[-500:]}"}
    ptx = compiled.asm["ptx"]
    counts = {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_COUNTS.items()}
    return row | {"shared_bytes": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"]), **counts}


def resident_warps(registers: int, shared_bytes: int, num_warps: int, sm: dict = SM90) -> int:
    """Warps of one build resident on one SM: blocks fitting its registers (allocated per warp, in units of
    ``reg_unit``), shared memory (plus a reserved KB per block), warp slots and block slots, times num_warps."""
    regs_per_warp = math.ceil(registers * 32 / sm["reg_unit"]) * sm["reg_unit"]
    blocks = min(
        sm["regs"] // (regs_per_warp * num_warps) if registers else sm["blocks"],
        sm["smem"] // (shared_bytes + sm["smem_reserved"]),
        sm["warps"] // num_warps,
        sm["blocks"],
    )
    return blocks * num_warps


def _compile_all(cc: int, builds: list[dict], progress: bool) -> list[dict]:
    from tqdm import tqdm

    return [compile_build(b, cc) for b in tqdm(builds, desc=f"compiling for sm_{cc}", disable=not progress)]


def builds_for_targets(
    targets=TARGETS, workloads: list[Workload] = WORKLOADS, progress: bool = False
) -> tuple[list[dict], dict]:
    """Record the builds (a subprocess under the interpreter) and compile them for every target (subprocesses
    without it, side by side, each with a fresh Triton cache so that ptxas reports). Returns the builds and
    {cc: [result per build]}; ``progress`` shows the subprocesses' progress bars."""
    stderr = None if progress else subprocess.PIPE
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        recorded = Path(tmp) / "builds.json"
        workloads_json = json.dumps([asdict(w) for w in workloads])
        proc = subprocess.run(
            [sys.executable, "-m", MODULE, "record", str(recorded), "--workloads", workloads_json]
            + ["--progress"] * progress,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        if proc.returncode:
            raise RuntimeError(f"recording the launches failed:\n{(proc.stderr or '')[-4000:]}")
        builds = json.loads(recorded.read_text())
        env.pop("TRITON_INTERPRET")

        def run(cc: int) -> list[dict]:
            out = Path(tmp) / f"sm{cc}.json"
            command = [sys.executable, "-m", MODULE, "compile", str(cc), str(recorded), str(out)]
            proc = subprocess.run(
                command + ["--progress"] * progress,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env | {"TRITON_CACHE_DIR": str(Path(tmp) / f"cache{cc}")},
            )
            if proc.returncode:
                raise RuntimeError(f"sm_{cc} compile process failed:\n{(proc.stderr or '')[-4000:]}")
            return json.loads(out.read_text())

        with ThreadPoolExecutor(len(targets)) as pool:
            return builds, dict(zip(targets, pool.map(run, targets), strict=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="record the workloads' builds (under TRITON_INTERPRET=1)")
    record.add_argument("out", type=Path)
    record.add_argument("--workloads", help="JSON list of Workload fields; default WORKLOADS")
    compile_ = commands.add_parser("compile", help="compile recorded builds for one compute capability")
    compile_.add_argument("cc", type=int)
    compile_.add_argument("builds", type=Path)
    compile_.add_argument("out", type=Path)
    for command in (record, compile_):
        command.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    if args.command == "record":
        workloads = [Workload(**w) for w in json.loads(args.workloads)] if args.workloads else WORKLOADS
        args.out.write_text(json.dumps(record_builds(workloads, args.progress)))
    else:
        args.out.write_text(json.dumps(_compile_all(args.cc, json.loads(args.builds.read_text()), args.progress)))


if __name__ == "__main__":
    main()
