"""Operation counts and neuron health against hand counts on one-layer models whose spikes are known exactly."""

import pytest
import torch

from spiking_lm.config import ModelConfig, NeuronConfig
from spiking_lm.eval.energy import E_AC_PJ, E_MAC_PJ, OpCounter, count_dense, preset_ratios
from spiking_lm.eval.health import max_spikes, overall, site_health, spike_trains
from spiking_lm.firing import FiringCounts
from spiking_lm.model import GPT

B, L, C, NH, HS, S, V = 2, 4, 8, 2, 4, 3, 16
PAIRS = L * (L + 1) // 2  # causal (query, key) pairs per head
TOKENS = B * L
# With S = 3 and a refractory step, a neuron driven far above threshold fires at steps 0 and 2.
FIRES = 2
ON, OFF = 10.0, -10.0


def one_layer(**overrides) -> GPT:
    neuron = NeuronConfig(refractory=1)
    # Raw scores and per-step spike weights, whatever the defaults: the hand counts below assume them.
    settings = dict(
        vocab_size=V,
        block_size=L,
        n_layer=1,
        n_head=NH,
        n_embd=C,
        timesteps=S,
        backend="torch",
        attn_neuron=NeuronConfig(threshold=0.01, refractory=1),
        qkv_neuron=neuron,
        mlp_neuron=neuron,
        attn_centering="none",
        attn_readout="step",
    )
    return GPT(ModelConfig(**{**settings, **overrides})).eval()


def set_bias_only(linear: torch.nn.Linear, bias: torch.Tensor) -> None:
    """The layer's output becomes ``bias`` whatever its input."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(bias)


def head_pattern(active: list[int]) -> torch.Tensor:
    """ON on the ``active`` channels of every head, OFF elsewhere: (C,)."""
    per_head = torch.full((HS,), OFF)
    per_head[active] = ON
    return per_head.repeat(NH)


def count(model: GPT, seed: int = 0) -> tuple[OpCounter, dict]:
    """The op counts and the neuron health of one forward of a (B, L) batch."""
    torch.manual_seed(seed)
    firing = FiringCounts(per_neuron=True, products=True)
    with torch.no_grad(), OpCounter(model, firing) as ops:
        model(torch.randint(0, V, (B, L)), firing=firing)
    return ops, site_health(model, firing)


def constant_scores(model: GPT) -> None:
    """Q = K = ones: every causal score is hs / (sqrt(hs) * 0.01) = 200, far above threshold; V stays real."""
    c_attn = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        c_attn.weight[: 2 * C].zero_()
        c_attn.bias[: 2 * C].fill_(1.0)


def test_spiking_attention_and_mlp_match_the_hand_count():
    model = one_layer()
    block = model.transformer.h[0]
    constant_scores(model)
    active = 5  # MLP channels driven far above threshold; the other 4C - 5 never fire
    set_bias_only(block.mlp.c_fc, torch.tensor([ON] * active + [OFF] * (4 * C - active)))
    ops, health = count(model)

    expected = {
        "layer0.attn.c_attn": [B * L * C * 3 * C, 0],  # before the first LIF site: once
        "layer0.attn.qk": [B * NH * PAIRS * HS, 0],  # real Q, K, once
        "layer0.attn.av": [0, B * NH * PAIRS * FIRES * HS],  # every causal pair fires twice; x head size
        "layer0.attn.c_proj": [S * B * L * C * C, 0],  # after the site: S copies
        "layer0.mlp.c_fc": [S * B * L * C * 4 * C, 0],
        "layer0.mlp.c_proj": [0, B * L * active * FIRES * C],  # spikes x fan-out
        "lm_head": [B * L * C * V, 0],  # after the average over S: once
    }
    assert ops.ops == expected
    assert ops.tokens == TOKENS
    macs = sum(m for m, _ in expected.values())
    acs = sum(a for _, a in expected.values())
    report = ops.report()
    assert report["mac_per_token"] == macs / TOKENS and report["ac_per_token"] == acs / TOKENS
    assert report["pj_per_token"] == pytest.approx((macs * E_MAC_PJ + acs * E_AC_PJ) / TOKENS)
    assert ops.report(e_mac=1.0, e_ac=0.0)["pj_per_token"] == pytest.approx(macs / TOKENS)

    # The same spikes, read as neuron health: MLP channels are dead or saturated; every attention head saturated.
    assert health["layer0.mlp"] == {
        "neurons": 4 * C,
        "dead_frac": (4 * C - active) / (4 * C),
        "saturated_frac": active / (4 * C),
        "max_spikes_per_token": FIRES,
    }
    assert health["layer0.attn"] == {"neurons": NH, "dead_frac": 0, "saturated_frac": 1, "max_spikes_per_token": FIRES}
    assert overall(health)["dead_frac"] == pytest.approx((4 * C - active) / (4 * C + NH))


@pytest.mark.parametrize("attention", ["spiking", "softmax"])
def test_spiking_qkv_counts_coinciding_spikes(attention):
    model = one_layer(attention=attention, mlp_activation="gelu", spiking_qkv=True)
    q_on, k_on, v_on = [0, 1], [1, 2], [0, 1, 2]  # per head: Q and K share one channel, V has three
    set_bias_only(
        model.transformer.h[0].attn.c_attn, torch.cat([head_pattern(q_on), head_pattern(k_on), head_pattern(v_on)])
    )
    ops, _ = count(model)
    # Q/K/V spike at steps 0 and 2. Spiking attention weights then fire at the same steps on every
    # causal pair; softmax weights are real on every causal pair. Either way each V spike is
    # accumulated once per query that sees its key, at the 2 steps where V spikes.
    assert ops.ops["layer0.attn.qk"] == [0, FIRES * B * NH * PAIRS * len(set(q_on) & set(k_on))]
    assert ops.ops["layer0.attn.av"] == [0, FIRES * B * NH * PAIRS * len(v_on)]
    assert ops.ops["layer0.attn.c_attn"] == [B * L * C * 3 * C, 0]
    assert ops.ops["layer0.mlp.c_proj"] == [S * B * L * 4 * C * C, 0]  # GELU output is real


def test_spike_count_weights_count_n_acs_for_a_weight_n():
    # The cumulative readout weights V by the spikes so far: 1, 1, 2 over the three steps, 4 additions of
    # each V row per causal pair, against 2 under the per-step readout.
    model = one_layer(mlp_activation="gelu", attn_readout="cumulative")
    constant_scores(model)
    ops, _ = count(model)
    assert ops.ops["layer0.attn.av"] == [0, (1 + 1 + 2) * B * NH * PAIRS * HS]


def test_spike_count_weights_times_spiking_v():
    model = one_layer(mlp_activation="gelu", attn_readout="cumulative", spiking_qkv=True)
    v_on = [0, 1, 2]
    set_bias_only(
        model.transformer.h[0].attn.c_attn, torch.cat([head_pattern([1]), head_pattern([1]), head_pattern(v_on)])
    )
    ops, _ = count(model)
    # Q, K, V and the weights all fire at steps 0 and 2: weights 1, 1, 2 meet V spikes at steps 0 and 2 only.
    assert ops.ops["layer0.attn.av"] == [0, (1 + 2) * B * NH * PAIRS * len(v_on)]


def test_spike_driven_linears_count_one_ac_per_spike_and_output():
    model = one_layer(spiking_qkv_in=True, spiking_proj_in=True, spiking_fc_in=True)
    block = model.transformer.h[0]
    a, b, c, d = 3, 2, 5, 7  # channels driven far above threshold at qkv_in, proj_in, fc_in and the MLP's LIF
    for ln, active in ((block.ln_1, a), (block.ln_2, c)):  # LayerNorm output = its bias when its gain is 0
        set_bias_only(ln, torch.tensor([ON] * active + [OFF] * (C - active)))
    # Q = K = ones (every causal score far above threshold) and V = ON on b channels; attention fires on
    # every causal pair at steps 0 and 2, so the heads' output is V's pattern there and 0 at step 1.
    set_bias_only(block.attn.c_attn, torch.cat([torch.ones(2 * C), torch.tensor([ON] * b + [OFF] * (C - b))]))
    set_bias_only(block.mlp.c_fc, torch.tensor([ON] * d + [OFF] * (4 * C - d)))
    ops, health = count(model)
    expected = {
        "layer0.attn.c_attn": [0, B * L * a * FIRES * 3 * C],  # spikes x fan-out
        "layer0.attn.qk": [S * B * NH * PAIRS * HS, 0],  # real Q, K, now on S copies
        "layer0.attn.av": [0, B * NH * PAIRS * FIRES * HS],
        "layer0.attn.c_proj": [0, B * L * b * FIRES * C],
        "layer0.mlp.c_fc": [0, B * L * c * FIRES * 4 * C],
        "layer0.mlp.c_proj": [0, B * L * d * FIRES * C],
        "lm_head": [B * L * C * V, 0],  # the readout stays real, after the average over S
    }
    assert ops.ops == expected
    for site, active, width in (("qkv_in", a, C), ("proj_in", b, C), ("fc_in", c, C), ("mlp", d, 4 * C)):
        assert health[f"layer0.{site}"]["saturated_frac"] == active / width
        assert health[f"layer0.{site}"]["dead_frac"] == (width - active) / width


def test_dense_counterpart_is_all_macs_and_matches_the_baseline():
    per_token = 3 * C * C + 2 * NH * HS * (L + 1) / 2 + C * C + 2 * 4 * C * C + C * V
    dense = count_dense(one_layer(spiking_qkv_in=True, spiking_proj_in=True, spiking_fc_in=True).config, L)
    assert dense["ac_per_token"] == 0 and dense["mac_per_token"] == per_token
    assert dense["pj_per_token"] == pytest.approx(per_token * E_MAC_PJ)
    baseline_ops, _ = count(one_layer(attention="softmax", mlp_activation="gelu"))
    assert baseline_ops.report() == dense


@pytest.mark.parametrize("timesteps, refractory, limit", [(4, 1, 2), (3, 1, 2), (4, 0, 4), (5, 2, 2), (1, 3, 1)])
def test_max_spikes_per_presentation(timesteps, refractory, limit):
    assert max_spikes(timesteps, refractory) == limit


def test_spike_trains_put_each_token_steps_in_a_row():
    model = one_layer()
    set_bias_only(model.transformer.h[0].mlp.c_fc, torch.tensor([ON] + [OFF] * (4 * C - 1)))
    trains = spike_trains(model, torch.zeros(1, L, dtype=torch.long))
    spikes, present = trains["layer0.mlp"]
    assert spikes.shape == present.shape == (4 * C, L * S)
    assert spikes[0].tolist() == [1.0, 0.0, 1.0] * L and spikes[1:].sum() == 0
    attn_spikes, attn_present = trains["layer0.attn"]
    assert attn_spikes.shape == (NH * L, L * S)
    # Offset d exists from query d on: the d-th offset neuron of head 0 is absent for the first d tokens.
    assert attn_present[:L].sum(1).tolist() == [(L - d) * S for d in range(L)]


def test_counters_detach_and_need_the_products():
    model = one_layer()
    with OpCounter(model) as counter:
        model(torch.zeros(1, L, dtype=torch.long))
    counted = (counter.tokens, {name: list(ops) for name, ops in counter.linear.items()})
    model(torch.zeros(1, L, dtype=torch.long))  # after the counter: nothing is counted
    assert (counter.tokens, counter.linear) == counted and counter.tokens == L
    with pytest.raises(RuntimeError, match="no forward"):
        OpCounter(model).report()
    with pytest.raises(RuntimeError, match="pass firing=counter.firing"):
        counter.report()
    with pytest.raises(ValueError, match="products=True"):
        OpCounter(model, FiringCounts())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # masked scores' surrogate underflows
@pytest.mark.parametrize(
    "settings",
    [
        dict(),  # the layout the kernels build: row_max centring, cumulative readout, count norm
        dict(spiking_qkv=True, qkv_neuron=NeuronConfig(threshold=0.05)),  # spike-count weights times V spikes
    ],
    ids=["default", "spiking-qkv"],
)
def test_fused_attention_counts_as_the_reference(settings):
    """Energy and health of the fused attention (triton; under the interpreter on CPU) equal the reference's."""
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = GPT(
            ModelConfig(
                vocab_size=V,
                block_size=L,
                n_layer=1,
                n_head=NH,
                n_embd=C,
                timesteps=S,
                backend=backend,
                attn_neuron=NeuronConfig(threshold=0.05),
                **settings,
            )
        ).eval()
        results.append(count(model))
    (ops, health), (fused_ops, fused_health) = results
    assert fused_ops.ops == ops.ops and fused_ops.reads == ops.reads and fused_health == health
    assert 0 < ops.ops["layer0.attn.av"][1] < B * NH * PAIRS * (1 + 2 + 3) * HS  # the weights are data, not all on


def test_signed_and_graded_sites_count_one_ac_per_unit_spike_and_their_bits():
    """Graded (max 3) at qkv_in with an amplitude, signed at fc_in: OFF channels fire too, negatively."""
    graded = NeuronConfig(refractory=1, code="graded", max_count=3, amplitude=True)
    signed = NeuronConfig(refractory=1, code="signed")
    model = one_layer(spiking_qkv_in=True, spiking_fc_in=True, qkv_in_neuron=graded, fc_in_neuron=signed)
    block = model.transformer.h[0]
    for ln, active in ((block.ln_1, 3), (block.ln_2, 5)):
        set_bias_only(ln, torch.tensor([ON] * active + [OFF] * (C - active)))
    with torch.no_grad():
        block.attn.qkv_in_neuron.amplitude.fill_(0.5)  # folded into the weights: no count changes
    ops, health = count(model)
    # graded: h = +-10 gives |n| = 3 at steps 0 and 2 on every channel (step 1 is refractory)
    assert ops.ops["layer0.attn.c_attn"] == [0, B * L * C * FIRES * 3 * 3 * C]
    # signed: +-1 at steps 0 and 2 on every channel
    assert ops.ops["layer0.mlp.c_fc"] == [0, B * L * C * FIRES * 4 * C]
    # reads: [weights, real values, spike bits]; every channel fired, so every weight row is fetched once per
    # token; the spikes are 3 bits (7 levels) and 2 bits (3 levels) per neuron-step
    assert ops.reads["layer0.attn.c_attn"] == [B * L * C * 3 * C, 0, S * B * L * C * 3]
    assert ops.reads["layer0.mlp.c_fc"] == [B * L * C * 4 * C, 0, S * B * L * C * 2]
    assert ops.reads["lm_head"] == [B * L * C * V, B * L * C, 0]  # real input, after the average over S
    assert health["layer0.qkv_in"]["max_spikes_per_token"] == 2 * 3
    assert health["layer0.qkv_in"]["saturated_frac"] == 1.0 and health["layer0.fc_in"]["dead_frac"] == 0.0

    report = ops.report(1.0, 0.5, pj_per_byte=2.0, bytes_per_value=1)
    layer = report["layers"]["layer0.attn.c_attn"]
    assert layer["bytes"] == (3 * C * C + S * C * 3 / 8)
    assert layer["pj"] == 0.5 * FIRES * 9 * C * C + 2.0 * layer["bytes"]
    assert report["memory_pj_per_token"] == pytest.approx(2.0 * report["bytes_per_token"])


def test_presets_price_the_same_counts_under_each_format():
    model = one_layer(spiking_qkv_in=True, spiking_proj_in=True, spiking_fc_in=True)
    ops, _ = count(model)
    ratios = preset_ratios(ops, model.config, L)
    dense = count_dense(model.config, L)
    assert set(ratios) == {"fp32", "fp16", "int8"}
    for name, (e_mac, e_ac) in {"fp32": (4.6, 0.9), "fp16": (1.5, 0.4), "int8": (0.23, 0.03)}.items():
        mine = ops.report(e_mac, e_ac)["pj_per_token"]
        base = dense["mac_per_token"] * e_mac
        assert ratios[name]["ratio_vs_dense"] == pytest.approx(mine / base)
        assert ratios[name]["dense_pj_per_token"] == pytest.approx(base)
    # An AC is 5.1x cheaper than a MAC at fp32 but 7.7x at int8, so the same counts give a lower ratio at int8
    assert ratios["int8"]["ratio_vs_dense"] < ratios["fp32"]["ratio_vs_dense"]
    with_memory = preset_ratios(ops, model.config, L, pj_per_byte=10.0)["int8"]
    assert with_memory["compute_ratio_vs_dense"] == pytest.approx(ratios["int8"]["ratio_vs_dense"])
    memory = with_memory["memory_pj_per_token"]
    assert with_memory["pj_per_token"] == pytest.approx(ratios["int8"]["pj_per_token"] + memory)
    with pytest.raises(ValueError, match="pJ per byte must be finite and >= 0"):
        ops.report(pj_per_byte=-1.0)
