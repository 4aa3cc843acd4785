"""Energy per token, estimated from operation counts: MACs on real values, ACs triggered by spikes.

What one forward counts (``OpCounter``), per layer:

- Every ``nn.Linear`` whose input is real-valued: input rows x in_features x out_features MACs.
  Its input's leading dimension is S' (1 before the first LIF site, S after it), so layers that run
  on S copies of the residual stream count S times and those before the first site once.
- A ``nn.Linear`` fed by spikes (the MLP's output projection behind LIF neurons, and every linear layer
  behind a spike-driven input site, ``spiking_qkv_in``/``spiking_proj_in``/``spiking_fc_in``): one AC per
  input spike and output, i.e. spikes x out_features (the spike's fan-out). A silent input costs nothing.
- Attention's two matmuls, on the causal (query, key) pairs only (masked products are not computed):

  - scores Q.K^T: hs MACs per pair when Q and K are real; with spiking Q/K (``spiking_qkv``), one AC
    per nonzero product, i.e. per channel where both the query's and the key's neuron spiked
    (the sum of the binary Q.K^T).
  - mixing W.V: with real V, hs MACs per pair for softmax weights, and for spikes one AC per weight
    spike and channel (spikes x head_size); with spiking V, one AC per nonzero weight and V spike
    (for spike weights: per pair of coinciding spikes, the sum of the binary W.V). Spike-count weights
    (``attn_readout="cumulative"``) are small integers, and an integer n times a value is n additions:
    a weight n counts n ACs wherever a 0/1 weight counts one (n x hs with real V, n per V spike with
    spiking V), never a MAC.

Nothing else is counted: embeddings (lookups), LayerNorm, softmax, GELU, biases, residual additions,
attention's normalisation, the average over S, neuron updates, and all memory traffic, which on real
hardware often costs more than the arithmetic. It is an estimate from operation counts, not a
measurement on silicon, and it assumes hardware that skips zero spikes for free.

Energy = MACs x e_mac + ACs x e_ac, per token (divided by the tokens of the counted forwards).
The default constants are Horowitz's 45 nm figures for 32-bit floats (M. Horowitz, "Computing's
energy problem (and what we can do about it)", ISSCC 2014): a multiply (3.7 pJ) plus an add
(0.9 pJ) is 4.6 pJ per MAC, an add is 0.9 pJ per AC.

The softmax + GELU baseline is counted by the same code (its count is all MACs and does not depend
on the data), so ``count_dense`` runs its dense counterpart of any config once to get the ratio.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn

from spiking_lm.config import ModelConfig
from spiking_lm.model import GPT

E_MAC_PJ = 4.6
E_AC_PJ = 0.9


def layer_name(module_name: str) -> str:
    """``transformer.h.3.mlp.c_fc`` -> ``layer3.mlp.c_fc``, the naming of ``GPT.sites()``."""
    parts = module_name.split(".")
    if parts[:2] == ["transformer", "h"]:
        return ".".join([f"layer{parts[2]}", *parts[3:]])
    return module_name


class OpCounter:
    """Counts the MACs and ACs of a GPT's forwards while entered (a context manager).

    ``ops`` maps a layer name to ``[macs, acs]`` in execution order, ``tokens`` counts the tokens
    forwarded; ``report()`` turns them into energy per token.
    """

    def __init__(self, model: GPT):
        self.model = model
        self.ops: dict[str, list[int]] = {}
        self.tokens = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> OpCounter:
        blocks = self.model.transformer.h
        spike_fed = set()
        for block in blocks:
            attn, mlp = block.attn, block.mlp
            pairs = [(mlp.c_fc, mlp.fc_in_neuron), (mlp.c_proj, mlp.neuron)]
            if attn is not None:  # None under attention: none
                pairs += [(attn.c_attn, attn.qkv_in_neuron), (attn.c_proj, attn.proj_in_neuron)]
            spike_fed.update(linear for linear, site in pairs if site is not None)
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                hook = partial(self._linear, layer_name(name), module in spike_fed)
                self._handles.append(module.register_forward_hook(hook))
        for i, block in enumerate(blocks):
            if block.attn is not None:
                block.attn.observe = partial(self._attention, f"layer{i}.attn", block.attn.qkv_neuron is not None)
        self._handles.append(self.model.register_forward_pre_hook(self._count_tokens))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in self.model.transformer.h:
            if block.attn is not None:
                block.attn.observe = None

    def _add(self, name: str, macs: int = 0, acs: int = 0) -> None:
        counts = self.ops.setdefault(name, [0, 0])
        counts[0] += int(macs)
        counts[1] += int(acs)

    def _count_tokens(self, module: nn.Module, args: tuple) -> None:
        self.tokens += args[0].numel()

    def _linear(self, name: str, spike_fed: bool, module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        if spike_fed:
            self._add(name, acs=torch.count_nonzero(x).item() * module.out_features)
        else:
            self._add(name, macs=x.numel() * module.out_features)

    def _attention(self, name: str, spiking_qkv: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   weights: torch.Tensor | None) -> None:
        L, hs = q.shape[-2:]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        dense_products = q.shape[:-2].numel() * (L * (L + 1) // 2) * hs  # (S' B nh) x causal pairs x hs
        # Sums of binary products are small integers, exact in fp32 per entry; the total is summed in fp64.
        if spiking_qkv:
            both = (q != 0).float() @ (k != 0).float().transpose(-2, -1)  # (S, B, nh, L, L)
            self._add(f"{name}.qk", acs=both.masked_fill(~causal, 0).sum(dtype=torch.float64).item())
        else:
            self._add(f"{name}.qk", macs=dense_products)
        # Softmax weights are real on every causal pair (once per V spike with spiking V); spiking ones
        # are spike counts (0/1 per step, or counts so far), each weight n standing for n additions of a V row.
        additions = causal.float() if weights is None else weights  # (S', B, nh, L, L)
        if spiking_qkv:  # n ACs per weight n and V spike
            self._add(f"{name}.av", acs=(additions @ (v != 0).float()).sum(dtype=torch.float64).item())
        elif weights is not None:  # n ACs per weight n and channel of the real V
            self._add(f"{name}.av", acs=weights.sum(dtype=torch.float64).item() * hs)
        else:
            self._add(f"{name}.av", macs=dense_products)

    def report(self, e_mac: float = E_MAC_PJ, e_ac: float = E_AC_PJ) -> dict:
        """MACs, ACs and picojoules per token, in all and per layer."""
        if self.tokens == 0:
            raise RuntimeError("no forward was counted: run the model inside the OpCounter first")
        if e_mac < 0 or e_ac < 0:
            raise ValueError(f"energies per operation must be >= 0 pJ, got e_mac={e_mac}, e_ac={e_ac}")
        layers = {
            name: {"mac": macs / self.tokens, "ac": acs / self.tokens,
                   "pj": (macs * e_mac + acs * e_ac) / self.tokens}
            for name, (macs, acs) in self.ops.items()
        }
        return {
            "pj_per_token": sum(layer["pj"] for layer in layers.values()),
            "mac_per_token": sum(layer["mac"] for layer in layers.values()),
            "ac_per_token": sum(layer["ac"] for layer in layers.values()),
            "e_mac_pj": e_mac,
            "e_ac_pj": e_ac,
            "layers": layers,
        }


def dense_counterpart(config: ModelConfig) -> ModelConfig:
    """The same sizes with softmax attention, GELU, no spiking Q/K/V and no spike-driven inputs: the baseline."""
    return replace(config, attention="softmax", mlp_activation="gelu", spiking_qkv=False, spiking_qkv_in=False,
                   spiking_proj_in=False, spiking_fc_in=False)


@torch.no_grad()
def count_dense(config: ModelConfig, seq_len: int, e_mac: float = E_MAC_PJ, e_ac: float = E_AC_PJ) -> dict:
    """``OpCounter.report()`` of the dense counterpart of ``config`` on sequences of ``seq_len`` tokens.

    Its count depends only on the sizes, so one forward of a freshly initialised model gives it.
    """
    model = GPT(dense_counterpart(config)).eval()
    with OpCounter(model) as counter:
        model(torch.zeros(1, seq_len, dtype=torch.long))
    return counter.report(e_mac, e_ac)
