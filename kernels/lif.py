"""Fused Triton kernels for the LIF neuron of ``spiking_lm.lif_reference``.

Each program owns a block of neurons and runs the whole time loop with the
membrane and refractory counter in fp32 registers. The forward pass writes the
spikes and one state tensor, ``u = h - threshold`` (the pre-spike membrane
relative to threshold), with NaN marking refractory steps. That single tensor
gives the backward pass everything: the spike (``u > 0``), the surrogate input,
whether the step was gated, and the previous membrane for the decay gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SURROGATE_IDS = {"atan": 0, "fast_sigmoid": 1}
# Compiled Triton reads module globals only when they are constexpr.
HALF_PI = tl.constexpr(1.5707963267948966)


@triton.jit
def _surrogate_grad(u, alpha, SURROGATE: tl.constexpr):
    if SURROGATE == 0:  # atan: (alpha/2) / (1 + (pi*alpha*u/2)^2)
        z = HALF_PI * alpha * u
        return (0.5 * alpha) / (1.0 + z * z)
    else:  # fast sigmoid: 1 / (1 + alpha*|u|)^2
        d = 1.0 + alpha * tl.abs(u)
        return 1.0 / (d * d)


@triton.jit
def _lif_fwd_kernel(
    x_ptr, beta_ptr, thr_ptr, s_ptr, u_ptr,
    T, N, C_BETA, C_THR, R,
    stride_xt, stride_xn,
    RESET_ZERO: tl.constexpr,
    FIRED_FLOOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # neuron ids, 64-bit so T*N may pass 2**31
    mask = offs < N
    # Per-channel parameters repeat every C neurons; a scalar is the C == 1 case.
    beta = tl.load(beta_ptr + offs % C_BETA, mask=mask, other=1.0).to(tl.float32)
    thr = tl.load(thr_ptr + offs % C_THR, mask=mask, other=1.0).to(tl.float32)
    p_x = x_ptr + offs * stride_xn  # step 0 of each neuron; bumped by one time stride per step
    p_s = s_ptr + offs  # outputs are contiguous (T, N)
    p_u = u_ptr + offs
    v = tl.zeros([BLOCK], dtype=tl.float32)
    r = tl.zeros([BLOCK], dtype=tl.int32)
    for _ in range(T):
        x = tl.load(p_x, mask=mask, other=0.0).to(tl.float32)
        gated = r > 0
        h = beta * v + x
        fired = (h > thr) & (~gated)
        s = fired.to(tl.float32)
        u = tl.where(gated, float("nan"), h - thr)
        if FIRED_FLOOR > 0:
            # A tiny positive u would round to 0 in a half-precision state and read as "no spike".
            u = tl.where(fired, tl.maximum(u, FIRED_FLOOR), u)
        if RESET_ZERO:
            v = h * (1.0 - s)
        else:
            v = h - thr * s
        v = tl.where(gated, 0.0, v)
        r = tl.where(gated, r - 1, tl.where(fired, R, 0))
        tl.store(p_s, s.to(s_ptr.dtype.element_ty), mask=mask)
        tl.store(p_u, u.to(u_ptr.dtype.element_ty), mask=mask)
        p_x += stride_xt
        p_s += N
        p_u += N


@triton.jit
def _lif_bwd_kernel(
    gs_ptr, u_ptr, beta_ptr, thr_ptr, gx_ptr, gbeta_ptr, gthr_ptr,
    T, N, C_BETA, C_THR, alpha,
    stride_gt, stride_gn,
    RESET_ZERO: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    BETA_GRAD: tl.constexpr,
    THR_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    beta = tl.load(beta_ptr + offs % C_BETA, mask=mask, other=1.0).to(tl.float32)
    thr = tl.load(thr_ptr + offs % C_THR, mask=mask, other=1.0).to(tl.float32)
    last = tl.cast(T - 1, tl.int64)
    # Walk time backwards from the last step.
    p_gs = gs_ptr + last * stride_gt + offs * stride_gn
    p_u = u_ptr + last * N + offs
    p_gx = gx_ptr + last * N + offs
    u = tl.load(p_u, mask=mask, other=float("nan")).to(tl.float32)
    gv = tl.zeros([BLOCK], dtype=tl.float32)  # dL/dv[t], flowing in from step t+1
    gbeta = tl.zeros([BLOCK], dtype=tl.float32)
    gthr = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(T):
        # The state before step 0 is v = 0, which the NaN "gated" code also means.
        has_prev = tl.full([BLOCK], i, tl.int32) < T - 1
        u_prev = tl.load(p_u - N, mask=mask & has_prev, other=float("nan")).to(tl.float32)
        gs = tl.load(p_gs, mask=mask, other=0.0).to(tl.float32)
        gated = u != u
        spiked = u > 0
        s = spiked.to(tl.float32)
        sg = _surrogate_grad(u, alpha, SURROGATE)
        # Total gradient on the spike: from the output, and from the reset unless detached.
        g_spike = gs
        if not DETACH_RESET:
            if RESET_ZERO:
                g_spike += gv * -(u + thr)
            else:
                g_spike += gv * -thr
        if RESET_ZERO:
            gh = g_spike * sg + gv * (1.0 - s)
        else:
            gh = g_spike * sg + gv
        gh = tl.where(gated, 0.0, gh)
        tl.store(p_gx, gh.to(gx_ptr.dtype.element_ty), mask=mask)
        if BETA_GRAD:
            # v[t-1] from u[t-1]: h - thr*s is u itself after a spike (subtract), 0 for reset-to-zero.
            prev_spiked = u_prev > 0
            if RESET_ZERO:
                v_prev = tl.where(prev_spiked, 0.0, u_prev + thr)
            else:
                v_prev = tl.where(prev_spiked, u_prev, u_prev + thr)
            v_prev = tl.where(u_prev != u_prev, 0.0, v_prev)
            gbeta += gh * v_prev
        if THR_GRAD:
            g_thr_step = -g_spike * sg
            if not RESET_ZERO:
                g_thr_step -= gv * s
            gthr += tl.where(gated, 0.0, g_thr_step)
        gv = gh * beta
        u = u_prev
        p_gs -= stride_gt
        p_u -= N
        p_gx -= N
    if BETA_GRAD:
        tl.store(gbeta_ptr + offs, gbeta, mask=mask)
    if THR_GRAD:
        tl.store(gthr_ptr + offs, gthr, mask=mask)


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    """View (T, ...) as (T, N) without copying when the layout allows; copy otherwise."""
    return t.reshape(t.shape[0], -1)


def _block(n: int) -> int:
    return min(1024, triton.next_power_of_2(n))


def _param(p, like: torch.Tensor) -> torch.Tensor:
    """A float or (C,)/(1,)/() tensor as a flat contiguous fp32 tensor on x's device."""
    return torch.as_tensor(p, dtype=torch.float32, device=like.device).reshape(-1).contiguous()


def lif_fwd(x, beta, thr, refractory: int, reset_zero: bool):
    """Launch the forward kernel; return (spikes, saved state u), both (T, N)."""
    x2 = _as_2d(x)
    T, N = x2.shape
    spikes = torch.empty((T, N), dtype=x.dtype, device=x.device)
    # fp32 state keeps fp32 gradients exact; half-precision inputs keep half-precision state.
    half = x.dtype in (torch.float16, torch.bfloat16)
    u = torch.empty((T, N), dtype=x.dtype if half else torch.float32, device=x.device)
    if N == 0:
        return spikes, u
    block = _block(N)
    _lif_fwd_kernel[(triton.cdiv(N, block),)](
        x2, beta, thr, spikes, u,
        T, N, beta.numel(), thr.numel(), refractory,
        x2.stride(0), x2.stride(1),
        RESET_ZERO=reset_zero, FIRED_FLOOR=2.0**-24 if half else 0.0, BLOCK=block,
    )
    return spikes, u


def lif_bwd(grad_spikes, u, beta, thr, alpha: float, reset_zero: bool, detach_reset: bool, surrogate: str,
            beta_grad: bool, thr_grad: bool):
    """Launch the backward kernel; return (grad_x as (T, N), per-neuron grad of beta, of threshold)."""
    g2 = _as_2d(grad_spikes)
    T, N = u.shape
    grad_x = torch.empty((T, N), dtype=grad_spikes.dtype, device=u.device)
    gbeta = torch.empty(N if beta_grad else 0, dtype=torch.float32, device=u.device)
    gthr = torch.empty(N if thr_grad else 0, dtype=torch.float32, device=u.device)
    if N == 0:
        return grad_x, gbeta, gthr
    block = _block(N)
    _lif_bwd_kernel[(triton.cdiv(N, block),)](
        g2, u, beta, thr, grad_x, gbeta, gthr,
        T, N, beta.numel(), thr.numel(), alpha,
        g2.stride(0), g2.stride(1),
        RESET_ZERO=reset_zero, DETACH_RESET=detach_reset, SURROGATE=SURROGATE_IDS[surrogate],
        BETA_GRAD=beta_grad, THR_GRAD=thr_grad, BLOCK=block,
    )
    return grad_x, gbeta, gthr


def _reduce_to(grad_per_neuron: torch.Tensor, like: torch.Tensor, shape: torch.Size, dtype) -> torch.Tensor:
    """Sum per-neuron gradients over the neurons that share a channel, into the parameter's shape."""
    if like.numel() == 0:  # zero channels: no neurons, nothing to sum
        return torch.zeros(shape, dtype=dtype, device=like.device)
    return grad_per_neuron.view(-1, like.numel()).sum(0).reshape(shape).to(dtype)


class LIFFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta, threshold, refractory, reset, surrogate, alpha, detach_reset):
        beta_f, thr_f = _param(beta, x), _param(threshold, x)
        spikes, u = lif_fwd(x, beta_f, thr_f, refractory, reset == "zero")
        ctx.save_for_backward(u, beta_f, thr_f)
        ctx.param_meta = [(p.shape, p.dtype) if isinstance(p, torch.Tensor) else None for p in (beta, threshold)]
        ctx.reset, ctx.surrogate, ctx.detach_reset = reset, surrogate, detach_reset
        ctx.alpha = float(alpha)
        ctx.x_shape = x.shape
        return spikes.view(x.shape)

    @staticmethod
    def backward(ctx, grad_spikes):
        u, beta_f, thr_f = ctx.saved_tensors
        beta_grad, thr_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_x, gbeta, gthr = lif_bwd(
            grad_spikes, u, beta_f, thr_f, ctx.alpha, ctx.reset == "zero", ctx.detach_reset, ctx.surrogate,
            beta_grad, thr_grad,
        )
        return (
            grad_x.view(ctx.x_shape),
            _reduce_to(gbeta, beta_f, *ctx.param_meta[0]) if beta_grad else None,
            _reduce_to(gthr, thr_f, *ctx.param_meta[1]) if thr_grad else None,
            None, None, None, None, None,
        )


def lif_triton(x, beta, threshold, refractory: int, reset: str, surrogate: str, alpha: float,
               detach_reset: bool) -> torch.Tensor:
    """Fused-kernel LIF with the semantics of ``lif_reference``; every setting given, ``alpha`` resolved."""
    return LIFFunction.apply(x, beta, threshold, refractory, reset, surrogate, alpha, detach_reset)
