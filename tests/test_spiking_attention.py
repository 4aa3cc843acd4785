"""The fused spiking attention kernels against the PyTorch reference: outputs, spikes, counts, gradients, memory.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), on small fp32 shapes.
Random inputs: outputs within 1e-5 relative, gradients of q, k, v, the per-head threshold and the decay within
1e-4 of the largest entry (they are sums over pairs and steps taken in another order). Dyadic inputs, where
every fp32 operation is exact: outputs bit for bit, which with V the identity are the spikes themselves.
Dropout: the kernels' mask (``dropout_mask``) put into the reference. tests/test_spiking_attention_cuda.py runs
these helpers on a GPU.
"""

import contextlib
import functools
import inspect
import json
import os

import pytest
import torch
from conftest import DEVICES, first_max
from torch.utils._python_dispatch import TorchDispatchMode

import spiking_lm.kernels.spiking_attention as fused_module
import spiking_lm.model as model_module
from spiking_lm.config import ModelConfig, NeuronConfig
from spiking_lm.eval import bench_attention
from spiking_lm.eval.energy import OpCounter
from spiking_lm.firing import FiringCounts
from spiking_lm.kernels.spiking_attention import spiking_attention_triton
from spiking_lm.lif_reference import DEFAULT_ALPHA, lif_reference
from spiking_lm.model import GPT
from spiking_lm.spiking_attention_reference import spiking_attention_reference

DEVICE = [d for d in DEVICES if d == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"]
pytestmark = pytest.mark.skipif(not DEVICE, reason="the kernels need CUDA or TRITON_INTERPRET=1")
NEURON = dict(refractory=1, reset="subtract", surrogate="atan", detach_reset=True)
LAYOUT = dict(centering="row_max", readout="cumulative", norm="count")  # the one layout the kernels build


def inputs(S_qk, L, hs, B=2, nh=2, seed=0, dyadic=False, device="cpu"):
    """q, k, v (S', B, nh, L, hs) and a (nh,) threshold; dyadic q and k are multiples of 1/4."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(S_qk, B, nh, L, hs, generator=gen) for _ in range(3))
    if dyadic:  # with sqrt(hs) * threshold a power of 2 every score, centring and membrane is exact
        q, k = ((t * 4).round() / 4 for t in (q, k))
        threshold = torch.full((nh,), 4.0 / hs**0.5)
    else:
        threshold = torch.rand(nh, generator=gen) + 0.2
    return tuple(t.to(device) for t in (q, k, v, threshold))


def both(q, k, v, threshold, S, beta=0.5, alpha=None, dropout=0.0, fp32_reference=False, **neuron):
    """Forward and backward of fused and reference on fresh leaves; (y, count, grads) each, and the weights.

    The loss weighs the count too, as the firing-rate regulariser does, so its gradient is checked as well.
    With dropout the reference drops what the kernels dropped (their mask from the same seed).
    ``fp32_reference`` runs the reference on fp32 copies of (bf16) inputs.
    """
    neuron = {**NEURON, **neuron}
    alpha = DEFAULT_ALPHA[neuron["surrogate"]] if alpha is None else alpha
    grad_y = torch.randn(S, *q.shape[1:], generator=torch.Generator().manual_seed(1)).to(q.device)
    results = []
    for fused in (True, False):
        leaves = [
            (t.float() if fp32_reference and not fused else t).clone().requires_grad_()
            for t in (q, k, v, threshold, torch.tensor(beta, device=q.device))
        ]
        q_, k_, v_, threshold_, beta_ = leaves
        torch.manual_seed(7)  # the kernels' dropout seed
        if fused:
            y, count, row_count = spiking_attention_triton(
                q_, k_, v_, threshold_, beta_, timesteps=S, alpha=alpha, dropout=dropout, **neuron
            )
            weights = None
        else:
            lif = functools.partial(lif_reference, beta=beta_, threshold=1.0, alpha=alpha, **neuron)
            with kernel_dropout(S, q.shape[1:4]):
                y, count, weights = spiking_attention_reference(
                    q_, k_, v_, threshold_, lif, S, **LAYOUT, dropout=dropout
                )
            assert torch.equal(row_count, weights.detach().sum(-1))  # the AC count the energy counter reads
        ((y * grad_y).sum() + 0.1 * count).backward()
        results.append((y.detach(), count.item(), [t.grad for t in leaves]))
    return results, weights


@contextlib.contextmanager
def kernel_dropout(S, batch_heads_rows):
    """F.dropout dropping what the kernels dropped in a call right after torch.manual_seed(7)."""
    B, nh, L = batch_heads_rows
    torch.manual_seed(7)
    seed = fused_module.draw_seed()

    def dropout(x, p):
        return x * fused_module.dropout_mask(seed, p, S, B, nh, L, device=x.device) / (1 - p)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "dropout", dropout)
        yield


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
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_matches_the_reference(per_step, dropout):
    S = 2
    count = assert_matches(*inputs(S if per_step else 1, L=5, hs=16), S, dropout=dropout)
    assert count > 0


@pytest.mark.parametrize("name, value", [("centering", "none"), ("readout", "step"), ("norm", "length")])
def test_layouts_the_kernels_do_not_build_are_refused_by_name(name, value):
    q, k, v, threshold = inputs(1, L=5, hs=16)
    with pytest.raises(ValueError, match=f"builds only {name}='.*', got '{value}'; backend='auto' runs the reference"):
        spiking_attention_triton(q, k, v, threshold, 0.5, timesteps=2, alpha=2.0, **NEURON, **{name: value})


@pytest.mark.parametrize(
    "refractory, reset, surrogate, detach_reset",
    [
        (0, "subtract", "atan", True),
        (1, "zero", "fast_sigmoid", False),
        (2, "subtract", "fast_sigmoid", False),
        (2, "zero", "atan", True),
        (1, "subtract", "atan", False),
    ],
)
def test_neuron_settings(refractory, reset, surrogate, detach_reset):
    # S = 4 lets a refractory period of 2 end within the window; beta 0.8 keeps the membrane's history alive.
    assert_matches(
        *inputs(4, L=16, hs=16),
        4,
        beta=0.8,
        refractory=refractory,
        reset=reset,
        surrogate=surrogate,
        detach_reset=detach_reset,
        alpha=3.0 if surrogate == "atan" else None,
    )


@pytest.mark.parametrize(
    "L, hs, S, per_step, dropout",
    [
        (1, 16, 1, False, 0.0),
        (1, 32, 4, True, 0.0),
        (5, 32, 2, False, 0.0),
        pytest.param(16, 16, 4, False, 0.5, marks=pytest.mark.slow),
        (33, 32, 4, False, 0.0),  # a tile cut by the diagonal and a skipped one, in either kernel's blocking
        pytest.param(33, 16, 2, True, 0.2, marks=pytest.mark.slow),
        # three key blocks of the forward, three query blocks of the backward
        pytest.param(70, 16, 3, True, 0.0, marks=pytest.mark.slow),
    ],
)
def test_shapes(L, hs, S, per_step, dropout):
    assert_matches(*inputs(S if per_step else 1, L=L, hs=hs), S, dropout=dropout)


@pytest.mark.parametrize("per_step", [False, True], ids=["S'=1", "S'=S"])
def test_spikes_equal_on_dyadic_inputs(per_step):
    # V the identity makes the output the cumulative spike counts over their row sums.
    S, L = 4, 16
    q, k, _, threshold = inputs(S if per_step else 1, L=L, hs=16, dyadic=True)
    v = torch.eye(L).expand_as(q)
    ((y, count, _), (y_ref, count_ref, _)), weights = both(q, k, v, threshold, S, beta=0.5, refractory=1)
    assert torch.equal(y, y_ref) and count == count_ref
    weights = weights.detach()
    assert torch.equal((y * weights.sum(-1, keepdim=True).clamp_min(1)).round(), weights)
    assert 0 < weights.count_nonzero() < weights.numel() // 2  # some causal pairs fire, some do not


def test_tied_row_maxima_give_their_gradient_to_the_first_key(monkeypatch):
    # Binary q and k, as after spiking Q/K/V, tie the row max on many keys. torch.amax splits its gradient
    # equally between them; the kernels give it to the first, another valid subgradient. Everything but the
    # score gradients (q, k, threshold) agrees with the reference either way.
    q, k, v, threshold = inputs(3, L=16, hs=16, seed=3)
    q, k = ((t > 0).float() for t in (q, k))
    c = q @ k.transpose(-2, -1)
    row_max = c.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), -1).amax(-1, keepdim=True)
    assert ((c == row_max).tril().sum(-1) > 1).float().mean() > 0.3  # ties are common, not a corner case
    ((y, count, grads), (y_ref, count_ref, grads_ref)), _ = both(q, k, v, threshold, 3)
    assert count == count_ref
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in (grads[2], grads_ref[2]), (grads[4], grads_ref[4]):  # v, beta
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert not torch.allclose(grads[0], grads_ref[0], rtol=1e-3, atol=1e-3)  # the ties matter for q
    monkeypatch.setattr(torch.Tensor, "amax", first_max)
    assert_matches(q, k, v, threshold, 3)


def test_a_count_of_one_normalises_as_a_constant():
    # One query, one key, one step: q.k = 4 fires the pair once, so y = s v / max(1, s) with s = 1, exactly on
    # the max's kink. The kernels treat d there as the constant 1 (dy/ds = v), and so must the reference,
    # whatever torch's clamp_min does at its bound (its gradient there was 1 in torch 2.11, 0 in 2.14).
    q, k, v = (torch.full((1, 1, 1, 1, 1), value, requires_grad=True) for value in (2.0, 2.0, 3.0))

    def neuron(x):  # a spike where x > 1, with the straight-through gradient dx
        return (x > 1).float() + (x - x.detach())

    y, count, _ = spiking_attention_reference(q, k, v, torch.ones(1), neuron, 1, centering="none")
    assert count.item() == 1 and y.item() == 3
    y.sum().backward()
    assert q.grad.item() == 6  # dy/ds * ds/dx * dx/dq = v * 1 * k


@pytest.mark.slow
def test_dropout_draws_the_references_distribution():
    # The same spikes (same inputs) dropped by each: keep rate and the mean of the kept, scaled weights.
    S, L, p = 2, 64, 0.3
    q, k, _, _ = inputs(1, L=L, hs=64, B=1)
    threshold = torch.full((2,), 20.0)  # small scores: most causal pairs fire
    v = torch.eye(L).expand_as(q)  # the output times its row count is the dropped, scaled weights
    dropped = {}
    fused = spiking_attention_triton(q, k, v, threshold, 0.5, timesteps=S, alpha=2.0, dropout=p, **NEURON)
    dropped["fused"] = fused.y * fused.row_count.clamp_min(1).unsqueeze(-1)
    lif = functools.partial(lif_reference, beta=0.5, threshold=1.0, alpha=2.0, **NEURON)
    y, _, weights = spiking_attention_reference(q, k, v, threshold, lif, S, **LAYOUT, dropout=p)
    dropped["reference"] = y * weights.sum(-1, keepdim=True).clamp_min(1)
    fired = weights > 0
    n = fired.sum().item()
    assert n > 2000
    sigma = (p * (1 - p) / n) ** 0.5
    for name, w in dropped.items():
        kept = w[fired] > 0
        assert abs(kept.float().mean().item() - (1 - p)) < 4 * sigma, name
        torch.testing.assert_close(w[fired][kept], weights[fired][kept] / (1 - p), rtol=1e-5, atol=1e-5)
        ratio = (w[fired].sum() / weights[fired].sum()).item()  # the scaling keeps the mean
        assert abs(ratio - 1) < 8 * sigma / (1 - p), name
    # the draws differ between calls and between the steps of one call
    again = spiking_attention_triton(q, k, v, threshold, 0.5, timesteps=S, alpha=2.0, dropout=p, **NEURON)
    assert not torch.equal(again.y, fused.y)
    keep = fused_module.dropout_mask(123, p, S, 1, 2, L)
    assert not torch.equal(keep[0], keep[1])
    torch.manual_seed(0)
    first = fused_module.draw_seed()
    torch.manual_seed(0)
    assert fused_module.draw_seed() == first  # seed_everything reproduces the masks


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


@pytest.mark.parametrize("per_step, dropout", [(False, 0.0), (True, 0.0), (False, 0.2)])
@pytest.mark.slow
def test_no_tensor_of_size_l_by_l(per_step, dropout):
    S, B, nh, L, hs = 2, 2, 2, 64, 16  # S * hs < L: the output (S, B, nh, L, hs) is below the bound
    q, k, v, threshold = (t.requires_grad_() for t in inputs(S if per_step else 1, L=L, hs=hs, B=B, nh=nh))
    largest = {}
    for name, attend in [
        (
            "fused",
            lambda: (
                spiking_attention_triton(q, k, v, threshold, 0.5, timesteps=S, alpha=2.0, dropout=dropout, **NEURON).y
            ),
        ),
        (
            "reference",
            lambda: spiking_attention_reference(
                q, k, v, threshold, functools.partial(lif_reference, beta=0.5, **NEURON), S, **LAYOUT, dropout=dropout
            )[0],
        ),
    ]:
        with LargestTensor() as tracker:
            attend().sum().backward()
        largest[name] = tracker.largest
    fp32_scores = B * nh * L * L * 4  # bytes of one fp32 (B, nh, L, L)
    assert largest["reference"] >= S * fp32_scores  # the tracker sees the unfused path's (S, B, nh, L, L)
    assert largest["fused"] < fp32_scores


def test_bad_inputs_are_refused():
    q, k, v, threshold = inputs(2, L=5, hs=16)
    with pytest.raises(ValueError, match="S' 1 or S = 3"):
        spiking_attention_triton(q, k, v, threshold, 0.5, timesteps=3, alpha=2.0, **NEURON)
    with pytest.raises(ValueError, match=r"attention dropout must be in \[0, 1\), got 1.0"):
        spiking_attention_triton(q, k, v, threshold, 0.5, timesteps=2, alpha=2.0, dropout=1.0, **NEURON)
    q, k, v, threshold = inputs(1, L=5, hs=80)
    with pytest.raises(ValueError, match="head sizes up to 64, got 80"):
        spiking_attention_triton(q, k, v, threshold, 0.5, timesteps=3, alpha=2.0, **NEURON)


def model_pair(**overrides):
    settings = dict(
        vocab_size=16,
        block_size=12,
        n_layer=1,
        n_head=2,
        n_embd=32,
        timesteps=3,
        mlp_activation="gelu",
        attn_neuron=NeuronConfig(threshold=0.05, learn_beta=True),
    )
    models = [GPT(ModelConfig(**{**settings, **overrides}, backend=b)) for b in ("torch", "triton")]
    models[1].load_state_dict(models[0].state_dict())
    return models


def test_compile_variants_cover_the_launches(monkeypatch):
    """Each build a model's forward and backward launches, dropout on, is among compile_variants()."""
    launched = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel
            self.signature = inspect.signature(kernel.fn)

        def __getitem__(self, grid):
            def launch(**kwargs):
                constexprs = {
                    name: kwargs[name]
                    for name, p in self.signature.parameters.items()
                    if "constexpr" in str(p.annotation)
                }
                launched.append((self.kernel.__name__, kwargs["q_ptr"].dtype, constexprs))
                return self.kernel[grid](**kwargs)

            return launch

    variants = fused_module.compile_variants()
    for name in ("_attn_fwd_kernel", "_attn_bwd_kernel"):
        monkeypatch.setattr(fused_module, name, Recorder(getattr(fused_module, name)))
    _, model = model_pair(dropout=0.1, timesteps=4, spiking_qkv=True)
    idx = torch.zeros(1, 12, dtype=torch.long)
    model.train()(idx, idx)[1].backward()
    for v in variants:
        assert list(v["signature"]) == v["kernel"].arg_names
        assert v["options"]["enable_fp_fusion"] is False and v["options"].get("maxnreg", 168) <= 168
    listed = [(v["kernel"].__name__, v["signature"]["q_ptr"], v["constexprs"]) for v in variants]
    assert len(launched) == 2
    for kernel, dtype, constexprs in launched:
        assert (kernel, "*" + fused_module.DTYPES[dtype], constexprs) in listed


def test_model_trains_through_the_fused_attention_as_through_the_reference():
    idx = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for model in model_pair():
        firing = FiringCounts(rate_grad=True)  # the rate regulariser's gradient comes from the kernel's count
        logits, loss = model(idx, idx, firing=firing)
        (loss + firing.penalty(0.1)).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results.append((logits, firing.rates()["layer0.attn"], grads))
    (logits, rate, grads), (logits_ref, rate_ref, grads_ref) = results[1], results[0]
    assert 0 < rate_ref < 1 and rate == rate_ref
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)


def refuse(what):
    def refused(*args, **kwargs):
        raise AssertionError(f"the {what} ran")

    return refused


def test_training_with_dropout_and_op_counting_run_fused(monkeypatch):
    _, model = model_pair(dropout=0.1)
    idx = torch.zeros(1, 12, dtype=torch.long)
    monkeypatch.setattr(model_module, "spiking_attention_reference", refuse("reference"))
    model.train()(idx)  # attention dropout: fused
    with OpCounter(model.eval()) as counter:  # op counting reads the kernel's counts (tests/test_energy.py)
        model(idx, firing=counter.firing)
    assert counter.ops["layer0.attn.av"] != [0, 0]


def test_counted_products_use_the_undropped_weights_while_training():
    # The energy counter's weights-times-V products, with spiking V (the fused path reruns the kernel on the
    # spike pattern): the weights before dropout, as the reference counts them, whatever mask the step drew.
    idx = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    products = []
    for model in model_pair(dropout=0.3, spiking_qkv=True, qkv_neuron=NeuronConfig(threshold=0.05)):
        firing = FiringCounts(products=True)
        torch.manual_seed(0)
        model.train()(idx, firing=firing)
        products.append(firing.attention["layer0.attn"].av.item())
    assert products[0] > 0 and products[1] == products[0]


def test_auto_runs_the_reference_for_layouts_the_kernels_do_not_build(monkeypatch):
    idx = torch.zeros(1, 12, dtype=torch.long)
    monkeypatch.setattr(model_module, "resolve_backend", lambda backend, x: "triton")  # as on CUDA
    monkeypatch.setattr(fused_module, "spiking_attention_triton", refuse("fused kernels"))
    settings = dict(vocab_size=16, block_size=12, n_layer=1, n_head=2, n_embd=32, timesteps=2, mlp_activation="gelu")
    auto, explicit = (GPT(ModelConfig(**settings, attn_norm="length", backend=b)) for b in ("auto", "triton"))
    auto(idx)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="builds only norm='count', got 'length'"):
        explicit(idx)


def test_attention_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    report = bench_attention.main(
        [
            "--device",
            "cpu",
            "--batch",
            "1",
            "--heads",
            "2",
            "--head-size",
            "16",
            "--blocks",
            "5",
            "--precision",
            "32",
            "--budget_ms",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == set(bench_attention.ROWS)
    assert all(row["fwd_bwd_ms"] > 0 for row in rows.values()), rows
    assert json.loads(out.read_text())["rows"] == report["rows"]
