"""Compile every Triton build that the launchers ask for, for Hopper (sm_90) and Ampere (sm_80), without a GPU.

Under TRITON_INTERPRET=1 the kernels are interpreted, never compiled, so a kernel can pass every other test and
still fail on its first CUDA launch, or launch a binary that spills. ``spiking_lm.eval.kernel_builds`` records
the launches of the model's configurations (head size 32 and 64, S' 1 and S, fp32 and bf16 autocast, refractory
0 and 1, dropout on and off, forward and backward, and the plain LIF op) under the interpreter, then compiles each
as Triton's JIT specialises it on a CUDA GPU, with the ptxas that ships in the triton wheel. The gates below hold
for what launches, whatever the launchers come to launch.

Recording and compiling take a few minutes on two cores, once per session.
"""

import importlib
import pkgutil

import pytest
from triton.runtime.jit import KernelInterface

import spiking_lm.kernels
from spiking_lm.eval.kernel_builds import TARGETS, WORKLOADS, builds_for_targets, resident_warps
from spiking_lm.kernels.spiking_attention import MIN_RESIDENT_WARPS

pytestmark = pytest.mark.slow

# The kernels/ modules that define Triton kernels (constants.py holds numbers shared with the reference only).
KERNEL_MODULES = sorted(
    m.name
    for m in pkgutil.iter_modules(spiking_lm.kernels.__path__)
    if any(
        isinstance(v, KernelInterface) for v in vars(importlib.import_module(f"spiking_lm.kernels.{m.name}")).values()
    )
)


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


@pytest.fixture(scope="session")
def compiled() -> tuple[list[dict], dict[int, list[dict]]]:
    """The recorded builds and, per target, each one's compile result (in the builds' order)."""
    if reason := offline_compile_unavailable():
        pytest.skip(reason)
    return builds_for_targets(TARGETS)


def results(compiled, cc: int, module: str | None = None) -> list[tuple[dict, dict]]:
    """(build, result) pairs for one target, those of one kernel module if given; every one compiled."""
    builds, by_target = compiled
    pairs = [(b, r) for b, r in zip(builds, by_target[cc], strict=True) if module in (None, b["module"].split(".")[-1])]
    assert pairs and all("error" not in r for _, r in pairs)
    return pairs


def name(build: dict, result: dict) -> str:
    return f"{build['kernel']} {result['constexprs']} warps={result['num_warps']} (launched by {build['workloads']})"


def test_every_model_workload_runs_the_kernels(compiled):
    """Each model configuration, dropout included, reaches the kernels of every module (the fused attention's and
    the LIF's), forward and backward, so that the gates below see its builds."""
    builds, _ = compiled
    for w in WORKLOADS:
        launched = [b for b in builds if w.label in b["workloads"]]
        modules = {b["module"].split(".")[-1] for b in launched}
        assert modules == set(KERNEL_MODULES), (w.label, modules)
        assert any("bwd" in b["kernel"] for b in launched) and any("fwd" in b["kernel"] for b in launched), w.label


@pytest.mark.parametrize("cc", TARGETS, ids=[f"sm_{cc}" for cc in TARGETS])
def test_every_launched_build_compiles(compiled, cc):
    builds, by_target = compiled
    failed = [f"{name(b, r)}: {r['error']}" for b, r in zip(builds, by_target[cc], strict=True) if "error" in r]
    assert not failed, f"{len(failed)} of {len(builds)} builds fail for sm_{cc}:\n" + "\n".join(failed[:10])
    assert all(r["cubin_bytes"] > 0 for r in by_target[cc])


def test_jit_specialisation_is_applied(compiled):
    """The builds are the JIT's: integer arguments equal to 1 became constants (as the unit strides do on a GPU,
    except where a kernel opts out with do_not_specialize), and the launch options reached the compiler."""
    specialised = 0
    for build, result in results(compiled, 90):
        # the positional arguments are the first of the signature, the rest came by keyword
        launch = dict(zip(result["signature"], build["args"], strict=False)) | build["kwargs"]
        assert result["num_warps"] == launch.get("num_warps", 4), name(build, result)
        assert result["enable_fp_fusion"] == launch.get("enable_fp_fusion", True), name(build, result)
        ones = [n for n, v in launch.items() if n in result["signature"] and v == 1 and not isinstance(v, bool)]
        specialised += sum(result["signature"][n] == "constexpr" for n in ones)
    assert specialised > 0


@pytest.mark.parametrize("cc", TARGETS, ids=[f"sm_{cc}" for cc in TARGETS])
def test_lif_forward_has_no_fma(compiled, cc):
    """h = beta*v + x must round as the reference (product, then sum): no fused multiply-add in any launched
    forward build; its float math is separate mul.f32 and add.f32."""
    forward = [(b, r) for b, r in results(compiled, cc, "lif") if b["kernel"] == "_lif_fwd_kernel"]
    assert forward
    for build, result in forward:
        assert result["fma_f32"] == 0 and result["mul_f32"] > 0 and result["add_f32"] > 0, name(build, result)


def test_no_build_spills(compiled):
    """No spills in any launched build on sm_90: LIF and attention, bf16 and fp32 (issue 16)."""
    for build, result in results(compiled, 90):
        assert result["spill_stores"] == result["spill_loads"] == 0, name(build, result)


def test_bf16_attention_at_head_size_64_keeps_12_warps_per_sm(compiled):
    """Every attention build that bf16 training at head size 64 launches leaves room for MIN_RESIDENT_WARPS (12)
    resident warps per sm_90 SM, by its registers and shared memory (issue 16)."""
    builds = [
        (b, r)
        for b, r in results(compiled, 90, "spiking_attention")
        if any(w.startswith("hs64-bf16") for w in b["workloads"])
    ]
    assert {b["kernel"] for b, _ in builds} == {"_attn_fwd_kernel", "_attn_bwd_kernel"}
    for build, result in builds:
        warps = resident_warps(result["registers"], result["shared_bytes"], result["num_warps"])
        assert warps >= MIN_RESIDENT_WARPS == 12, name(build, result)


def test_resident_warps():
    """H100 limits: registers in units of 256 per warp, 1 KB of shared memory reserved per block."""
    assert resident_warps(32, 0, 4) == 64  # warp slots
    assert resident_warps(255, 0, 4) == 8  # 255 -> 256 registers: 8192 per warp, 2 blocks of 4 warps
    assert resident_warps(128, 0, 4) == 16
    assert resident_warps(64, 100 * 1024, 4) == 8  # 228 KB holds two blocks of 101 KB
    assert resident_warps(16, 0, 1) == 32  # block slots


def test_attention_has_no_fma(compiled):
    """The neurons' h = beta*mem + x rounds as the reference's (product, then sum) in every attention build."""
    for cc in TARGETS:
        for build, result in results(compiled, cc, "spiking_attention"):
            assert result["fma_f32"] == 0, name(build, result)


def test_bf16_builds_have_no_tf32_mma(compiled):
    """bf16 inputs get bf16 dots (fp32 accumulation), never fp32 dots on tf32 operands."""
    bf16 = [(b, r) for b, r in results(compiled, 90) if any(t == "*bf16" for t in r["signature"].values())]
    assert bf16
    for build, result in bf16:
        assert result["tf32_mma"] == 0, name(build, result)
