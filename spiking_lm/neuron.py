"""The settings of a population of LIF neurons, in one frozen dataclass validated on construction.

Every name list (spike codes, gradients, surrogates, resets, backends) is defined here once, as a ``Literal``
that the config dataclasses and ``--help`` share.
``spiking_lm.lif`` turns a ``NeuronSpec`` into a call of either backend.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, get_args

import torch

Code = Literal["binary", "signed", "graded"]
Gradient = Literal["surrogate", "straight_through"]
Reset = Literal["subtract", "zero"]
Surrogate = Literal["atan", "fast_sigmoid"]
Backend = Literal["auto", "torch", "triton"]
CODES: tuple[str, ...] = get_args(Code)
GRADIENTS: tuple[str, ...] = get_args(Gradient)
RESETS: tuple[str, ...] = get_args(Reset)
SURROGATES: tuple[str, ...] = get_args(Surrogate)
BACKENDS: tuple[str, ...] = get_args(Backend)

# Surrogate sharpness when alpha is None: snnTorch's defaults for atan and fast_sigmoid.
DEFAULT_ALPHA: dict[str, float] = {"atan": 2.0, "fast_sigmoid": 25.0}


def check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_backend(backend) -> None:
    """The one check of a backend name (``lif``, ``LIF`` and ``ModelConfig`` all call it)."""
    check_choice("backend", backend, BACKENDS)


def check_value(name: str, value, high: float | None) -> None:
    """``value`` (a number or a floating-point tensor) lies in (0, high], or is > 0 without ``high``.

    A tensor's range is read back from its device, so ``lif`` checks user tensors here once per call, while
    the ``LIF`` module, whose parameters are clamped into range, never pays for it.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.numel() == 0:  # zero channels
            return
        lo, hi = value.min().item(), value.max().item()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        lo = hi = float(value)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not (lo > 0 and (hi <= high if high is not None else math.isfinite(hi))):
        allowed = f"in (0, {high:g}]" if high is not None else "finite and > 0"
        got = f"values in [{lo}, {hi}]" if isinstance(value, torch.Tensor) else repr(value)
        raise ValueError(f"{name} must be {allowed}, got {got}")


@dataclass(frozen=True)
class NeuronSpec:
    """How one population of LIF neurons behaves (see ``spiking_lm.lif_reference`` for the update)."""

    beta: float = 0.5
    """Membrane decay per simulation step, in (0, 1]; 1 is a perfect integrator."""
    threshold: float = 1.0
    """Firing threshold (> 0); the initial value when the threshold is learned."""
    refractory: int = 1
    """Steps a neuron stays silent, clamped at rest, after a spike; 0 is plain LIF (snnTorch's and
    SpikingJelly's neuron)."""
    reset: Reset = "subtract"
    """Membrane after a spike: "subtract" the threshold, or reset to "zero"."""
    surrogate: Surrogate = "atan"
    """Surrogate derivative used for the spike's step function in the backward pass."""
    alpha: float | None = None
    """Surrogate sharpness (finite, > 0); None gives 2 for atan and 25 for fast_sigmoid."""
    detach_reset: bool = True
    """Stop the gradient through the reset term, as snnTorch and SpikingJelly do by default."""
    code: Code = "binary"
    """What a neuron emits per step: "binary" 1 above threshold; "signed" +1 above +threshold and -1 below
    -threshold; "graded" an integer n = round(h / threshold), halves toward zero, clipped to +-max_count.
    A refractory period follows any nonzero output; signed and graded need reset "subtract" (of n*threshold)."""
    max_count: int = 3
    """Largest |n| a "graded" neuron emits in one step (>= 1); unused by the other codes."""
    gradient: Gradient = "surrogate"
    """Backward of the spike: the "surrogate" derivative of each step of the code, or "straight_through":
    the output's gradient as if it were h / threshold inside the code's range ([0, 1] binary, [-1, 1] signed,
    [-max_count, max_count] graded) and 0 outside it (SpikingBrain's estimator)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise TypeError or ValueError naming the first bad setting."""
        for name, high in (("beta", 1.0), ("threshold", None)):
            if isinstance(getattr(self, name), torch.Tensor):  # per-channel values are the LIF module's parameters
                raise TypeError(f"{name} must be a float, got Tensor")
            check_value(name, getattr(self, name), high)
        if isinstance(self.refractory, bool) or not isinstance(self.refractory, numbers.Integral):
            raise TypeError(f"refractory must be a non-negative integer number of steps, got {self.refractory!r}")
        if self.refractory < 0:
            raise ValueError(f"refractory must be a non-negative integer number of steps, got {self.refractory}")
        check_choice("reset", self.reset, RESETS)
        check_choice("surrogate", self.surrogate, SURROGATES)
        if self.alpha is not None:
            check_value("alpha", self.alpha, high=None)
        if not isinstance(self.detach_reset, bool):
            raise TypeError(f"detach_reset must be a bool, got {self.detach_reset!r}")
        check_choice("code", self.code, CODES)
        check_choice("gradient", self.gradient, GRADIENTS)
        if isinstance(self.max_count, bool) or not isinstance(self.max_count, numbers.Integral) or self.max_count < 1:
            raise ValueError(f"max_count must be an integer >= 1, got {self.max_count!r}")
        if self.code != "binary" and self.reset != "subtract":
            raise ValueError(f"code {self.code!r} needs reset 'subtract' (of n * threshold), got {self.reset!r}")

    @property
    def count_range(self) -> tuple[int, int]:
        """The smallest and largest output of one step."""
        return {"binary": (0, 1), "signed": (-1, 1), "graded": (-self.max_count, self.max_count)}[self.code]

    @property
    def surrogate_alpha(self) -> float:
        """``alpha``, or the surrogate's default when it is None."""
        return DEFAULT_ALPHA[self.surrogate] if self.alpha is None else float(self.alpha)
