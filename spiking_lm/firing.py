"""Firing counts of a GPT's forwards, handed back through one collector instead of being kept on the model.

    firing = FiringCounts()  # rate_grad=True for the rate regulariser, per_neuron=True for health
    logits, loss = model(idx, targets, firing=firing)
    firing.rates()  # {"layer0.attn": spikes / neuron-steps, ...}

A collector sums the counts of every forward it is passed to, per LIF site (the names of ``GPT.sites()``):

- ``spikes``: a detached 0-d int64 count on the model's device (reading it is the only synchronisation);
- ``neuron_steps``: S times the neurons, refractory steps included. An attention-score site counts only its
  causal (query, key) pairs, S * B * n_head * L (L + 1) / 2;
- ``graded`` (``rate_grad``): the spike count as a differentiable fp32 tensor, through the surrogate
  gradient, for ``penalty``;
- ``neuron_spikes`` and ``presentations`` (``per_neuron``): spikes per neuron, shape (N,), and how often each
  neuron was shown an input for S steps. A neuron is one channel at the Q/K/V, MLP and spike-driven input
  sites (one presentation per batch entry and position), and one head at an attention-score site (one
  presentation per causal (query, key) pair: the fused kernel keeps per-row counts, never per-pair ones).

With ``products`` set, each attention layer (spiking or softmax) also reports the nonzero products of its two
matmuls, which ``spiking_lm.eval.energy`` prices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SiteCounts:
    """The summed counts of one site; see the module docstring."""

    spikes: torch.Tensor
    neuron_steps: int
    timesteps: int
    graded: torch.Tensor | None = None
    neuron_spikes: torch.Tensor | None = None  # (N,) fp64
    presentations: int = 0

    @property
    def rate(self) -> torch.Tensor:
        """Spikes per neuron-step, detached."""
        return self.spikes.double() / self.neuron_steps

    def neuron_rates(self) -> torch.Tensor:
        """Each neuron's spikes per neuron-step, (N,): the histogram of a site's firing."""
        if self.neuron_spikes is None:
            raise ValueError("no per-neuron counts: collect them with FiringCounts(per_neuron=True)")
        return self.neuron_spikes / (self.presentations * self.timesteps)


@dataclass
class AttentionProducts:
    """Nonzero products of one attention layer's matmuls over its causal pairs (0-d fp64, summed over forwards).

    ``qk``: of Q.K^T (hs per pair with real Q and K, coinciding spikes with spiking ones); ``av``: of the weights
    and V, a spike-count weight n counting n times (a weight n times a value is n additions).
    """

    qk: torch.Tensor
    av: torch.Tensor


class FiringCounts:
    """Collects per-site firing counts (and optionally per-neuron counts and attention products) of forwards.

    Args:
        rate_grad: keep each site's differentiable spike count for ``penalty`` (training with the regulariser).
        per_neuron: keep spikes per neuron, for neuron health and firing-rate histograms.
        products: have attention layers report their nonzero products, for ``spiking_lm.eval.energy``.
    """

    def __init__(self, rate_grad: bool = False, per_neuron: bool = False, products: bool = False):
        self.rate_grad, self.per_neuron, self.products = rate_grad, per_neuron, products
        self.sites: dict[str, SiteCounts] = {}
        self.attention: dict[str, AttentionProducts] = {}

    def add(
        self,
        name: str,
        spikes: torch.Tensor,
        neuron_steps: int,
        timesteps: int,
        graded: torch.Tensor | None = None,
        neuron_spikes: torch.Tensor | None = None,
        presentations: int = 0,
    ) -> None:
        """Add one call's counts to site ``name`` (called by the model's sites)."""
        spikes = spikes.detach().round().long()
        new = SiteCounts(
            spikes,
            neuron_steps,
            timesteps,
            graded if self.rate_grad else None,
            neuron_spikes if self.per_neuron else None,
            presentations,
        )
        old = self.sites.get(name)
        if old is None:
            self.sites[name] = new
            return
        # The collector's settings decide which optional counts a site gives, so old and new have the same ones.
        old.spikes = old.spikes + new.spikes
        old.neuron_steps += neuron_steps
        old.presentations += presentations
        if new.graded is not None:
            old.graded = old.graded + new.graded
        if new.neuron_spikes is not None:
            old.neuron_spikes = old.neuron_spikes + new.neuron_spikes

    def add_products(self, name: str, qk: torch.Tensor, av: torch.Tensor) -> None:
        """Add one attention call's products to layer ``name`` (called by the attention layers)."""
        qk, av = qk.detach(), av.detach()
        old = self.attention.get(name)
        self.attention[name] = AttentionProducts(qk, av) if old is None else AttentionProducts(old.qk + qk, old.av + av)

    def rates(self) -> dict[str, torch.Tensor]:
        """Per site, spikes / neuron-steps (detached 0-d fp64), in execution order; {} without LIF sites."""
        return {name: site.rate for name, site in self.sites.items()}

    def mean_rate(self) -> dict[str, torch.Tensor] | None:
        """``neuron_weighted`` (all spikes / all neuron-steps) and ``layer_mean`` (mean of the site rates).

        None without LIF sites.
        """
        if not self.sites:
            return None
        sites = self.sites.values()
        return {
            "neuron_weighted": sum(site.spikes for site in sites).double() / sum(site.neuron_steps for site in sites),
            "layer_mean": torch.stack([site.rate for site in sites]).mean(),
        }

    def penalty(self, target: float) -> torch.Tensor:
        """Sum over sites of (rate - target)^2, differentiable; the trainer multiplies it by its weight."""
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"target firing rate must be in [0, 1], got {target}")
        if not self.rate_grad:
            raise ValueError("the penalty needs the graded counts: collect them with FiringCounts(rate_grad=True)")
        return sum(((site.graded / site.neuron_steps - target) ** 2 for site in self.sites.values()), torch.zeros(()))
