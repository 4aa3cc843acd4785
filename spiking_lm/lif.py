"""Public LIF API: the functional ``lif``, the ``LIF`` module and firing statistics.

The semantics live in ``spiking_lm.lif_reference`` and the settings in
``spiking_lm.neuron.NeuronSpec``; this module checks the input, picks a
backend and counts spikes.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from spiking_lm.lif_reference import lif_reference
from spiking_lm.neuron import Backend, NeuronSpec, check_backend, check_value

MIN_LEARNED = 1e-4
"""Floor of a learned decay or threshold: the forward clamps learned values into [1e-4, 1] and [1e-4, inf)."""


def clamp_learned(param: torch.Tensor, high: float | None = None) -> torch.Tensor:
    """A decay (``high`` 1) or threshold as the neurons use it: clamped into range while learned, as is if frozen.

    The one place the range of a learned neuron parameter is enforced (the ``LIF`` module's and the attention
    sites' per-head thresholds); a frozen value was checked on construction.
    """
    if not param.requires_grad:
        return param
    # The gradient passes on the closed range, bounds included, so that a value that starts on its bound (a
    # decay of 1, the integrate-and-fire neuron) learns. Spelled out rather than left to clamp, whose gradient
    # at a bound is torch's to choose and changed between releases (1 in torch 2.11, 0 in 2.14).
    inside = param >= MIN_LEARNED
    if high is not None:
        inside &= param <= high
    return torch.where(inside, param, param.detach().clamp(MIN_LEARNED, high))


class FiringStats(NamedTuple):
    """Spike counts of one ``lif`` call, as detached 0-d int64 tensors (no spike tensor is kept)."""

    spikes: torch.Tensor
    """Number of spikes emitted: the sum of |output|, so a graded output n counts as |n| unit spikes."""
    eligible: torch.Tensor
    """Number of neuron-steps that were allowed to fire (not refractory)."""
    neuron_steps: int
    """T times the number of neurons."""

    @property
    def rate(self) -> torch.Tensor:
        """Spikes per neuron-step; refractory steps count as steps (graded codes may exceed 1)."""
        return self.spikes.float() / self.neuron_steps


def firing_stats(spikes: torch.Tensor, refractory: int) -> FiringStats:
    """Count spikes and eligible steps from the output alone.

    A nonzero output at step t makes the next ``min(R, T-1-t)`` steps refractory, and a
    refractory neuron cannot fire, so the refractory steps are a weighted sum of
    the per-step counts of nonzero outputs.
    """
    spikes = spikes.detach()
    T = spikes.shape[0]
    per_step = spikes.reshape(T, -1).count_nonzero(dim=1)  # (T,)
    blocked = torch.clamp(T - 1 - torch.arange(T, device=spikes.device), max=refractory)  # (T,)
    neuron_steps = spikes.numel()
    total = spikes.abs().sum(dtype=torch.float64).long()  # = per_step.sum() for binary spikes
    return FiringStats(total, neuron_steps - (per_step * blocked).sum(), neuron_steps)


def check_input(x, channels: int | None = None) -> None:
    """``x`` is a floating-point, time-major tensor ``(T, ..., C)`` with T >= 1 and, if given, C = ``channels``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be time-major with at least 2 dims (T, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"x has no time steps: its first dim T must be >= 1, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"x must have {channels} channels in its last dim, got shape {tuple(x.shape)}")


def _check_channel_tensor(name: str, value: torch.Tensor, x: torch.Tensor, high: float | None) -> None:
    """A per-channel beta or threshold: one value, or one per channel of x, on x's device, in range."""
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, x.shape[-1])):
        raise ValueError(
            f"{name} must be a scalar or a tensor of shape ({x.shape[-1]},) matching the "
            f"last dimension of x, got shape {tuple(value.shape)}"
        )
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}; put both on one device")
    check_value(name, value, high)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    check_backend(backend)
    if backend == "auto":
        return "triton" if x.is_cuda and x.dtype != torch.float64 else "torch"
    if backend == "triton" and x.dtype == torch.float64:
        raise ValueError("backend='triton' computes in fp32; use backend='torch' for float64 input")
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is "
            "imported to run the kernels on CPU under the Triton interpreter"
        )
    return backend


def _run(x: torch.Tensor, beta, threshold, spec: NeuronSpec, backend: str) -> tuple[torch.Tensor, FiringStats]:
    """Spikes from either backend and their FiringStats: counted inside the forward kernel on triton, from the
    spikes on torch; ``beta`` and ``threshold`` are the spec's or per-channel tensors."""
    args = (
        x,
        beta,
        threshold,
        spec.refractory,
        spec.reset,
        spec.surrogate,
        spec.surrogate_alpha,
        spec.detach_reset,
        spec.code,
        spec.max_count,
        spec.gradient,
    )
    if resolve_backend(backend, x) == "triton":
        from spiking_lm.kernels.lif import lif_triton

        spikes, (n_spikes, n_refractory) = lif_triton(*args)
        return spikes, FiringStats(n_spikes, spikes.numel() - n_refractory, spikes.numel())
    spikes = lif_reference(*args)
    return spikes, firing_stats(spikes, spec.refractory)


def lif(
    x: torch.Tensor,
    *,
    beta: float | torch.Tensor,
    threshold: float | torch.Tensor = 1.0,
    backend: Backend = "auto",
    return_stats: bool = False,
    **settings,
) -> torch.Tensor | tuple[torch.Tensor, FiringStats]:
    """Leaky-integrate-and-fire neurons with a refractory period over time-major ``x`` of shape ``(T, ...)``.

    Args:
        x: input current, time first; at least 2 dims, T >= 1, floating point, finite.
        beta: membrane decay in (0, 1]; a float or a tensor over the last dim (learned if it requires grad).
        threshold: firing threshold > 0; a float or a tensor over the last dim.
        backend: ``"torch"`` (reference loop), ``"triton"`` (fused kernels) or ``"auto"`` (triton on CUDA).
        return_stats: also return ``FiringStats`` (spike and eligible-step counts).
        settings: the other fields of ``NeuronSpec`` (``refractory``, ``reset``, ``surrogate``, ``alpha``,
            ``detach_reset``, ``code``, ``max_count``, ``gradient``), with its defaults.

    Returns:
        Spikes (the code's integer outputs) with x's shape and dtype, and the stats if asked for.

    A NaN or infinite input raises: the neuron would stay silent from then on with NaN gradients.
    """
    check_input(x)
    tensors = {"beta": (beta, 1.0), "threshold": (threshold, None)}
    for name, (value, high) in tensors.items():
        if isinstance(value, torch.Tensor):
            _check_channel_tensor(name, value, x, high)
    scalars = {name: value for name, (value, _) in tensors.items() if not isinstance(value, torch.Tensor)}
    spec = NeuronSpec(**scalars, **settings)  # per-channel tensors stand in for the spec's scalars below
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or infinite values; LIF neurons need a finite input current")
    spikes, stats = _run(x, beta, threshold, spec, backend)
    return (spikes, stats) if return_stats else spikes


class LIF(nn.Module):
    """A layer of LIF neurons with a refractory period, holding decay and threshold.

    ``settings`` are the fields of ``NeuronSpec`` (``beta``, ``threshold``, ``refractory``, ...), with its defaults.
    With ``learn_beta``/``learn_threshold`` and ``channels`` given, each channel (last dim of the input)
    learns its own value; learned values are clamped to their valid range in the forward pass
    (``effective_params``). ``forward(x, return_stats=True)`` also returns the call's ``FiringStats``.

    The forward checks the input's type and shape as ``lif`` does, but not its values: that would cost a
    device synchronisation per call in training, whose non-finite guard reports a NaN loss or gradient.
    """

    def __init__(
        self,
        channels: int | None = None,
        *,
        learn_beta: bool = False,
        learn_threshold: bool = False,
        backend: Backend = "auto",
        **settings,
    ):
        super().__init__()
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive integer or None, got {channels!r}")
        self.spec = NeuronSpec(**settings)
        check_backend(backend)
        shape = (channels,) if channels is not None else ()
        self.beta = nn.Parameter(torch.full(shape, float(self.spec.beta)), requires_grad=learn_beta)
        self.threshold = nn.Parameter(torch.full(shape, float(self.spec.threshold)), requires_grad=learn_threshold)
        self.channels, self.backend = channels, backend

    def effective_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decay and threshold the neurons run with: learned ones clamped into range (``clamp_learned``)."""
        return clamp_learned(self.beta, 1.0), clamp_learned(self.threshold)

    def forward(
        self, x: torch.Tensor, threshold_scale: torch.Tensor | None = None, return_stats: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, FiringStats]:  # x: (T, ..., C)
        """Spikes for ``x`` (and their ``FiringStats`` with ``return_stats``); a positive 0-d ``threshold_scale``
        multiplies the threshold (an adaptive threshold)."""
        check_input(x, self.channels)
        beta, threshold = self.effective_params()
        if threshold_scale is not None:
            threshold = threshold * threshold_scale
        spikes, stats = _run(x, beta, threshold, self.spec, self.backend)
        return (spikes, stats) if return_stats else spikes

    def extra_repr(self) -> str:
        spec = self.spec
        return (
            f"channels={self.channels}, code={spec.code!r}, refractory={spec.refractory}, reset={spec.reset!r}, "
            f"gradient={spec.gradient!r}, surrogate={spec.surrogate!r}, learn_beta={self.beta.requires_grad}, "
            f"learn_threshold={self.threshold.requires_grad}"
        )
