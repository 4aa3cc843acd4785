"""The plain-loop reference against hand-worked examples, the spec's pseudo-code, finite differences and snnTorch."""

import math

import pytest
import snntorch
import torch
from snntorch import surrogate as snn_surrogate

from spiking_lm.lif_reference import lif_reference, spike

# Written out here rather than imported, so a changed default in the library shows up as a failure.
ALPHA = {"atan": 2.0, "fast_sigmoid": 25.0}

# Antiderivatives of the surrogate derivatives: atan's is the arctangent step, fast_sigmoid's u / (1 + a|u|).
SMOOTH_STEP = {
    "atan": lambda u, a: torch.atan(math.pi * a * u / 2) / math.pi,
    "fast_sigmoid": lambda u, a: u / (1 + a * u.abs()),
}
SNNTORCH_SURROGATE = {
    "atan": lambda a: snn_surrogate.atan(alpha=a),
    "fast_sigmoid": lambda a: snn_surrogate.fast_sigmoid(slope=a),
}


def spec(xs: list[float], beta: float, threshold: float, refractory: int, reset: str) -> list[int]:
    """One neuron, transcribed line for line from the module docstring of ``spiking_lm.lif_reference``."""
    v, r, out = 0.0, 0, []
    for x in xs:
        if r > 0:
            s, v, r = 0, 0.0, r - 1
        else:
            h = beta * v + x
            s = 1 if h > threshold else 0
            v = h - threshold * s if reset == "subtract" else h * (1 - s)
            r = refractory if s else 0
        out.append(s)
    return out


@pytest.mark.parametrize(
    "drive, beta, refractory, reset, expected",
    [
        # h = 2 fires; then R = 2 steps silent and clamped at 0, whatever the reset left; so period 3.
        (2.0, 1.0, 2, "subtract", [1, 0, 0, 1, 0, 0, 1, 0, 0]),
        (2.0, 1.0, 2, "zero", [1, 0, 0, 1, 0, 0, 1, 0, 0]),
        # h = .75, 1.5*, 1.25*, 1.0 (not > 1: the comparison is strict), 1.75*, 1.5*, 1.25*, 1.0, 1.75*.
        (0.75, 1.0, 0, "subtract", [0, 1, 1, 0, 1, 1, 1, 0, 1]),
        # h = .75, 1.5* -> 0, .75, 1.5* -> 0, ...: reset to zero forgets the excess.
        (0.75, 1.0, 0, "zero", [0, 1, 0, 1, 0, 1, 0, 1, 0]),
        # h = .75, 1.5* leaves v = .5, but the refractory step pins v to 0, so the excess is lost too.
        (0.75, 1.0, 1, "subtract", [0, 1, 0, 0, 1, 0, 0, 1, 0]),
        # beta = .5: h = .9, 1.35* (v=.35), 1.075* (v=.075), .9375, 1.36875*, 1.084375*, .9421875, ...
        (0.9, 0.5, 0, "subtract", [0, 1, 1, 0, 1, 1, 0, 1, 1]),
        (0.9, 0.5, 0, "zero", [0, 1, 0, 1, 0, 1, 0, 1, 0]),
    ],
)
def test_hand_worked_examples(drive, beta, refractory, reset, expected):
    x = torch.full((len(expected), 1), drive)
    spikes = lif_reference(x, beta, 1.0, refractory, reset)
    assert spikes[:, 0].tolist() == expected
    assert spec([drive] * len(expected), beta, 1.0, refractory, reset) == expected


def test_refractory_step_passes_no_gradient():
    # Drive 2, threshold 1, beta 1, R = 2: spikes at 0 and 3; steps 1 and 2 are refractory.
    x = torch.full((4, 1), 2.0, requires_grad=True)
    spikes = lif_reference(x, 1.0, 1.0, refractory=2)
    assert spikes[:, 0].tolist() == [1, 0, 0, 1]
    spikes[3].sum().backward()
    # Step 3 starts from v = 0, so h = x[3] = 2 and dS/dx[3] = atan'(1) = (2/2) / (1 + (pi*2*1/2)^2).
    # Nothing reaches x[0..2]: the refractory steps cut the chain.
    assert x.grad[:, 0].tolist() == pytest.approx([0.0, 0.0, 0.0, 1 / (1 + math.pi**2)])


@pytest.mark.parametrize("refractory", [0, 1, 3])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_matches_spec_on_random_exact_inputs(beta, reset, refractory):
    # Multiples of 1/32 with beta in {.5, 1} and threshold 3/4 keep fp32 (and Python's float64) exact.
    g = torch.Generator().manual_seed(refractory)
    x = torch.randint(-40, 72, (16, 30), generator=g) / 32
    spikes = lif_reference(x, beta, 0.75, refractory, reset)
    expected = [spec(x[:, n].tolist(), beta, 0.75, refractory, reset) for n in range(x.shape[1])]
    assert spikes.T.tolist() == expected
    assert 0.05 < spikes.mean() < 0.95


@pytest.mark.parametrize("refractory", [0, 2])
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_gradcheck_with_smooth_spike(reset, refractory):
    """Every gradient path but the surrogate, against finite differences.

    The hard step has zero finite differences, so a sigmoid stands in for it; the
    refractory gate still uses the hard comparison, which the inputs keep well away
    from the threshold. With the reset detached the surrogate gradient is not the
    derivative of any forward, hence detach_reset=False.
    """
    g = torch.Generator().manual_seed(0)
    C = 3
    x = (torch.randn(6, 2, C, generator=g, dtype=torch.float64) + 0.6).requires_grad_()
    beta = (0.3 + 0.6 * torch.rand(C, generator=g, dtype=torch.float64)).requires_grad_()
    threshold = (0.6 + 0.6 * torch.rand(C, generator=g, dtype=torch.float64)).requires_grad_()

    def run(x, beta, threshold):
        return lif_reference(
            x, beta, threshold, refractory, reset, detach_reset=False, spike_fn=lambda u: torch.sigmoid(4 * u)
        )

    hard = lif_reference(x.detach(), beta.detach(), threshold.detach(), refractory, reset)
    assert 0 < hard[:-1].sum() < hard[:-1].numel()  # some spikes early enough to gate a later step
    assert torch.autograd.gradcheck(run, (x, beta, threshold))


@pytest.mark.parametrize("alpha", [None, 0.5, 7.0])
@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid"])
def test_spike_backward_is_the_surrogate(surrogate, alpha):
    a = ALPHA[surrogate] if alpha is None else alpha
    u = torch.linspace(-3, 3, 601, dtype=torch.float64, requires_grad=True)  # 0 is a grid point
    grad_out = torch.randn(601, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    s = spike(u, surrogate, alpha)
    assert torch.equal(s, (u > 0).double())  # strict: no spike at u = 0
    (grad,) = torch.autograd.grad(s, u, grad_out)
    (smooth_grad,) = torch.autograd.grad(SMOOTH_STEP[surrogate](u, a), u, grad_out)
    torch.testing.assert_close(grad, smooth_grad, rtol=1e-12, atol=0)
    peak = a / 2 if surrogate == "atan" else 1.0
    assert grad[300] / grad_out[300] == pytest.approx(peak)

    u32 = u.detach().float().requires_grad_()
    (snn_grad,) = torch.autograd.grad(SNNTORCH_SURROGATE[surrogate](a)(u32), u32, grad_out.float())
    torch.testing.assert_close(grad.float(), snn_grad, rtol=1e-5, atol=1e-7)


def snntorch_run(x, beta, threshold, reset, surrogate):
    """snnTorch's Leaky stepped over time, with learnable beta and threshold; returns (spikes, membranes, leaky)."""
    leaky = snntorch.Leaky(
        beta=beta,
        threshold=threshold,
        spike_grad=SNNTORCH_SURROGATE[surrogate](ALPHA[surrogate]),
        reset_mechanism=reset,
        learn_beta=True,
        learn_threshold=True,
    )
    mem = torch.zeros_like(x[0])
    spikes, mems = [], []
    for t in range(x.shape[0]):
        spk, mem = leaky(x[t], mem)
        spikes.append(spk)
        mems.append(mem)
    return torch.stack(spikes), torch.stack(mems), leaky


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid"])
@pytest.mark.parametrize("reset, beta_one", [("zero", False), ("subtract", True)])
def test_matches_snntorch_leaky(reset, beta_one, surrogate, seed):
    """Spike for spike and gradient for gradient with snnTorch where the forwards coincide: R = 0, and
    reset "zero" at any beta, or "subtract" at beta = 1 (see the next test for beta < 1)."""
    g = torch.Generator().manual_seed(seed)
    T, B, C = 16, 4, 8
    # float64 because the two implementations add the same terms in a different order.
    x = torch.randn(T, B, C, generator=g, dtype=torch.float64) * 0.8 + 0.3
    beta = torch.ones(C, dtype=torch.float64) if beta_one else torch.rand(C, generator=g, dtype=torch.float64)
    threshold = 0.5 + torch.rand(C, generator=g, dtype=torch.float64)
    grad_out = torch.randn(T, B, C, generator=g, dtype=torch.float64)

    ours = [t.clone().requires_grad_() for t in (x, beta, threshold)]
    spikes = lif_reference(*ours, 0, reset, surrogate)
    spikes.backward(grad_out)

    x_snn = x.clone().requires_grad_()
    snn_spikes, snn_mems, leaky = snntorch_run(x_snn, beta.clone(), threshold.clone(), reset, surrogate)
    snn_spikes.backward(grad_out.float())

    assert 0.05 < spikes.mean() < 0.95
    assert torch.equal(spikes, snn_spikes.double())
    snn_beta_grad = leaky.beta.grad
    if reset == "subtract":
        # At beta = 1 snnTorch's beta.clamp(0, 1) sits on its boundary, where the clamp's gradient is a convention
        # of the torch version (1 up to torch 2.13, 0 from 2.14), not a property of the neuron. So dL/dbeta is taken
        # from snnTorch's own trace and x gradient instead: its update m[t] = beta*m[t-1] + x[t] - theta*s[t-1] gives
        # dL/dbeta = sum_t dL/dm[t] * m[t-1], and dL/dm[t] = dL/dx[t] since x[t] enters only through m[t].
        # Same forward at beta = 1, but our decay multiplies the post-reset membrane h - theta*s where snnTorch's
        # multiplies the pre-reset one, hence the m[t-1] - theta*s[t-1]. The spikes, dL/dx and dL/dtheta are
        # compared as they come from snnTorch's autograd.
        snn_beta_grad = (x_snn.grad[1:] * (snn_mems[:-1] - threshold * snn_spikes[:-1])).sum((0, 1))
    for mine, theirs in zip((t.grad for t in ours), (x_snn.grad, snn_beta_grad, leaky.threshold.grad), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_snntorch_subtract_differs_below_beta_one():
    """snnTorch subtracts the threshold undecayed on the step after a spike,
    m[t] = beta*m[t-1] + x[t] - theta*s[t-1]; ours subtracts before the decay,
    h[t] = beta*(h[t-1] - theta*s[t-1]) + x[t]. Theta = 1, beta = .5, x = 1.5, 1, 0:

        ours:     h = 1.5 (fires), .5*(1.5-1) + 1 = 1.25 (fires), .5*(1.25-1) + 0 = .125
        snnTorch: m = 1.5 (fires), .5*1.5 + 1 - 1 = .75,          .5*.75 + 0 - 0 = .375
    """
    x = torch.tensor([[1.5], [1.0], [0.0]])
    assert lif_reference(x, 0.5, 1.0, 0, "subtract")[:, 0].tolist() == [1, 1, 0]
    leaky = snntorch.Leaky(beta=0.5, threshold=1.0, reset_mechanism="subtract")
    mem = torch.zeros(1)
    snn_spikes, snn_mems = [], []
    for t in range(3):
        spk, mem = leaky(x[t], mem)
        snn_spikes.append(spk.item())
        snn_mems.append(mem.item())
    assert snn_spikes == [1, 0, 0]
    assert snn_mems == [1.5, 0.75, 0.375]
