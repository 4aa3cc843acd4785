"""The leaky-integrate-and-fire neuron with a refractory period, as a plain loop.

This file is the specification. The fused Triton kernels in
``spiking_lm.kernels.lif`` must reproduce it spike for spike and gradient by
gradient, and the tests hold them to it.

Per neuron, with input ``x[t]`` for ``t = 0..T-1`` and state ``v = 0, r = 0``::

    if r > 0:                       # refractory: silent, clamped at rest, input ignored
        s = 0; v = 0; r = r - 1
    else:
        h = beta * v + x[t]
        s = code(h, threshold)
        v = h - threshold * s       (reset="subtract")
        v = h * (1 - s)             (reset="zero", binary code only)
        r = R if s != 0 else 0

The spike code (``NeuronSpec.code``) is a sum of unit steps ``sign * H(sign*h - c*threshold)`` over its
``LEVELS``:

    binary   s = H(h - threshold)                                  s in {0, 1}
    signed   s = H(h - threshold) - H(-h - threshold)              s in {-1, 0, 1}
    graded   s = sum_k H(h - (k-1/2) threshold) - H(-h - (k-1/2) threshold), k = 1..max_count
             = round(h / threshold), halves toward zero, clipped to [-max_count, max_count]

Backward, each unit step is given a surrogate derivative (see ``SURROGATES``),
or with ``gradient="straight_through"`` the whole code is differentiated as if
it were ``h / threshold`` where ``lo * threshold < h < hi * threshold`` for the
code's range ``[lo, hi]``, and as a constant outside it. The refractory counter
is a hard gate: no gradient flows through it, and on a refractory step nothing
flows to ``x[t]`` or to earlier states, because ``v`` is pinned to zero
whatever came before.
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


class StraightThrough(torch.autograd.Function):
    """The code's output ``n`` forward; backward, the derivative of ``h / threshold`` inside ``(lo, hi)``."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, threshold: torch.Tensor, n: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        inside = (h > lo * threshold) & (h < hi * threshold)
        ctx.save_for_backward(h, threshold, inside)
        return n

    @staticmethod
    def backward(ctx, grad_n: torch.Tensor):
        h, threshold, inside = ctx.saved_tensors
        grad_h = torch.where(inside, grad_n / threshold, 0.0)
        grad_thr = torch.where(inside, -grad_n * h / (threshold * threshold), 0.0) if ctx.needs_input_grad[1] else None
        return grad_h, grad_thr, None, None, None


def levels(code: str, max_count: int) -> list[tuple[int, float]]:
    """(sign, c) per unit step of a code: its output is the sum of ``sign * H(sign * h - c * threshold)``."""
    if code == "binary":
        return [(1, 1.0)]
    if code == "signed":
        return [(1, 1.0), (-1, 1.0)]
    return [(sign, k - 0.5) for k in range(1, max_count + 1) for sign in (1, -1)]


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
    code: str = "binary",
    max_count: int = 3,
    gradient: str = "surrogate",
    spike_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run LIF neurons over time-major input ``x`` of shape ``(T, ...)``; return the outputs of that shape.

    ``beta`` and ``threshold`` are floats or tensors broadcasting over the last
    dimension; the rest are the fields of ``spiking_lm.neuron.NeuronSpec``, which
    validates them (``spiking_lm.lif`` passes them on).
    ``spike_fn`` replaces the surrogate spike (tests swap in a smooth one so
    ``torch.autograd.gradcheck`` can check every other gradient path).
    """
    fire = spike_fn or (lambda u: spike(u, surrogate, alpha))
    steps = levels(code, max_count)
    lo, hi = {"binary": (0, 1), "signed": (-1, 1), "graded": (-max_count, max_count)}[code]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    if not isinstance(threshold, torch.Tensor):  # so that c * threshold rounds in the compute dtype
        threshold = torch.tensor(threshold, dtype=compute_dtype, device=x.device)
    v = torch.zeros_like(x[0], dtype=compute_dtype)  # membrane, (...)
    r = torch.zeros_like(x[0], dtype=torch.int64)  # refractory steps left, (...)
    spikes = []
    for t in range(x.shape[0]):
        refractory_now = r > 0  # a hard gate: bool, no gradient
        h = beta * v + x[t].to(compute_dtype)  # integrate, (...)
        n = sum(sign * (sign * h > c * threshold).to(compute_dtype) for sign, c in steps)  # the code, exact
        if gradient == "straight_through":
            s = StraightThrough.apply(h, threshold, n, lo, hi)
        else:
            s = sum(sign * fire(sign * h - c * threshold) for sign, c in steps)
        s = s * ~refractory_now  # a refractory neuron cannot fire
        s_reset = s.detach() if detach_reset else s
        if reset == "subtract":
            v = h - threshold * s_reset
        else:
            v = h * (1 - s_reset)
        v = torch.where(refractory_now, torch.zeros_like(v), v)  # clamped at rest
        fired = (n != 0) & ~refractory_now
        r = torch.where(refractory_now, r - 1, torch.where(fired, refractory, 0))
        spikes.append(s)
    return torch.stack(spikes).to(x.dtype)  # (T, ...)
