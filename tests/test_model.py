"""Tests of the GPT model: causality, parameter parity, firing rates, the rate regulariser, S-dim placement."""

import itertools
import math
import re
from dataclasses import asdict

import pytest
import torch
from conftest import first_max, tiny

from spiking_lm.config import ModelConfig, NeuronConfig
from spiking_lm.firing import FiringCounts
from spiking_lm.model import GPT, CausalSelfAttention

VARIANTS = [
    dict(attention=a, mlp_activation=m, spiking_qkv=q)
    for a, m, q in itertools.product(("softmax", "spiking"), ("gelu", "lif"), (False, True))
]
# The other spiking-attention designs of the ablation, each with LIF MLP.
ATTENTION_DESIGNS = [
    dict(attention="spiking", mlp_activation="lif", spiking_qkv=False, attn_centering=c, attn_readout=r)
    for c, r in (("none", "step"), ("row_max", "step"), ("none", "cumulative"))  # the default is row_max + cumulative
]
# Spike-driven inputs (tests/test_spike_driven.py), each alone and all three, on the spiking default.
SPIKE_DRIVEN_INPUTS = ("spiking_qkv_in", "spiking_proj_in", "spiking_fc_in")
SPIKE_DRIVEN = [
    dict(attention="spiking", mlp_activation="lif", spiking_qkv=False, **{o: True for o in options})
    for options in [(o,) for o in SPIKE_DRIVEN_INPUTS] + [SPIKE_DRIVEN_INPUTS]
]


def variant_id(v):
    extra = [v[k] for k in ("attn_centering", "attn_readout") if k in v] + [k for k in SPIKE_DRIVEN_INPUTS if k in v]
    return "-".join([v["attention"], v["mlp_activation"], *(["qkv"] if v["spiking_qkv"] else []), *extra])


@pytest.mark.parametrize("variant", VARIANTS + ATTENTION_DESIGNS + SPIKE_DRIVEN, ids=variant_id)
def test_causal(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**variant)).eval()
    idx = torch.randint(0, 16, (3, 8))
    j = 4
    changed = idx.clone()
    changed[:, j] = (idx[:, j] + 1) % 16
    firing = FiringCounts()
    with torch.no_grad():
        logits, _ = model(idx, firing=firing)
        logits_changed, _ = model(changed)
    rates = firing.rates()
    assert all(rate > 0 for rate in rates.values()), rates  # otherwise the spiking paths are not exercised
    assert torch.equal(logits[:, :j], logits_changed[:, :j])
    assert not torch.equal(logits[:, j:], logits_changed[:, j:])


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=variant_id)
def test_parameter_parity(variant):
    base = GPT(ModelConfig(vocab_size=65, attention="softmax", mlp_activation="gelu"))
    cfg = ModelConfig(vocab_size=65, **variant)
    model = GPT(cfg)
    # Default neurons learn thresholds, not decays: per head on scores, per channel elsewhere.
    per_layer = (
        (cfg.n_head if cfg.attention == "spiking" else 0)
        + (4 * cfg.n_embd if cfg.mlp_activation == "lif" else 0)
        + (3 * cfg.n_embd if cfg.spiking_qkv else 0)
    )
    assert model.num_params() - base.num_params() == cfg.n_layer * per_layer
    assert abs(model.num_params() / base.num_params() - 1) < 0.01


def test_baseline_has_no_rates():
    model = GPT(tiny(attention="softmax", mlp_activation="gelu"))
    firing = FiringCounts(rate_grad=True)
    model(torch.randint(0, 16, (2, 8)), firing=firing)
    assert firing.rates() == {}
    assert firing.mean_rate() is None
    assert firing.penalty(0.1).item() == 0.0


def test_rates_keys_range_and_a_forward_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = GPT(tiny(spiking_qkv=True)).train()
    before = {name: dict(vars(module)) for name, module in model.named_modules()}
    firing = FiringCounts(rate_grad=True)
    _, loss = model(torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8)), firing=firing)
    (loss + firing.penalty(0.1)).backward()
    rates = firing.rates()
    assert list(rates) == [f"layer{i}.{kind}" for i in range(2) for kind in ("qkv", "attn", "mlp")]
    for rate in rates.values():
        assert rate.dim() == 0 and 0 < rate.item() <= 1
    mean = firing.mean_rate()
    assert set(mean) == {"neuron_weighted", "layer_mean"}
    assert torch.allclose(mean["layer_mean"], torch.stack(list(rates.values())).mean())
    # The counts come back in the collector only: no module gained, lost or rebound an attribute.
    after = {name: dict(vars(module)) for name, module in model.named_modules()}
    assert after.keys() == before.keys()
    for name, attributes in before.items():
        assert after[name].keys() == attributes.keys(), name
        changed = [key for key, value in attributes.items() if after[name][key] is not value]
        assert not changed, (name, changed)


def constant_attention_model(refractory: int, attn_norm: str = "count") -> GPT:
    """One layer whose queries and keys are all ones, so every causal score is sqrt(hs) = 2, far above threshold.

    Raw scores and per-step weights, so each step's weights are that step's spikes."""
    model = GPT(
        tiny(
            n_layer=1,
            n_head=2,
            n_embd=8,
            attn_norm=attn_norm,
            mlp_activation="gelu",
            attn_centering="none",
            attn_readout="step",
            attn_neuron=NeuronConfig(threshold=0.01, refractory=refractory),
        )
    )
    c_attn = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        c_attn.weight[:16].zero_()
        c_attn.bias[:16].fill_(1.0)
    return model


@pytest.mark.parametrize("refractory, expected", [(0, 1.0), (1, 2 / 3)])
def test_attention_rate_counts_causal_entries_only(refractory, expected):
    # S = 3: without a refractory period every causal neuron fires at every step; with
    # one step it fires at steps 0 and 2, the refractory step still counting as a step.
    model = constant_attention_model(refractory)
    B, L, S, nh = 2, 8, 3, 2
    firing = FiringCounts()
    model(torch.randint(0, 16, (B, L)), firing=firing)
    site = firing.sites["layer0.attn"]
    assert site.neuron_steps == S * B * nh * L * (L + 1) // 2
    assert site.spikes.item() == round(expected * site.neuron_steps)
    assert firing.rates()["layer0.attn"].item() == pytest.approx(expected)


@pytest.mark.parametrize("attn_norm", ["count", "length"])
def test_all_firing_attention_is_causal_mean(attn_norm):
    # When every causal pair fires, both normalisations divide row i by i + 1.
    torch.manual_seed(0)
    attn = constant_attention_model(0, attn_norm).transformer.h[0].attn
    x = torch.randn(1, 2, 8, 8)  # (1, B, L, C)
    v = attn.c_attn(x)[..., 16:].unflatten(-1, (2, 4)).transpose(-3, -2)  # (1, B, nh, L, hs)
    mean = v.cumsum(-2) / torch.arange(1, 9).view(8, 1)
    expected = attn.c_proj(mean.transpose(-3, -2).flatten(-2)).expand(3, -1, -1, -1)  # (S, B, L, C)
    assert torch.allclose(attn(x), expected, atol=1e-6)


def test_rate_penalty_gradient_raises_rate():
    torch.manual_seed(0)
    model = GPT(tiny(spiking_qkv=True)).train()
    idx = torch.randint(0, 16, (4, 8))
    with pytest.raises(ValueError, match=re.escape("FiringCounts(rate_grad=True)")):
        firing = FiringCounts()
        model(idx, firing=firing)
        firing.penalty(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rates = []
    for _ in range(5):
        firing = FiringCounts(rate_grad=True)
        model(idx, firing=firing)
        rates.append(firing.mean_rate()["layer_mean"].item())
        penalty = firing.penalty(0.5)
        assert penalty.item() == pytest.approx(sum((r.item() - 0.5) ** 2 for r in firing.rates().values()))
        opt.zero_grad()
        penalty.backward()
        assert model.transformer.h[0].mlp.neuron.lif.threshold.grad.abs().sum() > 0
        opt.step()
    assert rates[-1] > rates[0] + 0.05, rates


def record_shapes(model: GPT, names: list[str]) -> dict[str, list]:
    """Leading dim of each named module's input, per call."""
    seen = {name: [] for name in names}
    modules = dict(model.named_modules())
    for name in names:
        modules[name].register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].shape))
    return seen


@pytest.mark.parametrize(
    "variant, first_site",
    [
        (dict(attention="softmax", mlp_activation="gelu"), None),
        (dict(attention="softmax", mlp_activation="lif"), "transformer.h.0.mlp.neuron"),
        (dict(attention="spiking", mlp_activation="gelu"), "transformer.h.0.attn.neuron"),
        (dict(attention="softmax", mlp_activation="gelu", spiking_qkv=True), "transformer.h.0.attn.qkv_neuron"),
    ],
    ids=["baseline", "lif-mlp", "spiking-attn", "spiking-qkv"],
)
def test_pre_first_site_runs_once(variant, first_site):
    model = GPT(tiny(**variant))
    order = [
        "transformer.wte",
        "transformer.h.0.ln_1",
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.ln_2",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.ln_1",
        "transformer.ln_f",
    ]
    seen = record_shapes(model, order)
    lif_inputs = []
    if first_site:
        lif = dict(model.named_modules())[first_site].lif
        lif.register_forward_pre_hook(lambda m, args: lif_inputs.append(args[0]))
    model(torch.randint(0, 16, (2, 8)))
    assert all(len(calls) == 1 for calls in seen.values())
    assert seen["transformer.wte"][0] == (2, 8)
    assert seen["transformer.ln_f"][0] == (2, 8, 16)  # averaged over S
    leading = [seen[name][0][0] for name in order[1:-1]]
    # 1 up to and including the first site's input, S = 3 after it.
    cut = {
        None: 5,
        "transformer.h.0.mlp.neuron": 4,
        "transformer.h.0.attn.neuron": 2,
        "transformer.h.0.attn.qkv_neuron": 2,
    }[first_site]
    assert leading == [1] * cut + [3] * (5 - cut)
    if first_site:
        (x,) = lif_inputs
        assert x.shape[0] == 3 and x.stride(0) == 0  # broadcast over S, not copied


def test_invalid_configs():
    with pytest.raises(ValueError, match="timesteps"):
        ModelConfig(timesteps=0)
    with pytest.raises(ValueError, match="n_embd"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="linear")
    # Neuron settings are checked by the model config, whose errors name the site; a checkpoint's come as dicts.
    with pytest.raises(ValueError, match=re.escape("attn_neuron: beta must be in (0, 1], got 1.5")):
        ModelConfig(attn_neuron=NeuronConfig(beta=1.5))
    with pytest.raises(ValueError, match=re.escape("qkv_neuron: threshold must be finite and > 0, got 0.0")):
        ModelConfig(qkv_neuron=NeuronConfig(threshold=0.0))
    with pytest.raises(ValueError, match="mlp_neuron: refractory must be a non-negative integer"):
        ModelConfig(mlp_neuron={"refractory": -1})
    with pytest.raises(ValueError, match="mlp_neuron: surrogate must be one of"):
        ModelConfig(mlp_neuron={"surrogate": "relu"})
    with pytest.raises(TypeError, match="qkv_neuron: .*unexpected keyword argument 'betta'"):
        ModelConfig(qkv_neuron={"betta": 0.5})
    with pytest.raises(TypeError, match="attn_neuron must be a NeuronConfig, got int"):
        ModelConfig(attn_neuron=3)
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(ModelConfig())
    with pytest.raises(ValueError, match="block_size"):
        GPT(tiny())(torch.zeros(1, 9, dtype=torch.long))


def test_config_round_trips_through_asdict():
    cfg = tiny(spiking_qkv=True)
    assert ModelConfig(**asdict(cfg)) == cfg


@pytest.mark.parametrize(
    "variant",
    [dict(attention="softmax", mlp_activation="gelu"), dict(spiking_qkv=True), dict()],
    ids=["baseline", "spiking-qkv", "spiking"],
)
def test_trains(variant):
    torch.manual_seed(0)
    model = GPT(tiny(block_size=16, n_embd=32, **variant))
    data = torch.randint(0, 16, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_generate_crops_context():
    # block_size 8: a window that would overflow restarts at its last 4 tokens (GPT.sample), so greedy token n
    # is the model's prediction from tokens [start, n) with start 0 up to token 8, then 5 (8 - 4 + 1).
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    out = model.generate(torch.randint(0, 16, (2, 6)), max_new_tokens=5, top_k=1, use_cache=False)
    assert out.shape == (2, 11) and out.dtype == torch.long
    with torch.no_grad():
        for n, start in ((6, 0), (7, 0), (8, 0), (9, 5), (10, 5)):
            logits, _ = model(out[:, start:n])
            assert torch.equal(out[:, n], logits[:, -1].argmax(-1)), n


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # masked scores' surrogate underflows to 0
def test_triton_backend_matches_torch(monkeypatch):
    # Spiking Q and K tie the row max of the scores; the fused attention gives its gradient to the first tied
    # key, where torch.amax splits it (both valid subgradients): the reference here takes the first too.
    monkeypatch.setattr(torch.Tensor, "amax", first_max)
    torch.manual_seed(0)
    neuron = dict(learn_beta=True)
    kw = dict(
        n_layer=1,
        spiking_qkv=True,
        attn_neuron=NeuronConfig(threshold=0.02, **neuron),
        qkv_neuron=NeuronConfig(threshold=0.05, **neuron),
        mlp_neuron=NeuronConfig(threshold=0.1, **neuron),
    )
    ref = GPT(tiny(backend="torch", **kw))
    tri = GPT(tiny(backend="triton", **kw))
    tri.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 16, (2, 8))
    results = []
    for model in (ref, tri):
        firing = FiringCounts()
        logits, loss = model(idx, idx, firing=firing)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results.append((logits, firing.rates(), grads))
    (logits_ref, rates_ref, grads_ref), (logits_tri, rates_tri, grads_tri) = results
    assert all(0 < r < 1 for r in rates_ref.values())
    assert rates_ref == rates_tri
    torch.testing.assert_close(logits_tri, logits_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_tri[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert math.isfinite(sum(g.abs().sum().item() for g in grads_tri.values()))


@pytest.mark.parametrize("mlp", ["gelu", "lif"])
def test_no_attention_sees_only_its_own_token(mlp):
    torch.manual_seed(0)
    model = GPT(tiny(attention="none", mlp_activation=mlp)).eval()
    assert not any(isinstance(m, CausalSelfAttention) for m in model.modules())
    idx = torch.randint(0, 16, (2, 8))
    changed = idx.clone()
    changed[:, 4] = (idx[:, 4] + 1) % 16
    firing = FiringCounts()
    with torch.no_grad():
        logits, changed_logits = model(idx, firing=firing)[0], model(changed)[0]
    same = (logits == changed_logits).flatten(2).all(-1)  # (B, L)
    assert same[:, :4].all() and same[:, 5:].all() and not same[:, 4].any()
    assert set(firing.rates()) == ({"layer0.mlp", "layer1.mlp"} if mlp == "lif" else set())


def test_row_max_fires_every_row_on_its_first_step():
    torch.manual_seed(0)
    model = GPT(tiny(attn_centering="row_max", attn_neuron=NeuronConfig(threshold=5.0))).eval()
    attn = model.transformer.h[0].attn
    seen = []
    attn.neuron.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(torch.randint(0, 16, (2, 8)))
    first_step = seen[0][0]  # (B, nh, L, L)
    assert (first_step.sum(-1) >= 1).all()  # the best key of every row fires at once
    assert not first_step.triu(1).any()  # and nothing in the future does


def test_cumulative_readout_weights_are_spike_counts_so_far():
    torch.manual_seed(0)
    cfg = tiny(attn_readout="cumulative", n_layer=1, mlp_activation="gelu")
    model = GPT(cfg).eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 2, 8, cfg.n_embd)
    seen = []
    attn.neuron.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        q, k, v = (t.unflatten(-1, (2, 8)).transpose(-3, -2) for t in attn.c_attn(x).split(16, -1))  # (1, B, nh, L, hs)
        y = attn._spiking_attention(q, k, v)[0]
    spikes = seen[0]  # (S, B, nh, L, L)
    weights = spikes.cumsum(0)
    torch.testing.assert_close(y, weights @ v / weights.sum(-1, keepdim=True).clamp_min(1))
