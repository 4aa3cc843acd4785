"""Spike-driven inputs: LIF sites in front of the Q/K/V projection, the attention output projection and the MLP."""

from dataclasses import asdict

import conftest
import pytest
import torch
from torch import nn

from spiking_lm.config import ModelConfig, NeuronConfig
from spiking_lm.firing import FiringCounts
from spiking_lm.model import GPT

SITES = {"spiking_qkv_in": "qkv_in", "spiking_proj_in": "proj_in", "spiking_fc_in": "fc_in"}
ALL = {option: True for option in SITES}


def tiny(**overrides) -> ModelConfig:
    """conftest's tiny config with the MLP's threshold as low as the sites', so that every site fires."""
    return conftest.tiny(**{"mlp_neuron": NeuronConfig(threshold=0.05), **overrides})


def test_rates_at_every_site_that_is_on():
    # Causality with each site on is tested with the other variants in tests/test_model.py.
    for options in [{option: True} for option in SITES] + [ALL, {**ALL, "attention": "softmax", "spiking_qkv": True}]:
        torch.manual_seed(0)
        model = GPT(tiny(**options)).eval()
        firing = FiringCounts()
        with torch.no_grad():
            model(torch.randint(0, 16, (3, 8)), firing=firing)
        rates = firing.rates()
        for option, kind in SITES.items():
            assert (f"layer1.{kind}" in rates) == bool(options.get(option)), options
        assert all(0 < rate <= 1 for rate in rates.values()), rates


def test_site_names_in_execution_order():
    model = GPT(tiny(**ALL, spiking_qkv=True))
    kinds = ("qkv_in", "qkv", "attn", "proj_in", "fc_in", "mlp")
    assert list(model.sites()) == [f"layer{i}.{kind}" for i in range(2) for kind in kinds]


def test_all_on_feeds_every_block_linear_with_spikes():
    torch.manual_seed(0)
    model = GPT(tiny(**ALL)).eval()
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0]))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    with torch.no_grad():
        model(torch.randint(0, 16, (2, 8)))
    for handle in handles:
        handle.remove()
    in_blocks = [name for name in inputs if name.startswith("transformer.h.")]
    assert len(in_blocks) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    for name in in_blocks:
        x = inputs[name]
        assert x.shape[0] == 3, name  # S copies: the sites run over the timesteps
        assert ((x == 0) | (x == 1)).all() and x.any() and not x.all(), name
    lm_in = inputs["lm_head"]
    assert not ((lm_in == 0) | (lm_in == 1)).all()  # the readout stays real


def test_spike_driven_sites_learn():
    torch.manual_seed(0)
    model = GPT(tiny(**ALL)).train()
    idx = torch.randint(0, 16, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    block = model.transformer.h[0]
    # Gradients cross each site (surrogate) back to what feeds it, and reach the site's own threshold.
    for param in (
        block.ln_1.weight,
        block.ln_2.weight,
        block.attn.c_attn.weight,
        block.attn.qkv_in_neuron.lif.threshold,
        block.attn.proj_in_neuron.lif.threshold,
        block.mlp.fc_in_neuron.lif.threshold,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_neuron_settings_per_site_and_checkpoint_round_trip():
    cfg = tiny(**ALL, fc_in_neuron=NeuronConfig(threshold=0.3, refractory=2))
    model = GPT(cfg)
    assert model.transformer.h[0].mlp.fc_in_neuron.lif.spec.refractory == 2
    assert model.transformer.h[0].attn.qkv_in_neuron.lif.spec.refractory == 1
    assert ModelConfig().proj_in_neuron.threshold == 0.1  # the heads' output starts small
    assert ModelConfig(**asdict(cfg)) == cfg  # checkpoints store the config as nested dicts
    with pytest.raises(TypeError, match="fc_in_neuron must be a NeuronConfig"):
        ModelConfig(fc_in_neuron=0.3)
