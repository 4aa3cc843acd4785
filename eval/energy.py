"""Energy per token, estimated from operation counts: MACs on real values, ACs triggered by spikes.

What one forward counts (``OpCounter``, from forward hooks on the linear layers and the neurons, and from the
attention layers' products in ``spiking_lm.firing.FiringCounts``, whichever implementation ran), per layer:

- Every ``nn.Linear`` whose input is real-valued: input rows x in_features x out_features MACs.
  Its input's leading dimension is S' (1 before the first LIF site, S after it), so layers that run
  on S copies of the residual stream count S times and those before the first site once.
- A ``nn.Linear`` fed by spikes (the MLP's output projection behind LIF neurons, and every linear layer
  behind a spike-driven input site, ``spiking_qkv_in``/``spiking_proj_in``/``spiking_fc_in``): one AC per
  unit spike and output, i.e. sum |n| x out_features over the neurons' outputs n (the spike's fan-out). A
  binary spike or a signed one (an add or a subtract) is one unit; a graded output n is |n| of them, as |n|
  unit spikes would be. A site's learned amplitude folds into the layer's weights and changes no count. A
  silent input costs nothing.
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

Nothing else is counted as arithmetic: embeddings (lookups), LayerNorm, softmax, GELU, biases, residual
additions, attention's normalisation, the average over S and neuron updates. It is an estimate from
operation counts, not a measurement on silicon, and it assumes hardware that skips zero spikes for free.

Energy = MACs x e_mac + ACs x e_ac (+ bytes read x pJ/byte with the memory term), per token (divided by the
tokens of the counted forwards). Each ``PRESETS`` entry is one of Horowitz's 45 nm figures (M. Horowitz,
"Computing's energy problem (and what we can do about it)", ISSCC 2014), the ones SpikingJelly's op counter
uses: fp32 (a multiply, 3.7 pJ, plus an add, 0.9 pJ: 4.6 pJ per MAC, 0.9 pJ per AC), fp16 (1.5 / 0.4) and
int8 (0.23 / 0.03). fp32 is the default and the figure the literature quotes; int8 is the fair comparison
against a quantised dense model, whose MACs are far cheaper than fp32's while an AC saves less
(``docs/energy.md`` says which question each answers).

The optional memory term counts the bytes a token's forward reads, at the preset's width per value
(4, 2 or 1 bytes), times a stated pJ per byte:

- weights: a real-fed linear layer reads its whole matrix once per token (the S copies of the residual
  stream share it); a spike-fed one reads the rows of the input channels that fired at least once in the
  token's S steps, in_rows x out_features values (event-driven fetch).
- activations: a real-fed layer reads its input values (S' x in_features per token); a spike-fed one reads
  its spikes as a dense bitmap of ``CODE_BITS`` bits per neuron-step (1 binary, 2 signed,
  ceil(log2(2 max + 1)) graded). Attention reads Q once per query and K and V once per causal pair (real
  values, or 1 bit per spike with spiking Q/K/V).

Everything else (embeddings, LayerNorm parameters, neuron state, writes) is left out, so the term is a
lower bound on the traffic of hardware with no on-chip reuse across tokens.

The softmax + GELU baseline is counted by the same code (its count is all MACs and does not depend
on the data), so ``count_dense`` runs its dense counterpart of any config once to get the ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from spiking_lm.config import ModelConfig
from spiking_lm.firing import FiringCounts
from spiking_lm.model import GPT
from spiking_lm.neuron import NeuronSpec


@dataclass(frozen=True)
class Preset:
    """pJ per operation and bytes per value of one number format (Horowitz, ISSCC 2014, 45 nm)."""

    e_mac: float
    e_ac: float
    bytes_per_value: int


PRESETS: dict[str, Preset] = {
    "fp32": Preset(4.6, 0.9, 4),
    "fp16": Preset(1.5, 0.4, 2),
    "int8": Preset(0.23, 0.03, 1),
}
E_MAC_PJ = PRESETS["fp32"].e_mac
E_AC_PJ = PRESETS["fp32"].e_ac


def code_bits(spec: NeuronSpec) -> int:
    """Bits of one neuron-step of a spike code: 1 binary, 2 signed, ceil(log2(2 max + 1)) graded."""
    levels = spec.count_range[1] - spec.count_range[0] + 1
    return math.ceil(math.log2(levels))


def layer_name(module_name: str) -> str:
    """``transformer.h.3.mlp.c_fc`` -> ``layer3.mlp.c_fc``, the naming of ``GPT.sites()``."""
    parts = module_name.split(".")
    if parts[:2] == ["transformer", "h"]:
        return ".".join([f"layer{parts[2]}", *parts[3:]])
    return module_name


class OpCounter:
    """Counts the MACs and ACs, and the values and spike bits read, of a GPT's forwards while entered.

    Attention's matmuls are counted from the products the attention layers add to ``firing`` (a
    ``FiringCounts(products=True)``, made here if not given), so every forward counted must be passed
    ``firing=counter.firing``. ``ops`` maps a layer name to ``[macs, acs]`` in execution order, ``reads`` to
    ``[weights, activation values, spike bits]``, ``tokens`` counts the tokens forwarded; ``report()`` turns
    them into energy per token.
    """

    def __init__(self, model: GPT, firing: FiringCounts | None = None):
        if firing is not None and not firing.products:
            raise ValueError("OpCounter needs the attention products: pass FiringCounts(products=True)")
        self.model = model
        self.firing = firing if firing is not None else FiringCounts(products=True)
        self.linear: dict[str, list[int]] = {}
        self.reads: dict[str, list[int]] = {}
        self.tokens = 0
        self._forward_tokens = 0  # of the forward under way
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._spikes: dict[nn.Linear, torch.Tensor] = {}  # the integer code a spike-fed layer is about to read

    def __enter__(self) -> OpCounter:
        blocks = self.model.transformer.h
        spike_fed = {}
        for block in blocks:
            attn, mlp = block.attn, block.mlp
            pairs = [(mlp.c_fc, mlp.fc_in_neuron), (mlp.c_proj, mlp.neuron)]
            if attn is not None:  # None under attention: none
                pairs += [(attn.c_attn, attn.qkv_in_neuron), (attn.c_proj, attn.proj_in_neuron)]
            spike_fed.update((linear, site) for linear, site in pairs if site is not None)
        for linear, site in spike_fed.items():
            # The neurons' own output, before a site's amplitude (folded into the weights) scales it.
            self._handles.append(site.lif.register_forward_hook(partial(self._keep_spikes, linear)))
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                site = spike_fed.get(module)
                bits = code_bits(site.lif.spec) if site is not None else None
                hook = partial(self._linear, layer_name(name), bits)
                self._handles.append(module.register_forward_hook(hook))
        self._handles.append(self.model.register_forward_pre_hook(self._count_tokens))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._spikes.clear()

    def _add(self, name: str, macs: int = 0, acs: int = 0) -> None:
        counts = self.linear.setdefault(name, [0, 0])
        counts[0] += int(macs)
        counts[1] += int(acs)

    def _read(self, name: str, weights: int = 0, values: int = 0, bits: int = 0) -> None:
        counts = self.reads.setdefault(name, [0, 0, 0])
        counts[0] += int(weights)
        counts[1] += int(values)
        counts[2] += int(bits)

    def _count_tokens(self, module: nn.Module, args: tuple) -> None:
        self._forward_tokens = args[0].numel()
        self.tokens += self._forward_tokens

    def _keep_spikes(self, linear: nn.Linear, lif: nn.Module, args: tuple, output) -> None:
        self._spikes[linear] = output[0] if isinstance(output, tuple) else output  # (spikes, stats) from a site

    def _linear(self, name: str, bits: int | None, module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        x = args[0]  # (S', B, L, in), or (B, L, in) for lm_head
        if bits is not None:
            n = self._spikes.pop(module)  # (S, ..., in)
            unit_spikes = n.abs().sum(dtype=torch.float64).item()
            rows = n.ne(0).any(0).sum().item()  # (token, input channel) pairs that fired in the S steps
            self._add(name, acs=unit_spikes * module.out_features)
            self._read(name, weights=rows * module.out_features, bits=n.numel() * bits)
        else:
            self._add(name, macs=x.numel() * module.out_features)
            self._read(name, weights=self._forward_tokens * module.weight.numel(), values=x.numel())
        if name.endswith(".attn.c_attn"):
            self._attention_reads(name.removesuffix(".c_attn"), output)

    def _attention_reads(self, name: str, qkv: torch.Tensor) -> None:
        """What attention reads: Q once per query, K and V once per causal pair (real values, or 1 bit per spike
        with spiking Q/K/V), from the shape of the Q/K/V projection's output ``qkv`` (S', B, L, 3C)."""
        config = self.model.config
        steps = config.timesteps if config.spiking_qkv else qkv.shape[0]  # the Q/K/V site runs over S steps
        L = qkv.shape[-2]
        queries = steps * qkv[0, ..., 0].numel() * config.n_embd  # S' x B x L x (nh x hs)
        pair_reads = queries // L * (L * (L + 1) // 2)  # (S' B nh hs) x causal pairs
        unit = "bits" if config.spiking_qkv else "values"
        self._read(f"{name}.qk", **{unit: queries + pair_reads})
        self._read(f"{name}.av", **{unit: pair_reads})

    @property
    def ops(self) -> dict[str, list[int]]:
        """``[macs, acs]`` per layer in execution order, attention's ``.qk`` and ``.av`` after its ``c_attn``.

        Products of real operands are MACs, any product with a spike (a 0/1 value, or a spike-count weight
        standing for that many additions) an AC.
        """
        config = self.model.config
        ops = {}
        for name, counts in self.linear.items():
            ops[name] = counts
            attn = name.removesuffix(".c_attn")
            if attn != name and attn in self.firing.attention:
                products = self.firing.attention[attn]
                qk, av = round(products.qk.item()), round(products.av.item())
                ops[f"{attn}.qk"] = [0, qk] if config.spiking_qkv else [qk, 0]
                real = config.attention == "softmax" and not config.spiking_qkv
                ops[f"{attn}.av"] = [av, 0] if real else [0, av]
        return ops

    def report(
        self, e_mac: float = E_MAC_PJ, e_ac: float = E_AC_PJ, pj_per_byte: float | None = None, bytes_per_value: int = 4
    ) -> dict:
        """MACs, ACs and picojoules per token, in all and per layer; with ``pj_per_byte``, the bytes read
        (values at ``bytes_per_value``, spikes at their code's bits) and their energy are in both."""
        if self.tokens == 0:
            raise RuntimeError("no forward was counted: run the model inside the OpCounter first")
        if self.model.config.attention != "none" and not self.firing.attention:
            raise RuntimeError("no attention products were counted: pass firing=counter.firing to the forwards")
        if e_mac < 0 or e_ac < 0:
            raise ValueError(f"energies per operation must be >= 0 pJ, got e_mac={e_mac}, e_ac={e_ac}")
        if pj_per_byte is not None and not (pj_per_byte >= 0 and math.isfinite(pj_per_byte)):
            raise ValueError(f"the memory term's pJ per byte must be finite and >= 0, got {pj_per_byte}")
        layers = {}
        for name, (macs, acs) in self.ops.items():
            pj = (macs * e_mac + acs * e_ac) / self.tokens
            layer = {"mac": macs / self.tokens, "ac": acs / self.tokens, "pj": pj}
            if pj_per_byte is not None:
                weights, values, bits = self.reads.get(name, (0, 0, 0))
                layer["bytes"] = ((weights + values) * bytes_per_value + bits / 8) / self.tokens
                layer["memory_pj"] = layer["bytes"] * pj_per_byte
                layer["pj"] += layer["memory_pj"]
            layers[name] = layer
        result = {
            "pj_per_token": sum(layer["pj"] for layer in layers.values()),
            "mac_per_token": sum(layer["mac"] for layer in layers.values()),
            "ac_per_token": sum(layer["ac"] for layer in layers.values()),
            "e_mac_pj": e_mac,
            "e_ac_pj": e_ac,
        }
        if pj_per_byte is not None:
            result.update(
                bytes_per_token=sum(layer["bytes"] for layer in layers.values()),
                memory_pj_per_token=sum(layer["memory_pj"] for layer in layers.values()),
                pj_per_byte=pj_per_byte,
                bytes_per_value=bytes_per_value,
            )
        return {**result, "layers": layers}


def dense_counterpart(config: ModelConfig) -> ModelConfig:
    """The same sizes with softmax attention, GELU, no spiking Q/K/V and no spike-driven inputs: the baseline."""
    return replace(
        config,
        attention="softmax",
        mlp_activation="gelu",
        spiking_qkv=False,
        spiking_qkv_in=False,
        spiking_proj_in=False,
        spiking_fc_in=False,
    )


@torch.no_grad()
def count_dense(
    config: ModelConfig,
    seq_len: int,
    e_mac: float = E_MAC_PJ,
    e_ac: float = E_AC_PJ,
    pj_per_byte: float | None = None,
    bytes_per_value: int = 4,
) -> dict:
    """``OpCounter.report()`` of the dense counterpart of ``config`` on sequences of ``seq_len`` tokens.

    Its count depends only on the sizes, so one forward of a freshly initialised model gives it.
    """
    return _dense_counter(config, seq_len).report(e_mac, e_ac, pj_per_byte, bytes_per_value)


@torch.no_grad()
def _dense_counter(config: ModelConfig, seq_len: int) -> OpCounter:
    model = GPT(dense_counterpart(config)).eval()
    with OpCounter(model) as counter:
        model(torch.zeros(1, seq_len, dtype=torch.long), firing=counter.firing)
    return counter


def preset_ratios(
    counter: OpCounter, config: ModelConfig, seq_len: int, pj_per_byte: float | None = None
) -> dict[str, dict]:
    """Per preset: the model's and its dense counterpart's pJ per token and their ratio, each with and, given
    ``pj_per_byte``, also without the memory term (``compute_*``)."""
    dense = _dense_counter(config, seq_len)
    result = {}
    for name, p in PRESETS.items():
        mine, base = (c.report(p.e_mac, p.e_ac, pj_per_byte, p.bytes_per_value) for c in (counter, dense))
        entry = {
            "e_mac_pj": p.e_mac,
            "e_ac_pj": p.e_ac,
            "pj_per_token": mine["pj_per_token"],
            "dense_pj_per_token": base["pj_per_token"],
            "ratio_vs_dense": mine["pj_per_token"] / base["pj_per_token"],
        }
        if pj_per_byte is not None:
            compute, dense_compute = (c.report(p.e_mac, p.e_ac)["pj_per_token"] for c in (counter, dense))
            entry.update(
                memory_pj_per_token=mine["memory_pj_per_token"],
                bytes_per_token=mine["bytes_per_token"],
                dense_memory_pj_per_token=base["memory_pj_per_token"],
                compute_ratio_vs_dense=compute / dense_compute,
                pj_per_byte=pj_per_byte,
            )
        result[name] = entry
    return result
