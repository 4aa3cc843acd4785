"""The fused LIF kernels on a GPU at the sizes training uses: real shapes, more than 2**31 elements, half dtypes.

Skipped without CUDA; eval/gpu_check.sh runs them. The forward is compiled without FMA contraction, so its
spikes equal the reference's (whose product and sum are separate CUDA kernels) exactly, also on random input;
the backward may contract, so gradients are compared with a tolerance where the spikes agree.
"""

import pytest
import torch

from spiking_lm.kernels.lif import lif_triton
from spiking_lm.lif import firing_stats
from spiking_lm.lif_reference import lif_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (eval/gpu_check.sh)")

GiB = 2**30
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative to the largest entry: fp32 sums in another order; half dtypes round the saved state and dL/dx.
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def chunked_reference(x, beta, threshold, refractory, grad_out, chunk: int):
    """Reference spikes, dL/dx and dL/dbeta on neuron chunks of (T, N) x, in fp32, to bound its memory.
    beta is per channel over the last dim of x, which every chunk boundary respects."""
    C = beta.numel()
    spikes = torch.empty_like(x)
    grad_x = torch.empty_like(x)
    grad_beta = torch.zeros(C, device=x.device)
    for start in range(0, x.shape[1], chunk):
        xs = x[:, start : start + chunk].float().requires_grad_()
        b = beta.detach().clone().requires_grad_()
        s = lif_reference(xs.view(x.shape[0], -1, C), b, threshold, refractory, "subtract").view_as(xs)
        s.backward(grad_out[:, start : start + chunk].float())
        spikes[:, start : start + chunk] = s.detach()
        grad_x[:, start : start + chunk] = xs.grad
        grad_beta += b.grad
    return spikes, grad_x, grad_beta


def check_against_reference(shape, dtype, refractory: int, chunk: int):
    T, N = shape
    C = 64
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) * 0.8 + 0.4).to(dtype)
    grad_out = torch.randn(shape, device="cuda", generator=g).to(dtype)
    beta = (0.3 + 0.7 * torch.rand(C, device="cuda", generator=g)).requires_grad_()
    xk = x.clone().requires_grad_()
    spikes, counts = lif_triton(xk.view(T, -1, C), beta, 1.0, refractory, "subtract", "atan", 2.0, True)
    spikes.view(shape).backward(grad_out)
    ref_spikes, ref_grad_x, ref_grad_beta = chunked_reference(x, beta, 1.0, refractory, grad_out, chunk)

    assert torch.equal(spikes.view(shape).float(), ref_spikes.float())
    stats = firing_stats(ref_spikes, refractory)
    assert counts.tolist() == [stats.spikes.item(), stats.neuron_steps - stats.eligible.item()]
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(xk.grad.float(), ref_grad_x.float(), rtol=tol, atol=tol * ref_grad_x.abs().max().item())
    torch.testing.assert_close(beta.grad, ref_grad_beta, rtol=tol, atol=tol * ref_grad_beta.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("refractory", [0, 2])
def test_mlp_site_of_the_nanogpt_model(dtype, refractory):
    """The MLP neurons of the shakespeare-char model: S = 4 steps over batch 64 x block 256 x 1536 channels."""
    check_against_reference((4, 64 * 256 * 1536), dtype, refractory, chunk=2**24)


@pytest.mark.parametrize("shape", [(2, GiB + 64), (1, 2 * GiB + 64)], ids=["T*N>2**31", "N>2**31"])
def test_more_than_2_31_elements(shape):
    """Past int32 indexing: T*N above 2**31 (64-bit offsets), then N itself above 2**31 (64-bit sizes).
    bf16 keeps each tensor at 4.3 GB."""
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * GiB:
        pytest.skip(f"needs about 48 GB of free GPU memory, {free / GiB:.0f} GB free")
    check_against_reference(shape, torch.bfloat16, 1, chunk=2**28)
