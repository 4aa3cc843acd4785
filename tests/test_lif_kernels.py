"""The fused Triton kernels against the plain-loop reference: spikes, gradients, dtypes, layouts, saved state.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1). Its fp32 arithmetic
is numpy's, rounding every product and sum as PyTorch's CPU loop does, so spikes match the reference exactly
there even on random inputs. The forward kernel is compiled without FMA contraction, so ``beta*v + x`` rounds
twice on a GPU too (``test_at_threshold_inputs_where_an_fma_flips_the_spike``; the compile test checks the
PTX). The backward may still contract; inputs that are multiples of 1/32 with beta in {.5, 1} keep every step
exact, so gradients on those must match tightly everywhere.
"""

import numpy as np
import pytest
import torch
from conftest import KERNEL_DEVICES, assert_grad_close

from spiking_lm import LIF, lif
from spiking_lm.kernels import lif as lif_kernels
from spiking_lm.kernels.lif import LAUNCH_CONFIGS, lif_triton
from spiking_lm.lif import firing_stats
from spiking_lm.lif_reference import DEFAULT_ALPHA, lif_reference

# Half-precision runs keep the saved state and the input gradient in the input dtype; measured errors
# against fp32, relative to the largest entry, were a third of these or less (bf16 has 8 significant bits,
# fp16 11).
HALF_TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def fused(x, beta, threshold, refractory, reset, surrogate, alpha, detach_reset):
    """``lif_triton`` with the reference's signature: the kernels take alpha resolved."""
    alpha = DEFAULT_ALPHA[surrogate] if alpha is None else alpha
    return lif_triton(x, beta, threshold, refractory, reset, surrogate, alpha, detach_reset)[0]


def make_param(spec, channels: int, learn: bool, device: str):
    """beta or threshold: a float, or a tuple of values cycled over the channels into a (C,) tensor.

    Learnable ones must be tensors, so a learnable float becomes a 0-d tensor.
    """
    if isinstance(spec, tuple):
        value = torch.tensor(spec, device=device).repeat(channels // len(spec) + 1)[:channels]
    elif learn:
        value = torch.tensor(spec, device=device)
    else:
        return spec
    return value.requires_grad_(learn)


def run(impl, x, beta, threshold, grad_out, *args, view=None):
    """Forward and backward on fresh leaves; return the spikes and the grads of (x, beta, threshold).

    ``view`` turns the leaf into the tensor actually fed in (a transpose, slice or expand), so layouts
    are tested with gradients flowing back to a real leaf. Fixed parameters give None.
    """
    x = x.detach().clone().requires_grad_()
    beta, threshold = (
        p.detach().clone().requires_grad_(p.requires_grad) if isinstance(p, torch.Tensor) else p
        for p in (beta, threshold)
    )
    spikes = impl(view(x) if view else x, beta, threshold, *args)
    spikes.backward(grad_out)
    return spikes.detach(), [p.grad if isinstance(p, torch.Tensor) else None for p in (x, beta, threshold)]


def assert_same(x, beta, threshold, grad_out, *args, view=None):
    (spikes, grads), (ref_spikes, ref_grads) = (
        run(impl, x, beta, threshold, grad_out, *args, view=view) for impl in (fused, lif_reference)
    )
    assert spikes.dtype == ref_spikes.dtype and spikes.shape == ref_spikes.shape
    assert torch.equal(spikes, ref_spikes)
    for name, got, want in zip(("x", "beta", "threshold"), grads, ref_grads, strict=True):
        assert (got is None) == (want is None), name
        if want is not None:
            assert_grad_close(got, want, name)
    return ref_spikes


def assert_close_where_spikes_agree(spikes, grads, ref_spikes, ref_grads, device, assert_close):
    """Spikes equal exactly on CPU and on 99.9% of entries on a GPU; gradients then compared where the
    spikes agree: dL/dx on neurons whose whole train agrees (one flip changes the rest of that neuron's
    history), parameter gradients on channels all of whose neurons agree."""
    agree = spikes.to(ref_spikes.dtype) == ref_spikes
    if device == "cpu":
        assert agree.all()
    assert agree.float().mean() >= 0.999
    neuron_ok = agree.all(0)  # (..., C)
    channel_ok = neuron_ok.reshape(-1, neuron_ok.shape[-1]).all(0)
    assert_close(grads[0][:, neuron_ok], ref_grads[0][:, neuron_ok], "x")
    for name, got, want in zip(("beta", "threshold"), grads[1:], ref_grads[1:], strict=True):
        assert_close(got[channel_ok], want[channel_ok], name)


def exact_input(shape, seed: int, device: str) -> torch.Tensor:
    """Multiples of 1/32 in [-1.25, 2.25): with beta in {.5, 1} and dyadic thresholds, fp32 is exact."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-40, 72, shape, generator=g) / 32).to(device)


def randn(shape, seed: int, device: str, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def assert_same_on_exact_input(T, beta, threshold, learn, refractory, reset, surrogate, detach_reset, device):
    B, C = 5, 7  # 35 neurons; per-channel values repeat across the batch dim
    spikes = assert_same(
        exact_input((T, B, C), seed=T, device=device),
        make_param(beta, C, learn, device),
        make_param(threshold, C, learn, device),
        randn((T, B, C), seed=1, device=device),
        refractory,
        reset,
        surrogate,
        None,
        detach_reset,
    )
    if T == 16:
        assert 0.05 < spikes.mean() < 0.95


# The two grids below split the full cross product, which the interpreter would take a minute over.
# Every axis that selects a different kernel code path (T, R, reset, surrogate, detach, which gradients
# are wanted) is crossed in full, with channels alternating beta .5 and 1; the forms a parameter can
# take (float, 0-d or per-channel tensor) only change the launch wrapper and are crossed separately.
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid"])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("refractory", [0, 1, 3])
@pytest.mark.parametrize("learn", [False, True], ids=["fixed", "learn"])
@pytest.mark.parametrize("T", [1, 2, 7, 16])
def test_kernel_paths(T, learn, refractory, reset, surrogate, detach_reset, device):
    assert_same_on_exact_input(
        T, (0.5, 1.0), (0.5, 0.75, 1.0, 1.25), learn, refractory, reset, surrogate, detach_reset, device
    )


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("reset, refractory", [("subtract", 3), ("zero", 0)])
@pytest.mark.parametrize("learn", [False, True], ids=["fixed", "learn"])
@pytest.mark.parametrize("threshold", [1.0, (0.5, 0.75, 1.0, 1.25)], ids=["thr1", "thrC"])
@pytest.mark.parametrize("beta", [0.5, 1.0, (0.5, 1.0)], ids=["beta.5", "beta1", "betaC"])
@pytest.mark.parametrize("T", [1, 16])
def test_parameter_forms(T, beta, threshold, learn, reset, refractory, device):
    assert_same_on_exact_input(T, beta, threshold, learn, refractory, reset, "atan", False, device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("alpha", [0.7, 9.0])
@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid"])
def test_custom_alpha(surrogate, alpha, device):
    C = 7
    assert_same(
        exact_input((7, 3, C), seed=0, device=device),
        make_param((0.5, 1.0), C, True, device),
        make_param((0.75, 1.0), C, True, device),
        randn((7, 3, C), seed=1, device=device),
        2,
        "subtract",
        surrogate,
        alpha,
        False,
    )


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize(
    "reset, refractory, surrogate",
    [("subtract", 0, "atan"), ("zero", 2, "fast_sigmoid"), ("subtract", 3, "fast_sigmoid"), ("zero", 0, "atan")],
)
@pytest.mark.parametrize("B, C", [(3, 341), (5, 205)], ids=["N1023", "N1025"])
def test_random_inputs(B, C, reset, refractory, surrogate, device):
    """Normal inputs, beta uniform in (0, 1), thresholds in (.5, 1.5), all per channel and learned."""
    T = 16
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(T, B, C, generator=g) * 0.8 + 0.3).to(device)
    beta = torch.rand(C, generator=g).clamp_min(1e-3).to(device).requires_grad_()
    threshold = (0.5 + torch.rand(C, generator=g)).to(device).requires_grad_()
    grad_out = randn((T, B, C), seed=2, device=device)
    args = (grad_out, refractory, reset, surrogate, None, True)
    (spikes, grads), (ref_spikes, ref_grads) = (run(i, x, beta, threshold, *args) for i in (fused, lif_reference))
    assert_close_where_spikes_agree(spikes, grads, ref_spikes, ref_grads, device, assert_grad_close)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("reset, refractory", [("subtract", 0), ("zero", 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_fp32(dtype, reset, refractory, detach_reset, device):
    """Half inputs against the fp32 reference on the upcast input.

    The kernel computes in fp32, so the spikes match exactly (on CPU; near-exactly with FMA on a GPU);
    the gradients carry the rounding of the half-precision saved state and outputs.
    """
    T, B, C = 16, 5, 41
    x = randn((T, B, C), seed=0, device=device, dtype=dtype)
    grad_out = randn((T, B, C), seed=1, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    beta = torch.rand(C, generator=g).to(device).requires_grad_()
    threshold = (0.5 + torch.rand(C, generator=g)).to(device).requires_grad_()
    args = (refractory, reset, "atan", None, detach_reset)
    spikes, grads = run(fused, x, beta, threshold, grad_out, *args)
    ref_spikes, ref_grads = run(lif_reference, x.float(), beta, threshold, grad_out.float(), *args)

    assert spikes.dtype == grads[0].dtype == dtype
    tol = HALF_TOL[dtype]

    def assert_close(got, want, name):
        torch.testing.assert_close(
            got.float(), want, rtol=tol, atol=tol * want.abs().max().item(), msg=lambda m: f"grad of {name}: {m}"
        )

    assert_close_where_spikes_agree(spikes, grads, ref_spikes, ref_grads, device, assert_close)


LAYOUTS = {
    # name: (leaf shape, leaf -> input of shape (T, B, C) = (7, 3, 5) or (7, 15))
    "transposed": ((15, 7), lambda b: b.t()),
    "strided-neurons": ((7, 30), lambda b: b[:, ::2]),
    "strided-time": ((14, 15), lambda b: b[::2]),
    "expanded-time": ((1, 15), lambda b: b.expand(7, 15)),  # stride 0 along time
    "permuted-3d": ((7, 5, 3), lambda b: b.transpose(1, 2)),
    "sliced-3d": ((7, 4, 5), lambda b: b[:, 1:]),
    "expanded-4d": ((7, 3, 1, 5), lambda b: b.expand(7, 3, 2, 5)),
}
GRAD_LAYOUTS = {
    "contiguous": lambda g: g,
    "transposed": lambda g: g.transpose(0, -1).contiguous().transpose(0, -1),
    "stride0": lambda g: g[:1].expand_as(g),
}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("grad_layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, grad_layout, device):
    shape, view = LAYOUTS[layout]
    x = exact_input(shape, seed=3, device=device)
    x_in = view(x)
    assert not x_in.is_contiguous()
    grad_out = GRAD_LAYOUTS[grad_layout](randn(x_in.shape, seed=4, device=device))
    assert grad_layout == "contiguous" or not grad_out.is_contiguous()
    C = x_in.shape[-1]
    assert_same(
        x,
        make_param((0.5, 1.0), C, True, device),
        make_param((0.75, 1.25), C, True, device),
        grad_out,
        1,
        "subtract",
        "atan",
        None,
        True,
        view=view,
    )


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("edge", [-1, 0, 1, 1025], ids=["below", "at", "above", "block+1025"])
@pytest.mark.parametrize("config", LAUNCH_CONFIGS, ids=[f"block{b}" for b, _ in LAUNCH_CONFIGS])
def test_block_edges(config, edge, T, device, monkeypatch):
    """Every (BLOCK, num_warps) a launch can pick, forced, with N below, at and above one block, so the last
    program is partly masked."""
    monkeypatch.setattr(lif_kernels, "LAUNCH_CONFIGS", (config,))
    N = max(1, config[0] + edge)
    assert_same(
        exact_input((T, N), seed=N, device=device),
        make_param(0.5, N, True, device),
        1.0,
        randn((T, N), seed=5, device=device),
        2,
        "zero",
        "atan",
        None,
        True,
    )


@pytest.mark.parametrize("sms", [132, 108], ids=["H200", "A100"])
def test_launch_config_fills_the_gpu(sms):
    """The largest block once every SM gets its programs; below that, smaller blocks keep the grid filled."""
    per_sm = lif_kernels.PROGRAMS_PER_SM
    assert lif_kernels.launch_config(32 * 2**20, sms) == LAUNCH_CONFIGS[-1]
    assert lif_kernels.launch_config(1, sms) == LAUNCH_CONFIGS[0]
    for n in (2**10, 2**14, 2**16, 2**17, 2**18, 2**19, 2**20):
        block, warps = lif_kernels.launch_config(n, sms)
        assert (block, warps) in LAUNCH_CONFIGS and block == 128 * warps
        assert -(-n // block) >= per_sm * sms or block == LAUNCH_CONFIGS[0][0], (n, block)
        bigger = [b for b, _ in LAUNCH_CONFIGS if b > block]
        assert not bigger or -(-n // bigger[0]) < per_sm * sms, (n, block)  # no larger block would do
    assert lif_kernels.launch_config(2**17, sms)[0] < 1024  # 128 programs of 1024 would leave SMs idle
    assert lif_kernels.launch_config(2**17, 0) == LAUNCH_CONFIGS[-1]  # off CUDA: the fewest programs


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape", [(4, 0), (4, 0, 3), (4, 2, 0, 3)])
def test_empty_neurons(shape, device):
    C = shape[-1]
    beta = make_param((0.5,), C, True, device) if C else 0.5
    spikes = assert_same(
        torch.zeros(shape, device=device),
        beta,
        1.0,
        torch.zeros(shape, device=device),
        1,
        "subtract",
        "atan",
        None,
        True,
    )
    assert spikes.shape == shape


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_empty_channels_with_learned_parameter(device):
    """A learnable per-channel beta of shape (0,) on x of shape (T, 0) gets an empty gradient, as in the reference."""
    assert_same(
        torch.zeros(4, 0, device=device),
        make_param((0.5,), 0, True, device),
        1.0,
        torch.zeros(4, 0, device=device),
        1,
        "subtract",
        "atan",
        None,
        True,
    )


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_saves_one_tensor_of_x_size(dtype, device):
    """The memory rule: backward keeps at most one tensor of x's size (and element size), beside the
    (C,) parameters. Saved-tensor hooks see everything the autograd graph keeps, not just ctx fields."""
    T, B, C = 4, 3, 5  # T > 1 so a (C,)-sized parameter cannot be mistaken for x-sized
    x = randn((T, B, C), seed=0, device=device, dtype=dtype).requires_grad_()
    beta, threshold = (make_param(v, C, True, device) for v in ((0.5, 1.0), (1.0,)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        spikes, _ = lif_triton(x, beta, threshold, 2, "subtract", "atan", 2.0, True)
    large = [t for t in saved if t.numel() > C]
    assert saved and len(large) <= 1, [tuple(t.shape) for t in saved]
    assert all(t.numel() <= x.numel() and t.element_size() <= x.element_size() for t in large)
    spikes.backward(torch.ones_like(spikes))  # what was saved suffices


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_fp16_state_keeps_a_barely_fired_spike(device):
    """fp16 inputs keep the state u = h - threshold in fp16. A fired step with u below fp16's smallest
    subnormal (2**-24) must still read as fired in backward, or the next membrane is rebuilt as
    u + threshold instead of u. Here x = fp16(0.3), threshold = x - 2**-25: the neuron fires with
    u = 2**-25, then x = 0 gives h = 2**-25. Without the floor the kernel gave dL/dbeta ~ 0.159 and
    dL/dthreshold ~ -1.53 against the reference's ~1.6e-8 and ~-2.06."""
    x = torch.tensor([[0.3], [0.0]], dtype=torch.float16, device=device)
    threshold = torch.tensor(x[0, 0].item() - 2**-25, device=device)
    assert threshold.item() == x[0, 0].item() - 2**-25  # representable in fp32
    args = (torch.ones_like(x), 0, "subtract", "atan", None, True)
    beta = torch.tensor(1.0, device=device, requires_grad=True)
    (spikes, grads), (ref_spikes, ref_grads) = (
        run(impl, x_in, beta, threshold.requires_grad_(), *args)
        for impl, x_in in ((fused, x), (lif_reference, x.float()))
    )
    assert spikes.tolist() == ref_spikes.tolist() == [[1.0], [0.0]]
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want, rtol=HALF_TOL[torch.float16], atol=1e-3)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("T", [1, 3, 6])
def test_refractory_at_least_T_acts_as_T_minus_1(T, reset, device):
    """A spike can silence at most the steps left, so any R >= T - 1 (2**31, past int32, too) gives the
    R = T - 1 spikes and gradients, and equals the reference at that R."""
    C = 7
    x = exact_input((T, 4, C), seed=T, device=device) + 0.5
    grad_out = randn((T, 4, C), seed=1, device=device)
    beta = make_param((0.5, 1.0), C, True, device)
    want = assert_same(x, beta, 1.0, grad_out, max(T - 1, 0), reset, "atan", None, False)
    for refractory in (T, T + 5, 2**31, 2**40):
        got = assert_same(x, beta, 1.0, grad_out, refractory, reset, "atan", None, False)
        assert torch.equal(got, want)


def fma_flips(n: int, threshold: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """beta, x0 and x1 (fp32) for n neurons whose membrane at step 1, h = beta*x0 + x1, falls on the other
    side of the threshold when rounded once (an FMA) than when the product and the sum round separately
    (the reference). Half flip each way. beta*x0 has 48 significant bits and the sum spans fewer than 53,
    so float64 gives the exact value, and one rounding to fp32 gives what an FMA computes."""
    rng = np.random.default_rng(0)
    found = {True: [], False: []}  # the reference's spike -> (beta, x0, x1)
    while min(map(len, found.values())) < n // 2:
        beta = rng.uniform(0.8, 1.0, 4096).astype(np.float32)
        x0 = rng.uniform(0.85, 0.99, 4096).astype(np.float32)
        product = beta * x0  # rounded to fp32
        # x1 (small, so finely spaced) puts the twice-rounded sum within an ulp or two of the threshold
        x1 = (np.float32(threshold) - product + rng.integers(-12, 13, 4096) * np.float32(2**-27)).astype(np.float32)
        twice = (product + x1) > threshold
        once = (beta.astype(np.float64) * x0 + x1).astype(np.float32) > threshold
        for i in np.flatnonzero(twice != once):
            found[bool(twice[i])].append((beta[i], x0[i], x1[i]))
    rows = found[True][: n // 2] + found[False][: n - n // 2]
    return tuple(np.array(col, dtype=np.float32) for col in zip(*rows, strict=True))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_at_threshold_inputs_where_an_fma_flips_the_spike(device):
    beta, x0, x1 = fma_flips(64)
    x = torch.from_numpy(np.stack([x0, x1])).to(device)  # (2, 64): below threshold at step 0, then at it
    beta_t = torch.from_numpy(beta).to(device)
    want = torch.from_numpy((beta * x0 + x1 > 1.0).astype(np.float32)).to(device)  # product, sum rounded apart
    fma = (beta.astype(np.float64) * x0 + x1).astype(np.float32) > 1.0
    assert (want.cpu().numpy() != fma).all() and 0 < want.sum() < 64  # every neuron is one an FMA would flip
    ref = lif_reference(x, beta_t, 1.0, 0, "subtract")
    assert torch.equal(ref[0], torch.zeros(64, device=device)) and torch.equal(ref[1], want)
    spikes, _ = lif_triton(x, beta_t, 1.0, 0, "subtract", "atan", 2.0, True)
    assert torch.equal(spikes, ref)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("refractory", [0, 2, 50])
@pytest.mark.parametrize("shape", [(6, 3, 341), (9, 5, 205), (4, 0, 3)], ids=["N1023", "N1025", "empty"])
def test_kernel_counts_spikes(shape, refractory, device):
    """The forward kernel's (spikes, refractory steps) equal the counts on the reference's spikes."""
    x = randn(shape, seed=shape[0], device=device) + 0.6
    beta = torch.rand(shape[-1], generator=torch.Generator().manual_seed(0)).to(device)
    spikes, counts = lif_triton(x, beta, 0.9, refractory, "subtract", "atan", 2.0, True)
    want = firing_stats(lif_reference(x, beta, 0.9, refractory, "subtract"), refractory)
    assert counts.dtype == torch.int64 and counts.tolist() == [
        want.spikes.item(),
        want.neuron_steps - want.eligible.item(),
    ]
    if x.numel():
        assert 0 < counts[0] < x.numel() and (refractory == 0) == (counts[1] == 0)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_stats_agree_with_the_torch_backend(device):
    """lif(return_stats=True) and LIF(..., return_stats=True) on the triton backend (the kernel's own counts)
    agree with the torch backend's, which counts from the spikes."""
    x = randn((8, 4, 33), seed=0, device=device) + 0.5
    want = lif(x, beta=0.7, refractory=2, backend="torch", return_stats=True)[1]
    layer = LIF(33, beta=0.7, refractory=2, backend="triton").to(device)
    for stats in (
        lif(x, beta=0.7, refractory=2, backend="triton", return_stats=True)[1],
        layer(x, return_stats=True)[1],
    ):
        assert (stats.spikes.item(), stats.eligible.item(), stats.neuron_steps) == (
            want.spikes.item(),
            want.eligible.item(),
            want.neuron_steps,
        )
        assert stats.rate.item() == pytest.approx(want.rate.item())
