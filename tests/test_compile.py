"""Compile every Triton kernel in kernels/ for Hopper (sm_90) and Ampere (sm_80), without a GPU.

Under TRITON_INTERPRET=1 the kernels are interpreted, never compiled, so a kernel can pass every other test
and still fail on its first CUDA launch. ``triton.compile`` lowers a kernel to PTX and a cubin (with the
ptxas that ships in the triton wheel) for a GPU that is not there. Each module in kernels/ lists the builds
its launchers can ask for in ``compile_variants()``: dicts of ``kernel`` (the @triton.jit function),
``signature`` (runtime argument -> Triton type), ``constexprs``, ``num_warps`` and optionally ``options``
(further compile options the launcher passes, e.g. ``enable_fp_fusion``).

The interpreter setting is read when triton is imported, and conftest sets it; so the compiling runs in
subprocesses with TRITON_INTERPRET unset, one per target, side by side.
"""

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import spiking_lm.kernels

TARGETS = (90, 80)  # compute capabilities: H100/H200, A100
KERNEL_MODULES = sorted(m.name for m in pkgutil.iter_modules(spiking_lm.kernels.__path__))

# Run as `python -c COMPILE TARGET MODULE...` with TRITON_INTERPRET unset: compiles every variant of every
# module for one target and prints one JSON line per variant (the PTX only where a check needs it).
COMPILE = r"""
import importlib, json, sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

cc, modules = int(sys.argv[1]), sys.argv[2:]
target = GPUTarget("cuda", cc, 32)
for module in modules:
    for i, v in enumerate(importlib.import_module(f"spiking_lm.kernels.{module}").compile_variants()):
        kernel, constexprs = v["kernel"], v["constexprs"]
        # every argument in order: the runtime ones typed, the meta-parameters as constexpr
        signature = {name: "constexpr" if name in constexprs else v["signature"][name] for name in kernel.arg_names}
        row = {"module": module, "index": i, "kernel": kernel.__name__, "constexprs": repr(constexprs)}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                      options={"num_warps": v["num_warps"], **v.get("options", {})})
            row["cubin_bytes"] = len(compiled.asm["cubin"])
            row["ptx"] = compiled.asm["ptx"] if "fwd" in kernel.__name__ else None
        except Exception as e:  # reported per variant by the test
            row["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(row), flush=True)
"""


def offline_compile_unavailable() -> str | None:
    """Why this Triton cannot compile for CUDA offline, or None when it can."""
    try:
        import triton.backends.nvidia.compiler as nvidia
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this Triton has no CUDA backend to compile with ({e})"
    try:
        for cc in TARGETS:
            nvidia.get_ptxas_version(cc)
    except Exception as e:  # missing or unusable ptxas binary
        return f"this Triton ships no usable ptxas ({e})"
    return None


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[dict]]:
    """Results for every variant, per target."""
    if reason := offline_compile_unavailable():
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(cc: int) -> list[dict]:
        proc = subprocess.run([sys.executable, "-c", COMPILE, str(cc), *KERNEL_MODULES], env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"sm_{cc} compile process failed:\n{proc.stderr[-4000:]}"
        return [json.loads(line) for line in proc.stdout.splitlines()]

    with ThreadPoolExecutor(len(TARGETS)) as pool:
        return dict(zip(TARGETS, pool.map(run, TARGETS), strict=True))


def test_every_kernel_module_lists_its_variants():
    assert KERNEL_MODULES
    for name in KERNEL_MODULES:
        variants = importlib.import_module(f"spiking_lm.kernels.{name}").compile_variants()
        assert variants, name
        for v in variants:
            assert {"kernel", "signature", "constexprs", "num_warps"} <= v.keys()
            runtime = [a for a in v["kernel"].arg_names if a not in v["constexprs"]]
            # every runtime argument typed; a meta-parameter may be listed too, as "constexpr"
            assert set(runtime) <= v["signature"].keys(), (name, v["kernel"].__name__)
            extra = v["signature"].keys() - set(runtime)
            assert all(v["signature"][a] == "constexpr" for a in extra), (name, v["kernel"].__name__)


@pytest.mark.parametrize("cc", TARGETS, ids=[f"sm_{cc}" for cc in TARGETS])
def test_every_variant_compiles(compiled, cc):
    rows = compiled[cc]
    expected = sum(len(importlib.import_module(f"spiking_lm.kernels.{m}").compile_variants()) for m in KERNEL_MODULES)
    assert len(rows) == expected
    failed = [f"{r['module']}.{r['kernel']} {r['constexprs']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, f"{len(failed)} of {len(rows)} variants fail for sm_{cc}:\n" + "\n".join(failed[:10])
    assert all(r["cubin_bytes"] > 0 for r in rows)


def lif_forward_ptx(compiled, cc: int) -> list[str]:
    rows = [r for r in compiled[cc] if r["kernel"] == "_lif_fwd_kernel"]
    assert rows and all("error" not in r for r in rows)
    return [r["ptx"] for r in rows]


@pytest.mark.parametrize("cc", TARGETS, ids=[f"sm_{cc}" for cc in TARGETS])
def test_lif_forward_has_no_fma(compiled, cc):
    """h = beta*v + x must round as the reference (product, then sum): no fused multiply-add in the
    forward, in any variant. Its float math is then separate mul.f32 and add.f32."""
    for ptx in lif_forward_ptx(compiled, cc):
        assert "fma." not in ptx
        assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx
