"""The public API: argument checks, backend choice, firing statistics, the LIF module, the benchmark script."""

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from spiking_lm import LIF, lif
from spiking_lm.eval import bench_lif
from spiking_lm.lif import MIN_LEARNED, resolve_backend
from spiking_lm.lif_reference import lif_reference
from spiking_lm.neuron import NeuronSpec

C = 4
# CPU tensors reach the kernels only under the interpreter, which conftest sets up when there is no GPU.
BACKENDS = [("torch", "cpu"), ("triton", "cuda" if torch.cuda.is_available() else "cpu")]


def x_cpu(*shape: int) -> torch.Tensor:
    return torch.randn(shape or (5, 3, C), generator=torch.Generator().manual_seed(0))


# (keyword overrides, x, exception, message that must name the argument and what it may be)
BAD_LIF_ARGS = {
    "beta-zero": ({"beta": 0}, None, ValueError, "beta must be in (0, 1], got 0"),
    "beta-1.5": ({"beta": 1.5}, None, ValueError, "beta must be in (0, 1], got 1.5"),
    "beta-tensor": (
        {"beta": torch.tensor([0.5, 1.2, 0.5, 0.5])},
        None,
        ValueError,
        "beta must be in (0, 1], got values in [0.5, 1.2",
    ),
    "beta-nan": ({"beta": torch.tensor([0.5, float("nan"), 0.5, 0.5])}, None, ValueError, "beta must be in (0, 1]"),
    "beta-shape": (
        {"beta": torch.full((3,), 0.5)},
        None,
        ValueError,
        f"beta must be a scalar or a tensor of shape ({C},)",
    ),
    "beta-int-tensor": (
        {"beta": torch.ones(C, dtype=torch.int64)},
        None,
        TypeError,
        "beta must be a floating-point tensor",
    ),
    "beta-str": ({"beta": "0.5"}, None, TypeError, "beta must be a float or a tensor"),
    "beta-bool": ({"beta": True}, None, TypeError, "beta must be a float or a tensor"),
    "beta-meta": ({"beta": torch.full((C,), 0.5, device="meta")}, None, ValueError, "beta is on meta but x is on cpu"),
    "threshold-zero": ({"threshold": 0.0}, None, ValueError, "threshold must be finite and > 0"),
    "threshold-negative": ({"threshold": -1}, None, ValueError, "threshold must be finite and > 0"),
    "threshold-tensor": (
        {"threshold": torch.tensor([1.0, 0.0, 1.0, 1.0])},
        None,
        ValueError,
        "threshold must be finite and > 0, got values in [0.0, 1.0]",
    ),
    "threshold-meta": (
        {"threshold": torch.ones(C, device="meta")},
        None,
        ValueError,
        "threshold is on meta but x is on cpu",
    ),
    "refractory-float": ({"refractory": 1.5}, None, TypeError, "refractory must be a non-negative integer"),
    "refractory-negative": ({"refractory": -1}, None, ValueError, "refractory must be a non-negative integer"),
    "refractory-bool": ({"refractory": True}, None, TypeError, "refractory must be a non-negative integer"),
    "reset": ({"reset": "hard"}, None, ValueError, "reset must be one of ('subtract', 'zero'), got 'hard'"),
    "surrogate": (
        {"surrogate": "sigmoid"},
        None,
        ValueError,
        "surrogate must be one of ('atan', 'fast_sigmoid'), got 'sigmoid'",
    ),
    "alpha": ({"alpha": 0}, None, ValueError, "alpha must be finite and > 0"),
    "alpha-inf": ({"alpha": float("inf")}, None, ValueError, "alpha must be finite and > 0, got inf"),
    "unknown-setting": ({"refactory": 1}, None, TypeError, "unexpected keyword argument 'refactory'"),
    "backend": (
        {"backend": "cuda"},
        None,
        ValueError,
        "backend must be one of ('auto', 'torch', 'triton'), got 'cuda'",
    ),
    "x-1d": ({}, torch.zeros(C), ValueError, "x must be time-major with at least 2 dims"),
    "x-int": ({}, torch.zeros(5, C, dtype=torch.int32), TypeError, "x must be a floating-point tensor"),
    "x-list": ({}, [[0.0] * C] * 5, TypeError, "x must be a torch.Tensor"),
    "x-no-steps": ({}, torch.empty(0, C), ValueError, "x has no time steps: its first dim T must be >= 1"),
    "x-nan": ({}, torch.tensor([[0.5] * C, [float("nan")] * C]), ValueError, "x holds NaN or infinite values"),
    "x-inf": ({}, torch.tensor([[0.5] * C, [float("inf")] * C]), ValueError, "x holds NaN or infinite values"),
    "x-float64-triton": (
        {"backend": "triton"},
        torch.zeros(5, C, dtype=torch.float64),
        ValueError,
        "backend='triton' computes in fp32; use backend='torch' for float64 input",
    ),
}


@pytest.mark.parametrize("case", BAD_LIF_ARGS)
def test_lif_rejects_bad_arguments(case):
    overrides, x, error, message = BAD_LIF_ARGS[case]
    kwargs = {"beta": 0.5} | overrides
    with pytest.raises(error, match=re.escape(message)):
        lif(x_cpu() if x is None else x, **kwargs)


BAD_MODULE_ARGS = {
    "beta-zero": ({"beta": 0.0}, ValueError, "beta must be in (0, 1], got 0.0"),
    "beta-1.5": ({"beta": 1.5}, ValueError, "beta must be in (0, 1], got 1.5"),
    "beta-tensor": ({"beta": torch.tensor(0.5)}, TypeError, "beta must be a float, got Tensor"),
    "threshold-zero": ({"threshold": 0.0}, ValueError, "threshold must be finite and > 0, got 0.0"),
    "refractory-float": ({"refractory": 2.0}, TypeError, "refractory must be a non-negative integer"),
    "refractory-negative": ({"refractory": -2}, ValueError, "refractory must be a non-negative integer"),
    "reset": ({"reset": "none"}, ValueError, "reset must be one of ('subtract', 'zero')"),
    "surrogate": ({"surrogate": "triangle"}, ValueError, "surrogate must be one of ('atan', 'fast_sigmoid')"),
    "alpha": ({"alpha": -1.0}, ValueError, "alpha must be finite and > 0"),
    "alpha-nan": ({"alpha": float("nan")}, ValueError, "alpha must be finite and > 0, got nan"),
    "channels-negative": ({"channels": -1}, ValueError, "channels must be a positive integer or None, got -1"),
    "backend": ({"backend": "cupy"}, ValueError, "backend must be one of ('auto', 'torch', 'triton')"),
}


@pytest.mark.parametrize("case", BAD_MODULE_ARGS)
def test_module_rejects_bad_arguments(case):
    kwargs, error, message = BAD_MODULE_ARGS[case]
    with pytest.raises(error, match=re.escape(message)):
        LIF(**{"channels": C} | kwargs)


# (module, x, exception, message): the forward checks its input as lif() does.
BAD_MODULE_INPUTS = {
    "x-1d": (LIF(8), torch.randn(8), ValueError, "x must be time-major with at least 2 dims (T, ...), got shape (8,)"),
    "x-int64": (LIF(C), torch.ones(5, C, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
    "x-channels": (LIF(C), torch.ones(5, C + 1), ValueError, f"x must have {C} channels in its last dim"),
    "x-no-steps": (LIF(C), torch.empty(0, 2, C), ValueError, "x has no time steps"),
}


@pytest.mark.parametrize("case", BAD_MODULE_INPUTS)
def test_module_rejects_bad_input(case):
    layer, x, error, message = BAD_MODULE_INPUTS[case]
    with pytest.raises(error, match=re.escape(message)):
        layer(x)


def test_scalar_module_takes_any_channel_count():
    x = x_cpu(5, 2, 7) + 0.8
    assert torch.equal(LIF(beta=0.5)(x), lif_reference(x, 0.5, 1.0, NeuronSpec().refractory))


def test_neuron_spec_is_frozen_and_resolves_alpha():
    spec = NeuronSpec(surrogate="fast_sigmoid")
    assert spec.surrogate_alpha == 25.0 and NeuronSpec(alpha=3).surrogate_alpha == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.beta = 2.0
    with pytest.raises(TypeError, match="beta must be a float, got Tensor"):
        NeuronSpec(beta=torch.tensor(0.5))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=re.escape("backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1")):
        lif(x_cpu(), beta=0.5, backend="triton")


def test_auto_backend_is_torch_on_cpu():
    """Even with the interpreter available (conftest sets it), "auto" picks the torch loop for CPU tensors."""
    x = x_cpu()
    assert resolve_backend("auto", x) == "torch" and resolve_backend("triton", x) == "triton"
    expected = lif_reference(x, 0.5, 1.0, 1)
    assert torch.equal(lif(x, beta=0.5, refractory=1), expected)
    assert torch.equal(LIF(beta=0.5, refractory=1)(x), expected)


def refractory_steps(spikes: torch.Tensor, refractory: int) -> int:
    """Run each neuron's refractory counter over its spike train, one step at a time."""
    flat = spikes.reshape(spikes.shape[0], -1).tolist()
    blocked = 0
    for n in range(len(flat[0])):
        left = 0
        for step in flat:
            if left > 0:
                blocked, left = blocked + 1, left - 1
            elif step[n]:
                left = refractory
    return blocked


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("refractory", [0, 1, 3])
def test_firing_stats_count_by_hand(refractory, backend, device):
    x = (x_cpu(9, 4, C) + 0.8).to(device)
    spikes, stats = lif(x, beta=0.5, refractory=refractory, backend=backend, return_stats=True)
    assert torch.equal(spikes, lif_reference(x, 0.5, 1.0, refractory))
    neuron_steps = x.numel()
    assert stats.neuron_steps == neuron_steps
    assert stats.spikes.item() == spikes.sum().item() > 0
    blocked = refractory_steps(spikes, refractory)
    assert stats.eligible.item() == neuron_steps - blocked
    assert (blocked > 0) == (refractory > 0)
    assert stats.rate.item() == pytest.approx(spikes.mean().item())


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_module_keeps_only_scalar_stats(backend, device):
    layer = LIF(C, refractory=2, learn_beta=True, backend=backend).to(device)
    spikes, stats = layer((x_cpu() + 0.8).to(device), return_stats=True)
    assert vars(layer).keys() == vars(LIF(C)).keys()  # the call left nothing behind on the module
    assert isinstance(stats.neuron_steps, int)
    for value in (stats.spikes, stats.eligible):
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert stats.spikes.item() == spikes.sum().item()
    assert stats.eligible.item() == spikes.numel() - refractory_steps(spikes, 2)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_module_learns_and_clamps_per_channel(backend, device):
    layer = LIF(C, beta=0.5, threshold=1.0, refractory=1, learn_beta=True, learn_threshold=True, backend=backend)
    layer.to(device)
    with torch.no_grad():
        layer.beta[0] = 1.5  # out of range: used as 1, and no gradient pushes it further
        layer.threshold[1] = -0.5  # used as 1e-4
    x = (x_cpu(8, 6, C) + 0.4).to(device)
    spikes = layer(x)
    beta_used = torch.tensor([1.0, 0.5, 0.5, 0.5], device=device)
    threshold_used = torch.tensor([1.0, 1e-4, 1.0, 1.0], device=device)
    assert torch.equal(spikes, lif_reference(x, beta_used, threshold_used, 1))
    spikes.backward(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device))
    assert layer.beta.grad.shape == layer.threshold.grad.shape == (C,)
    assert layer.beta.grad[0] == 0 and layer.threshold.grad[1] == 0
    assert (layer.beta.grad[1:] != 0).all() and (layer.threshold.grad[[0, 2, 3]] != 0).all()


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_module_parameters_on_their_bounds_still_learn(backend, device):
    # A decay of exactly 1 (integrate-and-fire) and a threshold at its floor take a gradient, whatever torch's
    # clamp does at a bound (its gradient there was 1 in torch 2.11, 0 in 2.14): otherwise they never move.
    layer = LIF(C, beta=1.0, threshold=1.0, refractory=1, learn_beta=True, learn_threshold=True, backend=backend)
    layer.to(device)
    with torch.no_grad():
        layer.threshold[1] = MIN_LEARNED
    x = (x_cpu(8, 6, C) + 0.4).to(device)
    layer(x).backward(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device))
    assert (layer.beta.grad != 0).all() and layer.threshold.grad[1] != 0


def test_fixed_module_parameters_get_no_gradient():
    layer = LIF(C)
    x = (x_cpu() + 0.8).requires_grad_()
    layer(x).sum().backward()
    assert layer.beta.grad is None and layer.threshold.grad is None
    assert x.grad is not None


def test_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    bench_lif.main(
        [
            "--device",
            "cpu",
            "--t",
            "4",
            "--n",
            "64",
            "--rows",
            "spiking_lm-torch",
            "--dtypes",
            "fp32,bf16",
            "--budget_ms",
            "20",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert {"device", "date", "commit", "torch", "triton", "bandwidth_GBps", "rows"} <= report.keys()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert report["bandwidth_GBps"] > 0 and report["commit"] == head.stdout.strip()
    assert [(r["name"], r["dtype"]) for r in report["rows"]] == [
        ("spiking_lm-torch", "fp32"),
        ("spiking_lm-torch", "bf16"),
    ]
    for row in report["rows"]:
        assert "error" not in row, row
        assert row["shape"] == [4, 64]
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        # The floor: 6 state tensors of 4 x 64 values (4 bytes fp32, 2 bf16) at the measured copy bandwidth.
        floor_ms = 6 * 4 * 64 * {"fp32": 4, "bf16": 2}[row["dtype"]] / (report["bandwidth_GBps"] * 1e6)
        assert row["floor_ratio"] == pytest.approx(row["fwd_bwd_ms"] / floor_ms)
