"""Neuron health per LIF site: dead neurons (never fired) and saturated ones (always at the refractory limit).

The counts are the per-neuron ones of ``spiking_lm.firing.FiringCounts(per_neuron=True)``, whose docstring
says what a neuron is: a channel at Q/K/V, MLP and spike-driven input sites, a head at attention-score sites
(all of its causal (query, key) pairs, the granularity the fused attention kernel counts at).

A *presentation* is one token (one causal pair, for a head) shown for S timesteps. With a refractory
period of R steps a neuron can fire at most ``ceil(S / (R + 1))`` times per presentation (at steps 0,
R+1, 2(R+1), ...), max_count times that for a graded code. Over all of a neuron's presentations in the
evaluated text:

- dead: it fired 0 times;
- saturated: it fired that maximum on every presentation, i.e. its rate over its neuron-steps reached
  the highest achievable, ``ceil(S / (R + 1)) / S`` (1/(R+1) when R+1 divides S).

A site is flagged when more than 50% of its neurons are dead or more than 20% saturated.

``spike_trains`` (the rasters of ``eval/report.py``) reads whole spike tensors instead, with the attention
site's neurons as (head, key offset) pairs: it needs the reference attention, which runs on CPU.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch

from spiking_lm.firing import FiringCounts
from spiking_lm.model import GPT, NeuronSite

DEAD_WARN = 0.5
SATURATED_WARN = 0.2

log = logging.getLogger(__name__)


def is_attention_site(name: str) -> bool:
    """Whether a ``GPT.sites()`` name is an attention-score site (``layer{i}.attn``)."""
    return name.endswith(".attn")


def by_neuron(spikes: torch.Tensor, attention: bool, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's spikes as (S, B, L, N), one column per neuron, and which (position, neuron) pairs exist (L, N).

    Channel sites pass through. Score spikes (S, B, nh, L, L) become N = nh x ``max_len`` offset
    neurons; at query i, offsets d > i have no key, so they are zero there and marked absent.
    """
    if not attention:
        return spikes, torch.ones(spikes.shape[2:], dtype=torch.bool, device=spikes.device)
    S, B, nh, L, _ = spikes.shape
    key = torch.arange(L, device=spikes.device).unsqueeze(1) - torch.arange(max_len, device=spikes.device)  # (L, D)
    present = key >= 0
    trains = spikes.gather(-1, key.clamp_min(0).expand(S, B, nh, L, max_len)) * present  # (S, B, nh, L, D)
    return trains.permute(0, 1, 3, 2, 4).flatten(-2), present.repeat(1, nh)  # (S, B, L, nh*D), (L, nh*D)


def max_spikes(timesteps: int, refractory: int) -> int:
    """The most spikes one presentation of S steps allows with a refractory period of R steps."""
    return math.ceil(timesteps / (refractory + 1))


def site_health(model: GPT, firing: FiringCounts) -> dict[str, dict]:
    """Per site of ``model``: neurons, dead and saturated fractions, and the per-presentation spike limit, from
    the per-neuron counts of the forwards that ``firing`` collected."""
    sites = model.sites()
    if sites and not firing.sites:
        raise RuntimeError("no forward was counted: pass firing=FiringCounts(per_neuron=True) to the forwards")
    report = {}
    for name, site in sites.items():
        counts = firing.sites[name]
        if counts.neuron_spikes is None:
            raise ValueError("no per-neuron counts: collect them with FiringCounts(per_neuron=True)")
        spec = site.lif.spec
        limit = max_spikes(site.timesteps, spec.refractory) * (spec.max_count if spec.code == "graded" else 1)
        spikes = counts.neuron_spikes  # (N,), exact integers in fp64
        report[name] = {
            "neurons": spikes.numel(),
            "dead_frac": (spikes == 0).double().mean().item(),
            "saturated_frac": (spikes >= limit * counts.presentations).double().mean().item(),
            "max_spikes_per_token": limit,
        }
    return report


def overall(health: dict[str, dict]) -> dict[str, float | None]:
    """Dead and saturated fractions of all neurons of all sites together; None without sites."""
    neurons = sum(site["neurons"] for site in health.values())
    if not neurons:
        return {"dead_frac": None, "saturated_frac": None}
    return {
        key: sum(site[key] * site["neurons"] for site in health.values()) / neurons
        for key in ("dead_frac", "saturated_frac")
    }


def site_warnings(health: dict[str, dict], where: str = "") -> list[str]:
    """One line per site over the dead or saturated limit, also sent to this module's logger."""
    lines = []
    for name, site in health.items():
        if site["dead_frac"] > DEAD_WARN:
            lines.append(f"{where}{name}: {site['dead_frac']:.0%} of its {site['neurons']} neurons never fired (dead)")
        if site["saturated_frac"] > SATURATED_WARN:
            lines.append(
                f"{where}{name}: {site['saturated_frac']:.0%} of its {site['neurons']} neurons fire "
                f"{site['max_spikes_per_token']}x per token, the refractory limit (saturated)"
            )
    for line in lines:
        log.warning("neuron health: %s", line)
    return lines


@torch.no_grad()
def spike_trains(model: GPT, idx: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per site, the spikes of one sequence ``idx`` (1, L) per neuron over time, (N, L*S), and presence (N, L*S).

    Time runs token by token, each token's S steps in a row.
    """
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"spike_trains takes one sequence of shape (1, L), got {tuple(idx.shape)}")
    trains = {}

    def keep(name: str, site: NeuronSite, args: tuple, spikes: torch.Tensor) -> None:
        per_neuron, present = by_neuron(spikes, is_attention_site(name), model.config.block_size)
        S = per_neuron.shape[0]
        trains[name] = (
            per_neuron[:, 0].permute(2, 1, 0).flatten(1).float().cpu(),  # (N, L*S)
            present.T.repeat_interleave(S, dim=1).cpu(),
        )

    handles = [site.register_forward_hook(partial(keep, name)) for name, site in model.sites().items()]
    try:
        model(idx)
    finally:
        for handle in handles:
            handle.remove()
    return trains
