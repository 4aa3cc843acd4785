"""The leaky-integrate-and-fire neuron with a refractory period, as a plain loop.

This file is the specification. The fused Triton kernels in
``spiking_lm.kernels.lif`` must reproduce it spike for spike and gradient by
gradient, and the tests hold them to it.

Per neuron, with input ``x[t]`` for ``t = 0..T-1`` and state ``v = 0, r = 0``::

    if r > 0:                       # refractory: silent, clamped at rest, input ignored
        s = 0; v = 0; r = r - 1
    else:
        h = beta * v + x[t]
        s = 1 if h > threshold else 0
        v = h - threshold * s       (reset="subtract")
        v = h * (1 - s)             (reset="zero")
        r = R if s else 0

Backward, the step ``s = H(h - threshold)`` is given a surrogate derivative
(see ``SURROGATES``). The refractory counter is a hard gate: no gradient flows
through it, and on a refractory step nothing flows to ``x[t]`` or to earlier
states, because ``v`` is pinned to zero whatever came before.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from spiking_lm.neuron import DEFAULT_ALPHA


def atan_grad(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """dS/du of the arctangent surrogate, as ``snntorch.surrogate.atan``; peak alpha/2 at u = 0."""
    return (alpha / 2) / (1 + (math.pi * alpha * u / 2) ** 2)


def fast_sigmoid_grad(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """dS/du of the fast sigmoid, as ``snntorch.surrogate.fast_sigmoid(slope=alpha)``; peak 1."""
    return 1 / (1 + alpha * u.abs()) ** 2


SURROGATES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "atan": atan_grad,
    "fast_sigmoid": fast_sigmoid_grad,
}


class SpikeFunction(torch.autograd.Function):
    """Heaviside step forward (strict ``u > 0``), surrogate derivative backward."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_spike: torch.Tensor):
        (u,) = ctx.saved_tensors
        return grad_spike * SURROGATES[ctx.surrogate](u, ctx.alpha), None, None


def spike(u: torch.Tensor, surrogate: str = "atan", alpha: float | None = None) -> torch.Tensor:
    """Fire where ``u = h - threshold`` is positive; differentiable through the surrogate."""
    return SpikeFunction.apply(u, surrogate, DEFAULT_ALPHA[surrogate] if alpha is None else alpha)


def lif_reference(
    x: torch.Tensor,
    beta: float | torch.Tensor,
    threshold: float | torch.Tensor = 1.0,
    refractory: int = 0,
    reset: str = "subtract",
    surrogate: str = "atan",
    alpha: float | None = None,
    detach_reset: bool = True,
    spike_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run LIF neurons over time-major input ``x`` of shape ``(T, ...)``; return spikes of that shape.

    ``beta`` and ``threshold`` are floats or tensors broadcasting over the last
    dimension; the rest are the fields of ``spiking_lm.neuron.NeuronSpec``, which
    validates them (``spiking_lm.lif`` passes them on).
    ``spike_fn`` replaces the surrogate spike (tests swap in a smooth one so
    ``torch.autograd.gradcheck`` can check every other gradient path).
    """
    fire = spike_fn or (lambda u: spike(u, surrogate, alpha))
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    v = torch.zeros_like(x[0], dtype=compute_dtype)  # membrane, (...)
    r = torch.zeros_like(x[0], dtype=torch.int64)  # refractory steps left, (...)
    spikes = []
    for t in range(x.shape[0]):
        refractory_now = r > 0  # a hard gate: bool, no gradient
        h = beta * v + x[t].to(compute_dtype)  # integrate, (...)
        s = fire(h - threshold) * ~refractory_now  # a refractory neuron cannot fire
        s_reset = s.detach() if detach_reset else s
        if reset == "subtract":
            v = h - threshold * s_reset
        else:
            v = h * (1 - s_reset)
        v = torch.where(refractory_now, torch.zeros_like(v), v)  # clamped at rest
        fired = (h > threshold) & ~refractory_now
        r = torch.where(refractory_now, r - 1, torch.where(fired, refractory, 0))
        spikes.append(s)
    return torch.stack(spikes).to(x.dtype)  # (T, ...)
