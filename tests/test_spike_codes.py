"""Signed and graded spike codes, the straight-through gradient, the adaptive threshold and the amplitude.

The reference against hand-worked examples and its own definitions; the fused kernels against the reference
spike for spike and gradient by gradient (on CPU under the Triton interpreter); the model's sites and the
neurons' learning rate.
"""

import itertools

import pytest
import torch
from conftest import DEVICES, KERNEL_DEVICES, assert_grad_close

from spiking_lm import lif
from spiking_lm.config import ModelConfig, NeuronConfig
from spiking_lm.kernels.lif import lif_triton
from spiking_lm.lif import firing_stats
from spiking_lm.lif_reference import lif_reference
from spiking_lm.model import GPT
from spiking_lm.neuron import NeuronSpec

CODES = ["binary", "signed", "graded"]
GRADIENTS = ["surrogate", "straight_through"]


@pytest.mark.parametrize(
    "code, max_count, expected",
    [
        # beta 1, threshold 1, x = .6, 1.4, -2, 3.3, -.4:
        # binary: h = .6, 2* (v=1), -1, 2.3* (v=1.3), .9
        ("binary", 3, [0, 1, 0, 1, 0]),
        # signed: as binary until h = -1, which is not below -1 (strict); then h = 2.3 fires +1 and .9 is silent
        ("signed", 3, [0, 1, 0, 1, 0]),
        # graded, max 2: h = .6 -> 1 (v=-.4), 1 -> 1 (v=0), -2 -> -2 (v=0), 3.3 -> 2 (v=1.3), .9 -> 1
        ("graded", 2, [1, 1, -2, 2, 1]),
        # graded, max 1: round(h) clipped to +-1: .6 -> 1 (v=-.4), 1 -> 1 (v=0), -2 -> -1 (v=-1), 2.3 -> 1, .9 -> 1
        ("graded", 1, [1, 1, -1, 1, 1]),
    ],
)
def test_hand_worked_codes(code, max_count, expected):
    x = torch.tensor([0.6, 1.4, -2.0, 3.3, -0.4]).unsqueeze(1)
    assert lif_reference(x, 1.0, 1.0, 0, "subtract", code=code, max_count=max_count)[:, 0].tolist() == expected


def test_signed_fires_negative_and_goes_refractory_after_either():
    # h = -1.5 -> -1 (v = -.5), refractory step pins v to 0, then h = -1.5 again -> -1.
    x = torch.full((4, 1), -1.5)
    assert lif_reference(x, 1.0, 1.0, 1, code="signed")[:, 0].tolist() == [-1, 0, -1, 0]


@pytest.mark.parametrize("max_count", [1, 3, 5])
def test_graded_is_round_half_toward_zero_clipped(max_count):
    """One step from rest: n = round(x / threshold), halves toward zero, clipped to +-max_count."""
    x = torch.randint(-40, 41, (1, 2000)) / 8  # multiples of 1/8, halves of 0.75 included
    threshold = 0.75
    n = lif_reference(x, 0.5, threshold, code="graded", max_count=max_count)[0]
    z = x[0] / threshold
    want = (z.sign() * (z.abs() - 0.5).ceil()).clamp(-max_count, max_count)
    torch.testing.assert_close(n, want, rtol=0, atol=0)


@pytest.mark.parametrize("code, lo, hi", [("binary", 0, 1), ("signed", -1, 1), ("graded", -3, 3)])
def test_straight_through_is_the_derivative_of_h_over_threshold_inside_the_range(code, lo, hi):
    x = (torch.randint(-40, 41, (1, 500)) / 8).requires_grad_()
    threshold = torch.tensor(0.8, requires_grad=True)
    n = lif_reference(x, 0.5, threshold, code=code, max_count=3, gradient="straight_through")
    n.sum().backward()
    inside = (x[0] > lo * 0.8) & (x[0] < hi * 0.8)
    assert 0 < inside.sum() < inside.numel()
    torch.testing.assert_close(x.grad[0], inside / threshold.detach())
    torch.testing.assert_close(threshold.grad, -(x[0].detach() * inside).sum() / 0.8**2)


@pytest.mark.parametrize("code", ["signed", "graded"])
def test_gradcheck_codes_with_smooth_spike(code):
    g = torch.Generator().manual_seed(1)
    C = 3
    x = (2 * torch.randn(6, 2, C, generator=g, dtype=torch.float64)).requires_grad_()
    beta = (0.3 + 0.6 * torch.rand(C, generator=g, dtype=torch.float64)).requires_grad_()
    threshold = (0.6 + 0.6 * torch.rand(C, generator=g, dtype=torch.float64)).requires_grad_()

    def run(x, beta, threshold):
        return lif_reference(
            x, beta, threshold, 1, detach_reset=False, code=code, max_count=2, spike_fn=lambda u: torch.sigmoid(4 * u)
        )

    hard = lif_reference(x.detach(), beta.detach(), threshold.detach(), 1, code=code, max_count=2)
    assert (hard < 0).any() and (hard > 0).any()
    assert torch.autograd.gradcheck(run, (x, beta, threshold))


def test_codes_need_subtract_reset_and_a_valid_max_count():
    with pytest.raises(ValueError, match="code 'signed' needs reset 'subtract'"):
        NeuronSpec(code="signed", reset="zero")
    with pytest.raises(ValueError, match="max_count must be an integer >= 1"):
        NeuronSpec(code="graded", max_count=0)
    with pytest.raises(ValueError, match="code must be one of"):
        NeuronSpec(code="ternary")
    with pytest.raises(ValueError, match="gradient must be one of"):
        NeuronSpec(gradient="ste")
    with pytest.raises(ValueError, match="attn_neuron: attention-score neurons support only code 'binary'"):
        ModelConfig(attn_neuron={"code": "signed"})
    with pytest.raises(ValueError, match="qkv_neuron: spiking Q/K/V take code 'binary' or 'signed'"):
        ModelConfig(qkv_neuron={"code": "graded"})


def _run(impl, x0, beta0, thr0, grad_out, *args):
    x, beta, thr = (t.detach().clone().requires_grad_() for t in (x0, beta0, thr0))
    spikes = impl(x, beta, thr, *args)
    spikes.backward(grad_out)
    return spikes.detach(), {"x": x.grad, "beta": beta.grad, "threshold": thr.grad}


def _kernel(x, beta, thr, *args):
    return lif_triton(x, beta, thr, *args)[0]


KERNEL_CASES = [
    (code, gradient, refractory, detach, surrogate)
    for code, gradient, refractory, detach, surrogate in itertools.product(
        CODES, GRADIENTS, (0, 1), (True, False), ("atan", "fast_sigmoid")
    )
    if not (gradient == "straight_through" and surrogate == "fast_sigmoid")  # the surrogate is unused
]


@pytest.mark.parametrize("code, gradient, refractory, detach_reset, surrogate", KERNEL_CASES)
@pytest.mark.parametrize("exact", [True, False], ids=["dyadic", "random"])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_matches_reference(code, gradient, refractory, detach_reset, surrogate, exact, device):
    """Dyadic inputs (multiples of 1/32, beta in {.5, 1}, thresholds in quarters) keep every step exact, so
    the outputs must match exactly and gradients tightly; random ones still match spike for spike on CPU."""
    g = torch.Generator().manual_seed(7)
    T, B, C = 6, 5, 8
    if exact:
        x = torch.randint(-96, 97, (T, B, C), generator=g) / 32
        beta, thr = torch.tensor([0.5, 1.0]).repeat(C // 2), torch.tensor([0.75, 1.0, 0.5, 1.25]).repeat(C // 4)
    else:
        x = 2 * torch.randn(T, B, C, generator=g)
        beta, thr = 0.3 + 0.6 * torch.rand(C, generator=g), 0.5 + torch.rand(C, generator=g)
    grad_out = torch.randn(T, B, C, generator=g)
    x, beta, thr, grad_out = (t.to(device) for t in (x, beta, thr, grad_out))
    alpha = {"atan": 2.0, "fast_sigmoid": 25.0}[surrogate]
    args = (refractory, "subtract", surrogate, alpha, detach_reset, code, 3, gradient)
    want_s, want_g = _run(lif_reference, x, beta, thr, grad_out, *args)
    got_s, got_g = _run(_kernel, x, beta, thr, grad_out, *args)
    assert torch.equal(got_s, want_s)
    assert (want_s != 0).any() and (want_s == 0).any()
    for name in want_g:
        assert_grad_close(got_g[name], want_g[name], name)


@pytest.mark.parametrize(
    "code, gradient", [("binary", "straight_through"), ("signed", "surrogate"), ("graded", "straight_through")]
)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_counts_graded_spikes_and_refractory_steps(code, gradient, device):
    x = 3 * torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(3), device=device)
    spikes, stats = lif(
        x, beta=0.5, threshold=0.9, refractory=1, code=code, gradient=gradient, backend="triton", return_stats=True
    )
    want = firing_stats(lif_reference(x, 0.5, 0.9, 1, code=code, gradient=gradient), 1)
    assert stats.spikes.item() == want.spikes.item() == spikes.abs().sum().item()
    assert stats.eligible.item() == want.eligible.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_codes_in_half_precision_keep_an_fp32_state(dtype, device):
    """The state of signed and graded codes is h in fp32, so the outputs match the reference's exactly."""
    g = torch.Generator().manual_seed(5)
    x = (2 * torch.randn(6, 3, 8, generator=g)).to(device, dtype)
    grad_out = torch.randn(6, 3, 8, generator=g).to(device, dtype)
    for code in ("signed", "graded"):
        args = (0.5, 0.8, 1, "subtract", "atan", 2.0, True, code, 3, "straight_through")
        want_s, want_g = _run(lif_reference, x, torch.tensor(0.5), torch.tensor(0.8), grad_out, *args[2:])
        got_s, got_g = _run(_kernel, x, torch.tensor(0.5), torch.tensor(0.8), grad_out, *args[2:])
        assert torch.equal(got_s, want_s)
        torch.testing.assert_close(got_g["x"].float(), want_g["x"].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_adaptive_threshold_makes_the_site_scale_free(device):
    """With the threshold proportional to the mean |input|, scaling the input leaves the spikes unchanged."""
    neuron = NeuronConfig(code="graded", adaptive_threshold=True, threshold=0.5)
    config = ModelConfig(vocab_size=11, n_layer=1, n_embd=16, n_head=2, spiking_fc_in=True, fc_in_neuron=neuron)
    site = GPT(config).to(device).transformer.h[0].mlp.fc_in_neuron.train()
    x = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0)).to(device)
    spikes = site(x)
    assert torch.equal(site(8 * x), spikes)
    assert torch.equal(site(x), spikes)
    # The running mean moved toward 8x's scale, so in eval the same input now fires less.
    site.eval()
    assert site(x).abs().sum() < spikes.abs().sum()


def test_amplitude_scales_the_outputs_and_learns():
    neuron = NeuronConfig(code="signed", amplitude=True)
    config = ModelConfig(vocab_size=11, n_layer=1, n_embd=16, n_head=2, spiking_qkv_in=True, qkv_in_neuron=neuron)
    model = GPT(config)
    site = model.transformer.h[0].attn.qkv_in_neuron
    with torch.no_grad():
        site.amplitude.copy_(torch.arange(1.0, 17.0))
    x = torch.randn(1, 2, 5, 16)
    out = site(x)
    n = site.lif(x.expand(4, -1, -1, -1))
    torch.testing.assert_close(out, n * torch.arange(1.0, 17.0))
    idx = torch.randint(0, 11, (2, 8))
    model(idx, idx)[1].backward()
    assert site.amplitude.grad is not None and site.amplitude.grad.abs().sum() > 0
    assert any(p is site.amplitude for p in model.neuron_parameters())


def test_neuron_lr_puts_thresholds_and_amplitudes_in_their_own_group():
    from spiking_lm.train.module import LitLM, OptimConfig

    neuron = NeuronConfig(code="signed", amplitude=True)
    gpt = ModelConfig(vocab_size=11, n_layer=1, n_embd=16, n_head=2, spiking_fc_in=True, fc_in_neuron=neuron)
    assert len(LitLM(gpt)._param_groups()) == 2  # without neuron_lr: the two groups of before
    lit = LitLM(gpt, OptimConfig(neuron_lr=0.01))
    groups = lit._param_groups()
    assert len(groups) == 3 and groups[2]["lr"] == 0.01
    names = {id(p): n for n, p in lit.named_parameters()}
    third = {names[id(p)] for p in groups[2]["params"]}
    assert "model.transformer.h.0.mlp.fc_in_neuron.amplitude" in third
    assert "model.transformer.h.0.mlp.fc_in_neuron.lif.threshold" in third
    assert not any(n.endswith("weight") for n in third)
    with pytest.raises(ValueError, match="optim.neuron_lr must be > 0"):
        OptimConfig(neuron_lr=0.0)
