"""The fused spiking attention kernels against the PyTorch reference: outputs, spikes, counts, gradients, memory.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), on small fp32 shapes.
Random inputs: outputs within 1e-5 relative, gradients of q, k, v, the per-head threshold and the decay within
1e-4 of the largest entry (they are sums over pairs and steps taken in another order). Dyadic inputs, where
every fp32 operation is exact: outputs bit for bit, which with V the identity are the spikes themselves.
"""

import functools
import json
import os

import pytest
import torch
from conftest import DEVICES
from torch.utils._python_dispatch import TorchDispatchMode

import spiking_lm.kernels.spiking_attention as fused_module
from spiking_lm.config import ModelConfig, NeuronConfig
from spiking_lm.eval import bench_attention
from spiking_lm.eval.energy import OpCounter
from spiking_lm.kernels.spiking_attention import spiking_attention_triton
from spiking_lm.lif_reference import DEFAULT_ALPHA, lif_reference
from spiking_lm.model import GPT
from spiking_lm.spiking_attention_reference import spiking_attention_reference

DEVICE = [d for d in DEVICES if d == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"]
pytestmark = pytest.mark.skipif(not DEVICE, reason="the kernels need CUDA or TRITON_INTERPRET=1")
NEURON = dict(refractory=1, reset="subtract", surrogate="atan", detach_reset=True)
LAYOUT = dict(centering="row_max", readout="cumulative", norm="count")


def inputs(S_qk, L, hs, B=2, nh=2, seed=0, dyadic=False):
    """q, k, v (S', B, nh, L, hs) and a (nh,) threshold; dyadic q and k are multiples of 1/4."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(S_qk, B, nh, L, hs, generator=gen) for _ in range(3))
    if dyadic:  # with sqrt(hs) * threshold a power of 2 every score, centring and membrane is exact
        q, k = ((t * 4).round() / 4 for t in (q, k))
        return q, k, v, torch.full((nh,), 4.0 / hs**0.5)
    return q, k, v, torch.rand(nh, generator=gen) + 0.2


def both(q, k, v, threshold, S, beta=0.5, centering="row_max", readout="cumulative", norm="count", alpha=None,
         **neuron):
    """Forward and backward of fused and reference on fresh leaves; (y, count, grads) each, and the weights.

    The loss weighs the count too, as the firing-rate regulariser does, so its gradient is checked as well.
    """
    neuron = {**NEURON, **neuron}
    alpha = DEFAULT_ALPHA[neuron["surrogate"]] if alpha is None else alpha
    grad_y = torch.randn(S, *q.shape[1:], generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, threshold, torch.tensor(beta))]
        q_, k_, v_, threshold_, beta_ = leaves
        if fused:
            y, count = spiking_attention_triton(q_, k_, v_, threshold_, beta_, S, alpha=alpha, centering=centering,
                                                readout=readout, norm=norm, **neuron)
            weights = None
        else:
            lif = functools.partial(lif_reference, beta=beta_, threshold=1.0, alpha=alpha, **neuron)
            y, count, weights = spiking_attention_reference(q_, k_, v_, threshold_, lif, S, centering, readout, norm)
        ((y * grad_y).sum() + 0.1 * count).backward()
        results.append((y.detach(), count.item(), [t.grad for t in leaves]))
    return results, weights


def assert_matches(q, k, v, threshold, S, **settings):
    ((y, count, grads), (y_ref, count_ref, grads_ref)), _ = both(q, k, v, threshold, S, **settings)
    assert y.shape == y_ref.shape == (S, *q.shape[1:])
    assert count == count_ref
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for name, got, want in zip(("q", "k", "v", "threshold", "beta"), grads, grads_ref, strict=True):
        atol = max(1e-6, 1e-4 * want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=f"grad of {name}")
    return count


@pytest.mark.parametrize("per_step", [False, True], ids=["S'=1", "S'=S"])
@pytest.mark.parametrize("norm", ["count", "length"])
@pytest.mark.parametrize("readout", ["step", "cumulative"])
@pytest.mark.parametrize("centering", ["none", "row_max"])
def test_every_centring_readout_and_norm(centering, readout, norm, per_step):
    S = 2
    count = assert_matches(*inputs(S if per_step else 1, L=5, hs=16), S, centering=centering, readout=readout,
                           norm=norm)
    assert count > 0


@pytest.mark.parametrize("refractory, reset, surrogate, detach_reset", [
    (0, "subtract", "atan", True),
    (1, "zero", "fast_sigmoid", False),
    (2, "subtract", "fast_sigmoid", False),
    (2, "zero", "atan", True),
    (1, "subtract", "atan", False),
])
def test_neuron_settings(refractory, reset, surrogate, detach_reset):
    # S = 4 lets a refractory period of 2 end within the window; beta 0.8 keeps the membrane's history alive.
    assert_matches(*inputs(4, L=16, hs=16), 4, beta=0.8, refractory=refractory, reset=reset, surrogate=surrogate,
                   detach_reset=detach_reset, alpha=3.0 if surrogate == "atan" else None)


@pytest.mark.parametrize("L, hs, S, per_step", [
    (1, 16, 1, False),
    (1, 32, 4, True),
    (5, 32, 2, False),
    (16, 16, 4, False),
    (33, 32, 4, False),  # two blocks of 32: a tile cut by the diagonal and a skipped one
    (33, 16, 2, True),
])
def test_shapes(L, hs, S, per_step):
    assert_matches(*inputs(S if per_step else 1, L=L, hs=hs), S, **LAYOUT)


@pytest.mark.parametrize("per_step", [False, True], ids=["S'=1", "S'=S"])
@pytest.mark.parametrize("readout", ["step", "cumulative"])
@pytest.mark.parametrize("centering", ["none", "row_max"])
def test_spikes_equal_on_dyadic_inputs(centering, readout, per_step):
    # V the identity and the "length" norm make the output the spikes (or their counts) over i + 1.
    S, L = 4, 16
    q, k, _, threshold = inputs(S if per_step else 1, L=L, hs=16, dyadic=True)
    v = torch.eye(L).expand_as(q)
    ((y, count, _), (y_ref, count_ref, _)), weights = both(q, k, v, threshold, S, beta=0.5, centering=centering,
                                                           readout=readout, norm="length", refractory=1)
    assert torch.equal(y, y_ref) and count == count_ref
    assert torch.equal((y * torch.arange(1, L + 1).view(L, 1)).round(), weights.detach())
    assert 0 < weights.count_nonzero() < weights.numel() // 2  # some causal pairs fire, some do not


def test_tied_row_maxima_split_the_gradient_like_amax():
    # Binary q and k, as after spiking Q/K/V, tie the row max on many keys; torch.amax splits its gradient
    # equally between them and so must the kernels.
    q, k, v, threshold = inputs(3, L=16, hs=16, seed=3)
    q, k = ((t > 0).float() for t in (q, k))
    c = q @ k.transpose(-2, -1)
    row_max = c.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), -1).amax(-1, keepdim=True)
    assert ((c == row_max).tril().sum(-1) > 1).float().mean() > 0.3  # ties are common, not a corner case
    assert_matches(q, k, v, threshold, 3, **LAYOUT)


class LargestTensor(TorchDispatchMode):
    """Records the most bytes of any tensor an aten op returns (the interpreter copies arguments as bytes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("per_step", [False, True], ids=["S'=1", "S'=S"])
def test_no_tensor_of_size_l_by_l(per_step):
    S, B, nh, L, hs = 2, 2, 2, 64, 16  # S * hs < L: the output (S, B, nh, L, hs) is below the bound
    q, k, v, threshold = (t.requires_grad_() for t in inputs(S if per_step else 1, L=L, hs=hs, B=B, nh=nh))
    largest = {}
    for name, attend in [
        ("fused", lambda: spiking_attention_triton(q, k, v, threshold, 0.5, S, alpha=2.0, **NEURON, **LAYOUT)[0]),
        ("reference", lambda: spiking_attention_reference(
            q, k, v, threshold, functools.partial(lif_reference, beta=0.5, **NEURON), S, **LAYOUT)[0]),
    ]:
        with LargestTensor() as tracker:
            attend().sum().backward()
        largest[name] = tracker.largest
    fp32_scores = B * nh * L * L * 4  # bytes of one fp32 (B, nh, L, L)
    assert largest["reference"] >= S * fp32_scores  # the tracker sees the unfused path's (S, B, nh, L, L)
    assert largest["fused"] < fp32_scores


def test_bad_shapes_are_refused():
    q, k, v, threshold = inputs(2, L=5, hs=16)
    with pytest.raises(ValueError, match="S' 1 or S = 3"):
        spiking_attention_triton(q, k, v, threshold, 0.5, 3, alpha=2.0, **NEURON, **LAYOUT)
    q, k, v, threshold = inputs(1, L=5, hs=80)
    with pytest.raises(ValueError, match="head sizes up to 64, got 80"):
        spiking_attention_triton(q, k, v, threshold, 0.5, 3, alpha=2.0, **NEURON, **LAYOUT)


def test_compile_variants_cover_the_launches():
    """Each launch's (kernel, constexprs) is among compile_variants(), with a signature naming every argument."""
    variants = fused_module.compile_variants()
    listed = {(v["kernel"].__name__, v["signature"]["q_ptr"], tuple(sorted(v["constexprs"].items())))
              for v in variants}
    assert len(listed) == len(variants)
    for v in variants:
        assert list(v["signature"]) == v["kernel"].arg_names
    for per_step in (False, True):
        for hs in (8, 16, 40, 64):
            HS = max(16, 1 << (hs - 1).bit_length())
            common = dict(HS=HS, BLOCK_M=fused_module.BLOCK_M, BLOCK_N=fused_module.BLOCK_N)
            for dtype in ("fp32", "bf16"):
                for kernel in ("_attn_fwd_kernel", "_attn_bwd_kernel"):
                    assert (kernel, "*" + dtype, tuple(sorted({**common, "PER_STEP": per_step}.items()))) in listed
                assert ("_attn_rowmax_bwd_kernel", "*" + dtype, tuple(sorted(common.items()))) in listed


def model_pair(**overrides):
    settings = dict(vocab_size=16, block_size=12, n_layer=1, n_head=2, n_embd=32, timesteps=3, mlp_activation="gelu",
                    attn_neuron=NeuronConfig(threshold=0.05, learn_beta=True))
    models = [GPT(ModelConfig(**{**settings, **overrides}, backend=b)) for b in ("torch", "triton")]
    models[1].load_state_dict(models[0].state_dict())
    return models


def test_model_trains_through_the_fused_attention_as_through_the_reference():
    idx = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for model in model_pair():
        model.track_rate_grad = True  # the rate regulariser's gradient comes from the kernel's count
        logits, loss = model(idx, idx)
        (loss + model.rate_penalty(0.1)).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results.append((logits, model.firing_rates()["layer0.attn"], grads))
    (logits, rate, grads), (logits_ref, rate_ref, grads_ref) = results[1], results[0]
    assert 0 < rate_ref < 1 and rate == rate_ref
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)


def forbid_fused(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernels ran")

    monkeypatch.setattr(fused_module, "spiking_attention_triton", refuse)


def test_dropout_while_training_and_op_counting_run_the_reference(monkeypatch):
    _, model = model_pair(dropout=0.1)
    idx = torch.zeros(1, 12, dtype=torch.long)
    forbid_fused(monkeypatch)
    model.train()(idx)  # attention dropout: the reference
    with OpCounter(model.eval()) as counter:  # the counter needs the weights
        model(idx)
    assert counter.ops["layer0.attn.av"] != [0, 0]
    with pytest.raises(AssertionError, match="the fused kernels ran"):
        model(idx)  # evaluation without a counter is fused


def test_attention_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    report = bench_attention.main(["--device", "cpu", "--batch", "1", "--heads", "2", "--head-size", "16",
                                   "--blocks", "5", "--precision", "32", "--budget_ms", "1", "--out", str(out)])
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == set(bench_attention.ROWS)
    assert all(row["fwd_bwd_ms"] > 0 for row in rows.values()), rows
    assert rows["unfused"]["speedup_vs_unfused"] == 1
    assert json.loads(out.read_text())["rows"] == report["rows"]
