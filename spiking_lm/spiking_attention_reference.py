"""Spiking attention as plain PyTorch: the specification of the fused kernels.

``spiking_lm.kernels.spiking_attention`` must reproduce this function spike for spike and gradient by
gradient, and the tests hold it to it. Per batch entry and head, with inputs q_t, k_t, v_t of shape (L, hs)
for each step t (the same tensors for every t when S' = 1)::

    c_t[i, j] = q_t[i] . k_t[j] / (sqrt(hs) * theta)                  # scores, causal pairs j <= i only
    x_t[i, j] = c_t[i, j] - max_{j' <= i} c_t[i, j'] + 1.5             (centering="row_max")
    x_t[i, j] = c_t[i, j]                                              (centering="none")
    s_t[i, j] = LIF neuron of the pair (i, j), threshold 1, input x_t[i, j] over t = 0..S-1
    N_t = s_0 + ... + s_t  (readout="cumulative")   or   N_t = s_t  (readout="step")
    d_t[i] = max(1, sum_j N_t[i, j])  (norm="count")   or   d_t[i] = i + 1  (norm="length")
    (the count's gradient passes only where it exceeds 1; at exactly 1 the max is the constant)
    y_t[i] = sum_j N_t[i, j] v_t[j] / d_t[i]

The queries may be the last L of T >= L positions (a decoding step against cached keys): query i is then
position T - L + i, and its causal keys are j <= T - L + i. Each pair's neuron sees only its own currents, so a
query row is the same whether computed alone or with the rows before it.

theta is the head's learnable threshold, applied as an input scale: LIF dynamics are unchanged when input
and threshold are scaled together (the surrogate's width is not). Masked pairs (j > i) never fire.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from spiking_lm.kernels.constants import ROW_MAX_CURRENT


def spiking_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    threshold: torch.Tensor,
    neuron: Callable[[torch.Tensor], torch.Tensor],
    timesteps: int,
    centering: str = "row_max",
    readout: str = "cumulative",
    norm: str = "count",
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal spiking attention; returns the output (S, B, nh, L, hs), the spike count and the weights of V.

    Args:
        q: (S', B, nh, L, hs) with S' = 1 (one current repeated over the steps) or S' = ``timesteps``; the queries
            of the last L positions.
        k, v: (S', B, nh, T, hs), T >= L: the keys and values of all T positions.
        threshold: (nh,) per-head threshold scale, already clamped positive.
        neuron: the LIF neurons of the attention site with threshold 1, mapping time-major current
            (S, ...) to spikes of that shape (``functools.partial(lif_reference, ...)``, or the model's site).
        timesteps: S.
        centering, readout, norm: see the module docstring.
        dropout: probability of dropping an attention weight (training only; the fused kernels draw the same
            distribution from their own Philox mask).

    Returns:
        y: (S, B, nh, L, hs).
        count: 0-d fp32, the spikes of all causal (query, key) pairs over all steps, differentiable through
            the surrogate (the firing rate's numerator).
        weights: (S, B, nh, L, T), N_t, for op counting.
    """
    S = timesteps
    B, nh, L, hs = q.shape[1:]
    T = k.shape[-2]
    q = q / (math.sqrt(hs) * threshold).view(nh, 1, 1)  # (S', B, nh, L, hs)
    current = q @ k.transpose(-2, -1)  # (S', B, nh, L, T)
    causal = torch.ones(L, T, dtype=torch.bool, device=q.device).tril(T - L)
    # As negative as the dtype allows while S steps of integration stay finite: a masked neuron's membrane
    # never rises, so it never fires, and its surrogate gradient is ~0.
    current = current.masked_fill(~causal, -torch.finfo(current.dtype).max / (S + 1))
    if centering == "row_max":
        # A threshold that follows each query row: the row's best key gets a current above the threshold (1)
        # and the others what they fall short by, so every row fires on its best keys whatever the scale of
        # its scores. Only the causal prefix enters the max.
        current = current - current.amax(-1, keepdim=True) + ROW_MAX_CURRENT  # (S', B, nh, L, T)
    spikes = neuron(current.expand(S, *current.shape[1:]))  # (S, B, nh, L, T)
    count = spikes.sum(dtype=torch.float32)
    if readout == "cumulative":
        # Spikes so far as a graded weight: a step on which nothing fires (say, every neuron refractory)
        # still reads the keys that fired before it.
        spikes = spikes.cumsum(0)  # (S, B, nh, L, T)
    y = F.dropout(spikes, dropout) @ v if dropout > 0 else spikes @ v  # (S, B, nh, L, hs)
    # A fixed normalisation in place of softmax's; it commutes with the matmul, so it is applied to the
    # (L, hs) output rather than to the (L, T) weights.
    if norm == "count":
        d = spikes.sum(-1, keepdim=True)  # (S, B, nh, L, 1)
        # Not clamp_min(1): its gradient at exactly 1 is torch's to choose, and it changed between releases
        # (1 in torch 2.11, 0 in 2.14). A count of 1 is common (a row's lone spike); the kernels pass none there.
        d = torch.where(d > 1, d, 1.0)
    else:
        d = torch.arange(T - L + 1, T + 1, device=y.device, dtype=y.dtype).unsqueeze(-1)  # (L, 1)
    return y / d, count, spikes
