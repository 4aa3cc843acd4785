"""Fused Triton kernels for the LIF neuron of ``spiking_lm.lif_reference``.

Each program owns a block of neurons and runs the whole time loop with the
membrane and refractory counter in fp32 registers. The forward pass writes the
outputs and one state tensor. For binary spikes with a surrogate gradient it is
``u = h - threshold`` (the pre-spike membrane relative to threshold), in the
input's precision; for the signed and graded codes and the straight-through
gradient it is ``h`` itself, in fp32, from which the backward recomputes the
code with the forward's own comparisons. NaN marks refractory steps. That single
tensor gives the backward pass everything: the output, the surrogate input,
whether the step was gated, and the previous membrane for the decay gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SURROGATE_IDS = {"atan": 0, "fast_sigmoid": 1}
CODE_IDS = {"binary": 0, "signed": 1, "graded": 2}
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
def _code(h, thr, max_count, CODE: tl.constexpr):
    """The code's output n for membrane h, by the reference's comparisons (see ``lif_reference.levels``)."""
    if CODE == 0:  # binary
        n = (h > thr).to(tl.float32)
    elif CODE == 1:  # signed
        n = (h > thr).to(tl.float32) - (-h > thr).to(tl.float32)
    else:  # graded: steps at (k - 1/2) * thr, k = 1..max_count
        n = tl.zeros_like(h)
        c = tl.full(h.shape, 0.5, tl.float32)
        for _ in range(max_count):
            c_thr = c * thr
            n += (h > c_thr).to(tl.float32) - (-h > c_thr).to(tl.float32)
            c += 1.0
    return n


@triton.jit
def _code_grads(h, thr, alpha, max_count, CODE: tl.constexpr, SURROGATE: tl.constexpr, STE: tl.constexpr):
    """(dn/dh, dn/dthr) of the code at h: the sum of its unit steps' surrogates, or for the straight-through
    estimator the indicator of the code's range as dn/dh (the caller divides the gradient by thr, in the
    reference's order of rounding) and -h/thr^2 inside the range as dn/dthr."""
    if STE:
        lo = 0.0 if CODE == 0 else -1.0
        hi = 1.0
        if CODE == 2:
            hi = max_count.to(tl.float32)
            lo = -hi
        inside = ((h > lo * thr) & (h < hi * thr)).to(tl.float32)
        return inside, -inside * h / (thr * thr)
    elif CODE == 0:
        sg = _surrogate_grad(h - thr, alpha, SURROGATE)
        return sg, -sg
    elif CODE == 1:
        sg_pos = _surrogate_grad(h - thr, alpha, SURROGATE)
        sg_neg = _surrogate_grad(-h - thr, alpha, SURROGATE)
        return sg_pos + sg_neg, sg_neg - sg_pos
    else:
        dh = tl.zeros_like(h)
        dthr = tl.zeros_like(h)
        c = tl.full(h.shape, 0.5, tl.float32)
        for _ in range(max_count):
            c_thr = c * thr
            sg_pos = _surrogate_grad(h - c_thr, alpha, SURROGATE)
            sg_neg = _surrogate_grad(-h - c_thr, alpha, SURROGATE)
            dh += sg_pos + sg_neg
            dthr += c * (sg_neg - sg_pos)
            c += 1.0
        return dh, dthr


# The launches take T, R and the channel counts as plain i32: Triton would otherwise compile one more binary
# for every value that happens to equal 1 (T = 1, R = 1, a scalar parameter), none of them faster.
@triton.jit(do_not_specialize=["T", "C_BETA", "C_THR", "R", "MAX_COUNT"])
def _lif_fwd_kernel(
    x_ptr,
    beta_ptr,
    thr_ptr,
    s_ptr,
    u_ptr,
    count_ptr,
    T,
    N,
    C_BETA,
    C_THR,
    R,
    MAX_COUNT,
    stride_xt,
    stride_xn,
    RESET_ZERO: tl.constexpr,
    REFRACTORY: tl.constexpr,
    FIRED_FLOOR: tl.constexpr,
    CODE: tl.constexpr,
    SAVE_H: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # neuron ids, 64-bit so T*N may pass 2**31
    mask = offs < N
    # Per-channel parameters repeat every C neurons; a scalar is the C == 1 case.
    beta = tl.load(beta_ptr + offs % C_BETA, mask=mask, other=1.0).to(tl.float32)
    thr = tl.load(thr_ptr + offs % C_THR, mask=mask, other=1.0).to(tl.float32)
    p_x = x_ptr + offs * stride_xn  # step 0 of each neuron; bumped by one time stride per step
    p_s = s_ptr + offs  # outputs are contiguous (T, N)
    p_u = u_ptr + offs
    v = tl.zeros([BLOCK], dtype=tl.float32)
    r = tl.zeros([BLOCK], dtype=tl.int32)  # refractory steps left; R < T keeps it in int32
    n_spikes = tl.zeros([BLOCK], dtype=tl.int32)
    n_gated = tl.zeros([BLOCK], dtype=tl.int32)
    for _ in range(T):
        x = tl.load(p_x, mask=mask, other=0.0).to(tl.float32)
        # Two roundings, as in the reference: the launch turns FMA contraction off (FWD_OPTIONS), which
        # would otherwise round beta*v + x once and flip spikes that land within an ulp of the threshold.
        h = beta * v + x
        s = _code(h, thr, MAX_COUNT, CODE)  # the output n; 0/1 for binary
        fired = s != 0.0
        u = h if SAVE_H else h - thr
        if REFRACTORY:
            gated = r > 0
            fired = fired & (~gated)
            s = tl.where(gated, 0.0, s)
            u = tl.where(gated, float("nan"), u)
        if FIRED_FLOOR > 0:
            # A tiny positive u would round to 0 in a half-precision state and read as "no spike".
            u = tl.where(fired, tl.maximum(u, FIRED_FLOOR), u)
        if RESET_ZERO:
            v = h * (1.0 - s)
        else:
            v = h - thr * s
        if REFRACTORY:
            v = tl.where(gated, 0.0, v)
            r = tl.where(gated, r - 1, tl.where(fired, R, 0))
            n_gated += gated.to(tl.int32)
        n_spikes += tl.abs(s).to(tl.int32)  # a graded n counts |n| spikes
        tl.store(p_s, s.to(s_ptr.dtype.element_ty), mask=mask)
        tl.store(p_u, u.to(u_ptr.dtype.element_ty), mask=mask)
        p_x += stride_xt
        p_s += N
        p_u += N
    # This program's (spikes, refractory steps), row pid of a (programs, 2) buffer the launcher sums:
    # the firing rate costs no second pass over the spikes.
    tl.store(count_ptr + 2 * pid, tl.sum(n_spikes.to(tl.int64), axis=0))
    tl.store(count_ptr + 2 * pid + 1, tl.sum(n_gated.to(tl.int64), axis=0))


@triton.jit(do_not_specialize=["T", "C_BETA", "C_THR", "MAX_COUNT"])
def _lif_bwd_kernel(
    gs_ptr,
    u_ptr,
    beta_ptr,
    thr_ptr,
    gx_ptr,
    gbeta_ptr,
    gthr_ptr,
    T,
    N,
    C_BETA,
    C_THR,
    MAX_COUNT,
    alpha,
    stride_gt,
    stride_gn,
    RESET_ZERO: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    CODE: tl.constexpr,
    STE: tl.constexpr,
    SAVE_H: tl.constexpr,
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
    # The output n of the step, recomputed from the state: u > 0 (binary state), the code of h (SAVE_H).
    n = _code(u, thr, MAX_COUNT, CODE) if SAVE_H else (u > 0).to(tl.float32)
    gv = tl.zeros([BLOCK], dtype=tl.float32)  # dL/dv[t], flowing in from step t+1
    gbeta = tl.zeros([BLOCK], dtype=tl.float32)
    gthr = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(T):
        # The state before step 0 is v = 0, which the NaN "gated" code also means.
        has_prev = tl.full([BLOCK], i, tl.int32) < T - 1
        u_prev = tl.load(p_u - N, mask=mask & has_prev, other=float("nan")).to(tl.float32)
        n_prev = _code(u_prev, thr, MAX_COUNT, CODE) if SAVE_H else (u_prev > 0).to(tl.float32)
        gs = tl.load(p_gs, mask=mask, other=0.0).to(tl.float32)
        gated = u != u
        h = u if SAVE_H else u + thr
        if SAVE_H:
            dn_dh, dn_dthr = _code_grads(u, thr, alpha, MAX_COUNT, CODE, SURROGATE, STE)
        else:
            dn_dh = _surrogate_grad(u, alpha, SURROGATE)
            dn_dthr = -dn_dh
        # Total gradient on the output: from the output, and from the reset unless detached.
        g_spike = gs
        if not DETACH_RESET:
            if RESET_ZERO:
                g_spike += gv * -h
            else:
                g_spike += gv * -thr
        if STE:
            gh = g_spike * dn_dh / thr
        else:
            gh = g_spike * dn_dh
        if RESET_ZERO:
            gh += gv * (1.0 - n)
        else:
            gh += gv
        gh = tl.where(gated, 0.0, gh)
        tl.store(p_gx, gh.to(gx_ptr.dtype.element_ty), mask=mask)
        if BETA_GRAD:
            # v[t-1] = h - thr*n (subtract) or h*(1-n) (reset to zero, binary only) of step t-1.
            h_prev = u_prev if SAVE_H else u_prev + thr
            if RESET_ZERO:
                v_prev = tl.where(n_prev != 0.0, 0.0, h_prev)
            elif SAVE_H:
                v_prev = h_prev - thr * n_prev
            else:  # u itself after a spike: h - thr exactly as the forward rounded it
                v_prev = tl.where(n_prev != 0.0, u_prev, h_prev)
            v_prev = tl.where(u_prev != u_prev, 0.0, v_prev)
            gbeta += gh * v_prev
        if THR_GRAD:
            g_thr_step = g_spike * dn_dthr
            if not RESET_ZERO:
                g_thr_step -= gv * n
            gthr += tl.where(gated, 0.0, g_thr_step)
        gv = gh * beta
        u = u_prev
        n = n_prev
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


# (BLOCK, num_warps) pairs a launch picks from: four neurons per thread (one 16-byte fp32 vector) and 1 to 8
# warps per program. Large N takes the largest block; smaller N smaller ones, so that the grid still has
# PROGRAMS_PER_SM programs for every SM where it can.
LAUNCH_CONFIGS = ((128, 1), (256, 2), (512, 4), (1024, 8))
PROGRAMS_PER_SM = 4
# Compile options of the forward launch: no FMA contraction, so that h = beta*v + x rounds as the reference.
FWD_OPTIONS = {"enable_fp_fusion": False}


def launch_config(n: int, sms: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for n neurons: the largest block that still gives each of ``sms`` SMs PROGRAMS_PER_SM
    programs, else the smallest."""
    for block, warps in reversed(LAUNCH_CONFIGS[1:]):
        if triton.cdiv(n, block) >= PROGRAMS_PER_SM * sms:
            return block, warps
    return LAUNCH_CONFIGS[0]


def _sm_count(device: torch.device) -> int:
    """SMs to fill; 0 off CUDA, where the interpreter runs programs one by one and the fewest are fastest."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _saves_h(code: str, straight_through: bool) -> bool:
    """Whether the state is h in fp32 (every code but binary spikes with a surrogate gradient): the backward
    recomputes a signed or graded output, or the straight-through range, from h with the forward's comparisons."""
    return code != "binary" or straight_through


def _state_dtype(dtype: torch.dtype, save_h: bool = False) -> torch.dtype:
    """dtype of the saved state: fp32 keeps fp32 gradients exact, and h must be exact to recompute the code;
    binary spikes with half inputs keep u = h - threshold in half precision."""
    return dtype if dtype in (torch.float16, torch.bfloat16) and not save_h else torch.float32


def _fwd_meta(dtype: torch.dtype, reset_zero: bool, refractory: bool, code: str, save_h: bool, block: int) -> dict:
    """The forward kernel's constexprs for one launch."""
    floor = 2.0**-24 if _state_dtype(dtype, save_h) != torch.float32 else 0.0
    return dict(
        RESET_ZERO=reset_zero, REFRACTORY=refractory, FIRED_FLOOR=floor, CODE=CODE_IDS[code], SAVE_H=save_h, BLOCK=block
    )


def _bwd_meta(
    reset_zero: bool,
    detach_reset: bool,
    surrogate: str,
    code: str,
    straight_through: bool,
    beta_grad: bool,
    thr_grad: bool,
    block: int,
) -> dict:
    """The backward kernel's constexprs for one launch."""
    # The straight-through estimator ignores the surrogate: one build serves both names.
    surrogate_id = 0 if straight_through else SURROGATE_IDS[surrogate]
    return dict(
        RESET_ZERO=reset_zero,
        DETACH_RESET=detach_reset,
        SURROGATE=surrogate_id,
        CODE=CODE_IDS[code],
        STE=straight_through,
        SAVE_H=_saves_h(code, straight_through),
        BETA_GRAD=beta_grad,
        THR_GRAD=thr_grad,
        BLOCK=block,
    )


def _param(p, like: torch.Tensor) -> torch.Tensor:
    """A float or (C,)/(1,)/() tensor as a flat contiguous fp32 tensor on x's device."""
    return torch.as_tensor(p, dtype=torch.float32, device=like.device).reshape(-1).contiguous()


def lif_fwd(
    x, beta, thr, refractory: int, reset_zero: bool, code: str = "binary", max_count: int = 1, save_h: bool = False
):
    """Launch the forward kernel; return the outputs and saved state, both (T, N), and the counts
    (spikes, refractory steps) as a (2,) int64 tensor."""
    x2 = _as_2d(x)
    T, N = x2.shape
    spikes = torch.empty((T, N), dtype=x.dtype, device=x.device)
    u = torch.empty((T, N), dtype=_state_dtype(x.dtype, save_h), device=x.device)
    if N == 0:
        return spikes, u, torch.zeros(2, dtype=torch.int64, device=x.device)
    # A spike at step t silences at most the T-1-t steps left, so R >= T acts as T - 1 (and fits in int32).
    refractory = max(0, min(refractory, T - 1))
    block, warps = launch_config(N, _sm_count(x.device))
    programs = triton.cdiv(N, block)
    counts = torch.empty((programs, 2), dtype=torch.int64, device=x.device)
    _lif_fwd_kernel[(programs,)](
        x2,
        beta,
        thr,
        spikes,
        u,
        counts,
        T,
        N,
        beta.numel(),
        thr.numel(),
        refractory,
        max_count,
        x2.stride(0),
        x2.stride(1),
        **_fwd_meta(x.dtype, reset_zero, refractory > 0, code, save_h, block),
        num_warps=warps,
        **FWD_OPTIONS,
    )
    return spikes, u, counts.sum(0)


def lif_bwd(
    grad_spikes,
    u,
    beta,
    thr,
    alpha: float,
    reset_zero: bool,
    detach_reset: bool,
    surrogate: str,
    beta_grad: bool,
    thr_grad: bool,
    code: str = "binary",
    max_count: int = 1,
    straight_through: bool = False,
):
    """Launch the backward kernel; return (grad_x as (T, N), per-neuron grad of beta, of threshold)."""
    g2 = _as_2d(grad_spikes)
    T, N = u.shape
    grad_x = torch.empty((T, N), dtype=grad_spikes.dtype, device=u.device)
    gbeta = torch.empty(N if beta_grad else 0, dtype=torch.float32, device=u.device)
    gthr = torch.empty(N if thr_grad else 0, dtype=torch.float32, device=u.device)
    if N == 0:
        return grad_x, gbeta, gthr
    block, warps = launch_config(N, _sm_count(u.device))
    _lif_bwd_kernel[(triton.cdiv(N, block),)](
        g2,
        u,
        beta,
        thr,
        grad_x,
        gbeta,
        gthr,
        T,
        N,
        beta.numel(),
        thr.numel(),
        max_count,
        alpha,
        g2.stride(0),
        g2.stride(1),
        **_bwd_meta(reset_zero, detach_reset, surrogate, code, straight_through, beta_grad, thr_grad, block),
        num_warps=warps,
    )
    return grad_x, gbeta, gthr


def _reduce_to(grad_per_neuron: torch.Tensor, like: torch.Tensor, shape: torch.Size, dtype) -> torch.Tensor:
    """Sum per-neuron gradients over the neurons that share a channel, into the parameter's shape."""
    if like.numel() == 0:  # zero channels: no neurons, nothing to sum
        return torch.zeros(shape, dtype=dtype, device=like.device)
    return grad_per_neuron.view(-1, like.numel()).sum(0).reshape(shape).to(dtype)


class LIFFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta, threshold, refractory, reset, surrogate, alpha, detach_reset, code, max_count, gradient):
        beta_f, thr_f = _param(beta, x), _param(threshold, x)
        straight_through = gradient == "straight_through"
        spikes, u, counts = lif_fwd(
            x, beta_f, thr_f, refractory, reset == "zero", code, max_count, _saves_h(code, straight_through)
        )
        ctx.save_for_backward(u, beta_f, thr_f)
        ctx.mark_non_differentiable(counts)
        ctx.param_meta = [(p.shape, p.dtype) if isinstance(p, torch.Tensor) else None for p in (beta, threshold)]
        ctx.reset, ctx.surrogate, ctx.detach_reset = reset, surrogate, detach_reset
        ctx.code, ctx.max_count, ctx.straight_through = code, max_count, straight_through
        ctx.alpha = float(alpha)
        ctx.x_shape = x.shape
        return spikes.view(x.shape), counts

    @staticmethod
    def backward(ctx, grad_spikes, _grad_counts):
        u, beta_f, thr_f = ctx.saved_tensors
        beta_grad, thr_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_x, gbeta, gthr = lif_bwd(
            grad_spikes,
            u,
            beta_f,
            thr_f,
            ctx.alpha,
            ctx.reset == "zero",
            ctx.detach_reset,
            ctx.surrogate,
            beta_grad,
            thr_grad,
            ctx.code,
            ctx.max_count,
            ctx.straight_through,
        )
        return (
            grad_x.view(ctx.x_shape),
            _reduce_to(gbeta, beta_f, *ctx.param_meta[0]) if beta_grad else None,
            _reduce_to(gthr, thr_f, *ctx.param_meta[1]) if thr_grad else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def lif_triton(
    x,
    beta,
    threshold,
    refractory: int,
    reset: str,
    surrogate: str,
    alpha: float,
    detach_reset: bool,
    code: str = "binary",
    max_count: int = 1,
    gradient: str = "surrogate",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused-kernel LIF with the semantics of ``lif_reference``; every setting given, ``alpha`` resolved.

    Returns the outputs and, counted by the forward kernel, (spikes, refractory steps) as a (2,) int64 tensor;
    a graded output n counts |n| spikes.
    """
    return LIFFunction.apply(
        x, beta, threshold, refractory, reset, surrogate, alpha, detach_reset, code, max_count, gradient
    )
