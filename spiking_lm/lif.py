"""Public LIF API: the functional ``lif``, the ``LIF`` module and firing statistics.

The semantics live in ``spiking_lm.lif_reference``; this module checks
arguments, picks a backend and counts spikes.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple

import torch
from torch import nn

from spiking_lm.lif_reference import DEFAULT_ALPHA, lif_reference

RESETS = ("subtract", "zero")
BACKENDS = ("auto", "torch", "triton")


class FiringStats(NamedTuple):
    """Spike counts of one ``lif`` call, as detached 0-d int64 tensors (no spike tensor is kept)."""

    spikes: torch.Tensor
    """Number of spikes emitted."""
    eligible: torch.Tensor
    """Number of neuron-steps that were allowed to fire (not refractory)."""
    neuron_steps: int
    """T times the number of neurons."""

    @property
    def rate(self) -> torch.Tensor:
        """Spikes per neuron-step; refractory steps count as steps."""
        return self.spikes.float() / self.neuron_steps


def firing_stats(spikes: torch.Tensor, refractory: int) -> FiringStats:
    """Count spikes and eligible steps from the output alone.

    A spike at step t makes the next ``min(R, T-1-t)`` steps refractory, and a
    refractory neuron cannot fire, so the refractory steps are a weighted sum of
    the per-step spike counts.
    """
    spikes = spikes.detach()
    T = spikes.shape[0]
    per_step = spikes.reshape(T, -1).count_nonzero(dim=1)  # (T,)
    blocked = torch.clamp(T - 1 - torch.arange(T, device=spikes.device), max=refractory)  # (T,)
    neuron_steps = spikes.numel()
    return FiringStats(per_step.sum(), neuron_steps - (per_step * blocked).sum(), neuron_steps)


def _check_param(name: str, value, low_open: float, high: float | None, x: torch.Tensor):
    """Validate beta/threshold: a real number or a tensor broadcasting over x's last dim."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, x.shape[-1])):
            raise ValueError(
                f"{name} must be a scalar or a tensor of shape ({x.shape[-1]},) matching the "
                f"last dimension of x, got shape {tuple(value.shape)}"
            )
        if value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}; put both on one device")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.numel() == 0:  # zero channels
            return
        lo, hi = value.min().item(), value.max().item()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        lo = hi = float(value)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not (lo > low_open and (high is None or hi <= high)) or math.isnan(lo) or math.isnan(hi):
        allowed = f"in ({low_open}, {high}]" if high is not None else f"> {low_open}"
        raise ValueError(f"{name} must be {allowed}, got {value if lo == hi else f'values in [{lo}, {hi}]'}")


def check_neuron_args(refractory, reset: str, surrogate: str, alpha) -> None:
    """Validate the settings that do not depend on the input tensor."""
    if isinstance(refractory, bool) or not isinstance(refractory, numbers.Integral):
        raise TypeError(f"refractory must be a non-negative integer number of steps, got {refractory!r}")
    if refractory < 0:
        raise ValueError(f"refractory must be a non-negative integer number of steps, got {refractory}")
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    if surrogate not in DEFAULT_ALPHA:
        raise ValueError(f"surrogate must be one of {tuple(DEFAULT_ALPHA)}, got {surrogate!r}")
    if alpha is not None and not (isinstance(alpha, numbers.Real) and alpha > 0):
        raise ValueError(f"alpha must be a positive number or None, got {alpha!r}")


def check_beta_threshold(beta, threshold) -> None:
    """Validate scalar decay and threshold without an input tensor (for configs and modules)."""
    for name, value, high in (("beta", beta, 1.0), ("threshold", threshold, None)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not (value > 0 and (high is None or value <= high)):
            raise ValueError(f"{name} must be {'in (0, 1]' if high else '> 0'}, got {value}")


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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


def _run(x, beta, threshold, refractory, reset, surrogate, alpha, detach_reset, backend) -> torch.Tensor:
    if _resolve_backend(backend, x) == "triton":
        from spiking_lm.kernels.lif import lif_triton

        alpha = DEFAULT_ALPHA[surrogate] if alpha is None else float(alpha)
        return lif_triton(x, beta, threshold, refractory, reset, surrogate, alpha, detach_reset)
    return lif_reference(x, beta, threshold, refractory, reset, surrogate, alpha, detach_reset)


def lif(
    x: torch.Tensor,
    *,
    beta: float | torch.Tensor,
    threshold: float | torch.Tensor = 1.0,
    refractory: int = 0,
    reset: str = "subtract",
    surrogate: str = "atan",
    alpha: float | None = None,
    detach_reset: bool = True,
    backend: str = "auto",
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, FiringStats]:
    """Leaky-integrate-and-fire neurons with a refractory period over time-major ``x`` of shape ``(T, ...)``.

    Args:
        x: input current, time first; at least 2 dims, floating point.
        beta: membrane decay in (0, 1]; a float or a tensor over the last dim (learned if it requires grad).
        threshold: firing threshold > 0; a float or a tensor over the last dim.
        refractory: steps a neuron stays silent, clamped at rest, after a spike; 0 is plain LIF.
        reset: ``"subtract"`` (v = h - threshold) or ``"zero"`` (v = 0) after a spike.
        surrogate: ``"atan"`` or ``"fast_sigmoid"``, the derivative used for the step backward.
        alpha: surrogate sharpness; None gives 2 for atan and 25 for fast_sigmoid.
        detach_reset: stop the gradient through the reset term, as snnTorch and SpikingJelly do by default.
        backend: ``"torch"`` (reference loop), ``"triton"`` (fused kernels) or ``"auto"`` (triton on CUDA).
        return_stats: also return ``FiringStats`` (spike and eligible-step counts).

    Returns:
        Spikes with x's shape and dtype, and the stats if asked for.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be time-major with at least 2 dims (T, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    check_neuron_args(refractory, reset, surrogate, alpha)
    _check_param("beta", beta, 0.0, 1.0, x)
    _check_param("threshold", threshold, 0.0, None, x)
    spikes = _run(x, beta, threshold, int(refractory), reset, surrogate, alpha, detach_reset, backend)
    return (spikes, firing_stats(spikes, refractory)) if return_stats else spikes


class LIF(nn.Module):
    """A layer of LIF neurons with a refractory period, holding decay and threshold.

    With ``learn_beta``/``learn_threshold`` and ``channels`` given, each channel
    (last dim of the input) learns its own value; learned values are clamped to
    their valid range in the forward pass. After each forward, ``last_stats``
    holds the spike counts of that call (detached scalars, no spike tensor).
    """

    def __init__(
        self,
        channels: int | None = None,
        *,
        beta: float = 0.5,
        threshold: float = 1.0,
        refractory: int = 0,
        reset: str = "subtract",
        surrogate: str = "atan",
        alpha: float | None = None,
        detach_reset: bool = True,
        learn_beta: bool = False,
        learn_threshold: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        check_beta_threshold(beta, threshold)
        check_neuron_args(refractory, reset, surrogate, alpha)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        shape = (channels,) if channels is not None else ()
        self.beta = nn.Parameter(torch.full(shape, float(beta)), requires_grad=learn_beta)
        self.threshold = nn.Parameter(torch.full(shape, float(threshold)), requires_grad=learn_threshold)
        self.refractory, self.reset, self.surrogate = int(refractory), reset, surrogate
        self.alpha, self.detach_reset, self.backend = alpha, detach_reset, backend
        self.last_stats: FiringStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, ..., C)
        beta = self.beta.clamp(1e-4, 1.0) if self.beta.requires_grad else self.beta
        threshold = self.threshold.clamp_min(1e-4) if self.threshold.requires_grad else self.threshold
        spikes = _run(
            x, beta, threshold, self.refractory, self.reset, self.surrogate, self.alpha,
            self.detach_reset, self.backend,
        )
        self.last_stats = firing_stats(spikes, self.refractory)
        return spikes

    def extra_repr(self) -> str:
        return (
            f"channels={tuple(self.beta.shape)}, refractory={self.refractory}, reset={self.reset!r}, "
            f"surrogate={self.surrogate!r}, learn_beta={self.beta.requires_grad}, "
            f"learn_threshold={self.threshold.requires_grad}"
        )
