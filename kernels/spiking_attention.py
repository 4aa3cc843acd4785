"""Fused spiking attention in Triton, FlashAttention-style: no tensor with an L x L factor, forward or backward.

The semantics are those of ``spiking_lm.spiking_attention_reference``, whose docstring has the equations.

- Forward: one program per (batch, head, query block). Pass 1 streams the key blocks for the row maxima of
  the scores (and how many keys attain each, for the backward). Pass 2 loops over the S output steps; for
  each it streams the key blocks of the causal prefix, recomputes the scores, replays every pair's LIF
  neuron over steps 0..t in registers, and accumulates N_t @ V and the row counts. Replaying the steps
  keeps one (BLOCK_M, hs) accumulator whatever S is, at O(S^2) cheap element-wise neuron steps.
- Backward: one program per (batch, head, key block), streaming the query blocks from the diagonal on. For
  each tile it walks the steps backwards, replaying the neuron up to the step at hand, and gets the gradient
  of the neurons' input from the readout, the normalisation (via the per-row statistics D = dy . y saved as
  one number per row and step) and the LIF backward of ``kernels/lif.py``. dk, dv and the partial sums of
  dtheta and dbeta stay in the program; dq and the per-row gradient sums reach memory with atomic adds.
  A second, light pass (scores only) gives the row max's gradient to the keys that attain it.

Saved for the backward: q, k, v, the output and three numbers per row and step (row max, its ties, the
row's weight sum). The spike count comes out as per-program partial sums. Attention dropout is not here:
the model runs the reference for it. Nothing is imported from ``spiking_lm``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .lif import SURROGATE_IDS, _surrogate_grad

BLOCK_M = 32  # query rows per tile
BLOCK_N = 32  # key rows per tile
NUM_WARPS = 4
HEAD_SIZES = (16, 32, 64)  # the padded head sizes the kernels are built for; tl.dot needs >= 16
# Kernel dtypes of q, k, v; fp16 runs as fp32 (exactly), so that only two dtypes need compiling.
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
ROW_MAX_CURRENT = 1.5  # the best key's current under row-max centring, as in the reference


@triton.jit
def _load_rows(base, rows, offs_d, stride_l, L, hs):
    """The (rows, HS) tile of an (L, hs) matrix whose rows are ``stride_l`` apart; padding reads 0."""
    mask = (rows[:, None] < L) & (offs_d[None, :] < hs)
    return tl.load(base + rows[:, None] * stride_l + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _scores(w, q_base, k_base, m_base, m_step, stride_s, offs_m, offs_n, offs_d, den, stride_l, L, hs, x_offset):
    """Scaled scores of one tile at step w (0 when S' = 1) relative to their row max, and the neurons' input:
    c - m and c - m + offset (m and the offset are 0 without centring); also q / den and k, for the backward.

    q_base, k_base and m_base point at this head's step 0; a step is stride_s further in q and k, m_step in m.
    """
    q = _load_rows(q_base + w * stride_s, offs_m, offs_d, stride_l, L, hs)
    k = _load_rows(k_base + w * stride_s, offs_n, offs_d, stride_l, L, hs)
    q_s = q.to(tl.float32) / den  # divided before the matmul, as the reference does
    c = tl.dot(q_s.to(k.dtype), tl.trans(k), input_precision="tf32x3")  # (BLOCK_M, BLOCK_N)
    m = tl.load(m_base + w * m_step + offs_m, mask=offs_m < L, other=0.0)
    centred = c - m[:, None]
    return centred, centred + x_offset, q_s, k


@triton.jit
def _lif_step(x, mem, ref, valid, beta, R, reset_zero):
    """One step of the threshold-1 LIF neurons of a tile; masked pairs never fire.

    Returns the spikes, the new membrane and refractory counter, the pre-spike membrane h and the gate.
    """
    gated = ref > 0
    h = beta * mem + x
    fired = (h > 1.0) & (~gated) & valid
    s = fired.to(tl.float32)
    mem = tl.where(reset_zero != 0, h * (1.0 - s), h - s)
    mem = tl.where(gated, 0.0, mem)
    ref = tl.where(gated, ref - 1, tl.where(fired, R, 0))
    return s, mem, ref, h, gated


@triton.jit
def _replay(steps, x, valid, beta, R, reset_zero,
            q_base, k_base, m_base, m_step, stride_s, offs_m, offs_n, offs_d, den, stride_l, L, hs, x_offset,
            PER_STEP: tl.constexpr):
    """Run a tile's neurons from rest over steps 0..steps-1, the state only in registers.

    ``x`` is every step's input when S' = 1; with S' = S each step's is recomputed (and ``x`` unused).
    Returns the last step's spikes, the membrane and refractory counter after it, and the spikes so far.
    """
    mem = tl.zeros(x.shape, tl.float32)
    ref = tl.zeros(x.shape, tl.int32)
    s = tl.zeros(x.shape, tl.float32)
    n_cum = tl.zeros(x.shape, tl.float32)
    for w in range(steps):
        if PER_STEP:
            centred, x, q_s, k = _scores(w, q_base, k_base, m_base, m_step, stride_s, offs_m, offs_n, offs_d, den,
                                         stride_l, L, hs, x_offset)
        s, mem, ref, h, gated = _lif_step(x, mem, ref, valid, beta, R, reset_zero)
        n_cum += s
    return s, mem, ref, n_cum


@triton.jit
def _program(q_ptr, k_ptr, m_ptr, den_ptr, NH, L, hs, stride_b, stride_h, BLOCK: tl.constexpr, HS: tl.constexpr):
    """Where this program's (batch, head) ``bh`` and block of BLOCK rows are.

    Returns bh, the number B * nh of (batch, head) pairs, bh's offset in q, k, v and its step 0 there (a step is
    stride_s further), its row maxima (a step is B * nh * L further), its offsets in the (S or S', B * nh, L)
    row statistics and the contiguous (S or S', B * nh, L, hs) outputs and gradients, the block's rows, the
    head dims and the head's score divisor sqrt(hs) * threshold.
    """
    bh = tl.program_id(0)
    qkv_off = (bh // NH).to(tl.int64) * stride_b + (bh % NH).to(tl.int64) * stride_h
    stat_off = bh.to(tl.int64) * L
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return (bh, tl.num_programs(0), qkv_off, q_ptr + qkv_off, k_ptr + qkv_off, m_ptr + stat_off, stat_off,
            stat_off * hs, rows, tl.arange(0, HS), tl.load(den_ptr + bh % NH))


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, den_ptr, beta_ptr, y_ptr, m_ptr, ties_ptr, cnt_ptr, spikes_ptr,
    S, L, NH, hs, R, x_offset, center, cumulative, norm_count, reset_zero,
    stride_s, stride_b, stride_h, stride_l,
    PER_STEP: tl.constexpr, HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh, BH, qkv_off, q_base, k_base, m_base, stat_off, out_off, offs_m, offs_d, den = _program(
        q_ptr, k_ptr, m_ptr, den_ptr, NH, L, hs, stride_b, stride_h, BLOCK_M, HS)
    pid_m = tl.program_id(1)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < L
    beta = tl.load(beta_ptr)
    hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)  # causal block skipping: keys past the last row never fire
    S_QK = S if PER_STEP else 1

    # Pass 1: the row maxima of the causal scores, which shift every input of the row, and how many keys
    # share each (the max's gradient is split between them, as torch.amax's is).
    if center != 0:
        for w in range(S_QK):
            row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
            ties = tl.zeros([BLOCK_M], tl.float32)
            for start_n in range(0, hi, BLOCK_N):
                offs_n = start_n + offs_n0
                # The maxima are still the buffer's zeros here, so "centred" is c itself, computed as in pass 2.
                c, x, q_s, k = _scores(w, q_base, k_base, m_base, BH * L, stride_s,
                                       offs_m, offs_n, offs_d, den, stride_l, L, hs, 0.0)
                c = tl.where(offs_n[None, :] <= offs_m[:, None], c, float("-inf"))  # (BLOCK_M, BLOCK_N)
                block_max = tl.max(c, 1)
                block_ties = tl.sum((c == block_max[:, None]).to(tl.float32), 1)
                ties = tl.where(block_max > row_max, block_ties,
                                tl.where(block_max == row_max, ties + block_ties, ties))
                row_max = tl.maximum(row_max, block_max)
            tl.store(m_ptr + w * BH * L + stat_off + offs_m, row_max, mask=row_ok)
            tl.store(ties_ptr + w * BH * L + stat_off + offs_m, ties, mask=row_ok)

    # Pass 2: for each step t, replay the neurons of every causal tile over steps 0..t.
    n_spikes = tl.zeros([BLOCK_M], tl.int32)
    for t in range(S):
        acc = tl.zeros([BLOCK_M, HS], tl.float32)
        row_weight = tl.zeros([BLOCK_M], tl.float32)
        v_base = v_ptr + qkv_off + t * stride_s if PER_STEP else v_ptr + qkv_off
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            valid = (offs_n[None, :] <= offs_m[:, None]) & row_ok[:, None]
            if PER_STEP:
                x = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # unused: _replay recomputes each step's input
            else:  # one input for every step
                centred, x, q_s, k = _scores(0, q_base, k_base, m_base, BH * L, stride_s,
                                             offs_m, offs_n, offs_d, den, stride_l, L, hs, x_offset)
            s, mem, ref, n_cum = _replay(t + 1, x, valid, beta, R, reset_zero, q_base, k_base, m_base, BH * L, stride_s,
                                         offs_m, offs_n, offs_d, den, stride_l, L, hs, x_offset, PER_STEP)
            weights = tl.where(cumulative != 0, n_cum, s)  # N_t, small integers: exact in any float dtype
            v = _load_rows(v_base, offs_n, offs_d, stride_l, L, hs)
            acc += tl.dot(weights.to(v.dtype), v, input_precision="tf32x3")
            row_weight += tl.sum(weights, 1)
            n_spikes += tl.sum(s.to(tl.int32), 1)  # step t's spikes: each step is counted once
        d = tl.where(norm_count != 0, tl.maximum(row_weight, 1.0), (offs_m + 1).to(tl.float32))
        y = acc / d[:, None]
        y_ptrs = y_ptr + t * BH * L * hs + out_off + offs_m[:, None] * hs + offs_d[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < hs))
        tl.store(cnt_ptr + t * BH * L + stat_off + offs_m, row_weight, mask=row_ok)
    tl.store(spikes_ptr + bh * tl.num_programs(1) + pid_m, tl.sum(n_spikes, 0))


@triton.jit
def _attn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, den_ptr, beta_ptr, m_ptr, dys_ptr, delta_ptr, gcount_ptr,
    dq_ptr, dk_ptr, dv_ptr, rowgrad_ptr, dtheta_ptr, dbeta_ptr,
    S, L, NH, hs, R, alpha, x_offset, cumulative, reset_zero, detach_reset, surrogate,
    stride_s, stride_b, stride_h, stride_l,
    PER_STEP: tl.constexpr, HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh, BH, qkv_off, q_base, k_base, m_base, stat_off, out_off, offs_n, offs_d, den = _program(
        q_ptr, k_ptr, m_ptr, den_ptr, NH, L, hs, stride_b, stride_h, BLOCK_N, HS)
    pid_n = tl.program_id(1)
    d_ok = offs_d[None, :] < hs
    beta = tl.load(beta_ptr)
    g_count = tl.load(gcount_ptr)  # d loss / d spike count, for the firing-rate regulariser
    dk_acc = tl.zeros([BLOCK_N, HS], tl.float32)  # over all steps and query blocks when S' = 1
    dv_acc = tl.zeros([BLOCK_N, HS], tl.float32)
    dtheta_acc = tl.zeros([BLOCK_N], tl.float32)  # sum of g_x * (c - m): dtheta times -theta, see the launcher
    dbeta_acc = tl.zeros([BLOCK_N], tl.float32)
    # Causal block skipping: query blocks before the one holding this block's first key see none of it.
    for start_m in range((pid_n * BLOCK_N // BLOCK_M) * BLOCK_M, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < L)
        if PER_STEP:
            x = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # unused: _replay recomputes each step's input
        else:
            centred, x, q_s, k = _scores(0, q_base, k_base, m_base, BH * L, stride_s,
                                         offs_m, offs_n, offs_d, den, stride_l, L, hs, x_offset)
            dq_acc = tl.zeros([BLOCK_M, HS], tl.float32)
            rowgrad_acc = tl.zeros([BLOCK_M], tl.float32)
        gv = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # d loss / d membrane after step u, from step u + 1
        g_later = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # d loss / d weights of steps >= u, cumulative readout
        for back in range(S):
            u = S - 1 - back
            # The state before step u, then step u itself with everything its backward needs.
            s, mem, ref, n_cum = _replay(u, x, valid, beta, R, reset_zero, q_base, k_base, m_base, BH * L, stride_s,
                                         offs_m, offs_n, offs_d, den, stride_l, L, hs, x_offset, PER_STEP)
            if PER_STEP:
                centred, x, q_s, k = _scores(u, q_base, k_base, m_base, BH * L, stride_s,
                                             offs_m, offs_n, offs_d, den, stride_l, L, hs, x_offset)
            mem_prev = mem
            s, mem, ref, h, gated = _lif_step(x, mem, ref, valid, beta, R, reset_zero)
            n_cum += s
            weights = tl.where(cumulative != 0, n_cum, s)  # N_u

            # Through the normalisation and the readout: dys = dy / d, delta = (dy . y) / d where d counts.
            dys = tl.load(dys_ptr + u * BH * L * hs + out_off + offs_m[:, None] * hs + offs_d[None, :],
                          mask=(offs_m[:, None] < L) & d_ok, other=0.0)  # (BLOCK_M, HS)
            delta = tl.load(delta_ptr + u * BH * L + stat_off + offs_m, mask=offs_m < L, other=0.0)
            v_base = v_ptr + qkv_off + u * stride_s if PER_STEP else v_ptr + qkv_off
            v = _load_rows(v_base, offs_n, offs_d, stride_l, L, hs).to(tl.float32)
            g_weights = tl.dot(dys, tl.trans(v), input_precision="tf32x3") - delta[:, None]  # (BLOCK_M, BLOCK_N)
            # A spike at step u is in the weights of every step >= u under the cumulative readout.
            g_later = tl.where(cumulative != 0, g_later + g_weights, g_weights)
            dv_tile = tl.dot(tl.trans(weights), dys, input_precision="tf32x3")  # (BLOCK_N, HS)

            # The LIF backward of kernels/lif.py at threshold 1.
            g_spike = g_later + g_count
            if detach_reset == 0:
                g_spike += gv * tl.where(reset_zero != 0, -h, -1.0)
            # A runtime choice between lif.py's two surrogates halves the variants to compile.
            sg = tl.where(surrogate == 0, _surrogate_grad(h - 1.0, alpha, 0), _surrogate_grad(h - 1.0, alpha, 1))
            gh = g_spike * sg + tl.where(reset_zero != 0, gv * (1.0 - s), gv)
            g_x = tl.where(valid & (~gated), gh, 0.0)  # (BLOCK_M, BLOCK_N)
            dbeta_acc += tl.sum(g_x * mem_prev, 0)
            gv = g_x * beta
            dtheta_acc += tl.sum(g_x * centred, 0)
            dq_tile = tl.dot(g_x, k.to(tl.float32), input_precision="tf32x3") / den  # (BLOCK_M, HS)
            dk_tile = tl.dot(tl.trans(g_x), q_s, input_precision="tf32x3")  # (BLOCK_N, HS)
            if PER_STEP:
                step_off = u * BH * L * hs + out_off
                tl.atomic_add(dq_ptr + step_off + offs_m[:, None] * hs + offs_d[None, :], dq_tile,
                              mask=(offs_m[:, None] < L) & d_ok)
                tl.atomic_add(rowgrad_ptr + u * BH * L + stat_off + offs_m, tl.sum(g_x, 1), mask=offs_m < L)
                # Only this program writes these keys, but a load-add-store could race between its threads.
                tl.atomic_add(dk_ptr + step_off + offs_n[:, None] * hs + offs_d[None, :], dk_tile,
                              mask=(offs_n[:, None] < L) & d_ok)
                tl.atomic_add(dv_ptr + step_off + offs_n[:, None] * hs + offs_d[None, :], dv_tile,
                              mask=(offs_n[:, None] < L) & d_ok)
            else:
                dq_acc += dq_tile
                rowgrad_acc += tl.sum(g_x, 1)
                dk_acc += dk_tile
                dv_acc += dv_tile
        if not PER_STEP:
            tl.atomic_add(dq_ptr + out_off + offs_m[:, None] * hs + offs_d[None, :], dq_acc,
                          mask=(offs_m[:, None] < L) & d_ok)
            tl.atomic_add(rowgrad_ptr + stat_off + offs_m, rowgrad_acc, mask=offs_m < L)
    if not PER_STEP:
        key_mask = (offs_n[:, None] < L) & d_ok
        tl.store(dk_ptr + out_off + offs_n[:, None] * hs + offs_d[None, :], dk_acc, mask=key_mask)
        tl.store(dv_ptr + out_off + offs_n[:, None] * hs + offs_d[None, :], dv_acc, mask=key_mask)
    partial = bh * tl.num_programs(1) + pid_n
    tl.store(dtheta_ptr + partial, tl.sum(dtheta_acc, 0))
    tl.store(dbeta_ptr + partial, tl.sum(dbeta_acc, 0))


@triton.jit
def _attn_rowmax_bwd_kernel(
    q_ptr, k_ptr, den_ptr, m_ptr, ties_ptr, rowgrad_ptr, dq_ptr, dk_ptr,
    S_QK, L, NH, hs,
    stride_s, stride_b, stride_h, stride_l,
    HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The row max's share of the score gradient: every input of row i moves with m_i, so m_i takes
    # -sum_j dL/dx[i, j] (rowgrad), split equally between the keys that attain it. Known only once all key
    # blocks are done, hence this second pass; it recomputes the scores only, no neuron.
    bh, BH, qkv_off, q_base, k_base, m_base, stat_off, out_off, offs_n, offs_d, den = _program(
        q_ptr, k_ptr, m_ptr, den_ptr, NH, L, hs, stride_b, stride_h, BLOCK_N, HS)
    pid_n = tl.program_id(1)
    d_ok = offs_d[None, :] < hs
    for w in range(S_QK):
        dk_acc = tl.zeros([BLOCK_N, HS], tl.float32)
        for start_m in range((pid_n * BLOCK_N // BLOCK_M) * BLOCK_M, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < L
            valid = (offs_n[None, :] <= offs_m[:, None]) & row_ok[:, None]
            centred, x, q_s, k = _scores(w, q_base, k_base, m_base, BH * L, stride_s,
                                         offs_m, offs_n, offs_d, den, stride_l, L, hs, 0.0)
            share = (tl.load(rowgrad_ptr + w * BH * L + stat_off + offs_m, mask=row_ok, other=0.0)
                     / tl.load(ties_ptr + w * BH * L + stat_off + offs_m, mask=row_ok, other=1.0))
            # The same arithmetic as pass 1 (one _scores), so the row's maxima are exactly where c - m is 0.
            g = tl.where((centred == 0.0) & valid, share[:, None], 0.0)  # (BLOCK_M, BLOCK_N), minus dL/dc
            dq_tile = tl.dot(g, k.to(tl.float32), input_precision="tf32x3") / den
            tl.atomic_add(dq_ptr + w * BH * L * hs + out_off + offs_m[:, None] * hs + offs_d[None, :], -dq_tile,
                          mask=row_ok[:, None] & d_ok)
            dk_acc -= tl.dot(tl.trans(g), q_s, input_precision="tf32x3")
        tl.atomic_add(dk_ptr + w * BH * L * hs + out_off + offs_n[:, None] * hs + offs_d[None, :], dk_acc,
                      mask=(offs_n[:, None] < L) & d_ok)


def _qkv_layout(q, k, v):
    """q, k, v in a kernel dtype, sharing one layout with unit stride over the head dim (copies only if not)."""
    if q.dtype not in DTYPES:
        q, k, v = (t.float() for t in (q, k, v))
    if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):
        q, k, v = (t.contiguous() for t in (q, k, v))
    return q, k, v


def _head_block(hs: int) -> int:
    HS = max(16, triton.next_power_of_2(hs))
    if HS not in HEAD_SIZES:
        raise ValueError(f"fused spiking attention supports head sizes up to {HEAD_SIZES[-1]}, got {hs}")
    return HS


class SpikingAttentionFunction(torch.autograd.Function):
    """Fused spiking attention; returns the output (S, B, nh, L, hs) and the spike count (0-d fp64)."""

    @staticmethod
    def forward(ctx, q, k, v, threshold, beta, timesteps, refractory, reset, surrogate, alpha, detach_reset,
                centering, readout, norm):
        ctx.in_dtype = q.dtype
        q, k, v = _qkv_layout(q, k, v)
        S, (S_qk, B, nh, L, hs) = timesteps, q.shape
        if S_qk not in (1, S) or not q.shape == k.shape == v.shape:
            raise ValueError(f"q, k, v must share a shape (S', B, nh, L, hs) with S' 1 or S = {S}, got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        HS = _head_block(hs)
        den = (math.sqrt(hs) * threshold.detach()).float().contiguous()  # (nh,), as the reference scales
        beta_f = torch.as_tensor(beta, dtype=torch.float32, device=q.device).detach().reshape(1)
        per_step = S_qk > 1
        center = centering == "row_max"
        row_max = torch.zeros((S_qk, B * nh, L), dtype=torch.float32, device=q.device)  # stays 0 without centring
        ties = torch.ones((S_qk, B * nh, L), dtype=torch.float32, device=q.device)  # keys attaining the row max
        row_count = torch.empty((S, B * nh, L), dtype=torch.float32, device=q.device)
        y = torch.empty((S, B, nh, L, hs), dtype=q.dtype, device=q.device)
        grid = (B * nh, triton.cdiv(L, BLOCK_M))
        spikes = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=q.device)
        _attn_fwd_kernel[grid](
            q, k, v, den, beta_f, y, row_max, ties, row_count, spikes,
            S, L, nh, hs, refractory, ROW_MAX_CURRENT if center else 0.0, int(center), int(readout == "cumulative"),
            int(norm == "count"), int(reset == "zero"),
            q.stride(0) if per_step else 0, q.stride(1), q.stride(2), q.stride(3),
            PER_STEP=per_step, HS=HS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS,
        )
        ctx.save_for_backward(q, k, v, threshold, den, beta_f, y, row_max, ties, row_count)
        ctx.settings = (S, refractory, reset, surrogate, alpha, detach_reset, center, readout, norm)
        ctx.beta_meta = (beta.shape, beta.dtype) if isinstance(beta, torch.Tensor) else None
        return y.to(ctx.in_dtype), spikes.sum(dtype=torch.int64).double()

    @staticmethod
    def backward(ctx, dy, d_count):
        q, k, v, threshold, den, beta_f, y, row_max, ties, row_count = ctx.saved_tensors
        S, refractory, reset, surrogate, alpha, detach_reset, center, readout, norm = ctx.settings
        S_qk, B, nh, L, hs = q.shape
        per_step = S_qk > 1
        # Through the normalisation, as FlashAttention-2's D = dy . y: dL/dN_t[i, j] = dys[i] . v[j] - delta[i].
        d = row_count.clamp_min(1) if norm == "count" else torch.arange(1, L + 1, device=q.device).float()
        dys = (dy.float().reshape(S, B * nh, L, hs) / d.unsqueeze(-1)).contiguous()  # (S, B*nh, L, hs)
        if norm == "count":  # clamp_min(1) passes the gradient only where the row's weights sum to more than 1
            delta = (dys * y.float().reshape(S, B * nh, L, hs)).sum(-1) * (row_count > 1)  # (S, B*nh, L)
        else:
            delta = torch.zeros_like(row_count)
        dq, dk, dv = (torch.zeros((S_qk, B * nh, L, hs), dtype=torch.float32, device=q.device) for _ in range(3))
        rowgrad = torch.zeros_like(row_max)  # (S', B*nh, L): sum_j of dL/dx, the row max's gradient
        grid = (B * nh, triton.cdiv(L, BLOCK_N))
        dtheta, dbeta = (torch.empty(grid[0] * grid[1], dtype=torch.float32, device=q.device) for _ in range(2))
        _attn_bwd_kernel[grid](
            q, k, v, den, beta_f, row_max, dys, delta, d_count.float().reshape(1),
            dq, dk, dv, rowgrad, dtheta, dbeta,
            S, L, nh, hs, refractory, alpha, ROW_MAX_CURRENT if center else 0.0, int(readout == "cumulative"),
            int(reset == "zero"), int(detach_reset), SURROGATE_IDS[surrogate],
            q.stride(0) if per_step else 0, q.stride(1), q.stride(2), q.stride(3),
            PER_STEP=per_step, HS=_head_block(hs), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS,
        )
        if center:
            _attn_rowmax_bwd_kernel[grid](
                q, k, den, row_max, ties, rowgrad, dq, dk,
                S_qk, L, nh, hs,
                q.stride(0) if per_step else 0, q.stride(1), q.stride(2), q.stride(3),
                HS=_head_block(hs), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS,
            )
        dq, dk, dv = (g.view(S_qk, B, nh, L, hs) for g in (dq, dk, dv))
        # dc/dtheta = -c / theta, and the row max's term turns sum(g_c * c) into sum(g_x * (c - m)).
        d_threshold = -dtheta.view(B, nh, -1).sum((0, 2)) / threshold.detach().float()  # (nh,)
        d_beta = dbeta.sum().reshape(ctx.beta_meta[0]).to(ctx.beta_meta[1]) if ctx.beta_meta else None
        return (dq.to(ctx.in_dtype), dk.to(ctx.in_dtype), dv.to(ctx.in_dtype), d_threshold.to(threshold.dtype), d_beta,
                None, None, None, None, None, None, None, None, None)


def spiking_attention_triton(q, k, v, threshold, beta, timesteps: int, refractory: int, reset: str, surrogate: str,
                             alpha: float, detach_reset: bool, centering: str, readout: str, norm: str):
    """Fused spiking attention with the semantics of the reference; every setting given, ``alpha`` resolved.

    q, k, v: (S', B, nh, L, hs) with S' in {1, S}; threshold: (nh,) positive; beta: float or 0-d tensor.
    Returns the output (S, B, nh, L, hs) and the spike count of all causal pairs and steps (0-d fp64,
    differentiable through the surrogate like the reference's).
    """
    return SpikingAttentionFunction.apply(q, k, v, threshold, beta, timesteps, refractory, reset, surrogate, alpha,
                                          detach_reset, centering, readout, norm)


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Triton types of a kernel's arguments: q, k, v (and y) in ``dtype``, other pointers fp32/i32, sizes i32."""
    pointers = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "y_ptr": dtype, "spikes_ptr": "i32"}
    floats = {"x_offset", "alpha"}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
        else:
            signature[name] = "fp32" if name in floats else "i32"
    return signature


def compile_variants() -> list[dict]:
    """Every (kernel, signature, constexprs, num_warps) the launchers can pick, for ahead-of-time compile tests."""
    variants = []
    for dtype in DTYPES.values():
        for HS in HEAD_SIZES:
            for per_step in (False, True):
                constexprs = dict(PER_STEP=per_step, HS=HS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
                variants += [dict(kernel=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs,
                                  num_warps=NUM_WARPS) for kernel in (_attn_fwd_kernel, _attn_bwd_kernel)]
            constexprs = dict(HS=HS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
            variants.append(dict(kernel=_attn_rowmax_bwd_kernel, constexprs=constexprs, num_warps=NUM_WARPS,
                                 signature=_signature(_attn_rowmax_bwd_kernel, dtype, constexprs)))
    return variants
