"""Cached generation (``KVCache``): one position at a time gives the full forward's logits and the same tokens;
the baseline's lean one-position step (``BaselineStep``) gives the forward's, bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

from spiking_lm import model as model_module
from spiking_lm.config import NeuronConfig
from spiking_lm.decode import BaselineStep, KVCache
from spiking_lm.firing import FiringCounts
from spiking_lm.model import GPT

# Every site fires at initialisation: thresholds low enough for the spike-driven inputs too.
FIRING = dict(qkv_in_neuron=NeuronConfig(threshold=0.3), fc_in_neuron=NeuronConfig(threshold=0.3))
VARIANTS = {
    "softmax": dict(attention="softmax", mlp_activation="gelu"),
    "spiking": dict(),
    "spiking_qkv": dict(spiking_qkv=True),
    "spike_driven": dict(spiking_qkv_in=True, spiking_proj_in=True, spiking_fc_in=True),
    "step_length": dict(attn_centering="none", attn_readout="step", attn_norm="length"),
    # Spike codes at the sites: signed spikes with an adaptive threshold (its running scale set below) and
    # graded counts with a learned amplitude.
    "codes": dict(
        spiking_qkv_in=True,
        qkv_in_neuron=NeuronConfig(threshold=0.3, code="signed", adaptive_threshold=True),
        mlp_neuron=NeuronConfig(threshold=0.1, code="graded", amplitude=True),
    ),
    "no_attention": dict(attention="none"),
}


def model_of(variant: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny(**{**FIRING, **VARIANTS[variant]})).eval()
    for site in model.sites().values():
        if site.input_scale is not None:
            # What training leaves: a running scale. Before any, eval falls back to the batch's own mean |x|,
            # which mixes positions, and no cache could match that.
            site.input_scale.fill_(0.5)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_position_at_a_time_matches_the_full_forward(variant):
    # In float64, where matmuls of other shapes round too little to tip a neuron over its threshold: float32
    # can, and then one spike moves the logits by far more than rounding.
    model = model_of(variant).double()
    idx = torch.randint(0, 16, (2, 8))  # (B, block_size)
    firing = FiringCounts()
    with torch.no_grad():
        full, _ = model(idx, firing=firing)  # (B, L, V)
        rates = firing.rates()
        cache = KVCache(model.config.n_layer, model.config.block_size)
        prefill, _ = model(idx[:, :3], cache=cache)  # several positions into an empty cache, then one at a time
        steps = [model(idx[:, [t]], cache=cache)[0] for t in range(3, 8)]
    assert all(0 < rate < 1 for rate in rates.values()), rates  # otherwise the spiking paths are not exercised
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=0, atol=1e-12)
    assert cache.length == 8
    with pytest.raises(ValueError, match="cannot forward a sequence of length 9, block_size is 8"):
        model(idx[:, :1], cache=cache)


@pytest.mark.parametrize("top_k", [1, None], ids=["greedy", "sampled"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_and_uncached_generation_sample_the_same_tokens(variant, top_k):
    model = model_of(variant)
    prompt = torch.randint(0, 16, (2, 5))
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(1)
        outs.append(model.generate(prompt, 30, top_k=top_k, use_cache=use_cache))  # 35 tokens: block 8 crossed 7 times
    assert outs[0].shape == (2, 35) and torch.equal(outs[0][:, :5], prompt)
    assert torch.equal(outs[0], outs[1])
    if top_k is None:
        assert not torch.equal(outs[0][0], outs[0][1])  # sampled: the rows differ


def test_a_full_window_restarts_at_half_the_block():
    # Greedy decoding is a function of the window alone: after the prompt fills the block (8), the next token
    # is predicted from the last 4 tokens, as a fresh start from those 4 would predict it.
    model = model_of("spiking")
    prompt = torch.randint(0, 16, (1, 8))
    out = model.generate(prompt, 2, top_k=1)
    restart = model.generate(out[:, 5 : 8 + 1], 1, top_k=1)
    assert torch.equal(out[:, -1], restart[:, -1])


def test_sampled_tokens_are_plain_tensors_that_training_can_take():
    # Sampling runs the model under inference_mode; what it yields must still feed a training step (an
    # inference tensor cannot be saved for backward, as the embedding's indices are).
    model = model_of("softmax").train()
    tokens = model.generate(torch.zeros(1, 1, dtype=torch.long), 6, top_k=1)  # (1, 7)
    assert not tokens.is_inference()
    _, loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    assert model.transformer.wte.weight.grad is not None


@pytest.mark.parametrize("bias", [True, False])
def test_the_baseline_step_is_the_forward_bit_for_bit(bias):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS["softmax"], bias=bias, dropout=0.1)).eval()  # dropout: off in eval, as in the step
    idx = torch.randint(0, 16, (3, 8))  # (B, block_size)
    forward_cache, step_cache = (KVCache(model.config.n_layer, model.config.block_size) for _ in range(2))
    step = BaselineStep(model)
    with torch.inference_mode():
        for cache in (forward_cache, step_cache):
            model(idx[:, :3], cache=cache)
        for t in range(3, 8):
            forward, _ = model(idx[:, [t]], cache=forward_cache)  # (B, 1, V)
            assert torch.equal(step(idx[:, [t]], step_cache), forward)
        assert step_cache.length == 8
        assert all(
            torch.equal(a, b)
            for a, b in zip(forward_cache.k + forward_cache.v, step_cache.k + step_cache.v, strict=True)
        )
        with pytest.raises(ValueError, match="cannot forward a sequence of length 9, block_size is 8"):
            step(idx[:, :1], step_cache)


def test_only_the_baseline_in_eval_takes_the_step():
    assert [v for v in VARIANTS if BaselineStep.applies(model_of(v))] == ["softmax"]
    assert not BaselineStep.applies(model_of("softmax").train())  # its dropout would be skipped
    with pytest.raises(ValueError, match=r"needs the softmax \+ GELU model \(no LIF site\) in eval mode"):
        BaselineStep(model_of("spiking"))


@pytest.mark.parametrize("variant", ["softmax", "spiking"])
def test_sampling_takes_the_step_for_each_cached_position_of_the_baseline(variant, monkeypatch):
    steps = []

    class Counted(BaselineStep):
        def __call__(self, idx, cache):
            steps.append(idx.shape)
            return super().__call__(idx, cache)

    monkeypatch.setattr(model_module, "BaselineStep", Counted)
    model_of(variant).generate(torch.randint(0, 16, (2, 5)), 10)
    # 10 tokens after 5: the 1st, 5th and 10th from prefills (the prompt; restarts at 4 tokens of block 8)
    assert steps == ([(2, 1)] * 7 if variant == "softmax" else [])
