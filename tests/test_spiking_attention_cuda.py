"""The compiled fused spiking attention on a CUDA GPU against the reference on the same GPU.

Skipped without CUDA; eval/gpu_check.sh runs it. The CPU suite checks the kernels under the interpreter, which
compiles nothing; here the builds that launch meet the model's head size (64) and S = 4 at up to 256 positions.
- fp32, random inputs: the CPU suite's tolerances (outputs 1e-5 relative, gradients 1e-4 of the largest entry).
  They need fp32-accurate score dots ("tf32x3"): plain tf32 keeps 10 mantissa bits and flips spikes.
- bf16, dyadic inputs (exact in bf16, and every score, centring and membrane exact in fp32): the same spikes as the
  reference run on fp32 copies, outputs and gradients within bf16's rounding.
"""

import pytest
import torch
from test_spiking_attention import assert_matches, both, inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (eval/gpu_check.sh)")

S = 4
BF16_TOL = 2e-2  # relative to the largest entry: bf16 rounds q, k, v, the output and the scaled dy


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("per_step", [False, True], ids=["S'=1", "S'=S"])
def test_fp32_matches_the_reference(per_step, dropout):
    count = assert_matches(*inputs(S if per_step else 1, L=64, hs=64, device="cuda"), S, dropout=dropout)
    assert count > 0


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("per_step", [False, True], ids=["S'=1", "S'=S"])
def test_bf16_spikes_equal_the_fp32_reference(per_step, dropout):
    q32, k32, v, threshold = inputs(S if per_step else 1, L=256, hs=64, B=2, nh=3, dyadic=True, device="cuda")
    q, k, v = (t.bfloat16() for t in (q32, k32, v))
    assert torch.equal(q.float(), q32) and torch.equal(k.float(), k32)  # bf16 holds these dyadic values exactly
    ((y, count, grads), (y_ref, count_ref, grads_ref)), _ = both(
        q, k, v, threshold, S, dropout=dropout, fp32_reference=True
    )
    assert y.dtype == torch.bfloat16 and count == count_ref > 0
    torch.testing.assert_close(y.float(), y_ref, rtol=BF16_TOL, atol=BF16_TOL * y_ref.abs().max().item())
    for name, got, want in zip(("q", "k", "v", "threshold", "beta"), grads, grads_ref, strict=True):
        atol = BF16_TOL * want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=BF16_TOL, atol=atol, msg=f"grad of {name}")
